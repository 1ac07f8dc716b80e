import t from 'tap'
import { randomUUID } from 'node:crypto'
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

t.test('with the database gone: fast 503s, liveness stays up, and it recovers on its own', async (t) => {
  const userId = randomUUID()
  t.equal((await app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload })).statusCode, 200)

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
    { method: 'DELETE', url: `/api/sync/${userId}` }
  ] as const) {
    const started = Date.now()
    const res = await app.inject(request)
    const ms = Date.now() - started
    t.equal(res.statusCode, 503, `${request.method} during the outage`)
    t.strictSame(res.json(), { error: 'The database is unavailable; please retry shortly', statusCode: 503 })
    t.equal(res.headers['retry-after'], '5')
    t.comment(`${request.method} answered 503 in ${ms} ms`)
  }

  await proxy.restore()
  t.equal((await app.inject({ method: 'GET', url: '/health' })).statusCode, 200, 'healthy again without a restart')
  const back = await app.inject({ method: 'GET', url: `/api/sync/${userId}` })
  t.equal(back.statusCode, 200, 'the data written before the outage is there')
  t.strictSame(back.json(), payload)
})

t.test('with every pooled connection busy: requests wait at most the connect timeout, then 503; /health stays ok', async (t) => {
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
  const bounded = await build(t, {
    env: { DATABASE_URL: databaseUrl, DATABASE_POOL_MAX: '2', DATABASE_MAX_WAITING: '5', DATABASE_CONNECT_TIMEOUT_MS: '1000', RATE_LIMIT_MAX: '0', RATE_LIMIT_IP_MAX: '0' }
  })
  const holders = await Promise.all([bounded.pg.pool.connect(), bounded.pg.pool.connect()])
  t.teardown(() => { for (const client of holders) client.release() })
  const results = await Promise.all(Array.from({ length: 30 }, async () => {
    const started = Date.now()
    const res = await bounded.inject({ method: 'GET', url: `/api/sync/${randomUUID()}` })
    return { status: res.statusCode, ms: Date.now() - started, retryAfter: res.headers['retry-after'] }
  }))
  const immediate = results.filter((r) => r.ms < 500)
  t.strictSame(results.map((r) => r.status), Array(30).fill(503), 'all 30 are 503 while the pool is held')
  t.equal(immediate.length, 25, `25 refused at once (in ${Math.max(...immediate.map((r) => r.ms))} ms at most), 5 waited the connect timeout`)
  t.ok(results.every((r) => r.retryAfter === '5'), 'each with Retry-After')
  t.comment(`pool saturated: ${immediate.length} of 30 answered 503 at once, the other ${30 - immediate.length} after ${Math.min(...results.filter((r) => r.ms >= 500).map((r) => r.ms))} ms`)
})
