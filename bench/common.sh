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
