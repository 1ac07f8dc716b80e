import t from 'tap'
import { randomUUID } from 'node:crypto'
import { PG_MIGRATE_LOCK_ID } from 'node-pg-migrate'
import pg from 'pg'
import { build, holdTable } from '../helper.ts'
import { startCluster } from '../pg-cluster.ts'
import { pgbouncerVersion, startPgBouncer } from '../pgbouncer.ts'
import { until } from '../wait.ts'

// The service behind a transaction-mode PgBouncer (DATABASE_POOLER=transaction): Debian's
// pgbouncer in front of a throwaway cluster, with two server connections for every client, so
// that consecutive transactions of one client land on different server sessions. (The whole
// HTTP suite also runs through one: npm run test:pgbouncer.)

const cluster = await startCluster()
t.teardown(() => cluster.stop())
const bouncer = await startPgBouncer(cluster.url, { poolSize: 2 })
t.teardown(() => bouncer.stop())
t.comment(`${pgbouncerVersion()} on port ${bouncer.port}, pool_mode = transaction, default_pool_size = 2`)
const admin = new pg.Pool({ connectionString: cluster.url, max: 2 })
admin.on('error', () => {})
t.teardown(() => admin.end())

let databases = 0
/** A fresh database on the cluster: its address directly and through the pooler. */
async function database (): Promise<{ direct: string, pooled: string }> {
  const name = `lk_pooled_${++databases}`
  await admin.query(`CREATE DATABASE ${name}`)
  const direct = new URL(cluster.url)
  direct.pathname = `/${name}`
  return { direct: direct.toString(), pooled: bouncer.url(name) }
}
const payload = (n: number) => ({ encryptedBlob: Buffer.alloc(64, n).toString('base64'), iv: 'AAAAAAAAAAAAAAAA', timestamp: n + 1, checksum: 'a'.repeat(64) })

t.test('without DATABASE_POOLER=transaction the service cannot start behind it, and says why', async (t) => {
  const { pooled } = await database()
  await t.rejects(build(t, { env: { DATABASE_URL: pooled } }), /unsupported startup parameter: statement_timeout/)
})

t.test('two instances start together on an empty database: one migrates, neither leaves a lock behind', async (t) => {
  const { direct, pooled } = await database()
  const env = { DATABASE_URL: pooled, DATABASE_POOLER: 'transaction' }
  const [a, b] = await Promise.all([build(t, { env }), build(t, { env })])
  const db = new pg.Client({ connectionString: direct })
  await db.connect()
  t.teardown(() => db.end())
  const { rows: [migrations] } = await db.query<{ n: number, names: number }>('SELECT count(*)::int AS n, count(DISTINCT name)::int AS names FROM schema_migrations')
  t.ok(migrations!.n > 0, `${migrations!.n} migrations applied`)
  t.equal(migrations!.names, migrations!.n, 'each once')
  // A session lock taken through the pooler stays on whichever server connection ran it, and
  // an unlock sent on another one releases nothing: the next start would wait for ever.
  const { rows: [locks] } = await db.query<{ n: number }>(
    "SELECT count(*)::int AS n FROM pg_locks WHERE locktype = 'advisory' AND objid = $1::bigint % 4294967296", [PG_MIGRATE_LOCK_ID])
  t.equal(locks!.n, 0, 'no advisory lock is held once both are up')
  const userId = randomUUID()
  t.equal((await a.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: payload(1) })).statusCode, 200)
  t.equal((await b.inject({ method: 'GET', url: `/api/sync/${userId}` })).json().encryptedBlob, payload(1).encryptedBlob)
  // A third start migrates nothing and is not held up by a lock left over.
  await build(t, { env })
})

t.test('many clients over two server connections: every statement unnamed, every answer right', async (t) => {
  const { pooled } = await database()
  const env = { DATABASE_URL: pooled, DATABASE_POOLER: 'transaction', DATABASE_POOL_MAX: '8' }
  const apps = [await build(t, { env }), await build(t, { env })]
  const users = Array.from({ length: 24 }, () => randomUUID())
  // Uploads, downloads, conditional writes and history from 16 pooled connections at once: a
  // named statement prepared on one server session and used on the other fails (42P05, 26000).
  const statuses = await Promise.all(users.map(async (userId, i) => {
    const app = apps[i % 2]!
    const put = await app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: payload(i) })
    if (put.headers.etag === undefined) return [put.statusCode, put.body]
    const again = await apps[(i + 1) % 2]!.inject({
      method: 'PUT', url: `/api/sync/${userId}`, payload: payload(i + 100), headers: { 'if-match': put.headers.etag as string }
    })
    const get = await app.inject({ method: 'GET', url: `/api/sync/${userId}` })
    const versions = await app.inject({ method: 'GET', url: `/api/sync/${userId}/versions` })
    return [put.statusCode, again.statusCode, get.statusCode, get.json().encryptedBlob === payload(i + 100).encryptedBlob,
      versions.json().versions?.length]
  }))
  t.strictSame(statuses, users.map(() => [200, 200, 200, true, 2]))
})

