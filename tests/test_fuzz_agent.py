"""Property-based fuzzing of everything the agent answers: the sidecar's registration, the
health entries of an upstream, an upstream's discovery chain, the CA roots and the leaf
certificate, the intentions and the authorize answer, the mesh config entry.

Each case starts from a well-formed sidecar with every feature on, breaks a few values of one
answer (random JSON types, sizes, unicode, control characters, HAProxy syntax, attempts to add
a directive), serves that through the agent double and runs `meshgen render`. Every case must end
one of two ways:
- a bundle that passed `haproxy -c` (meshgen runs it in the bundle's final place) and whose
  haproxy.cfg holds no trace of an injection; or
- one line `meshgen: error: ...`, exit 1, and the output directory byte for byte as it was.
In both, the token is nowhere but the token file, and key files are 0600.
"""
from __future__ import annotations

import json
import re
import zlib
from collections import Counter

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import meshgen
from campaign_support import SECRET_TOKEN, haproxy_version, record, scaled, secret_leaks
from harness import ROOT, DoubleAgent, snapshot

CANARY = "INJECTED"
EXAMPLES_PER_HAPROXY = scaled(1000)

RICH_SIDECAR = {
    "name": "www", "port": 8080, "address": "127.0.0.1",
    "connect": {"sidecar_service": {"port": 21000, "proxy": {
        "config": {"protocol": "http", "unsecured_bind_port": 8081, "syslog_server": "127.0.0.1:514",
                   "envoy_prometheus_bind_addr": "127.0.0.1:9102", "max_inbound_connections": 500,
                   "local_connect_timeout_ms": 2000},
        "upstreams": [
            {"destination_name": "redis", "local_bind_port": 6379,
             "config": {"destination_mode": "tcp", "advanced_check": "redis",
                        "limits": {"max_connections": 100},
                        "passive_health_check": {"max_failures": 3, "interval": "10s"}}},
            {"destination_name": "billing", "datacenter": "dc1", "local_bind_port": 9191,
             "config": {"protocol": "http2", "connect_timeout_ms": 1500}},
            {"destination_type": "prepared_query", "destination_name": "geo", "local_bind_port": 9292},
        ],
        "expose": {"paths": [{"path": "/health", "local_path_port": 8080, "listener_port": 21500}]},
    }}},
}

# Strings a validator might let through: real values, and the edges of each field's syntax.
PLAUSIBLE = ["redis", "www", "billing", "a", "A.b-c_d", "x" * 128, "x" * 129, "127.0.0.1", "::1",
             "0.0.0.0", "[::1]", "localhost", "10.0.0.5:9000", "[::1]:8080", "host.example:1",
             "/tmp/app.sock", "/dev/log", "/../etc/passwd", "/", "21000", "0", "-1", "65536",
             "99999999999999999999", "1e3", "0x10", "tcp", "http", "HTTP2", "grpc", "udp", "service",
             "prepared_query", "dc2", "5s", "1m30s", "100ms", "10", "0700", "777", "true", "null", ""]
# Characters that end a word, start a comment, quote, escape or expand in haproxy.cfg.
SEPARATORS = ["\n", "\r\n", "\r", " ", "\t", "#", '"', "'", "\\", "${", "$", "\x00", "\x0b", "\x0c",
              "\u2028", "\u0085", "\u00a0", "%[", "{", "}", ","]
TAILS = ["", " 10.9.9.9:1", "\n    server evil 10.9.9.9:1", "\nglobal\n    lua-load /tmp/x.lua", "}"]

attacks = st.builds(lambda value, sep, tail: f"{value}{sep}{CANARY}{tail}",
                    st.sampled_from(PLAUSIBLE), st.sampled_from(SEPARATORS), st.sampled_from(TAILS))
strings = st.one_of(
    st.sampled_from(PLAUSIBLE),
    attacks,
    st.text(max_size=40),
    st.text(alphabet=st.sampled_from("ab.:/-_ 09[]#\"'\\$%{}\n\t"), max_size=30),
    st.text(min_size=300, max_size=5000),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70),
                    st.floats(allow_nan=False, allow_infinity=False), strings)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(strings, inner, max_size=4)), max_leaves=8)

DELETE = object()
values = st.one_of(json_values, st.just(DELETE))

