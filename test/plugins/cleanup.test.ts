import t from 'tap'
import { execFile } from 'node:child_process'
import { randomUUID } from 'node:crypto'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import pino from 'pino'
import { build, databaseUrlOf, insertRecords, inspect, metricValue } from '../helper.ts'
import { cleanupInactive, CLEANUP_LOCK } from '../../plugins/cleanup.ts'

const ROOT = fileURLToPath(new URL('../../', import.meta.url))
const logLines: string[] = []
const app = await build(t, { env: { CLEANUP_INTERVAL: '0', CLEANUP_INACTIVE_DAYS: '730', LOG_LEVEL: 'info' }, logLines })
const db = inspect(t, databaseUrlOf(app))
const payload = { encryptedBlob: 'AAAA', iv: 'AAAAAAAAAAAAAAAA', timestamp: 1, checksum: 'a'.repeat(64) }

async function seed (idleDays: number[]): Promise<string[]> {
  const ids: string[] = []
  for (const days of idleDays) {
    const id = randomUUID()
    await app.inject({ method: 'PUT', url: `/api/sync/${id}`, payload })
    await db.query('UPDATE user_sync_data SET last_accessed = now() - make_interval(days => $2) WHERE user_id = $1', [id, days])
    ids.push(id)
  }
  return ids
}
const remaining = async (ids: string[]) =>
  (await db.query('SELECT count(*)::int AS n FROM user_sync_data WHERE user_id = ANY($1)', [ids])).rows[0].n

t.test('a run deletes exactly the accounts idle longer than the retention, logs and counts it', async (t) => {
  await db.query('DELETE FROM user_sync_data')
  const idle = await seed([731, 800, 2000])
  const active = await seed([0, 100, 729])
  const before = Date.now() / 1000
  const result = await app.cleanup.run()
  t.match(result, { ran: true, deleted: 3, dryRun: false })
  t.equal(await remaining(idle), 0)
  t.equal(await remaining(active), 3)
  const line = logLines.map((text) => JSON.parse(text)).find((entry) => entry.msg === 'cleanup: inactive accounts deleted')
  t.match(line, { deleted: 3, inactiveDays: 730, ms: Number })
  const metrics = (await app.inject({ method: 'GET', url: '/metrics' })).body
  t.match(metrics, /cleanup_runs_total\{result="deleted"\} 1/)
  t.match(metrics, /cleanup_deleted_accounts_total 3/)
  t.ok(await metricValue(app, 'cleanup_last_success_timestamp_seconds') >= Math.floor(before), 'the run is stamped as the last success')
  t.equal(await metricValue(app, 'cleanup_last_failure_timestamp_seconds'), 0, 'and no failure')
  t.equal(await metricValue(app, 'cleanup_interval_seconds'), app.config.CLEANUP_INTERVAL / 1000, 'beside the interval the alert compares it with')
})

t.test('many rows go in batches, and all of them go', async (t) => {
  await db.query('DELETE FROM user_sync_data')
  await db.query(insertRecords(`SELECT gen_random_uuid(), 'AAAA', 'AAAAAAAAAAAAAAAA', 1::bigint, repeat('a', 64), 3, now() - interval '3 years'
    FROM generate_series(1, 2500)`))
  const keep = await seed([1])
  const batches: Array<[string, number]> = []
  const result = await cleanupInactive(app.pg.pool, app.storage, app.log, {
    inactiveDays: 730, batchSize: 1000, onBatch: (phase, rows) => batches.push([phase, rows])
  })
  t.match(result, { ran: true, deleted: 2500 })
  t.equal(await remaining(keep), 1)
  t.strictSame(batches.filter(([phase]) => phase === 'accounts'), [['accounts', 1000], ['accounts', 1000], ['accounts', 500]],
    'each batch is reported as it ends (what the command shows as progress)')
  const dropped = batches.filter(([phase]) => phase === 'versions').reduce((sum, [, rows]) => sum + rows, 0)
  t.equal(dropped, result.ran ? result.historyPruned : -1, 'then the kept versions dropped')
})

