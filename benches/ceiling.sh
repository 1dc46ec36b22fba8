#!/usr/bin/env bash
# Throughput-ceiling benchmark: makes the pooler the bottleneck on a 2-core machine and
# measures how many transactions it moves per core-second. The pooler gets CPU 0 to itself
# (taskset -c 0); PostgreSQL and pgbench share CPU 1. Cases, in one run, on one cluster:
#
#   weir1      Weir with WEIR_WORKERS=1, pinned to CPU 0; PostgreSQL and pgbench on CPU 1
#   pgbouncer  PgBouncer (single-threaded by design), pinned to CPU 0; the rest on CPU 1
#   weir2      Weir with WEIR_WORKERS=2 and nothing pinned: Weir, PostgreSQL and pgbench all
#              float over both cores, as in an ordinary deployment on one box. Weir cannot get
#              2 whole cores here (PostgreSQL and pgbench need CPU too), so this case shows
#              what the box does with a multi-threaded pooler, not a pooler-bound ceiling;
#              its util column says how much of a core Weir used.
#
#   bash benches/ceiling.sh
#   DURATION=5 bash benches/ceiling.sh
#   MODES="simple extended prepared" CASES="weir1 pgbouncer" bash benches/ceiling.sh
#
# Environment:
#   CASES     weir1 pgbouncer weir2 (default: all, in that order)
#   MODES     simple extended prepared (-M), default simple
#   CLIENTS   pgbench clients (-c), default 200      DURATION  seconds per run (-T), default 20
#   JOBS      pgbench threads (-j), default 2        SCALE     pgbench -i scale, default 10
#   POOL_SIZE server connections per pool, default 20 (reserve pools off)
#   POOLER_CPU  the core the pooler is pinned to, default 0
#   OTHER_CPU   the core PostgreSQL and pgbench are pinned to, default 1
#   PGBOUNCER_BIN  default /opt/pgbouncer/bin/pgbouncer if executable, else /usr/sbin/pgbouncer
#   WEIR_BIN  use this binary instead of building
#   KEEP_TMP=1 keeps the temp dir (configs, logs, pgbench output)
#
# Both poolers: transaction mode, pool POOL_SIZE, reserve_pool_size 0 (exactly POOL_SIZE
# servers), max_prepared_statements 200 (dropped, with a note, for a PgBouncer that rejects
# it), max_client_conn 2000, md5 client auth from one userlist.txt, connection logging off;
# PostgreSQL trusts loopback. Workload: pgbench -S (one primary-key SELECT per transaction).
# Each case starts its pooler fresh and stops it afterwards, so only one pooler holds servers.
# PostgreSQL is started with CPU 1 as its affinity (every backend inherits it); for weir2 the
# affinity of the postmaster and its children is widened to all cores, and narrowed again for
# a pinned case after it.
#
# Per run: tps; the pooler's CPU seconds (utime + stime of all its threads, /proc/PID/stat,
# CLIENTS md5 logins included); txn/core_s = transactions / pooler CPU seconds (the pooler's
# efficiency, independent of who was the bottleneck); util = pooler CPU seconds / wall seconds
# of the pgbench run (about 1.0 for a pinned pooler = it was the bottleneck; below that,
# CPU 1 (PostgreSQL + pgbench) probably was: see busy%, each core's busy share from /proc/stat,
# which includes any other load on the machine). Then the ratios Weir-1-worker / PgBouncer.
set -euo pipefail

# shellcheck source=benches/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CASES=${CASES:-weir1 pgbouncer weir2}
MODES=${MODES:-simple}
CLIENTS=${CLIENTS:-200}
DURATION=${DURATION:-20}
JOBS=${JOBS:-2}
SCALE=${SCALE:-10}
POOL_SIZE=${POOL_SIZE:-20}
POOLER_CPU=${POOLER_CPU:-0} OTHER_CPU=${OTHER_CPU:-1} # the two cores of the pinned cases

MAX_CLIENT_CONN=2000
MAX_PREPARED_STATEMENTS=200

# --- CPU affinity ----------------------------------------------------------------------------

