import t from 'tap'
import { execFile } from 'node:child_process'
import { randomBytes, randomUUID } from 'node:crypto'
import { fileURLToPath } from 'node:url'
import { setTimeout as sleep } from 'node:timers/promises'
import pg from 'pg'
import { CURRENT_RECORD, build, databaseUrlOf, insertRecords, inspect } from '../helper.ts'
import { MAX_BLOB_BYTES } from '../../schemas/sync.ts'

const ROOT = fileURLToPath(new URL('../../', import.meta.url))

function migrateBlobs (args: string[], databaseUrl: string): Promise<{ code: number, stdout: string, stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, ['--import', 'tsx', 'scripts/migrate-blobs.ts', ...args], {
      cwd: ROOT, env: { PATH: process.env.PATH ?? '', DATABASE_URL: databaseUrl }, timeout: 120_000
    }, (err, stdout, stderr) => resolve({ code: err === null ? 0 : Number((err as { code?: number }).code), stdout, stderr }))
  })
}

const app = await build(t)
const url = databaseUrlOf(app)
const db = inspect(t, url)

// Versions as the release before sql/006_ciphertext_bytes.sql stored them: base64 text. One has
// unused bits set in its last character ('QR==' is 'QQ==' once decoded), which bytes cannot keep.
const sizes = [1, 2, 3, 1024, 100 * 1024, MAX_BLOB_BYTES]
const legacy = sizes.map((bytes) => ({ id: randomUUID(), blob: randomBytes(bytes).toString('base64'), bytes }))
  .concat({ id: randomUUID(), blob: 'QR==', bytes: 1 })
legacy.sort((a, b) => a.id < b.id ? -1 : 1)
const nonCanonical = legacy.find((user) => user.blob === 'QR==')!
// And one that is not base64 at all, which no release accepted: only put in by hand.
const corrupt = { id: randomUUID(), blob: 'QU"}B', bytes: 3 }
await db.query(insertRecords("SELECT $1::uuid, $2::text, 'AAAAAAAAAAAAAAAA', 1::bigint, repeat('c', 64), 3, now()", true), [corrupt.id, corrupt.blob])
for (const [i, user] of legacy.entries()) {
  await db.query(insertRecords("SELECT $1::uuid, $2::text, 'AAAAAAAAAAAAAAAA', $3::bigint, repeat('c', 64), $4::int, now()", true),
    [user.id, user.blob, i + 1, user.bytes])
}
const payload = (timestamp: number) => ({ encryptedBlob: randomBytes(64).toString('base64'), iv: 'BBBBBBBBBBBBBBBB', timestamp, checksum: 'd'.repeat(64) })

t.test('versions stored as text are served as before, from the text', async (t) => {
  for (const user of legacy) {
    const res = await app.inject({ method: 'GET', url: `/api/sync/${user.id}` })
    t.equal(res.json().encryptedBlob, user.blob, `${user.bytes} bytes`)
  }
  const { rows: [row] } = await db.query('SELECT count(*)::int AS n FROM user_sync_versions WHERE encrypted_blob IS NOT NULL')
  t.equal(row.n, legacy.length + 1)
})

t.test('a version stored as text that is not base64 is a 500, never an answer that is not JSON', async (t) => {
  for (const url of [`/api/sync/${corrupt.id}`, `/api/sync/${corrupt.id}/versions/${(await app.inject({ method: 'GET', url: `/api/sync/${corrupt.id}/versions` })).json().versions[0].version}`]) {
    const res = await app.inject({ method: 'GET', url })
    t.equal(res.statusCode, 500, url)
    t.strictSame(res.json(), { error: 'Internal Server Error', statusCode: 500 })
  }
})

