import fp from 'fastify-plugin'
import type { FastifyBaseLogger } from 'fastify'
import type { QueryConfig, QueryResult, QueryResultRow } from 'pg'
import { decodedBase64Bytes, type SyncPayload } from '../schemas/sync.ts'
import type { Logger } from 'pino'
import { pseudonym } from '../logging.ts'
import { POOL_SATURATED, isConnectionLost, isTransactionAborted } from './db.ts'

/** What the storage needs of a pool: one query at a time (pg's Pool, or a test's Client). */
export interface Queryable {
  query<R extends QueryResultRow>(config: QueryConfig): Promise<QueryResult<R>>
}

// The entity tag of a record: its version and a random part that every write draws anew
// (sql/003_etag.sql), so that no tag is ever repeated for other content: not after a delete
// and a new upload, and not after a restore from backup. Stored, so that a precondition is
// checked in the same statement as the write.
const ETAG = 'etag'
const RANDOM_PART = "replace(gen_random_uuid()::text, '-', '')"
const COLUMNS = 'user_id, encrypted_blob, iv, timestamp, checksum, blob_size, etag'
const PLACEHOLDERS = `$1, $2, $3, $4, $5, $6, '1-' || ${RANDOM_PART}`
// created_at is never in an update list, so it keeps the first upload's time.
const SET_PAYLOAD = `encrypted_blob = $2, iv = $3, timestamp = $4, checksum = $5, blob_size = $6,
  version = user_sync_data.version + 1, etag = (user_sync_data.version + 1) || '-' || ${RANDOM_PART}, last_accessed = now()`

// Every statement is named so that pg prepares it once per connection and then only binds.
const STORE = {
  name: 'sync-store',
  text: `INSERT INTO user_sync_data (${COLUMNS}) VALUES (${PLACEHOLDERS})
         ON CONFLICT (user_id) DO UPDATE SET ${SET_PAYLOAD}
         RETURNING ${ETAG} AS etag`
}
// Conditional writes return the new tag when they wrote, else the current tag, in one round trip.
// A plain sub-select would see the statement's snapshot, which misses the write of a device that
// won a race a moment earlier; FOR SHARE waits for such a write and reads the committed row.
const CURRENT_ETAG = `SELECT ${ETAG} FROM user_sync_data WHERE user_id = $1 FOR SHARE`
const STORE_IF_MATCH = {
  name: 'sync-store-if-match',
  text: `WITH written AS (
           UPDATE user_sync_data SET ${SET_PAYLOAD}
           WHERE user_id = $1 AND ${ETAG} = ANY($7::text[]) RETURNING ${ETAG} AS etag)
         SELECT (SELECT etag FROM written) AS etag, (${CURRENT_ETAG}) AS current`
}
const STORE_IF_EXISTS = {
  name: 'sync-store-if-exists',
  text: `UPDATE user_sync_data SET ${SET_PAYLOAD} WHERE user_id = $1 RETURNING ${ETAG} AS etag`
}
const STORE_IF_ABSENT = {
  name: 'sync-store-if-absent',
  text: `WITH written AS (
           INSERT INTO user_sync_data (${COLUMNS}) VALUES (${PLACEHOLDERS})
           ON CONFLICT (user_id) DO NOTHING RETURNING ${ETAG} AS etag)
         SELECT (SELECT etag FROM written) AS etag, (${CURRENT_ETAG}) AS current`
}
// A download is an access: the inactivity rule counts from the last one. The row is rewritten
// at most once a day (a write per GET would cost a WAL flush per download, and the rule needs
// no finer grain), so most downloads are pure reads. When the client already holds the
// current version (If-None-Match), the blob is not even sent over.
const NOT_MODIFIED = `(${ETAG} = ANY($2::text[]) OR '*' = ANY($2::text[]))`
const GET = {
  name: 'sync-get',
  text: `WITH touched AS (
           UPDATE user_sync_data SET last_accessed = now()
           WHERE user_id = $1 AND last_accessed < now() - interval '1 day' RETURNING 1)
         SELECT ${ETAG} AS etag, ${NOT_MODIFIED} AS not_modified,
           CASE WHEN ${NOT_MODIFIED} THEN NULL ELSE encrypted_blob END AS encrypted_blob,
           iv, timestamp, checksum, blob_size
         FROM user_sync_data WHERE user_id = $1`
}
const DELETE = { name: 'sync-delete', text: 'DELETE FROM user_sync_data WHERE user_id = $1' }
const DELETE_IF_MATCH = {
  name: 'sync-delete-if-match',
  text: `WITH deleted AS (
           DELETE FROM user_sync_data WHERE user_id = $1 AND ($3 OR ${ETAG} = ANY($2::text[])) RETURNING 1)
         SELECT (SELECT count(*) FROM deleted)::int AS deleted, (${CURRENT_ETAG}) AS current`
}
const ETAG_OF = { name: 'sync-etag', text: `SELECT ${ETAG} AS etag FROM user_sync_data WHERE user_id = $1` }
const ALL_USER_IDS = { name: 'sync-all-user-ids', text: 'SELECT user_id FROM user_sync_data ORDER BY user_id' }
// Cleanup deletes in batches, each its own short transaction, so that a large table is never
// locked for long and uploads go on in between; SKIP LOCKED passes over rows being written.
const DELETE_INACTIVE_BATCH = {
  name: 'sync-delete-inactive',
  text: `DELETE FROM user_sync_data WHERE user_id IN (
           SELECT user_id FROM user_sync_data WHERE last_accessed < now() - make_interval(days => $1)
           LIMIT $2 FOR UPDATE SKIP LOCKED)`
}
const COUNT_INACTIVE = {
  name: 'sync-count-inactive',
  text: 'SELECT count(*)::int AS n FROM user_sync_data WHERE last_accessed < now() - make_interval(days => $1)'
}
const TOTALS = {
  name: 'sync-totals',
  text: 'SELECT count(*)::int AS users, coalesce(sum(blob_size), 0)::float8 AS bytes FROM user_sync_data'
}

