#!/usr/bin/env bash
# End-to-end benchmark: sluice-load send -> relay -> sluice-load sink, with the same tools
# and the same sink for every relay compared.
#
#   loadtest/bench.sh [options]
#
#   --messages N         messages per relay (default 20000)
#   --connections N      generator connections (default 50)
#   --size S             message size (default 5k) | --size-dist D (e.g. 2k:50,20k:40,200k:10)
#   --recipients N       recipients per message (default 1)
#   --domains N          recipient domains d0.test .. d{N-1}.test (default 4)
#   --rate R --duration D   open loop instead of closed loop
#   --sink IP:PORT       where the sink listens (default 127.0.0.2:2526); a peer must relay here
#   --peer HOST:PORT     also drive this MTA (already running, relaying to --sink); repeatable
#   --postfix            start a private Postfix (loadtest/postfix-peer.sh) as a peer, stop it after
#   --no-sluice          skip Sluice (drive peers only)
#   --sluice-config F    TOML appended to the generated Sluice config (delivery tuning, ...)
#   --send-args "..."    extra arguments for sluice-load send
#   --sink-args "..."    extra arguments for sluice-load sink (fault injection, --delay, ...)
#   --drain-timeout S    longest wait for deliveries after sending (default 300)
#   --stall S            stop waiting when nothing was delivered for S seconds (default 15)
#   --no-build           use the binaries in target/release as they are
#   --keep DIR           keep logs, reports, id files in DIR
#
# For each relay it prints the acceptance side (generator report: messages/s, latency from
# the intended send time) and the delivery side (sink: recipients delivered, end-to-end
# messages/s from the first message sent to the last one delivered, and `verify`: acked
# messages never delivered). A relay that only accepts and spools (Sluice before its
# delivery engine) is reported as acceptance-only.
set -euo pipefail

MESSAGES=20000
CONNS=50
SIZE_ARGS=(--size 5k)
RCPTS=1
DOMAINS=4
RATE=""
DURATION=""
SINK_ADDR=127.0.0.2:2526
PEERS=()
START_POSTFIX=0
RUN_SLUICE=1
SLUICE_EXTRA=""
SEND_EXTRA=""
SINK_EXTRA=""
DRAIN_TIMEOUT=300
STALL=15
BUILD=1
KEEP=""
while [ $# -gt 0 ]; do
    case "$1" in
        --messages) MESSAGES=$2; shift 2 ;;
        --connections) CONNS=$2; shift 2 ;;
        --size) SIZE_ARGS=(--size "$2"); shift 2 ;;
        --size-dist) SIZE_ARGS=(--size-dist "$2"); shift 2 ;;
        --recipients) RCPTS=$2; shift 2 ;;
        --domains) DOMAINS=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --sink) SINK_ADDR=$2; shift 2 ;;
        --peer) PEERS+=("$2"); shift 2 ;;
        --postfix) START_POSTFIX=1; shift ;;
        --no-sluice) RUN_SLUICE=0; shift ;;
        --sluice-config) SLUICE_EXTRA=$2; shift 2 ;;
        --send-args) SEND_EXTRA=$2; shift 2 ;;
        --sink-args) SINK_EXTRA=$2; shift 2 ;;
        --drain-timeout) DRAIN_TIMEOUT=$2; shift 2 ;;
        --stall) STALL=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --keep) KEEP=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LOAD=$ROOT/target/release/sluice-load
SLUICE=$ROOT/target/release/sluice
if [ "$BUILD" = 1 ]; then
    (cd "$ROOT" && cargo build --release --locked -p sluice -p sluice-load >&2)
fi
[ -x "$LOAD" ] || { echo "missing $LOAD (build it, or drop --no-build)" >&2; exit 2; }
command -v jq >/dev/null || { echo "jq is needed" >&2; exit 2; }

