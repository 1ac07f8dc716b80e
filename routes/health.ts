import { setTimeout as sleep } from 'node:timers/promises'
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { HealthSchema, LiveSchema } from '../schemas/health.ts'

/** /health for readiness (the database answers) and /health/live for liveness (the process serves). */
const health: FastifyPluginAsyncTypebox = async function (app) {
  app.get('/health', {
    schema: { tags: ['service'], summary: 'Readiness: the service and its database answer', response: { 200: HealthSchema, 503: HealthSchema } }
  }, async function (request, reply) {
    const timeoutMs = app.config.HEALTH_TIMEOUT_MS
    const giveUp = new AbortController()
    try {
      // Bounds the wait for a pooled connection and the query together.
      await Promise.race([
        app.pg.pool.query('SELECT 1'),
        sleep(timeoutMs, undefined, { signal: giveUp.signal }).then(() => {
          throw new Error(`no answer within ${timeoutMs} ms`)
        })
      ])
      return { status: 'ok', database: 'ok', databaseKind: app.databaseKind } as const
    } catch (err) {
      request.log.warn({ err }, 'health check: database unreachable')
      reply.code(503).header('retry-after', '5')
      return { status: 'error', database: 'unreachable', databaseKind: app.databaseKind, error: `database check failed: ${describe(err)}` } as const
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

function describe (err: unknown): string {
  if (!(err instanceof Error)) return String(err)
  const code = (err as Error & { code?: string }).code
  // Node reports a refused connection to every address of a host as an AggregateError with no message.
  return err.message || code || err.name
}

export default health
