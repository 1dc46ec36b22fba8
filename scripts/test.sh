#!/usr/bin/env bash
# Weir's test command: installs what the tests need (PostgreSQL 15 server and client, build
# tools, and the client drivers tests/drivers.rs runs: Python asyncpg, psycopg, psycopg2 and
# SQLAlchemy, node-postgres, pgjdbc with a JDK, Ruby pg, Perl DBD::Pg), builds, and runs every
# test target.
#
#   bash scripts/test.sh                        # everything
#   bash scripts/test.sh --test harness_selftest # cargo test arguments are passed on
#   bash scripts/test.sh -- some_test_name       # ... and so is everything after `--`
#   bash scripts/test.sh --deps-only            # only install missing packages (system and drivers)
#
# WEIR_TEST_THREADS sets how many tests run at once (default 4: each test may start its own
# PostgreSQL cluster and Weir, and the machines have 2 cores).
#
# Non-interactive and idempotent: safe under CI=true with no stdin, as root or not.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '==> %s\n' "$*" >&2; }

# --- system packages -------------------------------------------------------------------------

have_pg_server() {
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

dpkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# Debian packages that are missing, by checking what each one provides.
missing_packages() {
    have_pg_server || echo postgresql
    { command -v psql && command -v pgbench; } >/dev/null 2>&1 || echo postgresql-client
    command -v clang >/dev/null 2>&1 || echo clang
    command -v pkg-config >/dev/null 2>&1 || echo pkg-config
    { command -v cc && command -v c++ && command -v make; } >/dev/null 2>&1 || echo build-essential
    command -v python3 >/dev/null 2>&1 || echo python3
    if command -v dpkg-query >/dev/null 2>&1; then
        dpkg_installed libclang-dev || echo libclang-dev
        dpkg_installed python3-pip || echo python3-pip
    fi
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        return 1
    fi
}

install_system_packages() {
    local missing
    missing=$(missing_packages | tr '\n' ' ')
    if [ -z "${missing// /}" ]; then
        log "system packages: all present"
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        log "WARNING: missing packages ($missing) and no apt-get; install them by hand"
        return 0
    fi
    log "installing missing system packages: $missing"
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086 # $missing is a list of package names
    if ! { as_root apt-get update -qq &&
        as_root apt-get install -y -qq --no-install-recommends $missing </dev/null; }; then
        log "WARNING: could not install $missing (not root and no passwordless sudo?)"
        return 0
    fi
}

# The harness runs PostgreSQL as the `postgres` OS user when it runs as root (initdb refuses
# root); the postgresql package normally creates that user.
ensure_postgres_user() {
    if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
        log "creating the postgres OS user"
        useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    fi
}

install_system_packages
ensure_postgres_user

# --- client drivers for tests/drivers.rs -----------------------------------------------------

# Debian packages for the driver runtimes, installed apart from the packages above so that a
# driver package apt cannot install never holds back PostgreSQL or the build tools.
missing_driver_packages() {
    { command -v javac && command -v java; } >/dev/null 2>&1 || echo default-jdk-headless
    [ -f /usr/share/java/postgresql.jar ] || echo libpostgresql-jdbc-java
    command -v node >/dev/null 2>&1 || echo nodejs
    # Ruby pg and Perl DBD::Pg bring their runtimes (ruby, perl) along.
    ruby -e 'require "pg"' >/dev/null 2>&1 || echo ruby-pg
    perl -MDBD::Pg -e 1 >/dev/null 2>&1 || echo libdbd-pg-perl
}

install_driver_packages() {
    local missing
    missing=$(missing_driver_packages | tr '\n' ' ')
    if [ -n "${missing// /}" ] && command -v apt-get >/dev/null 2>&1; then
        log "installing driver packages: $missing"
        export DEBIAN_FRONTEND=noninteractive
        # shellcheck disable=SC2086 # $missing is a list of package names
        { as_root apt-get update -qq &&
            as_root apt-get install -y -qq --no-install-recommends $missing </dev/null; } ||
            log "WARNING: could not install $missing; their driver tests will fail or skip"
    fi
    # Some nodejs builds bring npm along; Debian's does not.
    if command -v node >/dev/null 2>&1 && ! command -v npm >/dev/null 2>&1 &&
        command -v apt-get >/dev/null 2>&1; then
        as_root apt-get install -y -qq --no-install-recommends npm </dev/null ||
            log "WARNING: could not install npm"
    fi
}

# asyncpg, psycopg, psycopg2 and SQLAlchemy for the python3 on PATH (the one the tests run,
# which need not be Debian's, so not python3-psycopg2 from apt), pinned in
# tests/drivers/requirements.txt. A Debian python3 refuses a plain pip install (PEP 668).
install_python_drivers() {
    command -v python3 >/dev/null 2>&1 || return 0
    python3 -c 'import asyncpg, psycopg, psycopg2, sqlalchemy' >/dev/null 2>&1 && return 0
    log "pip install -r tests/drivers/requirements.txt"
    local pip=(python3 -m pip install --quiet --disable-pip-version-check
        --root-user-action=ignore -r tests/drivers/requirements.txt)
    "${pip[@]}" || "${pip[@]}" --break-system-packages ||
        log "WARNING: could not install the Python drivers; their tests will fail"
}

# node-postgres into tests/drivers/node_modules, as locked in tests/drivers/package-lock.json.
install_node_drivers() {
    command -v npm >/dev/null 2>&1 || return 0
    [ -d tests/drivers/node_modules/pg ] && return 0
    log "npm ci in tests/drivers"
    (cd tests/drivers && npm ci --no-audit --no-fund --loglevel=error) ||
        log "WARNING: npm ci failed; the node-postgres test will fail"
}

install_driver_packages
install_python_drivers
install_node_drivers

have_pg_server || log "WARNING: no /usr/lib/postgresql/*/bin/initdb; PostgreSQL tests will fail"

if [ "${1:-}" = "--deps-only" ]; then
    exit 0
fi

# --- build and test --------------------------------------------------------------------------

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo not found. Install Rust (https://rustup.rs) and make sure cargo is on PATH." >&2
    exit 127
fi

# Split our arguments into cargo's (before `--`) and the test binaries' (after it).
cargo_args=()
test_args=()
seen_separator=0
for arg in "$@"; do
    if [ "$seen_separator" -eq 0 ] && [ "$arg" = "--" ]; then
        seen_separator=1
    elif [ "$seen_separator" -eq 0 ]; then
        cargo_args+=("$arg")
    else
        test_args+=("$arg")
    fi
done

# Run every test target (library, binaries, integration tests) unless the caller picked some.
# Benchmarks are left out: they are criterion programs, built by clippy --all-targets and run
# with `cargo bench`.
targets=(--lib --bins --tests)
for arg in "${cargo_args[@]+"${cargo_args[@]}"}"; do
    case "$arg" in
    --lib | --bins | --bin | --bin=* | --tests | --test | --test=* | --benches | --bench | \
        --bench=* | --examples | --example | --example=* | --doc | --all-targets)
        targets=()
        ;;
    esac
done

threads="${WEIR_TEST_THREADS:-4}"

log "cargo build --bins"
cargo build --bins

log "cargo test ${targets[*]+"${targets[*]}"} ${cargo_args[*]+"${cargo_args[*]}"} -- --test-threads=$threads ${test_args[*]+"${test_args[*]}"}"
status=0
cargo test --no-fail-fast "${targets[@]+"${targets[@]}"}" "${cargo_args[@]+"${cargo_args[@]}"}" \
    -- --test-threads="$threads" "${test_args[@]+"${test_args[@]}"}" || status=$?
if [ "$status" -ne 0 ]; then
    log "cargo test failed with status $status"
fi
exit "$status"
