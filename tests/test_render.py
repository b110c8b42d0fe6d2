"""Rendering: golden files pin the output; both HAProxy builds accept it; same input, same bytes.

Set MESHGEN_UPDATE_GOLDEN=1 to rewrite the golden files after an intended change, then read the
diff before committing it."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import random
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import meshgen
from consul_double import ConsulDouble, _ChainCompiler, _filter
from harness import ROOT

DATA = ROOT / "tests" / "data"
GOLDEN = DATA / "golden"
OUT = Path("/run/meshgen")


def intention(source: str, action: str | None, precedence: int, destination: str = "web",
              permissions: list | None = None) -> dict:
    entry = {"SourceNS": "default", "SourceName": source, "DestinationNS": "default",
             "DestinationName": destination, "Precedence": precedence}
    return dict(entry, Action=action) if action else dict(entry, Permissions=permissions)


BILLING_PERMISSIONS = [
    {"Action": "deny", "HTTP": {"PathPrefix": "/admin", "Header": [{"Name": "x-debug", "Present": True}]}},
    {"Action": "allow", "HTTP": {"PathRegex": "/invoices/[0-9]+", "Methods": ["GET", "HEAD"]}},
    {"Action": "allow", "HTTP": {"PathExact": "/health", "Header": [
        {"Name": "user-agent", "Suffix": "probe", "Invert": True}, {"Name": "x-team", "Exact": "a b#$c"}]}},
]
FULL_INTENTIONS = [intention("api", "allow", 9), intention("billing", None, 9, permissions=BILLING_PERMISSIONS),
                   intention("*", "deny", 8), intention("late", "allow", 6, "*")]
# Config entries for the api upstream: every node type of a discovery chain.
API_CHAIN = [
    {"Kind": "service-defaults", "Name": "api", "Protocol": "http"},
    {"Kind": "service-defaults", "Name": "admin", "Protocol": "http"},
    {"Kind": "service-resolver", "Name": "api", "DefaultSubset": "v1", "ConnectTimeout": "2s",
     "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"},
                 "v2": {"Filter": "Service.Meta.version == v2", "OnlyPassing": True}},
     "Failover": {"v1": {"Service": "admin"}}},
    {"Kind": "service-splitter", "Name": "api", "Splits": [{"Weight": 90, "ServiceSubset": "v1"},
                                                          {"Weight": 10, "ServiceSubset": "v2"}]},
    {"Kind": "service-router", "Name": "api", "Routes": [
        {"Match": {"HTTP": {"PathPrefix": "/admin/"}},
         "Destination": {"Service": "admin", "PrefixRewrite": "/", "RequestTimeout": "1500ms",
                         "NumRetries": 2, "RetryOnConnectFailure": True, "RetryOnStatusCodes": [503]}},
        {"Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "1"}], "QueryParam": [{"Name": "q", "Present": True}],
                            "Methods": ["GET"]}}, "Destination": {"ServiceSubset": "v2"}}]},
]
EXAMPLES = {
    # name: (registration, instances, intentions, the agent's decision for an unnamed caller, config entries)
    "seed": ("seed_registration.json", "seed_instances.json", [], (True, "ACLs disabled, access is allowed by default"),
             []),
    "full": ("full_registration.json", "full_instances.json", FULL_INTENTIONS,
             (False, "Matched intention: DENY default/* => default/web (ID: 1|2\nX, Precedence: 8)"), []),
    "chain": ("full_registration.json", "chain_instances.json", [], (True, "ACLs disabled, access is allowed by default"),
              API_CHAIN),
}


def intentions(name: str, http: bool = True) -> meshgen.Intentions:
    _, _, entries, (allowed, reason), _ = EXAMPLES[name]
    listed = [meshgen.parse_intention(entry, f"intentions of web[{i}]") for i, entry in enumerate(entries)]
    return meshgen.decide(listed, http, allowed, reason)


def model(name: str, shuffle: bool = False) -> meshgen.Sidecar:
    """The example's sidecar resolved as a run resolves it: each upstream's chain as the double
    compiles it from the example's config entries, each target's instances from the file."""
    registration_file, instances_file, _, _, entries = EXAMPLES[name]
    registration = json.loads((DATA / registration_file).read_text())
    by_name = json.loads((DATA / instances_file).read_text())
    if shuffle:
        rng = random.Random(7)
        rng.shuffle(registration["Proxy"]["Upstreams"])
        for listed in by_name.values():
            rng.shuffle(listed)
    return resolved(registration, by_name, entries)


def resolved(registration: dict, by_name: dict | None = None, entries: list = ()) -> meshgen.Sidecar:
    """A registration's sidecar with its upstreams resolved: chains from these config entries,
    instances by service name."""
    by_name = by_name or {}
    sidecar = meshgen.parse_registration(registration, registration["ID"])
    agent = ConsulDouble()
    for entry in entries:
        agent.set_config(entry)
    chains, answers = {}, {}
    for upstream in sidecar.upstreams:
        if not upstream.follows_chain:
            answers[meshgen.direct_query(upstream)] = meshgen.parse_instances(by_name.get(upstream.name, []), upstream.name, "dc1")[0]
            continue
        query = meshgen.chain_query(upstream)
        overrides = json.loads(query.body) if query.body else {}
        compiled = _ChainCompiler(agent, upstream.name, upstream.datacenter or "dc1", overrides.get("OverrideProtocol", ""),
                                  overrides.get("OverrideConnectTimeout", "")).compile()
        chains[upstream.key] = chain = meshgen.parse_chain({"Chain": compiled}, upstream)
        for target in chain.targets:
            keep = _filter(target.filter) if target.filter else (lambda _: True)
            answers[target.query] = meshgen.parse_instances([e for e in by_name.get(target.service, []) if keep(e)], target.id, "dc1")[0]
    return meshgen.with_chains(sidecar, chains, answers)


def bundle(name: str, shuffle: bool = False, out_dir: Path | None = None) -> meshgen.Bundle:
    """The example rendered into a fixed directory (golden files), or for real into out_dir."""
    sidecar = model(name, shuffle)
    certs = meshgen.throwaway_certificates(sidecar.service)
    if out_dir is not None:
        return meshgen.render(sidecar, certs, intentions(name), out_dir, out_dir / "admin.sock")
    return meshgen.render_into(OUT / ".bundle-0123456789abcdef", sidecar, certs, intentions(name),
                               OUT / "admin.sock")


@pytest.mark.parametrize("name", sorted(EXAMPLES))
@pytest.mark.parametrize("file", meshgen.TEMPLATES)
def test_golden_config(name, file):
    config = bundle(name).files[file].decode()
    golden = GOLDEN / f"{name}.{file}"
    if os.environ.get("MESHGEN_UPDATE_GOLDEN"):
        golden.write_text(config)
    assert config == golden.read_text()


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_pass_haproxy_check_without_a_warning(name, haproxy, tmp_path):
    written = meshgen.write_files(bundle(name, out_dir=tmp_path), tmp_path)
    result = subprocess.run([haproxy, "-c", "-f", str(written / "haproxy.cfg")], capture_output=True, text=True)
    output = (result.stdout + result.stderr).splitlines()
    assert result.returncode == 0, output
    assert [line for line in output if "WARNING" in line or "ALERT" in line] == []
    assert meshgen.validate(written, haproxy) == []


def test_full_example_carries_every_setting():
    config = bundle("full").files["haproxy.cfg"].decode()
    for expected in [
        "bind 10.0.0.10:21000 ssl crt-list",                   # bind_address, bind_port as string
        "maxconn 512",                                          # max_inbound_connections
        "hard-stop-after 45000ms",                              # hard_stop_after_ms
        "timeout connect 2000ms\n    server app 127.0.0.1:8080",  # local_connect_timeout_ms
        "timeout server 30000ms",                               # local_request_timeout_ms
        "timeout client 120000ms",                              # local_idle_timeout_ms
        "frontend unsecured_listener\n    bind 10.0.0.10:8081",  # unsecured_bind_port (seed)
        "log 127.0.0.1:5514 local0",                            # syslog_server (seed)
        "option dontlog-normal",                                # access_log false
        "bind 127.0.0.1:9102\n    http-request use-service prometheus-exporter",
        "bind 127.0.0.1:9103\n    stats enable",
        "timeout connect 3000ms",                               # upstream connect_timeout_ms
        "frontend listener_upstream_db\n    bind 127.0.0.1:9191\n    maxconn 100",   # Limits.MaxConnections
        "check check-ssl observe layer4 error-limit 3 on-error mark-down inter 10000ms downinter 30000ms",
        "frontend listener_query_geo-cache.dc2\n    bind 127.0.0.2:8181 proto h2\n    mode http\n    maxconn 50",
        "verify required alpn h2",                              # http2 upstream
        "option redis-check",                                   # advanced_check (seed)
        "bind /run/web/api.sock mode 700",                      # LocalBindSocketPath + mode
        "check check-ssl observe layer7 error-limit 5 on-error mark-down inter 5000ms",
        "frontend listener_expose_21500\n    mode http\n    bind 10.0.0.10:21500\n    http-request deny unless { path /health }",
        "server app 127.0.0.1:9102 proto h2",                   # Expose path over http2
        "server 10.0.1.12:21000 10.0.1.12:21000 weight 256",   # Weights.Passing, capped
        "server 10.0.0.13:21000 10.0.0.13:21000 weight 3",     # Node.Address fallback
        "server fd00::14:21002 [fd00::14]:21002 weight 1",
        "server localhost:21000 localhost:21000 weight 1",       # a host name as address
    ]:
        assert expected in config, expected
    assert "tproxy-synthetic" not in config


def test_intentions_map_gives_each_named_caller_consuls_first_match_and_the_rest_the_agents_answer():
    """Consul's order decides: `late` (exact source, * destination, precedence 6) comes after
    `* => web` (8), so the wildcard decides it: `late` gets no line of its own and falls through
    to the wildcard's, as any caller of the namespace does; an L7 intention gives its caller its
    rules' tag. The wildcard holds this namespace's line, so the agent's answer has none; "*"
    refuses a caller of another partition or namespace."""
    lines = [line for line in bundle("full").files["intentions.map"].decode().splitlines()
             if not line.startswith("#")]
    assert [line.split(" ", 1)[0] for line in lines] == [
        "default/default/*", "default/default/api", "default/default/billing", "*"]
    assert lines[0].startswith("default/default/* deny|intention: default/* => default/web (precedence 8)")
    assert lines[1].startswith("default/default/api allow|intention: default/api => default/web (precedence 9)")
    assert lines[2].startswith("default/default/billing l7-1|L7 intention: default/billing => default/web")
    assert lines[3] == "* deny|no intention names a caller of another partition or namespace"
    decisions = dict(line.split(" ", 1) for line in lines)
    assert meshgen.decision_of(decisions, "default/default/late").startswith("deny|")
    assert meshgen.decision_of(decisions, "default/default/api").startswith("allow|")
    assert meshgen.decision_of(decisions, "team/default/api").startswith("deny|no intention names a caller of another")


def test_the_agents_answer_is_for_callers_of_this_namespace_only_and_made_safe():
    """The agent was asked about a caller of this service's own partition and namespace: its
    answer (its reason made safe for the map) holds for them, and a caller of another partition
    or namespace that no intention names is refused, not given it."""
    decided = meshgen.decide([], False, True, "Matched intention: ALLOW default/* => default/web (ID: 1|2\nX)",
                             home="team/ns-a")
    decisions = {d.caller: d.map_value for d in decided.decisions}
    assert decisions == {
        "team/ns-a/*": "allow|no intention names the caller, the agent says: Matched intention: ALLOW "
                       "default/* => default/web (ID: 1?2?X)",
        "*": "deny|no intention names a caller of another partition or namespace"}
    assert meshgen.decision_of(decisions, "team/ns-a/api").startswith("allow|")
    assert meshgen.decision_of(decisions, "team/ns-b/api").startswith("deny|")
    assert meshgen.decision_of(decisions, "default/ns-a/api").startswith("deny|")


def test_a_namespace_wildcard_reaches_its_namespace_only_and_the_partition_is_part_of_the_caller():
    """Consul Enterprise: `ns-a/*` is every service of namespace ns-a, not every caller; and the
    same name in another partition is another caller."""
    entries = [dict(entry, DestinationName="web") for entry in (
        {"SourceName": "api", "SourceNS": "ns-a", "SourcePartition": "team", "Action": "deny", "Precedence": 9},
        {"SourceName": "*", "SourceNS": "ns-a", "Action": "allow", "Precedence": 8},
        {"SourceName": "*", "SourceNS": "*", "SourcePartition": "team", "Action": "allow", "Precedence": 7})]
    listed, skipped = meshgen.parse_intentions(entries, "i")
    assert skipped == ()
    decided = meshgen.decide(listed, False, False, "default deny")
    decisions = {d.caller: d.map_value for d in decided.decisions}
    assert set(decisions) == {"team/ns-a/api", "default/ns-a/*", "team/*/*", "default/default/*", "*"}
    verdict = {caller: meshgen.decision_of(decisions, caller).split("|")[0] for caller in (
        "team/ns-a/api", "default/ns-a/api", "default/ns-a/web", "default/ns-b/web", "team/ns-b/web", "other/ns-a/api")}
    assert verdict == {"team/ns-a/api": "deny", "default/ns-a/api": "allow", "default/ns-a/web": "allow",
                       "default/ns-b/web": "deny", "team/ns-b/web": "allow", "other/ns-a/api": "deny"}


def test_l7_permissions_become_request_rules_in_consuls_order():
    config = bundle("full").files["haproxy.cfg"].decode()
    rules = [line.strip() for line in config.splitlines() if "txn.meshgen_l7" in line and "set-var" in line]
    decided = "if { var(txn.meshgen_decision) -m str l7-1 } !{ var(txn.meshgen_l7) -m found }"
    assert rules == [
        f"http-request set-var(txn.meshgen_l7) str(deny:permission-1) {decided} "
        "{ path -m beg -- '/admin' } { req.hdr_cnt(x-debug) gt 0 }",
        f"http-request set-var(txn.meshgen_l7) str(allow:permission-2) {decided} "
        "{ path -m reg -- '^(?:/invoices/[0-9]+)$' } { method GET HEAD }",
        f"http-request set-var(txn.meshgen_l7) str(allow:permission-3) {decided} "
        "{ path -m str -- '/health' } !{ req.fhdr(user-agent) -m end -- 'probe' } { req.fhdr(x-team) -m str -- 'a b#$c' }",
        # A `*` intention hides Consul's default from the agent's answer: unknown, so denied.
        f"http-request set-var(txn.meshgen_l7) str(deny:default) {decided}",
    ]


def test_on_a_tcp_service_an_l7_intention_denies():
    decided = intentions("full", http=False)
    assert {d.caller: d.verdict for d in decided.decisions} == {
        "default/default/*": "deny", "default/default/api": "allow", "default/default/billing": "deny", "*": "deny"}
    assert decided.l7 == ()


@pytest.mark.parametrize("entry, field", [
    ({"SourceName": "a\nb", "Action": "allow"}, "SourceName"),
    ({"SourceName": "api", "Action": "maybe"}, "Action"),
    ({"SourceName": "api", "SourceNS": "x y", "Action": "allow"}, "SourceNS"),
    ({"SourceName": "api", "DestinationName": "web\ttrouble", "Action": "allow"}, "DestinationName"),
    ({"SourceName": "api", "Permissions": [{"Action": "allow", "HTTP": {"PathExact": "/it's"}}]},
     r"Permissions\[0\]\.HTTP\.PathExact"),
    ({"SourceName": "api", "Permissions": [{"Action": "allow", "HTTP": {"PathRegex": "(unclosed"}}]},
     r"Permissions\[0\]\.HTTP\.PathRegex"),
    ({"SourceName": "api", "Permissions": [{"Action": "allow", "HTTP": {"Header": [
        {"Name": "x-a", "Exact": "\n    server evil 10.9.9.9:1"}]}}]}, r"Permissions\[0\]\.HTTP\.Header\[0\]\.Exact"),
    ({"SourceName": "api", "Permissions": [{"Action": "allow", "HTTP": {"Header": [
        {"Name": "x a", "Present": True}]}}]}, r"Permissions\[0\]\.HTTP\.Header\[0\]\.Name"),
    ({"SourceName": "api", "Permissions": [{"Action": "allow", "HTTP": {"Header": [
        {"Name": "x-a", "Exact": "1", "Prefix": "2"}]}}]}, r"Permissions\[0\]\.HTTP\.Header\[0\]"),
    ({"SourceName": "api", "Permissions": [{"Action": "allow", "HTTP": {"Methods": ["get it"]}}]},
     r"Permissions\[0\]\.HTTP\.Methods\[0\]"),
    ({"SourceName": "api", "Permissions": [{"Action": "maybe"}]}, r"Permissions\[0\]\.Action"),
])
def test_an_intention_meshgen_cannot_render_safely_is_one_line_naming_its_field(entry, field):
    with pytest.raises(meshgen.MeshgenError, match=rf"intentions of web\[0\]\.{field}"):
        meshgen.parse_intention(dict({"DestinationName": "web"}, **entry), "intentions of web[0]")


def test_upstream_without_instances_renders_a_backend_without_servers():
    config = bundle("full").files["haproxy.cfg"].decode()
    backend = config.split("\nbackend upstream_api\n")[1].split("\n\n")[0]
    assert "\n    server " not in backend


def test_same_input_in_any_order_gives_identical_bytes():
    first, second = bundle("full"), bundle("full", shuffle=True)
    assert first.files["haproxy.cfg"] == second.files["haproxy.cfg"]


def test_bundle_name_follows_content():
    sidecar = model("seed")
    certs = meshgen.throwaway_certificates(sidecar.service)
    decided = intentions("seed")
    same = [meshgen.render(sidecar, certs, decided, OUT, OUT / "admin.sock") for _ in range(2)]
    assert same[0] == same[1]
    other_certs = meshgen.render(sidecar, meshgen.throwaway_certificates("www"), decided, OUT, OUT / "admin.sock")
    denying = meshgen.render(sidecar, certs, meshgen.decide([], False, False, "deny"), OUT, OUT / "admin.sock")
    assert len({same[0].name, other_certs.name, denying.name}) == 3
    assert f"crt /run/meshgen/{same[0].name}/leaf.pem" in same[0].files["haproxy.cfg"].decode()


def test_config_values_as_strings_or_go_field_names_mean_the_same():
    def upstream(config):
        return meshgen.parse_upstream({"DestinationName": "db", "LocalBindPort": 9191, "Config": config}, "u")

    snake = upstream({"connect_timeout_ms": 3000, "limits": {"max_connections": 100},
                      "passive_health_check": {"interval": "10s", "max_failures": 3}})
    go = upstream({"ConnectTimeoutMs": "3000", "Limits": {"MaxConnections": "100"},
                   "PassiveHealthCheck": {"Interval": 10_000_000_000, "MaxFailures": 3.0}})
    assert snake == go
    assert snake.passive_health_check == meshgen.PassiveHealthCheck(3, 10000, None)


def test_consul_defaults_apply_when_config_is_empty():
    registration = json.loads((DATA / "seed_registration.json").read_text())
    registration["Proxy"]["Config"] = {}
    sidecar = meshgen.parse_registration(registration, "www-sidecar-proxy")
    assert sidecar.protocol == "tcp"
    assert sidecar.public_bind == "0.0.0.0:21000"
    assert sidecar.local_connect_timeout_ms == 5000
    assert sidecar.max_inbound_connections == 0
    assert sidecar.unsecured_bind is None and sidecar.prometheus_bind is None
    registration["Proxy"]["Config"] = {"local_connect_timeout_ms": 0}
    assert meshgen.parse_registration(registration, "x").local_connect_timeout_ms == 5000


def test_an_app_on_a_unix_socket_keeps_its_expose_paths_on_tcp(haproxy, tmp_path):
    """Exposed paths reach the app at LocalPathPort on its address (127.0.0.1 when it has none),
    as Envoy dials them: a socket path has no port, and `unix@/path:9102` is no address."""
    registration = json.loads((DATA / "seed_registration.json").read_text())
    proxy = registration["Proxy"]
    del proxy["LocalServiceAddress"], proxy["LocalServicePort"]
    proxy["LocalServiceSocketPath"] = "/run/web.sock"
    proxy["Expose"] = {"Paths": [{"ListenerPort": 21500, "Path": "/health", "LocalPathPort": 9102}]}
    sidecar = resolved(registration)
    built = meshgen.render(sidecar, meshgen.throwaway_certificates("www"), intentions("seed"), tmp_path,
                           tmp_path / "admin.sock")
    config = built.files["haproxy.cfg"].decode()
    assert "server app unix@/run/web.sock\n" in config
    expose_backend = config.split("\nbackend expose_21500\n")[1]
    assert "    server app 127.0.0.1:9102\n" in expose_backend
    assert "unix@" not in expose_backend
    assert meshgen.validate(meshgen.write_files(built, tmp_path), haproxy) == []


def test_runtime_server_options_follow_the_configs_version_conditions():
    """A server added at runtime gets the options of the default-server lines that apply to the
    running version, as HAProxy itself reads the `.if version_atleast()` blocks; the manifest
    holds them, from the model haproxy.cfg prints them from."""
    servers = meshgen.Manifest.decoded(bundle("full").files[meshgen.MANIFEST]).servers()
    options = {version: servers["upstream_api"].options_for(version) for version in [(2, 6), (3, 0), (3, 4, 7)]}
    assert all(o.startswith("ssl crt /run/meshgen/") and "verify required check check-ssl" in o
               for o in options.values())
    assert ["pool-purge-delay" in o for o in options.values()] == [True, False, False]
    assert ["no-sni-auto no-check-sni-auto" in o for o in options.values()] == [False, False, True]


def _compiled(entries: list, name: str = "api") -> dict:
    agent = ConsulDouble()
    for entry in entries:
        agent.set_config(entry)
    return {"Chain": _ChainCompiler(agent, name, "dc1", "", "").compile()}


def _api_upstream() -> meshgen.Upstream:
    return meshgen.parse_upstream({"DestinationName": "api", "LocalBindPort": 9191}, "u")


HTTP_API = {"Kind": "service-defaults", "Name": "api", "Protocol": "http"}


@pytest.mark.parametrize("entry, field", [
    ({"Kind": "service-router", "Name": "api", "Routes": [{"Match": {"HTTP": {"PathPrefix": "/a"}},
                                                            "Destination": {"PrefixRewrite": "/%[src]"}}]},
     "Destination.PrefixRewrite"),
    ({"Kind": "service-router", "Name": "api", "Routes": [{"Match": {"HTTP": {"PathPrefix": "/a'"}}}]},
     "Match.HTTP.PathPrefix"),
    ({"Kind": "service-router", "Name": "api", "Routes": [{"Match": {"HTTP": {
        "Header": [{"Name": "x-a\nb", "Exact": "1"}]}}}]}, "Match.HTTP.Header[0].Name"),
    ({"Kind": "service-router", "Name": "api", "Routes": [{"Match": {"HTTP": {
        "QueryParam": [{"Name": "q", "Regex": "("}]}}}]}, "Match.HTTP.QueryParam[0].Regex"),
    ({"Kind": "service-router", "Name": "api", "Routes": [{"Match": {"HTTP": {"PathPrefix": "/a"}},
                                                            "Destination": {"RetryOnStatusCodes": [429]}}]},
     "Destination.RetryOnStatusCodes[0]"),
    ({"Kind": "service-resolver", "Name": "api", "Subsets": {"v1": {"Filter": "x"}}, "DefaultSubset": "v1",
      "ConnectTimeout": "soon"}, "ConnectTimeout"),
])
def test_an_unsafe_chain_is_one_line_naming_the_field(entry, field):
    with pytest.raises(meshgen.MeshgenError) as err:
        meshgen.parse_chain(_compiled([HTTP_API, entry]), _api_upstream())
    assert field in str(err.value) and "\n" not in str(err.value)


def test_a_chain_that_names_a_node_or_target_it_lacks_is_refused():
    data = _compiled([HTTP_API, {"Kind": "service-splitter", "Name": "api", "Splits": [{"Weight": 100}]}])
    data["Chain"]["Nodes"]["splitter:api.default"]["Splits"][0]["NextNode"] = "resolver:nowhere"
    with pytest.raises(meshgen.MeshgenError, match="resolver:nowhere"):
        meshgen.parse_chain(data, _api_upstream())
    data = _compiled([])
    data["Chain"]["Nodes"]["resolver:api.default.dc1"]["Resolver"]["Target"] = "other.default.dc1"
    with pytest.raises(meshgen.MeshgenError, match="other.default.dc1"):
        meshgen.parse_chain(data, _api_upstream())


def test_split_weights_become_thresholds_of_one_draw():
    """Weights to the hundredth of a percent, as Envoy takes them; the last split takes the rest."""
    entries = [HTTP_API, {"Kind": "service-resolver", "Name": "api", "Subsets": {
        name: {"Filter": f"Service.Meta.version == {name}"} for name in ("a", "b", "c")}},
        {"Kind": "service-splitter", "Name": "api", "Splits": [
            {"Weight": 33.33, "ServiceSubset": "a"}, {"Weight": 33.33, "ServiceSubset": "b"},
            {"Weight": 33.34, "ServiceSubset": "c"}]}]
    upstream = _api_upstream()
    chain = meshgen.parse_chain(_compiled(entries), upstream)
    resolved = meshgen.resolve_upstream(upstream, chain, {t.query: () for t in chain.targets})
    route, = resolved.routes
    assert [(s.backend, s.below) for s in route.splits] == [
        ("upstream_api:a.api.default.dc1", 3333), ("upstream_api:b.api.default.dc1", 6666),
        ("upstream_api:c.api.default.dc1", None)]
    assert resolved.protocol == "http" and resolved.default_backend == "upstream_api:c.api.default.dc1"


def test_an_upstream_with_no_config_entries_renders_as_before():
    upstream = _api_upstream()
    chain = meshgen.parse_chain(_compiled([]), upstream)
    resolved = meshgen.resolve_upstream(upstream, chain, {t.query: () for t in chain.targets})
    assert resolved.routes == () and [b.name for b in resolved.backends] == ["upstream_api"]
    assert (resolved.protocol, resolved.backends[0].connect_timeout_ms, resolved.backends[0].about) == ("tcp", 5000, ())


def test_settings_of_newer_consul_that_meshgen_does_not_render_are_named():
    """A resolver's LoadBalancer and a route's header changes (Consul 1.9+, 1.11+) change what
    Envoy does: meshgen says it does not apply them rather than route differently in silence.
    A resolver's RequestTimeout (1.15+) is applied to the routes that set none."""
    data = _compiled([HTTP_API, {"Kind": "service-router", "Name": "api", "Routes": [
        {"Match": {"HTTP": {"PathPrefix": "/a"}}, "Destination": {"RequestTimeout": "2s"}}]}])
    chain = data["Chain"]
    # Consul compiles LoadBalancer onto the node itself, beside Resolver.
    chain["Nodes"]["resolver:api.default.dc1"]["LoadBalancer"] = {"Policy": "ring_hash"}
    chain["Nodes"]["resolver:api.default.dc1"]["Resolver"].update(RequestTimeout="9s")
    chain["Nodes"]["router:api.default"]["Routes"][0]["Definition"]["Destination"]["RequestHeaders"] = {
        "Add": {"x-a": "1"}}
    upstream = _api_upstream()
    parsed = meshgen.parse_chain(data, upstream)
    assert parsed.unapplied == (
        "resolver:api.default.dc1: LoadBalancer policy 'ring_hash' is not applied (HAProxy balances round robin)",
        "route-1: Destination.RequestHeaders is not applied")
    resolved = meshgen.resolve_upstream(upstream, parsed, {t.query: () for t in parsed.targets})
    assert {b.name: b.request_timeout_ms for b in resolved.backends} == {
        "upstream_api:api.default.dc1:timeout-2000ms": 2000, "upstream_api:api.default.dc1": 9000}


