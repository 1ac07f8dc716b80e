import t from 'tap'
import { randomUUID } from 'node:crypto'
import { build } from '../helper.ts'
import { allowedOrigins } from '../../plugins/cors.ts'

const ALLOWED = 'https://app.logikids.example'
const app = await build(t, { env: { CORS_ORIGINS: `${ALLOWED}/, https://other.example` } })

t.test('allowedOrigins', async (t) => {
  t.equal(allowedOrigins(''), false)
  t.equal(allowedOrigins(' * '), true)
  t.strictSame(allowedOrigins('https://a.example/, https://b.example'), ['https://a.example', 'https://b.example'])
})

t.test('a preflight from an allowed origin for a conditional upload', async (t) => {
  const res = await app.inject({
    method: 'OPTIONS',
    url: `/api/sync/${randomUUID()}`,
    headers: { origin: ALLOWED, 'access-control-request-method': 'PUT', 'access-control-request-headers': 'content-type, if-match' }
  })
  t.equal(res.statusCode, 204)
  t.equal(res.headers['access-control-allow-origin'], ALLOWED)
  t.match(res.headers['access-control-allow-methods'], /PUT/)
  t.match(String(res.headers['access-control-allow-headers']).toLowerCase(), /if-match/)
  t.match(String(res.headers['access-control-allow-headers']).toLowerCase(), /if-none-match/)
  t.equal(res.headers['access-control-max-age'], '600')
})

t.test('a preflight from a refused origin gets no permission', async (t) => {
  const res = await app.inject({
    method: 'OPTIONS',
    url: `/api/sync/${randomUUID()}`,
    headers: { origin: 'https://evil.example', 'access-control-request-method': 'PUT' }
  })
  t.equal(res.headers['access-control-allow-origin'], undefined)
})

t.test('responses to an allowed origin expose ETag and Retry-After to scripts', async (t) => {
  const userId = randomUUID()
  const put = await app.inject({
    method: 'PUT',
    url: `/api/sync/${userId}`,
    headers: { origin: ALLOWED },
    payload: { encryptedBlob: 'AAAA', iv: 'AAAAAAAAAAAAAAAA', timestamp: 1, checksum: 'a'.repeat(64) }
  })
  t.equal(put.statusCode, 200)
  t.equal(put.headers['access-control-allow-origin'], ALLOWED)
  t.match(String(put.headers['access-control-expose-headers']).toLowerCase(), /etag/)
  t.match(String(put.headers['access-control-expose-headers']).toLowerCase(), /retry-after/)
  const refused = await app.inject({ method: 'GET', url: `/api/sync/${userId}`, headers: { origin: 'https://evil.example' } })
  t.equal(refused.headers['access-control-allow-origin'], undefined, 'a refused origin cannot read the answer')
})
