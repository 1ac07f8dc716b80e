import t from 'tap'
import { randomUUID } from 'node:crypto'
import type { AddressInfo } from 'node:net'
import type { FastifyInstance } from 'fastify'
import { Redis } from 'ioredis'
import { pseudonym } from '../../logging.ts'
import { build, createTestDatabase } from '../helper.ts'
import { startRedis } from '../redis-server.ts'
import { until } from '../wait.ts'

// Rate limits shared by three instances through a private Redis (REDIS_URL), in the default
// configuration otherwise: one budget for all of them; Redis gone or stuck, requests are served
// uncounted with one warning per instance; Redis back, counting resumes.

const MAX = 10
const redis = await startRedis(t)
const databaseUrl = await createTestDatabase(t)
const logs: string[][] = [[], [], []]
const apps: FastifyInstance[] = []
const urls: string[] = []
for (const lines of logs) {
  // A generous REDIS_TIMEOUT_MS: a loaded machine's pause must not pass for an outage here (a
  // killed Redis fails the counts at once, whatever the timeout; the stuck one has a test below).
  const app = await build(t, {
    env: { DATABASE_URL: databaseUrl, REDIS_URL: redis.url, REDIS_TIMEOUT_MS: '5000', RATE_LIMIT_MAX: String(MAX), LOG_LEVEL: 'warn' },
    logLines: lines
  })
  await app.listen({ host: '127.0.0.1', port: 0 })
  apps.push(app)
  urls.push(`http://127.0.0.1:${(app.server.address() as AddressInfo).port}`)
}

/** A download on instance `i % 3`: its status and remaining budget (null when uncounted). */
async function download (i: number, userId: string) {
  const res = await fetch(`${urls[i % 3]}/api/sync/${userId}`)
  await res.arrayBuffer()
  const remaining = res.headers.get('x-ratelimit-remaining')
  return { status: res.status, remaining: remaining === null ? null : Number(remaining), retryAfter: res.headers.get('retry-after') }
}
const warnings = (lines: string[], text: string) => lines.filter((line) => line.includes(text)).length
const metric = async (app: FastifyInstance, name: string) =>
  (await app.metrics.registry.getSingleMetric(name)!.get()).values[0]?.value

t.test('a client rotating over three instances gets exactly RATE_LIMIT_MAX requests in all, then 429 on every instance', async (t) => {
  const userId = randomUUID()
  const answers = []
  for (let i = 0; i < MAX + 3; i++) answers.push(await download(i, userId))
  t.strictSame(answers.slice(0, MAX).map((answer) => answer.status), Array(MAX).fill(404), 'the first 10 are served (no record yet)')
  t.strictSame(answers.slice(0, MAX).map((answer) => answer.remaining), Array.from({ length: MAX }, (_, i) => MAX - 1 - i),
    'one budget counted down across the instances')
  t.strictSame(answers.slice(MAX).map((answer) => answer.status), [429, 429, 429], 'then 429, from each instance')
  t.ok(Number(answers[MAX]!.retryAfter) > 0, 'with Retry-After')
})

t.test('one round trip to Redis per sync request (both limits in one script); a request refused before the per-user count gets it back', async (t) => {
  const client = new Redis(redis.url)
  t.teardown(() => client.disconnect())
  // Scripts Redis ran (ioredis sends a defined command as EVALSHA, once as EVAL).
  const scripts = async () => {
    const stats = await client.info('commandstats')
    return [...stats.matchAll(/^cmdstat_(?:evalsha|eval):calls=(\d+)/gm)].reduce((sum, match) => sum + Number(match[1]), 0)
  }
  const userId = randomUUID()
  const before = await scripts()
  for (let i = 0; i < 6; i++) t.equal((await download(i, userId)).status, 404)
  t.equal(await scripts() - before, 6, 'six requests, six scripts: the per-user count went with the per-IP one')

  // Refused for its compressed body (415, by an onRequest hook ahead of the sync routes' own): the
  // per-user count made with the per-IP one is given back, so MAX of them leave the budget whole.
  const other = randomUUID()
  const refusedFrom = await scripts()
  for (let i = 0; i < MAX; i++) {
    const res = await fetch(`${urls[i % 3]}/api/sync/${other}`, { method: 'PUT', headers: { 'content-type': 'application/json', 'content-encoding': 'gzip' }, body: 'x' })
    await res.arrayBuffer()
    t.equal(res.status, 415)
  }
  await until(async () => await scripts() - refusedFrom === 2 * MAX, 'a count and a give-back for each refused request')
  t.equal(await client.exists(`logikids-sync:rate-limit:user:${pseudonym(other)}:-`), 0, 'a counter given back to zero is removed, not kept for its window')
  t.strictSame(await download(0, other), { status: 404, remaining: MAX - 1, retryAfter: null }, 'the user\'s budget is whole')
})