def test_the_manifest_is_rendered_from_the_model_byte_for_byte():
    """Same input in any order, the same manifest.json. Its digest of what no live change can
    alter ignores the instances and the certificates, and follows a backend's settings."""
    certs = meshgen.throwaway_certificates("web")

    def manifest(sidecar: meshgen.Sidecar, with_certs=certs) -> bytes:
        return meshgen.render_into(OUT / ".bundle-0123456789abcdef", sidecar, with_certs, intentions("full"),
                                   OUT / "admin.sock").files[meshgen.MANIFEST]

    def fixed(data: bytes) -> str:
        return meshgen.Manifest.decoded(data).fixed
    full = model("full")
    assert manifest(full) == manifest(model("full", shuffle=True))
    without = meshgen.without_instances(full)
    assert manifest(without) != manifest(full) and fixed(manifest(without)) == fixed(manifest(full))
    assert fixed(manifest(full, meshgen.throwaway_certificates("web"))) == fixed(manifest(full))
    upstream = full.upstreams[0]
    slower = dataclasses.replace(upstream, backends=(
        dataclasses.replace(upstream.backends[0], connect_timeout_ms=upstream.backends[0].connect_timeout_ms + 1),
        *upstream.backends[1:]))
    assert fixed(manifest(dataclasses.replace(full, upstreams=(slower, *full.upstreams[1:])))) != fixed(manifest(full))


