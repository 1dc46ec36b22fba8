#!/usr/bin/env bash
# Soak test (by hand, not in CI): 1,000 clients of mixed traffic through one Weir for 30
# minutes, reporting every minute Weir's RSS, open file descriptors and server connections —
# which must stay flat — and at the end every pgbench's transactions and failures (must be 0).
#
#   bash benches/soak.sh                              # 30 minutes
#   DURATION=120 INTERVAL=10 bash benches/soak.sh     # a short check of the script itself
#
# Environment:
#   DURATION  seconds of traffic, default 1800        INTERVAL  seconds between samples, 60
#   RATE      total transactions/s (pgbench -R, split by client share), default 3000;
#             0 = as fast as possible (then pgbench and PostgreSQL saturate both cores)
#   WEIR_BIN  use this binary instead of building     WEIR_WORKERS  passed to Weir as is
#   KEEP_TMP=1 keeps the temp dir (configs, logs, pgbench output)
#
# Traffic (1,000 clients in all), each pgbench with --max-tries=1 so any error counts:
#   simple    400 clients  pgbench -S -M simple         (select-only, unsharded)
#   extended  300 clients  pgbench -b simple-update -M extended
#   prepared  200 clients  pgbench -S -M prepared
#             (select-only: pgbench 15 prepares with a blocking PQprepare, so one pgbench thread
#             whose other clients hold every server inside BEGIN … END waits for itself — with
#             any pooler whose pool is smaller than the clients of a thread)
#   sharded   100 clients  key-routed SELECT + UPDATE on a 2-shard database, -M extended
set -euo pipefail

# shellcheck source=benches/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DURATION=${DURATION:-1800}
INTERVAL=${INTERVAL:-60}
RATE=${RATE:-3000}
SCALE=10
SHARD_ROWS=100000
TOTAL_CLIENTS=1000

# name clients mode pgbench-args database
WORKLOADS=(
    "simple 400 simple -S bench"
    "extended 300 extended -b simple-update bench"
    "prepared 200 prepared -S bench"
    "sharded 100 extended -f SHARDED_SCRIPT shop"
)

start_all() {
    free_port
    MAIN_PORT=$FREE_PORT
    start_cluster main "$MAIN_PORT" 200
    create_bench_db "$MAIN_PORT"
    log "pgbench -i -s $SCALE on the unsharded database"
    PGPASSWORD=$BENCH_PASSWORD "$(pgbench_bin)" -i -q -s "$SCALE" -h 127.0.0.1 -p "$MAIN_PORT" \
        -U "$BENCH_USER" bench >"$BENCH_DIR/init.log" 2>&1 || die "pgbench -i failed"
    SHARD_PORTS=()
    local i
    for i in 0 1; do
        free_port
        SHARD_PORTS+=("$FREE_PORT")
        start_cluster "shard$i" "$FREE_PORT" 200
        create_bench_db "$FREE_PORT"
        psql_at "$FREE_PORT" postgres -c "CREATE DATABASE shop OWNER bench"
        psql_at "$FREE_PORT" shop \
            -c 'CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL DEFAULT 0)' \
            -c 'ALTER TABLE accounts OWNER TO bench' \
            -c 'CREATE TABLE weir_hash (id bigint) PARTITION BY HASH (id)' \
            -c "INSERT INTO accounts SELECT g, 0 FROM generate_series(1, $SHARD_ROWS) g
                WHERE satisfies_hash_partition('weir_hash'::regclass, 2, $i, g::bigint)"
    done
    free_port
    WEIR_PORT=$FREE_PORT
    write_userlist "$BENCH_DIR/userlist.txt"
    cat >"$BENCH_DIR/weir.toml" <<TOML
[weir]
listen_addr = "127.0.0.1"
listen_port = $WEIR_PORT
max_client_conn = 1200
default_pool_size = 20
auth_type = "md5"
auth_file = "userlist.txt"

[databases.bench]
host = "127.0.0.1"
port = $MAIN_PORT

[databases.shop]
shards = [
  { primary = "127.0.0.1:${SHARD_PORTS[0]}" },
  { primary = "127.0.0.1:${SHARD_PORTS[1]}" },
]
sharded_tables = [{ table = "accounts", column = "id", type = "bigint" }]
TOML
    start_weir "$BENCH_DIR/weir.toml" "$WEIR_PORT"
    cat >"$BENCH_DIR/sharded.sql" <<SQL
\\set id random(1, $SHARD_ROWS)
SELECT balance FROM accounts WHERE id = :id;
UPDATE accounts SET balance = balance + 1 WHERE id = :id;
SQL
}

