"""The agent connection budget of `render --wait`: a sidecar of many upstreams waits over a few
connections, whatever their number, still sees each change, and an agent that refuses it gets
backoff rather than a loop. On the double (Consul 1.22's behaviour) and on Consul 1.8.7 with a low
limits.http_max_conns_per_client (its default is 200 connections from one address)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import meshgen

from harness import ROOT, agent_env, register_sidecar
from node_support import most_connections, register_app, register_instance
from real_consul import ConsulProcess, RealAgent

UPSTREAMS = 30      # 64 long polls, one per endpoint, without the budget


def render(agent, out, *extra, wait=None, sidecar_for="web"):
    command = [sys.executable, str(ROOT / "meshgen.py"), "render", "--sidecar-for", sidecar_for, "--out",
               str(out), "--no-validate", *extra] + (["--wait", wait] if wait else [])
    return subprocess.Popen(command, env=agent_env(agent), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(process, timeout=60):
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


def port_of(agent) -> int:
    return int(agent.url.rsplit(":", 1)[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def refusal_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "while waiting" in line]


@pytest.fixture
def many(double, tmp_path):
    """A sidecar of UPSTREAMS upstreams on the double, each with an instance; rendered once."""
    names = [f"svc{i}" for i in range(UPSTREAMS)]
    for i, name in enumerate(names):
        double.add_instance(name, f"10.0.1.{i + 1}", 21000)
    double.add_instance("elsewhere", "10.0.2.1", 21000)      # in the datacenter, no upstream of ours
    register_sidecar(double, "web", 21000, 8080, upstreams=[
        {"destination_name": name, "local_bind_port": 9000 + i} for i, name in enumerate(names)])
    out = tmp_path / "out"
    code, err = finish(render(double, out))
    assert code == 3, err
    return double, out, names


CHANGES = {
    # Moves the datacenter's checks: seen through the signal, re-read from the agent's cache.
    "instances": (lambda double, names: double.add_instance(names[17], "10.0.1.200", 21000), 3.0),
    # Moves no check: seen by the periodic re-read of the chains.
    "chain": (lambda double, names: double.set_config(
        {"Kind": "service-resolver", "Name": names[5], "ConnectTimeout": "2s"}), meshgen.RESWEEP_SECONDS + 3.0),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_many_upstreams_wait_within_the_budget_and_see_a_change(many, change):
    double, out, names = many
    process = render(double, out, wait="60s")
    held = most_connections(process.pid, port_of(double), seconds=2.0)
    assert process.poll() is None                   # waiting: nothing changed
    assert 2 <= held <= meshgen.BUDGET_CONNECTIONS, held
    make, within = CHANGES[change]
    changed_at = time.monotonic()
    make(double, names)
    code, err = finish(process)
    assert (code, time.monotonic() - changed_at < within) == (3, True), err


def test_a_change_before_the_wait_began_ends_it_at_once(many):
    """The checks signal starts from where it stands when the wait begins: a change since the
    last run's reads is found by the re-read at the start, not by the periodic one."""
    double, out, names = many
    double.add_instance(names[29], "10.0.1.202", 21000)
    started = time.monotonic()
    code, err = finish(render(double, out, wait="60s"))
    assert (code, time.monotonic() - started < meshgen.RESWEEP_SECONDS) == (3, True), err


@pytest.mark.parametrize("refused", ["/v1/health/state/", "/v1/health/connect/"], ids=["signal", "reader"])
def test_a_refusing_agent_gets_backoff_one_line_and_the_wait_goes_on(many, refused):
    double, out, names = many
    process = render(double, out, wait="60s")
    time.sleep(1.0)
    double.inject(refused, status=429, body="rate limit exceeded")
    asked_before, cpu_before = double.count(refused), cpu_seconds(process.pid)
    double.set_status("elsewhere", "elsewhere-sidecar-proxy-1", "critical")    # wakes the signal
    time.sleep(6.0)
    refused_asks, cpu = double.count(refused) - asked_before, cpu_seconds(process.pid) - cpu_before
    assert process.poll() is None                   # still waiting: a refusal is not a change
    assert 1 <= refused_asks <= 6, refused_asks     # backoff, not a tight loop
    assert cpu < 0.5, cpu                           # nor a loop that asks nothing: idle meanwhile
    double.clear_faults()
    changed_at = time.monotonic()
    double.add_instance(names[3], "10.0.1.201", 21000)
    code, err = finish(process)
    # Back after the backoff (at most 30 s between tries, jittered; here at most 8 s).
    assert (code, time.monotonic() - changed_at < 12) == (3, True), err
    lines = refusal_lines(err)
    assert len(lines) == 1 and double.address in lines[0], err


# ----------------------------------------------------------------------------- Consul 1.8.7

@pytest.fixture
def capped_agent(consul, request, tmp_path):
    """Consul 1.8.7 taking at most 10 connections from one address, and a sidecar of UPSTREAMS
    upstreams on it, rendered once."""
    process = ConsulProcess(consul, limits={"http_max_conns_per_client": 10}).start()
    request.addfinalizer(process.remove)
    agent = RealAgent(process.url)
    names = [f"svc{i}" for i in range(UPSTREAMS)]
    for i, name in enumerate(names):
        register_instance(agent, name, 21000 + i)
    register_app(agent, "web", 20000, names, 9000)
    out = tmp_path / "out"
    code, err = finish(render(agent, out))
    assert code == 3, err
    return agent, out, names


def test_on_consul_1_8_7_many_upstreams_wait_under_its_connection_cap(capped_agent):
    agent, out, names = capped_agent
    process = render(agent, out, wait="60s")
    held = most_connections(process.pid, port_of(agent), seconds=3.0)
    assert process.poll() is None, finish(process)[1]
    assert 2 <= held <= meshgen.BUDGET_CONNECTIONS, held
    changed_at = time.monotonic()
    register_instance(agent, names[11], 22000, instance="2")
    code, err = finish(process)
    assert (code, time.monotonic() - changed_at < 3.0) == (3, True), err
    assert refusal_lines(err) == []


def test_on_consul_1_8_7_a_watch_past_its_cap_backs_off_and_ends_in_an_error(capped_agent):
    """One long poll per endpoint (64, with --agent-connections so high) meets the cap: the
    agent closes the connections past it unanswered. Before the budget, such a wait ended with
    exit 1 within a second, every time; now it backs off, says so once, waits its period out,
    and ends with exit 1 (start.sh backs off too)."""
    agent, out, _ = capped_agent
    started = time.monotonic()
    code, err = finish(render(agent, out, "--agent-connections", "100", wait="6s"))
    assert (code, time.monotonic() - started >= 6.0) == (1, True), err
    assert len(refusal_lines(err)) == 1, err
