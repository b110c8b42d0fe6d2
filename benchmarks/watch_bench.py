#!/usr/bin/env python3
"""Watching Consul: how fast a change goes live, how often a sidecar reloads, and what an idle
sidecar costs the agent. Prints figures.

1. Time from a change in the agent (double) to its effect in HAProxy, with start.sh running
   the sidecar (`--wait`, runtime socket): an upstream instance added (seen in `show servers
   state`), a CA root rotation (a client holding a leaf of the new root let in), this
   sidecar's leaf re-issued from the new root (the new serial served), the old root dropped.
   Median and p95 over --trials each, and how many of each went in live or by a reload.
2. Reloads per hour of a sidecar with 50 upstreams under instance churn, every change a reload
   (MESHGEN_LIVE=0, as before) beside live changes through the runtime API, side by side.
3. Agent requests while nothing changes: `render --wait` periods, counted per endpoint, beside
   the old PoC's loop (a request per endpoint every 10 s, the leaf fetched on every cycle).

    python3 benchmarks/watch_bench.py [--haproxy PATH|all] [--trials 15] [--churn-seconds 60] [--parts 1,2,3]
"""
from __future__ import annotations

import argparse
import os
import random
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
from cryptography.hazmat.primitives import serialization  # noqa: E402
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
        return meshgen.RuntimeAPI(out / "admin.sock")(command)
    except OSError:
        return ""        # between a reload's old and new worker


def p95(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=20)[18]