t.test('the statement time-out is set in each statement\'s transaction: the server cancels a statement held too long (503), and the next one runs', async (t) => {
  const { direct, pooled } = await database()
  const logLines: string[] = []
  const app = await build(t, { logLines, env: { DATABASE_URL: pooled, DATABASE_POOLER: 'transaction', DATABASE_STATEMENT_TIMEOUT_MS: '300', LOG_LEVEL: 'warn' } })
  const userId = randomUUID()
  t.equal((await app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: payload(1) })).statusCode, 200)

  const table = await holdTable(t, direct, 'user_sync_versions')
  const held = await app.inject({ method: 'GET', url: `/api/sync/${userId}` })
  await table.release()
  t.equal(held.statusCode, 503, 'a download held past the time-out is a 503')
  // PostgreSQL's own cancel (57014), not the client's later give-up (Query read timeout, at 1300 ms).
  const errors = logLines.map((line) => JSON.parse(line) as { err?: { code?: string, message?: string } }).filter((line) => line.err !== undefined)
  t.ok(errors.some((line) => line.err!.code === '57014'), `canceled by the server: ${JSON.stringify(errors.map((line) => line.err!.message))}`)
  t.notOk(errors.some((line) => line.err!.message?.includes('Query read timeout')), 'not by the client')
  // SET LOCAL ended with that transaction: the server connections hold no setting of ours.
  const sessions = new pg.Client({ connectionString: pooled })
  await sessions.connect()
  t.teardown(() => sessions.end())
  for (let i = 0; i < 4; i++) {
    const { rows: [setting] } = await sessions.query<{ statement_timeout: string }>('SHOW statement_timeout')
    t.equal(setting!.statement_timeout, '0', 'a server session the service used has no statement_timeout left')
  }
  t.equal((await app.inject({ method: 'GET', url: `/api/sync/${userId}` })).statusCode, 200, 'the next download is served')
})

t.test('with every server connection of the pooler busy, a request gets its 503 after DATABASE_CONNECT_TIMEOUT_MS (not the statement time-out), and is served once one is free', async (t) => {
  const { direct, pooled } = await database()
  // A statement time-out of 10 minutes: a request that waited for it would outlast the test's own time-out.
  const app = await build(t, { env: { DATABASE_URL: pooled, DATABASE_POOLER: 'transaction', DATABASE_CONNECT_TIMEOUT_MS: '500', DATABASE_STATEMENT_TIMEOUT_MS: '600000' } })
  const userId = randomUUID()
  t.equal((await app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: payload(1) })).statusCode, 200)

  // Both server connections of the pooler held: each lent to a client waiting for a lock the test holds.
  const lock = new pg.Client({ connectionString: direct })
  await lock.connect()
  t.teardown(() => lock.end())
  await lock.query('BEGIN')
  await lock.query('SELECT pg_advisory_xact_lock(42)')
  const holders = [new pg.Client({ connectionString: pooled }), new pg.Client({ connectionString: pooled })]
  const held: Array<Promise<unknown>> = []
  for (const holder of holders) {
    await holder.connect()
    t.teardown(() => holder.end())
    held.push(holder.query('BEGIN').then(() => holder.query('SELECT pg_advisory_xact_lock(42)')).then(() => holder.query('COMMIT')))
  }
  // Asked outside the lock's transaction: within one, pg_stat_activity keeps its first snapshot.
  await until(async () => (await admin.query<{ n: number }>(
    "SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'", [new URL(direct).pathname.slice(1)])).rows[0]!.n === 2,
  'both server connections wait for the lock')

  const busy = await app.inject({ method: 'GET', url: `/api/sync/${userId}` })
  t.equal(busy.statusCode, 503, 'no server connection within DATABASE_CONNECT_TIMEOUT_MS: 503')
  t.equal((await app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: payload(2) })).statusCode, 503, 'an upload too')
  await lock.query('COMMIT')
  await Promise.all(held)
  const served = await app.inject({ method: 'GET', url: `/api/sync/${userId}` })
  t.equal(served.statusCode, 200, 'served once the pooler has a connection again')
  t.equal(served.json().encryptedBlob, payload(1).encryptedBlob, 'the upload refused with 503 stored nothing')
})
