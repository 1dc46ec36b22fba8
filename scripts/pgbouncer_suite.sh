#!/usr/bin/env bash
# Runs PgBouncer's own pytest suite (test/test_*.py of a PgBouncer checkout) against Weir.
#
#   bash scripts/pgbouncer_suite.sh PGBOUNCER_CHECKOUT [PYTEST_ARGS...]
#
#   bash scripts/pgbouncer_suite.sh /opt/src/pgbouncer                      # whole suite, -n 2
#   bash scripts/pgbouncer_suite.sh /opt/src/pgbouncer test_admin.py -x     # one file
#   bash scripts/pgbouncer_suite.sh /opt/src/pgbouncer -k show_version -n 0 # one test, serial
#
# PGBOUNCER_CHECKOUT is the directory holding test/, include/ and pyproject.toml (the suite
# reads ../include/bouncer.h and ../build/test_config.h relative to test/). Nothing is
# downloaded except the suite's Python packages, which pip installs into a venv.
#
# What it does:
#   * copies test/, include/, pyproject.toml and build/test_config.h of the checkout into a
#     work dir owned by the `postgres` OS user (the suite writes into test/ — ssl certs,
#     __pycache__ — so the checkout itself is left untouched). If the checkout has no
#     build/test_config.h, one describing Weir's build is written (TLS yes; LDAP, PAM,
#     systemd, c-ares no);
#   * makes/reuses a venv there with /usr/bin/python3 (not a pyenv python: the tests run as
#     `postgres`, which cannot read /root) holding the suite's deps from pyproject.toml
#     (psycopg as psycopg[binary]);
#   * copies the weir binary there and writes a BOUNCER_EXE wrapper that execs it with the
#     arguments the suite passes (Weir reads the suite's ini unchanged and, like PgBouncer,
#     takes `--quiet` as "nothing on stderr" and writes `logfile`), minus any option
#     `weir --help` does not list, each dropped option noted on stderr. `--reboot` (online
#     restart), while weir lacks it, stops the weir serving that ini and exits 1, so the test
#     fails without leaving a weir behind that skews later tests;
#   * runs `pytest -n 2 -ra --tb=short` (the suite's pyproject sets a 30 s per-test timeout)
#     from test/ as `postgres` (when run as root; otherwise as the current user) with
#     /usr/lib/postgresql/<ver>/bin first on PATH, tees the output to $WORK/pytest.log (and a
#     JUnit XML report to $WORK/junit.xml), and prints the summary line. The exit status is
#     pytest's.
#
# Environment:
#   WEIR_BIN              weir binary (default: target/release/weir of this repo)
#   WEIR_SUITE_WORKDIR    work dir (default /var/tmp/weir-pgbouncer-suite); the venv in it is
#                         reused across runs, the suite copy is refreshed every run
#   WEIR_SUITE_JOBS       pytest-xdist workers (default 2; ignored if PYTEST_ARGS has -n)
#   PG_BINDIR             PostgreSQL bin dir (default: /usr/lib/postgresql/15/bin, else the
#                         newest /usr/lib/postgresql/*/bin)
#
# Idempotent, non-interactive; root-run is the normal case.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
    exit 2
fi

SRC="$(cd "$1" && pwd)" || die "no such directory: $1"
shift
[[ -d "$SRC/test" && -f "$SRC/test/utils.py" ]] || die "$SRC/test/utils.py not found (want a PgBouncer checkout)"
[[ -f "$SRC/include/bouncer.h" ]] || die "$SRC/include/bouncer.h not found"

WEIR_BIN="${WEIR_BIN:-$REPO/target/release/weir}"
[[ -x "$WEIR_BIN" ]] || die "weir binary $WEIR_BIN not found (cargo build --release, or set WEIR_BIN)"
WORK="${WEIR_SUITE_WORKDIR:-/var/tmp/weir-pgbouncer-suite}"
JOBS="${WEIR_SUITE_JOBS:-2}"
PYTHON=/usr/bin/python3
[[ -x "$PYTHON" ]] || die "$PYTHON not found"

if [[ -z "${PG_BINDIR:-}" ]]; then
    if [[ -x /usr/lib/postgresql/15/bin/initdb ]]; then
        PG_BINDIR=/usr/lib/postgresql/15/bin
    else
        PG_BINDIR="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)"
    fi
fi
[[ -x "${PG_BINDIR:-}/initdb" ]] || die "no PostgreSQL server found (set PG_BINDIR)"

# Who runs the tests: initdb refuses root, so root hands over to `postgres`.
if [[ $EUID -eq 0 ]]; then
    RUN_USER=postgres
    id -u "$RUN_USER" >/dev/null 2>&1 || die "OS user $RUN_USER does not exist"
    as_user() { runuser -u "$RUN_USER" -- "$@"; }
else
    RUN_USER="$(id -un)"
    as_user() { "$@"; }
fi
RUN_GROUP="$(id -gn "$RUN_USER")"

mkdir -p "$WORK"
chmod 755 "$WORK"

