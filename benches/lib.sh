# shellcheck shell=bash disable=SC2034  # variables here are read by the sourcing scripts
# Helpers shared by the scripts in benches/ (pgbench.sh, pgbench_sharded.sh, ceiling.sh,
# soak.sh): throwaway PostgreSQL clusters, Weir and PgBouncer (their configs too) on free
# loopback ports, process CPU time, pgbench output parsing, and one cleanup trap that stops
# everything started and removes the temp dir.
#
# Sourced, not run. The caller sets `set -euo pipefail` and calls `bench_init` first.

# Ports are taken from a range below the kernel's ephemeral range (32768-60999), so a port we
# probe as free is not handed to someone's outgoing connection a moment later.
BENCH_PORT_MIN=15000
BENCH_PORT_SPAN=15000

log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# check_words WHAT LIST ALLOWED...: dies ("unknown WHAT WORD") unless every word of LIST is one
# of ALLOWED.
check_words() {
    local what=$1 list=$2 word
    shift 2
    for word in $list; do
        [[ " $* " == *" $word "* ]] || die "unknown $what $word"
    done
}

# --- setup and cleanup -----------------------------------------------------------------------

BENCH_PIDS=()     # processes to stop on exit (Weir, PgBouncer, samplers)
BENCH_CLUSTERS=() # data dirs of the clusters to stop on exit
BENCH_PORTS=()    # ports handed out by free_port in this run

# Creates the temp dir (reachable by the postgres OS user), raises the fd limit, installs the
# cleanup trap and finds the PostgreSQL binaries. Sets BENCH_DIR, PG_BIN, REPO.
bench_init() {
    REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    PG_BIN=${PG_BIN:-$(pg_bindir)}
    if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/initdb" ]; then
        die "PostgreSQL server binaries not found (set PG_BIN)"
    fi
    command -v pgbench >/dev/null 2>&1 || [ -x "$PG_BIN/pgbench" ] || die "pgbench not found"
    BENCH_DIR=$(mktemp -d "${TMPDIR:-/tmp}/weir-bench.XXXXXX")
    chmod 755 "$BENCH_DIR"
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    raise_fd_limit "$1"
}

bench_cleanup() {
    local status=$?
    set +e
    local pid
    for pid in "${BENCH_PIDS[@]}"; do
        kill "$pid" 2>/dev/null
    done
    for pid in "${BENCH_PIDS[@]}"; do
        wait "$pid" 2>/dev/null
    done
    local dir
    for dir in "${BENCH_CLUSTERS[@]}"; do
        as_pg "$PG_BIN/pg_ctl" -D "$dir" -m immediate -w stop >/dev/null 2>&1
    done
    if [ "${KEEP_TMP:-0}" = 1 ]; then
        log "kept $BENCH_DIR (KEEP_TMP=1)"
    elif [ -n "${BENCH_DIR:-}" ]; then
        rm -rf "$BENCH_DIR"
    fi
    return "$status"
}

# Runs a command in the background and waits for it: bash runs a trap only after the
# foreground command ends, but interrupts `wait`, so INT/TERM stop a long pgbench at once.
run_waited() {
    local pid status=0
    "$@" &
    pid=$!
    BENCH_PIDS+=("$pid")
    wait "$pid" || status=$?
    forget_pid "$pid"
    return "$status"
}

# Drops an exited process from the cleanup list, so its pid is never signalled after reuse.
forget_pid() {
    local keep=() p
    for p in "${BENCH_PIDS[@]}"; do
        [ "$p" = "$1" ] || keep+=("$p")
    done
    BENCH_PIDS=("${keep[@]}")
}

# The soft open-files limit raise_fd_limit N aims at: 2 N + 1024, or the hard limit if lower.
fd_limit_for() {
    local want=$(($1 * 2 + 1024)) hard
    hard=$(ulimit -Hn)
    [ "$hard" = unlimited ] || [ "$want" -le "$hard" ] || want=$hard
    echo "$want"
}

# pgbench -c N needs about N descriptors in pgbench and N + pool in the pooler.
raise_fd_limit() {
    local want hard
    want=$(fd_limit_for "$1")
    hard=$(ulimit -Hn)
    [ "$(ulimit -Sn)" != unlimited ] && [ "$(ulimit -Sn)" -ge "$want" ] && return 0
    ulimit -Sn "$want" || die "cannot raise the open file limit to $want (hard limit: $hard)"
    [ "$want" -ge $(($1 + 64)) ] || die "open file limit $want is too low for $1 clients"
}

