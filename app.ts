import { STATUS_CODES, type Server } from 'node:http'
import type { Socket } from 'node:net'
import type { FastifyError, FastifyHttpOptions, FastifyInstance, FastifyReply, FastifyServerOptions } from 'fastify'
import fp from 'fastify-plugin'
import sensible from '@fastify/sensible'
import configPlugin, { trustedProxies, type Config } from './plugins/config.ts'
import dbPlugin, { isDatabaseUnavailable, isInvalidData } from './plugins/db.ts'
import replicaPlugin from './plugins/replica.ts'
import storagePlugin from './plugins/storage.ts'
import corsPlugin from './plugins/cors.ts'
import metricsPlugin from './plugins/metrics.ts'
import cleanupPlugin from './plugins/cleanup.ts'
import rateLimitPlugin from './plugins/rate-limit.ts'
import docsPlugin from './plugins/docs.ts'
import securityHeadersPlugin from './plugins/security-headers.ts'
import loadSheddingPlugin from './plugins/load-shedding.ts'
import bodyPolicyPlugin from './plugins/body-policy.ts'
import pipeliningPlugin from './plugins/pipelining.ts'
import tracingPlugin from './plugins/tracing.ts'
import healthRoutes from './routes/health.ts'
import infoRoutes from './routes/info.ts'
import metricsRoutes from './routes/metrics.ts'
import syncRoutes from './routes/api/sync/index.ts'
import { BASE64_FORMAT, BODY_LIMIT } from './schemas/sync.ts'
import { ErrorSchema } from './schemas/error.ts'
import { OneLinePerRequest, loggerOptions } from './logging.ts'

