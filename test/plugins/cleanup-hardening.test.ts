import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import pg from 'pg'
import { until } from '../wait.ts'
import { build, databaseUrlOf, insertRecords, inspect } from '../helper.ts'
import { mock } from 'node:test'
import { CLEANUP_LOCK, scheduleEvery, setLongTimeout } from '../../plugins/cleanup.ts'

const DAY_MS = 86_400_000
type Test = Parameters<Parameters<typeof t.test>[0]>[0]

/** `count` accounts last accessed 40 days ago, inserted straight into the database. */
async function seedIdle (db: pg.Pool, count: number): Promise<void> {
  await db.query(insertRecords(`SELECT gen_random_uuid(), 'AAAA', 'AAAAAAAAAAAAAAAA', 1::bigint, repeat('a', 64), 3, now() - interval '40 days'
    FROM generate_series(1, $1::int)`), [count])
}

const idleRows = async (db: pg.Pool): Promise<number> =>
  (await db.query("SELECT count(*)::int AS n FROM user_sync_data WHERE last_accessed < now() - interval '30 days'")).rows[0].n

/** Advisory locks held by connections to this database, other than those of `except`. */
async function advisoryLocks (db: pg.Pool, except: number[] = []): Promise<number> {
  const { rows: [row] } = await db.query(`SELECT count(*)::int AS n FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND a.datname = current_database() AND NOT (l.pid = ANY($1::int[]))`, [except])
  return row.n
}

t.test('a pool of one connection: the cleanup still deletes the inactive accounts', async (t) => {
  const app = await build(t, { env: { DATABASE_POOL_MAX: '1', CLEANUP_INACTIVE_DAYS: '30', CLEANUP_INTERVAL: '0' } })
  const db = inspect(t, databaseUrlOf(app))
  await seedIdle(db, 3)
  await db.query(insertRecords("SELECT gen_random_uuid(), 'AAAA', 'AAAAAAAAAAAAAAAA', 1::bigint, repeat('a', 64), 3, now()"))
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

/**
 * Node's timers, mocked: `tick` moves the clock. The mock fires a delay over 2^31-1 ms after
 * 1 ms, as Node itself does, so the bug these tests guard against shows under it.
 */
function mockedClock (t: Test) {
  mock.timers.enable({ apis: ['setTimeout', 'Date'], now: 0 })
  t.teardown(() => mock.timers.reset())
  return {
    async tick (ms: number) {
      mock.timers.tick(ms)
      // Let promise callbacks (a run ending, the next one being scheduled) catch up.
      for (let i = 0; i < 10; i++) await Promise.resolve()
    }
  }
}

t.test('setLongTimeout: a 30-day delay fires once, at 30 days, not at 1 ms nor at the 24.8-day step', async (t) => {
  const clock = mockedClock(t)
  let runs = 0
  setLongTimeout(() => { runs++ }, 30 * DAY_MS)
  await clock.tick(1)
  t.equal(runs, 0, 'not after 1 ms (a plain setTimeout would fire here)')
  await clock.tick(2 ** 31)
  t.equal(runs, 0, 'not after the first step of 24.8 days')
  await clock.tick(30 * DAY_MS - 2 ** 31 - 2)
  t.equal(runs, 0, 'not a moment early')
  await clock.tick(1)
  t.equal(runs, 1, 'at 30 days')
  await clock.tick(60 * DAY_MS)
  t.equal(runs, 1, 'and once only')

  let cleared = false
  setLongTimeout(() => { cleared = true }, 30 * DAY_MS).clear()
  await clock.tick(31 * DAY_MS)
  t.equal(cleared, false, 'a cleared timer never fires')
})

t.test('the cleanup schedule: a minute after start, then every interval, however long', async (t) => {
  const clock = mockedClock(t)
  let runs = 0
  const schedule = scheduleEvery(async () => { runs++ }, 60_000, 30 * DAY_MS)
  t.teardown(() => schedule.stop())
  await clock.tick(59_999)
  t.equal(runs, 0, 'not before a minute')
  await clock.tick(1)
  t.equal(runs, 1, 'the first run a minute after start')
  await clock.tick(29 * DAY_MS)
  t.equal(runs, 1, 'no second run within the 30-day interval (no hot loop)')
  await clock.tick(DAY_MS)
  t.equal(runs, 2, 'the second run 30 days after the first')
  schedule.stop()
  await clock.tick(60 * DAY_MS)
  t.equal(runs, 2, 'nothing after stop()')
})

t.test('the scheduled cleanup runs inside the service, again and again', async (t) => {
  const app = await build(t, { env: { CLEANUP_INTERVAL: '50ms', CLEANUP_INACTIVE_DAYS: '30' } })
  const db = inspect(t, databaseUrlOf(app))
  await db.query(insertRecords("SELECT gen_random_uuid(), 'AAAA', 'AAAAAAAAAAAAAAAA', 1::bigint, repeat('a', 64), 3, now() - interval '40 days'"))
  const runs = async () => Number(/cleanup_runs_total\{result="deleted"\} (\d+)/.exec(await app.metrics.registry.metrics())?.[1] ?? 0)
  for (const deadline = Date.now() + 20_000; (await runs()) < 2;) {
    if (Date.now() > deadline) throw new Error('the scheduled cleanup did not run twice within 20 s')
    await sleep(20)
  }
  t.equal(await idleRows(db), 0, 'it deleted the idle account')
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
  await until(() => lost() !== undefined, 'the idle database connection lost line', 5_000)
  const line = lost()!
  t.match(JSON.parse(line), { err: { code: '57P01' } }, line)
  t.notOk(line.includes('[object Object]'), 'the error is not printed as [object Object]')
})
