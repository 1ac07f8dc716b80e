import fp from 'fastify-plugin'
import proxyAddr from '@fastify/proxy-addr'
import type { Attributes, Span, Tracer } from '@opentelemetry/api'
import type { ReadableSpan, SpanExporter } from '@opentelemetry/sdk-trace-base'
import type { ExportResult } from '@opentelemetry/core'
import { atMostEvery, pseudonym, redactUrl } from '../logging.ts'
import { USER_ID_PATTERN } from '../schemas/sync.ts'
import { collectorHeaders, trustedProxies } from './config.ts'

/** What the storage tells a trace of each statement: started now, ended by `end`. */
export type StatementTracer = (statement: string, on: 'primary' | 'replica') => { end (err?: unknown): void }

declare module 'fastify' {
  interface FastifyInstance {
    /** Starts a span per storage statement while tracing is on (OTEL_EXPORTER_OTLP_ENDPOINT); null when it is off. */
    traceStatement: StatementTracer | null
  }
}

const IS_USER_ID = new RegExp(USER_ID_PATTERN)
// The api's SpanStatusCode.UNSET and .ERROR, SpanKind.CLIENT and core's ExportResultCode.SUCCESS,
// spelled out: while tracing is off the SDK's modules are not loaded, nor is the api by this plugin.
const SPAN_STATUS_UNSET = 0
const SPAN_STATUS_ERROR = 2
const SPAN_KIND_CLIENT = 2
const EXPORT_SUCCESS = 0
// How long one batch may take to reach the collector, and how long closing waits for the last.
const EXPORT_TIMEOUT_MS = 5_000
const CLOSE_WAIT_MS = 2_000
// Probes and scrapes are not traced: they would outnumber the requests worth a look.
const UNTRACED_ROUTES = new Set(['/health', '/health/live', '/metrics'])
// A caller's trace context, believed only from a trusted proxy (TRUST_PROXY): from anyone else it
// would let a client force every request of its own into the traces (or out of them), or carry
// text of its choosing (tracestate, baggage) into the collector.
const TRACE_CONTEXT_HEADERS = ['traceparent', 'tracestate', 'baggage'] as const
let contextManagerSet = false

// The only attributes a span may leave with: names of routes, hooks and statements, methods,
// statuses, error codes, and the user's pseudonym. Anything else an instrumentation adds (a
// newer version's, a header) is dropped before export, and so are events (an exception's
// message and stack can quote a value) and status messages.
const EXPORTED_ATTRIBUTES = new Set([
  'fastify.root', 'fastify.type', 'hook.name', 'hook.callback.name',
  'http.request.method', 'http.route', 'http.response.status_code', 'url.path',
  'enduser.pseudo.id',
  'db.system.name', 'db.operation.name', 'db.response.status_code', 'error.type', 'logikids.database'
])

/**
 * An error is a request answered 500 or above, or a statement that failed: a 401 or 404 is an
 * answer, so neither its request span nor its handler's (which @fastify/otel marks when a
 * handler throws one) is an error.
 */
function statusOf (span: ReadableSpan, attributes: Attributes): number {
  const status = attributes['http.response.status_code']
  if (typeof status === 'number') return status >= 500 ? SPAN_STATUS_ERROR : SPAN_STATUS_UNSET
  return span.name.startsWith('storage ') ? span.status.code : SPAN_STATUS_UNSET
}

/**
 * The span as it may be exported: no attribute outside the list, no events, no status message, no
 * trace state; and a request answered below 500 is not an error (a 404 is an answer, not a fault).
 */
function redacted (span: ReadableSpan): ReadableSpan {
  const attributes: Attributes = {}
  for (const [key, value] of Object.entries(span.attributes)) if (EXPORTED_ATTRIBUTES.has(key)) attributes[key] = value
  const { traceState: _state, ...ids } = span.spanContext()
  const parent = span.parentSpanContext === undefined ? undefined : { ...span.parentSpanContext, traceState: undefined }
  return {
    name: span.name,
    kind: span.kind,
    spanContext: () => ids,
    parentSpanContext: parent,
    startTime: span.startTime,
    endTime: span.endTime,
    duration: span.duration,
    ended: span.ended,
    status: { code: statusOf(span, attributes) },
    attributes,
    links: [],
    events: [],
    resource: span.resource,
    instrumentationScope: span.instrumentationScope,
    droppedAttributesCount: span.droppedAttributesCount,
    droppedEventsCount: span.droppedEventsCount + span.events.length,
    droppedLinksCount: span.droppedLinksCount + span.links.length
  }
}

class RedactingExporter implements SpanExporter {
  private readonly exporter: SpanExporter
  private readonly failed: () => void
  constructor (exporter: SpanExporter, failed: () => void) {
    this.exporter = exporter
    this.failed = failed
  }

  export (spans: ReadableSpan[], done: (result: ExportResult) => void): void {
    this.exporter.export(spans.map(redacted), (result) => {
      if (result.code !== EXPORT_SUCCESS) this.failed()
      done(result)
    })
  }

  async shutdown (): Promise<void> { await this.exporter.shutdown() }
  async forceFlush (): Promise<void> { await this.exporter.forceFlush?.() }
}

/** A URL's path as the router matches it: without the query, percent-escapes decoded (/%6Detrics is /metrics). */
function decodedPath (url: string): string {
  const path = url.split('?')[0]!
  try {
    return decodeURIComponent(path)
  } catch {
    return path
  }
}

/** What names an error in a span: PostgreSQL's SQLSTATE or Node's code, never a message. */
function errorAttributes (err: unknown): Attributes {
  const code = (err as { code?: unknown } | null)?.code
  if (typeof code !== 'string') return { 'error.type': err instanceof Error ? err.name : 'unknown' }
  return /^[0-9A-Z]{5}$/.test(code) ? { 'error.type': code, 'db.response.status_code': code } : { 'error.type': code }
}

