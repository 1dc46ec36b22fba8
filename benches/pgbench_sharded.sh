#!/usr/bin/env bash
# Sharded macro benchmark: two throwaway PostgreSQL shards behind one Weir, a table sharded
# by key, rows loaded through Weir, then a key-routed read + write pgbench script through Weir.
#
#   bash benches/pgbench_sharded.sh
#   CLIENTS=100 DURATION=5 MODES=simple bash benches/pgbench_sharded.sh
#
# Environment:
#   CLIENTS   pgbench clients (-c), default 1000     DURATION  seconds per run (-T), default 30
#   MODES     simple extended prepared (-M)          JOBS      pgbench threads (-j), default 2
#   ROWS      rows in accounts, default 100000       SHARDS    number of shards, default 2
#   WEIR_BIN  use this binary instead of building    WEIR_WORKERS  passed to Weir as is
#   KEEP_TMP=1 keeps the temp dir (configs, logs, pgbench output)
#
# Each shard has `accounts(id bigint primary key, balance bigint)`. Weir is configured with the
# shards and `sharded_tables = [{ table = "accounts", column = "id", type = "bigint" }]`, so
# shard i holds the rows PostgreSQL's `PARTITION BY HASH (id)` would put in remainder i. The
# rows are loaded through Weir as multi-row INSERTs whose rows share a shard, then checked on
# each shard with PostgreSQL's own satisfies_hash_partition(). Each pgbench transaction is
#   \set id random(1, ROWS)
#   SELECT balance FROM accounts WHERE id = :id;
#   UPDATE accounts SET balance = balance + 1 WHERE id = :id;
# (two autocommit statements, each routed by its key). Printed per mode: tps, latency, per-
# statement latency, failures, Weir's CPU per transaction, the most server connections seen per
# shard, and whether the sum of balances grew by exactly the number of transactions.
set -euo pipefail

# shellcheck source=benches/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CLIENTS=${CLIENTS:-1000}
DURATION=${DURATION:-30}
MODES=${MODES:-simple extended prepared}
JOBS=${JOBS:-2}
ROWS=${ROWS:-100000}
SHARDS=${SHARDS:-2}

POOL_SIZE=20
RESERVE_POOL_SIZE=5
MAX_CLIENT_CONN=2000
INSERT_BATCH=1000 # ids per generated INSERT (before splitting by shard)

SHARD_PORTS=()

create_shards() {
    local i
    for ((i = 0; i < SHARDS; i++)); do
        free_port
        SHARD_PORTS+=("$FREE_PORT")
        start_cluster "shard$i" "$FREE_PORT" 300
        create_bench_db "$FREE_PORT"
        # weir_bench_hash has no partitions: it only gives satisfies_hash_partition() a
        # PARTITION BY HASH (bigint) key to compute remainders with.
        psql_at "$FREE_PORT" bench \
            -c 'CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL DEFAULT 0)' \
            -c 'ALTER TABLE accounts OWNER TO bench' \
            -c 'CREATE TABLE weir_bench_hash (id bigint) PARTITION BY HASH (id)'
    done
}

write_weir_config() {
    local shards="" i
    for ((i = 0; i < SHARDS; i++)); do
        shards+="  { primary = \"127.0.0.1:${SHARD_PORTS[$i]}\" },"$'\n'
    done
    cat >"$BENCH_DIR/weir.toml" <<TOML
# benches/pgbench_sharded.sh: Weir in front of $SHARDS shards
[weir]
listen_addr = "127.0.0.1"
listen_port = $WEIR_PORT
pool_mode = "transaction"
max_client_conn = $MAX_CLIENT_CONN
default_pool_size = $POOL_SIZE
reserve_pool_size = $RESERVE_POOL_SIZE
auth_type = "md5"
auth_file = "userlist.txt"
log_connections = false
log_disconnections = false

[databases.bench]
dbname = "bench"
shards = [
$shards]
sharded_tables = [
  { table = "accounts", column = "id", type = "bigint" },
]
TOML
}

