#!/bin/sh
# The sidecar's entrypoint, the seed's start.sh rebuilt: render the sidecar with meshgen, run
# HAProxy on it in master-worker mode, then let meshgen wait on Consul's blocking queries and
# render again as soon as something changes, reloading HAProxy when the files changed. New CA
# roots, a new leaf and upstream instances go in live through HAProxy's runtime API instead,
# where meshgen sees them take effect. Arguments, if any, are the app to run beside it. POSIX sh:
# dash (Debian) and busybox ash (Alpine).
#
# Settings, from the environment:
#   MESHGEN_SERVICE_ID   the app's service ID in Consul; its sidecar is found from it (required)
#   MESHGEN_OUT          bundle directory                                  (/var/lib/meshgen)
#   MESHGEN_WAIT         longest wait on Consul for a change, then render  (5m)
#   MESHGEN_POLL_INTERVAL how often prepared queries, which cannot block, are polled (30s)
#   MESHGEN_BACKOFF_MAX  the longest wait after failed renders, seconds    (60)
#   MESHGEN_STOP_GRACE   seconds open connections get on SIGTERM           (10)
#   MESHGEN_HAPROXY      the HAProxy binary                                (haproxy)
#   MESHGEN_LIVE         0: every change is a reload, none through the runtime API (1)
#   MESHGEN              the meshgen command, arguments allowed            (meshgen)
#   MESHGEN_CONSUL_AGENT_ARGS  when set, start `consul agent` with these arguments first, as the
#                        seed's container did; it is stopped last. CONSUL_LOCAL_CONFIG, if set, is
#                        given to it as a config file, as the official Consul image does.
#   CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN_FILE, CONSUL_CACERT, ...  read by meshgen itself
# A token given as CONSUL_HTTP_TOKEN moves into a private file for meshgen; the app and HAProxy
# are started without CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE and CONSUL_LOCAL_CONFIG.
set -u

service_id=${MESHGEN_SERVICE_ID:?set MESHGEN_SERVICE_ID to the service ID of the app in Consul}
out=${MESHGEN_OUT:-/var/lib/meshgen}
wait_for=${MESHGEN_WAIT:-5m}
poll_interval=${MESHGEN_POLL_INTERVAL:-30s}
backoff_max=${MESHGEN_BACKOFF_MAX:-60}
stop_grace=${MESHGEN_STOP_GRACE:-10}
haproxy=${MESHGEN_HAPROXY:-haproxy}
live=${MESHGEN_LIVE:-1}
meshgen=${MESHGEN:-meshgen}

haproxy_pid=
app_pid=
consul_pid=
sleep_pid=
render_pid=
private_dir=

log() {
    printf '%s start.sh: %s\n' "$(date -u '+%Y-%m-%dT%H:%M:%SZ')" "$*" >&2
}

# Stop HAProxy softly (open connections finish), for at most the grace period.
stop_haproxy() {
    [ -n "$haproxy_pid" ] || return 0
    kill -USR1 "$haproxy_pid" 2>/dev/null
    # The timer takes its sleep down with it when HAProxy stops first: no process outlives start.sh.
    (
        trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
        sleep "$stop_grace" &
        sleeper=$!
        wait "$sleeper" && kill -TERM "$haproxy_pid" 2>/dev/null
    ) &
    timer=$!
    wait "$haproxy_pid" 2>/dev/null
    kill "$timer" 2>/dev/null
    wait "$timer" 2>/dev/null
    haproxy_pid=
}

