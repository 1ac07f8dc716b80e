// The clients in the field, step by step as they encrypt, upload, download and decrypt (the
// app's data/core/crypto.ts and data/plugins/sync.ts), so that this package is tested against
// what real devices send and accept. Two releases exist: the older checksums the ciphertext
// alone, the newer iv + ciphertext. They send no access token. Keys travel as JSON Web Keys.

export type ChecksumForm = 'ciphertext' | 'iv+ciphertext'

function arrayToBase64 (bytes: Uint8Array): string {
  let binary = ''
  for (let i = 0; i < bytes.byteLength; i++) binary += String.fromCharCode(bytes[i]!)
  return btoa(binary)
}

function base64ToArray (base64: string): Uint8Array<ArrayBuffer> {
  const binary = atob(base64)
  const bytes = new Uint8Array(binary.length)
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i)
  return bytes
}

async function calculateChecksum (data: Uint8Array<ArrayBuffer>): Promise<string> {
  const hashArray = Array.from(new Uint8Array(await crypto.subtle.digest('SHA-256', data)))
  return hashArray.map((b) => b.toString(16).padStart(2, '0')).join('')
}

export async function fieldGenerateKey (): Promise<CryptoKey> {
  return await crypto.subtle.generateKey({ name: 'AES-GCM', length: 256 }, true, ['encrypt', 'decrypt'])
}

/** The key as the field clients' pairing QR code carries it: a JSON Web Key as a JSON string. */
export async function fieldQrKey (key: CryptoKey): Promise<string> {
  return JSON.stringify(await crypto.subtle.exportKey('jwk', key))
}

export async function fieldImportQrKey (qrKey: string): Promise<CryptoKey> {
  return await crypto.subtle.importKey('jwk', JSON.parse(qrKey), { name: 'AES-GCM', length: 256 }, true, ['encrypt', 'decrypt'])
}

async function encrypt (key: CryptoKey, data: unknown): Promise<string> {
  const iv = crypto.getRandomValues(new Uint8Array(12))
  const dataBytes = new TextEncoder().encode(JSON.stringify(data))
  const encryptedData = await crypto.subtle.encrypt({ name: 'AES-GCM', iv }, key, dataBytes)
  const combined = new Uint8Array(iv.length + encryptedData.byteLength)
  combined.set(iv, 0)
  combined.set(new Uint8Array(encryptedData), iv.length)
  return arrayToBase64(combined)
}

async function decrypt (key: CryptoKey, encryptedString: string): Promise<unknown> {
  const combined = base64ToArray(encryptedString)
  const decryptedData = await crypto.subtle.decrypt({ name: 'AES-GCM', iv: combined.slice(0, 12) }, key, combined.slice(12))
  return JSON.parse(new TextDecoder().decode(decryptedData))
}

/** The field client's upload: PUT without conditions or token; `timestamp` from the data. */
export async function fieldUpload (baseUrl: string, userId: string, key: CryptoKey, data: { timestamp: number }, form: ChecksumForm): Promise<Response> {
  const encrypted = await encrypt(key, data)
  const encryptedBytes = Uint8Array.from(atob(encrypted), (c) => c.charCodeAt(0))
  const iv = encryptedBytes.slice(0, 12)
  const ciphertext = encryptedBytes.slice(12)
  const payload = {
    // The spread is what breaks above about 100 KB: keep test data small.
    encryptedBlob: btoa(String.fromCharCode(...ciphertext)),
    iv: btoa(String.fromCharCode(...iv)),
    timestamp: data.timestamp,
    checksum: await calculateChecksum(form === 'iv+ciphertext' ? encryptedBytes : ciphertext)
  }
  return await fetch(`${baseUrl}/api/sync/${userId}`, {
    method: 'PUT',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(payload)
  })
}

/** The field client's download: null on 404; the newer release's checksum check, then decrypt. */
export async function fieldDownload (baseUrl: string, userId: string, key: CryptoKey, form: ChecksumForm): Promise<unknown> {
  const response = await fetch(`${baseUrl}/api/sync/${userId}`)
  if (response.status === 404) return null
  if (!response.ok) throw new Error(`Download failed: ${response.status}`)
  const payload = await response.json() as { iv: string, encryptedBlob: string, checksum: string }
  const iv = Uint8Array.from(atob(payload.iv), (c) => c.charCodeAt(0))
  const ciphertext = Uint8Array.from(atob(payload.encryptedBlob), (c) => c.charCodeAt(0))
  const combined = new Uint8Array(iv.length + ciphertext.length)
  combined.set(iv, 0)
  combined.set(ciphertext, iv.length)
  const calculated = await calculateChecksum(form === 'iv+ciphertext' ? combined : ciphertext)
  if (calculated !== payload.checksum) throw new Error('Data integrity check failed - checksum mismatch')
  return await decrypt(key, btoa(String.fromCharCode(...combined)))
}
