import t from 'tap'
import { randomBytes } from 'node:crypto'
import type { AddressInfo } from 'node:net'
import type { FastifyInstance } from 'fastify'
import { retryDelayMs } from '../src/client.ts'
import {
  ConflictError, deriveAccessToken, exportKey, generateKey, importKey, IntegrityError, newUserId, NotFoundError, RateLimitError,
  SyncClient, TooLargeError, UnauthorizedError, UnavailableError, unionMerge, type SyncClientOptions
} from '../src/index.ts'
import { encryptJson } from '../src/crypto.ts'
import { build, databaseUrlOf, inspect } from '../../test/helper.ts'
import { fieldDownload, fieldImportQrKey, fieldQrKey, fieldUpload } from './fixtures/field-client.ts'

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
  t.strictSame(other.state, { etag: null, digest: null }, 'a download does not move the state')
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

t.test('nothing that would wipe the record is uploaded: null data, a merge that returns nothing', async (t) => {
  const userId = newUserId()
  const key = await generateKey()
  const a = device({ userId, key })
  await a.sync({ progress: { math: 1 } })
  const log: string[] = []
  const b = device({ userId, key }, log)
  await t.rejects(b.upload(null as unknown as Progress), { name: 'TypeError', message: /other than null/ })
  await t.rejects(b.sync({ progress: { logic: 2 } }, () => undefined as unknown as Progress), { name: 'TypeError', message: /what merge returned/ })
  await t.rejects(b.sync({ progress: { logic: 2 } }, () => null as unknown as Progress), { name: 'TypeError', message: /what merge returned/ })
  await t.rejects(b.sync({ progress: { logic: 2 } }, () => { throw new Error('app bug') }), /app bug/)
  t.strictSame(log.filter((line) => line.startsWith('PUT')), [], 'no upload')
  t.strictSame(await a.download(), { progress: { math: 1 } })
  t.throws(() => new SyncClient({ baseUrl, userId, key, retries: Number.NaN }), /retries must be a whole number/)
  t.throws(() => new SyncClient({ baseUrl, userId, key, timeoutMs: Infinity }), /timeoutMs/)
  t.throws(() => new SyncClient({ baseUrl, userId: 'not-a-uuid', key }), /UUID/)
})

t.test('a record of JSON null from another client is replaced by local data without a merge; one that is not JSON is an IntegrityError that quotes nothing', async (t) => {
  const userId = newUserId()
  const key = await generateKey()
  const put = async (plaintext: string) => {
    const record = await encryptJson(key, plaintext, Date.now())
    const res = await fetch(`${baseUrl}/api/sync/${userId}`, { method: 'PUT', headers: { 'content-type': 'application/json' }, body: JSON.stringify(record) })
    t.equal(res.status, 200)
  }
  await put('null')
  let merged = 0
  const client = device({ userId, key, token: false })
  t.strictSame(await client.sync({ progress: { math: 2 } }, (local, remote) => { merged++; return unionMerge(local, remote) }), { progress: { math: 2 } })
  t.equal(merged, 0)
  t.strictSame(await client.download(), { progress: { math: 2 } })
  t.strictSame(unionMerge({ a: 1 }, null), { a: 1 }, 'unionMerge keeps local data over a remote null')
  await put('child name: Zoë')
  const err = await client.download().catch((err: unknown) => err) as Error
  t.type(err, IntegrityError)
  t.notMatch(`${err.message} ${String(err.cause)}`, /Zo|child/, 'the error does not quote the decrypted text')
})

