import { existsSync, readFileSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import fp from 'fastify-plugin'
import { envSchema } from 'env-schema'
import { Type, type Static } from '@sinclair/typebox'
import parseDuration, { type StringValue } from 'ms'
import proxyAddr from '@fastify/proxy-addr'

const Milliseconds = (defaultValue: number, description: string) =>
  Type.Integer({ minimum: 1, maximum: 600_000, default: defaultValue, description })

const Duration = (defaultValue: string, description: string) =>
  Type.String({ minLength: 1, default: defaultValue, description })

// Plain enums, not unions of literals: Ajv then reports one error that lists the values.
const Level = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const
const Environments = ['development', 'production', 'test'] as const
const AuthModes = ['optional', 'required'] as const

// Node clamps a timer longer than this to 1 ms; plugins/cleanup.ts splits longer waits.
const MAX_DURATION_MS = 10 * 365 * 86_400_000

/**
 * Milliseconds of a duration: 1d, 12h, 15m, 30s, 500ms, or the long forms @fastify/rate-limit
 * documents (1 minute, 15 minutes, 2 days); a bare number is milliseconds. NaN when it is none.
 */
export function durationMs (value: string): number {
  const ms = parseDuration(value.trim() as StringValue) as number | undefined
  return typeof ms === 'number' && Number.isInteger(ms) && ms >= 0 && ms <= MAX_DURATION_MS ? ms : Number.NaN
}

export const ConfigSchema = Type.Object({
  NODE_ENV: Type.Unsafe<typeof Environments[number]>({ type: 'string', enum: [...Environments], default: 'development' }),
  DATABASE_URL: Type.Optional(Type.String({
    pattern: '^postgres(ql)?://',
    description: 'postgres://user:password@host:port/database; without it (development only) an embedded database runs'
  })),
  DATABASE_READ_URL: Type.Optional(Type.String({
    pattern: '^postgres(ql)?://',
    description: 'a streaming replica of DATABASE_URL for downloads and other reads (writes and access times stay on the primary)'
  })),
  REPLICA_MAX_LAG_MS: Type.Integer({
    minimum: 100,
    maximum: 600_000,
    default: 1_000,
    description: 'how far behind the primary the replica may be and still serve reads; past it, or down, reads go to the primary'
  }),
  EMBEDDED_DATA_DIR: Type.String({ minLength: 1, default: './data', description: 'where the embedded database keeps its files' }),
  PORT: Type.Integer({ minimum: 0, maximum: 65535, default: 3000 }),
  HOST: Type.String({ minLength: 1, default: '0.0.0.0' }),
  LOG_LEVEL: Type.Unsafe<typeof Level[number]>({ type: 'string', enum: [...Level], default: 'info' }),
  DATABASE_POOL_MAX: Type.Integer({ minimum: 1, maximum: 1000, default: 10 }),
  DATABASE_POOLER: Type.Unsafe<'none' | 'transaction'>({
    type: 'string',
    enum: ['none', 'transaction'],
    default: 'none',
    description: 'transaction: DATABASE_URL is a transaction-mode pooler (PgBouncer pool_mode = transaction); none: PostgreSQL itself or a session-mode pooler'
  }),
  // No default: unset, it follows DATABASE_POOLER (named statements need a session of their own).
  DATABASE_PREPARED_STATEMENTS: Type.Optional(Type.Boolean({
    description: 'prepare each statement once per connection; false sends them unnamed (the embedded database always does)'
  })),
  DATABASE_MAX_WAITING: Type.Integer({
    minimum: 1,
    maximum: 100_000,
    default: 100,
    description: 'requests that may wait for a pooled connection; beyond that a request gets a 503 at once'
  }),
  DATABASE_CONNECT_TIMEOUT_MS: Milliseconds(2_000, 'how long a request waits for a pooled connection before a 503'),
  DATABASE_STATEMENT_TIMEOUT_MS: Milliseconds(5_000, 'longest a single SQL statement may run'),
  HEALTH_TIMEOUT_MS: Milliseconds(2_000, 'how long /health waits for SELECT 1'),
  REQUEST_TIMEOUT_MS: Milliseconds(30_000, 'how long a client may take to send a whole request (headers: at most 10 s of it)'),
  MAX_CONNECTIONS: Type.Integer({
    minimum: 1,
    maximum: 1_000_000,
    default: 1024,
    description: 'open client connections the server accepts; past it a new connection is closed at once'
  }),
  MAX_EVENT_LOOP_DELAY_MS: Type.Integer({
    minimum: 0,
    maximum: 600_000,
    default: 1000,
    description: 'above this event-loop delay requests get a 503 (load shedding); 0 disables'
  }),
  CLEANUP_INACTIVE_DAYS: Type.Integer({
    minimum: 0, maximum: 36_500, default: 730, description: 'delete accounts not accessed for this many days; 0 disables'
  }),
  HISTORY_VERSIONS: Type.Integer({
    minimum: 0, maximum: 100, default: 10, description: 'previous versions kept per user, so that an upload can be undone; 0 keeps none'
  }),
  HISTORY_DAYS: Type.Integer({
    minimum: 0, maximum: 36_500, default: 30, description: 'days a previous version is kept after it was replaced; 0: no age limit'
  }),
  CLEANUP_INTERVAL: Duration('1d', 'how often the cleanup runs (e.g. 1d, 12h, 30 days); 0 disables'),
  RATE_LIMIT_MAX: Type.Integer({ minimum: 0, default: 100, description: 'requests per user id per window; 0 disables' }),
  RATE_LIMIT_IP_MAX: Type.Integer({ minimum: 0, default: 2000, description: 'requests per client IP (IPv6: per /64) per window; 0 disables' }),
  RATE_LIMIT_WINDOW: Duration('1h', 'the rate-limit window (e.g. 1h, 15m, 15 minutes)'),
  RATE_LIMIT_CACHE_KEYS: Type.Integer({
    minimum: 100,
    maximum: 10_000_000,
    default: 100_000,
    description: 'counters each limit keeps in memory; past it the least recently seen start afresh'
  }),
  REDIS_URL: Type.String({
    default: '',
    description: 'redis:// or rediss:// URL of a Redis the instances share their rate-limit counters in; empty: each instance counts on its own'
  }),
  REDIS_TIMEOUT_MS: Milliseconds(100, 'longest one rate-limit count waits for Redis; past it, or with Redis down, the request is served uncounted'),
  AUTH_MODE: Type.Unsafe<typeof AuthModes[number]>({
    type: 'string',
    enum: [...AuthModes],
    default: 'optional',
    description: 'optional: records no device has claimed with an access token stay open to clients without one; required: every sync request needs a token'
  }),
  AUTH_FAILURE_LIMIT: Type.Integer({
    minimum: 0,
    maximum: 1_000_000,
    default: 20,
    description: 'refused access tokens per client IP per rate-limit window before further refusals are 429; 0 disables'
  }),
  TRUST_PROXY: Type.String({
    default: '',
    description: 'addresses or CIDRs of the reverse proxies whose X-Forwarded-For is believed, comma-separated'
  }),
  METRICS_TOKEN: Type.String({ default: '', description: 'when set, GET /metrics needs Authorization: Bearer <token>' }),
  METRICS_PORT: Type.Integer({
    minimum: 0,
    maximum: 65535,
    default: 9464,
    description: 'port of the separate metrics listener used in production when METRICS_TOKEN is empty'
  }),
  METRICS_HOST: Type.String({ minLength: 1, default: '127.0.0.1', description: 'address of the separate metrics listener' }),
  OTEL_EXPORTER_OTLP_ENDPOINT: Type.String({
    default: '',
    description: 'OTLP/HTTP collector (http://collector:4318): when set, a span per request and per storage statement is sent to <endpoint>/v1/traces; empty: no tracing'
  }),
  OTEL_EXPORTER_OTLP_HEADERS: Type.String({
    default: '',
    description: 'headers sent to the collector, name=value,name=value (values percent-encoded), e.g. its credentials'
  }),
  OTEL_SERVICE_NAME: Type.String({ minLength: 1, default: 'logikids-sync', description: 'service.name of the spans' }),
  OTEL_TRACES_SAMPLER_ARG: Type.Number({
    minimum: 0,
    maximum: 1,
    default: 1,
    description: 'share of requests traced (0 to 1), unless a trusted proxy\'s traceparent says whether it is sampled'
  }),
  DOCS: Type.Optional(Type.Boolean({ description: 'serve the OpenAPI document and Swagger UI (default: on, off in production)' })),
  CORS_ORIGINS: Type.String({
    default: '',
    description: 'comma-separated origins browsers may call from (https://app.example), * for any, empty for none'
  }),
  HSTS_MAX_AGE: Type.Integer({
    minimum: 0,
    maximum: 63_072_000,
    default: 31_536_000,
    description: 'Strict-Transport-Security max-age in seconds on every answer (browsers heed it over HTTPS only); 0 sends none'
  })
}, { additionalProperties: false })

type Environment = Static<typeof ConfigSchema>
/** The settings, with durations in milliseconds. */
export type Config = Omit<Environment, 'CLEANUP_INTERVAL' | 'RATE_LIMIT_WINDOW' | 'DOCS'> & {
  CLEANUP_INTERVAL: number
  RATE_LIMIT_WINDOW: number
  DOCS: boolean
  /** Where /metrics is served: on the main port, or only on METRICS_HOST:METRICS_PORT. */
  METRICS_LISTENER: 'main' | 'separate'
}

/** A file or folder at the project's root, found from the sources (plugins/) or the build (dist/plugins/). */
export function projectFile (name: string): string {
  const candidates = [new URL(`../${name}`, import.meta.url), new URL(`../../${name}`, import.meta.url)].map((url) => fileURLToPath(url))
  return candidates.find((path) => existsSync(path)) ?? candidates[0]!
}

/** The service's version, from package.json (shown by /info and the OpenAPI document). */
export const VERSION = (JSON.parse(readFileSync(projectFile('package.json'), 'utf8')) as { version: string }).version

// The compose file's old development default, and the words a tutorial or a hurry would use.
const COMMON_WORDS = ['development', 'postgres', 'password', 'passwort', 'logikids', 'changeme', 'secret', 'admin',
  'qwerty', 'letmein', 'welcome', 'sync', 'test', 'root', 'database', 'default']
export const MIN_PASSWORD_LENGTH = 12

/**
 * Why a database password is too weak for production, or null when it is not: shorter than 12
 * characters, fewer than 6 different characters, or fewer than 8 characters left once common
 * words are taken out (after undoing the usual substitutions: P@ssw0rd1234, Development2024
 * and postgrespostgres are all weak).
 */
export function passwordWeakness (password: string): string | null {
  if (password.length < MIN_PASSWORD_LENGTH) return `is shorter than ${MIN_PASSWORD_LENGTH} characters`
  if (new Set(password).size < 6) return 'repeats too few different characters'
  const plain = password.toLowerCase().replace(/@/g, 'a').replace(/0/g, 'o').replace(/\$/g, 's').replace(/3/g, 'e').replace(/!/g, 'i')
  let rest = plain
  for (const word of COMMON_WORDS) rest = rest.replaceAll(word, '')
  if (rest.length < 8) return 'is mostly a well-known word'
  return null
}

/** A configuration error: one line that names the variable and what it accepts, never a secret's value. */
export class ConfigError extends Error {
  override name = 'ConfigError'
}

/** Validates the environment (process.env unless given) and returns the typed settings. */
export function loadConfig (env: Record<string, string | undefined> = process.env): Config {
  // An empty value is what `${VAR:-}` in a compose or .env file gives: it means "not set". So does
  // one of blanks only (`RATE_LIMIT_MAX= ` with a stray space), which the schema would otherwise
  // coerce to the number 0: for most numbers "off" (rate limits, kept versions, HSTS).
  const data = Object.fromEntries(Object.entries(env).filter(([, value]) => value !== undefined && value.trim() !== ''))
  let raw: Environment
  try {
    raw = envSchema<Environment>({ schema: ConfigSchema, data, env: false, dotenv: false })
  } catch (err) {
    throw new ConfigError(describeSchemaErrors(err))
  }
  const config: Config = {
    ...raw,
    CLEANUP_INTERVAL: durationMs(raw.CLEANUP_INTERVAL),
    RATE_LIMIT_WINDOW: durationMs(raw.RATE_LIMIT_WINDOW),
    DOCS: raw.DOCS ?? raw.NODE_ENV !== 'production',
    METRICS_LISTENER: raw.NODE_ENV === 'production' && raw.METRICS_TOKEN === '' ? 'separate' : 'main'
  }
  for (const name of ['CLEANUP_INTERVAL', 'RATE_LIMIT_WINDOW'] as const) {
    if (Number.isNaN(config[name])) {
      throw new ConfigError(`${name} must be a duration such as 500ms, 30s, 15m, 12h, 1d, 15 minutes or 2 days`)
    }
  }
  if (config.RATE_LIMIT_WINDOW === 0) throw new ConfigError('RATE_LIMIT_WINDOW must be longer than 0 (set RATE_LIMIT_MAX=0 to disable)')
  // HTTP drops blanks around a header's value, so such a token could never be presented.
  if (config.METRICS_TOKEN !== config.METRICS_TOKEN.trim()) throw new ConfigError('METRICS_TOKEN must not begin or end with a space or tab')
  if (config.METRICS_LISTENER === 'separate' && config.METRICS_PORT !== 0 && config.METRICS_PORT === config.PORT) {
    throw new ConfigError(`METRICS_PORT must differ from PORT (both ${config.PORT}): in production without METRICS_TOKEN, metrics have a listener of their own`)
  }
  checkTrustProxy(config.TRUST_PROXY)
  checkCorsOrigins(config.CORS_ORIGINS)
  checkTracing(config)
  const database = config.DATABASE_URL === undefined ? undefined : parseDatabaseUrl(config.DATABASE_URL)
  if (config.DATABASE_READ_URL !== undefined) {
    if (database === undefined) throw new ConfigError('DATABASE_READ_URL needs DATABASE_URL: a replica of the embedded database cannot exist')
    parseDatabaseUrl(config.DATABASE_READ_URL, 'DATABASE_READ_URL')
  }
  if (config.NODE_ENV === 'production') {
    if (database === undefined) {
      throw new ConfigError('DATABASE_URL is required with NODE_ENV=production: set DATABASE_URL=postgres://user:password@host:5432/database ' +
        '(the embedded database that runs without it is for development only)')
    }
    // A password in the URL wins over PGPASSWORD, as in pg. Without either, authentication is
    // by ~/.pgpass, a client certificate or the Unix socket's peer check: nothing to judge here.
    const [password, source] = database.password ? [database.password, 'DATABASE_URL'] : [env.PGPASSWORD ?? '', 'PGPASSWORD']
    const weakness = password === '' ? null : passwordWeakness(password)
    if (weakness !== null) {
      throw new ConfigError(`the database password in ${source} ${weakness}, which NODE_ENV=production refuses: ` +
        `set a random POSTGRES_PASSWORD (Docker Compose) or password of at least ${MIN_PASSWORD_LENGTH} characters`)
    }
  }
  return config
}

function parseDatabaseUrl (url: string, name = 'DATABASE_URL'): { password: string } {
  let parsed: URL
  try {
    parsed = new URL(url)
  } catch {
    throw new ConfigError(`${name} is not a valid connection string: use postgres://user:password@host:5432/database`)
  }
  try {
    return { password: decodeURIComponent(parsed.password) }
  } catch {
    throw new ConfigError(`${name} has a password that is not percent-encoded: write % as %25 ` +
      '(and @ : / ? # as %40 %3A %2F %3F %23)')
  }
}

function checkTrustProxy (setting: string): void {
  if (setting === '') return
  const entries = trustedProxies(setting)
  // A bare hop count, or "true", would let any client choose its own address by sending X-Forwarded-For.
  const valid = entries.every((entry) => entry !== '' && !/^(true|false|[0-9]+)$/i.test(entry)) && (() => {
    try {
      proxyAddr.compile(entries)
      return true
    } catch {
      return false
    }
  })()
  if (!valid) {
    throw new ConfigError('TRUST_PROXY must be a comma-separated list of proxy addresses or CIDRs (10.0.0.0/8, ::1) ' +
      'or the names loopback, linklocal, uniquelocal')
  }
}

/** TRUST_PROXY as a list of addresses, CIDRs and names (empty: no proxy is trusted). */
export function trustedProxies (setting: string): string[] {
  return setting === '' ? [] : setting.split(',').map((entry) => entry.trim())
}

// Headers the exporter's HTTP request sets itself: one from the environment would break or redirect it.
const RESERVED_HEADERS = new Set(['host', 'content-length', 'content-type', 'content-encoding', 'transfer-encoding', 'connection', 'expect'])
const HEADER_NAME = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/
// A value Node sends as it is: visible Latin-1 characters, spaces and tabs.
const HEADER_VALUE = /^[\t\x20-\x7e\x80-\xff]*$/

/**
 * OTEL_EXPORTER_OTLP_HEADERS as the OpenTelemetry specification writes them (name=value pairs,
 * comma-separated, percent-encoded), refused with a line that repeats none of them: they are
 * often a collector's credentials.
 */
export function collectorHeaders (list: string): Record<string, string> {
  const headers: Record<string, string> = {}
  if (list === '') return headers
  list.split(',').forEach((entry, i) => {
    const at = entry.indexOf('=')
    const decoded = ((): [string, string] | null => {
      try {
        return [decodeURIComponent(entry.slice(0, at).trim()), decodeURIComponent(entry.slice(at + 1).trim())]
      } catch {
        return null
      }
    })()
    if (at <= 0 || decoded === null || !HEADER_NAME.test(decoded[0]) || !HEADER_VALUE.test(decoded[1]) ||
      RESERVED_HEADERS.has(decoded[0].toLowerCase()) || Object.keys(headers).some((name) => name.toLowerCase() === decoded[0].toLowerCase())) {
      throw new ConfigError('OTEL_EXPORTER_OTLP_HEADERS must be name=value pairs separated by commas, values percent-encoded, ' +
        `each name once, and no header the request sets itself (${[...RESERVED_HEADERS].join(', ')}): entry ${i + 1} is not`)
    }
    headers[decoded[0]] = decoded[1]
  })
  return headers
}

/** The tracing settings, beyond their types; never echoing a value (the endpoint and headers can hold credentials). */
function checkTracing (config: Pick<Config, 'OTEL_EXPORTER_OTLP_ENDPOINT' | 'OTEL_EXPORTER_OTLP_HEADERS' | 'OTEL_TRACES_SAMPLER_ARG'>): void {
  const endpoint = config.OTEL_EXPORTER_OTLP_ENDPOINT
  if (endpoint !== '') {
    let url: URL | undefined
    try {
      url = new URL(endpoint)
    } catch {}
    if (url === undefined || !['http:', 'https:'].includes(url.protocol) || url.hostname === '' || /[\s?#]/.test(endpoint) ||
      /\/v1\/traces\/*$/.test(url.pathname)) {
      throw new ConfigError('OTEL_EXPORTER_OTLP_ENDPOINT must be an http:// or https:// URL of an OTLP/HTTP collector without a query or fragment, ' +
        'such as http://otel-collector:4318 (spans go to its /v1/traces, which the setting leaves out)')
    }
  }
  collectorHeaders(config.OTEL_EXPORTER_OTLP_HEADERS)
  if (!Number.isFinite(config.OTEL_TRACES_SAMPLER_ARG)) throw new ConfigError('OTEL_TRACES_SAMPLER_ARG must be a number from 0 to 1')
}

function checkCorsOrigins (setting: string): void {
  for (const origin of setting.split(',').map((entry) => entry.trim().replace(/\/+$/, '')).filter((entry) => entry !== '')) {
    if (origin === '*') continue
    let url: URL | undefined
    try {
      url = new URL(origin)
    } catch {}
    if (url === undefined || !['http:', 'https:'].includes(url.protocol) || url.origin !== origin) {
      throw new ConfigError('CORS_ORIGINS must list origins such as https://app.example or http://localhost:5173 ' +
        `(scheme, host and port only), or *; "${origin.slice(0, 100)}" is not one`)
    }
  }
}

/** env-schema's Ajv errors as one line: each variable, what it must be, and what it may be. */
function describeSchemaErrors (err: unknown): string {
  const errors = (err as { errors?: Array<{ instancePath: string, keyword: string, message?: string, params: Record<string, unknown> }> }).errors
  if (!Array.isArray(errors) || errors.length === 0) return (err as Error).message.replace(/\s+/g, ' ')
  const lines = new Map<string, string>()
  for (const error of errors) {
    const name = error.instancePath.replace(/^\//, '') || String(error.params.missingProperty ?? error.params.additionalProperty ?? 'environment')
    if (lines.has(name)) continue
    const schema = (ConfigSchema.properties as Record<string, { description?: string }>)[name]
    let rule = error.message ?? 'is invalid'
    if (error.keyword === 'enum') {
      rule = `must be one of ${(error.params.allowedValues as string[]).join(', ')}`
    } else if (error.keyword === 'pattern') {
      rule = name === 'DATABASE_URL' ? 'must start with postgres:// or postgresql://' : 'has the wrong form'
    }
    lines.set(name, `${name} ${rule}${schema?.description !== undefined && error.keyword !== 'enum' ? ` (${schema.description})` : ''}`)
  }
  return [...lines.values()].join('; ')
}

declare module 'fastify' {
  interface FastifyInstance {
    config: Config
  }
}

export default fp(async function config (app, opts: { config: Config }) {
  app.decorate('config', opts.config)
}, { name: 'config' })
