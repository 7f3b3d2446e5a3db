#!/usr/bin/env bash
# Accept and relay: smtp-source sends to petrel (a new connection per
# message) while petrel relays everything to Postfix's smtp-sink through a
# plaintext smart host. Reports the accepted msg/s (while smtp-source runs)
# and the server's CPU time per message, counted from petrel's start until
# the queue is empty (user + system, all threads, from /proc/PID/stat).
# A second line splits the machine's CPU time while smtp-source ran: what
# smtp-source itself used, what petrel used then, and petrel's after it.
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
start_relay "$sessions" "${RUST_LOG:-warn,petrel::cli=info,petrel::delivery::worker=info}"
if [ -n "${ACCEPT_ONLY:-}" ]; then kill -STOP "$sink"; fi

ticks=$(getconf CLK_TCK)
cpu_seconds() { awk -v t="$ticks" '{ printf "%.3f", ($14 + $15) / t }' "/proc/$server/stat"; }

# The machine's CPU time while smtp-source ran, and petrel's after it
# ($1: petrel's CPU seconds when the queue was empty; none if not waited).
print_cpu_split() {
    local source_user source_system
    read -r source_user source_system <"$work/source.time"
    awk -v s="$start" -v a="$accepted" -v cores="$(nproc)" -v su="$source_user" \
        -v ss="$source_system" -v c0="$cpu_at_start" -v c1="$cpu_at_accepted" -v c2="${1:-}" 'BEGIN {
        printf "while accepting (%.2fs, %.2f CPU-s on %d cores): smtp-source %.2fs, petrel %.2fs",
            a - s, cores * (a - s), cores, su + ss, c1 - c0
        if (c2 != "") printf "; petrel after: %.2fs", c2 - c1
        printf "\n"
    }'
}

start=$(date +%s.%N)
cpu_at_start=$(cpu_seconds)
# bash's `time` writes smtp-source's own CPU time (user, system) to the
# group's stderr, a file here; smtp-source's stderr stays ours (fd 3).
TIMEFORMAT='%U %S'
{ time smtp-source -s "$sessions" -m "$messages" -l "$size" -f bench@localhost \
    -t 'sink@[127.0.0.1]' "127.0.0.1:$port" 2>&3; } 3>&2 2>"$work/source.time"
accepted=$(date +%s.%N)
cpu_at_accepted=$(cpu_seconds)
if [ -n "${ACCEPT_ONLY:-}" ]; then
    awk -v n="$messages" -v s="$start" -v a="$accepted" -v sess="$sessions" -v size="$size" 'BEGIN {
        printf "sessions=%d size=%dB messages=%d accepted=%.0f msg/s (accept only, nothing relayed)\n",
            sess, size, n, n / (a - s)
    }'
    print_cpu_split
    exit 0
fi
wait_for_empty_queue
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
print_cpu_split "$cpu"