TMP=$(mktemp -d /tmp/sluice-bench.XXXXXX)
PIDS=()
POSTFIX_DIR=""
cleanup() {
    local rc=$?
    for p in "${PIDS[@]:-}"; do
        [ -n "$p" ] && kill "$p" 2>/dev/null || true
    done
    for p in "${PIDS[@]:-}"; do
        [ -n "$p" ] && wait "$p" 2>/dev/null || true
    done
    if [ -n "$POSTFIX_DIR" ]; then
        [ -n "$KEEP" ] && cp "$POSTFIX_DIR/maillog" "$TMP/postfix.maillog" 2>/dev/null
        "$ROOT/loadtest/postfix-peer.sh" stop --dir "$POSTFIX_DIR" >/dev/null 2>&1 || true
    fi
    if [ -n "$KEEP" ]; then
        mkdir -p "$KEEP" && cp -r "$TMP"/. "$KEEP"/ && echo "kept files in $KEEP" >&2
    fi
    rm -rf "$TMP"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_file() { # file, seconds
    local i=0 limit=$(( $2 * 50 ))
    while [ ! -s "$1" ]; do
        i=$((i + 1)); [ $i -gt $limit ] && { echo "timeout waiting for $1" >&2; return 1; }
        sleep 0.02
    done
}

sink_rcpts() { jq -r .recipients "$TMP/sink.json" 2>/dev/null || echo 0; }

# --- the sink: one for everybody -------------------------------------------------------
# shellcheck disable=SC2086
"$LOAD" sink --listen "$SINK_ADDR" --ready-file "$TMP/sink.ready" --stats-file "$TMP/sink.json" \
    --received "$TMP/received" --max-connections 20000 --quiet $SINK_EXTRA 2>"$TMP/sink.log" &
PIDS+=($!)
wait_file "$TMP/sink.ready" 10 || { cat "$TMP/sink.log" >&2; exit 1; }
SINK_ADDR=$(head -1 "$TMP/sink.ready")
echo "sink on $SINK_ADDR" >&2

if [ "$START_POSTFIX" = 1 ]; then
    # Not under $TMP: Postfix's daemons run as the postfix user and must be able to reach
    # their queue, and mktemp directories are private to root.
    POSTFIX_DIR=$(mktemp -d /tmp/sluice-bench-postfix.XXXXXX)
    PF_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    "$ROOT/loadtest/postfix-peer.sh" start --dir "$POSTFIX_DIR" --listen "127.0.0.1:$PF_PORT" \
        --relay "$SINK_ADDR" --concurrency "$CONNS" >&2
    PEERS+=("127.0.0.1:$PF_PORT")
fi

RESULTS=()

# One relay: send, wait for deliveries, verify. Args: name target
run_phase() {
    local name=$1 target=$2
    local tag; tag=$(echo "$name" | tr -c 'a-zA-Z0-9\n' '_')
    local before; before=$(sink_rcpts)
    local loop_args=(--messages "$MESSAGES")
    if [ -n "$RATE" ]; then
        loop_args=(--rate "$RATE" --duration "${DURATION:-10s}")
    elif [ -n "$DURATION" ]; then
        loop_args=(--duration "$DURATION")
    fi
    echo "== $name ($target)" >&2
    local t0; t0=$(date +%s.%N)
    # shellcheck disable=SC2086
    "$LOAD" send --target "$target" --connections "$CONNS" "${loop_args[@]}" "${SIZE_ARGS[@]}" \
        --recipients "$RCPTS" --domains "$DOMAINS" --acked "$TMP/$tag.acked" \
        --json "$TMP/$tag.send.json" --progress lines --progress-interval 5s $SEND_EXTRA \
        >"$TMP/$tag.send.txt" || true
    cat "$TMP/$tag.send.txt" >&2
    local accepted; accepted=$(jq .accepted "$TMP/$tag.send.json")
    local want=$(( accepted * RCPTS ))
    # Deliveries: until every accepted recipient reached the sink, nothing moved for $STALL s,
    # or the drain timeout.
    local last_n=-1 last_change; last_change=$(date +%s.%N)
    local t_last=$t0 start_wait; start_wait=$(date +%s)
    while :; do
        local n; n=$(( $(sink_rcpts) - before ))
        local now; now=$(date +%s.%N)
        if [ "$n" != "$last_n" ]; then
            last_n=$n; last_change=$now
            [ "$n" -gt 0 ] && t_last=$now
        fi
        [ "$n" -ge "$want" ] && break
        if [ "$(echo "$now - $last_change > $STALL" | bc)" = 1 ]; then break; fi
        [ $(( $(date +%s) - start_wait )) -ge "$DRAIN_TIMEOUT" ] && break
        sleep 0.2
    done
    local delivered=$last_n
    local verify="n/a"
    if [ "$delivered" -gt 0 ]; then
        "$LOAD" verify --acked "$TMP/$tag.acked" --received "$TMP/received" \
            --json "$TMP/$tag.verify.json" >/dev/null || true
        local lost; lost=$(jq .lost "$TMP/$tag.verify.json")
        if [ "$delivered" -ge "$want" ]; then
            verify="lost $lost"
        else
            # Deferred mail (faults, retries) may still arrive: not a loss yet.
            verify="$lost acked messages not delivered when the wait ended"
        fi
    fi
    local e2e="acceptance only (nothing delivered within ${STALL}s)"
    if [ "$delivered" -gt 0 ]; then
        local secs; secs=$(echo "$t_last - $t0" | bc)
        e2e=$(printf '%d/%d recipients delivered, %.0f msg/s end to end (%.1f s), %s' \
            "$delivered" "$want" "$(echo "$delivered / $RCPTS / $secs" | bc -l)" "$secs" "$verify")
    fi
    local line
    line=$(jq -r --arg name "$name" --arg e2e "$e2e" \
        '"\($name): accepted \(.accepted)/\(.attempted) at \(.messages_per_s|floor) msg/s, latency p50 \(.latency_ms.from_intended.p50) p99 \(.latency_ms.from_intended.p99) p99.9 \(.latency_ms.from_intended.p999) max \(.latency_ms.from_intended.max) ms, errors \(.errors); \($e2e)"' \
        "$TMP/$tag.send.json")
    RESULTS+=("$line")
    echo "$tag $(jq .messages_per_s "$TMP/$tag.send.json") $delivered" >> "$TMP/rates"
}

# --- Sluice -------------------------------------------------------------------------------
if [ "$RUN_SLUICE" = 1 ]; then
    [ -x "$SLUICE" ] || { echo "missing $SLUICE" >&2; exit 2; }
    {
        echo '[server]'
        echo 'listen = ["127.0.0.1:0"]'
        echo 'hostname = "sluice.bench.test"'
        echo 'max_connections_per_ip = 100000'
        echo '[spool]'
        echo "path = \"$TMP/spool\""
        echo '[metrics]'
        echo 'enabled = false'
        for d in $(seq 0 $((DOMAINS - 1))); do
            printf '[[route]]\ndomain = "d%s.test"\nhosts = ["%s"]\n' "$d" "$SINK_ADDR"
        done
        [ -n "$SLUICE_EXTRA" ] && cat "$SLUICE_EXTRA"
    } > "$TMP/sluice.toml"
    "$SLUICE" serve --config "$TMP/sluice.toml" --ready-file "$TMP/sluice.ready" \
        >"$TMP/sluice.log" 2>&1 &
    SLUICE_PID=$!
    PIDS+=("$SLUICE_PID")
    wait_file "$TMP/sluice.ready" 30 || { tail -20 "$TMP/sluice.log" >&2; exit 1; }
    SLUICE_ADDR=$(awk '$1 == "smtp" {print $2; exit}' "$TMP/sluice.ready")
    run_phase sluice "$SLUICE_ADDR"
    kill "$SLUICE_PID" 2>/dev/null || true
    wait "$SLUICE_PID" 2>/dev/null || true
fi

for p in "${PEERS[@]:-}"; do
    [ -n "$p" ] && run_phase "peer $p" "$p"
done

echo
echo "# $(date -u +%FT%TZ) $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
if [ -n "$RATE" ]; then LOOP="open loop at $RATE/s for ${DURATION:-10s}"; else LOOP="$MESSAGES messages"; fi
echo "# $CONNS connections, ${SIZE_ARGS[*]}, $RCPTS recipient(s), $DOMAINS domains, $LOOP"
for r in "${RESULTS[@]}"; do echo "$r"; done
if [ "$(wc -l < "$TMP/rates" 2>/dev/null || echo 0)" -ge 2 ]; then
    awk 'NR == 1 {a = $2; an = $1} NR > 1 && $2 > 0 {printf "acceptance rate ratio %s / %s: %.2fx\n", an, $1, a / $2}' "$TMP/rates"
fi
