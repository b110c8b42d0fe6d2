"""Consul changing between any two reads of a run: a revocation is never lost.

A run reads the agent many times, partly in parallel; the agent double can change its state
after any one answer and before the next. Whatever read a deny lands after, the bundle holds it
once a `--wait` run has followed: either the run already saw it, or what it recorded for the
next wait predates it, so that the wait wakes."""
from __future__ import annotations

from harness import DoubleAgent, agent_env, load_seed, run_meshgen


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
            assert _decision(out, "default/www") == "deny", (
                f"the deny written after read {k + 1} ({seen[k] if k < len(seen) else '?'}) was lost")
