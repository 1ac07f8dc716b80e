import t from 'tap'
import { randomUUID } from 'node:crypto'
import { build } from '../helper.ts'

const payload = { encryptedBlob: 'AAAA', iv: 'AAAAAAAAAAAAAAAA', timestamp: 1, checksum: 'a'.repeat(64) }

t.test('per user id: the request after the limit is a 429 with Retry-After and the limit headers', async (t) => {
  const app = await build(t, { env: { RATE_LIMIT_MAX: '5', RATE_LIMIT_IP_MAX: '0', RATE_LIMIT_WINDOW: '1h' } })
  const userId = randomUUID()
  for (let i = 1; i <= 5; i++) {
    const res = await app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload })
    t.equal(res.statusCode, 200, `request ${i}`)
    t.equal(res.headers['x-ratelimit-limit'], '5')
    t.equal(res.headers['x-ratelimit-remaining'], String(5 - i))
  }
  const limited = await app.inject({ method: 'GET', url: `/api/sync/${userId}` })
  t.equal(limited.statusCode, 429)
  t.match(limited.json(), { error: /Too many requests: the limit is 5 per hour; retry in \d+ s/, statusCode: 429 })
  t.ok(Number(limited.headers['retry-after']) > 0, `Retry-After: ${limited.headers['retry-after']}`)
  t.equal(limited.headers['cache-control'], 'no-store')
  t.notOk(limited.body.includes(userId), 'the error does not name the user')

  const other = await app.inject({ method: 'GET', url: `/api/sync/${randomUUID()}` })
  t.equal(other.statusCode, 404, 'another user has a budget of their own')
  const sameUserUpperCase = await app.inject({ method: 'GET', url: `/api/sync/${userId.toUpperCase()}` })
  t.equal(sameUserUpperCase.statusCode, 429, 'upper case is the same user')

  for (const url of ['/health', '/health/live', '/info', '/metrics', '/docs/json']) {
    t.equal((await app.inject({ method: 'GET', url })).statusCode, 200, `${url} is not limited`)
  }
  const rejected = await app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload })
  t.equal(rejected.statusCode, 429)
  const metrics = (await app.inject({ method: 'GET', url: '/metrics' })).body
  t.match(metrics, /rejected_uploads_total\{status="429"\} 1/, 'the rejected upload is counted')
})

t.test('per client IP, across users', async (t) => {
  const app = await build(t, { env: { RATE_LIMIT_MAX: '0', RATE_LIMIT_IP_MAX: '3', RATE_LIMIT_WINDOW: '1m' } })
  const statuses = []
  for (let i = 0; i < 4; i++) statuses.push((await app.inject({ method: 'GET', url: `/api/sync/${randomUUID()}` })).statusCode)
  t.strictSame(statuses, [404, 404, 404, 429])
  const elsewhere = await app.inject({ method: 'GET', url: `/api/sync/${randomUUID()}`, remoteAddress: '203.0.113.9' })
  t.equal(elsewhere.statusCode, 404, 'another address has its own budget')
  t.match((await app.inject({ method: 'GET', url: `/api/sync/${randomUUID()}` })).json().error, /per minute/)
})

t.test('TRUST_PROXY: X-Forwarded-For counts only from the listed proxies', async (t) => {
  const app = await build(t, { env: { RATE_LIMIT_MAX: '0', RATE_LIMIT_IP_MAX: '1', TRUST_PROXY: '10.0.0.0/8' } })
  const viaProxy = (client: string) => app.inject({
    method: 'GET', url: `/api/sync/${randomUUID()}`, remoteAddress: '10.1.2.3', headers: { 'x-forwarded-for': client }
  })
  t.equal((await viaProxy('198.51.100.1')).statusCode, 404)
  t.equal((await viaProxy('198.51.100.2')).statusCode, 404, 'two clients behind one proxy are two clients')
  t.equal((await viaProxy('198.51.100.1')).statusCode, 429)
  const spoofed = (client: string) => app.inject({
    method: 'GET', url: `/api/sync/${randomUUID()}`, remoteAddress: '192.0.2.50', headers: { 'x-forwarded-for': client }
  })
  t.equal((await spoofed('198.51.100.7')).statusCode, 404)
  t.equal((await spoofed('198.51.100.8')).statusCode, 429, 'a client not behind a trusted proxy cannot pick its address')
})

t.test('0 disables both limits', async (t) => {
  const app = await build(t, { env: { RATE_LIMIT_MAX: '0', RATE_LIMIT_IP_MAX: '0' } })
  const userId = randomUUID()
  for (let i = 0; i < 150; i++) {
    const res = await app.inject({ method: 'POST', url: `/api/sync/${userId}/verify` })
    if (res.statusCode !== 200) t.fail(`request ${i}: ${res.statusCode}`)
  }
  t.pass('150 requests, no limit')
})
