import fp from 'fastify-plugin'
import type { FastifyBaseLogger } from 'fastify'
import type { QueryConfig, QueryResult, QueryResultRow } from 'pg'
import { base64Bytes, base64Decoded, decodedBase64Bytes, type SyncPayload } from '../schemas/sync.ts'
import type { Logger } from 'pino'
import { atMostEvery, pseudonym } from '../logging.ts'
import { POOL_SATURATED, isConnectionLost, isTransactionAborted, preparedStatements, statementRunner } from './db.ts'
import type { ReplicaReads } from './replica.ts'
import type { StatementTracer } from './tracing.ts'

/** What the storage needs of a pool: one query at a time (pg's Pool, or a test's Client). */
export interface Queryable {
  query<R extends QueryResultRow>(config: QueryConfig): Promise<QueryResult<R>>
}

// The version of a record: greater than the version it replaces, and never less than a number
// drawn from the clock, the write's time in milliseconds since 1970 times 1000 plus the last three
// digits of a sequence (sql/005_versions.sql). So a number is never handed out twice for a user:
// not after a DELETE (which erases the versions that held the old numbers), not after a restore
// from backup (which brings older numbers back: a later write draws past every number handed out
// before). The clock is read when the value is computed, not when the transaction began, and the
// sequence tells apart two records created in the same millisecond: an upload that waited on a
// racing one's insert, deleted meanwhile, creates the record with a number of its own (the
// transaction's start time alone gave it the number of the upload it waited for). Only a database
// clock set back could repeat one. Safe in JavaScript until the year 2255.
const DRAWN = "(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint * 1000 + nextval('user_sync_version_seq') % 1000)"
// Drawn once per statement (a FROM item named drawn): the version and the tag must agree.
const DRAWN_ONCE = `(SELECT ${DRAWN} AS version) drawn`
const NEXT_VERSION = 'greatest(user_sync_data.version + 1, drawn.version)'
// The entity tag: the version and a random part that every write draws anew (sql/003_etag.sql),
// so that no tag is ever repeated for other content. Stored, so that a precondition is checked
// in the same statement as the write.
const ETAG = 'etag'
// A timestamp a client may send (schemas/sync.ts): a restore never raises one past it.
const MAX_TIMESTAMP = String(Number.MAX_SAFE_INTEGER)
const RANDOM_PART = "replace(gen_random_uuid()::text, '-', '')"
// created_at is never in an update list, so it keeps the first upload's time.
const NEW_VERSION = `version = ${NEXT_VERSION}, etag = ${NEXT_VERSION} || '-' || ${RANDOM_PART}, last_accessed = now()`

// Access tokens (routes/api/sync/access-tokens.ts): a record is open to a request when no device has claimed it
// (token_hash NULL) or when the request's token hash is the stored one. The check is part of
// each operation's statement, evaluated on the row the statement writes (a concurrent write is
// waited for and the condition re-checked on its result), so no window separates check and write.
// Never NULL (a request without a token on a claimed record is false, not unknown), since the
// statements also return it.
const authorized = (param: number) =>
  `coalesce(user_sync_data.token_hash = $${param}::bytea, user_sync_data.token_hash IS NULL)`
/** Whether a device's token guards the record. */
const CLAIMED = 'token_hash IS NOT NULL'
// An upload with a token claims an unclaimed record; it never replaces another token.
const CLAIM = (param: number) => `token_hash = coalesce(user_sync_data.token_hash, $${param}::bytea)`

// A record is its account row in user_sync_data, which names the current version, and its
// versions in user_sync_versions (sql/005_versions.sql): an upload adds a version and moves the
// account to it; nothing is copied.
//
// Writes first lock the account and judge every condition (the precondition, the token) on that
// locked row: a locking read waits for a concurrent write and returns the committed row, where
// the statement's own snapshot may hold an older one (say, a token rotated a moment ago, which
// the snapshot would still refuse). The lock is exclusive, so racing writers queue behind it
// rather than deadlock, and the answer (the current tag, whether the request may see it) comes
// from the same row, in one round trip, whichever order PostgreSQL runs the parts of the
// statement in. What a write needs of the current version (its timestamp) is on the locked row
// too: the snapshot cannot see a version a writer ahead in the queue just added.
const LOCKED = (token: number) => `locked AS (
           SELECT ${ETAG}, version, timestamp, ${authorized(token)} AS authorized, ${CLAIMED} AS claimed
           FROM user_sync_data WHERE user_id = $1 FOR UPDATE)`
const FROM_LOCKED = `(SELECT etag FROM locked) AS current, (SELECT authorized FROM locked) AS authorized,
           (SELECT claimed FROM locked) AS claimed`

// Version history (HISTORY_VERSIONS, HISTORY_DAYS; docs/api.md "Versions"). A write that added a
// version drops what is past the limits: of the versions there before it, all but the newest
// `versions` (the one it replaced and versions - 1 older ones), and those replaced more than
// `days` days ago (0: no age limit), a version being replaced when the next one was stored. The
// drop sees the statement's snapshot: a version a concurrent writer added after it was taken is
// left for the next write (or the cleanup), so a race can leave one too many for a while, never
// one too few; reads show only what is within the limits (KEPT).
const PRUNE = (written: string, versions: number, days: number) => `pruned AS (
           DELETE FROM user_sync_versions WHERE user_id = $1 AND EXISTS (SELECT 1 FROM ${written}) AND (
             version <= (SELECT version FROM user_sync_versions WHERE user_id = $1 ORDER BY version DESC
                         OFFSET $${versions}::int LIMIT 1)
             OR version < (SELECT max(version) FROM user_sync_versions
                           WHERE user_id = $1 AND stored_at < now() - make_interval(days => nullif($${days}::int, 0)))))`
