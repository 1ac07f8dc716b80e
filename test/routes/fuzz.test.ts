import t from 'tap'
import { randomUUID } from 'node:crypto'
import fc from 'fast-check'
import { build, databaseUrlOf, inspect } from '../helper.ts'

// Property-based fuzzing of every route: whatever arrives, never a 5xx, never a crash, nothing
// stored by a rejected request, and the data of other users unchanged.
const app = await build(t, { env: { RATE_LIMIT_MAX: '0', RATE_LIMIT_IP_MAX: '0' } })
const db = inspect(t, databaseUrlOf(app))

const valid = () => ({
  encryptedBlob: Buffer.from('bystander data').toString('base64'), iv: 'AbCdEfGhIjKl+/9z', timestamp: 1_700_000_000_000, checksum: 'd'.repeat(64)
})
const bystanders = [randomUUID(), randomUUID()]
t.before(async () => {
  for (const id of bystanders) {
    const res = await app.inject({ method: 'PUT', url: `/api/sync/${id}`, payload: valid() })
    if (res.statusCode !== 200) throw new Error('setup failed')
  }
})
const everything = async () =>
  (await db.query('SELECT row_to_json(u)::text AS row FROM user_sync_data u WHERE user_id = ANY($1) ORDER BY user_id', [bystanders])).rows

const INJECTIONS = [
  "' OR '1'='1", "'; DROP TABLE user_sync_data; --", '" OR ""="', '1; SELECT pg_sleep(10)', '\\x00',
  "00000000-0000-0000-0000-000000000000' OR 'a'='a", '$1', '%27%20OR%201%3D1--', '../../etc/passwd', '\u0000', '𝕌𝕟𝕚𝕔𝕠𝕕𝕖', '<script>'
]

const userIdArb = fc.oneof(
  fc.uuid(),
  fc.constantFrom(...INJECTIONS),
  fc.string({ maxLength: 60 }),
  fc.string({ unit: 'grapheme', maxLength: 20 }),
  fc.uuid().map((id) => id.toUpperCase()),
  fc.uuid().map((id) => id.replace(/-/g, '')),
  fc.uuid().map((id) => `${id}${'x'.repeat(3)}`)
)
const fieldArb = fc.oneof(
  fc.string({ maxLength: 40 }), fc.constantFrom(...INJECTIONS), fc.integer(), fc.double(), fc.boolean(), fc.constant(null),
  fc.array(fc.string(), { maxLength: 3 }), fc.dictionary(fc.string({ maxLength: 5 }), fc.string({ maxLength: 5 }), { maxKeys: 3 }),
  fc.base64String({ maxLength: 64 }), fc.stringMatching(/^[0-9a-fA-F]{60,68}$/), fc.stringMatching(/^[A-Za-z0-9+/]{16}$/)
)
const bodyArb = fc.oneof(
  // a valid payload with one field replaced or removed
  fc.record({ field: fc.constantFrom('encryptedBlob', 'iv', 'timestamp', 'checksum'), value: fc.option(fieldArb) })
    .map(({ field, value }) => {
      const body: Record<string, unknown> = valid()
      if (value === null) delete body[field]
      else body[field] = value
      return JSON.stringify(body)
    }),
  // prototype-pollution keys
  fc.constantFrom('{"__proto__":{"polluted":1},"encryptedBlob":"AAAA","iv":"AAAAAAAAAAAAAAAA","timestamp":1,"checksum":"' + 'a'.repeat(64) + '"}',
    '{"constructor":{"prototype":{"polluted":1}}}', '{"encryptedBlob":"AAAA","__proto__":[]}'),
  // any JSON at all, and text that is not JSON
  fc.json({ maxDepth: 3 }),
  fc.string({ maxLength: 200 }),
  fc.string({ unit: 'binary', maxLength: 100 }),
  // a valid body cut short
  fc.nat({ max: 120 }).map((n) => JSON.stringify(valid()).slice(0, n)),
  // big ones
  fc.constantFrom(
    JSON.stringify({ ...valid(), encryptedBlob: 'A'.repeat(1_400_000) }),
    JSON.stringify({ ...valid(), encryptedBlob: Buffer.alloc(1_000_001).toString('base64') }),
    JSON.stringify({ ...valid(), encryptedBlob: 'A'.repeat(1_333_336).slice(0, -1) + '\u0000' })
  )
)
const requestArb = fc.record({
  method: fc.constantFrom('PUT', 'GET', 'POST', 'DELETE', 'PATCH', 'HEAD', 'OPTIONS'),
  userId: userIdArb,
  verify: fc.boolean(),
  contentType: fc.constantFrom('application/json', 'application/json; charset=utf-8', 'text/plain', 'application/x-www-form-urlencoded',
    'multipart/form-data; boundary=x', 'application/json; charset=latin1', 'garbage', undefined),
  ifMatch: fc.option(fc.oneof(fc.string({ maxLength: 30 }), fc.constant('*'), fc.constant('"1-1"'))),
  body: fc.option(bodyArb)
})

