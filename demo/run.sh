#!/usr/bin/env bash
# The demo: the seed's www -> redis example with two meshgen sidecars over mutual TLS, on this
# machine, with the Consul agent double standing in for Consul. Loopback only; cleans up after.
#
#   127.0.0.1:6379  www's upstream listener (www sidecar)  --mTLS-->  127.0.0.1:21001 redis sidecar
#                                                                      --> redis-server 127.0.0.1:6380
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUN=$ROOT/demo/run
AGENT_PORT=${MESHGEN_DEMO_AGENT_PORT:-18500}

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

say "Installing what the demo needs (HAProxy, redis-server, Python packages), if missing"
./install-deps.sh

for port in "$AGENT_PORT" 6379 6380 8081 21000 21001; do
    if python3 -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1',$port))!=0)"; then
        echo "demo: port $port on 127.0.0.1 is in use; stop what listens there and run again" >&2
        exit 1
    fi
done

rm -rf "$RUN"
mkdir -p "$RUN"
pids=()
cleanup() {
    say "Cleaning up"
    # start.sh stops its HAProxy on SIGTERM.
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    echo "logs are in demo/run/"
}
trap cleanup EXIT

wait_port() {
    for _ in $(seq 100); do
        python3 -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1',$1))!=0)" && return 0
        sleep 0.1
    done
    echo "demo: nothing came up on port $1" >&2
    return 1
}

ping_redis() { timeout 5 redis-cli -h 127.0.0.1 -p 6379 ping 2>&1 || true; }

set_intention() {
    python3 - "$AGENT_PORT" "$1" <<'EOF'
import json, sys, urllib.request
port, action = sys.argv[1], sys.argv[2]
request = urllib.request.Request(
    f"http://127.0.0.1:{port}/v1/connect/intentions/exact?source=www&destination=redis",
    data=json.dumps({"Action": action}).encode(), method="PUT")
urllib.request.urlopen(request, timeout=5).read()
EOF
    echo "intention www -> redis: $1"
}

say "Starting the Consul agent double with the seed's registrations (demo/services.json)"
python3 tests/consul_double.py --port "$AGENT_PORT" demo/services.json >"$RUN/agent.log" 2>&1 &
pids+=($!)
wait_port "$AGENT_PORT"
cat "$RUN/agent.log"
export CONSUL_HTTP_ADDR=127.0.0.1:$AGENT_PORT

say "Starting redis-server on 127.0.0.1:6380: the app behind the redis sidecar"
redis-server --bind 127.0.0.1 --port 6380 --save '' --appendonly no >"$RUN/redis-server.log" 2>&1 &
pids+=($!)
wait_port 6380

for service in redis www; do
    say "Starting the $service sidecar with start.sh: meshgen waits on Consul, HAProxy reloads on changes"
    MESHGEN_SERVICE_ID=$service MESHGEN_OUT="$RUN/$service" \
        MESHGEN="python3 $ROOT/meshgen.py" ./start.sh >"$RUN/$service-sidecar.log" 2>&1 &
    pids+=($!)
done
wait_port 21001
wait_port 6379
grep -h "start.sh:" "$RUN/redis-sidecar.log" "$RUN/www-sidecar.log"
run python3 meshgen.py show --sidecar-for www

say "PING from the www side, through both sidecars over mutual TLS"
reply=""
for _ in $(seq 50); do
    reply=$(ping_redis)
    [ "$reply" = PONG ] && break
    sleep 0.2
done
echo "redis-cli -p 6379 ping -> $reply"
[ "$reply" = PONG ] || { echo "demo: expected PONG" >&2; exit 1; }
grep 'authz=' "$RUN/redis-sidecar.log" | tail -n 1

say "Denying www -> redis in Consul's intentions"
set_intention deny
sleep 2   # the redis sidecar caches decisions for 1 s in this demo (authorize_cache_ttl_ms)
reply=$(ping_redis)
echo "redis-cli -p 6379 ping -> ${reply:-no answer}"
[ "$reply" != PONG ] || { echo "demo: the deny did not take effect" >&2; exit 1; }
echo "the redis sidecar's log says why:"
grep 'authz=deny' "$RUN/redis-sidecar.log" | tail -n 1

say "Allowing it again"
set_intention allow
for _ in $(seq 60); do
    reply=$(ping_redis)
    [ "$reply" = PONG ] && break
    sleep 0.25   # the www sidecar's Redis health check brings the server back within seconds
done
echo "redis-cli -p 6379 ping -> $reply"
[ "$reply" = PONG ] || { echo "demo: expected PONG again" >&2; exit 1; }

say "Done: www reached redis only while Consul's intentions allowed it"
