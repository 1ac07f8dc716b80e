// The ceiling the service is measured against: a Fastify route that runs exactly one query per
// request and nothing else (no validation, no logging, no preconditions, no prepared statements,
// no history: an upload replaces the version it finds), on the service's own tables (the account
// in user_sync_data naming its current version in user_sync_versions, sql/005_versions.sql; the
// ciphertext as bytes, sql/006_ciphertext_bytes.sql).
// Started by bench/run.ts as its own process; never part of the service.
import Fastify from 'fastify'
import pg from 'pg'

const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL, max: 10 })
pool.on('error', () => {})
const app = Fastify({ logger: false, bodyLimit: 2 * 1024 * 1024 })

app.get<{ Params: { id: string } }>('/api/sync/:id', async (request, reply) => {
  // The ciphertext is bytes (sql/006_ciphertext_bytes.sql); base64 on the wire, as PostgreSQL
  // encodes it, without its line breaks.
  const { rows } = await pool.query(
    `SELECT encode(v.ciphertext, 'base64') AS "encryptedBlob", v.iv, v.timestamp, v.checksum
     FROM user_sync_data a JOIN user_sync_versions v USING (user_id, version) WHERE a.user_id = $1`,
    [request.params.id])
  if (rows.length === 0) return reply.code(404).send({ error: 'User not found' })
  return { ...rows[0], encryptedBlob: rows[0].encryptedBlob.replaceAll('\n', '') }
})

app.put<{ Params: { id: string }, Body: { encryptedBlob: string, iv: string, timestamp: number, checksum: string } }>(
  '/api/sync/:id', async (request) => {
    const { encryptedBlob, iv, timestamp, checksum } = request.body
    const bytes = Buffer.from(encryptedBlob, 'base64')
    await pool.query(
      `WITH account AS (
         INSERT INTO user_sync_data (user_id, timestamp) VALUES ($1, $4)
         ON CONFLICT (user_id) DO UPDATE SET version = user_sync_data.version + 1, timestamp = EXCLUDED.timestamp
         RETURNING version, etag),
       replaced AS (DELETE FROM user_sync_versions WHERE user_id = $1 AND version < (SELECT version FROM account))
       INSERT INTO user_sync_versions (user_id, version, etag, ciphertext, iv, timestamp, checksum, blob_size)
       SELECT $1, version, etag, $2, $3, $4, $5, $6 FROM account`,
      [request.params.id, bytes, iv, timestamp, checksum, bytes.length])
    return { success: true }
  })

app.post<{ Params: { id: string } }>('/api/sync/:id/verify', async (request) => {
  const { rows } = await pool.query('SELECT EXISTS (SELECT 1 FROM user_sync_data WHERE user_id = $1) AS exists', [request.params.id])
  return { exists: rows[0].exists }
})

app.delete<{ Params: { id: string } }>('/api/sync/:id', async (request) => {
  await pool.query('DELETE FROM user_sync_data WHERE user_id = $1', [request.params.id])
  return { success: true }
})

await app.listen({ port: Number(process.env.PORT), host: '127.0.0.1' })
process.on('SIGTERM', () => { app.close().then(() => pool.end()).then(() => process.exit(0)) })
