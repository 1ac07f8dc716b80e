import { Type, type Static } from '@sinclair/typebox'

/** Largest ciphertext the store keeps, in decoded bytes (the table's blob_size_limit). */
export const MAX_BLOB_BYTES = 1_000_000

/** The base64 length of a MAX_BLOB_BYTES blob: 1,333,336 characters. */
export const MAX_BLOB_BASE64_CHARS = Math.ceil(MAX_BLOB_BYTES / 3) * 4

/** Largest request body: a full MAX_BLOB_BYTES blob as base64 JSON plus the other fields and some whitespace. */
export const BODY_LIMIT = MAX_BLOB_BASE64_CHARS + 8 * 1024

/**
 * A user id: a UUID in any case, except the nil UUID and the all-ones one (RFC 9562 "max"),
 * which any client could pick by hand: shared buckets anyone could read and overwrite.
 */
export const USER_ID_PATTERN = '^(?!0{8}-0{4}-0{4}-0{4}-0{12}$)(?![fF]{8}-[fF]{4}-[fF]{4}-[fF]{4}-[fF]{12}$)' +
  '[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'

// The value of each base64 character, to check the last one's unused bits.
const BASE64_VALUE = new Map([...'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'].map((char, value) => [char, value]))

// The bytes of the text the last check passed: the upload it checked stores them (base64Bytes),
// so that a blob is decoded once. One at a time: another check in between only costs a decode.
let lastChecked: { text: string, bytes: Buffer } | undefined

/**
 * Canonical standard (RFC 4648 section 4) base64 with padding: what the clients send (btoa,
 * Buffer, Base64.encode). Node's decoder skips what is not base64 (and takes base64url's `-_`),
 * so the text is refused when the bytes are fewer than its length and padding promise, when it
 * holds `-`, `_` or a character past ASCII (base64Decoded), or when the last character has
 * unused bits set (`QR==` for `QQ==`), which
 * bytes could not give back. About 0.4 ms per 1 MB blob, all native, against about 7 ms for the
 * regular expression /[^A-Za-z0-9+/]/ that this replaced; and the bytes are kept for the storage.
 */
export function isStandardBase64 (value: string): boolean {
  const padding = value.endsWith('==') ? 2 : value.endsWith('=') ? 1 : 0
  const last = BASE64_VALUE.get(value[value.length - 1 - padding] ?? '')
  // The last character holds 2 (padding 2) or 4 (padding 1) bits that are not data.
  if (last === undefined || (padding === 2 && last % 16 !== 0) || (padding === 1 && last % 4 !== 0)) return false
  const bytes = base64Decoded(value)
  if (bytes === null) return false
  lastChecked = { text: value, bytes }
  return true
}

/**
 * The bytes of standard base64 text with its padding, canonical or not (`QR==` is `A`, like
 * `QQ==`), or null for any other text: then it held a character outside the alphabet, `=` but at
 * its end, or a wrong length. So text this accepts holds nothing JSON would escape. Node's decoder
 * reads only the low byte of a character (`\u0155` as `U`): any character past ASCII is refused
 * first, by the text's UTF-8 length (native, about 0.15 ms per 1 MB).
 */
export function base64Decoded (value: string): Buffer | null {
  if (value.length === 0 || value.length % 4 !== 0 || Buffer.byteLength(value) !== value.length ||
    value.includes('-') || value.includes('_')) return null
  const padding = value.endsWith('==') ? 2 : value.endsWith('=') ? 1 : 0
  const bytes = Buffer.from(value, 'base64')
  return bytes.length === (value.length / 4) * 3 - padding ? bytes : null
}

/** The bytes of base64 text that isStandardBase64 accepted: those it decoded when it was the last it checked. */
export function base64Bytes (text: string): Buffer {
  const checked = lastChecked
  lastChecked = undefined
  return checked !== undefined && checked.text === text ? checked.bytes : Buffer.from(text, 'base64')
}

/** Decoded size of a valid standard base64 string, from its length and padding alone. */
export function decodedBase64Bytes (value: string): number {
  const padding = value.endsWith('==') ? 2 : value.endsWith('=') ? 1 : 0
  return (value.length / 4) * 3 - padding
}

/** JSON Schema format `base64`, registered with Fastify's validator in app.ts. */
export const BASE64_FORMAT = { type: 'string', validate: isStandardBase64 } as const

export const UserParamsSchema = Type.Object({
  userId: Type.String({
    pattern: USER_ID_PATTERN,
    description: 'The user id (a UUID, not the nil or all-ones one) the client generated; it is the only key to the record'
  })
})
export type UserParams = Static<typeof UserParamsSchema>

