#!/usr/bin/env bash
# COPY benchmark, by hand (not run in CI): rows/s of `COPY accounts FROM STDIN` (text, CSV and
# binary) through Weir into a table sharded over SHARDS throwaway PostgreSQL clusters, side by
# side in one run with the same COPY straight into one more throwaway PostgreSQL ("direct");
# then `COPY accounts TO STDOUT` of the loaded table, through Weir (merged from the shards)
# and direct.
#
#   bash benches/copy.sh                          # 1,000,000 rows, 2 shards, 1 run
#   ROWS=200000 bash benches/copy.sh
#   SHARDS=4 RUNS=3 FORMATS="csv binary" bash benches/copy.sh
#
# Environment (run as root: PostgreSQL then runs as the `postgres` OS user):
#   ROWS      rows per COPY, default 1000000       SHARDS  shards behind Weir, default 2
#   RUNS      direct/Weir pairs per format and direction, default 1; run 2, 4, ... runs Weir
#             first, so drift on a shared machine falls on both sides alike (ABBA)
#   FORMATS   default "text csv binary"            COPY_TO=0  skips the COPY TO phase
#   COPY_TIMEOUT  seconds one psql \copy may take before it counts as failed, default 900
#   WEIR_BIN  use this binary instead of building  WEIR_WORKERS  passed to Weir as is
#   WEIR_LOG  Weir's --log-level, default warn     PG_BIN  PostgreSQL server binaries
#   KEEP_TMP=1 keeps the temp dir (data files, configs, logs, psql output)
#
# Every cluster (fsync off, trust on loopback, see benches/lib.sh) has database bench owned by
# role bench with `accounts (id bigint PRIMARY KEY, balance bigint, note text)` (autovacuum off
# on it, so no ANALYZE lands in the next measurement); each shard also has an empty
# `accounts_hp (id bigint) PARTITION BY HASH (id)`, the twin PostgreSQL's
# satisfies_hash_partition() needs. Weir (md5 login of user bench) has database bench with the
# shards and `sharded_tables = [{ table = "accounts", column = "id", type = "bigint" }]`.
#
# The data files are made once, by the direct server itself (`COPY (SELECT ...) TO STDOUT`):
# ids 1..ROWS, balance = 10 * id, and a note that is `note N`, or for some rows contains a
# comma and double quotes (quoted in CSV), a tab or a backslash (escaped in text); CSV has a
# header line; binary is PGCOPY with bigint, bigint, text. Each load is
#   psql -c "\copy accounts FROM 'FILE' WITH (FORMAT ...)"
# (psql sends COPY ... FROM STDIN and streams the file), timed with date +%s.%N around psql
# (connection and login included), into a table TRUNCATEd (on every shard) and CHECKPOINTed
# just before. After each load it checks psql's `COPY n` tag, the row count (through Weir:
# `SELECT count(*) FROM accounts`, which Weir fans out and sums), a checksum of every row's
# content (sum of hashtext(id,balance,note), per shard, summed) against the generated data,
# and on every shard that `SELECT count(*) FROM accounts WHERE NOT satisfies_hash_partition(
# 'accounts_hp'::regclass, SHARDS, i, id)` is 0. COPY TO writes with
#   psql -c "\copy accounts TO 'FILE' WITH (FORMAT ...)"
# and the file must hold the generated rows (in any order; sorted records compared) after the
# one header (CSV header line, binary signature) and, for binary, one trailer.
#
# Printed: every run (seconds, rows/s, Weir's CPU time from /proc/PID/stat, the COPY tag,
# the checks), then per direction and format the median rows/s direct and through Weir over
# the runs that passed, and the ratio Weir rows/s / direct rows/s. A failed run keeps psql's
# exact error text in the notes; the run goes on with the next one. Note that a sharded COPY
# has SHARDS server backends working for it while direct has one, all on the same CPUs as psql
# and Weir; the ratio is what a client sees, not Weir's overhead alone.
# Everything started is stopped and the temp dir removed on exit.
set -euo pipefail

