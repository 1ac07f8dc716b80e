import t from 'tap'
import { randomUUID } from 'node:crypto'
import pg from 'pg'
import pino from 'pino'
import { setTimeout as sleep } from 'node:timers/promises'
import { createStorage } from '../../plugins/storage.ts'
import { migrate, statementRunner } from '../../plugins/db.ts'
import { MAX_BLOB_BYTES } from '../../schemas/sync.ts'
import { CURRENT_RECORD, createTestDatabase, embeddedTests, insertRecords, lockWaiters, transactionPooled } from '../helper.ts'

/** A tap subtest (the type of the callback's argument). */
type Test = Parameters<Parameters<typeof t.test>[0]>[0]

const log = pino({ level: 'silent' })
const url = await createTestDatabase(t)
const STORAGE = 'storage under test'
const pool = new pg.Pool({ connectionString: url, max: 8, application_name: STORAGE })
// Like the service's pool: idle connections killed by the server must not crash the test.
pool.on('error', () => {})
t.teardown(() => pool.end())
await migrate(pool, log)
// Behind a transaction-mode pooler (TEST_DATABASE=pgbouncer) as the service sends them there.
const pooled = transactionPooled()
const storage = createStorage(statementRunner(pool, { DATABASE_POOLER: pooled ? 'transaction' : 'none', DATABASE_STATEMENT_TIMEOUT_MS: 5_000 }), log, undefined,
  { prepared: !embeddedTests() && !pooled })

function payload (bytes = 32, fill = 1) {
  return {
    encryptedBlob: Buffer.alloc(bytes, fill).toString('base64'),
    iv: 'AbCdEfGhIjKlMnOp',
    timestamp: 1_732_780_800_123,
    checksum: 'f'.repeat(63) + String(fill % 10)
  }
}

// On PostgreSQL the race tests force the interleaving that matters: a connection of the test's
// holds the row, every write starts and is seen waiting for it, then the row is let go, so the
// writes all meet the same version. The embedded database has one session for all connections:
// a held row cannot make a write wait there, and the writes run one after the other, unforced.
const embedded = embeddedTests()

/** Holds the row of `userId` (FOR UPDATE) on a connection of its own until `release`. */
async function holdRow (t: Test, userId: string) {
  const holder = new pg.Client({ connectionString: url, application_name: 'lock holder' })
  await holder.connect()
  t.teardown(() => holder.end())
  await holder.query('BEGIN')
  await holder.query('SELECT 1 FROM user_sync_data WHERE user_id = $1 FOR UPDATE', [userId])
  return { release: (how: 'COMMIT' | 'ROLLBACK') => holder.query(how) }
}

/** How many of the storage's statements wait for a lock, once there are `count` (polled, at most 10 s). */
async function waitingForLock (count: number): Promise<number> {
  let waiting = 0
  for (const deadline = Date.now() + 10_000; Date.now() < deadline;) {
    waiting = (await lockWaiters(pool, STORAGE)).length
    if (waiting >= count) break
    await sleep(10)
  }
  return waiting
}

/** Runs the writes against one version of the row: forced together on PostgreSQL (see above). */
async function together<R> (t: Test, userId: string, writes: Array<() => Promise<R>>, release: 'COMMIT' | 'ROLLBACK' = 'ROLLBACK'): Promise<R[]> {
  if (embedded) return await Promise.all(writes.map((write) => write()))
  const row = await holdRow(t, userId)
  const results = Promise.all(writes.map((write) => write()))
  t.equal(await waitingForLock(writes.length), writes.length, `all ${writes.length} writes wait for the row`)
  await row.release(release)
  return await results
}

/** The version number an entity tag starts with. */
const versionOf = (etag: string) => Number(etag.split('-')[0])

async function row (userId: string) {
  const { rows: [stored] } = await pool.query(`${CURRENT_RECORD} WHERE user_id = $1`, [userId])
  return stored
}

