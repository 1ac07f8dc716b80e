import { ciphertextBytes, decryptJson, deriveAccessToken, encryptJson, isUserId, sha256Hex, type WireRecord } from './crypto.ts'
import {
  ConflictError, IntegrityError, NotFoundError, RateLimitError, RequestError, ServerError, TooLargeError,
  UnauthorizedError, UnavailableError
} from './errors.ts'
import { unionMerge, type Merge } from './merge.ts'

/** What the service takes when its /info cannot be read (the limit every release so far has had). */
const DEFAULT_MAX_BLOB_BYTES = 1_000_000

export interface SyncClientOptions {
  /** The service's root, e.g. `https://sync.example.org` (the API is under /api/sync). */
  baseUrl: string
  /** The user's id (a UUID, see newUserId). */
  userId: string
  /** The user's AES-256-GCM key (generateKey, importKey). Extractable, unless `token` is given. */
  key: CryptoKey
  /** The fetch to use (default: the global one). */
  fetch?: typeof fetch
  /**
   * The access token sent on every request: derived from the key by default; a string to send
   * that token instead (for a non-extractable key); `false` to send none, for fleets where
   * clients without tokens still share the record (claimed records then answer 401).
   */
  token?: string | false
  /** How often a request is tried again after a network error, 429, 502, 503 or 504 (default 4). */
  retries?: number
  /**
   * Backoff between tries: `baseMs` doubles with each try (default 500), with random jitter,
   * up to `maxMs` (default 30,000). A Retry-After longer than `maxMs` is not waited for: the
   * typed error carries it, for the app to try again later.
   */
  retryDelay?: { baseMs?: number, maxMs?: number }
  /** Gives up on a request that has no answer after this long, and tries again (default 60,000). */
  timeoutMs?: number
  /** How many times sync merges and uploads again after a 412 before a ConflictError (default 5). */
  mergeRounds?: number
  /** What an earlier client of this device knew (its `state`), to skip downloading unchanged data. */
  state?: SyncState
}

/**
 * What the client knows of the server: the ETag of the version this device last uploaded or
 * downloaded, and the SHA-256 of that data's JSON. Persist it with the data to keep polls cheap
 * across restarts; it holds nothing secret.
 */
export interface SyncState {
  etag: string | null
  digest: string | null
}

/** One entry of versions(): metadata only, no data. */
export interface VersionInfo {
  /** Pass it to restore() or version(). */
  version: number
  etag: string
  /** The uploading client's timestamp (ms since 1970 for this client). */
  timestamp: number
  /** When the server stored it (ISO 8601). */
  storedAt: string
  /** Bytes of its ciphertext. */
  size: number
  current: boolean
}

type Pulled<T> =
  | { kind: 'unchanged' }
  | { kind: 'missing' }
  | { kind: 'changed', data: T, json: string, digest: string, etag: string }

interface Request {
  method: string
  path: string
  headers?: Record<string, string>
  body?: string
  /** Statuses the caller handles itself; every other one becomes a typed error (or a retry). */
  expect: number[]
}

/** An answer, read in full inside the retries (a body cut off on the way is tried again). */
interface Answer {
  status: number
  etag: string | null
  text: string
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms))

/**
 * The JSON text of data the service can keep. `null` is refused: it would read as "no data" on
 * the other devices, and a merge that returns nothing must not wipe the record.
 */
function jsonOf (data: unknown, what: string): string {
  let json: string | undefined
  try {
    json = JSON.stringify(data)
  } catch {
    // Its message names the data's keys: not repeated.
    throw new TypeError(`${what} cannot be written as JSON (a cycle, or a BigInt?)`)
  }
  if (typeof json !== 'string' || json === 'null') {
    throw new TypeError(`${what} must be JSON data other than null (got ${data === null ? 'null' : typeof data})`)
  }
  return json
}

async function digestOf (json: string): Promise<string> {
  return await sha256Hex(json)
}

