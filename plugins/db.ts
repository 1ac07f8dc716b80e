import fp from 'fastify-plugin'
import fastifyPostgres from '@fastify/postgres'
import { PG_MIGRATE_LOCK_ID, runner } from 'node-pg-migrate'
import pg, { type Pool, type QueryConfig, type QueryResult, type QueryResultRow } from 'pg'
import type { FastifyBaseLogger } from 'fastify'
import { projectFile, type Config } from './config.ts'
import { startEmbeddedDatabase } from './embedded.ts'
import type { Queryable } from './storage.ts'

declare module 'fastify' {
  interface FastifyInstance {
    /** 'postgresql' for a server given by DATABASE_URL, 'embedded' for the development database. */
    databaseKind: 'postgresql' | 'embedded'
    /** SELECT 1 on a connection of its own (not the request pool), shared by concurrent callers. */
    checkDatabase (): Promise<void>
  }
}

export const SQL_DIR = projectFile('sql')

export const MIGRATIONS_TABLE = 'schema_migrations'

// Errors that mean "the database cannot serve right now": the client should retry later (503).
const UNAVAILABLE_NODE_CODES = new Set(['ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'EPIPE', 'ENOTFOUND',
  'EAI_AGAIN', 'EHOSTUNREACH', 'ENETUNREACH'])
// SQLSTATE: 08 connection exceptions, 28 rejected credentials, 3D database missing,
// 53 insufficient resources, 57 operator intervention (admin shutdown, crash shutdown,
// cannot connect now, statement timeout), 58 system errors.
const UNAVAILABLE_SQLSTATE_CLASSES = new Set(['08', '28', '3D', '53', '57', '58'])
// And single codes: 25006 a write on a read-only server (a failover left us on a standby),
// 55000 an object not in the state required (a database still starting or being recovered),
// 40001 and 40P01 a serialization failure or deadlock (the statement was rolled back).
const UNAVAILABLE_SQLSTATES = new Set(['25006', '55000', '40001', '40P01'])
const TRANSACTION_ABORTED_SQLSTATES = new Set(['40001', '40P01'])
// pg and pg-pool report their own connection failures as plain Errors, by message only.
const UNAVAILABLE_MESSAGES = [
  'timeout exceeded when trying to connect',
  'Connection terminated',
  'Query read timeout',
  'is not queryable',
  'Cannot use a pool after calling end'
]
// SQLSTATE: 22 data exceptions are values the client sent that PostgreSQL cannot take (400).
// Class 23 (a constraint the schemas should have enforced first) is a bug of ours: a 500.
const INVALID_SQLSTATE_CLASSES = new Set(['22'])

/** Thrown instead of queueing when DATABASE_MAX_WAITING requests already wait for a connection. */
export const POOL_SATURATED = 'POOL_SATURATED'

/** Whether an error from pg means the database is unreachable, overloaded or shutting down. */
export function isDatabaseUnavailable (err: unknown): boolean {
  if (!(err instanceof Error)) return false
  const code = (err as Error & { code?: unknown }).code
  if (typeof code === 'string') {
    if (code === POOL_SATURATED) return true
    if (UNAVAILABLE_NODE_CODES.has(code)) return true
    if (code.length === 5 && (UNAVAILABLE_SQLSTATE_CLASSES.has(code.slice(0, 2)) || UNAVAILABLE_SQLSTATES.has(code))) return true
  }
  return UNAVAILABLE_MESSAGES.some((text) => err.message.includes(text))
}

// The subset of unavailability that one more attempt on a fresh connection cures: the server
// closed this connection (admin or crash shutdown, pg_terminate_backend) or the socket broke.
const CONNECTION_LOST_CODES = new Set(['57P01', '57P02', 'ECONNRESET', 'EPIPE'])

/** Whether pg failed because the server or the network closed the connection the query ran on. */
export function isConnectionLost (err: unknown): boolean {
  if (!(err instanceof Error)) return false
  const code = (err as Error & { code?: string }).code
  return (code !== undefined && CONNECTION_LOST_CODES.has(code)) || err.message.includes('Connection terminated unexpectedly')
}

/** Whether PostgreSQL rolled the statement back (serialization failure, deadlock): trying again is safe. */
export function isTransactionAborted (err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code
  return typeof code === 'string' && TRANSACTION_ABORTED_SQLSTATES.has(code)
}

/** Whether an error from pg is a data error: input the schemas should have caught. */
export function isInvalidData (err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code
  return typeof code === 'string' && code.length === 5 && INVALID_SQLSTATE_CLASSES.has(code.slice(0, 2))
}

/** host:port/database of a connection string, never its user or password. */
export function describeDatabase (connectionString: string): string {
  const url = new URL(connectionString)
  return `${url.hostname}:${url.port || '5432'}${url.pathname}`
}

// A transaction-mode pooler (DATABASE_POOLER=transaction: PgBouncer's pool_mode = transaction)
// hands each transaction to whichever server connection is free, so nothing may belong to a
// session: no start-up parameters (PgBouncer refuses statement_timeout), no SET, no session
// lock, no named statement. The statement limit is then set in each statement's own transaction.

