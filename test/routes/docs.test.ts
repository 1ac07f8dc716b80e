import t from 'tap'
import { randomUUID } from 'node:crypto'
import { build } from '../helper.ts'
import { MAX_BLOB_BYTES } from '../../schemas/sync.ts'
import { BODY_LIMIT } from '../../schemas/sync.ts'

const routes: Array<{ method: string, url: string }> = []
const app = await build(t, {
  env: { RATE_LIMIT_MAX: '100', RATE_LIMIT_IP_MAX: '2000', RATE_LIMIT_WINDOW: '1h', CLEANUP_INACTIVE_DAYS: '730' },
  routes
})

t.test('GET /info tells clients the limits', async (t) => {
  const res = await app.inject({ method: 'GET', url: '/info' })
  t.equal(res.statusCode, 200)
  t.strictSame(res.json(), {
    service: 'logikids-sync',
    version: '1.0.0',
    maxBlobBytes: MAX_BLOB_BYTES,
    maxBodyBytes: BODY_LIMIT,
    retentionDays: 730,
    rateLimit: { perUser: { max: 100, windowSeconds: 3600 }, perIp: { max: 2000, windowSeconds: 3600 } },
    auth: { mode: 'optional' },
    history: { versions: 10, days: 30 }
  })
})

t.test('the OpenAPI document describes every route the app serves, with its error bodies', async (t) => {
  const res = await app.inject({ method: 'GET', url: '/docs/json' })
  t.equal(res.statusCode, 200)
  const doc = res.json()
  t.equal(doc.openapi, '3.0.3')
  const served = [
    ['put', '/api/sync/{userId}'], ['get', '/api/sync/{userId}'], ['head', '/api/sync/{userId}'], ['delete', '/api/sync/{userId}'],
    ['post', '/api/sync/{userId}/verify'], ['put', '/api/sync/{userId}/token'], ['get', '/api/sync/{userId}/versions'],
    ['get', '/api/sync/{userId}/versions/{version}'], ['post', '/api/sync/{userId}/versions/{version}/restore'], ['get', '/health'], ['get', '/health/live'], ['get', '/info'], ['get', '/metrics']
  ]
  for (const [method, path] of served) {
    t.ok(doc.paths[path!]?.[method!], `${method!.toUpperCase()} ${path}`)
  }
  const documented = Object.entries(doc.paths as Record<string, object>).flatMap(([path, methods]) => Object.keys(methods).map((method) => `${method} ${path}`))
  t.strictSame(documented.sort(), served.map(([method, path]) => `${method} ${path}`).sort(), 'and nothing else')
  const put = doc.paths['/api/sync/{userId}'].put
  for (const status of ['200', '400', '401', '412', '413', '415', '429', '503']) {
    t.ok(put.responses[status], `PUT documents ${status}`)
  }
  t.ok(doc.paths['/api/sync/{userId}'].get.responses['404'], 'GET documents 404')
  t.ok(doc.paths['/api/sync/{userId}'].get.responses['304'], 'GET documents 304')
  t.match(put.responses['400'].content['application/json'].schema, { properties: { error: { type: 'string' }, statusCode: { type: 'integer' } } })
  t.match(put.requestBody.content['application/json'].schema.properties.encryptedBlob, { type: 'string', format: 'base64' })
  for (const path of ['/api/sync/{userId}', '/api/sync/{userId}/versions/{version}']) {
    t.match(doc.paths[path].get.responses['200'].content['application/json'].schema.properties.encryptedBlob, { type: 'string', format: 'base64' },
      `GET ${path} answers the blob in the upload's format`)
  }
  t.notMatch(res.body, 'unsafe', 'the serializer\'s instruction is not in the document')

  // Each route lists the conditional headers it honours, and no other.
  const headersOf = (operation: { parameters?: Array<{ in: string, name: string }> }) =>
    (operation.parameters ?? []).filter((parameter) => parameter.in === 'header').map((parameter) => parameter.name).sort()
  const sync = doc.paths['/api/sync/{userId}']
  t.strictSame(headersOf(sync.put), ['if-match', 'if-none-match'], 'PUT: If-Match and If-None-Match')
  t.strictSame(headersOf(sync.get), ['if-none-match'], 'GET: If-None-Match only')
  t.strictSame(headersOf(sync.delete), ['if-match'], 'DELETE: If-Match only')
  t.strictSame(headersOf(doc.paths['/api/sync/{userId}/versions/{version}/restore'].post), ['if-match'], 'restore: If-Match only')
  for (const status of ['200', '400', '401', '404', '412', '429', '503']) {
    t.ok(doc.paths['/api/sync/{userId}/versions/{version}/restore'].post.responses[status], `restore documents ${status}`)
  }

  // The access token: a bearer scheme, optional on the data routes in AUTH_MODE=optional
  // (the empty requirement), always on the rotation route.
  t.strictSame(doc.components.securitySchemes.accessToken, {
    type: 'http', scheme: 'bearer', description: doc.components.securitySchemes.accessToken.description
  })
  for (const method of ['put', 'get', 'head', 'delete']) {
    t.strictSame(sync[method].security, [{ accessToken: [] }, {}], `${method.toUpperCase()} /api/sync/{userId}: token optional`)
  }
  t.strictSame(doc.paths['/api/sync/{userId}/verify'].post.security, [{ accessToken: [] }, {}])
  t.strictSame(doc.paths['/api/sync/{userId}/token'].put.security, [{ accessToken: [] }], 'rotation: token required')
  t.match(doc.paths['/api/sync/{userId}/token'].put.requestBody.content['application/json'].schema.properties.token,
    { type: 'string', pattern: '^[A-Za-z0-9_-]{43,128}$' })
  for (const [path, methods] of Object.entries(doc.paths as Record<string, Record<string, { responses: Record<string, unknown> }>>)) {
    for (const [method, operation] of Object.entries(methods)) {
      t.ok(operation.responses['4XX'] ?? operation.responses['4xx'], `${method.toUpperCase()} ${path} documents its client errors`)
    }
  }
})

