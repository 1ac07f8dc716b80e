import t from 'tap'
import { randomUUID } from 'node:crypto'
import { once } from 'node:events'
import net from 'node:net'
import { build, createTestDatabase, inspect } from '../helper.ts'
import { whileOverloaded } from '../overload.ts'
import { until } from '../wait.ts'
import { pseudonym, redactUrl } from '../../logging.ts'

type Test = Parameters<Parameters<typeof t.test>[0]>[0]

// What an operator relies on: how load shedding logs and when it starts, how a database that
// rolls a statement back is answered, and where metrics and API docs are served in production.
const databaseUrl = await createTestDatabase(t)
const db = inspect(t, databaseUrl)
const payload = { encryptedBlob: 'AAAA', iv: 'AAAAAAAAAAAAAAAA', timestamp: 1, checksum: 'a'.repeat(64) }

/** Holds the event loop in one piece, as a slow start-up does. */
function block (ms: number): void {
  const until = Date.now() + ms
  while (Date.now() < until) { /* busy */ }
}

t.test('start-up delay is not load: the first request after ready is served, later overload is shed', async (t) => {
  // The highest delay the shedder has reported, watched from before the slow start: its value
  // moves on every 250 ms, so on a loaded machine ready() can return after the sample that
  // measured the start-up delay has already been replaced.
  let measured = 0
  let watcher: NodeJS.Timeout | undefined
  t.teardown(() => clearInterval(watcher))
  const server = await build(t, {
    env: { DATABASE_URL: databaseUrl, MAX_EVENT_LOOP_DELAY_MS: '20' },
    // A slow start (compiling, loading WebAssembly) after the load shedder began sampling.
    afterApp: (server) => {
      watcher = setInterval(() => { measured = Math.max(measured, server.memoryUsage().eventLoopDelay) }, 5)
      return server.register(async () => { block(1500) })
    }
  })
  // As on a listening server, where the first request comes over the network: the shedder's
  // first sample after ready has measured the start-up delay before it arrives.
  await until(() => measured > 20, 'the load shedder has measured the start-up delay')
  const first = await server.inject({ method: 'GET', url: `/api/sync/${randomUUID()}` })
  t.equal(first.statusCode, 404, 'the first request is served, not shed')
  const later = await whileOverloaded(server, () => server.inject({ method: 'GET', url: `/api/sync/${randomUUID()}` }))
  t.equal(later.statusCode, 503, 'an overload after start-up is shed')
})

t.test('shed requests are logged at warn, without a stack, one line for many', async (t) => {
  const logLines: string[] = []
  const loaded = await build(t, { env: { DATABASE_URL: databaseUrl, MAX_EVENT_LOOP_DELAY_MS: '50', LOG_LEVEL: 'info' }, logLines })
  const statuses = await whileOverloaded(loaded, async () => {
    const answers = []
    for (let i = 0; i < 20; i++) answers.push((await loaded.inject({ method: 'GET', url: `/api/sync/${randomUUID()}` })).statusCode)
    return answers
  })
  t.strictSame(statuses, Array(20).fill(503), '20 requests shed')
  const entries = logLines.map((line) => JSON.parse(line) as { level: number, msg: string, err?: unknown, shed?: number })
  const shedLines = entries.filter((entry) => entry.msg === 'overloaded: shedding requests')
  // One line per 10 s at most: 20 shed requests take well under 20 s even on a loaded machine.
  t.ok(shedLines.length >= 1 && shedLines.length <= 2, `one or two lines for the 20 (${shedLines.length})`)
  t.equal(shedLines[0]?.level, 40, 'at warn')
  t.notOk(logLines.some((line) => line.includes('"stack"')), 'no stack anywhere')
  t.notOk(entries.some((entry) => entry.level >= 50), 'nothing at error level')
  t.notOk(entries.some((entry) => entry.msg === 'request completed'), 'no access line per shed request')
  const scrape = await whileOverloaded(loaded, async () => (await loaded.inject({ method: 'GET', url: '/metrics' })).statusCode)
  t.equal(scrape, 200, 'the metrics are served while requests are shed (they show the overload)')
  const metrics = await loaded.metrics.registry.metrics()
  t.match(metrics, /http_request_duration_seconds_count\{route="\/api\/sync\/:userId",method="GET",status="503"\} 20/,
    'but every one is counted')
  t.match(metrics, /load_shed_requests_total 20/, 'as shed, apart from the database\'s 503s')
  t.notMatch(metrics, /database_connection_errors_total\{kind="unavailable"\} [1-9]/, 'none of them counted against the database')
})

