import t from 'tap'
import { randomBytes, randomUUID } from 'node:crypto'
import { readFileSync } from 'node:fs'
import net from 'node:net'
import { join } from 'node:path'
import type { FastifyInstance } from 'fastify'
import { build } from '../helper.ts'
import { sparePort, startCluster } from '../pg-cluster.ts'
import { startPrometheus } from '../prometheus.ts'
import { startProxy } from '../proxy.ts'
import { until } from '../wait.ts'

// The monitoring files (deploy/monitoring) against a real Prometheus: Debian's, configured by
// prometheus-config.sh with alerts.yml, as the compose profile runs it, scraping two instances
// in production's default (metrics on a listener of their own). Instance A reads from a
// streaming replica; instance B reaches the same primary through a proxy the test cuts: a
// database outage for B alone. Every dashboard query must return data, and during B's outage
// exactly the alerts for it must fire.

const MONITORING = join(import.meta.dirname, '..', '..', 'deploy', 'monitoring')
// Alerts an outage of the database (and a cleanup run during it) must raise; no other may.
const OUTAGE_ALERTS = ['SyncCleanupFailing', 'SyncDatabaseUnavailable']

interface Panel {
  id: number
  title: string
  type: string
  gridPos: { x: number, y: number, w: number, h: number }
  datasource?: { uid: string }
  targets?: Array<{ expr: string, datasource?: { uid: string } }>
  panels?: Panel[]
}
const dashboard = JSON.parse(readFileSync(join(MONITORING, 'grafana', 'dashboards', 'logikids-sync.json'), 'utf8')) as {
  panels: Panel[], templating: { list: Array<{ name: string, query: { query: string } }> }
}
const panels = dashboard.panels.flatMap((panel) => [panel, ...(panel.panels ?? [])]).filter((panel) => panel.type !== 'row')
// Grafana's variables, as Grafana would fill them in with every instance selected.
const asGrafanaSends = (expr: string) => expr.replaceAll('$instance', '.*').replaceAll('$__rate_interval', '1m')

const primary = await startCluster()
t.teardown(() => primary.stop())
const standby = await startCluster({ replicaOf: primary })
t.teardown(() => standby.stop())
const proxy = await startProxy({ host: '127.0.0.1', port: primary.port })
t.teardown(() => proxy.close())

// NODE_ENV=production wants a strong password in the URL; the throwaway cluster trusts anyone.
const withPassword = (port: number) => `postgres://postgres:throwaway-cluster-password@127.0.0.1:${port}/postgres`
async function instance (env: Record<string, string>): Promise<{ app: FastifyInstance, url: string, metrics: string }> {
  const metricsPort = await sparePort()
  const app = await build(t, {
    env: { NODE_ENV: 'production', LOG_LEVEL: 'silent', METRICS_PORT: String(metricsPort), CLEANUP_INTERVAL: '1h', ...env }
  })
  const url = await app.listen({ port: 0, host: '127.0.0.1' })
  return { app, url, metrics: `127.0.0.1:${metricsPort}` }
}
const a = await instance({ DATABASE_URL: withPassword(primary.port), DATABASE_READ_URL: withPassword(standby.port) })
const b = await instance({ DATABASE_URL: withPassword(proxy.port), RATE_LIMIT_MAX: '5' })
const prometheus = await startPrometheus([a.metrics, b.metrics])
t.teardown(() => prometheus.stop())

const payload = { encryptedBlob: randomBytes(96).toString('base64'), iv: 'AAAAAAAAAAAAAAAA', timestamp: 1, checksum: 'a'.repeat(64) }
const send = async (base: string, method: string, path: string, options: { body?: unknown, token?: string } = {}) => {
  const headers: Record<string, string> = options.body === undefined ? {} : { 'content-type': 'application/json' }
  if (options.token !== undefined) headers.authorization = `Bearer ${options.token}`
  const res = await fetch(base + path, { method, headers, body: options.body === undefined ? undefined : JSON.stringify(options.body) })
  await res.arrayBuffer()
  return res.status
}
/** A request Node's parser refuses (400 before routing). */
async function malformed (base: string): Promise<void> {
  const { port } = new URL(base)
  await new Promise<void>((resolve) => {
    const socket = net.connect(Number(port), '127.0.0.1', () => socket.write('NOT HTTP\r\n\r\n'))
    socket.on('data', () => {})
    socket.on('close', () => resolve())
    socket.on('error', () => resolve())
  })
}

