import { createHash } from 'node:crypto'
import { LogController, type FastifyReply, type FastifyRequest, type FastifyServerOptions } from 'fastify'
import type { Config } from './plugins/config.ts'
import { USER_ID_PATTERN } from './schemas/sync.ts'

// The user id is the only secret standing between a stranger and a user's ciphertext,
// so logs must never hold one. A short hash still lets an operator follow one user.
const HEX_DIGIT = /[0-9a-fA-F]/g
const IS_USER_ID = new RegExp(USER_ID_PATTERN)

/**
 * `compute`, remembering its last answers: at most `kept` of them, all forgotten at once when
 * full (cheaper than an LRU, and enough for keys a few thousand active clients repeat).
 */
export function remembered (compute: (key: string) => string, kept = 10_000): (key: string) => string {
  const answers = new Map<string, string>()
  return (key) => {
    let answer = answers.get(key)
    if (answer === undefined) {
      answer = compute(key)
      if (answers.size >= kept) answers.clear()
      answers.set(key, answer)
    }
    return answer
  }
}

/**
 * A gate for a log line that could otherwise repeat at request rate (a dependency flapping about
 * a bound): true at most once per `ms`.
 */
export function atMostEvery (ms: number): () => boolean {
  let last = -Infinity
  return () => {
    const now = performance.now()
    if (now - last < ms) return false
    last = now
    return true
  }
}

/**
 * A stable, non-reversible name for a user in logs: 12 hex digits of SHA-256 of the id.
 * Remembered: hashing costs about 7 µs (most of it creating the Hash object); active users repeat.
 */
export const pseudonym = remembered((userId) => createHash('sha256').update(userId.toLowerCase()).digest('hex').slice(0, 12))

// A path segment with this many hex digits may be (most of) a user id, however it is written:
// a UUID with other separators, spaced out, cut short. Route names have far fewer.
const HEX_DIGITS_OF_AN_ID = 8

// Redacting a path costs about 4 µs (decoding, two regular expressions per segment); a device
// asks for the same few paths again and again. Only URLs of an API request's length are kept, so
// that the cache stays under a few MB whatever clients send.
const redactedPath = remembered(redactPath)
const LONGEST_URL_KEPT = 160

/** The request path as it may be logged: ids pseudonymised, anything id-like hidden, the query string dropped. */
export function redactUrl (url: string): string {
  return url.length > LONGEST_URL_KEPT ? redactPath(url) : redactedPath(url)
}

function redactPath (url: string): string {
  const queryAt = url.indexOf('?')
  const rawPath = queryAt === -1 ? url : url.slice(0, queryAt)
  // The router decodes %61%62... into the id it serves, so the log judges each decoded segment
  // (split first: an encoded slash must not cut an id into harmless-looking pieces).
  let redacted: string
  try {
    redacted = rawPath.split('/').map((raw) => {
      const segment = decodeURIComponent(raw)
      if (IS_USER_ID.test(segment)) return `~${pseudonym(segment)}`
      return (segment.match(HEX_DIGIT) ?? []).length >= HEX_DIGITS_OF_AN_ID ? '[redacted]' : segment
    }).join('/')
  } catch {
    return '[a path that does not decode]' + (queryAt === -1 ? '' : '?[redacted]')
  }
  return (redacted.length > 200 ? `${redacted.slice(0, 200)}…` : redacted) + (queryAt === -1 ? '' : '?[redacted]')
}

/** Only what an error may say in a log: a database error by its code and constraint, never its detail. */
export function safeError (err: unknown): { type: string, message: string, stack: string, [key: string]: unknown } {
  if (!(err instanceof Error)) return { type: typeof err, message: String(err), stack: '' }
  const { code, constraint, severity } = err as Error & { code?: string, constraint?: string, severity?: string }
  // PostgreSQL's own messages can quote the rejected value ("invalid input syntax ... \"<value>\"",
  // "Failing row contains (...)"), so a server error is named by its SQLSTATE code alone.
  if (severity !== undefined) {
    return { type: err.name, code, constraint, message: `PostgreSQL error ${code ?? ''}`.trim(), stack: '' }
  }
  return { type: err.name, code, message: err.message, stack: err.stack ?? '' }
}

export function loggerOptions (config: Pick<Config, 'LOG_LEVEL'>): FastifyServerOptions['logger'] {
  return {
    level: config.LOG_LEVEL,
    // No line carries a header: the request serializer logs the method, the redacted path and
    // the request id only, and no code logs headers. (pino's `redact` for the authorization header
    // cost about 4 µs a line, a tenth of what logging costs a request, to guard against that.)
    serializers: {
      req: (req: FastifyRequest) => ({ method: req.method, url: redactUrl(req.url), reqId: req.id }),
      err: safeError
    }
  }
}

/**
 * One log line per request, written when it completes, instead of Fastify's two (incoming and
 * completed): per-request logging was the largest cost of a 1 KiB download in the bench. The
 * line carries the body size each way, so an upload or download is logged with its size.
 */
export class OneLinePerRequest extends LogController {
  override incomingRequest (): void {}

  override requestCompleted (error: Error | null | undefined, request: FastifyRequest, reply: FastifyReply): void {
    // Shed requests are counted in the load shedder's sampled warning instead.
    if (request.shed) return
    const fields = {
      req: request,
      res: reply,
      responseTime: reply.elapsedTime,
      bytesIn: Number(request.headers['content-length'] ?? 0),
      bytesOut: Number(reply.getHeader('content-length') ?? 0)
    }
    if (error) reply.log.error({ ...fields, err: error }, 'request errored')
    else reply.log.info(fields, 'request completed')
  }
}