t.test('a request over its address budget counts no user: nothing to give back, no counter left behind', async (t) => {
  const own = await startRedis(t)
  const app = await build(t, { env: { DATABASE_URL: databaseUrl, REDIS_URL: own.url, REDIS_TIMEOUT_MS: '5000', RATE_LIMIT_IP_MAX: '2', LOG_LEVEL: 'warn' } })
  const client = new Redis(own.url)
  t.teardown(() => client.disconnect())
  const statuses = []
  for (let i = 0; i < 6; i++) statuses.push((await app.inject({ method: 'GET', url: `/api/sync/${randomUUID()}` })).statusCode)
  t.strictSame(statuses, [404, 404, 429, 429, 429, 429])
  t.equal((await client.keys('logikids-sync:rate-limit:user:*')).length, 2, 'user counters for the two served requests only')
  const stats = await client.info('commandstats')
  t.equal([...stats.matchAll(/^cmdstat_(?:evalsha|eval):calls=(\d+)/gm)].reduce((sum, match) => sum + Number(match[1]), 0), 6,
    'one script per request, no give-back')
})

t.test('Redis killed: requests are served uncounted, one warning per instance; restarted, the limits apply again', async (t) => {
  const limited = randomUUID()
  for (let i = 0; i < MAX + 1; i++) await download(i, limited)
  t.equal((await download(0, limited)).status, 429, 'over the limit before the outage')
  await redis.kill()
  const during = []
  for (let i = 0; i < 9; i++) during.push(await download(i, limited))
  t.strictSame(during.map((answer) => [answer.status, answer.remaining]), Array(9).fill([404, null]), 'served, uncounted (fail open)')
  for (const [i, lines] of logs.entries()) {
    t.equal(warnings(lines, 'Redis does not answer'), 1, `instance ${i + 1}: one warning for the outage`)
    t.equal(await metric(apps[i]!, 'rate_limit_store_up'), 0)
    t.ok(Number(await metric(apps[i]!, 'rate_limit_store_errors_total')) >= 3, 'each uncounted request counted as an error')
  }
  for (const lines of logs) t.notOk(lines.some((line) => line.includes(limited)), 'no user id in the logs')

  await redis.start()
  // The clients reconnect by themselves (backoff up to 1 s).
  const fresh = randomUUID()
  await until(async () => (await download(0, randomUUID())).remaining !== null, 'instance 1 counts again')
  await until(async () => (await download(1, randomUUID())).remaining !== null, 'instance 2 counts again')
  await until(async () => (await download(2, randomUUID())).remaining !== null, 'instance 3 counts again')
  const after = []
  for (let i = 0; i < MAX + 1; i++) after.push((await download(i, fresh)).status)
  t.strictSame(after, [...Array(MAX).fill(404), 429], 'one shared budget again')
  for (const [i, lines] of logs.entries()) {
    t.equal(warnings(lines, 'Redis does not answer'), 1, `instance ${i + 1}: still one warning`)
    t.equal(await metric(apps[i]!, 'rate_limit_store_up'), 1)
  }
})

t.test('a Redis that stops answering (SIGSTOP): requests are served after REDIS_TIMEOUT_MS (the default 100 ms), uncounted', async (t) => {
  const quick = await build(t, { env: { DATABASE_URL: databaseUrl, REDIS_URL: redis.url, RATE_LIMIT_MAX: String(MAX) } })
  const userId = randomUUID()
  redis.pause()
  t.teardown(() => redis.resume())
  const answers = []
  for (let i = 0; i < 3; i++) answers.push(await quick.inject({ method: 'GET', url: `/api/sync/${userId}` }))
  t.strictSame(answers.map((res) => [res.statusCode, res.headers['x-ratelimit-remaining']]), Array(3).fill([404, undefined]))
  t.equal(await metric(quick, 'rate_limit_store_up'), 0)
  redis.resume()
  await until(async () => (await quick.inject({ method: 'GET', url: `/api/sync/${randomUUID()}` })).headers['x-ratelimit-remaining'] !== undefined,
    'counting resumes')
})

t.test('Redis down at start-up: the service starts, serves uncounted with one warning, and counts once Redis is up', async (t) => {
  await redis.kill()
  t.teardown(() => redis.start())
  const lines: string[] = []
  const late = await build(t, { env: { DATABASE_URL: databaseUrl, REDIS_URL: redis.url, RATE_LIMIT_MAX: '2', LOG_LEVEL: 'warn' }, logLines: lines })
  const userId = randomUUID()
  const statuses = []
  for (let i = 0; i < 4; i++) statuses.push((await late.inject({ method: 'GET', url: `/api/sync/${userId}` })).statusCode)
  t.strictSame(statuses, [404, 404, 404, 404], 'served, uncounted')
  t.equal(warnings(lines, 'Redis does not answer'), 1, 'one warning')
  t.equal(await metric(late, 'rate_limit_store_up'), 0)
  await redis.start()
  await until(async () => (await late.inject({ method: 'GET', url: `/api/sync/${randomUUID()}` })).headers['x-ratelimit-remaining'] !== undefined,
    'counting starts')
  const counted = []
  for (let i = 0; i < 3; i++) counted.push((await late.inject({ method: 'GET', url: `/api/sync/${userId}` })).statusCode)
  t.strictSame(counted, [404, 404, 429])
  t.equal(await metric(late, 'rate_limit_store_up'), 1)
})
