import t from 'tap'
import { randomUUID } from 'node:crypto'
import { CURRENT_RECORD, build, databaseUrlOf, embeddedTests, inspect } from '../helper.ts'
import { MAX_BLOB_BYTES } from '../../schemas/sync.ts'

const app = await build(t)
const db = inspect(t, databaseUrlOf(app))

t.test('the service runs on the kind of database this suite chose, as it would start on it', async (t) => {
  t.equal(app.databaseKind, embeddedTests() ? 'embedded' : 'postgresql')
  t.match((await app.inject({ method: 'GET', url: '/health' })).json(), { databaseKind: app.databaseKind })
})

function payload (bytes = 48, fill = 3) {
  return {
    encryptedBlob: Buffer.alloc(bytes, fill).toString('base64'),
    iv: 'AbCdEfGhIjKl+/9z',
    timestamp: 1_732_780_800_123,
    checksum: '0123456789abcdef'.repeat(4)
  }
}

const put = (userId: string, body: unknown, headers: Record<string, string> = {}) =>
  app.inject({ method: 'PUT', url: `/api/sync/${userId}`, payload: body as object, headers })
const get = (userId: string) => app.inject({ method: 'GET', url: `/api/sync/${userId}` })

async function storedCount (): Promise<number> {
  const { rows } = await db.query('SELECT count(*)::int AS n FROM user_sync_data')
  return rows[0].n
}

t.test('PUT stores, GET returns exactly the four fields', async (t) => {
  const userId = randomUUID()
  const data = payload()
  const res = await put(userId, data)
  t.equal(res.statusCode, 200)
  t.equal(res.body, '{"success":true}', 'byte for byte')
  t.equal(res.headers['cache-control'], 'no-store')

  const back = await get(userId)
  t.equal(back.statusCode, 200)
  t.equal(back.headers['cache-control'], 'no-store')
  t.match(back.headers['content-type'], /^application\/json/)
  t.strictSame(back.json(), data)
  t.strictSame(Object.keys(back.json()), ['encryptedBlob', 'iv', 'timestamp', 'checksum'])
  t.equal(typeof back.json().timestamp, 'number', 'timestamp is a JSON number')
})

t.test('PUT replaces, and fields the client adds are neither stored nor returned', async (t) => {
  const userId = randomUUID()
  await put(userId, payload(10, 1))
  const second = { ...payload(20, 2), timestamp: 1_800_000_000_000 }
  const res = await put(userId, { ...second, userId: 'someone-else', extra: 'x' })
  t.equal(res.statusCode, 200)
  t.strictSame((await get(userId)).json(), second)
})

t.test('GET of an unknown user is a 404 with an error', async (t) => {
  const res = await get(randomUUID())
  t.equal(res.statusCode, 404)
  t.equal(res.json().error, 'User not found')
  t.equal(res.json().statusCode, 404)
  t.equal(res.headers['cache-control'], 'no-store')
})

t.test('GET moves last_accessed to now', async (t) => {
  const userId = randomUUID()
  await put(userId, payload())
  await db.query("UPDATE user_sync_data SET last_accessed = now() - interval '100 days' WHERE user_id = $1", [userId])
  await get(userId)
  // Written after the answer, apart from it.
  await app.storage.touched()
  const { rows } = await db.query('SELECT now() - last_accessed < interval \'1 minute\' AS fresh FROM user_sync_data WHERE user_id = $1', [userId])
  t.equal(rows[0].fresh, true)
})

t.test('POST verify tells whether data exists', async (t) => {
  const userId = randomUUID()
  const before = await app.inject({ method: 'POST', url: `/api/sync/${userId}/verify` })
  t.equal(before.statusCode, 200)
  t.equal(before.body, '{"exists":false}')
  await put(userId, payload())
  const after = await app.inject({ method: 'POST', url: `/api/sync/${userId}/verify` })
  t.equal(after.body, '{"exists":true}')
})