t.test('a proxy that drops the ETag, answers a 304 nobody asked for, or redirects: a typed error, and nothing is uploaded blind', async (t) => {
  const userId = newUserId()
  const key = await generateKey()
  const a = device({ userId, key })
  await a.sync({ progress: { math: 1 } })
  const b = device({ userId, key })
  const localB = await b.sync(null)
  await a.sync({ progress: { math: 1, art: 2 } })
  // Each wrapper stands for a proxy between the client and the real service.
  const rewrite = (change: (response: Response) => Response) => async (input: Parameters<typeof fetch>[0], init?: RequestInit) =>
    change(await fetch(input, init))
  const log: string[] = []
  const noEtag = device({
    userId,
    key,
    state: b.state,
    fetch: recording(log, rewrite((response) => {
      const headers = new Headers(response.headers)
      headers.delete('etag')
      return new Response(response.body, { status: response.status, headers })
    }))
  })
  await t.rejects(noEtag.sync({ progress: { ...localB!.progress, logic: 3 } }), { name: 'ServerError', message: /without an ETag/ })
  t.strictSame(log, ['GET /api/sync/:id -> 200'], 'no upload without the version it is based on')

  const fresh = device({ userId, key, fetch: rewrite(() => new Response(null, { status: 304 })) })
  await t.rejects(fresh.sync(null), { name: 'ServerError', message: /304/ }, 'a 304 to a request without If-None-Match')

  // A proxy that answers uploads with a redirect (as a misconfigured http-to-https one does).
  const redirected = device({
    userId,
    key,
    state: b.state,
    fetch: async (input, init) =>
      init?.method === 'PUT' ? new Response(null, { status: 303, headers: { location: '/elsewhere' } }) : await fetch(input, init)
  })
  await t.rejects(redirected.upload({ progress: { logic: 3 } }), { name: 'RequestError', message: /redirect/ })
  t.strictSame(redirected.state, b.state, 'the state is not moved by an upload that did not happen')
  t.strictSame(await a.download(), { progress: { math: 1, art: 2 } })
})

t.test('two syncs at once on one client, and a download before a sync: each merges what it has not seen, nothing is lost', async (t) => {
  const userId = newUserId()
  const key = await generateKey()
  const b = device({ userId, key })
  // C's first GET is held back until B has uploaded and C's second sync has been called.
  let release!: () => void
  const released = new Promise<void>((resolve) => { release = resolve })
  let held = 0
  const c = device({
    userId,
    key,
    fetch: async (input, init) => {
      if ((init?.method ?? 'GET') === 'GET' && new URL(String(input)).pathname.startsWith('/api/') && held++ === 1) await released
      return await fetch(input, init)
    }
  })
  const start = await c.sync({ progress: { a: 1 } })
  await b.sync(await b.download())
  await b.sync({ progress: { ...start!.progress, c: 1 } })
  const first = c.sync({ progress: { ...start!.progress, y: 1 } })
  const second = c.sync({ progress: { ...start!.progress, x: 1 } })
  release()
  const results = await Promise.all([first, second])
  t.strictSame(results[1], { progress: { a: 1, c: 1, y: 1, x: 1 } }, 'the second call, made before the first ended, merged its result')
  t.strictSame(await b.download(), { progress: { a: 1, c: 1, y: 1, x: 1 } }, 'B\'s c, and both of C\'s edits')

  // A download shows the server's data but does not make it the device's: the next sync still merges.
  await b.sync({ progress: { a: 1, c: 1, y: 1, x: 1, d: 1 } })
  t.strictSame(await c.download(), { progress: { a: 1, c: 1, y: 1, x: 1, d: 1 } })
  t.strictSame(await c.sync({ ...results[1]!, progress: { ...results[1]!.progress, e: 1 } }), { progress: { a: 1, c: 1, y: 1, x: 1, d: 1, e: 1 } })
})

t.test('retry delays: doubling from baseMs, capped at maxMs, jittered over the upper half, never under Retry-After', async (t) => {
  t.strictSame([0, 1, 2, 3, 10].map((attempt) => retryDelayMs(attempt, undefined, 500, 30_000, 1)), [500, 1000, 2000, 4000, 30_000])
  t.strictSame([0, 1, 2, 3, 10].map((attempt) => retryDelayMs(attempt, undefined, 500, 30_000, 0)), [250, 500, 1000, 2000, 15_000])
  t.equal(retryDelayMs(0, 5, 500, 30_000, 0.5), 5000, 'Retry-After: 5 is waited for in full')
  t.equal(retryDelayMs(6, 5, 500, 30_000, 0.5), 22_500, 'the backoff when it is longer')
})

