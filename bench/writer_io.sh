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
start_relay "$sessions" "warn,petrel::cli=info,petrel::queue=info,petrel::store=info"
extra_cleanup+='; kill "${tracer:-}" 2>/dev/null || true'

writer=""
for task in /proc/"$server"/task/*; do
    # store-writer since the store/ layer; queue-writer in older builds.
    case "$(cat "$task/comm")" in
    store-writer | queue-writer) writer=${task##*/} ;;
    esac
done
if [ -z "$writer" ]; then
    echo "no store-writer thread in petrel $server" >&2
    exit 1
fi
strace -c -o "$work/strace.txt" -p "$writer" 2>/dev/null &
tracer=$!
# strace attaches asynchronously: the load starts once it has.
for _ in $(seq 1 100); do
    [ "$(awk '/^TracerPid:/ { print $2 }' "/proc/$writer/status")" != 0 ] && break
    sleep 0.05
done
smtp-source -s "$sessions" -m "$messages" -l "$size" -f bench@localhost \
    -t 'sink@[127.0.0.1]' "127.0.0.1:$port"
wait_for_empty_queue
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
