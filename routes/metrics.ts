import { timingSafeEqual } from 'node:crypto'
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { ErrorSchema } from '../schemas/error.ts'

/** GET /metrics in Prometheus text format, on the service's port (see plugins/metrics.ts for the other place). */
const metrics: FastifyPluginAsyncTypebox = async function (app) {
  if (app.config.METRICS_LISTENER !== 'main') return
  const token = app.config.METRICS_TOKEN
  const { registry } = app.metrics
  app.get('/metrics', {
    schema: {
      tags: ['service'],
      summary: 'Prometheus metrics in text format (needs Authorization: Bearer <METRICS_TOKEN> when one is set)',
      produces: ['text/plain'],
      response: { 200: { type: 'string', description: 'Prometheus text exposition format' }, 401: ErrorSchema }
    }
  }, async function (request, reply) {
    if (token !== '' && !bearerMatches(request.headers.authorization, token)) {
      reply.header('www-authenticate', 'Bearer')
      throw app.httpErrors.unauthorized('Metrics need Authorization: Bearer <METRICS_TOKEN>')
    }
    reply.type(registry.contentType)
    return await registry.metrics()
  })
}

function bearerMatches (header: string | undefined, token: string): boolean {
  const given = Buffer.from(header?.startsWith('Bearer ') ? header.slice(7) : '')
  const expected = Buffer.from(token)
  return given.length === expected.length && timingSafeEqual(given, expected)
}

export default metrics
