"""Rendering: golden files pin the output; both HAProxy builds accept it; same input, same bytes.

Set MESHGEN_UPDATE_GOLDEN=1 to rewrite the golden files after an intended change, then read the
diff before committing it."""
from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

import meshgen
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
EXAMPLES = {
    # name: (registration, instances, intentions, the agent's decision for an unnamed caller)
    "seed": ("seed_registration.json", "seed_instances.json", [], (True, "ACLs disabled, access is allowed by default")),
    "full": ("full_registration.json", "full_instances.json", FULL_INTENTIONS,
             (False, "Matched intention: DENY default/* => default/web (ID: 1|2\nX, Precedence: 8)")),
}


def intentions(name: str, http: bool = True) -> meshgen.Intentions:
    _, _, entries, (allowed, reason) = EXAMPLES[name]
    listed = [meshgen.parse_intention(entry, f"intentions of web[{i}]") for i, entry in enumerate(entries)]
    return meshgen.decide(listed, http, allowed, reason)


def model(name: str, shuffle: bool = False) -> meshgen.Sidecar:
    registration_file, instances_file, _, _ = EXAMPLES[name]
    registration = json.loads((DATA / registration_file).read_text())
    by_name = json.loads((DATA / instances_file).read_text())
    if shuffle:
        rng = random.Random(7)
        rng.shuffle(registration["Proxy"]["Upstreams"])
        for entries in by_name.values():
            rng.shuffle(entries)
    sidecar = meshgen.parse_registration(registration, registration["ID"])
    return meshgen.with_instances(sidecar, {u.key: by_name.get(u.name, []) for u in sidecar.upstreams})


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
    `* => web` (8), so the wildcard decides it, as it decides any unnamed caller; an L7
    intention gives its caller its rules' tag; the agent's reason is made safe."""
    lines = [line for line in bundle("full").files["intentions.map"].decode().splitlines()
             if not line.startswith("#")]
    assert [line.split(" ", 1)[0] for line in lines] == ["default/api", "default/billing", "*"]
    assert lines[0].startswith("default/api allow|intention: default/api => default/web (precedence 9)")
    assert lines[1].startswith("default/billing l7-1|L7 intention: default/billing => default/web")
    assert lines[2] == ("* deny|no intention names the caller, the agent says: Matched intention: DENY "
                        "default/* => default/web (ID: 1?2?X, Precedence: 8)")


def test_l7_permissions_become_request_rules_in_consuls_order():
    config = bundle("full").files["haproxy.cfg"].decode()
    rules = [line.strip() for line in config.splitlines() if "txn.meshgen_l7" in line and "set-var" in line]
    decided = "if { var(txn.meshgen_decision) -m str l7-1 } !{ var(txn.meshgen_l7) -m found }"
    assert rules == [
        f"http-request set-var(txn.meshgen_l7) str(deny:permission-1) {decided} "
        "{ path -m beg '/admin' } { req.hdr_cnt(x-debug) gt 0 }",
        f"http-request set-var(txn.meshgen_l7) str(allow:permission-2) {decided} "
        "{ path -m reg '^(?:/invoices/[0-9]+)$' } { method GET HEAD }",
        f"http-request set-var(txn.meshgen_l7) str(allow:permission-3) {decided} "
        "{ path -m str '/health' } !{ req.fhdr(user-agent) -m end 'probe' } { req.fhdr(x-team) -m str 'a b#$c' }",
        # A `*` intention hides Consul's default from the agent's answer: unknown, so denied.
        f"http-request set-var(txn.meshgen_l7) str(deny:default) {decided}",
    ]


def test_on_a_tcp_service_an_l7_intention_denies():
    decided = intentions("full", http=False)
    assert [d.verdict for d in decided.decisions] == ["allow", "deny", "deny"] and decided.l7 == ()


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
    sidecar = meshgen.parse_registration(registration, registration["ID"])
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
    running version, as HAProxy itself reads the `.if version_atleast()` blocks."""
    _, servers = meshgen.split_servers(bundle("full").files["haproxy.cfg"].decode(), {"upstream_api"})
    options = {version: servers["upstream_api"].options_for(version) for version in [(2, 6), (3, 0), (3, 4, 7)]}
    assert all(o.startswith("ssl crt /run/meshgen/") and "verify required check check-ssl" in o
               for o in options.values())
    assert ["pool-purge-delay" in o for o in options.values()] == [True, False, False]
    assert ["no-sni-auto no-check-sni-auto" in o for o in options.values()] == [False, False, True]
