-- Up Migration
-- Access tokens (docs/sync-protocol.md): a record claimed by a device holds the SHA-256 of its
-- access token, never the token. NULL: unclaimed (new, or uploaded by a client without
-- tokens), served to anyone as before. Existing records stay unclaimed until a device sends a
-- token with an upload. Idempotent, like every file here (see 001_init.sql).
ALTER TABLE user_sync_data ADD COLUMN IF NOT EXISTS token_hash BYTEA;
DO $$
BEGIN
  ALTER TABLE user_sync_data ADD CONSTRAINT token_hash_length CHECK (octet_length(token_hash) = 32);
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
