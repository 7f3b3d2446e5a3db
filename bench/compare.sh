#!/usr/bin/env bash
# Runs bench/relay.sh for an older build and this one alternately, ROUNDS
# times each, and prints every round, then the medians and their ratio.
# The order flips every round (old-new, new-old, ...) so that a machine
# that speeds up or slows down during the run favours neither build.
#
#   bench/compare.sh OLD_BINARY [ROUNDS=5] [SESSIONS=20] [MESSAGES=5000] [SIZE=1024]
#
# Single runs on a shared 2-core machine vary by ±20 % in accepted msg/s;
# medians over several alternating rounds are what to compare.
# ACCEPT_ONLY=1 is passed on to bench/relay.sh (accepted msg/s with
# nothing relayed; no CPU figure then).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
    echo "usage: bench/compare.sh OLD_BINARY [ROUNDS] [SESSIONS] [MESSAGES] [SIZE]" >&2
    exit 2
fi
old=$1
rounds=${2:-5}
sessions=${3:-20}
messages=${4:-5000}
size=${5:-1024}
cargo build --release --quiet
new="$PWD/target/release/petrel"
results=$(mktemp "${TMPDIR:-/tmp}/petrel-compare.XXXXXX")
trap 'rm -f "$results"' EXIT

measure() { # measure LABEL BINARY
    local output line
    output=$(PETREL=$2 bench/relay.sh "$sessions" "$messages" "$size")
    line=$(grep '^sessions=' <<<"$output")
    echo "$1 $line"
    echo "$1 $line" >>"$results"
    grep '^while accepting' <<<"$output" | sed 's/^/    /' || true
}

for round in $(seq 1 "$rounds"); do
    if [ $((round % 2)) = 1 ]; then
        measure old "$old"
        measure new "$new"
    else
        measure new "$new"
        measure old "$old"
    fi
done

# The median of one field (accepted= or cpu/msg=) for one build; empty
# when no round printed it.
median() {
    { grep "^$1 " "$results" | grep -o "$2=[0-9.]*" || true; } | cut -d= -f2 | sort -n |
        awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
old_rate=$(median old accepted)
new_rate=$(median new accepted)
old_cpu=$(median old cpu/msg)
new_cpu=$(median new cpu/msg)
awk -v r="$rounds" -v s="$sessions" -v z="$size" -v or="$old_rate" -v nr="$new_rate" \
    -v oc="$old_cpu" -v nc="$new_cpu" 'BEGIN {
    printf "medians of %d rounds, %d senders, %d B: accepted %.0f -> %.0f msg/s (%.2fx)",
        r, s, z, or, nr, nr / or
    if (oc > 0 && nc > 0) {
        printf ", cpu/msg %.3f -> %.3f ms (%.2fx less)", oc, nc, oc / nc
    }
    printf "\n"
}'
