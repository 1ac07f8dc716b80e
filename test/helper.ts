import { createHash, randomBytes } from 'node:crypto'
import { execFileSync } from 'node:child_process'
import { hostname } from 'node:os'
import { Writable } from 'node:stream'
import tap from 'tap'
import Fastify, { type FastifyInstance } from 'fastify'
import pg from 'pg'
import app, { serverOptions } from '../app.ts'
import { loadConfig, type Config } from '../plugins/config.ts'
import { describeDatabase } from '../plugins/db.ts'
import { isAlive, startEmbeddedDatabase } from '../plugins/embedded.ts'
import { serverBinaries, startCluster } from './pg-cluster.ts'
import { pgbouncerVersion, startPgBouncer } from './pgbouncer.ts'

/** The part of tap's Test a helper needs (kept narrow so helpers work in any subtest). */
export interface TestContext {
  teardown (fn: () => unknown): void
  comment (...message: unknown[]): void
}

/** Where this test file's databases come from. */
interface TestServer {
  kind: string
  /** A fresh, empty database; dropped (or closed) at the end of the test. */
  newDatabase (t: TestContext): Promise<string>
}

const KINDS = ['url', 'container', 'local', 'embedded', 'pgbouncer'] as const
type Kind = typeof KINDS[number]

let serverPromise: Promise<TestServer> | undefined
let resolvedKind: Kind | undefined

/**
 * The PostgreSQL for this test file, in this order (TEST_DATABASE=url|container|local|embedded
 * forces one): DATABASE_URL; a throwaway postgres:<major>-alpine (the local pg_dump's) from testcontainers when a container
 * runtime answers within a few seconds; a throwaway cluster from this machine's server binaries;
 * the embedded database (PGlite), which needs nothing installed.
 */
function testServer (): Promise<TestServer> {
  // Servers live as long as the whole test file (tap's root), whichever subtest asked first.
  serverPromise ??= findTestServer()
  return serverPromise
}

async function findTestServer (): Promise<TestServer> {
  const forced = process.env.TEST_DATABASE as Kind | undefined
  if (forced !== undefined && !KINDS.includes(forced)) {
    throw new Error(`TEST_DATABASE must be one of ${KINDS.join(', ')} (got ${forced})`)
  }
  const tried: string[] = []
  if (forced === 'pgbouncer') return await behindPgBouncer()
  if (forced === 'url' || (forced === undefined && process.env.DATABASE_URL)) {
    if (!process.env.DATABASE_URL) throw new Error('TEST_DATABASE=url needs DATABASE_URL')
    await dropAbandonedDatabases(process.env.DATABASE_URL)
    return serverDatabases('DATABASE_URL', process.env.DATABASE_URL)
  }
  tried.push('DATABASE_URL is not set')
  if (forced === 'container' || forced === undefined) {
    const missing = await containerRuntimeMissing()
    if (missing === null) {
      const { PostgreSqlContainer } = await import('@testcontainers/postgresql')
      // The tests run this machine's pg_dump and psql against it: a server of the same major
      // version (pg_dump refuses a newer server), else the version production runs.
      const image = `postgres:${clientMajorVersion() ?? 16}-alpine`
      const container = await new PostgreSqlContainer(image).start()
      tap.teardown(() => container.stop())
      return serverDatabases(`testcontainers ${image}`, container.getConnectionUri())
    }
    if (forced === 'container') throw new Error(`TEST_DATABASE=container, but no container runtime: ${missing}`)
    tried.push(`no container runtime (${missing})`)
  }
  if (forced === 'local' || forced === undefined) {
    if (serverBinaries() !== null) {
      const cluster = await startCluster()
      tap.teardown(() => cluster.stop())
      return serverDatabases(`a throwaway cluster from ${serverBinaries()} (${tried.join('; ')})`, cluster.url)
    }
    if (forced === 'local') throw new Error('TEST_DATABASE=local, but no PostgreSQL server binaries under /usr/lib/postgresql')
    tried.push('no PostgreSQL server binaries')
  }
  resolvedKind = 'embedded'
  return {
    kind: `the embedded database, PGlite in memory (${tried.join('; ')})`,
    async newDatabase (t) {
      const embedded = await startEmbeddedDatabase('memory://', 20)
      t.teardown(() => embedded.close())
      return embedded.url
    }
  }
}

