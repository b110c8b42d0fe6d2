#!/usr/bin/env python3
"""Intentions enforced in HAProxy: what they cost new mutual-TLS connections, how fast a
change in Consul takes effect, and what a stopped agent changes. Prints figures.

1. New connections per second through the public listener, side by side in one run (the modes
   take turns, several rounds): (a) no authorization (the public listener's tcp-request lines
   removed), (b) callers an intention names, (c) callers never seen before, that no intention
   names (decided by the map's "*" line). Each connection is a full TLS handshake with a client
   certificate, one line echoed by the app, then closed; clients cycle through 50 identities.
   Beside the rate: HAProxy's own CPU time per connection, which bounds a sidecar's capacity.
2. With start.sh running the sidecar (`--wait`, runtime socket): an intention turned to deny in
   the agent -> new connections of that caller refused, and its open connections closed;
   median and p95 over --trials.
3. The agent stopped for --outage seconds, HAProxy reloaded halfway: connections of allowed
   callers refused (the target is none), and of a denied caller let in (none either).

    python3 benchmarks/authorize_bench.py [--haproxy PATH|all] [--seconds 3] [--rounds 3]
        [--clients 3] [--trials 20] [--outage 60] [--parts 1,2,3]
"""
from __future__ import annotations

import argparse
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import meshgen  # noqa: E402
from consul_double import ConsulDouble  # noqa: E402
from harness import (EchoServer, HAProxy, Identity, free_port, haproxy_builds, register_sidecar,  # noqa: E402
                     talk, wait_listening)
from watch_bench import StartSh, p95, until  # noqa: E402

MODES = {"a": "no authorization", "b": "callers an intention names", "c": "callers never seen before"}
CALLERS = 50


def client_loop(port: int, identities: list, deadline: float, counter) -> None:
    contexts = []
    for cert, key, roots in identities:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(roots)
        context.load_cert_chain(cert, key)
        contexts.append(context)
    done = 0
    while time.time() < deadline:
        context = contexts[done % len(contexts)]
        with socket.create_connection(("127.0.0.1", port)) as raw, context.wrap_socket(raw) as conn:
            conn.sendall(b"ping\n")
            if conn.recv(16) == b"ping\n":
                done += 1
    with counter.get_lock():
        counter.value += done


