"""Runs that meet trouble between their steps: Consul changing between any two reads, a second
meshgen on the same --out, a state file that cannot be written after the swap.

A run reads the agent many times, partly in parallel; the agent double can change its state
after any one answer and before the next. Whatever read a deny lands after, the bundle holds it
once a `--wait` run has followed: either the run already saw it, or what it recorded for the
next wait predates it, so that the wait wakes."""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

import meshgen
from harness import ROOT, DoubleAgent, agent_env, load_seed, run_meshgen, snapshot


def _decision(out, caller: str) -> str:
    for line in (out / "intentions.map").read_text().splitlines():
        if line.startswith(f"{caller} "):
            return line.split(" ", 1)[1].split("|", 1)[0]
    raise AssertionError(f"{caller} has no line in intentions.map")


def _reads_of_one_run(tmp_path) -> list[tuple[str, str]]:
    with DoubleAgent().start() as agent:
        load_seed(agent)
        agent.request_log.clear()
        run = run_meshgen("render", "--sidecar-for", "redis", "--out", str(tmp_path / "count"), "--no-validate",
                          env=agent_env(agent))
        assert run.code == 3, run.err
        return [(method, path) for method, path, _ in agent.request_log]


def test_a_deny_written_after_any_read_of_a_run_reaches_the_bundle(tmp_path):
    reads = _reads_of_one_run(tmp_path)
    assert any(path == "/v1/connect/intentions/match" for _, path in reads)
    for k in range(len(reads)):
        with DoubleAgent().start() as agent:
            load_seed(agent)
            seen = []

            def revoke_after_kth_read(method, path, agent=agent, seen=seen, k=k):
                seen.append(path)
                if len(seen) == k + 1:
                    agent.set_intention("www", "redis", "deny")
            agent.after_answer = revoke_after_kth_read
            out = tmp_path / f"after-read-{k}"
            first = run_meshgen("render", "--sidecar-for", "redis", "--out", str(out), "--no-validate",
                                env=agent_env(agent))
            assert first.code == 3, first.err
            agent.after_answer = None
            then = run_meshgen("render", "--sidecar-for", "redis", "--out", str(out), "--no-validate",
                               "--wait", "3s", env=agent_env(agent))
            assert then.code in (0, 3), then.err
            assert _decision(out, "default/default/www") == "deny", (
                f"the deny written after read {k + 1} ({seen[k] if k < len(seen) else '?'}) was lost: {reads} {seen}")


def _render_args(out, *extra):
    return ["render", "--sidecar-for", "www", "--out", str(out), "--no-validate", *extra]


