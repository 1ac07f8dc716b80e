import t from 'tap'
import { randomUUID } from 'node:crypto'
import net from 'node:net'
import { gzipSync } from 'node:zlib'
import { setTimeout as sleep } from 'node:timers/promises'
import pg from 'pg'
import type { LightMyRequestResponse } from 'fastify'
import { within } from '../wait.ts'
import { build, createTestDatabase, inspect } from '../helper.ts'
import { whileOverloaded } from '../overload.ts'
import { pseudonym } from '../../logging.ts'
import { startServer } from '../server-process.ts'

// The HTTP edge, hardened: one error shape everywhere, limits that hold together, requests
// refused before their body is read, health checks and database faults that say only what a
// client may know. Through app.inject where that suffices, on the real server process where
// the socket matters.
const databaseUrl = await createTestDatabase(t)
const db = inspect(t, databaseUrl)
const app = await build(t, { env: { DATABASE_URL: databaseUrl, RATE_LIMIT_MAX: '0', RATE_LIMIT_IP_MAX: '0' } })

const payload = { encryptedBlob: 'AAAA', iv: 'AAAAAAAAAAAAAAAA', timestamp: 1, checksum: 'a'.repeat(64) }
const version = (fill: number) => ({ ...payload, encryptedBlob: Buffer.alloc(3, fill).toString('base64'), timestamp: fill })
const ERROR_KEYS = ['error', 'statusCode']
/** A tap subtest (the type of the callback's argument). */
type Test = Parameters<Parameters<typeof t.test>[0]>[0]

/** The error shape: exactly { error: string, statusCode }, never cached, never naming a user id. */
function assertError (t: Test, res: { statusCode: number, headers: Record<string, unknown>, body: string }, statusCode: number, userId?: string) {
  t.equal(res.statusCode, statusCode, `status ${statusCode}`)
  let body: Record<string, unknown> = {}
  try { body = JSON.parse(res.body) } catch { t.fail(`the body is JSON: ${res.body.slice(0, 200)}`) }
  t.strictSame(Object.keys(body).sort(), ERROR_KEYS, `only error and statusCode: ${res.body.slice(0, 200)}`)
  t.type(body.error, 'string')
  t.equal(body.statusCode, statusCode)
  t.equal(res.headers['cache-control'], 'no-store', 'cache-control: no-store')
  if (userId !== undefined) {
    t.notOk(res.body.toLowerCase().includes(userId.toLowerCase()), 'the body does not name the user id')
  }
}

function adminUrl (): string {
  if (process.env.DATABASE_URL) return process.env.DATABASE_URL
  const url = new URL(databaseUrl)
  url.pathname = '/postgres'
  return url.toString()
}

async function admin<T> (fn: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: adminUrl() })
  await client.connect()
  try {
    return await fn(client)
  } finally {
    await client.end()
  }
}

const nameOf = (url: string) => new URL(url).pathname.slice(1)

// --- the real server process, for what only a socket shows ---------------------------------

function start (env: Record<string, string>) {
  return startServer(t, {
    env: {
      DATABASE_URL: databaseUrl,
      LOG_LEVEL: 'info',
      RATE_LIMIT_MAX: '0',
      RATE_LIMIT_IP_MAX: '0',
      CLEANUP_INTERVAL: '0',
      ...env
    }
  })
}

// Started together, while the first tests run: each takes a second or two to come up.
const servers = {
  /** The default REQUEST_TIMEOUT_MS (30 s): a connection it closes sooner was not closed by a timeout. */
  plain: start({}),
  slowClients: start({ REQUEST_TIMEOUT_MS: '1500' }),
  capped: start({ MAX_CONNECTIONS: '2' })
}
for (const server of Object.values(servers)) server.catch(() => {}) // awaited (and reported) by the tests that use it

interface Raw { socket: net.Socket, received: () => string, closed: Promise<string>, connected: Promise<unknown> }

function connect (port: number): Raw {
  const socket = net.connect(port, '127.0.0.1')
  let received = ''
  socket.on('data', (chunk) => { received += chunk.toString('latin1') })
  socket.on('error', () => {})
  // Not events.once: it would reject on the 'error' (ECONNRESET) that a refused connection may bring first.
  const closed = new Promise<string>((resolve) => socket.once('close', () => resolve(received)))
  const connected = new Promise<void>((resolve) => { socket.once('connect', resolve); socket.once('close', () => resolve()) })
  return { socket, received: () => received, closed, connected }
}

interface RawResponse { statusCode: number, headers: Record<string, string>, body: string }

