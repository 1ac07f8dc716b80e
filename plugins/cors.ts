import fp from 'fastify-plugin'
import cors from '@fastify/cors'

/** The origins of CORS_ORIGINS: a list, true for '*', or false (no cross-origin access). */
export function allowedOrigins (setting: string): string[] | boolean {
  const origins = setting.split(',').map((origin) => origin.trim().replace(/\/+$/, '')).filter((origin) => origin !== '')
  if (origins.includes('*')) return true
  return origins.length > 0 ? origins : false
}

/** Lets the browser apps of the allowed origins call the API, and read the headers the protocol needs. */
export default fp(async function corsPolicy (app) {
  const allowed = allowedOrigins(app.config.CORS_ORIGINS)
  // No origin allowed (the default): no CORS header on any answer, and a preflight is a 404
  // (no route answers OPTIONS), as with the plugin; without its hooks, a request costs 5 µs less.
  if (allowed === false) return
  await app.register(cors, {
    // A function, so that an origin not on the list gets no CORS header at all (a list would
    // still send it the expose, methods and headers lists); and a preflight from it is a 404.
    origin: Array.isArray(allowed)
      ? (origin, callback) => { callback(null, origin !== undefined && allowed.includes(origin) ? origin : false) }
      : allowed,
    methods: ['GET', 'PUT', 'POST', 'DELETE'],
    allowedHeaders: ['Authorization', 'Content-Type', 'If-Match', 'If-None-Match'],
    // Scripts may read only the headers listed here: the version (sync-protocol.md), why a token
    // was refused, when to retry, the limits.
    exposedHeaders: ['ETag', 'WWW-Authenticate', 'Retry-After', 'X-RateLimit-Limit', 'X-RateLimit-Remaining', 'X-RateLimit-Reset'],
    credentials: false,
    // Browsers re-ask at most every 10 minutes (Chromium caps the cache at 2 hours anyway).
    maxAge: 600,
    // An OPTIONS without Access-Control-Request-Method from an allowed origin is answered like a
    // preflight; strict mode would answer it with a text/plain 400 outside the error shape.
    strictPreflight: false
  })
}, { name: 'cors', dependencies: ['config'] })
