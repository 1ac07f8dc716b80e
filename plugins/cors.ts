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
  await app.register(cors, {
    origin: allowedOrigins(app.config.CORS_ORIGINS),
    methods: ['GET', 'PUT', 'POST', 'DELETE'],
    allowedHeaders: ['Content-Type', 'If-Match', 'If-None-Match'],
    // Scripts may read only the headers listed here: the version (sync-protocol.md), when to retry, the limits.
    exposedHeaders: ['ETag', 'Retry-After', 'X-RateLimit-Limit', 'X-RateLimit-Remaining', 'X-RateLimit-Reset'],
    credentials: false,
    // Browsers re-ask at most every 10 minutes (Chromium caps the cache at 2 hours anyway).
    maxAge: 600,
    strictPreflight: true
  })
}, { name: 'cors', dependencies: ['config'] })