/** One whole HTTP/1.1 response at the start of `text`, or null while it is incomplete. */
function parseResponse (text: string): RawResponse | null {
  const end = text.indexOf('\r\n\r\n')
  if (end === -1) return null
  const [status, ...lines] = text.slice(0, end).split('\r\n')
  const headers: Record<string, string> = {}
  for (const line of lines) {
    const at = line.indexOf(':')
    headers[line.slice(0, at).trim().toLowerCase()] = line.slice(at + 1).trim()
  }
  let body = text.slice(end + 4)
  if (headers['content-length'] !== undefined) {
    const length = Number(headers['content-length'])
    if (Buffer.byteLength(body, 'latin1') < length) return null
    body = body.slice(0, length)
  } else if (/chunked/i.test(headers['transfer-encoding'] ?? '')) {
    if (!body.includes('0\r\n\r\n')) return null
    let decoded = ''
    for (let rest = body; ;) {
      const lineEnd = rest.indexOf('\r\n')
      const size = parseInt(rest.slice(0, lineEnd), 16)
      if (!(size > 0)) break
      decoded += rest.slice(lineEnd + 2, lineEnd + 2 + size)
      rest = rest.slice(lineEnd + 2 + size + 2)
    }
    body = decoded
  }
  return { statusCode: Number(/^HTTP\/1\.[01] (\d{3})/.exec(status ?? '')?.[1] ?? 0), headers, body }
}

/** Waits (at most ms) for a whole response on a raw connection, or its close. */
async function responseOn (raw: Raw, ms: number): Promise<RawResponse | null> {
  for (let waited = 0; waited < ms; waited += 25) {
    const response = parseResponse(raw.received())
    if (response !== null) return response
    if (raw.socket.destroyed) return parseResponse(raw.received())
    await sleep(25)
  }
  return parseResponse(raw.received())
}

function metricValue (text: string, name: string, labels: Record<string, string>): number {
  for (const line of text.split('\n')) {
    if (!line.startsWith(`${name}{`)) continue
    if (Object.entries(labels).every(([key, value]) => line.includes(`${key}="${value}"`))) return Number(line.split(' ').pop())
  }
  return 0
}

// --- 1. both rate limits at once --------------------------------------------------------------

t.test('1. both rate limits hold at once; the headers describe the limit closest to running out', async (t) => {
  await t.test('per user 5 with the default per-IP 2000: 404 x5 then 429 x3, each saying limit 5', async (t) => {
    const limited = await build(t, { env: { DATABASE_URL: databaseUrl, RATE_LIMIT_MAX: '5' } })
    const userId = randomUUID()
    const answers = []
    for (let i = 0; i < 8; i++) answers.push(await limited.inject({ method: 'GET', url: `/api/sync/${userId}` }))
    t.strictSame(answers.map((res) => res.statusCode), [404, 404, 404, 404, 404, 429, 429, 429])
    t.strictSame(answers.map((res) => res.headers['x-ratelimit-limit']), Array(8).fill('5'))
    t.strictSame(answers.map((res) => res.headers['x-ratelimit-remaining']), ['4', '3', '2', '1', '0', '0', '0', '0'])
    assertError(t, answers[7]!, 429, userId)
  })

  await t.test('per IP 3 with per user 100, across users: the 4th is 429, and every answer says limit 3', async (t) => {
    const limited = await build(t, { env: { DATABASE_URL: databaseUrl, RATE_LIMIT_MAX: '100', RATE_LIMIT_IP_MAX: '3' } })
    const answers = []
    for (let i = 0; i < 4; i++) answers.push(await limited.inject({ method: 'GET', url: `/api/sync/${randomUUID()}` }))
    t.strictSame(answers.map((res) => res.statusCode), [404, 404, 404, 429])
    t.strictSame(answers.map((res) => res.headers['x-ratelimit-limit']), Array(4).fill('3'))
    t.strictSame(answers.map((res) => res.headers['x-ratelimit-remaining']), ['2', '1', '0', '0'])
  })
})

// --- 2. room for the counters -----------------------------------------------------------------

