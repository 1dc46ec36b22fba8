#!/usr/bin/env bash
# Sharded macro benchmark: two throwaway PostgreSQL shards behind one Weir, a table sharded
# by key, rows loaded through Weir, then a key-routed read + write pgbench script through Weir,
# alternated with the same script through the same Weir to an unsharded database, to measure
# what sharded routing costs Weir per statement.
#
#   bash benches/pgbench_sharded.sh
#   CLIENTS=50 DURATION=3 MODES=simple ROUNDS=1 bash benches/pgbench_sharded.sh
#
# Environment:
#   CLIENTS   pgbench clients (-c), default 100      DURATION  seconds per run (-T), default 15
#   MODES     simple extended prepared (-M)          JOBS      pgbench threads (-j), default 2
#   ROUNDS    sharded/unsharded run pairs per mode, default 2
#   ROWS      rows in accounts, default 100000       SHARDS    number of shards, default 2
#             (SHARDS=1 puts both databases on one server: the difference is routing alone)
#   PLAIN_POOL_SIZE  pool of the unsharded database, default 20 x SHARDS, reserve 5 x SHARDS
#             (the sharded database has 20 + 5 per shard: both paths get as many servers)
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
# (two autocommit statements, each routed by its key).
#
# The unsharded baseline: database `plain` on shard 0's server holds a full copy of accounts
# (all ROWS rows, loaded directly), and Weir has a second, ordinary entry `[databases.plain]`
# (host/port/dbname, no shards, no sharded_tables) for it, so the same script, with the same
# statement shapes, goes through the same Weir process without routing. Per mode the script
# runs ROUNDS pairs, in ABBA order (sharded, plain, plain, sharded, ...) so drift on a shared
# machine falls on both sides alike.
#
# Printed per run: tps, latency, per-statement latency, failures, Weir's CPU per transaction,
# the most server connections seen per shard (or on shard 0's server for plain), and whether
# the sum of balances grew by exactly the number of transactions. Then per mode: Weir CPU µs
# per transaction sharded vs unsharded (all rounds pooled: CPU ticks / transactions), the
# difference per statement = (sharded - unsharded) / 2, the spread of that difference over
# the rounds, and whether it meets the goal of at most 1 µs of Weir CPU per statement.
set -euo pipefail

# shellcheck source=benches/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CLIENTS=${CLIENTS:-100}
DURATION=${DURATION:-15}
MODES=${MODES:-simple extended prepared}
JOBS=${JOBS:-2}
ROWS=${ROWS:-100000}
SHARDS=${SHARDS:-2}
ROUNDS=${ROUNDS:-2}

POOL_SIZE=20
RESERVE_POOL_SIZE=5
MAX_CLIENT_CONN=2000
PLAIN_POOL_SIZE=${PLAIN_POOL_SIZE:-$((POOL_SIZE * SHARDS))}
PLAIN_RESERVE_POOL_SIZE=$((RESERVE_POOL_SIZE * SHARDS))
GOAL_US=1 # the most Weir CPU per statement sharded routing may add
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
    write_weir_toml "benches/pgbench_sharded.sh: Weir in front of $SHARDS shards" "$WEIR_PORT" \
        "$RESERVE_POOL_SIZE" <<TOML
[databases.bench]
dbname = "bench"
shards = [
$shards]
sharded_tables = [
  { table = "accounts", column = "id", type = "bigint" },
]

# The unsharded baseline: an ordinary database entry, same Weir, same user, no routing.
[databases.plain]
host = "127.0.0.1"
port = ${SHARD_PORTS[0]}
dbname = "plain"
pool_size = $PLAIN_POOL_SIZE
reserve_pool_size = $PLAIN_RESERVE_POOL_SIZE
TOML
}

