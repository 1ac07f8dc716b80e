import t from 'tap'
import { execFile } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { parse } from 'yaml'

// deploy/monitoring/alerts.yml under `promtool test rules` (Debian's prometheus package): each
// alert against series written out minute by minute, firing where an operator must be woken and
// silent where not (a blip, a replica that is down rather than behind, a skipped cleanup). The
// live side, the service's real series in a real Prometheus, is monitoring.test.ts.

const ALERTS = join(import.meta.dirname, '..', '..', 'deploy', 'monitoring', 'alerts.yml')
const JOB = 'logikids-sync'

interface Rule { alert: string, expr: string, for?: string, labels?: Record<string, string>, annotations?: Record<string, string> }
const rules = (parse(readFileSync(ALERTS, 'utf8')) as { groups: Array<{ name: string, rules: Rule[] }> }).groups
const severity = new Map(rules.flatMap((group) => group.rules.map((rule) => [rule.alert, rule.labels?.severity ?? ''] as const)))

interface Case {
  name: string
  interval?: string
  series: Record<string, string>
  // At each time, the alert and the label sets it fires with (none: silent).
  expect: Array<{ at: string, alert: string, firing: Array<Record<string, string>> }>
}
const series = (name: string, labels: Record<string, string> = {}) =>
  `${name}{${Object.entries({ job: JOB, instance: 'a', ...labels }).map(([key, value]) => `${key}="${value}"`).join(',')}}`
const a = { job: JOB, instance: 'a' }
const job = { job: JOB }
const GiB = 1024 ** 3