t.test('with the lock held elsewhere (another instance), a run skips and deletes nothing', async (t) => {
  const idle = await seed([1000])
  const other = await db.connect()
  // Held as another instance holds it: in a transaction (a session's lock would stay with
  // whichever server connection a transaction-mode pooler lent for the statement).
  await other.query('BEGIN')
  await other.query('SELECT pg_advisory_xact_lock($1)', [CLEANUP_LOCK])
  const before = await metricValue(app, 'cleanup_last_success_timestamp_seconds')
  try {
    t.strictSame(await app.cleanup.run(), { ran: false, reason: 'another instance is running it' })
    t.equal(await remaining(idle), 1)
    // A hung run holds the lock too: SyncCleanupNotRun must see that no run ends.
    t.equal(await metricValue(app, 'cleanup_last_success_timestamp_seconds'), before, 'a skipped run is not stamped as a success')
  } finally {
    await other.query('COMMIT')
    other.release()
  }
  t.match(await app.cleanup.run(), { ran: true, deleted: 1 }, 'and runs once the lock is free')
})

t.test('two cleanups at once: while one holds the lock, the other skips', async (t) => {
  const idle = await seed([1000, 1000, 1000])
  const log = pino({ level: 'silent' })
  // The first run is held inside its locked section until the second has tried: the overlap
  // happens on every run, whatever the machine's speed.
  let letGo: () => void = () => {}
  const gate = new Promise<void>((resolve) => { letGo = resolve })
  let entered: () => void = () => {}
  const inside = new Promise<void>((resolve) => { entered = resolve })
  const held = {
    ...app.storage,
    deleteInactive: async (days: number, batch?: number) => {
      entered()
      await gate
      return await app.storage.deleteInactive(days, batch)
    }
  }
  const first = cleanupInactive(app.pg.pool, held, log, { inactiveDays: 730 })
  await inside
  const second = await cleanupInactive(app.pg.pool, app.storage, log, { inactiveDays: 730 })
  t.strictSame(second, { ran: false, reason: 'another instance is running it' }, 'the second run skips')
  t.equal(await remaining(idle), 3, 'and deleted nothing')
  letGo()
  t.match(await first, { ran: true, deleted: 3 }, 'the first one runs to the end')
  t.equal(await remaining(idle), 0)
  const { rows: [locks] } = await db.query(
    "SELECT count(*)::int AS n FROM pg_locks WHERE locktype = 'advisory' AND objid = $1::bigint % 4294967296", [CLEANUP_LOCK])
  t.equal(locks.n, 0, 'no advisory lock is left behind')
})

t.test('npm run cleanup: dry run, then the real thing', async (t) => {
  const idle = await seed([900, 900])
  const run = promisify(execFile)
  const env = { PATH: process.env.PATH ?? '', DATABASE_URL: databaseUrlOf(app), DATABASE_POOLER: app.config.DATABASE_POOLER }
  const dry = await run(process.execPath, ['--import', 'tsx', 'scripts/cleanup.ts', '--days', '730', '--dry-run'], { cwd: ROOT, env })
  t.match(dry.stdout, /would delete 2 accounts not accessed for more than 730 days \(dry run, nothing deleted\)/)
  t.equal(await remaining(idle), 2)
  const real = await run(process.execPath, ['--import', 'tsx', 'scripts/cleanup.ts', '--days', '730'], { cwd: ROOT, env })
  t.match(real.stdout, /deleted 2 accounts not accessed for more than 730 days in \d+ ms/)
  t.equal(await remaining(idle), 0)
  const bad = await run(process.execPath, ['--import', 'tsx', 'scripts/cleanup.ts', '--days', 'soon'], { cwd: ROOT, env })
    .then(() => null, (err: { code: number, stderr: string }) => err)
  t.equal(bad?.code, 64)
  t.match(bad?.stderr, /--days must be a whole number/)
})

t.test('CLEANUP_INACTIVE_DAYS=0 keeps every account', async (t) => {
  const keeper = await build(t, { env: { DATABASE_URL: databaseUrlOf(app), CLEANUP_INACTIVE_DAYS: '0', CLEANUP_INTERVAL: '0' } })
  const idle = await seed([1000])
  t.match(await keeper.cleanup.run(), { ran: true, deleted: 0 }, 'the cleanup still runs (for the history), but deletes no account')
  t.equal(await remaining(idle), 1)
  t.equal((await keeper.inject({ method: 'GET', url: '/info' })).json().retentionDays, null)
})
