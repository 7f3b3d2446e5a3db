#!/usr/bin/env bash
# What the inbound checks cost: smtp-source sends to petrel's MX port from
# an address that is not trusted (a new connection per message), from a
# sender domain with SPF and DMARC records served by dnsmasq on loopback;
# petrel checks SPF at MAIL FROM and DMARC (and DKIM, when signed) at the
# end of DATA, adds Authentication-Results, and delivers into a Maildir.
# Run it with the checks on and off, alternately, and compare. Reports the
# accepted msg/s and the server's CPU time per message (user + system, all
# threads, from /proc/PID/stat, until the queue is empty).
#
# usage: bench/mailauth.sh on|off [SESSIONS=20] [MESSAGES=5000] [SIZE=1024]
# needs: smtp-source (Debian package postfix), dnsmasq, sqlite3
set -euo pipefail
cd "$(dirname "$0")/.."
checks=${1:?on or off}
sessions=${2:-20}
messages=${3:-5000}
size=${4:-1024}
port=${PORT:-25281}
dns_port=${DNS_PORT:-25283}

. bench/common.sh
extra_cleanup='[ -f "$work/dnsmasq.pid" ] && kill "$(cat "$work/dnsmasq.pid")" 2>/dev/null || true'
enabled=false
if [ "$checks" = on ]; then enabled=true; fi
write_config <<TOML
[dns]
nameservers = ["127.0.0.1:$dns_port"]
[delivery]
# The sender domain's MX is on loopback: sender verification must accept it.
allowed_networks = ["127.0.0.0/8"]
[limits]
# smtp-source reconnects faster than closed sessions are counted out.
max_sessions_per_ip = $((4 * sessions))
max_connection_rate = 0
[mail_auth]
enabled = $enabled
TOML
# TTLs as a real zone has them, so the resolver's cache works as in use.
dnsmasq --no-resolv --no-hosts --port "$dns_port" --listen-address 127.0.0.1 \
    --bind-interfaces --local=/example/ --local-ttl=300 --pid-file="$work/dnsmasq.pid" \
    --mx-host=bench.example,mx.bench.example,10 --host-record=mx.bench.example,127.0.0.1 \
    --txt-record=bench.example,"v=spf1 ip4:127.0.0.0/8 -all" \
    --txt-record=_dmarc.bench.example,"v=DMARC1; p=reject"
echo 'Quiet-Lantern-Bench-42!' |
    "$petrel" user add sink@localhost --password-stdin -c "$work/petrel.toml" >/dev/null
start_petrel "${RUST_LOG:-warn,petrel::cli=info,petrel::delivery::worker=info}"

ticks=$(getconf CLK_TCK)
cpu_seconds() { awk -v t="$ticks" '{ printf "%.3f", ($14 + $15) / t }' "/proc/$server/stat"; }
count() { sqlite3 "$work/data/queue.db" "SELECT count(*) FROM messages"; }

start=$(date +%s.%N)
smtp-source -s "$sessions" -m "$messages" -l "$size" -f bench@bench.example -t sink@localhost \
    "127.0.0.1:$port"
accepted=$(date +%s.%N)
for _ in $(seq 1 6000); do
    [ "$(count)" = 0 ] && break
    sleep 0.05
done
cpu=$(cpu_seconds)
delivered=$(find "$work/data/mail/localhost/sink/new" -type f | wc -l)
if [ "$delivered" != "$messages" ]; then
    echo "only $delivered of $messages messages were delivered; see the log:" >&2
    tail -5 "$work/serve.log" >&2
    exit 1
fi
checked=$( (grep -l "^Authentication-Results: bench.test" -r "$work/data/mail/localhost/sink/new" || true) | wc -l)
awk -v n="$messages" -v s="$start" -v a="$accepted" -v cpu="$cpu" -v checks="$checks" \
    -v checked="$checked" -v sess="$sessions" -v size="$size" 'BEGIN {
    printf "checks=%s sessions=%d size=%dB messages=%d accepted=%.0f msg/s cpu/msg=%.3f ms with-results-header=%d\n",
        checks, sess, size, n, n / (a - s), 1000 * cpu / n, checked
}'
