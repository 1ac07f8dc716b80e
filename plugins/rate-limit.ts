import fp from 'fastify-plugin'
import rateLimit from '@fastify/rate-limit'
import type { onRequestHookHandler } from 'fastify'
import { pseudonym } from '../logging.ts'

declare module 'fastify' {
  interface FastifyInstance {
    /** onRequest hooks that the sync routes add: per client IP, then per user id. */
    syncRateLimits: onRequestHookHandler[]
  }
}

/**
 * Rate limits of the sync routes (RATE_LIMIT_MAX per user id and RATE_LIMIT_IP_MAX per client
 * IP, per RATE_LIMIT_WINDOW). Counters live in this process: each instance counts on its own.
 * Health, metrics, docs and /info are never limited.
 */
export default fp(async function rateLimits (app) {
  const { RATE_LIMIT_MAX: perUser, RATE_LIMIT_IP_MAX: perIp, RATE_LIMIT_WINDOW: windowMs } = app.config
  await app.register(rateLimit, {
    global: false,
    // One LRU of counters for both limits (keys are prefixed). Past its size the least recent
    // keys are forgotten, and their budgets start afresh: room for 100,000 users and addresses.
    cache: 100_000,
    // The answer is an error like any other, shaped by the app's error handler.
    errorResponseBuilder: (_request, context) => Object.assign(
      new Error(`Too many requests: the limit is ${context.max} per ${describeWindow(windowMs)}; retry in ${Math.ceil(context.ttl / 1000)} s`),
      { statusCode: 429 })
  })
  const hooks: onRequestHookHandler[] = []
  if (perIp > 0) {
    hooks.push(app.rateLimit({ max: perIp, timeWindow: windowMs, keyGenerator: (request) => `ip:${request.ip}` }))
  }
  if (perUser > 0) {
    // Keyed by the pseudonym, so the counters hold no raw user id either.
    hooks.push(app.rateLimit({
      max: perUser,
      timeWindow: windowMs,
      keyGenerator: (request) => `user:${pseudonym(String((request.params as { userId?: string }).userId ?? ''))}`
    }))
  }
  app.decorate('syncRateLimits', hooks)
}, { name: 'rate-limit', dependencies: ['config'] })

function describeWindow (ms: number): string {
  for (const [unit, size] of [['day', 86_400_000], ['hour', 3_600_000], ['minute', 60_000], ['second', 1_000]] as const) {
    if (ms % size === 0) return ms === size ? unit : `${ms / size} ${unit}s`
  }
  return `${ms} ms`
}
