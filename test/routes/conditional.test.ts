import t from 'tap'
import { randomUUID } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import pg from 'pg'
import { build, embeddedTests, lockWaiters } from '../helper.ts'
import { parseEntityTags } from '../../routes/api/sync/index.ts'

// The race rounds send many requests for one user: the per-user limit is not what they test.
const app = await build(t, { env: { RATE_LIMIT_MAX: '0' } })

function payload (bytes = 48, fill = 3) {
  return {
    encryptedBlob: Buffer.alloc(bytes, fill).toString('base64'),
    iv: 'AbCdEfGhIjKl+/9z',
    timestamp: 1_732_780_800_123 + fill,
    checksum: '0123456789abcdef'.repeat(4)
  }
}
/** A tap subtest (the type of the callback's argument). */
type Test = Parameters<Parameters<typeof t.test>[0]>[0]
const url = (userId: string) => `/api/sync/${userId}`
const put = (userId: string, body: object, headers: Record<string, string> = {}) =>
  app.inject({ method: 'PUT', url: url(userId), payload: body, headers })

t.test('parseEntityTags', async (t) => {
  t.equal(parseEntityTags(undefined, true), undefined)
  t.equal(parseEntityTags(' * ', false), '*')
  t.strictSame(parseEntityTags('"1-2", W/"3-4"', true), ['1-2', '3-4'])
  t.strictSame(parseEntityTags('"1-2", W/"3-4"', false), ['1-2'], 'weak tags never match If-Match')
  t.strictSame(parseEntityTags('1-2, "a"b", ""', false), [''], 'unquoted and malformed entries are dropped')
})

t.test('PUT and GET carry a strong ETag that changes with every upload', async (t) => {
  const userId = randomUUID()
  const first = await put(userId, payload())
  t.equal(first.statusCode, 200)
  t.equal(first.body, '{"success":true}')
  t.match(first.headers.etag, /^"\d{13,}-[0-9a-f]{32}"$/, 'a version number (at least the time in ms) and a random part')
  const got = await app.inject({ method: 'GET', url: url(userId) })
  t.equal(got.headers.etag, first.headers.etag)
  const second = await put(userId, payload())
  t.match(second.headers.etag, /^"\d{13,}-[0-9a-f]{32}"$/)
  const version = (etag: unknown) => Number(String(etag).slice(1).split('-')[0])
  t.ok(version(second.headers.etag) > version(first.headers.etag), 'the version grows with every upload')
  t.not(second.headers.etag, first.headers.etag)
})

t.test('GET with If-None-Match: 304 with no body when current, 200 otherwise', async (t) => {
  const userId = randomUUID()
  const etag = (await put(userId, payload())).headers.etag as string
  const notModified = await app.inject({ method: 'GET', url: url(userId), headers: { 'if-none-match': etag } })
  t.equal(notModified.statusCode, 304)
  t.equal(notModified.body, '')
  t.equal(notModified.headers.etag, etag)
  t.equal(notModified.headers['cache-control'], 'no-store')
  const weak = await app.inject({ method: 'GET', url: url(userId), headers: { 'if-none-match': `"x", W/${etag}` } })
  t.equal(weak.statusCode, 304, 'weak comparison, and lists')
  const star = await app.inject({ method: 'GET', url: url(userId), headers: { 'if-none-match': '*' } })
  t.equal(star.statusCode, 304)
  const stale = await app.inject({ method: 'GET', url: url(userId), headers: { 'if-none-match': '"1-0"' } })
  t.equal(stale.statusCode, 200)
  t.strictSame(stale.json(), payload())
  const missing = await app.inject({ method: 'GET', url: url(randomUUID()), headers: { 'if-none-match': '*' } })
  t.equal(missing.statusCode, 404)
})

t.test('a 304 counts as access for the inactivity rule', async (t) => {
  const userId = randomUUID()
  const etag = (await put(userId, payload())).headers.etag as string
  await app.pg.query("UPDATE user_sync_data SET last_accessed = now() - interval '700 days' WHERE user_id = $1", [userId])
  t.equal((await app.inject({ method: 'GET', url: url(userId), headers: { 'if-none-match': etag } })).statusCode, 304)
  // The access is written after the answer: wait for it, as a later download would see it.
  await app.storage.touched()
  const { rows } = await app.pg.query("SELECT now() - last_accessed < interval '1 minute' AS fresh FROM user_sync_data WHERE user_id = $1", [userId])
  t.equal(rows[0].fresh, true)
})

t.test('PUT with If-Match: replaces the version read, else 412 with the current ETag', async (t) => {
  const userId = randomUUID()
  const etag1 = (await put(userId, payload(10, 1))).headers.etag as string
  const ok = await put(userId, payload(10, 2), { 'if-match': etag1 })
  t.equal(ok.statusCode, 200)
  const etag2 = ok.headers.etag as string
  const stale = await put(userId, payload(10, 3), { 'if-match': etag1 })
  t.equal(stale.statusCode, 412)
  t.strictSame(stale.json(), { error: 'Precondition failed: the data on the server is not the version this request expected', statusCode: 412 })
  t.equal(stale.headers.etag, etag2, 'the 412 names the current version')
  t.equal(stale.headers['cache-control'], 'no-store')
  t.strictSame((await app.inject({ method: 'GET', url: url(userId) })).json(), payload(10, 2), 'the newer data survived')
  const weak = await put(userId, payload(10, 4), { 'if-match': `W/${etag2}` })
  t.equal(weak.statusCode, 412, 'a weak tag never satisfies If-Match')
  const garbage = await put(userId, payload(10, 4), { 'if-match': 'garbage' })
  t.equal(garbage.statusCode, 412)
})