/** Whether version `v` is shown: the current one (`current`), or a kept one within the limits. */
// One pass over the newer versions gives both: how many there are, and when the next one replaced it.
// A version with nothing newer in the statement's snapshot is kept: when the statement waited
// for the record's lock, `current` is the row its replacement wrote, but the replacement's
// version committed after the snapshot and is not seen (and min() over no rows is NULL, not true).
const KEPT = (current: string, versions: number, days: number) => `(v.version = ${current} OR ($${versions}::int > 0
           AND (SELECT count(*) <= $${versions}::int
                  AND ($${days}::int = 0 OR coalesce(min(n.stored_at) >= now() - make_interval(days => $${days}::int), true))
                FROM user_sync_versions n WHERE n.user_id = v.user_id AND n.version > v.version)))`

// Every statement is named so that pg prepares it once per connection and then only binds.
// The uploads: $1 user, $2-$6 the payload, $7 token, $8 and $9 the history limits, $10 the If-Match list.
// An upload writes when the condition holds on the locked account or, where `create` says so,
// when there is none. No row written and none locked: a concurrent upload created the record
// after this statement's snapshot was taken (see storeWith).
const upload = (name: string, condition: string | null, create: boolean) => {
  const parts = [LOCKED(7)]
  const added: string[] = []
  if (condition !== null) {
    parts.push(`written AS (
           UPDATE user_sync_data SET timestamp = $4, ${NEW_VERSION}, ${CLAIM(7)} FROM locked, ${DRAWN_ONCE}
           WHERE user_sync_data.user_id = $1 AND locked.authorized AND ${condition}
           RETURNING user_sync_data.version, user_sync_data.${ETAG} AS etag)`, PRUNE('written', 8, 9))
    added.push('SELECT version, etag FROM written')
  }
  if (create) {
    parts.push(`created AS (
           INSERT INTO user_sync_data (user_id, timestamp, version, etag, token_hash)
           SELECT $1, $4, drawn.version, drawn.version || '-' || ${RANDOM_PART}, $7::bytea
           FROM ${DRAWN_ONCE} WHERE NOT EXISTS (SELECT 1 FROM locked)
           ON CONFLICT (user_id) DO NOTHING RETURNING version, ${ETAG} AS etag)`)
    added.push('SELECT version, etag FROM created')
  }
  parts.push(`added AS (${added.join(' UNION ALL ')})`, `stored AS (
           INSERT INTO user_sync_versions (user_id, version, etag, ciphertext, iv, timestamp, checksum, blob_size)
           SELECT $1, version, etag, $2::bytea, $3, $4, $5, $6 FROM added)`)
  return { name, text: `WITH ${parts.join(',\n         ')}\n         SELECT (SELECT etag FROM added) AS etag, ${FROM_LOCKED}` }
}
const STORE = upload('sync-store', 'true', true)
const STORE_IF_MATCH = upload('sync-store-if-match', 'locked.etag = ANY($10::text[])', false)
const STORE_IF_EXISTS = upload('sync-store-if-exists', 'true', false)
const STORE_IF_ABSENT = upload('sync-store-if-absent', null, true)
// A version's ciphertext as base64 (sql/006_ciphertext_bytes.sql): its bytes, encoded by PostgreSQL
// (which breaks the text into lines: see blobText), or the text of a version stored before, until
// `npm run migrate-blobs` has converted it.
const BLOB = "coalesce(encode(v.ciphertext, 'base64'), v.encrypted_blob)"
// Whether BLOB is a version's text as it was stored before (see blobText).
const STORED_AS_TEXT = 'v.ciphertext IS NULL'
/**
 * Whether `text` (a version's base64 text from before sql/006_ciphertext_bytes.sql) is canonical
 * base64, whose bytes encode back to the same text: only then may it be kept as bytes. The
 * alphabet is checked first, in a CASE so that it comes first, so that decode() never fails.
 */
const CANONICAL_TEXT = (text: string) => `CASE WHEN length(${text}) % 4 = 0 AND ${text} ~ '^[A-Za-z0-9+/]*={0,2}$'
                 THEN translate(encode(decode(${text}, 'base64'), 'base64'), E'\\n', '') = ${text} ELSE false END`
