-- Up Migration
-- The schema of the approved design. Every statement is idempotent because the same
-- file runs twice in a Docker Compose deployment: once by the postgres image from
-- /docker-entrypoint-initdb.d, then by the service's migration runner, which records it.

CREATE TABLE IF NOT EXISTS user_sync_data (
  user_id UUID PRIMARY KEY,
  encrypted_blob TEXT NOT NULL,           -- base64 ciphertext, never decoded by the server
  iv VARCHAR(16) NOT NULL,
  timestamp BIGINT NOT NULL,              -- the client's clock, opaque to the server
  checksum VARCHAR(64) NOT NULL,          -- SHA-256 hex, computed by the client
  created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  last_accessed TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  blob_size INTEGER NOT NULL,             -- decoded bytes, for monitoring and the limit

  CONSTRAINT blob_size_limit CHECK (blob_size <= 1000000),
  CONSTRAINT iv_format CHECK (iv ~ '^[A-Za-z0-9+/]{16}$'),
  CONSTRAINT checksum_format CHECK (checksum ~ '^[a-f0-9]{64}$')
);

-- Finds inactive accounts for the GDPR cleanup without a full scan.
CREATE INDEX IF NOT EXISTS idx_last_accessed ON user_sync_data (last_accessed);
