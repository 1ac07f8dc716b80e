import t from 'tap'
import { createHash, randomBytes } from 'node:crypto'
import {
  deriveAccessToken, exportKey, generateKey, importKey, IntegrityError, newUserId, pairingCode, readPairingCode
} from '../src/index.ts'
import { ciphertextBytes, decryptJson, encryptJson } from '../src/crypto.ts'
import { fromBase64, fromBase64Url, toBase64, toBase64Url, toHex } from '../src/encoding.ts'
import { fieldGenerateKey, fieldQrKey } from './fixtures/field-client.ts'

// The client's encoding and cryptography in Node, with Node's own Buffer and crypto as the reference.

t.test('base64 and hex of 1,000,000 bytes match Node, where a spread into fromCharCode overflows the stack', async (t) => {
  const bytes = new Uint8Array(randomBytes(1_000_000))
  t.throws(() => btoa(String.fromCharCode(...bytes)), RangeError, 'the field client\'s way fails at this size')
  const encoded = toBase64(bytes)
  t.equal(encoded, Buffer.from(bytes).toString('base64'))
  t.ok(Buffer.from(fromBase64(encoded)).equals(bytes), 'decodes to the same bytes')
  for (const length of [0, 1, 2, 3, 4, 0x8000 - 1, 0x8000, 0x8000 + 1]) {
    const some = bytes.subarray(0, length)
    t.equal(toBase64(some), Buffer.from(some).toString('base64'), `${length} bytes`)
    t.equal(toBase64Url(some), Buffer.from(some).toString('base64url'), `${length} bytes, base64url`)
    t.ok(Buffer.from(fromBase64Url(toBase64Url(some))).equals(some), `${length} bytes, base64url round trip`)
  }
  t.equal(toHex(bytes.subarray(0, 64)), Buffer.from(bytes.subarray(0, 64)).toString('hex'))
  t.throws(() => fromBase64Url('abc+'), TypeError)
})

t.test('the access token is the one docs/sync-protocol.md derives for its test vector', async (t) => {
  const raw = new Uint8Array(Array.from({ length: 32 }, (_, i) => i))
  const userId = '3f2504e0-4f89-41d3-9a0c-0305e82c3301'
  const expected = 's4-8qORDSDMXZ6ctkgfKtopEVHdGzKSXykooBn5xJVc'
  t.equal(await deriveAccessToken(raw, userId), expected, 'from raw bytes')
  t.equal(await deriveAccessToken(await importKey(toBase64Url(raw)), userId), expected, 'from the imported key')
  t.equal(await deriveAccessToken(raw, userId.toUpperCase()), expected, 'the user id in any case')
  t.not(await deriveAccessToken(raw, newUserId()), expected, 'another user id, another token')
  const locked = await crypto.subtle.importKey('raw', raw, 'AES-GCM', false, ['encrypt'])
  await t.rejects(deriveAccessToken(locked, userId), /not extractable/)
})

t.test('keys: 43 characters for a QR code, the field clients\' JSON Web Keys too, and nothing else', async (t) => {
  const key = await generateKey()
  t.ok(key.extractable)
  const exported = await exportKey(key)
  t.match(exported, /^[A-Za-z0-9_-]{43}$/)
  t.equal(await exportKey(await importKey(exported)), exported)
  const fieldKey = await fieldGenerateKey()
  const qrKey = await fieldQrKey(fieldKey)
  const fromField = await importKey(qrKey)
  const fromObject = await importKey(JSON.parse(qrKey))
  const raw = Buffer.from(await crypto.subtle.exportKey('raw', fieldKey)).toString('base64url')
  t.equal(await exportKey(fromField), raw, 'a JSON string from a field QR code')
  t.equal(await exportKey(fromObject), raw, 'a JSON Web Key object')
  await t.rejects(importKey('tooshort'), /6 bytes, an AES-256 key has 32/)
  await t.rejects(importKey('!'.repeat(43)), /not an exported key/)
  await t.rejects(importKey(toBase64Url(new Uint8Array(16))), /16 bytes/)
  const aes128 = await crypto.subtle.generateKey({ name: 'AES-GCM', length: 128 }, true, ['encrypt', 'decrypt'])
  await t.rejects(importKey(await fieldQrKey(aes128)), /AES-128/, 'a JSON Web Key of another size')
  await t.rejects(importKey('{"kty":'), /not an exported key/, 'broken JSON')

  const userId = newUserId()
  t.match(userId, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/)
  const code = await pairingCode(userId, key)
  t.equal(code.length, 80)
  const paired = await readPairingCode(` ${code.slice(0, 40)}\n${code.slice(40)} `)
  t.equal(paired.userId, userId)
  t.equal(await exportKey(paired.key), exported)
  await t.rejects(readPairingCode(`not-a-uuid.${exported}`), /pairing code/)
  await t.rejects(readPairingCode(exported), /pairing code/)
})

t.test('a record is encrypted as the field clients do it, and refused unless its checksum is one of their two forms', async (t) => {
  const key = await generateKey()
  const json = JSON.stringify({ progress: { math: 3 }, name: 'Ü' })
  const record = await encryptJson(key, json, 1_700_000_000_000)
  const iv = Buffer.from(record.iv, 'base64')
  const ciphertext = Buffer.from(record.encryptedBlob, 'base64')
  t.equal(record.iv.length, 16, '12 bytes as 16 base64 characters')
  t.equal(iv.length, 12)
  t.equal(ciphertext.length, ciphertextBytes(json), 'UTF-8 bytes plus the 16-byte tag')
  t.equal(record.checksum, createHash('sha256').update(Buffer.concat([iv, ciphertext])).digest('hex'), 'uploads the iv + ciphertext form')
  t.equal(record.timestamp, 1_700_000_000_000)
  t.equal(await decryptJson(key, record), json)
  const older = { ...record, checksum: createHash('sha256').update(ciphertext).digest('hex') }
  t.equal(await decryptJson(key, older), json, 'the older field clients\' checksum over the ciphertext alone')
  t.equal(await decryptJson(key, { ...record, checksum: record.checksum.toUpperCase() }), json, 'hex in either case')

  await t.rejects(decryptJson(key, { ...record, checksum: 'a'.repeat(64) }), IntegrityError, 'another checksum')
  const flipped = Buffer.from(ciphertext)
  flipped[0]! ^= 1
  await t.rejects(decryptJson(key, { ...record, encryptedBlob: flipped.toString('base64') }), IntegrityError,
    'a changed ciphertext with the old checksum')
  const forged = { ...record, encryptedBlob: flipped.toString('base64'), checksum: createHash('sha256').update(Buffer.concat([iv, flipped])).digest('hex') }
  await t.rejects(decryptJson(key, forged), { name: 'IntegrityError', message: /does not decrypt/ },
    'a changed ciphertext with a matching checksum: GCM refuses it')
  await t.rejects(decryptJson(await generateKey(), record), { name: 'IntegrityError', message: /does not decrypt/ }, 'another key')
  await t.rejects(decryptJson(key, { ...record, iv: 'AAAA' }), { name: 'IntegrityError', message: /3 bytes/ })
  await t.rejects(decryptJson(key, { ...record, encryptedBlob: '%%%' }), { name: 'IntegrityError', message: /not base64/ })
})
