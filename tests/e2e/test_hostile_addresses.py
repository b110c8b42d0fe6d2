"""An address is the one place a zone ID hid a whole config: Python's ipaddress takes
"::1%<anything>", and the review put `global`, `program` and a shell command behind one. Every
field of the registration that becomes an address is held to one grammar (IPv4, IPv6 without a
zone, DNS name): a bad one is refused in one line naming it, and nothing is written."""
from __future__ import annotations

import pytest

from harness import agent_env, free_port, run_meshgen, seed_definition, snapshot

# What the review registered on Consul 1.8.7: Consul stores it as it is.
ZONE_ID_ATTACK = "::1%lo]:8080\nglobal\n    master-worker\nprogram pwn\n    command sh -c 'id >pwned.txt'\n#"


@pytest.mark.parametrize("field, proxy", [
    ("Proxy.LocalServiceAddress", {"local_service_address": ZONE_ID_ATTACK}),
    ("Proxy.Config.bind_address", {"config": {"bind_address": "fe80::1%eth0 ssl crt /etc/passwd"}}),
    ("Proxy.Config.envoy_prometheus_bind_addr", {"config": {"envoy_prometheus_bind_addr": "[::1%lo\n#]:9102"}}),
    ("Proxy.Config.stats_bind_addr", {"config": {"stats_bind_addr": "[fe80::1%x y]:9000"}}),
    ("Proxy.Config.syslog_server", {"config": {"syslog_server": "::1%lo\nglobal"}}),
    ("Proxy.Upstreams[0].LocalBindAddress", {"upstreams": [{"destination_name": "redis", "local_bind_port": 6379,
                                                            "local_bind_address": "::1%lo\n    program pwn"}]}),
], ids=["LocalServiceAddress", "bind_address", "prometheus", "stats", "syslog", "LocalBindAddress"])
def test_a_zone_id_in_any_address_of_the_registration_is_refused_in_one_line(agent, tmp_path, field, proxy,
                                                                            any_haproxy):
    service = seed_definition("www", agent.suffix)
    service["connect"]["sidecar_service"]["port"] = free_port()
    service["connect"]["sidecar_service"]["proxy"].update({"upstreams": [], **proxy})
    agent.register({"service": service})
    out = tmp_path / "out"
    try:
        run = run_meshgen("render", "--sidecar-for", service["name"], "--out", str(out), "--haproxy", any_haproxy,
                          env=agent_env(agent))
    finally:
        agent.deregister(f"{service['name']}-sidecar-proxy")
        agent.deregister(service["name"])
    lines = run.stderr.strip().splitlines()
    assert run.code == 1 and len(lines) == 1, run.stderr
    assert f"{field}: " in lines[0], lines[0]
    assert snapshot(out) == {}
