"""The agent double against docs/consul-reference.md ("What the agent double models"), item by
item. Tests taking `agent` run on the double and on a real Consul agent, with the same
assertions; where the Consul versions differ, the test says which does what."""
from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from harness import agent_get, agent_version
from real_consul import RealAgent, consul_binary, consul_version


def get(agent, path, **kwargs):
    headers = kwargs.pop("headers", {})
    if getattr(agent, "token", None):
        headers.setdefault("X-Consul-Token", agent.token)
    return requests.get(agent.url + path, headers=headers, timeout=15, **kwargs)


def post(agent, path, body, **kwargs):
    return requests.post(agent.url + path, data=body, timeout=15, **kwargs)


# 1. routes and methods ------------------------------------------------------------------------

def test_wrong_method_is_405_with_allow_header(double):
    response = requests.put(double.url + "/v1/agent/connect/ca/roots", timeout=5)
    assert response.status_code == 405
    assert response.text == "method PUT not allowed"
    assert response.headers["Allow"] == "OPTIONS,GET"


def test_unknown_path_is_404_with_trailing_newline(double):
    response = get(double, "/v1/agent/nothing-here")
    assert response.status_code == 404
    assert response.text == "Invalid URL path: not a recognized HTTP API endpoint\n"
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"


def test_agent_self_names_datacenter_and_node(double):
    config = get(double, "/v1/agent/self").json()["Config"]
    assert (config["Datacenter"], config["NodeName"]) == ("dc1", "node-1")


# 2. tokens and tenancy ------------------------------------------------------------------------

def test_namespace_and_partition_are_refused_in_ce(double):
    response = get(double, "/v1/agent/connect/ca/roots", params={"ns": "default"})
    assert (response.status_code, response.text) == (
        400, 'Invalid query parameter: "ns" - Namespaces are a Consul Enterprise feature')
    response = get(double, "/v1/agent/connect/ca/roots", headers={"X-Consul-Partition": "default"})
    assert (response.status_code, response.text) == (
        400, 'Invalid header: "X-Consul-Partition" - Partitions are a Consul Enterprise feature')


def test_token_sources_and_403_texts(seeded_double):
    double = seeded_double
    double.enable_acls("deny")
    reader = double.add_token({"service_prefix:": "read"})
    path = "/v1/agent/service/www-sidecar-proxy"
    anonymous = get(double, path)
    assert anonymous.status_code == 403
    assert anonymous.text == ("Permission denied: anonymous token lacks permission 'service:read' on "
                              '"www-sidecar-proxy". The anonymous token is used implicitly when a '
                              "request does not specify a token.")
    assert get(double, path, params={"token": reader}).status_code == 200
    assert get(double, path, headers={"X-Consul-Token": reader}).status_code == 200
    assert get(double, path, headers={"Authorization": f"bEaReR {reader} extra"}).status_code == 200
    assert get(double, path, headers={"X-Consul-Token": "no-such-token"}).text == "ACL not found"
    leaf = get(double, "/v1/agent/connect/ca/leaf/www", headers={"X-Consul-Token": reader})
    accessor = double.tokens[reader].accessor
    assert leaf.status_code == 403
    assert leaf.text == (f"Permission denied: token with AccessorID '{accessor}' lacks permission "
                         "'service:write' on \"www\"")


# 3. agent/service -----------------------------------------------------------------------------

def test_sidecar_registration_is_expanded_with_consul_defaults(agent, seed):
    response = get(agent, f"/v1/agent/service/{seed['www']}-sidecar-proxy")
    assert response.status_code == 200
    body = response.json()
    assert response.headers["X-Consul-ContentHash"] == body["ContentHash"]
    assert "X-Consul-Index" not in response.headers
    assert body["Kind"] == "connect-proxy"
    assert body["Service"] == f"{seed['www']}-sidecar-proxy"
    assert body["Tags"] == [] and body["Meta"] == {}
    proxy = body["Proxy"]
    assert proxy["DestinationServiceName"] == seed["www"]
    assert proxy["DestinationServiceID"] == seed["www"]
    assert (proxy["LocalServiceAddress"], proxy["LocalServicePort"]) == ("127.0.0.1", 8080)
    assert proxy["MeshGateway"] == {} and "Expose" in proxy
    upstream = proxy["Upstreams"][0]
    assert upstream["DestinationType"] == "service"
    assert upstream["DestinationName"] == seed["redis"]
    assert upstream["LocalBindPort"] == 6379
    assert upstream["Config"]["advanced_check"] == "redis"