def test_a_second_run_waits_for_the_first_and_writes_nothing_meanwhile(seeded_double, tmp_path):
    out = tmp_path / "out"
    assert run_meshgen("render", "--proxy-id", "redis-sidecar-proxy", "--out", str(out), "--no-validate",
                       env=agent_env(seeded_double)).code == 3
    seeded_double.set_intention("www", "redis", "deny")      # something for the second run to write
    before = snapshot(out)
    holder = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)                    # the first run, in the middle of its work
        second = subprocess.Popen([sys.executable, str(ROOT / "meshgen.py"), "render", "--proxy-id",
                                   "redis-sidecar-proxy", "--out", str(out), "--no-validate"],
                                  env=agent_env(seeded_double), stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        assert second.poll() is None                          # it waits ...
        assert snapshot(out) == before                        # ... having written nothing
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        os.close(holder)
    assert second.wait(timeout=30) == 3, second.stderr.read()
    assert snapshot(out) != before


def test_a_run_that_cannot_get_the_lock_gives_up_with_nothing_written(seeded_double, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run_meshgen("render", "--proxy-id", "redis-sidecar-proxy", "--out", str(out), "--no-validate",
                       env=agent_env(seeded_double)).code == 3
    seeded_double.set_intention("www", "redis", "deny")
    before = snapshot(out)
    monkeypatch.setattr(meshgen, "LOCK_WAIT_SECONDS", 0.5)
    holder = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        result = CliRunner().invoke(meshgen.cli, ["render", "--proxy-id", "redis-sidecar-proxy", "--out", str(out),
                                                  "--no-validate", "--http-addr", seeded_double.url])
    finally:
        os.close(holder)
    assert result.exit_code == 1, result.output
    assert snapshot(out) == before


def test_runs_racing_on_one_out_always_leave_a_whole_live_bundle(seeded_double, tmp_path, any_haproxy):
    """Before the lock, one run's cleanup deleted another's bundle between its check and its
    swap, and `live` pointed at nothing."""
    out = tmp_path / "out"
    for round_ in range(6):
        seeded_double.set_intention("www", "redis", "deny" if round_ % 2 else "allow")
        runs = [subprocess.Popen([sys.executable, str(ROOT / "meshgen.py"), "render", "--proxy-id",
                                  "redis-sidecar-proxy", "--out", str(out), "--haproxy", any_haproxy],
                                 env=agent_env(seeded_double), stderr=subprocess.PIPE, text=True)
                for _ in range(4)]
        codes = [run.wait(timeout=60) for run in runs]
        assert all(code in (0, 3) for code in codes), [run.stderr.read() for run in runs]
        assert sorted(codes).count(3) == 1                    # one wrote, the others found it done
        assert (out / "live" / "haproxy.cfg").is_file()
        assert {p.name for p in (out / "live").iterdir()} >= {"haproxy.cfg", "leaf.pem", "roots.pem",
                                                             "intentions.map", "authorize.lua"}


def test_a_state_file_that_cannot_be_written_after_the_swap_still_asks_for_the_reload(agent, seed, tmp_path):
    """The swap is the point of no return: the bundle is live, so the exit code must still say
    reload (it said "nothing changed", and the next run found nothing to change)."""
    out = tmp_path / "out"
    args = ["render", "--sidecar-for", seed["redis"], "--out", str(out), "--no-validate"]
    assert run_meshgen(*args, env=agent_env(agent)).code == 3
    agent.set_intention(seed["www"], seed["redis"], "deny")
    first = run_meshgen(*args, env=agent_env(agent))
    assert first.code == 3, first.stderr
    live_before = os.readlink(out / "live")
    agent.set_intention(seed["www"], seed["redis"], "allow")
    (out / f"{meshgen.STATE_FILE}.tmp").mkdir()               # the state file cannot be replaced
    blocked = run_meshgen(*args, env=agent_env(agent))
    assert blocked.code == 3, blocked.stderr
    assert os.readlink(out / "live") != live_before
    (out / f"{meshgen.STATE_FILE}.tmp").rmdir()
    assert run_meshgen(*args, env=agent_env(agent)).code == 0


def test_wait_zero_renders_a_change_at_once(seeded_double, tmp_path):
    out = tmp_path / "out"
    assert run_meshgen(*_render_args(out), env=agent_env(seeded_double)).code == 3
    seeded_double.set_intention("*", "www", "deny")
    assert run_meshgen(*_render_args(out, "--wait", "0"), env=agent_env(seeded_double)).code == 3


def test_a_state_file_with_damaged_kept_items_costs_nothing_but_them(seeded_double, tmp_path):
    """What the last run kept is read back like any input: damaged, it is not used, and the run
    goes on (a target the agent refuses then has no instances, one line says so)."""
    out = tmp_path / "out"
    args = ["render", "--sidecar-for", "www", "--out", str(out), "--no-validate"]
    assert run_meshgen(*args, env=agent_env(seeded_double)).code == 3
    state = json.loads((out / meshgen.STATE_FILE).read_text())
    state["kept_instances"] = {query: [["10.0.0.1 x", 1, "redis"], 7] for query in state["kept_instances"]}
    state["kept_chains"] = {query: ["not", "a", "chain"] for query in state["kept_chains"]}
    (out / meshgen.STATE_FILE).write_text(json.dumps(state))
    seeded_double.inject("/v1/health/connect/redis", status=500, body="no servers")
    seeded_double.inject("/v1/discovery-chain/redis", status=500, body="no servers")
    run = run_meshgen(*args, env=agent_env(seeded_double))
    assert run.code == 3, run.stderr
    assert "Traceback" not in run.stderr
    assert len([line for line in run.stderr.splitlines() if ": skipped: " in line]) == 1, run.stderr


class Killed(BaseException):
    pass


def test_a_run_killed_after_its_swap_leaves_the_reload_to_the_next(seeded_double, tmp_path, monkeypatch):
    """Killed after the swap and before its exit code, a run leaves a new live bundle that no
    one was told to reload onto; the next run found nothing to change and exited 0, and a
    revocation stayed out of HAProxy. The marker tells it to ask for the reload."""
    out = tmp_path / "out"
    args = ["render", "--proxy-id", "redis-sidecar-proxy", "--out", str(out), "--no-validate",
            "--http-addr", seeded_double.url]
    assert CliRunner().invoke(meshgen.cli, args).exit_code == 3
    seeded_double.set_intention("www", "redis", "deny")

    def killed(*_):
        raise Killed()
    monkeypatch.setattr(meshgen, "write_state", killed)
    with pytest.raises(Killed):
        CliRunner().invoke(meshgen.cli, args, catch_exceptions=False)
    monkeypatch.undo()
    assert _decision(out, "default/default/www") == "deny"       # swapped in, never announced
    assert CliRunner().invoke(meshgen.cli, args).exit_code == 3  # the reload it owes
    assert CliRunner().invoke(meshgen.cli, args).exit_code == 0