REGISTRATION_PATHS = [
    ("Kind",), ("ID",), ("Address",), ("Port",), ("Proxy",),
    ("Proxy", "DestinationServiceName"), ("Proxy", "LocalServiceAddress"), ("Proxy", "LocalServicePort"),
    ("Proxy", "LocalServiceSocketPath"), ("Proxy", "Config"), ("Proxy", "Upstreams"), ("Proxy", "Expose"),
    *[("Proxy", "Config", key) for key in (
        "protocol", "local_service_mode", "bind_address", "bind_port", "unsecured_bind_port",
        "syslog_server", "envoy_prometheus_bind_addr", "envoy_stats_bind_addr", "max_inbound_connections",
        "local_connect_timeout_ms", "local_request_timeout_ms", "local_idle_timeout_ms",
        "Protocol", "BIND_ADDRESS")],
    *[("Proxy", "Upstreams", i, key) for i in (0, 1, 2) for key in (
        "DestinationType", "DestinationName", "Datacenter", "DestinationPeer", "LocalBindAddress",
        "LocalBindPort", "LocalBindSocketPath", "LocalBindSocketMode", "Config")],
    *[("Proxy", "Upstreams", 0, "Config", key) for key in (
        "destination_mode", "protocol", "advanced_check", "connect_timeout_ms", "limits",
        "passive_health_check")],
    ("Proxy", "Upstreams", 0, "Config", "limits", "max_connections"),
    *[("Proxy", "Upstreams", 0, "Config", "passive_health_check", key) for key in (
        "max_failures", "interval", "base_ejection_time")],
    *[("Proxy", "Expose", "Paths", 0, key) for key in ("Path", "ListenerPort", "LocalPathPort", "Protocol")],
]
HEALTH_PATHS = [
    (), ("Service",), ("Node",), ("Service", "Address"), ("Service", "Port"), ("Service", "SocketPath"),
    ("Service", "Kind"), ("Service", "Service"), ("Service", "Weights"), ("Service", "Weights", "Passing"),
    ("Service", "Proxy"), ("Service", "Proxy", "DestinationServiceName"), ("Node", "Address"),
]
ROOTS_PATHS = [("Roots",), ("Roots", 0), ("Roots", 0, "RootCert"), ("Roots", 0, "IntermediateCerts"),
               ("ActiveRootID",), ("TrustDomain",)]
INTENTIONS_PATHS = [("www",), ("www", 0), ("www", 1), *[("www", i, key) for i in (0, 1) for key in (
    "SourceName", "SourceNS", "DestinationName", "DestinationNS", "Action", "Permissions", "Precedence")]]
