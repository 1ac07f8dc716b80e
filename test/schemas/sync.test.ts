import t from 'tap'
import Fastify from 'fastify'
import fc from 'fast-check'
import { serverOptions } from '../../app.ts'
import {
  MAX_BLOB_BASE64_CHARS, MAX_BLOB_BYTES, SyncPayloadSchema, UserParamsSchema,
  base64Bytes, decodedBase64Bytes, isStandardBase64
} from '../../schemas/sync.ts'
import { testConfig } from '../helper.ts'

// The schemas as the server applies them: Fastify created with the service's own options (its
// Ajv: no type coercion, the base64 format), a route declaring them, requests injected. No
// database is needed: the route only echoes what passed validation.
const server = Fastify(serverOptions(testConfig({})))
server.put('/check/:userId', { schema: { params: UserParamsSchema, body: SyncPayloadSchema } }, async (request) => request.body)
t.teardown(() => server.close())
const someone = '0f8fad5b-d9cb-469f-a165-70867728950e'
const check = (body: unknown, userId = someone) => server.inject({ method: 'PUT', url: `/check/${userId}`, payload: body as object })
const refused = (res: { statusCode: number, json (): { code?: string } }) => res.statusCode === 400 && res.json().code === 'FST_ERR_VALIDATION'

const valid = {
  encryptedBlob: Buffer.from('ciphertext').toString('base64'),
  iv: 'AAAAAAAAAAAAAAAA',
  timestamp: 1732780800000,
  checksum: 'a'.repeat(64)
}

t.test('isStandardBase64 accepts what Buffer encodes, at every padding length', async (t) => {
  for (let length = 1; length <= 12; length++) {
    const encoded = Buffer.alloc(length, 0xfb).toString('base64')
    t.ok(isStandardBase64(encoded), `${length} bytes: ${encoded}`)
  }
})

t.test('isStandardBase64 refuses everything else', async (t) => {
  for (const bad of ['', 'abc', 'ab=c', 'a===', '====', 'ab-_', 'YWJj\n', 'YW Jj', 'YWJj=', 'Y\u00e9Jj', 'YWJ\u0000', 'YWJjZA', '=YWJ', 'Q\u0155JD', '\u4e51UJD']) {
    t.equal(isStandardBase64(bad), false, JSON.stringify(bad))
  }
})

t.test('isStandardBase64 refuses unused bits set in the last character, which stored bytes could not give back', async (t) => {
  // 'QQ==' and 'QR==' both decode to 'A'; 'QUI=' and 'QUJ=' both to 'AB'.
  const pairs: Array<[string, string]> = [['QQ==', 'QR=='], ['QQ==', 'Qf=='], ['QUI=', 'QUJ='], ['QUI=', 'QUL=']]
  for (const [canonical, other] of pairs) {
    t.ok(isStandardBase64(canonical), canonical)
    t.equal(isStandardBase64(other), false, other)
    t.equal(Buffer.from(other, 'base64').toString('base64'), canonical, `${other} is ${canonical} once decoded`)
  }
})

t.test('isStandardBase64 accepts exactly the texts that bytes encode back to, whatever the characters', async (t) => {
  // The definition: a text is canonical base64 when decoding and encoding it again gives it back.
  const roundTrips = (text: string) => text.length > 0 && Buffer.from(text, 'base64').toString('base64') === text
  // With characters past ASCII whose low byte is a base64 one (\u0155 is read as U by Node's decoder).
  const chars = fc.constantFrom(...'AQgwBRhxEIMUYcko048+/Zz9=-_ .\n\u00e9\u0100\u0141\u012d\u0155\u4e51\u0241\u2b2b'.split(''))
  const texts = fc.oneof(
    fc.string({ unit: chars, maxLength: 24 }),
    // Valid text with one character replaced: the near misses.
    fc.tuple(fc.uint8Array({ minLength: 1, maxLength: 18 }), fc.nat(), chars).map(([bytes, at, char]) => {
      const text = Buffer.from(bytes).toString('base64')
      const i = at % text.length
      return text.slice(0, i) + char + text.slice(i + 1)
    }),
    fc.uint8Array({ maxLength: 18 }).map((bytes) => Buffer.from(bytes).toString('base64')))
  fc.assert(fc.property(texts, (text) => isStandardBase64(text) === roundTrips(text)), { numRuns: 20_000 })
  t.pass('20,000 texts judged as the round trip judges them')
})