# shellcheck source=benches/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROWS=${ROWS:-1000000}
SHARDS=${SHARDS:-2}
RUNS=${RUNS:-1}
FORMATS=${FORMATS:-text csv binary}
COPY_TO=${COPY_TO:-1}
COPY_TIMEOUT=${COPY_TIMEOUT:-900}
PYTHON=${PYTHON:-python3}

# write_weir_toml's pool settings: one client at a time, so small pools.
MAX_CLIENT_CONN=100
POOL_SIZE=5
RESERVE_POOL_SIZE=0

SHARD_PORTS=()
DIRECT_PORT=""
WEIR_PORT=""
WEIR_PID=""
EXPECTED_SUM=""

# The rows, as a query (the data files are its COPY output, the checksums are over it).
gen_sql() {
    cat <<SQL
SELECT g::bigint AS id, g::bigint * 10 AS balance,
       CASE WHEN g % 7 = 0 THEN 'note, "quoted", ' || g
            WHEN g % 5 = 0 THEN 'note, with a comma ' || g
            WHEN g % 11 = 0 THEN 'note' || chr(9) || 'tab ' || g
            WHEN g % 13 = 0 THEN 'note' || chr(92) || 'backslash ' || g
            ELSE 'note ' || g END AS note
FROM generate_series(1, $ROWS) AS g
SQL
}

# The per-row checksum summed by the checks.
ROW_HASH="hashtext(id::text || ',' || balance::text || ',' || note)"

copy_opts() {
    case $1 in
    text) echo "FORMAT text" ;;
    csv) echo "FORMAT csv, HEADER" ;;
    binary) echo "FORMAT binary" ;;
    esac
}

target_port() {
    case $1 in
    direct) echo "$DIRECT_PORT" ;;
    weir) echo "$WEIR_PORT" ;;
    esac
}

# psql_weir [psql args...]: psql as user bench through Weir, database bench, unaligned, quiet.
psql_weir() {
    PGPASSWORD=$BENCH_PASSWORD PGCONNECT_TIMEOUT=10 "$PG_BIN/psql" -X -q -A -t -w \
        -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$WEIR_PORT" -U "$BENCH_USER" -d bench "$@"
}

create_table() {
    local port=$1
    shift
    psql_at "$port" bench \
        -c 'CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint, note text) WITH (autovacuum_enabled = off)' \
        -c 'ALTER TABLE accounts OWNER TO bench' "$@"
}

create_clusters() {
    local i
    free_port
    DIRECT_PORT=$FREE_PORT
    start_cluster direct "$DIRECT_PORT" 50
    create_bench_db "$DIRECT_PORT"
    create_table "$DIRECT_PORT"
    for ((i = 0; i < SHARDS; i++)); do
        free_port
        SHARD_PORTS+=("$FREE_PORT")
        start_cluster "shard$i" "$FREE_PORT" 50
        create_bench_db "$FREE_PORT"
        create_table "$FREE_PORT" -c 'CREATE TABLE accounts_hp (id bigint) PARTITION BY HASH (id)'
    done
}

write_weir_config() {
    local shards="" i
    for ((i = 0; i < SHARDS; i++)); do
        shards+="  { primary = \"127.0.0.1:${SHARD_PORTS[$i]}\" },"$'\n'
    done
    write_weir_toml "benches/copy.sh: Weir in front of $SHARDS shards" "$WEIR_PORT" \
        "$RESERVE_POOL_SIZE" <<TOML
[databases.bench]
dbname = "bench"
shards = [
$shards]
sharded_tables = [
  { table = "accounts", column = "id", type = "bigint" },
]
TOML
}

# The data files data.text, data.csv and data.binary, written by the direct server; and
# EXPECTED_SUM, the checksum of all rows.
make_data() {
    local fmt size
    DATA_LINE="data:"
    for fmt in $FORMATS; do
        log "generating $ROWS rows in $fmt format"
        psql_at "$DIRECT_PORT" bench -c "COPY ($(gen_sql)) TO STDOUT WITH ($(copy_opts "$fmt"))" \
            >"$BENCH_DIR/data.$fmt" || die "generating the $fmt data failed"
        size=$(stat -c %s "$BENCH_DIR/data.$fmt")
        DATA_LINE+=" $fmt $(fdiv "$size" 1048576 1) MB;"
    done
    chmod 644 "$BENCH_DIR"/data.*
    EXPECTED_SUM=$(psql_at "$DIRECT_PORT" bench -c "SELECT coalesce(sum($ROW_HASH), 0) FROM ($(gen_sql)) AS r")
}