t.test('2. rate-limit counters', async (t) => {
  const other = (i: number) => `10.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255}`
  // Each of the crowd sends one request the per-IP limit counts and the database never sees
  // (a malformed id fails validation, after the limit): thousands of them take a second or two.
  // The crowd shares this process's event loop with the service: load shedding, which would
  // judge the test's own burst, is off for these apps (it has tests of its own).
  async function crowd (limited: Awaited<ReturnType<typeof build>>, count: number): Promise<number[]> {
    const statuses: number[] = []
    for (let i = 0; i < count; i += 50) {
      const batch = Array.from({ length: Math.min(50, count - i) }, (_, j) =>
        limited.inject({ method: 'GET', url: '/api/sync/not-a-user-id', remoteAddress: other(i + j + 1) }))
      for (const res of await Promise.all(batch)) statuses.push(res.statusCode)
      // These requests never wait for I/O: without a turn of the event loop between batches the
      // burst would hold it for seconds, and the other apps of this file would shed load.
      await new Promise((resolve) => setImmediate(resolve))
    }
    return statuses
  }
  const first = (limited: Awaited<ReturnType<typeof build>>) =>
    limited.inject({ method: 'GET', url: `/api/sync/${randomUUID()}`, remoteAddress: '203.0.113.1' })

  await t.test('an address is remembered after 6,000 other addresses (default room 100,000 keys)', async (t) => {
    const limited = await build(t, { env: { DATABASE_URL: databaseUrl, RATE_LIMIT_MAX: '0', RATE_LIMIT_IP_MAX: '2', MAX_EVENT_LOOP_DELAY_MS: '0' } })
    t.strictSame([(await first(limited)).statusCode, (await first(limited)).statusCode], [404, 404])
    const statuses = await crowd(limited, 6_000)
    t.equal(statuses.filter((status) => status === 400).length, 6_000, 'each other address has its own budget')
    t.equal((await first(limited)).statusCode, 429, 'the first address is still over its limit')
  })

  await t.test('RATE_LIMIT_CACHE_KEYS sets the room: with 100 keys, 150 other addresses make it forget the first', async (t) => {
    const limited = await build(t, {
      env: { DATABASE_URL: databaseUrl, RATE_LIMIT_MAX: '0', RATE_LIMIT_IP_MAX: '2', RATE_LIMIT_CACHE_KEYS: '100', MAX_EVENT_LOOP_DELAY_MS: '0' }
    })
    t.strictSame([(await first(limited)).statusCode, (await first(limited)).statusCode], [404, 404])
    await crowd(limited, 150)
    t.equal((await first(limited)).statusCode, 404, 'forgotten: its budget starts afresh')
  })

  await t.test('IPv6 clients are counted by their /64', async (t) => {
    const limited = await build(t, { env: { DATABASE_URL: databaseUrl, RATE_LIMIT_MAX: '0', RATE_LIMIT_IP_MAX: '2', MAX_EVENT_LOOP_DELAY_MS: '0' } })
    const from = async (remoteAddress: string) =>
      (await limited.inject({ method: 'GET', url: `/api/sync/${randomUUID()}`, remoteAddress })).statusCode
    t.equal(await from('2001:db8:1:2::1'), 404)
    t.equal(await from('2001:db8:1:2:ffff:ffff:ffff:9'), 404)
    t.equal(await from('2001:db8:1:2::7'), 429, 'a third address of the same /64 is over the limit')
    t.equal(await from('2001:db8:1:3::1'), 404, 'another /64 has its own budget')
  })
})

// --- 3. bodies, the per-IP limit on every route, connections ----------------------------------

t.test('3. routes that take no body refuse one before reading it', async (t) => {
  const userId = randomUUID()
  const body = '{"x":1}'
  for (const [method, url] of [
    ['POST', '/nope'], ['POST', '/metrics'], ['OPTIONS', '/info'],
    ['POST', `/api/sync/${userId}/verify`], ['DELETE', `/api/sync/${userId}`]
  ] as const) {
    await t.test(`${method} ${url.replace(userId, '<uuid>')} with a JSON body: 413`, async (t) => {
      const res = await app.inject({ method, url, payload: body, headers: { 'content-type': 'application/json' } })
      assertError(t, res, 413, userId)
      t.match(res.json(), { error: /takes no request body/ })
    })
  }

  await t.test('on the listening server, the 413 comes with only the headers sent, then the connection closes', async (t) => {
    const server = await servers.plain
    const raw = connect(server.port)
    t.teardown(() => { raw.socket.destroy() })
    raw.socket.write('POST /nope HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1300000\r\n\r\n')
    const response = await responseOn(raw, 3_000)
    if (response === null) {
      t.fail(`an answer without the body (within 3 s): ${raw.received().split('\r\n')[0] || 'none'}`)
      return
    }
    assertError(t, response, 413)
    t.match(response.body, /takes no request body/)
    t.not(await within(10_000, raw.closed), 'timeout', 'the server closes the connection (the unread body is not a request)')
  })
})

