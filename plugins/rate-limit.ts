import fp from 'fastify-plugin'
import rateLimit, { type CreateRateLimitOptions } from '@fastify/rate-limit'
import { Redis } from 'ioredis'
import ipaddr from 'ipaddr.js'
import type { FastifyInstance, FastifyReply, FastifyRequest, onRequestHookHandler } from 'fastify'
import { atMostEvery, pseudonym } from '../logging.ts'

/** Routes that are never limited: a load balancer's probes must see the instance as it is. */
const UNLIMITED_ROUTES = new Set(['/health', '/health/live'])

type Check = ReturnType<FastifyInstance['createRateLimit']>
type Outcome = Exclude<Awaited<ReturnType<Check>>, { isAllowed: true }>

declare module 'fastify' {
  interface FastifyRequest {
    /** The per-IP limit's count for this request, so that a later limit can compare with it. */
    ipRateLimit: Outcome | null
  }
  interface FastifyInstance {
    /**
     * A rate limit (app.createRateLimit's check) that never throws: when the shared counters
     * (Redis) do not answer within REDIS_TIMEOUT_MS, the request is allowed, uncounted.
     */
    rateLimiter: (options: CreateRateLimitOptions) => (request: FastifyRequest) => ReturnType<Check>
  }
}

/**
 * The client a counter belongs to: its IPv4 address, or the /64 network of its IPv6 address
 * (one subscriber's prefix: rotating addresses within it does not reset the budget).
 */
export function clientKey (ip: string): string {
  if (!ipaddr.isValid(ip)) return ip
  let address = ipaddr.parse(ip)
  if (address.kind() === 'ipv6' && (address as ipaddr.IPv6).isIPv4MappedAddress()) {
    address = (address as ipaddr.IPv6).toIPv4Address()
  }
  if (address.kind() === 'ipv4') return address.toString()
  const parts = (address as ipaddr.IPv6).parts.slice(0, 4).map((part) => part.toString(16))
  return `${parts.join(':')}::/64`
}

/**
 * Per-IP limit of every route but the health probes (RATE_LIMIT_IP_MAX per RATE_LIMIT_WINDOW),
 * counted in onRequest, before load shedding and before any body is read: a client that is
 * shed, refused or sent to the 404 handler still spends its budget. The per-user limit is
 * added by the sync routes (userRateLimit); both hold at once, and the X-RateLimit-* headers
 * describe whichever is closer to running out. Counters live in this process (an LRU of
 * RATE_LIMIT_CACHE_KEYS keys per limit), or, with REDIS_URL, in Redis, where every instance
 * counts into the same budgets. Redis down or slow: requests are served uncounted (fail open,
 * waiting REDIS_TIMEOUT_MS at most), with one warning per outage; counting resumes when it answers.
 */
export default fp(async function rateLimits (app) {
  const { RATE_LIMIT_IP_MAX: perIp, RATE_LIMIT_WINDOW: windowMs, RATE_LIMIT_CACHE_KEYS: cache } = app.config
  const { redis, answered } = await connectRedis(app)
  await app.register(rateLimit, { global: false, cache, ...(redis === null ? {} : { redis, nameSpace: 'logikids-sync:rate-limit:' }) })

  // An outage that began before start-up was warned of there. A Redis that answers about as
  // slowly as REDIS_TIMEOUT_MS flaps between up and down: one line a minute at most, each way.
  let outage = !answered
  const warnGate = atMostEvery(60_000)
  const backGate = atMostEvery(60_000)
  if (outage) warnGate()
  if (outage) app.addHook('onReady', async () => { app.metrics.rateLimitStoreUp.set(0) })

  app.decorate('rateLimiter', (options: CreateRateLimitOptions) => {
    const check = app.createRateLimit(options)
    return async (request: FastifyRequest) => {
      try {
        const outcome = await check(request)
        if (outage) {
          outage = false
          app.metrics.rateLimitStoreUp.set(1)
          if (backGate()) app.log.info('rate limits: Redis answers again; requests are counted again')
        }
        return outcome
      } catch (err) {
        app.metrics.rateLimitStoreErrors.inc()
        if (!outage) {
          outage = true
          app.metrics.rateLimitStoreUp.set(0)
          // The message only: a Redis error may carry the command, and with it a counter's key.
          if (warnGate()) app.log.warn({ reason: (err as Error).message }, 'rate limits: Redis does not answer; requests are served uncounted until it does')
        }
        return { isAllowed: true as const, key: '' }
      }
    }
  })

  app.decorateRequest('ipRateLimit', null)
  if (perIp === 0) return
  const check = app.rateLimiter(limitOptions(perIp, windowMs, cache, (request) => `ip:${clientKey(request.ip)}`))
  app.addHook('onRequest', async function ipRateLimit (request, reply) {
    if (UNLIMITED_ROUTES.has(request.routeOptions.url ?? '')) return
    const outcome = await check(request)
    if (outcome.isAllowed) return
    request.ipRateLimit = outcome
    enforce(reply, outcome, windowMs)
  })
}, { name: 'rate-limit', dependencies: ['config'] })