interface StoredRow {
  etag: string
  not_modified: boolean
  encrypted_blob: string | null
  iv: string
  timestamp: string
  checksum: string
  blob_size: number
}

/**
 * HTTP preconditions, reduced to what the storage checks: `ifMatch` holds entity-tag values
 * (without quotes) of which the current one must be one, or '*' for "any existing record";
 * `ifNoneMatch: '*'` means "only if there is no record yet".
 */
export interface WritePrecondition {
  ifMatch?: string[] | '*'
  ifNoneMatch?: '*'
}

export type StoreResult =
  | { stored: true, etag: string, bytes: number }
  | { stored: false, currentEtag: string | null }

export type DeleteResult =
  | { deleted: boolean, preconditionFailed?: undefined }
  | { deleted: false, preconditionFailed: true, currentEtag: string | null }

/** A stored record: its entity tag and, unless the caller already holds that version, its data. */
export interface StoredRecord {
  etag: string
  payload: SyncPayload | null
}

// A connection the server closed (restart, failover, pg_terminate_backend) fails the one query
// that finds it (isConnectionLost). Idempotent statements are tried once more on a fresh
// connection; conditional writes are not, since the first attempt may have committed and a
// retry would then fail its own precondition. A serialization failure or deadlock
// (isTransactionAborted) is different: PostgreSQL rolled the statement back, so any statement
// is tried once more.

/** Receives the duration of every statement (seconds), for the metrics. */
export type ObserveStatement = (statement: string, outcome: 'ok' | 'error', seconds: number) => void

