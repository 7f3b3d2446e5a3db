#!/usr/bin/env bash
# A million queued messages without slowing inbound (issue #10): accepted
# msg/s with 20 senders against an empty queue and against a queue of
# RECIPIENTS (default 1,000,000: 99 % deferred an hour to a tempfailing
# destination, 1 % due now at a destination that refuses connections, so
# the scheduler claims and backs off while mail comes in), alternately,
# ROUNDS times each. The filled queue's claim, back-off, list, summary and
# view timings come first (cargo bench --bench scale).
#
# usage: bench/scale.sh [RECIPIENTS=1000000] [ROUNDS=2] [MESSAGES=20000]
# needs: smtp-source (Debian package postfix; Postfix is not started),
#        dnsmasq (Debian package dnsmasq-base), on loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
recipients=${1:-1000000}
rounds=${2:-2}
messages=${3:-20000}
port=${PORT:-25252}
dns_port=${DNS_PORT:-25353}

. bench/common.sh
cargo build --release --benches --quiet
filler=$(find target/release/deps -maxdepth 1 -name 'scale-*' -type f -executable | head -1)

# good.example and tarpit.example: MX on 127.0.0.1, where nothing listens
# on port 9 (connection refused: a tempfailing destination).
dnsmasq --keep-in-foreground --port="$dns_port" --listen-address=127.0.0.1 \
    --bind-interfaces --no-resolv --no-hosts \
    --mx-host=good.example,mx.example.test --mx-host=tarpit.example,mx.example.test \
    --address=/mx.example.test/127.0.0.1 --pid-file="$work/dnsmasq.pid" \
    >"$work/dnsmasq.log" 2>&1 &
extra_cleanup="kill $! 2>/dev/null || true"

run() { # run empty|full
    rm -rf "$work/data"
    if [ "$1" = full ]; then
        "$filler" "$recipients" "$work/data" >"$work/fill.log"
        if [ ! -s "$work/timings.txt" ]; then cp "$work/fill.log" "$work/timings.txt"; fi
    fi
    write_config <<TOML
[aliases]
"postmaster@localhost" = "sink@localhost"
[relay]
trusted_networks = ["127.0.0.0/8"]
[limits]
max_sessions_per_ip = 30
[dns]
nameservers = ["127.0.0.1:$dns_port"]
[delivery]
port = 9
allowed_networks = ["127.0.0.0/8"]
TOML
    echo 'Quiet-Lantern-Bench-42!' |
        "$petrel" user add sink@localhost --password-stdin -c "$work/petrel.toml" >/dev/null
    start_petrel "${RUST_LOG:-warn,petrel::cli=info}"
    local start end
    start=$(date +%s.%N)
    smtp-source -s 20 -m "$messages" -l 1024 -f bench@localhost -t sink@localhost "127.0.0.1:$port"
    end=$(date +%s.%N)
    kill -TERM "$server"
    wait "$server" || true
    server=""
    awk -v n="$messages" -v s="$start" -v e="$end" -v q="$1" \
        'BEGIN { printf "%-5s queue: %d messages in %.2f s = %.0f msg/s\n", q, n, e - s, n / (e - s) }'
}

for round in $(seq 1 "$rounds"); do
    run empty
    run full
done
echo "--- the filled queue ($recipients recipients), from benches/scale.rs:"
grep -v '^filled' "$work/timings.txt"
