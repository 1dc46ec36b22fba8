#!/usr/bin/env bash
# The compose file's pgbench service: loads accounts 1..ROWS through Weir (one INSERT per row,
# each routed to its shard by id), then runs docker/pgbench/accounts.sql through Weir.
set -euo pipefail

ROWS=${ROWS:-10000}
: "${PGHOST:?}" "${PGPORT:?}" "${PGUSER:?}" "${PGDATABASE:?}" "${PGPASSWORD:?}"

until pg_isready -q; do
    echo "waiting for Weir at $PGHOST:$PGPORT"
    sleep 1
done

echo "loading $ROWS accounts through Weir"
seq 1 "$ROWS" |
    sed 's/.*/INSERT INTO accounts (id, balance) VALUES (&, 0) ON CONFLICT (id) DO NOTHING;/' |
    psql -X -q -v ON_ERROR_STOP=1

# shellcheck disable=SC2086 # PGBENCH_ARGS is a list of pgbench options
exec pgbench -n -r -f /bench/accounts.sql -D rows="$ROWS" ${PGBENCH_ARGS:--M extended -c 50 -j 2 -T 60 -P 5}
