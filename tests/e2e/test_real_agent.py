"""What only a real Consul agent shows, each found on Consul 1.8.7 and each a test: an agent that
comes back with a new CA at the same indexes, a token that may not read an upstream, the reason
texts authorize.lua logs. Where the double can model the same fault it runs too."""
from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest
from cryptography import x509

import meshgen
from harness import (ROOT, EchoServer, HAProxy, Identity, agent_env, free_port, load_seed, meshgen_render,
                     register_sidecar, talk)
from real_consul import ConsulProcess, RealAgent


def render(agent, out, haproxy, *extra, env=None):
    command = [sys.executable, str(ROOT / "meshgen.py"), "render", "--sidecar-for", "www", "--out", str(out),
               "--haproxy", haproxy, *extra]
    result = subprocess.run(command, env=env or agent_env(agent), capture_output=True, text=True, timeout=120)
    return result.returncode, result.stderr


def served_roots(out) -> set[bytes]:
    pem = (out / meshgen.LIVE / "roots.pem").read_bytes()
    return {c.fingerprint(c.signature_hash_algorithm) for c in x509.load_pem_x509_certificates(pem)}


def test_an_agent_back_with_a_new_ca_at_the_same_indexes_is_noticed(consul, any_haproxy, tmp_path, request):
    """A dev agent restarted comes back with a new CA, and its indexes can equal the ones the
    last run saved: a --wait that trusted the indexes alone blocked for its whole period and
    kept certificates of a dead CA."""
    consul = ConsulProcess(consul)
    request.addfinalizer(consul.remove)
    out = tmp_path / "out"
    seen = []
    for _ in range(2):
        consul.start()
        agent = RealAgent(consul.url)
        load_seed(agent)
        code, err = render(agent, out, any_haproxy, "--wait", "10s")
        seen.append(served_roots(out))
        started = time.monotonic()
        if len(seen) == 1:
            assert code == 3, err                  # the first run renders at once
            consul.kill()
    assert code == 3, err
    assert time.monotonic() - started < 5          # noticed at once, not after the 10 s
    assert seen[0].isdisjoint(seen[1])             # the new CA's roots only


@pytest.fixture(params=["double", "consul-acl"])
def acl_agent(request, double):
    """An agent with ACLs on and default deny, and its management token."""
    if request.param == "double":
        double.enable_acls("deny")
        double.token = double.add_token({"": "write"}, secret=str(uuid.uuid4()))
        return double
    return request.getfixturevalue("real_consul_acl")


def sidecar_token(agent, rules: str) -> str:
    if isinstance(agent, RealAgent):
        return agent.create_token(rules)
    secret = str(uuid.uuid4())
    agent.add_token({"service_prefix:www": "write", "node_prefix:": "read"}, secret=secret)
    return secret


def test_a_token_that_cannot_read_an_upstream_is_an_error_not_an_empty_backend(acl_agent, any_haproxy, tmp_path):
    """Consul 1.8.7 answers [] at index 1 for a service the token may not read, and does not
    block on it; current Consul adds X-Consul-Results-Filtered-By-ACLs. Either way the upstream
    is not empty, it is hidden, and the sidecar must say so."""
    load_seed(acl_agent)
    token = sidecar_token(acl_agent, 'service_prefix "www" { policy = "write" }\nnode_prefix "" { policy = "read" }')
    code, err = render(acl_agent, tmp_path / "out", any_haproxy,
                       env=agent_env(acl_agent, CONSUL_HTTP_TOKEN=token))
    assert code == 1, err
    assert err.strip().splitlines() == [
        "meshgen: error: GET /v1/health/connect/redis: the agent hid the instances of upstream 'redis': "
        "the token cannot read them (it needs service:read on 'redis' and node:read)"]
    assert not (tmp_path / "out" / meshgen.LIVE).exists()


def test_intentions_of_a_real_agent_decide_and_its_reasons_are_logged_decoded(real_consul, haproxy, tmp_path):
    """authorize.lua against a real agent: an allow lets the caller in, a deny refuses it, and
    the reason reads as Consul wrote it (`=>`, not the JSON escape `\\u003e`)."""
    suffix = "-" + uuid.uuid4().hex[:6]
    web, api = "web" + suffix, "api" + suffix
    echo, port = EchoServer(), free_port()
    proxy_id = register_sidecar(real_consul, web, port, echo.port, {"authorize_cache_ttl_ms": 0})
    out = tmp_path / "out"
    assert meshgen_render(real_consul, proxy_id, out, haproxy) == 3
    process = HAProxy(haproxy, out / "haproxy.cfg", tmp_path / "haproxy.log", wait_for_port=port)
    try:
        client = Identity.from_agent(real_consul, tmp_path / "ids", api).context()
        real_consul.set_intention(api, web, "allow")
        assert talk(port, client) == b"ping\n"
        real_consul.set_intention(api, web, "deny")
        assert talk(port, client) is None
        log = process.wait_for_log("authz=deny")
        assert f"Matched intention: ALLOW default/{api} => default/{web}" in log
        assert f"Matched intention: DENY default/{api} => default/{web}" in log
        assert "\\u003e" not in log
    finally:
        process.stop()
        echo.close()
        real_consul.delete_intention(api, web)
        real_consul.deregister(web)