# The record checker for COPY TO output: header, sorted records and trailer of FILE against
# those of the data file of the same format. Prints "ok" or what differs.
write_checker() {
    cat >"$BENCH_DIR/check_copy.py" <<'PY'
import struct
import sys

SIG = b"PGCOPY\n\xff\r\n\x00"


def split(path, fmt):
    """(header, records, trailer) of a COPY file; records as bytes."""
    data = open(path, "rb").read()
    if fmt != "binary":
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        else:
            return None, None, "no newline at the end"
        if fmt == "csv":
            return (lines[0] if lines else None), lines[1:], b""
        return b"", lines, b""
    if data[:11] != SIG:
        return None, None, "no PGCOPY signature"
    ext = struct.unpack_from(">I", data, 15)[0]
    pos = 19 + ext
    header = data[:pos]
    recs = []
    while True:
        if pos + 2 > len(data):
            return header, recs, "no trailer"
        n = struct.unpack_from(">h", data, pos)[0]
        if n == -1:
            pos += 2
            break
        start = pos
        pos += 2
        for _ in range(n):
            size = struct.unpack_from(">i", data, pos)[0]
            pos += 4 + max(size, 0)
        recs.append(data[start:pos])
    if pos != len(data):
        return header, recs, "%d bytes after the trailer" % (len(data) - pos)
    return header, recs, b""


def main():
    got_path, want_path, fmt = sys.argv[1:4]
    gh, gr, gt = split(got_path, fmt)
    wh, wr, wt = split(want_path, fmt)
    if isinstance(gt, str):
        print(gt)
    elif gh != wh:
        print("header differs: %r" % (gh[:60] if gh else gh))
    elif len(gr) != len(wr):
        print("%d records, expected %d" % (len(gr), len(wr)))
    elif sorted(gr) != sorted(wr):
        print("records differ")
    else:
        print("ok")


main()
PY
}

# TRUNCATE accounts where TARGET loads (every shard for weir), then CHECKPOINT everywhere so
# no checkpoint of the previous run's data lands in this one.
reset_target() {
    local port
    if [ "$1" = direct ]; then
        psql_at "$DIRECT_PORT" bench -c 'TRUNCATE accounts'
    else
        for port in "${SHARD_PORTS[@]}"; do
            psql_at "$port" bench -c 'TRUNCATE accounts'
        done
    fi
    checkpoint_all
}

checkpoint_all() {
    local port
    for port in "$DIRECT_PORT" "${SHARD_PORTS[@]}"; do
        psql_at "$port" bench -c 'CHECKPOINT'
    done
}

