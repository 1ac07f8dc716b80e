import t from 'tap'
import { loadConfig } from '../../plugins/config.ts'
import { preparedStatements } from '../../plugins/db.ts'

const DATABASE_URL = 'postgres://logikids@db.example:5432/logikids'

t.test('defaults', async (t) => {
  const config = loadConfig({ DATABASE_URL })
  t.match(config, {
    NODE_ENV: 'development',
    DATABASE_URL,
    PORT: 3000,
    HOST: '0.0.0.0',
    LOG_LEVEL: 'info',
    DATABASE_POOL_MAX: 10,
    DATABASE_CONNECT_TIMEOUT_MS: 2000,
    DATABASE_STATEMENT_TIMEOUT_MS: 5000,
    HEALTH_TIMEOUT_MS: 2000
  })
})

t.test('values from the environment are parsed into numbers', async (t) => {
  const config = loadConfig({ DATABASE_URL, PORT: '8080', DATABASE_POOL_MAX: '25', LOG_LEVEL: 'debug' })
  t.equal(config.PORT, 8080)
  t.equal(config.DATABASE_POOL_MAX, 25)
  t.equal(config.LOG_LEVEL, 'debug')
})

t.test('only the service settings are kept, not the whole environment', async (t) => {
  const config = loadConfig({ DATABASE_URL, PATH: '/usr/bin', AWS_SECRET: 'x' })
  t.notOk('PATH' in config)
  t.notOk('AWS_SECRET' in config)
})

t.test('bad settings are refused with a message naming them', async (t) => {
  const cases: Array<[Record<string, string>, RegExp]> = [
    [{ DATABASE_URL: 'mysql://x@y/z' }, /DATABASE_URL/],
    [{ DATABASE_URL, PORT: 'eighty' }, /PORT/],
    [{ DATABASE_URL, PORT: '70000' }, /PORT/],
    [{ DATABASE_URL, LOG_LEVEL: 'loud' }, /LOG_LEVEL/],
    [{ DATABASE_URL, DATABASE_POOL_MAX: '0' }, /DATABASE_POOL_MAX/],
    [{ DATABASE_URL, NODE_ENV: 'staging' }, /NODE_ENV/],
    [{ DATABASE_URL, DATABASE_CONNECT_TIMEOUT_MS: '-1' }, /DATABASE_CONNECT_TIMEOUT_MS/],
    [{ DATABASE_URL, TRUST_PROXY: '1' }, /TRUST_PROXY/],
    [{ DATABASE_URL, TRUST_PROXY: 'true' }, /TRUST_PROXY/],
    [{ DATABASE_URL, CLEANUP_INTERVAL: 'daily' }, /CLEANUP_INTERVAL/],
    [{ DATABASE_URL, RATE_LIMIT_WINDOW: '0' }, /RATE_LIMIT_WINDOW/],
    [{ DATABASE_URL, RATE_LIMIT_MAX: '-1' }, /RATE_LIMIT_MAX/]
  ]
  for (const [env, message] of cases) {
    t.throws(() => loadConfig(env), { message }, JSON.stringify(env))
  }
})

t.test('production refuses a weak database password, and accepts authentication without one', async (t) => {
  for (const url of ['postgres://logikids:development@db/logikids', 'postgresql://logikids:postgres@db:5432/logikids',
    'postgres://logikids:Password@db/logikids']) {
    t.throws(() => loadConfig({ NODE_ENV: 'production', DATABASE_URL: url }), { message: /password in DATABASE_URL/ }, url)
    t.doesNotThrow(() => loadConfig({ NODE_ENV: 'development', DATABASE_URL: url }), `development accepts ${url}`)
  }
  const strong = loadConfig({ NODE_ENV: 'production', DATABASE_URL: 'postgres://logikids:Xq7%2Fv9-long-random@db/logikids' })
  t.equal(strong.NODE_ENV, 'production')
  t.doesNotThrow(() => loadConfig({ NODE_ENV: 'production', DATABASE_URL: 'postgres://logikids@db/logikids' }),
    'no password: ~/.pgpass, a client certificate or peer authentication')
})

t.test('DATABASE_POOLER: prepared statements follow it unless set', async (t) => {
  const prepared = (env: Record<string, string>) => preparedStatements(loadConfig({ DATABASE_URL, ...env }))
  t.equal(loadConfig({ DATABASE_URL }).DATABASE_POOLER, 'none')
  t.equal(prepared({}), true, 'directly: named statements')
  t.equal(prepared({ DATABASE_POOLER: 'transaction' }), false, 'behind a transaction-mode pooler: unnamed')
  t.equal(prepared({ DATABASE_POOLER: 'transaction', DATABASE_PREPARED_STATEMENTS: 'true' }), true, 'unless told the pooler keeps them')
  t.equal(prepared({ DATABASE_PREPARED_STATEMENTS: 'false' }), false)
  t.equal(prepared({ DATABASE_PREPARED_STATEMENTS: '' }), true, 'empty is unset')
  t.throws(() => loadConfig({ DATABASE_URL, DATABASE_POOLER: 'session' }), /DATABASE_POOLER must be one of none, transaction/)
})