/** The options Fastify must be created with (server.ts and the tests share them). */
export function serverOptions (config: Config): FastifyHttpOptions<Server> {
  return {
    // Behind a reverse proxy, request.ip (rate limits, logs) comes from X-Forwarded-For, but only
    // when the connection comes from one of these addresses.
    trustProxy: config.TRUST_PROXY === '' ? false : trustedProxies(config.TRUST_PROXY),
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
    // During shutdown the app answers 503 itself (below), in the one error shape.
    return503OnClosing: false,
    // The embedded database's first start (WebAssembly) can take longer than Fastify's 10 s.
    pluginTimeout: 60_000,
    // Errors of the router (a URL that does not decode, a parameter over 100 characters) and of
    // Node's HTTP parser (408, 431, malformed requests) in the one error shape, like all others.
    frameworkErrors: function (error, request, reply) {
      const { statusCode, message } = describeError(error)
      request.log.info({ code: error.code, statusCode }, 'request refused by the router')
      request.server.metrics?.clientErrors.inc({ status: statusCode })
      return sendError(reply, statusCode, message)
    },
    clientErrorHandler,
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

/** The one error answer: JSON {error, statusCode}, never cached (it may be about one user's data). */
function sendError (reply: FastifyReply, statusCode: number, message: string): FastifyReply {
  reply.header('cache-control', 'no-store')
  if (statusCode === 503 && !reply.hasHeader('retry-after')) reply.header('retry-after', '5')
  return reply.code(statusCode).send({ error: message, statusCode })
}

/** The service as one plugin: configuration, database, storage, routes, and how errors look. */
export default fp(async function app (app: FastifyInstance, opts: { config: Config }) {
  // Set first: a route keeps the error handler in force when it was declared.
  app.setErrorHandler(function (error: FastifyError, request, reply) {
    if (clientWentAway(error, request.raw.socket)) {
      // A client that closed the connection mid-upload (a phone losing its signal): nothing
      // is stored, nobody reads the answer, and the database is not to blame.
      request.log.info({ code: error.code }, 'the client closed the connection before its request was complete')
      return sendError(reply, 400, 'The request was not received completely')
    }
    const { statusCode, message } = describeError(error)
    // Shed requests are logged by the load shedder, sampled: never a line (or a stack) each.
    if (statusCode >= 500 && !request.shed) {
      if (statusCode === 503) request.log.warn({ err: error }, 'request failed: service unavailable')
      else request.log.error({ err: error }, 'request failed')
    } else if (isInvalidData(error)) {
      request.log.warn({ err: error }, 'the database refused a value the schemas let through')
    }
    if (statusCode === 503 && isDatabaseUnavailable(error)) app.metrics.databaseErrors.inc({ kind: 'unavailable' })
    return sendError(reply, statusCode, message)
  })

  // Every route answers its errors in the one shape, documented as such in the OpenAPI document.
  app.addHook('onRoute', (route) => {
    if (route.schema?.hide === true) return
    const response = (route.schema?.response ?? {}) as Record<string, unknown>
    route.schema = { ...route.schema, response: { '4xx': ErrorSchema, '5xx': ErrorSchema, ...response } }
  })

  // Shutting down: in-flight requests finish; a new one (on an open keep-alive connection) is
  // told to go elsewhere, and its connection is closed.
  let closing = false
  app.addHook('preClose', async () => { closing = true })
  app.addHook('onRequest', (_request, reply, done) => {
    if (!closing) {
      done()
      return
    }
    reply.header('connection', 'close')
    done(Object.assign(new Error('The service is shutting down; please retry shortly'), { statusCode: 503, code: 'SHUTTING_DOWN' }))
  })

  await app.register(pipeliningPlugin)
  await app.register(configPlugin, { config: opts.config })
  // First of the request's hooks (with OTEL_EXPORTER_OTLP_ENDPOINT): a refused request is traced too.
  await app.register(tracingPlugin)
  // A connection past MAX_CONNECTIONS is closed at once, before it can send anything.
  app.server.maxConnections = opts.config.MAX_CONNECTIONS
  // onRequest hooks run in this order: security headers and CORS (so that browsers can read
  // even a 429 or 503), the per-IP limit, load shedding, then the body rules; all of them
  // before any body is read.
  await app.register(securityHeadersPlugin)
  await app.register(corsPlugin)
  await app.register(rateLimitPlugin)
  await app.register(loadSheddingPlugin)
  await app.register(bodyPolicyPlugin)
  if (opts.config.DOCS) await app.register(docsPlugin)
  await app.register(sensible)
  await app.register(dbPlugin)
  await app.register(metricsPlugin)
  await app.register(replicaPlugin)
  await app.register(storagePlugin)
  await app.register(cleanupPlugin)

  app.setNotFoundHandler(function (request, reply) {
    // The URL is not echoed back: it may hold a user id.
    return sendError(reply, 404, `No route for ${request.method} on this path`)
  })

  await app.register(healthRoutes)
  await app.register(infoRoutes)
  await app.register(metricsRoutes)
  await app.register(syncRoutes, { prefix: '/api/sync' })
}, { name: 'logikids-sync' })

/** Whether reading the request failed because the client closed its connection. */
function clientWentAway (error: FastifyError, socket: Socket | null): boolean {
  return (socket === null || socket.destroyed) &&
    (error.code === 'ECONNRESET' || error.code === 'ECONNABORTED' || error.message === 'aborted')
}

// Node's HTTP parser reports these before Fastify sees a request.
const CLIENT_ERRORS: Record<string, [number, string]> = {
  ERR_HTTP_REQUEST_TIMEOUT: [408, 'Request timeout: the request was not received in time'],
  HPE_HEADER_OVERFLOW: [431, 'Request header fields too large'],
  HPE_URI_TOO_LONG: [414, 'URI too long']
}

/** A request Node could not parse (or not in time): answered in the one error shape, then closed. */
function clientErrorHandler (this: FastifyInstance, err: Error & { code?: string }, socket: Socket): void {
  if (err.code === 'ECONNRESET' || socket.destroyed) return
  const [statusCode, message] = CLIENT_ERRORS[err.code ?? ''] ?? [400, 'Bad request: the HTTP request is malformed']
  this.log.info({ code: err.code, statusCode }, 'client error')
  this.metrics?.clientErrors.inc({ status: statusCode })
  if (socket.writable) {
    const body = JSON.stringify({ error: message, statusCode })
    socket.write(`HTTP/1.1 ${statusCode} ${STATUS_CODES[statusCode]}\r\nContent-Type: application/json; charset=utf-8\r\n` +
      `Content-Length: ${Buffer.byteLength(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n${body}`)
  }
  socket.destroy()
}

// The service's own errors (plugins/load-shedding.ts, plugins/body-policy.ts, shutdown): their
// status and message are meant for the client, 5xx included.
const SERVICE_ERRORS = new Set(['OVERLOADED', 'SHUTTING_DOWN', 'NO_BODY_ALLOWED', 'UNSUPPORTED_ENCODING',
  'UNSUPPORTED_TRANSFER_ENCODING', 'UNREASONABLE_JSON'])

/** Maps any error to the status and message a client may see: never a stack, a value or SQL. */
export function describeError (error: FastifyError): { statusCode: number, message: string } {
  if (error.validation) {
    return { statusCode: 400, message: `Invalid request: ${error.message}` }
  }
  if (isDatabaseUnavailable(error)) return { statusCode: 503, message: DATABASE_UNAVAILABLE }
  if (SERVICE_ERRORS.has(error.code)) {
    return { statusCode: error.statusCode!, message: error.message }
  }
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
    case 'FST_ERR_BAD_URL':
      return { statusCode: 400, message: 'Invalid request: the URL is not correctly percent-encoded' }
    case 'FST_ERR_MAX_PARAM_LENGTH':
      return { statusCode: 414, message: 'URI too long: a path segment is longer than 100 characters' }
  }
  const statusCode = error.statusCode ?? 500
  if (statusCode >= 400 && statusCode < 500) return { statusCode, message: error.message }
  return { statusCode: 500, message: 'Internal Server Error' }
}
