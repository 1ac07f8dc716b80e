// npm run bench: the service against a one-query-per-request baseline, on a real PostgreSQL.
// Writes BENCHMARKS.md: the figures only. The hand-written analysis is bench/notes.md, which
// BENCHMARKS.md links to (each fact in one place).
// With no option (about 4 minutes): 1 KiB, 100 KiB and 1 MB GET and PUT, verify and DELETE at 16
// connections, 1 MB PUT at 64 (memory), the first read of the day against an ordinary one, bytes
// on disk per byte of ciphertext, and bytes per answer. --full: everything below as well.
// Options: --duration S (seconds per measured run, default 4), --only TEXT (scenarios whose
// name contains TEXT), --full (the 64-connection and If-None-Match scenarios and every
// experiment below), --migration (uploads while `npm run migrate-blobs` converts text versions to
// bytes: their p99 before and during), --scale (then 1,000,000 stored users: GET, and the cleanup of 999,000
// inactive ones under upload load; adds a few minutes), --toast (1 MB GET and PUT under each
// TOAST setting of the blob column), --tokens (1 KiB GET and PUT with and without an access
// token: the server CPU the token check costs), --history (PUT and GET with HISTORY_VERSIONS=10
// against 0, and the disk a user with 10 kept 1 MB versions takes; all of it, whatever --only says),
// --redis (1 KiB GET and PUT with both rate limits on, counted in process against counted in a
// private redis-server: the server CPU the shared counters cost), --replica (1 KiB GET with
// reads on a streaming replica against reads on the primary, on a throwaway primary and a
// pg_basebackup standby: the primary's CPU per read each way), --tracing (1 KiB GET and PUT with
// tracing off, and on with every request sampled and sent to an OTLP sink in this process; with
// BENCH_PREVIOUS=<a checkout with dist/ built>, also that build: what "off" costs against it).
import { spawn, execFileSync, type ChildProcess } from 'node:child_process'
import { createHash, randomBytes } from 'node:crypto'
import { readFileSync, readdirSync, writeFileSync, existsSync } from 'node:fs'
import { createServer, get } from 'node:http'
import type { AddressInfo } from 'node:net'
import { cpus, totalmem } from 'node:os'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { setTimeout as sleep } from 'node:timers/promises'
import autocannon from 'autocannon'
import pg from 'pg'
import { startCluster, type Cluster } from '../test/pg-cluster.ts'

const ROOT = fileURLToPath(new URL('../', import.meta.url))
const { values: args } = parseArgs({
  options: {
    duration: { type: 'string', default: '4' },
    only: { type: 'string', default: '' },
    scale: { type: 'boolean', default: false },
    toast: { type: 'boolean', default: false },
    tokens: { type: 'boolean', default: false },
    history: { type: 'boolean', default: false },
    redis: { type: 'boolean', default: false },
    replica: { type: 'boolean', default: false },
    tracing: { type: 'boolean', default: false },
    migration: { type: 'boolean', default: false },
    full: { type: 'boolean', default: false }
  }
})
if (args.full) Object.assign(args, { scale: true, toast: true, tokens: true, history: true, redis: true, replica: true, tracing: true, migration: true })
const DURATION = Number(args.duration)
const SERVER_URL = process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/test'
const BENCH_DB = 'lk_bench'
const benchUrl = (() => {
  const url = new URL(SERVER_URL)
  url.pathname = `/${BENCH_DB}`
  // The service runs with NODE_ENV=production, which refuses an empty password; a trust-auth
  // server (as on the build machines) ignores this one.
  if (url.password === '') url.password = 'bench-with-trust-auth'
  return url.toString()
})()

const SIZES = { '1KiB': 1024, '100KiB': 100 * 1024, '1MB': 1_000_000 } as const
type Size = keyof typeof SIZES
const USERS: Record<Size, number> = { '1KiB': 1000, '100KiB': 100, '1MB': 30 }
const DELETE_POOL = 100_000

const ids: Record<Size, string[]> = { '1KiB': [], '100KiB': [], '1MB': [] }
const deleteIds: string[] = []
let deleteCursor = 0
const etags = new Map<string, string>()

function uuid (n: number, prefix: number): string {
  const hex = n.toString(16).padStart(12, '0')
  return `${prefix.toString(16).padStart(8, '0')}-0000-4000-8000-${hex}`
}

// Ciphertext is random bytes: it does not compress, which matters to PostgreSQL's TOAST.
function body (size: Size): string {
  return JSON.stringify({
    encryptedBlob: randomBytes(SIZES[size]).toString('base64'),
    iv: 'AbCdEfGhIjKlMnOp',
    timestamp: Date.now(),
    checksum: 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'
  })
}

async function admin<T> (fn: (client: pg.Client) => Promise<T>, url = SERVER_URL): Promise<T> {
  const client = new pg.Client({ connectionString: url })
  await client.connect()
  try { return await fn(client) } finally { await client.end() }
}

/**
 * Stores records directly, as the service would (the account and its current version): `rows`
 * selects user_id, encrypted_blob (base64), iv, timestamp, checksum, blob_size, last_accessed and
 * token_hash, in that order. The ciphertext is stored as bytes, or with `legacy` as its base64
 * text, as versions stored before sql/006_ciphertext_bytes.sql were.
 */
const insertRecords = (rows: string, legacy = false) => `WITH source (user_id, encrypted_blob, iv, timestamp, checksum, blob_size, last_accessed, token_hash) AS (${rows}),
  accounts AS (INSERT INTO user_sync_data (user_id, timestamp, last_accessed, token_hash)
    SELECT user_id, timestamp, last_accessed, token_hash FROM source RETURNING user_id, version, etag)
  INSERT INTO user_sync_versions (user_id, version, etag, ${legacy ? 'encrypted_blob' : 'ciphertext'}, iv, timestamp, checksum, blob_size)
  SELECT a.user_id, a.version, a.etag, ${legacy ? 's.encrypted_blob' : "decode(s.encrypted_blob, 'base64')"}, s.iv, s.timestamp, s.checksum, s.blob_size
  FROM accounts a JOIN source s USING (user_id)`

async function seed (): Promise<void> {
  await admin(async (c) => {
    await c.query(`DROP DATABASE IF EXISTS ${BENCH_DB} WITH (FORCE)`)
    await c.query(`CREATE DATABASE ${BENCH_DB}`)
  })
  // The service creates the schema itself, as in production.
  const service = await startServer('service', 3101)
  await stopServer(service)
  await admin(async (c) => {
    let prefix = 1
    for (const size of Object.keys(SIZES) as Size[]) {
      const blob = randomBytes(SIZES[size]).toString('base64')
      await c.query(insertRecords(`SELECT ('${prefix.toString(16).padStart(8, '0')}-0000-4000-8000-' || lpad(to_hex(n), 12, '0'))::uuid,
               $1, 'AbCdEfGhIjKlMnOp', 1::bigint, repeat('a', 64), $2::int, now(), NULL::bytea
        FROM generate_series(0, $3 - 1) AS n`), [blob, SIZES[size], USERS[size]])
      ids[size] = Array.from({ length: USERS[size] }, (_, n) => uuid(n, prefix))
      prefix++
    }
    const small = randomBytes(1024).toString('base64')
    await c.query(insertRecords(`SELECT ('000000ff-0000-4000-8000-' || lpad(to_hex(n), 12, '0'))::uuid, $1, 'AbCdEfGhIjKlMnOp', 1::bigint,
        repeat('a', 64), 1024, now(), NULL::bytea
      FROM generate_series(0, $2 - 1) AS n`), [small, DELETE_POOL])
    for (let n = 0; n < DELETE_POOL; n++) deleteIds.push(uuid(n, 0xff))
    await c.query('VACUUM ANALYZE user_sync_data, user_sync_versions')
  }, benchUrl)
}

/** USERS['1KiB'] unclaimed users of 1 KiB each (ids with `prefix`) stored on the database at `url`: their ids. */
async function seedUsers (prefix: number, url: string): Promise<string[]> {
  const users = Array.from({ length: USERS['1KiB'] }, (_, n) => uuid(n, prefix))
  await admin(async (c) => {
    await c.query(insertRecords(`SELECT u, $1, 'AbCdEfGhIjKlMnOp', 1::bigint, repeat('a', 64), 1024, now(), NULL::bytea
      FROM unnest($2::uuid[]) AS u`), [randomBytes(1024).toString('base64'), users])
    await c.query('VACUUM ANALYZE user_sync_data, user_sync_versions')
  }, url)
  return users
}

async function refreshEtags (): Promise<void> {
  await admin(async (c) => {
    const { rows } = await c.query('SELECT user_id, etag FROM user_sync_data WHERE user_id = ANY($1)', [[...ids['1KiB'], ...ids['1MB']]])
    for (const row of rows) etags.set(row.user_id, `"${row.etag}"`)
  }, benchUrl)
}

interface Server { name: string, port: number, child: ChildProcess }

