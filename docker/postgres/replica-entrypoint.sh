#!/usr/bin/env bash
# Entrypoint of a shard replica: on first start, clone the primary with pg_basebackup
# (-R writes primary_conninfo and standby.signal), then run PostgreSQL as a hot standby that
# streams from it. Later starts reuse the data dir. Runs as the postgres OS user.
set -euo pipefail

: "${PRIMARY_HOST:?PRIMARY_HOST must name the primary}"
PRIMARY_PORT=${PRIMARY_PORT:-5432}
export PGPASSWORD="$REPLICATION_PASSWORD"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    until pg_isready -q -h "$PRIMARY_HOST" -p "$PRIMARY_PORT"; do
        echo "waiting for $PRIMARY_HOST"
        sleep 1
    done
    until pg_basebackup -h "$PRIMARY_HOST" -p "$PRIMARY_PORT" -U replicator -D "$PGDATA" \
        -R -X stream -c fast -P; do
        echo "pg_basebackup from $PRIMARY_HOST failed; retrying"
        rm -rf "${PGDATA:?}"/*
        sleep 2
    done
    chmod 700 "$PGDATA"
fi

exec postgres -c hot_standby=on