# --- the suite copy ---------------------------------------------------------------------------
SUITE="$WORK/suite"
log "copying the suite from $SRC to $SUITE"
rm -rf "$SUITE"
mkdir -p "$SUITE/build"
cp -a "$SRC/test" "$SRC/include" "$SUITE/"
[[ -f "$SRC/pyproject.toml" ]] && cp -a "$SRC/pyproject.toml" "$SUITE/"
# Leftovers a previous in-place run may have left in the checkout.
rm -rf "$SUITE/test/__pycache__" "$SUITE/test/ssl/TestCA1" "$SUITE/test/ssl/TestCA2"

if [[ -f "$SRC/build/test_config.h" ]]; then
    cp "$SRC/build/test_config.h" "$SUITE/build/test_config.h"
    log "using the checkout's build/test_config.h"
else
    # utils.get_build_feature() greps this file for `#define NAME`: the suite looks up
    # HAVE_LDAP (LDAP auth tests) and USUAL_LIBSSL_FOR_TLS (TLS tests). Weir has TLS
    # (rustls) and no LDAP/PAM/systemd/c-ares.
    cat >"$SUITE/build/test_config.h" <<'EOF'
/* Written by Weir's scripts/pgbouncer_suite.sh: the features of the pooler under test. */
#pragma once
#define USUAL_LIBSSL_FOR_TLS 1
#undef HAVE_LDAP
#undef HAVE_PAM
#undef USE_SYSTEMD
#undef USE_CARES
#define USE_EVDNS 1
EOF
    log "wrote a Weir build/test_config.h (TLS; no LDAP/PAM/systemd/c-ares)"
fi

# --- the weir binary and the BOUNCER_EXE wrapper ----------------------------------------------
mkdir -p "$WORK/bin"
# A copy, so a rebuild during the run cannot swap the binary and /work need not be readable.
cp -f "$WEIR_BIN" "$WORK/bin/weir.new" && mv -f "$WORK/bin/weir.new" "$WORK/bin/weir"
chmod 755 "$WORK/bin/weir"

# Options weir accepts, from its --help (e.g. "-q, --quiet", "--log-level <LOG_LEVEL>").
SUPPORTED_OPTS="$("$WORK/bin/weir" --help 2>&1 | grep -oE '(^|[ ,])--?[A-Za-z][A-Za-z0-9-]*' \
    | tr -d ' ,' | sort -u | tr '\n' ' ')"
log "weir options: $SUPPORTED_OPTS"

WRAPPER="$WORK/bin/bouncer_exe"
cat >"$WRAPPER" <<EOF
#!/usr/bin/env bash
# BOUNCER_EXE for PgBouncer's test suite (written by Weir's scripts/pgbouncer_suite.sh):
# execs weir with the suite's arguments, dropping options weir does not accept.
WEIR="$WORK/bin/weir"
SUPPORTED=" $SUPPORTED_OPTS"
EOF
cat >>"$WRAPPER" <<'EOF'
args=()
ini=
reboot=0
for a in "$@"; do
    case "$a" in
        --reboot|-R)
            # PgBouncer's online restart. Unless weir accepts it, see below.
            if [[ "$SUPPORTED" == *" $a "* ]]; then args+=("$a"); else reboot=1; fi
            ;;
        -*)
            opt="${a%%=*}"
            if [[ "$SUPPORTED" == *" $opt "* ]]; then
                args+=("$a")
            else
                echo "bouncer_exe: weir does not accept $a; dropped" >&2
            fi
            ;;
        *) args+=("$a"); ini="$a" ;;
    esac
done
if [[ $reboot == 1 ]]; then
    # Weir has no online restart. Starting a second weir would only fail to bind, and the
    # test would then wait for the old process to exit, time out, and leave it running (its
    # server connections skew later tests' pg.connection_count()). So: stop the weir that
    # serves this same ini (the old process), and fail like a reboot that did not come up.
    echo "bouncer_exe: weir has no --reboot (online restart); stopping the old weir for $ini and failing" >&2
    for proc in /proc/[0-9]*; do
        [[ "$(readlink "$proc/exe" 2>/dev/null)" == "$WEIR" ]] || continue
        cmd="$(tr '\0' '\n' <"$proc/cmdline" 2>/dev/null)" || continue
        if [[ -n "$ini" && $'\n'"$cmd"$'\n' == *$'\n'"$ini"$'\n'* ]]; then
            kill -TERM "${proc#/proc/}" 2>/dev/null || true
        fi
    done
    exit 1
fi
exec "$WEIR" "${args[@]}"
EOF
chmod 755 "$WRAPPER"

# --- a pytest plugin working around a CPython 3.11.0-3.11.4 bug -------------------------------
# ast.parse() can raise "SystemError: AST constructor recursion depth mismatch" (cpython
# gh-106905, fixed in 3.11.5; Debian 12's python3 is 3.11.2). pytest calls ast.parse while
# formatting a failure's traceback, so one such error is an INTERNALERROR that makes xdist
# abort the whole session. The plugin retries the parse and otherwise raises SyntaxError,
# which pytest and traceback already handle (they just show less source context).
mkdir -p "$WORK/plugins"
cat >"$WORK/plugins/weir_suite_compat.py" <<'PYEOF'
"""Loaded by Weir's scripts/pgbouncer_suite.sh with -p weir_suite_compat."""
import ast
import sys

