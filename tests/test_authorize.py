"""authorize.lua inside a real HAProxy (2.6 and 2.8), real mutual TLS, the double as the agent.
Every case that must be refused is checked by a byte failing to come back, and the log's reason."""
from __future__ import annotations

import http.client
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import meshgen

from harness import (DoubleAgent, EchoServer, free_port, HAProxy, HttpApp, Identity, latencies,
                     meshgen_render, register_sidecar, talk)


@dataclass
class Sidecar:
    double: DoubleAgent
    port: int
    haproxy: HAProxy
    out: Path
    ids: Path

    def identity(self, service: str) -> Identity:
        return Identity.from_double(self.double, self.ids, service)


@pytest.fixture
def start_sidecar(double, haproxy, tmp_path):
    """Starts the `web` sidecar under HAProxy with the given Config, in front of an echo app
    (tcp) or an HTTP app; stops everything after."""
    started, echo, http_app = [], EchoServer(), HttpApp()

    def start(config: dict | None = None, lua: str | None = None, one_thread: bool = False) -> Sidecar:
        port = free_port()
        app = http_app if (config or {}).get("protocol") == "http" else echo
        proxy_id = register_sidecar(double, "web", port, app.port,
                                    {"authorize_timeout_ms": 1000, **(config or {})})
        out = tmp_path / "out"
        assert meshgen_render(double, proxy_id, out, haproxy) == 3
        if lua is not None:   # a variant of the script, to show what a test can tell apart
            (out / meshgen.LIVE / "authorize.lua").write_text(lua)
        process = HAProxy(haproxy, out / "haproxy.cfg", tmp_path / "haproxy.log", wait_for_port=port,
                          one_thread=one_thread)
        started.append(process)
        return Sidecar(double, port, process, out, tmp_path / "ids")

    yield start
    for process in started:
        process.stop()
    echo.close()
    http_app.close()


def test_allowed_identity_reaches_the_app(start_sidecar):
    sidecar = start_sidecar()
    sidecar.double.set_intention("api", "web", "allow")
    assert talk(sidecar.port, sidecar.identity("api").context()) == b"ping\n"
    log = sidecar.haproxy.wait_for_log("authz=allow")
    assert f'spiffe="{sidecar.double.service_uri("api")}"' in log
    assert "Matched L4 intention: default/api => default/web" in log


def test_refused_identities(start_sidecar):
    sidecar = start_sidecar()
    double = sidecar.double
    double.set_intention("api", "web", "allow")
    double.set_intention("intruder", "web", "deny")
    foreign = DoubleAgent()  # another CA altogether
    cases = {
        "denied by intention": sidecar.identity("intruder").context(),
        "no client certificate": sidecar.identity("api").context(with_cert=False),
        "certificate of another CA": Identity.from_double(foreign, sidecar.ids / "foreign", "api").context(),
        "no URI SAN": Identity.custom(double, sidecar.ids, "bare").context(),
        "two URI SANs": Identity.custom(double, sidecar.ids, "two", double.service_uri("api"),
                                        double.service_uri("web")).context(),
        "URI that is not SPIFFE": Identity.custom(double, sidecar.ids, "https", "https://api.example/").context(),
        # Signed by our CA, allowed by the intention, but of another trust domain: the agent
        # would say yes, so authorize.lua must not ask it.
        "identity of another trust domain": Identity.custom(
            double, sidecar.ids, "elsewhere", "spiffe://other.consul/ns/default/dc/dc1/svc/api").context(),
    }
    for case, context in cases.items():
        assert talk(sidecar.port, context) is None, case
    assert talk(sidecar.port, None, b"\x16\x03\x01 garbage, not TLS\n") is None
    log = sidecar.haproxy.wait_for_log("URI is not a SPIFFE ID")
    assert "Matched L4 intention: default/intruder => default/web (Precedence: 9, Action: DENY)" in log
    assert 'reason="client certificate has 0 URI SANs, want 1"' in log
    assert 'reason="client certificate has 2 URI SANs, want 1"' in log
    assert 'reason="client certificate is of trust domain other.consul, not this mesh\'s"' in log
    assert log.count("authz=allow") == 0


@pytest.mark.parametrize("fault, reason", [
    # HAProxy's httpclient retries a refused connect until the inspect-delay ends the check.
    ("down", "agent did not answer in time"),
    ("slow", "agent did not answer in time"),
    ("403", "agent answered 403"),
    ("500", "agent answered 500"),
    ("garbage", "agent answer unparsable"),
    ("empty 200", "agent answer unparsable"),
])
def test_agent_failures_refuse_and_say_why(start_sidecar, fault, reason):
    sidecar = start_sidecar({"authorize_cache_ttl_ms": 0})
    double = sidecar.double
    double.set_intention("api", "web", "allow")
    client = sidecar.identity("api").context()
    assert talk(sidecar.port, client) == b"ping\n"
    path = "/v1/agent/connect/authorize"
    if fault == "down":
        double.stop()
    elif fault == "slow":
        double.inject(path, delay=3)
    elif fault == "garbage":
        double.inject(path, status=200, body='{"Authorized": maybe}')
    elif fault == "empty 200":
        double.inject(path, status=200, body="")
    else:
        double.inject(path, status=int(fault), body="Permission denied")
    assert talk(sidecar.port, client) is None
    log = sidecar.haproxy.wait_for_log(f'reason="{reason}"')
    assert "authz=deny" in log


