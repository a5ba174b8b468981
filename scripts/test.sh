#!/usr/bin/env bash
# The README's test command. Sets up what the suite needs (scripts/setup.sh), checks the code with
# ruff and mypy, starts a throwaway PostgreSQL server on a free port and runs the whole pytest suite;
# tests that use an evidence database run on SQLite and on that server (DR_TEST_POSTGRES_URL).
# Arguments go to pytest:  scripts/test.sh -k evidence -x
# DR_TEST_POSTGRES_URL set beforehand: that server is used and none is started.
# Tests run in parallel worker processes (pytest-xdist, --dist loadgroup): the tests that start labs
# of their own one at a time on one worker, the others beside them (tests/conftest.py says how they are
# grouped). DR_TEST_WORKERS=N sets how many workers (default 2: the suite is bound by the machine's two
# cores, and a starved test misses its deadlines), 0 runs them in this process. Labs, databases and
# ports are claimed per test, so workers never share one.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$repo"

say() { echo "test.sh: $*"; }
fail() {
    echo "test.sh: $*" >&2
    exit 2
}

bash scripts/setup.sh

# --- Static checks: run all of them, report at the end ---------------------------------------------
say "ruff check dr_orchestrator tests"
ruff_status=ok
.venv/bin/ruff check dr_orchestrator tests || ruff_status=FAILED
say "mypy dr_orchestrator"
mypy_status=ok
.venv/bin/mypy dr_orchestrator || mypy_status=FAILED

# --- A throwaway PostgreSQL server, removed on any exit --------------------------------------------
work="$(mktemp -d "${TMPDIR:-/tmp}/dr-test.XXXXXX")"
pg_dir="$work/pg"
pg_bin=""
as_postgres=()
cleanup() {
    local status=$?
    if [[ -n $pg_bin && -f $pg_dir/data/postmaster.pid ]]; then
        "${as_postgres[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate -w -t 30 stop >/dev/null 2>&1 ||
            kill -KILL "$(head -n 1 "$pg_dir/data/postmaster.pid")" 2>/dev/null || true
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

start_postgres() {
    pg_bin="$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin 2>/dev/null | sort -V | tail -n 1)"
    [[ -n $pg_bin && -x $pg_bin/initdb ]] ||
        fail "PostgreSQL server binaries were not found under /usr/lib/postgresql/*/bin; run scripts/setup.sh as root, or: sudo apt-get install postgresql"
    mkdir -p "$pg_dir"
    if [[ $EUID -eq 0 ]]; then
        # PostgreSQL refuses to run as root
        id postgres >/dev/null 2>&1 || fail "There is no 'postgres' user to run PostgreSQL as; reinstall the postgresql package."
        as_postgres=(runuser -u postgres --)
        chmod 755 "$work"
        chown postgres: "$pg_dir"
    fi
    "${as_postgres[@]}" "$pg_bin/initdb" -D "$pg_dir/data" -U postgres -A trust -E UTF8 --locale=C --no-sync \
        >"$work/initdb.log" 2>&1 || {
        cat "$work/initdb.log" >&2
        fail "initdb failed (its output is above)."
    }
    cat >>"$pg_dir/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$pg_dir'
max_connections = 200
# a throwaway server: durability buys nothing here
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
    local attempt port
    for attempt in 1 2 3 4 5; do
        port="$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
        # another process may take the port between the probe and the start: then try another
        if "${as_postgres[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/server.log" -o "-p $port" -w -t 60 start \
            >/dev/null 2>&1; then
            export DR_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:$port/postgres"
            say "PostgreSQL $("$pg_bin/postgres" -V | awk '{ print $3 }') on 127.0.0.1:$port (throwaway, $pg_dir)"
            return
        fi
        say "PostgreSQL did not start on port $port (attempt $attempt of 5)"
    done
    tail -n 20 "$pg_dir/server.log" >&2 || true
    fail "PostgreSQL could not be started (the end of its log is above)."
}

if [[ -n ${DR_TEST_POSTGRES_URL:-} ]]; then
    say "using the PostgreSQL server in DR_TEST_POSTGRES_URL"
else
    start_postgres
fi

# --- The suite -------------------------------------------------------------------------------------
# Keep compiled modules (and pytest's rewritten test modules): with PYTHONDONTWRITEBYTECODE set, every
# worker and every `dr` a test starts compiles them all again (a fifth of the CPU a `dr` command takes).
unset PYTHONDONTWRITEBYTECODE
color=()
[[ -t 1 ]] && color=(--color=yes)
workers="${DR_TEST_WORKERS:-2}"
parallel=()
((workers > 0)) && parallel=(-n "$workers" --dist loadgroup)
say "pytest ${parallel[*]} $*"
set +e
.venv/bin/pytest -ra --durations=10 "${color[@]}" "${parallel[@]}" "$@" 2>&1 | tee -i "$work/pytest.log"
pytest_status=${PIPESTATUS[0]}
set -e
summary="$(sed -e 's/\x1b\[[0-9;]*m//g' "$work/pytest.log" |
    grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)|no tests ran' |
    tail -n 1 | sed -E 's/^=+ //; s/ =+$//')"

echo
say "ruff: $ruff_status, mypy: $mypy_status, pytest: ${summary:-no summary (exit $pytest_status)}"
if ((pytest_status == 5)); then
    say "FAILED: pytest ran no tests${*:+ with the arguments: $*}."
    exit 5
fi
if ((pytest_status != 0)); then
    say "FAILED (pytest exit code $pytest_status)"
    exit "$pytest_status"
fi
if [[ $ruff_status != ok || $mypy_status != ok ]]; then
    say "FAILED: the static checks found problems (above)"
    exit 1
fi
say "PASSED in ${SECONDS}s"
