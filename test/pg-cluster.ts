import { execFileSync, spawn, type ChildProcess } from 'node:child_process'
import { chownSync, existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir, userInfo } from 'node:os'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import pg from 'pg'

/**
 * A throwaway PostgreSQL cluster owned by the tests: initdb into a temporary folder, then the
 * server binary as a child process on a spare loopback port (as the `postgres` OS user when the
 * tests run as root, since PostgreSQL refuses root). Never touches the machine's own server.
 */
export interface Cluster {
  url: string
  port: number
  dataDir: string
  /** kill -9 the server: no shutdown, no checkpoint. */
  crash (): Promise<void>
  /** Starts the server again on the same data and port. */
  start (): Promise<void>
  stop (): Promise<void>
}

/** The folder holding initdb and postgres, or null when this machine has no server binaries. */
export function serverBinaries (): string | null {
  const candidates = ['/usr/lib/postgresql']
    .filter((root) => existsSync(root))
    .flatMap((root) => readdirSync(root).sort((a, b) => Number(b) - Number(a)).map((version) => join(root, version, 'bin')))
  return candidates.find((dir) => existsSync(join(dir, 'initdb')) && existsSync(join(dir, 'postgres'))) ?? null
}

/** A loopback port nobody listens on (for a server a test starts). */
export async function sparePort (): Promise<number> {
  return await new Promise((resolve, reject) => {
    const probe = createServer()
    probe.once('error', reject)
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address() as { port: number }
      probe.close(() => resolve(port))
    })
  })
}

/**
 * A throwaway cluster; with `replicaOf`, a hot standby of that one, cloned by `pg_basebackup -R`
 * and streaming from it (read-only; `pg_wal_replay_pause()` on it holds its replay).
 */
export async function startCluster (options: { fsync?: boolean, replicaOf?: Cluster } = {}): Promise<Cluster> {
  const bin = serverBinaries()
  if (bin === null) throw new Error('no PostgreSQL server binaries (initdb, postgres) under /usr/lib/postgresql')
  const asRoot = userInfo().uid === 0
  const dataDir = mkdtempSync(join(tmpdir(), 'lk-pg-'))
  if (asRoot) chownSync(dataDir, Number(execFileSync('id', ['-u', 'postgres']).toString()), Number(execFileSync('id', ['-g', 'postgres']).toString()))
  const run = (command: string, args: string[]) => asRoot ? ['runuser', ['-u', 'postgres', '--', command, ...args]] as const : [command, args] as const
  const [initCommand, initArgs] = options.replicaOf === undefined
    ? run(join(bin, 'initdb'), ['-D', dataDir, '-U', 'postgres', '--auth=trust', '--no-sync', '-E', 'UTF8'])
    : run(join(bin, 'pg_basebackup'), ['-h', '127.0.0.1', '-p', String(options.replicaOf.port), '-U', 'postgres', '-D', dataDir,
      '-R', '-X', 'stream', '--no-sync', '-c', 'fast'])
  execFileSync(initCommand, [...initArgs], { stdio: 'ignore' })
  const port = await sparePort()
  const url = `postgres://postgres@127.0.0.1:${port}/postgres`
  let child: ChildProcess | undefined

  async function start (): Promise<void> {
    const [command, args] = run(join(bin!, 'postgres'), ['-D', dataDir, '-p', String(port), '-k', dataDir,
      '-c', 'listen_addresses=127.0.0.1', '-c', `fsync=${options.fsync === true ? 'on' : 'off'}`, '-c', 'max_connections=60'])
    for (let i = 0; i < 200; i++) {
      // Right after a kill -9 the old server's backends may still hold its shared memory for a
      // moment, and the new server exits at once: start it again until it stays up.
      if (child === undefined || child.exitCode !== null || child.signalCode !== null) {
        child = spawn(command, [...args], { stdio: 'ignore' })
      }
      const client = new pg.Client({ connectionString: url })
      client.on('error', () => {})
      try {
        await client.connect()
        await client.end()
        return
      } catch {
        await sleep(50)
      }
    }
    throw new Error(`the test cluster in ${dataDir} did not start`)
  }

  async function signal (name: NodeJS.Signals): Promise<void> {
    const running = child
    if (running === undefined || running.exitCode !== null) return
    const exited = new Promise((resolve) => running.once('exit', resolve))
    // Through runuser the server is a grandchild: signal it by its postmaster.pid.
    const pid = asRoot ? postmasterPid() : running.pid
    if (pid !== undefined) process.kill(pid, name)
    if (asRoot) running.kill(name)
    await exited
    child = undefined
  }

  function postmasterPid (): number | undefined {
    try {
      return Number(execFileSync('head', ['-1', join(dataDir, 'postmaster.pid')]).toString().trim())
    } catch {
      return undefined
    }
  }

  await start()
  return {
    url,
    port,
    dataDir,
    start,
    crash: () => signal('SIGKILL'),
    async stop () {
      await signal('SIGINT')
      rmSync(dataDir, { recursive: true, force: true })
    }
  }
}