// The service as it runs in production by default: info-level logs (to /dev/null here), both rate
// limits on (with budgets the bench's thousands of requests per user cannot use up), metrics on
// (recorded for every request; served on the main port with a token, since the separate metrics
// listener's port can be held by one service only), default pool.
const PRODUCTION_DEFAULTS = {
  LOG_LEVEL: process.env.BENCH_LOG_LEVEL ?? 'info',
  NODE_ENV: 'production',
  RATE_LIMIT_MAX: '1000000000',
  RATE_LIMIT_IP_MAX: '1000000000',
  METRICS_TOKEN: 'bench-metrics-token'
}
// The same with what costs per request and can be turned off turned off: both rate limits and the request log.
const LEAN = { RATE_LIMIT_MAX: '0', RATE_LIMIT_IP_MAX: '0', LOG_LEVEL: 'silent' }

async function startServer (kind: 'service' | 'baseline', port: number, env: Record<string, string> = {}, databaseUrl = benchUrl, root = ROOT,
  name: string = kind): Promise<Server> {
  const args = kind === 'service' ? ['dist/server.js'] : ['--import', 'tsx', 'bench/baseline.ts']
  const child = spawn(process.execPath, args, {
    cwd: root,
    env: {
      PATH: process.env.PATH ?? '',
      DATABASE_URL: databaseUrl,
      PORT: String(port),
      HOST: '127.0.0.1',
      ...PRODUCTION_DEFAULTS,
      ...env
    },
    stdio: ['ignore', 'ignore', 'inherit']
  })
  for (let i = 0; i < 100; i++) {
    await sleep(100)
    try {
      const res = await fetch(`http://127.0.0.1:${port}/api/sync/00000000-0000-4000-8000-000000000000`)
      if (res.status === 404) return { name, port, child }
    } catch {}
  }
  throw new Error(`${name} did not start`)
}

async function stopServer (server: Server): Promise<void> {
  const exited = new Promise((resolve) => server.child.once('exit', resolve))
  server.child.kill('SIGTERM')
  await exited
}

/** CPU seconds (user + system) the process has used so far, from /proc (clock ticks of 10 ms). */
function cpuSeconds (pid: number): number {
  const fields = procStat(pid)
  return (Number(fields[11]) + Number(fields[12])) / 100
}

/** /proc/<pid>/stat's fields after the command name (state, parent pid, ...; utime and stime at 11 and 12). */
function procStat (pid: number | string): string[] {
  return readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ')
}

function rssMb (pid: number): number {
  const match = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))
  return match ? Number(match[1]) / 1024 : 0
}

interface Scenario {
  name: string
  connections: number
  method: 'GET' | 'PUT' | 'POST' | 'DELETE'
  path: () => string
  body?: string
  headers?: () => Record<string, string>
  expect: number[]
  /** The service may answer differently from the baseline (304 for If-None-Match). */
  serviceExpect?: number[]
  /** Also measured on the lean service (rate limits and request log off): what those cost. */
  lean?: boolean
}

function pick<T> (list: T[]): T { return list[Math.floor(Math.random() * list.length)]! }

function scenarios (): Scenario[] {
  const list: Scenario[] = []
  const bodies = Object.fromEntries((Object.keys(SIZES) as Size[]).map((size) => [size, body(size)])) as Record<Size, string>
  const put = (size: Size, connections: number): Scenario => ({
    name: `PUT ${size} c${connections}`,
    connections,
    method: 'PUT',
    path: () => `/api/sync/${pick(ids[size])}`,
    body: bodies[size],
    headers: () => ({ 'content-type': 'application/json' }),
    expect: [200],
    lean: size === '1KiB'
  })
  const get = (size: Size, connections: number): Scenario => ({
    name: `GET ${size} c${connections}`, connections, method: 'GET', path: () => `/api/sync/${pick(ids[size])}`, expect: [200], lean: size === '1KiB'
  })
  // --full: every size and operation at 64 connections too; by default only the 1 MB uploads
  // (the memory figure: 64 bodies of 1.3 MB at once).
  for (const connections of args.full ? [16, 64] : [16]) {
    for (const size of Object.keys(SIZES) as Size[]) list.push(get(size, connections), put(size, connections))
    list.push({ name: `verify c${connections}`, connections, method: 'POST', path: () => `/api/sync/${pick(ids['1KiB'])}/verify`, expect: [200] })
    list.push({
      name: `DELETE 1KiB c${connections}`,
      connections,
      method: 'DELETE',
      expect: [200],
      path: () => `/api/sync/${deleteIds[deleteCursor++ % deleteIds.length]}`
    })
  }
  if (!args.full) list.push(put('1MB', 64))
  for (const size of args.full ? ['1KiB', '1MB'] as const : []) {
    let current = ''
    list.push({
      name: `GET ${size} If-None-Match c16`,
      connections: 16,
      method: 'GET',
      expect: [200],
      serviceExpect: [304],
      path: () => { current = pick(ids[size]); return `/api/sync/${current}` },
      headers: () => ({ 'if-none-match': etags.get(current) ?? '"none"' })
    })
  }
  return list.filter((scenario) => scenario.name.includes(args.only))
}

interface Result {
  scenario: string,
  server: string,
  rps: number,
  p50: number,
  p975: number,
  p99: number,
  max: number,
  errors: number,
  unexpected: number,
  rssMb: number,
  cpuUs: number
}

async function measure (server: Server, scenario: Scenario, duration: number): Promise<Result> {
  let peak = rssMb(server.child.pid!)
  const cpuBefore = cpuSeconds(server.child.pid!)
  const sampler = setInterval(() => { peak = Math.max(peak, rssMb(server.child.pid!)) }, 100)
  const expected = server.name !== 'baseline' && scenario.serviceExpect ? scenario.serviceExpect : scenario.expect
  let unexpected = 0
  const statuses: Record<string, number> = {}
  const result = await autocannon({
    url: `http://127.0.0.1:${server.port}`,
    connections: scenario.connections,
    duration,
    requests: [{
      method: scenario.method,
      body: scenario.body,
      setupRequest: (request) => {
        const path = scenario.path() // first: the headers may depend on the user it picked
        const headers = scenario.headers?.() ?? {}
        return { ...request, path, headers: { ...request.headers, ...headers } }
      },
      onResponse: (status, body) => {
        if (!expected.includes(status)) {
          unexpected++
          const key = `${status} ${String(body).slice(0, 80)}`
          statuses[key] = (statuses[key] ?? 0) + 1
        }
      }
    }]
  })
  clearInterval(sampler)
  if (unexpected > 0) console.log(`  ${server.name} ${scenario.name}: unexpected statuses ${JSON.stringify(statuses)}, ${result.errors} errors, ${result.timeouts} timeouts`)
  const cpu = cpuSeconds(server.child.pid!) - cpuBefore
  return {
    scenario: scenario.name,
    server: server.name,
    // Answers with the expected status only: a fast 503 is not a served request.
    rps: Math.max(0, result.requests.total - unexpected - result.errors) / duration,
    p50: result.latency.p50,
    p975: result.latency.p97_5,
    p99: result.latency.p99,
    max: result.latency.max,
    errors: result.errors + result.timeouts,
    unexpected,
    rssMb: peak,
    cpuUs: result.requests.total > 0 ? cpu * 1e6 / result.requests.total : 0
  }
}

function machine (): string {
  const cpu = cpus()[0]?.model ?? 'unknown CPU'
  const pgVersion = execFileSync('psql', ['-At', '-d', SERVER_URL, '-c', 'SHOW server_version']).toString().trim()
  return `${cpus().length} cores (${cpu}), ${(totalmem() / 2 ** 30).toFixed(0)} GiB, Node ${process.version}, PostgreSQL ${pgVersion}`
}

const fmt = (n: number, digits = 1) => n.toFixed(digits)

type Compare = (scenario: Scenario, servers?: Server[]) => Promise<void>
const latest = (results: Result[], scenario: string, server: string) =>
  results.filter((r) => r.scenario === scenario && r.server === server).at(-1)!

/** 1 MB GET and PUT on the service under each TOAST setting of the ciphertext column. */
async function toastExperiment (service: Server, compare: Compare, results: Result[]): Promise<string> {
  const settings = [
    ['EXTENDED, pglz (default)', 'ALTER TABLE user_sync_versions ALTER COLUMN ciphertext SET STORAGE EXTENDED, ALTER COLUMN ciphertext SET COMPRESSION pglz'],
    ['EXTENDED, lz4', 'ALTER TABLE user_sync_versions ALTER COLUMN ciphertext SET STORAGE EXTENDED, ALTER COLUMN ciphertext SET COMPRESSION lz4'],
    ['EXTERNAL (no compression)', 'ALTER TABLE user_sync_versions ALTER COLUMN ciphertext SET STORAGE EXTERNAL']
  ] as const
  const lines = ['## TOAST settings of the ciphertext column (--toast)', '',
    'Each setting, then 1 MB uploads rewrite the 1 MB rows under it, then downloads read them (service only, same run).', '',
    '| setting | PUT 1MB req/s | PUT CPU µs/req | GET 1MB req/s | GET CPU µs/req | GET p99 ms | 1 MB rows on disk |',
    '| --- | ---: | ---: | ---: | ---: | ---: | ---: |']
  const all = scenarios()
  const put = all.find((s) => s.name === 'PUT 1MB c16')!
  const get = all.find((s) => s.name === 'GET 1MB c16')!
  for (const [label, sql] of settings) {
    await admin(async (c) => { await c.query(sql) }, benchUrl)
    for (const scenario of [put, get]) await compare({ ...scenario, name: `${scenario.name} [${label}]` }, [service, service])
    const size = await admin(async (c) => (await c.query(
      "SELECT pg_size_pretty(sum(pg_column_size(ciphertext))) AS size FROM user_sync_versions WHERE user_id::text LIKE '00000003-%'")).rows[0].size, benchUrl)
    const p = latest(results, `${put.name} [${label}]`, 'service')
    const g = latest(results, `${get.name} [${label}]`, 'service')
    lines.push(`| ${label} | ${fmt(p.rps)} | ${fmt(p.cpuUs, 0)} | ${fmt(g.rps)} | ${fmt(g.cpuUs, 0)} | ${fmt(g.p99)} | ${size} |`)
  }
  return lines.join('\n')
}