/**
 * TEST_DATABASE=pgbouncer: the databases of DATABASE_URL's server (else of a throwaway cluster),
 * reached through a private PgBouncer in transaction pooling mode, and the service told so
 * (DATABASE_POOLER=transaction). The databases are created and dropped on the server itself.
 */
async function behindPgBouncer (): Promise<TestServer> {
  resolvedKind = 'pgbouncer'
  let serverUrl = process.env.DATABASE_URL
  if (serverUrl) {
    await dropAbandonedDatabases(serverUrl)
  } else {
    const cluster = await startCluster()
    tap.teardown(() => cluster.stop())
    serverUrl = cluster.url
  }
  const bouncer = await startPgBouncer(serverUrl)
  tap.teardown(() => bouncer.stop())
  const direct = serverDatabases('', serverUrl)
  return {
    kind: `${pgbouncerVersion()} in transaction mode on port ${bouncer.port}, in front of ${describeDatabase(serverUrl)}`,
    async newDatabase (t) {
      return bouncer.url(new URL(await direct.newDatabase(t)).pathname.slice(1))
    }
  }
}

/** Databases created on a real server, one per call, dropped at teardown. */
function serverDatabases (kind: string, serverUrl: string): TestServer {
  return {
    kind,
    async newDatabase (t) {
      const name = `lk_test_${HOST_TAG}_${process.pid}_${randomBytes(4).toString('hex')}`
      const admin = new pg.Client({ connectionString: serverUrl })
      await admin.connect()
      try {
        await admin.query(`CREATE DATABASE ${name}`)
      } finally {
        await admin.end()
      }
      t.teardown(async () => {
        const client = new pg.Client({ connectionString: serverUrl })
        await client.connect()
        try {
          await client.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)
        } finally {
          await client.end()
        }
      })
      const url = new URL(serverUrl)
      url.pathname = `/${name}`
      return url.toString()
    }
  }
}

// Test databases are named after this host too: on a server shared by several machines, only
// this host's abandoned databases are its to drop (a pid means nothing on another host).
const HOST_TAG = createHash('sha256').update(hostname()).digest('hex').slice(0, 8)

/** This host's test databases whose test process died before its teardown (a crash, a kill) are dropped. */
async function dropAbandonedDatabases (serverUrl: string): Promise<void> {
  const admin = new pg.Client({ connectionString: serverUrl })
  await admin.connect()
  try {
    const { rows } = await admin.query<{ datname: string }>('SELECT datname FROM pg_database WHERE datname ~ $1',
      [`^lk_test_${HOST_TAG}_[0-9]+_[0-9a-f]+$`])
    for (const { datname } of rows) {
      const pid = Number(datname.split('_')[3])
      if (!isAlive(pid)) await admin.query(`DROP DATABASE IF EXISTS ${datname} WITH (FORCE)`).catch(() => {})
    }
  } finally {
    await admin.end()
  }
}

/** The major version of this machine's pg_dump, or null without one. */
function clientMajorVersion (): number | null {
  try {
    const version = /\b(\d+)(\.\d+)?/.exec(execFileSync('pg_dump', ['--version']).toString())
    return version === null ? null : Number(version[1])
  } catch {
    return null
  }
}

async function containerRuntimeMissing (): Promise<string | null> {
  try {
    const { getContainerRuntimeClient } = await import('testcontainers')
    let timer: NodeJS.Timeout | undefined
    await Promise.race([
      getContainerRuntimeClient(),
      new Promise((_resolve, reject) => {
        timer = setTimeout(() => reject(new Error('no answer within 5 s')), 5_000)
      })
    ]).finally(() => clearTimeout(timer))
    return null
  } catch (err) {
    return (err as Error).message.split('\n')[0] ?? 'unknown'
  }
}

