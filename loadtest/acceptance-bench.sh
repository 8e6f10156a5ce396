#!/usr/bin/env bash
# Acceptance benchmark (docs/benchmarks.md "## Acceptance"): `sluice serve`
# and a private Postfix (loadtest/postfix-accept.sh) accepting the same load
# on this machine, interleaved in one run so both see the same noise.
#
#   loadtest/acceptance-bench.sh [--sluice BIN] [--load BIN] [--reps N]
#       [--duration D] [--connections N] [--sizes "5k 100k"] [--out DIR]
#       [--open-loop] [--no-closed] [--no-postfix]
#
# Closed loop: --connections clients send as fast as answered, for
# --duration, per size and repetition, Sluice and Postfix in alternating
# order. With --open-loop, afterwards an open-loop run of each server at
# half of its own median closed-loop rate per size (p99 from intended send time and from the
# final dot). --no-closed skips the closed-loop runs and takes the rates
# from the closed-loop reports already in --out. Every JSON report is kept in --out; a summary goes to stdout.
# Both servers fsync before answering 250 (Sluice: group commit; Postfix:
# cleanup's fsync, its default). Loopback only; everything is stopped at exit.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
SLUICE=target/release/sluice
LOAD=target/release/sluice-load
REPS=3
DURATION=20s
CONNS=50
SIZES="5k 100k"
OUT=$(mktemp -d /tmp/sluice-acceptance.XXXXXX)
OPEN=0
CLOSED=1
POSTFIX=1
while [ $# -gt 0 ]; do
    case "$1" in
        --sluice) SLUICE=$2; shift 2 ;;
        --load) LOAD=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --connections) CONNS=$2; shift 2 ;;
        --sizes) SIZES=$2; shift 2 ;;
        --out) OUT=$2; mkdir -p "$OUT"; shift 2 ;;
        --open-loop) OPEN=1; shift ;;
        --no-closed) CLOSED=0; shift ;;
        --no-postfix) POSTFIX=0; shift ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

