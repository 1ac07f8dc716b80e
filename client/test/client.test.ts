import t from 'tap'
import { randomBytes } from 'node:crypto'
import type { AddressInfo } from 'node:net'
import type { FastifyInstance } from 'fastify'
import {
  ConflictError, exportKey, generateKey, importKey, IntegrityError, newUserId, NotFoundError, RateLimitError,
  SyncClient, TooLargeError, UnauthorizedError, UnavailableError, unionMerge, type SyncClientOptions
} from '../src/index.ts'
import { build, databaseUrlOf, inspect } from '../../test/helper.ts'
import { fieldDownload, fieldImportQrKey, fieldQrKey, fieldUpload } from './field-client.ts'

// The client in Node against the whole service on a real PostgreSQL, in the service's default
// configuration (rate limits, optional access tokens, history of 10), over real HTTP.

async function listen (app: FastifyInstance, port = 0): Promise<string> {
  await app.listen({ host: '127.0.0.1', port })
  return `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`
}

const app = await build(t)
const baseUrl = await listen(app)
const db = inspect(t, databaseUrlOf(app))

/** Every request a client sent, as "METHOD path -> status" (or "-> network error"), in order. */
function recording (log: string[], base: typeof fetch = fetch): typeof fetch {
  return async (input, init) => {
    const url = new URL(String(input))
    const what = `${init?.method ?? 'GET'} ${url.pathname.replace(/[0-9a-f-]{36}/, ':id')}`
    try {
      const response = await base(input, init)
      log.push(`${what} -> ${response.status}`)
      return response
    } catch (err) {
      log.push(`${what} -> network error`)
      throw err
    }
  }
}

interface Progress { progress: Record<string, number>, badges?: string[] }

function device (options: Partial<SyncClientOptions> & Pick<SyncClientOptions, 'userId' | 'key'>, log: string[] = []) {
  return new SyncClient<Progress>({ baseUrl, fetch: recording(log), retryDelay: { baseMs: 10, maxMs: 5_000 }, ...options })
}

const tokenHash = async (userId: string) =>
  (await db.query('SELECT token_hash FROM user_sync_data WHERE user_id = $1', [userId])).rows[0]?.token_hash as Buffer | null | undefined
const versionCount = async (userId: string) =>
  (await db.query('SELECT count(*)::int AS n FROM user_sync_versions WHERE user_id = $1', [userId])).rows[0].n as number

t.test('upload, download, exists and delete round trip the data, and the record is claimed with the key\'s token', async (t) => {
  const userId = newUserId()
  const key = await generateKey()
  const log: string[] = []
  const client = device({ userId, key }, log)
  t.equal(await client.download(), null, 'nothing yet')
  t.equal(await client.exists(), false)
  await client.delete()
  const data = { progress: { math: 3, logic: 5 }, badges: ['first'], name: 'Zoë 🦊' } as Progress
  const etag = await client.upload(data)
  t.match(etag, /^"\d{16}-[0-9a-f]{32}"$/)
  t.strictSame(client.state.etag, etag)
  t.equal((await tokenHash(userId))?.length, 32, 'the upload claimed the record')
  t.equal(await client.exists(), true)
  const other = device({ userId, key: await importKey(await exportKey(key)) })
  t.strictSame(await other.download(), data, 'another device with the same key reads it')
  t.equal(other.state.etag, etag)
  await other.delete()
  t.equal(await client.exists(), false)
  t.equal(await versionCount(userId), 0, 'the delete took the history with it')
  t.strictSame(log, [
    'GET /api/sync/:id -> 404', 'POST /api/sync/:id/verify -> 200', 'DELETE /api/sync/:id -> 200',
    'GET /info -> 200', 'PUT /api/sync/:id -> 200', 'POST /api/sync/:id/verify -> 200', 'POST /api/sync/:id/verify -> 200'
  ], 'one request each, no retries; the limits are read once, before the first upload')
})