/**
 * 1,000,000 stored users: the 1 KiB GET again, with reads spread over all of them; then the
 * cleanup of 999,000 inactive ones while uploads go on, with the worst upload latency.
 */
async function scaleExperiment (service: Server, compare: Compare, results: Result[]): Promise<string> {
  const extraUsers = 999_000
  console.log(`seeding ${extraUsers} more users…`)
  const started = Date.now()
  await admin(async (c) => {
    await c.query(insertRecords(`SELECT ('00000010-0000-4000-8000-' || lpad(to_hex(n), 12, '0'))::uuid, $1, 'AbCdEfGhIjKlMnOp', 1::bigint,
             repeat('a', 64), 1024, now() - interval '12 hours', NULL::bytea
      FROM generate_series(0, $2 - 1) AS n`), [randomBytes(1024).toString('base64'), extraUsers])
    await c.query('VACUUM ANALYZE user_sync_data, user_sync_versions')
  }, benchUrl)
  const seeded = Date.now() - started
  const small = scenarios().find((s) => s.name === 'GET 1KiB c16')!
  const wide: Scenario = {
    ...small,
    name: 'GET 1KiB c16, 1,000,000 users',
    path: () => `/api/sync/${uuid(Math.floor(Math.random() * extraUsers), 0x10)}`
  }
  // Read today already (within the once-a-day touch): these reads measure the table's size.
  await compare(small)
  await compare(wide)
  // The first download of the day of each user records the access: a write, as the
  // inactivity rule requires. Here every read is such a first one.
  await admin(async (c) => {
    await c.query("UPDATE user_sync_data SET last_accessed = now() - interval '2 days' WHERE user_id::text LIKE '00000010-%'")
    await c.query('VACUUM ANALYZE user_sync_data')
  }, benchUrl)
  const firstOfDay: Scenario = { ...wide, name: 'GET 1KiB c16, 1,000,000 users, first read of the day' }
  await compare(firstOfDay)
  const touched = latest(results, firstOfDay.name, 'service')
  const touchedBaseline = latest(results, firstOfDay.name, 'baseline')
  const aged = Date.now()
  await admin(async (c) => {
    await c.query("UPDATE user_sync_data SET last_accessed = now() - interval '3 years' WHERE user_id::text LIKE '00000010-%'")
    await c.query('VACUUM ANALYZE user_sync_data')
  }, benchUrl)
  const agedMs = Date.now() - aged
  const narrowService = latest(results, small.name, 'service')
  const wideService = latest(results, wide.name, 'service')
  const narrowBaseline = latest(results, small.name, 'baseline')
  const wideBaseline = latest(results, wide.name, 'baseline')

  // Uploads at 16 connections without, then during, the cleanup of the 999,000 inactive users.
  const putSmall = scenarios().find((s) => s.name === 'PUT 1KiB c16')!
  const quiet = await measure(service, putSmall, 5)
  const cleanup = new Promise<string>((resolve, reject) => {
    const child = spawn(process.execPath, ['dist/scripts/cleanup.js', '--days', '730'], {
      cwd: ROOT, env: { PATH: process.env.PATH ?? '', DATABASE_URL: benchUrl }, stdio: ['ignore', 'pipe', 'inherit']
    })
    let out = ''
    child.stdout.on('data', (chunk: Buffer) => { out += chunk.toString() })
    child.on('exit', (code) => (code === 0 ? resolve(out.trim()) : reject(new Error(`cleanup exited ${code}`))))
  })
  let busy: Result | undefined
  let worst = 0
  const during: Promise<void> = (async () => {
    const cleanupState = { done: false }
    cleanup.finally(() => { cleanupState.done = true }).catch(() => {})
    while (!cleanupState.done) {
      const run = await measure(service, putSmall, 3)
      worst = Math.max(worst, run.max)
      busy ??= run
    }
  })()
  const cleanupLine = await cleanup
  await during
  return [
    '## 1,000,000 stored users (--scale)', '',
    `${extraUsers.toLocaleString('en')} more 1 KiB users seeded in ${fmt(seeded / 1000)} s, last read 12 hours ago.`, '',
    '| scenario | service req/s | baseline req/s | ratio | service p50 / p99 ms | service CPU µs/req |',
    '| --- | ---: | ---: | ---: | --- | ---: |',
    `| GET 1KiB c16, reads over the first 1,000 users | ${fmt(narrowService.rps, 0)} | ${fmt(narrowBaseline.rps, 0)} | ${fmt(narrowService.rps / narrowBaseline.rps, 2)}x | ${fmt(narrowService.p50)} / ${fmt(narrowService.p99)} | ${fmt(narrowService.cpuUs, 0)} |`,
    `| GET 1KiB c16, reads over 999,000 users | ${fmt(wideService.rps, 0)} | ${fmt(wideBaseline.rps, 0)} | ${fmt(wideService.rps / wideBaseline.rps, 2)}x | ${fmt(wideService.p50)} / ${fmt(wideService.p99)} | ${fmt(wideService.cpuUs, 0)} |`,
    `| the same, each the user's first read of the day (records the access: a write) | ${fmt(touched.rps, 0)} | ${fmt(touchedBaseline.rps, 0)} | ${fmt(touched.rps / touchedBaseline.rps, 2)}x | ${fmt(touched.p50)} / ${fmt(touched.p99)} | ${fmt(touched.cpuUs, 0)} |`,
    '',
    `Service at 1,000,000 users: **${fmt(wideService.rps / narrowService.rps, 2)}x** its 1,000-user req/s in the same run.`, '',
    `Then all 999,000 marked as inactive for 3 years (${fmt(agedMs / 1000)} s), and cleaned up (\`node dist/scripts/cleanup.js --days 730\`, batches of 1,000) while 16 connections upload 1 KiB blobs: \`${cleanupLine}\`.`,
    `Uploads before it: ${fmt(quiet.rps, 0)} req/s, p99 ${fmt(quiet.p99)} ms; during it: ${fmt(busy?.rps ?? 0, 0)} req/s, p99 ${fmt(busy?.p99 ?? 0)} ms, **worst upload ${fmt(worst)} ms**.`
  ].join('\n')
}

/**
 * `rounds` rounds of `order` (A B B A: drift in the machine's load falls on both sides alike),
 * each run a 1 s warm-up, then DURATION s measured: the runs of each kind.
 */
async function alternate<K extends string> (rounds: number, order: readonly K[], run: (kind: K) => [Server, Scenario]): Promise<Record<K, Result[]>> {
  const runs = Object.fromEntries(order.map((kind) => [kind, [] as Result[]])) as Record<K, Result[]>
  for (let round = 0; round < rounds; round++) {
    for (const kind of order) {
      const [server, scenario] = run(kind)
      await measure(server, scenario, 1)
      const result = await measure(server, scenario, DURATION)
      runs[kind].push(result)
      console.log(`${result.scenario.padEnd(28)} ${fmt(result.rps, 0).padStart(7)} req/s  p99 ${result.p99} ms  cpu ${fmt(result.cpuUs, 0)} us/req  errors ${result.errors + result.unexpected}`)
    }
  }
  return runs
}

/** The median: the middle value, or the mean of the middle two. */
function median (values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b)
  const middle = Math.floor(sorted.length / 2)
  return sorted.length % 2 === 1 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2
}

/**
 * 1 KiB GET and PUT by devices with an access token (records claimed by it) against the same
 * without one (unclaimed records), on the service only: the server CPU per request the token
 * costs (hashing it, the check in SQL). Five rounds of none, token, token, none; medians.
 */
