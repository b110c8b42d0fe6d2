#!/usr/bin/env python3
"""authorize.lua: what authorization costs new mutual-TLS connections. Prints figures.

New connections per second through the public listener, side by side in one run (the modes
take turns, several rounds): (a) no authorization (the two tcp-request lines removed),
(b) an agent call on every connection (cache off), (c) with the decision cache. Each connection
is a full TLS handshake with a client certificate, one line echoed by the app, then closed.
Beside the rate: HAProxy's own CPU time per connection, which is what bounds a sidecar's
capacity; the rate also carries the load clients and the Python agent double sharing 2 cores.

Then the latency of cached connections while other identities wait 1 s on the agent, against
idle: p50 and p99.

    python3 benchmarks/authorize_bench.py [--haproxy PATH|all] [--seconds 3] [--rounds 3] [--clients 3]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from harness import EchoServer, free_port, haproxy_builds, latencies, talk, wait_listening  # noqa: E402

MODES = {"a": "no authorization", "b": "authorize, cache off", "c": "authorize, cached"}


def client_loop(port: int, cert: str, key: str, roots: str, deadline: float, counter) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(roots)
    context.load_cert_chain(cert, key)
    done = 0
    while time.time() < deadline:
        with socket.create_connection(("127.0.0.1", port)) as raw, context.wrap_socket(raw) as conn:
            conn.sendall(b"ping\n")
            if conn.recv(16) == b"ping\n":
                done += 1
    with counter.get_lock():
        counter.value += done


def haproxy_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(haproxy: str, config: Path, port: int, identity: dict, seconds: float, clients: int):
    process = subprocess.Popen([haproxy, "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, process)
        counter = multiprocessing.Value("i", 0)

        def run_clients(until: float) -> None:
            workers = [multiprocessing.Process(target=client_loop, args=(port, *identity.values(), until, counter))
                       for _ in range(clients)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()

        run_clients(time.time() + 0.5)              # warm up: TLS caches, Lua states
        counter.value = 0
        cpu_before, start = haproxy_cpu(process.pid), time.time()
        run_clients(start + seconds)
        elapsed, cpu = time.time() - start, haproxy_cpu(process.pid) - cpu_before
        return counter.value / elapsed, cpu / max(counter.value, 1)
    finally:
        process.terminate()
        process.wait()


def start_agent(scratch: Path, app_port: int, public_port: int) -> tuple[subprocess.Popen, str]:
    services = scratch / "services.json"
    services.write_text(json.dumps({"service": {
        "name": "web", "port": app_port, "address": "127.0.0.1",
        "connect": {"sidecar_service": {"port": public_port, "proxy": {"config": {
            "authorize_cache_ttl_ms": 0, "authorize_timeout_ms": 5000}}}}}}))
    port = free_port()
    agent = subprocess.Popen([sys.executable, str(ROOT / "tests" / "consul_double.py"), "--port", str(port),
                              str(services)], stdout=subprocess.DEVNULL)
    wait_listening(port, agent)
    return agent, f"127.0.0.1:{port}"


def fetch_identity(agent: str, service: str, scratch: Path) -> dict:
    leaf = json.loads(urllib.request.urlopen(f"http://{agent}/v1/agent/connect/ca/leaf/{service}").read())
    roots = json.loads(urllib.request.urlopen(f"http://{agent}/v1/agent/connect/ca/roots").read())
    files = {"cert": leaf["CertPEM"], "key": leaf["PrivateKeyPEM"],
             "roots": "".join(r["RootCert"] for r in roots["Roots"])}
    for name, text in files.items():
        (scratch / f"{service}.{name}").write_text(text)
    return {name: str(scratch / f"{service}.{name}") for name in files}


def variants(bundle: Path) -> dict:
    """(a), (b) and (c) from the one rendered config: same files, same listeners."""
    config = (bundle / "haproxy.cfg").read_text()
    authorization = [line for line in config.splitlines(keepends=True)
                     if line.strip().startswith(("tcp-request content lua.meshgen_authorize",
                                                 "tcp-request content reject unless"))]
    assert len(authorization) == 2
    paths = {}
    for mode, text in {
        "a": "".join(line for line in config.splitlines(keepends=True) if line not in authorization),
        "b": config,
        "c": config.replace("set-var proc.meshgen_cache_ttl_ms int(0)", "set-var proc.meshgen_cache_ttl_ms int(600000)"),
    }.items():
        paths[mode] = bundle.parent / f"haproxy-{mode}.cfg"
        paths[mode].write_text(text)
    return paths


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


def slow_agent_latency(haproxy: str, scratch: Path, seconds: float) -> tuple[list[float], list[float]]:
    """Latency of a cached identity, idle and while 4 other identities wait 1 s on the agent.
    The agent double runs in this process here, since only it can be slowed on demand."""
    import meshgen
    from consul_double import ConsulDouble
    from harness import HAProxy, Identity, register_sidecar

    double, echo = ConsulDouble().start(), EchoServer()
    port = free_port()
    proxy_id = register_sidecar(double, "web", port, echo.port,
                                {"authorize_cache_ttl_ms": 600000, "authorize_timeout_ms": 5000})
    out = scratch / "latency"
    assert meshgen.cli.main(["render", "--proxy-id", proxy_id, "--out", str(out), "--haproxy", haproxy,
                             "--http-addr", double.url], prog_name="meshgen", standalone_mode=False) == 3
    process = HAProxy(haproxy, out / "haproxy.cfg", scratch / "latency.log", wait_for_port=port)
    try:
        fast = Identity.from_double(double, scratch / "ids", "api").context()
        assert talk(port, fast) == b"ping\n"      # cached from here on

        idle = latencies(port, fast, seconds)
        double.inject("/v1/agent/connect/authorize", delay=1.0)
        stop = time.monotonic() + seconds

        def keep_waiting(name: str):
            # A fresh leaf each time: a new serial misses the cache, so every attempt waits 1 s.
            while time.monotonic() < stop:
                talk(port, Identity.from_double(double, scratch / "ids", name).context())
        waiting = [threading.Thread(target=keep_waiting, args=(f"slow{i}",)) for i in range(4)]
        for thread in waiting:
            thread.start()
        time.sleep(0.05)
        busy = latencies(port, fast, seconds - 0.1)
        for thread in waiting:
            thread.join()
        return idle, busy
    finally:
        process.stop()
        double.stop()
        echo.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--haproxy", default="all",
                        help="an HAProxy binary, or `all`: every build install-deps.sh installed, in turn")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=3)
    args = parser.parse_args()
    for build in haproxy_builds(args.haproxy):
        print(f"\n=== HAProxy {build.version} (Lua {build.lua}, OpenSSL {build.openssl})")
        bench(build.path, args)


def bench(haproxy: str, args) -> None:
    import meshgen

    echo = EchoServer()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        public_port = free_port()
        agent, agent_addr = start_agent(scratch, echo.port, public_port)
        try:
            code = meshgen.cli.main(["render", "--sidecar-for", "web", "--out", str(scratch / "out"),
                                     "--haproxy", haproxy, "--http-addr", agent_addr],
                                    prog_name="meshgen", standalone_mode=False)
            assert code == 3
            configs = variants((scratch / "out" / "live").resolve())
            identity = fetch_identity(agent_addr, "api", scratch)
            results = {mode: [] for mode in MODES}
            for _ in range(args.rounds):
                for mode in MODES:
                    results[mode].append(measure(haproxy, configs[mode], public_port, identity,
                                                 args.seconds, args.clients))
        finally:
            agent.terminate()
            agent.wait()
    echo.close()
    print(f"{os.cpu_count()} cores; {args.clients} client processes; "
          f"{args.rounds} rounds of {args.seconds:g} s per mode, modes interleaved")
    print(f"{'mode':<28} {'conn/s':>8} {'vs (a)':>7} {'HAProxy CPU ms/conn':>20} {'capacity vs (a)':>16}")
    rate_a = statistics.median(r for r, _ in results["a"])
    cpu_a = statistics.median(c for _, c in results["a"])
    for mode, label in MODES.items():
        rate = statistics.median(r for r, _ in results[mode])
        cpu = statistics.median(c for _, c in results[mode])
        print(f"({mode}) {label:<24} {rate:>8.0f} {rate / rate_a:>7.2f} {cpu * 1000:>20.2f} {cpu_a / cpu:>16.2f}")
    print("targets: (c)/(a) >= 0.95 and (b)/(a) >= 0.85")

    with tempfile.TemporaryDirectory() as tmp:
        idle, busy = slow_agent_latency(haproxy, Path(tmp), args.seconds * 2)
    print(f"\ncached connections, {len(idle)} idle and {len(busy)} while 4 identities wait 1 s on the agent:")
    print(f"  idle  p50 {statistics.median(idle) * 1000:6.2f} ms   p99 {p99(idle) * 1000:6.2f} ms")
    print(f"  busy  p50 {statistics.median(busy) * 1000:6.2f} ms   p99 {p99(busy) * 1000:6.2f} ms"
          f"   p99 ratio {p99(busy) / p99(idle):.2f} (target <= 2)")


if __name__ == "__main__":
    main()