# Server connections Weir holds on the cluster at PORT (every client backend but ours).
server_conns() {
    psql_at "$1" postgres -c "SELECT count(*) FROM pg_stat_activity
        WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()" 2>/dev/null || echo "?"
}

sample() {
    local t=$1 rss fds
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$WEIR_PID/status" 2>/dev/null || echo "?")
    fds=$(find "/proc/$WEIR_PID/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    printf '%6s %10s %6s %8s %8s %8s\n' "$t" "$rss" "$fds" "$(server_conns "$MAIN_PORT")" \
        "$(server_conns "${SHARD_PORTS[0]}")" "$(server_conns "${SHARD_PORTS[1]}")" |
        tee -a "$BENCH_DIR/samples"
}

main() {
    bench_init "$TOTAL_CLIENTS"
    build_weir
    start_all
    local pids=() w name clients mode rest db args rate pid status=0 t=0 elapsed
    for w in "${WORKLOADS[@]}"; do
        read -r name clients mode rest <<<"$w"
        db=${rest##* }
        args=${rest% *}
        args=${args//SHARDED_SCRIPT/$BENCH_DIR/sharded.sql}
        rate=()
        [ "$RATE" = 0 ] || rate=(-R $((RATE * clients / TOTAL_CLIENTS)))
        log "pgbench $name: -c $clients -M $mode $args ${rate[*]} -> Weir/$db"
        # shellcheck disable=SC2086 # $args is a list of pgbench arguments
        env PGPASSWORD="$BENCH_PASSWORD" "$(pgbench_bin)" -n -c "$clients" -j 1 -T "$DURATION" \
            -M "$mode" --max-tries=1 "${rate[@]}" $args -h 127.0.0.1 -p "$WEIR_PORT" \
            -U "$BENCH_USER" "$db" >"$BENCH_DIR/pgbench.$name.out" 2>&1 &
        pids+=("$!")
        BENCH_PIDS+=("$!")
    done
    echo
    echo "soak: $TOTAL_CLIENTS clients through Weir for ${DURATION}s, rate ${RATE} tps (0 = unthrottled), $(nproc) CPUs"
    printf '%6s %10s %6s %8s %8s %8s\n' t_s rss_kb fds srv_main srv_sh0 srv_sh1 | tee "$BENCH_DIR/samples"
    local started=$SECONDS
    while :; do
        elapsed=$((SECONDS - started))
        [ "$elapsed" -lt $((DURATION + 5)) ] || break
        local running=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && running=1; done
        [ "$running" = 1 ] || break
        if [ "$elapsed" -ge "$t" ]; then
            sample "$elapsed"
            t=$((t + INTERVAL))
        fi
        sleep 1
    done
    for pid in "${pids[@]}"; do
        wait "$pid" || status=1
        forget_pid "$pid"
    done
    sample "end"
    echo
    printf '%-9s %8s %10s %8s %8s %9s\n' workload clients txns failed aborted tps
    local failed_total=0
    for w in "${WORKLOADS[@]}"; do
        read -r name clients _ <<<"$w"
        CLIENTS=$clients
        parse_pgbench "$BENCH_DIR/pgbench.$name.out"
        printf '%-9s %8s %10s %8s %8s %9s\n' "$name" "$clients" "$PB_TXNS" "$PB_FAILED" \
            "$PB_ABORTED" "$PB_TPS"
        failed_total=$((failed_total + PB_FAILED + PB_ABORTED))
        [ "$PB_TXNS" -gt 0 ] || failed_total=$((failed_total + 1))
        if [ "$PB_FAILED" -gt 0 ] || [ "$PB_ABORTED" -gt 0 ]; then
            pgbench_errors "$BENCH_DIR/pgbench.$name.out" 3 | sed "s/^/    $name: /"
        fi
    done
    kill -0 "$WEIR_PID" 2>/dev/null || die "Weir exited during the soak"
    awk 'NR > 1 && $1 != "end" { if (min == "" || $2 < min) min = $2; if ($2 > max) max = $2 }
         END { printf "\nWeir RSS over the run: min %d kB, max %d kB\n", min, max }' \
        "$BENCH_DIR/samples"
    if [ "$failed_total" -ne 0 ] || [ "$status" -ne 0 ]; then
        die "the soak had failed or aborted transactions (see above; KEEP_TMP=1 keeps the logs)"
    fi
    echo "0 failed transactions"
}

main "$@"
