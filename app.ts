import type { Server } from 'node:http'
import type { FastifyError, FastifyHttpOptions, FastifyInstance, FastifyServerOptions } from 'fastify'
import fp from 'fastify-plugin'
import sensible from '@fastify/sensible'
import configPlugin, { type Config } from './plugins/config.ts'
import dbPlugin, { isDatabaseUnavailable, isInvalidData } from './plugins/db.ts'
import storagePlugin from './plugins/storage.ts'
import corsPlugin from './plugins/cors.ts'
import metricsPlugin from './plugins/metrics.ts'
import cleanupPlugin from './plugins/cleanup.ts'
import rateLimitPlugin from './plugins/rate-limit.ts'
import docsPlugin from './plugins/docs.ts'
import securityHeadersPlugin from './plugins/security-headers.ts'
import loadSheddingPlugin from './plugins/load-shedding.ts'
import healthRoutes from './routes/health.ts'
import infoRoutes from './routes/info.ts'
import syncRoutes from './routes/api/sync/index.ts'
import { BASE64_FORMAT, MAX_BLOB_BASE64_CHARS } from './schemas/sync.ts'
import { OneLinePerRequest, loggerOptions } from './logging.ts'

/** Room for a full 1,000,000-byte blob as base64 JSON plus the other fields and some whitespace. */
export const BODY_LIMIT = MAX_BLOB_BASE64_CHARS + 8 * 1024

/** The options Fastify must be created with (server.ts and the tests share them). */
export function serverOptions (config: Config): FastifyHttpOptions<Server> {
  return {
    // Behind a reverse proxy, request.ip (rate limits, logs) comes from X-Forwarded-For, but only
    // when the connection comes from one of these addresses.
    trustProxy: config.TRUST_PROXY === '' ? false : config.TRUST_PROXY.split(',').map((entry) => entry.trim()),
    logger: loggerOptions(config),
    logController: new OneLinePerRequest(),
    bodyLimit: BODY_LIMIT,
    // A client gets REQUEST_TIMEOUT_MS (30 s) to send a whole request, a 1.3 MB upload on a slow
    // mobile link included, and at most 10 s of it for the headers: a client that trickles
    // them (slowloris) is cut off. Node checks these every 2 s rather than its default 30 s.
    requestTimeout: config.REQUEST_TIMEOUT_MS,
    http: {
      headersTimeout: Math.min(10_000, config.REQUEST_TIMEOUT_MS),
      connectionsCheckingInterval: Math.min(2_000, config.REQUEST_TIMEOUT_MS)
    },
    connectionTimeout: 60_000,
    keepAliveTimeout: 72_000,
    return503OnClosing: true,
    ajv: {
      // Types are exact: "123" is not a timestamp, 123 is not a blob.
      customOptions: { coerceTypes: false },
      plugins: [addBase64Format]
    }
  }
}

type AjvPlugin = NonNullable<NonNullable<FastifyServerOptions['ajv']>['plugins']>[number]
// Fastify does not re-export Ajv's types; the plugin needs only addFormat.
const addBase64Format = ((ajv: { addFormat (name: string, format: typeof BASE64_FORMAT): unknown }) => {
  ajv.addFormat('base64', BASE64_FORMAT)
  return ajv
}) as unknown as AjvPlugin

const DATABASE_UNAVAILABLE = 'The database is unavailable; please retry shortly'

/** The service as one plugin: configuration, database, storage, routes, and how errors look. */
export default fp(async function app (app: FastifyInstance, opts: { config: Config }) {
  // Set first: a route keeps the error handler in force when it was declared.
  app.setErrorHandler(function (error: FastifyError, request, reply) {
    const { statusCode, message } = describeError(error)
    if (statusCode >= 500) {
      request.log.error({ err: error }, 'request failed')
    } else if (isInvalidData(error)) {
      request.log.warn({ err: error }, 'the database refused a value the schemas let through')
    }
    if (statusCode === 503) {
      reply.header('retry-after', '5')
      if (isDatabaseUnavailable(error)) app.metrics.databaseErrors.inc({ kind: 'unavailable' })
    }
    return reply.code(statusCode).send({ error: message, statusCode })
  })

  await app.register(configPlugin, { config: opts.config })
  await app.register(loadSheddingPlugin)
  await app.register(docsPlugin)
  await app.register(sensible)
  await app.register(securityHeadersPlugin)
  await app.register(corsPlugin)
  await app.register(dbPlugin)
  await app.register(metricsPlugin)
  await app.register(storagePlugin)
  await app.register(cleanupPlugin)
  await app.register(rateLimitPlugin)

  app.setNotFoundHandler(function (request, reply) {
    // The URL is not echoed back: it may hold a user id.
    return reply.code(404).send({ error: `No route for ${request.method} on this path`, statusCode: 404 })
  })

  await app.register(healthRoutes)
  await app.register(infoRoutes)
  await app.register(syncRoutes, { prefix: '/api/sync' })
}, { name: 'logikids-sync' })

/** Maps any error to the status and message a client may see: never a stack, a value or SQL. */
function describeError (error: FastifyError): { statusCode: number, message: string } {
  if (error.validation) {
    return { statusCode: 400, message: `Invalid request: ${error.message}` }
  }
  if (isDatabaseUnavailable(error)) return { statusCode: 503, message: DATABASE_UNAVAILABLE }
  if (error.code === 'OVERLOADED') return { statusCode: 503, message: error.message }
  if (isInvalidData(error)) return { statusCode: 400, message: 'Invalid request: the data does not satisfy the storage rules' }
  switch (error.code) {
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE':
      return { statusCode: 415, message: 'Unsupported Content-Type: send application/json' }
    case 'FST_ERR_CTP_BODY_TOO_LARGE':
      return { statusCode: 413, message: `Request body too large: the limit is ${BODY_LIMIT} bytes` }
    case 'FST_ERR_CTP_INVALID_JSON_BODY':
      return { statusCode: 400, message: 'Invalid request: the body is not valid JSON' }
    case 'FST_ERR_CTP_EMPTY_JSON_BODY':
      return { statusCode: 400, message: 'Invalid request: the JSON body is empty' }
    case 'FST_ERR_CTP_INVALID_CONTENT_LENGTH':
      return { statusCode: 400, message: 'Invalid request: Content-Length does not match the body' }
  }
  const statusCode = error.statusCode ?? 500
  if (statusCode >= 400 && statusCode < 500) return { statusCode, message: error.message }
  return { statusCode: 500, message: 'Internal Server Error' }
}