t.test('502, 504 and a 503 without Retry-After from a proxy are retried; a 400 or 500 is a typed error at once; a stalled answer times out', async (t) => {
  const userId = newUserId()
  const key = await generateKey()
  await device({ userId, key }).upload({ progress: { math: 1 } })
  // A reverse proxy in front of the service, failing the first answers of each kind.
  const proxy = (statuses: number[]): typeof fetch => async (input, init) => {
    const status = statuses.shift()
    if (status === undefined) return await fetch(input, init)
    return new Response(JSON.stringify({ error: `proxy says ${status}` }), { status, headers: { 'content-type': 'application/json' } })
  }
  const log: string[] = []
  const flaky = device({ userId, key, fetch: recording(log, proxy([502, 504, 503])) })
  t.strictSame(await flaky.download(), { progress: { math: 1 } })
  t.strictSame(log, ['GET /api/sync/:id -> 502', 'GET /api/sync/:id -> 504', 'GET /api/sync/:id -> 503', 'GET /api/sync/:id -> 200'])
  for (const [status, name] of [[400, 'RequestError'], [413, 'RequestError'], [500, 'ServerError']] as const) {
    const tries: string[] = []
    await t.rejects(device({ userId, key, fetch: recording(tries, proxy([status])) }).download(), { name, status, message: new RegExp(`proxy says ${status}`) })
    t.equal(tries.length, 1, `${status}: one try`)
  }
  // A server that accepts the connection and never answers.
  const { createServer } = await import('node:http')
  const silent = createServer(() => {})
  await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve))
  t.teardown(() => { silent.closeAllConnections(); silent.close() })
  const stalled = new SyncClient({ baseUrl: `http://127.0.0.1:${(silent.address() as AddressInfo).port}`, userId, key, timeoutMs: 200, retries: 1, retryDelay: { baseMs: 10 } })
  await t.rejects(stalled.download(), { name: 'UnavailableError', message: /2 tries/ })
})

t.test('the size limit is the one /info gives; a token given as a string is sent as it is; a non-extractable key needs one', async (t) => {
  const userId = newUserId()
  const raw = crypto.getRandomValues(new Uint8Array(32))
  const key = await crypto.subtle.importKey('raw', raw, 'AES-GCM', false, ['encrypt', 'decrypt'])
  t.throws(() => new SyncClient({ baseUrl, userId, key }), /not extractable/)
  const token = await deriveAccessToken(raw, userId)
  // A service that takes at most 100 bytes, as its /info says.
  const small: typeof fetch = async (input, init) => new URL(String(input)).pathname === '/info'
    ? new Response(JSON.stringify({ maxBlobBytes: 100 }), { headers: { 'content-type': 'application/json' } })
    : await fetch(input, init)
  const client = new SyncClient<string>({ baseUrl, userId, key, token, fetch: small })
  await t.rejects(client.upload('x'.repeat(83)), { name: 'TooLargeError', size: 101, limit: 100 })
  await client.upload('x'.repeat(82))
  const extractable = await importKey(Buffer.from(raw).toString('base64url'))
  t.equal(await new SyncClient<string>({ baseUrl, userId, key: extractable }).download(), 'x'.repeat(82), 'the derived token is the one sent')
  await t.rejects(new SyncClient({ baseUrl, userId, key, token: 'A'.repeat(43) }).download(), UnauthorizedError)
})

t.test('this device\'s own earlier data on the server is not merged against its later edit: an answer lost offline, two calls at once', async (t) => {
  const userId = newUserId()
  const key = await generateKey()
  let offline = false
  let puts = 0
  const log: string[] = []
  // The network drops the answer to the first upload, and everything after it until back online.
  const device1 = device({
    userId,
    key,
    retries: 1,
    fetch: recording(log, async (input, init) => {
      if (offline) throw new TypeError('fetch failed')
      const response = await fetch(input, init)
      if (init?.method === 'PUT' && ++puts === 2) {
        offline = true
        throw new TypeError('fetch failed')
      }
      return response
    })
  })
  let data = await device1.sync({ progress: { score: 3 } })
  data = { progress: { score: 4 } }
  await t.rejects(device1.sync(data), UnavailableError)
  t.strictSame(await device({ userId, key }).download(), { progress: { score: 4 } }, 'the upload was stored; its answer was lost')
  offline = false
  data = { progress: { score: 5 } } // the app kept its data, and the user edited it
  t.strictSame(await device1.sync(data), { progress: { score: 5 } })
  t.strictSame(await device({ userId, key }).download(), { progress: { score: 5 } }, 'the edit to 5 is not merged away')

  const device2 = device({ userId, key, state: device1.state })
  const results = await Promise.all([device2.sync({ progress: { score: 6 } }), device2.sync({ progress: { score: 7 } })])
  t.strictSame(results, [{ progress: { score: 6 } }, { progress: { score: 7 } }], 'the later call keeps its later value')
  t.strictSame(await device({ userId, key }).download(), { progress: { score: 7 } })
})