/** The kind of database this file's tests run on (see testServer). */
export async function testDatabaseKind (): Promise<string> {
  return (await testServer()).kind
}

/**
 * A fresh, empty database of its own for the calling test file (so files run in parallel),
 * dropped when the file ends. Returns its connection string.
 */
export async function createTestDatabase (t: TestContext): Promise<string> {
  const server = await testServer()
  const url = await server.newDatabase(t)
  t.comment(`test database: ${describeDatabase(url)} (from ${server.kind})`)
  return url
}

export interface BuildOptions {
  /** Environment settings on top of the test defaults (DATABASE_URL of a fresh database, silent logs). */
  env?: Record<string, string>
  /** Receives every log line, as JSON text, at the level LOG_LEVEL sets. */
  logLines?: string[]
  /** Receives every route the app registers. */
  routes?: Array<{ method: string, url: string }>
  /** Runs on the bare server before the app is registered (a hook that must come before the app's own). */
  beforeApp?: (server: FastifyInstance) => unknown
  /** Runs after the app is registered, before ready (a plugin that must load after the app). */
  afterApp?: (server: FastifyInstance) => unknown
}

/**
 * The whole service on a fresh database, ready for app.inject(); closed when the test ends.
 * With embedded test databases and no DATABASE_URL given, the service starts its own embedded
 * database (in memory) exactly as it does for a newcomer without DATABASE_URL.
 */
export async function build (t: TestContext, options: BuildOptions = {}): Promise<FastifyInstance> {
  const server = await testServer()
  const ownEmbedded = resolvedKind === 'embedded' && options.env?.DATABASE_URL === undefined
  const databaseUrl = options.env?.DATABASE_URL ?? (ownEmbedded ? undefined : await createTestDatabase(t))
  if (ownEmbedded) t.comment(`test database: the service's own embedded database (${server.kind})`)
  const config = ownEmbedded
    ? testConfig({ EMBEDDED_DATA_DIR: 'memory://', ...options.env })
    : testConfig({ DATABASE_URL: databaseUrl!, ...options.env })
  const fastifyOptions = serverOptions(config)
  if (options.logLines !== undefined) {
    const lines = options.logLines
    const stream = new Writable({
      write (chunk, _encoding, done) {
        lines.push(...String(chunk).split('\n').filter((line) => line !== ''))
        done()
      }
    })
    fastifyOptions.logger = { ...(fastifyOptions.logger as object), stream }
  }
  const service = Fastify(fastifyOptions)
  const routes = options.routes
  if (routes !== undefined) {
    service.addHook('onRoute', (route) => {
      for (const method of [route.method].flat()) routes.push({ method, url: route.url })
    })
  }
  t.teardown(() => service.close())
  await options.beforeApp?.(service)
  await service.register(app, { config })
  await options.afterApp?.(service)
  await service.ready()
  return service
}

/** The connection string of the database an app uses (its DATABASE_URL, or its own embedded one). */
export function databaseUrlOf (app: FastifyInstance): string {
  return (app.pg.pool.options as { connectionString: string }).connectionString
}

/** Settings as the service would load them from an environment holding only `env`. */
export function testConfig (env: Record<string, string>): Config {
  // The embedded database has one session for all connections: no named statements there
  // (the service knows that of its own embedded database, not of one given by DATABASE_URL).
  const shared = embeddedTests() ? { DATABASE_PREPARED_STATEMENTS: 'false' } : {}
  const pooler = transactionPooled() ? { DATABASE_POOLER: 'transaction' } : {}
  return loadConfig({ LOG_LEVEL: 'silent', NODE_ENV: 'test', ...shared, ...pooler, ...env })
}

/** Whether this file's databases are reached through a transaction-mode PgBouncer (TEST_DATABASE=pgbouncer). */
export function transactionPooled (): boolean {
  return resolvedKind === 'pgbouncer'
}

/** Whether this file's databases are embedded ones (known once createTestDatabase has run). */
export function embeddedTests (): boolean {
  return resolvedKind === 'embedded'
}