def test_unknown_service_id_is_404_even_before_the_acl_check(double):
    double.enable_acls("deny")
    response = get(double, "/v1/agent/service/ghost")
    assert (response.status_code, response.text) == (404, "unknown service ID: ghost")


def test_hash_blocking_times_out_unchanged_and_wakes_on_change(seeded_double):
    double = seeded_double
    path = "/v1/agent/service/www-sidecar-proxy"
    first = get(double, path).json()
    start = time.monotonic()
    same = get(double, path, params={"hash": first["ContentHash"], "wait": "300ms"})
    assert time.monotonic() - start >= 0.3
    assert same.json() == first
    timer = threading.Timer(0.2, double.update_service, args=("www-sidecar-proxy",
                            lambda s: s["Proxy"]["Config"].update(protocol="http")))
    timer.start()
    start = time.monotonic()
    changed = get(double, path, params={"hash": first["ContentHash"], "wait": "10s"})
    assert time.monotonic() - start < 5
    assert changed.json()["ContentHash"] != first["ContentHash"]
    assert changed.json()["Proxy"]["Config"]["protocol"] == "http"


def test_bad_wait_is_400(seeded_double):
    double = seeded_double
    response = get(double, "/v1/agent/service/www-sidecar-proxy", params={"hash": "x", "wait": "soon"})
    assert (response.status_code, response.text) == (400, "Invalid wait time")


def test_agent_services_filter_selects_the_sidecar(agent, seed):
    expression = f'Kind == "connect-proxy" and Proxy.DestinationServiceID == "{seed["www"]}"'
    services = get(agent, "/v1/agent/services", params={"filter": expression}).json()
    assert list(services) == [f"{seed['www']}-sidecar-proxy"]


# 4. roots and leaf ----------------------------------------------------------------------------

def test_roots_shape(agent):
    response = get(agent, "/v1/agent/connect/ca/roots")
    body = response.json()
    assert int(response.headers["X-Consul-Index"]) >= 1
    active = [r for r in body["Roots"] if r["Active"]]
    assert len(active) == 1 and active[0]["ID"] == body["ActiveRootID"]
    assert body["TrustDomain"].endswith(".consul")
    assert isinstance(active[0]["SerialNumber"], int)
    assert active[0]["RootCert"].endswith("-----END CERTIFICATE-----\n")