async function tokenExperiment (service: Server): Promise<string> {
  const ROUNDS = 5
  const users = USERS['1KiB']
  const tokens = Array.from({ length: users }, () => randomBytes(32).toString('base64url'))
  const claimed = Array.from({ length: users }, (_, n) => uuid(n, 0x20))
  await admin(async (c) => {
    await c.query(insertRecords(`SELECT u, $1, 'AbCdEfGhIjKlMnOp', 1::bigint, repeat('a', 64), 1024, now(), h
      FROM unnest($2::uuid[], $3::bytea[]) AS t(u, h)`),
    [randomBytes(1024).toString('base64'), claimed, tokens.map((token) => createHash('sha256').update(token).digest())])
    await c.query('VACUUM ANALYZE user_sync_data')
  }, benchUrl)
  const all = scenarios()
  const lines = ['## Access tokens (--tokens)', '',
    `1 KiB, 16 connections, service only: requests without a token on ${users} unclaimed records, and with the right token on ${users} claimed ones;`,
    `${ROUNDS} rounds of (without, with, with, without), ${DURATION} s each after a 1 s warm-up; medians of the ${2 * ROUNDS} runs of each.`, '',
    '| operation | req/s without / with | CPU µs/req without / with | CPU with / without |',
    '| --- | ---: | ---: | ---: |']
  for (const name of ['GET 1KiB c16', 'PUT 1KiB c16']) {
    const plain = all.find((scenario) => scenario.name === name)
    if (plain === undefined) continue
    let index = 0
    const withToken: Scenario = {
      ...plain,
      name: `${name} [token]`,
      path: () => { index = Math.floor(Math.random() * users); return `/api/sync/${claimed[index]}` },
      headers: () => ({ ...plain.headers?.(), authorization: `Bearer ${tokens[index]}` })
    }
    const runs = await alternate(ROUNDS, ['plain', 'token', 'token', 'plain'] as const, (kind) => [service, kind === 'plain' ? plain : withToken])
    const [p, t] = [runs.plain, runs.token]
    const cpu = [median(p.map((r) => r.cpuUs)), median(t.map((r) => r.cpuUs))] as const
    const errors = [...p, ...t].reduce((sum, r) => sum + r.errors + r.unexpected, 0)
    lines.push(`| ${name.split(' ')[0]} 1 KiB | ${fmt(median(p.map((r) => r.rps)), 0)} / ${fmt(median(t.map((r) => r.rps)), 0)} | ` +
      `${fmt(cpu[0], 0)} / ${fmt(cpu[1], 0)} | **${fmt(cpu[1] / cpu[0], 3)}x**${errors > 0 ? ` (${errors} errors)` : ''} |`)
  }
  return lines.join('\n')
}

/**
 * Version history: PUT 1 KiB, PUT 1 MB and GET 1 KiB on a service with HISTORY_VERSIONS=10 (the
 * default) and one with 0, each on users of its own (the one with history starts with 10 kept
 * versions per user: the steady state, where every upload also drops the oldest), interleaved
 * off, on, on, off; then the disk one user with 10 kept 1 MB versions takes.
 */
/** 1 KiB GET or PUT over the users seedUsers() stored, 16 connections: one side of an experiment's comparison. */
function seededScenario (method: 'GET' | 'PUT', users: string[], put: string, label: string): Scenario {
  // put: the body of every PUT (unused for GET).
  return {
    name: `${method} 1KiB c16 [${label}]`,
    connections: 16,
    method,
    path: () => `/api/sync/${pick(users)}`,
    ...(method === 'PUT' ? { body: put, headers: () => ({ 'content-type': 'application/json' }) } : {}),
    expect: [200]
  }
}