/** A plain pg pool on a database, for looking at what the service stored; closed at teardown. */
export function inspect (t: TestContext, connectionString: string): pg.Pool {
  const pool = new pg.Pool({ connectionString, max: 2 })
  // Fault tests terminate every backend of their database, this pool's idle ones included:
  // the pool replaces them; without a listener Node would end the test process instead.
  pool.on('error', () => {})
  t.teardown(() => pool.end())
  return pool
}

/** One unlabelled series of an app's metrics, as a scrape would show it; NaN when it is not there. */
export async function metricValue (app: FastifyInstance, name: string): Promise<number> {
  return Number(new RegExp(`^${name} (\\S+)$`, 'm').exec(await app.metrics.registry.metrics())?.[1])
}

/** A connection of the test's that holds `table` exclusively (no reads either) until released. */
export async function holdTable (t: TestContext, databaseUrl: string, table: string): Promise<{ release (): Promise<unknown> }> {
  const holder = new pg.Client({ connectionString: databaseUrl, application_name: 'lock holder' })
  await holder.connect()
  t.teardown(() => holder.end())
  await holder.query('BEGIN')
  await holder.query(`LOCK TABLE ${table} IN ACCESS EXCLUSIVE MODE`)
  return { release: () => holder.query('ROLLBACK') }
}

/**
 * The backends of `applicationName` on this database that wait for a lock (their pids): how
 * the tests that force an interleaving see the service's statements queued behind a held row.
 */
export async function lockWaiters (db: pg.Pool | pg.Client, applicationName = 'logikids-sync'): Promise<number[]> {
  const { rows } = await db.query<{ pid: number }>('SELECT pid FROM pg_stat_activity WHERE datname = current_database() ' +
    "AND application_name = $1 AND wait_event_type = 'Lock'", [applicationName])
  return rows.map((row) => row.pid)
}

/**
 * The current version of every record, as one row each: the account (user_sync_data) joined to
 * the version it names (user_sync_versions, sql/005_versions.sql). Add a WHERE on `user_id`.
 * `encrypted_blob` is the ciphertext as base64, however it is stored; `ciphertext` its bytes
 * (sql/006_ciphertext_bytes.sql) and `stored_text` the text of a version stored before them.
 */
export const CURRENT_RECORD = `SELECT * FROM (SELECT d.user_id, d.version, d.etag, d.token_hash, d.created_at, d.last_accessed,
    coalesce(translate(encode(v.ciphertext, 'base64'), E'\\n', ''), v.encrypted_blob) AS encrypted_blob,
    v.ciphertext, v.encrypted_blob AS stored_text, v.iv, v.timestamp, v.checksum, v.blob_size, v.stored_at
  FROM user_sync_data d JOIN user_sync_versions v USING (user_id, version)) AS record`

/**
 * SQL that stores records directly, as the service would (the account and its current version):
 * `rows` is a SELECT of user_id, encrypted_blob (base64), iv, timestamp, checksum, blob_size and
 * last_accessed, in that order, which may use parameters. With `legacy`, the ciphertext is kept
 * as its base64 text, as versions stored before sql/006_ciphertext_bytes.sql were.
 */
export const insertRecords = (rows: string, legacy = false) => `WITH source (user_id, encrypted_blob, iv, timestamp, checksum, blob_size, last_accessed) AS (${rows}),
  accounts AS (INSERT INTO user_sync_data (user_id, timestamp, last_accessed) SELECT user_id, timestamp, last_accessed FROM source
    RETURNING user_id, version, etag)
  INSERT INTO user_sync_versions (user_id, version, etag, ${legacy ? 'encrypted_blob' : 'ciphertext'}, iv, timestamp, checksum, blob_size)
  SELECT a.user_id, a.version, a.etag, ${legacy ? 's.encrypted_blob' : "decode(s.encrypted_blob, 'base64')"}, s.iv, s.timestamp, s.checksum, s.blob_size
  FROM accounts a JOIN source s USING (user_id)`
