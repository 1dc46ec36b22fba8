#!/usr/bin/env bash
# Side-by-side macro benchmark in one run (issue #9): pgbench -S through Weir, through
# PgBouncer, and straight to PostgreSQL, on one throwaway PostgreSQL cluster, with equivalent
# pooler settings; then the memory each pooler needs per idle logged-in client.
#
#   bash benches/pgbench.sh                       # 100 and 1000 clients, 30 s per run
#   CLIENT_COUNTS=100 DURATION=5 IDLE_CLIENTS=0 bash benches/pgbench.sh
#   MODES="simple prepared" TARGETS="weir pgbouncer" ROUNDS=3 bash benches/pgbench.sh
#
# Environment (run as root: PostgreSQL and PgBouncer then run as the `postgres` OS user):
#   CLIENT_COUNTS  pgbench client counts (-c), one case each; default "100 1000"
#                  (CLIENTS=N, the older name, is used when CLIENT_COUNTS is unset)
#   MODES          pgbench query modes (-M); default "simple extended prepared"
#   TARGETS        default "direct weir pgbouncer"
#   DURATION       seconds per pgbench run (-T); default 30
#   ROUNDS         repetitions of the whole matrix, default 1; round 2, 4, ... runs the
#                  targets in reverse order, so drift over time does not favour one target
#   JOBS           pgbench threads (-j); default 2
#   SCALE          pgbench -i scale; default 10
#   LOG_SAMPLING   pgbench --sampling-rate of the per-transaction logs the p99 latency comes
#                  from; default 0.1 (a note says when a run has under 2000 samples)
#   IDLE_CLIENTS   idle logged-in clients opened against each pooler after the matrix, to
#                  measure its RSS per idle client; default 10000, 0 skips the phase
#   IDLE_CONCURRENCY  logins in flight while opening them; default 200
#   PGBOUNCER_BIN  PgBouncer binary (PGBOUNCER is an alias); default /opt/pgbouncer/bin/pgbouncer
#                  if it is executable, else /usr/sbin/pgbouncer
#   WEIR_BIN       use this Weir binary instead of running cargo build --release
#   WEIR_WORKERS   passed to Weir as is      WEIR_LOG  Weir's --log-level, default warn
#   PG_BIN         PostgreSQL server binaries; default /usr/lib/postgresql/15/bin
#   PYTHON         Python 3.11+ for benches/idle_clients.py; default python3
#   KEEP_TMP=1     keeps the temp dir (configs, logs, pgbench output and latency logs)
#
# Both poolers: transaction mode, default_pool_size 20, reserve_pool_size 5 (after 5 s),
# max_prepared_statements 200, max_client_conn IDLE_CLIENTS + 2000, listen backlog 1024 (Weir's
# fixed value), md5 client auth from one userlist.txt (user bench), logging of connections off.
# PostgreSQL trusts loopback, so server login costs the same for both. A PgBouncer older than
# 1.21 has no max_prepared_statements: it is then started without, and `-M prepared` through it
# is run anyway and its failures reported, because that is what a driver would see.
#
# The shell's open-files limit is raised (to 2 * (max clients + IDLE_CLIENTS) + 1024, or the
# hard limit) before anything starts; Weir inherits it, PgBouncer too (it is started through
# setpriv, not a PAM session), and the script fails if /proc/PID/limits of either shows less.
#
# Per run it records tps, average and p99 latency (p99 from pgbench -l logs sampled at
# LOG_SAMPLING), failed transactions and aborted clients, the pooler's CPU time (utime + stime
# from /proc/PID/stat, logins included) per transaction, and the most server connections seen
# in pg_stat_activity (sampled every 0.5 s). It prints every run's row, then one ratio row per
# case (clients x mode) computed from the medians over the rounds whose runs succeeded, then
# the idle-client memory table: VmRSS of each pooler before and after IDLE_CLIENTS clients
# (benches/idle_clients.py, md5 login, spread over source addresses 127.0.0.2, ...) are all
# idle, and (after - before) / IDLE_CLIENTS. Everything it starts is stopped and its temp dir
# removed on exit.
set -euo pipefail

