"""`render --wait`: blocking queries instead of polling, each watched thing ending the wait."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid

import pytest

import meshgen

from harness import ROOT, agent_env, free_port, load_seed, seed_definition, wait_passing
from real_consul import ConsulProcess, RealAgent

pytestmark = pytest.mark.usefixtures("any_haproxy")


# These tests are about one long poll per endpoint: they give --wait the connections for it. The
# default, a wait over 3 connections whatever the upstreams, is tested in test_watch_budget.py and
# by test_the_default_wait_over_three_connections_sees_each_fixed_thing below.
DIRECT = ("--agent-connections", "16")


def render(double, out, haproxy, *extra, wait=None, sidecar_for="www", direct=True):
    command = [sys.executable, str(ROOT / "meshgen.py"), "render", "--sidecar-for", sidecar_for, "--out",
               str(out), "--haproxy", haproxy, *extra, *(DIRECT if direct else ())] + (["--wait", wait] if wait else [])
    return subprocess.Popen(command, env=agent_env(double), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(process, timeout=60):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, err


@pytest.fixture
def seeded(seeded_double, any_haproxy, tmp_path):
    out = tmp_path / "out"
    code, err = finish(render(seeded_double, out, any_haproxy, wait="20s"))
    assert code == 3, err                          # the first run returns at once
    state = json.loads((out / meshgen.STATE_FILE).read_text())
    assert state["proxy_id"] == "www-sidecar-proxy" and state["roots_index"] > 0
    return seeded_double, out, any_haproxy


CHANGES = {
    "registration": lambda d: d.update_service("www-sidecar-proxy",
                                               lambda s: s["Proxy"]["Config"].update(max_inbound_connections=9)),
    "roots": lambda d: d.rotate_root(reissue_leaves=False),
    "leaf": lambda d: d.renew_leaf("www"),
    "instances": lambda d: d.add_instance("redis", "10.0.0.9", 21000),
    "chain": lambda d: d.set_config({"Kind": "service-resolver", "Name": "redis", "ConnectTimeout": "2s"}),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_change_in_each_watched_thing_ends_the_wait(seeded, change):
    double, out, haproxy = seeded
    process = render(double, out, haproxy, wait="30s")
    time.sleep(0.5)
    assert process.poll() is None                  # blocked: nothing has changed yet
    changed_at = time.monotonic()
    CHANGES[change](double)
    code, err = finish(process)
    assert time.monotonic() - changed_at < 5, "the wait did not end with the change"
    assert code == 3, err


REAL_CHANGES = {
    "registration": lambda agent, names: agent.register({"service": dict(
        names["www_definition"], connect={"sidecar_service": dict(
            names["www_definition"]["connect"]["sidecar_service"], proxy=dict(
                names["www_definition"]["connect"]["sidecar_service"]["proxy"],
                config={"max_inbound_connections": 9}))})}),
    "roots": lambda agent, names: agent.rotate_root(),
    "instances": lambda agent, names: agent.deregister(names["redis_sidecar"]),
    "chain": lambda agent, names: agent.set_config({
        "Kind": "service-resolver", "Name": names["redis"], "ConnectTimeout": "2s"}),
}


@pytest.mark.parametrize("change", sorted(REAL_CHANGES))
def test_a_change_on_a_real_agent_ends_the_wait(consul, change, any_haproxy, tmp_path, request):
    """The same on Consul 1.8.7, for what an operator can change there at will: a new
    registration, a CA rotation (a new key), an instance leaving, a config entry written. (A leaf is renewed only by
    its agent, about 20 s after a rotation on 1.8.7, so that case runs on the double alone.)
    An agent of its own: a rotation on the session's agent would re-issue other tests' leaves."""
    process = ConsulProcess(consul).start()
    request.addfinalizer(process.remove)
    suffix = "-" + uuid.uuid4().hex[:6]
    agent = RealAgent(process.url, suffix=suffix)
    listener = socket.create_server(("127.0.0.1", 0))
    load_seed(agent, suffix, sidecar_ports={"www": free_port(), "redis": listener.getsockname()[1]})
    wait_passing(agent, "redis" + suffix, f"redis{suffix}-sidecar-proxy")
    names = {"redis_sidecar": f"redis{suffix}-sidecar-proxy", "redis": "redis" + suffix,
             "www_definition": seed_definition("www", suffix)}
    out = tmp_path / "out"
    try:
        code, err = finish(render(agent, out, any_haproxy, wait="20s", sidecar_for="www" + suffix))
        assert code == 3, err
        process = render(agent, out, any_haproxy, wait="30s", sidecar_for="www" + suffix)
        time.sleep(0.5)
        assert process.poll() is None                  # blocked: nothing has changed yet
        changed_at = time.monotonic()
        REAL_CHANGES[change](agent, names)
        code, err = finish(process)
        assert time.monotonic() - changed_at < 5, "the wait did not end with the change"
        assert code == 3, err
    finally:
        listener.close()
        for name in ("www", "redis"):
            agent.deregister(name + suffix)


def test_an_idle_wait_asks_each_endpoint_once_per_period(seeded):
    double, out, haproxy = seeded
    before = dict(double.requests)
    periods = 3
    for _ in range(periods):
        start = time.monotonic()
        # Enough connections for one long poll per endpoint (docs/watching.md): what is counted.
        code, err = finish(render(double, out, haproxy, wait="1s"))
        assert (code, time.monotonic() - start >= 1.0) == (0, True), err
        assert "unchanged after waiting 1s" in err
    asked = {path: n - before.get(path, 0) for path, n in double.requests.items() if n != before.get(path, 0)}
    # The roots twice: one plain read to catch an agent that came back with a new CA at the
    # same index, then the blocking one.
    assert asked == {"/v1/agent/service/www-sidecar-proxy": periods, "/v1/agent/connect/ca/roots": 2 * periods,
                     "/v1/agent/connect/ca/leaf/www": periods, "/v1/health/connect/redis": periods,
                     "/v1/discovery-chain/redis": periods,
                     "/v1/config/mesh/mesh": periods,   # blocked on even while there is none (404)
                     "/v1/agent/services": periods,     # --sidecar-for looks the sidecar up first
                     "/v1/connect/intentions": periods}


def test_an_index_that_goes_backwards_is_reset(seeded):
    double, out, haproxy = seeded
    process = render(double, out, haproxy, wait="30s")
    time.sleep(0.5)
    double.reset_health_index("redis", 3)
    code, err = finish(process)
    assert code == 0, err                           # same data: nothing to write
    state = json.loads((out / meshgen.STATE_FILE).read_text())
    health = [index for query, index in state["queries"].items() if "/v1/health/connect/redis" in query]
    assert health == [3]
    code, _ = finish(render(double, out, haproxy, wait="1s"))
    assert code == 0                                # and it blocks on the new index again


def test_prepared_queries_are_polled(double, any_haproxy, tmp_path):
    load_seed(double)
    double.add_prepared_query("cache-query", "cache")
    double.update_service("www-sidecar-proxy", lambda s: s["Proxy"]["Upstreams"].append(
        {"DestinationType": "prepared_query", "DestinationName": "cache-query", "LocalBindPort": 7000,
         "MeshGateway": {}}))
    out = tmp_path / "out"
    assert finish(render(double, out, any_haproxy))[0] == 3
    polls_before = double.count("/v1/query/cache-query/execute")
    process = render(double, out, any_haproxy, "--poll-interval", "0.2", wait="30s")
    deadline = time.monotonic() + 10
    while double.count("/v1/query/cache-query/execute") < polls_before + 3:   # polled, again and again
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert process.poll() is None                   # and still waiting: nothing changed
    double.add_instance("cache", "10.0.0.20", 21000)
    code, err = finish(process)
    assert code == 3, err


# ----------------------------------------------------------------------------- runtime API
# (the live changes themselves: test_live_changes.py)

def test_a_refused_live_update_asks_for_a_reload(seeded):
    double, out, haproxy = seeded
    double.renew_leaf("www")
    code, err = finish(render(double, out, haproxy, "--runtime-socket", str(out / "no-such.sock")))
    assert code == 3 and "reload HAProxy" in err


@pytest.mark.parametrize("change", ["registration", "roots", "leaf"])
def test_the_default_wait_over_three_connections_sees_each_fixed_thing(seeded, change):
    """By default a run waits over 3 connections and reads the registration, the roots and the
    leaf from the agent every 5 s: each change ends the wait within that, not at its end."""
    double, out, haproxy = seeded
    process = render(double, out, haproxy, wait="30s", direct=False)
    time.sleep(1.0)
    started = time.monotonic()
    if change == "registration":
        double.update_service("www-sidecar-proxy", lambda s: s["Proxy"]["Config"].update(max_inbound_connections=77))
    elif change == "roots":
        double.rotate_root()
    else:
        double.renew_leaf("www")
    code, err = finish(process)
    assert code in (0, 3), err
    assert time.monotonic() - started < 8, "the wait did not end with the change"
