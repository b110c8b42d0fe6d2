"""HTTP on the public listener as Consul configures Envoy today, proven by traffic through a real
HAProxy (each supported version) with the double as a Consul 1.22 agent: request normalization
by the mesh entry (CVE-2024-10005), decided before the L7 intentions and seen by the app."""
from __future__ import annotations

import hashlib
import http.client
import json
import ssl
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import meshgen
from harness import HAProxy, Identity, _LocalServer, free_port, meshgen_run, register_sidecar


class RequestEchoApp(_LocalServer, ThreadingHTTPServer):
    """The local app: 200 and, as JSON, the path and the headers it was given."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                # The request line's target: self.path has "//" collapsed by http.server.
                body = json.dumps({"path": self.requestline.split(" ")[1], "headers": [[k.lower(), v] for k, v in self.headers.items()]})
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())
            do_POST = do_GET

            def log_message(self, *args):
                pass
        self._serve(Handler)


@dataclass
class Answer:
    status: int | None
    path: str | None = None              # as the app got it; None when the request did not reach it
    headers: list | None = None
    location: str | None = None


@dataclass
class HttpSidecar:
    agent: object                        # the double, or a real agent
    haproxy_binary: str
    proxy_id: str
    port: int
    out: Path
    ids: Path
    haproxy: HAProxy

    def identity(self, service: str) -> Identity:
        return Identity.from_agent(self.agent, self.ids, service)

    def apply(self) -> None:
        """Renders what the double now says; a reload where meshgen asks for one."""
        result = meshgen_run(self.agent, self.proxy_id, self.out, self.haproxy_binary,
                             runtime_socket=self.out / "admin.sock")
        assert result.exit_code in (0, 3), result
        if result.exit_code == 3:
            self.haproxy.reload()

    def ask(self, connection: http.client.HTTPSConnection, path: str, headers: dict | None = None,
            method: str = "GET") -> Answer:
        """One request on a kept-alive connection: the status and what the app was given."""
        try:
            connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            connection.putheader("Host", "web")
            for name, value in (headers or {}).items():
                connection.putheader(name, value)
            connection.endheaders()
            response = connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            connection.close()
            return Answer(None)
        if response.getheader("Connection", "").lower() == "close":
            connection.close()
        if response.status != 200:
            return Answer(response.status, location=response.getheader("Location"))
        seen = json.loads(body)
        return Answer(200, seen["path"], seen["headers"])

    def connection(self, caller: str = "api") -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("127.0.0.1", self.port, context=self.identity(caller).context(),
                                           timeout=5)


def _http_sidecar(double, haproxy: str, tmp_path: Path):
    """`web` (protocol http) in front of RequestEchoApp, under a reloadable HAProxy."""
    app = RequestEchoApp()
    port = free_port()
    proxy_id = register_sidecar(double, "web", port, app.port, {"protocol": "http"})
    out = tmp_path / "out"
    assert meshgen_run(double, proxy_id, out, haproxy).exit_code == 3
    process = HAProxy(haproxy, out / "haproxy.cfg", tmp_path / "haproxy.log", wait_for_port=port,
                      master_socket=tmp_path / "master.sock")
    yield HttpSidecar(double, haproxy, proxy_id, port, out, tmp_path / "ids", process)
    process.stop()
    app.close()


@pytest.fixture
def http_sidecar(double, haproxy, tmp_path):
    """For what HAProxy's own processing decides: on every version."""
    yield from _http_sidecar(double, haproxy, tmp_path)


@pytest.fixture
def one_http_sidecar(double, any_haproxy, tmp_path):
    yield from _http_sidecar(double, any_haproxy, tmp_path)


def mesh_entry(**normalization) -> dict:
    return {"Kind": "mesh", "HTTP": {"Incoming": {"RequestNormalization": normalization}}}


# deny PathPrefix /admin, allow PathPrefix /: the measured bypasses of issue 21.
ADMIN_DENIED = [{"Action": "deny", "HTTP": {"PathPrefix": "/admin"}},
                {"Action": "deny", "HTTP": {"Header": [{"Name": "x_debug", "Present": True}]}},
                {"Action": "allow", "HTTP": {"PathPrefix": "/"}}]


