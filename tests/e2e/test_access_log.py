"""What a sidecar logs, on every HAProxy version: one line per exchange on the public listener
(per request in HTTP), none on the upstream listeners (the other side's public listener logs the
exchange), and with Config access_log false only refusals. Counted in the log HAProxy writes,
by what each line is about: a request's path, a client's source port, a frontend's name (the
agent's health checks of the public listeners add lines of their own)."""
from __future__ import annotations

import http.client
import ssl
import time

import pytest

from harness import HAProxy, HttpApp, Identity, free_port, meshgen_render, register_sidecar, wait_passing

REQUESTS = 12


LOG_DELAY = 0.5     # after the exchanges, for their lines to be written


def lines(process: HAProxy, about: str) -> int:
    """How many lines of the log mention `about`."""
    return sum(about in line for line in process.log().splitlines())


def refused_request(port: int, context: ssl.SSLContext, source_port: int) -> int | None:
    """A request from a caller the intentions deny: its status, or None if the connection closed."""
    try:
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5,
                                           source_address=("127.0.0.1", source_port))
        conn.request("GET", "/")
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None


@pytest.mark.parametrize("access_log", [True, False], ids=["access log", "access_log false"])
def test_each_exchange_is_logged_once_by_the_side_that_accepted_it(double, haproxy, tmp_path, access_log):
    app, started = HttpApp(), []
    try:
        public, upstream = free_port(), free_port()
        register_sidecar(double, "api", public, app.port, config={"protocol": "http", "access_log": access_log})
        register_sidecar(double, "web", free_port(), free_port(), upstreams=[
            {"destination_name": "api", "local_bind_port": upstream, "config": {"protocol": "http"}}])
        double.set_intention("web", "api", "allow")
        double.set_intention("intruder", "api", "deny")
        assert meshgen_render(double, "api-sidecar-proxy", tmp_path / "api", haproxy) == 3
        api = HAProxy(haproxy, tmp_path / "api" / "haproxy.cfg", tmp_path / "api.log", wait_for_port=public)
        started.append(api)
        wait_passing(double, "api", "api-sidecar-proxy")
        assert meshgen_render(double, "web-sidecar-proxy", tmp_path / "web", haproxy) == 3
        web = HAProxy(haproxy, tmp_path / "web" / "haproxy.cfg", tmp_path / "web.log", wait_for_port=upstream)
        started.append(web)

        kept = http.client.HTTPConnection("127.0.0.1", upstream, timeout=10)
        for i in range(REQUESTS):
            conn = kept if i % 2 else http.client.HTTPConnection("127.0.0.1", upstream, timeout=10)
            conn.request("GET", f"/{i}")
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, f"/{i}".encode())
        kept.close()

        time.sleep(LOG_DELAY)
        for i in range(REQUESTS):
            assert lines(api, f" /{i} HTTP/1.1") == (1 if access_log else 0), api.log()
        assert lines(web, "listener_upstream_api") == 0, web.log()

        intruder, source_port = Identity.from_double(double, tmp_path / "ids", "intruder").context(), free_port()
        assert refused_request(public, intruder, source_port) in (None, 403)
        time.sleep(LOG_DELAY)
        assert lines(api, f"127.0.0.1:{source_port} ") == 1, api.log()
    finally:
        for process in started:
            process.stop()
        app.close()