# The CPUs this script may use, as a taskset list ("0,1" or "0-3").
ALL_CPUS=$(taskset -pc $$ | sed 's/.*: //')

# set_affinity LIST PID...: taskset -pc LIST on each PID (quietly; one may have just exited).
set_affinity() {
    local list=$1 pid
    shift
    for pid in "$@"; do
        taskset -pc "$list" "$pid" >/dev/null 2>&1 || true
    done
}

affinity_of() { sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' "/proc/$1/status" 2>/dev/null || echo "?"; }

postmaster_pid() { head -n 1 "$BENCH_DIR/pg/postmaster.pid"; }

# pg_affinity LIST: the postmaster and all its children (backends fork from the postmaster,
# so new ones inherit its affinity).
pg_affinity() {
    local pm
    pm=$(postmaster_pid)
    # shellcheck disable=SC2046 # one pid per word
    set_affinity "$1" "$pm" $(ps -o pid= --ppid "$pm")
}

# Busy and total jiffies of CPU $1 from /proc/stat: "busy total".
cpu_jiffies() {
    awk -v c="cpu$1" '$1 == c { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat
}

# --- poolers ---------------------------------------------------------------------------------

# start_weir_case WORKERS PIN(empty = unpinned): sets POOLER_PID and POOLER_PORT.
start_weir_case() {
    local workers=$1 pin=$2 config="$BENCH_DIR/weir.toml" logfile="$BENCH_DIR/weir.w$1.log"
    "$WEIR_BIN" --check "$config" >"$BENCH_DIR/weir.check.log" 2>&1 || {
        cat "$BENCH_DIR/weir.check.log" >&2
        die "weir --check $config failed"
    }
    log "Weir WEIR_WORKERS=$workers on 127.0.0.1:$WEIR_PORT, CPUs ${pin:-$ALL_CPUS} (log: $logfile)"
    if [ -n "$pin" ]; then
        WEIR_WORKERS=$workers taskset -c "$pin" "$WEIR_BIN" --log-level "${WEIR_LOG:-warn}" \
            "$config" >"$logfile" 2>&1 &
    else
        WEIR_WORKERS=$workers "$WEIR_BIN" --log-level "${WEIR_LOG:-warn}" "$config" \
            >"$logfile" 2>&1 &
    fi
    POOLER_PID=$!
    BENCH_PIDS+=("$POOLER_PID")
    POOLER_PORT=$WEIR_PORT
    wait_for_port "$WEIR_PORT" "$POOLER_PID" Weir || {
        tail -n 30 "$logfile" >&2
        die "Weir did not start"
    }
}

# PgBouncer pinned to POOLER_CPU, with max_prepared_statements if this version takes it.
start_pgbouncer_case() {
    pgbouncer_init
    write_pgbouncer_ini "benches/ceiling.sh: PgBouncer in front of the benchmark cluster" \
        "$PG_PORT" "$PGB_PORT" 0
    log "$PGB_VERSION on 127.0.0.1:$PGB_PORT, CPU $POOLER_CPU (log: $PGB_LOG)"
    start_pgbouncer "$PGB_PORT" taskset -c "$POOLER_CPU"
    POOLER_PID=$PGB_PID
    POOLER_PORT=$PGB_PORT
}

stop_pooler() {
    kill "$POOLER_PID" 2>/dev/null || true
    wait "$POOLER_PID" 2>/dev/null || true
    forget_pid "$POOLER_PID"
    sleep 1 # let PostgreSQL reap the pooler's backends
}

# --- runs ------------------------------------------------------------------------------------

# run_one CASE MODE PGBENCH_PIN(empty = unpinned): one pgbench run against the running pooler;
# appends to results: case mode tps txns failed aborted cpu_s wall_s util txn/core_s busy status
run_one() {
    local name=$1 mode=$2 pin=$3 out="$BENCH_DIR/pgbench.$1.$2.out" status=0
    local before after t0 t1 c0 c1 wall cpu util per_core busy cmd=() b
    local -a j0 j1
    if [ -n "$pin" ]; then cmd=(taskset -c "$pin"); fi
    cmd+=(env PGPASSWORD="$BENCH_PASSWORD" "$(pgbench_bin)" -n -S -M "$mode" -c "$CLIENTS"
        -j "$JOBS" -T "$DURATION" -h 127.0.0.1 -p "$POOLER_PORT" -U "$BENCH_USER" bench)
    log "$name: pgbench -S -M $mode -c $CLIENTS -j $JOBS -T $DURATION on CPUs ${pin:-$ALL_CPUS}"
    j0=()
    for c0 in $CORES; do j0+=("$(cpu_jiffies "$c0")"); done
    before=$(cpu_ticks "$POOLER_PID")
    t0=$(date +%s.%N)
    run_waited "${cmd[@]}" >"$out" 2>&1 || status=$?
    t1=$(date +%s.%N)
    after=$(cpu_ticks "$POOLER_PID")
    j1=()
    for c1 in $CORES; do j1+=("$(cpu_jiffies "$c1")"); done
    parse_pgbench "$out"
    wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
    cpu=$(fdiv "$((after - before))" "$CLK_TCK" 2)
    util=$(fdiv "$cpu" "$wall" 2)
    per_core=$(fdiv "$PB_TXNS" "$cpu" 0)
    busy=""
    for ((b = 0; b < ${#j0[@]}; b++)); do
        busy+="${busy:+/}$(awk -v x="${j0[$b]}" -v y="${j1[$b]}" 'BEGIN {
            split(x, p, " "); split(y, q, " ")
            if (q[2] - p[2] > 0) printf "%.0f", 100 * (q[1] - p[1]) / (q[2] - p[2]); else print "-" }')"
    done
    judge_run "$name/$mode" "$out" "$status"
    printf '%s %s %s %s %s %s %s %s %s %s %s %s\n' "$name" "$mode" "$PB_TPS" "$PB_TXNS" \
        "$PB_FAILED" "$PB_ABORTED" "$cpu" "$wall" "$util" "$per_core" "$busy" "$RUN_STATE" \
        >>"$BENCH_DIR/results"
    sleep 1
}

# run_case CASE: starts the case's pooler with its affinities, runs every mode, stops it.
run_case() {
    local name=$1 mode pgbench_pin=$OTHER_CPU threads
    case $name in
    weir1)
        pg_affinity "$OTHER_CPU"
        start_weir_case 1 "$POOLER_CPU"
        ;;
    pgbouncer)
        pg_affinity "$OTHER_CPU"
        start_pgbouncer_case
        ;;
    weir2)
        pg_affinity "$ALL_CPUS"
        start_weir_case 2 ""
        pgbench_pin=""
        ;;
    esac
    threads=$(find "/proc/$POOLER_PID/task" -mindepth 1 -maxdepth 1 | wc -l)
    AFFINITY_LINES+=("$name: pooler pid $POOLER_PID on CPUs $(affinity_of "$POOLER_PID") ($threads threads); postmaster on CPUs $(affinity_of "$(postmaster_pid)"); pgbench on CPUs ${pgbench_pin:-$ALL_CPUS}")
    for mode in $MODES; do
        run_one "$name" "$mode" "$pgbench_pin"
    done
    kill -0 "$POOLER_PID" 2>/dev/null || NOTES+=("$name: the pooler exited during the run; see its log (KEEP_TMP=1)")
    stop_pooler
}