t.test('a client with another key gets UnauthorizedError at once, and the record is unchanged', async (t) => {
  const userId = newUserId()
  const owner = device({ userId, key: await generateKey() })
  await owner.upload({ progress: { math: 1 } })
  const log: string[] = []
  const stranger = device({ userId, key: await generateKey() }, log)
  await t.rejects(stranger.download(), UnauthorizedError)
  await t.rejects(stranger.upload({ progress: { math: 0 } }), { name: 'UnauthorizedError', status: 401 })
  await t.rejects(stranger.delete(), UnauthorizedError)
  await t.rejects(stranger.sync({ progress: {} }), UnauthorizedError)
  t.strictSame(log, ['GET /api/sync/:id -> 401', 'GET /info -> 200', 'PUT /api/sync/:id -> 401', 'DELETE /api/sync/:id -> 401', 'GET /api/sync/:id -> 401'],
    'never retried')
  const tokenless = device({ userId, key: await generateKey(), token: false })
  await t.rejects(tokenless.download(), UnauthorizedError, 'no token on a claimed record')
  t.strictSame(await owner.download(), { progress: { math: 1 } })
  t.equal(await versionCount(userId), 1)
})

t.test('field clients and this client read each other\'s records, with either checksum form', async (t) => {
  for (const form of ['ciphertext', 'iv+ciphertext'] as const) {
    const userId = newUserId()
    const key = await generateKey()
    // The field clients pair with a JSON Web Key; this client imports it from the QR code text.
    const fieldKey = await fieldImportQrKey(await fieldQrKey(key))
    const fromField = { timestamp: 1_700_000_000_000, progress: { math: 7 }, settings: { language: 'de' } }
    t.equal((await fieldUpload(baseUrl, userId, fieldKey, fromField, form)).status, 200)
    // Field clients send no token: this client does the same, or it would claim their record.
    const client = new SyncClient({ baseUrl, userId, key: await importKey(await fieldQrKey(key)), token: false })
    t.strictSame(await client.download(), fromField, `${form}: a field upload decrypts here`)
    const fromHere = { ...fromField, timestamp: 1_700_000_000_001, progress: { math: 8 } }
    await client.upload(fromHere)
    if (form === 'iv+ciphertext') {
      t.strictSame(await fieldDownload(baseUrl, userId, fieldKey, form), fromHere, 'this upload decrypts in the field client')
    } else {
      // The older release checks the checksum over the ciphertext alone: this client's uploads fail its check.
      await t.rejects(fieldDownload(baseUrl, userId, fieldKey, form), /checksum mismatch/,
        'the older field client refuses the iv + ciphertext checksum (its known limit)')
    }
    t.equal(await tokenHash(userId), null, 'token: false left the record unclaimed')
  }
})

t.test('a record whose checksum or ciphertext was changed on the server is an IntegrityError, and sync uploads nothing', async (t) => {
  const userId = newUserId()
  const key = await generateKey()
  await device({ userId, key }).upload({ progress: { math: 1 } })
  await db.query("UPDATE user_sync_versions SET checksum = repeat('0', 64) WHERE user_id = $1", [userId])
  const log: string[] = []
  const client = device({ userId, key }, log)
  await t.rejects(client.download(), IntegrityError)
  await t.rejects(client.sync({ progress: { math: 2 } }), IntegrityError)
  t.strictSame(log, ['GET /api/sync/:id -> 200', 'GET /api/sync/:id -> 200'], 'no upload over data it cannot read')
  t.equal(await versionCount(userId), 1)
})

