"""Bad input gives one clear line on stderr and exit 1, and the bundle directory stays exactly
as it was. Each case first renders a good bundle, then breaks one thing."""
from __future__ import annotations

import datetime as dt
import json
import os
import socket

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from harness import DoubleAgent, agent_env, run_meshgen, snapshot

LEAF = "/v1/agent/connect/ca/leaf/www"


def leaf_json(double, service="www", **changes) -> str:
    body = {k: v for k, v in double._issue_leaf(service).items() if not k.startswith("_")}
    body.update(changes)
    return json.dumps(body)


def other_key_pem() -> str:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()).decode()


def foreign_leaf(_double) -> str:
    other = DoubleAgent()
    body = {k: v for k, v in other._issue_leaf("www").items() if not k.startswith("_")}
    return json.dumps(body)


def expired_leaf(double) -> str:
    double.leaf_ttl = dt.timedelta(seconds=30)
    double.leaves.clear()
    return leaf_json(double)


def future_leaf(double) -> str:
    """A leaf that becomes valid in an hour: what a clock running behind sees."""
    cert, key = double.ca.issue_leaf(double.active_root, double.service_uri("www"),
                                     not_before=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
    return leaf_json(double, CertPEM=cert.public_bytes(serialization.Encoding.PEM).decode(),
                     PrivateKeyPEM=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()).decode())


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def set_config(**values):
    return lambda s: s["Proxy"].setdefault("Config", {}).update(values)


def set_upstream(**values):
    return lambda s: s["Proxy"]["Upstreams"][0].update(values)


# (fault applied to the double, expected words in the one-line error)
FAULTS = {
    "agent unreachable": (lambda d: {"CONSUL_HTTP_ADDR": closed_port()}, "cannot reach the Consul agent at http://127.0.0.1:"),
    "agent too slow": (lambda d: d.inject("/v1/agent/connect/ca/roots", delay=3), "did not answer within 1s"),
    "403 names the permission": (lambda d: (d.enable_acls("deny"), d.add_token({"service_prefix:": "read"}, "reader"),
                                            {"CONSUL_HTTP_TOKEN": "reader"})[-1],
                                 "GET /v1/agent/connect/ca/leaf/www: 403 Permission denied: token with AccessorID"),
    "unknown token": (lambda d: (d.enable_acls("deny"), {"CONSUL_HTTP_TOKEN": "nope"})[-1], "ACL not found: the agent does not know this Consul token"),
    "404 unknown service": (lambda d: d.deregister("www-sidecar-proxy"), "no connect-proxy service on this agent"),
    "429": (lambda d: d.inject(LEAF, status=429, body="Rate limit reached, try again later"), "429 rate limited by Consul"),
    "500": (lambda d: d.inject("/v1/agent/connect/ca/roots", status=500, body="cluster has no CA bootstrapped yet"),
            "GET /v1/agent/connect/ca/roots: 500 cluster has no CA bootstrapped yet"),
    "malformed JSON": (lambda d: d.inject("/v1/agent/service/www-sidecar-proxy", body="{not json"), "malformed JSON from the Consul agent"),
    "truncated JSON": (lambda d: d.inject("/v1/agent/connect/ca/roots", body='{"ActiveRootID":"ab","Roots":[{"ID'), "malformed JSON"),
    "roots not an object": (lambda d: d.inject("/v1/agent/connect/ca/roots", body="[]"), "CA roots: the agent listed no roots"),
    "Proxy missing": (lambda d: d.inject("/v1/agent/service/www-sidecar-proxy", body=json.dumps(
        {k: v for k, v in d.services["www-sidecar-proxy"].items() if k != "Proxy"})), "Proxy is missing or not an object"),
    "port mistyped": (lambda d: d.update_service("www-sidecar-proxy", set_upstream(LocalBindPort="sixty")), "Proxy.Upstreams[0].LocalBindPort: 'sixty' is not a whole number"),
    "port out of range": (lambda d: d.update_service("www-sidecar-proxy", set_upstream(LocalBindPort=70000)), "Proxy.Upstreams[0].LocalBindPort: 70000 is not a port number"),
    "protocol unknown": (lambda d: d.update_service("www-sidecar-proxy", set_config(protocol="udp")), "Proxy.Config.protocol: 'udp' is not one of tcp, http, http2, grpc"),
    "expired leaf": (lambda d: d.inject(LEAF, body=expired_leaf(d)), "leaf certificate: expired at 20"),
    "leaf not yet valid": (lambda d: d.inject(LEAF, body=future_leaf(d)), "leaf certificate: not valid until 20"),
    "leaf key mismatch": (lambda d: d.inject(LEAF, body=leaf_json(d, PrivateKeyPEM=other_key_pem())), "PrivateKeyPEM does not match"),
    "leaf of another service": (lambda d: d.inject(LEAF, body=leaf_json(d, "billing")), "is not one of service 'www'"),
    "leaf from another CA": (lambda d: d.inject(LEAF, body=foreign_leaf(d)), "trust domain"),
    "mesh entry action unknown": (lambda d: d.inject("/v1/config/mesh/mesh", body=json.dumps(
        {"Kind": "mesh", "HTTP": {"Incoming": {"RequestNormalization": {"PathWithEscapedSlashesAction": "DECODE"}}}})),
        "mesh entry HTTP.Incoming.RequestNormalization.PathWithEscapedSlashesAction: 'DECODE' is not one of"),
    "mesh entry flag mistyped": (lambda d: d.inject("/v1/config/mesh/mesh", body=json.dumps(
        {"Kind": "mesh", "HTTP": {"Incoming": {"RequestNormalization": {"MergeSlashes": "yes"}}}})),
        "mesh entry HTTP.Incoming.RequestNormalization.MergeSlashes: 'yes' is not true or false"),
    "mesh entry cipher unknown": (lambda d: d.inject("/v1/config/mesh/mesh", body=json.dumps(
        {"Kind": "mesh", "TLS": {"Outgoing": {"CipherSuites": ["ALL:eNULL"]}}})),
        "mesh entry TLS.Outgoing.CipherSuites[0]: 'ALL:eNULL' is not a cipher suite Consul names"),
    "mesh entry TLS version unknown": (lambda d: d.inject("/v1/config/mesh/mesh", body=json.dumps(
        {"Kind": "mesh", "TLS": {"Incoming": {"TLSMinVersion": "TLSv1_3 ciphers NULL"}}})),
        "mesh entry TLS.Incoming.TLSMinVersion: 'TLSv1_3 ciphers NULL' is not one of"),
    "mesh entry not an object": (lambda d: d.inject("/v1/config/mesh/mesh", body="[]"),
                                 "GET /v1/config/mesh/mesh: expected a JSON object"),
    "haproxy -c fails": (lambda d: d.update_service("www-sidecar-proxy", set_config(local_connect_timeout_ms=10**12)),
                         "haproxy -c rejected the rendered config"),
}

