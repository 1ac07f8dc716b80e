import t from 'tap'
import { ConfigSchema, loadConfig } from '../../plugins/config.ts'

const DATABASE_URL = 'postgres://logikids@db.example:5432/logikids'
const STRONG = 'x7Gq2vLp9Rt4Wm8Kz3Nb'
const PRODUCTION = { NODE_ENV: 'production', DATABASE_URL: `postgres://logikids:${STRONG}@db:5432/logikids` }
const LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']

/** The message loadConfig refuses `env` with (the server prints it after "invalid configuration: "). */
function refusal (env: Record<string, string>): string {
  try {
    loadConfig(env)
  } catch (err) {
    return (err as Error).message
  }
  throw new Error(`accepted ${JSON.stringify(env)}`)
}

t.test('production refuses a weak database password, in DATABASE_URL or in PGPASSWORD', async (t) => {
  for (const password of ['Password', 'Tr0ub4dor', 'development', 'postgres', 'password', 'logikids', 'changeme',
    // long enough, but a common word with a few characters around it, or repeated
    'password1234', 'Development2024', 'postgrespostgres', 'P@ssw0rd1234', 'aaaaaaaaaaaaaaaa']) {
    t.throws(() => loadConfig({ NODE_ENV: 'production', DATABASE_URL: `postgres://logikids:${password}@db:5432/logikids` }),
      { message: /DATABASE_URL/ }, `${password} in DATABASE_URL`)
    t.throws(() => loadConfig({ NODE_ENV: 'production', DATABASE_URL: 'postgres://logikids@db:5432/logikids', PGPASSWORD: password }),
      { message: /PGPASSWORD/ }, `${password} in PGPASSWORD`)
  }
})

t.test('the refusal of a weak password does not repeat the password', async (t) => {
  // Passwords no explanation would contain by chance (unlike "password" or "postgres").
  for (const password of ['Tr0ub4dor', 'qZ8-kL2w']) {
    const inUrl = refusal({ NODE_ENV: 'production', DATABASE_URL: `postgres://logikids:${password}@db:5432/logikids` })
    t.notOk(inUrl.includes(password), `DATABASE_URL refusal: ${inUrl}`)
    const inEnv = refusal({ NODE_ENV: 'production', DATABASE_URL: 'postgres://logikids@db:5432/logikids', PGPASSWORD: password })
    t.notOk(inEnv.includes(password), `PGPASSWORD refusal: ${inEnv}`)
  }
})

t.test('production accepts a long random password, in DATABASE_URL or in PGPASSWORD', async (t) => {
  t.equal(loadConfig(PRODUCTION).NODE_ENV, 'production')
  for (const password of ['correct-horse-battery', 'Xq7-v9-long-random', 'changeme-now-please-ok']) {
    t.equal(loadConfig({ NODE_ENV: 'production', DATABASE_URL: `postgres://logikids:${password}@db:5432/logikids` }).NODE_ENV,
      'production', `${password}: long, and more than a common word`)
  }
  t.equal(loadConfig({ NODE_ENV: 'production', DATABASE_URL: 'postgres://logikids@db:5432/logikids', PGPASSWORD: STRONG }).NODE_ENV,
    'production')
})

t.test('production: METRICS_PORT must differ from PORT when metrics have a listener of their own', async (t) => {
  t.match(refusal({ ...PRODUCTION, PORT: '9464' }), /METRICS_PORT must differ from PORT/)
  t.equal(loadConfig({ ...PRODUCTION, PORT: '9464', METRICS_TOKEN: 'a-long-scrape-token' }).PORT, 9464, 'with a token there is no second listener')
})

t.test('production accepts no password at all (pgpass, client certificates, peer authentication)', async (t) => {
  for (const url of [
    'postgres://logikids@db:5432/logikids',
    'postgresql:///logikids?host=/var/run/postgresql',
    'postgres://logikids@db:5432/logikids?sslmode=verify-full&sslcert=/run/secrets/client.crt&sslkey=/run/secrets/client.key'
  ]) {
    t.equal(loadConfig({ NODE_ENV: 'production', DATABASE_URL: url }).DATABASE_URL, url, url)
  }
  t.equal(loadConfig({ NODE_ENV: 'production', DATABASE_URL: 'postgres://logikids@db:5432/logikids', PGPASSWORD: '' }).NODE_ENV,
    'production', 'an empty PGPASSWORD is no password')
})

