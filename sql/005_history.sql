-- Up Migration
-- Version history (docs/api.md "Versions"): every upload that replaces data keeps the replaced
-- version here, in the upload's own statement, so that a device that uploads empty or wrong data
-- can be undone. Rows go with their record (ON DELETE CASCADE: a DELETE and the inactive-account
-- cleanup erase the whole history at once). Idempotent, like every file here (see 001_init.sql).

-- When the current version was stored. Records from before this file: their first upload's time
-- for those never replaced (exact), else this migration's time (the best that is known).
ALTER TABLE user_sync_data ADD COLUMN IF NOT EXISTS stored_at TIMESTAMPTZ;
UPDATE user_sync_data SET stored_at = CASE WHEN version = 1 THEN created_at ELSE now() END WHERE stored_at IS NULL;
ALTER TABLE user_sync_data ALTER COLUMN stored_at SET DEFAULT now();
ALTER TABLE user_sync_data ALTER COLUMN stored_at SET NOT NULL;

CREATE TABLE IF NOT EXISTS user_sync_history (
  user_id UUID NOT NULL REFERENCES user_sync_data (user_id) ON DELETE CASCADE,
  version BIGINT NOT NULL,                -- the version's own number and entity tag, as they were
  etag TEXT NOT NULL,
  encrypted_blob TEXT NOT NULL,
  iv VARCHAR(16) NOT NULL,
  timestamp BIGINT NOT NULL,
  checksum VARCHAR(64) NOT NULL,
  blob_size INTEGER NOT NULL,
  stored_at TIMESTAMPTZ NOT NULL,         -- when it was uploaded
  replaced_at TIMESTAMPTZ NOT NULL DEFAULT now(), -- when a newer version replaced it: HISTORY_DAYS counts from here

  PRIMARY KEY (user_id, version)
);

-- Lets the cleanup find versions past HISTORY_DAYS without a full scan.
CREATE INDEX IF NOT EXISTS idx_history_replaced_at ON user_sync_history (replaced_at);