/** The key-value operations of the sync store, one SQL round trip each. */
export function createStorage (
  db: Queryable, log: FastifyBaseLogger, observe: ObserveStatement = () => {},
  options: { prepared?: boolean, admit?: () => boolean } = {}
) {
  const admit = options.admit ?? (() => true)
  // Named statements are prepared once per connection. Where connections share one session
  // (the embedded database, a transaction-mode pooler) the names would collide: send them unnamed.
  const prepared = options.prepared ?? true
  async function run<R extends QueryResultRow> (
    statement: { name: string, text: string }, values: unknown[], idempotent = true
  ): Promise<QueryResult<R>> {
    // A bounded queue: past it a request fails at once (503) instead of waiting in line for a
    // connection it would only get after the connect timeout anyway.
    if (!admit()) throw Object.assign(new Error('too many requests are waiting for a database connection'), { code: POOL_SATURATED })
    const query = prepared ? { name: statement.name, text: statement.text, values } : { text: statement.text, values }
    const started = process.hrtime.bigint()
    const seconds = () => Number(process.hrtime.bigint() - started) / 1e9
    try {
      const result = await db.query<R>(query).catch(async (err: unknown) => {
        if (isTransactionAborted(err)) {
          log.warn({ err, statement: statement.name }, 'statement rolled back by the database, retrying once')
        } else if (idempotent && isConnectionLost(err)) {
          log.warn({ err, statement: statement.name }, 'database connection lost mid-query, retrying once')
        } else {
          throw err
        }
        return await db.query<R>(query)
      })
      observe(statement.name, 'ok', seconds())
      return result
    } catch (err) {
      observe(statement.name, 'error', seconds())
      throw err
    }
  }

  // Logs name a user by pseudonym only, and never carry the blob, iv or checksum. Each request
  // already gets one info line (method, pseudonymised URL, status, time, bytes: see logging.ts),
  // so the database's share of it is a debug line; cleanup runs are rare and logged at info.
  function logged (op: string, userId: string | undefined, started: bigint, extra: Record<string, unknown> = {}) {
    const level = op === 'cleanup' ? 'info' : 'debug'
    // Fastify's logger type leaves out pino's isLevelEnabled; the logger is pino's all the same.
    if (!(log as FastifyBaseLogger & Pick<Logger, 'isLevelEnabled'>).isLevelEnabled(level)) return
    const ms = Number(process.hrtime.bigint() - started) / 1e6
    log[level]({ op, user: userId === undefined ? undefined : pseudonym(userId), ms: Math.round(ms * 100) / 100, ...extra }, 'storage')
  }

  async function storeWith (userId: string, payload: SyncPayload, precondition: WritePrecondition): Promise<StoreResult> {
    const bytes = decodedBase64Bytes(payload.encryptedBlob)
    const values = [userId, payload.encryptedBlob, payload.iv, payload.timestamp, payload.checksum, bytes]
    const { ifMatch, ifNoneMatch } = precondition
    let written: { etag: string | null, current?: string | null } | undefined
    if (ifMatch === '*') {
      written = (await run<{ etag: string }>(STORE_IF_EXISTS, values, false)).rows[0]
    } else if (ifMatch !== undefined) {
      written = (await run<{ etag: string | null, current: string | null }>(STORE_IF_MATCH, [...values, ifMatch], false)).rows[0]
    } else if (ifNoneMatch === '*') {
      written = (await run<{ etag: string | null, current: string | null }>(STORE_IF_ABSENT, values, false)).rows[0]
    } else {
      written = (await run<{ etag: string }>(STORE, values)).rows[0]
    }
    if (written?.etag == null) return { stored: false, currentEtag: written?.current ?? null }
    return { stored: true, etag: written.etag, bytes }
  }

  return {
    /** Creates or replaces the user's record, unless a precondition fails. */
    async store (userId: string, payload: SyncPayload, precondition: WritePrecondition = {}): Promise<StoreResult> {
      const started = process.hrtime.bigint()
      const result = await storeWith(userId, payload, precondition)
      logged('store', userId, started, result.stored ? { bytes: result.bytes } : { preconditionFailed: true })
      return result
    },

    /**
     * The user's record, or null; marks the record as accessed (at most once a day). When its tag is one of
     * `notModified` (or that list holds '*'), the payload is left out (null) and not read.
     */
    async get (userId: string, notModified: string[] = []): Promise<StoredRecord | null> {
      const started = process.hrtime.bigint()
      const { rows: [row] } = await run<StoredRow>(GET, [userId, notModified])
      logged('get', userId, started, { bytes: row?.not_modified ? 0 : (row?.blob_size ?? 0), found: row !== undefined })
      if (row === undefined) return null
      return {
        etag: row.etag,
        payload: row.not_modified || row.encrypted_blob === null
          ? null
          : { encryptedBlob: row.encrypted_blob, iv: row.iv, timestamp: Number(row.timestamp), checksum: row.checksum }
      }
    },

    /** Removes the user's record (true when there was one), unless an If-Match precondition fails. */
    async delete (userId: string, precondition: Pick<WritePrecondition, 'ifMatch'> = {}): Promise<DeleteResult> {
      const started = process.hrtime.bigint()
      const { ifMatch } = precondition
      let result: DeleteResult
      if (ifMatch === undefined) {
        const { rowCount } = await run(DELETE, [userId])
        result = { deleted: rowCount === 1 }
      } else {
        const { rows: [row] } = await run<{ deleted: number, current: string | null }>(
          DELETE_IF_MATCH, [userId, ifMatch === '*' ? [] : ifMatch, ifMatch === '*'], false)
        result = row?.deleted === 1
          ? { deleted: true }
          : { deleted: false, preconditionFailed: true, currentEtag: row?.current ?? null }
      }
      logged('delete', userId, started, { deleted: result.deleted })
      return result
    },

    async exists (userId: string): Promise<boolean> {
      return (await this.etagOf(userId)) !== null
    },

    /** The current entity tag of the user's record, or null when there is none. */
    async etagOf (userId: string): Promise<string | null> {
      const { rows: [row] } = await run<{ etag: string }>(ETAG_OF, [userId])
      return row?.etag ?? null
    },

    async getAllUserIds (): Promise<string[]> {
      const { rows } = await run<{ user_id: string }>(ALL_USER_IDS, [])
      return rows.map((row) => row.user_id)
    },

    /**
     * Deletes every record not accessed for more than `inactiveDays` days, `batchSize` rows per
     * statement, and returns how many. Each batch is its own statement: uploads are never
     * blocked for longer than one batch takes.
     */
    async deleteInactive (inactiveDays: number, batchSize = 1000): Promise<number> {
      assertDays(inactiveDays)
      const started = process.hrtime.bigint()
      let deleted = 0
      for (;;) {
        const { rowCount } = await run(DELETE_INACTIVE_BATCH, [inactiveDays, batchSize])
        deleted += rowCount ?? 0
        if ((rowCount ?? 0) < batchSize) break
      }
      logged('cleanup', undefined, started, { inactiveDays, deleted })
      return deleted
    },

    /** How many records deleteInactive would delete now. */
    async countInactive (inactiveDays: number): Promise<number> {
      assertDays(inactiveDays)
      const { rows: [row] } = await run<{ n: number }>(COUNT_INACTIVE, [inactiveDays])
      return row?.n ?? 0
    },

    /** Stored users and the decoded bytes of their blobs (a full scan: call it rarely). */
    async totals (): Promise<{ users: number, bytes: number }> {
      const { rows: [row] } = await run<{ users: number, bytes: number }>(TOTALS, [])
      return { users: row?.users ?? 0, bytes: row?.bytes ?? 0 }
    }
  }
}

