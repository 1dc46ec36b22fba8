#!/usr/bin/env bash
# Online resharding benchmark, by hand (not run in CI): how fast `RESHARD shop TO shop_v2`
# moves a two-shard database onto four shards through Weir, how long its cutover holds
# clients, and whether a pgbench write load running through Weir the whole time loses,
# doubles or fails anything.
#
#   bash benches/reshard.sh                       # 1,000,000 accounts, 8 clients
#   ROWS=200000 CLIENTS=4 bash benches/reshard.sh
#   TARGET_CLUSTERS=4 DURATION=300 bash benches/reshard.sh
#
# Environment (run as root: PostgreSQL then runs as the `postgres` OS user):
#   ROWS      accounts loaded before the move, default 1000000
#   CLIENTS   pgbench clients (-c), default 8       JOBS  pgbench threads (-j), default 2
#   MODE      pgbench -M: simple, extended or prepared (default)
#   BEFORE    seconds of load before RESHARD, default 5
#   AFTER     seconds the load must go on after the move is done, default 5
#   DURATION  pgbench -T: must cover BEFORE, the whole move and AFTER; default
#             BEFORE + AFTER + 30 + ROWS / 25000. pgbench cannot be ended early and still
#             print its totals, so it runs its full DURATION; a move not done before pgbench
#             ends fails the run (raise DURATION)
#   TARGET_CLUSTERS  clusters the four target shards are spread over (shard k on cluster
#             k mod N, each shard its own database), 1, 2 (default) or 4
#   POLL      seconds between two SHOW RESHARD, default 0.5
#   RESHARD_TIMEOUT  seconds from RESHARD to done before giving up, default 3600
#   WEIR_BIN  use this binary instead of building  WEIR_WORKERS  passed to Weir as is
#   WEIR_LOG  Weir's --log-level, default info      PG_BIN  PostgreSQL server binaries
#   KEEP_TMP=1 keeps the temp dir (configs, logs, pgbench output and per-transaction logs)
#
# Clusters (fsync off, trust on loopback, see benches/lib.sh): two sources, each with
# wal_level = logical (restarted once to get it) and database shop; TARGET_CLUSTERS targets
# with the empty databases shop_0 .. shop_3. Every cluster has role bench, a superuser (the
# move needs replication and pg_dump), whom Weir logs in as (md5 from userlist.txt) and who is
# also Weir's console user. Each source has
#   accounts (aid bigint PRIMARY KEY, balance bigint NOT NULL, filler text)
#   history  (id bigserial PRIMARY KEY, aid bigint NOT NULL, delta bigint NOT NULL,
#             ts timestamptz NOT NULL DEFAULT now())
#   branches (bid int PRIMARY KEY, balance bigint NOT NULL)       -- unsharded: shard 0
# with history_id_seq interleaved over the sources (increment 2, starting at 1 and 2) so ids
# stay unique over the shards. Weir has database shop on the two sources and shop_v2 on the
# four targets (per-shard dbname), both with accounts and history sharded by aid (bigint).
#
# Steps: ROWS accounts (balance 0) are loaded through Weir with one sharded COPY
# (psql \copy) and ten branches with one INSERT; then pgbench runs through Weir for DURATION
# seconds with -c CLIENTS -j JOBS -M MODE -l --progress=1 and the script
#   \set aid random(1, ROWS)
#   \set delta random(-5000, 5000)
#   BEGIN;
#   UPDATE accounts SET balance = balance + :delta WHERE aid = :aid;
#   INSERT INTO history (aid, delta) VALUES (:aid, :delta);
#   END;
# BEFORE seconds in, `RESHARD shop TO shop_v2` goes to Weir's admin console, and SHOW RESHARD
# is polled every POLL seconds (a progress line every few seconds and at each phase change)
# until phase done; pgbench then runs out its DURATION (at least AFTER seconds more).
#
# Checked afterwards, straight on the targets (each gets an empty
# `accounts_hp (aid bigint) PARTITION BY HASH (aid)` twin first): every accounts and history
# row on target i satisfies satisfies_hash_partition('accounts_hp', 4, i, aid); count(accounts)
# is ROWS, also through Weir (its fan-out over the new shards); sum(balance) = sum(delta);
# count(history) is pgbench's "number of transactions actually processed"; the branches are
# all on target 0; each target's history_id_seq is at or past its largest id; pgbench had no
# failed transaction, no aborted client and exited 0; the sources hold no replication slot and
# no weir% publication; pgbench ran AFTER seconds past done.
#
# Printed: load rate; the move's phases as seen by polling (schema, copy, streaming, cutover)
# and Weir's elapsed_s; the copy rate (rows_copied at the end of the copy / the copy phase's
# length by polling, beside Weir's own rows_per_sec); cutover_ms from SHOW RESHARD; pgbench's
# tps, average, p99 and longest transaction latency (from the -l logs, µs -> ms, with when it
# ended relative to done), the longest of the transactions that ended around the cutover
# (from POLL + 1 s before done to 1 s after: the stall clients saw), and the lowest one-second
# tps (--progress); every check; PASS or FAIL. Exits 1 when a check failed.
# Everything started is stopped and the temp dir removed on exit.
set -euo pipefail

