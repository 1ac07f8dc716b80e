import t from 'tap'
import { randomUUID } from 'node:crypto'
import pg from 'pg'
import { eventually, within } from '../wait.ts'
import { build, createTestDatabase, holdTable, inspect, lockWaiters } from '../helper.ts'
import { startCluster } from '../pg-cluster.ts'

// Faults on a real PostgreSQL: connections killed by the server while a statement runs on
// them, and the server itself killed.
const payload = (n: number) => ({
  encryptedBlob: Buffer.alloc(2048, n % 256).toString('base64'), iv: 'AAAAAAAAAAAAAAAA', timestamp: n + 1, checksum: 'c'.repeat(64)
})
const RETRY_LINE = 'database connection lost mid-query, retrying once'

/** The service's backends that wait for a lock (other than `except`), once there are any (at most 10 s). */
async function blockedOnLock (db: pg.Pool, except: number[] = []): Promise<number[]> {
  let pids: number[] = []
  await eventually(async () => {
    pids = (await lockWaiters(db)).filter((pid) => !except.includes(pid))
    return pids.length > 0
  }, 10_000)
  return pids
}

/** A connection of the test's that holds the row of `userId` (FOR UPDATE) until released. */
async function holdRow (t: Tap, databaseUrl: string, userId: string) {
  const holder = new pg.Client({ connectionString: databaseUrl, application_name: 'lock holder' })
  await holder.connect()
  t.teardown(() => holder.end())
  await holder.query('BEGIN')
  await holder.query('SELECT 1 FROM user_sync_data WHERE user_id = $1 FOR UPDATE', [userId])
  return { release: () => holder.query('ROLLBACK') }
}
type Tap = Parameters<Parameters<typeof t.test>[0]>[0]

const messages = (lines: string[]) => lines.map((line) => JSON.parse(line) as { msg: string, statement?: string })

t.test('a connection terminated under a running download: the statement is retried once on a fresh connection, the download succeeds', async (t) => {
  const databaseUrl = await createTestDatabase(t)
  const db = inspect(t, databaseUrl)
  const logLines: string[] = []
  const app = await build(t, { logLines, env: { DATABASE_URL: databaseUrl, LOG_LEVEL: 'warn' } })
  const userId = randomUUID()
  t.equal((await app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: payload(1) })).statusCode, 200)
  // A download only reads: it waits for a table held exclusively (as by a migration's ALTER).
  const row = await holdTable(t, databaseUrl, 'user_sync_versions')

  const download = app.inject({ method: 'GET', url: `/api/sync/${userId}` })
  const [first] = await blockedOnLock(db)
  t.ok(first, `the download's statement runs on backend ${first} (waiting for the row)`)
  await db.query('SELECT pg_terminate_backend($1)', [first])
  const [second] = await blockedOnLock(db, [first!])
  t.ok(second, `after the terminate the statement runs again, on backend ${second}`)
  await row.release()

  const res = await download
  t.equal(res.statusCode, 200, 'the download succeeds')
  t.strictSame(res.json(), payload(1))
  const retries = messages(logLines).filter((line) => line.msg === RETRY_LINE)
  t.equal(retries.length, 1, `one "${RETRY_LINE}" warning`)
  t.equal(retries[0]?.statement, 'sync-get')
})

t.test('a connection terminated under a conditional write: not retried (it may have committed), 503, nothing written', async (t) => {
  const databaseUrl = await createTestDatabase(t)
  const db = inspect(t, databaseUrl)
  const logLines: string[] = []
  // No statement timeout within the test's bounds: a retried write would wait for the row.
  const app = await build(t, { logLines, env: { DATABASE_URL: databaseUrl, LOG_LEVEL: 'warn', DATABASE_STATEMENT_TIMEOUT_MS: '60000' } })
  const userId = randomUUID()
  const etag = (await app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: payload(1) })).headers.etag as string
  const row = await holdRow(t, databaseUrl, userId)

  const write = app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: payload(2), headers: { 'if-match': etag } })
  const [first] = await blockedOnLock(db)
  t.ok(first, `the write's statement runs on backend ${first} (waiting for the row)`)
  await db.query('SELECT pg_terminate_backend($1)', [first])
  // The row is still held: a retried statement would wait for it, so an answer now means no retry.
  const early = await within(10_000, write)
  t.not(early, 'timeout', 'answered while the row is still held')
  await row.release()
  const res = await write
  t.equal(res.statusCode, 503)
  t.strictSame(res.json(), { error: 'The database is unavailable; please retry shortly', statusCode: 503 })

  const stored = await app.inject({ method: 'GET', url: `/api/sync/${userId}` })
  t.strictSame(stored.json(), payload(1), 'the record is the one before the write')
  t.equal(stored.headers.etag, etag)
  t.equal(messages(logLines).filter((line) => line.msg === RETRY_LINE).length, 0, 'no retry was logged')
})