def _entry(address: str, status: str = "passing", weights: dict | None = None, node_dc: str = "dc1",
           tagged: dict | None = None, node_wan: str | None = None) -> dict:
    """A health entry of an api sidecar, as the agent gives it."""
    node = {"Node": "n", "Address": "10.1.0.1", "Datacenter": node_dc}
    if node_wan:
        node["TaggedAddresses"] = {"lan": "10.1.0.1", "wan": node_wan}
    service = {"Kind": "connect-proxy", "Service": "api-sidecar-proxy", "Address": address, "Port": 21000,
               "Proxy": {"DestinationServiceName": "api"}, "Weights": weights or {"Passing": 1, "Warning": 1}}
    if tagged:
        service["TaggedAddresses"] = tagged
    return {"Node": node, "Service": service, "Checks": [{"Status": status}]}


def test_a_target_whose_instances_all_weigh_nothing_fails_over():
    """Instances with warnings count at Weights.Warning; at 0 they take no traffic, so a target of
    only such instances is not serving, and the failover target is."""
    entries = [{"Kind": "service-resolver", "Name": "api", "Failover": {"*": {"Service": "backup"}}}]
    upstream = _api_upstream()
    chain = meshgen.parse_chain(_compiled(entries), upstream)
    primary, failover = chain.targets
    instances = {primary.query: meshgen.parse_instances(
                     [_entry("10.0.0.1", "warning", {"Passing": 1, "Warning": 0})], "p", "dc1")[0],
                 failover.query: meshgen.parse_instances([_entry("10.0.0.9")], "f", "dc1")[0]}
    backend, = meshgen.resolve_upstream(upstream, chain, instances).backends
    assert backend.serving == failover.id
    assert [i.address for i in backend.instances] == ["10.0.0.9:21000"]
    instances[primary.query] = meshgen.parse_instances([_entry("10.0.0.1", "warning", {"Passing": 1, "Warning": 2})],
                                                       "p", "dc1")[0]
    assert meshgen.resolve_upstream(upstream, chain, instances).backends[0].serving == primary.id