function assertDays (inactiveDays: number): void {
  if (!Number.isInteger(inactiveDays) || inactiveDays < 1) {
    throw new RangeError(`inactiveDays must be a whole number of days, at least 1 (got ${inactiveDays})`)
  }
}

export type Storage = ReturnType<typeof createStorage>

declare module 'fastify' {
  interface FastifyInstance {
    storage: Storage
  }
}

// Statement names map to the operation they serve, for the metrics' label.
const OPERATION_OF: Record<string, string> = {
  'sync-store': 'store',
  'sync-store-if-match': 'store',
  'sync-store-if-exists': 'store',
  'sync-store-if-absent': 'store',
  'sync-get': 'get',
  'sync-delete': 'delete',
  'sync-delete-if-match': 'delete',
  'sync-etag': 'exists',
  'sync-all-user-ids': 'list',
  'sync-delete-inactive': 'cleanup',
  'sync-count-inactive': 'cleanup',
  'sync-totals': 'totals'
}

export default fp(async function storage (app) {
  const { storageDuration } = app.metrics
  const prepared = app.config.DATABASE_PREPARED_STATEMENTS && app.databaseKind !== 'embedded'
  const { pool } = app.pg
  const maxWaiting = app.config.DATABASE_MAX_WAITING
  app.decorate('storage', createStorage(app.pg.pool, app.log.child({ component: 'storage' }), (statement, outcome, seconds) => {
    storageDuration.observe({ operation: OPERATION_OF[statement] ?? statement, outcome }, seconds)
  }, { prepared, admit: () => pool.waitingCount < maxWaiting }))
}, { name: 'storage', dependencies: ['db', 'metrics'] })
