import fp from 'fastify-plugin'
import underPressure from '@fastify/under-pressure'

const SAMPLE_INTERVAL_MS = 250
// How often a shed request is logged at most; the line says how many were shed in between.
const LOG_EVERY_MS = 10_000

declare module 'fastify' {
  interface FastifyInstance {
    /** Resolves once load shedding judges the event loop (start-up's own delay no longer counts). */
    loadSheddingArmed: Promise<void>
  }
  interface FastifyRequest {
    /** Whether this request was refused by the load shedder. */
    shed: boolean
  }
}

/** The error a shed request is answered with (503, Retry-After: 5). */
export class OverloadedError extends Error {
  code = 'OVERLOADED'
  statusCode = 503
  constructor () {
    super('The service is overloaded; please retry shortly')
  }
}

/**
 * Sheds load when the event loop falls behind (MAX_EVENT_LOOP_DELAY_MS): requests get a fast
 * 503 with Retry-After instead of queueing behind work the process cannot finish in time.
 * /health/live still answers, so an overloaded instance is not restarted for being busy, and so
 * does /metrics, so the overload is seen (load_shed_requests_total) rather than a failed scrape.
 *
 * The delay is sampled every 250 ms, and the first samples after start-up still hold its
 * delay (compiling, loading the embedded database's WebAssembly): shedding starts three
 * samples after the app is ready, so the first requests after "Server listening" are served.
 */
export default fp(async function loadShedding (app) {
  const maxDelay = app.config.MAX_EVENT_LOOP_DELAY_MS
  app.decorateRequest('shed', false)
  let armed = false
  let arm: () => void = () => {}
  app.decorate('loadSheddingArmed', new Promise<void>((resolve) => { arm = resolve }))
  if (maxDelay === 0) {
    arm()
    return
  }
  app.addHook('onReady', async () => {
    setTimeout(() => {
      armed = true
      arm()
    }, 3 * SAMPLE_INTERVAL_MS).unref()
  })

  let shedSinceLog = 0
  let loggedAt = 0
  await app.register(underPressure, {
    maxEventLoopDelay: maxDelay,
    sampleInterval: SAMPLE_INTERVAL_MS,
    retryAfter: 5,
    pressureHandler: async (request, _reply, _type, value) => {
      // Liveness and the metrics are answered under overload too: a restart or a failed scrape
      // (SyncServiceDown) is not what an overloaded instance needs, and the figures are what shows it.
      if (!armed || request.routeOptions.url === '/health/live' || request.routeOptions.url === '/metrics') return
      request.shed = true
      request.server.metrics?.shedRequests.inc()
      // Under attack every request is shed: one warning now and then, never a stack per request.
      shedSinceLog++
      const now = Date.now()
      if (now - loggedAt >= LOG_EVERY_MS) {
        request.log.warn({ shed: shedSinceLog, eventLoopDelayMs: Math.round(Number(value)) }, 'overloaded: shedding requests')
        shedSinceLog = 0
        loggedAt = now
      }
      throw new OverloadedError()
    }
  })
}, { name: 'load-shedding', dependencies: ['config'] })