t.test('DELETE removes the data and succeeds when there was none', async (t) => {
  const userId = randomUUID()
  await put(userId, payload())
  const res = await app.inject({ method: 'DELETE', url: `/api/sync/${userId}` })
  t.equal(res.statusCode, 200)
  t.equal(res.body, '{"success":true}')
  t.equal((await get(userId)).statusCode, 404)
  const again = await app.inject({ method: 'DELETE', url: `/api/sync/${userId}` })
  t.equal(again.statusCode, 200)
  t.equal(again.body, '{"success":true}')
})

t.test('upper-case ids name the same user', async (t) => {
  const userId = randomUUID()
  await put(userId.toUpperCase(), payload())
  t.equal((await get(userId)).statusCode, 200)
})

t.test('bad ids are 400 on every route, and nothing is stored', async (t) => {
  const before = await storedCount()
  for (const bad of ['not-a-uuid', '12345', `${randomUUID()}x`, "1' OR '1'='1", '%27%3B%20DROP%20TABLE%20user_sync_data%3B--']) {
    for (const [method, suffix] of [['PUT', ''], ['GET', ''], ['POST', '/verify'], ['DELETE', '']] as const) {
      const res = await app.inject({ method, url: `/api/sync/${bad}${suffix}`, payload: method === 'PUT' ? payload() : undefined })
      t.equal(res.statusCode, 400, `${method} ${bad}`)
      t.match(res.json(), { error: /userId/, statusCode: 400 })
    }
  }
  t.equal(await storedCount(), before)
})

t.test('each bad field is a 400 naming the field, and nothing is stored', async (t) => {
  const userId = randomUUID()
  const cases: Array<[string, Record<string, unknown>, RegExp]> = [
    ['empty blob', { encryptedBlob: '' }, /encryptedBlob/],
    ['url-safe blob', { encryptedBlob: 'ab-_' }, /encryptedBlob/],
    ['blob with a newline', { encryptedBlob: 'YWJj\nYWJj' }, /encryptedBlob/],
    ['blob as a number', { encryptedBlob: 1234 }, /encryptedBlob/],
    ['short iv', { iv: 'abc' }, /iv/],
    ['iv with a dash', { iv: 'AbCdEfGhIjKl-/9z' }, /iv/],
    ['upper-case checksum', { checksum: 'A'.repeat(64) }, /checksum/],
    ['zero timestamp', { timestamp: 0 }, /timestamp/],
    ['string timestamp', { timestamp: '1732780800123' }, /timestamp/],
    ['fractional timestamp', { timestamp: 1.5 }, /timestamp/],
    ['missing checksum', { checksum: undefined }, /checksum/]
  ]
  for (const [name, change, field] of cases) {
    const res = await put(userId, { ...payload(), ...change })
    t.equal(res.statusCode, 400, name)
    t.match(res.json(), { error: field, statusCode: 400 }, name)
  }
  t.equal((await get(userId)).statusCode, 404, 'nothing was stored')
})

t.test('a JSON body may begin with a byte order mark, as it could before', async (t) => {
  const userId = randomUUID()
  const data = payload(60, 9)
  const res = await app.inject({
    method: 'PUT',
    url: `/api/sync/${userId}`,
    headers: { 'content-type': 'application/json' },
    payload: Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from(JSON.stringify(data))])
  })
  t.equal(res.statusCode, 200, res.body)
  t.strictSame((await app.inject({ method: 'GET', url: `/api/sync/${userId}` })).json(), data)
})

t.test('malformed JSON is a 400 that does not echo the body', async (t) => {
  const res = await app.inject({
    method: 'PUT',
    url: `/api/sync/${randomUUID()}`,
    headers: { 'content-type': 'application/json' },
    payload: '{"encryptedBlob":"U0VDUkVUQ0lQSEVS", nope'
  })
  t.equal(res.statusCode, 400)
  t.equal(res.json().error, 'Invalid request: the body is not valid JSON')
  t.notMatch(res.body, 'U0VDUkVUQ0lQSEVS')
})