t.test('npm run migrate-blobs converts them to bytes in batches while uploads go on, and every answer stays the same', async (t) => {
  // The command's batch of one version waits on this lock, half-way through: uploads meanwhile.
  // (Not the one left as text: the batch passes it over without waiting for its lock.)
  const held = legacy.slice(3).find((user) => user !== nonCanonical)!
  const holder = new pg.Client({ connectionString: url })
  await holder.connect()
  t.teardown(() => holder.end())
  await holder.query('BEGIN')
  await holder.query('SELECT 1 FROM user_sync_versions WHERE user_id = $1 FOR UPDATE', [held.id])
  let finished = false
  const command = migrateBlobs(['--batch', '1'], url).finally(() => { finished = true })
  let waiting = 0
  for (const deadline = Date.now() + 60_000; waiting === 0 && Date.now() < deadline; await sleep(20)) {
    // The statement's beginning: pg_stat_activity keeps only the first 1 kB of its text.
    const { rows } = await db.query("SELECT count(*)::int AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'WITH next AS (%user_sync_versions%'")
    waiting = rows[0].n
  }
  t.equal(waiting, 1, 'the command waits on the held version')
  const { rows: [done] } = await db.query('SELECT count(*)::int AS n FROM user_sync_versions WHERE ciphertext IS NOT NULL')
  const ahead = legacy.slice(0, legacy.indexOf(held)).filter((user) => user !== nonCanonical).length
  t.equal(done.n, ahead, 'the versions before it are bytes already')

  const uploads = [randomUUID(), legacy[0]!.id, held.id, legacy[5]!.id]
  for (const [i, userId] of uploads.entries()) {
    const res = await app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: payload(100 + i) })
    t.equal(res.statusCode, 200, `upload ${i + 1} goes through meanwhile`)
  }
  t.equal(finished, false, 'while the command is still running')
  await holder.query('ROLLBACK')

  const result = await command
  t.equal(result.code, 0, result.stderr)
  t.match(result.stdout, new RegExp(`^migrate-blobs: converted ${legacy.length - 1} of ${legacy.length + 1} versions stored as base64 text to bytes in \\d+ ms; 2 still stored as text: not canonical base64`))
  t.equal(result.stderr, '', 'no progress lines where the output is not a terminal')

  const { rows } = await db.query('SELECT user_id::text AS id FROM user_sync_versions WHERE encrypted_blob IS NOT NULL')
  t.strictSame(rows.map((row) => row.id).sort(), [nonCanonical.id, corrupt.id].sort(), 'every version is bytes now, but the two whose text bytes cannot give back')
  for (const user of legacy) {
    const versions = (await app.inject({ method: 'GET', url: `/api/sync/${user.id}/versions` })).json().versions
    const first = versions.at(-1)
    const res = await app.inject({ method: 'GET', url: `/api/sync/${user.id}/versions/${first.version}` })
    t.equal(res.json().encryptedBlob, user.blob, `${user.bytes} bytes: the version reads as it did`)
  }
  const uploaded = await app.inject({ method: 'GET', url: `/api/sync/${held.id}` })
  t.equal(uploaded.json().timestamp, 102, 'and the upload made meanwhile is the current version')

  const again = await migrateBlobs([], url)
  t.equal(again.code, 0, again.stderr)
  t.match(again.stdout, /^migrate-blobs: converted 0 of 2 versions stored as base64 text to bytes in \d+ ms; 2 still stored as text/, 'a second run has nothing to do')
})

t.test('a batch holds at most so many characters of text, and at least one version', async (t) => {
  const users = [randomUUID(), randomUUID(), randomUUID()].sort()
  for (const userId of users) {
    await db.query(insertRecords("SELECT $1::uuid, 'QUFBQUFB', 'AAAAAAAAAAAAAAAA', 1::bigint, repeat('c', 64), 6, now()", true), [userId])
  }
  const batches: number[] = []
  const { rows: [before] } = await db.query('SELECT count(*)::int AS n FROM user_sync_versions WHERE encrypted_blob IS NOT NULL')
  // 1 character: no version fits, and each batch still takes one.
  t.strictSame(await app.storage.convertTextBlobs(100, (rows) => batches.push(rows), 1), { converted: 3, keptAsText: before.n - 3 })
  t.strictSame(batches, [...Array.from({ length: before.n }, () => 1), 0], `${before.n} text versions, one per statement, then an empty batch that ends the run`)
  batches.length = 0
  for (const userId of users) await db.query("UPDATE user_sync_versions SET encrypted_blob = 'QUFBQUFB', ciphertext = NULL WHERE user_id = $1", [userId])
  // 20 characters: two of the 8-character versions fit in a batch (the 4 and 5-character ones of the tests before are there too).
  await app.storage.convertTextBlobs(100, (rows) => batches.push(rows), 20)
  t.ok(batches.every((rows) => rows <= 3) && batches.some((rows) => rows >= 2), `batches of ${batches.join(', ')}`)
  t.equal(batches.reduce((sum, rows) => sum + rows, 0), before.n, 'and every text version was looked at')
})

t.test('a restored version that was stored as text is stored as bytes when its text is canonical, else as the same text', async (t) => {
  for (const [blob, asBytes] of [['QUJDRA==', true], ['QR==', false]] as const) {
    const userId = randomUUID()
    await db.query(insertRecords("SELECT $1::uuid, $2::text, 'AAAAAAAAAAAAAAAA', 5::bigint, repeat('c', 64), 4, now()", true), [userId, blob])
    const legacyVersion = (await app.inject({ method: 'GET', url: `/api/sync/${userId}/versions` })).json().versions[0].version
    t.equal((await app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: payload(6) })).statusCode, 200)
    const restored = await app.inject({ method: 'POST', url: `/api/sync/${userId}/versions/${legacyVersion}/restore` })
    t.equal(restored.statusCode, 200, restored.body)
    t.equal((await app.inject({ method: 'GET', url: `/api/sync/${userId}` })).json().encryptedBlob, blob, `${blob}: the restored text`)
    const { rows: [current] } = await db.query(`${CURRENT_RECORD} WHERE user_id = $1`, [userId])
    t.equal(current.ciphertext !== null, asBytes, `${blob}: ${asBytes ? 'as bytes' : 'as text'}`)
    t.equal(current.stored_text !== null, !asBytes)
  }
})

t.test('bad arguments: exit 64 with the usage', async (t) => {
  for (const args of [['--batch', '0'], ['--batch', 'x'], ['--batch', '1e2'], ['--batch', '0x10'], ['--batch', '10001'], ['--nope']]) {
    const result = await migrateBlobs(args, url)
    t.equal(result.code, 64, args.join(' '))
    t.match(result.stderr, /usage: npm run migrate-blobs/)
  }
})