t.test('development keeps accepting the development passwords', async (t) => {
  t.doesNotThrow(() => loadConfig({ DATABASE_URL: 'postgres://logikids@db:5432/logikids', PGPASSWORD: 'development' }))
  t.doesNotThrow(() => loadConfig({ DATABASE_URL: 'postgres://logikids:development@db:5432/logikids' }))
})

t.test('a malformed DATABASE_URL is refused by name, without its password', async (t) => {
  for (const env of [
    { NODE_ENV: 'production', DATABASE_URL: 'postgres://u:p%zz@h/db' },
    { NODE_ENV: 'production', DATABASE_URL: 'postgres://u:hunter2-Secret%zz@h/db' },
    { NODE_ENV: 'development', DATABASE_URL: 'postgres://u:hunter2-Secret%zz@h/db' }
  ]) {
    const message = refusal(env)
    t.match(message, /DATABASE_URL/, JSON.stringify(env))
    t.not(message, 'URI malformed')
    t.notOk(message.includes('p%zz') || message.includes('hunter2'), `no password in: ${message}`)
    t.notOk(message.includes('\n'), 'one line')
  }
})

t.test('an empty setting means unset, for every setting', async (t) => {
  const config = loadConfig({ DATABASE_URL: '', PORT: '', LOG_LEVEL: '', CLEANUP_INTERVAL: '', TRUST_PROXY: '', CORS_ORIGINS: '', METRICS_TOKEN: '' })
  t.equal(config.DATABASE_URL, undefined)
  t.match(config, { PORT: 3000, LOG_LEVEL: 'info', CLEANUP_INTERVAL: 86_400_000, TRUST_PROXY: '', CORS_ORIGINS: '', METRICS_TOKEN: '' })

  const everyEmpty = Object.fromEntries(Object.keys(ConfigSchema.properties).map((name) => [name, '']))
  t.strictSame(loadConfig(everyEmpty), loadConfig({}), 'every setting empty is the defaults')
  t.throws(() => loadConfig({ NODE_ENV: 'production', DATABASE_URL: '' }), { message: /DATABASE_URL is required/ },
    'production: an empty DATABASE_URL is a missing one')
})

t.test('a setting of blanks only means unset too: never the number 0, which switches rate limits, kept versions and HSTS off', async (t) => {
  const blanks = [' ', '\t', '\n', '  \t ']
  const everyBlank = Object.fromEntries(Object.keys(ConfigSchema.properties).map((name, i) => [name, blanks[i % blanks.length]!]))
  t.strictSame(loadConfig(everyBlank), loadConfig({}), 'every setting blank is the defaults')
  t.match(loadConfig({ RATE_LIMIT_MAX: ' ', RATE_LIMIT_IP_MAX: '\t', HISTORY_VERSIONS: ' ', HSTS_MAX_AGE: '\n', PORT: ' ' }),
    { RATE_LIMIT_MAX: 100, RATE_LIMIT_IP_MAX: 2000, HISTORY_VERSIONS: 10, HSTS_MAX_AGE: 31_536_000, PORT: 3000 })
})

t.test('durations: short units and the words @fastify/rate-limit documents', async (t) => {
  const cases: Array<[string, number]> = [
    ['1m', 60_000], ['15m', 900_000], ['1h', 3_600_000], ['1d', 86_400_000], ['30s', 30_000], ['500ms', 500],
    ['1 minute', 60_000], ['15 minutes', 900_000], ['1 hour', 3_600_000], ['2 days', 172_800_000]
  ]
  for (const [text, ms] of cases) {
    t.equal(loadConfig({ DATABASE_URL, RATE_LIMIT_WINDOW: text }).RATE_LIMIT_WINDOW, ms, `RATE_LIMIT_WINDOW=${text}`)
    t.equal(loadConfig({ DATABASE_URL, CLEANUP_INTERVAL: text }).CLEANUP_INTERVAL, ms, `CLEANUP_INTERVAL=${text}`)
  }
})

t.test('a duration that is not one is refused by name', async (t) => {
  for (const text of ['soon', '-5m', '1 fortnight']) {
    for (const name of ['RATE_LIMIT_WINDOW', 'CLEANUP_INTERVAL']) {
      const message = refusal({ DATABASE_URL, [name]: text })
      t.match(message, new RegExp(name), `${name}=${text}`)
      t.notOk(message.includes('\n'), `one line: ${message}`)
    }
  }
})