/** The statement limit as a start-up parameter, where each connection is a session of its own. */
export function sessionTimeout (config: Pick<Config, 'DATABASE_POOLER'>, ms: number): { statement_timeout?: number } {
  return config.DATABASE_POOLER === 'transaction' ? {} : { statement_timeout: ms }
}

/**
 * The time limits of a pool the storage's statements go through: the wait for a connection
 * (`connectMs`, a 503 after it), the statement limit (a start-up parameter where the session is
 * the connection's own; see statementRunner) and the client's own give-up a second later, in case
 * the server itself is stalled or the network dropped the answer.
 */
export function statementLimits (config: Pick<Config, 'DATABASE_POOLER' | 'DATABASE_STATEMENT_TIMEOUT_MS' | 'DATABASE_CONNECT_TIMEOUT_MS'>,
  connectMs = config.DATABASE_CONNECT_TIMEOUT_MS): { connectionTimeoutMillis: number, statement_timeout?: number, query_timeout: number } {
  return {
    connectionTimeoutMillis: connectMs,
    ...sessionTimeout(config, config.DATABASE_STATEMENT_TIMEOUT_MS),
    query_timeout: config.DATABASE_STATEMENT_TIMEOUT_MS + 1_000
  }
}

/** Whether statements are prepared once per connection under a name (DATABASE_PREPARED_STATEMENTS, else per DATABASE_POOLER). */
export function preparedStatements (config: Pick<Config, 'DATABASE_POOLER' | 'DATABASE_PREPARED_STATEMENTS'>): boolean {
  return config.DATABASE_PREPARED_STATEMENTS ?? config.DATABASE_POOLER !== 'transaction'
}

/**
 * What the storage sends its statements to: the pool itself, or behind a transaction-mode pooler
 * a pool that runs each statement in a transaction of its own which first sets the statement
 * limit (SET LOCAL ends with the transaction, so the server connection goes back clean).
 * Two more round trips per statement, on that configuration only.
 *
 * The pooler hands out a server connection when the transaction begins, so the BEGIN is where a
 * request waits for one: as long as it waits for one of the pool's connections (its
 * connectionTimeoutMillis, DATABASE_CONNECT_TIMEOUT_MS), then a 503. A connection the client gave up on (a time-out)
 * or that broke is dropped, not rolled back: a ROLLBACK would only wait behind what hangs, and
 * the pooler rolls back a transaction whose client went away.
 */
export function statementRunner (pool: Pool, config: Pick<Config, 'DATABASE_POOLER' | 'DATABASE_STATEMENT_TIMEOUT_MS'>): Queryable {
  if (config.DATABASE_POOLER !== 'transaction') return pool
  const waitMs = pool.options.connectionTimeoutMillis
  const begin = { text: `BEGIN; SET LOCAL statement_timeout = ${Math.trunc(config.DATABASE_STATEMENT_TIMEOUT_MS)}`, query_timeout: waitMs }
  const rollback = { text: 'ROLLBACK', query_timeout: waitMs }
  return {
    async query<R extends QueryResultRow> (statement: QueryConfig): Promise<QueryResult<R>> {
      const client = await pool.connect()
      // Like pool.query: a connection that dies while checked out must not crash the process.
      let lost: Error | undefined
      const onError = (err: Error) => { lost = err }
      client.on('error', onError)
      try {
        await client.query(begin)
        const result = await client.query<R>(statement)
        await client.query('COMMIT')
        client.release(lost)
        return result
      } catch (err) {
        if (err instanceof pg.DatabaseError && lost === undefined) {
          // The server refused the statement; the connection is fine once the transaction is rolled back.
          await client.query(rollback).then(() => client.release(), (failed: Error) => client.release(failed))
        } else {
          client.release(lost ?? (err instanceof Error ? err : new Error(String(err))))
        }
        throw err
      } finally {
        client.removeListener('error', onError)
      }
    }
  }
}

/**
 * Applies the pending files of sql/ in name order and records them in schema_migrations, all in
 * one transaction. Instances that start together queue on an advisory lock (node-pg-migrate's
 * key) instead of failing, however long the first takes, so every instance comes up once the
 * first has migrated. The lock is the transaction's, not the session's: a transaction-mode
 * pooler keeps a transaction on one server connection, never a session, and the lock cannot
 * outlive the migration.
 */