# shellcheck source=benches/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROWS=${ROWS:-1000000}
CLIENTS=${CLIENTS:-8}
JOBS=${JOBS:-2}
MODE=${MODE:-prepared}
BEFORE=${BEFORE:-5}
AFTER=${AFTER:-5}
DURATION=${DURATION:-$((BEFORE + AFTER + 30 + ROWS / 25000))}
TARGET_CLUSTERS=${TARGET_CLUSTERS:-2}
POLL=${POLL:-0.5}
RESHARD_TIMEOUT=${RESHARD_TIMEOUT:-3600}
WEIR_LOG=${WEIR_LOG:-info}

# write_weir_toml's pool settings: CLIENTS clients, a few servers per shard for the move.
MAX_CLIENT_CONN=200
POOL_SIZE=$((CLIENTS + 4))
RESERVE_POOL_SIZE=0

SOURCES=2
TARGETS=4
BRANCHES=10
US=$'\x1f' # field separator of the console's unaligned output

SOURCE_PORTS=()
TARGET_CLUSTER_PORTS=()
WEIR_PORT=""
WEIR_PID=""
PGBENCH_PID=""
PGBENCH_STATUS=""
PGBENCH_GONE_AT=""
PLACEMENT=""
LOAD_LINE=""
CHECKS=() # "ok: ..." or "FAIL: ..." lines

now() { date +%s.%N; }

# elapsed FROM [TO]: TO (default now) - FROM in seconds, 2 decimals.
elapsed() { awk -v a="$1" -v b="${2:-$(now)}" 'BEGIN { printf "%.2f\n", b - a }'; }

# check ok|fail WHAT: records a check's outcome for the report.
check() {
    if [ "$1" = ok ]; then CHECKS+=("ok:   $2"); else CHECKS+=("FAIL: $2"); fi
}

# expect WHAT COMMAND...: check ok WHAT if COMMAND succeeds, else check fail WHAT.
expect() {
    local what=$1
    shift
    if "$@"; then check ok "$what"; else check fail "$what"; fi
}

# all_zero N...: true when every N is 0.
all_zero() {
    local n
    for n in "$@"; do [ "$n" = 0 ] || return 1; done
}

# The port of target shard K's cluster.
target_port() { echo "${TARGET_CLUSTER_PORTS[$(($1 % TARGET_CLUSTERS))]}"; }

# --- clusters --------------------------------------------------------------------------------