/** Parses what the service sent; never quotes it in the error (it may be someone's data). */
function parseAnswer<V> (answer: Answer): V {
  try {
    return JSON.parse(answer.text) as V
  } catch {
    throw new ServerError(`the service answered ${answer.status} with something that is not JSON`, { status: answer.status })
  }
}

function retryAfterSeconds (response: Response): number | undefined {
  const value = response.headers.get('retry-after')?.trim()
  if (value === undefined || value === '') return undefined
  if (/^\d+$/.test(value)) return Number(value)
  const date = Date.parse(value)
  return Number.isNaN(date) ? undefined : Math.max(0, Math.ceil((date - Date.now()) / 1000))
}

function errorText (text: string, response: Response): string {
  try {
    const body = JSON.parse(text) as { error?: unknown }
    if (typeof body.error === 'string') return body.error
  } catch {}
  return response.statusText || 'no message'
}

function count (value: number | undefined, fallback: number, name: string, minimum: number): number {
  if (value === undefined) return fallback
  if (!Number.isSafeInteger(value) || value < minimum) throw new TypeError(`${name} must be a whole number of at least ${minimum}`)
  return value
}

/** A user's encrypted record on a logikids-sync service. `T` is the app's data: anything JSON can hold. */
export class SyncClient<T = unknown> {
  readonly userId: string
  readonly #baseUrl: string
  readonly #key: CryptoKey
  readonly #fetch: typeof fetch
  readonly #tokenOption: string | false | undefined
  readonly #retries: number
  readonly #baseDelayMs: number
  readonly #maxDelayMs: number
  readonly #timeoutMs: number
  readonly #mergeRounds: number
  #token: Promise<string | null> | undefined
  #maxBlobBytes: number | undefined
  #state: SyncState
  /** The operations that move the state run one at a time, in the order they were called. */
  #queue: Promise<unknown> = Promise.resolve()
  #queued = 0
  /**
   * The digests of the data given to sync and upload calls not yet confirmed: calls still queued
   * or running, and calls that failed after their upload may have been stored. The app's later
   * data is an edit of these: found on the server, they are this device's own, not another's.
   */
  #unconfirmed: Array<Promise<string>> = []
  /** The JSON of the last data this client synced, by digest: the base of a three-way merge. */
  #known = new Map<string, string>()

  constructor (options: SyncClientOptions) {
    if (!isUserId(options.userId)) throw new TypeError('userId must be a UUID (see newUserId)')
    if (!(options.key instanceof CryptoKey) || options.key.algorithm.name !== 'AES-GCM') {
      throw new TypeError('key must be an AES-GCM CryptoKey (see generateKey and importKey)')
    }
    if ((options.key.algorithm as AesKeyAlgorithm).length !== 256) throw new TypeError('key must be an AES-256 key')
    this.userId = options.userId.toLowerCase()
    this.#baseUrl = new URL(options.baseUrl).href.replace(/\/+$/, '')
    this.#key = options.key
    this.#fetch = options.fetch ?? globalThis.fetch.bind(globalThis)
    this.#tokenOption = options.token
    this.#retries = count(options.retries, 4, 'retries', 0)
    this.#baseDelayMs = count(options.retryDelay?.baseMs, 500, 'retryDelay.baseMs', 0)
    this.#maxDelayMs = count(options.retryDelay?.maxMs, 30_000, 'retryDelay.maxMs', 0)
    this.#timeoutMs = count(options.timeoutMs, 60_000, 'timeoutMs', 1)
    // Timers take at most 2^31 - 1 ms; longer would fire at once.
    if (this.#timeoutMs > 2_147_483_647 || this.#maxDelayMs > 2_147_483_647) throw new TypeError('timeoutMs and retryDelay.maxMs must be under 2^31 ms')
    this.#mergeRounds = count(options.mergeRounds, 5, 'mergeRounds', 1)
    if (options.token !== undefined && options.token !== false &&
        (typeof options.token !== 'string' || !/^[A-Za-z0-9_-]{43,128}$/.test(options.token))) {
      throw new TypeError('token must be an access token (43 to 128 base64url characters), false, or left out')
    }
    if (options.token === undefined && !options.key.extractable) {
      throw new TypeError('the key is not extractable, so no token can be derived from it: pass `token` (deriveAccessToken of the raw key)')
    }
    this.#state = { etag: options.state?.etag ?? null, digest: options.state?.digest ?? null }
  }

  /** What this device knows of the server (see SyncState); a copy. */
  get state (): SyncState {
    return { ...this.#state }
  }

  /**
   * Encrypts `data` and stores it, replacing whatever the server has (the replaced version is
   * kept in the history). Returns the new ETag. To keep another device's changes, use sync().
   */
  async upload (data: T): Promise<string> {
    const json = jsonOf(data, 'the data')
    const digest = digestOf(json)
    this.#remember(digest)
    return await this.#exclusive(async () => {
      const etag = await this.#put(json, {})
      // An unconditional PUT is never refused with 412.
      if (etag === null) throw new ConflictError('the service refused an unconditional upload with 412', { status: 412 })
      this.#synced(etag, await digest, json)
      return etag
    })
  }

