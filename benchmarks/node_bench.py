#!/usr/bin/env python3
"""A node full of sidecars on one real Consul 1.8.7 agent with its default limits (at most 200
HTTP connections from one address). Prints figures.

1. --sidecars sidecars of --upstreams upstreams each, --shared of them sharing one upstream, all
   waiting (`meshgen render --wait 10m --no-validate`, each rendered once before) for --hold
   seconds: how many ended early or said the agent refused them, and the connections they held
   (counted on the agent's port with `ss`), the agent's and meshgen's CPU time meanwhile.
2. Then, --rounds times: a new instance of the shared upstream is registered, and each sidecar
   that shares it must end its wait: the change-to-exit time of each, and p50/p95 over all.
3. One sidecar of --big upstreams on the same agent: waiting, its connections, and the
   change-to-exit time of an instance change, --trials times; beside it the same sidecar with one
   long poll per endpoint (`--agent-connections 4096`, how every wait was before the budget).

    python3 benchmarks/node_bench.py [--sidecars 50] [--upstreams 10] [--shared 10] [--hold 60]
                                     [--rounds 3] [--big 150] [--trials 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import meshgen  # noqa: E402
from harness import agent_env  # noqa: E402
from node_support import agent_connections, register_app, register_instance  # noqa: E402
from real_consul import ConsulProcess, RealAgent, consul_binary, consul_version  # noqa: E402

SERVICES = 100     # distinct upstream services the sidecars' upstreams are drawn from


def meshgen_command(app: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "meshgen.py"), "render", "--sidecar-for", app, "--out", str(out),
            "--no-validate", *extra]


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a running process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def p95(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=20, method="inclusive")[18]


class Sidecar:
    def __init__(self, agent: RealAgent, app: str, out: Path):
        self.agent, self.app, self.out = agent, app, out
        self.process: subprocess.Popen | None = None
        self.ended_at: float | None = None
        self.err = ""
        self.errors: list[str] = []     # what each run that failed said

    def render_once(self) -> None:
        run = subprocess.run(meshgen_command(self.app, self.out), env=agent_env(self.agent),
                             capture_output=True, text=True, timeout=120)
        if run.returncode != 3:
            raise SystemExit(f"{self.app}: first render exited {run.returncode}: {run.stderr}")

    def wait(self, *extra: str, wait: str = "10m") -> None:
        self.ended_at, self.err = None, ""
        self.process = subprocess.Popen(meshgen_command(self.app, self.out, "--wait", wait, *extra),
                                        env=agent_env(self.agent), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._reap, daemon=True).start()

    def _reap(self) -> None:
        self.err = self.process.stderr.read()
        self.process.wait()
        self.ended_at = time.monotonic()
        if self.process.returncode not in (0, 3, -15):
            self.errors.append(self.err.strip())

    @property
    def waiting(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.waiting:
            self.process.terminate()
            self.process.wait(10)


def settle(sidecars: list[Sidecar], port: int, seconds: float = 3.0) -> int:
    """Until every sidecar is waiting on the state its last run saw (its long polls open, and a
    second more for its first re-read): one that ends at once (it caught up with a change its
    last run missed) waits again. How many did so."""
    caught_up = 0
    time.sleep(seconds)
    while True:
        ended = [s for s in sidecars if not s.waiting]
        caught_up += len(ended)
        for sidecar in ended:
            sidecar.wait()
        if not ended and all(agent_connections(s.process.pid, port) >= 2 for s in sidecars):
            time.sleep(1.0)
            if all(s.waiting for s in sidecars):
                return caught_up
        time.sleep(0.5)


def left_behind(port: int) -> int:
    """The agent's connections whose client has gone, still held by a long poll (CLOSE-WAIT)."""
    lines = subprocess.run(["ss", "-tnH", "state", "close-wait", f"( sport = :{port} )"],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    return len(lines)


def failures(sidecars: list[Sidecar]) -> str:
    errors = [e for s in sidecars for e in s.errors]
    return f"{len(errors)}" + (f" ({'; '.join(sorted(set(errors))[:3])})" if errors else "")


def refusals(sidecars: list[Sidecar]) -> int:
    return sum(s.err.count("refused") for s in sidecars)


def held(port: int, sidecars: list[Sidecar]) -> list[int]:
    return [agent_connections(s.process.pid, port) for s in sidecars if s.waiting]


def ended_within(sidecars: list[Sidecar], changed_at: float, timeout: float = 60.0) -> list[float]:
    deadline = time.monotonic() + timeout
    while any(s.ended_at is None for s in sidecars) and time.monotonic() < deadline:
        time.sleep(0.01)
    return [round(s.ended_at - changed_at, 3) if s.ended_at else float("inf") for s in sidecars]


def node(agent: RealAgent, port: int, consul_pid: int, args, scratch: Path) -> None:
    print(f"\n1. {args.sidecars} sidecars x {args.upstreams} upstreams, {args.shared} sharing one, "
          f"waiting {args.hold:g} s on one agent (default limits: 200 connections per address)")
    for i in range(SERVICES):
        register_instance(agent, f"svc{i}", 21000 + i)
    register_instance(agent, "shared", 20999)
    sidecars = []
    for i in range(args.sidecars):
        upstreams = [f"svc{(i * 7 + k) % SERVICES}" for k in range(args.upstreams)]
        if i < args.shared:
            upstreams[-1] = "shared"
        register_app(agent, f"app{i}", 30000 + i, upstreams, 40000 + i * args.upstreams)
        sidecars.append(Sidecar(agent, f"app{i}", scratch / f"app{i}"))
    started = time.monotonic()
    for sidecar in sidecars:
        sidecar.render_once()
    print(f"   first renders: {time.monotonic() - started:.1f} s for all")
    for sidecar in sidecars:
        sidecar.wait()
    settle(sidecars, port, 5)
    agent_cpu, samples = cpu_seconds(consul_pid), []
    mesh_cpu = sum(cpu_seconds(s.process.pid) for s in sidecars if s.waiting)
    hold_end = time.monotonic() + args.hold
    while time.monotonic() < hold_end:
        samples.append(held(port, sidecars))
        time.sleep(1)
    agent_cpu = cpu_seconds(consul_pid) - agent_cpu
    mesh_cpu = sum(cpu_seconds(s.process.pid) for s in sidecars if s.waiting) - mesh_cpu
    ended = [s for s in sidecars if not s.waiting]
    per_sidecar = [n for sample in samples for n in sample]
    totals = [sum(sample) for sample in samples]
    print(f"   ended early: {len(ended)} of {len(sidecars)}; lines saying the agent refused: {refusals(sidecars)}")
    print(f"   connections to the agent per waiting sidecar: max {max(per_sidecar)}, "
          f"all sidecars together: max {max(totals)}, mean {statistics.mean(totals):.0f} "
          f"(of the agent's 200 per address), {len(samples)} looks")
    print(f"   CPU over the hold: agent {agent_cpu:.1f} s ({100 * agent_cpu / args.hold:.1f}% of a core), "
          f"meshgen {mesh_cpu:.1f} s for {len(sidecars)} sidecars "
          f"({100 * mesh_cpu / args.hold / len(sidecars):.2f}% of a core each)")

    print(f"\n2. a new instance of the shared upstream -> each of its {args.shared} sidecars ends its wait "
          f"({args.rounds} rounds)")
    sharing, others = sidecars[:args.shared], sidecars[args.shared:]
    latencies, caught_up = [], 0
    for round_ in range(args.rounds):
        changed_at = time.monotonic()
        register_instance(agent, "shared", 22000 + round_, instance=f"r{round_}")
        round_latencies = ended_within(sharing, changed_at)
        codes = [s.process.returncode for s in sharing]
        still = sum(s.waiting for s in others)
        print(f"   round {round_ + 1} (load average {os.getloadavg()[0]:.1f}): change-to-exit per sidecar (s): {round_latencies}; exit codes {sorted(set(codes))}; "
              f"the other {len(others)} still waiting: {still}; connections the agent still holds for ended "
              f"waits: {left_behind(port)}")
        latencies += round_latencies
        for sidecar in sharing:
            sidecar.wait()
        caught_up += settle(sharing, port)
    print(f"   change-to-exit over {len(latencies)}: p50 {statistics.median(latencies):.2f} s, "
          f"p95 {p95(latencies):.2f} s, max {max(latencies):.2f} s")
    print(f"   runs that failed: {failures(sidecars)}; waits that ended at once, catching up: {caught_up}")
    print(f"   lines saying the agent refused, all runs: {refusals(sidecars)}")
    for sidecar in sidecars:
        sidecar.stop()


def big(agent: RealAgent, port: int, args, scratch: Path) -> None:
    print(f"\n3. one sidecar of {args.big} upstreams on the same agent")
    names = [f"svc{i}" for i in range(min(SERVICES, args.big))]
    for i in range(len(names), args.big):
        register_instance(agent, f"big{i}", 23000 + i)
        names.append(f"big{i}")
    register_app(agent, "bigapp", 31000, names, 50000)
    for label, extra in (("budget (default)", ()), ("one long poll per endpoint", ("--agent-connections", "4096"))):
        sidecar = Sidecar(agent, "bigapp", scratch / f"big-{len(extra)}")
        sidecar.render_once()
        latencies, connections, early, refused = [], [], 0, 0
        for trial in range(args.trials):
            sidecar.wait(*extra, wait="60s")
            time.sleep(3)
            connections.append(max(agent_connections(sidecar.process.pid, port) for _ in range(5)))
            early += not sidecar.waiting
            changed_at = time.monotonic()
            try:
                register_instance(agent, names[trial * 13 % len(names)], 24000 + trial, instance=f"{label[0]}{trial}")
            except requests.ConnectionError:
                refused += 1        # the sidecar's long polls took every connection the agent allows
                sidecar.stop()
                continue
            latencies += ended_within([sidecar], changed_at)
            sidecar.stop()
        codes = sidecar.process.returncode
        median = f"{statistics.median(latencies):.2f}" if latencies else "-"
        print(f"   {label}: connections held {connections}; ended before the change: {early} of {args.trials}; "
              f"the agent refused the benchmark's own change: {refused} of {args.trials}; "
              f"change-to-exit (s) {latencies}, median {median}; last exit code {codes}; "
              f"lines saying the agent refused (last run): {sidecar.err.count('refused')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sidecars", type=int, default=50)
    parser.add_argument("--upstreams", type=int, default=10)
    parser.add_argument("--shared", type=int, default=10)
    parser.add_argument("--hold", type=float, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--big", type=int, default=150)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    binary = consul_binary()
    if binary is None:
        raise SystemExit("no Consul binary: install-deps.sh installs Consul 1.8.7 into .deps/")
    print(f"Consul {consul_version(binary)} dev agent, default limits; {os.cpu_count()} cores "
          f"(load average {os.getloadavg()[0]:.1f}: other work shares them); "
          f"meshgen waits over at most {meshgen.AGENT_CONNECTIONS} connections "
          f"({meshgen.BUDGET_CONNECTIONS} when the watch does not fit)")
    process = ConsulProcess(binary).start()
    try:
        agent, port = RealAgent(process.url), process.ports["http"]
        with tempfile.TemporaryDirectory() as scratch:
            node(agent, port, process.process.pid, args, Path(scratch))
            big(agent, port, args, Path(scratch))
    finally:
        process.remove()


if __name__ == "__main__":
    main()