// On a PostgreSQL cluster of its own: the machine's shared server is never killed.
t.test('kill -9 the database during a stream of uploads: every failure is a 503, no acknowledged write (nor the version before it) is lost', async (t) => {
  const cluster = await startCluster({ fsync: true })
  t.teardown(() => cluster.stop())
  const app = await build(t, { env: { DATABASE_URL: cluster.url, DATABASE_CONNECT_TIMEOUT_MS: '1000', RATE_LIMIT_MAX: '0', RATE_LIMIT_IP_MAX: '0' } })

  // Each user gets up to five uploads in a row, so that most replace a version (kept in the history).
  const acknowledged = new Map<string, Array<{ n: number, etag: string }>>()
  const attempts = new Map<string, number[]>()
  let acknowledgedCount = 0
  let acknowledgedAfterRecovery = 0
  const outage: number[] = []
  const unexpected: string[] = []
  let phase: 'before' | 'crashed' | 'recovered' = 'before'
  const uploads = { stop: false } // set by the test while the uploaders await
  async function uploader (seed: number): Promise<void> {
    let userId = randomUUID()
    for (let n = seed * 1_000_000; !uploads.stop; n++) {
      if (n % 5 === 0) userId = randomUUID()
      attempts.set(userId, [...(attempts.get(userId) ?? []), n])
      const started = Date.now()
      const res = await app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: payload(n) })
      if (res.statusCode === 200) {
        acknowledged.set(userId, [...(acknowledged.get(userId) ?? []), { n, etag: String(res.headers.etag) }])
        acknowledgedCount++
        if (phase === 'recovered') acknowledgedAfterRecovery++
      } else if (phase !== 'before' && res.statusCode === 503) {
        outage.push(Date.now() - started)
      } else {
        unexpected.push(`${res.statusCode} (${phase})`)
      }
    }
  }
  const uploaders = Array.from({ length: 4 }, (_, i) => uploader(i))
  t.teardown(() => { uploads.stop = true })

  t.ok(await eventually(() => acknowledgedCount >= 20, 30_000), `uploads acknowledged before the crash: ${acknowledgedCount}`)
  phase = 'crashed'
  await cluster.crash()
  t.ok(await eventually(() => outage.length >= 8, 30_000), `the service answers during the outage (${outage.length} answers)`)
  const restarted = Date.now()
  await cluster.start()
  // The service was never restarted: it must serve again on its own.
  const recovered = await eventually(async () => (await app.inject({ method: 'GET', url: '/health' })).statusCode === 200, 30_000)
  t.ok(recovered, 'healthy again after the database restarted')
  const recoveredMs = Date.now() - restarted
  phase = 'recovered'
  t.ok(await eventually(() => acknowledgedAfterRecovery >= 20, 30_000), `uploads acknowledged after the recovery: ${acknowledgedAfterRecovery}`)
  uploads.stop = true
  await Promise.all(uploaders)

  t.strictSame(unexpected, [], 'every failed request was a 503, and only once the database was down')
  // Every acknowledged upload is there, current or kept (five uploads a user stay within
  // HISTORY_VERSIONS=10), and so is every version before it: the versions listed are uploads
  // tried for the user, in order, and every upload tried before the oldest one listed was
  // refused (a 503 that never committed), never acknowledged.
  let lost = 0
  let gaps = 0
  let replaced = 0
  for (const [userId, tried] of attempts) {
    const acks = acknowledged.get(userId) ?? []
    const res = await app.inject({ method: 'GET', url: `/api/sync/${userId}/versions` })
    const listed = res.statusCode === 200 ? (res.json().versions as Array<{ etag: string, timestamp: number }>) : []
    const etags = listed.map((version) => `"${version.etag}"`)
    lost += acks.filter((ack) => !etags.includes(ack.etag)).length
    const ns = listed.map((version) => version.timestamp - 1).reverse()
    const inOrder = ns.every((n, i) => tried.includes(n) && (i === 0 || n > ns[i - 1]!))
    const beforeOldest = tried.filter((n) => ns.length === 0 || n < ns[0]!)
    if (!inOrder || acks.some((ack) => beforeOldest.includes(ack.n))) gaps++
    replaced += Math.max(listed.length - 1, 0)
  }
  t.equal(lost, 0, `acknowledged writes lost: ${lost} of ${acknowledgedCount}`)
  t.equal(gaps, 0, 'no version before an acknowledged one is missing')
  t.ok(replaced > acknowledged.size, `uploads replaced versions, and those were kept (${replaced})`)
  t.comment(`kill -9 figures: ${acknowledgedCount} acknowledged uploads, ${outage.length} answered 503 during the outage ` +
    `(slowest ${Math.max(...outage)} ms), healthy ${recoveredMs} ms after the restart, ${lost} lost, ${replaced} versions kept`)
})