t.test('store then get returns exactly what was stored, timestamp as a number', async (t) => {
  const userId = randomUUID()
  const data = payload(100)
  t.match(await storage.store(userId, data), { stored: true, bytes: 100, etag: /^\d{13,}-[0-9a-f]{32}$/ }, 'store returns the size and tag')
  t.strictSame((await storage.get(userId))?.payload, data)
  const stored = await row(userId)
  t.equal(stored.blob_size, 100)
  t.equal(stored.encrypted_blob, data.encryptedBlob)
  t.strictSame(stored.ciphertext, Buffer.from(data.encryptedBlob, 'base64'), 'kept as its bytes (sql/006_ciphertext_bytes.sql)')
  t.equal(stored.stored_text, null, 'not as base64 text')
})

t.test('get of an unknown user is null', async (t) => {
  t.equal(await storage.get(randomUUID()), null)
})

t.test('store replaces the record and keeps created_at', async (t) => {
  const userId = randomUUID()
  await storage.store(userId, payload(10, 1))
  await pool.query("UPDATE user_sync_data SET created_at = now() - interval '3 days' WHERE user_id = $1", [userId])
  const before = await row(userId)
  const second = { ...payload(20, 2), timestamp: 1_800_000_000_000 }
  await storage.store(userId, second)
  const after = await row(userId)
  t.strictSame((await storage.get(userId))?.payload, second)
  t.equal(after.created_at.getTime(), before.created_at.getTime(), 'created_at survives the update')
  t.equal(after.blob_size, 20)
  const { rows } = await pool.query('SELECT count(*)::int AS n FROM user_sync_data WHERE user_id = $1', [userId])
  t.equal(rows[0].n, 1, 'still one row')
})

t.test('get moves last_accessed to now', async (t) => {
  const userId = randomUUID()
  await storage.store(userId, payload())
  await pool.query("UPDATE user_sync_data SET last_accessed = now() - interval '400 days' WHERE user_id = $1", [userId])
  await storage.get(userId)
  await storage.touched()
  const { rows: [age] } = await pool.query(
    'SELECT extract(epoch FROM now() - last_accessed) AS seconds FROM user_sync_data WHERE user_id = $1', [userId])
  t.ok(Number(age.seconds) < 60, `last accessed ${age.seconds} s ago`)
})

t.test('exists and delete', async (t) => {
  const userId = randomUUID()
  t.equal(await storage.exists(userId), false)
  await storage.store(userId, payload())
  t.equal(await storage.exists(userId), true)
  t.strictSame(await storage.delete(userId), { deleted: true }, 'deleting a record says so')
  t.equal(await storage.exists(userId), false)
  t.equal(await storage.get(userId), null)
  t.strictSame(await storage.delete(userId), { deleted: false }, 'deleting nothing is not an error')
})

t.test('getAllUserIds lists every stored user', async (t) => {
  const ids = [randomUUID(), randomUUID(), randomUUID()]
  for (const id of ids) await storage.store(id, payload())
  const all = await storage.getAllUserIds()
  for (const id of ids) t.ok(all.includes(id), id)
  t.strictSame([...all].sort(), all, 'in a stable order')
})

t.test('deleteInactive deletes exactly the rows idle longer than the limit', async (t) => {
  const idle = [randomUUID(), randomUUID()]
  const active = [randomUUID(), randomUUID()]
  for (const id of [...idle, ...active]) await storage.store(id, payload())
  await pool.query("UPDATE user_sync_data SET last_accessed = now() - interval '731 days' WHERE user_id = ANY($1)", [idle])
  await pool.query("UPDATE user_sync_data SET last_accessed = now() - interval '729 days' WHERE user_id = $1", [active[0]])
  t.equal(await storage.deleteInactive(730), 2)
  for (const id of idle) t.equal(await storage.exists(id), false, `idle ${id} deleted`)
  for (const id of active) t.equal(await storage.exists(id), true, `active ${id} kept`)
  t.equal(await storage.deleteInactive(730), 0, 'nothing left to delete')
  await t.rejects(storage.deleteInactive(0), RangeError)
  await t.rejects(storage.deleteInactive(1.5), RangeError)
})