@pytest.mark.parametrize("entry, local, dialled", [
    (_entry("10.0.0.5"), "dc1", "10.0.0.5:21000"),
    (_entry("10.0.0.5", node_dc="dc2", tagged={"wan": {"Address": "203.0.113.5", "Port": 31000}}), "dc1",
     "203.0.113.5:31000"),
    (_entry("10.0.0.5", node_dc="dc1", tagged={"wan": {"Address": "203.0.113.5", "Port": 31000}}), "dc1",
     "10.0.0.5:21000"),
    (_entry("", node_dc="dc2", node_wan="198.51.100.7"), "dc1", "198.51.100.7:21000"),
    (_entry("", node_dc="dc2"), "dc1", "10.1.0.1:21000"),
    (_entry("10.0.0.5", node_dc="dc2", node_wan="198.51.100.7"), "dc1", "10.0.0.5:21000"),
])
def test_an_instance_in_another_datacenter_is_dialled_as_consul_tells_envoy(entry, local, dialled):
    """Consul's BestAddress(wan): in another datacenter, the service's WAN address, else its
    address, else the node's WAN address, else the node's; at home, the service's, else the node's."""
    instances, skipped = meshgen.parse_instances([entry], "t", local)
    assert skipped == () and [i.address for i in instances] == [dialled]


