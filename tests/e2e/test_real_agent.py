"""What only a real Consul agent shows, each found on Consul 1.8.7 and each a test: an agent that
comes back with a new CA at the same indexes, a token that may not read an upstream, and
intentions decided in HAProxy exactly as the agent decides them. Where the double can model the
same fault it runs too."""
from __future__ import annotations

import json
import re
import socket
import time
import uuid

import pytest
from cryptography import x509

import meshgen
from harness import (ROOT, agent_env, EchoServer, free_port, HAProxy, Identity, load_seed, meshgen_render,
                     meshgen_run, passing_instances, register_sidecar, run_meshgen, snapshot, talk)
from real_consul import ConsulProcess, RealAgent


def render(agent, out, haproxy, *extra, env=None):
    run = run_meshgen("render", "--sidecar-for", "www", "--out", str(out), "--haproxy", haproxy, *extra,
                      env=env or agent_env(agent))
    return run.code, run.stderr


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


# The minimal policy (docs/security.md) for the token of SERVICE's sidecar with one upstream, UPSTREAM.
MINIMAL_POLICY = {
    "own registration": 'service "{service}-sidecar-proxy" {{ policy = "read" }}',
    "leaf and authorize": 'service "{service}" {{ policy = "write" }}',
    "upstream and its sidecars": 'service_prefix "{upstream}" {{ policy = "read" }}',
    "nodes of health entries": 'node_prefix "" {{ policy = "read" }}',
}


def test_the_minimal_acl_policy_is_enough_and_each_rule_is_needed(real_consul_acl, tmp_path):
    """Measured on the real agent with ACLs on and default deny: the policy renders www with
    its redis instance and lets the redis sidecar authorize; without any one rule, something
    a sidecar needs is refused or hidden."""
    agent = real_consul_acl
    suffix = "-" + uuid.uuid4().hex[:6]
    www, redis = "www" + suffix, "redis" + suffix
    listener = socket.create_server(("127.0.0.1", 0))
    load_seed(agent, suffix, sidecar_ports={"redis": listener.getsockname()[1], "www": free_port()})
    assert len(passing_instances(agent, redis, 1)) == 1

    def outcome(rules: dict) -> tuple[int, int, int]:
        token = agent.create_token("\n".join(r.format(service=www, upstream=redis) for r in rules.values()))
        env = agent_env(agent, CONSUL_HTTP_TOKEN=token)
        shown = run_meshgen("show", "--sidecar-for", www, "--json", env=env)
        summary = json.loads(shown.stdout) if shown.code == 0 else {}
        instances = len(summary["upstreams"][0]["instances"]) if summary else -1
        authorize = agent.call_status("POST", "/v1/agent/connect/authorize", token=token, json={
            "Target": www, "ClientCertURI": f"spiffe://x.consul/ns/default/dc/dc1/svc/{redis}",
            "ClientCertSerial": "01"})
        return shown.code, instances, authorize, shown.stderr, summary.get("skipped")

    assert outcome(MINIMAL_POLICY)[:3] == (0, 1, 200)
    assert outcome(MINIMAL_POLICY)[4] == []
    without = {name: outcome({k: v for k, v in MINIMAL_POLICY.items() if k != name}) for name in MINIMAL_POLICY}
    listener.close()
    assert without["own registration"][0] == 1          # --sidecar-for finds no sidecar, and says which read
    assert f"it needs service:read on the sidecar's own service, such as '{www}-sidecar-proxy'" in \
        without["own registration"][3]
    assert without["leaf and authorize"][0] == 1        # the leaf is refused (403)
    assert without["leaf and authorize"][2] == 403
    # 1.8.7 hides entries the token may not read with no sign of it (current Consul sets
    # X-Consul-Results-Filtered-By-ACLs): an empty upstream without these two. Without read on
    # the upstream its chain is refused: that upstream alone is left without instances, and
    # `show` names why.
    assert without["upstream and its sidecars"][:2] == (0, 0)
    assert len(without["upstream and its sidecars"][4]) == 1
    assert f"discovery-chain/{redis}: 403" in without["upstream and its sidecars"][4][0]
    assert without["nodes of health entries"][:2] == (0, 0)


