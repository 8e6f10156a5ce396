#!/usr/bin/env bash
# Load tools against each other, no relay in between: sluice-load send -> sluice-load sink,
# side by side with Postfix's smtp-source -> smtp-sink, same message size, connections,
# recipients and message count, alternating rounds so both see the same machine load.
#
#   loadtest/bench-tools.sh [--rounds N] [--messages N] [--connections N] [--size BYTES]
#                           [--recipients N] [--send-args "..."]
#
# Prints one line per run and a summary with medians, spread and the ratio. Needs a release
# build (cargo build --release -p sluice-load) and Postfix's smtp-source/smtp-sink.
set -euo pipefail

ROUNDS=3
MESSAGES=50000
CONNS=50
SIZE=5120
RCPTS=1
SEND_ARGS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift 2 ;;
        --messages) MESSAGES=$2; shift 2 ;;
        --connections) CONNS=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --recipients) RCPTS=$2; shift 2 ;;
        --send-args) SEND_ARGS=$2; shift 2 ;;
        -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${SLUICE_LOAD:-$ROOT/target/release/sluice-load}
[ -x "$BIN" ] || { echo "build first: cargo build --release -p sluice-load" >&2; exit 2; }
command -v smtp-source >/dev/null || { echo "smtp-source not installed" >&2; exit 2; }

TMP=$(mktemp -d /tmp/bench-tools.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# CPU seconds (user+system) a live process has used.
cpu_of() {
    local ticks
    ticks=$(awk '{print $14+$15}' "/proc/$1/stat")
    echo "scale=3; $ticks / $(getconf CLK_TCK)" | bc
}

wait_file() {
    local i=0
    while [ ! -s "$1" ]; do
        i=$((i + 1)); [ $i -gt 1000 ] && { echo "timeout waiting for $1" >&2; exit 1; }
        sleep 0.01
    done
}

ours() {
    rm -f "$TMP/ready" "$TMP/send.json"
    "$BIN" sink --listen 127.0.0.1:0 --ready-file "$TMP/ready" --quiet --max-connections 10000 &
    local sink=$!; PIDS+=("$sink")
    wait_file "$TMP/ready"
    local addr; addr=$(head -1 "$TMP/ready")
    local t0; t0=$(date +%s.%N)
    # shellcheck disable=SC2086
    /usr/bin/time -f "%U %S" -o "$TMP/send.time" "$BIN" send --target "$addr" \
        --connections "$CONNS" --messages "$MESSAGES" --size "$SIZE" --body plain \
        --recipients "$RCPTS" --progress off --json "$TMP/send.json" $SEND_ARGS >/dev/null
    local t1; t1=$(date +%s.%N)
    local sink_cpu; sink_cpu=$(cpu_of "$sink")
    kill "$sink"; wait "$sink" 2>/dev/null || true
    local accepted rate send_cpu
    accepted=$(jq .accepted "$TMP/send.json")
    rate=$(jq .messages_per_s "$TMP/send.json")
    send_cpu=$(awk '{print $1+$2}' "$TMP/send.time")
    [ "$accepted" = "$MESSAGES" ] || { echo "ours: only $accepted accepted" >&2; exit 1; }
    # Wall rate (process start to exit) too, the way smtp-source is measured.
    local wall_rate; wall_rate=$(echo "scale=1; $MESSAGES / ($t1 - $t0)" | bc)
    printf 'ours     %8.0f msg/s (%8.0f from process start to exit)  cpu send %6.2fs sink %6.2fs  (%.1f us/msg)\n' \
        "$rate" "$wall_rate" "$send_cpu" "$sink_cpu" \
        "$(echo "($send_cpu + $sink_cpu) * 1000000 / $MESSAGES" | bc -l)"
    echo "$rate" >> "$TMP/ours.rates"
}

postfix() {
    local port; port=$(free_port)
    smtp-sink -u nobody -m 10000 "127.0.0.1:$port" 4096 &
    local sink=$!; PIDS+=("$sink")
    local i=0
    until python3 -c "import socket; socket.create_connection(('127.0.0.1',$port)).close()" 2>/dev/null; do
        i=$((i + 1)); [ $i -gt 500 ] && { echo "smtp-sink did not start" >&2; exit 1; }
        sleep 0.01
    done
    local t0; t0=$(date +%s.%N)
    /usr/bin/time -f "%U %S" -o "$TMP/src.time" smtp-source -d -s "$CONNS" -l "$SIZE" \
        -m "$MESSAGES" -r "$RCPTS" -f load@sluice-load.test -t user@d0.test "127.0.0.1:$port"
    local t1; t1=$(date +%s.%N)
    local sink_cpu; sink_cpu=$(cpu_of "$sink")
    kill "$sink"; wait "$sink" 2>/dev/null || true
    local rate; rate=$(echo "scale=1; $MESSAGES / ($t1 - $t0)" | bc)
    local src_cpu; src_cpu=$(awk '{print $1+$2}' "$TMP/src.time")
    printf 'postfix  %8.0f msg/s                                    cpu send %6.2fs sink %6.2fs  (%.1f us/msg)\n' \
        "$rate" "$src_cpu" "$sink_cpu" \
        "$(echo "($src_cpu + $sink_cpu) * 1000000 / $MESSAGES" | bc -l)"
    echo "$rate" >> "$TMP/postfix.rates"
}

echo "# $MESSAGES messages of $SIZE bytes, $CONNS connections, $RCPTS recipient(s), $ROUNDS rounds"
echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 "$ROUNDS"); do
    # Alternate the order so neither side always runs first.
    if [ $((r % 2)) -eq 1 ]; then ours; postfix; else postfix; ours; fi
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$TMP/ours.rates" "$TMP/postfix.rates" <<'PY'
import statistics, sys
o = [float(x) for x in open(sys.argv[1])]
p = [float(x) for x in open(sys.argv[2])]
mo, mp = statistics.median(o), statistics.median(p)
print(f"ours    median {mo:8.0f} msg/s  (min {min(o):.0f}, max {max(o):.0f})")
print(f"postfix median {mp:8.0f} msg/s  (min {min(p):.0f}, max {max(p):.0f})")
print(f"ratio (median ours / median postfix): {mo/mp:.2f}x; worst case (min ours / max postfix): {min(o)/max(p):.2f}x")
PY
