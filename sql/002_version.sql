-- Up Migration
-- A per-record version for conditional requests (ETag, If-Match): every upload adds one.
-- Existing records start at 1. Idempotent, like every file here (see 001_init.sql).
ALTER TABLE user_sync_data ADD COLUMN IF NOT EXISTS version BIGINT NOT NULL DEFAULT 1;
