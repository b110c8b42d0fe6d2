#!/bin/sh
# The sidecar's entrypoint, the seed's start.sh rebuilt: render the sidecar with meshgen, run
# HAProxy on it in master-worker mode, render again every interval, and reload HAProxy when the
# files changed. Arguments, if any, are the app to run beside it. POSIX sh: dash (Debian) and
# busybox ash (Alpine).
#
# Settings, from the environment:
#   MESHGEN_SERVICE_ID   the app's service ID in Consul; its sidecar is found from it (required)
#   MESHGEN_OUT          bundle directory                                  (/var/lib/meshgen)
#   MESHGEN_INTERVAL     seconds between renders                           (10)
#   MESHGEN_BACKOFF_MAX  the longest wait after failed renders, seconds    (60)
#   MESHGEN_STOP_GRACE   seconds open connections get on SIGTERM           (10)
#   MESHGEN_HAPROXY      the HAProxy binary                                (haproxy)
#   MESHGEN              the meshgen command, arguments allowed            (meshgen)
#   CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN_FILE, CONSUL_CACERT, ...  read by meshgen itself
set -u

service_id=${MESHGEN_SERVICE_ID:?set MESHGEN_SERVICE_ID to the service ID of the app in Consul}
out=${MESHGEN_OUT:-/var/lib/meshgen}
interval=${MESHGEN_INTERVAL:-10}
backoff_max=${MESHGEN_BACKOFF_MAX:-60}
stop_grace=${MESHGEN_STOP_GRACE:-10}
haproxy=${MESHGEN_HAPROXY:-haproxy}
meshgen=${MESHGEN:-meshgen}

haproxy_pid=
app_pid=
sleep_pid=

log() {
    printf '%s start.sh: %s\n' "$(date -u '+%Y-%m-%dT%H:%M:%SZ')" "$*" >&2
}

# Stop HAProxy softly (open connections finish), for at most the grace period.
stop_haproxy() {
    [ -n "$haproxy_pid" ] || return 0
    kill -USR1 "$haproxy_pid" 2>/dev/null
    (sleep "$stop_grace"; kill -TERM "$haproxy_pid" 2>/dev/null) &
    timer=$!
    wait "$haproxy_pid" 2>/dev/null
    kill "$timer" 2>/dev/null
    wait "$timer" 2>/dev/null
    haproxy_pid=
}

shutdown() {
    log "$1: stopping"
    [ -n "$sleep_pid" ] && kill "$sleep_pid" 2>/dev/null
    if [ -n "$app_pid" ]; then
        kill -TERM "$app_pid" 2>/dev/null
        wait "$app_pid" 2>/dev/null
    fi
    stop_haproxy
    log "stopped"
    exit "${2:-0}"
}
trap 'shutdown SIGTERM' TERM
trap 'shutdown SIGINT' INT
trap 'shutdown SIGHUP' HUP

# Sleep in the background so that a signal ends the wait at once.
pause() {
    sleep "$1" &
    sleep_pid=$!
    wait "$sleep_pid" 2>/dev/null
    sleep_pid=
}

start_haproxy() {
    log "starting HAProxy on $out/haproxy.cfg"
    "$haproxy" -W -S "$out/master.sock" -f "$out/haproxy.cfg" &
    haproxy_pid=$!
}

if [ "$#" -gt 0 ]; then
    log "starting the app: $*"
    "$@" &
    app_pid=$!
fi

mkdir -p "$out"
delay=$interval
backoff=1
while :; do
    # $meshgen is a command line: word splitting is wanted here.
    # shellcheck disable=SC2086
    $meshgen render --sidecar-for "$service_id" --out "$out" --haproxy "$haproxy"
    code=$?
    case $code in
        0 | 3)
            delay=$interval
            backoff=1
            if [ -z "$haproxy_pid" ]; then
                start_haproxy
            elif [ "$code" = 3 ]; then
                log "the bundle changed: reloading HAProxy"
                kill -USR2 "$haproxy_pid"
            fi
            ;;
        1)
            # The agent is down or said something wrong: wait longer each time, up to the cap.
            delay=$backoff
            backoff=$((backoff * 2))
            [ "$backoff" -gt "$backoff_max" ] && backoff=$backoff_max
            log "render failed; HAProxy keeps its last good config; next try in ${delay}s"
            ;;
        *)
            log "meshgen exited $code (a usage error): giving up"
            shutdown "error" 2
            ;;
    esac
    if [ -n "$haproxy_pid" ] && ! kill -0 "$haproxy_pid" 2>/dev/null; then
        haproxy_pid=
        shutdown "HAProxy exited" 1
    fi
    if [ -n "$app_pid" ] && ! kill -0 "$app_pid" 2>/dev/null; then
        app_pid=
        shutdown "the app exited" 1
    fi
    pause "$delay"
done