t.test('every route the app registers is in the document', async (t) => {
  const doc = (await app.inject({ method: 'GET', url: '/docs/json' })).json()
  // HEAD and OPTIONS routes are Fastify's own; /docs serves the document itself.
  const own = routes.filter((route) => !['HEAD', 'OPTIONS'].includes(route.method) && !route.url.startsWith('/docs'))
  t.ok(own.length >= 8, `${own.length} routes registered`)
  for (const { method, url } of own) {
    const path = url.replace(/:(\w+)/g, '{$1}')
    t.ok(doc.paths[path]?.[method.toLowerCase()], `${method} ${url} is documented`)
  }
})

t.test('in AUTH_MODE=required the document and /info say the token is required', async (t) => {
  const required = await build(t, { env: { AUTH_MODE: 'required' } })
  const info = (await required.inject({ method: 'GET', url: '/info' })).json()
  t.strictSame(info.auth, { mode: 'required' })
  const doc = (await required.inject({ method: 'GET', url: '/docs/json' })).json()
  for (const method of ['put', 'get', 'head', 'delete']) {
    t.strictSame(doc.paths['/api/sync/{userId}'][method].security, [{ accessToken: [] }], `${method.toUpperCase()}: token required`)
  }
})

// helmet's headers for pages: on Swagger UI, never on a JSON answer.
const PAGE_HEADERS = ['content-security-policy', 'x-frame-options', 'cross-origin-opener-policy', 'cross-origin-resource-policy',
  'origin-agent-cluster', 'referrer-policy', 'x-dns-prefetch-control', 'x-download-options', 'x-permitted-cross-domain-policies', 'x-xss-protection']

t.test('Swagger UI at /docs gets the headers of a page; JSON answers only nosniff and HSTS', async (t) => {
  const ui = await app.inject({ method: 'GET', url: '/docs/' })
  t.equal(ui.statusCode, 200)
  t.match(ui.headers['content-type'], /text\/html/)
  for (const name of PAGE_HEADERS) t.ok(ui.headers[name], `/docs/: ${name}`)
  t.equal(ui.headers['cross-origin-resource-policy'], 'cross-origin')
  t.equal(ui.headers['x-content-type-options'], 'nosniff')
  const userId = randomUUID()
  const answers = [
    await app.inject({ method: 'GET', url: '/health/live' }),
    await app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: { encryptedBlob: 'AAAA', iv: 'AAAAAAAAAAAAAAAA', timestamp: 1, checksum: 'a'.repeat(64) } }),
    await app.inject({ method: 'GET', url: `/api/sync/${userId}` }),
    await app.inject({ method: 'GET', url: `/api/sync/${randomUUID()}` }),
    await app.inject({ method: 'GET', url: '/nowhere' })
  ]
  t.strictSame(answers.map((res) => res.statusCode), [200, 200, 200, 404, 404])
  for (const res of answers) {
    t.match(res.headers['content-type'], /application\/json/)
    t.equal(res.headers['x-content-type-options'], 'nosniff')
    t.equal(res.headers['strict-transport-security'], 'max-age=31536000; includeSubDomains')
    t.strictSame(PAGE_HEADERS.filter((name) => name in res.headers), [], `${res.statusCode}: no page headers`)
  }
})

t.test('HSTS_MAX_AGE sets the max-age of Strict-Transport-Security, and 0 sends none', async (t) => {
  const shorter = await build(t, { env: { HSTS_MAX_AGE: '600' } })
  t.equal((await shorter.inject({ method: 'GET', url: '/health/live' })).headers['strict-transport-security'], 'max-age=600; includeSubDomains')
  t.equal((await shorter.inject({ method: 'GET', url: '/docs/' })).headers['strict-transport-security'], 'max-age=600; includeSubDomains')
  const none = await build(t, { env: { HSTS_MAX_AGE: '0' } })
  for (const url of ['/health/live', '/docs/']) {
    const res = await none.inject({ method: 'GET', url })
    t.notOk('strict-transport-security' in res.headers, url)
    t.equal(res.headers['x-content-type-options'], 'nosniff', url)
  }
})