# verify_loaded TARGET: sets VERIFY to "ok" or what is wrong with accounts where TARGET
# loaded: row count (through Weir's fan-out for weir), content checksum, shard placement.
verify_loaded() {
    local count sum n bad part i total=0 sums=0 misplaced="" err
    if [ "$1" = direct ]; then
        IFS='|' read -r count sum < <(psql_at "$DIRECT_PORT" bench \
            -c "SELECT count(*), coalesce(sum($ROW_HASH), 0) FROM accounts")
        if [ "$count" != "$ROWS" ]; then
            VERIFY="count=$count"
        elif [ "$sum" != "$EXPECTED_SUM" ]; then
            VERIFY="checksum"
        else
            VERIFY=ok
        fi
        return 0
    fi
    VERIFY=""
    if ! count=$(psql_weir -c 'SELECT count(*) FROM accounts' 2>"$BENCH_DIR/count.err"); then
        err=$(head -n 1 "$BENCH_DIR/count.err")
        NOTES+=("SELECT count(*) FROM accounts through Weir failed: $err")
        count="?"
    fi
    [ "$count" = "$ROWS" ] || VERIFY+="weir_count=$count,"
    for ((i = 0; i < SHARDS; i++)); do
        IFS='|' read -r n bad part < <(psql_at "${SHARD_PORTS[$i]}" bench -c "
            SELECT count(*), count(*) FILTER (WHERE NOT satisfies_hash_partition(
                       'accounts_hp'::regclass, $SHARDS, $i, id)),
                   coalesce(sum($ROW_HASH), 0)
            FROM accounts")
        total=$((total + n))
        sums=$((sums + part))
        [ "$bad" = 0 ] || misplaced+="${misplaced:+/}shard$i:$bad"
    done
    [ "$total" = "$ROWS" ] || VERIFY+="shard_rows=$total,"
    [ "$sums" = "$EXPECTED_SUM" ] || VERIFY+="checksum,"
    [ -z "$misplaced" ] || VERIFY+="misplaced=$misplaced,"
    VERIFY=${VERIFY%,}
    [ -n "$VERIFY" ] || VERIFY=ok
}

# Before the COPY TO phase both sides must hold exactly the generated rows; if the last load
# into a side did not pass its checks, that side is reloaded with INSERT ... SELECT directly
# (each shard with its own rows), so COPY TO is measured whatever happened to COPY FROM.
ensure_loaded() {
    local target i
    for target in direct weir; do
        verify_loaded "$target"
        [ "$VERIFY" != ok ] || continue
        log "reloading accounts for $target with INSERT ... SELECT (last load: $VERIFY)"
        NOTES+=("before COPY TO: accounts for $target did not pass its checks ($VERIFY); reloaded directly with INSERT ... SELECT")
        if [ "$target" = direct ]; then
            psql_at "$DIRECT_PORT" bench -c 'TRUNCATE accounts' \
                -c "INSERT INTO accounts $(gen_sql)"
        else
            for ((i = 0; i < SHARDS; i++)); do
                psql_at "${SHARD_PORTS[$i]}" bench -c 'TRUNCATE accounts' \
                    -c "INSERT INTO accounts SELECT * FROM ($(gen_sql)) AS r
                        WHERE satisfies_hash_partition('accounts_hp'::regclass, $SHARDS, $i, id)"
            done
        fi
        verify_loaded "$target"
        [ "$VERIFY" = ok ] || die "accounts for $target is still wrong after reloading: $VERIFY"
    done
}

# Results file columns (one row per run):
#  1 direction (from|to)  2 format  3 run  4 target  5 seconds  6 rows/s  7 weir_cpu_s
#  8 COPY tag count  9 check  10 status
RESULT_FMT='%-4s %-6s %3s %-6s %9s %12s %10s %9s %-28s %s\n'

# copy_run from|to FORMAT RUN TARGET: one timed psql \copy; appends a row to results.
copy_run() {
    local dir=$1 fmt=$2 run=$3 target=$4 port out file cmd status=0 t0 t1 secs rate
    local before=0 after=0 cpu="-" tag state=ok line
    port=$(target_port "$target")
    out="$BENCH_DIR/$dir.$fmt.$run.$target.out"
    if [ "$dir" = from ]; then
        file="$BENCH_DIR/data.$fmt"
        reset_target "$target"
        cmd="\\copy accounts FROM '$file' WITH ($(copy_opts "$fmt"))"
    else
        file="$BENCH_DIR/out.$fmt.$target"
        rm -f "$file"
        checkpoint_all
        cmd="\\copy accounts TO '$file' WITH ($(copy_opts "$fmt"))"
    fi
    log "run $run: COPY ${dir^^} $fmt -> $target (port $port): $cmd"
    [ "$target" = direct ] || before=$(cpu_ticks "$WEIR_PID")
    t0=$(date +%s.%N)
    run_waited timeout "$COPY_TIMEOUT" env PGPASSWORD="$BENCH_PASSWORD" PGCONNECT_TIMEOUT=10 \
        "$PG_BIN/psql" -X -w -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U "$BENCH_USER" \
        -d bench -c "$cmd" >"$out" 2>&1 || status=$?
    t1=$(date +%s.%N)
    if [ "$target" = weir ]; then
        after=$(cpu_ticks "$WEIR_PID")
        cpu=$(fdiv "$((after - before))" "$CLK_TCK" 2)
    fi
    secs=$(awk -v s="$t0" -v e="$t1" 'BEGIN { printf "%.3f", e - s }')
    tag=$(sed -n 's/^COPY \([0-9]*\)$/\1/p' "$out" | tail -n 1)
    tag=${tag:--}
    if [ "$status" -ne 0 ]; then
        state="FAIL($status)"
        [ "$status" != 124 ] || state="FAIL(timeout)"
        NOTES+=("COPY ${dir^^} $fmt run $run via $target: psql exit $status$([ "$status" != 124 ] || echo " (timed out after ${COPY_TIMEOUT}s)"); its output:")
        while IFS= read -r line; do NOTES+=("    $line"); done < <(head -n 8 "$out")
        VERIFY="-"
    elif [ "$tag" != "$ROWS" ]; then
        state="FAIL(tag)"
        NOTES+=("COPY ${dir^^} $fmt run $run via $target: psql reported 'COPY $tag', expected $ROWS")
    fi
    if [ "$status" -eq 0 ]; then
        if [ "$dir" = from ]; then
            verify_loaded "$target"
        else
            VERIFY=$("$PYTHON" "$BENCH_DIR/check_copy.py" "$file" "$BENCH_DIR/data.$fmt" "$fmt" 2>&1 | tail -n 1)
            [ "${KEEP_TMP:-0}" = 1 ] || rm -f "$file"
        fi
        if [ "$VERIFY" != ok ]; then
            [ "$state" != ok ] || state="FAIL(check)"
            NOTES+=("COPY ${dir^^} $fmt run $run via $target: check failed: $VERIFY")
        fi
    fi
    if [ "$state" = ok ]; then
        rate=$(awk -v n="$ROWS" -v s="$secs" 'BEGIN { printf "%.0f", (s > 0 ? n / s : 0) }')
    else
        rate="-"
    fi
    # One word per column in the results file.
    printf '%s %s %s %s %s %s %s %s %s %s\n' "$dir" "$fmt" "$run" "$target" "$secs" "$rate" \
        "$cpu" "$tag" "${VERIFY// /_}" "$state" >>"$BENCH_DIR/results"
    # shellcheck disable=SC2059  # the format is a constant
    printf "$RESULT_FMT" "$dir" "$fmt" "$run" "$target" "$secs" "$rate" "$cpu" "$tag" \
        "${VERIFY// /_}" "$state" >&2
    [ "$target" = direct ] || kill -0 "$WEIR_PID" 2>/dev/null || {
        NOTES+=("Weir exited during COPY ${dir^^} $fmt run $run; the benchmark stopped there. Last lines of its log:")
        while IFS= read -r line; do NOTES+=("    $line"); done < <(tail -n 8 "$BENCH_DIR/weir.log")
        print_report
        exit 1
    }
}

# The targets in run order for run $1: direct first on odd runs, Weir first on even ones.
targets_for_run() {
    if (($1 % 2)); then echo "direct weir"; else echo "weir direct"; fi
}

# median DIR FORMAT TARGET COLUMN DIGITS: the median of a results column over the runs that
# passed, with DIGITS decimals ("-" when none passed).
median() {
    awk -v d="$1" -v f="$2" -v t="$3" -v col="$4" \
        '$1 == d && $2 == f && $4 == t && $10 == "ok" && $col != "-" { print $col }' \
        "$BENCH_DIR/results" | sort -g |
        awk -v digits="$5" '{ v[NR] = $1 } END {
            if (NR == 0) { print "-"; exit }
            m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
            printf "%." digits "f\n", m }'
}