t.test('without DATABASE_URL (development): the embedded database in ./data', async (t) => {
  const config = loadConfig({})
  t.equal(config.DATABASE_URL, undefined)
  t.equal(config.EMBEDDED_DATA_DIR, './data')
})

t.test('durations, proxies and switches', async (t) => {
  const config = loadConfig({
    DATABASE_URL,
    CLEANUP_INTERVAL: '12h',
    RATE_LIMIT_WINDOW: '15m',
    TRUST_PROXY: '10.0.0.0/8, 172.16.0.1, ::1, loopback',
    DATABASE_PREPARED_STATEMENTS: 'false'
  })
  t.equal(config.CLEANUP_INTERVAL, 12 * 3_600_000)
  t.equal(config.RATE_LIMIT_WINDOW, 15 * 60_000)
  t.equal(config.TRUST_PROXY, '10.0.0.0/8, 172.16.0.1, ::1, loopback')
  t.equal(config.DATABASE_PREPARED_STATEMENTS, false)
  t.match(loadConfig({ DATABASE_URL }), { CLEANUP_INTERVAL: 86_400_000, RATE_LIMIT_WINDOW: 3_600_000, CLEANUP_INACTIVE_DAYS: 730, RATE_LIMIT_MAX: 100 })
  t.equal(loadConfig({ DATABASE_URL, CLEANUP_INTERVAL: '0' }).CLEANUP_INTERVAL, 0)
})

t.test('METRICS_TOKEN with a blank at either end is refused: HTTP drops it, so no scrape could match', async (t) => {
  for (const token of [' s3cret-token', 's3cret-token ', 's3cret-token\t']) {
    t.throws(() => loadConfig({ DATABASE_URL, METRICS_TOKEN: token }), { message: /^METRICS_TOKEN must not begin or end with a space or tab$/ }, JSON.stringify(token))
  }
  t.equal(loadConfig({ DATABASE_URL, METRICS_TOKEN: 'with inner space' }).METRICS_TOKEN, 'with inner space')
})

t.test('tracing settings: a collector URL, headers and a ratio, refused with a line that repeats no secret', async (t) => {
  const accepted = loadConfig({ DATABASE_URL, OTEL_EXPORTER_OTLP_ENDPOINT: 'HTTPS://user:pw@collector.example:4318/base', OTEL_EXPORTER_OTLP_HEADERS: 'authorization=Bearer%20abc,x-tenant=kids', OTEL_TRACES_SAMPLER_ARG: '0.25' })
  t.equal(accepted.OTEL_TRACES_SAMPLER_ARG, 0.25)
  for (const endpoint of ['ftp://x', 'http://', 'http:///', 'localhost:4318', 'http://x:99999', 'http://[::1', 'http://%zz', 'http://h:1?a=secret-query', 'http://h:1/#frag', 'http://h:1/path?', 'http://h:1/#', 'http://h :1', 'http://h:4318/v1/traces']) {
    t.throws(() => loadConfig({ DATABASE_URL, OTEL_EXPORTER_OTLP_ENDPOINT: endpoint }), { message: /^OTEL_EXPORTER_OTLP_ENDPOINT must be an http:\/\/ or https:\/\/ URL/ }, endpoint)
  }
  for (const headers of ['authorization=Bearer%ZZsecret-value', 'my header=secret-value', 'x=secret-value%0A', 'content-length=5', 'Host=evil.example', 'novalue', '=secret-value', 'x=secret-value%E2%82%AC', 'expect=100-continue', 'x-a=1,X-A=secret-value']) {
    const error = (() => {
      try {
        loadConfig({ DATABASE_URL, OTEL_EXPORTER_OTLP_HEADERS: headers })
      } catch (err) {
        return err as Error
      }
      return null
    })()
    t.match(error?.message, /^OTEL_EXPORTER_OTLP_HEADERS must be name=value pairs/, headers)
    t.notMatch(error?.message, /secret-value|evil/, 'without repeating the value')
  }
  for (const ratio of ['2', '-0.1', 'abc', 'Infinity', '1e999']) {
    t.throws(() => loadConfig({ DATABASE_URL, OTEL_TRACES_SAMPLER_ARG: ratio }), { message: /OTEL_TRACES_SAMPLER_ARG must/ }, ratio)
  }
})

t.test('HSTS_MAX_AGE: seconds from 0 (none) to two years, anything else refused by name', async (t) => {
  t.equal(loadConfig({ DATABASE_URL }).HSTS_MAX_AGE, 31_536_000)
  t.equal(loadConfig({ DATABASE_URL, HSTS_MAX_AGE: '0' }).HSTS_MAX_AGE, 0)
  t.equal(loadConfig({ DATABASE_URL, HSTS_MAX_AGE: '63072000' }).HSTS_MAX_AGE, 63_072_000)
  for (const bad of ['-1', '63072001', 'abc', '1.5']) {
    t.throws(() => loadConfig({ DATABASE_URL, HSTS_MAX_AGE: bad }), { message: /HSTS_MAX_AGE/ }, bad)
  }
})
