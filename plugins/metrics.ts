import Fastify, { type FastifyReply } from 'fastify'
import fp from 'fastify-plugin'
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client'

const STORED_REFRESH_MS = 60_000
// How long a scrape waits for the database (the count, the SELECT 1) before it answers with the
// last figures: a database that hangs must not make the scrape time out, which Prometheus would
// read as the service being down (SyncServiceDown) and drop every other figure with it.
const SCRAPE_WAIT_MS = 500

/** Waits for `work` at most SCRAPE_WAIT_MS; the work goes on either way. */
async function atMostScrapeWait (work: Promise<unknown>): Promise<void> {
  let timer: NodeJS.Timeout | undefined
  await Promise.race([work, new Promise((resolve) => { timer = setTimeout(resolve, SCRAPE_WAIT_MS) })])
  clearTimeout(timer)
}

/** The service's Prometheus metrics, one registry per app (so tests can build several apps). */
export function createMetrics () {
  const registry = new Registry()
  collectDefaultMetrics({ register: registry })
  return {
    registry,
    httpDuration: new Histogram({
      name: 'http_request_duration_seconds',
      help: 'HTTP requests by route pattern, method and status',
      labelNames: ['route', 'method', 'status'] as const,
      buckets: [0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
      registers: [registry]
    }),
    storageDuration: new Histogram({
      name: 'storage_operation_duration_seconds',
      help: 'Storage operations (one SQL statement each) by operation and outcome',
      labelNames: ['operation', 'outcome'] as const,
      buckets: [0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5],
      registers: [registry]
    }),
    databaseErrors: new Counter({
      name: 'database_connection_errors_total',
      help: 'Requests that found the database unavailable (503) and pooled connections the server closed',
      labelNames: ['kind'] as const,
      registers: [registry]
    }),
    rejectedUploads: new Counter({
      name: 'rejected_uploads_total',
      help: 'Uploads (PUT) refused, by status: 400 invalid, 401 access token, 412 precondition, 413 too large, 415 not JSON, 429 rate limit',
      labelNames: ['status'] as const,
      registers: [registry]
    }),
    authFailures: new Counter({
      name: 'auth_failures_total',
      help: 'Sync requests refused for their access token: missing (on a claimed record, or in AUTH_MODE=required), malformed, wrong',
      labelNames: ['reason'] as const,
      registers: [registry]
    }),
    clientErrors: new Counter({
      name: 'http_client_errors_total',
      help: 'Requests refused before routing: 400 malformed HTTP or URL encoding, 408 too slow, 414 a path segment over 100 characters, 431 headers too large',
      labelNames: ['status'] as const,
      registers: [registry]
    }),
    cleanupRuns: new Counter({
      name: 'cleanup_runs_total',
      help: 'Inactive-account cleanup runs, by result (deleted, skipped: another instance held the lock, failed)',
      labelNames: ['result'] as const,
      registers: [registry]
    }),
    rateLimitStoreErrors: new Counter({
      name: 'rate_limit_store_errors_total',
      help: 'Rate-limit counts Redis did not answer in time (REDIS_TIMEOUT_MS) or at all: those requests were served uncounted',
      registers: [registry]
    }),
    rateLimitStoreUp: new Gauge({
      name: 'rate_limit_store_up',
      help: '1 while the rate-limit counters work (in process, or Redis answering), 0 during a Redis outage',
      registers: [registry]
    }),
    reads: new Counter({
      name: 'database_reads_total',
      help: 'Reads (downloads, verify, HEAD, versions) by the database that answered them: replica or primary',
      labelNames: ['target'] as const,
      registers: [registry]
    }),
    cleanupDeleted: new Counter({
      name: 'cleanup_deleted_accounts_total',
      help: 'Accounts deleted by the inactive-account cleanup',
      registers: [registry]
    }),
    cleanupLastSuccess: new Gauge({
      name: 'cleanup_last_success_timestamp_seconds',
      help: 'When this instance last ran the cleanup to the end, Unix time; 0 before its first run (a run skipped because another instance held the lock does not count)',
      registers: [registry]
    }),
    cleanupLastFailure: new Gauge({
      name: 'cleanup_last_failure_timestamp_seconds',
      help: 'When a cleanup run of this instance last failed, Unix time; 0 if none has',
      registers: [registry]
    }),
    cleanupInterval: new Gauge({
      name: 'cleanup_interval_seconds',
      help: 'CLEANUP_INTERVAL: how often the cleanup runs; 0 when it is disabled',
      registers: [registry]
    }),
    shedRequests: new Counter({
      name: 'load_shed_requests_total',
      help: 'Requests refused with 503 because the event loop fell behind (MAX_EVENT_LOOP_DELAY_MS)',
      registers: [registry]
    })
  }
}

export type Metrics = ReturnType<typeof createMetrics>

declare module 'fastify' {
  interface FastifyInstance {
    metrics: Metrics
    /** The separate metrics listener, when there is one (see METRICS_LISTENER). */
    metricsListener?: FastifyInstance
  }
}

/** The metrics every other plugin records into (served by routes/metrics.ts or a listener of their own). */
export default fp(async function metrics (app) {
  const metrics = createMetrics()
  metrics.rateLimitStoreUp.set(1)
  // Counters alerts and panels take the increase of start at 0: Prometheus counts no increase in
  // a series' first sample, so an outage's first 503s would otherwise go unseen.
  for (const kind of ['unavailable', 'connection_lost']) metrics.databaseErrors.inc({ kind }, 0)
  for (const result of ['deleted', 'skipped', 'failed']) metrics.cleanupRuns.inc({ result }, 0)
  app.decorate('metrics', metrics)

  const { pool } = app.pg
  pool.on('error', () => metrics.databaseErrors.inc({ kind: 'connection_lost' }))
  for (const [name, help, read] of [
    ['db_pool_connections_total', 'Connections the pool holds', () => pool.totalCount],
    ['db_pool_connections_idle', 'Pooled connections not in use', () => pool.idleCount],
    ['db_pool_requests_waiting', 'Queries waiting for a pooled connection', () => pool.waitingCount],
    ['db_pool_connections_max', 'Connections the pool may hold (DATABASE_POOL_MAX)', () => app.config.DATABASE_POOL_MAX]
  ] as const) {
    metrics.registry.registerMetric(new Gauge({ name, help, registers: [], collect () { this.set(read()) } }))
  }

  // Counted by one query at most once a minute, never per scrape: scrapes must not become load
  // on the database. (app.storage is registered after this plugin; it is only used at scrape time.)
  let stored = { users: 0, bytes: 0, historyVersions: 0, historyBytes: 0, databaseBytes: 0, at: 0 }
  let refreshing: Promise<void> | undefined
  let triedAt = 0
  async function refreshStored (): Promise<void> {
    // At most once a minute, whether the last count succeeded or not: a failing count (a slow
    // database's statement time-out) is not run again at every scrape. The gauges of one scrape
    // share the count in flight.
    if (refreshing === undefined && Date.now() - triedAt >= STORED_REFRESH_MS) {
      triedAt = Date.now()
      refreshing = app.storage.totals()
        .then((totals) => { stored = { ...totals, at: Date.now() } })
        .catch((err: unknown) => { app.log.warn({ err }, 'metrics: could not count stored users') })
        .finally(() => { refreshing = undefined })
    }
    if (refreshing !== undefined) await atMostScrapeWait(refreshing)
  }
  for (const [name, help, read] of [
    ['stored_users', 'Users with data stored', () => stored.users],
    ['stored_bytes', 'Decoded bytes of all stored blobs', () => stored.bytes],
    ['history_versions', 'Previous versions kept for undo, all users', () => stored.historyVersions],
    ['history_bytes', 'Decoded bytes of the previous versions kept for undo', () => stored.historyBytes],
    ['database_size_bytes', 'Disk used by the whole database (pg_database_size: tables, indexes, TOAST, dead rows; not WAL)', () => stored.databaseBytes]
  ] as const) {
    metrics.registry.registerMetric(new Gauge({
      name,
      help: `${help} (refreshed at most once a minute)`,
      registers: [],
      // NaN until a count succeeds, not 0: a first scrape during an outage must not report a
      // database of 0 bytes that then "grows" to its real size (SyncDiskGrowth, which skips NaN
      // samples, would fire).
      async collect () { await refreshStored(); this.set(stored.at === 0 ? Number.NaN : read()) }
    }))
  }

  // Whether the database answers, asked at each scrape as /health asks it (SELECT 1 on the health
  // check's own connection): an outage with no requests to fail is seen too. A check that takes
  // longer than the scrape waits reports at the next scrape (a hang: HEALTH_TIMEOUT_MS later).
  let databaseUp = Number.NaN
  let checking: Promise<void> | undefined
  metrics.registry.registerMetric(new Gauge({
    name: 'database_up',
    help: '1 when the database answered the last SELECT 1 (asked at each scrape, as /health asks) within HEALTH_TIMEOUT_MS, 0 when it did not',
    registers: [],
    async collect () {
      checking ??= app.checkDatabase().then(() => { databaseUp = 1 }, () => { databaseUp = 0 }).finally(() => { checking = undefined })
      await atMostScrapeWait(checking)
      this.set(databaseUp)
    }
  }))

  app.addHook('onResponse', (request, reply, done) => {
    const route = request.routeOptions.url ?? 'unmatched'
    metrics.httpDuration.observe({ route, method: request.method, status: reply.statusCode }, reply.elapsedTime / 1000)
    if (request.method === 'PUT' && route === '/api/sync/:userId' && reply.statusCode >= 400 && reply.statusCode < 500) {
      metrics.rejectedUploads.inc({ status: reply.statusCode })
    }
    done()
  })

  // In production without METRICS_TOKEN the figures (stored users and bytes, traffic by
  // route) are not for the public port: they are served on a listener of their own,
  // METRICS_HOST:METRICS_PORT (loopback unless set otherwise), and GET /metrics is a 404.
  if (app.config.METRICS_LISTENER === 'separate') {
    // Its errors in the service's one shape too, never echoing a URL.
    const refuse = (reply: FastifyReply, statusCode: number, error: string) =>
      reply.code(statusCode).header('cache-control', 'no-store').send({ error, statusCode })
    const listener = Fastify({
      logger: false,
      frameworkErrors: (_error, _request, reply) => refuse(reply, 400, 'Invalid request: the URL is not correctly percent-encoded')
    })
    listener.setNotFoundHandler((request, reply) => refuse(reply, 404, `No route for ${request.method} on this path`))
    listener.setErrorHandler((_error, _request, reply) => refuse(reply, 500, 'Internal Server Error'))
    listener.get('/metrics', async (_request, reply) => {
      reply.type(metrics.registry.contentType)
      return await metrics.registry.metrics()
    })
    app.decorate('metricsListener', listener)
    app.addHook('onReady', async () => {
      const address = await listener.listen({ port: app.config.METRICS_PORT, host: app.config.METRICS_HOST })
      app.log.info({ address }, 'metrics served on a listener of their own (NODE_ENV=production without METRICS_TOKEN)')
    })
    app.addHook('onClose', async () => { await listener.close() })
  }
}, { name: 'metrics', dependencies: ['config', 'db'] })
