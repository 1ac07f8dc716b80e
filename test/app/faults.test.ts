import t from 'tap'
import { randomUUID } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import { build } from '../helper.ts'
import { startCluster } from '../pg-cluster.ts'

// Faults on a real PostgreSQL: connections killed by the server, and the server itself killed.
const payload = (n: number) => ({
  encryptedBlob: Buffer.alloc(2048, n % 256).toString('base64'), iv: 'AAAAAAAAAAAAAAAA', timestamp: n + 1, checksum: 'c'.repeat(64)
})

// Both tests run on a PostgreSQL cluster of their own: the machine's shared server is never touched.
t.test('pg_terminate_backend on the service\'s connections: the next requests succeed', async (t) => {
  const cluster = await startCluster()
  t.teardown(() => cluster.stop())
  const app = await build(t, { env: { DATABASE_URL: cluster.url } })
  const userId = randomUUID()
  t.equal((await app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: payload(1) })).statusCode, 200)
  // Open every pooled connection, then have PostgreSQL terminate them all.
  await Promise.all(Array.from({ length: app.config.DATABASE_POOL_MAX }, () => app.inject({ method: 'GET', url: `/api/sync/${userId}` })))
  const { rows } = await app.pg.pool.query(
    "SELECT count(pg_terminate_backend(pid))::int AS killed FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'logikids-sync' AND pid <> pg_backend_pid()")
  t.ok(rows[0].killed >= 1, `terminated ${rows[0].killed} connections`)
  const statuses = []
  for (let i = 0; i < 20; i++) statuses.push((await app.inject({ method: 'GET', url: `/api/sync/${userId}` })).statusCode)
  t.strictSame(statuses, Array(20).fill(200), 'idempotent operations retry on a fresh connection: no request failed')
  const put = await app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: payload(2) })
  t.equal(put.statusCode, 200)
})

t.test('kill -9 the database during a stream of uploads: no acknowledged write is lost', async (t) => {
  const cluster = await startCluster({ fsync: true })
  t.teardown(() => cluster.stop())
  const app = await build(t, { env: { DATABASE_URL: cluster.url, DATABASE_CONNECT_TIMEOUT_MS: '1000', RATE_LIMIT_MAX: '0', RATE_LIMIT_IP_MAX: '0' } })

  const acknowledged = new Map<string, number>()
  const outage: number[] = []
  const unexpected: string[] = []
  let stop = false
  let crashed = false
  async function uploader (): Promise<void> {
    for (let n = 0; !stop && n < 10_000; n++) { // eslint-disable-line no-unmodified-loop-condition -- set by the test while this loop awaits
      const userId = randomUUID()
      const started = Date.now()
      const res = await app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: payload(n) })
      if (res.statusCode === 200) acknowledged.set(userId, n)
      else if (crashed && res.statusCode === 503) outage.push(Date.now() - started)
      else unexpected.push(`${res.statusCode}${crashed ? '' : ' before the crash'}`)
    }
  }
  const uploaders = Array.from({ length: 4 }, uploader)
  await sleep(500)
  crashed = true
  await cluster.crash()
  await sleep(1500)
  const restarted = Date.now()
  await cluster.start()
  // The service was never restarted: it must serve again on its own.
  let recoveredMs = -1
  for (let i = 0; i < 100; i++) {
    if ((await app.inject({ method: 'GET', url: '/health' })).statusCode === 200) { recoveredMs = Date.now() - restarted; break }
    await sleep(50)
  }
  await sleep(300)
  stop = true
  await Promise.all(uploaders)

  t.strictSame(unexpected, [], 'every failed request was a 503 during the outage')
  t.ok(recoveredMs >= 0, `healthy again ${recoveredMs} ms after the database restarted`)
  t.ok(outage.length > 0, `${outage.length} requests during the outage`)
  t.ok(Math.max(...outage) < 3000, `each answered within ${Math.max(...outage)} ms (connect timeout 1000 ms)`)
  let lost = 0
  for (const [userId, n] of acknowledged) {
    const res = await app.inject({ method: 'GET', url: `/api/sync/${userId}` })
    if (res.statusCode !== 200 || res.json().timestamp !== n + 1) lost++
  }
  t.equal(lost, 0, `acknowledged writes lost: ${lost} of ${acknowledged.size}`)
  t.comment(`kill -9 figures: ${acknowledged.size} acknowledged uploads, ${outage.length} answered 503 during the outage ` +
    `(slowest ${Math.max(...outage)} ms), healthy ${recoveredMs} ms after the restart, ${lost} lost`)
})