def test_request_normalization_as_the_mesh_entry_says_decides_before_intentions(double, http_sidecar):
    """Consul's defaults (no mesh entry): the path is normalized as RFC 3986 says (Envoy's
    normalize_path, on by default since Consul 1.20.1), slashes are not merged, %2F is kept,
    underscores allowed. Then each mesh entry setting, as Envoy applies it. What the intention
    decides and what the app gets is the normalized request."""
    sidecar = http_sidecar
    double.set_intention("api", "web", "allow", permissions=ADMIN_DENIED)
    sidecar.apply()
    connection = sidecar.connection()

    def outcome(path: str, headers: dict | None = None):
        answer = sidecar.ask(connection, path, headers)
        return (answer.status, answer.path or answer.location)

    defaults = {path: outcome(path) for path in (
        "/./admin", "/%61dmin", "/public/../admin", "/a/%2e%2E/admin", "/../../admin", "/x\\..\\admin",
        "//admin", "/public/./x?q=/../admin", "/%41%3a", "/a%2Fb", "/a%2f..%2fadmin", "/%00")}
    assert defaults == {
        "/./admin": (403, None), "/%61dmin": (403, None), "/public/../admin": (403, None),
        "/a/%2e%2E/admin": (403, None), "/../../admin": (403, None), "/x\\..\\admin": (403, None),
        "//admin": (200, "//admin"),                                # MergeSlashes is off by default
        "/public/./x?q=/../admin": (200, "/public/x?q=/../admin"),  # the query is not the path
        "/%41%3a": (200, "/A%3a"),                                  # unreserved decoded, the rest kept
        "/a%2Fb": (200, "/a%2Fb"), "/a%2f..%2fadmin": (200, "/a%2f..%2fadmin"),   # KEEP_UNCHANGED
        "/%00": (400, None),                                        # an escaped NUL is invalid
    }
    assert outcome("/x", {"x_debug": "1"})[0] == 403                # underscores: ALLOW

    double.set_config(mesh_entry(MergeSlashes=True, PathWithEscapedSlashesAction="REJECT_REQUEST",
                                 HeadersWithUnderscoresAction="DROP_HEADER"))
    sidecar.apply()
    connection = sidecar.connection()
    assert outcome("//admin") == (403, None)
    assert outcome("/a//b///c") == (200, "/a/b/c")
    assert outcome("/a%2Fb") == (400, None)
    assert outcome("/a%5cb") == (400, None)
    answer = sidecar.ask(connection, "/x", {"x_debug": "1", "x-keep": "1"})
    assert answer.status == 200 and ["x-keep", "1"] in answer.headers and \
        not any(name == "x_debug" for name, _ in answer.headers)

    double.set_config(mesh_entry(PathWithEscapedSlashesAction="UNESCAPE_AND_FORWARD",
                                 HeadersWithUnderscoresAction="REJECT_REQUEST"))
    sidecar.apply()
    connection = sidecar.connection()
    assert outcome("/a%2f..%2fadmin") == (403, None)
    assert outcome("/a%2Fb%5Cc") == (200, "/a/b/c")                 # "\" is "/" once unescaped
    assert outcome("/x", {"x_debug": "1"}) == (400, None)
    connection = sidecar.connection()

    double.set_config(mesh_entry(PathWithEscapedSlashesAction="UNESCAPE_AND_REDIRECT"))
    sidecar.apply()
    connection = sidecar.connection()
    assert outcome("/a%2f..%2fadmin?q=1") == (307, "/admin?q=1")
    assert outcome("/a%2Fb") == (307, "/a/b")
    assert outcome("/a/b") == (200, "/a/b")

    double.set_config(mesh_entry(InsecureDisablePathNormalization=True))
    sidecar.apply()
    connection = sidecar.connection()
    assert outcome("/./admin") == (200, "/./admin")                 # as Consul warns: a bypass again
    assert outcome("/%61dmin") == (200, "/%61dmin")
    assert outcome("/admin") == (403, None)

    double.delete_config("mesh", "mesh")
    sidecar.apply()
    connection = sidecar.connection()
    assert outcome("/./admin") == (403, None)


