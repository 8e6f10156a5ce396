#!/usr/bin/env bash
# A private Postfix instance to compare with Sluice (bench.sh --peer): its own
# config_directory, queue_directory and data_directory under one directory, listening on a
# loopback port and relaying everything to one host (the sink). Nothing outside DIR is
# touched: no /etc/postfix/main.cf, no system queue, no syslog (maillog_file in DIR).
#
#   loadtest/postfix-peer.sh start [--dir DIR] [--listen IP:PORT] [--relay IP:PORT]
#                                  [--concurrency N] [--processes N]
#   loadtest/postfix-peer.sh stop  [--dir DIR]        (stops it and removes DIR)
#   loadtest/postfix-peer.sh status [--dir DIR]
#
# Defaults: DIR=/tmp/sluice-postfix-peer, listen 127.0.0.1:2527, relay 127.0.0.2:2526,
# 50 outbound connections to the relay host, 200 processes. Needs root (Postfix drops to
# the postfix user itself).
set -euo pipefail

CMD=${1:-}
[ -n "$CMD" ] && shift
DIR=/tmp/sluice-postfix-peer
LISTEN=127.0.0.1:2527
RELAY=127.0.0.2:2526
CONC=50
PROCS=200
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) DIR=$2; shift 2 ;;
        --listen) LISTEN=$2; shift 2 ;;
        --relay) RELAY=$2; shift 2 ;;
        --concurrency) CONC=$2; shift 2 ;;
        --processes) PROCS=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
case "$DIR" in /tmp/*) ;; *) echo "refusing --dir outside /tmp: $DIR" >&2; exit 2 ;; esac
ETC=$DIR/etc

run_postfix() {
    if command -v script >/dev/null; then
        script -qec "postfix -c '$ETC' $1" /dev/null
    else
        postfix -c "$ETC" "$1"
    fi
}

start() {
    command -v postfix >/dev/null || { echo "postfix is not installed" >&2; exit 2; }
    if [ -f "$ETC/main.cf" ] && postfix -c "$ETC" status >/dev/null 2>&1; then
        echo "already running in $DIR" >&2
        exit 1
    fi
    mkdir -p "$ETC" "$DIR/queue" "$DIR/data"
    # The daemons run as the postfix user: every directory on the way must be searchable.
    chmod 755 "$DIR"
    local d=$DIR
    while [ "$d" != / ]; do
        d=$(dirname "$d")
        if ! su -s /bin/sh postfix -c "test -x '$d'" 2>/dev/null; then
            echo "the postfix user cannot enter $d; pick a --dir below a world-searchable directory" >&2
            exit 1
        fi
    done
    # As post-install would set it: the queue root belongs to root, data to the mail owner.
    chown postfix "$DIR/data"
    cp /etc/postfix/dynamicmaps.cf "$ETC/" 2>/dev/null || true
    [ -d /etc/postfix/dynamicmaps.cf.d ] && cp -r /etc/postfix/dynamicmaps.cf.d "$ETC/"
    # master.cf: the stock one with the public smtp listener moved to our address.
    sed -E "s|^smtp[[:space:]]+inet[[:space:]].*smtpd.*$|$LISTEN inet n - n - - smtpd|" \
        /etc/postfix/master.cf > "$ETC/master.cf"
    grep -q "^$LISTEN inet" "$ETC/master.cf" || { echo "could not set the listener in master.cf" >&2; exit 1; }
    local relay_host=${RELAY%:*} relay_port=${RELAY##*:}
    cat > "$ETC/main.cf" <<EOF
# Written by sluice loadtest/postfix-peer.sh: a throwaway relay for benchmarks.
compatibility_level = 3.6
queue_directory = $DIR/queue
data_directory = $DIR/data
mail_owner = postfix
setgid_group = postdrop
maillog_file_prefixes = $DIR
maillog_file = $DIR/maillog
myhostname = peer.sluice-bench.test
mydomain = sluice-bench.test
myorigin = \$myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
local_transport = error:no local delivery on this relay
inet_interfaces = ${LISTEN%:*}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions =
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_peername_lookup = no
relayhost = [$relay_host]:$relay_port
smtp_dns_support_level = disabled
smtp_host_lookup = native
default_process_limit = $PROCS
default_destination_concurrency_limit = $CONC
smtp_destination_concurrency_limit = $CONC
smtp_destination_rate_delay = 0
initial_destination_concurrency = $CONC
append_dot_mydomain = no
biff = no
EOF
    # postfix(1) logs its own fatal errors to syslog only; a pseudo-terminal makes it print
    # them on stderr too (there may be no syslog on a test machine).
    run_postfix check
    run_postfix start
    # Wait until it answers.
    local i=0
    until python3 -c "import socket; s=socket.create_connection(('${LISTEN%:*}', ${LISTEN##*:})); s.recv(100); s.close()" 2>/dev/null; do
        i=$((i + 1)); [ $i -gt 500 ] && { echo "postfix did not start; see $DIR/maillog" >&2; exit 1; }
        sleep 0.02
    done
    echo "postfix peer listening on $LISTEN, relaying to $RELAY (queue in $DIR/queue)"
}

stop() {
    if [ -f "$ETC/main.cf" ]; then
        postfix -c "$ETC" stop 2>/dev/null || postfix -c "$ETC" abort 2>/dev/null || true
        # The master exits asynchronously; give it a moment before removing its queue.
        local i=0
        while postfix -c "$ETC" status >/dev/null 2>&1 && [ $i -lt 100 ]; do
            i=$((i + 1)); sleep 0.05
        done
    fi
    rm -rf "$DIR"
}

case "$CMD" in
    start) start ;;
    stop) stop ;;
    status) postfix -c "$ETC" status ;;
    *) echo "usage: $0 start|stop|status [--dir DIR] [--listen IP:PORT] [--relay IP:PORT]" >&2; exit 2 ;;
esac