t.test('3. the per-IP limit counts every route but /health and /health/live', async (t) => {
  const limited = await build(t, { env: { DATABASE_URL: databaseUrl, RATE_LIMIT_IP_MAX: '3' } })
  const statuses = []
  for (const url of ['/nope', '/info', '/nope', `/api/sync/${randomUUID()}`]) {
    statuses.push((await limited.inject({ method: 'GET', url })).statusCode)
  }
  t.strictSame(statuses, [404, 200, 404, 429])
  t.equal((await limited.inject({ method: 'GET', url: '/health' })).statusCode, 200, '/health is not limited')
  t.equal((await limited.inject({ method: 'GET', url: '/health/live' })).statusCode, 200, '/health/live is not limited')
})

t.test('3. an empty JSON body is no body: verify and DELETE answer 200', async (t) => {
  const userId = randomUUID()
  for (const method of ['POST', 'DELETE'] as const) {
    const url = method === 'POST' ? `/api/sync/${userId}/verify` : `/api/sync/${userId}`
    const res = await app.inject({ method, url, payload: '', headers: { 'content-type': 'application/json' } })
    t.equal(res.statusCode, 200, `${method}: ${res.body}`)
  }
})

t.test('3. MAX_CONNECTIONS caps open connections', async (t) => {
  const server = await servers.capped
  const held = [connect(server.port), connect(server.port)]
  t.teardown(() => { for (const raw of held) raw.socket.destroy() })
  // The kernel queues connections in order: the server accepts these two before the third.
  await Promise.all(held.map((raw) => raw.connected))
  const third = connect(server.port)
  t.teardown(() => { third.socket.destroy() })
  await third.connected
  if (!third.socket.destroyed) third.socket.write('GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
  const answer = await within(10_000, third.closed)
  t.not(answer, 'timeout', 'the third connection is closed')
  t.equal(answer, '', `without an answer: ${String(answer).split('\r\n')[0]}`)

  for (const raw of held) raw.socket.destroy()
  await Promise.all(held.map((raw) => raw.closed))
  // The server notices the two closes on its own schedule: ask again, a bounded number of times.
  let served: RawResponse | null = null
  for (let attempt = 0; attempt < 40 && served?.statusCode !== 200; attempt++) {
    const next = connect(server.port)
    next.socket.write('GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
    await within(5_000, next.closed)
    served = parseResponse(next.received())
    next.socket.destroy()
    if (served?.statusCode !== 200) await sleep(50)
  }
  t.equal(served?.statusCode, 200, 'after the first two close, a new connection is served')
})

// --- 4. one error shape on every route ----------------------------------------------------------

t.test('4. while the service sheds load', async (t) => {
  const routes: Array<{ method: string, url: string }> = []
  const loaded = await build(t, { env: { DATABASE_URL: databaseUrl, MAX_EVENT_LOOP_DELAY_MS: '50' }, routes })
  await loaded.loadSheddingArmed
  await t.test('/health answers 503 in the error shape, with Retry-After (not a 500)', async (t) => {
    const res = await whileOverloaded(loaded, () => loaded.inject({ method: 'GET', url: '/health' }))
    t.equal(res.statusCode, 503)
    t.match(res.json(), { error: String, statusCode: 503 })
    t.ok(res.headers['retry-after'], 'retry-after')
    t.equal(res.headers['cache-control'], 'no-store')
  })

  // /health/live and /metrics are answered under overload (operations.md, "Load shedding").
  const NOT_SHED = new Set(['/health/live', '/health/live/', '/metrics', '/metrics/'])
  await t.test('every route but /health/live and /metrics answers 503 in the error shape, no-store', async (t) => {
    const userId = randomUUID()
    const requests = new Map<string, { method: string, url: string }>()
    for (const route of routes) {
      if (NOT_SHED.has(route.url)) continue
      const path = route.url.replace(/:userId/g, userId).replace(/\*$/, 'x')
      const url = path.startsWith('/') ? path : `/${path}`
      requests.set(`${route.method} ${url}`, { method: route.method, url })
    }
    t.ok(requests.size >= 10, `${requests.size} routes`)
    const answers = await whileOverloaded(loaded, () => Promise.all([...requests.values()].map(async (request) => ({
      request, res: await loaded.inject(request as { method: 'GET', url: string })
    }))))
    for (const { request, res } of answers) {
      await t.test(`${request.method} ${request.url.replace(userId, '<uuid>')}`, async (t) => {
        if (request.method === 'HEAD') {
          t.equal(res.statusCode, 503)
          t.equal(res.headers['cache-control'], 'no-store')
        } else {
          assertError(t, res, 503, userId)
        }
      })
    }
  })

  await t.test('/health/live and /metrics answer while requests are shed', async (t) => {
    const [live, metrics] = await whileOverloaded(loaded, () => Promise.all([
      loaded.inject({ method: 'GET', url: '/health/live' }), loaded.inject({ method: 'GET', url: '/metrics' })]))
    t.equal(live.statusCode, 200)
    t.equal(metrics.statusCode, 200)
  })
})

// --- 5. URL problems ----------------------------------------------------------------------------

t.test('5. a malformed percent-escape: 400 in the error shape, the id not echoed', async (t) => {
  const userId = randomUUID()
  const res = await app.inject({ method: 'GET', url: `/api/sync/${userId}%ZZ` })
  assertError(t, res, 400, userId)
})

t.test('5. headers over Node\'s limit: 431 with a JSON body in the error shape', async (t) => {
  const server = await servers.plain
  const raw = connect(server.port)
  t.teardown(() => { raw.socket.destroy() })
  raw.socket.write(`GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(20_000)}\r\n\r\n`)
  const response = await responseOn(raw, 10_000)
  t.ok(response, `an answer: ${raw.received().split('\r\n')[0] || 'none'}`)
  if (response !== null) assertError(t, response, 431)
})

// --- 6. logging -----------------------------------------------------------------------------------

t.test('6. a percent-encoded user id is logged by its pseudonym, never as itself or encoded', async (t) => {
  const logLines: string[] = []
  const logged = await build(t, { env: { DATABASE_URL: databaseUrl, LOG_LEVEL: 'info' }, logLines })
  const userId = randomUUID()
  const encoded = [...userId].map((c) => `%${c.charCodeAt(0).toString(16).padStart(2, '0')}`).join('')
  const res = await logged.inject({ method: 'GET', url: `/api/sync/${encoded}` })
  t.equal(res.statusCode, 404, 'the route decodes it: an unknown user')
  const text = logLines.join('\n')
  t.notOk(text.toLowerCase().includes(userId), 'no log line holds the id')
  t.notOk(text.toLowerCase().includes(encoded.toLowerCase()), 'nor its percent-encoded form')
  const line = logLines.find((entry) => entry.includes('"msg":"request completed"'))
  t.ok(line, 'the request is logged')
  t.match(line ?? '', `~${pseudonym(userId)}`, 'by the pseudonym of the id')
})

// --- 7. health -------------------------------------------------------------------------------------

t.test('7. /health', async (t) => {
  await t.test('with the database up: 200 ok', async (t) => {
    const res = await app.inject({ method: 'GET', url: '/health' })
    t.equal(res.statusCode, 200)
    t.strictSame(res.json(), { status: 'ok', database: 'ok', databaseKind: 'postgresql' })
  })

  await t.test('with the pool\'s only connection taken: still 200 (it checks on a connection of its own)', async (t) => {
    const small = await build(t, {
      env: { DATABASE_URL: databaseUrl, DATABASE_POOL_MAX: '1', DATABASE_CONNECT_TIMEOUT_MS: '1000', HEALTH_TIMEOUT_MS: '1500' }
    })
    const held = await small.pg.pool.connect()
    t.teardown(() => held.release())
    const res = await small.inject({ method: 'GET', url: '/health' })
    t.equal(res.statusCode, 200, res.body)
    t.strictSame(res.json(), { status: 'ok', database: 'ok', databaseKind: 'postgresql' })
  })

  await t.test('with the database dropped: 503 in the error shape, no PostgreSQL text', async (t) => {
    const url = await createTestDatabase(t)
    const doomed = await build(t, { env: { DATABASE_URL: url, HEALTH_TIMEOUT_MS: '1500', DATABASE_CONNECT_TIMEOUT_MS: '1000' } })
    const name = nameOf(url)
    await admin((client) => client.query(`DROP DATABASE ${name} WITH (FORCE)`))
    const res = await doomed.inject({ method: 'GET', url: '/health' })
    t.equal(res.statusCode, 503)
    const body = res.json()
    t.strictSame(Object.keys(body).sort(), ['database', 'databaseKind', 'error', 'status', 'statusCode'], res.body)
    t.match(body, { status: 'error', database: 'unavailable', databaseKind: 'postgresql', error: String, statusCode: 503 })
    t.ok(res.headers['retry-after'], 'retry-after')
    t.notOk(res.body.includes(name), 'not the database name')
    t.notOk(res.body.includes('does not exist'), 'not PostgreSQL\'s message')
    // databaseKind is 'postgresql' by design; the error itself says nothing of PostgreSQL.
    t.notMatch(String(body.error), /postgres/i, 'the error does not quote PostgreSQL')
  })
})

// --- 8. the nil and max UUIDs ----------------------------------------------------------------------

t.test('8. the nil and max UUIDs are no user ids: 400, nothing stored', async (t) => {
  const ids = ['00000000-0000-0000-0000-000000000000', 'ffffffff-ffff-ffff-ffff-ffffffffffff', 'FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF']
  for (const userId of ids) {
    const put = await app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload })
    assertError(t, put, 400, userId)
    const get = await app.inject({ method: 'GET', url: `/api/sync/${userId}` })
    assertError(t, get, 400, userId)
  }
  const { rows } = await db.query('SELECT count(*)::int AS n FROM user_sync_data WHERE user_id = ANY($1::uuid[])', [ids])
  t.equal(rows[0].n, 0, 'nothing stored')
})