t.test('PUT with If-Match: * needs a record; If-None-Match: * only creates', async (t) => {
  const userId = randomUUID()
  const noRecord = await put(userId, payload(), { 'if-match': '*' })
  t.equal(noRecord.statusCode, 412)
  t.equal(noRecord.headers.etag, undefined)
  t.equal((await app.inject({ method: 'GET', url: url(userId) })).statusCode, 404, 'nothing was created')
  const created = await put(userId, payload(10, 1), { 'if-none-match': '*' })
  t.equal(created.statusCode, 200)
  const again = await put(userId, payload(10, 2), { 'if-none-match': '*' })
  t.equal(again.statusCode, 412)
  t.equal(again.headers.etag, created.headers.etag)
  t.equal((await put(userId, payload(10, 3), { 'if-match': '*' })).statusCode, 200)
  const badList = await put(userId, payload(10, 4), { 'if-none-match': '"1-2"' })
  t.equal(badList.statusCode, 400, 'If-None-Match with tags is refused on PUT rather than ignored')
  t.strictSame((await app.inject({ method: 'GET', url: url(userId) })).json(), payload(10, 3))
})

t.test('verify sends the ETag when the record exists', async (t) => {
  const userId = randomUUID()
  const absent = await app.inject({ method: 'POST', url: `${url(userId)}/verify` })
  t.equal(absent.body, '{"exists":false}')
  t.equal(absent.headers.etag, undefined)
  const etag = (await put(userId, payload())).headers.etag
  const present = await app.inject({ method: 'POST', url: `${url(userId)}/verify` })
  t.equal(present.body, '{"exists":true}')
  t.equal(present.headers.etag, etag)
})

t.test('DELETE with If-Match', async (t) => {
  const userId = randomUUID()
  const etag1 = (await put(userId, payload(10, 1))).headers.etag as string
  const etag2 = (await put(userId, payload(10, 2))).headers.etag as string
  const stale = await app.inject({ method: 'DELETE', url: url(userId), headers: { 'if-match': etag1 } })
  t.equal(stale.statusCode, 412)
  t.equal(stale.headers.etag, etag2)
  t.equal((await app.inject({ method: 'GET', url: url(userId) })).statusCode, 200, 'still there')
  const ok = await app.inject({ method: 'DELETE', url: url(userId), headers: { 'if-match': etag2 } })
  t.equal(ok.statusCode, 200)
  t.equal(ok.body, '{"success":true}')
  const gone = await app.inject({ method: 'DELETE', url: url(userId), headers: { 'if-match': '*' } })
  t.equal(gone.statusCode, 412, 'If-Match: * on nothing fails')
  const plain = await app.inject({ method: 'DELETE', url: url(userId) })
  t.equal(plain.statusCode, 200, 'without a header, deleting nothing still succeeds')
})

// Two devices upload over the same version. On PostgreSQL the test forces the interleaving that
// matters: it holds the row, both writes start and are seen waiting for it, then it lets go, so
// that both statements run against the same version every round. The embedded database has one
// session for all connections: a held row cannot make a write wait there, and the writes run one
// after the other.
const embedded = embeddedTests()

/** How many of the service's backends wait for a lock, once there are `count` (polled, at most 10 s). */
async function waitingForLock (observer: pg.Client, count: number): Promise<number> {
  let waiting = 0
  for (const deadline = Date.now() + 10_000; Date.now() < deadline;) {
    waiting = (await lockWaiters(observer)).length
    if (waiting >= count) break
    await sleep(10)
  }
  return waiting
}

async function client (t: Test, name: string): Promise<pg.Client> {
  const connection = new pg.Client({ connectionString: app.config.DATABASE_URL, application_name: name })
  await connection.connect()
  t.teardown(() => connection.end())
  return connection
}

t.test('two devices racing with the same If-Match, both waiting on the row: exactly one 200, one 412, whole', async (t) => {
  const userId = randomUUID()
  let etag = (await put(userId, payload(64, 0))).headers.etag as string
  const holder = embedded ? undefined : await client(t, 'lock holder')
  const observer = embedded ? undefined : await client(t, 'observer')
  if (embedded) t.comment('embedded database: one session, so the writes cannot be made to wait together; they race unforced')
  for (let round = 1; round <= 8; round++) {
    const contenders = [payload(20_000, round), payload(30_000, round + 100)]
    if (holder !== undefined) {
      await holder.query('BEGIN')
      await holder.query('SELECT 1 FROM user_sync_data WHERE user_id = $1 FOR UPDATE', [userId])
    }
    const racing = Promise.all(contenders.map((data) => put(userId, data, { 'if-match': etag })))
    if (holder !== undefined && observer !== undefined) {
      t.equal(await waitingForLock(observer, 2), 2, `round ${round}: both writes wait for the row`)
      await holder.query(round % 2 === 0 ? 'COMMIT' : 'ROLLBACK')
    }
    const results = await racing
    t.strictSame(results.map((res) => res.statusCode).sort(), [200, 412], `round ${round}: one 200, one 412`)
    const winner = contenders[results.findIndex((res) => res.statusCode === 200)]
    const stored = await app.inject({ method: 'GET', url: url(userId) })
    t.strictSame(stored.json(), winner, `round ${round}: the stored record is the winner's`)
    const loser = results.find((res) => res.statusCode === 412)!
    t.equal(loser.headers.etag, stored.headers.etag, `round ${round}: the loser is told the winner's ETag`)
    etag = stored.headers.etag as string
  }
})
