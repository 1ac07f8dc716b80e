import fp from 'fastify-plugin'
import underPressure from '@fastify/under-pressure'

/**
 * Sheds load when the event loop falls behind (MAX_EVENT_LOOP_DELAY_MS): requests get a fast
 * 503 with Retry-After instead of queueing behind work the process cannot finish in time.
 * /health/live still answers, so an overloaded instance is not restarted for being busy.
 */
export default fp(async function loadShedding (app) {
  const maxDelay = app.config.MAX_EVENT_LOOP_DELAY_MS
  if (maxDelay === 0) return
  await app.register(underPressure, {
    maxEventLoopDelay: maxDelay,
    sampleInterval: 250,
    retryAfter: 5,
    pressureHandler: async (request) => {
      if (request.routeOptions.url === '/health/live') return
      throw Object.assign(new Error('The service is overloaded; please retry shortly'), { statusCode: 503, code: 'OVERLOADED' })
    }
  })
}, { name: 'load-shedding', dependencies: ['config'] })
