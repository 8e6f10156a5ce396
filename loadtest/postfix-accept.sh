#!/usr/bin/env bash
# A private Postfix instance that only ACCEPTS mail, for the acceptance
# benchmark against `sluice serve` (docs/benchmarks.md "## Acceptance").
#
# smtpd -> cleanup -> queue file written and fsynced (Postfix's default) ->
# the message is put on hold (`smtpd_end_of_data_restrictions = static:HOLD`),
# so it stays in the hold queue: nothing is delivered and qmgr does no work
# that would compete with smtpd during the run. Own config_directory,
# queue_directory and data_directory under DIR (same file system as /tmp);
# nothing outside DIR is touched (no /etc/postfix/main.cf, no system queue,
# no syslog: maillog_file in DIR).
#
#   loadtest/postfix-accept.sh start [--dir DIR] [--listen IP:PORT] [--processes N]
#   loadtest/postfix-accept.sh count [--dir DIR]     (messages in its hold queue)
#   loadtest/postfix-accept.sh flush [--dir DIR]     (deletes every queued message)
#   loadtest/postfix-accept.sh stop  [--dir DIR]     (stops it and removes DIR)
#
# Defaults: DIR=/tmp/sluice-postfix-accept, listen 127.0.0.1:2528, 200
# processes (so 50+ concurrent smtpd never queue for a process). Needs root.
set -euo pipefail

CMD=${1:-}
[ -n "$CMD" ] && shift
DIR=/tmp/sluice-postfix-accept
LISTEN=127.0.0.1:2528
PROCS=200
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) DIR=$2; shift 2 ;;
        --listen) LISTEN=$2; shift 2 ;;
        --processes) PROCS=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
case "$DIR" in /tmp/*) ;; *) echo "refusing --dir outside /tmp: $DIR" >&2; exit 2 ;; esac
case "$LISTEN" in 127.*) ;; *) echo "loopback only: $LISTEN" >&2; exit 2 ;; esac
ETC=$DIR/etc

run_postfix() {
    # postfix(1) reports fatal errors to syslog only unless stderr is a tty.
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
    chmod 755 "$DIR"
    chown postfix "$DIR/data"
    cp /etc/postfix/dynamicmaps.cf "$ETC/" 2>/dev/null || true
    [ -d /etc/postfix/dynamicmaps.cf.d ] && cp -r /etc/postfix/dynamicmaps.cf.d "$ETC/"
    sed -E "s|^smtp[[:space:]]+inet[[:space:]].*smtpd.*$|$LISTEN inet n - n - - smtpd|" \
        /etc/postfix/master.cf > "$ETC/master.cf"
    grep -q "^$LISTEN inet" "$ETC/master.cf" || { echo "could not set the listener" >&2; exit 1; }
    cat > "$ETC/main.cf" <<EOF
# Written by sluice loadtest/postfix-accept.sh: accept into the queue, never deliver.
compatibility_level = 3.6
queue_directory = $DIR/queue
data_directory = $DIR/data
mail_owner = postfix
setgid_group = postdrop
maillog_file_prefixes = $DIR
maillog_file = $DIR/maillog
myhostname = accept.sluice-bench.test
mydomain = sluice-bench.test
myorigin = \$myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = ${LISTEN%:*}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions =
# Every message goes to the hold queue once cleanup has written (and fsynced) it.
smtpd_end_of_data_restrictions = check_client_access static:HOLD
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
default_process_limit = $PROCS
message_size_limit = 26214400
append_dot_mydomain = no
biff = no
EOF
    run_postfix check
    run_postfix start
    local i=0
    until python3 -c "import socket; s=socket.create_connection(('${LISTEN%:*}', ${LISTEN##*:})); s.recv(100); s.close()" 2>/dev/null; do
        i=$((i + 1)); [ $i -gt 500 ] && { echo "postfix did not start; see $DIR/maillog" >&2; exit 1; }
        sleep 0.02
    done
    echo "postfix (accept only) listening on $LISTEN (queue in $DIR/queue)"
}

count() {
    find "$DIR/queue/hold" "$DIR/queue/incoming" "$DIR/queue/active" \
        "$DIR/queue/deferred" -type f 2>/dev/null | wc -l
}

flush() {
    postsuper -c "$ETC" -d ALL >/dev/null 2>&1 || true
}

stop() {
    if [ -f "$ETC/main.cf" ]; then
        postfix -c "$ETC" stop 2>/dev/null || postfix -c "$ETC" abort 2>/dev/null || true
        local i=0
        while postfix -c "$ETC" status >/dev/null 2>&1 && [ $i -lt 100 ]; do
            i=$((i + 1)); sleep 0.05
        done
    fi
    rm -rf "$DIR"
}

case "$CMD" in
    start) start ;;
    count) count ;;
    flush) flush ;;
    stop) stop ;;
    *) echo "usage: $0 start|count|flush|stop [--dir DIR] [--listen IP:PORT]" >&2; exit 2 ;;
esac
