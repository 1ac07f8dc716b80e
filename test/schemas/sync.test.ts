import t from 'tap'
import { FormatRegistry } from '@sinclair/typebox'
import { Value } from '@sinclair/typebox/value'
import {
  MAX_BLOB_BASE64_CHARS, MAX_BLOB_BYTES, SyncPayloadSchema, UserParamsSchema,
  decodedBase64Bytes, isStandardBase64
} from '../../schemas/sync.ts'

FormatRegistry.Set('base64', isStandardBase64)

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
  for (const bad of ['', 'abc', 'ab=c', 'a===', '====', 'ab-_', 'YWJj\n', 'YW Jj', 'YWJj=', 'Y\u00e9Jj', 'YWJ\u0000']) {
    t.equal(isStandardBase64(bad), false, JSON.stringify(bad))
  }
})

t.test('decodedBase64Bytes matches Buffer at the limit and around it', async (t) => {
  for (const bytes of [1, 2, 3, 4, MAX_BLOB_BYTES - 1, MAX_BLOB_BYTES, MAX_BLOB_BYTES + 1, MAX_BLOB_BYTES + 2]) {
    const encoded = Buffer.alloc(bytes).toString('base64')
    t.equal(decodedBase64Bytes(encoded), bytes, `${bytes} bytes`)
  }
  t.equal(MAX_BLOB_BASE64_CHARS, Buffer.alloc(MAX_BLOB_BYTES).toString('base64').length)
})

t.test('the payload schema', async (t) => {
  t.ok(Value.Check(SyncPayloadSchema, valid))
  const cases: Array<[string, Record<string, unknown>]> = [
    ['empty blob', { encryptedBlob: '' }],
    ['url-safe blob', { encryptedBlob: 'ab-_' }],
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
    ['timestamp beyond 2^53', { timestamp: 2 ** 53 }]
  ]
  for (const [name, change] of cases) {
    t.notOk(Value.Check(SyncPayloadSchema, { ...valid, ...change }), name)
  }
  for (const field of Object.keys(valid)) {
    const { [field as keyof typeof valid]: _omitted, ...rest } = valid
    t.notOk(Value.Check(SyncPayloadSchema, rest), `missing ${field}`)
  }
})

t.test('the user id must be a UUID', async (t) => {
  t.ok(Value.Check(UserParamsSchema, { userId: '0f8fad5b-d9cb-469f-a165-70867728950e' }))
  t.ok(Value.Check(UserParamsSchema, { userId: '0F8FAD5B-D9CB-469F-A165-70867728950E' }))
  for (const bad of ['', 'not-a-uuid', '0f8fad5b-d9cb-469f-a165-70867728950', '0f8fad5bd9cb469fa16570867728950e',
    'urn:uuid:0f8fad5b-d9cb-469f-a165-70867728950e', "0f8fad5b-d9cb-469f-a165-70867728950e' OR '1'='1"]) {
    t.notOk(Value.Check(UserParamsSchema, { userId: bad }), bad)
  }
})
