import fp from 'fastify-plugin'
import { errorCodes, type FastifyRequest } from 'fastify'
import secureJson from 'secure-json-parse'

/** A request body sent to a route that takes none: refused before a byte of it is read. */
export class NoBodyAllowedError extends Error {
  code = 'NO_BODY_ALLOWED'
  statusCode = 413
  constructor () {
    super('Request body not allowed: this route takes no request body')
  }
}

/** A body the service would have to decode first: only identity-encoded UTF-8 JSON is read. */
export class UnsupportedEncodingError extends Error {
  code = 'UNSUPPORTED_ENCODING'
  statusCode = 415
}

/** A transfer coding Node does not decode (RFC 9112 section 6.1: 501). */
export class UnsupportedTransferEncodingError extends Error {
  code = 'UNSUPPORTED_TRANSFER_ENCODING'
  statusCode = 501
  constructor () {
    super('Unsupported Transfer-Encoding: only chunked is accepted')
  }
}

function hasBody (request: FastifyRequest): boolean {
  const length = request.headers['content-length']
  return request.headers['transfer-encoding'] !== undefined || (length !== undefined && Number(length) !== 0)
}

/** A body whose shape no upload has: refused before JSON.parse spends time on it. */
export class UnreasonableJsonError extends Error {
  code = 'UNREASONABLE_JSON'
  statusCode = 400
}

// An upload is one flat object of four fields. A body with many brackets or keys cannot be one,
// and parsing it costs far more than its size suggests: 660,000 nested arrays or 90,000 keys in
// 1.3 MB took 100-200 ms of CPU each, enough for one client to push everyone into load shedding.
const MAX_BRACKETS = 16
const MAX_KEYS = 64

/** Counts `char` in `text`, stopping once past `limit` (indexOf scans natively: ~0.1 ms per MB). */
function countUpTo (text: string, char: string, limit: number): number {
  let count = 0
  for (let at = text.indexOf(char); at !== -1 && count <= limit; at = text.indexOf(char, at + 1)) count++
  return count
}

const CHARSET = /;\s*charset\s*=\s*"?([^";\s]+)"?/i

/**
 * What a request body may be, checked in onRequest, before the body is read:
 * - a route that declares no body schema takes no body (the 404 handler, /metrics, /info,
 *   verify, DELETE, ...): 413 and the connection is closed, so the body is never read;
 * - a body must not be content-encoded (gzip, br: 415) and JSON must be UTF-8 (415);
 * - an empty JSON body is no body: verify and DELETE accept what many HTTP clients send by
 *   default (Content-Type: application/json with nothing after it).
 */
export default fp(async function bodyPolicy (app) {
  // What Fastify's default parser does (secure-json-parse: 400 for a __proto__ or
  // constructor.prototype key), in one pass over the text: secure-json-parse runs two regular
  // expressions over the whole text before it looks at the parsed object (about 0.4 ms per 1 MB
  // upload); this parses and then scans the object, which for an upload is four keys.
  const poisoning = { protoAction: 'error', constructorAction: 'error' } as const
  function parseJson (text: string, done: (err: Error | null, body?: unknown) => void): void {
    let body: unknown
    try {
      // A byte order mark first is allowed, as Fastify's parser allowed it.
      body = JSON.parse(text.charCodeAt(0) === 0xfeff ? text.slice(1) : text)
      if (body !== null && typeof body === 'object') secureJson.scan(body, poisoning)
    } catch {
      done(new errorCodes.FST_ERR_CTP_INVALID_JSON_BODY(), undefined)
      return
    }
    done(null, body)
  }
  app.removeContentTypeParser('application/json')
  app.addContentTypeParser('application/json', { parseAs: 'string' }, function (request, body, done) {
    const text = body as string
    if (text === '') {
      done(null, undefined)
      return
    }
    if (countUpTo(text, '[', MAX_BRACKETS) + countUpTo(text, '{', MAX_BRACKETS) > MAX_BRACKETS) {
      done(new UnreasonableJsonError(`Invalid request: the JSON body nests more than ${MAX_BRACKETS} objects or arrays`), undefined)
      return
    }
    if (countUpTo(text, ':', MAX_KEYS) > MAX_KEYS) {
      done(new UnreasonableJsonError(`Invalid request: the JSON body has more than ${MAX_KEYS} keys`), undefined)
      return
    }
    parseJson(text, done)
  })
  // Uploads are JSON only: a text/plain body is refused with 415 rather than misread.
  app.removeContentTypeParser('text/plain')

  app.addHook('onRequest', function (request, reply, done) {
    if (!hasBody(request)) {
      done()
      return
    }
    if (request.routeOptions.schema?.body === undefined) {
      // Node would otherwise read (and discard) the rest of the body to keep the connection.
      reply.header('connection', 'close')
      done(new NoBodyAllowedError())
      return
    }
    const transfer = request.headers['transfer-encoding']
    if (transfer !== undefined && transfer.trim().toLowerCase() !== 'chunked') {
      // Node passes "gzip, chunked" through undecoded: the body would be read as if plain.
      done(new UnsupportedTransferEncodingError())
      return
    }
    const encoding = request.headers['content-encoding']
    if (encoding !== undefined && encoding.trim().toLowerCase() !== 'identity') {
      done(new UnsupportedEncodingError('Unsupported Content-Encoding: send the JSON body uncompressed'))
      return
    }
    const charset = CHARSET.exec(request.headers['content-type'] ?? '')?.[1]?.toLowerCase()
    if (charset !== undefined && charset !== 'utf-8' && charset !== 'utf8') {
      done(new UnsupportedEncodingError('Unsupported charset: send application/json in UTF-8'))
      return
    }
    done()
  })
}, { name: 'body-policy' })