const cases: Case[] = [
  {
    name: 'an instance that stops answering scrapes',
    series: { [series('up')]: '1 1 0x8' },
    expect: [{ at: '3m', alert: 'SyncServiceDown', firing: [] }, { at: '6m', alert: 'SyncServiceDown', firing: [a] }]
  },
  {
    name: 'no instance known at all',
    series: { [series('database_up')]: '1x8' },
    expect: [{ at: '5m', alert: 'SyncServiceDown', firing: [job] }]
  },
  // Scraped every 15 s, as the compose profile does.
  {
    name: 'requests answered 503 for the database, one every 15 s',
    interval: '15s',
    series: { [series('database_connection_errors_total', { kind: 'unavailable' })]: '0+1x40', [series('database_up')]: '1x40' },
    expect: [{ at: '1m', alert: 'SyncDatabaseUnavailable', firing: [] }, { at: '5m', alert: 'SyncDatabaseUnavailable', firing: [job] }]
  },
  {
    name: 'a 45 s outage (a planned restart) does not wake anyone',
    interval: '15s',
    series: { [series('database_connection_errors_total', { kind: 'unavailable' })]: '0x8 3 6 9 9x30', [series('database_up')]: '1x8 0x3 1x30' },
    expect: [2, 3, 4, 5, 6, 8].map((minute) => ({ at: `${minute}m`, alert: 'SyncDatabaseUnavailable', firing: [] }))
  },
  {
    name: 'the database down while nobody makes requests',
    interval: '15s',
    series: { [series('database_connection_errors_total', { kind: 'unavailable' })]: '0x40', [series('database_up')]: '1x4 0x36' },
    expect: [{ at: '4m', alert: 'SyncDatabaseUnavailable', firing: [job] }]
  },
  {
    name: 'server errors over 1% of requests; 501 and 503 are not counted as such',
    series: {
      [series('http_request_duration_seconds_count', { route: '/api/sync/:userId', method: 'GET', status: '200' })]: '0+100x10',
      [series('http_request_duration_seconds_count', { route: '/api/sync/:userId', method: 'GET', status: '500' })]: '0+5x10'
    },
    expect: [{ at: '9m', alert: 'SyncServerErrors', firing: [job] }]
  },
  {
    name: 'many 501s and 503s alone',
    series: {
      [series('http_request_duration_seconds_count', { route: '/api/sync/:userId', method: 'PUT', status: '200' })]: '0+100x10',
      [series('http_request_duration_seconds_count', { route: '/api/sync/:userId', method: 'PUT', status: '501' })]: '0+50x10',
      [series('http_request_duration_seconds_count', { route: '/api/sync/:userId', method: 'PUT', status: '503' })]: '0+50x10'
    },
    expect: [{ at: '9m', alert: 'SyncServerErrors', firing: [] }]
  },
  {
    name: 'sync requests slower than 2.5 s at p99',
    series: {
      [series('http_request_duration_seconds_bucket', { route: '/api/sync/:userId', method: 'GET', status: '200', le: '2.5' })]: '0+50x20',
      [series('http_request_duration_seconds_bucket', { route: '/api/sync/:userId', method: 'GET', status: '200', le: '5' })]: '0+100x20',
      [series('http_request_duration_seconds_bucket', { route: '/api/sync/:userId', method: 'GET', status: '200', le: '+Inf' })]: '0+100x20'
    },
    expect: [{ at: '5m', alert: 'SyncSlowRequests', firing: [] }, { at: '16m', alert: 'SyncSlowRequests', firing: [job] }]
  },
  {
    name: 'the pool full with statements waiting',
    series: {
      [series('db_pool_connections_total')]: '10x20',
      [series('db_pool_connections_idle')]: '0x20',
      [series('db_pool_connections_max')]: '10x20',
      [series('db_pool_requests_waiting')]: '3x20'
    },
    expect: [{ at: '12m', alert: 'SyncPoolSaturated', firing: [a] }]
  },
  {
    name: 'the pool busy but nobody waiting',
    series: {
      [series('db_pool_connections_total')]: '10x20',
      [series('db_pool_connections_idle')]: '0x20',
      [series('db_pool_connections_max')]: '10x20',
      [series('db_pool_requests_waiting')]: '0x20'
    },
    expect: [{ at: '12m', alert: 'SyncPoolSaturated', firing: [] }]
  },
  {
    name: 'requests shed',
    series: { [series('load_shed_requests_total')]: '0+20x10' },
    expect: [{ at: '8m', alert: 'SyncLoadShedding', firing: [a] }]
  },
  {
    name: 'the last cleanup run failed, then one succeeded',
    series: {
      [series('cleanup_last_success_timestamp_seconds')]: '60x5 420x5',
      [series('cleanup_last_failure_timestamp_seconds')]: '0 0 120x8'
    },
    expect: [{ at: '4m', alert: 'SyncCleanupFailing', firing: [job] }, { at: '7m', alert: 'SyncCleanupFailing', firing: [] }]
  },
  {
    name: 'no run completes for two intervals (never, or only skipped: the lock held by a hung run)',
    series: {
      [series('cleanup_interval_seconds')]: '3600x200',
      [series('cleanup_last_success_timestamp_seconds')]: '0x200',
      [series('process_start_time_seconds')]: '0x200'
    },
    expect: [{ at: '1h', alert: 'SyncCleanupNotRun', firing: [] }, { at: '3h', alert: 'SyncCleanupNotRun', firing: [job] }]
  },
  {
    name: 'a run every interval',
    series: {
      [series('cleanup_interval_seconds')]: '3600x200',
      [series('cleanup_last_success_timestamp_seconds')]: '0x59 3600x60 7200x60 10800x20',
      [series('process_start_time_seconds')]: '0x200'
    },
    expect: [{ at: '3h', alert: 'SyncCleanupNotRun', firing: [] }]
  },
  {
    name: 'a young instance that has not run yet, with the schedule off elsewhere',
    series: {
      [series('cleanup_interval_seconds')]: '3600x200',
      [series('cleanup_last_success_timestamp_seconds')]: '0x200',
      [series('process_start_time_seconds')]: '7000x200'
    },
    expect: [{ at: '3h', alert: 'SyncCleanupNotRun', firing: [] }]
  },
  {
    name: 'the database growing 1 GiB an hour',
    // Scraped every 5 min (a sample older than 5 min is stale, and the alert waits 6 h).
    interval: '5m',
    series: { [series('database_size_bytes')]: `${10 * GiB}+${GiB / 12}x200` },
    expect: [{ at: '4h', alert: 'SyncDiskGrowth', firing: [] }, { at: '10h', alert: 'SyncDiskGrowth', firing: [job] }]
  },
  {
    name: 'growth after an instance started while the database was down (NaN at first)',
    interval: '5m',
    series: { [series('database_size_bytes')]: `NaN NaN ${10 * GiB}+${GiB / 12}x200` },
    expect: [{ at: '12h', alert: 'SyncDiskGrowth', firing: [job] }]
  },
  {
    name: 'one step of 300 MB (a restore, an index build) is not a trend',
    interval: '5m',
    series: { [series('database_size_bytes')]: '1000000000x360 1300000000x360' },
    expect: [31, 34, 37, 40, 50].map((hour) => ({ at: `${hour}h`, alert: 'SyncDiskGrowth', firing: [] }))
  },
  {
    name: 'a replica behind',
    series: { [series('replica_lag_seconds')]: '30x10', [series('replica_up')]: '1x10' },
    expect: [{ at: '7m', alert: 'SyncReplicaLagging', firing: [a] }, { at: '7m', alert: 'SyncReplicaDown', firing: [] }]
  },
  {
    name: 'a replica down (its lag unknown)',
    series: { [series('replica_lag_seconds')]: '0.1 0.1 NaN NaN NaN NaN NaN NaN NaN NaN', [series('replica_up')]: '1 1 0x8' },
    expect: [{ at: '8m', alert: 'SyncReplicaDown', firing: [a] }, { at: '8m', alert: 'SyncReplicaLagging', firing: [] }]
  },
  {
    name: 'Redis down',
    series: { [series('rate_limit_store_up')]: '1 0x9' },
    expect: [{ at: '3m', alert: 'SyncRateLimitStoreDown', firing: [] }, { at: '8m', alert: 'SyncRateLimitStoreDown', firing: [a] }]
  }
]

