#!/usr/bin/env bash
# Usage: scripts/restore.sh FILE [--force]
# Restores a dump written by scripts/backup.sh, in a single transaction that stops at the first
# error (so a failed restore changes nothing). Refuses a database that already holds sync data
# unless --force is given, which replaces that data with the backup's.
# With DATABASE_URL set it restores into that database; without, through the compose container.
#
# Exit status:
#   0   restored
#   1   refused: the database already holds sync data and --force was not given;
#       or pg_restore failed during the restore (its transaction is rolled back: nothing changed)
#   64  usage error
#   65  FILE is not a usable backup: not a pg_dump custom-format file, or one that is cut off
#       or damaged; found before the database is touched
#   66  FILE cannot be read
#   other  psql's own status when the database cannot be reached or queried (2: no connection)
set -euo pipefail
cd "$(dirname "$0")/.."

usage () { echo "usage: scripts/restore.sh FILE [--force]" >&2; exit 64; }
file=""
force=false
for arg in "$@"; do
  case "$arg" in
    --force) force=true ;;
    -*) usage ;;
    *) [ -z "$file" ] || usage; file="$arg" ;;
  esac
done
[ -n "$file" ] || usage
[ -r "$file" ] || { echo "restore: cannot read $file" >&2; exit 66; }

if [ -n "${DATABASE_URL:-}" ]; then
  sql () { psql --no-psqlrc --quiet --tuples-only --no-align --set=ON_ERROR_STOP=1 --dbname="$DATABASE_URL" "$@"; }
  script () { pg_restore --clean --if-exists --no-owner --no-privileges --file=- < "$file"; }
  apply () { psql --no-psqlrc --quiet --set=ON_ERROR_STOP=1 --single-transaction --dbname="$DATABASE_URL" "$@"; }
  list () { pg_restore --list < "$file"; }
  read_all () { pg_restore --file=/dev/null < "$file"; }
else
  sql () { docker compose exec -T postgres psql --no-psqlrc --quiet --tuples-only --no-align --set=ON_ERROR_STOP=1 \
    --username=logikids --dbname=logikids "$@"; }
  script () { docker compose exec -T postgres pg_restore --clean --if-exists --no-owner --no-privileges --file=- < "$file"; }
  apply () { docker compose exec -T postgres psql --no-psqlrc --quiet --set=ON_ERROR_STOP=1 --single-transaction \
    --username=logikids --dbname=logikids "$@"; }
  list () { docker compose exec -T postgres pg_restore --list < "$file"; }
  read_all () { docker compose exec -T postgres pg_restore --file=/dev/null < "$file"; }
fi

# pg_restore --list reads only the table of contents: a foreign file, or one cut off inside the
# table of contents, stops here.
list > /dev/null || { echo "restore: $file is not a readable pg_dump custom-format file" >&2; exit 65; }
# The table of contents comes first, so a file cut off in its data still lists. Reading every
# entry (into /dev/null, touching no database) finds that before anything is dropped; the cost is
# reading the file twice.
read_all || { echo "restore: $file is incomplete or damaged (cut off or corrupted); nothing was changed" >&2; exit 65; }

rows=0
if [ "$(sql --command="SELECT to_regclass('public.user_sync_data') IS NOT NULL")" = "t" ]; then
  rows=$(sql --command="SELECT count(*) FROM user_sync_data")
fi
if [ "$rows" != "0" ] && [ "$force" != true ]; then
  echo "restore: the database already holds sync data for $rows users; run again with --force to replace it with the backup" >&2
  exit 1
fi

# The archive is replayed as SQL by psql in one transaction, after the service's own tables are
# dropped in that same transaction: so this works on an empty database, on one the service has
# already migrated (also with a backup from an older release, whose tables have other
# dependencies than the current ones: --clean alone would trip over them), and (with --force) on
# one that holds data. Any error rolls all of it back. Should pg_restore itself fail half-way,
# the statement appended after its output fails too, so psql rolls back rather than commit a part.
if ! { script || echo 'SELECT 1 / 0 AS "restore: pg_restore failed; rolling back";'; } |
  apply --command='DROP TABLE IF EXISTS user_sync_versions, user_sync_data, schema_migrations CASCADE' --file=- > /dev/null; then
  echo "restore: restoring $file failed (the error is above); its transaction was rolled back: nothing changed" >&2
  exit 1
fi
echo "restore: restored $file ($(sql --command='SELECT count(*) FROM user_sync_data') users)"
# A backup from an older release holds an older schema: the service brings it up to date when it
# starts (its migrations), not while it runs.
latest=''
for migration in sql/*.sql; do latest=$(basename "$migration" .sql); done # globs expand in name order
restored=$(sql --command="SELECT coalesce(max(name), '') FROM schema_migrations" 2>/dev/null || echo '')
if [ "$restored" != "$latest" ]; then
  echo "restore: the backup is from an older release (schema ${restored:-unknown}, this release $latest): restart the service now; it upgrades the schema at start-up"
fi