// A download is an access: the inactivity rule counts from the last one. The download itself is
// a pure read (it runs on a hot standby, and costs no WAL); when it shows the record untouched
// for a day, TOUCH records the access apart, once a day at most. When the client already holds
// the current version (If-None-Match), the blob is not even looked up; nor is it for a request
// the record is not open to, which does not count as an access either.
const NOT_MODIFIED = `(user_sync_data.${ETAG} = ANY($2::text[]) OR '*' = ANY($2::text[]))`
const GET = {
  name: 'sync-get',
  text: `SELECT user_sync_data.${ETAG} AS etag, ${authorized(3)} AS authorized, ${CLAIMED} AS claimed, ${NOT_MODIFIED} AS not_modified,
           user_sync_data.last_accessed < now() - interval '1 day' AS stale,
           ${BLOB} AS encrypted_blob, ${STORED_AS_TEXT} AS stored_as_text, v.iv, v.timestamp, v.checksum, v.blob_size
         FROM user_sync_data LEFT JOIN user_sync_versions v
           ON v.user_id = user_sync_data.user_id AND v.version = user_sync_data.version AND NOT ${NOT_MODIFIED} AND ${authorized(3)}
         WHERE user_sync_data.user_id = $1`
}
// The downloads of several users are recorded in one statement (see touchLater): $1 their ids.
const TOUCH = {
  name: 'sync-touch',
  text: "UPDATE user_sync_data SET last_accessed = now() WHERE user_id = ANY($1::uuid[]) AND last_accessed < now() - interval '1 day'"
}
// Users whose access waits to be recorded, at most: past it, a download's access is left to its
// user's next download (see touchLater).
const MAX_PENDING_TOUCHES = 1000
// The versions of a record, newest first: the current one, then the kept ones. Metadata only,
// read through the primary key (never a blob). $1 user, $2 token, $3 and $4 the history limits.
// Exported for the test that reads its plan.
export const VERSIONS = {
  name: 'sync-versions',
  text: `SELECT ${authorized(2)} AS authorized, ${CLAIMED} AS claimed, v.version, v.etag, v.timestamp, v.stored_at, v.blob_size,
           v.version = user_sync_data.version AS current
         FROM user_sync_data LEFT JOIN LATERAL (
           SELECT version, etag, timestamp, stored_at, blob_size, lag(stored_at) OVER (ORDER BY version DESC) AS replaced_at
           FROM user_sync_versions WHERE user_id = user_sync_data.user_id ORDER BY version DESC LIMIT $3::int + 1) v
           ON ${authorized(2)} AND (v.version = user_sync_data.version
             OR $4::int = 0 OR v.replaced_at >= now() - make_interval(days => $4::int))
         WHERE user_sync_data.user_id = $1`
}
// One version's payload, current or kept. $1 user, $2 version, $3 token, $4 and $5 the history limits.
const VERSION = {
  name: 'sync-version',
  text: `SELECT ${authorized(3)} AS authorized, ${CLAIMED} AS claimed, v.etag, ${BLOB} AS encrypted_blob, ${STORED_AS_TEXT} AS stored_as_text, v.iv, v.timestamp, v.checksum
         FROM user_sync_data LEFT JOIN user_sync_versions v
           ON ${authorized(3)} AND v.user_id = user_sync_data.user_id AND v.version = $2 AND ${KEPT('user_sync_data.version', 4, 5)}
         WHERE user_sync_data.user_id = $1`
}
// Restore: a kept version's content becomes a new version, like an upload's. Its timestamp is
// raised past the replaced version's, so that clients which sync by "newest timestamp wins" take
// the restored data rather than upload theirs over it again. A restore of what is current already
// (the current version itself, or a restore sent twice) changes nothing: it would only push the
// oldest kept version out. $1 user, $2 version, $3 token, $4 and $5 the history limits, $6 the
// If-Match list (NULL: none).
const RESTORE = {
  name: 'sync-restore',
  text: `WITH ${LOCKED(3)},
         source AS (
           SELECT v.ciphertext, v.encrypted_blob, v.iv, least(greatest(v.timestamp, locked.timestamp + 1), ${MAX_TIMESTAMP}) AS timestamp,
             v.checksum, v.blob_size,
             CASE WHEN v.encrypted_blob IS NOT NULL AND ${CANONICAL_TEXT('v.encrypted_blob')} THEN v.encrypted_blob END AS canonical_text
           FROM user_sync_versions v, locked
           WHERE locked.authorized AND v.user_id = $1 AND v.version = $2 AND ${KEPT('locked.version', 4, 5)}),
         unchanged AS (
           SELECT 1 FROM user_sync_versions c, locked, source
           WHERE c.user_id = $1 AND c.version = locked.version AND c.iv = source.iv AND c.checksum = source.checksum),
         matched AS (SELECT 1 FROM locked WHERE $6::text[] IS NULL OR locked.etag = ANY($6::text[])),
         written AS (
           UPDATE user_sync_data SET timestamp = source.timestamp, ${NEW_VERSION}, ${CLAIM(3)}
           FROM locked, source, ${DRAWN_ONCE}
           WHERE user_sync_data.user_id = $1 AND locked.authorized AND EXISTS (SELECT 1 FROM matched)
             AND NOT EXISTS (SELECT 1 FROM unchanged)
           RETURNING user_sync_data.version, user_sync_data.${ETAG} AS etag),
         ${PRUNE('written', 4, 5)},
         stored AS (
           INSERT INTO user_sync_versions (user_id, version, etag, ciphertext, encrypted_blob, iv, timestamp, checksum, blob_size)
           SELECT $1, written.version, written.etag, coalesce(source.ciphertext, decode(source.canonical_text, 'base64')),
             CASE WHEN source.canonical_text IS NULL THEN source.encrypted_blob END, source.iv, source.timestamp, source.checksum, source.blob_size
           FROM written, source)
         SELECT (SELECT etag FROM written) AS etag, ${FROM_LOCKED}, EXISTS (SELECT 1 FROM source) AS found,
           EXISTS (SELECT 1 FROM unchanged) AND EXISTS (SELECT 1 FROM matched) AS unchanged`
}
// A delete that removed nothing tells apart "no record" (authorized NULL) from "not this token".
// Every version goes with the account (ON DELETE CASCADE), in the same statement.
const DELETE = {
  name: 'sync-delete',
  text: `WITH ${LOCKED(2)}, deleted AS (
           DELETE FROM user_sync_data USING locked WHERE user_sync_data.user_id = $1 AND locked.authorized RETURNING 1)
         SELECT (SELECT count(*) FROM deleted)::int AS deleted, ${FROM_LOCKED}`
}
const DELETE_IF_MATCH = {
  name: 'sync-delete-if-match',
  text: `WITH ${LOCKED(4)}, deleted AS (
           DELETE FROM user_sync_data USING locked
           WHERE user_sync_data.user_id = $1 AND locked.authorized AND ($3 OR locked.etag = ANY($2::text[])) RETURNING 1)
         SELECT (SELECT count(*) FROM deleted)::int AS deleted, ${FROM_LOCKED}`
}
const ETAG_OF = {
  name: 'sync-etag',
  text: `SELECT ${ETAG} AS etag, ${authorized(2)} AS authorized, ${CLAIMED} AS claimed FROM user_sync_data WHERE user_id = $1`
}
// Rotation: the current token replaces the stored hash. An unclaimed record has no token to
// replace: it is claimed by an upload (a rotation would claim it without touching the data).
// A record that already holds the new token counts as rotated, so that the statement is safe to
// retry after a connection lost on its way back (the first try committed; only the holder of
// the new token could ask for it).
const SET_TOKEN = {
  name: 'sync-set-token',
  text: `WITH ${LOCKED(2)}, updated AS (
           UPDATE user_sync_data SET token_hash = $3::bytea FROM locked
           WHERE user_sync_data.user_id = $1 AND locked.claimed AND (locked.authorized OR user_sync_data.token_hash = $3::bytea) RETURNING 1)
         SELECT (SELECT count(*) FROM updated)::int AS updated, ${FROM_LOCKED}`
}
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
  text: `SELECT (SELECT count(*) FROM user_sync_data)::int AS users,
           (SELECT coalesce(sum(v.blob_size), 0) FROM user_sync_data JOIN user_sync_versions v USING (user_id, version))::float8 AS bytes,
           (SELECT count(*) FROM user_sync_versions)::int AS versions,
           (SELECT coalesce(sum(blob_size), 0) FROM user_sync_versions)::float8 AS all_bytes,
           pg_database_size(current_database())::float8 AS database_bytes`
}
// The cleanup drops the kept versions past the limits that no write has dropped: those of records
// not written since (HISTORY_DAYS: every version older than one stored before the cutoff, found
// through the stored_at index), and all past HISTORY_VERSIONS after it was lowered (one pass over
// the primary key, no blob read). Never a current version. In batches, like the account cleanup;
// rows an upload is dropping (locked) are left to it, so the cleanup never waits for one.
// $1 days or versions, $2 batch size.
const PRUNE_OLD_VERSIONS_BATCH = {
  name: 'sync-prune-old-versions',
  text: `DELETE FROM user_sync_versions WHERE (user_id, version) IN (
           SELECT v.user_id, v.version FROM user_sync_versions v
           WHERE EXISTS (SELECT 1 FROM user_sync_versions n
                         WHERE n.stored_at < now() - make_interval(days => $1::int) AND n.user_id = v.user_id AND n.version > v.version)
           LIMIT $2 FOR UPDATE SKIP LOCKED)`
}
const PRUNE_EXCESS_VERSIONS_BATCH = {
  name: 'sync-prune-excess-versions',
  text: `DELETE FROM user_sync_versions WHERE (user_id, version) IN (
           SELECT user_id, version FROM user_sync_versions WHERE (user_id, version) IN (
             SELECT user_id, version FROM (
               SELECT user_id, version, row_number() OVER (PARTITION BY user_id ORDER BY version DESC) AS rank FROM user_sync_versions) ranked
             WHERE rank > $1::int + 1)
           LIMIT $2 FOR UPDATE SKIP LOCKED)`
}