export const SyncPayloadSchema = Type.Object({
  // No minLength: Ajv counts a string's length code point by code point (about 1 ms per 100 KB),
  // and the base64 format already refuses an empty string.
  encryptedBlob: Type.String({
    format: 'base64',
    description: `AES-256-GCM ciphertext, canonical standard base64 with padding, at most ${MAX_BLOB_BYTES} bytes decoded`
  }),
  iv: Type.String({ pattern: '^[A-Za-z0-9+/]{16}$', description: 'initialisation vector, 16 base64 characters' }),
  timestamp: Type.Integer({
    minimum: 1,
    maximum: Number.MAX_SAFE_INTEGER,
    description: "the client's clock when it encrypted the data (opaque to the server)"
  }),
  checksum: Type.String({ pattern: '^[a-f0-9]{64}$', description: 'SHA-256 of the ciphertext, lowercase hex' })
}, { additionalProperties: false })
export type SyncPayload = Static<typeof SyncPayloadSchema>

/**
 * A stored payload as GET answers it: the upload's fields. The blob's format is fast-json-stringify's
 * `unsafe`: written between quotes as it is, without the scan for characters to escape (about
 * 3 ms of a 1 MB download), since it is base64 from the database, which has none. The OpenAPI
 * document shows it as `base64`, like the upload's (plugins/docs.ts).
 */
export const StoredPayloadSchema = Type.Object({
  ...SyncPayloadSchema.properties,
  encryptedBlob: Type.String({ format: 'unsafe', description: SyncPayloadSchema.properties.encryptedBlob.description })
}, { additionalProperties: false })

export const SuccessSchema = Type.Object({ success: Type.Literal(true) })

export const VerifySchema = Type.Object({ exists: Type.Boolean() })

const IfMatch = Type.Optional(Type.String({ maxLength: 2048, description: 'write only if the current ETag is one of these (or *: if there is data)' }))
const IfNoneMatch = Type.Optional(Type.String({ maxLength: 2048, description: 'an ETag the client holds (GET: 304 if current), or * (PUT: create only)' }))

/** The conditional-request headers (RFC 9110 section 13) of PUT, which honours both. */
export const ConditionalHeadersSchema = Type.Object({ 'if-match': IfMatch, 'if-none-match': IfNoneMatch })
/** GET honours If-None-Match only. */
export const IfNoneMatchHeadersSchema = Type.Object({ 'if-none-match': IfNoneMatch })
/** DELETE honours If-Match only. */
export const IfMatchHeadersSchema = Type.Object({ 'if-match': IfMatch })

/** An access token (docs/sync-protocol.md): base64url without padding, 43 to 128 characters. */
export const ACCESS_TOKEN_PATTERN = '^[A-Za-z0-9_-]{43,128}$'

/** The body of PUT /api/sync/:userId/token: the token that replaces the current one. */
export const TokenBodySchema = Type.Object({
  token: Type.String({
    pattern: ACCESS_TOKEN_PATTERN,
    description: 'the new access token (base64url without padding, 43 to 128 characters); the current one goes in Authorization'
  })
}, { additionalProperties: false })

/**
 * A version number in a URL: a positive whole number as GET /api/sync/:userId/versions lists it,
 * in decimal without leading zeros (the service does not coerce types: a string pattern, then
 * Number(), which the route checks is exact: at most Number.MAX_SAFE_INTEGER).
 */
export const VersionParamsSchema = Type.Object({
  userId: UserParamsSchema.properties.userId,
  version: Type.String({ pattern: '^[1-9][0-9]{0,15}$', description: 'a version number (a positive whole number), as the versions list gives it' })
})

export const VersionInfoSchema = Type.Object({
  version: Type.Integer({ description: 'the version number (64-bit: about 1.8e15 today): never used twice for a user, not even after a DELETE' }),
  etag: Type.String({ description: 'the ETag the version had (and has, when current), without quotes' }),
  timestamp: Type.Integer({ description: "the client's timestamp stored with the version (64-bit)" }),
  storedAt: Type.String({ format: 'date-time', description: 'when the server stored it' }),
  size: Type.Integer({ description: 'decoded bytes of its encryptedBlob' }),
  current: Type.Boolean({ description: 'true for the version GET /api/sync/{userId} returns' })
})

export const VersionListSchema = Type.Object({
  versions: Type.Array(VersionInfoSchema, { description: 'newest first: the current version, then the kept ones' })
})
