import fp from 'fastify-plugin'
import type { FastifyBaseLogger } from 'fastify'
import type { QueryConfig, QueryResult, QueryResultRow } from 'pg'
import { decodedBase64Bytes, type SyncPayload } from '../schemas/sync.ts'
import { pseudonym, safeError } from '../logging.ts'

/** What the storage needs of a pool: one query at a time (pg's Pool, or a test's Client). */
export interface Queryable {
  query<R extends QueryResultRow>(config: QueryConfig): Promise<QueryResult<R>>
}

// Every statement is named so that pg prepares it once per connection and then only binds.
// created_at is never in the update list, so it keeps the first upload's time.
const STORE = {
  name: 'sync-store',
  text: `INSERT INTO user_sync_data (user_id, encrypted_blob, iv, timestamp, checksum, blob_size)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (user_id) DO UPDATE SET
           encrypted_blob = EXCLUDED.encrypted_blob, iv = EXCLUDED.iv, timestamp = EXCLUDED.timestamp,
           checksum = EXCLUDED.checksum, blob_size = EXCLUDED.blob_size, last_accessed = now()`
}
// A download is an access: the inactivity rule counts from the last one.
const GET = {
  name: 'sync-get',
  text: `UPDATE user_sync_data SET last_accessed = now() WHERE user_id = $1
         RETURNING encrypted_blob, iv, timestamp, checksum, blob_size`
}
const DELETE = { name: 'sync-delete', text: 'DELETE FROM user_sync_data WHERE user_id = $1' }
const EXISTS = { name: 'sync-exists', text: 'SELECT EXISTS (SELECT 1 FROM user_sync_data WHERE user_id = $1) AS exists' }
const ALL_USER_IDS = { name: 'sync-all-user-ids', text: 'SELECT user_id FROM user_sync_data ORDER BY user_id' }
const DELETE_INACTIVE = {
  name: 'sync-delete-inactive',
  text: 'DELETE FROM user_sync_data WHERE last_accessed < now() - make_interval(days => $1)'
}

interface StoredRow {
  encrypted_blob: string
  iv: string
  timestamp: string
  checksum: string
  blob_size: number
}

// A connection the server closed (restart, failover, pg_terminate_backend) fails the one query
// that finds it; every operation here is idempotent, so it is tried once more on a fresh one.
const CONNECTION_LOST_CODES = new Set(['57P01', '57P02', 'ECONNRESET', 'EPIPE'])
function isConnectionLost (err: unknown): boolean {
  if (!(err instanceof Error)) return false
  const code = (err as Error & { code?: string }).code
  return (code !== undefined && CONNECTION_LOST_CODES.has(code)) || err.message.includes('Connection terminated unexpectedly')
}

/** The six key-value operations of the sync store, one SQL round trip each. */
export function createStorage (db: Queryable, log: FastifyBaseLogger) {
  async function run<R extends QueryResultRow> (statement: { name: string, text: string }, values: unknown[]): Promise<QueryResult<R>> {
    const query = { ...statement, values }
    try {
      return await db.query<R>(query)
    } catch (err) {
      if (!isConnectionLost(err)) throw err
      log.warn({ err: safeError(err), statement: statement.name }, 'database connection lost mid-query, retrying once')
      return await db.query<R>(query)
    }
  }

  // Logs name a user by pseudonym only, and never carry the blob, iv or checksum.
  function logged (op: string, userId: string | undefined, started: bigint, extra: Record<string, unknown> = {}) {
    const ms = Number(process.hrtime.bigint() - started) / 1e6
    log.info({ op, user: userId === undefined ? undefined : pseudonym(userId), ms: Math.round(ms * 100) / 100, ...extra }, 'storage')
  }

  return {
    /** Creates or replaces the user's record; returns the blob's decoded size in bytes. */
    async store (userId: string, payload: SyncPayload): Promise<number> {
      const started = process.hrtime.bigint()
      const bytes = decodedBase64Bytes(payload.encryptedBlob)
      await run(STORE, [userId, payload.encryptedBlob, payload.iv, payload.timestamp, payload.checksum, bytes])
      logged('store', userId, started, { bytes })
      return bytes
    },

    /** The user's record, or null; marks the record as accessed now. */
    async get (userId: string): Promise<SyncPayload | null> {
      const started = process.hrtime.bigint()
      const { rows: [row] } = await run<StoredRow>(GET, [userId])
      logged('get', userId, started, { bytes: row?.blob_size ?? 0, found: row !== undefined })
      if (row === undefined) return null
      return { encryptedBlob: row.encrypted_blob, iv: row.iv, timestamp: Number(row.timestamp), checksum: row.checksum }
    },

    /** Removes the user's record; true when there was one. */
    async delete (userId: string): Promise<boolean> {
      const started = process.hrtime.bigint()
      const { rowCount } = await run(DELETE, [userId])
      logged('delete', userId, started, { deleted: rowCount === 1 })
      return rowCount === 1
    },

    async exists (userId: string): Promise<boolean> {
      const { rows: [row] } = await run<{ exists: boolean }>(EXISTS, [userId])
      return row?.exists === true
    },

    async getAllUserIds (): Promise<string[]> {
      const { rows } = await run<{ user_id: string }>(ALL_USER_IDS, [])
      return rows.map((row) => row.user_id)
    },

    /** Deletes every record not accessed for more than `inactiveDays` days; returns how many. */
    async deleteInactive (inactiveDays: number): Promise<number> {
      if (!Number.isInteger(inactiveDays) || inactiveDays < 1) {
        throw new RangeError(`inactiveDays must be a whole number of days, at least 1 (got ${inactiveDays})`)
      }
      const started = process.hrtime.bigint()
      const { rowCount } = await run(DELETE_INACTIVE, [inactiveDays])
      logged('cleanup', undefined, started, { inactiveDays, deleted: rowCount ?? 0 })
      return rowCount ?? 0
    }
  }
}

export type Storage = ReturnType<typeof createStorage>

declare module 'fastify' {
  interface FastifyInstance {
    storage: Storage
  }
}

export default fp(async function storage (app) {
  app.decorate('storage', createStorage(app.pg.pool, app.log.child({ component: 'storage' })))
}, { name: 'storage', dependencies: ['db'] })
