import fp from 'fastify-plugin'
import type { FastifyRequest } from 'fastify'

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

function hasBody (request: FastifyRequest): boolean {
  const length = request.headers['content-length']
  return request.headers['transfer-encoding'] !== undefined || (length !== undefined && length !== '0')
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
  const parseJson = app.getDefaultJsonParser('error', 'error')
  app.removeContentTypeParser('application/json')
  app.addContentTypeParser('application/json', { parseAs: 'string' }, function (request, body, done) {
    if (body === '') {
      done(null, undefined)
      return
    }
    parseJson(request, body as string, done)
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
