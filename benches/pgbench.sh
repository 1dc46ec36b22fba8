#!/usr/bin/env bash
# Side-by-side macro benchmark in one run: pgbench -S through Weir, through PgBouncer, and
# straight to PostgreSQL, on one throwaway cluster, with equivalent pooler settings.
#
#   bash benches/pgbench.sh                       # 1000 clients, 30 s per run, all modes
#   CLIENTS=100 DURATION=5 bash benches/pgbench.sh
#   MODES="simple prepared" TARGETS="weir pgbouncer" bash benches/pgbench.sh
#
# Environment:
#   CLIENTS   pgbench clients (-c), default 1000     DURATION  seconds per run (-T), default 30
#   MODES     simple extended prepared (-M)          TARGETS   direct weir pgbouncer
#   JOBS      pgbench threads (-j), default 2        SCALE     pgbench -i scale, default 10
#   WEIR_BIN  use this binary instead of building    WEIR_WORKERS  passed to Weir as is
#   KEEP_TMP=1 keeps the temp dir (configs, logs, pgbench output)
#
# Both poolers: transaction mode, default_pool_size 20, reserve_pool_size 5 (after 5 s),
# max_client_conn 2000, md5 client auth from one userlist.txt (user bench), logging of
# connections off. PostgreSQL trusts loopback, so server login costs the same for both.
# PgBouncer 1.18 has no max_prepared_statements (added in 1.21): `-M prepared` through it is
# run anyway and its failures are reported, because that is what a driver would see.
#
# For each mode and target it records tps, failed transactions and aborted clients, the
# pooler's CPU time (utime + stime from /proc/PID/stat) per transaction, and the most server
# connections seen in pg_stat_activity (sampled every 0.5 s), then prints one table and the
# ratios Weir/direct, PgBouncer/direct and Weir/PgBouncer. Everything it starts is stopped and
# its temp dir removed on exit.
set -euo pipefail

# shellcheck source=benches/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CLIENTS=${CLIENTS:-1000}
DURATION=${DURATION:-30}
MODES=${MODES:-simple extended prepared}
TARGETS=${TARGETS:-direct weir pgbouncer}
JOBS=${JOBS:-2}
SCALE=${SCALE:-10}
PGBOUNCER=${PGBOUNCER:-/usr/sbin/pgbouncer}

POOL_SIZE=20
RESERVE_POOL_SIZE=5
RESERVE_POOL_TIMEOUT=5
MAX_CLIENT_CONN=2000
MAX_PREPARED_STATEMENTS=200

write_weir_config() {
    cat >"$BENCH_DIR/weir.toml" <<TOML
# benches/pgbench.sh: Weir in front of the benchmark cluster
[weir]
listen_addr = "127.0.0.1"
listen_port = $WEIR_PORT
pool_mode = "transaction"
max_client_conn = $MAX_CLIENT_CONN
default_pool_size = $POOL_SIZE
reserve_pool_size = $RESERVE_POOL_SIZE
reserve_pool_timeout = $RESERVE_POOL_TIMEOUT
max_prepared_statements = $MAX_PREPARED_STATEMENTS
auth_type = "md5"
auth_file = "userlist.txt"
log_connections = false
log_disconnections = false

[databases.bench]
host = "127.0.0.1"
port = $PG_PORT
dbname = "bench"
TOML
}

# $1 = 1 adds max_prepared_statements (which PgBouncer 1.18 does not know).
write_pgbouncer_config() {
    local prepared_line=""
    [ "$1" = 1 ] && prepared_line="max_prepared_statements = $MAX_PREPARED_STATEMENTS"
    cat >"$BENCH_DIR/pgbouncer.ini" <<INI
; benches/pgbench.sh: PgBouncer in front of the benchmark cluster
[databases]
bench = host=127.0.0.1 port=$PG_PORT dbname=bench

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
pool_mode = transaction
max_client_conn = $MAX_CLIENT_CONN
default_pool_size = $POOL_SIZE
reserve_pool_size = $RESERVE_POOL_SIZE
reserve_pool_timeout = $RESERVE_POOL_TIMEOUT
$prepared_line
auth_type = md5
auth_file = $BENCH_DIR/userlist.txt
pidfile = $BENCH_DIR/pgbouncer/pgbouncer.pid
log_connections = 0
log_disconnections = 0
INI
    chmod 644 "$BENCH_DIR/pgbouncer.ini"
}

launch_pgbouncer() {
    local logfile="$BENCH_DIR/pgbouncer/pgbouncer.log"
    (exec_as_pg "$PGBOUNCER" "$BENCH_DIR/pgbouncer.ini") >"$logfile" 2>&1 &
    PGB_PID=$!
    wait_for_port "$PGB_PORT" "$PGB_PID" PgBouncer
}

