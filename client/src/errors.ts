/**
 * What went wrong, as a type an app can branch on (`err instanceof UnavailableError`, or
 * `err.kind === 'unavailable'` across bundles). No error carries data, key, token or iv.
 */
export type SyncErrorKind =
  | 'unavailable' | 'rate-limited' | 'unauthorized' | 'conflict' | 'not-found' | 'too-large'
  | 'integrity' | 'bad-request' | 'server'

export class SyncError extends Error {
  readonly kind: SyncErrorKind
  /** The HTTP status of the last answer, if there was one. */
  readonly status: number | undefined

  constructor (kind: SyncErrorKind, message: string, options: { status?: number, cause?: unknown } = {}) {
    super(message, { cause: options.cause })
    this.name = new.target.name
    this.kind = kind
    this.status = options.status
  }
}

/** The service could not be reached or said 502/503/504, on every try: try again later. */
export class UnavailableError extends SyncError {
  /** Seconds the service asked to wait (Retry-After), if it said. */
  readonly retryAfter: number | undefined

  constructor (message: string, options: { status?: number, cause?: unknown, retryAfter?: number } = {}) {
    super('unavailable', message, options)
    this.retryAfter = options.retryAfter
  }
}

/** 429: this user id or this address used up its budget; `retryAfter` says for how long. */
export class RateLimitError extends SyncError {
  readonly retryAfter: number | undefined

  constructor (message: string, options: { status?: number, retryAfter?: number } = {}) {
    super('rate-limited', message, options)
    this.retryAfter = options.retryAfter
  }
}

/**
 * 401 (or 429 with WWW-Authenticate): the record is claimed by another token. This device's key
 * is not the user's current one (a rotation left it behind, or someone else claimed the id):
 * pair again; retrying cannot help.
 */
export class UnauthorizedError extends SyncError {
  constructor (message: string, options: { status?: number } = {}) {
    super('unauthorized', message, options)
  }
}

/** 412: another device uploaded in between, more often than the merge loop tries. */
export class ConflictError extends SyncError {
  constructor (message: string, options: { status?: number } = {}) {
    super('conflict', message, options)
  }
}

/** 404 where something must exist: a version that is not kept (any more), or no record. */
export class NotFoundError extends SyncError {
  constructor (message: string, options: { status?: number } = {}) {
    super('not-found', message, options)
  }
}

/** The encrypted data is larger than the service takes (GET /info maxBlobBytes); nothing was sent. */
export class TooLargeError extends SyncError {
  readonly size: number
  readonly limit: number

  constructor (size: number, limit: number) {
    super('too-large', `the encrypted data is ${size} bytes; the service takes at most ${limit}`, { status: undefined })
    this.size = size
    this.limit = limit
  }
}

/**
 * The downloaded record does not check out: its checksum matches neither the ciphertext nor the
 * iv + ciphertext, or it does not decrypt with this key. Nothing local was changed.
 */
export class IntegrityError extends SyncError {
  constructor (message: string, options: { cause?: unknown } = {}) {
    super('integrity', message, options)
  }
}

/** Any other 4xx: a request this client should not have sent (a bug, or a newer service). */
export class RequestError extends SyncError {
  constructor (message: string, options: { status?: number } = {}) {
    super('bad-request', message, options)
  }
}

/** A 500 or another unexpected answer: not retried, since it is unlikely to pass by itself. */
export class ServerError extends SyncError {
  constructor (message: string, options: { status?: number, cause?: unknown } = {}) {
    super('server', message, options)
  }
}
