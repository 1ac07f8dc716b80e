#!/usr/bin/env bash
# Usage: scripts/backup.sh [FILE]
# Writes a custom-format pg_dump of the sync database to FILE (default:
# backups/logikids-<UTC time>.dump) and prints the file's path as its last line.
# With DATABASE_URL set it dumps that database with the local pg_dump; without, it runs
# pg_dump inside the compose `postgres` container, so the tool matches the server version.
set -euo pipefail
cd "$(dirname "$0")/.."

file="${1:-backups/logikids-$(date -u +%Y%m%dT%H%M%SZ).dump}"
mkdir -p "$(dirname "$file")"
partial="$file.partial"
trap 'rm -f "$partial"' EXIT

if [ -n "${DATABASE_URL:-}" ]; then
  pg_dump --format=custom --no-owner --no-privileges --dbname="$DATABASE_URL" --file="$partial"
else
  docker compose exec -T postgres pg_dump --format=custom --no-owner --no-privileges \
    --username=logikids --dbname=logikids > "$partial"
fi
# Only a complete dump takes the final name, so a failed run never leaves a file that looks good.
mv "$partial" "$file"
echo "$file"