# The first PgBouncer log line matching the extended regex $1, without its timestamp and pid.
pgbouncer_said() {
    grep -i -m 1 -E "$1" "$BENCH_DIR/pgbouncer/pgbouncer.log" | sed -E 's/^.*\[[0-9]+\] //' || true
}

# Starts PgBouncer with max_prepared_statements; if this version rejects it, notes that and
# starts it without.
start_pgbouncer() {
    [ -x "$PGBOUNCER" ] || die "PgBouncer not found at $PGBOUNCER (set PGBOUNCER)"
    mkdir -p "$BENCH_DIR/pgbouncer"
    [ "$(id -u)" -ne 0 ] || chown postgres: "$BENCH_DIR/pgbouncer"
    local version pgb_log="$BENCH_DIR/pgbouncer/pgbouncer.log" said
    version=$("$PGBOUNCER" --version 2>/dev/null | head -n 1)
    write_pgbouncer_config 1
    log "$version on 127.0.0.1:$PGB_PORT (log: $pgb_log)"
    if launch_pgbouncer; then
        said=$(pgbouncer_said 'max_prepared_statements')
        [ -z "$said" ] || NOTES+=("$version on max_prepared_statements: $said")
    else
        said=$(pgbouncer_said 'max_prepared_statements|error|fatal')
        NOTES+=("$version refused max_prepared_statements (\"${said:-exited}\"); ran it without, so -M prepared through it is expected to fail")
        kill "$PGB_PID" 2>/dev/null || true
        wait "$PGB_PID" 2>/dev/null || true
        write_pgbouncer_config 0
        launch_pgbouncer || {
            tail -n 30 "$pgb_log" >&2
            die "PgBouncer did not start"
        }
    fi
    BENCH_PIDS+=("$PGB_PID")
}

target_port() {
    case $1 in
    direct) echo "$PG_PORT" ;;
    weir) echo "$WEIR_PORT" ;;
    pgbouncer) echo "$PGB_PORT" ;;
    esac
}

target_pid() {
    case $1 in
    direct) echo "" ;;
    weir) echo "$WEIR_PID" ;;
    pgbouncer) echo "$PGB_PID" ;;
    esac
}

# run_one MODE TARGET: one pgbench run; appends a row to $BENCH_DIR/results.
run_one() {
    local mode=$1 target=$2 port pid out="$BENCH_DIR/pgbench.$1.$2.out"
    local before=0 after=0 status=0 cpu="-" us="-" max_srv
    port=$(target_port "$target")
    pid=$(target_pid "$target")
    log "pgbench -S -M $mode -c $CLIENTS -j $JOBS -T $DURATION -> $target (port $port)"
    # Server connections of this target only: the poolers keep their idle servers between runs.
    if [ -n "$pid" ]; then
        start_conn_sampler "$PG_PORT" "$BENCH_DIR/conns.$mode.$target" of "$pid"
    else
        local poolers=()
        [ -z "$WEIR_PID" ] || poolers+=("$WEIR_PID")
        [ -z "$PGB_PID" ] || poolers+=("$PGB_PID")
        start_conn_sampler "$PG_PORT" "$BENCH_DIR/conns.$mode.$target" except "${poolers[@]}"
    fi
    [ -z "$pid" ] || before=$(cpu_ticks "$pid")
    run_waited env PGPASSWORD="$BENCH_PASSWORD" "$(pgbench_bin)" -n -S -M "$mode" -c "$CLIENTS" \
        -j "$JOBS" -T "$DURATION" -h 127.0.0.1 -p "$port" -U "$BENCH_USER" bench >"$out" 2>&1 ||
        status=$?
    [ -z "$pid" ] || after=$(cpu_ticks "$pid")
    stop_conn_sampler "$SAMPLER_PID"
    max_srv=$(max_of_file "$BENCH_DIR/conns.$mode.$target")
    parse_pgbench "$out"
    if [ -n "$pid" ]; then
        cpu=$(fdiv "$((after - before))" "$CLK_TCK" 2)
        us=$(fdiv "$(((after - before) * 1000000))" "$((CLK_TCK * PB_TXNS))" 1)
    fi
    judge_run "$mode/$target" "$out" "$status"
    printf '%s %s %s %s %s %s %s %s %s %s %s\n' "$mode" "$target" "$PB_TPS" "$PB_TXNS" \
        "$PB_FAILED" "$PB_ABORTED" "$PB_LAT" "$cpu" "$us" "$max_srv" "$RUN_STATE" \
        >>"$BENCH_DIR/results"
    sleep 1 # let the pooler's servers go idle and the CPU settle between runs
}