async function redisExperiment (): Promise<string> {
  const ROUNDS = 3
  const users = await seedUsers(0x60, benchUrl)
  // A redis-server of the bench's own, as operations.md advises: no persistence.
  const REDIS_PORT = 6391
  const redis = spawn('redis-server', ['--port', String(REDIS_PORT), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' })
  await sleep(300)
  // Both limits on, with budgets the bench cannot use up.
  const limits = { METRICS_TOKEN: 'bench-metrics-token', RATE_LIMIT_MAX: '1000000000', RATE_LIMIT_IP_MAX: '1000000000' }
  const servers = {
    local: await startServer('service', 3106, limits),
    redis: await startServer('service', 3107, { ...limits, REDIS_URL: `redis://127.0.0.1:${REDIS_PORT}` })
  }
  const lines = ['## Shared rate limits (--redis)', '',
    'The service with both rate limits on (budgets too large to refuse the bench), counting in its own memory against counting in a ' +
    `private redis-server on the same machine, 16 connections; ${ROUNDS} rounds of (in process, Redis, Redis, in process), ` +
    `${DURATION} s each after a 1 s warm-up; medians of the ${2 * ROUNDS} runs of each. CPU is the service process's only (Redis's own is not counted).`, '',
    '| scenario | req/s in process / Redis | CPU µs/req in process / Redis | **CPU Redis / in process** | errors |',
    '| --- | ---: | ---: | ---: | ---: |']
  try {
    const put = body('1KiB')
    for (const method of ['GET', 'PUT'] as const) {
      const runs = await alternate(ROUNDS, ['local', 'redis', 'redis', 'local'] as const,
        (kind) => [servers[kind], seededScenario(method, users, put, `limits ${kind}`)])
      const m = (kind: 'local' | 'redis', field: (r: Result) => number) => median(runs[kind].map(field))
      const errors = [...runs.local, ...runs.redis].reduce((sum, r) => sum + r.errors + r.unexpected, 0)
      lines.push(`| ${method} 1 KiB | ${fmt(m('local', (r) => r.rps), 0)} / ${fmt(m('redis', (r) => r.rps), 0)} | ` +
        `${fmt(m('local', (r) => r.cpuUs), 0)} / ${fmt(m('redis', (r) => r.cpuUs), 0)} | ` +
        `**${fmt(m('redis', (r) => r.cpuUs) / m('local', (r) => r.cpuUs), 3)}x** | ${errors} |`)
    }
  } finally {
    await stopServer(servers.local)
    await stopServer(servers.redis)
    redis.kill('SIGKILL')
  }
  return lines.join('\n')
}

/**
 * 1 KiB GET and PUT with tracing off (the default) and on (OTEL_EXPORTER_OTLP_ENDPOINT, every
 * request sampled, spans to an OTLP/HTTP sink in this process that reads and drops them), and,
 * given BENCH_PREVIOUS, the build there (one without tracing): three rounds, medians.
 */
async function tracingExperiment (): Promise<string> {
  const ROUNDS = 3
  const users = await seedUsers(0x70, benchUrl)
  const sink = createServer((request, response) => {
    request.resume()
    request.on('end', () => response.writeHead(200, { 'content-type': 'application/json' }).end('{}'))
  })
  await new Promise<void>((resolve) => sink.listen(0, '127.0.0.1', resolve))
  const endpoint = `http://127.0.0.1:${(sink.address() as AddressInfo).port}`
  const previous = process.env.BENCH_PREVIOUS
  // Metrics on the service port (with a token): the main service already holds the metrics listener's.
  const metrics = { METRICS_TOKEN: 'bench-metrics-token' }
  const servers: Partial<Record<'previous' | 'off' | 'on', Server>> = {
    off: await startServer('service', 3108, metrics),
    on: await startServer('service', 3109, { ...metrics, OTEL_EXPORTER_OTLP_ENDPOINT: endpoint })
  }
  if (previous !== undefined) servers.previous = await startServer('service', 3110, metrics, benchUrl, previous.endsWith('/') ? previous : `${previous}/`)
  const kinds = Object.keys(servers) as Array<'previous' | 'off' | 'on'>
  const lines = ['## Tracing (--tracing)', '',
    'The service with tracing off (no OTEL_EXPORTER_OTLP_ENDPOINT) and on (every request sampled; spans batched to an OTLP/HTTP sink in the bench\'s process)' +
    (previous === undefined ? '' : `, and the build in BENCH_PREVIOUS (${previous}), from before tracing existed`) +
    `; 16 connections; ${ROUNDS} rounds of (${[...kinds, ...[...kinds].reverse()].join(', ')}), ${DURATION} s each after a 1 s warm-up; ` +
    `medians of the ${2 * ROUNDS} runs of each. CPU is the service process's only.`, '',
    `| scenario | req/s ${kinds.join(' / ')} | CPU µs/req ${kinds.join(' / ')} | **CPU on / off** |${previous === undefined ? '' : ' **CPU off / previous** |'} errors |`,
    `| --- | ---: | ---: | ---: |${previous === undefined ? '' : ' ---: |'} ---: |`]
  try {
    const put = body('1KiB')
    for (const method of ['GET', 'PUT'] as const) {
      const runs = await alternate(ROUNDS, [...kinds, ...[...kinds].reverse()],
        (kind) => [servers[kind]!, seededScenario(method, users, put, `tracing ${kind}`)])
      const m = (kind: 'previous' | 'off' | 'on', field: (r: Result) => number) => median(runs[kind].map(field))
      const errors = kinds.flatMap((kind) => runs[kind]).reduce((sum, r) => sum + r.errors + r.unexpected, 0)
      lines.push(`| ${method} 1 KiB | ${kinds.map((kind) => fmt(m(kind, (r) => r.rps), 0)).join(' / ')} | ` +
        `${kinds.map((kind) => fmt(m(kind, (r) => r.cpuUs), 0)).join(' / ')} | ` +
        `**${fmt(m('on', (r) => r.cpuUs) / m('off', (r) => r.cpuUs), 3)}x** |` +
        (previous === undefined ? '' : ` **${fmt(m('off', (r) => r.cpuUs) / m('previous', (r) => r.cpuUs), 3)}x** |`) + ` ${errors} |`)
    }
  } finally {
    for (const server of Object.values(servers)) await stopServer(server)
    sink.close()
  }
  return lines.join('\n')
}

/** CPU seconds a PostgreSQL cluster's processes (the postmaster's children: backends, walsender, startup) have used so far. */
function clusterCpuSeconds (cluster: Cluster): number {
  const postmaster = Number(readFileSync(`${cluster.dataDir}/postmaster.pid`, 'utf8').split('\n')[0])
  let total = cpuSeconds(postmaster)
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue
    try {
      if (Number(procStat(entry)[1]) === postmaster) total += cpuSeconds(Number(entry))
    } catch {} // gone meanwhile
  }
  return total
}

/**
 * 1 KiB GET with reads on a streaming replica (DATABASE_READ_URL) against reads on the primary,
 * on a throwaway primary and a hot standby made by pg_basebackup -R (both on this machine's
 * 2 cores, so the replica adds no capacity here: what it shows is the cost of the routing to
 * the service, and the read load it takes off the primary). Three rounds of (primary, replica,
 * replica, primary); medians.
 */
async function replicaExperiment (): Promise<string> {
  const ROUNDS = 3
  const primary = await startCluster()
  let standby: Cluster | undefined
  const servers: Partial<Record<'primary' | 'replica', Server>> = {}
  const lines = ['## Reads on a replica (--replica)', '']
  try {
    const url = (cluster: Cluster) => {
      const u = new URL(cluster.url)
      u.pathname = '/postgres'
      u.password = 'bench-with-trust-auth'
      return u.toString()
    }
    // /metrics on the main port (the bench's own service holds the separate listener's).
    const metrics = { METRICS_TOKEN: 'bench-metrics-token' }
    // The schema, made by the service, then the users; the standby is cloned after, so it starts with all of it.
    await stopServer(await startServer('service', 3108, metrics, url(primary)))
    const users = await seedUsers(0x70, primary.url)
    standby = await startCluster({ replicaOf: primary })
    servers.primary = await startServer('service', 3108, metrics, url(primary))
    servers.replica = await startServer('service', 3109, { ...metrics, DATABASE_READ_URL: url(standby) }, url(primary))
    const scenario = (kind: 'primary' | 'replica'): Scenario => seededScenario('GET', users, '', `reads ${kind}`)
    const primaryCpu: Record<'primary' | 'replica', number[]> = { primary: [], replica: [] }
    const runs = await alternate(ROUNDS, ['primary', 'replica', 'replica', 'primary'] as const, (kind) => {
      // The primary's own CPU over the measured run (alternate's warm-up is 1 s, then DURATION s).
      const before = clusterCpuSeconds(primary)
      const started = Date.now()
      setTimeout(() => {
        const cpu = clusterCpuSeconds(primary) - before
        primaryCpu[kind].push(cpu / ((Date.now() - started) / 1000))
      }, (1 + DURATION) * 1000).unref()
      return [servers[kind]!, scenario(kind)]
    })
    await sleep(200)
    const reads = async (server: Server) => {
      const text = await (await fetch(`http://127.0.0.1:${server.port}/metrics`, { headers: { authorization: 'Bearer bench-metrics-token' } })).text()
      const of = (target: string) => Number(new RegExp(`database_reads_total\\{target="${target}"\\} (\\d+)`).exec(text)?.[1] ?? 0)
      return { replica: of('replica'), primary: of('primary') }
    }
    const share = await reads(servers.replica)
    const m = (kind: 'primary' | 'replica', field: (r: Result) => number) => median(runs[kind].map(field))
    const errors = [...runs.primary, ...runs.replica].reduce((sum, r) => sum + r.errors + r.unexpected, 0)
    lines.push(`1 KiB GET, 16 connections, ${USERS['1KiB']} users, on a throwaway primary and a \`pg_basebackup -R\` hot standby of it (both on the same 2 cores): ` +
      `a service reading from the primary against one with \`DATABASE_READ_URL\` on the standby (REPLICA_MAX_LAG_MS 1000), ${ROUNDS} rounds of (primary, replica, replica, primary), ` +
      `${DURATION} s each after a 1 s warm-up; medians of the ${2 * ROUNDS} runs of each. The primary's CPU is all its processes' (backends, WAL sender), in cores busy over the run.`, '',
    '| reads on | req/s | p50 / p99 ms | service CPU µs/req | primary CPU (cores) | primary CPU µs/req |',
    '| --- | ---: | --- | ---: | ---: | ---: |')
    for (const kind of ['primary', 'replica'] as const) {
      const rps = m(kind, (r) => r.rps)
      const cores = median(primaryCpu[kind])
      lines.push(`| ${kind} | ${fmt(rps, 0)} | ${fmt(m(kind, (r) => r.p50))} / ${fmt(m(kind, (r) => r.p99))} | ${fmt(m(kind, (r) => r.cpuUs), 0)} | ` +
        `${fmt(cores, 2)} | ${fmt(cores * 1e6 / rps, 0)} |`)
    }
    lines.push('', `req/s replica / primary: **${fmt(m('replica', (r) => r.rps) / m('primary', (r) => r.rps), 2)}x**; service CPU per request replica / primary: ` +
      `**${fmt(m('replica', (r) => r.cpuUs) / m('primary', (r) => r.cpuUs), 3)}x**. Reads the replica service answered: ${share.replica} from the standby, ` +
      `${share.primary} from the primary; errors ${errors}.`)
  } finally {
    for (const server of Object.values(servers)) await stopServer(server)
    await standby?.stop()
    await primary.stop()
  }
  return lines.join('\n')
}

async function historyExperiment (): Promise<string> {
  const ROUNDS = 3
  const sizes = { '1KiB': 1000, '1MB': 30 } as const
  const users: Record<'on' | 'off', Record<keyof typeof sizes, string[]>> = { on: { '1KiB': [], '1MB': [] }, off: { '1KiB': [], '1MB': [] } }
  await admin(async (c) => {
    for (const [k, kind] of (['on', 'off'] as const).entries()) {
      for (const [j, size] of (Object.keys(sizes) as Array<keyof typeof sizes>).entries()) {
        const prefix = 0x40 + 2 * k + j
        users[kind][size] = Array.from({ length: sizes[size] }, (_, n) => uuid(n, prefix))
        await c.query(insertRecords(`SELECT u, $1, 'AbCdEfGhIjKlMnOp', 1::bigint, repeat('a', 64), $2::int, now(), NULL::bytea
          FROM unnest($3::uuid[]) AS u`), [randomBytes(SIZES[size]).toString('base64'), SIZES[size], users[kind][size]])
        if (kind === 'on') {
          await c.query(`INSERT INTO user_sync_versions (user_id, version, etag, ciphertext, iv, timestamp, checksum, blob_size)
            SELECT u, -v, -v || '-seed', decode($1, 'base64'), 'AbCdEfGhIjKlMnOp', 1, repeat('a', 64), $2
            FROM unnest($3::uuid[]) AS u, generate_series(1, 10) AS v`, [randomBytes(SIZES[size]).toString('base64'), SIZES[size], users[kind][size]])
        }
      }
    }
    await c.query('VACUUM ANALYZE user_sync_data, user_sync_versions')
  }, benchUrl)
  // A metrics token keeps /metrics on the service port: the separate listener's port is the first service's.
  const alongside = { METRICS_TOKEN: 'bench-metrics-token' }
  const servers = {
    off: await startServer('service', 3103, { ...alongside, HISTORY_VERSIONS: '0' }),
    on: await startServer('service', 3104, { ...alongside, HISTORY_VERSIONS: '10' })
  }
  const lines = ['## Version history (--history)', '',
    'The service with `HISTORY_VERSIONS=10` (the default; every user starts with 10 kept versions, so every upload also drops the oldest)',
    'against the same service with `HISTORY_VERSIONS=0`, each on users of its own, 16 connections; ' +
    `${ROUNDS} rounds of (off, on, on, off), ${DURATION} s each after a 1 s warm-up; medians of the ${2 * ROUNDS} runs of each.`, '',
    '| scenario | req/s off / on | **on / off** | p99 ms off / on | CPU µs/req off / on | errors |',
    '| --- | ---: | ---: | ---: | ---: | ---: |']
  try {
    const bodies = { '1KiB': body('1KiB'), '1MB': body('1MB') }
    const scenario = (kind: 'on' | 'off', method: 'GET' | 'PUT', size: keyof typeof sizes): Scenario => ({
      name: `${method} ${size} c16 [history ${kind}]`,
      connections: 16,
      method,
      path: () => `/api/sync/${pick(users[kind][size])}`,
      ...(method === 'PUT' ? { body: bodies[size], headers: () => ({ 'content-type': 'application/json' }) } : {}),
      expect: [200]
    })
    for (const [method, size] of [['PUT', '1KiB'], ['PUT', '1MB'], ['GET', '1KiB']] as const) {
      const runs = await alternate(ROUNDS, ['off', 'on', 'on', 'off'] as const, (kind) => [servers[kind], scenario(kind, method, size)])
      const m = (kind: 'on' | 'off', pickField: (r: Result) => number) => median(runs[kind].map(pickField))
      const errors = [...runs.on, ...runs.off].reduce((sum, r) => sum + r.errors + r.unexpected, 0)
      lines.push(`| ${method} ${size} | ${fmt(m('off', (r) => r.rps), 0)} / ${fmt(m('on', (r) => r.rps), 0)} | ` +
        `**${fmt(m('on', (r) => r.rps) / m('off', (r) => r.rps), 2)}x** | ${fmt(m('off', (r) => r.p99))} / ${fmt(m('on', (r) => r.p99))} | ` +
        `${fmt(m('off', (r) => r.cpuUs), 0)} / ${fmt(m('on', (r) => r.cpuUs), 0)} | ${errors} |`)
    }
  } finally {
    await stopServer(servers.off)
    await stopServer(servers.on)
  }

  // Disk: one user, 11 uploads of 1,000,000 random bytes (the current version and 10 kept ones)
  // through the service, on a database of its own, after VACUUM FULL.
  const DISK_DB = 'lk_bench_disk'
  await admin(async (c) => {
    await c.query(`DROP DATABASE IF EXISTS ${DISK_DB} WITH (FORCE)`)
    await c.query(`CREATE DATABASE ${DISK_DB}`)
  })
  const diskUrl = Object.assign(new URL(benchUrl), { pathname: `/${DISK_DB}` }).toString()
  const disk = await startServer('service', 3105, { ...alongside, HISTORY_VERSIONS: '10' }, diskUrl)
  const userId = uuid(1, 0x50)
  try {
    for (let i = 0; i < 11; i++) {
      const res = await fetch(`http://127.0.0.1:${disk.port}/api/sync/${userId}`, { method: 'PUT', headers: { 'content-type': 'application/json' }, body: body('1MB') })
      if (res.status !== 200) throw new Error(`disk figure: upload ${i + 1} answered ${res.status}`)
    }
  } finally {
    await stopServer(disk)
  }
  const figures = await admin(async (c) => {
    await c.query('VACUUM FULL user_sync_data, user_sync_versions')
    const { rows: [row] } = await c.query(`SELECT
        pg_total_relation_size('user_sync_data') + pg_total_relation_size('user_sync_versions') AS total,
        (SELECT count(*) - 1 FROM user_sync_versions)::int AS kept,
        (SELECT pg_column_size(v.ciphertext) FROM user_sync_versions v JOIN user_sync_data USING (user_id, version)) AS blob,
        (SELECT pg_column_size(v.*) + pg_column_size(d.*) FROM user_sync_versions v JOIN user_sync_data d USING (user_id, version)) AS row_size`)
    return { total: Number(row.total), kept: row.kept as number, blob: Number(row.blob), row: Number(row.row_size) }
  }, diskUrl)
  await admin(async (c) => { await c.query(`DROP DATABASE IF EXISTS ${DISK_DB} WITH (FORCE)`) })
  const copies = 11 * figures.row
  lines.push('', `Disk: one user with ${figures.kept} kept versions of 1,000,000 random bytes (11 uploads through the service), after ` +
    `\`VACUUM FULL\`: \`pg_total_relation_size\` of user_sync_data and user_sync_versions together is **${fmt(figures.total / 1e6, 2)} MB**; ` +
    `the current version is ${fmt(figures.row / 1e6, 3)} MB in the table's own format (\`pg_column_size\` of its row; its blob alone ` +
    `${fmt(figures.blob / 1e6, 3)} MB), so 11 copies are ${fmt(copies / 1e6, 2)} MB: **${fmt(figures.total / copies, 3)}x** of that, ` +
    `the rest being pages, TOAST chunk headers and indexes (${fmt((figures.total - copies) / 1024, 0)} KiB). No version is stored twice.`)
  return lines.join('\n')
}

/** The counter of storage statements `operation` a service ran, from its /metrics (the bench's token). */
async function statementsRun (server: Server, operation: string): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${server.port}/metrics`, { headers: { authorization: `Bearer ${PRODUCTION_DEFAULTS.METRICS_TOKEN}` } })).text()
  return Number(new RegExp(`storage_operation_duration_seconds_count\\{operation="${operation}",outcome="ok"\\} (\\d+)`).exec(text)?.[1] ?? 0)
}

/**
 * The first download of the day of each user (the service records the access, after the answer)
 * against downloads of users already read today, on the same 100,000 users of 1 KiB, service
 * only: 2 rounds of (read today, first read, first read, read today); before each first-read run
 * every user is marked as last read 2 days ago.
 */
async function firstReadExperiment (service: Server): Promise<{ lines: string, ratio: number }> {
  const ROUNDS = 2
  const WIDE = 100_000
  await admin(async (c) => {
    await c.query(insertRecords(`SELECT ('00000011-0000-4000-8000-' || lpad(to_hex(n), 12, '0'))::uuid, $1, 'AbCdEfGhIjKlMnOp', 1::bigint,
             repeat('a', 64), 1024, now(), NULL::bytea
      FROM generate_series(0, $2 - 1) AS n`), [randomBytes(1024).toString('base64'), WIDE])
    await c.query('VACUUM ANALYZE user_sync_data, user_sync_versions')
  }, benchUrl)
  const today: Scenario = {
    name: 'GET 1KiB c16 [100,000 users, read today]',
    connections: 16,
    method: 'GET',
    path: () => `/api/sync/${uuid(Math.floor(Math.random() * WIDE), 0x11)}`,
    expect: [200]
  }
  const first: Scenario = { ...today, name: 'GET 1KiB c16 [100,000 users, first read of the day]' }
  const runs: Record<'today' | 'first', Result[]> = { today: [], first: [] }
  const recorded: number[] = []
  for (let round = 0; round < ROUNDS; round++) {
    for (const kind of ['today', 'first', 'first', 'today'] as const) {
      if (kind === 'first') {
        await admin(async (c) => {
          await c.query("UPDATE user_sync_data SET last_accessed = now() - interval '2 days' WHERE user_id::text LIKE '00000011-%'")
        }, benchUrl)
      }
      const statementsBefore = await statementsRun(service, 'touch')
      await measure(service, kind === 'first' ? first : today, 1)
      const result = await measure(service, kind === 'first' ? first : today, DURATION)
      runs[kind].push(result)
      if (kind === 'first') {
        await sleep(200) // the last accesses are written after their answers
        const { n } = await admin(async (c) => (await c.query(
          "SELECT count(*)::int AS n FROM user_sync_data WHERE user_id::text LIKE '00000011-%' AND last_accessed > now() - interval '1 hour'")).rows[0], benchUrl)
        recorded.push(n, await statementsRun(service, 'touch') - statementsBefore)
      }
      console.log(`${result.scenario.padEnd(50)} ${fmt(result.rps, 0).padStart(7)} req/s  p99 ${result.p99} ms  cpu ${fmt(result.cpuUs, 0)} us/req`)
    }
  }
  const m = (kind: 'today' | 'first', field: (r: Result) => number) => median(runs[kind].map(field))
  const ratio = m('first', (r) => r.rps) / m('today', (r) => r.rps)
  const errors = [...runs.today, ...runs.first].reduce((sum, r) => sum + r.errors + r.unexpected, 0)
  const accesses = recorded.filter((_, i) => i % 2 === 0)
  const statements = recorded.filter((_, i) => i % 2 === 1)
  const lines = ['## The first read of the day', '',
    '1 KiB GET over 100,000 users (the service, 16 connections): users already read today against users last read 2 days ago, whose download also records the access (written after the answer, the accesses that come in meanwhile together in one statement). ' +
    `${ROUNDS} rounds of (read today, first read, first read, read today), ${DURATION} s each after a 1 s warm-up, every user marked as read 2 days ago before each first-read run; medians of the ${2 * ROUNDS} runs of each.`, '',
    '| reads | req/s | p50 / p99 ms | CPU µs/req | errors |',
    '| --- | ---: | --- | ---: | ---: |',
    `| read today | ${fmt(m('today', (r) => r.rps), 0)} | ${fmt(m('today', (r) => r.p50))} / ${fmt(m('today', (r) => r.p99))} | ${fmt(m('today', (r) => r.cpuUs), 0)} | |`,
    `| first read of the day | ${fmt(m('first', (r) => r.rps), 0)} | ${fmt(m('first', (r) => r.p50))} / ${fmt(m('first', (r) => r.p99))} | ${fmt(m('first', (r) => r.cpuUs), 0)} | ${errors} |`,
    '',
    `First read / read today: **${fmt(ratio, 2)}x** req/s. Accesses recorded per first-read run (warm-up included): ${accesses.map((n) => n.toLocaleString('en')).join(', ')}, ` +
    `in ${statements.map((n) => n.toLocaleString('en')).join(', ')} UPDATE statements.`]
  return { lines: lines.join('\n'), ratio }
}

/**
 * Bytes on disk per byte of ciphertext, as the service stores it (uploads through the service)
 * and as the release before stored it (the same rows with the ciphertext as base64 text), after
 * VACUUM FULL: pg_total_relation_size (table, TOAST and indexes) of user_sync_versions, where the
 * ciphertext is, and of both tables.
 */
async function storageExperiment (): Promise<{ lines: string, ratios: Record<Size, number> }> {
  const DISK_DB = 'lk_bench_storage'
  const COUNT: Record<Size, number> = { '1KiB': 2000, '100KiB': 200, '1MB': 30 }
  await admin(async (c) => {
    await c.query(`DROP DATABASE IF EXISTS ${DISK_DB} WITH (FORCE)`)
    await c.query(`CREATE DATABASE ${DISK_DB}`)
  })
  const diskUrl = Object.assign(new URL(benchUrl), { pathname: `/${DISK_DB}` }).toString()
  const server = await startServer('service', 3111, {}, diskUrl)
  const lines = ['## Bytes on disk per byte of ciphertext', '',
    'Records uploaded through the service (random ciphertext, each record its own, no kept versions), then `VACUUM FULL`; `pg_total_relation_size` ' +
    '(table, TOAST and indexes) of user_sync_versions, which holds the ciphertext, and of it and user_sync_data together, divided by the ' +
    'ciphertext\'s bytes. "Text" is the same rows with the ciphertext as base64 text, as the release before stored it.', '',
    '| records | bytes, versions table | bytes, both tables | text, versions table | text, both tables |',
    '| --- | ---: | ---: | ---: | ---: |']
  const ratios = {} as Record<Size, number>
  try {
    for (const size of Object.keys(SIZES) as Size[]) {
      await admin(async (c) => { await c.query('TRUNCATE user_sync_data, user_sync_versions') }, diskUrl)
      const users = Array.from({ length: COUNT[size] }, (_, n) => uuid(n, 0x30))
      for (let i = 0; i < users.length; i += 8) {
        await Promise.all(users.slice(i, i + 8).map(async (userId) => {
          const res = await fetch(`http://127.0.0.1:${server.port}/api/sync/${userId}`, { method: 'PUT', headers: { 'content-type': 'application/json' }, body: body(size) })
          if (res.status !== 200) throw new Error(`storage figure: an upload answered ${res.status}`)
        }))
      }
      const sizes = async () => await admin(async (c) => {
        await c.query('VACUUM FULL user_sync_data, user_sync_versions')
        const { rows: [row] } = await c.query(`SELECT pg_total_relation_size('user_sync_versions')::float8 AS versions,
          pg_total_relation_size('user_sync_data')::float8 AS accounts`)
        return { versions: row.versions as number, both: (row.versions + row.accounts) as number }
      }, diskUrl)
      const bytes = await sizes()
      await admin(async (c) => {
        await c.query("UPDATE user_sync_versions SET encrypted_blob = translate(encode(ciphertext, 'base64'), E'\\n', ''), ciphertext = NULL")
      }, diskUrl)
      const text = await sizes()
      const total = COUNT[size] * SIZES[size]
      ratios[size] = bytes.versions / total
      lines.push(`| ${COUNT[size].toLocaleString('en')} of ${SIZES[size].toLocaleString('en')} bytes | **${fmt(bytes.versions / total, 3)}** | ${fmt(bytes.both / total, 3)} | ` +
        `${fmt(text.versions / total, 3)} | ${fmt(text.both / total, 3)} |`)
    }
  } finally {
    await stopServer(server)
    await admin(async (c) => { await c.query(`DROP DATABASE IF EXISTS ${DISK_DB} WITH (FORCE)`) })
  }
  return { lines: lines.join('\n'), ratios }
}

