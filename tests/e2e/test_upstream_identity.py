"""Who may answer through an upstream, on every HAProxy version: the service of each response's
server certificate is found in servers.map by the certificate's SHA-256, else authorize.lua
reads it and adds it there; haproxy.cfg refuses anyone but the upstream's service. HTTP
upstreams pool their mutual-TLS connections (http-reuse always), so these tests change a
server's certificate under a pooled path, and try to make one upstream's entry let a server
into another. Judged by traffic: every response a client gets names the certificate of the
connection that carried it."""
from __future__ import annotations

import hashlib
import http.client
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import meshgen
from harness import HAProxy, HttpApp, Identity, free_port, meshgen_render, register_sidecar, wait_passing

SLOW = 0.4     # seconds a /slow request takes: concurrent ones need connections of their own


class IdentityServer(ThreadingHTTPServer):
    """A server sidecar at one address whose certificate the test changes. Each response names
    the identity its own connection's certificate carries, so a client can tell which one
    answered it."""
    daemon_threads = True

    def __init__(self, double, directory: Path, name: str, uris: tuple | None = None):
        served: dict = {}
        self.served, self.double, self.directory = served, double, directory

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                if self.path == "/slow":
                    time.sleep(SLOW)
                body = served[self.connection].encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        super().__init__(("127.0.0.1", 0), Handler)
        self.present(name, uris)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def present(self, name: str, uris: tuple | None = None) -> None:
        """New connections get a certificate of service `name` (or, with `uris`, one with exactly
        those URI SANs, or none); open ones keep theirs."""
        identity = (Identity.from_double(self.double, self.directory, name) if uris is None
                    else Identity.custom(self.double, self.directory, f"{name}-{len(uris)}", *uris))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(identity.cert), str(identity.key))
        context.load_verify_locations(str(identity.roots))
        context.verify_mode = ssl.CERT_REQUIRED
        self.current = (name, context, identity)

    def get_request(self):
        raw, address = self.socket.accept()
        name, context, _ = self.current
        connection = context.wrap_socket(raw, server_side=True)
        self.served[connection] = name
        return connection, address

    def drop_connections(self) -> None:
        """Close every open connection, as a restart would."""
        for connection in list(self.served):
            try:
                connection.shutdown(2)
            except OSError:
                pass

    def der(self) -> bytes:
        return ssl.PEM_cert_to_DER_cert(self.current[2].cert.read_text())

    @property
    def port(self) -> int:
        return self.server_address[1]

    def handle_error(self, request, client_address):
        pass

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def get(port: int, path: str = "/", connection=None) -> tuple[int, str]:
    """One request through an upstream listener: the status, and who answered (the body)."""
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        if connection is None:
            conn.close()


class Web:
    """The sidecar of `web` with HTTP upstreams `api` and `billing`, on the double."""

    def __init__(self, double, haproxy: str, tmp: Path):
        self.ports = {"api": free_port(), "billing": free_port()}
        proxy_id = register_sidecar(double, "web", free_port(), free_port(), upstreams=[
            {"destination_name": name, "local_bind_port": port, "config": {"protocol": "http"}}
            for name, port in self.ports.items()])
        self.out = tmp / "web"
        assert meshgen_render(double, proxy_id, self.out, haproxy) == 3
        self.haproxy = HAProxy(haproxy, self.out / "haproxy.cfg", tmp / "web.log",
                               wait_for_port=self.ports["api"])

    def get(self, upstream: str, path: str = "/", connection=None) -> tuple[int, str]:
        return get(self.ports[upstream], path, connection)

    def remembered(self) -> dict:
        """servers.map as HAProxy holds it: certificate digest -> service."""
        path = (self.out / meshgen.LIVE).resolve() / "servers.map"
        answer = meshgen.RuntimeAPI(self.out / "admin.sock")(f"show map {path}")
        return dict(line.split()[1:3] for line in answer.splitlines() if len(line.split()) == 3)


@pytest.fixture
def servers(double, tmp_path):
    started = []

    def start(name: str, uris: tuple | None = None) -> IdentityServer:
        server = IdentityServer(double, tmp_path / "servers", name, uris)
        started.append(server)
        return server
    yield start
    for server in started:
        server.close()


@pytest.fixture
def web(double, haproxy, tmp_path, servers):
    built = []

    def start() -> Web:
        built.append(Web(double, haproxy, tmp_path))
        return built[0]
    yield start
    for sidecar in built:
        sidecar.haproxy.stop()


def test_a_server_of_another_service_is_refused_and_the_right_one_let_in(double, servers, web):
    server = servers("billing")
    double.add_instance("api", "127.0.0.1", server.port)
    sidecar = web()
    for _ in range(3):
        status, body = sidecar.get("api")
        assert (status, body) != (200, "billing") and status >= 500
    server.present("api")
    server.drop_connections()
    assert sidecar.get("api") == (200, "api")


