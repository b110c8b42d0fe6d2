"""start.sh for real: meshgen, HAProxy master-worker, the agent double (and a real Consul agent
where no fault is injected), under the shells of the Debian (dash) and Alpine (busybox ash)
images."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import ROOT, EchoServer, free_port, Identity, register_sidecar, talk, wait_listening
from real_consul import RealAgent

SHELLS = {"dash": ["dash"], "busybox-ash": ["busybox", "sh"], "bash": ["bash"]}


@pytest.fixture(params=sorted(SHELLS))
def shell(request):
    if shutil.which(SHELLS[request.param][0]) is None:
        pytest.skip(f"{request.param} is not installed (.ci/run installs it)")
    return SHELLS[request.param]


class StartSh:
    def __init__(self, shell: list[str], double, haproxy: str, out: Path, log: Path, _app=(), **env):
        self.log_path, self.out = log, out
        environment = {**os.environ, "MESHGEN_SERVICE_ID": "web", "MESHGEN_OUT": str(out),
                       "MESHGEN_WAIT": "2s", "MESHGEN_BACKOFF_MAX": "2", "MESHGEN_STOP_GRACE": "3",
                       "MESHGEN_HAPROXY": haproxy, "MESHGEN": f"{sys.executable} {ROOT / 'meshgen.py'}",
                       "CONSUL_HTTP_ADDR": double.url, **env}
        self._log = open(log, "wb")
        self.process = subprocess.Popen([*shell, str(ROOT / "start.sh"), *_app], env=environment,
                                        stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, count: int = 1, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(re.findall(pattern, self.log())) >= count:
                return
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} x{count} not in start.sh's log:\n{self.log()[-4000:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        return self.process.returncode


def haproxy_processes(config_dir: Path) -> list[str]:
    # -ww: without a terminal, ps cuts lines short, and the config's path with them.
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if "haproxy" in line and str(config_dir) in line]


@pytest.fixture
def mesh(double, any_haproxy, tmp_path):
    echo = EchoServer()
    port = free_port()
    register_sidecar(double, "web", port, echo.port)
    double.set_intention("api", "web", "allow")
    started = []

    def start(shell, **env):
        script = StartSh(shell, double, any_haproxy, tmp_path / "out", tmp_path / "start.log", **env)
        started.append(script)
        return script

    yield start, port, Identity.from_double(double, tmp_path / "ids", "api").context()
    for script in started:
        script.stop()
    echo.close()


def test_renders_starts_haproxy_reloads_on_change_and_stops_cleanly(shell, agent, any_haproxy, tmp_path):
    web = "web" + agent.suffix
    echo, port = EchoServer(), free_port()
    register_sidecar(agent, web, port, echo.port)
    agent.set_intention("api", web, "allow")
    client = Identity.from_agent(agent, tmp_path / "ids", "api").context()
    script = StartSh(shell, agent, any_haproxy, tmp_path / "out", tmp_path / "start.log", MESHGEN_SERVICE_ID=web)
    try:
        wait_listening(port, script.process)
        assert talk(port, client) == b"ping\n"
        extra = free_port()
        register_sidecar(agent, web, port, echo.port, config={"unsecured_bind_port": extra})
        script.wait_for_log("the bundle changed: reloading HAProxy")
        wait_listening(extra, script.process)
        assert talk(extra, None) == b"ping\n"
        assert talk(port, client) == b"ping\n"
        assert script.stop() == 0
    finally:
        script.stop()
        echo.close()
        if isinstance(agent, RealAgent):
            agent.delete_intention("api", web)
            agent.deregister(web)
    assert "SIGTERM: stopping" in script.log() and "stopped" in script.log()
    assert haproxy_processes(tmp_path / "out") == []


def test_agent_down_then_back_is_picked_up_without_a_restart(shell, mesh, double):
    start, port, client = mesh
    double.stop()
    script = start(shell)
    script.wait_for_log("render failed; HAProxy keeps its last good config; next try in 2s", count=2)
    waits = [int(n) for n in re.findall(r"next try in (\d+)s", script.log())]
    assert waits[:3] == [1, 2, 2]                  # backs off, capped by MESHGEN_BACKOFF_MAX
    double.start(port=int(double.address.split(":")[1]))
    wait_listening(port, script.process, timeout=20)
    assert talk(port, client) == b"ping\n"
    double.stop()                                  # down again while HAProxy runs
    failures = script.log().count("render failed")
    script.wait_for_log("render failed", count=failures + 2)
    assert script.process.poll() is None
    unchanged = script.log().count(": unchanged")
    double.start(port=int(double.address.split(":")[1]))
    script.wait_for_log(": unchanged", count=unchanged + 1)
    assert talk(port, client) == b"ping\n"
    assert "starting HAProxy" in script.log() and script.log().count("starting HAProxy") == 1
    assert script.stop() == 0


def test_a_revoked_intention_refuses_new_connections_without_a_reload(shell, agent, any_haproxy, tmp_path):
    """start.sh's --wait wakes on the intentions' index (on 1.8.7, the list endpoint's: its match
    endpoint has none), and the new decision goes in live. How fast is
    benchmarks/authorize_bench.py's figure; here 10 s only bounds a hang."""
    web, api = "web" + agent.suffix, "api" + agent.suffix
    echo, port = EchoServer(), free_port()
    register_sidecar(agent, web, port, echo.port)
    agent.set_intention(api, web, "allow")
    client = Identity.from_agent(agent, tmp_path / "ids", api).context()
    script = StartSh(shell, agent, any_haproxy, tmp_path / "out", tmp_path / "start.log", MESHGEN_SERVICE_ID=web)
    try:
        wait_listening(port, script.process)
        assert talk(port, client) == b"ping\n"
        for action, outcome in (("deny", None), ("allow", b"ping\n")):
            agent.set_intention(api, web, action)
            changed = time.monotonic()
            while talk(port, client) != outcome:
                assert time.monotonic() - changed < 10, script.log()
                time.sleep(0.02)
        assert "reloading HAProxy" not in script.log() and script.log().count("starting HAProxy") == 1
        assert script.stop() == 0
    finally:
        script.stop()
        echo.close()
        if isinstance(agent, RealAgent):
            agent.delete_intention(api, web)
            agent.deregister(web)


