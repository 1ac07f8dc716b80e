import t from 'tap'
import { randomUUID } from 'node:crypto'
import { build, createTestDatabase, type TestContext } from '../helper.ts'
import { startProxy, targetOf, throughProxy } from '../proxy.ts'
import { until } from '../wait.ts'

const payload = { encryptedBlob: 'AAAA', iv: 'AAAAAAAAAAAAAAAA', timestamp: 1, checksum: 'a'.repeat(64) }

function value (text: string, series: string): number {
  const line = text.split('\n').find((entry) => entry.startsWith(series + ' '))
  return line === undefined ? 0 : Number(line.slice(series.length + 1))
}

t.test('metrics move when requests happen', async (t) => {
  const app = await build(t)
  const scrape = async () => (await app.inject({ method: 'GET', url: '/metrics' })).body
  const before = await scrape()
  const userId = randomUUID()
  await app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload })
  await app.inject({ method: 'GET', url: `/api/sync/${userId}` })
  await app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: { ...payload, iv: 'bad' } })
  await app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: { ...payload, encryptedBlob: Buffer.alloc(1_000_001).toString('base64') } })
  const res = await app.inject({ method: 'GET', url: '/metrics' })
  t.equal(res.statusCode, 200)
  t.match(res.headers['content-type'], /^text\/plain/)
  const after = res.body
  const series = 'http_request_duration_seconds_count{route="/api/sync/:userId",method="PUT",status="200"}'
  t.equal(value(after, series) - value(before, series), 1, 'the upload is in the HTTP histogram, by route pattern')
  t.notOk(after.includes(userId), 'no user id in any label')
  t.ok(value(after, 'storage_operation_duration_seconds_count{operation="store",outcome="ok"}') >= 1)
  t.ok(value(after, 'storage_operation_duration_seconds_count{operation="get",outcome="ok"}') >= 1)
  t.equal(value(after, 'rejected_uploads_total{status="400"}'), 1)
  t.equal(value(after, 'rejected_uploads_total{status="413"}'), 1)
  t.match(after, /db_pool_connections_total \d+/)
  t.match(after, /db_pool_connections_idle \d+/)
  t.match(after, /db_pool_requests_waiting 0/)
  t.equal(value(after, 'db_pool_connections_max'), app.config.DATABASE_POOL_MAX)
  t.match(after, /process_resident_memory_bytes \d+/)
})

t.test('stored users and bytes are counted at most once a minute', async (t) => {
  const app = await build(t)
  await app.inject({ method: 'PUT', url: `/api/sync/${randomUUID()}`, payload })
  // A scrape waits half a second for the count at most (a loaded machine may take longer): the
  // count it started is reported by the next.
  let first = ''
  await until(async () => {
    first = (await app.inject({ method: 'GET', url: '/metrics' })).body
    return !Number.isNaN(value(first, 'stored_users'))
  }, 'the count is in')
  t.equal(value(first, 'stored_users'), 1)
  t.equal(value(first, 'stored_bytes'), 3)
  await app.inject({ method: 'PUT', url: `/api/sync/${randomUUID()}`, payload })
  const second = (await app.inject({ method: 'GET', url: '/metrics' })).body
  t.equal(value(second, 'stored_users'), 1, 'a scrape within the minute does not query again')
  const totals = value(second, 'storage_operation_duration_seconds_count{operation="totals",outcome="ok"}')
  t.equal(totals, 1, 'one counting query for two scrapes')
  const size = (await app.pg.pool.query<{ size: string }>('SELECT pg_database_size(current_database()) AS size')).rows[0]!.size
  const reported = value(first, 'database_size_bytes')
  t.ok(reported > 0 && reported <= Number(size) * 1.5 && reported >= Number(size) / 1.5, `the database's size on disk (${reported} against ${size})`)
})

