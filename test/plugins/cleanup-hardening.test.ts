import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import pg from 'pg'
import { build, databaseUrlOf, inspect } from '../helper.ts'
import * as cleanupPlugin from '../../plugins/cleanup.ts'

const { CLEANUP_LOCK } = cleanupPlugin
// Not exported yet by plugins/cleanup.ts; read from the namespace so the other tests of this
// file run (and fail on their own) until it is. Then: import { setLongTimeout } from ...
const { setLongTimeout } = cleanupPlugin as unknown as {
  setLongTimeout?: (fn: () => void, ms: number) => { clear (): void }
}

const DAY_MS = 86_400_000

/** `count` accounts last accessed 40 days ago, inserted straight into the database. */
async function seedIdle (db: pg.Pool, count: number): Promise<void> {
  await db.query(`INSERT INTO user_sync_data (user_id, encrypted_blob, iv, timestamp, checksum, blob_size, last_accessed)
    SELECT gen_random_uuid(), 'AAAA', 'AAAAAAAAAAAAAAAA', 1, repeat('a', 64), 3, now() - interval '40 days'
    FROM generate_series(1, $1::int)`, [count])
}

const idleRows = async (db: pg.Pool): Promise<number> =>
  (await db.query("SELECT count(*)::int AS n FROM user_sync_data WHERE last_accessed < now() - interval '30 days'")).rows[0].n

/** Advisory locks held by connections to this database, other than those of `except`. */
async function advisoryLocks (db: pg.Pool, except: number[] = []): Promise<number> {
  const { rows: [row] } = await db.query(`SELECT count(*)::int AS n FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND a.datname = current_database() AND NOT (l.pid = ANY($1::int[]))`, [except])
  return row.n
}

/** Resolves once `done` is true, checking every 20 ms, or rejects after `ms`. */
async function waitFor (done: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms
  while (!done()) {
    if (Date.now() > deadline) throw new Error(`not within ${ms} ms: ${what}`)
    await sleep(20)
  }
}

t.test('a pool of one connection: the cleanup still deletes the inactive accounts', async (t) => {
  const app = await build(t, { env: { DATABASE_POOL_MAX: '1', CLEANUP_INACTIVE_DAYS: '30', CLEANUP_INTERVAL: '0' } })
  const db = inspect(t, databaseUrlOf(app))
  await seedIdle(db, 3)
  await db.query(`INSERT INTO user_sync_data (user_id, encrypted_blob, iv, timestamp, checksum, blob_size)
    VALUES (gen_random_uuid(), 'AAAA', 'AAAAAAAAAAAAAAAA', 1, repeat('a', 64), 3)`)
  t.match(await app.cleanup.run(), { ran: true, deleted: 3 })
  t.equal(await idleRows(db), 0)
  t.equal((await db.query('SELECT count(*)::int AS n FROM user_sync_data')).rows[0].n, 1, 'the active account stays')
  t.equal(await advisoryLocks(db), 0, 'no advisory lock left behind')
})

t.test('a lock held in another session\'s transaction: skip, then run once it commits; no lock left behind', async (t) => {
  const app = await build(t, { env: { CLEANUP_INACTIVE_DAYS: '30', CLEANUP_INTERVAL: '0' } })
  const db = inspect(t, databaseUrlOf(app))
  await seedIdle(db, 4)
  const other = new pg.Client({ connectionString: databaseUrlOf(app) })
  await other.connect()
  t.teardown(() => other.end())
  const { rows: [{ pid: otherPid }] } = await other.query('SELECT pg_backend_pid() AS pid')
  await other.query('BEGIN')
  await other.query('SELECT pg_advisory_xact_lock($1)', [CLEANUP_LOCK])

  t.match(await app.cleanup.run(), { ran: false })
  t.equal(await idleRows(db), 4, 'nothing deleted while the other session holds the lock')
  t.equal(await advisoryLocks(db, [otherPid]), 0, 'the skipped run left no lock of its own')

  await other.query('COMMIT')
  t.match(await app.cleanup.run(), { ran: true, deleted: 4 })
  t.equal(await idleRows(db), 0)
  t.equal(await advisoryLocks(db), 0, 'no advisory lock left after the run')
})

t.test('setLongTimeout: waits out a delay longer than setTimeout can hold', async (t) => {
  t.type(setLongTimeout, 'function', 'plugins/cleanup.ts exports setLongTimeout')
  if (setLongTimeout === undefined) return
  let ran = false
  const timer = setLongTimeout(() => { ran = true }, 30 * DAY_MS)
  await sleep(200)
  t.equal(ran, false, 'a 30-day timer has not fired after 200 ms')
  timer.clear()
})

t.test('setLongTimeout: a short delay fires once; a cleared one never', async (t) => {
  if (setLongTimeout === undefined) return t.fail('plugins/cleanup.ts exports no setLongTimeout')
  let runs = 0
  setLongTimeout(() => { runs++ }, 50)
  await waitFor(() => runs > 0, 5_000, 'the 50 ms timer fires')
  await sleep(100)
  t.equal(runs, 1, 'fired exactly once')

  let cleared = false
  setLongTimeout(() => { cleared = true }, 50).clear()
  await sleep(200)
  t.equal(cleared, false, 'a cleared timer does not fire')
})

t.test('CLEANUP_INTERVAL=30d does not run the cleanup in a loop', async (t) => {
  const warnings: string[] = []
  const onWarning = (warning: Error) => warnings.push(warning.name)
  process.on('warning', onWarning)
  t.teardown(() => { process.removeListener('warning', onWarning) })
  const app = await build(t, { env: { CLEANUP_INTERVAL: '30d', CLEANUP_INACTIVE_DAYS: '30' } })
  await sleep(300)
  const metrics = (await app.inject({ method: 'GET', url: '/metrics' })).body
  const runs = metrics.split('\n').filter((line) => line.startsWith('cleanup_runs_total') && Number(line.split(' ').at(-1)) > 0)
  t.strictSame(runs, [], 'no cleanup run counted')
  t.notOk(warnings.includes('TimeoutOverflowWarning'), 'no timer longer than Node can hold')
})

t.test('a lost idle connection is logged with its SQLSTATE code', async (t) => {
  const logLines: string[] = []
  const app = await build(t, { env: { LOG_LEVEL: 'warn' }, logLines })
  await app.pg.pool.query('SELECT 1')
  t.ok(app.pg.pool.idleCount > 0, 'the pool holds an idle connection')
  const admin = new pg.Client({ connectionString: databaseUrlOf(app) })
  await admin.connect()
  t.teardown(() => admin.end())
  await admin.query('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()')

  const lost = () => logLines.find((line) => (JSON.parse(line) as { msg?: string }).msg === 'idle database connection lost')
  await waitFor(() => lost() !== undefined, 5_000, 'the idle database connection lost line')
  const line = lost()!
  t.match(JSON.parse(line), { err: { code: '57P01' } }, line)
  t.notOk(line.includes('[object Object]'), 'the error is not printed as [object Object]')
})
