import { execFileSync, spawn, type ChildProcess } from 'node:child_process'
import { chmodSync, existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir, userInfo } from 'node:os'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import pg from 'pg'
import { sparePort } from './pg-cluster.ts'

/** Debian's PgBouncer (installed by .ci/run), or null where it is not installed. */
export function pgbouncerBinary (): string | null {
  return ['/usr/sbin/pgbouncer', '/usr/bin/pgbouncer'].find((path) => existsSync(path)) ?? null
}

export interface PgBouncer {
  /** The pooler's address for `database` (as postgres, the only user it lets in). */
  url (database: string): string
  port: number
  stop (): Promise<void>
}

/**
 * A private PgBouncer on a spare loopback port, in front of the PostgreSQL at `serverUrl` (any
 * database on it, logged in as that URL's user), in transaction pooling mode unless told
 * otherwise. Never the machine's own PgBouncer service, which .ci/run's install leaves stopped.
 */
export async function startPgBouncer (serverUrl: string, options: { poolMode?: 'transaction' | 'session', poolSize?: number } = {}): Promise<PgBouncer> {
  const binary = pgbouncerBinary()
  if (binary === null) throw new Error('no pgbouncer binary: apt-get install pgbouncer (.ci/run does)')
  const server = new URL(serverUrl)
  const port = await sparePort()
  const dir = mkdtempSync(join(tmpdir(), 'lk-pgbouncer-'))
  chmodSync(dir, 0o755)
  const ini = join(dir, 'pgbouncer.ini')
  writeFileSync(ini, [
    '[databases]',
    `* = host=${server.hostname} port=${server.port || '5432'} user=${decodeURIComponent(server.username) || 'postgres'}`,
    '[pgbouncer]',
    'listen_addr = 127.0.0.1',
    `listen_port = ${port}`,
    'unix_socket_dir =',
    // Any client name is let in and logs in as the user above (the test server trusts it).
    'auth_type = any',
    `pool_mode = ${options.poolMode ?? 'transaction'}`,
    'max_client_conn = 2000',
    `default_pool_size = ${options.poolSize ?? 20}`,
    // Test databases come and go: their server connections should not linger.
    'server_idle_timeout = 10',
    ''
  ].join('\n'))
  chmodSync(ini, 0o644)
  // PgBouncer refuses to run as root; -u drops to postgres after reading its configuration.
  const args = userInfo().uid === 0 ? ['-u', 'postgres', ini] : [ini]
  const child: ChildProcess = spawn(binary, args, { stdio: ['ignore', 'pipe', 'pipe'] })
  let output = ''
  child.stdout!.on('data', (chunk) => { output += String(chunk) })
  child.stderr!.on('data', (chunk) => { output += String(chunk) })
  const exited = () => child.exitCode !== null || child.signalCode !== null
  // A test file that fails before its teardown runs must not leave the pooler behind.
  const orphaned = () => { if (!exited()) child.kill('SIGKILL') }
  process.once('exit', orphaned)
  const url = (database: string) => `postgres://postgres@127.0.0.1:${port}/${database}`

  async function stop (): Promise<void> {
    process.removeListener('exit', orphaned)
    if (!exited()) {
      const gone = new Promise((resolve) => child.once('exit', resolve))
      child.kill('SIGINT') // immediate shutdown: the tests are done with it
      await gone
    }
    rmSync(dir, { recursive: true, force: true })
  }

  for (let i = 0; i < 200; i++) {
    if (exited()) break
    const client = new pg.Client({ connectionString: url(server.pathname.slice(1) || 'postgres') })
    client.on('error', () => {})
    try {
      await client.connect()
      await client.query('SELECT 1')
      await client.end()
      return { url, port, stop }
    } catch {
      await client.end().catch(() => {})
      await sleep(25)
    }
  }
  await stop()
  throw new Error(`pgbouncer did not start on port ${port}: ${output.trim().split('\n').slice(-3).join(' | ')}`)
}

/** The version Debian's PgBouncer reports (1.18 on bookworm), for a test's comment. */
export function pgbouncerVersion (): string {
  const binary = pgbouncerBinary()
  return binary === null ? 'none' : execFileSync(binary, ['--version']).toString().split('\n')[0]!.trim()
}