t.test('two devices edit, both sync, and the merge keeps both changes', async (t) => {
  const userId = newUserId()
  const key = await generateKey()
  const logA: string[] = []
  const logB: string[] = []
  const a = device({ userId, key }, logA)
  const b = device({ userId, key: await importKey(await exportKey(key)) }, logB)
  let localA = await a.sync({ progress: { math: 1 } })
  let localB = await b.sync(null)
  t.strictSame(localB, { progress: { math: 1 } }, 'B, new, takes A\'s data')
  localA = await a.sync({ progress: { ...localA!.progress, math: 2 } })
  const merges: Array<[Progress, Progress]> = []
  localB = await b.sync({ progress: { ...localB!.progress, logic: 4 } }, (local, remote) => {
    merges.push([local, remote])
    return unionMerge(local, remote)
  })
  t.strictSame(merges, [[{ progress: { math: 1, logic: 4 } }, { progress: { math: 2 } }]], 'merged once, B\'s edit with A\'s upload')
  t.strictSame(localB, { progress: { math: 2, logic: 4 } })
  localA = await a.sync(localA)
  t.strictSame(localA, { progress: { math: 2, logic: 4 } }, 'A receives the merge')
  t.strictSame(await a.sync(localA), localA, 'nothing changed: nothing sent')
  t.strictSame(logA, [
    'GET /api/sync/:id -> 404', 'GET /info -> 200', 'PUT /api/sync/:id -> 200', // creates the record (If-None-Match: *)
    'GET /api/sync/:id -> 304', 'PUT /api/sync/:id -> 200', // its edit, based on its version
    'GET /api/sync/:id -> 200', // B's merge
    'GET /api/sync/:id -> 304'
  ])
  t.strictSame(logB, ['GET /api/sync/:id -> 200', 'GET /api/sync/:id -> 200', 'GET /info -> 200', 'PUT /api/sync/:id -> 200'])
  t.equal(await versionCount(userId), 3, 'three uploads, three versions')
})

t.test('an upload between the merge and the push is a 412: sync pulls it, merges again, and loses nothing', async (t) => {
  const userId = newUserId()
  const key = await generateKey()
  const a = device({ userId, key })
  const log: string[] = []
  const b = device({ userId, key }, log)
  await a.sync({ progress: { math: 1 } })
  await b.sync(null)
  await a.sync({ progress: { math: 1, art: 2 } })
  let raced = false
  const result = await b.sync({ progress: { math: 1, logic: 3 } }, async (local, remote) => {
    if (!raced) {
      raced = true
      await a.sync({ progress: { math: 1, art: 2, music: 5 } })
    }
    return unionMerge(local, remote)
  })
  t.strictSame(result, { progress: { math: 1, logic: 3, art: 2, music: 5 } })
  t.strictSame(await a.download(), result, 'the server holds all three edits')
  t.strictSame(log, ['GET /api/sync/:id -> 200', 'GET /api/sync/:id -> 200', 'GET /info -> 200', 'PUT /api/sync/:id -> 412', 'GET /api/sync/:id -> 200', 'PUT /api/sync/:id -> 200'])

  const stubborn = device({ userId, key, mergeRounds: 3 })
  let round = 0
  await t.rejects(stubborn.sync({ progress: { chess: 1 } }, async (local, remote) => {
    await a.sync({ progress: { ...remote.progress, [`race${++round}`]: round } })
    return unionMerge(local, remote)
  }), ConflictError, 'another upload during every merge: a ConflictError after mergeRounds')
  t.equal(round, 3)
  t.strictSame(await a.download(), { progress: { ...result!.progress, race1: 1, race2: 2, race3: 3 } }, 'and nothing was overwritten')
})