def test_intention_flip_takes_effect_within_the_cache_ttl(start_sidecar):
    sidecar = start_sidecar({"authorize_cache_ttl_ms": 500})
    sidecar.double.set_intention("api", "web", "allow")
    client = sidecar.identity("api").context()
    assert talk(sidecar.port, client) == b"ping\n"
    sidecar.double.set_intention("api", "web", "deny")
    time.sleep(0.6)
    assert talk(sidecar.port, client) is None
    sidecar.double.set_intention("api", "web", "allow")
    time.sleep(0.6)
    assert talk(sidecar.port, client) == b"ping\n"


def test_cache_answers_without_the_agent_and_grace_covers_an_outage(start_sidecar):
    sidecar = start_sidecar({"authorize_cache_ttl_ms": 60000}, one_thread=True)
    double = sidecar.double
    double.set_intention("api", "web", "allow")
    client = sidecar.identity("api").context()
    for _ in range(5):
        assert talk(sidecar.port, client) == b"ping\n"
    assert double.count("/v1/agent/connect/authorize") == 1
    assert "cached: Matched L4 intention" in sidecar.haproxy.wait_for_log("cached:")


def test_grace_reuses_a_recent_allow_while_the_agent_is_down(start_sidecar):
    sidecar = start_sidecar({"authorize_cache_ttl_ms": 200, "authorize_grace_ms": 60000}, one_thread=True)
    double = sidecar.double
    double.set_intention("api", "web", "allow")
    double.set_intention("other", "web", "allow")
    client = sidecar.identity("api").context()
    assert talk(sidecar.port, client) == b"ping\n"
    double.inject("/v1/agent/connect/authorize", status=500, body="down")
    time.sleep(0.3)
    assert talk(sidecar.port, client) == b"ping\n"
    assert talk(sidecar.port, sidecar.identity("other").context()) is None
    assert "grace (agent answered 500)" in sidecar.haproxy.wait_for_log("grace")


def test_the_token_comes_from_the_bundle_file(double, start_sidecar, monkeypatch):
    token = "0b6b3c36-1d1f-4c2e-9a55-authz-token"
    double.enable_acls("deny")
    double.add_token({"service_prefix:": "write"}, secret=token)
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", token)
    sidecar = start_sidecar()
    double.set_intention("api", "web", "allow")
    assert talk(sidecar.port, sidecar.identity("api").context()) == b"ping\n"
    authorize_calls = [entry for entry in double.request_log if entry[1] == "/v1/agent/connect/authorize"]
    assert authorize_calls and all(entry[2].get("_token") == token for entry in authorize_calls)
    assert token not in (sidecar.out / "haproxy.cfg").read_text()
    assert token not in sidecar.haproxy.log()


def test_http_mode_authorizes_once_per_connection(start_sidecar):
    sidecar = start_sidecar({"protocol": "http", "authorize_cache_ttl_ms": 0})
    sidecar.double.set_intention("api", "web", "allow")
    context = sidecar.identity("api").context()
    for connection_number in (1, 2):
        connection = http.client.HTTPSConnection("127.0.0.1", sidecar.port, context=context, timeout=5)
        for i in range(5):
            connection.request("GET", f"/request/{i}")
            response = connection.getresponse()
            assert (response.status, response.read()) == (200, f"/request/{i}".encode())
        connection.close()
        assert sidecar.double.count("/v1/agent/connect/authorize") == connection_number
    sidecar.double.set_intention("api", "web", "deny")
    refused = http.client.HTTPSConnection("127.0.0.1", sidecar.port, context=context, timeout=5)
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        refused.request("GET", "/")
        refused.getresponse()


BLOCKING_ASK = """local function ask_agent(uri, serial)
    -- What a blocking HTTP call to a 1 s agent does inside HAProxy (the PoC's lua-socket): it
    -- holds the thread in C. A busy loop in Lua would not: from 3.2 HAProxy's forced yield
    -- interrupts it and serves other connections in between.
    os.execute("sleep 1")
    return true, "blocking variant"
end

"""


def blocking_variant() -> str:
    source = (Path(__file__).resolve().parent.parent / "authorize.lua").read_text()
    return (source[:source.index("local function ask_agent")] + BLOCKING_ASK
            + source[source.index("local function decide"):])


def p99(samples: list[float]) -> float:
    """A blocked HAProxy may leave a single sample in the window: then that one is the tail."""
    return statistics.quantiles(samples, n=100)[98] if len(samples) > 1 else max(samples)


@pytest.mark.parametrize("blocking", [False, True], ids=["authorize.lua", "blocking variant"])
def test_a_slow_agent_delays_only_the_connection_that_waits_on_it(start_sidecar, blocking):
    """Connections of a cached identity keep their latency while other identities' checks wait
    1 s on the agent. The blocking variant shows that this test tells the two apart. HAProxy
    runs one thread here: no second thread can hide a blocked one."""
    sidecar = start_sidecar({"authorize_cache_ttl_ms": 60000, "authorize_timeout_ms": 3000},
                            lua=blocking_variant() if blocking else None, one_thread=True)
    double = sidecar.double
    double.set_intention("*", "web", "allow")
    fast = sidecar.identity("api").context()
    assert talk(sidecar.port, fast) == b"ping\n"       # cached from here on
    idle = latencies(sidecar.port, fast, 1.0)
    double.inject("/v1/agent/connect/authorize", delay=1.0)
    waiting = [threading.Thread(target=talk, args=(sidecar.port, sidecar.identity(f"slow{i}").context()))
               for i in range(3)]
    for thread in waiting:
        thread.start()
    time.sleep(0.1)
    busy = latencies(sidecar.port, fast, 1.0)
    for thread in waiting:
        thread.join()
    if blocking:
        assert p99(busy) > 0.5, (p99(idle), p99(busy))
    else:
        assert p99(busy) < max(2 * p99(idle), p99(idle) + 0.05), (p99(idle), p99(busy))