// --- 9. preconditions and encodings ----------------------------------------------------------------

t.test('9. If-Match together with If-None-Match: * is 412, nothing changed', async (t) => {
  const userId = randomUUID()
  const first = await app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: version(1) })
  t.equal(first.statusCode, 200)
  const etag = first.headers.etag as string
  const both = await app.inject({
    method: 'PUT', url: `/api/sync/${userId}`, payload: version(2), headers: { 'if-match': etag, 'if-none-match': '*' }
  })
  assertError(t, both, 412, userId)
  const back = await app.inject({ method: 'GET', url: `/api/sync/${userId}` })
  t.strictSame(back.json(), version(1), 'the old data')
  t.equal(back.headers.etag, etag, 'the old version')
})

t.test('9. content encodings and charsets', async (t) => {
  const put = (userId: string, body: string | Buffer, headers: Record<string, string>) =>
    app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: body, headers })
  const stored = async (userId: string) => (await db.query('SELECT 1 FROM user_sync_data WHERE user_id = $1', [userId])).rows.length
  const json = JSON.stringify(payload)
  for (const [name, body, headers] of [
    ['a gzipped body (content-encoding: gzip)', gzipSync(json), { 'content-type': 'application/json', 'content-encoding': 'gzip' }],
    ['plain JSON labelled content-encoding: br', json, { 'content-type': 'application/json', 'content-encoding': 'br' }],
    ['application/json; charset=latin1', json, { 'content-type': 'application/json; charset=latin1' }]
  ] as const) {
    await t.test(`${name}: 415, nothing stored`, async (t) => {
      const userId = randomUUID()
      assertError(t, await put(userId, body, headers), 415, userId)
      t.equal(await stored(userId), 0)
    })
  }
  await t.test('application/json; charset=utf-8 with content-encoding: identity: 200', async (t) => {
    const userId = randomUUID()
    const res = await put(userId, json, { 'content-type': 'application/json; charset=utf-8', 'content-encoding': 'identity' })
    t.equal(res.statusCode, 200, res.body)
    t.equal(await stored(userId), 1)
  })
})

