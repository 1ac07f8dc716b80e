// Base64 and hex for blobs up to the service's 1,000,000 bytes. Spreading a large array into
// String.fromCharCode (the field client's way) overflows the call stack above about 100 KB:
// these go through the bytes in chunks instead.

// Well below every engine's argument limit, and large enough that the calls cost nothing.
const CHUNK = 0x8000

/** Standard base64 with padding (RFC 4648 section 4), as the service stores it. */
export function toBase64 (bytes: Uint8Array): string {
  const parts: string[] = []
  for (let start = 0; start < bytes.length; start += CHUNK) {
    parts.push(String.fromCharCode.apply(null, bytes.subarray(start, start + CHUNK) as unknown as number[]))
  }
  return btoa(parts.join(''))
}

/** Decodes standard base64; throws a TypeError on anything else. */
export function fromBase64 (text: string): Uint8Array<ArrayBuffer> {
  const binary = atob(text)
  const bytes = new Uint8Array(binary.length)
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i)
  return bytes
}

/** base64url without padding (RFC 4648 section 5): access tokens and exported keys. */
export function toBase64Url (bytes: Uint8Array): string {
  return toBase64(bytes).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '')
}

export function fromBase64Url (text: string): Uint8Array<ArrayBuffer> {
  if (!/^[A-Za-z0-9_-]*$/.test(text) || text.length % 4 === 1) throw new TypeError('not base64url')
  const standard = text.replace(/-/g, '+').replace(/_/g, '/')
  return fromBase64(standard + '='.repeat((4 - (standard.length % 4)) % 4))
}

const HEX = Array.from({ length: 256 }, (_, byte) => byte.toString(16).padStart(2, '0'))

/** Lowercase hex, as the service's checksums are written. */
export function toHex (bytes: Uint8Array): string {
  let text = ''
  for (const byte of bytes) text += HEX[byte]
  return text
}

export function concat (a: Uint8Array, b: Uint8Array): Uint8Array<ArrayBuffer> {
  const joined = new Uint8Array(a.length + b.length)
  joined.set(a, 0)
  joined.set(b, a.length)
  return joined
}
