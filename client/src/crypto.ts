import { concat, fromBase64, fromBase64Url, toBase64, toBase64Url, toHex } from './encoding.ts'
import { IntegrityError } from './errors.ts'

const ALGORITHM = 'AES-GCM'
const IV_BYTES = 12
const TOKEN_INFO = 'logikids-sync/access-token v1'
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i

/** The body of PUT /api/sync/:userId and of a 200 GET: what the service stores, all opaque to it. */
export interface WireRecord {
  encryptedBlob: string
  iv: string
  timestamp: number
  checksum: string
}

/** A new AES-256-GCM key, extractable so that it can be shown to the second device and kept by the app. */
export async function generateKey (): Promise<CryptoKey> {
  return await crypto.subtle.generateKey({ name: ALGORITHM, length: 256 }, true, ['encrypt', 'decrypt'])
}

/** The key as 43 characters (base64url of its 32 bytes): small enough for any QR code. */
export async function exportKey (key: CryptoKey): Promise<string> {
  return toBase64Url(new Uint8Array(await crypto.subtle.exportKey('raw', key)))
}

/**
 * A key from exportKey's 43 characters, or from the JSON Web Key the field clients put in their
 * pairing QR codes (as a JSON string or an object). Extractable, like generateKey's.
 */
export async function importKey (exported: string | JsonWebKey): Promise<CryptoKey> {
  const usages: KeyUsage[] = ['encrypt', 'decrypt']
  let key: CryptoKey
  if (typeof exported === 'object' || exported.trimStart().startsWith('{')) {
    let jwk: JsonWebKey
    try {
      jwk = typeof exported === 'object' ? exported : JSON.parse(exported) as JsonWebKey
      key = await crypto.subtle.importKey('jwk', jwk, { name: ALGORITHM }, true, usages)
    } catch {
      throw new TypeError('not an exported key: a JSON Web Key that is not an AES-GCM key')
    }
  } else {
    let raw: Uint8Array<ArrayBuffer>
    try {
      raw = fromBase64Url(exported.trim())
    } catch {
      throw new TypeError('not an exported key: expected 43 base64url characters or a JSON Web Key')
    }
    if (raw.length !== 32) throw new TypeError(`not an exported key: ${raw.length} bytes, an AES-256 key has 32`)
    key = await crypto.subtle.importKey('raw', raw, { name: ALGORITHM }, true, usages)
  }
  const bits = (key.algorithm as AesKeyAlgorithm).length
  if (bits !== 256) throw new TypeError(`not an exported key: an AES-${bits} key, the service's clients use AES-256`)
  return key
}

/** A new random user id (UUID v4): the only name of the user's record on the service. */
export function newUserId (): string {
  return crypto.randomUUID()
}

export function isUserId (value: string): boolean {
  return UUID.test(value)
}

/**
 * Everything a second device needs, as one line for a QR code: `<userId>.<exported key>`
 * (80 characters). Whoever sees it can read and change the user's data: show it only on the device.
 */
export async function pairingCode (userId: string, key: CryptoKey): Promise<string> {
  if (!isUserId(userId)) throw new TypeError('not a user id (a UUID)')
  return `${userId.toLowerCase()}.${await exportKey(key)}`
}

/** The user id and key of a pairingCode, checked. */
export async function readPairingCode (code: string): Promise<{ userId: string, key: CryptoKey }> {
  // A scanner or a paste may break the line: no character of a code is white space.
  const [userId, exported, ...rest] = code.replace(/\s+/g, '').split('.')
  if (userId === undefined || exported === undefined || rest.length > 0 || !isUserId(userId)) {
    throw new TypeError('not a pairing code: expected <user id>.<key>')
  }
  return { userId: userId.toLowerCase(), key: await importKey(exported) }
}

/**
 * The user's access token (docs/sync-protocol.md "Deriving the token"): HKDF-SHA256 of the raw
 * key, salted with the user id's 16 bytes, as base64url. The server keeps only its hash.
 */