// --- 10. ETags after a restore ---------------------------------------------------------------------

t.test('10. ETags never repeat after a restore from backup', async (t) => {
  const userId = randomUUID()
  const url = `/api/sync/${userId}`
  const etag1 = (await app.inject({ method: 'PUT', url, payload: version(1) })).headers.etag as string
  // Every column as PostgreSQL's text, so a restore brings back exactly what was there (microseconds included).
  const asText = { getTypeParser: () => (value: string) => value }
  const { rows: [saved] } = await db.query({ text: 'SELECT * FROM user_sync_data WHERE user_id = $1', values: [userId], types: asText })
  const etag2 = (await app.inject({ method: 'PUT', url, payload: version(2) })).headers.etag as string
  t.not(etag2, etag1)
  const columns = Object.keys(saved)
  await db.query(
    `UPDATE user_sync_data SET ${columns.map((column, i) => `"${column}" = $${i + 1}`).join(', ')} WHERE user_id = $${columns.length + 1}`,
    [...columns.map((column) => saved[column]), userId])
  t.strictSame((await app.inject({ method: 'GET', url })).json(), version(1), 'restored')
  const third = await app.inject({ method: 'PUT', url, payload: version(3) })
  t.equal(third.statusCode, 200)
  const etag3 = third.headers.etag as string
  t.not(etag3, etag2, 'not the tag of the version the restore lost')
  t.not(etag3, etag1)
  const conditional = await app.inject({ method: 'GET', url, headers: { 'if-none-match': etag2 } })
  t.equal(conditional.statusCode, 200, 'a client holding the lost version gets the new data')
  if (conditional.statusCode === 200) t.strictSame(conditional.json(), version(3))
})