t.test('database outages are counted', async (t) => {
  const app = await build(t, { env: { DATABASE_CONNECT_TIMEOUT_MS: '300' } })
  const holders = await Promise.all(Array.from({ length: app.config.DATABASE_POOL_MAX }, () => app.pg.pool.connect()))
  t.teardown(() => { for (const client of holders) client.release() })
  t.equal((await app.inject({ method: 'GET', url: `/api/sync/${randomUUID()}` })).statusCode, 503)
  const text = (await app.inject({ method: 'GET', url: '/metrics' })).body
  t.equal(value(text, 'database_connection_errors_total{kind="unavailable"}'), 1)
  t.equal(value(text, 'db_pool_connections_idle'), 0)
  // Not yet counted: no figure rather than a false 0 (a database "growing" from 0 to its size).
  t.match(text, /^stored_users nan$/mi, 'stored users unknown, not 0')
  t.match(text, /^database_size_bytes nan$/mi, 'the database size unknown, not 0')
  // A failed count is not tried again at the next scrape: a struggling database is not asked again.
  const failedCounts = async () => value((await app.inject({ method: 'GET', url: '/metrics' })).body, 'storage_operation_duration_seconds_count{operation="totals",outcome="error"}')
  await until(async () => await failedCounts() === 1, 'the count has failed')
  t.equal(await failedCounts(), 1, 'the next scrape does not count again')
})

/** An app whose database is reached through a proxy the test can stall or cut. */
async function buildThroughProxy (t: TestContext, env: Record<string, string> = {}) {
  const databaseUrl = await createTestDatabase(t)
  const proxy = await startProxy(targetOf(databaseUrl))
  t.teardown(() => proxy.close())
  return { app: await build(t, { env: { DATABASE_URL: throughProxy(databaseUrl, proxy), ...env } }), proxy }
}

t.test('a database that hangs does not hold up a scrape: the figures come, the database shows as down', async (t) => {
  // Time-outs of ten minutes: a scrape that waited for the database would outlast tap's.
  const { app, proxy } = await buildThroughProxy(t, { HEALTH_TIMEOUT_MS: '600000', DATABASE_STATEMENT_TIMEOUT_MS: '600000', DATABASE_CONNECT_TIMEOUT_MS: '600000' })
  await until(async () => value((await app.inject({ method: 'GET', url: '/metrics' })).body, 'database_up') === 1, 'the database is up')
  proxy.stall()
  const scrape = await app.inject({ method: 'GET', url: '/metrics' })
  t.equal(scrape.statusCode, 200, 'the scrape is answered')
  t.match(scrape.body, /^process_resident_memory_bytes \d+/m, 'with the figures')
  t.match(scrape.body, /^database_up 1$/m, 'the database as last seen: its SELECT 1 has not come back yet')
  proxy.resume()
  await until(async () => value((await app.inject({ method: 'GET', url: '/metrics' })).body, 'database_up') === 1, 'the database is up again')
})

t.test('database_up: 0 when the database refuses, 1 when it is back', async (t) => {
  const { app, proxy } = await buildThroughProxy(t)
  const up = async () => value((await app.inject({ method: 'GET', url: '/metrics' })).body, 'database_up')
  await until(async () => await up() === 1, 'up')
  await proxy.cut()
  await until(async () => await up() === 0, 'down while the database refuses')
  await proxy.restore()
  await until(async () => await up() === 1, 'up again')
  t.pass('database_up followed the database')
})

t.test('METRICS_TOKEN protects /metrics', async (t) => {
  const app = await build(t, { env: { METRICS_TOKEN: 's3cret-token' } })
  const none = await app.inject({ method: 'GET', url: '/metrics' })
  t.equal(none.statusCode, 401)
  t.match(none.json(), { error: /Bearer/, statusCode: 401 })
  t.equal((await app.inject({ method: 'GET', url: '/metrics', headers: { authorization: 'Bearer wrong' } })).statusCode, 401)
  t.equal((await app.inject({ method: 'GET', url: '/metrics', headers: { authorization: 'Bearer s3cret-token' } })).statusCode, 200)
})