SPOOLDIR=$OUT/sluice
# A fresh spool each run (and no stale ready file).
rm -rf "$SPOOLDIR"
mkdir -p "$SPOOLDIR"
SERVER=
cleanup() {
    [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null || true
    rm -rf "$SPOOLDIR/spool"
    [ "$POSTFIX" = 1 ] && "$HERE/postfix-accept.sh" stop >/dev/null 2>&1 || true
}
trap cleanup EXIT INT TERM

cat >"$SPOOLDIR/sluice.toml" <<CONF
[server]
listen = ["127.0.0.1:0"]
hostname = "accept.sluice-bench.test"
max_connections = 20000
max_connections_per_ip = 20000
[spool]
path = "$SPOOLDIR/spool"
[metrics]
listen = "127.0.0.1:0"
# Postfix parks every message in its hold queue (nothing delivered, qmgr
# idle); Sluice holds too, so both measure acceptance alone. With delivery
# on, every message here would be routed to an unresolvable d{j}.test and
# deferred: a DNS lookup and a second spool write per message.
[delivery]
enabled = false
CONF
# Each Sluice run starts on an empty spool, as each Postfix run starts on an
# empty queue (and the disk does not fill up over the reps).
start_sluice() {
    rm -rf "$SPOOLDIR/spool" "$SPOOLDIR/ready"
    "$SLUICE" serve --config "$SPOOLDIR/sluice.toml" --ready-file "$SPOOLDIR/ready" \
        2>>"$SPOOLDIR/log" &
    SERVER=$!
    local i=0
    until [ -s "$SPOOLDIR/ready" ]; do
        i=$((i + 1)); [ $i -gt 600 ] && { cat "$SPOOLDIR/log"; exit 1; }
        sleep 0.1
    done
    SLUICE_ADDR=$(awk '$1 == "smtp" {print $2}' "$SPOOLDIR/ready")
}
stop_sluice() {
    kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null || true
    SERVER=
    rm -rf "$SPOOLDIR/spool"
    settle
}
# After each run: write back and discard what the run left (the root file
# system is mounted with `discard`: deleting gigabytes of spool issues
# discards that would otherwise compete with the next run's fsyncs).
settle() { sync; }
PF_ADDR=127.0.0.1:2528
if [ "$POSTFIX" = 1 ]; then
    "$HERE/postfix-accept.sh" stop >/dev/null 2>&1 || true
    "$HERE/postfix-accept.sh" start --listen "$PF_ADDR" >/dev/null
fi

run() { # name target size connections extra... -> JSON file
    local name=$1 target=$2 size=$3 conns=$4; shift 4
    local f="$OUT/$name.json"
    "$LOAD" send --target "$target" --connections "$conns" --size "$size" \
        --duration "$DURATION" --messages 100000000 --progress off --json "$f" "$@" \
        >/dev/null 2>"$OUT/$name.err" || true
    echo "$f"
}

summary() { # file label
    python3 - "$1" "$2" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
l = d["latency_ms"]
print(f'{sys.argv[2]:<28} {d["messages_per_s"]:9.1f} msg/s  ok={d["accepted"]:<7} '
      f'rej={d["rejected"]:<4} err={d["errors"]:<4} '
      f'dot->250 p50={l["dot_to_reply"]["p50"]:8.2f} p99={l["dot_to_reply"]["p99"]:8.2f} ms  '
      f'intended->250 p99={l["from_intended"]["p99"]:8.2f} ms')
PY
}

echo "sluice ($SLUICE), postfix $PF_ADDR, $CONNS connections, $DURATION per run, out $OUT"
for size in $SIZES; do
    [ "$CLOSED" = 1 ] || break
    for rep in $(seq 1 "$REPS"); do
        # Alternate who goes first, so a trend in the machine's load
        # does not always favour the same server.
        if [ $((rep % 2)) = 1 ] || [ "$POSTFIX" = 0 ]; then order="sluice postfix"; else order="postfix sluice"; fi
        for who in $order; do
            [ "$who" = postfix ] && [ "$POSTFIX" = 0 ] && continue
            if [ "$who" = sluice ]; then start_sluice; addr=$SLUICE_ADDR; else addr=$PF_ADDR; fi
            f=$(run "closed-$size-$rep-$who" "$addr" "$size" "$CONNS")
            summary "$f" "closed $size #$rep $who"
            [ "$who" = sluice ] && stop_sluice
            [ "$who" = postfix ] && "$HERE/postfix-accept.sh" flush >/dev/null && settle
        done
    done
done

if [ "$OPEN" = 1 ]; then
    for size in $SIZES; do
        for who in sluice postfix; do
            [ "$who" = postfix ] && [ "$POSTFIX" = 0 ] && continue
            if [ "$who" = sluice ]; then start_sluice; addr=$SLUICE_ADDR; else addr=$PF_ADDR; fi
            best=$(python3 - "$OUT" "$size" "$who" <<'PY'
import glob, json, statistics, sys
rates = [json.load(open(f))["messages_per_s"] for f in glob.glob(f"{sys.argv[1]}/closed-{sys.argv[2]}-*-{sys.argv[3]}.json")]
print(statistics.median(rates) if rates else 0)
PY
)
            rate=$(python3 -c "print(max(1, int($best / 2)))")
            # More connections than the rate needs, so the generator's own
            # queueing stays out of the latency.
            f=$(run "open-$size-$who" "$addr" "$size" $((CONNS * 4)) --rate "$rate/s")
            summary "$f" "open $size @${rate}/s $who"
            [ "$who" = sluice ] && stop_sluice
            [ "$who" = postfix ] && "$HERE/postfix-accept.sh" flush >/dev/null && settle
        done
    done
fi

# Medians and spread over the repetitions, and Sluice/Postfix ratios (of the
# medians, and per repetition: the two runs of a repetition ran back to back).
python3 - "$OUT" "$SIZES" <<'PY'
import glob, json, statistics, sys
out, sizes = sys.argv[1], sys.argv[2].split()
for size in sizes:
    runs = {}
    for who in ("sluice", "postfix"):
        for f in sorted(glob.glob(f"{out}/closed-{size}-*-{who}.json")):
            rep = int(f.rsplit("-", 2)[-2])
            d = json.load(open(f))
            runs.setdefault(who, {})[rep] = d
    if "sluice" not in runs:
        continue
    line = f"{size}:"
    for who, reps in runs.items():
        rates = [d["messages_per_s"] for d in reps.values()]
        p99 = [d["latency_ms"]["dot_to_reply"]["p99"] for d in reps.values()]
        p50 = [d["latency_ms"]["dot_to_reply"]["p50"] for d in reps.values()]
        line += (f"  {who} median {statistics.median(rates):.0f} msg/s "
                 f"(min {min(rates):.0f}, max {max(rates):.0f}, n={len(rates)}), "
                 f"dot->250 p50 median {statistics.median(p50):.1f} ms, p99 median {statistics.median(p99):.1f} ms;")
    if "postfix" in runs:
        s = statistics.median(d["messages_per_s"] for d in runs["sluice"].values())
        p = statistics.median(d["messages_per_s"] for d in runs["postfix"].values())
        pairs = [runs["sluice"][r]["messages_per_s"] / max(runs["postfix"][r]["messages_per_s"], 1e-9)
                 for r in runs["sluice"] if r in runs["postfix"]]
        line += f"  ratio of medians {s / p:.1f}x, per repetition " + ", ".join(f"{x:.1f}x" for x in pairs)
    print(line)
PY