def test_without_a_mesh_entry_consuls_defaults_normalize_the_path(agent, any_haproxy, tmp_path):
    """Consul 1.22 (the double) with no mesh entry answers 404, and Consul 1.8.7 has no such
    entry at all ("invalid config entry kind: mesh"): either way Consul's defaults apply, and the
    app gets the path normalized, slashes not merged."""
    from real_consul import RealAgent
    web = "web" + agent.suffix
    app, port = RequestEchoApp(), free_port()
    proxy_id = register_sidecar(agent, web, port, app.port, {"protocol": "http"})
    out = tmp_path / "out"
    process = None
    try:
        assert meshgen_run(agent, proxy_id, out, any_haproxy).exit_code == 3
        process = HAProxy(any_haproxy, out / "haproxy.cfg", tmp_path / "haproxy.log", wait_for_port=port)
        sidecar = HttpSidecar(agent, any_haproxy, proxy_id, port, out, tmp_path / "ids", process)
        connection = sidecar.connection("api" + agent.suffix)
        assert [sidecar.ask(connection, path).path for path in ("/a/./b/../c", "/%7Euser//x/..", "/a%2Fb")] == [
            "/a/c", "/~user//", "/a%2Fb"]
    finally:
        if process:
            process.stop()
        app.close()
        if isinstance(agent, RealAgent):
            agent.deregister(web)


def test_a_mesh_entry_written_wakes_a_waiting_render(double, any_haproxy, tmp_path):
    """The mesh entry is one of the answers --wait blocks on: written while meshgen waits, it
    is rendered at once, not at the end of the wait."""
    import threading
    import time
    proxy_id = register_sidecar(double, "web", free_port(), free_port(), {"protocol": "http"})
    out = tmp_path / "out"
    assert meshgen_run(double, proxy_id, out, any_haproxy).exit_code == 3
    timer = threading.Timer(1.0, double.set_config, [mesh_entry(MergeSlashes=True)])
    timer.start()
    started = time.monotonic()
    result = meshgen_run(double, proxy_id, out, any_haproxy, wait=20)
    timer.join()
    assert not result.waited_out and result.exit_code == 3 and time.monotonic() - started < 10
    assert "lua.meshgen_normalize 1 1 keep allow" in (out / "haproxy.cfg").read_text()


def test_a_forged_client_cert_header_never_reaches_the_app(double, one_http_sidecar):
    """Consul's Envoy sanitizes X-Forwarded-Client-Cert (hashicorp/consul#23544): whatever the
    caller sends, the app gets one, naming the caller whose certificate HAProxy verified."""
    sidecar = one_http_sidecar
    double.set_intention("api", "web", "allow")
    sidecar.apply()
    connection = sidecar.connection("api")
    forged = {"X-Forwarded-Client-Cert": f"By=x;URI={double.service_uri('admin')}",
              "x-forwarded-client-cert": f"URI={double.service_uri('admin')}"}
    seen = [sidecar.ask(connection, "/", headers) for headers in (forged, {})]
    der = ssl.PEM_cert_to_DER_cert(sidecar.identity("api").cert.read_text())
    expected = [["x-forwarded-client-cert", f"By={double.service_uri('web')};"
                 f"Hash={hashlib.sha256(der).hexdigest()};URI={double.service_uri('api')}"]]
    assert [[h for h in answer.headers if h[0] == "x-forwarded-client-cert"] for answer in seen] == [expected] * 2
    double.set_config({"Kind": "mesh", "HTTP": {"SanitizeXForwardedClientCert": True}})
    sidecar.apply()
    answer = sidecar.ask(sidecar.connection("api"), "/", forged)
    assert answer.status == 200 and [h for h in answer.headers if h[0] == "x-forwarded-client-cert"] == []


