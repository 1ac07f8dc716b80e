import t from 'tap'
import { createHash, randomUUID } from 'node:crypto'
import net from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import pg from 'pg'
import { createTestDatabase, embeddedTests, inspect, lockWaiters } from '../helper.ts'
import { startServer } from '../server-process.ts'
import { within } from '../wait.ts'

// Faults at the HTTP edge of the real server process: a killed service, hostile clients.
const databaseUrl = await createTestDatabase(t)
const db = inspect(t, databaseUrl)
// Load shedding off: on a busy machine a 1 MB upload can hold the event loop long enough for the
// shedder to answer 503 before a body arrives, and what these tests watch is the faults, not load
// (test/app/hardening-ops.test.ts and network.test.ts test the shedder).
const env = {
  DATABASE_URL: databaseUrl, REQUEST_TIMEOUT_MS: '1500', RATE_LIMIT_MAX: '0', RATE_LIMIT_IP_MAX: '0', CLEANUP_INTERVAL: '0', MAX_EVENT_LOOP_DELAY_MS: '0'
}

function version (fill: number) {
  const encryptedBlob = Buffer.alloc(1_000_000, fill).toString('base64')
  return { encryptedBlob, iv: 'AAAAAAAAAAAAAAAA', timestamp: fill, checksum: createHash('sha256').update(encryptedBlob).digest('hex') }
}

/** The service's backends on this database that wait for a lock, once there are `count` of them (at most 10 s). */
async function blockedOnLock (count: number): Promise<number[]> {
  for (const deadline = Date.now() + 10_000; ;) {
    const pids = await lockWaiters(db)
    if (pids.length >= count || Date.now() > deadline) return pids
    await sleep(20)
  }
}

/** A tap subtest (the type of the callback's argument). */
type Test = Parameters<Parameters<typeof t.test>[0]>[0]

function connect (port: number) {
  const socket = net.connect(port, '127.0.0.1')
  let received = ''
  socket.on('data', (chunk) => { received += chunk.toString('latin1') })
  socket.on('error', () => {})
  const closed = new Promise<string>((resolve) => socket.once('close', () => resolve(received)))
  const write = (text: string) => new Promise<void>((resolve, reject) => socket.write(text, (err) => (err ? reject(err) : resolve())))
  return { socket, closed, write }
}

/** Status and JSON body of the one response in `text` (null when there is none). */
function parseResponse (text: string): { statusCode: number, body: unknown } | null {
  const end = text.indexOf('\r\n\r\n')
  if (end === -1) return null
  const head = text.slice(0, end)
  const statusCode = Number(/^HTTP\/1\.1 (\d{3})/.exec(head)?.[1] ?? 0)
  const length = Number(/\r\ncontent-length: *(\d+)/i.exec(head)?.[1] ?? text.length)
  const raw = text.slice(end + 4, end + 4 + length)
  let body: unknown
  try { body = JSON.parse(raw) } catch { body = raw }
  return { statusCode, body }
}

t.test('kill -9 the service with uploads in flight: a body not yet whole stores nothing, a statement the database had lands whole', {
  skip: embeddedTests() ? 'the embedded database has one session: a row lock held by the test cannot hold the service\'s writes' : false
}, async (t) => {
  const users = Array.from({ length: 6 }, () => randomUUID())
  const older = version(0x41)
  const newer = version(0x42)
  let server = await startServer(t, { env })
  const put = (userId: string, body: object) => fetch(`${server.url}/api/sync/${userId}`, {
    method: 'PUT', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body)
  })
  for (const userId of users) t.equal((await put(userId, older)).status, 200)
  const receiving = users.slice(0, 3) // the server has half of each body
  const writing = users.slice(3) // the database has each statement, waiting for a row lock

  // Uploads cut while their body arrives: the headers and the first half of the JSON.
  const body = JSON.stringify(newer)
  const halves = receiving.map(() => connect(server.port))
  await Promise.all(halves.map((raw, i) => raw.write(
    `PUT /api/sync/${receiving[i]} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n` +
    body.slice(0, body.length >> 1))))

  // Uploads cut while PostgreSQL runs them: the test holds their rows, so each statement waits.
  const holder = new pg.Client({ connectionString: databaseUrl, application_name: 'lock holder' })
  await holder.connect()
  t.teardown(() => holder.end())
  await holder.query('BEGIN')
  await holder.query('SELECT 1 FROM user_sync_data WHERE user_id = ANY($1) FOR UPDATE', [writing])
  const uploads = writing.map((userId) => put(userId, newer).then((res) => res.status, () => 'cut'))
  const blocked = await blockedOnLock(writing.length)
  t.equal(blocked.length, writing.length, `every upload of the second group is in a statement waiting for its row (backends ${blocked.join(', ')})`)
  t.strictSame(halves.map((raw) => raw.socket.destroyed), [false, false, false], 'the half-sent uploads are still open, unanswered')

  const killed = await server.stop('SIGKILL')
  t.equal(killed.signal, 'SIGKILL')
  t.strictSame(await Promise.all(uploads), ['cut', 'cut', 'cut'], 'no upload of the second group was answered')
  t.strictSame(await Promise.all(halves.map((raw) => within(15_000, raw.closed))), ['', '', ''],
    'the half-sent uploads are closed without an answer')

  // The statements PostgreSQL already had run to their end once the rows are free (nobody is
  // left to read their answer); the restarted service must then find them whole.
  await holder.query('ROLLBACK')
  for (const deadline = Date.now() + 30_000; Date.now() < deadline;) {
    const { rows } = await db.query('SELECT 1 FROM pg_stat_activity WHERE pid = ANY($1)', [blocked])
    if (rows.length === 0) break
    await sleep(20)
  }

  server = await startServer(t, { env })
  const seen: string[] = []
  for (const userId of users) {
    const res = await fetch(`${server.url}/api/sync/${userId}`)
    const stored = await res.json() as { encryptedBlob: string, checksum: string, timestamp: number }
    const which = stored.encryptedBlob === older.encryptedBlob ? 'old' : stored.encryptedBlob === newer.encryptedBlob ? 'new' : 'mixed'
    const whole = (which === 'old' && stored.checksum === older.checksum && stored.timestamp === older.timestamp) ||
      (which === 'new' && stored.checksum === newer.checksum && stored.timestamp === newer.timestamp)
    seen.push(whole ? which : 'mixed')
  }
  t.strictSame(seen, ['old', 'old', 'old', 'new', 'new', 'new'],
    'half-received uploads stored nothing; the statements the database had are whole (blob, checksum and timestamp of one upload)')
  const { rows } = await db.query('SELECT count(*)::int AS n FROM user_sync_versions WHERE blob_size <> 1000000 OR octet_length(ciphertext) IS DISTINCT FROM 1000000')
  t.equal(rows[0].n, 0, 'every stored blob is whole')
})

