import { randomBytes } from 'node:crypto'
import { Writable } from 'node:stream'
import Fastify, { type FastifyInstance } from 'fastify'
import pg from 'pg'
import app, { serverOptions } from '../app.ts'
import { loadConfig, type Config } from '../plugins/config.ts'
import { describeDatabase } from '../plugins/db.ts'

/** The part of tap's Test a helper needs (kept narrow so helpers work in any subtest). */
export interface TestContext {
  teardown (fn: () => unknown): void
  comment (...message: unknown[]): void
}

interface TestServer { url: string, kind: string }

let serverPromise: Promise<TestServer> | undefined

/**
 * A PostgreSQL server for this test file: DATABASE_URL when set, else a throwaway
 * postgres:16-alpine from testcontainers when a container runtime answers within a few seconds.
 */
function testServer (t: TestContext): Promise<TestServer> {
  serverPromise ??= findTestServer(t).then(async (server) => {
    await dropAbandonedDatabases(server.url)
    return server
  })
  return serverPromise
}

/** Test databases whose test process died before its teardown (a crash, a kill) are dropped. */
async function dropAbandonedDatabases (serverUrl: string): Promise<void> {
  const admin = new pg.Client({ connectionString: serverUrl })
  await admin.connect()
  try {
    const { rows } = await admin.query<{ datname: string }>("SELECT datname FROM pg_database WHERE datname ~ '^lk_test_[0-9]+_[0-9a-f]+$'")
    for (const { datname } of rows) {
      const pid = Number(datname.split('_')[2])
      if (!isAlive(pid)) await admin.query(`DROP DATABASE IF EXISTS ${datname} WITH (FORCE)`).catch(() => {})
    }
  } finally {
    await admin.end()
  }
}

function isAlive (pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM'
  }
}

async function findTestServer (t: TestContext): Promise<TestServer> {
  if (process.env.DATABASE_URL) {
    return { url: process.env.DATABASE_URL, kind: 'DATABASE_URL' }
  }
  const reason = await containerRuntimeMissing()
  if (reason !== null) {
    throw new Error('No PostgreSQL for the tests: set DATABASE_URL (for example ' +
      'postgres://postgres@127.0.0.1:5432/test) or start a container runtime for testcontainers. ' +
      `Container runtime: ${reason}`)
  }
  const { PostgreSqlContainer } = await import('@testcontainers/postgresql')
  const container = await new PostgreSqlContainer('postgres:16-alpine').start()
  t.teardown(() => container.stop())
  return { url: container.getConnectionUri(), kind: 'testcontainers postgres:16-alpine' }
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
    return (err as Error).message
  }
}

/**
 * A fresh, empty database of its own for the calling test file (so files run in parallel),
 * dropped when the file ends. Returns its connection string.
 */
export async function createTestDatabase (t: TestContext): Promise<string> {
  const server = await testServer(t)
  const name = `lk_test_${process.pid}_${randomBytes(4).toString('hex')}`
  const admin = new pg.Client({ connectionString: server.url })
  await admin.connect()
  try {
    await admin.query(`CREATE DATABASE ${name}`)
  } finally {
    await admin.end()
  }
  const url = new URL(server.url)
  url.pathname = `/${name}`
  t.comment(`test database: ${describeDatabase(url.toString())} (from ${server.kind})`)
  t.teardown(async () => {
    const client = new pg.Client({ connectionString: server.url })
    await client.connect()
    try {
      await client.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)
    } finally {
      await client.end()
    }
  })
  return url.toString()
}

export interface BuildOptions {
  /** Environment settings on top of the test defaults (DATABASE_URL of a fresh database, silent logs). */
  env?: Record<string, string>
  /** Receives every log line, as JSON text, at the level LOG_LEVEL sets. */
  logLines?: string[]
  /** Receives every route the app registers. */
  routes?: Array<{ method: string, url: string }>
}

/** The whole service on a fresh database, ready for app.inject(); closed when the test ends. */
export async function build (t: TestContext, options: BuildOptions = {}): Promise<FastifyInstance> {
  const databaseUrl = options.env?.DATABASE_URL ?? await createTestDatabase(t)
  const config = testConfig({ DATABASE_URL: databaseUrl, ...options.env })
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
  const server = Fastify(fastifyOptions)
  const routes = options.routes
  if (routes !== undefined) {
    server.addHook('onRoute', (route) => {
      for (const method of [route.method].flat()) routes.push({ method, url: route.url })
    })
  }
  t.teardown(() => server.close())
  await server.register(app, { config })
  await server.ready()
  return server
}

/** Settings as the service would load them from an environment holding only `env`. */
export function testConfig (env: Record<string, string>): Config {
  return loadConfig({ LOG_LEVEL: 'silent', NODE_ENV: 'test', ...env })
}

/** A plain pg pool on a database, for looking at what the service stored; closed at teardown. */
export function inspect (t: TestContext, connectionString: string): pg.Pool {
  const pool = new pg.Pool({ connectionString, max: 2 })
  t.teardown(() => pool.end())
  return pool
}