# A target the agent does not answer, or answers with a bad value: it costs that target only.
# The render goes on; the target keeps the instances the last run had (the bundle stays as it
# was); one line names it. (Before issue 20 each was the whole run's error.)
ITEM_FAULTS = {
    "connection dropped": (lambda d: d.inject("/v1/health/connect/redis", drop=True), "GET /v1/health/connect/redis: cannot reach"),
    "503 empty": (lambda d: d.inject("/v1/health/connect/redis", status=503, body=""), "503 (empty body)"),
    "health not a list": (lambda d: d.inject("/v1/health/connect/redis", body='{"a":1}'), "expected a JSON list of health entries"),
    "instance address bad": (lambda d: d.add_instance("redis", "10.0.0.1 backup", 21000), "Service.Address: '10.0.0.1 backup' is not an IP address"),
}

# Values from Consul that would inject HAProxy syntax if they reached the template.
INJECTIONS = {
    "name with newline": (set_upstream(DestinationName="redis\n    server evil 10.9.9.9:6379"), "Proxy.Upstreams[0].DestinationName"),
    "name with space": (set_upstream(DestinationName="redis evil"), "Proxy.Upstreams[0].DestinationName"),
    "service name with hash": (lambda s: s["Proxy"].update(DestinationServiceName="www#x"), "Proxy.DestinationServiceName"),
    "bind address with comment": (set_config(bind_address="0.0.0.0 # x"), "Proxy.Config.bind_address"),
    "syslog with quotes": (set_config(syslog_server='"10.0.0.1" len 9999'), "Proxy.Config.syslog_server"),
    "access_log not a boolean": (set_config(access_log="false\n    log 10.9.9.9 local0"), "Proxy.Config.access_log"),
    "prometheus bind with option": (set_config(envoy_prometheus_bind_addr="127.0.0.1:9102 ssl"), "Proxy.Config.envoy_prometheus_bind_addr"),
    "mode with newline": (set_config(local_service_mode="tcp\n    option httpchk"), "Proxy.Config.local_service_mode"),
    "socket path with space": (set_upstream(LocalBindPort=None, LocalBindSocketPath="/tmp/a b.sock"), "Proxy.Upstreams[0].LocalBindSocketPath"),
    "expose path with space": (lambda s: s["Proxy"].update(Expose={"Paths": [{"ListenerPort": 21500, "Path": "/h }x", "LocalPathPort": 8080}]}),
                               "Proxy.Expose.Paths[0].Path"),
    "local address with newline": (lambda s: s["Proxy"].update(LocalServiceAddress="127.0.0.1\nlisten x"), "Proxy.LocalServiceAddress"),
    "timeout with unit": (set_config(local_connect_timeout_ms="5s"), "Proxy.Config.local_connect_timeout_ms"),
    "nested limit injected": (set_upstream(Config={"limits": {"max_connections": "1\n  maxconn 9"}}), "Proxy.Upstreams[0].Config.limits.max_connections"),
}


