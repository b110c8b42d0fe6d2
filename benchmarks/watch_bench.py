#!/usr/bin/env python3
"""Watching Consul: how fast a change goes live, and what an idle sidecar costs the agent.
Prints figures.

1. Time from a change in the agent (double) to the new state being live in HAProxy, with
   start.sh running the sidecar (`--wait`, runtime socket): an upstream instance added (render
   and reload), a CA roots rotation (through the runtime API from HAProxy 3.0, a reload before),
   a leaf renewal (render and reload). Median and p95 over --trials each.
2. Agent requests while nothing changes: `render --wait` periods, counted per endpoint, beside
   the old PoC's loop (a request per endpoint every 10 s, the leaf fetched on every cycle).

    python3 benchmarks/watch_bench.py [--haproxy PATH|all] [--trials 15]
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import meshgen  # noqa: E402
from consul_double import ConsulDouble  # noqa: E402
from harness import EchoServer, free_port, haproxy_builds, register_sidecar, wait_listening  # noqa: E402


def until(predicate, timeout: float = 30.0, step: float = 0.005) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError("the change never went live")
        time.sleep(step)
    return time.monotonic() - start


def runtime(out: Path, command: str) -> str:
    try:
        return meshgen.runtime_command(out / "admin.sock", command)
    except OSError:
        return ""        # between a reload's old and new worker


def served_serial(out: Path) -> int | None:
    """The serial of the leaf the running HAProxy holds for the live bundle."""
    shown = runtime(out, f"show ssl cert {(out / 'live').resolve() / 'leaf.pem'}")
    match = re.search(r"^Serial: ([0-9A-Fa-f]+)$", shown, re.M)
    return int(match.group(1), 16) if match else None


def p95(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=20)[18]


def change_to_live(haproxy: str, trials: int, scratch: Path) -> None:
    double, echo = ConsulDouble().start(), EchoServer()
    port = free_port()
    register_sidecar(double, "web", port, echo.port,
                     upstreams=[{"destination_name": "redis", "local_bind_port": free_port()}])
    double.add_instance("redis", "10.0.0.1", 21000)
    out = scratch / "out"
    env = dict(os.environ, MESHGEN_SERVICE_ID="web", MESHGEN_OUT=str(out), MESHGEN_WAIT="5m",
               MESHGEN_HAPROXY=haproxy, MESHGEN=f"{sys.executable} {ROOT / 'meshgen.py'}",
               CONSUL_HTTP_ADDR=double.url)
    log = open(scratch / "start.log", "wb")
    wrapper = subprocess.Popen(["sh", str(ROOT / "start.sh")], env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        wait_listening(port, wrapper)
        time.sleep(2)
        live_roots = meshgen.roots_go_live(haproxy)
        roots = "CA roots rotated (live)" if live_roots else "CA roots rotated (reload)"
        results = {"instance added (reload)": [], roots: [], "leaf renewed (reload)": []}
        for trial in range(trials):
            address = f"10.1.{trial // 200}.{trial % 200 + 1}"
            double.add_instance("redis", address, 21000)
            results["instance added (reload)"].append(
                until(lambda: address in runtime(out, "show servers state upstream_redis")))
            time.sleep(1.5)
            # A root rotation as Consul runs it: the new root is listed first (live from 3.0) ...
            double.rotate_root(reissue_leaves=False)
            results[roots].append(
                until(lambda: "2 certificate(s)" in runtime(out, "show ssl ca-file")))
            time.sleep(1.5)
            # ... then leaves are re-issued from it (a reload) ...
            double.reissue_leaves()
            double.renew_leaf("web")
            serial = int(double.leaves["web"]["SerialNumber"].replace(":", ""), 16)
            results["leaf renewed (reload)"].append(until(lambda: served_serial(out) == serial))
            time.sleep(1.5)
            # ... and the old root goes (live again, from 3.0).
            double.drop_old_roots()
            until(lambda: "1 certificate(s)" in runtime(out, "show ssl ca-file"))
            time.sleep(1.5)
        wrapper_log = (scratch / "start.log").read_text()
        reloads, live = wrapper_log.count("reloading HAProxy"), wrapper_log.count("CA roots changed, applied live")
    finally:
        os.killpg(wrapper.pid, signal.SIGTERM)
        wrapper.wait(20)
        log.close()
        double.stop()
        echo.close()
    print(f"change in Consul -> live in HAProxy, {trials} trials each (start.sh, --wait 5m):")
    for label, samples in results.items():
        print(f"  {label:<26} median {statistics.median(samples) * 1000:6.0f} ms   "
              f"p95 {p95(samples) * 1000:6.0f} ms")
    expected_live = 2 * trials if live_roots else 0      # new roots, old roots removed
    print(f"  during the run: {reloads} reloads ({4 * trials - expected_live} expected), {live} changes "
          f"applied live ({expected_live} expected), {wrapper_log.count('render failed')} failed renders")


def idle_requests(haproxy: str, scratch: Path, periods: int, upstreams: int) -> None:
    double = ConsulDouble().start()
    register_sidecar(double, "web", free_port(), free_port(), upstreams=[
        {"destination_name": f"svc{i}", "local_bind_port": free_port()} for i in range(upstreams)])
    out = scratch / "idle"
    command = [sys.executable, str(ROOT / "meshgen.py"), "render", "--proxy-id", "web-sidecar-proxy",
               "--out", str(out), "--haproxy", haproxy, "--http-addr", double.url]
    subprocess.run(command, check=False, capture_output=True)
    before = double.count()
    start = time.monotonic()
    for _ in range(periods):
        subprocess.run([*command, "--wait", "1s"], check=False, capture_output=True)
    per_period = (double.count() - before) / periods
    elapsed = time.monotonic() - start
    double.stop()
    endpoints = 3 + upstreams    # registration, roots, leaf, and each upstream's health
    print(f"\nidle, {upstreams} upstreams, {periods} wait periods of 1 s (standing in for 5 min) "
          f"in {elapsed:.1f} s:")
    print(f"  meshgen --wait: {per_period:.1f} agent requests per wait period "
          f"({endpoints} watched endpoints), {per_period * 12:.0f} per hour with --wait 5m")
    print(f"  old PoC loop:   {endpoints} requests every 10 s (the leaf on every cycle), "
          f"{endpoints * 360} per hour")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--haproxy", default="all",
                        help="an HAProxy binary, or `all`: every build install-deps.sh installed, in turn")
    parser.add_argument("--trials", type=int, default=15)
    args = parser.parse_args()
    for build in haproxy_builds(args.haproxy):
        print(f"\n=== HAProxy {build.version} (Lua {build.lua}, OpenSSL {build.openssl}); {os.cpu_count()} cores")
        with tempfile.TemporaryDirectory() as tmp:
            change_to_live(build.path, args.trials, Path(tmp))
            idle_requests(build.path, Path(tmp), periods=5, upstreams=3)


if __name__ == "__main__":
    main()
