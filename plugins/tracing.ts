import fp from 'fastify-plugin'
import type { Attributes, Span, Tracer } from '@opentelemetry/api'
import type { ReadableSpan, SpanExporter } from '@opentelemetry/sdk-trace-base'
import type { ExportResult } from '@opentelemetry/core'
import { atMostEvery, pseudonym, redactUrl } from '../logging.ts'
import { USER_ID_PATTERN } from '../schemas/sync.ts'

/** What the storage tells a trace of each statement: started now, ended by `end`. */
export type StatementTracer = (statement: string, on: 'primary' | 'replica') => { end (err?: unknown): void }

declare module 'fastify' {
  interface FastifyInstance {
    /** Starts a span per storage statement while tracing is on (OTEL_EXPORTER_OTLP_ENDPOINT); null when it is off. */
    traceStatement: StatementTracer | null
  }
}

const IS_USER_ID = new RegExp(USER_ID_PATTERN)
const SPAN_STATUS_ERROR = 2
const SPAN_KIND_CLIENT = 2
const SHUTDOWN_WAIT_MS = 5_000
const EXPORT_SUCCESS = 0

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

/** The span as it may be exported: no attribute outside the list, no events, no status message. */
function redacted (span: ReadableSpan): ReadableSpan {
  const attributes: Attributes = {}
  for (const [key, value] of Object.entries(span.attributes)) if (EXPORTED_ATTRIBUTES.has(key)) attributes[key] = value
  return {
    name: span.name,
    kind: span.kind,
    spanContext: () => span.spanContext(),
    parentSpanContext: span.parentSpanContext,
    startTime: span.startTime,
    endTime: span.endTime,
    duration: span.duration,
    ended: span.ended,
    status: { code: span.status.code },
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

/** OTEL_EXPORTER_OTLP_HEADERS as the OpenTelemetry specification writes them: name=value,... percent-encoded. */
export function collectorHeaders (list: string): Record<string, string> {
  const headers: Record<string, string> = {}
  for (const entry of list.split(',')) {
    const at = entry.indexOf('=')
    if (at > 0) headers[decodeURIComponent(entry.slice(0, at).trim())] = decodeURIComponent(entry.slice(at + 1).trim())
  }
  return headers
}

/** What names an error in a span: PostgreSQL's SQLSTATE or Node's code, never a message. */
function errorAttributes (err: unknown): Attributes {
  const code = (err as { code?: unknown } | null)?.code
  if (typeof code !== 'string') return { 'error.type': err instanceof Error ? err.name : 'unknown' }
  return /^[0-9A-Z]{5}$/.test(code) ? { 'error.type': code, 'db.response.status_code': code } : { 'error.type': code }
}

/**
 * Request tracing with OpenTelemetry, off unless OTEL_EXPORTER_OTLP_ENDPOINT names an OTLP/HTTP
 * collector: then @fastify/otel makes a span per request (and its hooks and handler), the
 * storage a child span per SQL statement, and spans go out in batches. Off, nothing of
 * OpenTelemetry is even loaded. A span names a user by pseudonym only, and carries no blob, iv,
 * checksum, token or raw path (see EXPORTED_ATTRIBUTES).
 */
export default fp(async function tracing (app) {
  const { OTEL_EXPORTER_OTLP_ENDPOINT: endpoint, OTEL_EXPORTER_OTLP_HEADERS: headerList, OTEL_SERVICE_NAME: serviceName, OTEL_TRACES_SAMPLER_ARG: ratio } = app.config
  if (endpoint === '') {
    app.decorate('traceStatement', null)
    return
  }
  const [{ context, propagation }, { AsyncLocalStorageContextManager }, { W3CTraceContextPropagator }, sdk, { OTLPTraceExporter },
    { resourceFromAttributes }, { FastifyOtelInstrumentation }] = await Promise.all([
    import('@opentelemetry/api'), import('@opentelemetry/context-async-hooks'), import('@opentelemetry/core'),
    import('@opentelemetry/sdk-trace-node'), import('@opentelemetry/exporter-trace-otlp-http'), import('@opentelemetry/resources'),
    import('@fastify/otel')
  ])
  // Process-wide, once: how a span follows a request across awaits, and how a caller's
  // traceparent header is read. (A second app in the same process, as in tests, keeps them.)
  context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable())
  propagation.setGlobalPropagator(new W3CTraceContextPropagator())

  const collector = new URL(endpoint).origin
  const failureGate = atMostEvery(60_000)
  const exporter = new OTLPTraceExporter({ url: `${endpoint.replace(/\/+$/, '')}/v1/traces`, headers: collectorHeaders(headerList), timeoutMillis: SHUTDOWN_WAIT_MS })
  const provider = new sdk.NodeTracerProvider({
    resource: resourceFromAttributes({ 'service.name': serviceName }),
    sampler: new sdk.ParentBasedSampler({ root: new sdk.TraceIdRatioBasedSampler(ratio) }),
    spanProcessors: [new sdk.BatchSpanProcessor(new RedactingExporter(exporter, () => {
      // The collector's own error can hold its URL's credentials: the origin is enough to act on.
      if (failureGate()) app.log.warn({ collector }, 'tracing: the collector did not take a batch of spans; they are dropped (at most one such line a minute)')
    }), { exportTimeoutMillis: SHUTDOWN_WAIT_MS })]
  })
  const tracer: Tracer = provider.getTracer('logikids-sync')

  const instrumentation = new FastifyOtelInstrumentation({
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

  app.decorate('traceStatement', (statement: string, on: 'primary' | 'replica') => {
    const span = tracer.startSpan(`storage ${statement}`, {
      kind: SPAN_KIND_CLIENT,
      attributes: { 'db.system.name': 'postgresql', 'db.operation.name': statement, 'logikids.database': on }
    }, context.active())
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
  // Spans still in the batch go out on close, unless the collector keeps them waiting.
  app.addHook('onClose', async () => {
    await Promise.race([provider.shutdown().catch(() => {}), new Promise((resolve) => setTimeout(resolve, SHUTDOWN_WAIT_MS).unref())])
  })
}, { name: 'tracing', dependencies: ['config'] })