t.test('a merge whose upload failed is merged again on the next sync, never uploaded over the other device\'s data', async (t) => {
  const userId = newUserId()
  const key = await generateKey()
  const a = device({ userId, key })
  await a.sync({ progress: { math: 1 } })
  // B's network fails for its uploads only.
  const log: string[] = []
  const flaky: typeof fetch = async (input, init) => {
    if (init?.method === 'PUT') throw new TypeError('fetch failed')
    return await fetch(input, init)
  }
  const b = device({ userId, key, retries: 1, fetch: recording(log, flaky) })
  const localB = await b.sync(null)
  await a.sync({ progress: { math: 1, art: 2 } })
  await t.rejects(b.sync({ progress: { ...localB!.progress, logic: 3 } }), UnavailableError)
  t.strictSame(log.slice(1), ['GET /api/sync/:id -> 200', 'GET /info -> 200', 'PUT /api/sync/:id -> network error', 'PUT /api/sync/:id -> network error'],
    'one retry, then the typed error')
  // B still holds its unmerged edit; with the network back, the next sync merges A's change in.
  const healed = device({ userId, key, state: b.state })
  t.strictSame(await healed.sync({ progress: { ...localB!.progress, logic: 3 } }), { progress: { math: 1, art: 2, logic: 3 } })
  t.strictSame(await a.download(), { progress: { math: 1, art: 2, logic: 3 } })
})

t.test('versions, a preview of one, and restore: the restored data comes back and syncs as it is', async (t) => {
  const userId = newUserId()
  const key = await generateKey()
  const client = device({ userId, key })
  t.strictSame(await client.versions(), [], 'no record, no versions')
  await client.upload({ progress: { math: 9, logic: 8 } })
  // A reset device uploads its empty data over it.
  await device({ userId, key }).upload({ progress: {} })
  const list = await client.versions()
  t.strictSame(list.map((entry) => [entry.current, entry.size > 16]), [[true, true], [false, true]], 'newest first, metadata only')
  t.notOk('data' in list[0]! || 'encryptedBlob' in list[0]!)
  const lost = list[1]!.version
  t.strictSame(await client.version(lost), { progress: { math: 9, logic: 8 } }, 'a preview decrypts')
  const restored = await client.restore(lost)
  t.strictSame(restored, { progress: { math: 9, logic: 8 } })
  t.equal((await client.versions()).length, 3, 'the restore is a new version; the empty upload is kept')
  const log: string[] = []
  const after = device({ userId, key, state: client.state }, log)
  t.strictSame(await after.sync(restored), restored)
  t.strictSame(log, ['GET /api/sync/:id -> 304'], 'the restored data is what the server has: nothing to send')
  await t.rejects(client.version(12345), NotFoundError, 'a version that is not kept')
  await t.rejects(client.restore(0), TypeError)
})

t.test('data larger than the service takes is a TooLargeError before anything is sent; the largest that fits round trips', async (t) => {
  const userId = newUserId()
  const key = await generateKey()
  const log: string[] = []
  const client = new SyncClient<string>({ baseUrl, userId, key, fetch: recording(log) })
  // JSON of a string: its characters plus two quotes; the ciphertext adds GCM's 16-byte tag.
  const largest = randomBytes(750_000).toString('base64').slice(0, 1_000_000 - 16 - 2)
  await t.rejects(client.upload(largest + 'x'), { name: 'TooLargeError', size: 1_000_001, limit: 1_000_000 })
  await t.rejects(client.sync(largest + 'x'), TooLargeError)
  t.strictSame(log.filter((line) => line.startsWith('PUT')), [], 'no upload was sent')
  await client.upload(largest)
  const size = (await db.query('SELECT blob_size FROM user_sync_versions WHERE user_id = $1', [userId])).rows[0].blob_size
  t.equal(size, 1_000_000, 'exactly the limit')
  t.equal(await device({ userId, key }).download(), largest)
})