# --- report ----------------------------------------------------------------------------------

# field CASE MODE COLUMN: one value from the results file ("-" when missing or not ok).
field() {
    awk -v k="$1" -v m="$2" -v c="$3" '$1 == k && $2 == m { v = ($12 == "ok" ? $c : "-") }
        END { print (v == "" ? "-" : v) }' "$BENCH_DIR/results"
}

print_report() {
    local name mode tps txns failed aborted cpu wall util per_core busy state
    local f='%-10s %-9s %10s %9s %7s %7s %8s %7s %6s %11s %9s %s\n'
    echo
    echo "throughput ceiling: pgbench -S, $CLIENTS clients, -j $JOBS, ${DURATION}s per run, scale $SCALE; pool $POOL_SIZE, no reserve; $(getconf _NPROCESSORS_ONLN) CPUs (this script may use $ALL_CPUS)"
    [[ " $CASES " != *" weir"* ]] || echo "Weir: $("$WEIR_BIN" --version 2>/dev/null | head -n 1) ($WEIR_BIN)"
    [ -z "$PGB_VERSION" ] || echo "PgBouncer: $PGB_VERSION ($PGBOUNCER_BIN)"
    printf '  %s\n' "${AFFINITY_LINES[@]}"
    echo
    # shellcheck disable=SC2059 # the format is the one above
    printf "$f" case mode tps txns failed aborted cpu_s wall_s util txn/core_s \
        "busy%${CORES// //}" status
    while read -r name mode tps txns failed aborted cpu wall util per_core busy state; do
        # shellcheck disable=SC2059
        printf "$f" "$name" "$mode" "$tps" "$txns" "$failed" "$aborted" "$cpu" "$wall" "$util" \
            "$per_core" "$busy" "$state"
    done <"$BENCH_DIR/results"
    echo
    echo "cpu_s: pooler utime+stime over the pgbench run ($CLIENTS md5 logins included); util = cpu_s / wall_s (1.00 = one core's worth);"
    echo "txn/core_s = txns / cpu_s; busy%: each core's busy share over the run (all processes on the machine)"
    echo
    echo "ratios (higher is better)"
    printf '%-9s %15s %20s %15s %16s\n' mode weir1/pgb_tps weir1/pgb_txn/core_s weir2/pgb_tps weir2/weir1_tps
    for mode in $MODES; do
        printf '%-9s %15s %20s %15s %16s\n' "$mode" \
            "$(fdiv "$(field weir1 "$mode" 3)" "$(field pgbouncer "$mode" 3)")" \
            "$(fdiv "$(field weir1 "$mode" 10)" "$(field pgbouncer "$mode" 10)")" \
            "$(fdiv "$(field weir2 "$mode" 3)" "$(field pgbouncer "$mode" 3)")" \
            "$(fdiv "$(field weir2 "$mode" 3)" "$(field weir1 "$mode" 3)")"
    done
    print_notes
}

