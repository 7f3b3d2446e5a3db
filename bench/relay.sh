#!/usr/bin/env bash
# Accept and relay: smtp-source sends to petrel (a new connection per
# message) while petrel relays everything to Postfix's smtp-sink through a
# plaintext smart host. Reports the accepted msg/s (while smtp-source runs)
# and the server's CPU time per message, counted from petrel's start until
# the queue is empty (user + system, all threads, from /proc/PID/stat).
#
# usage: bench/relay.sh [SESSIONS=20] [MESSAGES=5000] [SIZE=1024]
# PETREL=/path/to/other/petrel measures another build.
# ACCEPT_ONLY=1 stops smtp-sink (SIGSTOP) before the load starts, so the
# few deliveries begun wait for its greeting and nothing else is relayed:
# it reports how fast petrel accepts when no relaying competes for the CPU.
# needs: smtp-source and smtp-sink (Debian package postfix; Postfix itself
# is not started), sqlite3
set -euo pipefail
cd "$(dirname "$0")/.."
sessions=${1:-20}
messages=${2:-5000}
size=${3:-1024}
port=${PORT:-25271}
sink_port=${SINK_PORT:-25272}

. bench/common.sh
# A stopped sink would ignore SIGTERM and keep its port.
extra_cleanup='kill -CONT "${sink:-}" 2>/dev/null || true; kill "${sink:-}" 2>/dev/null || true'
write_config <<TOML
[relay]
trusted_networks = ["127.0.0.0/8"]
[delivery]
smarthost = "127.0.0.1:$sink_port"
smarthost_tls = "none"
[limits]
max_sessions_per_ip = $((sessions + 5))
max_connection_rate = 0
TOML
# Releases before 0.2 have no connection rate limit (nor its key).
if ! "$petrel" check-config -c "$work/petrel.toml" >/dev/null 2>&1; then
    sed -i '/^max_connection_rate/d' "$work/petrel.toml"
fi
sink_user=()
if [ "$(id -u)" = 0 ]; then sink_user=(-u nobody); fi
smtp-sink "${sink_user[@]}" "127.0.0.1:$sink_port" 256 &
sink=$!
start_petrel "${RUST_LOG:-warn,petrel::cli=info,petrel::delivery::worker=info}"
if [ -n "${ACCEPT_ONLY:-}" ]; then kill -STOP "$sink"; fi

ticks=$(getconf CLK_TCK)
cpu_seconds() { awk -v t="$ticks" '{ printf "%.3f", ($14 + $15) / t }' "/proc/$server/stat"; }
count() { sqlite3 "$work/data/queue.db" "SELECT count(*) FROM messages"; }

start=$(date +%s.%N)
smtp-source -s "$sessions" -m "$messages" -l "$size" -f bench@localhost -t 'sink@[127.0.0.1]' "127.0.0.1:$port"
accepted=$(date +%s.%N)
if [ -n "${ACCEPT_ONLY:-}" ]; then
    awk -v n="$messages" -v s="$start" -v a="$accepted" -v sess="$sessions" -v size="$size" 'BEGIN {
        printf "sessions=%d size=%dB messages=%d accepted=%.0f msg/s (accept only, nothing relayed)\n",
            sess, size, n, n / (a - s)
    }'
    exit 0
fi
for _ in $(seq 1 6000); do
    [ "$(count)" = 0 ] && break
    sleep 0.05
done
emptied=$(date +%s.%N)
cpu=$(cpu_seconds)
sent=$(grep -c "status=sent" "$work/serve.log" || true)
if [ "$sent" != "$messages" ]; then
    echo "only $sent of $messages messages were relayed; see the log:" >&2
    grep -v "status=sent" "$work/serve.log" | tail -5 >&2
    exit 1
fi
awk -v n="$messages" -v s="$start" -v a="$accepted" -v e="$emptied" -v cpu="$cpu" \
    -v sess="$sessions" -v size="$size" 'BEGIN {
    printf "sessions=%d size=%dB messages=%d accepted=%.0f msg/s relayed-all-in=%.2fs cpu=%.2fs cpu/msg=%.3f ms\n",
        sess, size, n, n / (a - s), e - s, cpu, 1000 * cpu / n
}'
