# Shared by the benchmark scripts (sourced, not run): a release build, a
# work directory removed on exit, and petrel started on its config there.
# PETREL=/path/to/petrel runs another build (an older one, to compare).

cargo build --release --quiet
petrel="${PETREL:-$PWD/target/release/petrel}"
work=$(mktemp -d "${TMPDIR:-/tmp}/petrel-bench.XXXXXX")
server=""
extra_cleanup=""
cleanup() {
    if [ -n "$extra_cleanup" ]; then eval "$extra_cleanup"; fi
    if [ -n "$server" ]; then
        kill "$server" 2>/dev/null || true
        # A server that does not stop in 10 s must not outlive the run.
        for _ in $(seq 1 100); do kill -0 "$server" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$server" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# write_config: $work/petrel.toml with SMTP alone on 127.0.0.1:$port, data in
# $work/data, local domain localhost, then whatever comes on stdin.
write_config() {
    {
        cat <<TOML
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
TOML
        cat
    } >"$work/petrel.toml"
}

# start_petrel LOG_FILTER: runs `petrel serve -c $work/petrel.toml` and
# waits until it is ready.
start_petrel() {
    RUST_LOG=$1 "$petrel" serve -c "$work/petrel.toml" 2>"$work/serve.log" &
    server=$!
    for _ in $(seq 1 100); do
        grep -q "petrel ready" "$work/serve.log" && return 0
        sleep 0.1
    done
    echo "petrel did not start:" >&2
    cat "$work/serve.log" >&2
    exit 1
}

# start_relay SESSIONS LOG_FILTER: petrel relays everything from loopback
# to Postfix's smtp-sink on 127.0.0.1:$sink_port through a plaintext smart
# host, with room for SESSIONS parallel clients; sets $sink.
start_relay() {
    write_config <<TOML
[relay]
trusted_networks = ["127.0.0.0/8"]
[delivery]
smarthost = "127.0.0.1:$sink_port"
smarthost_tls = "none"
[limits]
max_sessions_per_ip = $(($1 + 5))
max_connection_rate = 0
TOML
    # Releases before 0.2 have no connection rate limit (nor its key).
    if ! "$petrel" check-config -c "$work/petrel.toml" >/dev/null 2>&1; then
        sed -i '/^max_connection_rate/d' "$work/petrel.toml"
    fi
    local sink_user=()
    if [ "$(id -u)" = 0 ]; then sink_user=(-u nobody); fi
    smtp-sink "${sink_user[@]}" "127.0.0.1:$sink_port" 256 &
    sink=$!
    # A stopped sink (relay.sh's ACCEPT_ONLY) would ignore SIGTERM and keep
    # its port.
    extra_cleanup='kill -CONT "${sink:-}" 2>/dev/null || true; kill "${sink:-}" 2>/dev/null || true'
    start_petrel "$2"
}

# wait_for_empty_queue: until every message has left the queue (at most
# five minutes).
wait_for_empty_queue() {
    for _ in $(seq 1 6000); do
        [ "$(sqlite3 "$work/data/queue.db" "SELECT count(*) FROM messages")" = 0 ] && return 0
        sleep 0.05
    done
}
