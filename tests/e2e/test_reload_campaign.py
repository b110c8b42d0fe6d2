"""Reloads under load: a hundred render-and-reload cycles of both sidecars of the www -> redis
mesh, the config of each changing every time, while clients keep sending PINGs through them.
No request may fail; no old worker may outlive hard-stop-after; the masters' memory stays flat.
ACLs are on, so the token travels the whole path: it must never leak. On the double and on
Consul 1.8.7."""
from __future__ import annotations

import socket
import threading
import time
import uuid

import pytest

from campaign_support import SECRET_TOKEN, argv_leaks, haproxy_version, record, scaled, secret_leaks
from harness import free_port, register_sidecar, rss_kib
from real_consul import RealAgent
from test_mesh import Mesh, redis_ping, redis_server  # noqa: F401  (redis_server: a fixture)

CYCLES = scaled(100)
HARD_STOP_MS = 2000


@pytest.fixture(params=["double", "consul-acl"])
def campaign_mesh(request, haproxy, tmp_path, monkeypatch):
    """The mesh with ACLs on and default deny, its token the campaign's secret: on the double,
    then on the session's real Consul agent with ACLs (names suffixed). `.admin` writes
    intentions, which the sidecars' token may not."""
    if request.param == "double":
        agent = admin = request.getfixturevalue("double")
        agent.enable_acls("deny")
        agent.add_token({"service_prefix:": "write"}, SECRET_TOKEN)
        suffix = ""
    else:
        admin = request.getfixturevalue("real_consul_acl")
        admin.create_token('service_prefix "" { policy = "write" }\nnode_prefix "" { policy = "read" }',
                           secret=SECRET_TOKEN)
        request.addfinalizer(lambda: admin.delete_token(SECRET_TOKEN))
        agent, suffix = RealAgent(admin.url), "-" + uuid.uuid4().hex[:6]
    agent.token = SECRET_TOKEN           # the harness's own reads and writes too
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", SECRET_TOKEN)
    built = Mesh(agent, haproxy, tmp_path, suffix)
    built.admin = admin
    yield built
    for process in built.started:
        process.stop()
    if suffix:
        admin.delete_intention("www" + suffix, "redis" + suffix)
        for name in ("www", "redis"):
            admin.deregister(name + suffix)


def test_reloads_under_load_lose_no_request_and_leave_no_worker(campaign_mesh, redis_server, haproxy):
    mesh = campaign_mesh
    agent, suffix = mesh.double, mesh.suffix
    mesh.admin.set_intention("www" + suffix, "redis" + suffix, "allow")
    config = {"hard_stop_after_ms": HARD_STOP_MS}
    redis = mesh.sidecar("redis", redis_server, config=dict(config))
    upstream = free_port()
    www_upstreams = [{"destination_name": "redis" + suffix, "local_bind_port": upstream,
                      "config": {"destination_mode": "tcp"}}]
    www_app = free_port()
    www = mesh.sidecar("www", www_app, config=dict(config), upstreams=www_upstreams)
    registrations = {www: (www_app, www_upstreams), redis: (redis_server, [])}
    sidecars = (www, redis)
    assert redis_ping(upstream) == b"+PONG\r\n"

    outcomes, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            outcomes.append(redis_ping(upstream) == b"+PONG\r\n")

    # Each cycle opens an idle client connection and holds it: it keeps the worker that took it
    # draining after the next reload, until hard-stop-after ends it.
    idle = []
    clients = [threading.Thread(target=client) for _ in range(2)]
    for thread in clients:
        thread.start()
    masters = {s.proxy_id: s.haproxy.process.pid for s in sidecars}
    rss_early, peak_old = {}, 0
    try:
        for cycle in range(1, CYCLES + 1):
            idle.append(socket.create_connection(("127.0.0.1", upstream)))
            for sidecar in sidecars:
                app_port, upstreams = registrations[sidecar]
                register_sidecar(agent, sidecar.proxy_id.removesuffix("-sidecar-proxy"), sidecar.port, app_port,
                                 dict(config, local_connect_timeout_ms=1000 + cycle), upstreams)
                assert sidecar.render_and_reload(), cycle
            peak_old = max(peak_old, *(len(s.haproxy.old_workers()) for s in sidecars))
            if cycle == max(1, CYCLES // 10):
                rss_early = {name: rss_kib(pid) for name, pid in masters.items()}
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    rss_end = {name: rss_kib(pid) for name, pid in masters.items()}
    failed = outcomes.count(False)
    assert len(outcomes) > CYCLES * 2
    assert failed == 0

    # hard-stop-after ends the old workers the idle connection kept alive.
    deadline = time.monotonic() + HARD_STOP_MS / 1000 + 5
    while any(s.haproxy.old_workers() for s in sidecars) and time.monotonic() < deadline:
        time.sleep(0.2)
    left_behind = [pid for s in sidecars for pid in s.haproxy.old_workers()]
    assert left_behind == []
    assert peak_old >= 2        # idle connections did hold old workers: the bound was tested
    for connection in idle:
        connection.close()
    assert all(s.haproxy.process.poll() is None for s in sidecars)

    growth = {name: rss_end[name] - rss_early[name] for name in masters}
    assert max(growth.values()) < 2048, (rss_early, rss_end)

    logs = [s.haproxy.log() for s in sidecars]
    assert sum(log.count("authz=allow") for log in logs) > 0
    assert argv_leaks() == []
    assert [leak for s in sidecars for leak in secret_leaks(s.out, *logs)] == []
    record("reloads_under_load", haproxy=haproxy_version(haproxy), agent=type(agent).__name__, cycles=CYCLES,
           reloads=CYCLES * len(sidecars), requests=len(outcomes), failed=failed,
           peak_old_workers=peak_old, old_workers_after_hard_stop=len(left_behind),
           master_rss_growth_kib=max(growth.values()), master_rss_kib=max(rss_end.values()))