def test_leaf_format_is_consuls(agent, seed):
    response = get(agent, f"/v1/agent/connect/ca/leaf/{seed['www']}")
    leaf = response.json()
    cert = x509.load_pem_x509_certificate(leaf["CertPEM"].encode())
    assert int(response.headers["X-Consul-Index"]) == leaf["ModifyIndex"] >= 1
    serial = cert.serial_number.to_bytes((cert.serial_number.bit_length() + 7) // 8, "big")
    assert leaf["SerialNumber"] == ":".join(f"{b:02x}" for b in serial)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    if agent_version(agent) >= (1, 11):
        # From 1.11 the subject is empty, so the URI SAN must be critical (RFC 5280).
        assert len(cert.subject) == 0
        assert san.critical
    else:
        # 1.8.7: a subject CN of the service and the cluster, and a SAN not marked critical.
        [cn] = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        assert re.fullmatch(rf"{seed['www'].replace('-', '')}\.svc\.default\.[0-9a-f]{{8}}\.consul", cn.value)
        assert not san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [leaf["ServiceURI"]]
    assert leaf["ServiceURI"].endswith(f"/ns/default/dc/dc1/svc/{seed['www']}")
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    now = dt.datetime.now(dt.timezone.utc)
    assert dt.timedelta(seconds=50) < now - cert.not_valid_before_utc < dt.timedelta(minutes=5)
    assert leaf["ValidAfter"] == cert.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert "BEGIN EC PRIVATE KEY" in leaf["PrivateKeyPEM"]


def test_leaf_chain_carries_the_intermediate():
    from harness import DoubleAgent
    agent = DoubleAgent(with_intermediate=True).start()
    try:
        roots = get(agent, "/v1/agent/connect/ca/roots").json()["Roots"]
        leaf = get(agent, "/v1/agent/connect/ca/leaf/web").json()
        chain = x509.load_pem_x509_certificates(leaf["CertPEM"].encode())
        assert len(chain) == 2
        intermediates = [x509.load_pem_x509_certificate(p.encode()) for p in roots[0]["IntermediateCerts"]]
        assert intermediates == chain[1:]
        chain[0].verify_directly_issued_by(chain[1])
    finally:
        agent.stop()


def test_root_rotation_keeps_the_old_root_and_wakes_blocked_leaf_queries(double):
    first = get(double, "/v1/agent/connect/ca/leaf/web")
    roots_index = get(double, "/v1/agent/connect/ca/roots").headers["X-Consul-Index"]
    threading.Timer(0.2, double.rotate_root).start()
    start = time.monotonic()
    renewed = get(double, "/v1/agent/connect/ca/leaf/web",
                  params={"index": first.headers["X-Consul-Index"], "wait": "10s"})
    assert time.monotonic() - start < 5
    assert renewed.json()["SerialNumber"] != first.json()["SerialNumber"]
    roots = get(double, "/v1/agent/connect/ca/roots", params={"index": roots_index, "wait": "1s"})
    body = roots.json()
    assert int(roots.headers["X-Consul-Index"]) > int(roots_index)
    assert [r["Active"] for r in body["Roots"]] == [False, True]
    new_root = x509.load_pem_x509_certificate(body["Roots"][1]["RootCert"].encode())
    x509.load_pem_x509_certificate(renewed.json()["CertPEM"].encode()).verify_directly_issued_by(new_root)


def test_leaf_index_blocking_times_out_with_the_same_cert(double):
    first = get(double, "/v1/agent/connect/ca/leaf/web")
    again = get(double, "/v1/agent/connect/ca/leaf/web",
                params={"index": first.headers["X-Consul-Index"], "wait": "200ms"})
    assert again.json()["SerialNumber"] == first.json()["SerialNumber"]
    assert again.headers["X-Consul-Index"] == first.headers["X-Consul-Index"]


# 6. authorize ---------------------------------------------------------------------------------

def _uri(double, service):
    return double.service_uri(service)


@pytest.mark.parametrize("body, text", [
    (b"", "Request decode failed: EOF"),
    (b'{"Target":"web","Foo":1}', 'Request decode failed: json: unknown field "Foo"'),
    (b'{"Target":"web","Namespace":"default"}', 'Request decode failed: json: unknown field "Namespace"'),
    (b'{"ClientCertURI":"spiffe://x.consul/ns/default/dc/dc1/svc/api"}', "Target service must be specified"),
    (b'{"Target":"web","ClientCertURI":"https://example.com/"}', "ClientCertURI not a valid Connect identifier"),
    (b'{"Target":"web","ClientCertURI":"spiffe://x.consul/agent/server/dc/dc1"}',
     "ClientCertURI not a valid Service identifier"),
])
def test_authorize_400_texts(double, body, text):
    response = post(double, "/v1/agent/connect/authorize", body)
    assert (response.status_code, response.text) == (400, text)


def test_authorize_reasons(double):
    def ask(source, target="web"):
        return post(double, "/v1/agent/connect/authorize", (
            f'{{"target":"{target}","ClientCertURI":"{_uri(double, source)}","ClientCertSerial":"01"}}'
        ).encode()).json()

    assert ask("api") == {"Authorized": True, "Reason": "Default behavior configured by ACLs"}
    double.set_intention("api", "web", "deny")
    assert ask("api") == {"Authorized": False, "Reason":
                          "Matched L4 intention: default/api => default/web (Precedence: 9, Action: DENY)"}
    double.set_intention("*", "web", "allow")
    assert ask("other")["Reason"] == \
        "Matched L4 intention: default/* => default/web (Precedence: 8, Action: ALLOW)"
    double.set_intention("api", "web", "allow", l7=True)
    assert ask("api")["Authorized"] is False and ask("api")["Reason"].startswith("Matched L7 intention")
    double.enable_acls("deny")
    writer = double.add_token({"service:db": "write"})
    response = post(double, "/v1/agent/connect/authorize", (
        f'{{"Target":"db","ClientCertURI":"{_uri(double, "api")}"}}').encode(),
        headers={"X-Consul-Token": writer})
    assert response.json() == {"Authorized": False, "Reason": "Default behavior configured by ACLs"}
    double.default_intention_policy = "allow"
    response = post(double, "/v1/agent/connect/authorize", (
        f'{{"Target":"db","ClientCertURI":"{_uri(double, "api")}"}}').encode(),
        headers={"X-Consul-Token": writer})
    assert response.json() == {"Authorized": True, "Reason": "Default intention policy"}


# 7. health ------------------------------------------------------------------------------------

def test_health_passing_fallback_and_empty(double):
    ok = double.add_instance("db", "10.0.0.5", 21000)
    double.add_instance("db", "10.0.0.6", 21000, address_on_node=True, node="node-3")
    sick = double.add_instance("db", "10.0.0.7", 21000, node="node-4")
    double.set_status("db", sick, "critical")
    everything = get(double, "/v1/health/connect/db").json()
    passing = get(double, "/v1/health/connect/db", params={"passing": ""}).json()
    assert len(everything) == 3 and len(passing) == 2
    assert {e["Service"]["ID"] for e in passing} >= {ok}
    fallback = [e for e in passing if e["Service"]["Address"] == ""]
    assert fallback and fallback[0]["Node"]["Address"] == "10.0.0.6"
    assert get(double, "/v1/health/connect/nothing").json() == []
    bad = get(double, "/v1/health/connect/db", params={"passing": "maybe"})
    assert (bad.status_code, bad.text) == (400, "Invalid value for ?passing")
    assert get(double, "/v1/health/connect/").text == "Missing service name"


def test_health_index_blocks_wakes_and_can_go_backwards(double):
    first = get(double, "/v1/health/connect/db")
    index = int(first.headers["X-Consul-Index"])
    threading.Timer(0.2, double.add_instance, args=("db", "10.0.0.5", 21000)).start()
    woke = get(double, "/v1/health/connect/db", params={"index": index, "wait": "10s"})
    assert int(woke.headers["X-Consul-Index"]) > index and len(woke.json()) == 1
    double.reset_health_index("db", 3)
    assert int(get(double, "/v1/health/connect/db").headers["X-Consul-Index"]) == 3


def test_prepared_query(double):
    double.add_instance("geo", "10.0.0.5", 21000, datacenter="dc2")
    double.add_prepared_query("geo-cache", "geo")
    result = get(double, "/v1/query/geo-cache/execute", params={"connect": "true", "dc": "dc2"}).json()
    assert result["Service"] == "geo" and len(result["Nodes"]) == 1
    missing = get(double, "/v1/query/none/execute")
    assert (missing.status_code, missing.text) == (404, "Query not found")


# faults and counting --------------------------------------------------------------------------

def test_faults_and_request_counts(double):
    double.inject("/v1/agent/connect/ca/roots", status=500, body="boom", times=1)
    assert get(double, "/v1/agent/connect/ca/roots").status_code == 500
    assert get(double, "/v1/agent/connect/ca/roots").status_code == 200
    double.inject("/v1/agent/connect/ca/roots", body="{trunc")
    assert get(double, "/v1/agent/connect/ca/roots").text == "{trunc"
    double.inject("/v1/agent/connect/ca/roots", drop=True)
    with pytest.raises(requests.ConnectionError):
        get(double, "/v1/agent/connect/ca/roots")
    double.inject("/v1/agent/connect/ca/roots", delay=0.3)
    start = time.monotonic()
    get(double, "/v1/agent/connect/ca/roots")
    assert time.monotonic() - start >= 0.3
    assert double.count("/v1/agent/connect/ca/roots") == 5


def test_real_agent_fixture_is_what_it_claims(agent):
    """Guard: the real-agent parameter never silently talks to a double, nor the other way."""
    reported = agent_get(agent, "/v1/agent/self")["Config"]["Version"]
    if isinstance(agent, RealAgent):
        assert reported == consul_version(consul_binary()) and agent.suffix
    else:
        assert reported == "1.17.0" and not agent.suffix


# 12. discovery chains -----------------------------------------------------------------------

def _comparable(chain: dict, suffix: str) -> dict:
    """A compiled chain with the names a test chose made plain again, and without what names the
    cluster (SNI, Name)."""
    text = json.dumps(chain).replace(suffix, "") if suffix else json.dumps(chain)
    chain = json.loads(text)
    if "CustomizationHash" in chain:
        chain["CustomizationHash"] = "(a hash of the overrides)"
    for target in chain["Targets"].values():
        target.pop("SNI"), target.pop("Name")
    return chain


def test_discovery_chains_compile_as_consul_compiles_them(agent):
    """The double's compiler against Consul 1.8.7's, on the same entries: a default chain; a
    resolver with subsets, default subset, connect timeout and failover; a splitter; a router;
    a redirect; and the POST overrides. Node for node, target for target."""
    suffix = getattr(agent, "suffix", "")
    api, admin, old = "api" + suffix, "admin" + suffix, "old" + suffix
    entries = [
        {"Kind": "service-defaults", "Name": api, "Protocol": "http"},
        {"Kind": "service-defaults", "Name": admin, "Protocol": "http"},
        {"Kind": "service-defaults", "Name": old, "Protocol": "http"},
        {"Kind": "service-resolver", "Name": api, "DefaultSubset": "v1", "ConnectTimeout": "2s",
         "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"},
                     "v2": {"Filter": "Service.Meta.version == v2", "OnlyPassing": True}},
         "Failover": {"v1": {"Service": admin}}},
        {"Kind": "service-splitter", "Name": api, "Splits": [{"Weight": 90, "ServiceSubset": "v1"},
                                                            {"Weight": 10, "ServiceSubset": "v2"}]},
        {"Kind": "service-router", "Name": api, "Routes": [
            {"Match": {"HTTP": {"PathPrefix": "/admin"}},
             "Destination": {"Service": admin, "PrefixRewrite": "/", "RequestTimeout": "1s", "NumRetries": 2,
                             "RetryOnConnectFailure": True, "RetryOnStatusCodes": [503]}},
            {"Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "1"}],
                                "QueryParam": [{"Name": "q", "Present": True}], "Methods": ["GET"]}},
             "Destination": {"ServiceSubset": "v2"}}]},
        {"Kind": "service-resolver", "Name": old, "Redirect": {"Service": api, "ServiceSubset": "v2"}},
    ]
    plain = get(agent, f"/v1/discovery-chain/{admin}").json()["Chain"]
    try:
        for entry in entries:
            agent.set_config(entry)
        chains = {name: get(agent, f"/v1/discovery-chain/{name}").json()["Chain"] for name in (api, old)}
        overridden = requests.post(f"{agent.url}/v1/discovery-chain/{api}", timeout=15, json={
            "OverrideProtocol": "tcp", "OverrideConnectTimeout": "7s"}).json()["Chain"]
    finally:
        for entry in reversed(entries):
            agent.delete_config(entry["Kind"], entry["Name"])
    compared = {name: _comparable(chain, suffix) for name, chain in
                {"plain": plain, "api": chains[api], "old": chains[old], "tcp": overridden}.items()}
    assert compared == EXPECTED_CHAINS


