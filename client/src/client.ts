import { ciphertextBytes, decryptJson, deriveAccessToken, encryptJson, isUserId, sha256Hex, type WireRecord } from './crypto.ts'
import {
  ConflictError, NotFoundError, RateLimitError, RequestError, ServerError, TooLargeError,
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
  | { kind: 'changed', data: T, digest: string, etag: string | null }

interface Request {
  method: string
  path: string
  headers?: Record<string, string>
  body?: string
  /** Statuses the caller handles itself; every other one becomes a typed error (or a retry). */
  expect: number[]
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms))

async function digestOf (json: string): Promise<string> {
  return await sha256Hex(json)
}

function retryAfterSeconds (response: Response): number | undefined {
  const value = response.headers.get('retry-after')
  if (value === null) return undefined
  if (/^\d+$/.test(value.trim())) return Number(value.trim())
  const date = Date.parse(value)
  return Number.isNaN(date) ? undefined : Math.max(0, Math.ceil((date - Date.now()) / 1000))
}

async function errorText (response: Response): Promise<string> {
  try {
    const body = await response.json() as { error?: unknown }
    if (typeof body.error === 'string') return body.error
  } catch {}
  return response.statusText || 'no message'
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

  constructor (options: SyncClientOptions) {
    if (!isUserId(options.userId)) throw new TypeError('userId must be a UUID (see newUserId)')
    if (!(options.key instanceof CryptoKey) || options.key.algorithm.name !== 'AES-GCM') {
      throw new TypeError('key must be an AES-GCM CryptoKey (see generateKey and importKey)')
    }
    this.userId = options.userId.toLowerCase()
    this.#baseUrl = new URL(options.baseUrl).href.replace(/\/+$/, '')
    this.#key = options.key
    this.#fetch = options.fetch ?? globalThis.fetch.bind(globalThis)
    this.#tokenOption = options.token
    this.#retries = Math.max(0, options.retries ?? 4)
    this.#baseDelayMs = options.retryDelay?.baseMs ?? 500
    this.#maxDelayMs = options.retryDelay?.maxMs ?? 30_000
    this.#timeoutMs = options.timeoutMs ?? 60_000
    this.#mergeRounds = Math.max(1, options.mergeRounds ?? 5)
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
    const json = JSON.stringify(data)
    const etag = await this.#put(json, {})
    // An unconditional PUT is never refused with 412.
    if (etag === null) throw new ConflictError('the service refused an unconditional upload with 412', { status: 412 })
    this.#state = { etag, digest: await digestOf(json) }
    return etag
  }

  /** The decrypted data on the server, or null if there is none. */
  async download (): Promise<T | null> {
    const pulled = await this.#pull(false)
    if (pulled.kind !== 'changed') {
      this.#state = { etag: null, digest: null }
      return null
    }
    this.#state = { etag: pulled.etag, digest: pulled.digest }
    return pulled.data
  }

  /** Whether the server has a record for this user. */
  async exists (): Promise<boolean> {
    const response = await this.#send({ method: 'POST', path: '/verify', expect: [200] })
    const body = await response.json() as { exists: boolean }
    return body.exists
  }

  /** Deletes the record and its whole history: it cannot be undone. Succeeds also when there was none. */
  async delete (): Promise<void> {
    const response = await this.#send({ method: 'DELETE', path: '', expect: [200] })
    await response.body?.cancel()
    this.#state = { etag: null, digest: null }
  }

  /**
   * Brings this device and the server to the same data, and returns it: store the result as the
   * device's data. `local` is the device's data (null or undefined if it has none yet).
   *
   * - Only the server changed since the last sync: its data is returned.
   * - Only the device changed: `local` is uploaded (If-Match: the version it is based on).
   * - Both changed: `merge(local, remote)` decides (default unionMerge), and the result is
   *   uploaded. If another device uploads in between (412), it pulls, merges and tries again,
   *   up to `mergeRounds` times, then throws a ConflictError; nothing is ever overwritten blind.
   */
  async sync (local: T | null | undefined, merge: Merge<T> = unionMerge): Promise<T | null> {
    let current: T | null = local ?? null
    for (let round = 0; round < this.#mergeRounds; round++) {
      const json = current === null ? null : JSON.stringify(current)
      const digest = json === null ? null : await digestOf(json)
      // A device without data downloads in full, whatever its state says.
      const pulled = await this.#pull(json !== null)
      let condition: { ifMatch?: string, ifNoneMatch?: string }
      let basis = this.#state.etag
      if (pulled.kind === 'unchanged') {
        if (digest === this.#state.digest) return current
        condition = { ifMatch: basis! }
      } else if (pulled.kind === 'missing') {
        if (json === null) {
          this.#state = { etag: null, digest: null }
          return null
        }
        condition = { ifNoneMatch: '*' }
      } else {
        // The server's data is taken as it is when this device has nothing of its own to add.
        if (json === null || digest === this.#state.digest || digest === pulled.digest) {
          this.#state = { etag: pulled.etag, digest: pulled.digest }
          return pulled.data
        }
        current = await merge(current as T, pulled.data)
        const mergedJson = JSON.stringify(current)
        const mergedDigest = await digestOf(mergedJson)
        if (mergedDigest === pulled.digest) {
          this.#state = { etag: pulled.etag, digest: pulled.digest }
          return current
        }
        // Until the upload succeeds, the state stays at the version this device had: if the
        // upload fails, the next sync pulls and merges again instead of uploading over it.
        basis = pulled.etag
        condition = basis === null ? {} : { ifMatch: basis }
      }
      const upload = JSON.stringify(current)
      const etag = await this.#put(upload, condition)
      if (etag !== null) {
        this.#state = { etag, digest: await digestOf(upload) }
        return current
      }
      // 412: another device uploaded in between; pull its version and merge again.
      await sleep(Math.random() * this.#baseDelayMs)
    }
    throw new ConflictError(`other devices uploaded during each of ${this.#mergeRounds} merges; try again later`, { status: 412 })
  }

  /** The current version and the kept ones, newest first, without data. */
  async versions (): Promise<VersionInfo[]> {
    const response = await this.#send({ method: 'GET', path: '/versions', expect: [200, 404] })
    if (response.status === 404) {
      await response.body?.cancel()
      return []
    }
    return (await response.json() as { versions: VersionInfo[] }).versions
  }

  /** The decrypted data of one kept version, to show the user before restoring it. */
  async version (version: number): Promise<T> {
    const response = await this.#send({ method: 'GET', path: `/versions/${versionPath(version)}`, expect: [200] })
    return JSON.parse(await decryptJson(this.#key, await response.json() as WireRecord)) as T
  }

  /**
   * Makes a kept version current again (as a new version; what it replaces is kept, so this can
   * be undone the same way) and returns its data: store it as the device's data. A ConflictError
   * if another device uploaded meanwhile; list the versions again.
   */
  async restore (version: number): Promise<T> {
    const current = (await this.versions()).find((entry) => entry.current)
    if (current === undefined) throw new NotFoundError('there is no record to restore into', { status: 404 })
    const response = await this.#send({
      method: 'POST',
      path: `/versions/${versionPath(version)}/restore`,
      headers: { 'if-match': `"${current.etag}"` },
      expect: [200, 412]
    })
    await response.body?.cancel()
    if (response.status === 412) {
      throw new ConflictError('another device uploaded while restoring; list the versions again', { status: 412 })
    }
    const data = await this.download()
    if (data === null) throw new NotFoundError('the record was deleted right after the restore', { status: 404 })
    return data
  }

  async #pull (conditional: boolean): Promise<Pulled<T>> {
    const headers: Record<string, string> = {}
    if (conditional && this.#state.etag !== null) headers['if-none-match'] = this.#state.etag
    const response = await this.#send({ method: 'GET', path: '', headers, expect: [200, 304, 404] })
    if (response.status === 304) return { kind: 'unchanged' }
    if (response.status === 404) {
      await response.body?.cancel()
      return { kind: 'missing' }
    }
    const etag = response.headers.get('etag')
    const json = await decryptJson(this.#key, await response.json() as WireRecord)
    const data = JSON.parse(json) as T
    // The digest of the data as this client would upload it, so that local and remote compare.
    return { kind: 'changed', data, digest: await digestOf(JSON.stringify(data)), etag }
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
    const response = await this.#send({ method: 'PUT', path: '', headers, body: JSON.stringify(record), expect: [200, 412] })
    await response.body?.cancel()
    if (response.status === 412) return null
    const etag = response.headers.get('etag')
    if (etag === null) throw new ServerError('the service sent no ETag: is it older than the ETag release, or behind a proxy that drops it?', { status: 200 })
    return etag
  }

  async #blobLimit (): Promise<number> {
    if (this.#maxBlobBytes !== undefined) return this.#maxBlobBytes
    try {
      const response = await this.#fetchWithTimeout(`${this.#baseUrl}/info`, { method: 'GET' })
      if (response.ok) {
        const info = await response.json() as { maxBlobBytes?: unknown }
        if (typeof info.maxBlobBytes === 'number') this.#maxBlobBytes = info.maxBlobBytes
      } else {
        await response.body?.cancel()
      }
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
    return await this.#fetch(url, { ...init, signal: AbortSignal.timeout(this.#timeoutMs) })
  }

  #delay (attempt: number, retryAfter: number | undefined): number {
    const backoff = Math.min(this.#maxDelayMs, this.#baseDelayMs * 2 ** attempt)
    // Full jitter on the upper half: devices that failed together do not come back together.
    const jittered = backoff / 2 + Math.random() * backoff / 2
    return Math.max(jittered, (retryAfter ?? 0) * 1000)
  }

  /** One request, with the token, retried on network errors, 429, 502, 503 and 504. */
  async #send (request: Request): Promise<Response> {
    const url = `${this.#baseUrl}/api/sync/${this.userId}${request.path}`
    const token = await this.#authorization()
    const headers: Record<string, string> = { ...request.headers }
    if (token !== null) headers.authorization = `Bearer ${token}`
    for (let attempt = 0; ; attempt++) {
      let response: Response
      try {
        response = await this.#fetchWithTimeout(url, { method: request.method, headers, body: request.body })
      } catch (err) {
        if (attempt >= this.#retries) {
          throw new UnavailableError(`the service could not be reached (${this.#retries + 1} tries)`, { cause: err })
        }
        await sleep(this.#delay(attempt, undefined))
        continue
      }
      if (request.expect.includes(response.status)) return response
      const status = response.status
      const retryAfter = retryAfterSeconds(response)
      const refusedToken = status === 401 || (status === 429 && response.headers.has('www-authenticate'))
      if (refusedToken) {
        await response.body?.cancel()
        throw new UnauthorizedError('the record belongs to another key: this device must pair again', { status })
      }
      if (status === 429 || status === 502 || status === 503 || status === 504) {
        await response.body?.cancel()
        const delay = this.#delay(attempt, retryAfter)
        if (attempt >= this.#retries || delay > this.#maxDelayMs) {
          const tries = attempt + 1
          if (status === 429) {
            throw new RateLimitError(`rate limited (${tries} ${tries === 1 ? 'try' : 'tries'}); retry after ${retryAfter ?? '?'} s`, { status, retryAfter })
          }
          throw new UnavailableError(`the service is unavailable (${status}, ${tries} ${tries === 1 ? 'try' : 'tries'})`, { status, retryAfter })
        }
        await sleep(delay)
        continue
      }
      const message = await errorText(response)
      if (status === 404) throw new NotFoundError(message, { status })
      if (status === 412) throw new ConflictError(message, { status })
      if (status >= 400 && status < 500) throw new RequestError(`${status}: ${message}`, { status })
      throw new ServerError(`${status}: ${message}`, { status })
    }
  }
}

function versionPath (version: number): string {
  if (!Number.isSafeInteger(version) || version < 1) throw new TypeError('a version is a positive whole number, as versions() lists it')
  return String(version)
}
