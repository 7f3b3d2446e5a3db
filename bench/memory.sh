#!/usr/bin/env bash
# Peak memory of petrel under the loads an attacker can make (issue #8):
# 128 parallel wrong AUTHs, 50 parallel 20 MiB messages, 1000 idle
# connections; the memory of ordinary load (issue #10): 100 parallel
# senders of 1 KiB messages; and whether memory is given back (issue
# #24): 100 wrong AUTHs one after another must leave at most
# auth.max_parallel_checks (2 here) x 20 MiB more than before, or the
# scenario fails. Each scenario runs against a fresh server; with OLD (a
# petrel binary of an earlier build) both run alternately, ROUNDS times.
#
#   bench/memory.sh [OLD_BINARY] [ROUNDS] [SCENARIOS]
#
# Loopback only. Needs python3. Figures are from /proc/PID/status (VmHWM,
# VmRSS) and /proc/PID/smaps_rollup (Pss) sampled by bench/memory.py.
set -euo pipefail
cd "$(dirname "$0")/.."
old="${1:-}"
rounds="${2:-1}"
cargo build --release --quiet
new="$PWD/target/release/petrel"

run() { # run BINARY SCENARIO
    local binary=$1 scenario=$2 work
    work=$(mktemp -d "${TMPDIR:-/tmp}/petrel-mem.XXXXXX")
    # Below Linux's ephemeral range (32768 up): after a load run, thousands
    # of loopback connections may still hold ports there.
    local smtp=$((20000 + RANDOM % 6000)) smtps=$((26000 + RANDOM % 6000))
    cat >"$work/petrel.toml" <<TOML
hostname = "bench.test"
data_dir = "$work/data"
[smtp]
listen = ["127.0.0.1:$smtp"]
[submission]
listen = []
[smtps]
listen = ["127.0.0.1:$smtps"]
[domains]
local = ["localhost"]
[aliases]
"postmaster@localhost" = "alice@localhost"
[auth]
max_parallel_checks = 2
TOML
    echo 'Quiet-Lantern-Bench-42!' | "$binary" user add alice@localhost --password-stdin -c "$work/petrel.toml" >/dev/null
    RUST_LOG=error "$binary" serve -c "$work/petrel.toml" 2>"$work/serve.log" &
    local server=$!
    local ready=""
    for _ in $(seq 1 100); do
        if python3 -c "import socket; socket.create_connection(('127.0.0.1', $smtps), 1).close()" 2>/dev/null; then
            ready=1
            break
        fi
        sleep 0.1
    done
    if [ -z "$ready" ]; then
        echo "petrel did not start; its log:" >&2
        cat "$work/serve.log" >&2
        kill -TERM $server 2>/dev/null || true
        rm -rf "$work"
        exit 1
    fi
    printf '%-4s ' "$3"
    if ! CHECKS=2 python3 bench/memory.py "$scenario" "$server" "$smtp" "$smtps"; then
        failed=1
        # Keep what the server said: the work directory goes next.
        echo "the $scenario run failed; the server's log:" >&2
        cat "$work/serve.log" >&2
    fi
    kill -TERM $server
    wait $server 2>/dev/null || true
    rm -rf "$work"
}

failed=""
for scenario in ${3:-auth data idle senders sequential}; do
    for _ in $(seq 1 "$rounds"); do
        if [ -n "$old" ]; then run "$old" "$scenario" old; fi
        run "$new" "$scenario" new
    done
done
[ -z "$failed" ]
