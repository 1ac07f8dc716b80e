import t from 'tap'
import { execFileSync } from 'node:child_process'
import { readdirSync } from 'node:fs'
import { join } from 'node:path'
import pg from 'pg'
import pino from 'pino'
import { setTimeout as sleep } from 'node:timers/promises'
import { PG_MIGRATE_LOCK_ID } from 'node-pg-migrate'
import { MIGRATIONS_TABLE, SQL_DIR, describeDatabase, isDatabaseUnavailable, isInvalidData, migrate } from '../../plugins/db.ts'
import { build, createTestDatabase, insertRecords, type TestContext } from '../helper.ts'
import { until } from '../wait.ts'

const log = pino({ level: 'silent' })

function pool (t: TestContext, connectionString: string, max = 2): pg.Pool {
  const created = new pg.Pool({ connectionString, max })
  created.on('error', () => {})
  t.teardown(() => created.end())
  return created
}

async function appliedNames (db: pg.Pool): Promise<string[]> {
  const { rows } = await db.query(`SELECT name FROM ${MIGRATIONS_TABLE} ORDER BY id`)
  return rows.map((row) => row.name)
}

const migrationFiles = readdirSync(SQL_DIR).filter((name) => name.endsWith('.sql')).sort()

t.test('migrate applies every file once, and a second run applies nothing', async (t) => {
  const db = pool(t, await createTestDatabase(t))
  const first = await migrate(db, log)
  t.strictSame(first, migrationFiles.map((name) => name.replace(/\.sql$/, '')))
  t.strictSame(await migrate(db, log), [], 'nothing pending the second time')
  t.strictSame(await appliedNames(db), first)
  const { rows } = await db.query("SELECT to_regclass('user_sync_data') IS NOT NULL AS present")
  t.equal(rows[0].present, true)
})

t.test('instances starting at once: both come up, each file is applied once', async (t) => {
  const url = await createTestDatabase(t)
  const results = await Promise.all(Array.from({ length: 4 }, () => migrate(pool(t, url), log)))
  t.equal(results.flat().length, migrationFiles.length, 'each migration applied by exactly one instance')
  t.strictSame(await appliedNames(pool(t, url)), migrationFiles.map((name) => name.replace(/\.sql$/, '')))
})

t.test('an instance starting while another migrates for longer than the statement time-out waits for it, then finds nothing to do', async (t) => {
  const url = await createTestDatabase(t)
  const db = pool(t, url)
  await migrate(db, log)
  // Another instance in the middle of a long migration: its transaction holds the lock.
  const other = await db.connect()
  t.teardown(() => other.release())
  await other.query('BEGIN')
  await other.query('SELECT pg_advisory_xact_lock($1)', [PG_MIGRATE_LOCK_ID])
  let settled = false
  const starting = migrate(pool(t, url), log, 300).finally(() => { settled = true })
  starting.catch(() => {}) // judged below
  await until(async () => (await db.query<{ n: number }>(
    "SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'advisory'")).rows[0]!.n === 1,
  'the starting instance waits for the lock')
  await sleep(1_000) // past its 300 ms statement time-out
  t.equal(settled, false, 'still waiting, not timed out')
  await other.query('COMMIT')
  t.strictSame(await starting, [], 'then starts, with nothing left to apply')
})

t.test('a database the postgres image initialised from sql/: the service finds it current', async (t) => {
  const url = await createTestDatabase(t)
  // What the image's entrypoint does with /docker-entrypoint-initdb.d on first start.
  for (const file of migrationFiles) {
    execFileSync('psql', ['-v', 'ON_ERROR_STOP=1', '--no-psqlrc', '-q', '-d', url, '-f', join(SQL_DIR, file)])
  }
  // pg_dump brackets its output with a random \restrict key; the rest is the schema.
  const schema = () => execFileSync('pg_dump', ['--schema-only', '--table=user_sync_data', '--table=user_sync_versions', '-d', url]).toString()
    .split('\n').filter((line) => !/^\\(un)?restrict /.test(line)).join('\n')
  const initialised = schema()
  const db = pool(t, url)
  await db.query(insertRecords("SELECT '0f8fad5b-d9cb-469f-a165-70867728950e'::uuid, 'AAAA', 'AAAAAAAAAAAAAAAA', 1::bigint, repeat('a', 64), 3, now()"))

  const logLines: string[] = []
  const app = await build(t, { env: { DATABASE_URL: url, LOG_LEVEL: 'info' }, logLines })
  const started = logLines.map((line) => JSON.parse(line)).find((line) => line.msg === 'connected to PostgreSQL')
  t.strictSame(started?.migrationsApplied, migrationFiles.map((name) => name.replace(/\.sql$/, '')), 'the service records the files')
  t.equal(schema(), initialised, 'and changes nothing in the schema')
  t.strictSame(await appliedNames(db), migrationFiles.map((name) => name.replace(/\.sql$/, '')), 'each file recorded once')
  const res = await app.inject({ method: 'GET', url: '/api/sync/0f8fad5b-d9cb-469f-a165-70867728950e' })
  t.equal(res.statusCode, 200, 'the data the database held is served')
  t.strictSame(await migrate(db, log), [], 'a later start applies nothing')
})

t.test('errors are classified from real failures', async (t) => {
  const refused = new pg.Client({ connectionString: 'postgres://postgres@127.0.0.1:1/none', connectionTimeoutMillis: 1000 })
  const connectError = await refused.connect().then(() => null, (err: unknown) => err)
  t.ok(isDatabaseUnavailable(connectError), 'refused connection')
  t.notOk(isInvalidData(connectError))

  const db = pool(t, await createTestDatabase(t))
  await migrate(db, log)
  const badUuid = await db.query("SELECT 'nope'::uuid").then(() => null, (err: unknown) => err)
  t.ok(isInvalidData(badUuid), 'bad uuid text is invalid data')
  t.notOk(isDatabaseUnavailable(badUuid))
  const check = await db.query(insertRecords("SELECT '0f8fad5b-d9cb-469f-a165-70867728950e'::uuid, 'AAAA', 'bad', 1::bigint, repeat('a', 64), 3, now()"))
    .then(() => null, (err: unknown) => err)
  t.notOk(isInvalidData(check), 'a check violation is a bug of ours (the schemas let the value through): a 500, not a 400')
  t.notOk(isDatabaseUnavailable(check))
  const timeout = await db.query('SET statement_timeout = 50; SELECT pg_sleep(1)').then(() => null, (err: unknown) => err)
  t.ok(isDatabaseUnavailable(timeout), 'statement timeout means overloaded')
  const syntax = await db.query('SELEC 1').then(() => null, (err: unknown) => err)
  t.notOk(isDatabaseUnavailable(syntax), 'a bug is neither')
  t.notOk(isInvalidData(syntax))
})

t.test('describeDatabase never shows credentials', async (t) => {
  t.equal(describeDatabase('postgres://user:hunter2@db.internal:6543/logikids'), 'db.internal:6543/logikids')
  t.equal(describeDatabase('postgresql://user@db/logikids'), 'db:5432/logikids')
})
