"""Shared fixtures: the agents (the double, real Consul agents) and the HAProxy builds. The
helpers tests call live in harness.py."""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import DoubleAgent, HAProxyBuild, free_port, installed_haproxy_builds, load_seed  # noqa: E402
from real_consul import ConsulProcess, RealAgent, consul_binary, consul_version  # noqa: E402


# ----------------------------------------------------------------------------- HAProxy builds

# The HAProxy branches meshgen supports, each tested on the build install-deps.sh gives it.
SUPPORTED_BRANCHES = ("2.6", "2.8", "3.0", "3.2", "3.4")
HAPROXY_BUILDS = {build.branch: build for build in installed_haproxy_builds()}


def pytest_report_header(config):
    lines = [f"  {HAPROXY_BUILDS[b]}" if b in HAPROXY_BUILDS else f"  HAProxy {b}: not installed"
             for b in SUPPORTED_BRANCHES]
    consul = f"Consul {CONSUL_VERSION} at {CONSUL}" if CONSUL else "no Consul binary"
    return ["HAProxy builds (from haproxy -vv):", *lines, f"Real agent: {consul}"]


def _build_id(branch: str) -> str:
    build = HAPROXY_BUILDS.get(branch)
    return build.name if build else f"haproxy-{branch}-missing"


def _require_build(branch: str) -> HAProxyBuild:
    build = HAPROXY_BUILDS.get(branch)
    if build is None:
        message = f"HAProxy {branch} is not installed (install-deps.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return build


@pytest.fixture(params=SUPPORTED_BRANCHES, ids=_build_id)
def haproxy_build(request) -> HAProxyBuild:
    """Each test that takes this runs once per supported HAProxy branch."""
    return _require_build(request.param)


@pytest.fixture
def haproxy(haproxy_build) -> str:
    """The binary of each supported HAProxy branch in turn."""
    return haproxy_build.path


@pytest.fixture
def any_haproxy() -> str:
    """One HAProxy, for tests whose subject is meshgen, not HAProxy: the oldest supported."""
    return _require_build(SUPPORTED_BRANCHES[0]).path


# ----------------------------------------------------------------------------- agents

CONSUL = consul_binary()
CONSUL_VERSION = consul_version(CONSUL) if CONSUL else None
# Another real agent instead of the one the tests start: MESHGEN_TEST_CONSUL_ADDR (and
# MESHGEN_TEST_CONSUL_TOKEN when its ACLs are on).
EXTERNAL_AGENT = os.environ.get("MESHGEN_TEST_CONSUL_ADDR")


def _require_consul() -> str:
    if CONSUL is None:
        message = "no Consul binary (install-deps.sh installs Consul 1.8.7 into .deps/)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return CONSUL


@pytest.fixture
def consul() -> str:
    """The Consul binary, for tests that run agents of their own."""
    return _require_consul()


@pytest.fixture(scope="session")
def real_consul():
    """One real dev agent for the session, ACLs off; tests keep apart by name suffixes."""
    if EXTERNAL_AGENT:
        url = EXTERNAL_AGENT if "://" in EXTERNAL_AGENT else f"http://{EXTERNAL_AGENT}"
        yield RealAgent(url, os.environ.get("MESHGEN_TEST_CONSUL_TOKEN"))
        return
    process = ConsulProcess(_require_consul()).start()
    yield RealAgent(process.url)
    process.remove()


@pytest.fixture(scope="session")
def real_consul_acl():
    """One real dev agent with ACLs on and default deny; `.token` is its master token."""
    token = str(uuid.uuid4())
    process = ConsulProcess(_require_consul(), acl_master_token=token).start()
    yield RealAgent(process.url, token)
    process.remove()


def _suffixed(real: RealAgent) -> RealAgent:
    return RealAgent(real.url, real.token, suffix="-" + uuid.uuid4().hex[:6])


@pytest.fixture
def double():
    """The agent double on a free loopback port."""
    agent = DoubleAgent().start()
    yield agent
    agent.stop()


@pytest.fixture
def seeded_double(double):
    """The double with the seed's www -> redis registration."""
    load_seed(double)
    return double


@pytest.fixture(params=["double", "consul"])
def agent(request):
    """An agent for integration tests: the double, then a real Consul agent (ACLs off)."""
    if request.param == "consul":
        yield _suffixed(request.getfixturevalue("real_consul"))
        return
    agent = DoubleAgent().start()
    agent.suffix = ""
    yield agent
    agent.stop()


@pytest.fixture
def seed(agent):
    """The seed's www -> redis registration on the agent; returns the app names used."""
    ports = {"www": free_port(), "redis": free_port()}
    load_seed(agent, agent.suffix, sidecar_ports=ports)
    yield {"www": "www" + agent.suffix, "redis": "redis" + agent.suffix, "ports": ports}
    if isinstance(agent, RealAgent):
        for name in ("www", "redis"):
            for sid in (f"{name}{agent.suffix}-sidecar-proxy", name + agent.suffix):
                agent.deregister(sid)
        agent.delete_intention("www" + agent.suffix, "redis" + agent.suffix)


# ----------------------------------------------------------------------------- the real-agent count

REAL_AGENT_FIXTURES = {"real_consul", "real_consul_acl", "consul"}
REAL_AGENT_PARAMS = {"consul", "consul-acl"}


def _uses_real_agent(item) -> bool:
    params = getattr(item, "callspec", None)
    return bool(REAL_AGENT_FIXTURES & set(item.fixturenames)) or bool(
        params and REAL_AGENT_PARAMS & {str(v) for v in params.params.values()})


def pytest_collection_finish(session):
    session.config.real_agent_tests = {item.nodeid for item in session.items if _uses_real_agent(item)}


def pytest_terminal_summary(terminalreporter, config):
    """How many tests ran on a real Consul agent, and how they ended."""
    real = getattr(config, "real_agent_tests", set())
    outcomes = {}
    for outcome in ("passed", "failed", "error", "skipped"):
        outcomes[outcome] = len({r.nodeid for r in terminalreporter.stats.get(outcome, [])
                                 if r.nodeid in real and (r.when == "call" or outcome != "passed")})
    summary = ", ".join(f"{n} {outcome}" for outcome, n in outcomes.items() if n)
    terminalreporter.write_line(f"real Consul agent ({CONSUL_VERSION or 'none'}): {len(real)} tests: {summary or 'none run'}")