/**
 * Request tracing with OpenTelemetry, off unless OTEL_EXPORTER_OTLP_ENDPOINT names an OTLP/HTTP
 * collector: then @fastify/otel makes a span per request (and one for its handler), the
 * storage a child span per SQL statement, and spans go out in batches. Off, none of the SDK,
 * the exporter or the instrumentation is even loaded. A span names a user by pseudonym only,
 * and carries no blob, iv, checksum, token or raw path (see EXPORTED_ATTRIBUTES).
 */
export default fp(async function tracing (app) {
  const { config } = app
  const { OTEL_EXPORTER_OTLP_ENDPOINT: endpoint, OTEL_EXPORTER_OTLP_HEADERS: headerList, OTEL_SERVICE_NAME: serviceName, OTEL_TRACES_SAMPLER_ARG: ratio } = config
  if (endpoint === '') {
    app.decorate('traceStatement', null)
    return
  }
  const [{ context, propagation, trace }, { AsyncLocalStorageContextManager }, { W3CTraceContextPropagator }, sdk, { OTLPTraceExporter },
    { resourceFromAttributes }, { FastifyOtelInstrumentation }] = await Promise.all([
    import('@opentelemetry/api'), import('@opentelemetry/context-async-hooks'), import('@opentelemetry/core'),
    import('@opentelemetry/sdk-trace-node'), import('@opentelemetry/exporter-trace-otlp-http'), import('@opentelemetry/resources'),
    import('@fastify/otel')
  ])
  // Process-wide, once: how a span follows a request across awaits, and how a trusted caller's
  // traceparent header is read. (A second app in the same process, as in tests, shares them.)
  if (!contextManagerSet) {
    contextManagerSet = context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable())
    propagation.setGlobalPropagator(new W3CTraceContextPropagator())
  }

  const collector = new URL(endpoint).origin
  const failureGate = atMostEvery(60_000)
  const exporter = new OTLPTraceExporter({ url: `${endpoint.replace(/\/+$/, '')}/v1/traces`, headers: collectorHeaders(headerList), timeoutMillis: EXPORT_TIMEOUT_MS })
  const provider = new sdk.NodeTracerProvider({
    resource: resourceFromAttributes({ 'service.name': serviceName }),
    sampler: new sdk.ParentBasedSampler({ root: new sdk.TraceIdRatioBasedSampler(ratio) }),
    spanProcessors: [new sdk.BatchSpanProcessor(new RedactingExporter(exporter, () => {
      // The collector's own error can hold its URL's credentials: the origin is enough to act on.
      if (failureGate()) app.log.warn({ collector }, 'tracing: the collector did not take a batch of spans; they are dropped (at most one such line a minute)')
    }), { exportTimeoutMillis: EXPORT_TIMEOUT_MS })]
  })
  const tracer: Tracer = provider.getTracer('logikids-sync')

  const trusted = config.TRUST_PROXY === '' ? () => false : proxyAddr.compile(trustedProxies(config.TRUST_PROXY))
  app.addHook('onRequest', async (request) => {
    const { headers } = request.raw
    if (TRACE_CONTEXT_HEADERS.some((name) => headers[name] !== undefined) && !trusted(request.raw.socket.remoteAddress ?? '', 0)) {
      for (const name of TRACE_CONTEXT_HEADERS) delete headers[name]
    }
  })

  const instrumentation = new FastifyOtelInstrumentation({
    // Asked with the route's pattern when routes are added, and with the raw URL (a query string
    // included) for each request.
    ignorePaths: (route: { url?: string }) => UNTRACED_ROUTES.has(decodedPath(route.url ?? '')),
    // Exceptions are recorded as events, which are not exported (their messages can quote values).
    recordExceptions: false,
    // A span per hook (about 15 a request) doubled what a traced request costs (bench/notes.md):
    // the request, its handler and its statements are what tie a slow request to its cause.
    instrumentHooks: false,
    requestHook (span: Span, request) {
      // Set over @fastify/otel's url.path, which is the raw URL: the user id and the query.
      span.setAttribute('url.path', redactUrl(request.url))
      const userId = (request.params as { userId?: unknown } | undefined)?.userId
      if (typeof userId === 'string' && IS_USER_ID.test(userId)) span.setAttribute('enduser.pseudo.id', pseudonym(userId))
    }
  })
  instrumentation.setTracerProvider(provider)
  await app.register(instrumentation.plugin())

  const untraced = { end () {} }
  app.decorate('traceStatement', (statement: string, on: 'primary' | 'replica') => {
    // Only as part of a traced request: the scrape's count and the cleanup's batches would each
    // start a trace of their own.
    const parent = context.active()
    if (trace.getSpan(parent) === undefined) return untraced
    const span = tracer.startSpan(`storage ${statement}`, {
      kind: SPAN_KIND_CLIENT,
      attributes: { 'db.system.name': 'postgresql', 'db.operation.name': statement, 'logikids.database': on }
    }, parent)
    return {
      end (err?: unknown) {
        if (err !== undefined) {
          span.setAttributes(errorAttributes(err))
          span.setStatus({ code: SPAN_STATUS_ERROR })
        }
        span.end()
      }
    }
  })

  app.log.info({ collector, sampled: ratio }, 'tracing: spans are exported over OTLP/HTTP')
  // Spans still in the batch go out on close, unless the collector keeps them waiting longer.
  app.addHook('onClose', async () => {
    await Promise.race([provider.shutdown().catch(() => {}), new Promise((resolve) => setTimeout(resolve, CLOSE_WAIT_MS).unref())])
  })
}, { name: 'tracing', dependencies: ['config'] })
