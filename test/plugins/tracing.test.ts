import t from 'tap'
import { createHash, randomBytes, randomUUID } from 'node:crypto'
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { AddressInfo } from 'node:net'
import { build, databaseUrlOf, holdTable, type TestContext } from '../helper.ts'
import { startServer } from '../server-process.ts'

// Tracing (OTEL_EXPORTER_OTLP_ENDPOINT) against an OTLP/HTTP collector in this process: what a
// collector receives from the service, in its default configuration otherwise (both rate
// limits on, access tokens optional).

interface OtlpSpan {
  traceId: string
  spanId: string
  parentSpanId?: string
  name: string
  attributes: Array<{ key: string, value: Record<string, unknown> }>
}
type Received = { bodies: string[], spans: OtlpSpan[], headers: Array<Record<string, string | string[] | undefined>> }

/** An OTLP/HTTP collector that keeps what it receives and answers `status` (200: taken). */
async function collector (t: TestContext, status = 200): Promise<Received & { endpoint: string }> {
  const received: Received = { bodies: [], spans: [], headers: [] }
  const server = createServer((request, response) => {
    let body = ''
    request.on('data', (chunk) => { body += String(chunk) })
    request.on('end', () => {
      if (request.url === '/v1/traces' && request.method === 'POST') {
        received.bodies.push(body)
        received.headers.push(request.headers)
        const message = JSON.parse(body) as { resourceSpans: Array<{ scopeSpans: Array<{ spans: OtlpSpan[] }> }> }
        for (const resource of message.resourceSpans) for (const scope of resource.scopeSpans) received.spans.push(...scope.spans)
      }
      response.writeHead(status, { 'content-type': 'application/json' }).end('{}')
    })
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => new Promise((resolve) => server.close(resolve)))
  return { ...received, endpoint: `http://127.0.0.1:${(server.address() as AddressInfo).port}` }
}

const attribute = (span: OtlpSpan, key: string): unknown => {
  const value = span.attributes.find((entry) => entry.key === key)?.value
  return value === undefined ? undefined : Object.values(value)[0]
}
const pseudonymOf = (userId: string) => createHash('sha256').update(userId.toLowerCase()).digest('hex').slice(0, 12)

t.test('a request\'s span has its storage statements as children, and no secret leaves with them', async (t) => {
  const received = await collector(t)
  const app = await build(t, {
    env: { OTEL_EXPORTER_OTLP_ENDPOINT: received.endpoint, OTEL_EXPORTER_OTLP_HEADERS: 'authorization=Bearer%20collector-secret,x-tenant=kids' },
    // As a careless plugin (or a future @fastify/otel) might: a header, the id and the URL on the span.
    afterApp: (service) => service.addHook('preHandler', async (request) => {
      const { span } = request.opentelemetry()
      span?.setAttribute('http.request.header.authorization', String(request.headers.authorization))
      span?.setAttribute('logikids.user', String((request.params as { userId?: string }).userId))
      span?.addEvent('handler', { url: request.url })
      span?.setStatus({ code: 2, message: request.url })
    })
  })
  const userId = randomUUID()
  const token = randomBytes(32).toString('base64url')
  const payload = { encryptedBlob: randomBytes(300).toString('base64'), iv: randomBytes(12).toString('base64'), timestamp: 1, checksum: randomBytes(32).toString('hex') }
  const url = `/api/sync/${userId}`
  const put = await app.inject({ method: 'PUT', url: `${url}?note=${userId}`, payload, headers: { authorization: `Bearer ${token}` } })
  t.equal(put.statusCode, 200)
  t.equal((await app.inject({ method: 'GET', url, headers: { authorization: `Bearer ${token}` } })).statusCode, 200)
  t.equal((await app.inject({ method: 'GET', url, headers: { authorization: `Bearer ${randomBytes(32).toString('base64url')}` } })).statusCode, 401)
  t.equal((await app.inject({ method: 'PUT', url, payload: { ...payload, iv: 'short' } })).statusCode, 400)
  // A client's trace context is not believed (TRUST_PROXY is empty): not its trace id, not its
  // choice to be sampled, not its tracestate.
  const callerTrace = randomBytes(16).toString('hex')
  const callerSpan = randomBytes(8).toString('hex')
  t.equal((await app.inject({
    method: 'GET',
    url: `/api/sync/${randomUUID()}`,
    headers: { traceparent: `00-${callerTrace}-${callerSpan}-01`, tracestate: `vendor=${userId}`, baggage: `user=${userId}` }
  })).statusCode, 404)
  // Probes and scrapes are not traced; neither is the cleanup's work outside any request.
  t.equal((await app.inject({ method: 'GET', url: '/health' })).statusCode, 200)
  t.equal((await app.inject({ method: 'GET', url: '/health/live?probe=1' })).statusCode, 200)
  t.equal((await app.inject({ method: 'GET', url: '/metrics?x=1' })).statusCode, 200)
  t.equal((await app.inject({ method: 'GET', url: '/%6Detrics' })).statusCode, 200)
  t.match(await app.cleanup.run(), { ran: true })
  // Closing flushes the batch.
  await app.close()

  t.ok(received.headers.length > 0 && received.headers.every((headers) => headers.authorization === 'Bearer collector-secret' && headers['x-tenant'] === 'kids'),
    'OTEL_EXPORTER_OTLP_HEADERS go to the collector')
  const byId = new Map(received.spans.map((span) => [span.spanId, span]))
  const requests = received.spans.filter((span) => span.name === 'request')
  t.equal(requests.length, 5, 'one request span per request')
  const upload = requests.find((span) => attribute(span, 'http.request.method') === 'PUT' && attribute(span, 'http.response.status_code') === 200)!
  t.ok(upload, 'the upload\'s request span')
  t.equal(attribute(upload, 'http.route'), '/api/sync/:userId')
  t.equal(attribute(upload, 'enduser.pseudo.id'), pseudonymOf(userId), 'the user by pseudonym')
  t.equal(attribute(upload, 'url.path'), `/api/sync/~${pseudonymOf(userId)}?[redacted]`, 'the path with the id pseudonymised, without its query')
  const ancestors = (span: OtlpSpan): OtlpSpan[] => {
    const parent = span.parentSpanId === undefined || span.parentSpanId === '' ? undefined : byId.get(span.parentSpanId)
    return parent === undefined ? [] : [parent, ...ancestors(parent)]
  }
  const statements = received.spans.filter((span) => span.name.startsWith('storage ') && ancestors(span).includes(upload))
  t.ok(statements.length >= 1, `the upload's storage statements are spans under it (${statements.map((span) => span.name).join(', ')})`)
  t.match(statements[0], { traceId: upload.traceId })
  t.equal(attribute(statements[0]!, 'db.system.name'), 'postgresql')
  t.match(attribute(statements[0]!, 'db.operation.name'), /^sync-/)
  t.equal(attribute(statements[0]!, 'logikids.database'), 'primary')

  t.ok(received.spans.some((span) => attribute(span, 'fastify.type') === 'request-handler' && span.parentSpanId === upload.spanId),
    'the handler is a span under the request')
  t.notOk(received.spans.some((span) => ['hook', 'route-hook'].includes(String(attribute(span, 'fastify.type')))),
    'hooks are not spans of their own (they doubled the cost of tracing; bench/notes.md)')
  const orphans = received.spans.filter((span) => span.name.startsWith('storage ') && !ancestors(span).some((a) => a.name === 'request'))
  t.strictSame(orphans.map((span) => span.name), [], 'every statement span is under a request span (none starts a trace of its own)')
  const notFound = requests.find((span) => attribute(span, 'http.response.status_code') === 404)!
  t.not(notFound.traceId, callerTrace, 'a client\'s trace id is not taken')
  t.notOk(notFound.parentSpanId, 'nor its span as a parent')
  const answers = received.spans.filter((span) => [notFound.traceId, requests.find((r) => attribute(r, 'http.response.status_code') === 401)!.traceId].includes(span.traceId))
  t.ok(answers.length >= 4, `the 404's and the 401's spans (${answers.map((span) => span.name).join(', ')})`)
  t.notOk(answers.some((span) => (span as { status?: { code?: number } }).status?.code === 2), 'a 404 or a 401 is an answer, not an error, on none of their spans')
  t.notOk(received.spans.some((span) => span.name.startsWith('storage sync-delete-inactive') || span.name.startsWith('storage sync-totals')),
    'no statement span outside a request')

  const everything = received.bodies.join('\n').toLowerCase()
  for (const [what, secret] of [['user id', userId], ['user id without dashes', userId.replaceAll('-', '')], ['blob', payload.encryptedBlob.slice(0, 40)],
    ['iv', payload.iv], ['checksum', payload.checksum], ['token', token]] as const) {
    t.notOk(everything.includes(secret.toLowerCase()), `no ${what} in anything the collector received`)
  }
  t.notOk(everything.includes('exception'), 'no exception event (their messages can quote values)')
  t.notOk(everything.includes('"message"'), 'no status message (an error\'s message, or a plugin\'s, can quote values)')
  t.notOk(everything.includes('vendor='), 'no trace state')
})

t.test('a trusted proxy\'s trace is continued', async (t) => {
  const received = await collector(t)
  const app = await build(t, { env: { OTEL_EXPORTER_OTLP_ENDPOINT: received.endpoint, TRUST_PROXY: '127.0.0.1' } })
  const callerTrace = randomBytes(16).toString('hex')
  const callerSpan = randomBytes(8).toString('hex')
  t.equal((await app.inject({
    method: 'GET',
    url: `/api/sync/${randomUUID()}`,
    headers: { traceparent: `00-${callerTrace}-${callerSpan}-01`, tracestate: 'vendor=proxy-state' }
  })).statusCode, 404)
  await app.close()
  t.notOk(received.bodies.join('\n').includes('proxy-state'), 'its trace state is not exported')
  const request = received.spans.find((span) => span.name === 'request')!
  t.equal(request.traceId, callerTrace, 'the proxy\'s trace id')
  t.equal(request.parentSpanId, callerSpan, 'under the proxy\'s span')
})

t.test('a statement that fails is a span with the error\'s code, not its message', async (t) => {
  const received = await collector(t)
  const app = await build(t, { env: { OTEL_EXPORTER_OTLP_ENDPOINT: received.endpoint, DATABASE_STATEMENT_TIMEOUT_MS: '300' } })
  // The table held: the download's statement runs out of time (57014), and the answer is 503.
  const held = await holdTable(t, databaseUrlOf(app), 'user_sync_data')
  t.equal((await app.inject({ method: 'GET', url: `/api/sync/${randomUUID()}` })).statusCode, 503)
  await held.release()
  await app.close()
  const failed = received.spans.find((span) => span.name.startsWith('storage ') && attribute(span, 'error.type') !== undefined)
  t.ok(failed, 'the statement\'s span')
  t.equal(attribute(failed!, 'error.type'), '57014', 'named by its SQLSTATE')
  t.equal(attribute(failed!, 'db.response.status_code'), '57014')
  t.match(failed, { status: { code: 2 } }, 'with the error status')
  t.notOk(JSON.stringify(failed).includes('message'), 'and no message')
  t.match(received.spans.find((span) => span.name === 'request'), { status: { code: 2 } }, 'the 503 is an error of the request too')
})

t.test('a collector that refuses spans costs a warning a minute, never a request', async (t) => {
  const logLines: string[] = []
  const refusing = await collector(t, 400)
  const endpoint = refusing.endpoint.replace('http://', 'http://user:collector-password@')
  const app = await build(t, { env: { OTEL_EXPORTER_OTLP_ENDPOINT: endpoint, LOG_LEVEL: 'info' }, logLines })
  t.equal((await app.inject({ method: 'GET', url: `/api/sync/${randomUUID()}` })).statusCode, 404)
  await app.close()
  t.ok(refusing.bodies.length > 0, 'the batch was offered')
  const warnings = logLines.filter((line) => line.includes('tracing: the collector did not take a batch'))
  t.equal(warnings.length, 1, 'one warning')
  t.match(JSON.parse(warnings[0] ?? '{}'), { level: 40, collector: new URL(refusing.endpoint).origin }, 'naming the collector by its origin')
  t.notOk(logLines.some((line) => line.includes('collector-password')), 'never its credentials')
})

t.test('a collector that is not there does not keep the service from closing', async (t) => {
  // Port 9 (discard): nothing listens there; the exporter retries until its time-out.
  const app = await build(t, { env: { OTEL_EXPORTER_OTLP_ENDPOINT: 'http://127.0.0.1:9' } })
  t.equal((await app.inject({ method: 'GET', url: `/api/sync/${randomUUID()}` })).statusCode, 404)
  await app.close()
  t.pass('closed')
})

t.test('off by default: no span, no instrumentation, and nothing of OpenTelemetry loaded', async (t) => {
  const app = await build(t)
  t.equal(app.config.OTEL_EXPORTER_OTLP_ENDPOINT, '')
  t.equal(app.traceStatement, null, 'the storage traces nothing')
  t.notOk(app.hasPlugin('@fastify/otel'), 'no request instrumentation')

  // The real server, watched by an import hook, off and then on (which shows the hook sees them).
  const loaded = async (env: Record<string, string>): Promise<string[]> => {
    const log = join(mkdtempSync(join(tmpdir(), 'lk-modules-')), 'loaded.txt')
    writeFileSync(log, '')
    const server = await startServer(t, {
      env: {
        DATABASE_URL: databaseUrlOf(app),
        NODE_OPTIONS: `--import=${join(import.meta.dirname, '..', 'loaded-modules.mjs')}`,
        LOADED_MODULES_LOG: log,
        LOADED_MODULES_MATCH: '/node_modules/@',
        ...env
      }
    })
    t.equal((await fetch(`${server.url}/api/sync/${randomUUID()}`)).status, 404)
    await server.stop()
    // @opentelemetry/api is not counted: prom-client requires it whatever this service does.
    return readFileSync(log, 'utf8').split('\n').filter((url) => /@opentelemetry\/(?!api\/)|@fastify\/otel/.test(url))
  }
  t.strictSame(await loaded({}), [], 'off: no module of the OpenTelemetry SDK, exporter or instrumentation is loaded')
  const received = await collector(t)
  t.ok((await loaded({ OTEL_EXPORTER_OTLP_ENDPOINT: received.endpoint })).some((url) => url.includes('@fastify/otel')),
    'on: they are (so the hook would have seen them)')
})
