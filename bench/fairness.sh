#!/usr/bin/env bash
# Fair delivery (issue #10): 2,000 messages to a healthy remote domain and
# 2,000 to a local Maildir, with and without 10,000 queued first for a
# dead destination (a blackhole: accepts connections, never answers).
# Reports how long the healthy and local mail take in each case, and how
# many connections the blackhole got; alternately, ROUNDS times each.
#
# usage: bench/fairness.sh [ROUNDS=2]
# needs: smtp-source and smtp-sink (Debian package postfix; Postfix is not
#        started), dnsmasq (dnsmasq-base), python3; loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
port=${PORT:-25254}
mx_port=${MX_PORT:-25255}
dns_port=${DNS_PORT:-25356}

. bench/common.sh
sqlite() { python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute(sys.argv[2]).fetchone()[0])" "$@"; }

dnsmasq --keep-in-foreground --port="$dns_port" --listen-address=127.0.0.1 \
    --bind-interfaces --no-resolv --no-hosts \
    --mx-host=good.example,mx.good.example --address=/mx.good.example/127.0.0.1 \
    --mx-host=dead.example,mx.dead.example --address=/mx.dead.example/127.0.0.2 \
    >"$work/dnsmasq.log" 2>&1 &
dns=$!
sink_user=()
if [ "$(id -u)" = 0 ]; then sink_user=(-u nobody); fi # smtp-sink refuses to run as root
smtp-sink "${sink_user[@]}" "127.0.0.1:$mx_port" 1000 >/dev/null 2>&1 &
sink=$!
python3 - "$mx_port" "$work/blackhole.count" <<'PY' &
import socket, sys
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.2", int(sys.argv[1])))
listener.listen(1000)
held = []
while len(held) < 100000:
    conn, _ = listener.accept()
    held.append(conn)
    with open(sys.argv[2], "w") as out:
        out.write(str(len(held)))
PY
blackhole=$!
extra_cleanup="kill $dns $sink $blackhole 2>/dev/null || true"

run() { # run with-dead|without-dead
    rm -rf "$work/data"
    # The blackhole counts every connection since the bench started.
    local before=0
    [ -f "$work/blackhole.count" ] && before=$(cat "$work/blackhole.count")
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
port = $mx_port
allowed_networks = ["127.0.0.0/8"]
TOML
    echo 'Quiet-Lantern-Bench-42!' |
        "$petrel" user add sink@localhost --password-stdin -c "$work/petrel.toml" >/dev/null
    start_petrel "${RUST_LOG:-warn,petrel::cli=info}"
    if [ "$1" = with-dead ]; then
        smtp-source -s 20 -m 10000 -l 1024 -f bench@localhost -t user@dead.example "127.0.0.1:$port"
    fi
    local start end left
    start=$(date +%s.%N)
    smtp-source -s 10 -m 2000 -l 1024 -f bench@localhost -t user@good.example "127.0.0.1:$port" &
    smtp-source -s 10 -m 2000 -l 1024 -f bench@localhost -t sink@localhost "127.0.0.1:$port" &
    wait %-1 %-2 2>/dev/null || wait
    for _ in $(seq 1 600); do
        left=$(sqlite "$work/data/queue.db" \
            "SELECT count(*) FROM recipients WHERE destination IN ('mx:good.example', 'local')")
        [ "$left" = 0 ] && break
        sleep 0.1
    done
    end=$(date +%s.%N)
    local held=0
    [ -f "$work/blackhole.count" ] && held=$(($(cat "$work/blackhole.count") - before))
    kill -TERM "$server"
    wait "$server" || true
    server=""
    awk -v s="$start" -v e="$end" -v q="$1" -v h="$held" -v l="$left" \
        'BEGIN { printf "%-12s 2000 remote + 2000 local delivered in %.2f s (left: %s; blackhole connections: %s)\n", q, e - s, l, h }'
}

for round in $(seq 1 "$rounds"); do
    run without-dead
    run with-dead
done
