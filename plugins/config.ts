import fp from 'fastify-plugin'
import { envSchema } from 'env-schema'
import { Type, type Static } from '@sinclair/typebox'

const Milliseconds = (defaultValue: number, description: string) =>
  Type.Integer({ minimum: 1, maximum: 600_000, default: defaultValue, description })

export const ConfigSchema = Type.Object({
  NODE_ENV: Type.Union(
    [Type.Literal('development'), Type.Literal('production'), Type.Literal('test')],
    { default: 'development' }
  ),
  DATABASE_URL: Type.String({
    pattern: '^postgres(ql)?://',
    description: 'postgres://user:password@host:port/database'
  }),
  PORT: Type.Integer({ minimum: 0, maximum: 65535, default: 3000 }),
  HOST: Type.String({ minLength: 1, default: '0.0.0.0' }),
  LOG_LEVEL: Type.Union(
    ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'].map((level) => Type.Literal(level)),
    { default: 'info' }
  ),
  DATABASE_POOL_MAX: Type.Integer({ minimum: 1, maximum: 1000, default: 10 }),
  DATABASE_CONNECT_TIMEOUT_MS: Milliseconds(2_000, 'how long a request waits for a pooled connection before a 503'),
  DATABASE_STATEMENT_TIMEOUT_MS: Milliseconds(5_000, 'longest a single SQL statement may run'),
  HEALTH_TIMEOUT_MS: Milliseconds(2_000, 'how long /health waits for SELECT 1'),
  CORS_ORIGINS: Type.String({
    default: '',
    description: 'comma-separated origins browsers may call from (https://app.example), * for any, empty for none'
  })
}, { additionalProperties: false })

export type Config = Static<typeof ConfigSchema>

// The compose file's development default, and the passwords a tutorial would use.
const WEAK_PASSWORDS = new Set(['', 'development', 'postgres', 'password', 'logikids', 'changeme'])

/** Validates the environment (process.env unless given) and returns the typed settings. */
export function loadConfig (env: Record<string, string | undefined> = process.env): Config {
  const config = envSchema<Config>({ schema: ConfigSchema, data: env, env: false, dotenv: false })
  if (config.NODE_ENV === 'production') {
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