def test_a_token_that_cannot_read_an_upstream_costs_that_upstream_and_says_so(acl_agent, any_haproxy, tmp_path):
    """Without read on the upstream, its discovery chain is refused (403 naming the rule). With
    it, a chain can still lead to a service the token may not read (here a redirect): Consul
    1.8.7 answers that service's instances with [] at index 1 and does not block on it, current
    Consul adds X-Consul-Results-Filtered-By-ACLs. Either way the instances are hidden, not
    absent: the sidecar says so in one line, and that upstream alone has no servers (its
    listener refuses connections); the leaf, the roots and the intentions still go out."""
    load_seed(acl_agent)
    www = {"service_prefix:www": "write", "node_prefix:": "read"}
    www_hcl = 'service_prefix "www" { policy = "write" }\nnode_prefix "" { policy = "read" }'
    code, err = render(acl_agent, tmp_path / "out", any_haproxy,
                       env=agent_env(acl_agent, CONSUL_HTTP_TOKEN=sidecar_token(acl_agent, www_hcl)))
    assert code == 3, err
    assert _servers(tmp_path / "out", "upstream_redis") == []
    tail = ": its listener refuses connections until it is fixed"
    refused = "meshgen: www-sidecar-proxy: skipped: upstream redis: POST /v1/discovery-chain/redis: 403 Permission denied"
    if isinstance(acl_agent, RealAgent):         # 1.8.7's 403 bodies name nothing
        assert err.strip().splitlines()[0] == refused + tail, err
    else:                                        # current Consul's name the token and the rule
        assert re.fullmatch(re.escape(refused) + r": token with AccessorID '[0-9a-f-]+' lacks permission "
                            r"'service:read' on \"redis\"" + re.escape(tail), err.strip().splitlines()[0]), err
    if isinstance(acl_agent, RealAgent):
        token = acl_agent.create_token(www_hcl + '\nservice_prefix "redis" { policy = "read" }')
        acl_agent.register({"Kind": "connect-proxy", "ID": "cache-sidecar-proxy", "Name": "cache-sidecar-proxy",
                            "Address": "127.0.0.1", "Port": free_port(), "Proxy": {"DestinationServiceName": "cache"}})
    else:
        token = acl_agent.add_token(dict(www, **{"service_prefix:redis": "read"}), secret=str(uuid.uuid4()))
        acl_agent.add_instance("cache", "127.0.0.1", free_port())
    acl_agent.set_config({"Kind": "service-resolver", "Name": "redis", "Redirect": {"Service": "cache"}})
    try:
        code, err = render(acl_agent, tmp_path / "out", any_haproxy, env=agent_env(acl_agent, CONSUL_HTTP_TOKEN=token))
    finally:
        if isinstance(acl_agent, RealAgent):
            acl_agent.delete_config("service-resolver", "redis")
            acl_agent.deregister("cache-sidecar-proxy")
    assert code == 3, err
    assert [line for line in err.strip().splitlines() if "skipped:" in line] == [
        "meshgen: www-sidecar-proxy: skipped: instances of target cache.default.dc1: GET /v1/health/connect/cache: "
        "the agent hid the instances of 'cache': the token cannot read them (it needs service:read on 'cache' "
        "and its sidecars, and node:read): no instances until it is fixed"]
    assert _servers(tmp_path / "out", "upstream_redis") == []


def _servers(out, backend: str) -> list[str]:
    """The server lines of a backend in the live haproxy.cfg."""
    section = (out / "haproxy.cfg").read_text().split(f"\nbackend {backend}\n")[1].split("\n\n")[0]
    return [line for line in section.splitlines() if line.strip().startswith("server ")]


# Intention sets, each a list of (source, destination, action), callers c0..c11 and the
# sidecar's service "web" (all suffixed): exact allow and deny, `*` allow and deny, exact over
# wildcard, a source's `c => *` under `* => web`, and none.
INTENTION_MATRIX = {
    "none": [],
    "exact allow and deny": [("c0", "web", "allow"), ("c1", "web", "deny")],
    "* allow": [("*", "web", "allow")],
    "* deny": [("*", "web", "deny")],
    "exact over * deny": [("*", "web", "deny"), ("c0", "web", "allow"), ("c1", "web", "allow")],
    "exact over * allow": [("*", "web", "allow"), ("c2", "web", "deny"), ("c3", "web", "deny")],
    "source to * under * => web": [("c4", "*", "allow"), ("c5", "*", "deny"), ("*", "web", "deny")],
    "source to * alone": [("c4", "*", "deny"), ("c6", "web", "allow")],
}
CALLERS = [f"c{i}" for i in range(12)]