// The conversion of versions stored as base64 text to bytes (sql/006_ciphertext_bytes.sql, `npm run
// migrate-blobs`): a batch of the next text versions in primary-key order after $1/$2, $3 at most
// and no more than $4 characters of text (but at least one), each its own short statement, so that
// uploads go on in between, no batch runs into the statement timeout, and a run that stops resumes
// where it was. A version whose text would not come back the same from its bytes is left as text:
// unused bits set in its last character (which the service accepted before it checked for them:
// its client may hold that exact text, and it is read as before), or text that is not base64 at
// all, which no release accepted (put in by hand), checked first so that decode() never fails a
// batch. `scanned` counts them, `converted` not.
const CONVERT_TEXT_BLOBS_BATCH = {
  name: 'sync-convert-text-blobs',
  text: `WITH next AS (
           SELECT user_id, version, encrypted_blob FROM user_sync_versions
           WHERE encrypted_blob IS NOT NULL AND (user_id, version) > ($1::uuid, $2::bigint)
           ORDER BY user_id, version LIMIT $3::int),
         candidates AS (
           SELECT user_id, version, encrypted_blob, sum(octet_length(encrypted_blob)) OVER (ORDER BY user_id, version) AS upto,
             row_number() OVER (ORDER BY user_id, version) AS n
           FROM next),
         -- The text is judged (and decoded) here, for the batch's rows only: as a condition of the
         -- UPDATE, the planner could evaluate it on every text row of a table it chose to scan.
         batch AS MATERIALIZED (
           SELECT user_id, version, CASE WHEN ${CANONICAL_TEXT('encrypted_blob')} THEN decode(encrypted_blob, 'base64') END AS bytes
           FROM candidates WHERE upto <= $4::bigint OR n = 1),
         converted AS (
           UPDATE user_sync_versions v SET ciphertext = batch.bytes, encrypted_blob = NULL
           FROM batch WHERE v.user_id = batch.user_id AND v.version = batch.version AND batch.bytes IS NOT NULL AND v.encrypted_blob IS NOT NULL
           RETURNING 1),
         last AS (SELECT user_id, version FROM batch ORDER BY user_id DESC, version DESC LIMIT 1)
         SELECT (SELECT count(*) FROM batch)::int AS scanned, (SELECT count(*) FROM converted)::int AS converted,
           (SELECT user_id FROM last) AS last_user, (SELECT version FROM last)::text AS last_version`
}
const COUNT_TEXT_BLOBS = {
  name: 'sync-count-text-blobs',
  text: 'SELECT count(*)::int AS n FROM user_sync_versions WHERE encrypted_blob IS NOT NULL'
}