# shellcheck source=benches/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CLIENT_COUNTS=${CLIENT_COUNTS:-${CLIENTS:-100 1000}}
DURATION=${DURATION:-30}
MODES=${MODES:-simple extended prepared}
TARGETS=${TARGETS:-direct weir pgbouncer}
ROUNDS=${ROUNDS:-1}
JOBS=${JOBS:-2}
SCALE=${SCALE:-10}
LOG_SAMPLING=${LOG_SAMPLING:-0.1}
IDLE_CLIENTS=${IDLE_CLIENTS:-10000}
IDLE_CONCURRENCY=${IDLE_CONCURRENCY:-200}
PYTHON=${PYTHON:-python3}
PGBOUNCER_BIN=${PGBOUNCER_BIN:-${PGBOUNCER:-$(default_pgbouncer_bin)}}

POOL_SIZE=20
RESERVE_POOL_SIZE=5
RESERVE_POOL_TIMEOUT=5
MAX_PREPARED_STATEMENTS=200
LISTEN_BACKLOG=1024
MIN_LAT_SAMPLES=2000
FEW_SAMPLES=0         # successful runs whose p99 rests on fewer than MIN_LAT_SAMPLES samples
FEWEST_SAMPLES=999999 # the fewest samples of those

# PgBouncer with max_prepared_statements (or, if this version rejects it, without), checked
# to run with the raised open-files limit.
start_pgbouncer_target() {
    pgbouncer_init
    write_pgbouncer_ini "benches/pgbench.sh: PgBouncer in front of the benchmark cluster" \
        "$PG_PORT" "$PGB_PORT" "$RESERVE_POOL_SIZE" "listen_backlog = $LISTEN_BACKLOG" \
        "reserve_pool_timeout = $RESERVE_POOL_TIMEOUT"
    log "$PGB_VERSION ($PGBOUNCER_BIN) on 127.0.0.1:$PGB_PORT (log: $PGB_LOG)"
    start_pgbouncer "$PGB_PORT"
    check_fd_limit "$PGB_PID" "$FD_CLIENTS" PgBouncer
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

# Results file columns (one row per run):
#  1 round  2 clients  3 mode  4 target  5 tps  6 txns  7 failed  8 aborted  9 lat_ms
#  10 p99_ms  11 samples  12 cpu_s  13 us/txn  14 max_srv  15 status
RESULT_HEADER_FMT='%-5s %7s %-9s %-10s %10s %9s %7s %7s %8s %8s %7s %7s %8s %7s %s\n'

# run_one ROUND CLIENTS MODE TARGET: one pgbench run; appends a row to $BENCH_DIR/results.
run_one() {
    local round=$1 mode=$3 target=$4 port pid
    local label="r$1.c$2.$3.$4"
    local out="$BENCH_DIR/pgbench.$label.out" lat_prefix="$BENCH_DIR/lat.$label"
    local before=0 after=0 status=0 cpu="-" us="-" max_srv p99 samples
    CLIENTS=$2 # judge_run reads it
    port=$(target_port "$target")
    pid=$(target_pid "$target")
    log "round $round: pgbench -S -M $mode -c $CLIENTS -j $JOBS -T $DURATION -> $target (port $port)"
    # Server connections of this target only: the poolers keep their idle servers between runs.
    if [ -n "$pid" ]; then
        start_conn_sampler "$PG_PORT" "$BENCH_DIR/conns.$label" of "$pid"
    else
        local poolers=()
        [ -z "$WEIR_PID" ] || poolers+=("$WEIR_PID")
        [ -z "$PGB_PID" ] || poolers+=("$PGB_PID")
        start_conn_sampler "$PG_PORT" "$BENCH_DIR/conns.$label" except "${poolers[@]}"
    fi
    [ -z "$pid" ] || before=$(cpu_ticks "$pid")
    run_waited env PGPASSWORD="$BENCH_PASSWORD" "$(pgbench_bin)" -n -S -M "$mode" -c "$CLIENTS" \
        -j "$JOBS" -T "$DURATION" -l --sampling-rate="$LOG_SAMPLING" --log-prefix="$lat_prefix" \
        -h 127.0.0.1 -p "$port" -U "$BENCH_USER" bench >"$out" 2>&1 ||
        status=$?
    [ -z "$pid" ] || after=$(cpu_ticks "$pid")
    stop_conn_sampler "$SAMPLER_PID"
    max_srv=$(max_of_file "$BENCH_DIR/conns.$label")
    parse_pgbench "$out"
    read -r p99 samples < <(latency_percentile 99 "$lat_prefix".*)
    [ "${KEEP_TMP:-0}" = 1 ] || rm -f "$lat_prefix".*
    if [ -n "$pid" ]; then
        cpu=$(fdiv "$((after - before))" "$CLK_TCK" 2)
        us=$(fdiv "$(((after - before) * 1000000))" "$((CLK_TCK * PB_TXNS))" 1)
    fi
    judge_run "$label" "$out" "$status"
    if [ "$RUN_STATE" = ok ] && [ "$samples" -lt "$MIN_LAT_SAMPLES" ]; then
        FEW_SAMPLES=$((FEW_SAMPLES + 1))
        [ "$samples" -ge "$FEWEST_SAMPLES" ] || FEWEST_SAMPLES=$samples
    fi
    printf '%s %s %s %s %s %s %s %s %s %s %s %s %s %s %s\n' "$round" "$CLIENTS" "$mode" \
        "$target" "$PB_TPS" "$PB_TXNS" "$PB_FAILED" "$PB_ABORTED" "$PB_LAT" "$p99" "$samples" \
        "$cpu" "$us" "$max_srv" "$RUN_STATE" >>"$BENCH_DIR/results"
    # shellcheck disable=SC2059  # the format is a constant
    printf "$RESULT_HEADER_FMT" "$round" "$CLIENTS" "$mode" "$target" "$PB_TPS" "$PB_TXNS" \
        "$PB_FAILED" "$PB_ABORTED" "$PB_LAT" "$p99" "$samples" "$cpu" "$us" "$max_srv" \
        "$RUN_STATE" >&2
    sleep 1 # let the pooler's servers go idle and the CPU settle between runs
}

# median CLIENTS MODE TARGET COLUMN: the median of a results column over the successful rounds
# of one case ("-" when none succeeded).
median() {
    awk -v c="$1" -v m="$2" -v t="$3" -v col="$4" \
        '$2 == c && $3 == m && $4 == t && $15 == "ok" && $col != "-" { print $col }' \
        "$BENCH_DIR/results" | sort -g |
        awk '{ v[NR] = $1 } END {
            if (NR == 0) { print "-"; exit }
            if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# ok_rounds CLIENTS MODE TARGET: how many rounds of the case succeeded.
ok_rounds() {
    awk -v c="$1" -v m="$2" -v t="$3" '$2 == c && $3 == m && $4 == t && $15 == "ok" { n++ }
        END { print n + 0 }' "$BENCH_DIR/results"
}

# The idle-client phase for one pooler: RSS before, IDLE_CLIENTS idle clients, RSS after.
# Appends "target N held before_kb after_kb closed_kb status" to $BENCH_DIR/idle, where held
# is the number of established connections the pooler's port had when "after" was read.
idle_one() {
    local target=$1 port pid tool_pid before after closed status=0 i held="-"
    local out="$BENCH_DIR/idle.$target.out" err="$BENCH_DIR/idle.$target.err"
    port=$(target_port "$target")
    pid=$(target_pid "$target")
    kill -0 "$pid" 2>/dev/null || {
        NOTES+=("idle $target: the pooler is not running; skipped")
        printf '%s %s - - - - FAIL(exited)\n' "$target" "$IDLE_CLIENTS" >>"$BENCH_DIR/idle"
        return 0
    }
    sleep 2 # the last pgbench run's clients are gone and their memory freed
    before=$(rss_kb "$pid")
    log "idle: $IDLE_CLIENTS logged-in idle clients -> $target (port $port, RSS ${before} kB)"
    : >"$out"
    PGPASSWORD="$BENCH_PASSWORD" "$PYTHON" "$REPO/benches/idle_clients.py" -n "$IDLE_CLIENTS" \
        -p "$port" -U "$BENCH_USER" -d bench --concurrency "$IDLE_CONCURRENCY" --no-stdin \
        </dev/null >"$out" 2>"$err" &
    tool_pid=$!
    BENCH_PIDS+=("$tool_pid")
    # Logins run at a few thousand per second; allow 10 minutes on a busy machine.
    for ((i = 0; i < 6000; i++)); do
        grep -q '^ready ' "$out" && break
        kill -0 "$tool_pid" 2>/dev/null || break
        sleep 0.1
    done
    if grep -q '^ready ' "$out"; then
        sleep 1 # let the pooler finish any work it queued after the last login
        after=$(rss_kb "$pid")
        held=$(ss -Htn state established "( sport = :$port )" 2>/dev/null | wc -l)
        kill -TERM "$tool_pid" 2>/dev/null || true
    else
        after="-"
        kill -TERM "$tool_pid" 2>/dev/null || true
    fi
    wait "$tool_pid" || status=$?
    forget_pid "$tool_pid"
    if [ "$after" = "-" ] || [ "$status" -ne 0 ]; then
        NOTES+=("idle $target: benches/idle_clients.py failed (exit $status):")
        local line
        while IFS= read -r line; do NOTES+=("    $line"); done < <(tail -n 6 "$err")
        [ "$status" -ne 0 ] || status=1
    fi
    sleep 2
    closed=$(rss_kb "$pid")
    local state=ok
    [ "$status" = 0 ] || state="FAIL($status)"
    kill -0 "$pid" 2>/dev/null || state="FAIL(exited)"
    log "idle $target: RSS ${before} -> ${after} kB, ${closed} kB after closing ($state)"
    printf '%s %s %s %s %s %s %s\n' "$target" "$IDLE_CLIENTS" "$held" "$before" "$after" "$closed" \
        "$state" >>"$BENCH_DIR/idle"
}

# MB with one decimal from kB ("-" stays "-").
mb() { fdiv "$1" 1024 1; }

print_report() {
    local clients mode target line
    echo
    echo "pgbench -S, clients: $CLIENT_COUNTS, -j $JOBS, ${DURATION}s per run, $ROUNDS round(s), scale $SCALE; pool $POOL_SIZE + reserve $RESERVE_POOL_SIZE; $(nproc) CPUs"
    echo "PostgreSQL: $("$PG_BIN/postgres" --version 2>/dev/null)"
    [ -z "$WEIR_PID" ] || echo "Weir: $("$WEIR_BIN" --version 2>/dev/null) ($WEIR_BIN, WEIR_WORKERS=${WEIR_WORKERS:-unset})"
    [ -z "$PGB_PID" ] || echo "PgBouncer: $PGB_VERSION ($PGBOUNCER_BIN)"
    echo
    # shellcheck disable=SC2059  # the format is a constant
    printf "$RESULT_HEADER_FMT" round clients mode target tps txns failed aborted lat_ms p99_ms \
        samples cpu_s us/txn max_srv status
    # shellcheck disable=SC2059,SC2086  # word splitting of the row is wanted
    while read -r line; do printf "$RESULT_HEADER_FMT" $line; done <"$BENCH_DIR/results"
    echo
    echo "lat_ms: pgbench's average; p99_ms: 99th percentile of the sampled per-transaction latencies"
    echo "(pgbench -l --sampling-rate=$LOG_SAMPLING; 'samples' of them); us/txn: pooler CPU (utime+stime)"
    echo "over the run, the run's md5 logins included, per transaction; max_srv: most server connections"
    echo
    echo "ratios per case, from the median over the successful rounds of each target (ok = rounds used)"
    echo "(tps: higher is better; CPU us/txn and p99: lower is better)"
    local fmt='%7s %-9s %9s %12s %12s %12s %12s %12s\n'
    # shellcheck disable=SC2059  # the format is a constant
    printf "$fmt" clients mode ok:w/p/d weir/pgb_tps weir/pgb_cpu weir/pgb_p99 weir/direct pgb/direct
    for clients in $CLIENT_COUNTS; do
        for mode in $MODES; do
            local wt pt dt wu pu wp pp
            wt=$(median "$clients" "$mode" weir 5)
            pt=$(median "$clients" "$mode" pgbouncer 5)
            dt=$(median "$clients" "$mode" direct 5)
            wu=$(median "$clients" "$mode" weir 13)
            pu=$(median "$clients" "$mode" pgbouncer 13)
            wp=$(median "$clients" "$mode" weir 10)
            pp=$(median "$clients" "$mode" pgbouncer 10)
            # shellcheck disable=SC2059
            printf "$fmt" "$clients" "$mode" \
                "$(ok_rounds "$clients" "$mode" weir)/$(ok_rounds "$clients" "$mode" pgbouncer)/$(ok_rounds "$clients" "$mode" direct)" \
                "$(fdiv "$wt" "$pt")" "$(fdiv "$wu" "$pu")" "$(fdiv "$wp" "$pp")" \
                "$(fdiv "$wt" "$dt")" "$(fdiv "$pt" "$dt")"
        done
    done
    if [ -s "$BENCH_DIR/idle" ]; then
        echo
        echo "idle clients: VmRSS of each pooler before and after $IDLE_CLIENTS logged-in (md5) idle clients"
        local ifmt='%-10s %7s %7s %14s %13s %10s %15s %s\n' n held before after closed state per
        # shellcheck disable=SC2059
        printf "$ifmt" target N held rss_before_MB rss_after_MB KB/client rss_closed_MB status
        local -A per_client=()
        while read -r target n held before after closed state; do
            per="-"
            if [ "$state" = ok ]; then
                per=$(fdiv "$((after - before))" "$n" 2)
                per_client[$target]=$per
            fi
            # shellcheck disable=SC2059
            printf "$ifmt" "$target" "$n" "$held" "$(mb "$before")" "$(mb "$after")" "$per" \
                "$(mb "$closed")" "$state"
        done <"$BENCH_DIR/idle"
        echo "weir/pgb KB per idle client: $(fdiv "${per_client[weir]:--}" "${per_client[pgbouncer]:--}" 2)"
        echo "(held: established connections on the pooler's port when rss_after was read;"
        echo " rss_closed_MB: 2 s after the clients closed; KB/client = (after - before) / N)"
    fi
    print_notes
}

# The targets in run order for round $1: as given on odd rounds, reversed on even ones.
targets_for_round() {
    local list=() t i
    for t in $TARGETS; do list+=("$t"); done
    if (($1 % 2 == 0)); then
        for ((i = ${#list[@]} - 1; i >= 0; i--)); do printf '%s ' "${list[i]}"; done
    else
        printf '%s ' "${list[@]}"
    fi
}

main() {
    local clients mode target round max_clients=0
    check_words mode "$MODES" simple extended prepared
    check_words target "$TARGETS" direct weir pgbouncer
    for clients in $CLIENT_COUNTS; do
        [[ $clients =~ ^[1-9][0-9]*$ ]] || die "CLIENT_COUNTS: not a client count: $clients"
        [ "$clients" -le "$max_clients" ] || max_clients=$clients
    done
    [ "$max_clients" -gt 0 ] || die "CLIENT_COUNTS is empty"
    [[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
    [[ $IDLE_CLIENTS =~ ^[0-9]+$ ]] || die "IDLE_CLIENTS must be a number"
    [[ $DURATION =~ ^[1-9][0-9]*$ ]] || die "DURATION must be a positive number of seconds"
    if [ "$IDLE_CLIENTS" -gt 0 ] && [[ " $TARGETS " == *" weir "* || " $TARGETS " == *" pgbouncer "* ]]; then
        "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
            die "IDLE_CLIENTS needs Python 3.11+ ($PYTHON); set PYTHON or IDLE_CLIENTS=0"
    fi

    MAX_CLIENT_CONN=$((IDLE_CLIENTS + 2000))
    [ "$MAX_CLIENT_CONN" -ge $((IDLE_CLIENTS + max_clients + 100)) ] ||
        MAX_CLIENT_CONN=$((IDLE_CLIENTS + max_clients + 100))
    # Open files each process may need: pgbench, Weir and PgBouncer see the largest client
    # count, the poolers later also the idle clients (plus their servers, within the slack).
    FD_CLIENTS=$((max_clients + IDLE_CLIENTS))
    bench_init "$FD_CLIENTS"
    log "open-files soft limit $(ulimit -Sn) (hard $(ulimit -Hn))"
    build_weir

    take_ports PG_PORT WEIR_PORT PGB_PORT

    # Direct runs open one backend per client; the rest is headroom for the sampler.
    local max_conn=$((max_clients + 50))
    [ "$max_conn" -ge 300 ] || max_conn=300
    start_cluster pg "$PG_PORT" "$max_conn"
    init_pgbench_db "$PG_PORT" "$SCALE"

    write_userlist "$BENCH_DIR/userlist.txt"
    WEIR_PID=""
    PGB_PID=""
    PGB_VERSION=""
    if [[ " $TARGETS " == *" weir "* ]]; then
        weir_bench_db "$PG_PORT" |
            write_weir_toml "benches/pgbench.sh: Weir in front of the benchmark cluster" \
                "$WEIR_PORT" "$RESERVE_POOL_SIZE" "reserve_pool_timeout = $RESERVE_POOL_TIMEOUT" \
                "max_prepared_statements = $MAX_PREPARED_STATEMENTS"
        start_weir "$BENCH_DIR/weir.toml" "$WEIR_PORT"
        check_fd_limit "$WEIR_PID" "$FD_CLIENTS" Weir
    fi
    [[ " $TARGETS " != *" pgbouncer "* ]] || start_pgbouncer_target

    : >"$BENCH_DIR/results"
    : >"$BENCH_DIR/idle"
    # shellcheck disable=SC2059
    printf "$RESULT_HEADER_FMT" round clients mode target tps txns failed aborted lat_ms p99_ms \
        samples cpu_s us/txn max_srv status >&2
    for ((round = 1; round <= ROUNDS; round++)); do
        for clients in $CLIENT_COUNTS; do
            for mode in $MODES; do
                for target in $(targets_for_round "$round"); do
                    run_one "$round" "$clients" "$mode" "$target"
                done
            done
        done
    done
    if [ "$IDLE_CLIENTS" -gt 0 ]; then
        for target in $TARGETS; do
            [ "$target" = direct ] || idle_one "$target"
        done
    fi
    [ "$FEW_SAMPLES" = 0 ] ||
        NOTES+=("$FEW_SAMPLES run(s) have a p99 from fewer than $MIN_LAT_SAMPLES latency samples (fewest: $FEWEST_SAMPLES); raise LOG_SAMPLING or DURATION")
    [ -z "$WEIR_PID" ] || kill -0 "$WEIR_PID" 2>/dev/null || NOTES+=("Weir exited during the run; see its log (KEEP_TMP=1)")
    [ -z "$PGB_PID" ] || kill -0 "$PGB_PID" 2>/dev/null || NOTES+=("PgBouncer exited during the run")
    print_report
}

main "$@"