t.test('LOG_LEVEL=verbose: one line naming LOG_LEVEL and every allowed level', async (t) => {
  const message = refusal({ DATABASE_URL, LOG_LEVEL: 'verbose' })
  t.notOk(message.includes('\n'), message)
  t.match(message, /LOG_LEVEL/)
  for (const level of LEVELS) t.match(message, new RegExp(`\\b${level}\\b`), `lists ${level}`)
})

t.test('TRUST_PROXY with an impossible CIDR is a configuration error naming it', async (t) => {
  let thrown: unknown
  try {
    loadConfig({ DATABASE_URL, TRUST_PROXY: '10.0.0.0/33' })
  } catch (err) {
    thrown = err
  }
  t.ok(thrown instanceof Error, 'refused at start-up')
  t.notOk(thrown instanceof TypeError, 'a configuration error, not a TypeError from the proxy parser')
  t.match((thrown as Error | undefined)?.message, /TRUST_PROXY/)
  t.notOk((thrown as Error | undefined)?.message.includes('\n'))
})

t.test('CORS_ORIGINS needs origins with a scheme, or *', async (t) => {
  const message = refusal({ DATABASE_URL, CORS_ORIGINS: 'app.example' })
  t.match(message, /CORS_ORIGINS/)
  t.notOk(message.includes('\n'), message)
  t.equal(loadConfig({ DATABASE_URL, CORS_ORIGINS: 'https://app.example' }).CORS_ORIGINS, 'https://app.example')
  t.equal(loadConfig({ DATABASE_URL, CORS_ORIGINS: '*' }).CORS_ORIGINS, '*')
})

t.test('a bad PORT names PORT, on one line', async (t) => {
  const message = refusal({ DATABASE_URL, PORT: 'abc' })
  t.match(message, /PORT/)
  t.notOk(message.includes('\n'), message)
})

t.test('every refusal is one line', async (t) => {
  for (const env of [
    { DATABASE_URL: 'mysql://x@y/z' }, { DATABASE_URL, NODE_ENV: 'staging' }, { DATABASE_URL, DATABASE_POOL_MAX: '0' },
    { DATABASE_URL, LOG_LEVEL: 'verbose' }, { DATABASE_URL, TRUST_PROXY: 'true' }, { DATABASE_URL, CLEANUP_INTERVAL: 'soon' },
    { DATABASE_URL, RATE_LIMIT_WINDOW: '0' }, { NODE_ENV: 'production' },
    { NODE_ENV: 'production', DATABASE_URL: 'postgres://logikids:changeme@db/logikids' }
  ]) {
    let message = ''
    try {
      loadConfig(env)
    } catch (err) {
      message = (err as Error).message
    }
    t.ok(message !== '' && !message.includes('\n'), `${JSON.stringify(env)}: ${message}`)
  }
})

t.test('new settings and their defaults', async (t) => {
  t.match(loadConfig({ DATABASE_URL }), {
    MAX_CONNECTIONS: 1024,
    RATE_LIMIT_CACHE_KEYS: 100_000,
    METRICS_PORT: 9464,
    METRICS_HOST: '127.0.0.1',
    DOCS: true
  })
  t.match(loadConfig({ DATABASE_URL, NODE_ENV: 'test' }), { DOCS: true })
  t.match(loadConfig(PRODUCTION), { DOCS: false }, 'no API documentation in production by default')
  t.match(loadConfig({ ...PRODUCTION, DOCS: 'true' }), { DOCS: true }, 'unless asked for')
  t.match(loadConfig({ DATABASE_URL, DOCS: 'false' }), { DOCS: false })
  t.match(loadConfig({ DATABASE_URL, MAX_CONNECTIONS: '50', RATE_LIMIT_CACHE_KEYS: '5000', METRICS_PORT: '9100', METRICS_HOST: '0.0.0.0' }),
    { MAX_CONNECTIONS: 50, RATE_LIMIT_CACHE_KEYS: 5000, METRICS_PORT: 9100, METRICS_HOST: '0.0.0.0' })
  for (const value of ['0', '1.5', 'many']) {
    t.match(refusal({ DATABASE_URL, MAX_CONNECTIONS: value }), /MAX_CONNECTIONS/, `MAX_CONNECTIONS=${value}`)
  }
  t.match(refusal({ DATABASE_URL, METRICS_PORT: '70000' }), /METRICS_PORT/)
})