t.test('a shed request spends the client\'s per-IP budget', async (t) => {
  const limited = await build(t, { env: { DATABASE_URL: databaseUrl, MAX_EVENT_LOOP_DELAY_MS: '50', RATE_LIMIT_IP_MAX: '3', RATE_LIMIT_MAX: '0' } })
  const shed = await whileOverloaded(limited, async () => {
    const answers = []
    for (let i = 0; i < 3; i++) answers.push((await limited.inject({ method: 'GET', url: `/api/sync/${randomUUID()}` })).statusCode)
    return answers
  })
  t.strictSame(shed, [503, 503, 503], 'three requests shed')
  const after = await limited.inject({ method: 'GET', url: `/api/sync/${randomUUID()}` })
  t.equal(after.statusCode, 429, 'once the loop is calm, the fourth is over the limit of 3: the shed ones counted')
})

t.test('a statement PostgreSQL rolls back (serialization failure, deadlock) is tried once more, then 503', async (t) => {
  const logLines: string[] = []
  const server = await build(t, { env: { DATABASE_URL: databaseUrl, LOG_LEVEL: 'warn', RATE_LIMIT_MAX: '0' }, logLines })
  // A real 40001 from a real statement: a trigger that fails the next N writes. It counts
  // attempts with a sequence, since everything else a failing statement did is rolled back.
  await db.query('CREATE SEQUENCE test_attempt')
  await db.query("CREATE TABLE test_failures AS SELECT nextval('test_attempt') AS fail_until, '40001'::text AS code")
  await db.query(`CREATE FUNCTION test_fail_write () RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF nextval('test_attempt') <= (SELECT fail_until FROM test_failures) THEN
        RAISE EXCEPTION 'simulated failure' USING ERRCODE = (SELECT code FROM test_failures);
      END IF;
      RETURN NEW;
    END $$`)
  await db.query(`CREATE TRIGGER test_fail_write BEFORE INSERT OR UPDATE ON user_sync_data
    FOR EACH ROW EXECUTE FUNCTION test_fail_write()`)
  const failNext = (writes: number, code = '40001') =>
    db.query('UPDATE test_failures SET fail_until = (SELECT last_value FROM test_attempt) + $1, code = $2', [writes, code])
  t.teardown(async () => {
    await db.query('DROP TRIGGER IF EXISTS test_fail_write ON user_sync_data')
  })

  await failNext(1)
  const userId = randomUUID()
  const once = await server.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload })
  t.equal(once.statusCode, 200, 'one failure: the retry stores it')
  t.ok(logLines.some((line) => line.includes('statement rolled back by the database, retrying once')), 'and says so')

  const etag = once.headers.etag as string
  await failNext(1)
  const conditional = await server.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: { ...payload, timestamp: 2 }, headers: { 'if-match': etag } })
  t.equal(conditional.statusCode, 200, 'a conditional write is retried too: the rolled-back attempt wrote nothing')

  await failNext(2)
  const twice = await server.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: { ...payload, timestamp: 3 } })
  t.equal(twice.statusCode, 503, 'two failures: 503')
  t.equal(twice.headers['retry-after'], '5')
  t.strictSame(twice.json(), { error: 'The database is unavailable; please retry shortly', statusCode: 503 })
  const stored = await server.inject({ method: 'GET', url: `/api/sync/${userId}` })
  t.equal(stored.json().timestamp, 2, 'nothing of the refused upload is stored')

  await failNext(1, '40P01')
  const deadlock = await server.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: { ...payload, timestamp: 4 } })
  t.equal(deadlock.statusCode, 200, 'a deadlock victim is retried like a serialization failure')
  await failNext(1, '55000')
  const notReady = await server.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: { ...payload, timestamp: 5 } })
  t.equal(notReady.statusCode, 503, 'SQLSTATE 55000 (a database not in the state to serve): 503, not 500')
  t.equal(notReady.headers['retry-after'], '5')
})