ok_runs() {
    awk -v d="$1" -v f="$2" -v t="$3" '$1 == d && $2 == f && $4 == t && $10 == "ok" { n++ }
        END { print n + 0 }' "$BENCH_DIR/results"
}

# summary DIR TITLE: one ratio row per format.
summary() {
    local dir=$1 fmt d w c fmt_line='%-7s %15s %15s %12s %12s %9s\n'
    echo
    echo "$2"
    # shellcheck disable=SC2059  # the format is a constant
    printf "$fmt_line" format direct_rows/s weir_rows/s weir/direct weir_cpu_s ok:d/w
    for fmt in $FORMATS; do
        d=$(median "$dir" "$fmt" direct 6 0)
        w=$(median "$dir" "$fmt" weir 6 0)
        c=$(median "$dir" "$fmt" weir 7 3)
        # shellcheck disable=SC2059
        printf "$fmt_line" "$fmt" "$d" "$w" "$(fdiv "$w" "$d" 3)" "$c" \
            "$(ok_runs "$dir" "$fmt" direct)/$(ok_runs "$dir" "$fmt" weir)"
    done
}

print_report() {
    local line
    echo
    echo "COPY through Weir into/out of $SHARDS shards vs one PostgreSQL directly: $ROWS rows, $RUNS run(s) per format and direction; $(nproc) CPUs"
    echo "PostgreSQL: $("$PG_BIN/postgres" --version 2>/dev/null) (fsync off, one cluster per shard + one direct)"
    echo "Weir: $("$WEIR_BIN" --version 2>/dev/null) ($WEIR_BIN, WEIR_WORKERS=${WEIR_WORKERS:-unset})"
    echo "$DATA_LINE"
    echo
    # shellcheck disable=SC2059  # the format is a constant
    printf "$RESULT_FMT" dir format run target seconds rows/s weir_cpu_s copy_tag check status
    # shellcheck disable=SC2059,SC2086  # word splitting of the row is wanted
    while read -r line; do printf "$RESULT_FMT" $line; done <"$BENCH_DIR/results"
    echo
    echo "seconds: psql \\copy wall time (connection and login included); weir_cpu_s: Weir's utime+stime during it;"
    echo "check: COPY FROM: row count (through Weir: its fan-out count(*)), content checksum, placement by satisfies_hash_partition on every shard;"
    echo "       COPY TO: header, trailer and the sorted records equal to the generated file's"
    summary from "COPY accounts FROM STDIN (median over the runs that passed; weir/direct = Weir sharded rows/s / direct rows/s)"
    [ "$COPY_TO" = 0 ] ||
        summary to "COPY accounts TO STDOUT (median over the runs that passed; weir/direct = Weir sharded rows/s / direct rows/s)"
    print_notes
}