interface StoredRow {
  etag: string
  authorized: boolean
  claimed: boolean
  not_modified: boolean
  stale: boolean
  encrypted_blob: string | null
  stored_as_text: boolean
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

/**
 * The hash of the access token a request carries (routes/api/sync/access-tokens.ts), or null for none. A
 * record claimed by another token answers every operation with `unauthorized` and is left
 * as it was.
 */
export type AccessToken = Buffer | null

/**
 * Thrown by an operation on a record another token claimed (or, for a request without a token,
 * any claimed record): nothing was read or changed. The routes answer it with 401.
 */
export class AccessDenied extends Error {
  override name = 'AccessDenied'
  readonly code = 'ACCESS_DENIED'
  constructor () { super('the record is claimed by another access token') }
}

/**
 * How many previous versions of a record are kept (0: none), and for how many days after they were
 * replaced (0: no age limit): HISTORY_VERSIONS and HISTORY_DAYS.
 */
export interface HistoryLimits { versions: number, days: number }
// The defaults of HISTORY_VERSIONS and HISTORY_DAYS (plugins/config.ts), for callers that give none.
const DEFAULT_HISTORY: HistoryLimits = { versions: 10, days: 30 }

/** A version of a record, as GET /api/sync/:userId/versions lists it. */
export interface VersionInfo {
  version: number
  etag: string
  timestamp: number
  storedAt: string
  size: number
  current: boolean
}

/** A refused write says `claimed: true` (only set when true) when a device's token guards the record. */
export type StoreResult =
  | { stored: true, etag: string, bytes: number }
  | { stored: false, currentEtag: string | null, claimed?: true }

/** A restore is an upload, refused also when the record or the version is not there. */
export type RestoreResult = StoreResult | { stored: false, notFound: 'record' | 'version', claimed?: true }

/** `claimed: true` (only set when true) when a device's token guarded the record. */
export type DeleteResult =
  | { deleted: boolean, preconditionFailed?: undefined, claimed?: true }
  | { deleted: false, preconditionFailed: true, currentEtag: string | null, claimed?: true }

/**
 * A stored record: its entity tag and, unless the caller already holds that version, its data;
 * `claimed: true` when a device's access token guards it (then the request held that token).
 */
export interface StoredRecord {
  etag: string
  payload: SyncPayload | null
  claimed?: boolean
}

type ConditionalRow = { etag: string | null, current: string | null, authorized: boolean | null, claimed: boolean | null }

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
  primary: Queryable, log: FastifyBaseLogger, observe: ObserveStatement = () => {},
  options: { prepared?: boolean, admit?: () => boolean, history?: HistoryLimits, replica?: ReplicaReads | null, trace?: StatementTracer | null } = {}
) {
  const admit = options.admit ?? (() => true)
  const history = options.history ?? DEFAULT_HISTORY
  const limits = [history.versions, history.days]
  // Named statements are prepared once per connection. Where connections share one session
  // (the embedded database, a transaction-mode pooler) the names would collide: send them unnamed.
  const prepared = options.prepared ?? true
  const replica = options.replica ?? null
  const trace = options.trace ?? null
  const replicaWarnGate = atMostEvery(60_000)
  /**
   * A read that may be served by the replica (DATABASE_READ_URL) while it is close enough behind
   * (plugins/replica.ts); else, or when the replica fails it, by the primary: never a 5xx for a
   * replica's fault. `settled` says whether a replica's answer may stand: an answer the replica
   * could give only by lagging (no record, no access, another version than the client holds) is
   * asked of the primary again, so a client never reads a version older than its own upload.
   * Reads that must see this request's own writes use run() instead.
   */
  async function read<R extends QueryResultRow> (
    statement: { name: string, text: string }, values: unknown[], settled: (rows: R[]) => boolean = () => true
  ): Promise<QueryResult<R>> {
    const pool = replica?.pool() ?? null
    if (pool !== null) {
      try {
        const result = await run<R>(statement, values, true, pool)
        replica!.counted('replica')
        if (settled(result.rows)) return result
      } catch (err) {
        if (replicaWarnGate()) log.warn({ err, statement: statement.name }, 'a read failed on the replica; reading from the primary')
        replica!.failed(err)
      }
    }
    const result = await run<R>(statement, values)
    replica?.counted('primary')
    return result
  }

  async function run<R extends QueryResultRow> (
    statement: { name: string, text: string }, values: unknown[], idempotent = true, db: Queryable = primary
  ): Promise<QueryResult<R>> {
    // A bounded queue: past it a request fails at once (503) instead of waiting in line for a
    // connection it would only get after the connect timeout anyway.
    if (db === primary && !admit()) throw Object.assign(new Error('too many requests are waiting for a database connection'), { code: POOL_SATURATED })
    const query = prepared ? { name: statement.name, text: statement.text, values } : { text: statement.text, values }
    const started = process.hrtime.bigint()
    const seconds = () => Number(process.hrtime.bigint() - started) / 1e9
    const span = trace?.(statement.name, db === primary ? 'primary' : 'replica')
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
      span?.end()
      return result
    } catch (err) {
      observe(statement.name, 'error', seconds())
      span?.end(err)
      throw err
    }
  }

  // Logs name a user by pseudonym only, and never carry the blob, iv or checksum. Each request
  // already gets one info line (method, pseudonymised URL, status, time, bytes: see logging.ts),
  // so the database's share of it is a debug line; cleanup runs are rare and logged at info.
  function logged (op: string, userId: string | undefined, started: bigint, extra: Record<string, unknown> = {}) {
    const level = op === 'cleanup' || op === 'migrate-blobs' ? 'info' : 'debug'
    // Fastify's logger type leaves out pino's isLevelEnabled; the logger is pino's all the same.
    if (!(log as FastifyBaseLogger & Pick<Logger, 'isLevelEnabled'>).isLevelEnabled(level)) return
    const ms = Number(process.hrtime.bigint() - started) / 1e6
    log[level]({ op, user: userId === undefined ? undefined : pseudonym(userId), ms: Math.round(ms * 100) / 100, ...extra }, 'storage')
  }

  // Access times waiting to be written, and the statement writing the ones before them.
  const pendingTouches = new Set<string>()
  let touching: Promise<void> | null = null
  const touchWarnGate = atMostEvery(60_000)
  /**
   * Records a download as the record's last access, after the download's answer: a touch lost
   * (a crash, a read-only database after a failover, a saturated pool) is harmless at a grain of
   * days, and is made by the next download. A failure is a warning, at most one a minute.
   *
   * One statement at a time writes them all: the accesses that come in while one is being written
   * wait and go together in the next, so that a burst of first downloads of the day (every one of
   * them, for a bench that picks among a million users) costs a few statements and WAL flushes
   * rather than one each, and never fills the pool's queue ahead of uploads.
   */
  function touchLater (userId: string): void {
    if (pendingTouches.size >= MAX_PENDING_TOUCHES) return
    pendingTouches.add(userId)
    touching ??= writeTouches()
  }

  async function writeTouches (): Promise<void> {
    try {
      while (pendingTouches.size > 0) {
        const users = [...pendingTouches]
        pendingTouches.clear()
        try {
          await run(TOUCH, [users])
        } catch (err) {
          if (touchWarnGate()) log.warn({ err, statement: TOUCH.name }, 'a download\'s access time could not be recorded (the next download tries again)')
        }
      }
    } finally {
      touching = null
    }
  }

  /** Refuses an operation on a record another token claimed, logged (at debug level) like every other. */
  function deny (op: string, userId: string, started: bigint): never {
    logged(op, userId, started, { denied: true })
    throw new AccessDenied()
  }

  /** Whether the user has a record, its tag, whether a token guards it and whether `token` may see it; null when there is none. */
  async function lookup (userId: string, token: AccessToken = null, on: 'primary' | 'replica' = 'primary'): Promise<{ etag: string, authorized: boolean, claimed: boolean } | null> {
    type Row = { etag: string, authorized: boolean, claimed: boolean }
    const { rows: [row] } = on === 'replica'
      ? await read<Row>(ETAG_OF, [userId, token], ([found]) => found !== undefined && found.authorized)
      : await run<Row>(ETAG_OF, [userId, token])
    return row ?? null
  }

  async function storeWith (userId: string, payload: SyncPayload, precondition: WritePrecondition, token: AccessToken, started: bigint): Promise<StoreResult> {
    const bytes = decodedBase64Bytes(payload.encryptedBlob)
    // The route has checked that the text is canonical base64 (schemas/sync.ts): these bytes
    // encode back to exactly that text.
    const values = [userId, base64Bytes(payload.encryptedBlob), payload.iv, payload.timestamp, payload.checksum, bytes]
    const { ifMatch, ifNoneMatch } = precondition
    let row: ConditionalRow | undefined
    if (ifMatch === '*') {
      row = (await run<ConditionalRow>(STORE_IF_EXISTS, [...values, token, ...limits], false)).rows[0]
    } else if (ifMatch !== undefined) {
      row = (await run<ConditionalRow>(STORE_IF_MATCH, [...values, token, ...limits, ifMatch], false)).rows[0]
    } else if (ifNoneMatch === '*') {
      row = (await run<ConditionalRow>(STORE_IF_ABSENT, [...values, token], false)).rows[0]
      if (row?.etag == null && row?.current == null) {
        // The insert lost to one that committed after this statement's snapshot was taken, so
        // the statement cannot see the winner's row; a second look (this race only) can.
        const winner = await lookup(userId, token)
        row = { etag: null, current: winner?.etag ?? null, authorized: winner?.authorized ?? null, claimed: winner?.claimed ?? null }
      }
    } else {
      // Nothing written and nothing locked: the record was created after this statement's
      // snapshot was taken, so it could neither lock nor create it. The next statement sees it
      // (a record deleted in between is created then), and replaces it keeping the winner's version.
      for (let attempt = 1; ; attempt++) {
        row = (await run<ConditionalRow>(STORE, [...values, token, ...limits])).rows[0]
        if (row?.etag != null || row?.current != null || attempt === 3) break
      }
      if (row?.etag == null) {
        if (row?.authorized === false) deny('store', userId, started)
        throw new Error('an upload found its record created and deleted under it three times in a row')
      }
      return { stored: true, etag: row.etag, bytes }
    }
    if (row?.etag != null) return { stored: true, etag: row.etag, bytes }
    // Authorization before preconditions: the tag of a record is not for a stranger to see.
    if (row?.authorized === false) deny('store', userId, started)
    const refused: StoreResult = { stored: false, currentEtag: row?.current ?? null }
    if (row?.claimed === true) refused.claimed = true
    return refused
  }

  return {
    /** Creates or replaces the user's record, unless a precondition fails or another token claimed it; a token claims it. */
    async store (userId: string, payload: SyncPayload, precondition: WritePrecondition = {}, token: AccessToken = null): Promise<StoreResult> {
      const started = process.hrtime.bigint()
      const result = await storeWith(userId, payload, precondition, token, started)
      logged('store', userId, started, result.stored ? { bytes: result.bytes } : { preconditionFailed: true })
      return result
    },

    /**
     * The user's record, or null; marks the record as accessed (at most once a day). When its tag is one of
     * `notModified` (or that list holds '*'), the payload is left out (null) and not read.
     */
    async get (userId: string, notModified: string[] = [], token: AccessToken = null): Promise<StoredRecord | null> {
      const started = process.hrtime.bigint()
      // A replica's answer stands when it is the version the client holds (304), or, for a
      // client that holds none, any version it may read.
      const { rows: [row] } = await read<StoredRow>(GET, [userId, notModified, token],
        ([found]) => found !== undefined && found.authorized && (notModified.length === 0 || found.not_modified))
      if (row !== undefined && !row.authorized) deny('get', userId, started)
      if (row?.stale === true) touchLater(userId)
      logged('get', userId, started, { bytes: row?.not_modified ? 0 : (row?.blob_size ?? 0), found: row !== undefined })
      if (row === undefined) return null
      if (row.authorized && !row.not_modified && row.encrypted_blob === null) {
        // The account names a version that is not there: never a 304 for a client that holds nothing.
        throw new Error('the record names a current version the database does not hold')
      }
      const record: StoredRecord = {
        etag: row.etag,
        payload: row.not_modified || row.encrypted_blob === null
          ? null
          : { encryptedBlob: blobText({ encrypted_blob: row.encrypted_blob, stored_as_text: row.stored_as_text }), iv: row.iv, timestamp: Number(row.timestamp), checksum: row.checksum }
      }
      // Only set when true: a record no token guards reads as it did before tokens.
      if (row.claimed) record.claimed = true
      return record
    },

    /** Settles when the access times that downloads are recording have been written (or have failed). */
    async touched (): Promise<void> {
      await touching
    },

    /** Removes the user's record (true when there was one), unless an If-Match precondition fails or another token claimed it. */
    async delete (userId: string, precondition: Pick<WritePrecondition, 'ifMatch'> = {}, token: AccessToken = null): Promise<DeleteResult> {
      const started = process.hrtime.bigint()
      const { ifMatch } = precondition
      type Row = { deleted: number } & Omit<ConditionalRow, 'etag'>
      const { rows: [row] } = ifMatch === undefined
        ? await run<Row>(DELETE, [userId, token])
        : await run<Row>(DELETE_IF_MATCH, [userId, ifMatch === '*' ? [] : ifMatch, ifMatch === '*', token], false)
      const deleted = row?.deleted === 1
      if (!deleted && row?.authorized === false) deny('delete', userId, started)
      const result: DeleteResult = deleted || ifMatch === undefined
        ? { deleted }
        : { deleted: false, preconditionFailed: true, currentEtag: row?.current ?? null }
      if (row?.claimed === true) result.claimed = true
      logged('delete', userId, started, { deleted })
      return result
    },

    async exists (userId: string): Promise<boolean> {
      return (await lookup(userId)) !== null
    },

    /**
     * The current entity tag of the user's record, or null when there is none. It ignores access
     * tokens: for tests and tools, never to answer a request (the routes use `lookup`).
     */
    async etagOf (userId: string): Promise<string | null> {
      return (await lookup(userId))?.etag ?? null
    },

    /** What verify and HEAD answer: the record's tag and whether `token` may see it (a read: the replica may serve it). */
    lookup: (userId: string, token: AccessToken = null) => lookup(userId, token, 'replica'),

    /**
     * Replaces the record's token hash with `next` where `current` is the stored one: 'replaced',
     * 'absent' (no record) or 'unclaimed' (no token to replace); another token: AccessDenied.
     */
    async setToken (userId: string, current: Buffer, next: Buffer): Promise<'replaced' | 'absent' | 'unclaimed'> {
      const started = process.hrtime.bigint()
      const { rows: [row] } = await run<{ updated: number } & Omit<ConditionalRow, 'etag'>>(SET_TOKEN, [userId, current, next])
      if (row?.updated !== 1 && row?.claimed === true) deny('set-token', userId, started)
      const outcome = row?.updated === 1 ? 'replaced' : row?.claimed === false ? 'unclaimed' : 'absent'
      logged('set-token', userId, started, { outcome })
      return outcome
    },

    /** The record's versions, newest first (the current one, then the kept ones), or null when there is no record. */
    async versions (userId: string, token: AccessToken = null): Promise<{ versions: VersionInfo[], claimed?: true } | null> {
      const started = process.hrtime.bigint()
      // One row per version shown; a record not open to the token: one row without a version.
      type Row = {
        version: string | null,
        etag: string,
        timestamp: string,
        stored_at: Date,
        blob_size: number,
        current: boolean,
        authorized: boolean,
        claimed: boolean
      }
      const { rows } = await read<Row>(VERSIONS, [userId, token, ...limits], ([found]) => found !== undefined && found.authorized)
      const record = rows[0]
      if (record?.authorized === false) deny('versions', userId, started)
      logged('versions', userId, started, { found: record !== undefined, versions: rows.length })
      if (record === undefined) return null
      const versions = rows
        .filter((row) => row.version !== null)
        .map((row) => ({
          version: Number(row.version),
          etag: row.etag,
          timestamp: Number(row.timestamp),
          storedAt: row.stored_at.toISOString(),
          size: row.blob_size,
          current: row.current
        }))
        .sort((a, b) => b.version - a.version)
      return record.claimed === true ? { versions, claimed: true } : { versions }
    },

    /**
     * One version of the record, current or kept, as `found`: null when the record does not have
     * (or no longer keeps) that version; the whole answer is null when there is no record.
     */
    async version (userId: string, version: number, token: AccessToken = null): Promise<{ found: { etag: string, payload: SyncPayload } | null, claimed?: true } | null> {
      const started = process.hrtime.bigint()
      type Row = { authorized: boolean, claimed: boolean, etag: string | null, encrypted_blob: string, stored_as_text: boolean, iv: string, timestamp: string, checksum: string }
      const { rows: [row] } = await read<Row>(VERSION, [userId, version, token, ...limits],
        ([found]) => found !== undefined && found.authorized && found.etag !== null)
      if (row !== undefined && !row.authorized) deny('version', userId, started)
      logged('version', userId, started, { found: row?.etag != null })
      if (row === undefined) return null
      const found = row.etag === null
        ? null
        : { etag: row.etag, payload: { encryptedBlob: blobText(row), iv: row.iv, timestamp: Number(row.timestamp), checksum: row.checksum } }
      return row.claimed ? { found, claimed: true } : { found }
    },

    /**
     * Makes a kept (or the current) version's content the record's new current version, unless an
     * If-Match precondition fails or the record (`notFound: 'record'`) or that version of it
     * (`notFound: 'version'`) is not there.
     */
    async restore (userId: string, version: number, precondition: Pick<WritePrecondition, 'ifMatch'> = {}, token: AccessToken = null):
    Promise<RestoreResult> {
      const started = process.hrtime.bigint()
      const { ifMatch } = precondition
      const { rows: [row] } = await run<ConditionalRow & { found: boolean, unchanged: boolean }>(RESTORE,
        [userId, version, token, ...limits, ifMatch === undefined || ifMatch === '*' ? null : ifMatch], false)
      if (row?.authorized === false) deny('restore', userId, started)
      logged('restore', userId, started, { restored: row?.etag != null, unchanged: row?.unchanged === true })
      if (row?.etag != null) return { stored: true, etag: row.etag, bytes: 0 }
      if (row?.unchanged === true && row.current !== null) return { stored: true, etag: row.current, bytes: 0 }
      const refused: RestoreResult = row?.current == null
        ? { stored: false, notFound: 'record' }
        : row.found ? { stored: false, currentEtag: row.current } : { stored: false, notFound: 'version' }
      if (row?.claimed === true) refused.claimed = true
      return refused
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
    async deleteInactive (inactiveDays: number, batchSize = 1000, onBatch: (rows: number) => void = () => {}): Promise<number> {
      assertDays(inactiveDays)
      const started = process.hrtime.bigint()
      let deleted = 0
      for (;;) {
        const { rowCount } = await run(DELETE_INACTIVE_BATCH, [inactiveDays, batchSize])
        deleted += rowCount ?? 0
        onBatch(rowCount ?? 0)
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

    /**
     * Drops the kept versions past the history limits that no write has dropped yet, `batchSize`
     * per statement, and returns how many.
     */
    async pruneHistory (batchSize = 1000, onBatch: (rows: number) => void = () => {}): Promise<number> {
      const started = process.hrtime.bigint()
      let pruned = 0
      const batches: Array<[typeof PRUNE_OLD_VERSIONS_BATCH, number]> = [[PRUNE_EXCESS_VERSIONS_BATCH, history.versions]]
      if (history.days > 0) batches.unshift([PRUNE_OLD_VERSIONS_BATCH, history.days])
      for (const [statement, limit] of batches) {
        for (;;) {
          const { rowCount } = await run(statement, [limit, batchSize])
          pruned += rowCount ?? 0
          onBatch(rowCount ?? 0)
          if ((rowCount ?? 0) < batchSize) break
        }
      }
      logged('cleanup', undefined, started, { historyPruned: pruned })
      return pruned
    },

    /** How many versions are still kept as base64 text (sql/006_ciphertext_bytes.sql): a full scan, for the migration command. */
    async countTextBlobs (): Promise<number> {
      const { rows: [row] } = await run<{ n: number }>(COUNT_TEXT_BLOBS, [])
      return row?.n ?? 0
    },

    /**
     * Converts the versions kept as base64 text to bytes, at most `batchSize` versions and
     * `batchChars` characters of text per statement (at least one version), and returns how many
     * it converted and how many versions are still kept as text when it is done (see
     * CONVERT_TEXT_BLOBS_BATCH: text bytes cannot give back, and what was stored as text meanwhile).
     */
    async convertTextBlobs (batchSize = 100, onBatch: (rows: number) => void = () => {}, batchChars = 8_000_000): Promise<{ converted: number, keptAsText: number }> {
      const started = process.hrtime.bigint()
      let after: [string, string] = ['00000000-0000-0000-0000-000000000000', '0']
      let converted = 0
      for (;;) {
        type Row = { scanned: number, converted: number, last_user: string | null, last_version: string | null }
        const { rows: [row] } = await run<Row>(CONVERT_TEXT_BLOBS_BATCH, [...after, batchSize, batchChars])
        converted += row?.converted ?? 0
        onBatch(row?.scanned ?? 0)
        if (row?.last_user == null || row.last_version == null) break
        after = [row.last_user, row.last_version]
      }
      const { rows: [left] } = await run<{ n: number }>(COUNT_TEXT_BLOBS, [])
      const keptAsText = left?.n ?? 0
      logged('migrate-blobs', undefined, started, { converted, keptAsText })
      return { converted, keptAsText }
    },

    /** Stored users, the decoded bytes of their blobs, the same of the kept versions, and the database's size on disk (full scans: call it rarely). */
    async totals (): Promise<{ users: number, bytes: number, historyVersions: number, historyBytes: number, databaseBytes: number }> {
      type Row = { users: number, bytes: number, versions: number, all_bytes: number, database_bytes: number }
      const { rows: [row] } = await run<Row>(TOTALS, [])
      const [users, bytes] = [row?.users ?? 0, row?.bytes ?? 0]
      return {
        users,
        bytes,
        historyVersions: (row?.versions ?? 0) - users,
        historyBytes: (row?.all_bytes ?? 0) - bytes,
        databaseBytes: row?.database_bytes ?? 0
      }
    }
  }
}

/**
 * The base64 text of a ciphertext as BLOB reads it. PostgreSQL's encode() breaks base64 into lines
 * of 76 characters (RFC 2045); the API sends it in one piece. Cheaper here than in SQL: about
 * 1 ms per 1 MB, and the database's CPU is shared by every request. A version stored as text
 * before sql/006_ciphertext_bytes.sql is sent as it is, once it is seen to be base64: the answer
 * writes the blob without escaping it (StoredPayloadSchema), and text put in by hand could hold
 * a quote. Such a version is a fault (500, logged), never a broken answer.
 */
function blobText (row: { encrypted_blob: string, stored_as_text: boolean }): string {
  if (!row.stored_as_text) return row.encrypted_blob.replaceAll('\n', '')
  if (base64Decoded(row.encrypted_blob) === null) throw new Error('a version stored as text holds something other than base64')
  return row.encrypted_blob
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
  'sync-touch': 'touch',
  'sync-delete': 'delete',
  'sync-delete-if-match': 'delete',
  'sync-etag': 'exists',
  'sync-set-token': 'token',
  'sync-versions': 'versions',
  'sync-version': 'version',
  'sync-restore': 'restore',
  'sync-prune-old-versions': 'cleanup',
  'sync-prune-excess-versions': 'cleanup',
  'sync-all-user-ids': 'list',
  'sync-delete-inactive': 'cleanup',
  'sync-count-inactive': 'cleanup',
  'sync-totals': 'totals',
  'sync-convert-text-blobs': 'migrate-blobs',
  'sync-count-text-blobs': 'migrate-blobs'
}

export default fp(async function storage (app) {
  const { storageDuration } = app.metrics
  const { config } = app
  const prepared = preparedStatements(config) && app.databaseKind !== 'embedded'
  const { pool } = app.pg
  const maxWaiting = config.DATABASE_MAX_WAITING
  const statements = statementRunner(pool, config)
  app.decorate('storage', createStorage(statements, app.log.child({ component: 'storage' }), (statement, outcome, seconds) => {
    storageDuration.observe({ operation: OPERATION_OF[statement] ?? statement, outcome }, seconds)
  }, {
    prepared,
    admit: () => pool.waitingCount < maxWaiting,
    history: { versions: config.HISTORY_VERSIONS, days: config.HISTORY_DAYS },
    replica: app.replica,
    trace: app.traceStatement
  }))
  // The access times being written finish before the pool closes.
  app.addHook('onClose', async () => { await app.storage.touched() })
}, { name: 'storage', dependencies: ['db', 'metrics', 'replica', 'tracing'] })