t.test('no request, however malformed, gets a 5xx, stores what it should not, or touches other users', async (t) => {
  const before = await everything()
  let runs = 0
  await fc.assert(fc.asyncProperty(requestArb, async (request) => {
    runs++
    const target = request.userId
    const url = `/api/sync/${encodeURIComponent(target).replace(/%2F/g, '/')}${request.verify ? '/verify' : ''}`
    const headers: Record<string, string> = {}
    if (request.contentType !== undefined && request.body !== null) headers['content-type'] = request.contentType
    if (request.ifMatch !== null) headers['if-match'] = request.ifMatch
    const res = await app.inject({ method: request.method as 'GET', url, headers, payload: request.body ?? undefined })
    if (res.statusCode >= 500) throw new Error(`${res.statusCode} for ${request.method} ${url}: ${res.body.slice(0, 200)}`)
    if (res.statusCode >= 400 && request.method !== 'HEAD') {
      const body = res.json()
      if (typeof body.error !== 'string' || body.statusCode !== res.statusCode) throw new Error(`error body ${res.body.slice(0, 200)}`)
    }
    if (request.method === 'PUT' && res.statusCode !== 200 && /^[0-9a-f-]{36}$/i.test(target)) {
      const { rows } = await db.query('SELECT 1 FROM user_sync_data WHERE user_id = $1', [target])
      if (rows.length > 0) throw new Error(`a rejected upload (${res.statusCode}) stored data`)
    }
    if (({} as Record<string, unknown>).polluted !== undefined) throw new Error('prototype polluted')
  }), { numRuns: 400, seed: Number(process.env.FUZZ_SEED ?? Date.now() % 2 ** 31) })
  t.strictSame(await everything(), before, 'the bystanders\' data is unchanged, column for column')
  t.comment(`${runs} random requests`)
})

t.test('SQL injection in every field lands as data or is refused, never as SQL', async (t) => {
  const userId = randomUUID()
  for (const attack of INJECTIONS) {
    for (const field of ['encryptedBlob', 'iv', 'checksum', 'timestamp']) {
      const res = await app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: { ...valid(), [field]: attack } })
      t.equal(res.statusCode, 400, `${field}: ${JSON.stringify(attack)}`)
    }
    const res = await app.inject({ method: 'GET', url: `/api/sync/${encodeURIComponent(attack)}` })
    t.ok([400, 404].includes(res.statusCode), `path: ${JSON.stringify(attack)} → ${res.statusCode}`)
  }
  const { rows } = await db.query("SELECT to_regclass('user_sync_data') IS NOT NULL AS present")
  t.equal(rows[0].present, true, 'the table is still there')
  t.strictSame(await everything().then((r) => r.length), bystanders.length)
})
