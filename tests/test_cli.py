"""meshgen as a user runs it: a separate process against an agent, exit codes, files on disk."""
from __future__ import annotations

import datetime as dt
import json
import os
import socket
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import meshgen
from harness import (ROOT, DoubleAgent, agent_env, checks_ran, load_seed, passing_instances, run_meshgen,
                     snapshot)


def render(agent, out, haproxy, *extra, sidecar_for="www", env=None):
    return run_meshgen("render", "--sidecar-for", sidecar_for, "--out", str(out), "--haproxy", haproxy,
                       *extra, env=env or agent_env(agent))


def test_render_writes_a_complete_bundle_then_nothing(agent, seed, any_haproxy, tmp_path):
    # Consul 1.8.7 runs a new check for the first time up to one interval (10 s) after it is
    # registered, and that run moves the health index: a real change, which would be recorded.
    checks_ran(agent, [f"{seed[name]}-sidecar-proxy" for name in ("www", "redis")])
    out = tmp_path / "out"
    first = render(agent, out, any_haproxy, sidecar_for=seed["www"])
    assert first.code == 3, first.stderr
    assert "changed, reload HAProxy" in first.stderr
    live = out / meshgen.LIVE
    bundle = os.readlink(live)
    assert bundle.startswith(meshgen.BUNDLE_PREFIX)
    expected = {"authorize.lua", "callers.map", "haproxy.cfg", "intentions.map", "leaf.pem", "manifest.json",
                "public.crt-list", "roots.pem", "servers.map"}
    assert {p.name for p in live.iterdir()} == expected
    for name in expected:
        assert os.readlink(out / name) == f"live/{name}"
    assert stat.S_IMODE((live / "leaf.pem").stat().st_mode) == 0o600
    config = (out / "haproxy.cfg").read_text()
    assert f"crt {out.resolve()}/{bundle}/leaf.pem" in config
    assert f"frontend listener_upstream_{seed['redis']}" in config
    before = snapshot(out)
    second = render(agent, out, any_haproxy, sidecar_for=seed["www"])
    assert (second.code, snapshot(out)) == (0, before), second.stderr
    assert "unchanged" in second.stderr
    assert (out / meshgen.STATE_FILE).is_file()


def test_a_change_in_consul_exits_3_and_keeps_only_the_previous_bundle(seeded_double, any_haproxy, tmp_path):
    out = tmp_path / "out"
    bundles = []
    for maxconn in (100, 200, 300):
        seeded_double.update_service("www-sidecar-proxy",
                                     lambda s: s["Proxy"]["Config"].update(max_inbound_connections=maxconn))
        run = render(seeded_double, out, any_haproxy)
        assert run.code == 3, run.stderr
        assert f"maxconn {maxconn}" in (out / "haproxy.cfg").read_text()
        bundles.append(os.readlink(out / meshgen.LIVE))
    on_disk = sorted(p.name for p in out.iterdir() if p.name.startswith(meshgen.BUNDLE_PREFIX))
    assert on_disk == sorted(bundles[1:])


def test_a_change_that_reaches_no_file_asks_for_no_reload(seeded_double, any_haproxy, tmp_path):
    out = tmp_path / "out"
    assert render(seeded_double, out, any_haproxy).code == 3
    roots = seeded_double._roots_json()
    seeded_double.inject("/v1/agent/connect/ca/roots", body=json.dumps(dict(roots, ActiveRootID="renamed")))
    run = render(seeded_double, out, any_haproxy)
    assert run.code == 0, run.stderr


def test_dry_run_writes_nothing_and_shows_the_diff(seeded_double, any_haproxy, tmp_path):
    out = tmp_path / "out"
    fresh = render(seeded_double, out, any_haproxy, "--dry-run")
    assert fresh.code == 3, fresh.stderr
    assert not out.exists()
    assert "+++ new/haproxy.cfg" in fresh.stdout
    assert "--- leaf.pem: added (contents not shown)" in fresh.stdout
    assert "PRIVATE KEY" not in fresh.stdout
    assert render(seeded_double, out, any_haproxy).code == 3
    before = snapshot(out)
    same = render(seeded_double, out, any_haproxy, "--dry-run")
    assert (same.code, same.stdout) == (0, "")
    seeded_double.update_service("www-sidecar-proxy",
                                 lambda s: s["Proxy"]["Config"].update(max_inbound_connections=77))
    changed = render(seeded_double, out, any_haproxy, "--dry-run")
    assert changed.code == 3
    assert "+    maxconn 77" in changed.stdout
    assert snapshot(out) == before