def test_a_bad_instance_is_left_out_and_named_and_the_rest_stay():
    good, bad = _entry("10.0.0.1"), _entry("10.0.0.2\n    server evil 10.9.9.9:1")
    instances, skipped = meshgen.parse_instances([bad, good], "instances of target api", "dc1")
    assert [i.address for i in instances] == ["10.0.0.1:21000"]
    assert len(skipped) == 1 and "instances of target api[0].Service.Address" in skipped[0]


def test_a_leaf_with_a_duplicate_extension_is_one_line():
    """cryptography raises DuplicateExtension, not ValueError, on a certificate that repeats an
    extension: it escaped as a traceback."""
    double = ConsulDouble()
    cert, key = double.ca.issue_leaf(double.active_root, double.service_uri("www"))
    der = bytearray(cert.public_bytes(serialization.Encoding.DER))
    # Rename the Key Usage extension (2.5.29.15) to Subject Alternative Name (2.5.29.17): two SANs.
    at = der.find(bytes([0x06, 0x03, 0x55, 0x1d, 0x0f]))
    assert at > 0
    der[at + 4] = 0x11
    forged = x509.load_der_x509_certificate(bytes(der))
    with pytest.raises(x509.DuplicateExtension):
        forged.extensions
    leaf = {"CertPEM": forged.public_bytes(serialization.Encoding.PEM).decode(),
            "PrivateKeyPEM": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()).decode()}
    with pytest.raises(meshgen.MeshgenError, match="leaf certificate: "):
        meshgen.check_certificates(double._roots_json(), leaf, "www", dt.datetime.now(dt.timezone.utc))