def test_a_pooled_path_whose_server_changes_certificate_carries_only_the_right_service(double, servers, web):
    server = servers("api")
    double.add_instance("api", "127.0.0.1", server.port)
    sidecar = web()
    kept = http.client.HTTPConnection("127.0.0.1", sidecar.ports["api"], timeout=10)
    for _ in range(5):         # over one local connection, then over new ones: pooled both ways
        assert sidecar.get("api", connection=kept) == (200, "api")
        assert sidecar.get("api") == (200, "api")

    # The open (pooled) connections keep the api certificate; new ones get billing's.
    with ThreadPoolExecutor(4) as few, ThreadPoolExecutor(12) as many:
        assert list(few.map(lambda _: sidecar.get("api", "/slow"), range(4))) == [(200, "api")] * 4
        server.present("billing")
        answers = list(many.map(lambda _: sidecar.get("api", "/slow"), range(24)))
    assert all(body == "api" for status, body in answers if status == 200), answers
    assert any(status != 200 for status, _ in answers), answers      # billing's connections were made
    assert any(status == 200 for status, _ in answers), answers      # and the pooled api ones used

    # The server restarts as billing: pooled or new, local connection kept or not, none gets
    # through. A request sent on a pooled connection as the restart closes it gets no answer.
    server.drop_connections()
    for _ in range(5):
        for connection in (None, kept):
            try:
                status, body = sidecar.get("api", connection=connection)
            except (http.client.HTTPException, OSError):
                if connection is kept:
                    kept = http.client.HTTPConnection("127.0.0.1", sidecar.ports["api"], timeout=10)
                continue
            assert status >= 500 and body != "billing"

    # Back to api: no refused connection was left in the pool to answer for it.
    server.present("api")
    server.drop_connections()
    assert [sidecar.get("api") for _ in range(10)] == [(200, "api")] * 10


def test_an_entry_one_upstream_added_lets_no_server_into_another(double, servers, web):
    billing = servers("billing")
    double.add_instance("billing", "127.0.0.1", billing.port)
    double.add_instance("api", "127.0.0.1", billing.port)
    sidecar = web()
    assert sidecar.get("billing") == (200, "billing")      # its certificate is now remembered
    assert hashlib.sha256(billing.der()).hexdigest().upper() in sidecar.remembered()
    for _ in range(3):
        status, body = sidecar.get("api")
        assert status >= 500 and body != "billing"
    assert sidecar.get("billing") == (200, "billing")


def test_two_instances_of_different_identity_behind_one_upstream_never_mix(double, servers, web):
    """Both threads, both certificates remembered, requests alternating between the two."""
    genuine, impostor = servers("api"), servers("billing")
    double.add_instance("api", "127.0.0.1", genuine.port)
    double.add_instance("api", "127.0.0.1", impostor.port)
    sidecar = web()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: sidecar.get("api"), range(60)))
    assert all(body == "api" for status, body in answers if status == 200), answers
    assert sum(status == 200 for status, _ in answers) >= 10, answers
    assert sum(status != 200 for status, _ in answers) >= 10, answers


@pytest.mark.parametrize("uris", [
    pytest.param(("spiffe://{td}/ns/default/dc/dc1/svc/api", "spiffe://{td}/ns/default/dc/dc1/svc/billing"),
                 id="two SPIFFE IDs"),
    pytest.param((), id="no URI"),
])
def test_a_certificate_naming_no_single_service_is_refused_and_never_remembered(double, servers, web, uris):
    trust_domain = double.service_uri("api").split("/")[2]
    server = servers("odd", tuple(uri.format(td=trust_domain) for uri in uris))
    double.add_instance("api", "127.0.0.1", server.port)
    double.add_instance("billing", "127.0.0.1", server.port)
    sidecar = web()
    for upstream in ("api", "billing", "api"):
        status, body = sidecar.get(upstream)
        assert status >= 500 and body != "odd"
    assert hashlib.sha256(server.der()).hexdigest().upper() not in sidecar.remembered()


def test_a_server_sidecar_reloading_under_pooled_load_fails_no_request(double, haproxy, tmp_path, web):
    """Its old worker answers the next request of each pooled connection, with Connection:
    close, rather than closing it under a request on its way (option idle-close-on-response)."""
    app, public = HttpApp(), free_port()
    register_sidecar(double, "api", public, app.port, config={"protocol": "http"})
    double.set_intention("web", "api", "allow")
    assert meshgen_render(double, "api-sidecar-proxy", tmp_path / "api", haproxy) == 3
    server = HAProxy(haproxy, tmp_path / "api" / "haproxy.cfg", tmp_path / "api.log", wait_for_port=public,
                     master_socket=tmp_path / "api.master")
    try:
        wait_passing(double, "api", "api-sidecar-proxy")
        sidecar = web()
        deadline, failures, answered = time.monotonic() + 4, [], []

        def load() -> None:
            while time.monotonic() < deadline:
                try:
                    answered.append(sidecar.get("api", "/x"))
                except (http.client.HTTPException, OSError) as error:
                    failures.append(repr(error))
        with ThreadPoolExecutor(6) as pool:
            for _ in range(6):
                pool.submit(load)
            for _ in range(4):
                time.sleep(0.8)
                server.reload()
        assert failures == []
        assert len(answered) > 100 and set(answered) == {(200, "/x")}, set(answered)
    finally:
        server.stop()
        app.close()