def _target(service: str, subset: str = "", filter_: str = "", only_passing: bool = False) -> dict:
    target_id = f"{subset + '.' if subset else ''}{service}.default.dc1"
    definition = {"Filter": filter_, **({"OnlyPassing": True} if only_passing else {})} if filter_ else {}
    return {"ID": target_id, "Service": service, **({"ServiceSubset": subset} if subset else {}),
            "Namespace": "default", "Datacenter": "dc1", "MeshGateway": {}, "Subset": definition}


def _resolver(target: str, timeout: str = "5s", default: bool = False, failover: list | None = None) -> dict:
    body = {"ConnectTimeout": timeout, **({"Default": True} if default else {}), "Target": target}
    if failover:
        body["Failover"] = {"Targets": failover}
    return {"Type": "resolver", "Name": target, "Resolver": body}


V1, V2 = _target("api", "v1", "Service.Meta.version == v1"), _target("api", "v2", "Service.Meta.version == v2", True)
EXPECTED_CHAINS = {
    "plain": {"ServiceName": "admin", "Namespace": "default", "Datacenter": "dc1", "Protocol": "tcp",
              "StartNode": "resolver:admin.default.dc1",
              "Nodes": {"resolver:admin.default.dc1": _resolver("admin.default.dc1", default=True)},
              "Targets": {"admin.default.dc1": _target("admin")}},
    "api": {"ServiceName": "api", "Namespace": "default", "Datacenter": "dc1", "Protocol": "http",
            "StartNode": "router:api.default", "Nodes": {
                "resolver:admin.default.dc1": _resolver("admin.default.dc1", default=True),
                "resolver:v1.api.default.dc1": _resolver("v1.api.default.dc1", "2s", failover=["admin.default.dc1"]),
                "resolver:v2.api.default.dc1": _resolver("v2.api.default.dc1", "2s"),
                "router:api.default": {"Type": "router", "Name": "api.default", "Routes": [
                    {"Definition": {"Match": {"HTTP": {"PathPrefix": "/admin"}}, "Destination": {
                        "RequestTimeout": "1s", "Service": "admin", "PrefixRewrite": "/", "NumRetries": 2,
                        "RetryOnConnectFailure": True, "RetryOnStatusCodes": [503]}},
                     "NextNode": "resolver:admin.default.dc1"},
                    {"Definition": {"Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "1"}],
                                                       "QueryParam": [{"Name": "q", "Present": True}],
                                                       "Methods": ["GET"]}},
                                    "Destination": {"ServiceSubset": "v2", "Namespace": "default"}},
                     "NextNode": "resolver:v2.api.default.dc1"},
                    {"Definition": {"Match": {"HTTP": {"PathPrefix": "/"}},
                                    "Destination": {"Service": "api", "Namespace": "default"}},
                     "NextNode": "splitter:api.default"}]},
                "splitter:api.default": {"Type": "splitter", "Name": "api.default", "Splits": [
                    {"Weight": 90, "NextNode": "resolver:v1.api.default.dc1"},
                    {"Weight": 10, "NextNode": "resolver:v2.api.default.dc1"}]}},
            "Targets": {"admin.default.dc1": _target("admin"), "v1.api.default.dc1": V1, "v2.api.default.dc1": V2}},
    "old": {"ServiceName": "old", "Namespace": "default", "Datacenter": "dc1", "Protocol": "http",
            "StartNode": "resolver:v2.api.default.dc1",
            "Nodes": {"resolver:v2.api.default.dc1": _resolver("v2.api.default.dc1", "2s")},
            "Targets": {"v2.api.default.dc1": V2}},
    "tcp": {"ServiceName": "api", "Namespace": "default", "Datacenter": "dc1", "Protocol": "tcp",
            "CustomizationHash": "(a hash of the overrides)",
            "StartNode": "resolver:v1.api.default.dc1",
            "Nodes": {"resolver:v1.api.default.dc1": _resolver("v1.api.default.dc1", "7s", failover=["admin.default.dc1"])},
            "Targets": {"v1.api.default.dc1": V1, "admin.default.dc1": _target("admin")}},
}