// --- 11. HEAD ----------------------------------------------------------------------------------------

t.test('11. HEAD /api/sync/<uuid>: 404 without data, the ETag with, and no blob read', async (t) => {
  const userId = randomUUID()
  const url = `/api/sync/${userId}`
  const missing = await app.inject({ method: 'HEAD', url })
  t.equal(missing.statusCode, 404)
  t.equal(missing.headers['cache-control'], 'no-store')
  t.equal((await app.inject({ method: 'PUT', url, payload })).statusCode, 200)
  const got = await app.inject({ method: 'GET', url })
  const gets = async () => metricValue((await app.inject({ method: 'GET', url: '/metrics' })).body,
    'storage_operation_duration_seconds_count', { operation: 'get', outcome: 'ok' })
  const before = await gets()
  const head = await app.inject({ method: 'HEAD', url })
  const after = await gets()
  t.equal(head.statusCode, 200)
  t.equal(head.body, '')
  t.equal(head.headers.etag, got.headers.etag, 'the ETag GET gives')
  t.equal(head.headers['cache-control'], 'no-store')
  t.equal(after, before, `no "get" storage operation (before ${before}, after ${after})`)
})

// --- 12. Node's client errors --------------------------------------------------------------------------

t.test('12. Node\'s client errors in the error shape', async (t) => {
  const server = await servers.slowClients
  // Both clients start together and wait out the same request timeout (1.5 s).
  const partialHeaders = connect(server.port)
  const shortBody = connect(server.port)
  const userId = randomUUID()
  t.teardown(() => { partialHeaders.socket.destroy(); shortBody.socket.destroy() })
  partialHeaders.socket.write(`GET /api/sync/${randomUUID()} HTTP/1.1\r\nHost: x\r\n`)
  shortBody.socket.write(`PUT /api/sync/${userId} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{"encryptedBlob":"AAAA"`)

  await t.test('a partial header block, then silence: 408', async (t) => {
    t.not(await within(10_000, partialHeaders.closed), 'timeout', 'the server closes the connection')
    const response = parseResponse(partialHeaders.received())
    t.ok(response, `an answer: ${partialHeaders.received().split('\r\n')[0] || 'none'}`)
    if (response !== null) assertError(t, response, 408)
  })

  await t.test('a body shorter than its Content-Length: 408, nothing stored', async (t) => {
    t.not(await within(10_000, shortBody.closed), 'timeout', 'the server closes the connection')
    const response = parseResponse(shortBody.received())
    t.ok(response, `an answer: ${shortBody.received().split('\r\n')[0] || 'none'}`)
    if (response !== null) assertError(t, response, 408, userId)
    t.equal((await db.query('SELECT 1 FROM user_sync_data WHERE user_id = $1', [userId])).rows.length, 0)
  })
})

// --- 13. unknown sub-paths and CORS --------------------------------------------------------------------

t.test('13. an unknown sub-path of a user: 404, no-store', async (t) => {
  const userId = randomUUID()
  assertError(t, await app.inject({ method: 'GET', url: `/api/sync/${userId}/other` }), 404, userId)
})

t.test('13. CORS: a refused origin gets no access-control-* header at all', async (t) => {
  const cors = await build(t, { env: { DATABASE_URL: databaseUrl, CORS_ORIGINS: 'https://app.example' } })
  const userId = randomUUID()
  const accessHeaders = (res: LightMyRequestResponse) => Object.keys(res.headers).filter((name) => name.startsWith('access-control-')).sort()
  const requests = (origin: string) => [
    { name: 'GET /info', method: 'GET', url: '/info', headers: { origin } },
    { name: 'GET /api/sync/<uuid>', method: 'GET', url: `/api/sync/${userId}`, headers: { origin } },
    { name: 'PUT /api/sync/<uuid>', method: 'PUT', url: `/api/sync/${userId}`, headers: { origin }, payload },
    {
      name: 'the preflight of a PUT',
      method: 'OPTIONS',
      url: `/api/sync/${userId}`,
      headers: { origin, 'access-control-request-method': 'PUT', 'access-control-request-headers': 'content-type, if-match' }
    }
  ] as const
  for (const request of requests('https://evil.example')) {
    const res = await cors.inject(request)
    t.strictSame(accessHeaders(res), [], `https://evil.example, ${request.name} (${res.statusCode})`)
  }
  const [info, get, put, preflight] = await Promise.all(requests('https://app.example').map((request) => cors.inject(request)))
  for (const res of [info!, get!, put!]) {
    t.equal(res.headers['access-control-allow-origin'], 'https://app.example')
    t.match(String(res.headers['access-control-expose-headers']).toLowerCase(), /etag/)
  }
  t.equal(preflight!.headers['access-control-allow-origin'], 'https://app.example', 'https://app.example, the preflight')
  t.match(preflight!.headers['access-control-allow-methods'], /PUT/)
  t.match(String(preflight!.headers['access-control-allow-headers']).toLowerCase(), /if-match/)
})