class StartSh:
    """start.sh running the `web` sidecar against the double."""

    def __init__(self, double, haproxy: str, scratch: Path, port: int, live: bool = True):
        self.out, self.log_path = scratch / f"out-{live}", scratch / f"start-{live}.log"
        env = dict(os.environ, MESHGEN_SERVICE_ID="web", MESHGEN_OUT=str(self.out), MESHGEN_WAIT="5m",
                   MESHGEN_HAPROXY=haproxy, MESHGEN=f"{sys.executable} {ROOT / 'meshgen.py'}",
                   MESHGEN_LIVE="1" if live else "0", CONSUL_HTTP_ADDR=double.url)
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(["sh", str(ROOT / "start.sh")], env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        wait_listening(port, self.process, timeout=60)
        time.sleep(2)

    def counts(self) -> tuple[int, int]:
        """(reloads, changes applied live) so far."""
        log = self.log_path.read_text()
        return log.count("reloading HAProxy"), log.count("applied live through")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(20)
        self._log.close()


def change_to_live(haproxy: str, trials: int, scratch: Path) -> None:
    double, echo = ConsulDouble().start(), EchoServer()
    port = free_port()
    register_sidecar(double, "web", port, echo.port,
                     upstreams=[{"destination_name": "redis", "local_bind_port": free_port()}])
    double.add_instance("redis", "10.0.0.1", 21000)
    listener = ("127.0.0.1", port)
    wrapper = StartSh(double, haproxy, scratch, port)
    results = {name: [] for name in ("instance added", "CA roots rotated", "leaf re-issued", "old root dropped")}
    how = {name: [0, 0] for name in results}            # [live, reload]

    def timed(name: str, change, effect) -> None:
        before = wrapper.counts()
        change()
        results[name].append(until(effect))
        time.sleep(1.5)     # start.sh's floor between renders, and the reload's old worker
        reloads, live = (after - earlier for after, earlier in zip(wrapper.counts(), before))
        how[name][0] += live
        how[name][1] += reloads

    try:
        for trial in range(trials):
            address = f"10.1.{trial // 200}.{trial % 200 + 1}"
            timed("instance added", lambda: double.add_instance("redis", address, 21000),
                  lambda: address in runtime(wrapper.out, "show servers state upstream_redis"))
            # A root rotation in Consul's order: the new root is listed first ...
            timed("CA roots rotated", lambda: double.rotate_root(reissue_leaves=False),
                  lambda: meshgen.lets_in(listener, new_root_client(double)))
            # ... then leaves are re-issued from it ...
            timed("leaf re-issued", double.reissue_leaves,
                  lambda: meshgen.served_serial(listener) == double.leaves["web"]["_serial"])
            # ... and the old root goes.
            old = double.roots[0]
            timed("old root dropped", double.drop_old_roots,
                  lambda: not meshgen.lets_in(listener, client_of(double, old)))
        failed = wrapper.log_path.read_text().count("render failed")
    finally:
        wrapper.stop()
        double.stop()
        echo.close()
    print(f"change in Consul -> its effect in HAProxy, {trials} trials each (start.sh, --wait 5m):")
    for name, samples in results.items():
        print(f"  {name:<18} median {statistics.median(samples) * 1000:6.0f} ms   p95 {p95(samples) * 1000:6.0f} ms"
              f"   {how[name][0]} live, {how[name][1]} by reload")
    print(f"  failed renders: {failed}")


def new_root_client(double) -> bytes:
    return client_of(double, double.roots[-1])


def client_of(double, root) -> bytes:
    """A client certificate and key of the mesh, signed by `root`."""
    cert, key = double.ca.issue_leaf(root, double.service_uri("api"))
    return cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def churn(haproxy: str, scratch: Path, seconds: float, upstreams: int = 50) -> None:
    """Instances of random upstreams come and go every 0.5 s; start.sh with and without live
    changes, one after the other on the same churn."""
    print(f"\n{upstreams} upstreams, an instance joining or leaving every 0.5 s for {seconds:.0f} s:")
    for live in (False, True):
        double, echo = ConsulDouble().start(), EchoServer()
        port = free_port()
        register_sidecar(double, "web", port, echo.port, upstreams=[
            {"destination_name": f"svc{i}", "local_bind_port": free_port()} for i in range(upstreams)])
        for i in range(upstreams):
            double.add_instance(f"svc{i}", f"10.2.{i}.1", 21000, service_id=f"svc{i}-1")
        wrapper = StartSh(double, haproxy, scratch, port, live=live)
        rng, extra, start = random.Random(5), {}, time.monotonic()
        try:
            while time.monotonic() - start < seconds:
                i = rng.randrange(upstreams)
                if extra.get(i):
                    double.remove_instance(f"svc{i}", extra.pop(i))
                else:
                    extra[i] = double.add_instance(f"svc{i}", f"10.3.{i}.{rng.randint(1, 250)}", 21000,
                                                   service_id=f"svc{i}-2")
                time.sleep(0.5)
            time.sleep(2)
            reloads, applied = wrapper.counts()
            failed = wrapper.log_path.read_text().count("render failed")
        finally:
            wrapper.stop()
            double.stop()
            echo.close()
        per_hour = 3600 / seconds
        print(f"  {'live changes:         ' if live else 'each change a reload:'} {reloads * per_hour:7.0f} reloads per hour, "
              f"{applied * per_hour:6.0f} renders applied live per hour ({reloads} and {applied} in the run, "
              f"{failed} failed renders)")


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
    watched = 4 + 2 * upstreams    # registration, roots, leaf, intentions; each upstream's chain and health
    polled = 3 + upstreams         # the PoC's loop: registration, roots, leaf, each upstream's health
    print(f"\nidle, {upstreams} upstreams, {periods} wait periods of 1 s (standing in for 5 min) "
          f"in {elapsed:.1f} s:")
    print(f"  meshgen --wait: {per_period:.1f} agent requests per wait period "
          f"({watched} watched endpoints), {per_period * 12:.0f} per hour with --wait 5m")
    print(f"  old PoC loop:   {polled} requests every 10 s (the leaf on every cycle), "
          f"{polled * 360} per hour")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--haproxy", default="all",
                        help="an HAProxy binary, or `all`: every build install-deps.sh installed, in turn")
    parser.add_argument("--trials", type=int, default=15)
    parser.add_argument("--churn-seconds", type=float, default=60)
    parser.add_argument("--parts", default="1,2,3")
    args = parser.parse_args()
    for build in haproxy_builds(args.haproxy):
        print(f"\n=== HAProxy {build.version} (Lua {build.lua}, OpenSSL {build.openssl}); {os.cpu_count()} cores")
        with tempfile.TemporaryDirectory() as tmp:
            if "1" in args.parts:
                change_to_live(build.path, args.trials, Path(tmp))
            if "2" in args.parts:
                churn(build.path, Path(tmp), args.churn_seconds)
            if "3" in args.parts:
                idle_requests(build.path, Path(tmp), periods=5, upstreams=3)


if __name__ == "__main__":
    main()