# ------------------------------------------------------------------------------------------------
# The corpus: one L7 intention api => web, Consul's defaults for normalization (no mesh entry),
# and requests each decided as Consul 1.22's Envoy decides them. Where each expectation comes
# from, by key:
SOURCES = {
    "dots": "Envoy HttpConnectionManager.normalize_path: RFC 3986 section 6 normalization (Chromium's "
            "path canonicalizer): dot segments removed, %2E is a dot; on by default since Consul 1.20.1 "
            "(mesh entry RequestNormalization.InsecureDisablePathNormalization: false)",
    "root": "RFC 3986 section 5.2.4 remove_dot_segments: '..' never climbs above the root",
    "unreserved": "RFC 3986 section 6.2.2.2: percent-encoded unreserved characters are decoded; others "
                  "keep their escape (Envoy normalize_path)",
    "nul": "Envoy normalize_path: a path the canonicalizer rejects (an escaped NUL) is answered 400",
    "backslash": "Envoy normalize_path (Chromium's canonicalizer treats '\\' as '/')",
    "slashes": "Consul mesh entry docs: MergeSlashes defaults to false (Envoy merge_slashes)",
    "escaped": "Consul mesh entry docs: PathWithEscapedSlashesAction defaults to IMPLEMENTATION_SPECIFIC_DEFAULT, "
               "which Envoy documents as KEEP_UNCHANGED: %2F and %5C are not separators",
    "prefix": "Consul service-intentions docs: PathPrefix matches the beginning of the path, case-sensitively "
              "(Envoy RBAC url_path prefix)",
    "exact": "Consul service-intentions docs: PathExact matches the whole path (Envoy RBAC url_path exact)",
    "query": "Envoy RBAC url_path: the query string is not part of the path",
    "regex": "Consul service-intentions docs: PathRegex is RE2 and matches the whole path (Envoy safe_regex)",
    "contains": "Consul service-intentions docs: Header.Contains matches a part of the value (Envoy "
                "StringMatcher.contains, Consul 1.20.1+)",
    "ignore_case": "Consul service-intentions docs: Header.IgnoreCase; Envoy StringMatcher.ignore_case "
                   "compares ASCII letters in either case",
    "case": "Envoy StringMatcher: without ignore_case a match is case-sensitive",
    "header_name": "RFC 9110 section 5.1: field names are case-insensitive (Envoy lower-cases them)",
    "ows": "RFC 9110 section 5.5: whitespace around a field value is not part of it",
    "first": "Consul service-intentions docs: Permissions are evaluated in order, the first match decides",
}

CORPUS_PERMISSIONS = [
    {"Action": "deny", "HTTP": {"PathPrefix": "/admin"}},                                             # 1
    {"Action": "deny", "HTTP": {"PathExact": "/secret"}},                                             # 2
    {"Action": "deny", "HTTP": {"Header": [{"Name": "x-env", "Contains": "prod", "IgnoreCase": True}]}},  # 3
    {"Action": "deny", "HTTP": {"Header": [{"Name": "x-role", "Exact": "Admin", "IgnoreCase": True}]}},  # 4
    {"Action": "deny", "HTTP": {"Header": [{"Name": "x-team", "Prefix": "ops-"}]}},                   # 5
    {"Action": "deny", "HTTP": {"Header": [{"Name": "x-tag", "Suffix": "-Debug", "IgnoreCase": True}]}},  # 6
    {"Action": "deny", "HTTP": {"Header": [{"Name": "x-flag", "Contains": "Beta"}]}},                 # 7
    {"Action": "deny", "HTTP": {"PathRegex": "/api/v[0-9]+/internal/.*"}},                            # 8
    {"Action": "allow", "HTTP": {"PathPrefix": "/"}},                                                 # 9
]