// --- 14. database faults ----------------------------------------------------------------------------

t.test('14. a read-only database (as after a failover to a standby): 503 with Retry-After, nothing stored', async (t) => {
  const url = await createTestDatabase(t)
  const faulty = await build(t, { env: { DATABASE_URL: url, RATE_LIMIT_MAX: '0', RATE_LIMIT_IP_MAX: '0' } })
  const name = nameOf(url)
  await admin(async (client) => {
    await client.query(`ALTER DATABASE ${name} SET default_transaction_read_only = on`)
    await client.query('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()', [name])
  })
  const userId = randomUUID()
  const first = await faulty.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload })
  // Its pooled connection was terminated: the upload is retried once on a new one, read-only too.
  assertError(t, first, 503, userId)
  const res = await faulty.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload })
  assertError(t, res, 503, userId)
  t.equal(res.headers['retry-after'], '5')
  const { rows } = await inspect(t, url).query('SELECT count(*)::int AS n FROM user_sync_data')
  t.equal(rows[0].n, 0, 'nothing stored')
})

t.test('14. a read-only database: downloads still answer 200 (a download only reads); the access time waits, with one warning', async (t) => {
  const url = await createTestDatabase(t)
  const logLines: string[] = []
  const readOnly = await build(t, { env: { DATABASE_URL: url, LOG_LEVEL: 'warn' }, logLines })
  const users = [randomUUID(), randomUUID(), randomUUID()]
  for (const [i, userId] of users.entries()) {
    t.equal((await readOnly.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: version(i + 1) })).statusCode, 200)
  }
  const db = inspect(t, url)
  // Untouched for two days: each of these downloads is its user's first of the day.
  await db.query("UPDATE user_sync_data SET last_accessed = now() - interval '2 days'")
  const name = nameOf(url)
  await admin(async (client) => {
    await client.query(`ALTER DATABASE ${name} SET default_transaction_read_only = on`)
    await client.query('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()', [name])
  })
  for (const [i, userId] of users.entries()) {
    const res = await readOnly.inject({ method: 'GET', url: `/api/sync/${userId}` })
    t.equal(res.statusCode, 200, `download ${i + 1}`)
    t.strictSame(res.json(), version(i + 1))
    await readOnly.storage.touched()
  }
  const warnings = logLines.filter((line) => line.includes('access time could not be recorded'))
  t.equal(warnings.length, 1, 'one warning for three failed access times')
  for (const userId of users) t.notOk(warnings[0]!.includes(userId), 'no user id in it')
  const { rows } = await db.query("SELECT count(*)::int AS n FROM user_sync_data WHERE last_accessed < now() - interval '1 day'")
  t.equal(rows[0].n, 3, 'no access time written')
})

t.test('14. a constraint the schemas let through is a server bug: 500, logged at error level', async (t) => {
  const url = await createTestDatabase(t)
  const logLines: string[] = []
  const faulty = await build(t, { env: { DATABASE_URL: url, LOG_LEVEL: 'warn' }, logLines })
  await inspect(t, url).query('ALTER TABLE user_sync_data ADD CONSTRAINT test_small CHECK (timestamp < 1000)')
  const userId = randomUUID()
  const res = await faulty.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: { ...payload, timestamp: 5000 } })
  assertError(t, res, 500, userId)
  t.strictSame(res.json(), { error: 'Internal Server Error', statusCode: 500 })
  const levels = logLines.map((line) => (JSON.parse(line) as { level: number }).level)
  t.ok(levels.includes(50), `an error-level line (levels logged: ${levels.join(', ') || 'none'})`)
})