AUTHORIZE_PATHS = [("Authorized",), ("Reason",)]
# billing's chain (BILLING_CHAIN): a router, a splitter, two subsets, a failover.
ROUTER, SPLITTER, V1 = "router:billing.default", "splitter:billing.default", "v1.billing.default.dc1"
CHAIN_PATHS = [
    ("Chain",), ("Chain", "Protocol"), ("Chain", "StartNode"), ("Chain", "Nodes"), ("Chain", "Targets"),
    ("Chain", "Nodes", ROUTER, "Routes"), ("Chain", "Nodes", ROUTER, "Routes", 0, "NextNode"),
    *[("Chain", "Nodes", ROUTER, "Routes", 0, "Definition", "Match", "HTTP", key) for key in (
        "PathPrefix", "PathExact", "PathRegex", "Header", "QueryParam", "Methods")],
    ("Chain", "Nodes", ROUTER, "Routes", 0, "Definition", "Match", "HTTP", "Header", 0, "Exact"),
    ("Chain", "Nodes", ROUTER, "Routes", 0, "Definition", "Match", "HTTP", "Header", 0, "Name"),
    *[("Chain", "Nodes", ROUTER, "Routes", 0, "Definition", "Destination", key) for key in (
        "PrefixRewrite", "RequestTimeout", "NumRetries", "RetryOnConnectFailure", "RetryOnStatusCodes")],
    ("Chain", "Nodes", SPLITTER, "Splits"), ("Chain", "Nodes", SPLITTER, "Splits", 0, "Weight"),
    ("Chain", "Nodes", SPLITTER, "Splits", 0, "NextNode"), ("Chain", "Nodes", f"resolver:{V1}", "Type"),
    *[("Chain", "Nodes", f"resolver:{V1}", "Resolver", key) for key in ("Target", "ConnectTimeout", "Failover")],
    ("Chain", "Nodes", f"resolver:{V1}", "LoadBalancer"), ("Chain", "Nodes", f"resolver:{V1}", "LoadBalancer", "Policy"),
    ("Chain", "Nodes", f"resolver:{V1}", "LoadBalancer", "HashPolicies", 0, "FieldValue"),
    ("Chain", "Nodes", f"resolver:{V1}", "Resolver", "Failover", "Targets", 0),
    *[("Chain", "Targets", V1, key) for key in ("Service", "Datacenter", "Namespace", "Subset")],
    ("Chain", "Targets", V1, "Subset", "Filter"), ("Chain", "Targets", V1, "Subset", "OnlyPassing"),
]
BILLING_CHAIN = [
    {"Kind": "service-defaults", "Name": "billing", "Protocol": "http2"},
    {"Kind": "service-defaults", "Name": "ledger", "Protocol": "http2"},
    {"Kind": "service-resolver", "Name": "billing", "DefaultSubset": "v1",
     "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"}, "v2": {"Filter": "Service.Meta.version == v2"}},
     "Failover": {"v1": {"Service": "ledger"}},
     "LoadBalancer": {"Policy": "ring_hash", "HashPolicies": [{"Field": "header", "FieldValue": "x-user"}]}},
    {"Kind": "service-splitter", "Name": "billing", "Splits": [{"Weight": 75, "ServiceSubset": "v1"},
                                                              {"Weight": 25, "ServiceSubset": "v2"}]},
    {"Kind": "service-router", "Name": "billing", "Routes": [
        {"Match": {"HTTP": {"PathPrefix": "/admin", "Header": [{"Name": "x-team", "Exact": "ops"}]}},
         "Destination": {"Service": "ledger", "PrefixRewrite": "/", "RequestTimeout": "2s", "NumRetries": 2,
                         "RetryOnStatusCodes": [503]}}]},
]
# The mesh entry (MESH_ENTRY): request normalization, TLS both ways, X-Forwarded-Client-Cert.
MESH_PATHS = [
    ("HTTP",), ("HTTP", "SanitizeXForwardedClientCert"), ("HTTP", "Incoming"),
    ("HTTP", "Incoming", "RequestNormalization"),
    *[("HTTP", "Incoming", "RequestNormalization", key) for key in (
        "InsecureDisablePathNormalization", "MergeSlashes", "PathWithEscapedSlashesAction",
        "HeadersWithUnderscoresAction")],
    ("TLS",), *[("TLS", way) for way in ("Incoming", "Outgoing")],
    *[("TLS", way, key) for way in ("Incoming", "Outgoing") for key in ("TLSMinVersion", "TLSMaxVersion", "CipherSuites")],
    ("TLS", "Incoming", "CipherSuites", 0),
]
MESH_ENTRY = {"Kind": "mesh", "HTTP": {"Incoming": {"RequestNormalization": {
    "MergeSlashes": True, "PathWithEscapedSlashesAction": "UNESCAPE_AND_REDIRECT", "HeadersWithUnderscoresAction": "DROP_HEADER"}}},
    "TLS": {"Incoming": {"TLSMinVersion": "TLSv1_2", "TLSMaxVersion": "TLSv1_3",
                         "CipherSuites": ["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"]},
            "Outgoing": {"TLSMinVersion": "TLSv1_2"}}}
LEAF_PATHS = [("CertPEM",), ("PrivateKeyPEM",), ("Service",), ("ServiceURI",), ("ValidBefore",),
              ("SerialNumber",)]


@st.composite
def pem_damage(draw, pem: str):
    """A PEM made wrong the ways files and proxies make it wrong."""
    how = draw(st.sampled_from(["truncate", "flip", "junk", "double", "strip"]))
    if how == "truncate":
        return pem[:draw(st.integers(0, len(pem)))]
    if how == "flip":
        at = draw(st.integers(30, len(pem) - 30))
        return pem[:at] + draw(st.sampled_from("A/+=\n-")) + pem[at + 1:]
    if how == "junk":
        at = draw(st.integers(0, len(pem)))
        return pem[:at] + draw(strings) + pem[at:]
    if how == "double":
        return pem + pem
    return pem.replace("\n", "")


