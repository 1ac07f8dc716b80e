import t from 'tap'
import { randomUUID } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import { build, createTestDatabase } from '../helper.ts'
import { startProxy, targetOf, throughProxy } from '../proxy.ts'

const databaseUrl = await createTestDatabase(t)
const proxy = await startProxy(targetOf(databaseUrl))
t.teardown(() => proxy.close())
const app = await build(t, {
  env: { DATABASE_URL: throughProxy(databaseUrl, proxy), DATABASE_CONNECT_TIMEOUT_MS: '1000', HEALTH_TIMEOUT_MS: '1000' }
})

const payload = {
  encryptedBlob: Buffer.from('ciphertext').toString('base64'),
  iv: 'AAAAAAAAAAAAAAAA',
  timestamp: 1,
  checksum: 'a'.repeat(64)
}

t.test('with the database up: /health is ok, /health/live is ok', async (t) => {
  const health = await app.inject({ method: 'GET', url: '/health' })
  t.equal(health.statusCode, 200)
  t.equal(health.body, '{"status":"ok","database":"ok","databaseKind":"postgresql"}')
  const live = await app.inject({ method: 'GET', url: '/health/live' })
  t.equal(live.statusCode, 200)
  t.strictSame(live.json(), { status: 'ok' })
})

t.test('with the database gone: 503s with Retry-After, liveness stays up, and it recovers on its own', async (t) => {
  const userId = randomUUID()
  const written = await app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload })
  t.equal(written.statusCode, 200)
  const etag = written.headers.etag as string

  await proxy.cut()
  const health = await app.inject({ method: 'GET', url: '/health' })
  t.equal(health.statusCode, 503)
  t.strictSame(health.json(), {
    status: 'error', database: 'unavailable', databaseKind: 'postgresql', error: 'The database is unavailable', statusCode: 503
  }, 'the body says unavailable, never why (PostgreSQL names hosts, users, databases)')
  t.equal(health.headers['cache-control'], 'no-store')
  t.equal(health.headers['retry-after'], '5')
  t.equal((await app.inject({ method: 'GET', url: '/health/live' })).statusCode, 200, 'liveness needs no database')

  for (const request of [
    { method: 'GET', url: `/api/sync/${userId}` },
    { method: 'PUT', url: `/api/sync/${userId}`, payload },
    { method: 'POST', url: `/api/sync/${userId}/verify` },
    { method: 'DELETE', url: `/api/sync/${userId}` },
    // Conditional writes too (docs/reliability.md): a 503, never a 412 that would tell the client
    // its version is stale, nor a 200.
    { method: 'PUT', url: `/api/sync/${userId}`, payload: { ...payload, timestamp: 2 }, headers: { 'if-match': etag } },
    { method: 'PUT', url: `/api/sync/${userId}`, payload: { ...payload, timestamp: 2 }, headers: { 'if-match': '"1-0"' } },
    { method: 'PUT', url: `/api/sync/${randomUUID()}`, payload, headers: { 'if-none-match': '*' } },
    { method: 'DELETE', url: `/api/sync/${userId}`, headers: { 'if-match': etag } },
    { method: 'DELETE', url: `/api/sync/${userId}`, headers: { 'if-match': '*' } }
  ] as const) {
    const name = `${request.method}${'headers' in request ? ` ${JSON.stringify(request.headers)}` : ''}`
    const started = Date.now()
    const res = await app.inject(request)
    const ms = Date.now() - started
    t.equal(res.statusCode, 503, `${name} during the outage`)
    t.strictSame(res.json(), { error: 'The database is unavailable; please retry shortly', statusCode: 503 })
    t.equal(res.headers['retry-after'], '5')
    t.comment(`${name} answered 503 in ${ms} ms`)
  }

  await proxy.restore()
  t.equal((await app.inject({ method: 'GET', url: '/health' })).statusCode, 200, 'healthy again without a restart')
  const back = await app.inject({ method: 'GET', url: `/api/sync/${userId}` })
  t.equal(back.statusCode, 200, 'the data written before the outage is there')
  t.strictSame(back.json(), payload)
  t.equal(back.headers.etag, etag, 'untouched by the writes refused during the outage')
})

