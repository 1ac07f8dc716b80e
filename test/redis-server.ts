import { spawn, type ChildProcess } from 'node:child_process'
import { createConnection } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import type { TestContext } from './helper.ts'
import { sparePort } from './pg-cluster.ts'

/**
 * A private redis-server (Debian's binary) on a spare loopback port, owned by the test: no
 * persistence, killed at teardown. Never the machine's own Redis on 6379.
 */
export interface RedisServer {
  url: string
  port: number
  /** kill -9: no shutdown; the counters are gone (nothing is persisted). */
  kill (): Promise<void>
  /** Starts it again, empty, on the same port (nothing when it runs). */
  start (): Promise<void>
  /** SIGSTOP: connections stay open and nothing answers. */
  pause (): void
  resume (): void
}

async function answers (port: number): Promise<boolean> {
  return await new Promise((resolve) => {
    const socket = createConnection({ host: '127.0.0.1', port })
    socket.once('error', () => resolve(false))
    socket.once('connect', () => socket.write('PING\r\n'))
    socket.once('data', (data) => { socket.destroy(); resolve(data.toString().startsWith('+PONG')) })
  })
}

export async function startRedis (t: TestContext): Promise<RedisServer> {
  const port = await sparePort()
  let child: ChildProcess | undefined
  const exited = () => child === undefined || child.exitCode !== null || child.signalCode !== null

  async function start (): Promise<void> {
    if (!exited()) return
    child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
      '--protected-mode', 'no', '--dir', '/tmp'], { stdio: 'ignore' })
    for (let i = 0; i < 200; i++) {
      if (await answers(port)) return
      if (exited()) throw new Error(`redis-server on port ${port} exited at start`)
      await sleep(25)
    }
    throw new Error(`redis-server on port ${port} did not answer within 5 s`)
  }
  async function kill (): Promise<void> {
    if (exited()) return
    const gone = new Promise((resolve) => child!.once('exit', resolve))
    child!.kill('SIGCONT')
    child!.kill('SIGKILL')
    await gone
  }
  await start()
  t.teardown(kill)
  return {
    url: `redis://127.0.0.1:${port}`,
    port,
    kill,
    start,
    pause: () => { child!.kill('SIGSTOP') },
    resume: () => { child!.kill('SIGCONT') }
  }
}
