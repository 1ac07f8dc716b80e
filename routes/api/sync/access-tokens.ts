import { createHash } from 'node:crypto'
import type { FastifyInstance, FastifyReply, FastifyRequest, onRequestHookHandler } from 'fastify'
import { clientKey } from '../../../plugins/rate-limit.ts'
import { ACCESS_TOKEN_PATTERN } from '../../../schemas/sync.ts'

/**
 * Access tokens (docs/sync-protocol.md): a device proves it holds the user's key with
 * `Authorization: Bearer <token>`, the token derived from that key. The server keeps only the
 * SHA-256 of a token, with the record a device claimed; the check itself happens in the SQL
 * statement of each operation (plugins/storage.ts), so nothing separates check and write.
 */

const TOKEN = new RegExp(ACCESS_TOKEN_PATTERN)
// The scheme ends at the first space or tab (RFC 9110 allows only spaces; a tab is taken as one
// rather than have "Bearer<TAB>token" silently count as no token).
const SCHEME = /^([^ \t]+)(.*)$/s

/** What is stored of a token: its SHA-256 (right for a 256-bit random secret; no salt or stretching needed). */
export function tokenHash (token: string): Buffer {
  return createHash('sha256').update(token).digest()
}

/**
 * The credential a request carries. Another scheme than Bearer (say, the Basic credentials of a
 * reverse proxy in front of the service) is not ours and counts as none; a Bearer value that
 * is not a token is malformed.
 */
export function credentialOf (header: string | undefined): { token: string } | 'none' | 'malformed' {
  if (header === undefined) return 'none'
  const [, scheme, rest] = SCHEME.exec(header) ?? []
  if (scheme === undefined || scheme.toLowerCase() !== 'bearer') return 'none'
  const token = rest!.trim()
  return TOKEN.test(token) ? { token } : 'malformed'
}

export type AuthFailure = 'missing' | 'malformed' | 'wrong'

const MESSAGES: Record<AuthFailure, string> = {
  missing: 'Authentication required: send Authorization: Bearer <access token>',
  malformed: 'Invalid access token: it must be base64url without padding, 43 to 128 characters',
  wrong: 'Invalid access token'
}

declare module 'fastify' {
  interface FastifyRequest {
    /** The SHA-256 of the request's access token, or null when it sent none. */
    accessToken: Buffer | null
  }
}

/**
 * The access rules of the sync routes: `authenticate` (an onRequest hook) reads the token and
 * refuses a malformed one, and in AUTH_MODE=required a missing one, before the per-user limit
 * counts the request; `refuse` answers a request the storage found unauthorized.
 * Refusals count per client IP: past AUTH_FAILURE_LIMIT in a rate-limit window they are 429
 * with Retry-After instead of 401. A request with the right token is never refused, however
 * many failures its address has: someone else behind the same NAT cannot lock the owner out.
 * So the limit is no brake on guessing (256-bit tokens need none): it tells a misbehaving
 * client to back off, and the metrics show the refusals.
 */
export function accessControl (app: FastifyInstance) {
  const { AUTH_MODE: mode, AUTH_FAILURE_LIMIT: limit } = app.config
  const failures = limit === 0 ? null : app.rateLimiter(limit, (request) => `auth:${clientKey(request.ip)}`)
  const { authFailures } = app.metrics

  // Without a stated failure, the request was refused by the record: for its token, or for having none.
  async function refuse (request: FastifyRequest, reply: FastifyReply,
    failure: AuthFailure = request.accessToken === null ? 'missing' : 'wrong'): Promise<never> {
    authFailures.inc({ reason: failure })
    // Also on the 429: a device left behind by a rotation must see that its token is the
    // problem (and pair again) rather than retry for ever.
    reply.header('www-authenticate', failure === 'missing' ? 'Bearer realm="logikids-sync"' : 'Bearer realm="logikids-sync", error="invalid_token"')
    const outcome = failures === null ? null : await failures(request)
    if (outcome !== null && !outcome.isAllowed && outcome.isExceeded) {
      reply.header('retry-after', outcome.ttlInSeconds)
      throw Object.assign(new Error('Too many requests with a missing or invalid access token from this address; ' +
        `retry in ${outcome.ttlInSeconds} s`), { statusCode: 429 })
    }
    throw Object.assign(new Error(MESSAGES[failure]), { statusCode: 401 })
  }

  const authenticate: onRequestHookHandler = async function authenticate (request, reply) {
    const credential = credentialOf(request.headers.authorization)
    if (credential === 'malformed') return await refuse(request, reply, 'malformed')
    if (credential === 'none') {
      if (mode === 'required') return await refuse(request, reply, 'missing')
      return
    }
    request.accessToken = tokenHash(credential.token)
  }

  /** What authenticate will make of a request, from its headers alone: its token's hash, null for none, or 'refused'. */
  function tokenAhead (request: FastifyRequest): Buffer | null | 'refused' {
    const credential = credentialOf(request.headers.authorization)
    if (credential === 'malformed') return 'refused'
    if (credential === 'none') return mode === 'required' ? 'refused' : null
    return tokenHash(credential.token)
  }

  return { authenticate, refuse, tokenAhead }
}