def test_sidecar_for_needs_exactly_one_match(seeded_double, any_haproxy, tmp_path):
    none = render(seeded_double, tmp_path / "out", any_haproxy, sidecar_for="nothing")
    assert none.code == 1
    assert "no connect-proxy service on this agent has Proxy.DestinationServiceID 'nothing'" in none.stderr
    seeded_double.register({"Kind": "connect-proxy", "ID": "www-second-proxy", "Name": "www-second-proxy",
                            "Port": 21010, "Proxy": {"DestinationServiceName": "www",
                                                     "DestinationServiceID": "www", "LocalServicePort": 8080}})
    several = render(seeded_double, tmp_path / "out", any_haproxy)
    assert several.code == 1
    assert "several sidecars front it (www-second-proxy, www-sidecar-proxy)" in several.stderr
    by_id = run_meshgen("render", "--proxy-id", "www-sidecar-proxy", "--out", str(tmp_path / "out"),
                        "--haproxy", any_haproxy, env=agent_env(seeded_double))
    assert by_id.code == 3, by_id.stderr


def test_usage_errors_exit_2(seeded_double, tmp_path):
    both = run_meshgen("render", "--sidecar-for", "www", "--proxy-id", "x", "--out", str(tmp_path),
                       env=agent_env(seeded_double))
    assert both.code == 2 and "exactly one of --sidecar-for and --proxy-id" in both.stderr
    assert run_meshgen("render", "--sidecar-for", "www").code == 2   # no --out
    assert run_meshgen("frobnicate").code == 2


def test_help_lists_the_exit_codes():
    help_text = run_meshgen("render", "--help").stdout
    for line in ("0  nothing changed", "3  files changed: reload HAProxy", "1  error", "2  usage error"):
        assert line in help_text


def test_show_table_and_json(agent, seed):
    env = agent_env(agent)
    redis_sidecar = socket.create_server(("127.0.0.1", seed["ports"]["redis"]))
    assert len(passing_instances(agent, seed["redis"], 1)) == 1
    table = run_meshgen("show", "--sidecar-for", seed["www"], env=env)
    assert table.code == 0, table.stderr
    assert f"upstream    upstream_{seed['redis']}  listen 127.0.0.1:6379  tcp" in table.stdout
    data = json.loads(run_meshgen("show", "--sidecar-for", seed["www"], "--json", env=env).stdout)
    assert data["leaf"]["spiffe_id"].endswith(f"/svc/{seed['www']}")
    assert [r["active"] for r in data["roots"]].count(True) == 1
    upstream = data["upstreams"][0]
    assert upstream["listen"] == "127.0.0.1:6379"
    assert len(upstream["instances"]) == 1
    assert upstream["instances"][0]["address"].endswith(f":{seed['ports']['redis']}")
    redis_sidecar.close()


def test_missing_haproxy_is_an_error_unless_validation_is_skipped(seeded_double, tmp_path):
    missing = render(seeded_double, tmp_path / "out", "/nonexistent/haproxy")
    assert missing.code == 1
    assert "--haproxy: '/nonexistent/haproxy' not found" in missing.stderr
    assert not (tmp_path / "out").exists()
    skipped = run_meshgen("render", "--sidecar-for", "www", "--out", str(tmp_path / "out"), "--no-validate",
                          "--haproxy", "/nonexistent/haproxy", env=agent_env(seeded_double))
    assert skipped.code == 3, skipped.stderr


# ----------------------------------------------------------------------------- check (offline)

def seed_definition(name: str) -> dict:
    services = json.loads((ROOT / "demo" / "services.json").read_text())["services"]
    return next(s for s in services if s["service"]["name"] == name)


@pytest.mark.parametrize("definition", ["seed-www", "seed-redis", "agent-response"])
def test_check_accepts_valid_definitions(definition, haproxy, tmp_path):
    path = tmp_path / "service.json"
    if definition == "agent-response":
        path.write_text((ROOT / "tests" / "data" / "full_registration.json").read_text())
    else:
        path.write_text(json.dumps(seed_definition(definition.split("-")[1])))
    run = run_meshgen("check", str(path), "--haproxy", haproxy, env={"PATH": os.environ["PATH"]})
    assert run.code == 0, run.stderr
    assert "valid" in run.stderr