export async function deriveAccessToken (key: CryptoKey | Uint8Array, userId: string): Promise<string> {
  if (!isUserId(userId)) throw new TypeError('not a user id (a UUID)')
  let raw: Uint8Array<ArrayBuffer>
  if (key instanceof Uint8Array) {
    raw = new Uint8Array(key)
  } else {
    if (!key.extractable) {
      throw new TypeError('the key is not extractable: pass its raw bytes, or the token itself as the `token` option')
    }
    raw = new Uint8Array(await crypto.subtle.exportKey('raw', key))
  }
  const hex = userId.replace(/-/g, '')
  const salt = new Uint8Array(16)
  for (let i = 0; i < 16; i++) salt[i] = parseInt(hex.slice(i * 2, i * 2 + 2), 16)
  const ikm = await crypto.subtle.importKey('raw', raw, 'HKDF', false, ['deriveBits'])
  const bits = await crypto.subtle.deriveBits(
    { name: 'HKDF', hash: 'SHA-256', salt, info: new TextEncoder().encode(TOKEN_INFO) }, ikm, 256)
  return toBase64Url(new Uint8Array(bits))
}

export async function sha256Hex (bytes: Uint8Array<ArrayBuffer> | string): Promise<string> {
  const data = typeof bytes === 'string' ? new TextEncoder().encode(bytes) : bytes
  return toHex(new Uint8Array(await crypto.subtle.digest('SHA-256', data)))
}

/**
 * Encrypts JSON text exactly as the field clients do: UTF-8, AES-256-GCM under a fresh random
 * 12-byte iv, the ciphertext (with its tag) without the iv as `encryptedBlob`, and the checksum
 * over iv + ciphertext, the newer field clients' form.
 */
export async function encryptJson (key: CryptoKey, json: string, timestamp: number): Promise<WireRecord> {
  const iv = crypto.getRandomValues(new Uint8Array(IV_BYTES))
  const ciphertext = new Uint8Array(await crypto.subtle.encrypt({ name: ALGORITHM, iv }, key, new TextEncoder().encode(json)))
  return {
    encryptedBlob: toBase64(ciphertext),
    iv: toBase64(iv),
    timestamp,
    checksum: await sha256Hex(concat(iv, ciphertext))
  }
}

/** The decoded size of the blob encryptJson makes of `json`: its UTF-8 bytes plus GCM's 16-byte tag. */
export function ciphertextBytes (json: string): number {
  return new TextEncoder().encode(json).length + 16
}

/**
 * The JSON text of a downloaded record. Its checksum must be the SHA-256 of the ciphertext (older
 * field clients) or of iv + ciphertext (newer ones and this client); anything else, or a record
 * that does not decrypt with this key, is an IntegrityError.
 */
export async function decryptJson (key: CryptoKey, record: WireRecord): Promise<string> {
  let iv: Uint8Array<ArrayBuffer>
  let ciphertext: Uint8Array<ArrayBuffer>
  try {
    iv = fromBase64(record.iv)
    ciphertext = fromBase64(record.encryptedBlob)
  } catch (err) {
    throw new IntegrityError('the record is not base64', { cause: err })
  }
  if (iv.length !== IV_BYTES) throw new IntegrityError(`the record's iv has ${iv.length} bytes, not ${IV_BYTES}`)
  const checksum = typeof record.checksum === 'string' ? record.checksum.toLowerCase() : ''
  if (checksum !== await sha256Hex(concat(iv, ciphertext)) && checksum !== await sha256Hex(ciphertext)) {
    throw new IntegrityError('checksum mismatch: the record was damaged or replaced on the way')
  }
  let plaintext: ArrayBuffer
  try {
    plaintext = await crypto.subtle.decrypt({ name: ALGORITHM, iv }, key, ciphertext)
  } catch (err) {
    throw new IntegrityError('the record does not decrypt with this key (another key, or altered data)', { cause: err })
  }
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(plaintext)
  } catch {
    throw new IntegrityError('the decrypted record is not UTF-8 text: was it written by another app?')
  }
}
