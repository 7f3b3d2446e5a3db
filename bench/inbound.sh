#!/usr/bin/env bash
# Inbound throughput: how many messages per second petrel accepts (and
# commits to disk) from concurrent SMTP sessions, and how many commits the
# group-commit writer needed for them.
#
# usage: bench/inbound.sh [SESSIONS=20] [MESSAGES=5000] [SIZE=1024]
# needs: smtp-source (Debian package postfix; Postfix itself is not started)
set -euo pipefail
cd "$(dirname "$0")/.."
sessions=${1:-20}
messages=${2:-5000}
size=${3:-1024}
port=${PORT:-25251}

cargo build --release --quiet
work=$(mktemp -d "${TMPDIR:-/tmp}/petrel-bench.XXXXXX")
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
cat >"$work/petrel.toml" <<TOML
hostname = "bench.test"
data_dir = "$work/data"
[smtp]
listen = ["127.0.0.1:$port"]
[submission]
listen = []
[smtps]
listen = []
[domains]
local = ["localhost"]
[aliases]
"sink@localhost" = "postmaster@localhost"
"postmaster@localhost" = "root@localhost"
[relay]
trusted_networks = ["127.0.0.0/8"]
[limits]
max_sessions_per_ip = $((sessions + 5))
TOML
RUST_LOG=${RUST_LOG:-warn,petrel::queue=info,petrel::cli=info} \
    target/release/petrel serve -c "$work/petrel.toml" 2>"$work/serve.log" &
server=$!
for _ in $(seq 1 100); do
    grep -q "petrel ready" "$work/serve.log" && break
    sleep 0.1
done

start=$(date +%s.%N)
smtp-source -s "$sessions" -m "$messages" -l "$size" -f bench@localhost -t sink@localhost "127.0.0.1:$port"
end=$(date +%s.%N)
kill -TERM $server
wait $server || true

queued=$(sqlite3 "$work/data/queue.db" 'SELECT count(*) FROM messages')
stats=$(grep -o "queue closed: .*" "$work/serve.log" || true)
commits=$(echo "$stats" | sed -n 's/.* in \([0-9]*\) commits.*/\1/p')
awk -v n="$queued" -v s="$start" -v e="$end" -v c="$commits" -v sess="$sessions" -v size="$size" 'BEGIN {
    t = e - s
    printf "sessions=%d size=%dB messages=%d seconds=%.2f rate=%.0f msg/s commits=%d commits/message=%.3f\n",
        sess, size, n, t, n / t, c, c / n
}'