main() {
    local name
    check_words mode "$MODES" simple extended prepared
    check_words case "$CASES" weir1 pgbouncer weir2
    [ "$POOLER_CPU" != "$OTHER_CPU" ] || die "POOLER_CPU and OTHER_CPU must differ"
    taskset -c "$POOLER_CPU" true 2>/dev/null || die "cannot run on CPU $POOLER_CPU (allowed: $ALL_CPUS)"
    taskset -c "$OTHER_CPU" true 2>/dev/null || die "cannot run on CPU $OTHER_CPU (allowed: $ALL_CPUS)"
    CORES="$POOLER_CPU $OTHER_CPU"
    PGBOUNCER_BIN=${PGBOUNCER_BIN:-$(default_pgbouncer_bin)}
    if [[ " $CASES " == *" pgbouncer "* ]]; then
        [ -x "$PGBOUNCER_BIN" ] || die "PgBouncer not found at $PGBOUNCER_BIN (set PGBOUNCER_BIN)"
    fi
    bench_init "$CLIENTS"
    build_weir

    take_ports PG_PORT WEIR_PORT PGB_PORT

    # PostgreSQL starts with this shell's affinity narrowed to OTHER_CPU, so the postmaster and
    # every backend it forks run there; the shell gets all its CPUs back right after.
    taskset -pc "$OTHER_CPU" $$ >/dev/null
    start_cluster pg "$PG_PORT" 300
    taskset -pc "$ALL_CPUS" $$ >/dev/null
    init_pgbench_db "$PG_PORT" "$SCALE"

    write_userlist "$BENCH_DIR/userlist.txt"
    weir_bench_db "$PG_PORT" |
        write_weir_toml "benches/ceiling.sh: Weir in front of the benchmark cluster" \
            "$WEIR_PORT" 0 "max_prepared_statements = $MAX_PREPARED_STATEMENTS"
    PGB_VERSION=""
    AFFINITY_LINES=()
    : >"$BENCH_DIR/results"
    for name in $CASES; do
        run_case "$name"
    done
    print_report
}

main "$@"
