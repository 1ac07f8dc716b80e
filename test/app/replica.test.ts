import t from 'tap'
import { randomUUID } from 'node:crypto'
import type { FastifyInstance } from 'fastify'
import pg from 'pg'
import { build, metricValue } from '../helper.ts'
import { startCluster } from '../pg-cluster.ts'
import { until } from '../wait.ts'

// Reads on a streaming replica (DATABASE_READ_URL): a primary and a hot standby made with
// `pg_basebackup -R` from the PostgreSQL server binaries, one instance writing and others
// reading, in the default configuration otherwise (REPLICA_MAX_LAG_MS 1000).

const primary = await startCluster()
t.teardown(() => primary.stop())
const standby = await startCluster({ replicaOf: primary })
t.teardown(() => standby.stop())
const admin = new pg.Pool({ connectionString: standby.url, max: 1 })
admin.on('error', () => {})
t.teardown(() => admin.end())

const payload = (n: number) => ({ encryptedBlob: Buffer.alloc(16, n).toString('base64'), iv: 'AAAAAAAAAAAAAAAA', timestamp: n, checksum: 'a'.repeat(64) })
const writer = await build(t, { env: { DATABASE_URL: primary.url } })

async function reads (app: FastifyInstance): Promise<{ replica: number, primary: number }> {
  const values = (await app.metrics.registry.getSingleMetric('database_reads_total')!.get()).values
  const of = (target: string) => values.find((value) => value.labels.target === target)?.value ?? 0
  return { replica: of('replica'), primary: of('primary') }
}
const put = async (userId: string, n: number) => {
  const res = await writer.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: payload(n) })
  if (res.statusCode !== 200) throw new Error(`upload: ${res.statusCode} ${res.body}`)
  return res.headers.etag as string
}
const etagOn = async (app: FastifyInstance, userId: string) => {
  const res = await app.inject({ method: 'GET', url: `/api/sync/${userId}` })
  return res.statusCode === 200 ? res.headers.etag : `status ${res.statusCode}`
}

t.test('every read a download, verify, HEAD or the history sends runs on the standby, and sees an acknowledged upload', async (t) => {
  // A lag bound no scheduling hiccup of a loaded machine reaches: every read goes to the standby.
  const patient = await build(t, { env: { DATABASE_URL: primary.url, DATABASE_READ_URL: standby.url, REPLICA_MAX_LAG_MS: '60000', LOG_LEVEL: 'warn' } })
  const userId = randomUUID()
  await put(userId, 1)
  const etag = await put(userId, 2)
  await until(async () => await etagOn(patient, userId) === etag, 'the standby has the second upload')
  const before = await reads(patient)
  const url = `/api/sync/${userId}`
  const answers = await Promise.all([
    patient.inject({ method: 'GET', url }),
    patient.inject({ method: 'GET', url, headers: { 'if-none-match': etag } }),
    patient.inject({ method: 'HEAD', url }),
    patient.inject({ method: 'POST', url: `${url}/verify` }),
    patient.inject({ method: 'GET', url: `${url}/versions` })
  ])
  t.strictSame(answers.map((res) => res.statusCode), [200, 304, 200, 200, 200])
  t.strictSame(answers[0]!.json(), payload(2))
  const kept = answers[4]!.json().versions[1].version as number
  const old = await patient.inject({ method: 'GET', url: `${url}/versions/${kept}` })
  t.strictSame(old.json(), payload(1), 'a kept version, from the standby')
  const after = await reads(patient)
  t.strictSame({ replica: after.replica - before.replica, primary: after.primary - before.primary }, { replica: 6, primary: 0 },
    'six reads, all answered by the standby (a read-only server: a write among them would have failed there)')
  // The day's access time is a write: it goes to the primary, after the answer.
  const { rows } = await admin.query('SELECT pg_is_in_recovery() AS standby')
  t.equal(rows[0].standby, true)
})

