import fp from 'fastify-plugin'
import helmet from 'helmet'

/**
 * Helmet's security headers on every answer. Built once: @fastify/helmet calls helmet() anew
 * for every request, which re-parses the Content-Security-Policy each time (about 10 µs of a
 * 1 KiB download in the bench's profile). Headers a route sets itself (Swagger UI's own CSP)
 * take precedence over these.
 */
export default fp(async function securityHeaders (app) {
  // The API is meant to be read by the browser apps of other origins (see CORS_ORIGINS).
  const applyHeaders = helmet({ crossOriginResourcePolicy: { policy: 'cross-origin' } })
  app.addHook('onRequest', (request, reply, done) => {
    applyHeaders(request.raw, reply.raw, (err?: unknown) => done(err as Error | undefined))
  })
}, { name: 'security-headers' })