# The soft "Max open files" limit of running process PID, from /proc/PID/limits.
proc_fd_limit() {
    awk '/^Max open files/ { print $4 }' "/proc/$1/limits" 2>/dev/null
}

# check_fd_limit PID N WHAT: dies unless process PID (a pooler, started after raise_fd_limit N)
# runs with a soft open-files limit of at least fd_limit_for N. Limits are inherited through
# fork, exec and setpriv, but a PAM session (runuser, su) may reset them.
check_fd_limit() {
    local pid=$1 want have
    want=$(fd_limit_for "$2")
    have=$(proc_fd_limit "$pid")
    [ -n "$have" ] || die "cannot read /proc/$pid/limits for $3"
    [ "$have" = unlimited ] || [ "$have" -ge "$want" ] ||
        die "$3 (pid $pid) runs with an open-files soft limit of $have, below the $want needed for $2 clients; is it started through PAM (runuser, su)?"
    log "$3 (pid $pid): open-files soft limit $have (needed $want)"
}

build_weir() {
    if [ -n "${WEIR_BIN:-}" ]; then
        log "using WEIR_BIN=$WEIR_BIN (no build)"
        return 0
    fi
    if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    log "cargo build --release --bin weir"
    (cd "$REPO" && cargo build --release --bin weir) || die "cargo build failed"
    WEIR_BIN="$REPO/target/release/weir"
}

# --- processes as the postgres OS user -------------------------------------------------------

pg_bindir() {
    if [ -x /usr/lib/postgresql/15/bin/initdb ]; then
        echo /usr/lib/postgresql/15/bin
    else
        find /usr/lib/postgresql -maxdepth 3 -path '*/bin/initdb' 2>/dev/null |
            sort -V | tail -n 1 | xargs -r dirname
    fi
}

# initdb, postgres and pgbouncer refuse to run as root; as root they run as `postgres`.
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# Like as_pg, but exec's the program in place (no runuser parent), so `$!` after
# `exec_as_pg prog &` is the program's own pid and /proc/$!/stat is its CPU time.
exec_as_pg() {
    if [ "$(id -u)" -eq 0 ]; then
        exec setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"
    else
        exec "$@"
    fi
}

# --- ports -----------------------------------------------------------------------------------

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Prints a loopback port nobody listens on and this run has not handed out. Call it in the
# current shell (`free_port; port=$FREE_PORT`), not in $( ), so the hand-out is remembered.
free_port() {
    local port tries=0 used
    while :; do
        port=$((BENCH_PORT_MIN + (RANDOM * 32768 + RANDOM) % BENCH_PORT_SPAN))
        used=0
        [[ " ${BENCH_PORTS[*]} " == *" $port "* ]] && used=1
        if [ "$used" = 0 ] && ! port_busy "$port" && ! ss -Htan "sport = :$port" 2>/dev/null | grep -q .; then
            BENCH_PORTS+=("$port")
            FREE_PORT=$port
            return 0
        fi
        tries=$((tries + 1))
        [ "$tries" -lt 1000 ] || die "no free port found"
    done
}

# take_ports VAR...: sets each variable VAR to a port from free_port.
take_ports() {
    local var
    for var in "$@"; do
        free_port
        printf -v "$var" '%s' "$FREE_PORT"
    done
}

# Waits until 127.0.0.1:$1 accepts, failing early if process $2 exited. $3 names it.
wait_for_port() {
    local port=$1 pid=$2 what=$3 i
    for i in $(seq 1 200); do
        port_busy "$port" && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
        : "$i"
    done
    warn "$what did not listen on port $port within 20s"
    return 1
}

# --- PostgreSQL ------------------------------------------------------------------------------