t.test('a full 1,000,000-byte blob round-trips', async (t) => {
  const userId = randomUUID()
  const data = { ...payload(MAX_BLOB_BYTES, 7) }
  t.match(await storage.store(userId, data), { stored: true, bytes: MAX_BLOB_BYTES })
  const back = await storage.get(userId)
  t.equal(back?.payload?.encryptedBlob, data.encryptedBlob)
})

t.test('the table constraints refuse what the schemas refuse', async (t) => {
  const insert = (overrides: Record<string, unknown>) => {
    const values = { user_id: randomUUID(), encrypted_blob: 'AAAA', iv: 'AAAAAAAAAAAAAAAA', timestamp: 1, checksum: 'a'.repeat(64), blob_size: 3, ...overrides }
    return pool.query(insertRecords('SELECT $1::uuid, $2::text, $3::text, $4::bigint, $5::text, $6::int, now()'),
      [values.user_id, values.encrypted_blob, values.iv, values.timestamp, values.checksum, values.blob_size])
  }
  await t.resolves(insert({}), 'a valid row goes in')
  const { rows: [stored] } = await pool.query('SELECT user_id FROM user_sync_versions WHERE ciphertext IS NOT NULL LIMIT 1')
  await t.rejects(pool.query("UPDATE user_sync_versions SET encrypted_blob = 'AAAA' WHERE user_id = $1", [stored.user_id]),
    { code: '23514', constraint: 'version_one_ciphertext' }, 'a version holds its ciphertext once: not as bytes and text')
  await t.rejects(pool.query('UPDATE user_sync_versions SET ciphertext = NULL WHERE user_id = $1', [stored.user_id]),
    { code: '23514', constraint: 'version_one_ciphertext' }, 'and never neither')
  await t.rejects(insert({ blob_size: MAX_BLOB_BYTES + 1 }), { code: '23514', constraint: 'version_blob_size_limit' })
  await t.rejects(insert({ iv: 'A'.repeat(15) + '-' }), { code: '23514', constraint: 'version_iv_format' })
  await t.rejects(insert({ checksum: 'A'.repeat(64) }), { code: '23514', constraint: 'version_checksum_format' })
  await t.rejects(insert({ user_id: 'not-a-uuid' }), { code: '22P02' })
  // Through the storage API a bad value surfaces as the same database error, never a silent write.
  const userId = randomUUID()
  await t.rejects(storage.store(userId, { ...payload(), iv: 'short' }), { code: '23514' })
  t.equal(await storage.exists(userId), false)
})

t.test('concurrent upserts of one user: each applies in turn, and the record is one whole upload', async (t) => {
  if (embedded) t.comment('embedded database: one session, so the writes cannot be made to wait together; they run unforced')
  const userId = randomUUID()
  const initial = await storage.store(userId, payload(64, 0)) as { etag: string }
  const writes = Array.from({ length: 6 }, (_, i) => payload(1000 + i, i + 1))
  const results = await together(t, userId, writes.map((data) => () => storage.store(userId, data)))
  t.ok(results.every((result) => result.stored), 'every upsert stored')
  const first = versionOf(initial.etag)
  const versions = results.map((result) => versionOf((result as { etag: string }).etag)).sort((a, b) => a - b)
  t.equal(new Set(versions).size, 6, 'each one a version of its own: none was lost')
  t.ok(versions[0]! > first, 'each one newer than the version before them')
  const kept = (await storage.versions(userId))!.versions.map((version) => version.version).sort((a, b) => a - b)
  t.strictSame(kept, [first, ...versions], 'and each replaced version is kept, once')
  const stored = await storage.get(userId)
  const winner = writes[results.findIndex((result) => (result as { etag: string }).etag === stored?.etag)]
  t.ok(winner, 'the stored record is the last upsert')
  t.strictSame(stored?.payload, winner, 'and every field comes from that one upload')
  t.equal((await row(userId)).blob_size, Buffer.from(winner!.encryptedBlob, 'base64').length)
})