t.test('every alert fires where it must and stays silent where it must not (promtool test rules)', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lk-alert-rules-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  // promtool compares annotations too: the copy it tests has none (YAML takes JSON).
  const stripped = { groups: rules.map((group) => ({ ...group, rules: group.rules.map(({ annotations: _annotations, ...rule }) => rule) })) }
  writeFileSync(join(dir, 'rules.json'), JSON.stringify(stripped))
  const tested = new Set(cases.flatMap((test) => test.expect.filter((check) => check.firing.length > 0).map((check) => check.alert)))
  t.strictSame([...severity.keys()].filter((alert) => !tested.has(alert)), [], 'each alert has a case where it fires')
  writeFileSync(join(dir, 'tests.json'), JSON.stringify({
    rule_files: ['rules.json'],
    evaluation_interval: '1m',
    tests: cases.map((test) => ({
      name: test.name,
      interval: test.interval ?? '1m',
      input_series: Object.entries(test.series).map(([name, values]) => ({ series: name, values })),
      alert_rule_test: test.expect.map((check) => ({
        eval_time: check.at,
        alertname: check.alert,
        exp_alerts: check.firing.map((labels) => ({ exp_labels: { ...labels, severity: severity.get(check.alert) } }))
      }))
    }))
  }))
  const result = await promisify(execFile)('promtool', ['test', 'rules', join(dir, 'tests.json')]).then(
    ({ stdout }) => ({ code: 0, output: stdout }),
    (err: { code: number, stdout: string, stderr: string }) => ({ code: err.code, output: err.stdout + err.stderr }))
  t.equal(result.code, 0, 'promtool: every case as expected')
  if (result.code !== 0) t.comment(result.output)
})
