#!/usr/bin/env bash
# Reply times of AUTH by kind of attempt (wrong main password, wrong app
# password with a known or unknown selector, unknown user, right app
# password) against a release build: every attempt costs one argon2id
# check of the same cost, so the times should not tell them apart.
#
#   bench/auth_timing.sh [ROUNDS]
#
# Loopback only. Needs python3.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-40}"
cargo build --release --quiet
binary="$PWD/target/release/petrel"
work=$(mktemp -d "${TMPDIR:-/tmp}/petrel-auth.XXXXXX")
# Below Linux's ephemeral range (32768 up), which clients' ports use.
smtps=$((26000 + RANDOM % 6000))
cat >"$work/petrel.toml" <<TOML
hostname = "bench.test"
data_dir = "$work/data"
[smtp]
listen = []
[submission]
listen = []
[smtps]
listen = ["127.0.0.1:$smtps"]
[domains]
local = ["localhost"]
[dns]
nameservers = ["127.0.0.1:9"]
[limits]
max_connection_rate = 0
[auth]
slowdown_after = 1000000
lockout_after = 1000000
TOML
config="$work/petrel.toml"
echo 'Quiet-Lantern-Bench-42!' | "$binary" -c "$config" user add alice@localhost --password-stdin >/dev/null
app=$("$binary" -c "$config" user app-password add alice@localhost --label bench | sed -n 's/^    //p')
RUST_LOG=error "$binary" -c "$config" serve 2>"$work/serve.log" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $smtps), 1).close()" 2>/dev/null && break
    sleep 0.1
done
python3 bench/auth_timing.py "$smtps" alice@localhost 'Quiet-Lantern-Bench-42!' "$app" "$rounds"