def set_path(document, path: tuple, value):
    """Set (or delete) one value deep in a JSON document, creating objects on the way; a path
    through something that is no longer a container leaves the document as it is."""
    if not path:
        return value
    node = document
    for key in path[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(key, {})
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return document
    last = path[-1]
    if isinstance(node, dict):
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return document


def mutations(paths):
    return st.lists(st.tuples(st.sampled_from(paths), values), min_size=1, max_size=3)


cases = st.one_of(
    st.tuples(st.just("registration"), mutations(REGISTRATION_PATHS)),
    st.tuples(st.just("health"), st.tuples(st.integers(0, 4), st.integers(0, 3)), mutations(HEALTH_PATHS)),
    st.tuples(st.just("roots"), mutations(ROOTS_PATHS)),
    st.tuples(st.just("leaf"), mutations(LEAF_PATHS)),
    st.tuples(st.just("intentions"), mutations(INTENTIONS_PATHS)),
    st.tuples(st.just("authorize"), mutations(AUTHORIZE_PATHS)),
    st.tuples(st.just("chain"), mutations(CHAIN_PATHS)),
    st.tuples(st.just("mesh"), mutations(MESH_PATHS)),
    st.tuples(st.just("pem"), st.sampled_from(["RootCert", "CertPEM", "PrivateKeyPEM"]), st.data()),
)


# ----------------------------------------------------------------------------- what must hold

def _literal_lines() -> set[str]:
    template = (ROOT / "templates" / "haproxy.cfg.j2").read_text()
    return {line.strip() for line in template.splitlines() if "{{" not in line and "{%" not in line}


LITERAL_LINES = _literal_lines()
QUOTING = re.compile(r"[\"'\\$]")
SINGLE_QUOTED = re.compile(r"'[^'\n]*'")


def injection_traces(config: str) -> list[str]:
    """Signs that a value from the agent changed haproxy.cfg's syntax rather than filling a
    word: the canary anywhere outside single quotes; a control, non-ASCII, quoting, escaping or
    `$` character on a line that carries values; a `#` that does not begin a comment line.
    Single quotes hold an L7 permission's value, which HAProxy takes literally: meshgen
    refuses a value with a quote of its own, so what is inside cannot end them."""
    unquoted = SINGLE_QUOTED.sub("QUOTED", config)
    traces = [f"canary at offset {unquoted.index(CANARY)}"] if CANARY in unquoted else []
    for number, line in enumerate(unquoted.split("\n"), 1):
        stripped = line.strip()
        if not line.isascii() or any(ord(ch) < 32 or ord(ch) == 127 for ch in line):
            traces.append(f"line {number}: control or non-ASCII character: {line!r}")
        elif stripped in LITERAL_LINES or stripped.startswith("#"):
            continue
        elif "#" in line or QUOTING.search(line):
            traces.append(f"line {number}: comment or quoting character in a line with values: {line!r}")
    return traces


MAP_LINE = re.compile(r"(\*|(?:[A-Za-z0-9][A-Za-z0-9_.-]*/){2}[A-Za-z0-9][A-Za-z0-9_.-]*|[A-Za-z0-9][A-Za-z0-9_.-]*/(?:[A-Za-z0-9][A-Za-z0-9_.-]*|\*)/\*) (allow|deny|l7-[0-9]+)\|[A-Za-z0-9 ._:/*=>(),?-]{0,200}")


def map_traces(intentions_map: str) -> list[str]:
    """Lines of intentions.map that are not one caller, one decision and a reason of safe
    characters: a value from the agent that made a line of its own, or broke one."""
    lines = [line for line in intentions_map.split("\n") if line and not line.startswith("#")]
    traces = [f"not a map line: {line!r}" for line in lines if not MAP_LINE.fullmatch(line)]
    if [line for line in lines if line.startswith("* ")] != lines[-1:]:
        traces.append("the unnamed callers' line is not the last one, or not alone")
    return traces


# ----------------------------------------------------------------------------- the run

@pytest.fixture
def fuzz_agent(tmp_path):
    double = DoubleAgent().start()
    double.register({"service": RICH_SIDECAR})
    double.add_instance("redis", "10.0.0.21", 21000)
    double.add_instance("redis", "10.0.0.22", 21000, weight=5)
    double.add_instance("billing", "10.0.0.31", 21000, meta={"version": "v1"})
    double.add_instance("billing", "10.0.0.32", 21000, meta={"version": "v2"})
    double.add_instance("ledger", "10.0.0.33", 21000)
    for entry in BILLING_CHAIN + [MESH_ENTRY]:
        double.set_config(entry)
    double.add_instance("geo", "10.0.0.41", 21000)
    double.add_prepared_query("geo", "geo")
    double.set_intention("api", "www", "allow")
    double.set_intention("*", "www", "deny")
    yield double
    double.stop()


def agent_answers(double) -> dict:
    """The well-formed answers each case starts from, as the agent encodes them."""
    def get(path, query=None, method="GET", body=b""):
        status, payload, _ = double.handle(method, path, query or {}, {}, body)
        assert status == 200
        return json.loads(payload if isinstance(payload, bytes) else json.dumps(payload))
    return {"registration": get("/v1/agent/service/www-sidecar-proxy"),
            "health": get("/v1/health/connect/redis"),
            "roots": get("/v1/agent/connect/ca/roots"),
            "leaf": get("/v1/agent/connect/ca/leaf/www"),
            "intentions": get("/v1/connect/intentions/match", {"by": "destination", "name": "www"}),
            "authorize": {"Authorized": False, "Reason": "Matched L4 intention: default/* => default/www"},
            # As meshgen asks for it: billing's Config sets its protocol and connect timeout.
            "chain": get("/v1/discovery-chain/billing", method="POST",
                         body=b'{"OverrideConnectTimeout": "1500ms", "OverrideProtocol": "http2"}'),
            "mesh": get("/v1/config/mesh/mesh")}


ENDPOINTS = {"registration": "/v1/agent/service/www-sidecar-proxy", "health": "/v1/health/connect/redis",
             "roots": "/v1/agent/connect/ca/roots", "leaf": "/v1/agent/connect/ca/leaf/www",
             "intentions": "/v1/connect/intentions/match", "authorize": "/v1/agent/connect/authorize",
             "chain": "/v1/discovery-chain/billing", "mesh": "/v1/config/mesh/mesh"}


def broken_answer(case, answers: dict) -> tuple[str, object]:
    """Which answer a case breaks, and the broken document."""
    kind = case[0]
    if kind == "pem":
        field, data = case[1], case[2]
        target = "roots" if field == "RootCert" else "leaf"
        document = json.loads(json.dumps(answers[target]))
        holder = document["Roots"][0] if target == "roots" else document
        holder[field] = data.draw(pem_damage(holder[field]))
        return target, document
    if kind == "health":
        (copies, which), changes = case[1], case[2]
        entries = [json.loads(json.dumps(answers["health"][0])) for _ in range(copies)]
        for path, value in changes:
            if entries and not path and value is DELETE:
                del entries[which % len(entries)]
            elif entries:
                entries[which % len(entries)] = set_path(entries[which % len(entries)], path, value)
        return "health", entries
    document = json.loads(json.dumps(answers[kind]))
    for path, value in case[1]:
        document = set_path(document, path, value)
    return kind, document


def test_fuzzed_agent_answers_render_safely_or_fail_cleanly(fuzz_agent, haproxy, tmp_path):
    out = tmp_path / "out"
    runner = CliRunner()
    env = {"CONSUL_HTTP_ADDR": fuzz_agent.url, "CONSUL_HTTP_TOKEN": SECRET_TOKEN}
    args = ["render", "--sidecar-for", "www", "--out", str(out), "--haproxy", haproxy, "--timeout", "10"]
    answers = agent_answers(fuzz_agent)
    first = runner.invoke(meshgen.cli, args, env=env)
    assert first.exit_code == 3, first.stderr
    assert injection_traces((out / "haproxy.cfg").read_text()) == []
    outcomes = Counter()
    failures = []
    rejected_by_haproxy = 0

    @settings(max_examples=EXAMPLES_PER_HAPROXY, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=cases)
    @seed(zlib.crc32(haproxy_version(haproxy).encode()))   # reproducible, and other cases per build
    def one_case(case):
        nonlocal rejected_by_haproxy
        target, document = broken_answer(case, answers)
        fuzz_agent.clear_faults()
        fuzz_agent.inject(ENDPOINTS[target], body=json.dumps(document))
        before = snapshot(out)
        result = runner.invoke(meshgen.cli, args, env=env)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
        assert result.exit_code in (0, 1, 3), (result.exit_code, result.output)
        if result.exit_code == 1:
            lines = result.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("meshgen: error: "), result.stderr
            assert snapshot(out) == before
            outcomes[(case[0], "refused")] += 1
            rejected_by_haproxy += "haproxy -c rejected" in result.stderr
            if "Traceback" in result.stderr:
                failures.append(result.stderr)
        else:
            config = (out / "haproxy.cfg").read_text()
            assert injection_traces(config) == [], (case, config)
            intentions_map = (out / "intentions.map").read_text()
            assert map_traces(intentions_map) == [], (case, intentions_map)
            outcomes[(case[0], "rendered" if result.exit_code == 3 else "unchanged")] += 1
        assert secret_leaks(out, result.stdout, result.stderr) == []

    one_case()
    assert failures == []
    total = sum(outcomes.values())
    assert total >= EXAMPLES_PER_HAPROXY
    # Both endings must be exercised for the property to mean anything.
    assert sum(n for (_, how), n in outcomes.items() if how == "refused") > total // 10
    assert sum(n for (_, how), n in outcomes.items() if how != "refused") > total // 10
    record("fuzz_agent_answers", haproxy=haproxy_version(haproxy), cases=total,
           haproxy_c_rejections=rejected_by_haproxy,
           **{f"{kind}_{how}": n for (kind, how), n in sorted(outcomes.items())})
