import { createHash } from 'node:crypto'
import type { FastifyRequest, FastifyServerOptions } from 'fastify'
import type { Config } from './plugins/config.ts'

// The user id is the only secret standing between a stranger and a user's ciphertext,
// so logs must never hold one. A short hash still lets an operator follow one user.
const ID_LIKE = /[0-9a-fA-F-]{8,}/g
const IS_UUID = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/

/** A stable, non-reversible name for a user in logs: 12 hex digits of SHA-256 of the id. */
export function pseudonym (userId: string): string {
  return createHash('sha256').update(userId.toLowerCase()).digest('hex').slice(0, 12)
}

/** The request path as it may be logged: ids pseudonymised, the query string dropped. */
export function redactUrl (url: string): string {
  const queryAt = url.indexOf('?')
  const path = queryAt === -1 ? url : url.slice(0, queryAt)
  // A well-formed id becomes its pseudonym; anything else id-like (a typo, a truncated id)
  // is hidden whole, since it may still be most of somebody's id.
  const redacted = path.replace(ID_LIKE, (run) => (IS_UUID.test(run) ? `~${pseudonym(run)}` : '[redacted]'))
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
    serializers: {
      req: (req: FastifyRequest) => ({ method: req.method, url: redactUrl(req.url), reqId: req.id }),
      err: safeError
    }
  }
}