t.test('a health connection the network silently dropped is given up: /health recovers by itself', async (t) => {
  t.equal((await app.inject({ method: 'GET', url: '/health' })).statusCode, 200, 'its connection is open')
  proxy.blackhole()
  t.equal((await app.inject({ method: 'GET', url: '/health' })).statusCode, 503, 'no answer within HEALTH_TIMEOUT_MS')
  // A new connection works: the next checks must not keep waiting on the lost one.
  let status = 0
  for (const deadline = Date.now() + 20_000; Date.now() < deadline && status !== 200;) {
    status = (await app.inject({ method: 'GET', url: '/health' })).statusCode
    if (status !== 200) await new Promise((resolve) => setTimeout(resolve, 100))
  }
  t.equal(status, 200, 'healthy again on a new connection')
})

t.test('with every pooled connection busy: a request waits for the connect timeout, then 503; /health stays ok', async (t) => {
  const holders = await Promise.all(Array.from({ length: app.config.DATABASE_POOL_MAX }, () => app.pg.pool.connect()))
  t.teardown(() => { for (const client of holders) client.release() })
  const started = Date.now()
  const res = await app.inject({ method: 'GET', url: `/api/sync/${randomUUID()}` })
  const ms = Date.now() - started
  t.equal(res.statusCode, 503)
  t.ok(res.json().error.includes('unavailable'))
  t.comment(`pool exhausted: 503 after ${ms} ms (connect timeout ${app.config.DATABASE_CONNECT_TIMEOUT_MS} ms)`)
  const health = await app.inject({ method: 'GET', url: '/health' })
  t.equal(health.statusCode, 200, '/health checks on a connection of its own: a busy pool is not an outage')
})

t.test('many more requests than connections: past DATABASE_MAX_WAITING a request gets a 503 at once', async (t) => {
  // The connect timeout is long here, so that the requests let in provably wait for a connection.
  const bounded = await build(t, {
    env: { DATABASE_URL: databaseUrl, DATABASE_POOL_MAX: '2', DATABASE_MAX_WAITING: '5', DATABASE_CONNECT_TIMEOUT_MS: '60000', RATE_LIMIT_MAX: '0', RATE_LIMIT_IP_MAX: '0' }
  })
  const holders = await Promise.all([bounded.pg.pool.connect(), bounded.pg.pool.connect()])
  let released = false
  const release = () => { if (!released) for (const client of holders) client.release(); released = true }
  t.teardown(release)
  const answered: Array<{ status: number, retryAfter: unknown }> = []
  const requests = Array.from({ length: 30 }, async () => {
    const res = await bounded.inject({ method: 'GET', url: `/api/sync/${randomUUID()}` })
    answered.push({ status: res.statusCode, retryAfter: res.headers['retry-after'] })
  })
  for (const deadline = Date.now() + 10_000; answered.length < 25 && Date.now() < deadline;) await sleep(10)
  // Nothing else can answer the rest: the pool is held and the connect timeout is a minute away.
  const waiting = bounded.pg.pool.waitingCount
  t.equal(answered.length, 25, '25 answered while the pool is held')
  t.strictSame(answered.map((r) => r.status), Array(25).fill(503), 'each a 503')
  t.ok(answered.every((r) => r.retryAfter === '5'), 'each with Retry-After: 5')
  t.equal(waiting, 5, 'the other 5 wait for a connection: the queue, and the memory it holds, is bounded')
  release()
  await Promise.all(requests)
  t.strictSame(answered.slice(25).map((r) => r.status), Array(5).fill(404), 'once the pool is free, the 5 that waited are served (an unknown user: 404)')
})