t.test('hostile clients against the listening server', async (t) => {
  const server = await startServer(t, { env })
  const assertTimeout = (t: Test, received: string | 'timeout') => {
    t.not(received, 'timeout', 'the server closes the connection (within 15 s)')
    const response = parseResponse(received === 'timeout' ? '' : received)
    t.equal(response?.statusCode, 408, `answered 408 before closing: ${String(received).split('\r\n')[0] || 'nothing'}`)
    t.match(response?.body, { error: String, statusCode: 408 }, 'in the error shape')
    t.strictSame(Object.keys(response?.body ?? {}).sort(), ['error', 'statusCode'])
  }

  // Both clients start together and wait out the same request timeout (1.5 s, checked every 1.5 s).
  const started = Date.now()
  const slowHeaders = connect(server.port)
  const shortBody = connect(server.port)
  const shortBodyUser = randomUUID()
  t.teardown(() => { slowHeaders.socket.destroy(); shortBody.socket.destroy() })
  await slowHeaders.write(`GET /api/sync/${randomUUID()} HTTP/1.1\r\nHost: x\r\n`)
  const drip = setInterval(() => { if (!slowHeaders.socket.destroyed) slowHeaders.socket.write('X-Slow: 1\r\n') }, 200)
  t.teardown(() => clearInterval(drip))
  await shortBody.write(`PUT /api/sync/${shortBodyUser} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{"encryptedBlob":"AAAA"`)

  await t.test('slow headers (slowloris): 408, then the connection is closed', async (t) => {
    const received = await within(15_000, slowHeaders.closed)
    clearInterval(drip)
    assertTimeout(t, received)
    t.comment(`slowloris: cut off after ${Date.now() - started} ms (request timeout 1500 ms)`)
  })

  await t.test('a body shorter than its Content-Length: 408, nothing stored', async (t) => {
    assertTimeout(t, await within(15_000, shortBody.closed))
    t.comment(`short body: cut off after ${Date.now() - started} ms`)
    t.equal((await db.query('SELECT 1 FROM user_sync_data WHERE user_id = $1', [shortBodyUser])).rows.length, 0)
  })

  await t.test('a body longer than its Content-Length: 400, nothing stored', async (t) => {
    const userId = randomUUID()
    const raw = connect(server.port)
    t.teardown(() => { raw.socket.destroy() })
    const body = JSON.stringify({ encryptedBlob: 'AAAA', iv: 'AAAAAAAAAAAAAAAA', timestamp: 1, checksum: 'a'.repeat(64) })
    await raw.write(`PUT /api/sync/${userId} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 20\r\nConnection: close\r\n\r\n${body}`)
    const received = await within(15_000, raw.closed)
    const response = parseResponse(received === 'timeout' ? '' : received)
    t.equal(response?.statusCode, 400, String(received).split('\r\n')[0] ?? '')
    t.match(response?.body, { error: String, statusCode: 400 })
    t.equal((await db.query('SELECT 1 FROM user_sync_data WHERE user_id = $1', [userId])).rows.length, 0)
  })

  const health = await fetch(`${server.url}/health`)
  t.equal(health.status, 200, 'the server still serves after all of it')
})