/** The bytes of one 1 KiB download's answer (status line, headers, body) from `server`. */
async function answerBytes (server: Server, userId: string): Promise<{ head: number, body: number }> {
  return await new Promise((resolve, reject) => {
    get(`http://127.0.0.1:${server.port}/api/sync/${userId}`, (res) => {
      let bodyBytes = 0
      res.on('data', (chunk: Buffer) => { bodyBytes += chunk.length })
      res.on('end', () => {
        let head = `HTTP/1.1 ${res.statusCode} ${res.statusMessage}\r\n`.length + 2
        for (let i = 0; i < res.rawHeaders.length; i += 2) head += `${res.rawHeaders[i]}: ${res.rawHeaders[i + 1]}\r\n`.length
        resolve({ head, body: bodyBytes })
      })
    }).on('error', reject)
  })
}

/**
 * Uploads (1 KiB, 16 connections) before and while `npm run migrate-blobs` converts versions
 * stored as base64 text to bytes: 100,000 of 1 KiB and 1,000 of 100 KiB, seeded as the release
 * before stored them.
 */
async function migrationExperiment (service: Server): Promise<string> {
  const [small, large] = [100_000, 1_000]
  await admin(async (c) => {
    await c.query(insertRecords(`SELECT ('00000012-0000-4000-8000-' || lpad(to_hex(n), 12, '0'))::uuid, $1, 'AbCdEfGhIjKlMnOp', 1::bigint,
             repeat('a', 64), 1024, now(), NULL::bytea FROM generate_series(0, $2 - 1) AS n`, true), [randomBytes(1024).toString('base64'), small])
    await c.query(insertRecords(`SELECT ('00000013-0000-4000-8000-' || lpad(to_hex(n), 12, '0'))::uuid, $1, 'AbCdEfGhIjKlMnOp', 1::bigint,
             repeat('a', 64), 102400, now(), NULL::bytea FROM generate_series(0, $2 - 1) AS n`, true), [randomBytes(102_400).toString('base64'), large])
    await c.query('VACUUM ANALYZE user_sync_data, user_sync_versions')
  }, benchUrl)
  const putSmall = scenarios().find((s) => s.name === 'PUT 1KiB c16') ?? seededScenario('PUT', ids['1KiB'], body('1KiB'), 'uploads')
  await measure(service, putSmall, 1)
  const quiet = await measure(service, putSmall, DURATION)
  const started = Date.now()
  const migration = new Promise<string>((resolve, reject) => {
    const child = spawn(process.execPath, ['dist/scripts/migrate-blobs.js'], {
      cwd: ROOT, env: { PATH: process.env.PATH ?? '', DATABASE_URL: benchUrl }, stdio: ['ignore', 'pipe', 'inherit']
    })
    let out = ''
    child.stdout.on('data', (chunk: Buffer) => { out += chunk.toString() })
    child.on('exit', (code) => (code === 0 ? resolve(out.trim()) : reject(new Error(`migrate-blobs exited ${code}`))))
  })
  const during: Result[] = []
  const state = { done: false }
  migration.finally(() => { state.done = true }).catch(() => {})
  while (!state.done) during.push(await measure(service, putSmall, 2))
  const line = await migration
  const seconds = (Date.now() - started) / 1000
  const errors = during.reduce((sum, r) => sum + r.errors + r.unexpected, 0)
  return ['## Converting text versions to bytes while uploads go on (--migration)', '',
    `${small.toLocaleString('en')} versions of 1 KiB and ${large.toLocaleString('en')} of 100 KiB seeded as base64 text (as the release before stored them); ` +
    `then \`node dist/scripts/migrate-blobs.js\` (batches of 100) while 16 connections upload 1 KiB blobs, in runs of 2 s until it ends: \`${line}\` ` +
    `(${fmt(seconds, 1)} s with the bench's start-up, ${fmt((small + large) / seconds, 0)} versions/s).`, '',
    '| uploads | req/s | p50 / p99 ms | worst ms | errors |',
    '| --- | ---: | --- | ---: | ---: |',
    `| before | ${fmt(quiet.rps, 0)} | ${fmt(quiet.p50)} / ${fmt(quiet.p99)} | ${fmt(quiet.max)} | ${quiet.errors + quiet.unexpected} |`,
    `| during (median of ${during.length} runs) | ${fmt(median(during.map((r) => r.rps)), 0)} | ${fmt(median(during.map((r) => r.p50)))} / ${fmt(median(during.map((r) => r.p99)))} | ` +
    `${fmt(Math.max(...during.map((r) => r.max)))} | ${errors} |`].join('\n')
}

