#!/usr/bin/env bash
# Quick start: a PostgreSQL with an `app` database and role, a weir.toml in front of it, and
# Weir running in the foreground on 127.0.0.1:6432.
#
#   bash scripts/quickstart.sh        # set up (idempotent) and run Weir; Ctrl-C stops Weir
#   bash scripts/quickstart.sh stop   # stop the dev PostgreSQL this script started
#
# PostgreSQL: one already answering on 127.0.0.1:5432 as `postgres` without a password is
# used as is. Otherwise a dev cluster is created in ./.weir-dev/pgdata (trust auth, loopback
# only, port 5432 or the next free one) and started; it keeps running after Weir exits.
# Everything this script writes is under ./.weir-dev/ (keep it out of git).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$PWD"
DEV_DIR="$REPO/.weir-dev"
STATE_FILE="$DEV_DIR/pg.env" # PG_PORT and PGDATA of the dev cluster, once created

log() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

pg_bindir() {
    if [ -x /usr/lib/postgresql/15/bin/initdb ]; then
        echo /usr/lib/postgresql/15/bin
    else
        # The newest installed major version.
        find /usr/lib/postgresql -maxdepth 3 -path '*/bin/initdb' 2>/dev/null |
            sort -V | tail -n 1 | xargs -r dirname
    fi
}

# initdb and postgres refuse to run as root; as root they run as the postgres OS user.
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

first_free_port() {
    local port=$1
    while port_busy "$port"; do
        port=$((port + 1))
    done
    echo "$port"
}

# psql as the postgres superuser over TCP, never prompting for a password.
psql_admin() {
    PGCONNECT_TIMEOUT=5 "$PG_BIN/psql" -X -q -A -t -w -v ON_ERROR_STOP=1 \
        -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres "$@"
}

stop_dev_cluster() {
    if [ -f "$STATE_FILE" ]; then
        # shellcheck source=/dev/null
        . "$STATE_FILE"
        log "stopping the dev PostgreSQL in $PGDATA"
        as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w stop || true
    else
        log "no dev PostgreSQL was created by this script"
    fi
}

# A data dir the postgres OS user can reach: ./.weir-dev/pgdata unless the checkout sits
# somewhere that user cannot enter (e.g. under /root).
choose_pgdata() {
    if [ "$(id -u)" -ne 0 ] || runuser -u postgres -- test -x "$DEV_DIR"; then
        echo "$DEV_DIR/pgdata"
    else
        log "the postgres OS user cannot enter $DEV_DIR; using /var/lib/postgresql/weir-dev/pgdata"
        echo /var/lib/postgresql/weir-dev/pgdata
    fi
}

create_dev_cluster() {
    PGDATA=$(choose_pgdata)
    PG_PORT=$(first_free_port 5432)
    log "creating a dev PostgreSQL in $PGDATA (port $PG_PORT, trust auth on 127.0.0.1 only)"
    mkdir -p "$PGDATA"
    chmod 700 "$PGDATA"
    [ "$(id -u)" -ne 0 ] || chown postgres: "$PGDATA"
    as_pg "$PG_BIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 --locale=C \
        --no-instructions >/dev/null
    cat >>"$PGDATA/postgresql.conf" <<CONF

# added by scripts/quickstart.sh
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = ''   # TCP only: no socket path length or permission surprises
max_connections = 200
CONF
    cat >"$PGDATA/pg_hba.conf" <<HBA
# written by scripts/quickstart.sh: a local dev cluster, trusted on loopback only
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
HBA
    printf 'PG_PORT=%s\nPGDATA=%s\n' "$PG_PORT" "$PGDATA" >"$STATE_FILE"
}

start_dev_cluster() {
    local logfile="$PGDATA/quickstart-server.log"
    if as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
        log "dev PostgreSQL already running on port $PG_PORT"
        return 0
    fi
    log "starting the dev PostgreSQL on port $PG_PORT (log: $logfile)"
    if ! as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$logfile" -w -t 60 start >/dev/null; then
        tail -n 30 "$logfile" >&2 || true
        die "PostgreSQL did not start; see $logfile"
    fi
}

ensure_postgres() {
    PG_PORT=5432
    if psql_admin -c 'SELECT 1' >/dev/null 2>&1; then
        log "using the PostgreSQL already answering on 127.0.0.1:5432"
        return 0
    fi
    if [ -f "$STATE_FILE" ]; then
        # shellcheck source=/dev/null
        . "$STATE_FILE"
    else
        create_dev_cluster
    fi
    start_dev_cluster
}

ensure_app_role_and_database() {
    log "ensuring role app (password app-secret, SCRAM) and database app"
    psql_admin \
        -c "SET password_encryption = 'scram-sha-256'" \
        -c "DO \$\$ BEGIN
              IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app') THEN
                CREATE ROLE app LOGIN;
              END IF;
            END \$\$" \
        -c "ALTER ROLE app LOGIN PASSWORD 'app-secret'"
    if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = 'app'")" != 1 ]; then
        psql_admin -c 'CREATE DATABASE app OWNER app'
    fi
}

write_weir_config() {
    log "writing $DEV_DIR/weir.toml (Weir on 127.0.0.1:$WEIR_PORT -> PostgreSQL 127.0.0.1:$PG_PORT)"
    cat >"$DEV_DIR/weir.toml" <<TOML
# Written by scripts/quickstart.sh on every run: copy it elsewhere before editing.
[weir]
listen_addr = "127.0.0.1"
listen_port = $WEIR_PORT
pool_mode = "transaction"
max_client_conn = 1000
default_pool_size = 20
auth_type = "scram-sha-256"
admin_users = ["admin"]

[users.app]
password = "app-secret"

[users.admin]
password = "admin-secret"

[databases.app]
host = "127.0.0.1"
port = $PG_PORT
dbname = "app"
TOML
}

print_try_lines() {
    cat <<EOF2

Weir is starting on 127.0.0.1:$WEIR_PORT (PostgreSQL behind it: 127.0.0.1:$PG_PORT). Try, in another terminal:

  PGPASSWORD=app-secret psql -h 127.0.0.1 -p $WEIR_PORT -U app app
  PGPASSWORD=app-secret pgbench -i -h 127.0.0.1 -p $WEIR_PORT -U app app
  PGPASSWORD=app-secret pgbench -S -c 50 -j 2 -T 10 -h 127.0.0.1 -p $WEIR_PORT -U app app
  PGPASSWORD=admin-secret psql -h 127.0.0.1 -p $WEIR_PORT -U admin pgbouncer -c 'SHOW POOLS'

Ctrl-C stops Weir. The dev PostgreSQL keeps running: bash scripts/quickstart.sh stop

EOF2
}

main() {
    mkdir -p "$DEV_DIR"
    PG_BIN=$(pg_bindir)
    if [ "${1:-}" = "stop" ]; then
        [ -n "$PG_BIN" ] || die "no PostgreSQL installation found"
        stop_dev_cluster
        exit 0
    fi

    bash scripts/test.sh --deps-only # the same system packages the tests need
    PG_BIN=$(pg_bindir)
    [ -n "$PG_BIN" ] || die "PostgreSQL is not installed and could not be installed"
    if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (https://rustup.rs)"

    ensure_postgres
    ensure_app_role_and_database

    WEIR_PORT=$(first_free_port 6432)
    [ "$WEIR_PORT" = 6432 ] || log "port 6432 is busy; Weir will listen on $WEIR_PORT"
    write_weir_config

    log "cargo build --release"
    cargo build --release
    print_try_lines
    exec "$REPO/target/release/weir" "$DEV_DIR/weir.toml"
}

main "$@"