t.test('versions: every upload adds one, and the tag changes with it', async (t) => {
  const userId = randomUUID()
  const first = await storage.store(userId, payload())
  const second = await storage.store(userId, payload())
  t.ok(versionOf((second as { etag: string }).etag) > versionOf((first as { etag: string }).etag), 'the version grows')
  t.not((second as { etag: string }).etag, (first as { etag: string }).etag)
  t.equal((await storage.get(userId))?.etag, (second as { etag: string }).etag)
  t.equal(await storage.etagOf(userId), (second as { etag: string }).etag)
  t.equal(await storage.etagOf(randomUUID()), null)
})

t.test('a record deleted and created again never repeats an old tag', async (t) => {
  const userId = randomUUID()
  const before = await storage.store(userId, payload())
  await storage.delete(userId)
  const after = await storage.store(userId, payload())
  t.ok(versionOf((after as { etag: string }).etag) > versionOf((before as { etag: string }).etag), 'nor an old version number')
  t.not((after as { etag: string }).etag, (before as { etag: string }).etag)
})

t.test('conditional store: If-Match, If-Match *, If-None-Match *', async (t) => {
  const userId = randomUUID()
  t.strictSame(await storage.store(userId, payload(), { ifMatch: '*' }), { stored: false, currentEtag: null }, 'If-Match * needs a record')
  const created = await storage.store(userId, payload(8, 1), { ifNoneMatch: '*' })
  t.match(created, { stored: true, etag: /^\d+-/ }, 'If-None-Match * creates')
  const etag1 = (created as { etag: string }).etag
  t.strictSame(await storage.store(userId, payload(), { ifNoneMatch: '*' }), { stored: false, currentEtag: etag1 }, 'but only once')
  const replaced = await storage.store(userId, payload(8, 2), { ifMatch: [etag1] })
  t.match(replaced, { stored: true, etag: /^\d+-/ }, 'If-Match with the current tag replaces')
  const etag2 = (replaced as { etag: string }).etag
  t.strictSame(await storage.store(userId, payload(8, 3), { ifMatch: [etag1] }), { stored: false, currentEtag: etag2 }, 'a stale tag fails')
  t.match(await storage.store(userId, payload(8, 4), { ifMatch: ['nope', etag2] }), { stored: true }, 'any listed tag may match')
  t.match(await storage.store(userId, payload(8, 5), { ifMatch: '*' }), { stored: true })
  t.strictSame((await storage.versions(userId))!.versions.map((version) => version.timestamp),
    [5, 4, 2, 1].map((n) => payload(8, n).timestamp), 'each write a version of its own, the refused ones none')
  t.strictSame((await storage.get(userId))?.payload, payload(8, 5))
})

t.test('get with the current tag leaves the payload out but still counts as access', async (t) => {
  const userId = randomUUID()
  const { etag } = await storage.store(userId, payload()) as { etag: string }
  await pool.query("UPDATE user_sync_data SET last_accessed = now() - interval '100 days' WHERE user_id = $1", [userId])
  t.strictSame(await storage.get(userId, [etag]), { etag, payload: null })
  t.strictSame(await storage.get(userId, ['*']), { etag, payload: null })
  t.strictSame(await storage.get(userId, ['0-0']), { etag, payload: payload() })
  await storage.touched() // written after the answer
  const { rows } = await pool.query("SELECT now() - last_accessed < interval '1 minute' AS fresh FROM user_sync_data WHERE user_id = $1", [userId])
  t.equal(rows[0].fresh, true)
})

t.test('conditional delete', async (t) => {
  const userId = randomUUID()
  t.strictSame(await storage.delete(userId, { ifMatch: '*' }), { deleted: false, preconditionFailed: true, currentEtag: null })
  const { etag } = await storage.store(userId, payload()) as { etag: string }
  t.strictSame(await storage.delete(userId, { ifMatch: ['1-0'] }), { deleted: false, preconditionFailed: true, currentEtag: etag })
  t.equal(await storage.exists(userId), true, 'a failed precondition deletes nothing')
  t.strictSame(await storage.delete(userId, { ifMatch: [etag] }), { deleted: true })
  t.equal(await storage.exists(userId), false)
})