t.test('replay paused: a device reads its own upload at once; others may read the older version until REPLICA_MAX_LAG_MS, never after; resumed, back to the standby', async (t) => {
  const lines: string[] = []
  const paused = await build(t, { env: { DATABASE_URL: primary.url, DATABASE_READ_URL: standby.url, LOG_LEVEL: 'info' }, logLines: lines })
  const userId = randomUUID()
  const first = await put(userId, 1)
  await until(async () => await etagOn(paused, userId) === first, 'the standby has the record')
  await admin.query('SELECT pg_wal_replay_pause()')
  t.teardown(() => admin.query('SELECT pg_wal_replay_resume()'))
  await until(async () => (await admin.query("SELECT pg_get_wal_replay_pause_state() = 'paused' AS paused")).rows[0].paused, 'replay paused')
  const etag = await put(userId, 2)
  const acknowledged = performance.now()
  const onStandby = await admin.query('SELECT etag FROM user_sync_data WHERE user_id = $1', [userId])
  t.not(`"${onStandby.rows[0]!.etag}"`, etag, 'the standby does not have the new version')

  // The uploading device polls with the tag it got: the standby's older version is not an answer
  // it may get (it would merge its own upload away); the primary answers 304.
  const own = await paused.inject({ method: 'GET', url: `/api/sync/${userId}`, headers: { 'if-none-match': etag } })
  t.equal(own.statusCode, 304, 'the uploading device: 304 at once')

  // A device without a version may read the older one, but not once REPLICA_MAX_LAG_MS has passed.
  await new Promise((resolve) => setTimeout(resolve, Math.max(0, acknowledged + 1_000 - performance.now())))
  t.equal(await etagOn(paused, userId), etag, 'a read begun REPLICA_MAX_LAG_MS after the upload returns it')
  t.ok(lines.some((line) => line.includes('too far behind; reading from the primary')), 'and the instance said why')
  await admin.query('SELECT pg_wal_replay_resume()')
  await until(async () => lines.some((line) => line.includes('caught up; reading from it again')), 'the instance says the standby is back')
  const resumed = await reads(paused)
  await until(async () => {
    t.equal(await etagOn(paused, userId), etag)
    return (await reads(paused)).replica > resumed.replica
  }, 'read from the standby again')
})

t.test('kill -9 of the standby under reads: no 5xx, the primary answers, and the standby serves again once it is back', async (t) => {
  const warnings: string[] = []
  const reader = await build(t, { env: { DATABASE_URL: primary.url, DATABASE_READ_URL: standby.url, LOG_LEVEL: 'warn' }, logLines: warnings })
  const userId = randomUUID()
  const etag = await put(userId, 3)
  await until(async () => await etagOn(reader, userId) === etag, 'the standby has it')
  const statuses = new Map<number, number>()
  const running = { reading: true }
  const load = (async () => {
    while (running.reading) {
      const res = await reader.inject({ method: 'GET', url: `/api/sync/${userId}` })
      statuses.set(res.statusCode, (statuses.get(res.statusCode) ?? 0) + 1)
    }
  })()
  await until(async () => (statuses.get(200) ?? 0) > 20, 'reads are running')
  t.equal(await metricValue(reader, 'replica_up'), 1, 'replica_up says the standby is there')
  await standby.crash()
  const down = await reads(reader)
  await until(async () => (await reads(reader)).primary > down.primary + 20, 'the primary answers the reads')
  running.reading = false
  await load
  t.strictSame([...statuses.keys()], [200], `${statuses.get(200)} downloads, every one 200`)
  await until(async () => await metricValue(reader, 'replica_up') === 0, 'replica_up says it is down (SyncReplicaDown)')
  await standby.start()
  const back = await reads(reader)
  await until(async () => {
    t.equal((await reader.inject({ method: 'GET', url: `/api/sync/${userId}` })).statusCode, 200)
    return (await reads(reader)).replica > back.replica
  }, 'the standby answers the reads again', 20_000)
  t.equal(await metricValue(reader, 'replica_up'), 1, 'and replica_up is 1 again')
})