t.test('base64Bytes gives the bytes the last check decoded, and decodes any other text itself', async (t) => {
  const text = Buffer.from('first').toString('base64')
  t.ok(isStandardBase64(text))
  t.strictSame(base64Bytes(text), Buffer.from('first'))
  t.ok(isStandardBase64(Buffer.from('checked').toString('base64')))
  t.strictSame(base64Bytes(Buffer.from('other').toString('base64')), Buffer.from('other'), 'not the bytes of another text')
  t.strictSame(base64Bytes(Buffer.from('checked').toString('base64')), Buffer.from('checked'), 'which were let go: decoded again')
})

t.test('decodedBase64Bytes matches Buffer at the limit and around it', async (t) => {
  for (const bytes of [1, 2, 3, 4, MAX_BLOB_BYTES - 1, MAX_BLOB_BYTES, MAX_BLOB_BYTES + 1, MAX_BLOB_BYTES + 2]) {
    const encoded = Buffer.alloc(bytes).toString('base64')
    t.equal(decodedBase64Bytes(encoded), bytes, `${bytes} bytes`)
  }
  t.equal(MAX_BLOB_BASE64_CHARS, Buffer.alloc(MAX_BLOB_BYTES).toString('base64').length)
})

t.test('the payload schema', async (t) => {
  const ok = await check(valid)
  t.equal(ok.statusCode, 200, 'a valid payload passes')
  t.strictSame(ok.json(), valid, 'unchanged')
  const cases: Array<[string, Record<string, unknown>]> = [
    ['empty blob', { encryptedBlob: '' }],
    ['url-safe blob', { encryptedBlob: 'ab-_' }],
    ['blob without its padding', { encryptedBlob: 'YWJjZA' }],
    ['blob with unused bits set', { encryptedBlob: 'YWJjZB==' }],
    ['blob not a string', { encryptedBlob: 1234 }],
    ['iv too short', { iv: 'A'.repeat(15) }],
    ['iv too long', { iv: 'A'.repeat(17) }],
    ['iv with padding', { iv: 'A'.repeat(15) + '=' }],
    ['checksum upper case', { checksum: 'A'.repeat(64) }],
    ['checksum too short', { checksum: 'a'.repeat(63) }],
    ['timestamp zero', { timestamp: 0 }],
    ['timestamp negative', { timestamp: -5 }],
    ['timestamp fractional', { timestamp: 1.5 }],
    ['timestamp as string', { timestamp: '1732780800000' }],
    ['timestamp as boolean', { timestamp: true }],
    ['timestamp beyond 2^53', { timestamp: 2 ** 53 }],
    ['iv as a number', { iv: 1234567890123456 }]
  ]
  for (const [name, change] of cases) {
    const res = await check({ ...valid, ...change })
    t.ok(refused(res), `${name}: ${res.statusCode} ${res.json().message ?? ''}`)
  }
  for (const field of Object.keys(valid)) {
    const { [field as keyof typeof valid]: _omitted, ...rest } = valid
    t.ok(refused(await check(rest)), `missing ${field}`)
  }
  t.ok(refused(await check([valid])), 'an array')
})

t.test('an unknown payload field is dropped before the handler sees it, not refused', async (t) => {
  // Fastify's Ajv removes properties a schema with additionalProperties: false does not name
  // (removeAdditional), so nothing unnamed can reach the storage.
  const res = await check({ ...valid, extra: 'x', encryptedBlobs: 'AAAA' })
  t.equal(res.statusCode, 200)
  t.strictSame(res.json(), valid)
})

t.test('the user id must be a UUID, not the nil or the all-ones one', async (t) => {
  for (const good of [someone, someone.toUpperCase(), '00000000-0000-0000-0000-000000000001', 'ffffffff-ffff-ffff-ffff-fffffffffffe']) {
    t.equal((await check(valid, good)).statusCode, 200, good)
  }
  for (const bad of ['not-a-uuid', '0f8fad5b-d9cb-469f-a165-70867728950', '0f8fad5bd9cb469fa16570867728950e',
    'urn:uuid:0f8fad5b-d9cb-469f-a165-70867728950e', "0f8fad5b-d9cb-469f-a165-70867728950e' OR '1'='1",
    '00000000-0000-0000-0000-000000000000', 'ffffffff-ffff-ffff-ffff-ffffffffffff', 'FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF',
    'FFFFFFFF-ffff-FFFF-ffff-FFFFFFFFFFFF']) {
    const res = await check(valid, encodeURIComponent(bad))
    t.ok(refused(res), `${bad}: ${res.statusCode}`)
  }
})
