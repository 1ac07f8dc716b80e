import { setTimeout as sleep } from 'node:timers/promises'
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { HealthSchema, HealthUnavailableSchema, LiveSchema } from '../schemas/health.ts'

/** /health for readiness (the database answers) and /health/live for liveness (the process serves). */
const health: FastifyPluginAsyncTypebox = async function (app) {
  app.get('/health', {
    schema: {
      tags: ['service'],
      summary: 'Readiness: the service and its database answer',
      response: { 200: HealthSchema, 503: HealthUnavailableSchema }
    }
  }, async function (request, reply) {
    const timeoutMs = app.config.HEALTH_TIMEOUT_MS
    const giveUp = new AbortController()
    try {
      await Promise.race([
        app.checkDatabase(),
        sleep(timeoutMs, undefined, { signal: giveUp.signal }).then(() => {
          throw Object.assign(new Error(`no answer within ${timeoutMs} ms`), { code: 'HEALTH_TIMEOUT' })
        })
      ])
      return { status: 'ok', database: 'ok', databaseKind: app.databaseKind } as const
    } catch (err) {
      // The reason (PostgreSQL's message names databases, users, hosts) is for the log only.
      request.log.warn({ err }, 'health check: database unavailable')
      reply.code(503).header('retry-after', '5').header('cache-control', 'no-store')
      return {
        status: 'error', database: 'unavailable', databaseKind: app.databaseKind, error: 'The database is unavailable', statusCode: 503
      } as const
    } finally {
      giveUp.abort()
    }
  })

  app.get('/health/live', {
    schema: { tags: ['service'], summary: 'Liveness: the process serves requests (no database call)', response: { 200: LiveSchema } }
  }, async function () {
    return { status: 'ok' } as const
  })
}

export default health
