"""Agent faults during a watch: start.sh runs meshgen with --wait against the double while the
agent resets connections, answers 5xx, answers slowly, serves a broken registration, lets an
index go backwards, and restarts. After each fault a real change must go live without a restart
of the wrapper; during each, the live bundle stays the last good one and clients keep getting in
(decisions live in HAProxy: no connection asks the agent). ACLs are on, so the token travels the
whole path: it must never leak."""
from __future__ import annotations

import time

from campaign_support import SECRET_TOKEN, argv_leaks, haproxy_version, record, secret_leaks
from harness import free_port, talk, wait_listening
from test_start_sh import SHELLS, mesh  # noqa: F401  (fixture)

BROKEN_REGISTRATION = ('{"Kind": "connect-proxy", "ID": "web-sidecar-proxy", "Port": 21000, '
                       '"Proxy": {"DestinationServiceName": "web\\n    server evil 10.9.9.9:1"}}')


def faults(double):
    """(name, start the fault, end it); each is in force for a few watch periods."""
    port = int(double.address.split(":")[1])
    return [
        ("connection resets", lambda: double.inject("/v1/", drop=True), double.clear_faults),
        ("500 from every endpoint", lambda: double.inject("/v1/", status=500, body="rpc error: No cluster leader"),
         double.clear_faults),
        ("503 from health only", lambda: double.inject("/v1/health/", status=503, body=""), double.clear_faults),
        ("slow answers (3 s each)", lambda: double.inject("/v1/", delay=3), double.clear_faults),
        ("a broken registration", lambda: double.inject("/v1/agent/service/web-sidecar-proxy", body=BROKEN_REGISTRATION),
         double.clear_faults),
        ("an index that goes backwards", lambda: double.reset_health_index("redis", 1), lambda: None),
        ("an agent restart", double.stop, lambda: double.start(port=port)),
    ]


def test_watch_survives_agent_faults_and_never_writes_a_worse_config(mesh, double, any_haproxy):  # noqa: F811
    start, port, client = mesh
    double.enable_acls("deny")
    double.add_token({"service_prefix:": "write"}, SECRET_TOKEN)
    double.add_instance("redis", "127.0.0.1", free_port())
    double.update_service("web-sidecar-proxy", lambda s: (
        s["Proxy"].setdefault("Config", {}),
        s["Proxy"].update(Upstreams=[{"DestinationType": "service", "DestinationName": "redis",
                                      "LocalBindPort": free_port(), "Config": {}}])))
    script = start(SHELLS["dash"], CONSUL_HTTP_TOKEN=SECRET_TOKEN)
    wait_listening(port, script.process)
    assert talk(port, client) == b"ping\n"
    live_config = script.out / "haproxy.cfg"
    results, leaks = [], []
    for name, begin, end in faults(double):
        last_good = live_config.read_text()
        failures = script.log().count("render failed")
        begin()
        time.sleep(0.5)
        served, checks = 0, 0
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            checks += 1
            served += talk(port, client) == b"ping\n"
            assert live_config.read_text() == last_good, name
            time.sleep(0.3)
        leaks += argv_leaks()
        end()
        # A change made once the fault is over goes live without a restart of start.sh.
        cleared = time.monotonic()
        extra = free_port()
        double.update_service("web-sidecar-proxy", lambda s: s["Proxy"]["Config"].update(
            unsecured_bind_port=extra))
        wait_listening(extra, script.process, timeout=30)
        assert talk(extra, None) == b"ping\n", name
        recovered = time.monotonic()
        results.append({"fault": name, "client_checks": checks, "served": served,
                        "failed_renders": script.log().count("render failed") - failures,
                        "change_live_after_s": round(recovered - cleared, 1)})
        assert served == checks, results[-1]

    log = script.log()
    assert log.count("starting HAProxy") == 1
    assert script.process.poll() is None
    # Every fault but the index reset, the slow agent and one that costs a single target made at
    # least one render fail cleanly; the one target's 503 cost only it (a `skipped:` line).
    assert [r for r in results if r["failed_renders"] == 0
            and not r["fault"].startswith(("an index", "slow", "503 from health only"))] == []
    assert "skipped: instances of target redis" in log
    assert script.stop() == 0
    assert leaks == []
    assert secret_leaks(script.out, script.log()) == []
    record("watch_faults", haproxy=haproxy_version(any_haproxy), faults=results,
           wrapper_restarts=log.count("starting HAProxy") - 1)