main() {
    local run fmt target
    check_words format "$FORMATS" text csv binary
    [ -n "${FORMATS// /}" ] || die "FORMATS is empty"
    [[ $ROWS =~ ^[1-9][0-9]*$ ]] || die "ROWS must be a positive integer"
    [[ $SHARDS =~ ^[1-9][0-9]*$ ]] || die "SHARDS must be a positive integer"
    [[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer"
    "$PYTHON" -c 'import struct' 2>/dev/null || die "python3 not found (set PYTHON)"
    bench_init 64
    build_weir

    create_clusters
    free_port
    WEIR_PORT=$FREE_PORT
    write_userlist "$BENCH_DIR/userlist.txt"
    write_weir_config
    start_weir "$BENCH_DIR/weir.toml" "$WEIR_PORT"

    make_data
    write_checker
    : >"$BENCH_DIR/results"
    # shellcheck disable=SC2059  # the format is a constant
    printf "$RESULT_FMT" dir format run target seconds rows/s weir_cpu_s copy_tag check status >&2
    for ((run = 1; run <= RUNS; run++)); do
        for fmt in $FORMATS; do
            for target in $(targets_for_run "$run"); do
                copy_run from "$fmt" "$run" "$target"
            done
        done
    done
    if [ "$COPY_TO" != 0 ]; then
        ensure_loaded
        for ((run = 1; run <= RUNS; run++)); do
            for fmt in $FORMATS; do
                for target in $(targets_for_run "$run"); do
                    copy_run to "$fmt" "$run" "$target"
                done
            done
        done
    fi
    print_report
}

main "$@"