t.test('concurrent writes with the same If-Match: exactly one wins, every time, and the other learns its tag', async (t) => {
  if (embedded) t.comment('embedded database: one session, so the writes cannot be made to wait together; they race unforced')
  const userId = randomUUID()
  let { etag } = await storage.store(userId, payload(64, 0)) as { etag: string }
  for (let round = 1; round <= 8; round++) {
    const contenders = [payload(5000, round), payload(7000, round + 100)]
    const results = await together(t, userId, contenders.map((data) => () => storage.store(userId, data, { ifMatch: [etag] })),
      round % 2 === 0 ? 'COMMIT' : 'ROLLBACK')
    t.strictSame(results.map((result) => result.stored).sort(), [false, true], `round ${round}: one winner, one loser`)
    const winner = contenders[results.findIndex((result) => result.stored)]!
    const stored = await storage.get(userId)
    t.strictSame(stored?.payload, winner, `round ${round}: the stored record is the winner's, whole`)
    t.strictSame(results.find((result) => !result.stored), { stored: false, currentEtag: stored?.etag }, `round ${round}: the loser is told the winner's tag`)
    etag = stored!.etag
  }
})

t.test('reads are reads: a get rewrites its row at most once a day', async (t) => {
  const userId = randomUUID()
  await storage.store(userId, payload())
  await pool.query("UPDATE user_sync_data SET last_accessed = now() - interval '23 hours' WHERE user_id = $1", [userId])
  const rowVersion = async () => (await pool.query('SELECT xmin::text AS xmin, last_accessed FROM user_sync_data WHERE user_id = $1', [userId])).rows[0]
  const before = await rowVersion()
  for (let i = 0; i < 5; i++) await storage.get(userId)
  const after = await rowVersion()
  t.equal(after.xmin, before.xmin, 'the row was not rewritten')
  t.equal(after.last_accessed.getTime(), before.last_accessed.getTime())
  await pool.query("UPDATE user_sync_data SET last_accessed = now() - interval '25 hours' WHERE user_id = $1", [userId])
  await storage.get(userId)
  await storage.touched()
  const touched = await pool.query("SELECT now() - last_accessed < interval '1 minute' AS fresh FROM user_sync_data WHERE user_id = $1", [userId])
  t.equal(touched.rows[0].fresh, true, 'a day later the access is recorded')
})

t.test('the first downloads of the day of many users are recorded together, in a few statements', async (t) => {
  // One connection: the downloads queue for it, and the first access time to write queues behind
  // them; the accesses of all the others are waiting by the time it has been written.
  const single = new pg.Pool({ connectionString: url, max: 1 })
  single.on('error', () => {})
  t.teardown(() => single.end())
  const statements: string[] = []
  const observed = createStorage(statementRunner(single, { DATABASE_POOLER: pooled ? 'transaction' : 'none', DATABASE_STATEMENT_TIMEOUT_MS: 5_000 }), log,
    (statement) => statements.push(statement), { prepared: !embeddedTests() && !pooled })
  const users = Array.from({ length: 20 }, () => randomUUID())
  for (const userId of users) await storage.store(userId, payload())
  await pool.query("UPDATE user_sync_data SET last_accessed = now() - interval '2 days' WHERE user_id = ANY($1)", [users])
  const downloads = await Promise.all(users.map((userId) => observed.get(userId)))
  t.ok(downloads.every((record) => record?.payload !== null), 'every download answered')
  await observed.touched()
  t.strictSame(statements.filter((name) => name === 'sync-touch'), ['sync-touch', 'sync-touch'],
    'two statements: the first download\'s access, then the 19 that came in meanwhile')
  const { rows } = await pool.query("SELECT count(*)::int AS n FROM user_sync_data WHERE user_id = ANY($1) AND now() - last_accessed < interval '1 minute'", [users])
  t.equal(rows[0].n, users.length, 'every access is recorded')
})