# (path, headers, status, the path the app gets (200 only; None: as sent), source key)
CORPUS = [
    ("/admin", {}, 403, None, "prefix"),
    ("/admin/x", {}, 403, None, "prefix"),
    ("/administrator", {}, 403, None, "prefix"),
    ("/ADMIN", {}, 200, None, "case"),
    ("/./admin", {}, 403, None, "dots"),
    ("/%61dmin", {}, 403, None, "unreserved"),
    ("/%61%64%6D%69%6e", {}, 403, None, "unreserved"),
    ("/adm%69n/x", {}, 403, None, "unreserved"),
    ("/%41dmin", {}, 200, "/Admin", "unreserved"),
    ("/public/../admin", {}, 403, None, "dots"),
    ("/a/b/../../admin", {}, 403, None, "dots"),
    ("/../admin", {}, 403, None, "root"),
    ("/../../../admin/x", {}, 403, None, "root"),
    ("/%2e/admin", {}, 403, None, "dots"),
    ("/%2E%2E/admin", {}, 403, None, "dots"),
    ("/x/%2e%2e/admin", {}, 403, None, "dots"),
    ("/x/.%2E/admin", {}, 403, None, "dots"),
    ("/admin/..", {}, 200, "/", "dots"),
    ("/admin/%2e%2e", {}, 200, "/", "dots"),
    ("/public/./x", {}, 200, "/public/x", "dots"),
    ("/public/.", {}, 200, "/public/", "dots"),
    ("//admin", {}, 200, "//admin", "slashes"),
    ("/x//admin", {}, 200, "/x//admin", "slashes"),
    ("/x%2f..%2fadmin", {}, 200, "/x%2f..%2fadmin", "escaped"),
    ("/x%2F..%2Fadmin", {}, 200, "/x%2F..%2Fadmin", "escaped"),
    ("/%5cadmin", {}, 200, "/%5cadmin", "escaped"),
    ("/admin%2fx", {}, 403, None, "prefix"),
    ("/x\\..\\admin", {}, 403, None, "backslash"),
    ("/admin\\x", {}, 403, None, "backslash"),
    ("/%00", {}, 400, None, "nul"),
    ("/%zz/admin", {}, 200, "/%zz/admin", "unreserved"),
    ("/%7Euser/%3a", {}, 200, "/~user/%3a", "unreserved"),
    ("/secret", {}, 403, None, "exact"),
    ("/secret/", {}, 200, None, "exact"),
    ("/secrets", {}, 200, None, "exact"),
    ("/./secret", {}, 403, None, "dots"),
    ("/secret/.", {}, 200, "/secret/", "dots"),
    ("/x/../secret", {}, 403, None, "dots"),
    ("/sec%72et", {}, 403, None, "unreserved"),
    ("/secret?x=1", {}, 403, None, "query"),
    ("/public?next=/admin", {}, 200, None, "query"),
    ("/public?p=/./x", {}, 200, None, "query"),
    ("/api/v1/internal/x", {}, 403, None, "regex"),
    ("/api/v12/internal/", {}, 403, None, "regex"),
    ("/api/v1/./internal/x", {}, 403, None, "dots"),
    ("/api/V1/internal/x", {}, 200, None, "regex"),
    ("/api/v1/internal", {}, 200, None, "regex"),
    ("/v2/api/v1/internal/x", {}, 200, None, "regex"),
    ("/x", {"x-env": "prod"}, 403, None, "contains"),
    ("/x", {"x-env": "PRODUCTION"}, 403, None, "ignore_case"),
    ("/x", {"x-env": "my-Prod-1"}, 403, None, "ignore_case"),
    ("/x", {"X-ENV": "pRoD"}, 403, None, "header_name"),
    ("/x", {"x-env": "pr od"}, 200, None, "contains"),
    ("/x", {"x-env": "staging"}, 200, None, "contains"),
    ("/x", {"x-role": "admin"}, 403, None, "ignore_case"),
    ("/x", {"x-role": "ADMIN"}, 403, None, "ignore_case"),
    ("/x", {"X-Role": "Admin"}, 403, None, "header_name"),
    ("/x", {"x-role": "  admin  "}, 403, None, "ows"),
    ("/x", {"x-role": "\tadmin"}, 403, None, "ows"),
    ("/x", {"x-role": "admins"}, 200, None, "exact"),
    ("/x", {"x-role": "ad min"}, 200, None, "exact"),
    ("/x", {"x-team": "ops-1"}, 403, None, "prefix"),
    ("/x", {"x-team": "OPS-1"}, 200, None, "case"),
    ("/x", {"x-team": "ops"}, 200, None, "prefix"),
    ("/x", {"x-team": "dev-ops-1"}, 200, None, "prefix"),
    ("/x", {"x-tag": "build-debug"}, 403, None, "ignore_case"),
    ("/x", {"x-tag": "BUILD-DEBUG"}, 403, None, "ignore_case"),
    ("/x", {"x-tag": "-Debug"}, 403, None, "ignore_case"),
    ("/x", {"x-tag": "debug"}, 200, None, "ignore_case"),
    ("/x", {"x-tag": "build-debugx"}, 200, None, "ignore_case"),
    ("/x", {"x-flag": "isBetaUser"}, 403, None, "contains"),
    ("/x", {"x-flag": "Beta"}, 403, None, "contains"),
    ("/x", {"x-flag": "isbetauser"}, 200, None, "case"),
    ("/x", {"x-flag": "Bet"}, 200, None, "contains"),
    ("/admin", {"x-role": "user"}, 403, None, "first"),
    ("/x", {"x-env": "prod", "x-team": "dev"}, 403, None, "first"),
    ("/other", {}, 200, None, "prefix"),
]