t.test('429: waits for Retry-After and goes on; beyond the retries or the delay bound, a RateLimitError that says when', async (t) => {
  const limited = await build(t, { env: { RATE_LIMIT_MAX: '2', RATE_LIMIT_WINDOW: '2s' } })
  const limitedUrl = await listen(limited)
  const userId = newUserId()
  const key = await generateKey()
  const log: string[] = []
  const client = new SyncClient({ baseUrl: limitedUrl, userId, key, fetch: recording(log), retryDelay: { baseMs: 10 } })
  await client.upload({ n: 1 })
  await client.upload({ n: 2 })
  t.strictSame(await client.download(), { n: 2 }, 'the third request of the window waited for the next window')
  t.strictSame(log.filter((line) => line.startsWith('GET /api')), ['GET /api/sync/:id -> 429', 'GET /api/sync/:id -> 200'])
  const impatient = new SyncClient({ baseUrl: limitedUrl, userId, key, fetch: recording(log), retryDelay: { baseMs: 10, maxMs: 100 } })
  await impatient.download()
  const err = await impatient.download().catch((err: unknown) => err)
  t.type(err, RateLimitError)
  t.equal((err as RateLimitError).retryAfter! >= 1, true, 'it carries the Retry-After')
  t.equal(log.at(-1), 'GET /api/sync/:id -> 429', 'a Retry-After above maxMs is not waited for')
  const noRetries = new SyncClient({ baseUrl: limitedUrl, userId, key, retries: 0 })
  await t.rejects(noRetries.download(), RateLimitError)
})

t.test('the service stopped: a sync fails with UnavailableError after its retries; restarted, the same edit syncs', async (t) => {
  const own = await build(t)
  const ownUrl = await listen(own)
  const port = Number(new URL(ownUrl).port)
  const userId = newUserId()
  const key = await generateKey()
  const log: string[] = []
  const client = new SyncClient<Progress>({ baseUrl: ownUrl, userId, key, fetch: recording(log), retries: 2, retryDelay: { baseMs: 10 } })
  let local = await client.sync({ progress: { math: 1 } })
  await own.close()
  local = { progress: { ...local!.progress, logic: 2 } }
  await t.rejects(client.sync(local), UnavailableError)
  t.strictSame(log.slice(-3), Array(3).fill('GET /api/sync/:id -> network error'), 'three tries')
  const again = await build(t, { env: { DATABASE_URL: databaseUrlOf(own) } })
  await listen(again, port)
  t.strictSame(await client.sync(local), { progress: { math: 1, logic: 2 } })
  t.strictSame(await new SyncClient({ baseUrl: ownUrl, userId, key }).download(), { progress: { math: 1, logic: 2 } }, 'the edit reached the server')
})

t.test('503 with the database down: retried after Retry-After, or a typed error at once when that is beyond the bound', async (t) => {
  // The service's database is stopped by terminating its connections and refusing new ones.
  const own = await build(t)
  const ownUrl = await listen(own)
  const url = databaseUrlOf(own)
  const name = new URL(url).pathname.slice(1)
  const userId = newUserId()
  const key = await generateKey()
  await new SyncClient({ baseUrl: ownUrl, userId, key }).upload({ v: 1 })
  const outage = async (on: boolean) => {
    await db.query(`ALTER DATABASE "${name}" ALLOW_CONNECTIONS ${on ? 'false' : 'true'}`)
    if (on) await db.query('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1', [name])
  }
  await outage(true)
  t.teardown(() => outage(false))
  const impatient = new SyncClient({ baseUrl: ownUrl, userId, key, retryDelay: { maxMs: 1_000 } })
  const err = await impatient.download().catch((err: unknown) => err)
  t.type(err, UnavailableError)
  t.equal((err as UnavailableError).status, 503)
  t.equal((err as UnavailableError).retryAfter, 5, 'the service\'s Retry-After, passed on')
  // A patient client waits the 5 seconds; the database comes back during the first wait.
  const log: string[] = []
  const patient = new SyncClient({
    baseUrl: ownUrl,
    userId,
    key,
    fetch: recording(log, async (input, init) => {
      const response = await fetch(input, init)
      if (response.status === 503) await outage(false)
      return response
    })
  })
  t.strictSame(await patient.download(), { v: 1 })
  t.strictSame(log, ['GET /api/sync/:id -> 503', 'GET /api/sync/:id -> 200'])
})