if sys.version_info[:3] < (3, 11, 5) and not getattr(ast.parse, "_weir_wrapped", False):
    _parse = ast.parse

    def parse(*args, **kwargs):
        err = None
        for _ in range(3):
            try:
                return _parse(*args, **kwargs)
            except SystemError as e:
                if "recursion depth mismatch" not in str(e):
                    raise
                err = e
        raise SyntaxError(f"ast.parse failed: {err}")

    parse._weir_wrapped = True
    ast.parse = parse
PYEOF

# --- the venv ---------------------------------------------------------------------------------
VENV="$WORK/venv"
# The suite's test deps, from its pyproject.toml; psycopg needs a libpq, so take the wheel.
DEPS="$("$PYTHON" - "$SUITE/pyproject.toml" <<'EOF' 2>/dev/null || true
import sys
try:
    import tomllib
except ImportError:
    sys.exit(1)
with open(sys.argv[1], "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
print(" ".join("psycopg[binary]" if d.strip() == "psycopg" else d for d in deps))
EOF
)"
[[ -n "$DEPS" ]] || DEPS="pytest pytest-asyncio pytest-timeout pytest-xdist psycopg[binary] filelock"
STAMP="$VENV/.weir-suite-deps"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$DEPS" ]]; then
    log "reusing venv $VENV"
else
    log "creating venv $VENV with $PYTHON: $DEPS"
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
    # shellcheck disable=SC2086 # DEPS is a word list
    "$VENV/bin/python" -m pip install --quiet $DEPS
    printf '%s' "$DEPS" >"$STAMP"
fi

chown -R "$RUN_USER:$RUN_GROUP" "$WORK" 2>/dev/null || true
chmod -R a+rX "$WORK"
as_user test -w "$SUITE/test" -a -x "$WRAPPER" -a -x "$VENV/bin/python" \
    || die "$RUN_USER cannot use $WORK (pick a WEIR_SUITE_WORKDIR whose parents it can enter)"

# --- run ---------------------------------------------------------------------------------------
PYTEST_ARGS=("$@")
have_n=0
for a in "${PYTEST_ARGS[@]+"${PYTEST_ARGS[@]}"}"; do
    case "$a" in -n|-n[0-9]*|--numprocesses|--numprocesses=*) have_n=1 ;; esac
done
[[ $have_n -eq 1 ]] || PYTEST_ARGS=(-n "$JOBS" "${PYTEST_ARGS[@]+"${PYTEST_ARGS[@]}"}")

# Newer pytest-asyncio warns when asyncio_default_fixture_loop_scope is unset, and the suite's
# filterwarnings=error turns that into an INTERNALERROR. All the suite's async fixtures are
# function-scoped, so "function" is what "unset" meant.
EXTRA_INI=()
if ! grep -q 'asyncio_default_fixture_loop_scope' "$SUITE/pyproject.toml" 2>/dev/null; then
    EXTRA_INI=(-o asyncio_default_fixture_loop_scope=function)
fi

OUT="$WORK/pytest.log"
log "running PgBouncer's suite against $WEIR_BIN as $RUN_USER (output: $OUT)"
set +e
(
    cd "$SUITE/test"
    as_user env -u PYTHONHOME -u VIRTUAL_ENV \
        HOME="$WORK" \
        PATH="$PG_BINDIR:$VENV/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin" \
        BOUNCER_EXE="$WRAPPER" \
        PYTHONPATH="$WORK/plugins" \
        COLUMNS="${COLUMNS:-250}" \
        NO_COLOR=1 \
        "$VENV/bin/python" -m pytest -p no:cacheprovider -p weir_suite_compat -ra --tb=short \
        --junitxml="$WORK/junit.xml" \
        "${EXTRA_INI[@]+"${EXTRA_INI[@]}"}" "${PYTEST_ARGS[@]}"
) 2>&1 | tee "$OUT"
rc=${PIPESTATUS[0]}
set -e

# Weir processes this run left behind (a test that timed out before its teardown stopped
# the pooler): exactly those running our copy of the binary, matched by executable path.
for proc in /proc/[0-9]*; do
    if [[ "$(readlink "$proc/exe" 2>/dev/null)" == "$WORK/bin/weir" ]]; then
        log "stopping leftover weir process ${proc#/proc/}"
        kill "${proc#/proc/}" 2>/dev/null || true
    fi
done

summary="$(grep -E '^=+ .*( in [0-9.]+s| in [0-9:]+).* =+$' "$OUT" | tail -n1 \
    | sed -E 's/^=+ //; s/ =+$//' || true)"
echo
echo "SUMMARY: ${summary:-no pytest summary line (exit status $rc); see $OUT}"
exit "$rc"