@pytest.fixture
def rendered(seeded_double, any_haproxy, tmp_path):
    """A good bundle on disk, and how to run meshgen again."""
    out = tmp_path / "out"

    def again(**env):
        return run_meshgen("render", "--sidecar-for", "www", "--out", str(out), "--haproxy", any_haproxy,
                           "--timeout", "1", env=agent_env(seeded_double, **env))

    assert again().code == 3
    return seeded_double, out, again


def assert_clean_failure(run, message: str) -> None:
    assert run.code == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("meshgen: error: ")
    assert message in lines[0], lines[0]


@pytest.mark.parametrize("case", sorted(FAULTS))
def test_fault_fails_cleanly_and_keeps_the_bundle(case, rendered):
    double, out, again = rendered
    before = snapshot(out)
    apply, message = FAULTS[case]
    env = apply(double)
    assert_clean_failure(again(**(env if isinstance(env, dict) else {})), message)
    assert snapshot(out) == before


@pytest.mark.parametrize("case", sorted(INJECTIONS))
def test_injection_is_refused_and_keeps_the_bundle(case, rendered):
    double, out, again = rendered
    before = snapshot(out)
    mutate, field = INJECTIONS[case]
    double.update_service("www-sidecar-proxy", mutate)
    assert_clean_failure(again(), field)
    assert snapshot(out) == before


@pytest.mark.parametrize("case", sorted(ITEM_FAULTS))
def test_a_bad_target_costs_only_itself(case, rendered):
    double, out, again = rendered
    live_before = os.readlink(out / "live")
    config_before = (out / "haproxy.cfg").read_text()
    apply, message = ITEM_FAULTS[case]
    apply(double)
    double.renew_leaf("www")                 # work for the same run: it must still be done
    run = again()
    assert run.code == 3, run.stderr
    lines = run.stderr.strip().splitlines()
    skipped = [line for line in lines if line.startswith("meshgen: www-sidecar-proxy: skipped: ")]
    assert len(skipped) == 1 and message in skipped[0], lines
    live_after = os.readlink(out / "live")
    # The leaf went live; the config is the same but for the bundle's own path: redis kept its
    # instance.
    assert (out / "leaf.pem").read_bytes() != (out / live_before / "leaf.pem").read_bytes()
    assert (out / "haproxy.cfg").read_text() == config_before.replace(live_before, live_after)


def test_an_intention_meshgen_cannot_enforce_denies_the_caller_it_names(rendered):
    """A permission that needs a JSON Web Token cannot be checked by HAProxy: allowing it
    unchecked would let in what Consul's Envoy refuses, so that intention denies its caller, and
    costs nothing else."""
    double, out, again = rendered
    double.set_intention("web", "www", "allow", permissions=[
        {"Action": "allow", "HTTP": {"PathPrefix": "/"}, "JWT": {"Providers": [{"Name": "okta"}]}}])
    double.set_intention("api", "www", "allow")
    run = again()
    assert run.code == 3, run.stderr
    skipped = [line for line in run.stderr.splitlines() if ": skipped: " in line]
    assert len(skipped) == 1 and "Permissions[0].JWT: meshgen cannot verify JSON Web Tokens" in skipped[0], run.stderr
    decisions = dict(line.split(" ", 1) for line in (out / "intentions.map").read_text().splitlines()
                     if not line.startswith("#"))
    assert decisions["default/default/web"].startswith("deny|")
    assert decisions["default/default/api"].startswith("allow|")
