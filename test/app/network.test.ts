import t from 'tap'
import { randomUUID } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import { build, createTestDatabase } from '../helper.ts'
import { startProxy, targetOf, throughProxy } from '../proxy.ts'

// A slow, stalled or resetting network between the service and PostgreSQL.
const databaseUrl = await createTestDatabase(t)
const proxy = await startProxy(targetOf(databaseUrl))
t.teardown(() => proxy.close())
const app = await build(t, {
  env: {
    DATABASE_URL: throughProxy(databaseUrl, proxy),
    DATABASE_CONNECT_TIMEOUT_MS: '1000',
    DATABASE_STATEMENT_TIMEOUT_MS: '1000',
    RATE_LIMIT_MAX: '0',
    RATE_LIMIT_IP_MAX: '0'
  }
})
const userId = randomUUID()
const payload = { encryptedBlob: 'AAAA', iv: 'AAAAAAAAAAAAAAAA', timestamp: 1, checksum: 'a'.repeat(64) }
t.before(async () => {
  const res = await app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload })
  if (res.statusCode !== 200) throw new Error(`setup failed: ${res.statusCode}`)
})

async function timed (request: () => Promise<{ statusCode: number }>) {
  const started = Date.now()
  const { statusCode } = await request()
  return { statusCode, ms: Date.now() - started }
}
const get = () => app.inject({ method: 'GET', url: `/api/sync/${userId}` })

t.test('latency: 100 ms each way makes requests slower, not failed', async (t) => {
  proxy.setLatency(100)
  t.teardown(() => proxy.setLatency(0))
  const results = await Promise.all(Array.from({ length: 8 }, () => timed(get)))
  t.strictSame(results.map((r) => r.statusCode), Array(8).fill(200))
  const slowest = Math.max(...results.map((r) => r.ms))
  t.ok(slowest >= 200, `slowest ${slowest} ms (at least one round trip of 200 ms)`)
  t.comment(`latency 100 ms each way: 8 concurrent downloads, slowest ${slowest} ms`)
})

t.test('a stalled network: requests give up within the query timeout (503), then it recovers', async (t) => {
  await Promise.all(Array.from({ length: 4 }, get)) // connections are open before the stall
  proxy.stall()
  const during = await Promise.all(Array.from({ length: 4 }, () => timed(get)))
  proxy.resume()
  for (const { statusCode, ms } of during) {
    t.equal(statusCode, 503, 'a stalled request is a 503')
    t.ok(ms < 5000, `answered in ${ms} ms (query timeout 2000 ms, connect timeout 1000 ms)`)
  }
  t.comment(`stall: ${during.length} requests answered 503 after ${during.map((r) => r.ms).join(', ')} ms`)
  await sleep(100)
  const after = await Promise.all(Array.from({ length: 8 }, () => timed(get)))
  t.strictSame(after.map((r) => r.statusCode), Array(8).fill(200), 'every request after the stall succeeds')
})

t.test('connections reset mid-stream: requests fail cleanly or are retried, the next succeed', async (t) => {
  const inflight = Array.from({ length: 8 }, () => timed(get))
  await sleep(2)
  proxy.reset()
  const results = await Promise.all(inflight)
  for (const { statusCode } of results) t.ok(statusCode === 200 || statusCode === 503, `answered ${statusCode}`)
  const after = await Promise.all(Array.from({ length: 8 }, () => timed(get)))
  t.strictSame(after.map((r) => r.statusCode), Array(8).fill(200))
  t.comment(`reset: in-flight answered ${results.map((r) => r.statusCode).join(', ')}; all 8 after it 200`)
})

t.test('an overloaded event loop: fast 503s with Retry-After, liveness still answers', async (t) => {
  const loaded = await build(t, { env: { DATABASE_URL: databaseUrl, MAX_EVENT_LOOP_DELAY_MS: '50' } })
  // Start-up's own delay is not counted: shedding starts a few samples after the app is ready.
  await loaded.loadSheddingArmed
  // Block the event loop for a while, as a CPU-bound burst would; the sampler, overdue, runs
  // first when it is free and records the delay until its next sample.
  const until = Date.now() + 400
  while (Date.now() < until) { /* busy */ }
  await sleep(20)
  const res = await loaded.inject({ method: 'GET', url: `/api/sync/${userId}` })
  t.equal(res.statusCode, 503)
  t.strictSame(res.json(), { error: 'The service is overloaded; please retry shortly', statusCode: 503 })
  t.ok(res.headers['retry-after'])
  t.equal((await loaded.inject({ method: 'GET', url: '/health/live' })).statusCode, 200)
  await sleep(600)
  t.equal((await loaded.inject({ method: 'GET', url: `/api/sync/${userId}` })).statusCode, 200, 'and serves again when the loop catches up')
})
