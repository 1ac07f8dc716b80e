-- Up Migration
-- Version history (docs/api.md "Versions"). Every version of a user's data, the current one and
-- the kept previous ones, is a row of user_sync_versions; user_sync_data keeps the account (who,
-- since when, last access, access token) and names its current version. An upload adds a row and
-- drops the oldest past the limits: nothing is ever copied, so keeping versions costs an upload
-- no more than replacing data in place did, and no version is stored twice. Rows go with their
-- account (ON DELETE CASCADE): a DELETE and the inactive-account cleanup erase the whole history
-- at once. Idempotent, like every file here (see 001_init.sql): the postgres image may have run
-- it from /docker-entrypoint-initdb.d before the service's runner does.

CREATE TABLE IF NOT EXISTS user_sync_versions (
  user_id UUID NOT NULL REFERENCES user_sync_data (user_id) ON DELETE CASCADE,
  version BIGINT NOT NULL,                -- never reused for a user (see plugins/storage.ts)
  etag TEXT NOT NULL,
  encrypted_blob TEXT NOT NULL,           -- base64 ciphertext, never decoded by the server
  iv VARCHAR(16) NOT NULL,
  timestamp BIGINT NOT NULL,              -- the client's clock, opaque to the server
  checksum VARCHAR(64) NOT NULL,          -- SHA-256 hex, computed by the client
  blob_size INTEGER NOT NULL,             -- decoded bytes
  stored_at TIMESTAMPTZ NOT NULL DEFAULT now(),

  PRIMARY KEY (user_id, version),
  CONSTRAINT version_blob_size_limit CHECK (blob_size <= 1000000),
  CONSTRAINT version_iv_format CHECK (iv ~ '^[A-Za-z0-9+/]{16}$'),
  CONSTRAINT version_checksum_format CHECK (checksum ~ '^[a-f0-9]{64}$')
);

-- The last three digits of version numbers drawn in the same millisecond (plugins/storage.ts).
CREATE SEQUENCE IF NOT EXISTS user_sync_version_seq;

-- Lets the cleanup find versions past HISTORY_DAYS without a full scan.
CREATE INDEX IF NOT EXISTS idx_versions_stored_at ON user_sync_versions (stored_at);

-- The data of existing records becomes their current version (stored: their first upload's time
-- where they were never replaced, else this migration's, the best that is known). user_sync_data
-- keeps the current version's timestamp, which a restore needs under the record's lock.
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name = 'user_sync_data' AND column_name = 'encrypted_blob') THEN
    INSERT INTO user_sync_versions (user_id, version, etag, encrypted_blob, iv, timestamp, checksum, blob_size, stored_at)
      SELECT user_id, version, etag, encrypted_blob, iv, timestamp, checksum, blob_size,
             CASE WHEN version = 1 THEN created_at ELSE now() END
      FROM user_sync_data
      ON CONFLICT (user_id, version) DO NOTHING;
    ALTER TABLE user_sync_data DROP COLUMN encrypted_blob, DROP COLUMN iv, DROP COLUMN checksum, DROP COLUMN blob_size;
  END IF;
END $$;