  /**
   * The decrypted data on the server, or null if there is none. It does not move the state:
   * to make it this device's data, pass it to sync() (which then uploads nothing).
   */
  async download (): Promise<T | null> {
    const pulled = await this.#pull(null)
    return pulled.kind === 'changed' ? pulled.data : null
  }

  /** Whether the server has a record for this user. */
  async exists (): Promise<boolean> {
    const answer = await this.#send({ method: 'POST', path: '/verify', expect: [200] })
    return parseAnswer<{ exists: boolean }>(answer).exists === true
  }

  /** Deletes the record and its whole history: it cannot be undone. Succeeds also when there was none. */
  async delete (): Promise<void> {
    await this.#exclusive(async () => {
      await this.#send({ method: 'DELETE', path: '', expect: [200] })
      this.#state = { etag: null, digest: null }
    })
  }

  /**
   * Brings this device and the server to the same data, and returns it: store the result as the
   * device's data. `local` is the device's data (null or undefined if it has none yet).
   *
   * - Only the server changed since the last sync: its data is returned.
   * - Only the device changed: `local` is uploaded (If-Match: the version it is based on).
   * - Both changed: `merge(local, remote, base)` decides (default unionMerge, three-way), and
   *   the result is uploaded. If another device uploads in between (412), it pulls, merges and tries again,
   *   up to `mergeRounds` times, then throws a ConflictError; nothing is ever overwritten blind.
   */
  async sync (local: T | null | undefined, merge: Merge<T> = unionMerge): Promise<T | null> {
    // `local` was made from the data of the last sync that had finished when this one was
    // called: that is its base, also if it runs after another call still in flight.
    // All of this before the first await: calls queue in the order they were made.
    const base = this.#state
    const own = [...this.#unconfirmed]
    // The device's data stays as it is for the whole call: its JSON and digest are made once.
    const json = local === null || local === undefined ? null : jsonOf(local, 'the local data')
    const digest = json === null ? null : digestOf(json)
    if (digest !== null) this.#remember(digest)
    return await this.#exclusive(async () =>
      this.#sync(local ?? null, json === null ? null : { json, digest: await digest! }, merge, base, await Promise.all(own)))
  }

  async #sync (
    local: T | null, localText: { json: string, digest: string } | null, merge: Merge<T>, base: SyncState, own: string[]
  ): Promise<T | null> {
    const digest = localText?.digest ?? null
    for (let round = 0; round < this.#mergeRounds; round++) {
      // Each round merges the device's own data with the newest version: a merge refused by a
      // 412 is not carried into the next one.
      let current = local
      let upload = localText
      // A device without data downloads in full, whatever its state says.
      const pulled = await this.#pull(localText === null ? null : base.etag)
      let condition: { ifMatch: string } | { ifNoneMatch: '*' }
      if (pulled.kind === 'unchanged') {
        // The server is still at the base.
        if (digest === base.digest) {
          return current
        }
        condition = { ifMatch: base.etag! }
      } else if (pulled.kind === 'missing') {
        if (localText === null) {
          this.#state = { etag: null, digest: null }
          return null
        }
        condition = { ifNoneMatch: '*' }
      } else {
        // The server's data is taken as it is when this device has nothing of its own to add.
        if (localText === null || digest === base.digest || digest === pulled.digest) {
          this.#synced(pulled.etag, pulled.digest, pulled.json)
          return pulled.data
        }
        // Nothing to merge when the server holds what `local` was edited from: the base itself
        // (uploaded again, or restored), or this device's own earlier data (a call before this
        // one, or an upload whose answer was lost); nor in a record of null (another client's).
        const ours = pulled.digest === base.digest || own.includes(pulled.digest)
        if (pulled.data !== null && !ours) {
          current = await merge(current as T, pulled.data, await this.#baseData(base))
          const merged = jsonOf(current, 'what merge returned')
          upload = { json: merged, digest: await digestOf(merged) }
        }
        if (upload!.digest === pulled.digest) {
          this.#synced(pulled.etag, pulled.digest, pulled.json)
          return current
        }
        condition = { ifMatch: pulled.etag }
      }
      // Every way here has data to upload: a device without any returned above.
      const etag = await this.#put(upload!.json, condition)
      if (etag !== null) {
        this.#synced(etag, upload!.digest, upload!.json)
        return current
      }
      // 412: another device uploaded in between. The base stays, so the next round pulls the
      // new version and merges again: nothing is uploaded over data this call has not seen.
      await sleep(Math.random() * this.#baseDelayMs)
    }
    throw new ConflictError(`other devices uploaded during each of ${this.#mergeRounds} merges; try again later`, { status: 412 })
  }

  /** The current version and the kept ones, newest first, without data. */
  async versions (): Promise<VersionInfo[]> {
    const answer = await this.#send({ method: 'GET', path: '/versions', expect: [200, 404] })
    if (answer.status === 404) return []
    return parseAnswer<{ versions: VersionInfo[] }>(answer).versions
  }

  /** The decrypted data of one kept version, to show the user before restoring it. */
  async version (version: number): Promise<T> {
    const answer = await this.#send({ method: 'GET', path: `/versions/${versionPath(version)}`, expect: [200] })
    return parseData<T>(await decryptJson(this.#key, parseAnswer<WireRecord>(answer)))
  }

  /**
   * Makes a kept version current again (as a new version; what it replaces is kept, so this can
   * be undone the same way) and returns its data: store it as the device's data. A ConflictError
   * if another device uploaded meanwhile; list the versions again.
   */
  async restore (version: number): Promise<T> {
    const path = `/versions/${versionPath(version)}/restore`
    return await this.#exclusive(async () => {
      const current = (await this.versions()).find((entry) => entry.current)
      if (current === undefined) throw new NotFoundError('there is no record to restore into', { status: 404 })
      const answer = await this.#send({ method: 'POST', path, headers: { 'if-match': `"${current.etag}"` }, expect: [200, 412] })
      if (answer.status === 412) {
        throw new ConflictError('another device uploaded while restoring; list the versions again', { status: 412 })
      }
      // What is current now: the restored version, or an upload that came right after it.
      const pulled = await this.#pull(null)
      if (pulled.kind !== 'changed') throw new NotFoundError('the record was deleted right after the restore', { status: 404 })
      this.#synced(pulled.etag, pulled.digest, pulled.json)
      return pulled.data
    })
  }

  async #exclusive<R> (operation: () => Promise<R>): Promise<R> {
    this.#queued++
    const result = this.#queue.then(operation)
    this.#queue = result.then(() => {
      // Confirmed once the last queued call succeeded: the state holds what the server has.
      if (--this.#queued === 0) this.#unconfirmed = []
    }, () => { this.#queued-- })
    return await result
  }

  #remember (digest: Promise<string>): void {
    this.#unconfirmed = [...this.#unconfirmed, digest].slice(-64)
  }

  /** Moves the state to data this client has in hand, and keeps that data as a merge base. */
  #synced (etag: string, digest: string, json: string): void {
    this.#state = { etag, digest }
    this.#known.set(digest, json)
    // The current base and the one before it (a call queued behind may still use that).
    while (this.#known.size > 2) this.#known.delete(this.#known.keys().next().value!)
  }

  /**
   * The data `base` names, for a three-way merge: kept from the last syncs, else downloaded from
   * the service's version history; undefined when that version is no longer kept.
   */
  async #baseData (base: SyncState): Promise<T | undefined> {
    if (base.etag === null || base.digest === null) return undefined
    const json = this.#known.get(base.digest)
    if (json !== undefined) return JSON.parse(json) as T
    const kept = (await this.versions()).find((entry) => `"${entry.etag}"` === base.etag)
    if (kept === undefined) return undefined
    const data = await this.version(kept.version).catch((err: unknown) => {
      if (err instanceof NotFoundError) return undefined
      throw err
    })
    return data !== undefined && await digestOf(JSON.stringify(data)) === base.digest ? data : undefined
  }

  /** GET, with If-None-Match when `ifNoneMatch` is an ETag. */
  async #pull (ifNoneMatch: string | null): Promise<Pulled<T>> {
    const headers: Record<string, string> = {}
    if (ifNoneMatch !== null) headers['if-none-match'] = ifNoneMatch
    const answer = await this.#send({ method: 'GET', path: '', headers, expect: ifNoneMatch === null ? [200, 404] : [200, 304, 404] })
    if (answer.status === 304) return { kind: 'unchanged' }
    if (answer.status === 404) return { kind: 'missing' }
    // Without the version it is based on, a merge could only be uploaded blind.
    if (answer.etag === null) throw new ServerError('the service sent data without an ETag: is a proxy dropping it?', { status: 200 })
    const data = parseData<T>(await decryptJson(this.#key, parseAnswer<WireRecord>(answer)))
    // The data as this client would upload it, so that local and remote compare.
    const json = JSON.stringify(data)
    return { kind: 'changed', data, json, digest: await digestOf(json), etag: answer.etag }
  }

  /** Uploads JSON text; the new ETag, or null on 412. */
  async #put (json: string, condition: { ifMatch?: string, ifNoneMatch?: string }): Promise<string | null> {
    const limit = await this.#blobLimit()
    const size = ciphertextBytes(json)
    if (size > limit) throw new TooLargeError(size, limit)
    const record = await encryptJson(this.#key, json, Date.now())
    const headers: Record<string, string> = { 'content-type': 'application/json' }
    if (condition.ifMatch !== undefined) headers['if-match'] = condition.ifMatch
    if (condition.ifNoneMatch !== undefined) headers['if-none-match'] = condition.ifNoneMatch
    const answer = await this.#send({ method: 'PUT', path: '', headers, body: JSON.stringify(record), expect: [200, 412] })
    if (answer.status === 412) return null
    if (answer.etag === null) throw new ServerError('the service sent no ETag: is a proxy dropping it?', { status: 200 })
    return answer.etag
  }

  async #blobLimit (): Promise<number> {
    if (this.#maxBlobBytes !== undefined) return this.#maxBlobBytes
    try {
      const response = await this.#fetchWithTimeout(`${this.#baseUrl}/info`, { method: 'GET' })
      const info = response.ok ? await response.json() as { maxBlobBytes?: unknown } : {}
      if (!response.ok) await response.body?.cancel()
      if (typeof info.maxBlobBytes === 'number') this.#maxBlobBytes = info.maxBlobBytes
    } catch {}
    // Unread (a network error, an older service): the default; the service checks again anyway.
    return this.#maxBlobBytes ?? DEFAULT_MAX_BLOB_BYTES
  }

  async #authorization (): Promise<string | null> {
    if (this.#tokenOption === false) return null
    if (typeof this.#tokenOption === 'string') return this.#tokenOption
    this.#token ??= deriveAccessToken(this.#key, this.userId)
    return await this.#token
  }

  async #fetchWithTimeout (url: string, init: RequestInit): Promise<Response> {
    // The API never redirects: a redirect means a wrong baseUrl, and following one would turn
    // an upload into a GET that looks like success.
    return await this.#fetch(url, { ...init, redirect: 'manual', signal: AbortSignal.timeout(this.#timeoutMs) })
  }

  #delay (attempt: number, retryAfter: number | undefined): number {
    return retryDelayMs(attempt, retryAfter, this.#baseDelayMs, this.#maxDelayMs, Math.random())
  }

  /** One request, with the token, retried on network errors, 429, 502, 503 and 504; read in full. */
  async #send (request: Request): Promise<Answer> {
    const url = `${this.#baseUrl}/api/sync/${this.userId}${request.path}`
    const token = await this.#authorization()
    const headers: Record<string, string> = { ...request.headers }
    if (token !== null) headers.authorization = `Bearer ${token}`
    for (let attempt = 0; ; attempt++) {
      let response: Response
      let text: string
      try {
        response = await this.#fetchWithTimeout(url, { method: request.method, headers, body: request.body })
        text = await response.text()
      } catch (err) {
        if (attempt >= this.#retries) {
          throw new UnavailableError(`the service could not be reached (${attempt + 1} ${attempt === 0 ? 'try' : 'tries'})`, { cause: err })
        }
        await sleep(this.#delay(attempt, undefined))
        continue
      }
      const status = response.status
      if (response.type === 'opaqueredirect' || (status >= 300 && status < 400 && status !== 304)) {
        throw new RequestError('the service answered with a redirect: set baseUrl to its final address (https?)', { status })
      }
      if (request.expect.includes(status)) return { status, etag: response.headers.get('etag'), text }
      const retryAfter = retryAfterSeconds(response)
      if (status === 401 || (status === 429 && response.headers.has('www-authenticate'))) {
        throw new UnauthorizedError(this.#tokenOption === false
          ? 'the record is claimed by a token, and this client sends none (token: false)'
          : 'the record belongs to another key: this device must pair again', { status })
      }
      if (status === 429 || status === 502 || status === 503 || status === 504) {
        const delay = this.#delay(attempt, retryAfter)
        if (attempt >= this.#retries || delay > this.#maxDelayMs) {
          const tries = `${attempt + 1} ${attempt === 0 ? 'try' : 'tries'}`
          if (status === 429) {
            throw new RateLimitError(`rate limited (${tries}); retry after ${retryAfter ?? '?'} s`, { status, retryAfter })
          }
          throw new UnavailableError(`the service is unavailable (${status}, ${tries})`, { status, retryAfter })
        }
        await sleep(delay)
        continue
      }
      const message = errorText(text, response)
      if (status === 404) throw new NotFoundError(message, { status })
      if (status === 412) throw new ConflictError(message, { status })
      if (status >= 400 && status < 500) throw new RequestError(`${status}: ${message}`, { status })
      throw new ServerError(`${status}: ${message}`, { status })
    }
  }
}

/**
 * How long to wait before try `attempt + 1` (0-based): `baseMs` doubled per try, capped at
 * `maxMs`, spread over its upper half by `random` (0 to 1) so that devices that failed together
 * do not come back together; never shorter than the service's Retry-After.
 */
export function retryDelayMs (attempt: number, retryAfter: number | undefined, baseMs: number, maxMs: number, random: number): number {
  const backoff = Math.min(maxMs, baseMs * 2 ** attempt)
  return Math.max(backoff / 2 + random * backoff / 2, (retryAfter ?? 0) * 1000)
}

/** The app's data from decrypted JSON text; an error never quotes it. */
function parseData<T> (json: string): T {
  try {
    return JSON.parse(json) as T
  } catch {
    throw new IntegrityError('the decrypted record is not JSON: was it written by another app?')
  }
}

function versionPath (version: number): string {
  if (!Number.isSafeInteger(version) || version < 1) throw new TypeError('a version is a positive whole number, as versions() lists it')
  return String(version)
}
