import t from 'tap'
import { readFileSync } from 'node:fs'
import { ConfigSchema } from '../../plugins/config.ts'

// Every setting the service reads is documented where an operator looks for it: the README's
// Configuration table, .env.example and the sync service's environment in docker-compose.yml.
const read = (name: string) => readFileSync(new URL(`../../${name}`, import.meta.url), 'utf8')
const properties = ConfigSchema.properties as Record<string, { default?: unknown }>
const KEYS = Object.keys(properties)

// Settings for Compose itself, not for the service.
// Compose's own: the database password, the published port, and the monitoring profile's.
const COMPOSE_ONLY = new Set(['POSTGRES_PASSWORD', 'SYNC_PORT', 'GRAFANA_ADMIN_USER', 'GRAFANA_ADMIN_PASSWORD', 'GRAFANA_PORT', 'PROMETHEUS_RETENTION'])

// Not passed through by docker-compose.yml, on purpose:
const NOT_IN_COMPOSE: Record<string, string> = {
  // The container must listen on all its interfaces for the published port to reach it: the
  // default (0.0.0.0) is the only right value there.
  HOST: 'the container listens on 0.0.0.0, its default',
  // Compose always sets DATABASE_URL (from POSTGRES_PASSWORD), so the embedded database never runs there.
  EMBEDDED_DATA_DIR: 'the embedded database never runs under Compose'
}

// Where docker-compose.yml's fallback (${NAME:-fallback}) differs from the service's default, and why.
const COMPOSE_DEFAULTS: Record<string, string> = {
  // The metrics listener must be reachable from the compose network (a Prometheus container);
  // no port is published for it.
  METRICS_HOST: '0.0.0.0'
}

/** The sync service's `environment:` mapping of docker-compose.yml: name to value as written. */
function composeEnvironment (yaml: string): Map<string, string> {
  const lines = yaml.split('\n')
  const service = lines.findIndex((line) => /^ {2}sync:\s*$/.test(line))
  if (service === -1) throw new Error('docker-compose.yml has no sync service')
  const environment = lines.findIndex((line, i) => i > service && /^ {4}environment:\s*$/.test(line))
  if (environment === -1) throw new Error('the sync service has no environment mapping')
  const entries = new Map<string, string>()
  for (const line of lines.slice(environment + 1)) {
    if (/^\s*(#.*)?$/.test(line)) continue
    const entry = /^ {6}([A-Z_][A-Z0-9_]*):\s*(.*)$/.exec(line)
    if (entry === null) break
    entries.set(entry[1]!, entry[2]!.replace(/^"(.*)"$/, '$1'))
  }
  return entries
}

/** The variables .env.example assigns, commented out or not: name to value. */
function envExample (text: string): Map<string, string> {
  const entries = new Map<string, string>()
  for (const line of text.split('\n')) {
    const entry = /^#?\s*([A-Z_][A-Z0-9_]*)=(.*)$/.exec(line)
    if (entry !== null) entries.set(entry[1]!, entry[2]!.trim())
  }
  return entries
}

/** The rows of the README's Configuration table: name to its default column. */
function readmeTable (readme: string): Map<string, string> {
  const start = readme.indexOf('## Configuration')
  if (start === -1) throw new Error('README.md has no Configuration section')
  const end = readme.indexOf('\n## ', start + 1)
  const rows = new Map<string, string>()
  for (const line of readme.slice(start, end === -1 ? undefined : end).split('\n')) {
    const row = /^\| `([A-Z_][A-Z0-9_]*)` \| ([^|]*) \|/.exec(line)
    if (row !== null) rows.set(row[1]!, row[2]!.trim())
  }
  return rows
}

const defaultOf = (key: string) => (properties[key]!.default === undefined ? undefined : String(properties[key]!.default))

t.test('the settings are the ones the service reads', async (t) => {
  t.comment(`${KEYS.length} settings in ConfigSchema: ${KEYS.join(', ')}`)
  for (const key of ['MAX_CONNECTIONS', 'RATE_LIMIT_CACHE_KEYS', 'METRICS_PORT', 'METRICS_HOST', 'DOCS']) {
    t.ok(KEYS.includes(key), `${key} is a setting`)
  }
})

t.test('README.md: one row per setting, with the default the service applies', async (t) => {
  const rows = readmeTable(read('README.md'))
  for (const key of KEYS) {
    t.ok(rows.has(key), `${key} has a row`)
    const documented = rows.get(key)
    const backticked = /^`([^`]*)`$/.exec(documented ?? '')
    if (defaultOf(key) === undefined || defaultOf(key) === '') {
      t.notOk(backticked, `${key}: no default value to show (shows ${documented})`)
    } else {
      t.equal(backticked?.[1], defaultOf(key), `${key}: the default shown is the service's`)
    }
  }
  t.strictSame([...rows.keys()].filter((key) => !KEYS.includes(key)), [], 'no row for a setting the service does not read')
})

t.test('.env.example: every setting, set to its default or left empty (unset)', async (t) => {
  const entries = envExample(read('.env.example'))
  for (const key of KEYS) {
    t.ok(entries.has(key), `${key} is in .env.example`)
    const value = entries.get(key)
    // DATABASE_URL has no default; its example line shows the form.
    if (value === undefined || value === '' || defaultOf(key) === undefined) continue
    t.equal(value, defaultOf(key), `${key}=${value} is the default (a copied .env must not change behaviour unasked)`)
  }
  const unknown = [...entries.keys()].filter((key) => !KEYS.includes(key) && !COMPOSE_ONLY.has(key))
  t.strictSame(unknown, [], 'nothing else but Compose\'s own settings')
})

t.test('docker-compose.yml passes every setting to the sync service, with the same defaults', async (t) => {
  const environment = composeEnvironment(read('docker-compose.yml'))
  for (const key of KEYS) {
    if (key in NOT_IN_COMPOSE) {
      t.notOk(environment.has(key), `${key} is left out: ${NOT_IN_COMPOSE[key]}`)
      continue
    }
    t.ok(environment.has(key), `${key} is in the sync service's environment`)
    const fallback = /^\$\{([A-Z_][A-Z0-9_]*):-([^}]*)\}$/.exec(environment.get(key) ?? '')
    if (fallback === null) continue // set outright: DATABASE_URL (from POSTGRES_PASSWORD), PORT
    t.equal(fallback[1], key, `${key} is read from the variable of its own name`)
    const expected = COMPOSE_DEFAULTS[key] ?? defaultOf(key) ?? ''
    t.equal(fallback[2], expected, `${key}: Compose falls back to ${expected === '' ? 'unset' : expected}`)
  }
  t.match(environment.get('DATABASE_URL'), /\$\{POSTGRES_PASSWORD:-development\}/, 'DATABASE_URL carries POSTGRES_PASSWORD')
  t.equal(environment.get('PORT'), '3000', 'PORT is the container port the published SYNC_PORT maps to')
  t.strictSame([...environment.keys()].filter((key) => !KEYS.includes(key)), [], 'no variable the service does not read')
})
