-- Up Migration
-- The entity tag is stored, and every write gives it a random part: a tag never repeats for
-- different content, not even after a restore from backup brings back an older version
-- number and creation time (the tag used to be computed from those two alone). Existing
-- records keep the tag they had, so the clients holding one still match.
-- Idempotent, like every file here (see 001_init.sql).
ALTER TABLE user_sync_data ADD COLUMN IF NOT EXISTS etag TEXT;
UPDATE user_sync_data SET etag = version || '-' || floor(extract(epoch FROM created_at) * 1000000)::bigint
  WHERE etag IS NULL;
ALTER TABLE user_sync_data ALTER COLUMN etag SET DEFAULT ('1-' || replace(gen_random_uuid()::text, '-', ''));
ALTER TABLE user_sync_data ALTER COLUMN etag SET NOT NULL;