# Database plain on shard 0's server: a full copy of accounts (ids 1..ROWS), loaded directly.
create_plain() {
    local count
    log "PostgreSQL shard0: database plain with all $ROWS accounts (unsharded baseline)"
    psql_at "${SHARD_PORTS[0]}" postgres -c "CREATE DATABASE plain OWNER bench"
    psql_at "${SHARD_PORTS[0]}" plain \
        -c 'CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL DEFAULT 0)' \
        -c 'ALTER TABLE accounts OWNER TO bench' \
        -c "INSERT INTO accounts (id, balance) SELECT g, 0 FROM generate_series(1, $ROWS) AS g" \
        -c 'VACUUM ANALYZE accounts'
    count=$(psql_at "${SHARD_PORTS[0]}" plain -c 'SELECT count(*) FROM accounts')
    [ "$count" = "$ROWS" ] || die "plain.accounts holds $count rows, expected $ROWS"
    LOAD_LINE+="; unsharded copy: plain.accounts on shard0's server, $count rows (loaded directly)"
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

# sum_balances sharded|plain
sum_balances() {
    local i sum=0 part
    if [ "$1" = plain ]; then
        psql_at "${SHARD_PORTS[0]}" plain -c 'SELECT coalesce(sum(balance), 0) FROM accounts'
        return
    fi
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

# start_db_sampler PORT DB FILE PID: lib.sh's start_conn_sampler for database DB (it counts
# database bench only): every 0.5 s appends to FILE how many client backends of DB on the
# cluster at PORT have their client socket in process PID. Sets SAMPLER_PID.
start_db_sampler() {
    local port=$1 db=$2 file=$3 pid=$4
    : >"$file"
    (
        trap 'exit 0' TERM
        local list
        while :; do
            list=$(owned_ports "$pid" "$port")
            psql_at "$port" postgres -c "SELECT count(*) FROM pg_stat_activity
                WHERE datname = '$db' AND backend_type = 'client backend'
                  AND pid <> pg_backend_pid() AND client_port = ANY ('{$list}'::int[])" \
                >>"$file" 2>/dev/null || true
            sleep 0.5
        done
    ) &
    SAMPLER_PID=$!
    BENCH_PIDS+=("$SAMPLER_PID")
}

# run_one MODE ROUND sharded|plain: one pgbench run through Weir; appends a row to results:
# mode round target tps txns failed aborted lat sel upd ticks us/txn max_srv balance status
run_one() {
    local mode=$1 round=$2 target=$3 out="$BENCH_DIR/pgbench.$1.$2.$3.out" status=0
    local before after b0 b1 i db pids=() servers="" sel upd ticks us check
    local conns="$BENCH_DIR/conns.$mode.$round.$target"
    if [ "$target" = sharded ]; then db=bench; else db=plain; fi
    log "round $round: pgbench -f accounts.sql -M $mode -c $CLIENTS -j $JOBS -T $DURATION -> Weir $db ($target)"
    if [ "$target" = sharded ]; then
        for ((i = 0; i < SHARDS; i++)); do
            start_db_sampler "${SHARD_PORTS[$i]}" bench "$conns.$i" "$WEIR_PID"
            pids+=("$SAMPLER_PID")
        done
    else
        start_db_sampler "${SHARD_PORTS[0]}" plain "$conns.0" "$WEIR_PID"
        pids+=("$SAMPLER_PID")
    fi
    b0=$(sum_balances "$target")
    before=$(cpu_ticks "$WEIR_PID")
    run_waited env PGPASSWORD="$BENCH_PASSWORD" "$(pgbench_bin)" -n -r -f "$BENCH_DIR/accounts.sql" \
        -M "$mode" -c "$CLIENTS" -j "$JOBS" -T "$DURATION" -h 127.0.0.1 -p "$WEIR_PORT" \
        -U "$BENCH_USER" "$db" >"$out" 2>&1 || status=$?
    after=$(cpu_ticks "$WEIR_PID")
    stop_conn_sampler "${pids[@]}"
    b1=$(sum_balances "$target")
    parse_pgbench "$out"
    for ((i = 0; i < ${#pids[@]}; i++)); do
        servers+="${servers:+/}$(max_of_file "$conns.$i")"
    done
    sel=$(awk '/SELECT balance FROM accounts/ { print $1; exit }' "$out")
    upd=$(awk '/UPDATE accounts SET balance/ { print $1; exit }' "$out")
    ticks=$((after - before))
    us=$(fdiv "$((ticks * 1000000))" "$((CLK_TCK * PB_TXNS))" 1)
    # Each completed transaction ran one UPDATE of +1 on one row.
    if [ $((b1 - b0)) = "$PB_TXNS" ]; then check=ok; else check="MISMATCH($((b1 - b0)))"; fi
    judge_run "$mode/$target/round$round" "$out" "$status"
    [ "$check" = ok ] || NOTES+=("$mode/$target/round$round: sum(balance) grew by $((b1 - b0)), expected $PB_TXNS")
    printf '%s %s %s %s %s %s %s %s %s %s %s %s %s %s %s\n' "$mode" "$round" "$target" \
        "$PB_TPS" "$PB_TXNS" "$PB_FAILED" "$PB_ABORTED" "$PB_LAT" "${sel:--}" "${upd:--}" \
        "$ticks" "$us" "$servers" "$check" "$RUN_STATE" >>"$BENCH_DIR/results"
    sleep 1
}

# ROUNDS sharded/unsharded pairs, ABBA: odd rounds run sharded first, even rounds plain first.
run_mode() {
    local mode=$1 round
    for ((round = 1; round <= ROUNDS; round++)); do
        if [ $((round % 2)) = 1 ]; then
            run_one "$mode" "$round" sharded
            run_one "$mode" "$round" plain
        else
            run_one "$mode" "$round" plain
            run_one "$mode" "$round" sharded
        fi
    done
}

# Per mode, from the runs that passed (status ok, balance ok): pooled Weir µs per transaction
# for each side, the difference per statement, its range over the rounds with both sides ok.
summarize() {
    awk -v tck="$CLK_TCK" -v goal="$GOAL_US" -v modes="$MODES" '
        $14 == "ok" && $15 == "ok" && $5 > 0 {
            ticks[$1, $3] += $11; txns[$1, $3] += $5
            r[$1, $2, $3] = $11 * 1e6 / (tck * $5)
            ok[$1, $2, $3] = 1
        }
        { if ($2 + 0 > maxr) maxr = $2 + 0 }
        END {
            n = split(modes, m, " ")
            for (i = 1; i <= n; i++) {
                md = m[i]
                s = (txns[md, "sharded"] ? ticks[md, "sharded"] * 1e6 / (tck * txns[md, "sharded"]) : "")
                p = (txns[md, "plain"] ? ticks[md, "plain"] * 1e6 / (tck * txns[md, "plain"]) : "")
                lo = ""; hi = ""; k = 0
                for (rd = 1; rd <= maxr; rd++) {
                    if (!ok[md, rd, "sharded"] || !ok[md, rd, "plain"]) continue
                    d = (r[md, rd, "sharded"] - r[md, rd, "plain"]) / 2; k++
                    if (lo == "" || d < lo) lo = d
                    if (hi == "" || d > hi) hi = d
                }
                if (s == "" || p == "") {
                    printf "%-9s %14s %14s %14s %20s %8s\n", md, (s == "" ? "-" : sprintf("%.1f", s)),
                        (p == "" ? "-" : sprintf("%.1f", p)), "-", "-", "-"
                    continue
                }
                d = (s - p) / 2
                # yes: pooled and every round within the goal; NO: pooled and every round
                # over it; mixed: the rounds disagree (noise is larger than the goal).
                v = (d <= goal ? "yes" : "NO")
                if (k > 0 && ((d <= goal && hi > goal) || (d > goal && lo <= goal))) v = "mixed"
                printf "%-9s %14.1f %14.1f %14.2f %20s %8s\n", md, s, p, d,
                    (k > 0 ? sprintf("%.2f..%.2f (%d)", lo, hi, k) : "-"), v
            }
        }' "$BENCH_DIR/results"
}

print_report() {
    echo
    echo "sharded vs unsharded pgbench through one Weir: $SHARDS shards, $ROWS accounts, $CLIENTS clients, -j $JOBS, ${DURATION}s per run, $ROUNDS round(s) per mode; $(nproc) CPUs"
    echo "pools: sharded $POOL_SIZE + reserve $RESERVE_POOL_SIZE per shard; plain $PLAIN_POOL_SIZE + reserve $PLAIN_RESERVE_POOL_SIZE on shard0's server"
    echo "Weir: $("$WEIR_BIN" --version 2>/dev/null) (WEIR_WORKERS=${WEIR_WORKERS:-unset})"
    echo "$LOAD_LINE"
    echo "transaction: SELECT balance ... WHERE id = :id; UPDATE accounts SET balance = balance + 1 WHERE id = :id"
    echo
    local f='%-9s %5s %-8s %10s %9s %7s %7s %8s %8s %8s %9s %11s %-9s %s\n'
    # shellcheck disable=SC2059 # the format is the one above
    printf "$f" mode round target tps txns failed aborted lat_ms sel_ms upd_ms us/txn max_srv \
        balance status
    local mode round target tps txns failed aborted lat sel upd ticks us srv check state
    while read -r mode round target tps txns failed aborted lat sel upd ticks us srv check state; do
        : "$ticks"
        # shellcheck disable=SC2059
        printf "$f" "$mode" "$round" "$target" "$tps" "$txns" "$failed" "$aborted" "$lat" \
            "$sel" "$upd" "$us" "$srv" "$check" "$state"
    done <"$BENCH_DIR/results"
    echo
    echo "us/txn: Weir CPU (utime+stime) per transaction (2 statements), $CLIENTS md5 logins included; max_srv: most server connections per shard (plain: on shard0's server); balance: sum(balance) grew by txns"
    echo
    echo "sharded routing cost: Weir CPU per statement above unsharded (goal: <= $GOAL_US us)"
    printf '%-9s %14s %14s %14s %20s %8s\n' mode sharded_us/txn plain_us/txn diff_us/stmt \
        "per-round(n)" goal
    summarize
    echo
    echo "us/txn pooled over the rounds that passed; diff_us/stmt = (sharded - plain) / 2; per-round: range of that difference over rounds with both runs ok"
    echo "goal: yes = pooled and every round <= $GOAL_US us, NO = pooled and every round above, mixed = rounds disagree (more ROUNDS/DURATION, quieter machine)"
    print_notes
}

main() {
    local mode
    check_words mode "$MODES" simple extended prepared
    [ "$SHARDS" -ge 1 ] || die "SHARDS must be at least 1"
    [ "$ROUNDS" -ge 1 ] || die "ROUNDS must be at least 1"
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
    create_plain
    write_script
    : >"$BENCH_DIR/results"
    for mode in $MODES; do
        run_mode "$mode"
    done
    kill -0 "$WEIR_PID" 2>/dev/null || NOTES+=("Weir exited during the run; see its log (KEEP_TMP=1)")
    print_report
}

main "$@"
