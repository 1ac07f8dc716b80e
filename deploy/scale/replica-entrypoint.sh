#!/bin/sh
# The streaming replica: on the first start of its empty volume, a copy of the primary taken
# by pg_basebackup -R (which also writes standby.signal and the connection to stream from);
# then PostgreSQL as the image starts it, a hot standby that takes reads.
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  until pg_isready --host=postgres --username=replicator --quiet; do sleep 1; done
  mkdir -p "$PGDATA"
  chown postgres:postgres "$PGDATA"
  chmod 700 "$PGDATA"
  PGPASSWORD="$REPLICATION_PASSWORD" su-exec postgres \
    pg_basebackup --host=postgres --username=replicator --pgdata="$PGDATA" \
      --write-recovery-conf --wal-method=stream --checkpoint=fast --progress
fi
exec docker-entrypoint.sh postgres