def test_without_a_service_id_it_stops_at_once(shell, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MESHGEN_SERVICE_ID"}
    result = subprocess.run([*shell, str(ROOT / "start.sh")], env=env, capture_output=True, text=True,
                            timeout=10)
    assert result.returncode != 0
    assert "set MESHGEN_SERVICE_ID" in result.stderr


def test_starts_and_stops_the_local_consul_agent(shell, mesh, tmp_path):
    """The seed's container ran its own agent: a stand-in `consul` records how it is run."""
    start, port, client = mesh
    bin_dir, record = tmp_path / "bin", tmp_path / "consul-record"
    bin_dir.mkdir()
    fake = bin_dir / "consul"
    fake.write_text(f"""#!/bin/sh
echo "args: $*" >> {record}
for arg in "$@"; do
    case $arg in -config-file=*) cat "${{arg#-config-file=}}" >> {record}
        stat -c '%a' "${{arg#-config-file=}}" >> {record};; esac
done
trap 'echo "got TERM" >> {record}; exit 0' TERM
while :; do sleep 0.1; done
""")
    fake.chmod(0o755)
    local_config = '{"acl": {"tokens": {"agent": "agent-secret-token"}}}'
    script = start(shell, PATH=f"{bin_dir}:{os.environ['PATH']}",
                   MESHGEN_CONSUL_AGENT_ARGS="-data-dir=/tmp/x -retry-join=server",
                   CONSUL_LOCAL_CONFIG=local_config)
    wait_listening(port, script.process)
    assert talk(port, client) == b"ping\n"
    assert script.stop() == 0
    lines = record.read_text().splitlines()
    assert lines[0].startswith("args: agent -data-dir=/tmp/x -retry-join=server -config-file=")
    assert lines[1:3] == [local_config, "600"]
    assert lines[-1] == "got TERM"
    assert "agent-secret-token" not in script.log()


def test_no_token_reaches_the_environment_of_the_app_or_haproxy(shell, mesh, double, tmp_path):
    """meshgen gets the token from a private file start.sh writes; the app and every HAProxy
    process start without CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE or CONSUL_LOCAL_CONFIG."""
    start, port, client = mesh
    token = "5d3a1c9e-token-for-meshgen-only"
    double.enable_acls("deny")
    double.add_token({"service_prefix:": "write"}, secret=token)
    app_env = tmp_path / "app.environ"
    script = start(shell, CONSUL_HTTP_TOKEN=token, CONSUL_LOCAL_CONFIG='{"acl": {"tokens": {"agent": "agent-secret"}}}',
                   _app=["sh", "-c", f"tr '\\0' '\\n' </proc/self/environ >{app_env}; exec sleep 60"])
    wait_listening(port, script.process)
    assert talk(port, client) == b"ping\n"                     # meshgen read the token: it rendered
    pids = [line.split()[0] for line in haproxy_processes(tmp_path / "out")]
    assert pids
    environments = {pid: Path(f"/proc/{pid}/environ").read_bytes() for pid in pids}
    deadline = time.monotonic() + 5
    while not app_env.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    environments["app"] = app_env.read_bytes()
    for who, environ in environments.items():
        assert token.encode() not in environ and b"agent-secret" not in environ, who
        assert b"CONSUL_HTTP_TOKEN" not in environ and b"CONSUL_LOCAL_CONFIG" not in environ, who
    assert script.stop() == 0