@pytest.mark.parametrize("acls", ["off", "on, default deny"])
def test_meshgen_decides_every_caller_as_the_real_agent_does(acls, haproxy, tmp_path, request, monkeypatch):
    """For each intention set, each of 12 callers connects: let in or refused by HAProxy, from
    intentions.map alone, and the agent's authorize endpoint is asked the same. 0
    disagreements, and both outcomes seen."""
    agent = request.getfixturevalue("real_consul" if acls == "off" else "real_consul_acl")
    if agent.token:
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", agent.token)
    suffix = "-" + uuid.uuid4().hex[:6]
    named = {name: name + suffix if name != "*" else "*" for name in CALLERS + ["web", "*"]}
    echo, port = EchoServer(), free_port()
    proxy_id = register_sidecar(agent, named["web"], port, echo.port)
    out = tmp_path / "out"
    assert meshgen_render(agent, proxy_id, out, haproxy) == 3
    process = HAProxy(haproxy, out / "haproxy.cfg", tmp_path / "haproxy.log", wait_for_port=port)
    identities = {name: Identity.from_agent(agent, tmp_path / "ids", named[name]) for name in CALLERS}
    clients = {name: identity.context() for name, identity in identities.items()}
    uris = {name: x509.load_pem_x509_certificate(identity.cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)[0]
        for name, identity in identities.items()}
    disagreements, outcomes, current = [], set(), []
    try:
        for case, intentions in INTENTION_MATRIX.items():
            for source, destination in current:
                agent.delete_intention(source, destination)
            current = [(named[s], named[d]) for s, d, _ in intentions]
            for source, destination, action in intentions:
                agent.set_intention(named[source], named[destination], action)
            result = meshgen_run(agent, proxy_id, out, haproxy, runtime_socket=out / "admin.sock")
            assert result.applied_live or not result.changed, (case, result)
            for caller in CALLERS:
                let_in = talk(port, clients[caller]) == b"ping\n"
                answer = agent.call("POST", "/v1/agent/connect/authorize", json={
                    "Target": named["web"], "ClientCertURI": uris[caller]}).json()
                outcomes.add(let_in)
                if let_in != answer["Authorized"]:
                    disagreements.append((case, caller, let_in, answer["Reason"]))
    finally:
        process.stop()
        echo.close()
        for source, destination in current:
            agent.delete_intention(source, destination)
        agent.deregister(proxy_id.removesuffix("-sidecar-proxy"))
    assert disagreements == []
    assert outcomes == {True, False}


DEFINITIONS = {
    "demo www": json.loads((ROOT / "demo" / "services.json").read_text())["services"][0],
    "demo redis": json.loads((ROOT / "demo" / "services.json").read_text())["services"][1],
    "compose www": json.loads((ROOT / "docker" / "consul.d" / "www.json").read_text()),
    "compose redis": json.loads((ROOT / "docker" / "consul.d" / "redis.json").read_text()),
    "every field": {"service": {
        "name": "api", "id": "api-1", "port": 9090, "address": "10.0.0.7",
        "connect": {"sidecar_service": {"port": 21500, "proxy": {
            "local_service_address": "127.0.0.2", "local_service_port": 9091,
            "config": {"protocol": "http", "max_inbound_connections": 64},
            "upstreams": [
                {"destination_name": "db", "local_bind_port": 5432, "datacenter": "dc2",
                 "config": {"connect_timeout_ms": 2500}},
                # (Upstreams on a unix socket are 1.10+: 1.8.7 refuses local_bind_socket_path.)
                {"destination_type": "prepared_query", "destination_name": "geo",
                 "local_bind_address": "127.0.0.3", "local_bind_port": 8181}],
            "expose": {"paths": [{"path": "/health", "listener_port": 21600, "local_path_port": 9092}]}}}}}},
}


@pytest.mark.parametrize("name", sorted(DEFINITIONS))
def test_check_expands_a_definition_as_the_agent_does(real_consul, name):
    """`meshgen check` expands a service definition offline; the agent's own expansion of the
    same definition must give the same sidecar, value for value, and the same model."""
    suffix = uuid.uuid4().hex[:6]
    definition = json.loads(json.dumps(DEFINITIONS[name]))
    service = definition["service"]
    service["name"] += suffix
    if "id" in service:
        service["id"] += suffix
    expanded = meshgen.expand_definition(definition, name)
    app_id = real_consul.register(definition)
    try:
        registered = real_consul.call("GET", f"/v1/agent/service/{app_id}-sidecar-proxy").json()
    finally:
        real_consul.deregister(app_id)

    def differences(ours, theirs, where=""):
        if isinstance(ours, dict):
            return [d for key, value in ours.items() if value is not None
                    for d in differences(value, theirs.get(key) if isinstance(theirs, dict) else None,
                                         f"{where}.{key}")]
        if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
            return [d for i, (a, b) in enumerate(zip(ours, theirs)) for d in differences(a, b, f"{where}[{i}]")]
        # An empty list or object is what the agent leaves out.
        return [] if ours == theirs or (ours in ({}, []) and theirs is None) else [f"{where}: {ours!r} != {theirs!r}"]

    assert differences(expanded, registered) == []
    assert meshgen.parse_registration(expanded, expanded["ID"]) == \
        meshgen.parse_registration(registered, registered["ID"])