# Multi-row INSERTs, each with the ids of one shard only (PostgreSQL computes which), sent
# through Weir, which must route each one to the shard its keys hash to.
load_rows() {
    local sql="$BENCH_DIR/load.sql" started elapsed
    log "generating INSERTs for $ROWS rows"
    psql_at "${SHARD_PORTS[0]}" bench -o "$sql" -c "
        SELECT format('INSERT INTO accounts (id, balance) VALUES %s;',
                      string_agg(format('(%s, 0)', g), ', ' ORDER BY g))
        FROM generate_series(1, $ROWS) AS g, generate_series(0, $SHARDS - 1) AS r
        WHERE satisfies_hash_partition('weir_bench_hash'::regclass, $SHARDS, r, g::bigint)
        GROUP BY r, g / $INSERT_BATCH
        ORDER BY g / $INSERT_BATCH, r"
    log "loading $ROWS rows through Weir ($(wc -l <"$sql") INSERT statements)"
    started=$(date +%s.%N)
    PGPASSWORD=$BENCH_PASSWORD "$PG_BIN/psql" -X -q -w -v ON_ERROR_STOP=1 -h 127.0.0.1 \
        -p "$WEIR_PORT" -U "$BENCH_USER" -d bench -f "$sql" >"$BENCH_DIR/load.log" 2>&1 || {
        tail -n 20 "$BENCH_DIR/load.log" >&2
        die "loading through Weir failed"
    }
    elapsed=$(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN { printf "%.2f", e - s }')
    LOAD_LINE="loaded $ROWS rows through Weir in ${elapsed}s"
    log "$LOAD_LINE"
}

# Every shard holds only the ids PostgreSQL's hash partitioning assigns to it, and all of them.
verify_placement() {
    local i count misplaced total=0 placement=""
    for ((i = 0; i < SHARDS; i++)); do
        IFS='|' read -r count misplaced < <(psql_at "${SHARD_PORTS[$i]}" bench -c "
            SELECT count(*), count(*) FILTER (WHERE NOT satisfies_hash_partition(
                'weir_bench_hash'::regclass, $SHARDS, $i, id)) FROM accounts")
        [ "$misplaced" = 0 ] || die "shard $i holds $misplaced rows that belong to another shard"
        total=$((total + count))
        placement+=" shard$i=$count"
        psql_at "${SHARD_PORTS[$i]}" bench -c 'VACUUM ANALYZE accounts'
    done
    [ "$total" = "$ROWS" ] || die "the shards hold $total rows, expected $ROWS"
    LOAD_LINE+=";$placement rows, each on the shard PostgreSQL's PARTITION BY HASH picks"
}

sum_balances() {
    local i sum=0 part
    for ((i = 0; i < SHARDS; i++)); do
        part=$(psql_at "${SHARD_PORTS[$i]}" bench -c 'SELECT coalesce(sum(balance), 0) FROM accounts')
        sum=$((sum + part))
    done
    echo "$sum"
}

write_script() {
    cat >"$BENCH_DIR/accounts.sql" <<SQL
\\set id random(1, $ROWS)
SELECT balance FROM accounts WHERE id = :id;
UPDATE accounts SET balance = balance + 1 WHERE id = :id;
SQL
}

run_mode() {
    local mode=$1 out="$BENCH_DIR/pgbench.$1.out" status=0 before after b0 b1 i
    local pids=() servers="" sel upd us check
    log "pgbench -f accounts.sql -M $mode -c $CLIENTS -j $JOBS -T $DURATION -> Weir"
    for ((i = 0; i < SHARDS; i++)); do
        start_conn_sampler "${SHARD_PORTS[$i]}" "$BENCH_DIR/conns.$mode.$i" of "$WEIR_PID"
        pids+=("$SAMPLER_PID")
    done
    b0=$(sum_balances)
    before=$(cpu_ticks "$WEIR_PID")
    run_waited env PGPASSWORD="$BENCH_PASSWORD" "$(pgbench_bin)" -n -r -f "$BENCH_DIR/accounts.sql" \
        -M "$mode" -c "$CLIENTS" -j "$JOBS" -T "$DURATION" -h 127.0.0.1 -p "$WEIR_PORT" \
        -U "$BENCH_USER" bench >"$out" 2>&1 || status=$?
    after=$(cpu_ticks "$WEIR_PID")
    stop_conn_sampler "${pids[@]}"
    b1=$(sum_balances)
    parse_pgbench "$out"
    for ((i = 0; i < SHARDS; i++)); do
        servers+="${servers:+/}$(max_of_file "$BENCH_DIR/conns.$mode.$i")"
    done
    sel=$(awk '/SELECT balance FROM accounts/ { print $1; exit }' "$out")
    upd=$(awk '/UPDATE accounts SET balance/ { print $1; exit }' "$out")
    us=$(fdiv "$(((after - before) * 1000000))" "$((CLK_TCK * PB_TXNS))" 1)
    # Each completed transaction ran one UPDATE of +1 on one row.
    if [ $((b1 - b0)) = "$PB_TXNS" ]; then check=ok; else check="MISMATCH($((b1 - b0)))"; fi
    judge_run "$mode" "$out" "$status"
    printf '%-9s %10s %9s %7s %7s %8s %8s %8s %9s %11s %-9s %s\n' "$mode" "$PB_TPS" \
        "$PB_TXNS" "$PB_FAILED" "$PB_ABORTED" "$PB_LAT" "${sel:--}" "${upd:--}" \
        "$us" "$servers" "$check" "$RUN_STATE" >>"$BENCH_DIR/results"
    sleep 1
}

print_report() {
    echo
    echo "sharded pgbench through Weir: $SHARDS shards, $ROWS accounts, $CLIENTS clients, -j $JOBS, ${DURATION}s per run; pool $POOL_SIZE + reserve $RESERVE_POOL_SIZE per shard; $(nproc) CPUs"
    echo "Weir: $("$WEIR_BIN" --version 2>/dev/null) (WEIR_WORKERS=${WEIR_WORKERS:-unset})"
    echo "$LOAD_LINE"
    echo "transaction: SELECT balance ... WHERE id = :id; UPDATE accounts SET balance = balance + 1 WHERE id = :id"
    echo
    printf '%-9s %10s %9s %7s %7s %8s %8s %8s %9s %11s %-9s %s\n' mode tps txns failed \
        aborted lat_ms sel_ms upd_ms us/txn max_srv balance status
    cat "$BENCH_DIR/results"
    echo
    echo "us/txn: Weir CPU per transaction (2 statements); max_srv: most server connections per shard; balance: sum(balance) grew by txns"
    if [ "${#NOTES[@]}" -gt 0 ]; then
        echo
        echo "notes:"
        printf '  %s\n' "${NOTES[@]}"
    fi
}

main() {
    local mode
    for mode in $MODES; do
        case $mode in simple | extended | prepared) ;; *) die "unknown mode $mode" ;; esac
    done
    [ "$SHARDS" -ge 1 ] || die "SHARDS must be at least 1"
    bench_init "$CLIENTS"
    build_weir

    create_shards
    free_port
    WEIR_PORT=$FREE_PORT
    write_userlist "$BENCH_DIR/userlist.txt"
    write_weir_config
    start_weir "$BENCH_DIR/weir.toml" "$WEIR_PORT"

    load_rows
    verify_placement
    write_script
    : >"$BENCH_DIR/results"
    for mode in $MODES; do
        run_mode "$mode"
    done
    kill -0 "$WEIR_PID" 2>/dev/null || NOTES+=("Weir exited during the run; see its log (KEEP_TMP=1)")
    print_report
}

main "$@"
