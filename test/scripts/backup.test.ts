import t from 'tap'
import { execFile } from 'node:child_process'
import { createHash, randomBytes, randomUUID } from 'node:crypto'
import { mkdtempSync, readdirSync, writeFileSync, existsSync, readFileSync, rmSync, statSync, truncateSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import pg from 'pg'
import { runner } from 'node-pg-migrate'
import { build, databaseUrlOf, createTestDatabase, insertRecords, inspect } from '../helper.ts'
import { MIGRATIONS_TABLE, SQL_DIR } from '../../plugins/db.ts'
import { MAX_BLOB_BYTES } from '../../schemas/sync.ts'

const ROOT = fileURLToPath(new URL('../../', import.meta.url))
const run = promisify(execFile)
const dir = mkdtempSync(join(tmpdir(), 'lk-backup-'))
t.teardown(() => rmSync(dir, { recursive: true, force: true }))

async function script (name: string, args: string[], databaseUrl: string) {
  try {
    const { stdout, stderr } = await run('bash', [join(ROOT, 'scripts', name), ...args], {
      env: { PATH: process.env.PATH ?? '', DATABASE_URL: databaseUrl }, maxBuffer: 64 * 1024 * 1024
    })
    return { code: 0, stdout, stderr }
  } catch (err) {
    const failed = err as { code: number, stdout: string, stderr: string }
    return { code: failed.code, stdout: failed.stdout, stderr: failed.stderr }
  }
}

// Every column of every row, as PostgreSQL itself prints it (timestamps to the microsecond).
const EVERYTHING = 'SELECT row_to_json(u)::text AS row FROM user_sync_data u ORDER BY user_id'
const HISTORY = 'SELECT row_to_json(v)::text AS row FROM user_sync_versions v ORDER BY user_id, version'

const app = await build(t)
const source = databaseUrlOf(app)
const db = inspect(t, source)
const users = [
  { id: randomUUID(), bytes: MAX_BLOB_BYTES },
  ...Array.from({ length: 20 }, (_, i) => ({ id: randomUUID(), bytes: 100 * (i + 1) }))
]
for (const [i, user] of users.entries()) {
  const res = await app.inject({
    method: 'PUT',
    url: `/api/sync/${user.id}`,
    payload: {
      // Random, so that the data (not the table of contents) is most of the compressed dump:
      // a dump cut short below is then cut in its data.
      encryptedBlob: randomBytes(user.bytes).toString('base64'),
      iv: 'AbCdEfGhIjKl+/9z',
      timestamp: 1_700_000_000_000 + i,
      checksum: 'ab'.repeat(32)
    }
  })
  if (res.statusCode !== 200) throw new Error(`seeding failed: ${res.body}`)
}
// One record claimed with an access token: backups keep its hash.
const claimedBy = randomBytes(32).toString('base64url')
const claiming = await app.inject({
  method: 'PUT',
  url: `/api/sync/${users[5]!.id}`,
  headers: { authorization: `Bearer ${claimedBy}` },
  payload: { encryptedBlob: 'AAAA', iv: 'AAAAAAAAAAAAAAAA', timestamp: 9, checksum: 'd'.repeat(64) }
})
if (claiming.statusCode !== 200) throw new Error(`claiming failed: ${claiming.body}`)
// A second upload and a download, so version and last_accessed differ from their defaults.
await app.inject({ method: 'PUT', url: `/api/sync/${users[1]!.id}`, payload: { encryptedBlob: 'AAAA', iv: 'AAAAAAAAAAAAAAAA', timestamp: 9, checksum: 'c'.repeat(64) } })
await app.inject({ method: 'GET', url: `/api/sync/${users[1]!.id}` })
const original = (await db.query(EVERYTHING)).rows.map((row) => row.row)
const history = (await db.query(HISTORY)).rows.map((row) => row.row)

t.test('backup, wipe, restore: every column of every row comes back, constraints hold', async (t) => {
  const file = join(dir, 'round-trip.dump')
  const backup = await script('backup.sh', [file], source)
  t.equal(backup.code, 0, backup.stderr)
  t.equal(backup.stdout.trim().split('\n').at(-1), file, 'the last line is the file')
  t.notOk(existsSync(`${file}.partial`), 'no partial file left behind')

  const refused = await script('restore.sh', [file], source)
  t.equal(refused.code, 1, 'refuses a database that holds sync data')
  t.match(refused.stderr, /already holds sync data for 21 users.*--force/)

  await db.query('DELETE FROM user_sync_data')
  t.equal((await db.query(HISTORY)).rows.length, 0, 'the versions went with the records')
  const restored = await script('restore.sh', [file], source)
  t.equal(restored.code, 0, restored.stderr)
  t.match(restored.stdout, /restored .* \(21 users\)/)
  t.strictSame((await db.query(EVERYTHING)).rows.map((row) => row.row), original, 'identical, column for column')
  t.equal(history.length, 23, 'two records had a version kept, next to the 21 current ones')
  t.strictSame((await db.query(HISTORY)).rows.map((row) => row.row), history, 'and every version came back, column for column')
  const versions = await app.inject({ method: 'GET', url: `/api/sync/${users[1]!.id}/versions` })
  t.equal(versions.json().versions.length, 2, 'the service lists the restored history')
  const first = await app.inject({ method: 'GET', url: `/api/sync/${users[1]!.id}/versions/${versions.json().versions[1].version}` })
  t.equal(first.json().timestamp, 1_700_000_000_001, 'and serves a kept version from it')
  const claimed = await db.query('SELECT token_hash FROM user_sync_data WHERE user_id = $1', [users[5]!.id])
  t.strictSame(claimed.rows[0].token_hash, createHash('sha256').update(claimedBy).digest(), 'the token hash came back')
  const reading = await app.inject({ method: 'GET', url: `/api/sync/${users[5]!.id}`, headers: { authorization: `Bearer ${claimedBy}` } })
  t.equal(reading.statusCode, 200, 'and the restored record opens with its token')
  t.equal((await app.inject({ method: 'GET', url: `/api/sync/${users[5]!.id}` })).statusCode, 401, 'and only with it')
  const big = await db.query('SELECT blob_size, octet_length(ciphertext) AS bytes FROM user_sync_versions WHERE user_id = $1', [users[0]!.id])
  t.strictSame(big.rows[0], { blob_size: MAX_BLOB_BYTES, bytes: MAX_BLOB_BYTES }, 'a whole 1 MB blob came back, as bytes')

  const insert = (userId: string, iv: string, size: number) =>
    db.query(insertRecords("SELECT $1::uuid, 'AAAA', $2::text, 1::bigint, repeat('a', 64), $3::int, now()"), [userId, iv, size])
  await t.rejects(insert(randomUUID(), 'bad', 3), { code: '23514', constraint: 'version_iv_format' }, 'the iv constraint is back')
  await t.rejects(insert(randomUUID(), 'AAAAAAAAAAAAAAAA', 1000001), { code: '23514', constraint: 'version_blob_size_limit' }, 'the size constraint is back')
  await t.rejects(insert(users[0]!.id, 'AAAAAAAAAAAAAAAA', 3), { code: '23505' }, 'the primary key is back')
  await t.rejects(db.query("INSERT INTO user_sync_versions (user_id, version, etag, ciphertext, iv, timestamp, checksum, blob_size) VALUES ($1, 1, '1-x', '\\x000000', 'AAAAAAAAAAAAAAAA', 1, repeat('a', 64), 3)", [randomUUID()]),
    { code: '23503' }, 'and the foreign key: no version without its record')
  const get = await app.inject({ method: 'GET', url: `/api/sync/${users[2]!.id}` })
  t.equal(get.statusCode, 200, 'the running service reads the restored data')
})

t.test('a backup from before the version history restores onto an upgraded database; the service upgrades it when restarted', async (t) => {
  // A database as the release before sql/005_versions.sql left it, migrations table included.
  const oldUrl = await createTestDatabase(t)
  const old = new pg.Client({ connectionString: oldUrl })
  await old.connect()
  await runner({ dbClient: old, dir: SQL_DIR, migrationsTable: MIGRATIONS_TABLE, direction: 'up', count: 4, singleTransaction: true, checkOrder: true, log: () => {} })
  const userId = randomUUID()
  const blob = randomBytes(500).toString('base64')
  await old.query(`INSERT INTO user_sync_data (user_id, encrypted_blob, iv, timestamp, checksum, blob_size)
    VALUES ($1, $2, 'AAAAAAAAAAAAAAAA', 7, $3, 500)`, [userId, blob, 'e'.repeat(64)])
  await old.end()
  const file = join(dir, 'before-history.dump')
  t.equal((await script('backup.sh', [file], oldUrl)).code, 0)

  // Restored with --force onto a database of this release that holds data and history.
  const running = await build(t)
  const target = databaseUrlOf(running)
  const other = randomUUID()
  for (let i = 1; i <= 2; i++) {
    await running.inject({ method: 'PUT', url: `/api/sync/${other}`, payload: { encryptedBlob: 'AAAA', iv: 'AAAAAAAAAAAAAAAA', timestamp: i, checksum: 'c'.repeat(64) } })
  }
  const restored = await script('restore.sh', [file, '--force'], target)
  t.equal(restored.code, 0, restored.stderr)
  t.match(restored.stdout, /restored .* \(1 users\)/)
  const latest = readdirSync(SQL_DIR).filter((name) => name.endsWith('.sql')).sort().at(-1)!.replace(/\.sql$/, '')
  t.match(restored.stdout, `older release (schema 004_access_token, this release ${latest}): restart the service`)

  const restarted = await build(t, { env: { DATABASE_URL: target } })
  const got = await restarted.inject({ method: 'GET', url: `/api/sync/${userId}` })
  t.equal(got.statusCode, 200, 'after the restart the old backup\'s data is served')
  t.strictSame(got.json(), { encryptedBlob: blob, iv: 'AAAAAAAAAAAAAAAA', timestamp: 7, checksum: 'e'.repeat(64) })
  t.match((await restarted.inject({ method: 'GET', url: `/api/sync/${userId}/versions` })).json().versions, [{ version: 1, current: true, size: 500 }])
  t.equal((await restarted.inject({ method: 'GET', url: `/api/sync/${other}` })).statusCode, 404, 'and what the backup did not hold is gone')
})

t.test('--force replaces the data of a database that holds some', async (t) => {
  const file = join(dir, 'force.dump')
  t.equal((await script('backup.sh', [file], source)).code, 0)
  const stranger = randomUUID()
  await app.inject({ method: 'PUT', url: `/api/sync/${stranger}`, payload: { encryptedBlob: 'AAAA', iv: 'AAAAAAAAAAAAAAAA', timestamp: 1, checksum: 'a'.repeat(64) } })
  await db.query('DELETE FROM user_sync_data WHERE user_id = $1', [users[3]!.id])
  const forced = await script('restore.sh', [file, '--force'], source)
  t.equal(forced.code, 0, forced.stderr)
  const now = (await db.query(EVERYTHING)).rows.map((row) => row.row)
  t.equal(now.length, 21)
  t.notOk(now.some((row: string) => row.includes(stranger)), 'rows not in the backup are gone')
  t.ok(now.some((row: string) => row.includes(users[3]!.id)), 'rows in the backup are back')
})

t.test('restore into a new, empty database', async (t) => {
  const file = join(dir, 'fresh.dump')
  t.equal((await script('backup.sh', [file], source)).code, 0)
  const target = await createTestDatabase(t)
  const restored = await script('restore.sh', [file], target)
  t.equal(restored.code, 0, restored.stderr)
  const copy = inspect(t, target)
  t.strictSame((await copy.query(EVERYTHING)).rows.map((row) => row.row), (await db.query(EVERYTHING)).rows.map((row) => row.row))
})

t.test('a damaged backup is refused and changes nothing', async (t) => {
  const file = join(dir, 'damaged.dump')
  writeFileSync(file, 'PGDMP this is not really a dump')
  const before = (await db.query(EVERYTHING)).rows.map((row) => row.row)
  const restored = await script('restore.sh', [file, '--force'], source)
  t.not(restored.code, 0)
  t.match(restored.stderr, /not a readable pg_dump/)
  t.strictSame((await db.query(EVERYTHING)).rows.map((row) => row.row), before)
})

t.test('backup.sh names its file by default, and fails loudly on a bad database', async (t) => {
  const fallback = await script('backup.sh', [], source)
  t.equal(fallback.code, 0, fallback.stderr)
  const path = fallback.stdout.trim().split('\n').at(-1)!
  t.match(path, /^backups\/logikids-\d{8}T\d{6}Z\.dump$/)
  t.ok(existsSync(join(ROOT, path)))
  rmSync(join(ROOT, path))
  const bad = join(dir, 'nowhere.dump')
  const failed = await script('backup.sh', [bad], 'postgres://postgres@127.0.0.1:1/nowhere')
  t.not(failed.code, 0)
  t.notOk(existsSync(bad), 'no file for a failed backup')
  t.notOk(existsSync(`${bad}.partial`))
})

t.test('a backup cut short is refused with 65 before anything is touched', async (t) => {
  const file = join(dir, 'cut.dump')
  const backup = await script('backup.sh', [file], source)
  t.equal(backup.code, 0, backup.stderr)
  const size = statSync(file).size
  truncateSync(file, Math.floor(size * 0.6))
  t.equal(readFileSync(file).subarray(0, 5).toString(), 'PGDMP', 'still starts like a dump')
  const toc = await run('pg_restore', ['--list', file]).then(() => 0, (err: { code: number }) => err.code)
  t.equal(toc, 0, 'its table of contents is whole: only the data is cut off')

  // What the target holds now differs from the backup, so a partial restore would show.
  const stranger = randomUUID()
  await app.inject({ method: 'PUT', url: `/api/sync/${stranger}`, payload: { encryptedBlob: 'AAAA', iv: 'AAAAAAAAAAAAAAAA', timestamp: 1, checksum: 'a'.repeat(64) } })
  await db.query('DELETE FROM user_sync_data WHERE user_id = $1', [users[4]!.id])
  const before = (await db.query(EVERYTHING)).rows.map((row) => row.row)
  t.not(before.length, 0)

  const restored = await script('restore.sh', [file, '--force'], source)
  t.equal(restored.code, 65, `exit status; stderr: ${restored.stderr}`)
  t.match(restored.stderr, /incomplete|damaged/)
  t.notMatch(restored.stdout, /restored/)
  t.strictSame((await db.query(EVERYTHING)).rows.map((row) => row.row), before, 'every row exactly as before')

  const unreachable = await script('restore.sh', [file, '--force'], 'postgres://postgres@127.0.0.1:1/nowhere')
  t.equal(unreachable.code, 65, 'the file is judged before the database is asked anything')
})

t.test('the backup it was cut from restores in full (the check refuses only damaged files)', async (t) => {
  const file = join(dir, 'whole.dump')
  t.equal((await script('backup.sh', [file], source)).code, 0)
  const expected = (await db.query(EVERYTHING)).rows.map((row) => row.row)
  await db.query('DELETE FROM user_sync_data')
  const restored = await script('restore.sh', [file], source)
  t.equal(restored.code, 0, restored.stderr)
  t.strictSame((await db.query(EVERYTHING)).rows.map((row) => row.row), expected)
})