# Restarts the cluster NAME (started by start_cluster) with logical decoding on.
enable_logical() {
    local dir="$BENCH_DIR/$1"
    cat >>"$dir/postgresql.conf" <<CONF

# benches/reshard.sh: a source shard streams its changes to the targets
wal_level = logical
max_replication_slots = 10
max_wal_senders = 10
CONF
    (cd "$BENCH_DIR" && as_pg "$PG_BIN/pg_ctl" -D "$dir" -m fast -w -t 60 stop >/dev/null) ||
        die "PostgreSQL $1 did not stop"
    if ! (cd "$BENCH_DIR" && as_pg "$PG_BIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 \
        start >/dev/null); then
        tail -n 30 "$dir/server.log" >&2 || true
        die "PostgreSQL $1 did not restart with wal_level = logical"
    fi
}

create_role() {
    psql_at "$1" postgres -c "CREATE ROLE $BENCH_USER LOGIN SUPERUSER PASSWORD '$BENCH_PASSWORD'"
}

# The source tables; history_id_seq hands out ids I+1, I+1+SOURCES, ... on source I.
source_schema() {
    cat <<SQL
SET ROLE $BENCH_USER;
CREATE TABLE accounts (aid bigint PRIMARY KEY, balance bigint NOT NULL, filler text);
CREATE TABLE history (id bigserial PRIMARY KEY, aid bigint NOT NULL, delta bigint NOT NULL,
                      ts timestamptz NOT NULL DEFAULT now());
CREATE TABLE branches (bid int PRIMARY KEY, balance bigint NOT NULL);
ALTER SEQUENCE history_id_seq INCREMENT BY $SOURCES RESTART WITH $(($1 + 1));
SQL
}

create_clusters() {
    local i k
    for ((i = 0; i < SOURCES; i++)); do
        free_port
        SOURCE_PORTS+=("$FREE_PORT")
        start_cluster "source$i" "$FREE_PORT" 100
        enable_logical "source$i"
        create_role "$FREE_PORT"
        psql_at "$FREE_PORT" postgres -c "CREATE DATABASE shop OWNER $BENCH_USER"
        source_schema "$i" | psql_at "$FREE_PORT" shop -f -
    done
    for ((i = 0; i < TARGET_CLUSTERS; i++)); do
        free_port
        TARGET_CLUSTER_PORTS+=("$FREE_PORT")
        start_cluster "target$i" "$FREE_PORT" 100
        create_role "$FREE_PORT"
    done
    for ((k = 0; k < TARGETS; k++)); do
        psql_at "$(target_port "$k")" postgres -c "CREATE DATABASE shop_$k OWNER $BENCH_USER"
    done
}

# --- Weir ------------------------------------------------------------------------------------

# database_section NAME SHARD-LINES: a sharded [databases.NAME] with accounts and history.
database_section() {
    cat <<TOML
[databases.$1]
user = "$BENCH_USER"
shards = [
$2]
sharded_tables = [
  { table = "accounts", column = "aid", type = "bigint" },
  { table = "history", column = "aid", type = "bigint" },
]

TOML
}

write_weir_config() {
    local sources="" targets="" i k
    for ((i = 0; i < SOURCES; i++)); do
        sources+="  { primary = \"127.0.0.1:${SOURCE_PORTS[$i]}\", dbname = \"shop\" },"$'\n'
    done
    for ((k = 0; k < TARGETS; k++)); do
        targets+="  { primary = \"127.0.0.1:$(target_port "$k")\", dbname = \"shop_$k\" },"$'\n'
    done
    {
        database_section shop "$sources"
        database_section shop_v2 "$targets"
    } | write_weir_toml "benches/reshard.sh: shop on $SOURCES shards, shop_v2 on $TARGETS" \
        "$WEIR_PORT" "$RESERVE_POOL_SIZE" "admin_users = [\"$BENCH_USER\"]"
}

# psql_weir DB [psql args...]: psql as user bench through Weir, unaligned, quiet.
psql_weir() {
    local db=$1
    shift
    PGPASSWORD=$BENCH_PASSWORD PGCONNECT_TIMEOUT=10 "$PG_BIN/psql" -X -q -A -t -w \
        -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$WEIR_PORT" -U "$BENCH_USER" -d "$db" "$@"
}

# psql_console [psql args...]: psql as bench on Weir's admin console, unaligned with a header.
psql_console() {
    PGPASSWORD=$BENCH_PASSWORD PGCONNECT_TIMEOUT=10 "$PG_BIN/psql" -X -q -A -w \
        -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$WEIR_PORT" -U "$BENCH_USER" -d pgbouncer "$@"
}

# --- data ------------------------------------------------------------------------------------

load_data() {
    local file="$BENCH_DIR/accounts.tsv" started secs count values b
    log "generating $ROWS accounts"
    awk -v n="$ROWS" 'BEGIN { for (i = 1; i <= n; i++) printf "%d\t0\tfiller of account %20d\n", i, i }' \
        >"$file"
    log "loading $ROWS accounts through Weir (sharded COPY)"
    started=$(now)
    psql_weir shop -c "\\copy accounts (aid, balance, filler) FROM '$file'" \
        >"$BENCH_DIR/load.log" 2>&1 || {
        tail -n 20 "$BENCH_DIR/load.log" >&2
        die "loading the accounts through Weir failed"
    }
    secs=$(elapsed "$started")
    values=""
    for ((b = 1; b <= BRANCHES; b++)); do values+="${values:+, }($b, 0)"; done
    psql_weir shop -c "INSERT INTO branches (bid, balance) VALUES $values" \
        >>"$BENCH_DIR/load.log" 2>&1 || die "inserting the branches through Weir failed"
    count=$(psql_weir shop -c 'SELECT count(*) FROM accounts')
    [ "$count" = "$ROWS" ] || die "Weir counts $count accounts after the load, expected $ROWS"
    LOAD_LINE="loaded $ROWS accounts through Weir in ${secs}s ($(fdiv "$ROWS" "$secs" 0) rows/s)"
    log "$LOAD_LINE"
    local port
    for port in "${SOURCE_PORTS[@]}"; do
        psql_at "$port" shop -c 'VACUUM ANALYZE' -c 'CHECKPOINT'
    done
}

write_script() {
    cat >"$BENCH_DIR/transfer.sql" <<SQL
\\set aid random(1, $ROWS)
\\set delta random(-5000, 5000)
BEGIN;
UPDATE accounts SET balance = balance + :delta WHERE aid = :aid;
INSERT INTO history (aid, delta) VALUES (:aid, :delta);
END;
SQL
}

# Starts pgbench in the background (its own pid: env execs it); sets PGBENCH_PID.
start_pgbench() {
    log "pgbench -f transfer.sql -M $MODE -c $CLIENTS -j $JOBS -T $DURATION -> Weir shop"
    (cd "$BENCH_DIR" && exec env PGPASSWORD="$BENCH_PASSWORD" "$(pgbench_bin)" -n \
        -f "$BENCH_DIR/transfer.sql" -M "$MODE" -c "$CLIENTS" -j "$JOBS" -T "$DURATION" \
        -l --log-prefix="$BENCH_DIR/txlog" --progress=1 \
        -h 127.0.0.1 -p "$WEIR_PORT" -U "$BENCH_USER" shop) >"$BENCH_DIR/pgbench.out" 2>&1 &
    PGBENCH_PID=$!
    BENCH_PIDS+=("$PGBENCH_PID")
    PGBENCH_STARTED=$(now)
}

pgbench_running() { [ -n "$PGBENCH_PID" ] && kill -0 "$PGBENCH_PID" 2>/dev/null; }

# Waits for pgbench to end; sets PGBENCH_STATUS and PGBENCH_ENDED.
wait_pgbench() {
    local status=0
    wait "$PGBENCH_PID" || status=$?
    forget_pid "$PGBENCH_PID"
    PGBENCH_STATUS=$status
    # If the polling saw it gone already, that is when it ended.
    PGBENCH_ENDED=${PGBENCH_GONE_AT:-$(now)}
}

# --- the admin console -----------------------------------------------------------------------

declare -A RS=() # the last SHOW RESHARD row of shop: column -> value

# reshard_status: fills RS from SHOW RESHARD (the last row whose database is shop; RS is empty
# when there is none). Fails when the console cannot be asked.
reshard_status() {
    local out name value
    out=$(psql_console -F "$US" -P footer=off -c 'SHOW RESHARD') || return 1
    RS=()
    while IFS="$US" read -r name value; do
        [ -n "$name" ] && RS[$name]=$value
    done < <(awk -v FS="$US" -v OFS="$US" '
        NR == 1 { for (i = 1; i <= NF; i++) { h[i] = $i; if ($i == "database") d = i }; n = NF; next }
        d && $d == "shop" { for (i = 1; i <= n; i++) v[i] = $i; found = 1 }
        END { if (found) for (i = 1; i <= n; i++) print h[i], v[i] }' <<<"$out")
}

rs() { echo "${RS[$1]:-}"; }

progress_line() {
    printf 'reshard %7ss: phase %-9s tables %s/%s rows_copied %s (%s rows/s) lag %s bytes / %s ms eta %s s\n' \
        "$(elapsed "$RESHARD_STARTED")" "$(rs phase)" "$(rs tables_done)" "$(rs tables)" \
        "$(rs rows_copied)" "$(rs rows_per_sec)" "$(rs lag_bytes)" "$(rs lag_ms)" "${RS[eta_s]:--}" >&2
}

# Issues RESHARD and polls SHOW RESHARD until the run ends (done, failed, cancelled) or
# RESHARD_TIMEOUT passes. Records when each phase was first seen (PHASE_AT), the rows copied
# when the copy was first seen over (COPY_ROWS) and Weir's last rows_per_sec during the copy.
declare -A PHASE_AT=()
run_reshard() {
    local out phase last="" last_print=0 t
    log "RESHARD shop TO shop_v2"
    out=$(psql_console -c 'RESHARD shop TO shop_v2' 2>&1) ||
        die "RESHARD was refused: $out"
    RESHARD_STARTED=$(now)
    COPY_ROWS=""
    COPY_WEIR_RATE=""
    while :; do
        t=$(now)
        if ! reshard_status; then
            warn "SHOW RESHARD failed"
        elif [ -z "$(rs phase)" ]; then
            warn "SHOW RESHARD has no row for shop"
        else
            phase=$(rs phase)
            [ -n "${PHASE_AT[$phase]:-}" ] || PHASE_AT[$phase]=$t
            if [ "$phase" = copy ]; then
                COPY_WEIR_RATE=$(rs rows_per_sec)
            elif [ -z "$COPY_ROWS" ] && [ -n "${PHASE_AT[copy]:-}" ]; then
                COPY_ROWS=$(rs rows_copied)
            fi
            if [ "$phase" != "$last" ] || [ "${t%.*}" -ge $((last_print + 5)) ]; then
                progress_line
                last=$phase
                last_print=${t%.*}
            fi
            case $phase in
            done | failed | cancelled) break ;;
            esac
        fi
        if [ -z "$PGBENCH_GONE_AT" ] && ! pgbench_running; then
            PGBENCH_GONE_AT=$t
            warn "pgbench ended before the move was done; raise DURATION"
        fi
        if awk -v a="$RESHARD_STARTED" -v b="$t" -v m="$RESHARD_TIMEOUT" 'BEGIN { exit !(b - a > m) }'; then
            RS[phase]=timeout
            break
        fi
        sleep "$POLL"
    done
    RESHARD_ENDED=$(now)
    [ -n "$COPY_ROWS" ] || COPY_ROWS=$(rs rows_copied)
}

# The seconds between the first sight of phase A and of the next phase seen after it, or "-".
phase_secs() {
    local a=$1 next
    [ -n "${PHASE_AT[$a]:-}" ] || {
        echo -
        return
    }
    for next in schema copy streaming cutover "done" failed cancelled; do
        [ "$next" != "$a" ] || continue
        if [ -n "${PHASE_AT[$next]:-}" ] &&
            awk -v a="${PHASE_AT[$a]}" -v b="${PHASE_AT[$next]}" 'BEGIN { exit !(b > a) }'; then
            elapsed "${PHASE_AT[$a]}" "${PHASE_AT[$next]}"
            return
        fi
    done
    echo -
}

# secs_or_unseen SECONDS: "1.23s", or "unseen" for "-" (a phase shorter than one poll).
secs_or_unseen() {
    if [ "$1" = - ]; then echo unseen; else echo "${1}s"; fi
}

# --- checks ----------------------------------------------------------------------------------

# Slots and weir% publications left on the sources (empty when none), waiting up to 15 s.
source_leftovers() {
    local i port left tries=0
    while :; do
        left=""
        for ((i = 0; i < SOURCES; i++)); do
            port=${SOURCE_PORTS[$i]}
            left+=$(psql_at "$port" shop -c "
                SELECT string_agg(x, ', ') FROM (
                    SELECT 'source$i slot ' || slot_name AS x FROM pg_replication_slots
                    UNION ALL
                    SELECT 'source$i publication ' || pubname FROM pg_publication
                    WHERE pubname LIKE 'weir%') AS l")
        done
        if [ -z "$left" ] || [ "$tries" -ge 30 ]; then
            echo "$left"
            return
        fi
        tries=$((tries + 1))
        sleep 0.5
    done
}

verify() {
    local k port line n bad bal h hbad delta maxid last br
    local accounts=0 misplaced=0 balance=0 history=0 hmisplaced=0 deltas=0 seq_bad="" branches=""
    for ((k = 0; k < TARGETS; k++)); do
        port=$(target_port "$k")
        psql_at "$port" "shop_$k" -c 'CREATE TABLE accounts_hp (aid bigint) PARTITION BY HASH (aid)'
        line=$(psql_at "$port" "shop_$k" -F ' ' -c "
            SELECT (SELECT count(*) FROM accounts),
                   (SELECT count(*) FROM accounts WHERE NOT satisfies_hash_partition(
                        'accounts_hp'::regclass, $TARGETS, $k, aid)),
                   (SELECT coalesce(sum(balance), 0) FROM accounts),
                   (SELECT count(*) FROM history),
                   (SELECT count(*) FROM history WHERE NOT satisfies_hash_partition(
                        'accounts_hp'::regclass, $TARGETS, $k, aid)),
                   (SELECT coalesce(sum(delta), 0) FROM history),
                   (SELECT coalesce(max(id), 0) FROM history),
                   (SELECT last_value FROM history_id_seq),
                   (SELECT count(*) FROM branches)")
        read -r n bad bal h hbad delta maxid last br <<<"$line"
        accounts=$((accounts + n))
        misplaced=$((misplaced + bad))
        balance=$((balance + bal))
        history=$((history + h))
        hmisplaced=$((hmisplaced + hbad))
        deltas=$((deltas + delta))
        [ "$last" -ge "$maxid" ] || seq_bad+=" shop_$k:$last<$maxid"
        branches+="${branches:+/}$br"
        PLACEMENT+="${PLACEMENT:+ }shop_$k=$n/$h"
    done
    expect "every row on the target hash partitioning picks: $misplaced of $accounts accounts and $hmisplaced of $history history rows misplaced" \
        all_zero "$misplaced" "$hmisplaced"
    expect "count(accounts) on the targets: $accounts, loaded $ROWS" [ "$accounts" = "$ROWS" ]
    n=$(psql_weir shop -c 'SELECT count(*) FROM accounts' 2>&1) || true
    expect "count(accounts) through Weir after the move: $n, loaded $ROWS" [ "$n" = "$ROWS" ]
    expect "sum(balance) = sum(history.delta) on the targets: $balance vs $deltas" \
        [ "$balance" = "$deltas" ]
    expect "count(history) on the targets: $history, pgbench processed $PB_TXNS transactions" \
        [ "$history" = "$PB_TXNS" ]
    expect "branches per target: $branches (all $BRANCHES on shop_0)" \
        [ "$branches" = "$BRANCHES/0/0/0" ]
    expect "history_id_seq at or past each target's largest id${seq_bad:+:$seq_bad}" \
        [ -z "$seq_bad" ]
    expect "pgbench: $PB_FAILED failed transactions, $PB_ABORTED aborted clients, exit status $PGBENCH_STATUS" \
        all_zero "$PB_FAILED" "$PB_ABORTED" "$PGBENCH_STATUS"
    line=$(source_leftovers)
    expect "no replication slot or weir% publication left on the sources${line:+: $line}" \
        [ -z "$line" ]
}

# --- report ----------------------------------------------------------------------------------

print_report() {
    local verdict=PASS line max_ms max_end p99 min_tps after_done done_at near_ms
    read -r max_ms max_end < <(awk '$3 ~ /^[0-9]+$/ && $3 + 0 > m { m = $3 + 0; t = $5 + $6 / 1e6 }
        END { printf "%.3f %.3f\n", m / 1000, t }' "$BENCH_DIR"/txlog.* 2>/dev/null || echo "- 0")
    read -r p99 _ < <(latency_percentile 99 "$BENCH_DIR"/txlog.*)
    min_tps=$(awk '/^progress: / { t = $4 + 0; if (min == "" || t < min) { min = t; at = $2 } }
        END { if (min == "") print "-"; else printf "%.1f (at %ss)\n", min, at }' "$BENCH_DIR/pgbench.out")
    done_at=${PHASE_AT[done]:-$RESHARD_ENDED}
    after_done=$(elapsed "$done_at" "$PGBENCH_ENDED")
    # The cutover ended between the last poll before done and done.
    near_ms=$(awk -v lo="$(awk -v d="$done_at" -v p="$POLL" 'BEGIN { printf "%.6f", d - p - 1 }')" \
        -v hi="$(awk -v d="$done_at" 'BEGIN { printf "%.6f", d + 1 }')" '
        $3 ~ /^[0-9]+$/ { t = $5 + $6 / 1e6; if (t >= lo && t <= hi && $3 + 0 > m) m = $3 + 0 }
        END { printf "%.3f\n", m / 1000 }' "$BENCH_DIR"/txlog.* 2>/dev/null || echo -)
    echo
    echo "online reshard of shop: $SOURCES shards -> $TARGETS shards (targets on $TARGET_CLUSTERS cluster(s)), $ROWS accounts, pgbench -M $MODE -c $CLIENTS -j $JOBS through Weir all along; $(nproc) CPUs"
    echo "PostgreSQL: $("$PG_BIN/postgres" --version 2>/dev/null) (fsync off); Weir: $("$WEIR_BIN" --version 2>/dev/null) (WEIR_WORKERS=${WEIR_WORKERS:-unset})"
    echo "$LOAD_LINE"
    echo
    echo "move: phase $(rs phase) after $(elapsed "$RESHARD_STARTED" "$RESHARD_ENDED")s by polling every ${POLL}s (Weir's elapsed_s: $(rs elapsed_s))"
    printf '  phases by polling: schema %s, copy %s, streaming %s, cutover %s\n' \
        "$(secs_or_unseen "$(phase_secs schema)")" "$(secs_or_unseen "$(phase_secs copy)")" \
        "$(secs_or_unseen "$(phase_secs streaming)")" "$(secs_or_unseen "$(phase_secs cutover)")"
    echo "  copy: $COPY_ROWS rows in $(secs_or_unseen "$(phase_secs copy)") = $(fdiv "$COPY_ROWS" "$(phase_secs copy)" 0) rows/s (Weir's rows_per_sec during the copy: ${COPY_WEIR_RATE:--})"
    echo "  cutover_ms (SHOW RESHARD): $(rs cutover_ms)"
    [ -z "$(rs error)" ] || echo "  error: $(rs error)"
    echo
    echo "pgbench: $PB_TXNS transactions, $PB_TPS tps, $PB_FAILED failed, $PB_ABORTED aborted clients, exit $PGBENCH_STATUS; ran ${after_done}s after done"
    echo "  latency: average ${PB_LAT} ms, p99 ${p99} ms, longest ${max_ms} ms (ended $(elapsed "$done_at" "$max_end")s from done)"
    echo "  longest around the cutover (ended from ${POLL}s + 1s before done to 1s after): ${near_ms} ms"
    echo "  lowest one-second tps: $min_tps"
    echo "  placement on the targets (accounts/history): $PLACEMENT"
    echo
    echo "checks:"
    for line in "${CHECKS[@]}"; do
        echo "  $line"
        [[ $line != FAIL* ]] || verdict=FAIL
    done
    print_notes
    echo
    echo "$verdict"
    [ "$verdict" = PASS ]
}

main() {
    local line done_at
    check_words MODE "$MODE" simple extended prepared
    [[ $ROWS =~ ^[1-9][0-9]*$ ]] || die "ROWS must be a positive integer"
    [[ $CLIENTS =~ ^[1-9][0-9]*$ ]] || die "CLIENTS must be a positive integer"
    [[ $DURATION =~ ^[1-9][0-9]*$ ]] || die "DURATION must be a positive integer"
    [[ $BEFORE =~ ^[0-9]+$ && $AFTER =~ ^[0-9]+$ ]] || die "BEFORE and AFTER are whole seconds"
    [[ " 1 2 4 " == *" $TARGET_CLUSTERS "* ]] || die "TARGET_CLUSTERS must be 1, 2 or 4"
    bench_init "$CLIENTS"
    build_weir
    # The move runs pg_dump: the one that matches the servers.
    export PATH="$PG_BIN:$PATH"
    command -v pg_dump >/dev/null || die "pg_dump not found in $PG_BIN or on PATH"

    create_clusters
    free_port
    WEIR_PORT=$FREE_PORT
    write_userlist "$BENCH_DIR/userlist.txt"
    write_weir_config
    start_weir "$BENCH_DIR/weir.toml" "$WEIR_PORT"

    load_data
    write_script
    start_pgbench
    sleep "$BEFORE"
    pgbench_running || {
        tail -n 20 "$BENCH_DIR/pgbench.out" >&2
        die "pgbench ended in its first $BEFORE seconds"
    }
    run_reshard
    case $(rs phase) in
    done)
        check ok "the move ended in phase done"
        ;;
    *)
        check fail "the move ended in phase $(rs phase)${RS[error]:+: $(rs error)}"
        NOTES+=("Weir's log: $BENCH_DIR/weir.log (KEEP_TMP=1 keeps it); its last lines:")
        while IFS= read -r line; do NOTES+=("    $line"); done < <(tail -n 10 "$BENCH_DIR/weir.log")
        # The load has nothing left to show; end it (it then prints no totals).
        kill "$PGBENCH_PID" 2>/dev/null || true
        ;;
    esac
    if [ -n "$PGBENCH_GONE_AT" ]; then
        check fail "pgbench ended $(elapsed "$PGBENCH_GONE_AT" "$RESHARD_ENDED")s before the move did (raise DURATION)"
    fi
    log "waiting for pgbench to end (-T $DURATION, $(elapsed "$PGBENCH_STARTED")s so far)"
    wait_pgbench
    parse_pgbench "$BENCH_DIR/pgbench.out"
    [ "$PB_ABORTED" = 0 ] || {
        NOTES+=("pgbench's first errors:")
        while IFS= read -r line; do NOTES+=("    $line"); done < <(pgbench_errors "$BENCH_DIR/pgbench.out" 3)
    }
    kill -0 "$WEIR_PID" 2>/dev/null || check fail "Weir exited during the run; see its log (KEEP_TMP=1)"
    if [ "$(rs phase)" = "done" ]; then
        done_at=${PHASE_AT[done]}
        expect "pgbench ran at least ${AFTER}s after done ($(elapsed "$done_at" "$PGBENCH_ENDED")s)" \
            awk -v a="$done_at" -v b="$PGBENCH_ENDED" -v m="$AFTER" 'BEGIN { exit !(b - a >= m) }'
        verify
    fi
    print_report
}

main "$@"
