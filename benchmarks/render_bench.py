#!/usr/bin/env python3
"""meshgen render: what a run costs. Prints figures; asserts nothing (the machine is shared).

1. A no-change run against the agent double (median wall time), beside
   `python3 -c 'import requests, click, jinja2, cryptography'` measured in the same run,
   the two interleaved so that machine noise hits both alike.
2. Registrations of 100 to 1000 upstreams with 10 instances each and a small latency injected
   in the double: render time (with and without `haproxy -c`), peak memory, and growth. Each
   upstream has a discovery chain of its own: a service-resolver entry (its connect timeout).
3. The same on a real Consul agent (`--consul BINARY`, a dev agent started for it; no latency
   injected), instances registered in its catalog.

    python3 benchmarks/render_bench.py [--runs 15] [--latency-ms 1] [--consul .deps/consul-bullseye/consul]
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


def seed_agent(double: ConsulDouble, upstreams: int, instances: int, chains: bool = True) -> str:
    double.register({"service": {
        "name": "web", "port": 8080, "address": "127.0.0.1",
        "connect": {"sidecar_service": {"port": 21000, "proxy": {"upstreams": [
            {"destination_name": f"svc-{i:04d}", "local_bind_port": 20000 + i} for i in range(upstreams)]}}}}})
    for i in range(upstreams):
        if chains:
            double.set_config({"Kind": "service-resolver", "Name": f"svc-{i:04d}", "ConnectTimeout": f"{1 + i % 9}s"})
        for j in range(instances):
            double.add_instance(f"svc-{i:04d}", f"10.{i // 250}.{i % 250}.{j + 1}", 21000)
    return "web-sidecar-proxy"


def seed_real_agent(url: str, upstreams: int, instances: int) -> None:
    """The same on a real agent: the sidecar registered with the agent, the instances written
    into the catalog on nodes of their own (no agent-local checks), a resolver entry each."""
    import requests
    session = requests.Session()
    session.put(f"{url}/v1/agent/service/register", json={
        "Name": "web", "Port": 8080, "Address": "127.0.0.1", "Connect": {"SidecarService": {"Port": 21000, "Proxy": {
            "Upstreams": [{"DestinationName": f"svc-{i:04d}", "LocalBindPort": 20000 + i}
                          for i in range(upstreams)]}}}}).raise_for_status()
    for i in range(upstreams):
        session.put(f"{url}/v1/config", json={"Kind": "service-resolver", "Name": f"svc-{i:04d}",
                                              "ConnectTimeout": f"{1 + i % 9}s"}).raise_for_status()
        for j in range(instances):
            address = f"10.{i // 250}.{i % 250}.{j + 1}"
            session.put(f"{url}/v1/catalog/register", json={
                "Node": f"node-{address}", "Address": address, "Service": {
                    "Kind": "connect-proxy", "ID": f"svc-{i:04d}-{j}", "Service": f"svc-{i:04d}-sidecar-proxy",
                    "Port": 21000, "Proxy": {"DestinationServiceName": f"svc-{i:04d}"}}}).raise_for_status()


def meshgen(double: ConsulDouble, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "meshgen.py"), "render", "--proxy-id", "web-sidecar-proxy",
            "--out", str(out), "--http-addr", double.url, *extra]


def no_change_vs_imports(runs: int, haproxy: str) -> None:
    double = ConsulDouble().start()
    seed_agent(double, upstreams=1, instances=1, chains=False)
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


def scale_real(consul: str, sizes: list[int], instances: int, haproxy: str) -> None:
    from real_consul import ConsulProcess
    print(f"\nreal Consul agent ({consul}): upstreams x {instances} instances, each with a resolver entry")
    print(f"{'upstreams':>9} {'render s':>9} {'+ haproxy -c s':>15} {'peak MiB':>9} {'s per 100':>10}")
    for size in sizes:
        agent = ConsulProcess(consul).start()
        try:
            seed_real_agent(agent.url, size, instances)
            target = type("Agent", (), {"url": agent.url})
            with tempfile.TemporaryDirectory() as scratch:
                # The agent's caches fill on the first run; the figure is the second's.
                for attempt in range(2):
                    no_validate, code, rss = timed(meshgen(target, Path(scratch) / f"a{attempt}", "--no-validate"))
                    assert code == 3
                validated, code, _ = timed(meshgen(target, Path(scratch) / "b", "--haproxy", haproxy))
                assert code == 3
        finally:
            agent.remove()
        print(f"{size:>9} {no_validate:>9.2f} {validated:>15.2f} {rss:>9} {no_validate / size * 100:>10.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--latency-ms", type=float, default=1.0)
    parser.add_argument("--instances", type=int, default=10)
    parser.add_argument("--sizes", default="100,250,500,1000")
    parser.add_argument("--consul", default=None, help="a Consul binary: also measure on a real dev agent")
    parser.add_argument("--parts", default="1,2,3")
    parser.add_argument("--haproxy", default="haproxy",
                        help="the HAProxy for haproxy -c; by default `haproxy` on PATH, else the oldest "
                             "build install-deps.sh installed")
    args = parser.parse_args()
    if not shutil.which(args.haproxy):
        args.haproxy = haproxy_builds("all")[0].path
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, haproxy {args.haproxy}")
    sizes = [int(s) for s in args.sizes.split(",")]
    if "1" in args.parts:
        no_change_vs_imports(args.runs, args.haproxy)
    if "2" in args.parts:
        scale(sizes, args.instances, args.latency_ms, args.haproxy)
    if "3" in args.parts and args.consul:
        scale_real(args.consul, sizes, args.instances, args.haproxy)


if __name__ == "__main__":
    main()