shutdown() {
    log "$1: stopping"
    [ -n "$sleep_pid" ] && kill "$sleep_pid" 2>/dev/null
    [ -n "$render_pid" ] && kill "$render_pid" 2>/dev/null
    if [ -n "$app_pid" ]; then
        kill -TERM "$app_pid" 2>/dev/null
        wait "$app_pid" 2>/dev/null
    fi
    stop_haproxy
    if [ -n "$consul_pid" ]; then
        kill -TERM "$consul_pid" 2>/dev/null
        wait "$consul_pid" 2>/dev/null
    fi
    [ -n "$private_dir" ] && rm -rf "$private_dir"
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

# Start a command in the background without the variables that hold or lead to a Consul token;
# env execs it, so $! is the command's own pid, for the signals that stop it.
spawn_without_secrets() {
    env -u CONSUL_HTTP_TOKEN -u CONSUL_HTTP_TOKEN_FILE -u CONSUL_LOCAL_CONFIG "$@" &
}

start_haproxy() {
    log "starting HAProxy on $out/haproxy.cfg"
    spawn_without_secrets "$haproxy" -W -S "$out/master.sock" -f "$out/haproxy.cfg"
    haproxy_pid=$!
}

# Secrets go into files only this user can read, never into an argument.
private_dir=$(umask 077 && mktemp -d "${TMPDIR:-/tmp}/meshgen-private.XXXXXX") || exit 1
if [ -n "${CONSUL_HTTP_TOKEN:-}" ] && [ -z "${CONSUL_HTTP_TOKEN_FILE:-}" ]; then
    (umask 077 && printf '%s\n' "$CONSUL_HTTP_TOKEN" >"$private_dir/token")
    CONSUL_HTTP_TOKEN_FILE=$private_dir/token
    export CONSUL_HTTP_TOKEN_FILE
fi
unset CONSUL_HTTP_TOKEN

if [ -n "${MESHGEN_CONSUL_AGENT_ARGS:-}" ]; then
    agent_args=$MESHGEN_CONSUL_AGENT_ARGS
    if [ -n "${CONSUL_LOCAL_CONFIG:-}" ]; then
        # It may hold tokens, as the official Consul image's does.
        local_config=$private_dir/local.json
        (umask 077 && printf '%s\n' "$CONSUL_LOCAL_CONFIG" >"$local_config")
        agent_args="$agent_args -config-file=$local_config"
    fi
    log "starting the local Consul agent: consul agent $agent_args"
    # shellcheck disable=SC2086
    spawn_without_secrets consul agent $agent_args
    consul_pid=$!
fi
if [ "$#" -gt 0 ]; then
    log "starting the app: $*"
    spawn_without_secrets "$@"
    app_pid=$!
fi

mkdir -p "$out"
backoff=1
while :; do
    # Block on Consul only once HAProxy runs: the first render must not wait.
    waiting=
    [ -n "$haproxy_pid" ] && waiting="--wait $wait_for --poll-interval $poll_interval"
    # $meshgen is a command line and $waiting a list of options: word splitting is wanted here.
    # shellcheck disable=SC2086
    if [ "$live" = 0 ]; then
        $meshgen render --sidecar-for "$service_id" --out "$out" --haproxy "$haproxy" $waiting &
    else
        $meshgen render --sidecar-for "$service_id" --out "$out" --haproxy "$haproxy" \
            --runtime-socket "$out/admin.sock" $waiting &
    fi
    render_pid=$!
    wait "$render_pid"
    code=$?
    render_pid=
    # A floor between renders, should --wait ever return at once: a change meanwhile is still
    # seen by the next wait, whose indexes predate it.
    delay=1
    case $code in
        0 | 3)
            backoff=1
            if [ -z "$haproxy_pid" ]; then
                start_haproxy
            elif [ "$code" = 3 ]; then
                log "the bundle changed: reloading HAProxy"
                kill -USR2 "$haproxy_pid"
            fi
            ;;
        2)
            log "meshgen exited 2 (a usage error): giving up"
            shutdown "error" 2
            ;;
        *)
            # 1: the agent is down or said something wrong; anything else: meshgen was killed (a
            # run cut short tells the next one, which asks for the reload it owes). Wait longer
            # each time, up to the cap.
            delay=$backoff
            backoff=$((backoff * 2))
            [ "$backoff" -gt "$backoff_max" ] && backoff=$backoff_max
            [ "$code" = 1 ] || log "meshgen exited $code"
            log "render failed; HAProxy keeps its last good config; next try in ${delay}s"
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
    if [ -n "$consul_pid" ] && ! kill -0 "$consul_pid" 2>/dev/null; then
        consul_pid=
        shutdown "the Consul agent exited" 1
    fi
    pause "$delay"
done
