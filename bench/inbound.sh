#!/usr/bin/env bash
# Inbound throughput: how many messages per second petrel accepts (and
# commits to disk) from concurrent SMTP sessions while it also delivers
# them into a local Maildir, and how many commits the group-commit writer
# needed to store them.
#
# usage: bench/inbound.sh [SESSIONS=20] [MESSAGES=5000] [SIZE=1024]
# needs: smtp-source (Debian package postfix; Postfix itself is not started)
set -euo pipefail
cd "$(dirname "$0")/.."
sessions=${1:-20}
messages=${2:-5000}
size=${3:-1024}
port=${PORT:-25251}

. bench/common.sh
write_config <<TOML
[aliases]
"postmaster@localhost" = "sink@localhost"
[relay]
trusted_networks = ["127.0.0.0/8"]
[limits]
max_sessions_per_ip = $((sessions + 5))
TOML
# A real mailbox: petrel delivers into it while it accepts, as in real use.
echo 'Quiet-Lantern-Bench-42!' |
    "$petrel" user add sink@localhost --password-stdin -c "$work/petrel.toml" >/dev/null
start_petrel "${RUST_LOG:-warn,petrel::queue=info,petrel::store=info,petrel::cli=info}"

start=$(date +%s.%N)
smtp-source -s "$sessions" -m "$messages" -l "$size" -f bench@localhost -t sink@localhost "127.0.0.1:$port"
end=$(date +%s.%N)
kill -TERM $server
wait $server || true

stats=$(grep -o "queue closed: .*" "$work/serve.log" || true)
queued=$(echo "$stats" | sed -n 's/queue closed: \([0-9]*\) messages.*/\1/p')
commits=$(echo "$stats" | sed -n 's/.* stored in \([0-9]*\) commits.*/\1/p')
delivered=$(find "$work/data/mail/localhost/sink/new" -type f | wc -l)
awk -v n="$queued" -v s="$start" -v e="$end" -v c="$commits" -v sess="$sessions" -v size="$size" 'BEGIN {
    t = e - s
    printf "sessions=%d size=%dB messages=%d seconds=%.2f rate=%.0f msg/s commits=%d commits/message=%.3f\n",
        sess, size, n, t, n / t, c, c / n
}'
echo "delivered to the Maildir meanwhile: $delivered"