/**
 * The Redis of REDIS_URL, or null without one. Commands fail at once while it is unreachable
 * (no offline queue) and after REDIS_TIMEOUT_MS when it is slow; it reconnects by itself. A
 * Redis that is down at start-up does not stop the service: it starts counting when Redis is up.
 */
async function connectRedis (app: FastifyInstance): Promise<{ redis: Redis | null, answered: boolean }> {
  const { REDIS_URL: url, REDIS_TIMEOUT_MS: timeout } = app.config
  if (url === '') return { redis: null, answered: true }
  const redis = new Redis(url, {
    commandTimeout: timeout,
    connectTimeout: Math.max(1_000, timeout),
    enableOfflineQueue: false,
    maxRetriesPerRequest: 0,
    retryStrategy: (attempt) => Math.min(attempt * 100, 1_000),
    connectionName: 'logikids-sync'
  })
  // Connection errors are reported by the first count that fails (one warning per outage).
  redis.on('error', () => {})
  app.addHook('onClose', async () => { redis.disconnect() })
  // Not once(): it rejects on the first 'error' (Redis down), which must not stop the start.
  const ready = new Promise<boolean>((resolve) => redis.once('ready', () => resolve(true)))
  const late = new Promise<false>((resolve) => setTimeout(resolve, Math.max(1_000, timeout), false).unref())
  const answered = await Promise.race([ready, late])
  if (!answered) app.log.warn('rate limits: Redis does not answer; requests are served uncounted until it does')
  return { redis, answered }
}

/**
 * The per-user limit (RATE_LIMIT_MAX per user id and window), for routes with a :userId; keyed
 * by the pseudonym, so the counters hold no raw user id either. A request with an access token
 * (routes/api/sync/access-tokens.ts) is counted in a budget of that token's own, one without in
 * the budget of all requests without one: whoever sends a wrong token or none never spends the
 * owner's. A token only earns that budget by opening a record claimed with it; a token that
 * proved nothing (the record has none, or there is no record) also spends the budget of
 * requests without one (`unproven`), so that made-up tokens do not escape the limit. That is
 * known only once the storage answered: a request that changed nothing is then refused (429);
 * one that changed something (the delete of an unclaimed record) is only counted.
 */
export function userRateLimit (app: FastifyInstance): {
  onRequest: onRequestHookHandler
  unproven: (request: FastifyRequest, reply: FastifyReply, refuse: boolean) => Promise<void>
} | null {
  const { RATE_LIMIT_MAX: perUser, RATE_LIMIT_WINDOW: windowMs, RATE_LIMIT_CACHE_KEYS: cache } = app.config
  if (perUser === 0) return null
  const shared = new WeakSet<FastifyRequest>()
  const check = app.rateLimiter(limitOptions(perUser, windowMs, cache,
    (request) => `user:${pseudonym(String((request.params as { userId?: string }).userId ?? ''))}:` +
      (request.accessToken === null || shared.has(request) ? '-' : request.accessToken.toString('base64', 0, 9))))
  return {
    async onRequest (request, reply) {
      const outcome = await check(request)
      if (outcome.isAllowed) return
      const ip = request.ipRateLimit
      // The headers tell the client about the limit it will hit first.
      if (ip === null || outcome.isExceeded || outcome.remaining <= ip.remaining) enforce(reply, outcome, windowMs)
    },
    // Counted once the storage has answered: with `refuse`, past the limit the answer is a 429
    // instead (only where nothing was changed); without, the request is only counted.
    async unproven (request, reply, refuse) {
      if (request.accessToken === null) return
      shared.add(request)
      const outcome = await check(request)
      if (refuse && !outcome.isAllowed && outcome.isExceeded) enforce(reply, outcome, windowMs)
    }
  }
}

export function limitOptions (max: number, timeWindow: number, cache: number, keyGenerator: (request: FastifyRequest) => string): CreateRateLimitOptions {
  // createRateLimit passes `cache` on to its store; without it each limit holds 5,000 keys.
  return { max, timeWindow, keyGenerator, cache } as CreateRateLimitOptions
}

function enforce (reply: FastifyReply, outcome: Outcome, windowMs: number): void {
  reply.header('x-ratelimit-limit', outcome.max)
  reply.header('x-ratelimit-remaining', outcome.remaining)
  reply.header('x-ratelimit-reset', outcome.ttlInSeconds)
  if (!outcome.isExceeded) return
  reply.header('retry-after', outcome.ttlInSeconds)
  throw Object.assign(
    new Error(`Too many requests: the limit is ${outcome.max} per ${describeWindow(windowMs)}; retry in ${outcome.ttlInSeconds} s`),
    { statusCode: 429 })
}

function describeWindow (ms: number): string {
  for (const [unit, size] of [['day', 86_400_000], ['hour', 3_600_000], ['minute', 60_000], ['second', 1_000]] as const) {
    if (ms % size === 0) return ms === size ? unit : `${ms / size} ${unit}s`
  }
  return `${ms} ms`
}