function average (runs: Result[]): Result {
  const mean = (pick: (run: Result) => number) => runs.reduce((sum, run) => sum + pick(run), 0) / runs.length
  return {
    scenario: runs[0]!.scenario,
    server: runs[0]!.server,
    rps: mean((run) => run.rps),
    p50: mean((run) => run.p50),
    p975: mean((run) => run.p975),
    p99: mean((run) => run.p99),
    max: Math.max(...runs.map((run) => run.max)),
    errors: runs.reduce((sum, run) => sum + run.errors, 0),
    unexpected: runs.reduce((sum, run) => sum + run.unexpected, 0),
    rssMb: Math.max(...runs.map((run) => run.rssMb)),
    cpuUs: mean((run) => run.cpuUs)
  }
}

async function main (): Promise<void> {
  const began = Date.now()
  if (!existsSync(`${ROOT}dist/server.js`) || process.env.BENCH_SKIP_BUILD !== '1') {
    execFileSync('npm', ['run', 'build', '--silent'], { cwd: ROOT, stdio: 'inherit' })
  }
  console.log(`seeding ${BENCH_DB}…`)
  await seed()
  const service = await startServer('service', 3101)
  const lean = await startServer('service', 3112, LEAN, benchUrl, ROOT, 'lean')
  const baseline = await startServer('baseline', 3102)
  const results: Result[] = []
  const list = scenarios()
  const extra: string[] = []
  const sections: string[] = []
  let firstRead: { lines: string, ratio: number } | undefined
  let storage: { lines: string, ratios: Record<Size, number> } | undefined
  // A B B A (A B C C B A with the lean service): each server runs twice, once early and once
  // late, and the two runs are averaged, so that drift in the machine's load falls on all alike.
  async function compare (scenario: Scenario, servers = scenario.lean === true
    ? [service, lean, baseline, baseline, lean, service]
    : [service, baseline, baseline, service]): Promise<void> {
    const runs: Result[] = []
    for (const server of servers) {
      // Each run of a write starts on tables without the dead rows of the runs before it, which
      // autovacuum (once a minute) leaves behind: they slowed whichever server ran later.
      if (scenario.method === 'PUT' || scenario.method === 'DELETE') await admin(async (c) => { await c.query('VACUUM user_sync_data, user_sync_versions') }, benchUrl)
      await measure(server, scenario, 1) // warm-up: JIT, connections, prepared statements
      runs.push(await measure(server, scenario, DURATION))
    }
    for (const name of new Set(servers.map((server) => server.name))) {
      const result = average(runs.filter((run) => run.server === name))
      results.push(result)
      console.log(`${scenario.name.padEnd(28)} ${name.padEnd(8)} ${fmt(result.rps, 0).padStart(7)} req/s  p50 ${result.p50} ms  p99 ${result.p99} ms  cpu ${fmt(result.cpuUs, 0)} us/req  errors ${result.errors + result.unexpected}  rss ${fmt(result.rssMb, 0)} MB`)
    }
  }
  const answers: Array<[string, { head: number, body: number }]> = []
  try {
    for (const server of [service, lean, baseline]) answers.push([server.name, await answerBytes(server, ids['1KiB'][0]!)])
    for (const scenario of list) {
      // Uploads changed the versions: a client polls with the ETag it last saw.
      if (scenario.name.includes('If-None-Match')) await refreshEtags()
      await compare(scenario)
    }
    if (args.only === '') {
      firstRead = await firstReadExperiment(service)
      storage = await storageExperiment()
    }
    if (args.migration) extra.push(await migrationExperiment(service))
    if (args.toast) extra.push(await toastExperiment(service, compare, results))
    if (args.tokens) extra.push(await tokenExperiment(service))
    if (args.history) extra.push(await historyExperiment())
    if (args.redis) extra.push(await redisExperiment())
    if (args.replica) extra.push(await replicaExperiment())
    if (args.tracing) extra.push(await tracingExperiment())
    if (args.scale) extra.push(await scaleExperiment(service, compare, results))
  } finally {
    await stopServer(service)
    await stopServer(lean)
    await stopServer(baseline)
  }

  const integrity = await admin(async (c) => (await c.query(
    "SELECT count(*)::int AS n FROM user_sync_data JOIN user_sync_versions v USING (user_id, version) WHERE user_id::text LIKE '00000003-%' AND v.blob_size = 1000000 AND octet_length(v.ciphertext) = 1000000")).rows[0].n, benchUrl)

  const of = (scenario: string, server: string) => results.find((r) => r.scenario === scenario && r.server === server)
  const rows = list.map((scenario) => {
    const s = of(scenario.name, 'service')!
    const l = of(scenario.name, 'lean')
    const b = of(scenario.name, 'baseline')!
    const latency = (r: Result) => `${fmt(r.p50)} / ${fmt(r.p975)} / ${fmt(r.p99)}`
    const three = (field: (r: Result) => string) => [s, l, b].map((r) => (r === undefined ? '–' : field(r))).join(' / ')
    return `| ${scenario.name} | ${three((r) => fmt(r.rps, 0))} | **${fmt(s.rps / b.rps, 2)}x** | ${l === undefined ? '–' : `${fmt(l.rps / b.rps, 2)}x`} | ` +
      `${three((r) => fmt(r.cpuUs, 0))} | **${fmt(s.cpuUs / b.cpuUs, 2)}x** | ${latency(s)} | ${latency(b)} | ${three((r) => String(r.errors + r.unexpected))} | ${fmt(s.rssMb, 0)} / ${fmt(b.rssMb, 0)} |`
  })

  // The targets of issue 17, judged on this run's figures (where this run measured them).
  const targets: string[] = []
  const judge = (met: boolean) => (met ? 'met' : '**not met**')
  for (const [name, rps, cpu] of [['GET 1KiB c16', 0.9, 1.3], ['PUT 1KiB c16', 0.9, 1.3], ['GET 1MB c16', 1.0, null], ['PUT 1MB c16', 0.9, null]] as const) {
    const s = of(name, 'service')
    const b = of(name, 'baseline')
    if (s === undefined || b === undefined) continue
    const cpuPart = cpu === null ? '' : `; CPU/request ${fmt(s.cpuUs / b.cpuUs, 2)}x (target ≤ ${cpu}x: ${judge(s.cpuUs / b.cpuUs <= cpu)})`
    targets.push(`| ${name}, default configuration against the baseline | req/s ${fmt(s.rps / b.rps, 2)}x (target ≥ ${rps}x: ${judge(s.rps / b.rps >= rps)})${cpuPart} |`)
  }
  if (firstRead !== undefined) targets.push(`| first read of the day against an ordinary read | ${fmt(firstRead.ratio, 2)}x (target ≥ 0.9x: ${judge(firstRead.ratio >= 0.9)}) |`)
  if (storage !== undefined) {
    for (const [size, limit] of [['1KiB', 1.25], ['100KiB', 1.05], ['1MB', 1.05]] as const) {
      targets.push(`| bytes on disk per byte of ciphertext, ${size} records (versions table) | ${fmt(storage.ratios[size], 3)} (target ≤ ${limit}: ${judge(storage.ratios[size] <= limit)}) |`)
    }
  }
  const wide = of('PUT 1MB c64', 'service')
  const narrow = of('PUT 1MB c16', 'service')
  if (wide !== undefined) targets.push(`| peak RSS, 64 concurrent 1 MB uploads | ${fmt(wide.rssMb, 0)} MB (target ≤ 400 MB: ${judge(wide.rssMb <= 400)}) |`)
  if (narrow !== undefined) targets.push(`| 16 concurrent 1 MB uploads: requests refused (shed or failed) | ${narrow.errors + narrow.unexpected} (target 0: ${judge(narrow.errors + narrow.unexpected === 0)}) |`)
  const minutes = (Date.now() - began) / 60_000
  targets.push(`| this run's duration | ${fmt(minutes, 1)} min${process.argv.length > 2 ? '' : ` (target for \`npm run bench\` with no option ≤ 5 min: ${judge(minutes <= 5)})`} |`)
  if (firstRead !== undefined) sections.push(firstRead.lines)
  if (storage !== undefined) sections.push(storage.lines)
  sections.push(['## Bytes per answer', '', 'One 1 KiB download (status line, headers and body, as received):', '',
    '| server | status line and headers | body | total |', '| --- | ---: | ---: | ---: |',
    ...answers.map(([name, bytes]) => `| ${name} | ${bytes.head} | ${bytes.body} | ${bytes.head + bytes.body} |`)].join('\n'))

  const report = `# Benchmarks

Generated by \`npm run bench\` (bench/run.ts) on ${new Date().toISOString().slice(0, 16).replace('T', ' ')} UTC in ${fmt(minutes, 1)} minutes.
Machine: ${machine()}.
Command: \`npm run bench${process.argv.slice(2).length ? ' -- ' + process.argv.slice(2).join(' ') : ''}\`; per scenario the servers run in the order
service, (lean,) baseline, baseline, (lean,) service (${DURATION} s each after a 1 s warm-up) and each server's two runs are averaged;
one database, autocannon in the same process as this script, all on the same 2 cores.

- **service**: the real service (\`node dist/server.js\`) in the default production configuration: NODE_ENV=production, LOG_LEVEL=info, both rate limits on (budgets of 10^9, which the bench cannot use up), metrics on, pool of 10.
- **lean**: the same with both rate limits off and LOG_LEVEL=silent (1 KiB rows only): what those cost per request.
- **baseline**: bench/baseline.ts, one query per request on the service's tables and nothing else (no validation, no logging, no history: an upload replaces the version it finds), pool of 10.
- Seeded: ${USERS['1KiB']} users of 1 KiB, ${USERS['100KiB']} of 100 KiB, ${USERS['1MB']} of 1,000,000 bytes; DELETE removes distinct users from a pool of ${DELETE_POOL.toLocaleString('en')} 1 KiB rows.
- Latency in ms (p50 / p97.5 / p99). CPU µs/request: user + system time of the server process over the run, per request answered. Errors: failed requests and answers other than the expected status (200; 304 for the service's If-None-Match runs, whose baseline is a plain GET).
- After the run, ${integrity} of ${USERS['1MB']} 1 MB users hold a whole 1,000,000-byte blob (checked in SQL).

## Targets

| target | this run |
| --- | --- |
${targets.join('\n')}

## Service against the baseline

| scenario | req/s service / lean / baseline | **service / baseline** | lean / baseline | CPU µs/request service / lean / baseline | **CPU service / baseline** | service latency | baseline latency | errors service / lean / baseline | peak RSS MB (s / b) |
| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- |
${rows.join('\n')}

${[...sections, ...extra].join('\n\n')}

How to read these figures, where the time goes, and how they compare with the targets:
[bench/notes.md](bench/notes.md).
`
  writeFileSync(`${ROOT}BENCHMARKS.md`, report)
  console.log(`wrote BENCHMARKS.md (${fmt(minutes, 1)} min)`)
  await admin(async (c) => { await c.query(`DROP DATABASE IF EXISTS ${BENCH_DB} WITH (FORCE)`) })
}

await main()
