import t from 'tap'
import { randomUUID } from 'node:crypto'
import { eventually } from '../wait.ts'
import { build, createTestDatabase } from '../helper.ts'
import { whileOverloaded } from '../overload.ts'
import { startProxy, targetOf, throughProxy } from '../proxy.ts'

// A slow, stalled or resetting network between the service and PostgreSQL.
const databaseUrl = await createTestDatabase(t)
const proxy = await startProxy(targetOf(databaseUrl))
t.teardown(() => proxy.close())
const env = {
  DATABASE_URL: throughProxy(databaseUrl, proxy),
  DATABASE_CONNECT_TIMEOUT_MS: '1000',
  DATABASE_STATEMENT_TIMEOUT_MS: '1000',
  RATE_LIMIT_MAX: '0',
  RATE_LIMIT_IP_MAX: '0'
}
const app = await build(t, { env })
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

/** Opens `count` connections of the service's pool (idle afterwards), so that the next requests need no new one. */
async function warm (service: typeof app, count: number): Promise<boolean> {
  const clients = await Promise.all(Array.from({ length: count }, () => service.pg.pool.connect()))
  for (const client of clients) client.release()
  return service.pg.pool.idleCount >= count
}

t.test('latency: 100 ms each way makes requests slower, not failed', async (t) => {
  proxy.setLatency(100)
  t.teardown(() => proxy.setLatency(0))
  const results = await Promise.all(Array.from({ length: 8 }, () => timed(get)))
  t.strictSame(results.map((r) => r.statusCode), Array(8).fill(200))
  t.comment(`latency 100 ms each way: 8 concurrent downloads in ${results.map((r) => r.ms).join(', ')} ms`)
})

t.test('a stalled network: requests give up with a 503 (query timeout), then it recovers', async (t) => {
  t.ok(await warm(app, 4), 'connections are open before the stall')
  proxy.stall()
  const during = await Promise.all(Array.from({ length: 4 }, () => timed(get)))
  proxy.resume()
  t.strictSame(during.map((r) => r.statusCode), [503, 503, 503, 503], 'every stalled request is a 503')
  t.comment(`stall: ${during.length} requests answered 503 after ${during.map((r) => r.ms).join(', ')} ms ` +
    '(statement timeout 1000 ms, query timeout 2000 ms)')
  const after = await Promise.all(Array.from({ length: 8 }, () => timed(get)))
  t.strictSame(after.map((r) => r.statusCode), Array(8).fill(200), 'every request after the stall succeeds')
})

t.test('connections reset under requests in flight', async (t) => {
  // A pool as large as the requests: no idle connection, reset too, is left for a retry to pick.
  const logLines: string[] = []
  const service = await build(t, { logLines, env: { ...env, DATABASE_POOL_MAX: '4', LOG_LEVEL: 'warn' } })
  const { pool } = service.pg
  const download = () => service.inject({ method: 'GET', url: `/api/sync/${userId}` })

  // The proxy holds every byte, so each request is provably on its connection, its query sent
  // and unanswered, when the reset comes; the proxy forwards again before the clients notice.
  async function resetInFlight (requests: Array<() => Promise<{ statusCode: number }>>) {
    await warm(service, pool.options.max)
    const idle = pool.idleCount
    const total = pool.totalCount
    const from = logLines.length
    proxy.stall()
    const answers = requests.map((request) => timed(request))
    const inFlight = await eventually(() => pool.idleCount === idle - requests.length && pool.totalCount === total && pool.waitingCount === 0, 30_000)
    proxy.reset()
    proxy.resume()
    const results = await Promise.all(answers)
    const retried = logLines.slice(from).map((line) => JSON.parse(line) as { msg: string, statement?: string })
      .filter((line) => line.msg === 'database connection lost mid-query, retrying once')
    return { inFlight, results, retried }
  }

  await t.test('idempotent requests are retried once on a fresh connection: every one 200', async (t) => {
    const { inFlight, results, retried } = await resetInFlight(Array.from({ length: 4 }, () => download))
    t.ok(inFlight, 'all 4 downloads were on their connections, waiting for an answer, when the reset came')
    t.strictSame(results.map((r) => r.statusCode), [200, 200, 200, 200], 'each in-flight download answered 200')
    t.strictSame(retried.map((line) => line.statement), ['sync-get', 'sync-get', 'sync-get', 'sync-get'], 'each after one retry')
    t.comment(`reset: in-flight downloads answered ${results.map((r) => `${r.statusCode} in ${r.ms} ms`).join(', ')}`)
  })

  await t.test('a conditional write is not retried: 503, and it never reached the database', async (t) => {
    const other = randomUUID()
    const etag = (await service.inject({ method: 'PUT', url: `/api/sync/${other}`, payload })).headers.etag as string
    const { inFlight, results, retried } = await resetInFlight([() => service.inject({
      method: 'PUT', url: `/api/sync/${other}`, payload: { ...payload, timestamp: 2 }, headers: { 'if-match': etag }
    })])
    t.ok(inFlight, 'the write was on its connection, waiting for an answer, when the reset came')
    t.strictSame(results.map((r) => r.statusCode), [503])
    t.strictSame(retried, [], 'no retry')
    // The pool's idle connections were reset too; it drops them as their errors arrive.
    t.ok(await eventually(() => pool.idleCount === 0, 10_000), 'the reset idle connections are discarded')
    const stored = await service.inject({ method: 'GET', url: `/api/sync/${other}` })
    t.equal(stored.headers.etag, etag, 'the record is unchanged')
  })

  const after = await Promise.all(Array.from({ length: 8 }, () => timed(download)))
  t.strictSame(after.map((r) => r.statusCode), Array(8).fill(200), 'all 8 requests after the resets succeed')
})

t.test('an overloaded event loop: fast 503s with Retry-After, liveness still answers', async (t) => {
  const loaded = await build(t, { env: { DATABASE_URL: databaseUrl, MAX_EVENT_LOOP_DELAY_MS: '50' } })
  // The loop stays saturated from before the first request until the last is answered.
  const [res, live] = await whileOverloaded(loaded, async () => [
    await loaded.inject({ method: 'GET', url: `/api/sync/${userId}` }),
    await loaded.inject({ method: 'GET', url: '/health/live' })
  ])
  t.equal(res!.statusCode, 503)
  t.strictSame(res!.json(), { error: 'The service is overloaded; please retry shortly', statusCode: 503 })
  t.equal(res!.headers['retry-after'], '5')
  t.equal(live!.statusCode, 200, 'liveness still answers')
  // whileOverloaded returns once the shedder sees a calm loop.
  t.equal((await loaded.inject({ method: 'GET', url: `/api/sync/${userId}` })).statusCode, 200, 'and it serves again once the loop catches up')
})
