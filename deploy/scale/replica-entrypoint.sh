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
  # The image's tool to drop root: gosu (su-exec on older alpine images).
  if command -v gosu > /dev/null; then as_postgres=gosu; else as_postgres=su-exec; fi
  PGPASSWORD="$REPLICATION_PASSWORD" "$as_postgres" postgres \
    pg_basebackup --host=postgres --username=replicator --pgdata="$PGDATA" \
      --write-recovery-conf --wal-method=stream --checkpoint=fast --progress
fi
exec docker-entrypoint.sh postgres
