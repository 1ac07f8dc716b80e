import fp from 'fastify-plugin'
import helmet from 'helmet'

/**
 * The security headers an answer needs, by what it is. JSON (every API answer, errors included)
 * gets `X-Content-Type-Options: nosniff` and, unless HSTS_MAX_AGE is 0, Strict-Transport-Security:
 * the headers that protect a page (Content-Security-Policy, X-Frame-Options, the Cross-Origin-*
 * policies and the rest of helmet's) mean nothing to a program reading JSON, and cost about
 * 600 bytes and 10 µs an answer. The HTML and scripts of Swagger UI (/docs) get all of helmet's,
 * built once (@fastify/helmet calls helmet() anew for every request, re-parsing the CSP); a header
 * a route sets itself (Swagger UI's own CSP) takes precedence.
 */
export default fp(async function securityHeaders (app) {
  const maxAge = app.config.HSTS_MAX_AGE
  const hsts = maxAge > 0 ? `max-age=${maxAge}; includeSubDomains` : null
  const pageHeaders = helmet({
    // The API is meant to be read by the browser apps of other origins (see CORS_ORIGINS).
    crossOriginResourcePolicy: { policy: 'cross-origin' },
    strictTransportSecurity: hsts === null ? false : { maxAge, includeSubDomains: true }
  })
  app.addHook('onRequest', (request, reply, done) => {
    // The path rather than request.routeOptions, which builds an object at each use: a path
    // under /docs that no route serves is a JSON 404 with a page's headers, which is harmless.
    if (request.url.startsWith('/docs')) {
      pageHeaders(request.raw, reply.raw, (err?: unknown) => done(err as Error | undefined))
      return
    }
    reply.header('x-content-type-options', 'nosniff')
    if (hsts !== null) reply.header('strict-transport-security', hsts)
    done()
  })
}, { name: 'security-headers', dependencies: ['config'] })
