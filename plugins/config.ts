import { existsSync, readFileSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import fp from 'fastify-plugin'
import { envSchema } from 'env-schema'
import { Type, type Static } from '@sinclair/typebox'

const Milliseconds = (defaultValue: number, description: string) =>
  Type.Integer({ minimum: 1, maximum: 600_000, default: defaultValue, description })

const Duration = (defaultValue: string, description: string) =>
  Type.String({ pattern: '^[0-9]+(ms|s|m|h|d)?$', default: defaultValue, description })

const PROXY = '([0-9A-Fa-f]*[.:][0-9A-Fa-f:.]*(/[0-9]{1,3})?|loopback|linklocal|uniquelocal)'

const UNIT_MS: Record<string, number> = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000, d: 86_400_000 }

/** Milliseconds of a duration such as 1d, 12h, 15m, 30s, 500ms (a bare number is milliseconds). */
export function durationMs (value: string): number {
  const [, amount, unit] = /^([0-9]+)(ms|s|m|h|d)?$/.exec(value) ?? []
  return Number(amount) * UNIT_MS[unit ?? 'ms']!
}

export const ConfigSchema = Type.Object({
  NODE_ENV: Type.Union(
    [Type.Literal('development'), Type.Literal('production'), Type.Literal('test')],
    { default: 'development' }
  ),
  DATABASE_URL: Type.Optional(Type.String({
    pattern: '^postgres(ql)?://',
    description: 'postgres://user:password@host:port/database; without it (development only) an embedded database runs'
  })),
  EMBEDDED_DATA_DIR: Type.String({ minLength: 1, default: './data', description: 'where the embedded database keeps its files' }),
  PORT: Type.Integer({ minimum: 0, maximum: 65535, default: 3000 }),
  HOST: Type.String({ minLength: 1, default: '0.0.0.0' }),
  LOG_LEVEL: Type.Union(
    ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'].map((level) => Type.Literal(level)),
    { default: 'info' }
  ),
  DATABASE_POOL_MAX: Type.Integer({ minimum: 1, maximum: 1000, default: 10 }),
  DATABASE_PREPARED_STATEMENTS: Type.Boolean({
    default: true,
    description: 'prepare each statement once per connection; false behind a pooler that cannot (PgBouncer in transaction mode before 1.21)'
  }),
  DATABASE_MAX_WAITING: Type.Integer({
    minimum: 1, maximum: 100_000, default: 100,
    description: 'requests that may wait for a pooled connection; beyond that a request gets a 503 at once'
  }),
  DATABASE_CONNECT_TIMEOUT_MS: Milliseconds(2_000, 'how long a request waits for a pooled connection before a 503'),
  DATABASE_STATEMENT_TIMEOUT_MS: Milliseconds(5_000, 'longest a single SQL statement may run'),
  HEALTH_TIMEOUT_MS: Milliseconds(2_000, 'how long /health waits for SELECT 1'),
  REQUEST_TIMEOUT_MS: Milliseconds(30_000, 'how long a client may take to send a whole request (headers: at most 10 s of it)'),
  MAX_EVENT_LOOP_DELAY_MS: Type.Integer({
    minimum: 0, maximum: 600_000, default: 1000,
    description: 'above this event-loop delay requests get a 503 (load shedding); 0 disables'
  }),
  CLEANUP_INACTIVE_DAYS: Type.Integer({
    minimum: 0, maximum: 36_500, default: 730, description: 'delete accounts not accessed for this many days; 0 disables'
  }),
  CLEANUP_INTERVAL: Duration('1d', 'how often the cleanup runs (e.g. 1d, 12h); 0 disables'),
  RATE_LIMIT_MAX: Type.Integer({ minimum: 0, default: 100, description: 'requests per user id per window; 0 disables' }),
  RATE_LIMIT_IP_MAX: Type.Integer({ minimum: 0, default: 2000, description: 'requests per client IP per window; 0 disables' }),
  RATE_LIMIT_WINDOW: Duration('1h', 'the rate-limit window (e.g. 1h, 15m)'),
  TRUST_PROXY: Type.String({
    default: '',
    // Addresses or CIDRs only (or proxy-addr's names): a bare hop count, or "true", would let
    // any client choose its own address by sending X-Forwarded-For.
    pattern: `^$|^${PROXY}(\\s*,\\s*${PROXY})*$`,
    description: 'addresses or CIDRs of the reverse proxies whose X-Forwarded-For is believed, comma-separated'
  }),
  METRICS_TOKEN: Type.String({ default: '', description: 'when set, GET /metrics needs Authorization: Bearer <token>' }),
  CORS_ORIGINS: Type.String({
    default: '',
    description: 'comma-separated origins browsers may call from (https://app.example), * for any, empty for none'
  })
}, { additionalProperties: false })

type Environment = Static<typeof ConfigSchema>
/** The settings, with durations in milliseconds. */
export type Config = Omit<Environment, 'CLEANUP_INTERVAL' | 'RATE_LIMIT_WINDOW'> & {
  CLEANUP_INTERVAL: number
  RATE_LIMIT_WINDOW: number
}

/** A file or folder at the project's root, found from the sources (plugins/) or the build (dist/plugins/). */
export function projectFile (name: string): string {
  const candidates = [new URL(`../${name}`, import.meta.url), new URL(`../../${name}`, import.meta.url)].map((url) => fileURLToPath(url))
  return candidates.find((path) => existsSync(path)) ?? candidates[0]!
}

/** The service's version, from package.json (shown by /info and the OpenAPI document). */
export const VERSION = (JSON.parse(readFileSync(projectFile('package.json'), 'utf8')) as { version: string }).version

// The compose file's development default, and the passwords a tutorial would use.
const WEAK_PASSWORDS = new Set(['', 'development', 'postgres', 'password', 'logikids', 'changeme'])

/** Validates the environment (process.env unless given) and returns the typed settings. */
export function loadConfig (env: Record<string, string | undefined> = process.env): Config {
  const raw = envSchema<Environment>({ schema: ConfigSchema, data: env, env: false, dotenv: false })
  const config: Config = {
    ...raw,
    CLEANUP_INTERVAL: durationMs(raw.CLEANUP_INTERVAL),
    RATE_LIMIT_WINDOW: durationMs(raw.RATE_LIMIT_WINDOW)
  }
  if (config.RATE_LIMIT_WINDOW === 0) throw new Error('env/RATE_LIMIT_WINDOW must be longer than 0 (set RATE_LIMIT_MAX=0 to disable)')
  if (config.NODE_ENV === 'production') {
    if (config.DATABASE_URL === undefined) {
      throw new Error('env/DATABASE_URL is required with NODE_ENV=production: set DATABASE_URL=postgres://user:password@host:5432/database ' +
        '(the embedded database that runs without it is for development only)')
    }
    const password = decodeURIComponent(new URL(config.DATABASE_URL).password)
    if (WEAK_PASSWORDS.has(password)) {
      throw new Error('env/DATABASE_URL has no password or a development one, which NODE_ENV=production refuses: ' +
        'set a strong POSTGRES_PASSWORD (Docker Compose) or a strong password in DATABASE_URL')
    }
  }
  return config
}

declare module 'fastify' {
  interface FastifyInstance {
    config: Config
  }
}

export default fp(async function config (app, opts: { config: Config }) {
  app.decorate('config', opts.config)
}, { name: 'config' })