# start_cluster NAME PORT MAX_CONNECTIONS: a trust-auth, loopback-only, TCP-only cluster in
# $BENCH_DIR/NAME. fsync is off: it is thrown away after the run, and the benchmark measures the
# pooler, not the disk.
start_cluster() {
    local name=$1 port=$2 max_conn=$3 dir="$BENCH_DIR/$1"
    log "PostgreSQL $name: initdb + start on 127.0.0.1:$port (max_connections=$max_conn)"
    mkdir -p "$dir"
    chmod 700 "$dir"
    [ "$(id -u)" -ne 0 ] || chown postgres: "$dir"
    (cd "$BENCH_DIR" && as_pg "$PG_BIN/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 \
        --locale=C --no-instructions >"$BENCH_DIR/$name.initdb.log" 2>&1) ||
        {
            cat "$BENCH_DIR/$name.initdb.log" >&2
            die "initdb failed for $name"
        }
    cat >>"$dir/postgresql.conf" <<CONF

# benches/lib.sh: a throwaway benchmark cluster
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = ''
max_connections = $max_conn
shared_buffers = 256MB
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
    printf 'host all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n' \
        >"$dir/pg_hba.conf"
    BENCH_CLUSTERS+=("$dir")
    if ! (cd "$BENCH_DIR" && as_pg "$PG_BIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 \
        start >/dev/null); then
        tail -n 30 "$dir/server.log" >&2 || true
        die "PostgreSQL $name did not start"
    fi
}

# psql_at PORT DB [psql args...]: psql as the postgres superuser, unaligned, quiet.
psql_at() {
    local port=$1 db=$2
    shift 2
    PGCONNECT_TIMEOUT=10 "$PG_BIN/psql" -X -q -A -t -w -v ON_ERROR_STOP=1 \
        -h 127.0.0.1 -p "$port" -U postgres -d "$db" "$@"
}

# The benchmark role and database on the cluster at PORT: role bench (password bench-secret,
# md5 in the poolers' userlist; the clusters themselves trust loopback) and database bench.
create_bench_db() {
    local port=$1
    psql_at "$port" postgres \
        -c "CREATE ROLE bench LOGIN PASSWORD 'bench-secret'" \
        -c "CREATE DATABASE bench OWNER bench"
}

BENCH_USER=bench
BENCH_PASSWORD=bench-secret

# init_pgbench_db PORT SCALE: create_bench_db on the cluster at PORT, then pgbench -i -s SCALE
# into database bench (log: $BENCH_DIR/pgbench-init.log) and VACUUM ANALYZE.
init_pgbench_db() {
    local port=$1 scale=$2
    create_bench_db "$port"
    log "pgbench -i -s $scale"
    "$(pgbench_bin)" -i -q -s "$scale" -h 127.0.0.1 -p "$port" -U "$BENCH_USER" bench \
        >"$BENCH_DIR/pgbench-init.log" 2>&1 || {
        cat "$BENCH_DIR/pgbench-init.log" >&2
        die "pgbench -i failed"
    }
    psql_at "$port" bench -c 'VACUUM ANALYZE'
}

write_userlist() {
    printf '"%s" "%s"\n' "$BENCH_USER" "$BENCH_PASSWORD" >"$1"
    chmod 644 "$1"
}

# Local ports of the established TCP connections process PID holds to PORT, comma-separated.
owned_ports() {
    ss -Htnp state established "( dport = :$2 )" 2>/dev/null |
        awk -v p="pid=$1," 'index($0, p) { n = split($3, a, ":"); print a[n] }' | paste -sd, -
}

# start_conn_sampler PORT FILE of|except PID...: every 0.5 s, in the background, appends to
# FILE how many client backends of database bench pg_stat_activity shows on the cluster at
# PORT whose client socket belongs to one of the PIDs (`of`) or to none of them (`except`).
# Sockets are matched to processes with ss(8), so each pooler's server connections are told
# apart from the other pooler's idle ones. Sets SAMPLER_PID.
start_conn_sampler() {
    local port=$1 file=$2 how=$3
    shift 3
    : >"$file"
    (
        trap 'exit 0' TERM
        local pid list more filter
        while :; do
            list=""
            for pid in "$@"; do
                more=$(owned_ports "$pid" "$port")
                [ -z "$more" ] || list="${list:+$list,}$more"
            done
            filter="client_port = ANY ('{$list}'::int[])"
            [ "$how" = of ] || filter="NOT ($filter)"
            psql_at "$port" postgres -c "SELECT count(*) FROM pg_stat_activity
                WHERE datname = 'bench' AND backend_type = 'client backend'
                  AND pid <> pg_backend_pid() AND $filter" >>"$file" 2>/dev/null || true
            sleep 0.5
        done
    ) &
    SAMPLER_PID=$!
    BENCH_PIDS+=("$SAMPLER_PID")
}

# stop_conn_sampler PID...
stop_conn_sampler() {
    local pid
    for pid in "$@"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        forget_pid "$pid"
    done
}

max_of_file() { sort -n "$1" | tail -n 1 | grep . || echo 0; }

# --- Weir ------------------------------------------------------------------------------------

# start_weir CONFIG PORT: runs Weir in the background (log next to the config); sets WEIR_PID.
start_weir() {
    local config=$1 port=$2 logfile="${1%.toml}.log"
    "$WEIR_BIN" --check "$config" >"${1%.toml}.check.log" 2>&1 ||
        {
            cat "${1%.toml}.check.log" >&2
            die "weir --check $config failed"
        }
    log "Weir on 127.0.0.1:$port (WEIR_WORKERS=${WEIR_WORKERS:-default}, log: $logfile)"
    "$WEIR_BIN" --log-level "${WEIR_LOG:-warn}" "$config" >"$logfile" 2>&1 &
    WEIR_PID=$!
    BENCH_PIDS+=("$WEIR_PID")
    wait_for_port "$port" "$WEIR_PID" Weir || {
        tail -n 30 "$logfile" >&2
        die "Weir did not start"
    }
}

# pool_limits RESERVE_POOL_SIZE [LINE...]: the limits Weir and PgBouncer both get, in the
# syntax both configs share: MAX_CLIENT_CONN clients, pools of POOL_SIZE servers plus
# RESERVE_POOL_SIZE reserve ones, then each LINE (e.g. "max_prepared_statements = 200").
pool_limits() {
    printf 'max_client_conn = %s\ndefault_pool_size = %s\nreserve_pool_size = %s\n' \
        "$MAX_CLIENT_CONN" "$POOL_SIZE" "$1"
    shift
    [ "$#" -eq 0 ] || printf '%s\n' "$@"
}

# write_weir_toml TITLE PORT RESERVE_POOL_SIZE [LINE...]: writes $BENCH_DIR/weir.toml: the
# comment "# TITLE", the [weir] section the benches share (127.0.0.1:PORT, transaction mode,
# pool_limits RESERVE_POOL_SIZE LINE..., md5 auth from userlist.txt, connection logging off),
# then the [databases.*] sections read from stdin.
write_weir_toml() {
    local title=$1 port=$2
    shift 2
    {
        printf '# %s\n[weir]\n' "$title"
        printf 'listen_addr = "127.0.0.1"\nlisten_port = %s\npool_mode = "transaction"\n' "$port"
        pool_limits "$@"
        cat <<TOML
auth_type = "md5"
auth_file = "userlist.txt"
log_connections = false
log_disconnections = false

TOML
        cat
    } >"$BENCH_DIR/weir.toml"
}

# weir_bench_db PORT: the [databases.bench] section for the cluster at 127.0.0.1:PORT (database
# bench), for write_weir_toml's stdin.
weir_bench_db() {
    printf '[databases.bench]\nhost = "127.0.0.1"\nport = %s\ndbname = "bench"\n' "$1"
}

# --- PgBouncer -------------------------------------------------------------------------------

# The PgBouncer binary when none is given: /opt/pgbouncer/bin/pgbouncer if it is executable,
# else /usr/sbin/pgbouncer.
default_pgbouncer_bin() {
    if [ -x /opt/pgbouncer/bin/pgbouncer ]; then
        echo /opt/pgbouncer/bin/pgbouncer
    else
        echo /usr/sbin/pgbouncer
    fi
}

# write_pgbouncer_ini TITLE SERVER_PORT PORT RESERVE_POOL_SIZE [LINE...]: writes
# $BENCH_DIR/pgbouncer.ini: the comment "; TITLE", database bench at 127.0.0.1:SERVER_PORT,
# and PgBouncer on 127.0.0.1:PORT with the settings write_weir_toml gives Weir (pool_limits
# RESERVE_POOL_SIZE LINE... among them) plus max_prepared_statements = MAX_PREPARED_STATEMENTS
# (which start_pgbouncer drops again for a PgBouncer before 1.21, which does not know it).
write_pgbouncer_ini() {
    local title=$1 server_port=$2 port=$3
    shift 3
    {
        cat <<INI
; $title
[databases]
bench = host=127.0.0.1 port=$server_port dbname=bench

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
pool_mode = transaction
INI
        pool_limits "$@"
        cat <<INI
max_prepared_statements = $MAX_PREPARED_STATEMENTS
auth_type = md5
auth_file = $BENCH_DIR/userlist.txt
pidfile = $BENCH_DIR/pgbouncer/pgbouncer.pid
log_connections = 0
log_disconnections = 0
INI
    } >"$BENCH_DIR/pgbouncer.ini"
    chmod 644 "$BENCH_DIR/pgbouncer.ini"
}

# pgbouncer_init: dies unless PGBOUNCER_BIN is executable; makes $BENCH_DIR/pgbouncer (pid file
# and log, PGB_LOG) writable by the user PgBouncer runs as; sets PGB_VERSION and PGB_LOG.
pgbouncer_init() {
    [ -x "$PGBOUNCER_BIN" ] || die "PgBouncer not found at $PGBOUNCER_BIN (set PGBOUNCER_BIN)"
    mkdir -p "$BENCH_DIR/pgbouncer"
    [ "$(id -u)" -ne 0 ] || chown postgres: "$BENCH_DIR/pgbouncer"
    PGB_LOG="$BENCH_DIR/pgbouncer/pgbouncer.log"
    PGB_VERSION=$("$PGBOUNCER_BIN" --version 2>/dev/null | head -n 1)
}

# launch_pgbouncer PORT [CMD...]: one start of PgBouncer with $BENCH_DIR/pgbouncer.ini, run by
# CMD (e.g. taskset -c 0) if given; sets PGB_PID; fails if PORT does not accept. exec_as_pg
# runs it through setpriv, which keeps the raised open-files limit (a runuser/PAM session could
# reset it; check_fd_limit checks).
launch_pgbouncer() {
    local port=$1
    shift
    (exec_as_pg "$@" "$PGBOUNCER_BIN" "$BENCH_DIR/pgbouncer.ini") >"$PGB_LOG" 2>&1 &
    PGB_PID=$!
    wait_for_port "$port" "$PGB_PID" PgBouncer
}

# The first PgBouncer log line matching the extended regex $1, without its timestamp and pid.
pgbouncer_said() {
    grep -i -m 1 -E "$1" "$PGB_LOG" | sed -E 's/^.*\[[0-9]+\] //' || true
}

# start_pgbouncer PORT [CMD...]: starts PgBouncer (after pgbouncer_init and write_pgbouncer_ini)
# as launch_pgbouncer does and puts PGB_PID on the cleanup list. If this version rejects
# max_prepared_statements, notes that and starts it without.
start_pgbouncer() {
    local said
    if launch_pgbouncer "$@"; then
        said=$(pgbouncer_said 'max_prepared_statements')
        [ -z "$said" ] || NOTES+=("$PGB_VERSION on max_prepared_statements: $said")
    else
        said=$(pgbouncer_said 'max_prepared_statements|error|fatal')
        NOTES+=("$PGB_VERSION refused max_prepared_statements (\"${said:-exited}\"); ran it without, so -M prepared through it is expected to fail")
        kill "$PGB_PID" 2>/dev/null || true
        wait "$PGB_PID" 2>/dev/null || true
        sed -i '/^max_prepared_statements = /d' "$BENCH_DIR/pgbouncer.ini"
        launch_pgbouncer "$@" || {
            tail -n 30 "$PGB_LOG" >&2
            die "PgBouncer did not start"
        }
    fi
    BENCH_PIDS+=("$PGB_PID")
}

# --- CPU time --------------------------------------------------------------------------------

CLK_TCK=$(getconf CLK_TCK)

# utime + stime of PID in clock ticks (fields 14 and 15 of /proc/PID/stat; the comm field
# may contain spaces, so count from the closing parenthesis).
cpu_ticks() {
    local stat rest
    stat=$(cat "/proc/$1/stat") || {
        echo 0
        return
    }
    rest=${stat##*) }
    # shellcheck disable=SC2086
    set -- $rest
    echo $((${12} + ${13}))
}

# --- memory ----------------------------------------------------------------------------------

# Resident set size of PID in kB (VmRSS from /proc/PID/status), or "-" if it is gone.
rss_kb() {
    local status
    status=$(cat "/proc/$1/status" 2>/dev/null) || status=""
    awk '/^VmRSS:/ { print $2; found = 1 } END { if (!found) print "-" }' <<<"$status"
}

# --- pgbench ---------------------------------------------------------------------------------

pgbench_bin() {
    if [ -x "$PG_BIN/pgbench" ]; then echo "$PG_BIN/pgbench"; else command -v pgbench; fi
}

# Values parsed from one pgbench output file into PB_* variables.
parse_pgbench() {
    local out=$1
    PB_TPS=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time).*/\1/p' "$out" | tail -n 1)
    PB_TXNS=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out" | tail -n 1)
    PB_FAILED=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$out" | tail -n 1)
    PB_LAT=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' "$out" | tail -n 1)
    # "client 3 aborted in command ..." or, in pgbench 15, "client 3 script 0 aborted in ...".
    PB_ABORTED=$(grep -cE 'client [0-9]+ (script [0-9]+ )?aborted' "$out" || true)
    PB_TPS=$(printf '%.1f' "${PB_TPS:-0}")
    PB_TXNS=${PB_TXNS:-0}
    PB_FAILED=${PB_FAILED:-0}
    PB_LAT=${PB_LAT:--}
}

# latency_percentile PCT FILE...: the PCT-th percentile (nearest rank) of the latencies in
# pgbench per-transaction logs (-l; 3rd field, µs; failed or skipped transactions, which log a
# word there, are left out), in ms with 3 decimals, then the number of samples: "P99 N".
# Prints "- 0" when there are no samples.
latency_percentile() {
    local pct=$1
    shift
    awk '$3 ~ /^[0-9]+$/ { print $3 }' "$@" 2>/dev/null | sort -n |
        awk -v p="$pct" '{ v[NR] = $1 } END {
            if (NR == 0) { print "- 0"; exit }
            r = int(NR * p / 100); if (r < NR * p / 100) r++; if (r < 1) r = 1
            printf "%.3f %d\n", v[r] / 1000, NR }'
}

NOTES=() # lines printed under the results table

# The NOTES under a heading, if there are any.
print_notes() {
    [ "${#NOTES[@]}" -gt 0 ] || return 0
    echo
    echo "notes:"
    printf '  %s\n' "${NOTES[@]}"
}

# judge_run LABEL OUTFILE STATUS: RUN_STATE=ok, or FAIL(...) with the reason and pgbench's
# first distinct errors appended to NOTES. Call after parse_pgbench.
judge_run() {
    local label=$1 out=$2 status=$3 line
    RUN_STATE=ok
    if [ "$status" -ne 0 ] || [ "$PB_ABORTED" -gt 0 ]; then
        RUN_STATE="FAIL($status)"
        NOTES+=("$label: pgbench exit $status, $PB_ABORTED of $CLIENTS clients aborted; first errors:")
        while IFS= read -r line; do NOTES+=("    $line"); done < <(pgbench_errors "$out" 3)
    elif [ "$PB_TXNS" = 0 ]; then
        RUN_STATE="FAIL(no-txns)"
        NOTES+=("$label: no transaction completed in ${DURATION}s (connecting $CLIENTS clients can take that long on a busy machine); raise DURATION")
    fi
}

# The first distinct error messages of a pgbench run, for the notes under the table.
pgbench_errors() {
    grep -E 'error|FATAL|ERROR' "$1" | sed -E 's/client [0-9]+/client N/g; s/P[0-9]+_[0-9]+/P*_*/g' |
        sort | uniq -c | sort -rn | head -n "${2:-3}"
}

# fdiv A B [DIGITS]: A / B as a decimal, or "-" when either is missing or B is zero.
fdiv() {
    awk -v a="$1" -v b="$2" -v d="${3:-2}" 'BEGIN {
        if (a == "-" || b == "-" || a == "" || b == "" || b + 0 == 0) { print "-"; exit }
        printf "%.*f\n", d, a / b }'
}
