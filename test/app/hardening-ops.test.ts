import t from 'tap'
import { randomUUID } from 'node:crypto'
import { once } from 'node:events'
import net from 'node:net'
import Fastify from 'fastify'
import app, { serverOptions } from '../../app.ts'
import { build, createTestDatabase, inspect, testConfig } from '../helper.ts'
import { until, whileOverloaded } from '../overload.ts'

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
  const config = testConfig({ DATABASE_URL: databaseUrl, MAX_EVENT_LOOP_DELAY_MS: '50' })
  const server = Fastify(serverOptions(config))
  t.teardown(() => server.close())
  await server.register(app, { config })
  // A slow start (compiling, loading WebAssembly) after the load shedder began sampling.
  await server.register(async () => { block(600) })
  await server.ready()
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
  t.equal(shedLines.length, 1, 'one line for the 20')
  t.equal(shedLines[0]?.level, 40, 'at warn')
  t.notOk(logLines.some((line) => line.includes('"stack"')), 'no stack anywhere')
  t.notOk(entries.some((entry) => entry.level >= 50), 'nothing at error level')
  t.notOk(entries.some((entry) => entry.msg === 'request completed'), 'no access line per shed request')
  const metrics = await loaded.metrics.registry.metrics()
  t.match(metrics, /http_request_duration_seconds_count\{route="\/api\/sync\/:userId",method="GET",status="503"\} 20/,
    'but every one is counted')
})

t.test('a statement PostgreSQL rolls back (serialization failure, deadlock) is tried once more, then 503', async (t) => {
  const logLines: string[] = []
  const server = await build(t, { env: { DATABASE_URL: databaseUrl, LOG_LEVEL: 'warn', RATE_LIMIT_MAX: '0' }, logLines })
  // A real 40001 from a real statement: a trigger that fails the next N writes. It counts
  // attempts with a sequence, since everything else a failing statement did is rolled back.
  await db.query('CREATE SEQUENCE test_attempt')
  await db.query("CREATE TABLE test_failures AS SELECT nextval('test_attempt') AS fail_until")
  await db.query(`CREATE FUNCTION test_fail_write () RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF nextval('test_attempt') <= (SELECT fail_until FROM test_failures) THEN
        RAISE EXCEPTION 'simulated conflict' USING ERRCODE = '40001';
      END IF;
      RETURN NEW;
    END $$`)
  await db.query(`CREATE TRIGGER test_fail_write BEFORE INSERT OR UPDATE ON user_sync_data
    FOR EACH ROW EXECUTE FUNCTION test_fail_write()`)
  const failNext = (writes: number) =>
    db.query('UPDATE test_failures SET fail_until = (SELECT last_value FROM test_attempt) + $1', [writes])
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
  await new Promise((resolve) => setImmediate(resolve))
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
