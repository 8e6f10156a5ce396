#!/bin/sh
# Memory of `sluice serve` holding N idle SMTP connections (issue 3 target:
# 10,000 under 256 MiB RSS). Prints VmRSS/VmHWM of the server before and
# while the connections are held.
#
#   loadtest/idle-rss.sh [SLUICE_BIN] [SLUICE_LOAD_BIN] [N]
#
# Loopback only; everything lives in a temp dir and is killed on exit.
set -eu
case "${1:-}" in
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
esac
SLUICE=${1:-target/release/sluice}
LOAD=${2:-target/release/sluice-load}
N=${3:-10000}
DIR=$(mktemp -d /tmp/sluice-idle.XXXXXX)
SERVER=
cleanup() {
    [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null
    rm -rf "$DIR"
}
trap cleanup EXIT INT TERM
cat >"$DIR/sluice.toml" <<CONF
[server]
listen = ["127.0.0.1:0"]
hostname = "idle.test"
max_connections = $((N + 100))
max_connections_per_ip = $((N + 100))
[spool]
path = "$DIR/spool"
[metrics]
listen = "127.0.0.1:0"
CONF
"$SLUICE" serve --config "$DIR/sluice.toml" --ready-file "$DIR/ready" 2>"$DIR/log" &
SERVER=$!
i=0
while [ ! -s "$DIR/ready" ]; do
    i=$((i + 1)); [ $i -gt 600 ] && { cat "$DIR/log"; exit 1; }
    sleep 0.1
done
ADDR=$(awk '$1 == "smtp" {print $2}' "$DIR/ready")
rss() { awk '/^VmRSS|^VmHWM/ {printf "%s %s kB  ", $1, $2} END {print ""}' /proc/$SERVER/status; }
echo "server pid $SERVER on $ADDR; before: $(rss)"
"$LOAD" idle --target "$ADDR" --connections "$N" --hold 5s \
    --ready-file "$DIR/held" --json >"$DIR/idle.json" </dev/null &
LOADPID=$!
i=0
while [ ! -s "$DIR/held" ]; do
    i=$((i + 1)); [ $i -gt 1200 ] && { echo "idle setup timed out"; kill $LOADPID; exit 1; }
    sleep 0.1
done
sleep 1
echo "held $(cat "$DIR/held"); server: $(rss)"
wait $LOADPID
echo "sluice-load: $(cat "$DIR/idle.json")"
