#!/usr/bin/env bash
# The demo: the seed's www -> redis example with two meshgen sidecars over mutual TLS, on this
# machine, on a real Consul agent (Consul 1.8.7 in dev mode, which install-deps.sh installs into
# .deps/) or, with --double or when none could be installed, on the Consul agent double.
# Loopback only; cleans up after.
#
#   ./demo/run.sh [--double]
#
#   127.0.0.1:6379  www's upstream listener (www sidecar)  --mTLS-->  127.0.0.1:21001 redis sidecar
#                                                                      --> redis-server 127.0.0.1:6380
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUN=$ROOT/demo/run
AGENT_PORT=${MESHGEN_DEMO_AGENT_PORT:-18500}
use_double=no
case "${1:-}" in
    --double) use_double=yes ;;
    "") ;;
    *) echo "usage: $0 [--double]" >&2; exit 2 ;;
esac

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

say "Installing what the demo needs (HAProxy, Consul, redis-server, Python packages), if missing"
./install-deps.sh
CONSUL=$ROOT/.deps/consul-bullseye/consul
if [ "$use_double" = no ] && ! "$CONSUL" version >/dev/null 2>&1; then
    echo "demo: no Consul could be installed; running on the agent double instead"
    use_double=yes
fi
# The HAProxy start.sh runs: the one on PATH, else Debian's 3.2 that install-deps.sh installed.
export MESHGEN_HAPROXY=${MESHGEN_HAPROXY:-$(command -v haproxy || echo "$ROOT/.deps/haproxy-sid/haproxy")}
"$MESHGEN_HAPROXY" -v | head -n 1

for port in "$AGENT_PORT" 6379 6380 8081 21000 21001 18300 18301 18302; do
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

# Through the intentions API that every Consul version has (1.8 has no /intentions/exact).
set_intention() {
    python3 - "$AGENT_PORT" "$1" <<'EOF'
import sys
sys.path.insert(0, "tests")
from real_consul import RealAgent
port, action = sys.argv[1], sys.argv[2]
RealAgent(f"http://127.0.0.1:{port}").set_intention("www", "redis", action)
EOF
    echo "intention www -> redis: $1"
}

if [ "$use_double" = yes ]; then
    say "Starting the Consul agent double with the seed's registrations (demo/services.json)"
    python3 tests/consul_double.py --port "$AGENT_PORT" demo/services.json >"$RUN/agent.log" 2>&1 &
    pids+=($!)
    wait_port "$AGENT_PORT"
    cat "$RUN/agent.log"
else
    say "Starting a real Consul agent ($("$CONSUL" version | head -n 1), dev mode) with the seed's registrations"
    "$CONSUL" agent -dev -bind 127.0.0.1 -client 127.0.0.1 -log-level warn -hcl \
        "ports { http = $AGENT_PORT, dns = -1, grpc = -1, serf_lan = 18301, serf_wan = 18302, server = 18300 }" \
        >"$RUN/consul.log" 2>&1 &
    pids+=($!)
    python3 - "$AGENT_PORT" <<'EOF'
import json, sys, time
sys.path.insert(0, "tests")
import requests
from real_consul import RealAgent
agent = RealAgent(f"http://127.0.0.1:{sys.argv[1]}")
for _ in range(150):      # until its CA signs leaves
    try:
        if agent.roots().get("Roots") and agent.leaf("www"):
            break
    except requests.RequestException:
        pass
    time.sleep(0.2)
data = json.load(open("demo/services.json"))
for registration in data["services"]:
    agent.register(registration)
for source, destination, action in data["intentions"]:
    agent.set_intention(source, destination, action)
EOF
    echo "agent on 127.0.0.1:$AGENT_PORT: www and redis registered, intention www -> redis: allow"
fi
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
# The redis sidecar's meshgen wakes on the intentions' index and changes the map in HAProxy.
for _ in $(seq 40); do
    reply=$(ping_redis)
    [ "$reply" != PONG ] && break
    sleep 0.25
done
echo "redis-cli -p 6379 ping -> ${reply:-no answer}"
[ "$reply" != PONG ] || { echo "demo: the deny did not take effect" >&2; exit 1; }
grep -h "applied live" "$RUN/redis-sidecar.log" | tail -n 1
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
