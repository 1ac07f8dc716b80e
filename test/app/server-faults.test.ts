import t from 'tap'
import { spawn, type ChildProcess } from 'node:child_process'
import { createHash, randomUUID } from 'node:crypto'
import { once } from 'node:events'
import net from 'node:net'
import { fileURLToPath } from 'node:url'
import { setTimeout as sleep } from 'node:timers/promises'
import { createTestDatabase, inspect } from '../helper.ts'

// Faults at the HTTP edge of the real server process: a killed service, hostile clients.
const ROOT = fileURLToPath(new URL('../../', import.meta.url))
const databaseUrl = await createTestDatabase(t)
const db = inspect(t, databaseUrl)

interface Running { child: ChildProcess, port: number, exited: Promise<unknown> }

async function start (): Promise<Running> {
  const child = spawn(process.execPath, ['--import', 'tsx', 'server.ts'], {
    cwd: ROOT,
    env: {
      PATH: process.env.PATH ?? '',
      DATABASE_URL: databaseUrl,
      PORT: '0',
      HOST: '127.0.0.1',
      LOG_LEVEL: 'info',
      REQUEST_TIMEOUT_MS: '1500',
      RATE_LIMIT_MAX: '0',
      RATE_LIMIT_IP_MAX: '0',
      CLEANUP_INTERVAL: '0'
    },
    stdio: ['ignore', 'pipe', 'inherit']
  })
  const exited = once(child, 'exit')
  let output = ''
  const port = await new Promise<number>((resolve, reject) => {
    child.stdout!.on('data', (chunk: Buffer) => {
      output += chunk.toString()
      const match = /Server listening at http:\/\/127\.0\.0\.1:(\d+)/.exec(output)
      if (match) resolve(Number(match[1]))
    })
    exited.then(() => reject(new Error(`server exited: ${output}`)))
  })
  return { child, port, exited }
}

function version (fill: number) {
  const encryptedBlob = Buffer.alloc(1_000_000, fill).toString('base64')
  return { encryptedBlob, iv: 'AAAAAAAAAAAAAAAA', timestamp: fill, checksum: createHash('sha256').update(encryptedBlob).digest('hex') }
}

t.test('kill -9 the service in the middle of 1 MB uploads: each row is the old or the new version, never a mix', async (t) => {
  const users = Array.from({ length: 6 }, () => randomUUID())
  const older = version(0x41)
  const newer = version(0x42)
  let server = await start()
  const put = (userId: string, body: object) => fetch(`http://127.0.0.1:${server.port}/api/sync/${userId}`, {
    method: 'PUT', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body)
  })
  for (const userId of users) t.equal((await put(userId, older)).status, 200)

  const uploads = users.map((userId) => put(userId, newer).then((res) => res.status, () => 'cut'))
  await sleep(150)
  server.child.kill('SIGKILL')
  await server.exited
  const outcomes = await Promise.all(uploads)
  t.comment(`uploads cut by kill -9: ${outcomes.join(', ')}`)

  server = await start()
  t.teardown(() => { server.child.kill('SIGTERM') })
  let mixed = 0
  const seen: string[] = []
  for (const [i, userId] of users.entries()) {
    const res = await fetch(`http://127.0.0.1:${server.port}/api/sync/${userId}`)
    const body = await res.json() as { encryptedBlob: string, checksum: string, timestamp: number }
    const which = body.encryptedBlob === older.encryptedBlob ? 'old' : body.encryptedBlob === newer.encryptedBlob ? 'new' : 'mixed'
    const consistent = (which === 'old' && body.checksum === older.checksum && body.timestamp === older.timestamp) ||
      (which === 'new' && body.checksum === newer.checksum && body.timestamp === newer.timestamp)
    if (!consistent) mixed++
    if (outcomes[i] === 200) t.equal(which, 'new', `user ${i}: an acknowledged upload is there`)
    seen.push(which)
  }
  t.equal(mixed, 0, `rows after the restart: ${seen.join(', ')}`)
  const { rows } = await db.query('SELECT count(*)::int AS n FROM user_sync_data WHERE blob_size <> 1000000 OR length(encrypted_blob) <> 1333336')
  t.equal(rows[0].n, 0, 'every stored blob is whole')
})

t.test('hostile clients against the listening server', async (t) => {
  const server = await start()
  t.teardown(() => { server.child.kill('SIGTERM') })
  const connect = () => {
    const socket = net.connect(server.port, '127.0.0.1')
    let received = ''
    socket.on('data', (chunk) => { received += chunk.toString() })
    socket.on('error', () => {})
    const closed = once(socket, 'close').then(() => received)
    return { socket, closed }
  }

  await t.test('slow headers (slowloris) are cut off', async (t) => {
    const started = Date.now()
    const { socket, closed } = connect()
    socket.write(`GET /api/sync/${randomUUID()} HTTP/1.1\r\nHost: x\r\n`)
    const drip = setInterval(() => { if (!socket.destroyed) socket.write('X-Slow: 1\r\n') }, 200)
    const received = await closed
    clearInterval(drip)
    const ms = Date.now() - started
    t.ok(ms < 6000, `connection closed after ${ms} ms (request timeout 1500 ms, checked every 1.5 s)`)
    t.notMatch(received, /^HTTP\/1\.1 [5]\d\d/, `no 5xx: ${received.split('\r\n')[0] || 'closed without an answer'}`)
  })

  await t.test('a body shorter than its Content-Length: the request times out, nothing stored', async (t) => {
    const userId = randomUUID()
    const started = Date.now()
    const { socket, closed } = connect()
    socket.write(`PUT /api/sync/${userId} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{"encryptedBlob":"AAAA"`)
    const received = await closed
    t.ok(Date.now() - started < 6000, `closed after ${Date.now() - started} ms`)
    t.notMatch(received, /^HTTP\/1\.1 5\d\d/, received.split('\r\n')[0] || 'closed without an answer')
    t.equal((await db.query('SELECT 1 FROM user_sync_data WHERE user_id = $1', [userId])).rows.length, 0)
  })

  await t.test('a body longer than its Content-Length: 400, nothing stored', async (t) => {
    const userId = randomUUID()
    const { socket, closed } = connect()
    const body = JSON.stringify({ encryptedBlob: 'AAAA', iv: 'AAAAAAAAAAAAAAAA', timestamp: 1, checksum: 'a'.repeat(64) })
    socket.write(`PUT /api/sync/${userId} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 20\r\nConnection: close\r\n\r\n${body}`)
    const received = await closed
    t.match(received, /^HTTP\/1\.1 400/, received.split('\r\n')[0] ?? '')
    t.equal((await db.query('SELECT 1 FROM user_sync_data WHERE user_id = $1', [userId])).rows.length, 0)
  })

  const health = await fetch(`http://127.0.0.1:${server.port}/health`)
  t.equal(health.status, 200, 'the server still serves after all of it')
})