def test_a_token_revoked_mid_run_is_one_line_and_keeps_the_bundle(real_consul_acl, any_haproxy, tmp_path):
    agent = real_consul_acl
    suffix = "-" + uuid.uuid4().hex[:6]
    www = "www" + suffix
    load_seed(agent, suffix, sidecar_ports={"www": free_port(), "redis": free_port()})
    token = agent.create_token("\n".join(rule.format(service=www, upstream="redis" + suffix)
                                         for rule in MINIMAL_POLICY.values()))
    out = tmp_path / "out"
    command = ("render", "--sidecar-for", www, "--out", str(out), "--haproxy", any_haproxy)
    env = agent_env(agent, CONSUL_HTTP_TOKEN=token)
    first = run_meshgen(*command, env=env)
    assert first.code == 3, first.stderr
    before = snapshot(out)
    agent.delete_token(token)
    revoked = run_meshgen(*command, env=env)
    assert revoked.code == 1
    assert revoked.stderr.strip().splitlines() == [
        "meshgen: error: GET /v1/agent/services: 403 ACL not found: the agent does not know this Consul token"]
    assert snapshot(out) == before
    assert token not in revoked.stderr


@pytest.fixture
def server_and_client(consul):
    """A Consul server on 127.0.0.1 and a client agent on 127.0.0.2 that joins it: the server
    can stop while the client agent, which the sidecars talk to, stays."""
    server = ConsulProcess(consul, dev=False, server=True).start(timeout=120)
    client = ConsulProcess(consul, dev=False, server=False, bind="127.0.0.2", join=server.serf_lan).start(timeout=120)
    yield server, client
    client.remove()
    server.remove()


def test_with_the_server_stopped_for_60s_sidecars_fail_static_and_recover(server_and_client, any_haproxy, tmp_path):
    """Consul's integration guide asks a proxy to fail static: with the servers out of reach,
    the client agent answers from its cache (`?cached` for instances), traffic keeps flowing,
    `render` keeps saying "unchanged" (exit 0, not 1), and recovery needs no restart."""
    server, client = server_and_client
    agent = RealAgent(client.url)
    echo = EchoServer()
    ports = {"redis": free_port(), "www": free_port(), "upstream": free_port()}
    register_sidecar(agent, "redis", ports["redis"], echo.port)
    register_sidecar(agent, "www", ports["www"], free_port(), upstreams=[
        {"destination_name": "redis", "local_bind_port": ports["upstream"]}])
    agent.set_intention("www", "redis", "allow")
    started = []
    try:
        outs = {name: tmp_path / name for name in ("redis", "www")}
        assert meshgen_render(agent, "redis-sidecar-proxy", outs["redis"], any_haproxy) == 3
        started.append(HAProxy(any_haproxy, outs["redis"] / "haproxy.cfg", tmp_path / "redis.log",
                               wait_for_port=ports["redis"], master_socket=tmp_path / "redis.master"))
        assert len(passing_instances(agent, "redis", 1)) == 1      # its check sees HAProxy listen
        assert meshgen_render(agent, "www-sidecar-proxy", outs["www"], any_haproxy) == 3
        www = HAProxy(any_haproxy, outs["www"] / "haproxy.cfg", tmp_path / "www.log",
                      wait_for_port=ports["upstream"], master_socket=tmp_path / "www.master")
        started.append(www)
        assert talk(ports["upstream"], None) == b"ping\n"

        server.stop()
        served, renders, deadline = [], [], time.monotonic() + 60
        while time.monotonic() < deadline:
            served.append(talk(ports["upstream"], None) == b"ping\n")
            renders += [meshgen_render(agent, f"{name}-sidecar-proxy", outs[name], any_haproxy) for name in outs]
            time.sleep(1)
        assert len(served) >= 20 and served.count(False) == 0
        assert set(renders) == {0}                                   # unchanged, answered from the cache

        server.start(timeout=120)
        register_sidecar(agent, "www", ports["www"], free_port(), config={"max_inbound_connections": 64},
                         upstreams=[{"destination_name": "redis", "local_bind_port": ports["upstream"]}])
        assert meshgen_render(agent, "www-sidecar-proxy", outs["www"], any_haproxy) == 3
        www.reload()
        assert "maxconn 64" in (outs["www"] / "haproxy.cfg").read_text()
        assert talk(ports["upstream"], None) == b"ping\n"
    finally:
        for process in started:
            process.stop()
        echo.close()
