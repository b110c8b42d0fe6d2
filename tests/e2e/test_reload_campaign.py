"""Reloads under load: a hundred render-and-reload cycles of both sidecars of the www -> redis
mesh, the config of each changing every time, while clients keep sending PINGs through them.
No request may fail; no old worker may outlive hard-stop-after; the masters' memory stays flat.
ACLs are on, so the token travels the whole path: it must never leak."""
from __future__ import annotations

import socket
import threading
import time

from campaign_support import SECRET_TOKEN, argv_leaks, haproxy_version, record, scaled, secret_leaks
from harness import free_port, rss_kib
from test_mesh import mesh, redis_ping, redis_server  # noqa: F401  (fixtures)

CYCLES = scaled(100)
HARD_STOP_MS = 2000


def test_reloads_under_load_lose_no_request_and_leave_no_worker(mesh, double, redis_server,  # noqa: F811
                                                                 haproxy, monkeypatch):
    double.enable_acls("deny")
    double.add_token({"service_prefix:": "write"}, SECRET_TOKEN)
    double.token = SECRET_TOKEN          # the harness's own reads of the agent, too
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", SECRET_TOKEN)
    double.set_intention("www", "redis", "allow")
    config = {"hard_stop_after_ms": HARD_STOP_MS}
    redis = mesh.sidecar("redis", redis_server, config=dict(config))
    upstream = free_port()
    www = mesh.sidecar("www", free_port(), config=dict(config), upstreams=[
        {"destination_name": "redis", "local_bind_port": upstream, "config": {"destination_mode": "tcp"}}])
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
                double.update_service(sidecar.proxy_id, lambda s: s["Proxy"]["Config"].update(
                    local_connect_timeout_ms=1000 + cycle))
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
    record("reloads_under_load", haproxy=haproxy_version(haproxy), cycles=CYCLES,
           reloads=CYCLES * len(sidecars), requests=len(outcomes), failed=failed,
           peak_old_workers=peak_old, old_workers_after_hard_stop=len(left_behind),
           master_rss_growth_kib=max(growth.values()), master_rss_kib=max(rss_end.values()))