t.test('the default merge is three-way: a value only one device changed keeps that change, also after a restart and when the base was restored', async (t) => {
  t.strictSame(unionMerge({ k: 2, j: 1 }, { k: 1, j: 2 }, { k: 1, j: 1 }), { k: 2, j: 2 }, 'each side\'s own change')
  t.strictSame(unionMerge({ k: 2 }, { k: 3 }, { k: 1 }), { k: 3 }, 'both changed it: the remote change')
  t.strictSame(unionMerge({ k: 2 }, { k: 1 }, undefined), { k: 1 }, 'no base: the remote value')
  t.strictSame(unionMerge({ o: { a: 2, b: 1 } }, { o: { a: 1, b: 2 }, n: 1 }, { o: { a: 1, b: 1 } }), { o: { a: 2, b: 2 }, n: 1 }, 'nested')

  const userId = newUserId()
  const key = await generateKey()
  const a = device({ userId, key })
  const b = device({ userId, key })
  let dataA = await a.sync({ progress: { math: 1, logic: 1 } })
  let dataB = await b.sync(null)
  dataB = await b.sync({ progress: { ...dataB!.progress, logic: 2 } })
  dataA = await a.sync({ progress: { ...dataA!.progress, math: 2 } })
  t.strictSame(dataA, { progress: { math: 2, logic: 2 } }, 'A\'s change to math and B\'s to logic')

  // After a restart: the state is kept, the base comes from the service's version history.
  const log: string[] = []
  const restarted = device({ userId, key, state: a.state }, log)
  await b.sync({ progress: { ...(await b.sync(dataB))!.progress, logic: 3 } })
  t.strictSame(await restarted.sync({ progress: { ...dataA!.progress, math: 3 } }), { progress: { math: 3, logic: 3 } })
  t.ok(log.includes('GET /api/sync/:id/versions -> 200'), 'the base was read from the history')

  // B restores the version A's data was based on; A's unsynced edit goes on top of it.
  const base = (await restarted.versions()).find((entry) => `"${entry.etag}"` === restarted.state.etag)!
  await b.upload({ progress: { math: 0, logic: 0 } })
  const restored = await b.restore(base.version)
  t.strictSame(restored, { progress: { math: 3, logic: 3 } })
  t.strictSame(await restarted.sync({ progress: { math: 4, logic: 3 } }), { progress: { math: 4, logic: 3 } },
    'the server holds A\'s base again: A\'s edit is not merged away')
})

t.test('without a kept base (HISTORY_VERSIONS=0, after a restart), the base uploaded again by another device is still not merged against', async (t) => {
  const noHistory = await build(t, { env: { HISTORY_VERSIONS: '0' } })
  const url = await listen(noHistory)
  const userId = newUserId()
  const key = await generateKey()
  const a = new SyncClient<Progress>({ baseUrl: url, userId, key })
  const data = await a.sync({ progress: { math: 1 } })
  // Another device uploads the very same data again (a field client re-uploading, say).
  await new SyncClient<Progress>({ baseUrl: url, userId, key }).upload(data!)
  const restarted = new SyncClient<Progress>({ baseUrl: url, userId, key, state: a.state })
  t.strictSame(await restarted.versions().then((list) => list.length), 1, 'no history to read the base from')
  t.strictSame(await restarted.sync({ progress: { math: 2 } }), { progress: { math: 2 } })
  t.strictSame(await a.download(), { progress: { math: 2 } })
})
