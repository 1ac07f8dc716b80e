import { createRequire } from 'node:module'
import fp from 'fastify-plugin'
import { Redis } from 'ioredis'
import ipaddr from 'ipaddr.js'
import type { FastifyInstance, FastifyReply, FastifyRequest, onRequestHookHandler } from 'fastify'
import { atMostEvery, pseudonym, remembered } from '../logging.ts'

/** Routes that are never limited: a load balancer's probes must see the instance as it is. */
const UNLIMITED_ROUTES = new Set(['/health', '/health/live'])

/** A count that was made: how far the client is from its limit (the shape @fastify/rate-limit gives it). */
export interface Outcome {
  isAllowed: false
  key: string
  max: number
  timeWindow: number
  remaining: number
  ttl: number
  ttlInSeconds: number
  isExceeded: boolean
  isBanned: boolean
}
/** What a limit says of a request: counted (an Outcome), or let through uncounted (Redis not answering). */
export type Verdict = Outcome | { isAllowed: true, key: string }
const UNCOUNTED: Verdict = { isAllowed: true, key: '' }

function outcome (key: string, max: number, windowMs: number, current: number, ttl: number): Outcome {
  return {
    isAllowed: false,
    key,
    max,
    timeWindow: windowMs,
    remaining: Math.max(0, max - current),
    ttl,
    ttlInSeconds: Math.ceil(ttl / 1000),
    isExceeded: current > max,
    isBanned: false
  }
}

// Counting in this process: @fastify/rate-limit's own store, an LRU of fixed-window counters
// (toad-cache), one per limit, used directly. Its store interface is synchronous in memory;
// going through createRateLimit() wrapped each count in three promises and read the route's
// options twice, about 4 µs a limit, two limits a request.
interface Counter { current: number, ttl: number }
interface CounterStore {
  incr (key: string, done: (err: Error | null, counter: Counter) => void, timeWindow: number, max: number): void
}
const LocalStore = createRequire(import.meta.url)('@fastify/rate-limit/store/LocalStore.js') as
  new (continueExceeding: boolean, exponentialBackoff: boolean, cache: number) => CounterStore

function countInMemory (store: CounterStore, key: string, max: number, windowMs: number): Outcome {
  let counter: Counter = { current: 0, ttl: windowMs }
  store.incr(key, (_err, counted) => { counter = counted }, windowMs, max)
  return outcome(key, max, windowMs, counter.current, counter.ttl)
}

/** Calls `settle` with the verdict, at once when it is known (counted in memory), else when it is. */
function whenCounted (verdict: Verdict | Promise<Verdict>, settle: (verdict: Verdict) => void, fail: (err: Error) => void): void {
  if (verdict instanceof Promise) verdict.then(settle, fail)
  else settle(verdict)
}

declare module 'fastify' {
  interface FastifyRequest {
    /** The per-IP limit's count for this request, so that a later limit can compare with it. */
    ipRateLimit: Outcome | null
    /**
     * The per-user limit's count, where it was made in the per-IP limit's round trip to Redis
     * (see userRateLimit): taken by the per-user hook, given back if the request never got there.
     */
    userRateLimitAhead: Verdict | null
  }
  interface FastifyInstance {
    /**
     * A limit of `max` requests per key and RATE_LIMIT_WINDOW that never throws: when the
     * shared counters (Redis) do not answer within REDIS_TIMEOUT_MS, the request is allowed, uncounted.
     */
    rateLimiter: (max: number, keyOf: (request: FastifyRequest) => string) => (request: FastifyRequest) => Verdict | Promise<Verdict>
    /** Set by userRateLimit: the per-user limit and its key for a request, or null where the request will not be counted. */
    userRateLimitAhead: { max: number, keyOf: ((request: FastifyRequest) => string | null) | null }
  }
  interface FastifyContextConfig {
    /** The route counts the per-user limit (userRateLimit) in its onRequest hooks. */
    userRateLimit?: boolean
  }
}

/**
 * The client a counter belongs to: its IPv4 address, or the /64 network of its IPv6 address
 * (one subscriber's prefix: rotating addresses within it does not reset the budget). Remembered:
 * parsing costs about 3 µs a request, and a client sends many.
 */
export const clientKey = remembered(keyOfAddress)

