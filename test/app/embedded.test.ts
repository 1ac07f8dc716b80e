import t from 'tap'
import { spawn, type ChildProcess } from 'node:child_process'
import { randomUUID } from 'node:crypto'
import { mkdtempSync, rmSync } from 'node:fs'
import { once } from 'node:events'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { loadConfig } from '../../plugins/config.ts'

// `npm start` with no DATABASE_URL: the embedded database, as a newcomer meets it.
const ROOT = fileURLToPath(new URL('../../', import.meta.url))
const dataDir = mkdtempSync(join(tmpdir(), 'lk-embedded-'))
t.teardown(() => rmSync(dataDir, { recursive: true, force: true }))

interface Running { child: ChildProcess, url: string, output: string[], exited: Promise<number | null> }

async function start (): Promise<Running> {
  const child = spawn(process.execPath, ['--import', 'tsx', 'server.ts'], {
    cwd: ROOT,
    env: { PATH: process.env.PATH ?? '', PORT: '0', HOST: '127.0.0.1', EMBEDDED_DATA_DIR: dataDir, CLEANUP_INTERVAL: '0' },
    stdio: ['ignore', 'pipe', 'pipe']
  })
  const output: string[] = []
  const exited = once(child, 'exit').then(([code]) => code as number | null)
  const url = await new Promise<string>((resolve, reject) => {
    child.stdout!.on('data', (chunk: Buffer) => {
      output.push(chunk.toString())
      const address = /Server listening at (http:\/\/127\.0\.0\.1:\d+)/.exec(output.join(''))
      if (address) resolve(address[1]!)
    })
    child.stderr!.on('data', (chunk: Buffer) => output.push(chunk.toString()))
    exited.then((code) => reject(new Error(`exited with ${code}:\n${output.join('')}`)))
  })
  return { child, url, output, exited }
}

const payload = (n: number) => ({
  encryptedBlob: Buffer.from(`ciphertext ${n}`).toString('base64'), iv: 'AAAAAAAAAAAAAAAA', timestamp: n + 1, checksum: 'b'.repeat(64)
})

t.test('serves the API on the embedded database, says so, and keeps data across SIGTERM, SIGINT and kill -9', async (t) => {
  const users = [randomUUID(), randomUUID(), randomUUID()]
  let server = await start()
  const text = server.output.join('')
  t.match(text, /running on the embedded development database \(PGlite\)/, 'one clear warning')
  t.match(text, new RegExp(`"dataDir":"${dataDir}"`), 'naming where its data lives')
  const health = await (await fetch(`${server.url}/health`)).json()
  t.strictSame(health, { status: 'ok', database: 'ok', databaseKind: 'embedded' })

  const put = async (userId: string, n: number) => (await fetch(`${server.url}/api/sync/${userId}`, {
    method: 'PUT', headers: { 'content-type': 'application/json' }, body: JSON.stringify(payload(n))
  })).status

  for (const [i, signal] of (['SIGTERM', 'SIGINT', 'SIGKILL'] as const).entries()) {
    const status = await put(users[i]!, i)
    t.equal(status, 200, `upload before ${signal}`)
    server.child.kill(signal)
    const code = await server.exited
    if (signal !== 'SIGKILL') t.equal(code, 0, `${signal} exits 0`)
    server = await start()
    for (let j = 0; j <= i; j++) {
      const res = await fetch(`${server.url}/api/sync/${users[j]}`)
      t.equal(res.status, 200, `after ${signal}: user ${j} is there`)
      t.strictSame(await res.json(), payload(j))
    }
  }

  const second = spawn(process.execPath, ['--import', 'tsx', 'server.ts'], {
    cwd: ROOT, env: { PATH: process.env.PATH ?? '', PORT: '0', EMBEDDED_DATA_DIR: dataDir }, stdio: ['ignore', 'pipe', 'pipe']
  })
  let secondOutput = ''
  second.stdout.on('data', (chunk: Buffer) => { secondOutput += chunk.toString() })
  second.stderr.on('data', (chunk: Buffer) => { secondOutput += chunk.toString() })
  const [secondCode] = await once(second, 'exit')
  t.equal(secondCode, 1, 'a second process on the same data directory is refused')
  t.match(secondOutput, /is in use by process \d+/)

  server.child.kill('SIGTERM')
  t.equal(await server.exited, 0)
})

t.test('production refuses to start without DATABASE_URL', async (t) => {
  t.throws(() => loadConfig({ NODE_ENV: 'production' }), { message: /DATABASE_URL is required with NODE_ENV=production/ })
})