async function firing (): Promise<Map<string, string>> {
  return new Map((await prometheus.alertRules()).map((rule) => [rule.name, rule.state]))
}

t.test('the dashboard is one Grafana can provision: its data source, unique ids, no panels on top of each other', async (t) => {
  const provisioned = readFileSync(join(MONITORING, 'grafana', 'provisioning', 'datasources', 'prometheus.yml'), 'utf8')
  const uid = /^\s*uid:\s*(\S+)\s*$/m.exec(provisioned)?.[1]
  t.equal(uid, 'prometheus', 'the provisioned data source\'s uid')
  for (const panel of panels) {
    t.equal(panel.datasource?.uid, uid, `"${panel.title}" uses it`)
    t.ok((panel.targets ?? []).length > 0 && (panel.targets ?? []).every((target) => target.datasource?.uid === uid), `"${panel.title}": every query too`)
  }
  const ids = dashboard.panels.flatMap((panel) => [panel, ...(panel.panels ?? [])]).map((panel) => panel.id)
  t.equal(new Set(ids).size, ids.length, 'panel ids are unique')
  const all = dashboard.panels
  const overlaps = all.flatMap((a, i) => all.slice(i + 1).filter((b) =>
    a.gridPos.x < b.gridPos.x + b.gridPos.w && b.gridPos.x < a.gridPos.x + a.gridPos.w &&
    a.gridPos.y < b.gridPos.y + b.gridPos.h && b.gridPos.y < a.gridPos.y + a.gridPos.h).map((b) => `${a.title} / ${b.title}`))
  t.strictSame(overlaps, [], 'no two panels overlap')
  t.ok(all.every((panel) => panel.gridPos.x + panel.gridPos.w <= 24), 'every panel within the 24 columns')
})