# field MODE TARGET COLUMN: one value from the results file ("-" when missing).
field() {
    awk -v m="$1" -v t="$2" -v c="$3" '$1 == m && $2 == t { v = $c } END { print (v == "" ? "-" : v) }' \
        "$BENCH_DIR/results"
}

print_report() {
    local mode target
    echo
    echo "pgbench -S, $CLIENTS clients, -j $JOBS, ${DURATION}s per run, scale $SCALE; pool $POOL_SIZE + reserve $RESERVE_POOL_SIZE; $(nproc) CPUs"
    echo "Weir: $("$WEIR_BIN" --version 2>/dev/null) (WEIR_WORKERS=${WEIR_WORKERS:-unset})"
    echo
    printf '%-9s %-10s %10s %9s %7s %7s %9s %8s %9s %8s %s\n' mode target tps txns failed \
        aborted lat_ms cpu_s us/txn max_srv status
    while read -r mode target tps txns failed aborted lat cpu us srv state; do
        printf '%-9s %-10s %10s %9s %7s %7s %9s %8s %9s %8s %s\n' "$mode" "$target" "$tps" \
            "$txns" "$failed" "$aborted" "$lat" "$cpu" "$us" "$srv" "$state"
    done <"$BENCH_DIR/results"
    echo
    echo "us/txn: pooler CPU (utime+stime) over the run, $CLIENTS md5 logins included, per transaction"
    echo "ratios (tps: higher is better; CPU: pooler µs per transaction, lower is better)"
    printf '%-9s %12s %12s %14s %14s\n' mode weir/direct pgb/direct weir/pgb_tps weir/pgb_cpu
    for mode in $MODES; do
        local wt pt dt wu pu
        wt=$(field "$mode" weir 3)
        pt=$(field "$mode" pgbouncer 3)
        dt=$(field "$mode" direct 3)
        wu=$(field "$mode" weir 9)
        pu=$(field "$mode" pgbouncer 9)
        # A failed run's numbers are not comparable.
        [ "$(field "$mode" pgbouncer 11)" = ok ] || {
            pt="-"
            pu="-"
        }
        [ "$(field "$mode" weir 11)" = ok ] || {
            wt="-"
            wu="-"
        }
        [ "$(field "$mode" direct 11)" = ok ] || dt="-"
        printf '%-9s %12s %12s %14s %14s\n' "$mode" "$(fdiv "$wt" "$dt")" "$(fdiv "$pt" "$dt")" \
            "$(fdiv "$wt" "$pt")" "$(fdiv "$wu" "$pu")"
    done
    if [ "${#NOTES[@]}" -gt 0 ]; then
        echo
        echo "notes:"
        printf '  %s\n' "${NOTES[@]}"
    fi
}

main() {
    local mode target
    for mode in $MODES; do
        case $mode in simple | extended | prepared) ;; *) die "unknown mode $mode" ;; esac
    done
    for target in $TARGETS; do
        case $target in direct | weir | pgbouncer) ;; *) die "unknown target $target" ;; esac
    done
    bench_init "$CLIENTS"
    build_weir

    free_port
    PG_PORT=$FREE_PORT
    free_port
    WEIR_PORT=$FREE_PORT
    free_port
    PGB_PORT=$FREE_PORT

    # Direct runs open one backend per client; the rest is headroom for the sampler.
    local max_conn=$((CLIENTS + 50))
    [ "$max_conn" -ge 300 ] || max_conn=300
    start_cluster pg "$PG_PORT" "$max_conn"
    create_bench_db "$PG_PORT"
    log "pgbench -i -s $SCALE"
    "$(pgbench_bin)" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U "$BENCH_USER" bench \
        >"$BENCH_DIR/pgbench-init.log" 2>&1 || {
        cat "$BENCH_DIR/pgbench-init.log" >&2
        die "pgbench -i failed"
    }
    psql_at "$PG_PORT" bench -c 'VACUUM ANALYZE'

    write_userlist "$BENCH_DIR/userlist.txt"
    WEIR_PID=""
    PGB_PID=""
    if [[ " $TARGETS " == *" weir "* ]]; then
        write_weir_config
        start_weir "$BENCH_DIR/weir.toml" "$WEIR_PORT"
    fi
    [[ " $TARGETS " != *" pgbouncer "* ]] || start_pgbouncer

    : >"$BENCH_DIR/results"
    for mode in $MODES; do
        for target in $TARGETS; do
            run_one "$mode" "$target"
        done
    done
    [ -z "$WEIR_PID" ] || kill -0 "$WEIR_PID" 2>/dev/null || NOTES+=("Weir exited during the run; see its log (KEEP_TMP=1)")
    [ -z "$PGB_PID" ] || kill -0 "$PGB_PID" 2>/dev/null || NOTES+=("PgBouncer exited during the run")
    print_report
}

main "$@"