def haproxy_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(haproxy: str, config: Path, port: int, identities: list, seconds: float, clients: int):
    process = subprocess.Popen([haproxy, "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, process)
        counter = multiprocessing.Value("i", 0)

        def run_clients(until_time: float) -> None:
            workers = [multiprocessing.Process(target=client_loop, args=(port, identities, until_time, counter))
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


def identities(double, scratch: Path, prefix: str) -> list:
    made = [Identity.from_double(double, scratch / "ids", f"{prefix}{i}") for i in range(CALLERS)]
    return [(str(i.cert), str(i.key), str(i.roots)) for i in made]


def without_authorization(config: str) -> str:
    """haproxy.cfg with the public listener's authorization lines left out."""
    section = config.split("\nfrontend public_listener\n")[1].split("\n\n")[0]
    kept = "\n".join(line for line in section.split("\n")
                     if not line.strip().startswith("tcp-request content"))
    return config.replace(section, kept)


def throughput(haproxy: str, args, scratch: Path) -> None:
    double, echo = ConsulDouble().start(), EchoServer()
    port = free_port()
    proxy_id = register_sidecar(double, "web", port, echo.port)
    for i in range(CALLERS):
        double.set_intention(f"known{i}", "web", "allow")
    out = scratch / "throughput"
    assert meshgen.cli.main(["render", "--proxy-id", proxy_id, "--out", str(out), "--haproxy", haproxy,
                             "--http-addr", double.url], prog_name="meshgen", standalone_mode=False) == 3
    config = (out / "haproxy.cfg").read_text()
    configs = {"a": out / "live" / "haproxy-a.cfg", "b": out / "haproxy.cfg", "c": out / "haproxy.cfg"}
    configs["a"].write_text(without_authorization(config))
    callers = {"a": identities(double, scratch, "known"), "b": identities(double, scratch, "known"),
               "c": identities(double, scratch, "unseen")}
    results = {mode: [] for mode in MODES}
    try:
        for _ in range(args.rounds):
            for mode in MODES:
                results[mode].append(measure(haproxy, configs[mode], port, callers[mode], args.seconds, args.clients))
    finally:
        double.stop()
        echo.close()
    print(f"{os.cpu_count()} cores; {args.clients} client processes; {args.rounds} rounds of "
          f"{args.seconds:g} s per mode, modes interleaved; {CALLERS} caller identities per mode")
    print(f"{'mode':<32} {'conn/s':>8} {'vs (a)':>7} {'HAProxy CPU ms/conn':>20} {'capacity vs (a)':>16}")
    rate_a = statistics.median(r for r, _ in results["a"])
    cpu_a = statistics.median(c for _, c in results["a"])
    for mode, label in MODES.items():
        rate = statistics.median(r for r, _ in results[mode])
        cpu = statistics.median(c for _, c in results[mode])
        print(f"({mode}) {label:<28} {rate:>8.0f} {rate / rate_a:>7.2f} {cpu * 1000:>20.2f} {cpu_a / cpu:>16.2f}")
    print("target: (b)/(a) and (c)/(a) >= 0.97")


class OpenConnections:
    """Connections of one caller left open after a first echo; when each saw its close."""

    def __init__(self, port: int, context, count: int):
        self.closed_at: list[float] = []
        self.sockets = []
        for _ in range(count):
            tls = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30))
            tls.sendall(b"ping\n")
            assert tls.recv(16) == b"ping\n"
            self.sockets.append(tls)
        self.threads = [threading.Thread(target=self._wait_close, args=(tls,)) for tls in self.sockets]
        for thread in self.threads:
            thread.start()

    def _wait_close(self, tls) -> None:
        try:
            while tls.recv(16):
                pass
        except (OSError, ssl.SSLError):
            pass
        self.closed_at.append(time.monotonic())

    def join(self, timeout: float) -> list[float]:
        for thread in self.threads:
            thread.join(timeout)
        for tls in self.sockets:
            tls.close()
        return self.closed_at


def revocation(haproxy: str, trials: int, scratch: Path) -> None:
    double, echo = ConsulDouble().start(), EchoServer()
    port = free_port()
    register_sidecar(double, "web", port, echo.port)
    double.set_intention("api", "web", "allow")
    client = Identity.from_double(double, scratch / "ids", "api").context()
    wrapper = StartSh(double, haproxy, scratch, port)
    refused, closed, reloads = [], [], 0
    try:
        for _ in range(trials):
            held = OpenConnections(port, client, 3)
            before = wrapper.counts()[0]
            revoked = time.monotonic()
            double.set_intention("api", "web", "deny")
            refused.append(until(lambda: talk(port, client, timeout=2) is None))
            closed += [at - revoked for at in held.join(10)]
            double.set_intention("api", "web", "allow")
            until(lambda: talk(port, client, timeout=2) == b"ping\n")
            time.sleep(1.2)      # start.sh's floor between renders
            reloads += wrapper.counts()[0] - before
    finally:
        wrapper.stop()
        double.stop()
        echo.close()
    print(f"\nan intention turned to deny -> its effect, {trials} trials (start.sh, --wait 5m):")
    print(f"  new connections refused    median {statistics.median(refused) * 1000:5.0f} ms   "
          f"p95 {p95(refused) * 1000:5.0f} ms")
    print(f"  open connections closed    median {statistics.median(closed) * 1000:5.0f} ms   "
          f"p95 {p95(closed) * 1000:5.0f} ms   ({len(closed)} connections, 3 per trial)")
    print(f"  reloads: {reloads}; target: p95 < 1000 ms for both")


def outage(haproxy: str, seconds: float, scratch: Path) -> None:
    double, echo = ConsulDouble().start(), EchoServer()
    port = free_port()
    proxy_id = register_sidecar(double, "web", port, echo.port)
    double.set_intention("api", "web", "allow")
    double.set_intention("intruder", "web", "deny")
    out = scratch / "outage"
    assert meshgen.cli.main(["render", "--proxy-id", proxy_id, "--out", str(out), "--haproxy", haproxy,
                             "--http-addr", double.url], prog_name="meshgen", standalone_mode=False) == 3
    process = HAProxy(haproxy, out / "haproxy.cfg", scratch / "outage.log", wait_for_port=port,
                      master_socket=scratch / "outage.master")
    allowed = [Identity.from_double(double, scratch / "ids", "api").context(),
               Identity.from_double(double, scratch / "ids", "newcomer").context()]   # the "*" line
    intruder = Identity.from_double(double, scratch / "ids", "intruder").context()
    counts = {"allowed in": 0, "allowed refused": 0, "denied in": 0, "denied refused": 0}
    try:
        double.stop()
        start, reloaded = time.monotonic(), False
        while time.monotonic() - start < seconds:
            if not reloaded and time.monotonic() - start > seconds / 2:
                process.reload()
                reloaded = True
            for context in allowed:
                counts["allowed in" if talk(port, context) == b"ping\n" else "allowed refused"] += 1
            counts["denied in" if talk(port, intruder) == b"ping\n" else "denied refused"] += 1
    finally:
        process.stop()
        echo.close()
    print(f"\nthe agent stopped for {seconds:.0f} s, HAProxy reloaded at {seconds / 2:.0f} s: "
          f"{counts['allowed in']} connections of allowed callers let in, {counts['allowed refused']} refused; "
          f"{counts['denied refused']} of a denied caller refused, {counts['denied in']} let in")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--haproxy", default="all",
                        help="an HAProxy binary, or `all`: every build install-deps.sh installed, in turn")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--outage", type=float, default=60.0)
    parser.add_argument("--parts", default="1,2,3", help="which of the parts above to run, e.g. `1`")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    for build in haproxy_builds(args.haproxy):
        print(f"\n=== HAProxy {build.version} (Lua {build.lua}, OpenSSL {build.openssl})")
        with tempfile.TemporaryDirectory() as tmp:
            if "1" in parts:
                throughput(build.path, args, Path(tmp))
            if "2" in parts:
                revocation(build.path, args.trials, Path(tmp))
            if "3" in parts:
                outage(build.path, args.outage, Path(tmp))


if __name__ == "__main__":
    main()