def test_a_corpus_of_requests_is_decided_as_consuls_envoy_decides_it(double, http_sidecar):
    assert len(CORPUS) >= 60 and all(source in SOURCES for *_, source in CORPUS)
    sidecar = http_sidecar
    double.set_intention("api", "web", "allow", permissions=CORPUS_PERMISSIONS)
    sidecar.apply()
    connection = sidecar.connection()
    wrong = []
    for path, headers, status, app_path, source in CORPUS:
        answer = sidecar.ask(connection, path, headers)
        got = (answer.status, answer.path if answer.status == 200 else None)
        want = (status, (app_path or path) if status == 200 else None)
        if got != want:
            wrong.append((path, headers, want, got, SOURCES[source]))
    assert wrong == []


class TLSVersionServer:
    """An instance of `service` elsewhere in the mesh: mutual TLS with its leaf, echoes a line,
    and remembers the TLS version of each connection."""

    def __init__(self, agent, directory: Path, service: str):
        import socket
        import threading
        identity = Identity.from_agent(agent, directory, service)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(identity.cert), str(identity.key))
        self.context.load_verify_locations(str(identity.roots))
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.versions: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(raw, server_side=True) as conn:
                    conn.settimeout(5)
                    self.versions.append(conn.version())
                    conn.sendall(conn.recv(4096))
            except (OSError, ssl.SSLError):
                pass

    def close(self) -> None:
        self.listener.close()


def handshake(port: int, context: ssl.SSLContext) -> str | None:
    """The TLS version the public listener agreed to, or None when the handshake failed."""
    import socket
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with context.wrap_socket(raw) as conn:
                return conn.version()
    except (OSError, ssl.SSLError):
        return None


