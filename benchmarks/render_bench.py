#!/usr/bin/env python3
"""meshgen render: what a run costs. Prints figures; asserts nothing (the machine is shared).

1. A no-change run against the agent double (median wall time), beside
   `python3 -c 'import requests, click, jinja2, cryptography'` measured in the same run,
   the two interleaved so that machine noise hits both alike.
2. Registrations of 100 to 1000 upstreams with 10 instances each and a small latency injected
   in the double: render time (with and without `haproxy -c`), peak memory, and growth.

    python3 benchmarks/render_bench.py [--runs 15] [--latency-ms 1]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from consul_double import ConsulDouble  # noqa: E402
from harness import haproxy_builds  # noqa: E402

IMPORTS = [sys.executable, "-c", "import requests, click, jinja2, cryptography"]


def timed(command: list[str], env: dict | None = None) -> tuple[float, int, int]:
    """Wall seconds, exit code and peak RSS in MiB of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    return elapsed, os.waitstatus_to_exitcode(status), usage.ru_maxrss // 1024


def seed_agent(double: ConsulDouble, upstreams: int, instances: int) -> str:
    double.register({"service": {
        "name": "web", "port": 8080, "address": "127.0.0.1",
        "connect": {"sidecar_service": {"port": 21000, "proxy": {"upstreams": [
            {"destination_name": f"svc-{i:04d}", "local_bind_port": 20000 + i} for i in range(upstreams)]}}}}})
    for i in range(upstreams):
        for j in range(instances):
            double.add_instance(f"svc-{i:04d}", f"10.{i // 250}.{i % 250}.{j + 1}", 21000)
    return "web-sidecar-proxy"


def meshgen(double: ConsulDouble, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "meshgen.py"), "render", "--proxy-id", "web-sidecar-proxy",
            "--out", str(out), "--http-addr", double.url, *extra]


def no_change_vs_imports(runs: int, haproxy: str) -> None:
    double = ConsulDouble().start()
    seed_agent(double, upstreams=1, instances=1)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "out"
        command = meshgen(double, out, "--haproxy", haproxy)
        assert timed(command)[1] == 3, "the first render must write"
        render_times, import_times = [], []
        for _ in range(runs):
            elapsed, code, _ = timed(command)
            assert code == 0, "a no-change run must exit 0"
            render_times.append(elapsed)
            import_times.append(timed(IMPORTS)[0])
    double.stop()
    render_median, import_median = statistics.median(render_times), statistics.median(import_times)
    print(f"no-change run, median of {runs}:       {render_median * 1000:7.1f} ms")
    print(f"import baseline, median of {runs}:     {import_median * 1000:7.1f} ms")
    print(f"ratio (target <= 1.5):               {render_median / import_median:7.2f}x")


def scale(sizes: list[int], instances: int, latency_ms: float, haproxy: str) -> None:
    print(f"\nupstreams x {instances} instances, {latency_ms:g} ms injected per agent request")
    print(f"{'upstreams':>9} {'render s':>9} {'+ haproxy -c s':>15} {'peak MiB':>9} {'s per 100':>10}")
    rows = []
    for size in sizes:
        double = ConsulDouble().start()
        seed_agent(double, size, instances)
        double.latency = latency_ms / 1000
        with tempfile.TemporaryDirectory() as scratch:
            no_validate, code, rss = timed(meshgen(double, Path(scratch) / "a", "--no-validate"))
            assert code == 3
            validated, code, _ = timed(meshgen(double, Path(scratch) / "b", "--haproxy", haproxy))
            assert code == 3
        double.stop()
        rows.append((size, no_validate))
        print(f"{size:>9} {no_validate:>9.2f} {validated:>15.2f} {rss:>9} {no_validate / size * 100:>10.3f}")
    sizes_, times = [r[0] for r in rows], [r[1] for r in rows]
    slope, intercept = statistics.linear_regression(sizes_, times)
    worst = max(abs(t - (intercept + slope * n)) / t for n, t in rows)
    print(f"linear fit: {intercept:.2f} s + {slope * 1000:.2f} ms per upstream; "
          f"largest deviation from the line {worst:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--latency-ms", type=float, default=1.0)
    parser.add_argument("--instances", type=int, default=10)
    parser.add_argument("--sizes", default="100,250,500,1000")
    parser.add_argument("--haproxy", default="haproxy",
                        help="the HAProxy for haproxy -c; by default `haproxy` on PATH, else the oldest "
                             "build install-deps.sh installed")
    args = parser.parse_args()
    if not shutil.which(args.haproxy):
        args.haproxy = haproxy_builds("all")[0].path
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, haproxy {args.haproxy}")
    no_change_vs_imports(args.runs, args.haproxy)
    scale([int(s) for s in args.sizes.split(",")], args.instances, args.latency_ms, args.haproxy)


if __name__ == "__main__":
    main()