t.test('every dashboard query returns data and exactly the outage\'s alerts fire', async (t) => {
  const rules = await prometheus.alertRules()
  t.ok(rules.length >= 10, `the alert rules are loaded (${rules.length})`)

  // Traffic on both: uploads, downloads (A's from the replica), history, a refused upload, a
  // wrong token, an unknown path, a malformed request, and B's per-user limit exceeded (429).
  const owner = randomUUID()
  const token = randomBytes(32).toString('base64url')
  t.equal(await send(a.url, 'PUT', `/api/sync/${owner}`, { body: payload, token }), 200)
  t.equal(await send(a.url, 'GET', `/api/sync/${owner}`, { token: randomBytes(32).toString('base64url') }), 401, 'a wrong token')
  for (let i = 0; i < 6; i++) {
    const userId = randomUUID()
    t.equal(await send(a.url, 'PUT', `/api/sync/${userId}`, { body: payload }), 200)
    t.equal(await send(a.url, 'GET', `/api/sync/${userId}`), 200)
    t.equal(await send(a.url, 'GET', `/api/sync/${userId}/versions`), 200)
  }
  t.equal(await send(a.url, 'PUT', `/api/sync/${randomUUID()}`, { body: { ...payload, iv: 'short' } }), 400)
  t.equal(await send(a.url, 'GET', '/no/such/path'), 404)
  await malformed(a.url)
  const busy = randomUUID()
  const statuses = []
  for (let i = 0; i < 7; i++) statuses.push(await send(b.url, 'PUT', `/api/sync/${busy}`, { body: payload }))
  t.strictSame(statuses, [200, 200, 200, 200, 200, 429, 429], 'B\'s per-user limit (5) refuses the sixth upload')
  t.match(await a.app.cleanup.run(), { ran: true })
  t.match(await b.app.cleanup.run(), { ran: true })

  // Before the outage: both instances scraped, the traffic seen, and no alert raised.
  await until(async () => (await prometheus.query('sum(http_request_duration_seconds_count{job="logikids-sync",status="429"})'))
    .some((sample) => Number(sample.value[1]) >= 2), 'Prometheus has scraped the 429s', 30_000)
  await until(async () => (await prometheus.query('up{job="logikids-sync"} == 1')).length === 2, 'both instances are scraped', 30_000)
  // Evaluated before the first scrape, "no target" may have left SyncServiceDown pending a moment.
  await until(async () => [...(await firing()).values()].every((state) => state === 'inactive'), 'no alert is raised', 30_000)
    .catch(() => {})
  for (const [name, state] of await firing()) t.equal(state, 'inactive', `before the outage: ${name} is not raised`)

  // B loses the database: its requests are answered 503 and its cleanup fails.
  await proxy.cut()
  for (let i = 0; i < 6; i++) t.equal(await send(b.url, 'GET', `/api/sync/${randomUUID()}`), 503, 'B: database unavailable')
  t.equal(await b.app.cleanup.run(), null, 'B\'s cleanup fails')
  await until(async () => {
    const states = await firing()
    return OUTAGE_ALERTS.every((name) => states.get(name) !== 'inactive')
  }, 'the outage\'s alerts are raised', 60_000).catch(async (err) => {
    t.comment(JSON.stringify(await prometheus.targets()))
    throw err
  })
  for (const rule of await prometheus.alertRules()) {
    const results = await prometheus.query(rule.query)
    // Raised: pending, then firing once its `for` has passed (alert-rules.test.ts shows when).
    if (OUTAGE_ALERTS.includes(rule.name)) {
      t.not(rule.state, 'inactive', `${rule.name} is raised (${rule.state}) by the outage`)
      t.ok(results.length > 0, `${rule.name}: its expression holds`)
    } else {
      t.equal(rule.state, 'inactive', `${rule.name} is not raised`)
      t.strictSame(results, [], `${rule.name}: its expression is empty`)
    }
  }

  // Each series an alert asks for is one the service exports (a misspelt name would leave an
  // alert silent for ever, and its expression empty like that of any alert not firing).
  for (const rule of await prometheus.alertRules()) {
    const names = new Set([...rule.query.matchAll(/([a-zA-Z_:][a-zA-Z0-9_:]*)\{/g)].map((match) => match[1]!))
    for (const name of names) {
      t.ok((await prometheus.query(`count(${name}{job="logikids-sync"})`)).length > 0, `${rule.name}: ${name} is scraped`)
    }
  }

  // Every panel's every query, as Grafana sends it, returns data (so each metric name and
  // label it uses is one the service exports), and the instance picker lists both instances.
  const queries = panels.flatMap((panel) => (panel.targets ?? []).map((target) => ({ panel: panel.title, expr: asGrafanaSends(target.expr) })))
  t.ok(queries.length >= 25, `the dashboard's queries (${queries.length})`)
  const empty = async () => (await Promise.all(queries.map(async (query) => ((await prometheus.query(query.expr)).length === 0 ? [query] : []))))
    .flat()
  // A rate needs two scrapes after the series first appears.
  await until(async () => (await empty()).length === 0, 'every dashboard query has data', 30_000).catch(() => {})
  const missing = await empty()
  for (const query of queries) {
    t.notOk(missing.includes(query), `"${query.panel}": ${query.expr}`)
  }
  const picker = dashboard.templating.list.find((variable) => variable.name === 'instance')!
  const upQuery = /label_values\((.+), instance\)/.exec(picker.query.query)![1]!
  t.equal((await prometheus.query(upQuery)).length, 2, 'the instance picker finds both instances')

  await proxy.restore()
})