t.test('production without METRICS_TOKEN: metrics only on their own loopback listener, no API docs', async (t) => {
  const server = await build(t, { env: { DATABASE_URL: databaseUrl, NODE_ENV: 'production', METRICS_PORT: '0' } })
  t.equal((await server.inject({ method: 'GET', url: '/metrics' })).statusCode, 404, 'not on the service port')
  t.equal((await server.inject({ method: 'GET', url: '/docs/json' })).statusCode, 404, 'no OpenAPI document')
  t.equal((await server.inject({ method: 'GET', url: '/docs' })).statusCode, 404, 'no Swagger UI')
  const listener = server.metricsListener
  t.ok(listener, 'a listener of their own')
  const address = listener!.server.address()
  if (address === null || typeof address === 'string') throw new Error('the metrics listener has no port')
  t.equal(address.address, '127.0.0.1', 'on loopback by default')
  const res = await fetch(`http://127.0.0.1:${address.port}/metrics`)
  t.equal(res.status, 200)
  t.match(await res.text(), /http_request_duration_seconds/)
})

t.test('production with METRICS_TOKEN and DOCS=true: metrics on the service port behind the token, docs served', async (t) => {
  const server = await build(t, { env: { DATABASE_URL: databaseUrl, NODE_ENV: 'production', METRICS_TOKEN: 'a-long-scrape-token', DOCS: 'true' } })
  t.equal(server.metricsListener, undefined, 'no second listener')
  t.equal((await server.inject({ method: 'GET', url: '/metrics' })).statusCode, 401)
  t.equal((await server.inject({ method: 'GET', url: '/metrics', headers: { authorization: 'Bearer a-long-scrape-token' } })).statusCode, 200)
  t.equal((await server.inject({ method: 'GET', url: '/docs/json' })).statusCode, 200)
})

t.test('a request that arrives while the service shuts down gets a 503 in the error shape, and the connection closes', async (t) => {
  const logLines: string[] = []
  const server = await build(t, { env: { DATABASE_URL: databaseUrl, RATE_LIMIT_MAX: '0', LOG_LEVEL: 'warn' }, logLines })
  const address = await server.listen({ port: 0, host: '127.0.0.1' })
  const userId = randomUUID()
  t.equal((await server.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload })).statusCode, 200)
  // An upload waits on a row lock the test holds, so the service is provably busy with it
  // (and its connection open) when the shutdown starts; a second request then comes on the
  // same keep-alive connection.
  const locker = await db.connect()
  await locker.query('BEGIN')
  await locker.query('SELECT 1 FROM user_sync_data WHERE user_id = $1 FOR UPDATE', [userId])
  const body = JSON.stringify({ ...payload, timestamp: 2 })
  const socket = net.connect(Number(new URL(address).port), '127.0.0.1')
  let received = ''
  socket.on('data', (chunk: Buffer) => { received += chunk.toString() })
  const closed = once(socket, 'close')
  socket.write(`PUT /api/sync/${userId} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`)
  const waiting = async () => (await db.query(
    "SELECT count(*)::int AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()")).rows[0].n as number
  for (let tries = 0; (await waiting()) === 0; tries++) {
    if (tries > 2000) throw new Error('the upload never waited on the lock')
    await new Promise((resolve) => setTimeout(resolve, 10))
  }
  const closing = server.close()
  // Fastify stops the listener after the preClose hooks, where the service marks itself closing.
  await until(() => !server.server.listening, 'the shutdown has begun')
  socket.write('GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n')
  // Answers go out in order, after the upload's; the service logs the refusal at once.
  await until(() => logLines.some((line) => line.includes('The service is shutting down')), 'the second request is refused')
  await locker.query('COMMIT')
  locker.release()
  await closed
  await closing
  const answers = received.split(/(?=HTTP\/1\.1 )/)
  t.equal(answers.length, 2, 'two answers on the connection')
  t.match(answers[0], /^HTTP\/1\.1 200 /, 'the upload in flight finishes')
  t.match(answers[1], /^HTTP\/1\.1 503 /, 'the request that came during the shutdown: 503')
  t.match(answers[1], /connection: close/i)
  t.match(answers[1], /cache-control: no-store/i)
  t.match(answers[1], /retry-after: 5/i)
  t.strictSame(JSON.parse(answers[1]!.split('\r\n\r\n')[1]!), { error: 'The service is shutting down; please retry shortly', statusCode: 503 })
  t.equal((await db.query('SELECT timestamp FROM user_sync_data WHERE user_id = $1', [userId])).rows[0].timestamp, '2', 'and the upload is stored')
})