export async function migrate (pool: Pool, log: FastifyBaseLogger, statementTimeoutMs?: number): Promise<string[]> {
  const client = await pool.connect()
  // A checked-out client has no listener of the pool's: a dropped connection must not crash us.
  const onError = (err: Error) => log.warn({ err }, 'migration connection lost')
  client.on('error', onError)
  // The runner's own transaction control (BEGIN, COMMIT, ROLLBACK, sent bare) is ours: it runs
  // inside the transaction that holds the lock. A migration's own (`BEGIN;`, `COMMIT;` around one
  // that must run outside a transaction, as CREATE INDEX CONCURRENTLY) goes through.
  const inTransaction = {
    query: (statement: string | QueryConfig, values?: unknown[]) =>
      typeof statement === 'string' && /^(BEGIN|COMMIT|ROLLBACK)$/.test(statement)
        ? Promise.resolve({ rows: [], rowCount: 0 })
        : client.query(statement as string, values)
  }
  let failed = true
  try {
    await client.query('BEGIN')
    // The lock is waited for as long as another instance migrates (its lock ends with its
    // transaction, also when it dies); the migration's own statements have the statement limit.
    await client.query('SET LOCAL statement_timeout = 0')
    await client.query('SELECT pg_advisory_xact_lock($1)', [PG_MIGRATE_LOCK_ID])
    if (statementTimeoutMs !== undefined) await client.query(`SET LOCAL statement_timeout = ${Math.trunc(statementTimeoutMs)}`)
    const applied = await runner({
      dbClient: inTransaction as unknown as pg.Client,
      dir: SQL_DIR,
      migrationsTable: MIGRATIONS_TABLE,
      direction: 'up',
      count: Infinity,
      checkOrder: true,
      singleTransaction: true,
      noLock: true,
      log: () => {},
      logger: { debug: () => {}, info: () => {}, warn: (msg: string) => log.warn(msg), error: (msg: string) => log.error(msg) }
    })
    await client.query('COMMIT')
    failed = false
    return applied.map((migration) => migration.name)
  } finally {
    if (failed) await client.query('ROLLBACK').catch(() => {})
    client.removeListener('error', onError)
    client.release()
  }
}

export default fp(async function db (app) {
  const { config } = app
  let connectionString = config.DATABASE_URL
  if (connectionString === undefined) {
    // Room for the pool, the health check's connection and one more (psql, say).
    const embedded = await startEmbeddedDatabase(config.EMBEDDED_DATA_DIR, config.DATABASE_POOL_MAX + 2)
    connectionString = embedded.url
    // Added before the pool's own hook, so it runs after it: the pool closes, then the database.
    app.addHook('onClose', () => embedded.close())
    app.log.warn({ dataDir: embedded.dataDir },
      'running on the embedded development database (PGlite); set DATABASE_URL to use PostgreSQL in production')
  }
  app.decorate('databaseKind', config.DATABASE_URL === undefined ? 'embedded' : 'postgresql')

  await app.register(fastifyPostgres, {
    connectionString,
    max: config.DATABASE_POOL_MAX,
    idleTimeoutMillis: 30_000,
    // A request waits DATABASE_CONNECT_TIMEOUT_MS for a connection, then gets a 503 instead of
    // hanging; the server cancels a runaway statement, the client gives up a little later.
    ...statementLimits(config),
    application_name: 'logikids-sync'
  })
  // pg emits 'error' on the pool when an idle connection dies (server restart, crash,
  // pg_terminate_backend); without a listener Node would crash the process.
  app.pg.pool.on('error', (err) => app.log.warn({ err }, 'idle database connection lost'))

  // /health checks the database on a connection of its own: a busy request pool is not an
  // unavailable database, and the load balancer must not take every instance out at once
  // because all are busy. Concurrent checks share one query.
  const healthPool = new pg.Pool({
    connectionString,
    max: 1,
    idleTimeoutMillis: 60_000,
    connectionTimeoutMillis: config.HEALTH_TIMEOUT_MS,
    ...sessionTimeout(config, config.HEALTH_TIMEOUT_MS),
    // A connection the network silently dropped never answers: without a client-side limit its
    // SELECT 1, shared by every later check, would keep /health at 503 (and hold up shutdown).
    query_timeout: config.HEALTH_TIMEOUT_MS,
    application_name: 'logikids-sync health'
  })
  healthPool.on('error', (err) => app.log.warn({ err }, 'health check connection lost'))
  app.addHook('onClose', async () => { await healthPool.end() })
  let check: Promise<void> | undefined
  app.decorate('checkDatabase', function checkDatabase () {
    check ??= healthPool.query('SELECT 1').then(() => {}).finally(() => { check = undefined })
    return check
  })

  const where = app.databaseKind === 'embedded' ? `embedded (${config.EMBEDDED_DATA_DIR})` : describeDatabase(connectionString)
  let applied: string[]
  try {
    applied = await migrate(app.pg.pool, app.log, config.DATABASE_STATEMENT_TIMEOUT_MS)
  } catch (err) {
    throw new Error(`cannot prepare the database at ${where}: ${describeFailure(err)}`, { cause: err })
  }
  app.log.info({ database: where, kind: app.databaseKind, poolMax: config.DATABASE_POOL_MAX, migrationsApplied: applied },
    'connected to PostgreSQL')
}, { name: 'db', dependencies: ['config'] })

function describeFailure (err: unknown): string {
  if (!(err instanceof Error)) return String(err)
  const code = (err as Error & { code?: string }).code
  return code ? `${err.message} (${code})` : err.message
}