def test_check_expands_the_sidecar_as_the_agent_does(seeded_double):
    import meshgen
    import requests
    agent_view = requests.get(seeded_double.url + "/v1/agent/service/www-sidecar-proxy", timeout=5).json()
    expanded = meshgen.expand_definition(seed_definition("www"), "seed")
    assert meshgen.parse_registration(expanded, "x") == meshgen.parse_registration(agent_view, "x")


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s["service"].update(port="eighty"), "Proxy.LocalServicePort: 'eighty' is not a whole number"),
    (lambda s: s["service"]["connect"]["sidecar_service"]["proxy"]["upstreams"][0].update(
        destination_name="redis\n    server evil 10.9.9.9:6379"), "DestinationName"),
    (lambda s: s["service"]["connect"]["sidecar_service"]["proxy"]["config"].update(
        local_connect_timeout_ms=10**12), "haproxy -c rejected the rendered config"),
    (lambda s: s["service"].pop("connect"), "service.connect.sidecar_service is missing"),
])
def test_check_rejects_invalid_definitions(mutate, message, any_haproxy, tmp_path):
    definition = seed_definition("www")
    mutate(definition)
    path = tmp_path / "service.json"
    path.write_text(json.dumps(definition))
    run = run_meshgen("check", str(path), "--haproxy", any_haproxy)
    assert run.code == 1
    assert message in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_check_rejects_a_file_that_is_not_json(any_haproxy, tmp_path):
    path = tmp_path / "service.hcl"
    path.write_text('service { name = "www" }')
    run = run_meshgen("check", str(path), "--haproxy", any_haproxy)
    assert run.code == 1 and "not JSON" in run.stderr


# ----------------------------------------------------------------------------- reaching the agent

def test_unix_socket_agent(any_haproxy, tmp_path):
    agent = DoubleAgent().start(unix_socket=str(tmp_path / "consul.sock"))
    try:
        load_seed(agent)
        run = render(agent, tmp_path / "out", any_haproxy)
        assert run.code == 3, run.stderr
        # HAProxy never calls the agent: only meshgen does.
        assert "consul.sock" not in (tmp_path / "out" / "haproxy.cfg").read_text()
    finally:
        agent.stop()


def _self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "consul-agent")])
    now = dt.datetime.now(dt.timezone.utc)
    import ipaddress
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "agent.crt", tmp_path / "agent.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


def test_https_agent_verified_with_the_ca_file(any_haproxy, tmp_path):
    cert, key = _self_signed(tmp_path)
    agent = DoubleAgent().start(tls=(cert, key))
    try:
        load_seed(agent)
        unverified = render(agent, tmp_path / "out", any_haproxy)
        assert unverified.code == 1 and "cannot reach the Consul agent" in unverified.stderr
        run = render(agent, tmp_path / "out", any_haproxy, env=agent_env(agent, CONSUL_CACERT=cert))
        assert run.code == 3, run.stderr
        assert "intention" in (tmp_path / "out" / "intentions.map").read_text()
    finally:
        agent.stop()


def test_token_reaches_the_agent_and_no_file(seeded_double, any_haproxy, tmp_path):
    token = "3f1e0c2a-0000-4000-8000-secretsecret"
    seeded_double.enable_acls("deny")
    seeded_double.add_token({"service_prefix:": "write"}, secret=token)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    out = tmp_path / "out"
    run = render(seeded_double, out, any_haproxy,
                 env=agent_env(seeded_double, CONSUL_HTTP_TOKEN_FILE=str(token_file)))
    assert run.code == 3, run.stderr
    assert {entry[2].get("_token") for entry in seeded_double.request_log} == {token}
    assert [p.name for p in out.rglob("*") if p.is_file() and token.encode() in p.read_bytes()] == []
    assert token not in run.stdout + run.stderr
    hidden = render(seeded_double, tmp_path / "out2", any_haproxy)
    assert hidden.code == 1
    assert "it needs service:read on the sidecar's own service, such as 'www-sidecar-proxy'" in hidden.stderr
    denied = run_meshgen("render", "--proxy-id", "www-sidecar-proxy", "--out", str(tmp_path / "out2"),
                         "--haproxy", any_haproxy, env=agent_env(seeded_double))
    assert denied.code == 1
    assert "lacks permission 'service:read' on \"www-sidecar-proxy\"" in denied.stderr


def test_namespace_is_sent_only_when_asked(seeded_double, any_haproxy, tmp_path):
    assert render(seeded_double, tmp_path / "a", any_haproxy).code == 3
    asked = render(seeded_double, tmp_path / "b", any_haproxy, "--namespace", "team-a")
    assert asked.code == 1
    assert "Namespaces are a Consul Enterprise feature" in asked.stderr


def test_out_below_a_regular_file_is_one_line(seeded_double, any_haproxy, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    run = render(seeded_double, blocker / "out", any_haproxy)
    assert run.code == 1, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"meshgen: error: --out {blocker / 'out'}: cannot write the bundle: Not a directory"]
    assert blocker.read_text() == "not a directory"
