import t from 'tap'
import { spawn, type ChildProcess } from 'node:child_process'
import { randomUUID } from 'node:crypto'
import { fileURLToPath } from 'node:url'
import { once } from 'node:events'
import { createTestDatabase } from '../helper.ts'

// The real entry point, as `npm start` runs it (from the sources, so no build step is needed here).
const ROOT = fileURLToPath(new URL('../../', import.meta.url))
const PASSWORD = 'not-a-real-pw-7Qx9'

interface Running { child: ChildProcess, url: string, lines: string[], exited: Promise<number | null> }

async function start (env: Record<string, string>, lines: string[] = []): Promise<Running> {
  const child = spawn(process.execPath, ['--import', 'tsx', 'server.ts'], {
    cwd: ROOT,
    env: { PATH: process.env.PATH ?? '', PORT: '0', HOST: '127.0.0.1', ...env },
    stdio: ['ignore', 'pipe', 'pipe']
  })
  const exited = once(child, 'exit').then(([code]) => code as number | null)
  let buffered = ''
  const listening = new Promise<string>((resolve, reject) => {
    child.stdout!.on('data', (chunk: Buffer) => {
      buffered += chunk.toString()
      const parts = buffered.split('\n')
      buffered = parts.pop()!
      for (const line of parts) {
        lines.push(line)
        const address = /Server listening at (http:\/\/127\.0\.0\.1:\d+)/.exec(line)
        if (address) resolve(address[1]!)
      }
    })
    child.stderr!.on('data', (chunk: Buffer) => lines.push(chunk.toString()))
    exited.then((code) => reject(new Error(`server exited with ${code} before listening:\n${lines.join('\n')}`)))
  })
  const url = await listening
  return { child, url, lines, exited }
}

async function stop (running: Running, signal: NodeJS.Signals): Promise<{ code: number | null, ms: number }> {
  const started = Date.now()
  running.child.kill(signal)
  const code = await running.exited
  return { code, ms: Date.now() - started }
}

const databaseUrl = new URL(await createTestDatabase(t))
databaseUrl.password = PASSWORD // trust auth ignores it; it is here to prove it is never logged
const env = { DATABASE_URL: databaseUrl.toString(), LOG_LEVEL: 'debug' }

t.test('serves, shuts down cleanly on SIGTERM and SIGINT, and finds its data after a restart', async (t) => {
  const lines: string[] = []
  const userId = randomUUID()
  const payload = {
    encryptedBlob: Buffer.from('a secret only the devices can read').toString('base64'),
    iv: 'Zm9vYmFyYmF6cXV4',
    timestamp: 1_732_780_800_000,
    checksum: 'c0ffee'.repeat(10) + 'beef'
  }

  const first = await start(env, lines)
  const put = await fetch(`${first.url}/api/sync/${userId}`, {
    method: 'PUT', headers: { 'content-type': 'application/json' }, body: JSON.stringify(payload)
  })
  t.equal(put.status, 200)
  t.equal((await fetch(`${first.url}/api/sync/${userId}`)).status, 200)
  await fetch(`${first.url}/api/sync/${userId}/verify`, { method: 'POST' })
  await fetch(`${first.url}/api/sync/${userId}x`)
  await fetch(`${first.url}/api/sync/${userId.slice(0, 30)}/verify?token=${userId}`, { method: 'POST' })
  const sigterm = await stop(first, 'SIGTERM')
  t.equal(sigterm.code, 0, 'SIGTERM exits 0')
  t.ok(sigterm.ms < 5000, `SIGTERM shutdown took ${sigterm.ms} ms`)

  const second = await start(env, lines)
  const back = await fetch(`${second.url}/api/sync/${userId}`)
  t.equal(back.status, 200, 'the data survived the restart')
  t.strictSame(await back.json(), payload)
  await fetch(`${second.url}/api/sync/${userId}`, { method: 'DELETE' })
  const sigint = await stop(second, 'SIGINT')
  t.equal(sigint.code, 0, 'SIGINT exits 0')

  const text = lines.join('\n')
  t.match(text, /connected to PostgreSQL/, 'start-up says where it connected')
  t.match(text, /"database":"127\.0\.0\.1:\d+\/lk_test_/)
  t.match(text, /"op":"store"/, 'storage operations are logged')
  t.match(text, /"op":"get"/)
  t.match(text, /"op":"delete"/)
  for (const [name, secret] of Object.entries({
    userId,
    userIdUpperCase: userId.toUpperCase(),
    idPrefix: userId.slice(0, 30),
    blob: payload.encryptedBlob,
    iv: payload.iv,
    checksum: payload.checksum,
    password: PASSWORD
  })) {
    t.notOk(text.includes(secret), `no ${name} in ${lines.length} log lines`)
  }
  for (const line of lines.filter((line) => line.startsWith('{'))) {
    t.doesNotThrow(() => JSON.parse(line), 'every log line is JSON')
  }
})

t.test('bad configuration: exits 1 and says what to fix', async (t) => {
  const child = spawn(process.execPath, ['--import', 'tsx', 'server.ts'], {
    cwd: ROOT, env: { PATH: process.env.PATH ?? '', ...env, PORT: 'eighty' }, stdio: ['ignore', 'pipe', 'pipe']
  })
  let stderr = ''
  child.stderr.on('data', (chunk: Buffer) => { stderr += chunk.toString() })
  const [code] = await once(child, 'exit')
  t.equal(code, 1)
  t.match(stderr, /invalid configuration: .*PORT/)
})

t.test('database unreachable at start-up: exits 1 and names the database, not the password', async (t) => {
  const child = spawn(process.execPath, ['--import', 'tsx', 'server.ts'], {
    cwd: ROOT,
    env: { PATH: process.env.PATH ?? '', DATABASE_URL: `postgres://u:${PASSWORD}@127.0.0.1:1/nowhere`, PORT: '0' },
    stdio: ['ignore', 'pipe', 'pipe']
  })
  let output = ''
  child.stdout.on('data', (chunk: Buffer) => { output += chunk.toString() })
  child.stderr.on('data', (chunk: Buffer) => { output += chunk.toString() })
  const [code] = await once(child, 'exit')
  t.equal(code, 1)
  t.match(output, /cannot prepare the database at 127\.0\.0\.1:1\/nowhere/)
  t.notOk(output.includes(PASSWORD), 'the password is not printed')
})
