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
  restore () { pg_restore "$@" --dbname="$DATABASE_URL" < "$file"; }
  list () { pg_restore --list < "$file"; }
  read_all () { pg_restore --file=/dev/null < "$file"; }
else
  sql () { docker compose exec -T postgres psql --no-psqlrc --quiet --tuples-only --no-align --set=ON_ERROR_STOP=1 \
    --username=logikids --dbname=logikids "$@"; }
  restore () { docker compose exec -T postgres pg_restore "$@" --username=logikids --dbname=logikids < "$file"; }
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

# --clean --if-exists drops what the dump recreates, so this works on an empty database, on one
# the service has already migrated, and (with --force) on one that holds data.
restore --clean --if-exists --no-owner --no-privileges --single-transaction --exit-on-error
echo "restore: restored $file ($(sql --command='SELECT count(*) FROM user_sync_data') users)"