/**
 * A listening service and raw connections to it, for what app.inject cannot show (sockets,
 * pipelining). `arrivals` lists each request the moment it reaches the service, before any of
 * the service's own hooks: a test can wait until the service has read a request.
 */
async function listening (t: Test, env: Record<string, string> = {}) {
  const logLines: string[] = []
  const arrivals: string[] = []
  const server = await build(t, {
    env: { DATABASE_URL: databaseUrl, RATE_LIMIT_MAX: '0', LOG_LEVEL: 'info', ...env },
    logLines,
    beforeApp: (server) => server.addHook('onRequest', async (request) => { arrivals.push(`${request.method} ${request.url}`) })
  })
  const port = Number(new URL(await server.listen({ port: 0, host: '127.0.0.1' })).port)
  const connect = () => {
    const socket = net.connect(port, '127.0.0.1')
    let received = ''
    socket.on('data', (chunk: Buffer) => { received += chunk.toString() })
    t.teardown(() => { socket.destroy() })
    return { socket, received: () => received, closed: once(socket, 'close') }
  }
  return { server, logLines, arrivals, connect }
}

const putRequest = (userId: string, body: string) =>
  `PUT /api/sync/${userId} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`

t.test('pipelined requests on one connection run in the order they were sent', async (t) => {
  const { server, arrivals, connect } = await listening(t)
  const userId = randomUUID()
  t.equal((await server.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload })).statusCode, 200)
  // The upload waits on a row lock the test holds; a read does not wait for row locks, so
  // without ordering the GET would run first and answer the old version.
  const locker = await db.connect()
  await locker.query('BEGIN')
  await locker.query('SELECT 1 FROM user_sync_data WHERE user_id = $1 FOR UPDATE', [userId])
  const connection = connect()
  connection.socket.write(putRequest(userId, JSON.stringify({ ...payload, timestamp: 2 })) +
    `GET /api/sync/${userId} HTTP/1.1\r\nHost: x\r\n\r\n` +
    `DELETE /api/sync/${userId} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  await until(() => arrivals.length === 4, 'the service has read all three requests')
  await locker.query('COMMIT')
  locker.release()
  await connection.closed
  const answers = connection.received().split(/(?=HTTP\/1\.1 )/)
  t.strictSame(answers.map((answer) => answer.split('\r\n')[0]), ['HTTP/1.1 200 OK', 'HTTP/1.1 200 OK', 'HTTP/1.1 200 OK'])
  t.equal(JSON.parse(answers[1]!.split('\r\n\r\n')[1]!).timestamp, 2, 'the GET sent after the PUT reads what the PUT stored')
  t.equal((await server.inject({ method: 'HEAD', url: `/api/sync/${userId}` })).statusCode, 404, 'and the DELETE sent last deleted it')
})

t.test('a client that hangs up mid-upload is not a database outage', async (t) => {
  const { server, logLines, arrivals, connect } = await listening(t)
  const userId = randomUUID()
  const connection = connect()
  connection.socket.write(`PUT /api/sync/${userId} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"encryptedBlob":"AAAA"`)
  await until(() => arrivals.length === 1, 'the service is reading the upload')
  connection.socket.destroy()
  await until(() => logLines.some((line) => line.includes('closed the connection before its request was complete')), 'the abort is logged')
  const metrics = await server.metrics.registry.metrics()
  t.notMatch(metrics, /database_connection_errors_total\{kind="unavailable"\} [1-9]/, 'not counted as the database being unavailable')
  t.notOk(logLines.some((line) => JSON.parse(line).level >= 40), 'nothing at warn or error')
  t.equal((await db.query('SELECT count(*)::int AS n FROM user_sync_data WHERE user_id = $1', [userId])).rows[0].n, 0, 'nothing stored')
})

t.test('bodies no upload can be are refused before they are parsed', async (t) => {
  const server = await build(t, { env: { DATABASE_URL: databaseUrl, RATE_LIMIT_MAX: '0' } })
  const userId = randomUUID()
  const nested = await server.inject({ method: 'PUT', url: `/api/sync/${userId}`, headers: { 'content-type': 'application/json' }, payload: `{"x":${'['.repeat(100_000)}${']'.repeat(100_000)}}` })
  t.equal(nested.statusCode, 400)
  t.match(nested.json(), { error: /nests more than 16 objects or arrays/, statusCode: 400 })
  const keys = Object.fromEntries(Array.from({ length: 1000 }, (_, i) => [`k${i}`, 1]))
  const many = await server.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: { ...payload, ...keys } })
  t.equal(many.statusCode, 400)
  t.match(many.json(), { error: /more than 64 keys/, statusCode: 400 })
  t.equal((await server.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload })).statusCode, 200, 'an upload is fine')
})

t.test('transfer codings other than chunked: 501; Content-Length: 00 is no body', async (t) => {
  const { connect } = await listening(t)
  const userId = randomUUID()
  const gzip = connect()
  gzip.socket.write(`PUT /api/sync/${userId} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n`)
  await gzip.closed
  t.match(gzip.received(), /^HTTP\/1\.1 501 /)
  t.match(gzip.received(), /"statusCode":501/)
  const zeros = connect()
  zeros.socket.write(`POST /api/sync/${userId}/verify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 00\r\nConnection: close\r\n\r\n`)
  await zeros.closed
  t.match(zeros.received(), /^HTTP\/1\.1 200 /)
  t.match(zeros.received(), /\{"exists":false\}/)
})

t.test('the production metrics listener answers errors in the one shape, never echoing the URL', async (t) => {
  const server = await build(t, { env: { DATABASE_URL: databaseUrl, NODE_ENV: 'production', METRICS_PORT: '0' } })
  const address = server.metricsListener!.server.address() as net.AddressInfo
  const userId = randomUUID()
  for (const path of [`/api/sync/${userId}`, '/%ZZ']) {
    const res = await fetch(`http://127.0.0.1:${address.port}${path}`)
    const body = await res.text()
    t.equal(res.headers.get('cache-control'), 'no-store', path)
    t.strictSame(Object.keys(JSON.parse(body)).sort(), ['error', 'statusCode'], path)
    t.notOk(body.includes(userId) || body.includes('%ZZ'), `${path}: the URL is not echoed`)
  }
})

t.test('logs hide anything that may be most of a user id, however it is written', async (t) => {
  const id = '4a7c2e91-b3d5-4f68-9e12-0c3b5d7f9a1e'
  const hex = id.replaceAll('-', '')
  for (const written of [id.replaceAll('-', '_'), id.replaceAll('-', '%2F'), hex.split('').join('%20'), id.slice(0, 13), id.replaceAll('-', '.')]) {
    const logged = redactUrl(`/api/sync/${written}/verify`)
    const digits = logged.replace(/[^0-9a-f]/gi, '')
    t.ok(!hex.includes(digits.slice(0, 8)) || digits.length < 8, `${written} -> ${logged}`)
    t.notMatch(logged, /b3d5|4f68|9e12/, `${written}: no piece of it`)
  }
  t.equal(redactUrl(`/api/sync/${id.toUpperCase()}`), `/api/sync/~${pseudonym(id)}`, 'a well-formed id becomes its pseudonym')
  t.equal(redactUrl('/docs/static/swagger-initializer.js'), '/docs/static/swagger-initializer.js', 'route names stay readable')
})