t.test('an empty JSON body and a JSON array are 400', async (t) => {
  for (const body of ['', '[]', 'null', '"text"']) {
    const res = await app.inject({
      method: 'PUT', url: `/api/sync/${randomUUID()}`, headers: { 'content-type': 'application/json' }, payload: body
    })
    t.equal(res.statusCode, 400, JSON.stringify(body))
    t.type(res.json().error, 'string')
  }
})

t.test('a __proto__ key is refused', async (t) => {
  const res = await app.inject({
    method: 'PUT',
    url: `/api/sync/${randomUUID()}`,
    headers: { 'content-type': 'application/json' },
    payload: `{"__proto__":{"polluted":true},${JSON.stringify(payload()).slice(1)}`
  })
  t.equal(res.statusCode, 400)
  t.equal(({} as Record<string, unknown>).polluted, undefined)
})

t.test('a non-JSON body is 415', async (t) => {
  const userId = randomUUID()
  for (const contentType of ['text/plain', 'application/x-www-form-urlencoded', 'application/octet-stream']) {
    const res = await app.inject({
      method: 'PUT', url: `/api/sync/${userId}`, headers: { 'content-type': contentType }, payload: JSON.stringify(payload())
    })
    t.equal(res.statusCode, 415, contentType)
    t.match(res.json(), { error: /Content-Type/, statusCode: 415 })
  }
  t.equal((await get(userId)).statusCode, 404)
})

t.test('the 1,000,000-byte boundary: exactly the limit is stored, one byte more is 413', async (t) => {
  const userId = randomUUID()
  const atLimit = payload(MAX_BLOB_BYTES, 9)
  const ok = await put(userId, atLimit)
  t.equal(ok.statusCode, 200)
  const back = await get(userId)
  t.equal(back.json().encryptedBlob, atLimit.encryptedBlob)
  const { rows } = await db.query(`${CURRENT_RECORD} WHERE user_id = $1`, [userId])
  t.equal(rows[0].blob_size, MAX_BLOB_BYTES)

  const over = await put(userId, payload(MAX_BLOB_BYTES + 1, 8))
  t.equal(over.statusCode, 413)
  t.match(over.json(), { error: /1000001 bytes.*1000000/, statusCode: 413 })
  t.equal((await get(userId)).json().encryptedBlob, atLimit.encryptedBlob, 'the stored data is untouched')
})

t.test('a body over the body limit is 413 without being parsed', async (t) => {
  const userId = randomUUID()
  const res = await put(userId, payload(MAX_BLOB_BYTES + 10_000))
  t.equal(res.statusCode, 413)
  t.match(res.json(), { error: /too large/, statusCode: 413 })
  t.equal((await get(userId)).statusCode, 404)
})

t.test('unknown routes and methods are a JSON 404 that does not echo the URL', async (t) => {
  const userId = randomUUID()
  for (const [method, url] of [['GET', '/nope'], ['GET', `/api/sync/${userId}/other`], ['PATCH', `/api/sync/${userId}`]] as const) {
    const res = await app.inject({ method, url })
    t.equal(res.statusCode, 404, `${method} ${url}`)
    t.equal(res.json().statusCode, 404)
    t.notMatch(res.body, userId)
  }
})

t.test('concurrent uploads for one user through HTTP leave one whole upload', async (t) => {
  const userId = randomUUID()
  const uploads = Array.from({ length: 12 }, (_, i) => payload(2000 + i, i + 10))
  const results = await Promise.all(uploads.map((data) => put(userId, data)))
  t.strictSame(results.map((res) => res.statusCode), uploads.map(() => 200))
  const stored = (await get(userId)).json()
  t.ok(uploads.some((data) => JSON.stringify(data) === JSON.stringify(stored)), 'the stored record is one whole upload')
})