function keyOfAddress (ip: string): string {
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
 *
 * With Redis, each count is a round trip, so a sync request's per-user count is made in the
 * per-IP count's (one script for both keys); a request that never reaches the per-user hook
 * (refused by this limit, shed, refused for its body or token) gets that count back.
 */
export default fp(async function rateLimits (app) {
  const { RATE_LIMIT_IP_MAX: perIp, RATE_LIMIT_WINDOW: windowMs, RATE_LIMIT_CACHE_KEYS: cache } = app.config
  const { redis, answered } = await connectRedis(app)
  // In process: @fastify/rate-limit's LRU store (countInMemory). In Redis the counting is ours (redisCounter).
  const count = redis === null ? null : redisCounter(redis, windowMs)

  // An outage that began before start-up was warned of there. A Redis that answers about as
  // slowly as REDIS_TIMEOUT_MS flaps between up and down: one line a minute at most, each way.
  let outage = !answered
  const warnGate = atMostEvery(60_000)
  const backGate = atMostEvery(60_000)
  if (outage) warnGate()
  if (outage) app.addHook('onReady', async () => { app.metrics.rateLimitStoreUp.set(0) })

  /** Counts that never throw: Redis not answering lets the request through uncounted. */
  async function guarded (counting: () => Promise<Array<Verdict | undefined>>, keys: number): Promise<Array<Verdict | undefined>> {
    try {
      const verdicts = await counting()
      if (outage) {
        outage = false
        app.metrics.rateLimitStoreUp.set(1)
        if (backGate()) app.log.info('rate limits: Redis answers again; requests are counted again')
      }
      return verdicts
    } catch (err) {
      app.metrics.rateLimitStoreErrors.inc()
      if (!outage) {
        outage = true
        app.metrics.rateLimitStoreUp.set(0)
        // The message only: a Redis error may carry the command, and with it a counter's key.
        if (warnGate()) app.log.warn({ reason: (err as Error).message }, 'rate limits: Redis does not answer; requests are served uncounted until it does')
      }
      return Array.from({ length: keys }, () => UNCOUNTED)
    }
  }

  app.decorate('rateLimiter', (max: number, keyOf: (request: FastifyRequest) => string) => {
    if (count === null) {
      // Counted in this process's memory, which cannot fail: nothing to guard.
      const store = new LocalStore(false, false, cache)
      return (request: FastifyRequest) => countInMemory(store, keyOf(request), max, windowMs)
    }
    return async (request: FastifyRequest) => (await guarded(() => count([{ key: keyOf(request), max }]), 1))[0]!
  })
  app.decorate('userRateLimitAhead', { max: 0, keyOf: null })
  app.decorateRequest('ipRateLimit', null)
  app.decorateRequest('userRateLimitAhead', null)
  if (perIp === 0) return

  const ipKey = (request: FastifyRequest) => `ip:${clientKey(request.ip)}`
  const check = app.rateLimiter(perIp, ipKey)
  // Not async: counted in memory, the verdict is known at once, and a request needs no promise.
  app.addHook('onRequest', function ipRateLimit (request, reply, done) {
    // Read once: request.routeOptions builds an object at each use.
    const route = request.routeOptions
    if (UNLIMITED_ROUTES.has(route.url ?? '')) {
      done()
      return
    }
    const { max, keyOf } = app.userRateLimitAhead
    const userKey = count !== null && keyOf !== null && route.config.userRateLimit === true ? keyOf(request) : null
    const settle = (verdict: Verdict) => {
      if (verdict.isAllowed) {
        done()
        return
      }
      request.ipRateLimit = verdict
      done(enforced(reply, verdict, windowMs))
    }
    if (userKey === null) {
      whenCounted(check(request), settle, done)
      return
    }
    guarded(() => count!([{ key: ipKey(request), max: perIp }, { key: userKey, max }]), 2).then(([ip, user]) => {
      // Not counted (null) when the address is over its limit: that request is refused here.
      request.userRateLimitAhead = user ?? null
      settle(ip!)
    }, done)
  })
  if (count === null) return
  // Answered before the per-user hook took the count (shed, a refused body): it goes back. A
  // give-back lost (Redis gone meanwhile) costs the user one count of the window.
  async function giveBack (request: FastifyRequest): Promise<void> {
    const ahead = request.userRateLimitAhead
    if (ahead === null || ahead.isAllowed) return
    request.userRateLimitAhead = null
    await guarded(async () => { await count!.giveBack(ahead.key); return [] }, 0)
  }
  app.addHook('onResponse', giveBack)
}, { name: 'rate-limit', dependencies: ['config'] })

// Per key, in order: INCR; the window's first count sets the expiry, later ones read what is
// left of it (as @fastify/rate-limit's own Redis store does, one key per script). A key whose
// count passes its limit (ARGV[1 + i]) ends the script: the keys after it are not counted (the
// request is refused). Returns, per key counted, the count and the milliseconds left.
// All keys of a script must live on one server: a single Redis (or one with replicas), not a
// Redis Cluster, which refuses a script over keys in different slots.
const COUNT = `local result = {}
for i, key in ipairs(KEYS) do
  local current = redis.call('INCR', key)
  local left = tonumber(ARGV[1])
  if current == 1 then redis.call('PEXPIRE', key, left) else left = redis.call('PTTL', key) end
  result[2 * i - 1] = current
  result[2 * i] = left
  if current > tonumber(ARGV[1 + i]) then break end
end
return result`
// A count given back: never below zero (the window may have started afresh meanwhile), and a
// counter back at zero is removed rather than kept for the rest of its window.
const GIVE_BACK = `local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current <= 1 then redis.call('DEL', KEYS[1]) return 0 end
return redis.call('DECR', KEYS[1])`
const NAMESPACE = 'logikids-sync:rate-limit:'

type Counting = Redis & {
  logikidsCount (keys: number, ...args: Array<string | number>): Promise<number[]>
  logikidsGiveBack (key: string): Promise<number>
}

/** Counts keys in Redis, all of one request's in one round trip, in windows of `windowMs`. */
function redisCounter (redis: Redis, windowMs: number) {
  redis.defineCommand('logikidsCount', { lua: COUNT })
  redis.defineCommand('logikidsGiveBack', { numberOfKeys: 1, lua: GIVE_BACK })
  const commands = redis as Counting
  /** The outcome of each limit, in order; those after one that is exceeded are not counted (missing). */
  async function count (limits: Array<{ key: string, max: number }>): Promise<Outcome[]> {
    const reply = await commands.logikidsCount(limits.length, ...limits.map((limit) => NAMESPACE + limit.key), windowMs,
      ...limits.map((limit) => limit.max))
    return limits.slice(0, reply.length / 2).map(({ key, max }, i) => outcome(key, max, windowMs, reply[2 * i]!, Math.max(0, reply[2 * i + 1]!)))
  }
  return Object.assign(count, { giveBack: (key: string) => commands.logikidsGiveBack(NAMESPACE + key) })
}

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
 *
 * The routes mark themselves with `config.userRateLimit`. With Redis their count is made in the
 * per-IP limit's round trip: `tokenAhead` tells it, from the headers alone, the token a request
 * will be counted under, or that authenticate will refuse it (then it is not counted).
 */
export function userRateLimit (app: FastifyInstance, tokenAhead: (request: FastifyRequest) => Buffer | null | 'refused'): {
  onRequest: onRequestHookHandler
  unproven: (request: FastifyRequest, reply: FastifyReply, refuse: boolean) => Promise<void>
} | null {
  const { RATE_LIMIT_MAX: perUser, RATE_LIMIT_WINDOW: windowMs } = app.config
  if (perUser === 0) return null
  const shared = new WeakSet<FastifyRequest>()
  const keyOf = (request: FastifyRequest, token: Buffer | null) =>
    `user:${pseudonym(String((request.params as { userId?: string }).userId ?? ''))}:${token === null ? '-' : token.toString('base64', 0, 9)}`
  const check = app.rateLimiter(perUser, (request) => keyOf(request, shared.has(request) ? null : request.accessToken))
  app.userRateLimitAhead.max = perUser
  app.userRateLimitAhead.keyOf = (request) => {
    const token = tokenAhead(request)
    return token === 'refused' ? null : keyOf(request, token)
  }
  return {
    onRequest (request, reply, done) {
      const ahead = request.userRateLimitAhead
      request.userRateLimitAhead = null // taken: not given back
      whenCounted(ahead ?? check(request), (verdict) => {
        const ip = request.ipRateLimit
        // The headers tell the client about the limit it will hit first.
        if (verdict.isAllowed || (ip !== null && !verdict.isExceeded && verdict.remaining > ip.remaining)) done()
        else done(enforced(reply, verdict, windowMs))
      }, done)
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

/** Sets the X-RateLimit-* headers of `outcome`; past the limit, also Retry-After, and returns the 429 to answer with. */
function enforced (reply: FastifyReply, outcome: Outcome, windowMs: number): Error | undefined {
  reply.header('x-ratelimit-limit', outcome.max)
  reply.header('x-ratelimit-remaining', outcome.remaining)
  reply.header('x-ratelimit-reset', outcome.ttlInSeconds)
  if (!outcome.isExceeded) return undefined
  reply.header('retry-after', outcome.ttlInSeconds)
  return Object.assign(
    new Error(`Too many requests: the limit is ${outcome.max} per ${describeWindow(windowMs)}; retry in ${outcome.ttlInSeconds} s`),
    { statusCode: 429 })
}

function enforce (reply: FastifyReply, outcome: Outcome, windowMs: number): void {
  const refused = enforced(reply, outcome, windowMs)
  if (refused !== undefined) throw refused
}

function describeWindow (ms: number): string {
  for (const [unit, size] of [['day', 86_400_000], ['hour', 3_600_000], ['minute', 60_000], ['second', 1_000]] as const) {
    if (ms % size === 0) return ms === size ? unit : `${ms / size} ${unit}s`
  }
  return `${ms} ms`
}