def test_the_mesh_entrys_tls_versions_hold_on_the_public_listener_and_upstreams(double, haproxy, tmp_path):
    """TLS.Incoming on the public listener, TLS.Outgoing on every upstream connection: with
    TLSMinVersion TLSv1_3 a TLS 1.2 client fails the handshake and upstreams are dialed with 1.3;
    with TLSMaxVersion TLSv1_2 and one cipher suite, the listener takes no other suite."""
    from harness import EchoServer, talk
    api = TLSVersionServer(double, tmp_path / "api", "api")
    double.add_instance("api", "127.0.0.1", api.port)
    app, port, upstream = EchoServer(), free_port(), free_port()
    proxy_id = register_sidecar(double, "web", port, app.port,
                                upstreams=[{"destination_name": "api", "local_bind_port": upstream}])
    out = tmp_path / "out"
    assert meshgen_run(double, proxy_id, out, haproxy).exit_code == 3
    process = HAProxy(haproxy, out / "haproxy.cfg", tmp_path / "haproxy.log", wait_for_port=port,
                      master_socket=tmp_path / "master.sock")
    sidecar = HttpSidecar(double, haproxy, proxy_id, port, out, tmp_path / "ids", process)
    try:
        def client(maximum=ssl.TLSVersion.MAXIMUM_SUPPORTED, ciphers: str | None = None) -> ssl.SSLContext:
            context = sidecar.identity("api").context()
            context.maximum_version = maximum
            if ciphers:
                context.set_ciphers(ciphers)
            return context
        # HAProxy's own defaults: TLS 1.2 and up on both sides.
        assert (handshake(port, client(ssl.TLSVersion.TLSv1_2)), handshake(port, client())) == ("TLSv1.2", "TLSv1.3")
        assert talk(upstream, None) == b"ping\n" and api.versions[-1] == "TLSv1.3"

        double.set_config({"Kind": "mesh", "TLS": {"Incoming": {"TLSMinVersion": "TLSv1_3"},
                                                   "Outgoing": {"TLSMinVersion": "TLSv1_3"}}})
        sidecar.apply()
        assert (handshake(port, client(ssl.TLSVersion.TLSv1_2)), handshake(port, client())) == (None, "TLSv1.3")
        assert talk(upstream, None) == b"ping\n" and api.versions[-1] == "TLSv1.3"

        double.set_config({"Kind": "mesh", "TLS": {
            "Incoming": {"TLSMaxVersion": "TLSv1_2", "CipherSuites": ["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"]},
            "Outgoing": {"TLSMaxVersion": "TLSv1_2"}}})
        sidecar.apply()
        assert handshake(port, client()) == "TLSv1.2"
        assert handshake(port, client(ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES256-GCM-SHA384")) is None
        assert handshake(port, client(ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-GCM-SHA256")) == "TLSv1.2"
        assert talk(upstream, None) == b"ping\n" and api.versions[-1] == "TLSv1.2"
    finally:
        process.stop()
        app.close()
        api.close()


def test_with_the_mesh_entry_unreadable_the_last_one_seen_stays_in_force(double, any_haproxy, tmp_path):
    """Fail static: the agent does not cache config entries, so with its servers out of reach it
    answers 500 (Consul 1.8.7 too, for a kind it does not know: the check is the servers'). The
    settings the last run saw stay; a first run cannot know them and fails."""
    proxy_id = register_sidecar(double, "web", free_port(), free_port(), {"protocol": "http"})
    out = tmp_path / "out"
    double.inject("/v1/config/mesh/mesh", status=500, body="No cluster leader")
    with pytest.raises(meshgen.MeshgenError, match="no earlier run saw the mesh config entry"):
        meshgen_run(double, proxy_id, out, any_haproxy)
    double.clear_faults()
    double.set_config(mesh_entry(MergeSlashes=True))
    assert meshgen_run(double, proxy_id, out, any_haproxy).exit_code == 3
    double.inject("/v1/config/mesh/mesh", status=500, body="No cluster leader")
    result = meshgen_run(double, proxy_id, out, any_haproxy)
    assert result.exit_code == 0 and any("the last one seen stays in force" in note for note in result.notes)
    assert "lua.meshgen_normalize 1 1 keep allow" in (out / "haproxy.cfg").read_text()


def test_an_exposed_path_gives_the_app_no_caller_identity(double, any_haproxy, tmp_path):
    """Exposed paths (health checks) take plain HTTP from anyone: nothing there proves who calls,
    so a caller-written X-Forwarded-Client-Cert must not reach the app either."""
    app, port, exposed = RequestEchoApp(), free_port(), free_port()
    double.register({"service": {"name": "web", "port": app.port, "address": "127.0.0.1", "connect": {
        "sidecar_service": {"port": port, "proxy": {"config": {"protocol": "http"}, "expose": {"paths": [
            {"path": "/health", "local_path_port": app.port, "listener_port": exposed}]}}}}}})
    out = tmp_path / "out"
    assert meshgen_run(double, "web-sidecar-proxy", out, any_haproxy).exit_code == 3
    process = HAProxy(any_haproxy, out / "haproxy.cfg", tmp_path / "haproxy.log", wait_for_port=exposed)
    try:
        connection = http.client.HTTPConnection("127.0.0.1", exposed, timeout=5)
        connection.request("GET", "/health", headers={"X-Forwarded-Client-Cert": f"URI={double.service_uri('admin')}"})
        response = connection.getresponse()
        seen = json.loads(response.read())
    finally:
        process.stop()
        app.close()
    assert response.status == 200 and seen["path"] == "/health"
    assert [h for h in seen["headers"] if h[0].lower() == "x-forwarded-client-cert"] == []
