#!/usr/bin/env bash
# The queue writer's system calls per message while petrel accepts and
# relays: smtp-source sends to petrel (a new connection per message),
# petrel relays to smtp-sink through a plaintext smart host, and
# `strace -c` counts the calls of the writer thread alone until the queue
# is empty. The counts move with the group commits' sizes (a few % between
# runs), timings on a shared machine by far more: this is how a change to
# the WAL traffic (pwrite, pread, fdatasync) is measured.
#
# usage: bench/writer_io.sh [SESSIONS=20] [MESSAGES=1000] [SIZE=102400]
# PETREL=/path/to/other/petrel measures another build.
# needs: strace, smtp-source and smtp-sink (Debian package postfix;
# Postfix itself is not started), sqlite3
set -euo pipefail
cd "$(dirname "$0")/.."
sessions=${1:-20}
messages=${2:-1000}
size=${3:-102400}
port=${PORT:-25281}
sink_port=${SINK_PORT:-25282}

. bench/common.sh
extra_cleanup='kill "${tracer:-}" "${sink:-}" 2>/dev/null || true'
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
if ! "$petrel" check-config -c "$work/petrel.toml" >/dev/null 2>&1; then
    sed -i '/^max_connection_rate/d' "$work/petrel.toml"
fi
sink_user=()
if [ "$(id -u)" = 0 ]; then sink_user=(-u nobody); fi
smtp-sink "${sink_user[@]}" "127.0.0.1:$sink_port" 256 &
sink=$!
start_petrel "warn,petrel::cli=info,petrel::queue=info"

writer=""
for task in /proc/"$server"/task/*; do
    if [ "$(cat "$task/comm")" = queue-writer ]; then writer=${task##*/}; fi
done
if [ -z "$writer" ]; then
    echo "no queue-writer thread in petrel $server" >&2
    exit 1
fi
strace -c -o "$work/strace.txt" -p "$writer" 2>/dev/null &
tracer=$!
# strace attaches asynchronously; give it a moment before the load starts.
sleep 0.5
smtp-source -s "$sessions" -m "$messages" -l "$size" -f bench@localhost \
    -t 'sink@[127.0.0.1]' "127.0.0.1:$port"
for _ in $(seq 1 6000); do
    [ "$(sqlite3 "$work/data/queue.db" "SELECT count(*) FROM messages")" = 0 ] && break
    sleep 0.05
done
kill -INT "$tracer"
wait "$tracer" || true
tracer=""

# A clean stop logs the writer's commit counts.
kill "$server"
wait "$server" || true
server=""

echo "sessions=$sessions size=${size}B messages=$messages: queue writer system calls per message"
awk -v n="$messages" '$NF ~ /^(pwrite64|pread64|fdatasync|fcntl|futex)$/ {
    printf "  %-10s %8.2f\n", $NF, $4 / n
}' "$work/strace.txt"
grep -o "queue closed: .*" "$work/serve.log" || true
