#!/usr/bin/env bash
# Delivery throughput: how fast petrel empties its queue into a loopback
# SMTP sink (Postfix's smtp-sink) through a plaintext smart host.
#
# Phase 1 fills the queue while the sink is down (every message is tried
# once and deferred for an hour). Phase 2 starts the sink, runs
# `petrel queue retry --all` and times until the queue is empty.
#
# usage: bench/delivery.sh [MESSAGES=5000] [SIZE=1024] [WORKERS=8]
# needs: smtp-source and smtp-sink (Debian package postfix; Postfix itself
# is not started), sqlite3
set -euo pipefail
cd "$(dirname "$0")/.."
messages=${1:-5000}
size=${2:-1024}
workers=${3:-8}
port=${PORT:-25261}
sink_port=${SINK_PORT:-25262}

. bench/common.sh
extra_cleanup='kill "${sink:-}" 2>/dev/null || true'
write_config <<TOML
[relay]
trusted_networks = ["127.0.0.0/8"]
[delivery]
smarthost = "127.0.0.1:$sink_port"
smarthost_tls = "none"
workers = $workers
[queue]
retry_min = "1h"
retry_max = "1h"
delay_warning = "0"
[limits]
max_sessions_per_ip = 64
max_connection_rate = 0
TOML
start_petrel "${RUST_LOG:-warn,petrel::cli=info,petrel::delivery::worker=info}"

db="$work/data/queue.db"
count() { sqlite3 "$db" "$1"; }
# Recipients at a domain literal need no DNS; the smart host is an address.
smtp-source -s 20 -m "$messages" -l "$size" -f bench@localhost -t 'sink@[127.0.0.1]' "127.0.0.1:$port"
while [ "$(count "SELECT count(*) FROM recipients WHERE attempts = 0 OR status = 'delivering'")" != 0 ]; do
    sleep 0.2
done
queued=$(count "SELECT count(*) FROM messages")

sink_user=()
if [ "$(id -u)" = 0 ]; then sink_user=(-u nobody); fi
smtp-sink "${sink_user[@]}" "127.0.0.1:$sink_port" 256 &
sink=$!
sleep 0.3
start=$(date +%s.%N)
"$petrel" queue retry --all -c "$work/petrel.toml" >/dev/null
while [ "$(count "SELECT count(*) FROM messages")" != 0 ]; do
    sleep 0.05
done
end=$(date +%s.%N)
sent=$(grep -c "status=sent" "$work/serve.log" || true)
if [ "$sent" != "$queued" ]; then
    echo "only $sent of $queued messages were sent; see the log:" >&2
    grep -v "status=sent" "$work/serve.log" | tail -5 >&2
    exit 1
fi
awk -v n="$queued" -v s="$start" -v e="$end" -v w="$workers" -v size="$size" 'BEGIN {
    t = e - s
    printf "workers=%d size=%dB messages=%d seconds=%.2f rate=%.0f msg/s (queue to loopback smtp-sink)\n", w, size, n, t, n / t
}'
