import { spawn, type ChildProcess } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { transactionPooled, type TestContext } from './helper.ts'

// The real entry point, as `npm start` runs it, from the sources (no build step in the tests).
const ROOT = fileURLToPath(new URL('../', import.meta.url))
const LISTENING = /Server listening at (http:\/\/127\.0\.0\.1:(\d+))/

export interface Exit { code: number | null, signal: NodeJS.Signals | null }

export interface ServerProcess {
  child: ChildProcess
  /** http://127.0.0.1:PORT */
  url: string
  port: number
  /** Every line the process wrote so far, stdout and stderr, in order of arrival. */
  output: string[]
  /** Settles when the process has exited, however it ended. */
  exited: Promise<Exit>
  /** Sends the signal and waits for the exit. */
  stop (signal?: NodeJS.Signals): Promise<Exit>
  /**
   * Waits until `output` holds the log line of every request answered so far: the service writes
   * its log at least once a second, not line by line (server.ts), so this sends a request of its
   * own (a 404 on a path made for it) and waits for that request's line, which comes after theirs.
   */
  loggedSoFar (): Promise<void>
}

export interface ServerOptions {
  /**
   * The environment of the process, on top of PATH, PORT=0, HOST=127.0.0.1 and LOG_LEVEL=info
   * (nothing else of the test runner's environment: no DATABASE_URL unless given here).
   */
  env?: Record<string, string>
  /** Receives the output lines too, e.g. one list across a restart. */
  output?: string[]
  /** How long start-up may take (default 60 s: a loaded machine compiles the sources slowly). */
  startTimeoutMs?: number
}

interface Spawned { child: ChildProcess, output: string[], exited: Promise<Exit>, onLine (listener: (line: string) => void): void }

function spawnServer (env: Record<string, string>, output: string[]): Spawned {
  const child = spawn(process.execPath, ['--import', 'tsx', 'server.ts'], {
    cwd: ROOT,
    // Through the test's transaction-mode PgBouncer (TEST_DATABASE=pgbouncer) the service is told so, as in build().
    env: { PATH: process.env.PATH ?? '', ...(transactionPooled() ? { DATABASE_POOLER: 'transaction' } : {}), ...env },
    stdio: ['ignore', 'pipe', 'pipe']
  })
  const exited = new Promise<Exit>((resolve) => child.once('close', (code, signal) => resolve({ code, signal })))
  const listeners: Array<(line: string) => void> = []
  for (const stream of [child.stdout!, child.stderr!]) {
    let partial = ''
    stream.on('data', (chunk: Buffer) => {
      const lines = (partial + chunk.toString()).split('\n')
      partial = lines.pop()!
      for (const line of lines) {
        output.push(line)
        for (const listener of listeners) listener(line)
      }
    })
    stream.on('end', () => { if (partial !== '') output.push(partial) })
  }
  return { child, output, exited, onLine: (listener) => listeners.push(listener) }
}

/**
 * Starts `node --import tsx server.ts` on a spare port and resolves once it says "Server
 * listening at"; stopped (SIGTERM, then SIGKILL if it lingers) when the test ends.
 */
export async function startServer (t: TestContext, options: ServerOptions = {}): Promise<ServerProcess> {
  const env = { PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'info', ...options.env }
  if (!['trace', 'debug', 'info'].includes(env.LOG_LEVEL)) {
    throw new Error(`startServer needs LOG_LEVEL info or lower to see "Server listening at" (got ${env.LOG_LEVEL})`)
  }
  const output = options.output ?? []
  const earlier = output.length // lines of an earlier run in a shared list do not count
  const { child, exited, onLine } = spawnServer(env, output)
  const stop = async (signal: NodeJS.Signals = 'SIGTERM'): Promise<Exit> => {
    if (child.exitCode === null && child.signalCode === null) child.kill(signal)
    return await exited
  }
  t.teardown(async () => {
    if (child.exitCode !== null || child.signalCode !== null) return
    child.kill('SIGTERM')
    let timer: NodeJS.Timeout | undefined
    const lingering = await Promise.race([
      exited.then(() => false),
      new Promise<boolean>((resolve) => { timer = setTimeout(() => resolve(true), 15_000) })
    ]).finally(() => clearTimeout(timer))
    if (lingering) {
      child.kill('SIGKILL')
      await exited
    }
  })

  const timeoutMs = options.startTimeoutMs ?? 60_000
  let timer: NodeJS.Timeout | undefined
  const address = await new Promise<RegExpExecArray>((resolve, reject) => {
    for (const line of output.slice(earlier)) {
      const match = LISTENING.exec(line)
      if (match) resolve(match)
    }
    onLine((line) => {
      const match = LISTENING.exec(line)
      if (match) resolve(match)
    })
    exited.then(({ code, signal }) => reject(new Error(`the server exited (${code ?? signal}) before listening:\n${output.join('\n')}`)))
    timer = setTimeout(() => {
      child.kill('SIGKILL')
      reject(new Error(`the server did not listen within ${timeoutMs} ms:\n${output.join('\n')}`))
    }, timeoutMs)
  }).finally(() => clearTimeout(timer))
  const url = address[1]!
  let markers = 0
  async function loggedSoFar (): Promise<void> {
    const marker = `/log-marker-${++markers}`
    await (await fetch(`${url}${marker}`)).arrayBuffer()
    for (const deadline = Date.now() + 10_000; !output.some((line) => line.includes(`"${marker}"`));) {
      if (Date.now() > deadline) throw new Error(`the log line of ${marker} did not come within 10 s`)
      await new Promise((resolve) => setTimeout(resolve, 20))
    }
  }
  return { child, url, port: Number(address[2]), output, exited, stop, loggedSoFar }
}

/** Runs server.ts with `env` (on top of PATH only) until it exits by itself, as a bad start does. */
export async function runServerToExit (t: TestContext, env: Record<string, string>): Promise<Exit & { output: string }> {
  const { child, output, exited } = spawnServer(env, [])
  t.teardown(() => { if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL') })
  let timer: NodeJS.Timeout | undefined
  const exit = await Promise.race([
    exited,
    new Promise<never>((_resolve, reject) => {
      timer = setTimeout(() => reject(new Error(`the server did not exit within 60 s:\n${output.join('\n')}`)), 60_000)
    })
  ]).finally(() => clearTimeout(timer))
  return { ...exit, output: output.join('\n') }
}
