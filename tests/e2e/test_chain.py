"""Upstreams through Consul's discovery chain, proven by where requests land: config entries
written through the agent's /v1/config, HAProxy on the rendered bundle, and small HTTPS apps
(each a sidecar of some service, holding that service's leaf) that answer with who they are and
the path they were asked for. On the double and on a real Consul 1.8.7 agent."""
from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from harness import (DoubleAgent, EchoServer, HAProxy, Identity, agent_env, free_port, meshgen_run, register_sidecar, run_meshgen,
                     wait_listening)
from real_consul import RealAgent


class MeshApp(ThreadingHTTPServer):
    """An instance of `service` elsewhere in the mesh: mutual TLS with a leaf of `service` from
    the agent; answers every request with `<tag> <path>`: /slow after 3 s, /fail-N-... with
    503 the first N times it is asked for."""
    daemon_threads = True

    def __init__(self, agent, directory: Path, service: str, tag: str):
        identity = Identity.from_agent(agent, directory / tag, service)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(identity.cert), str(identity.key))
        context.load_verify_locations(str(identity.roots))
        context.verify_mode = ssl.CERT_REQUIRED

        asked: dict[str, int] = {}

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True      # headers and body go in two writes

            def do_GET(self):
                if self.path.startswith("/slow"):
                    time.sleep(3)
                asked[self.path] = asked.get(self.path, 0) + 1
                failing = self.path.startswith("/fail-") and asked[self.path] <= int(self.path.split("-")[1])
                body = f"{tag} {self.path}".encode()
                self.send_response(503 if failing else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            do_POST = do_GET

            def log_message(self, *args):
                pass
        super().__init__(("127.0.0.1", 0), Handler)
        self.socket = context.wrap_socket(self.socket, server_side=True)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def handle_error(self, request, client_address):
        pass

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class Blackhole:
    """A port whose connections never complete: its accept queue is full, so the kernel drops
    further SYNs and a connect waits until its timeout."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=0)
        self.port = self.listener.getsockname()[1]
        self.fillers = []
        for _ in range(4):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(sock)
        time.sleep(0.2)

    def close(self) -> None:
        for sock in self.fillers:
            sock.close()
        self.listener.close()


class ChainMesh:
    """The sidecar of `web` with one upstream, `api`, whose protocol comes from the chain; the
    instances of api and of other services, on either agent; config entries written as an
    operator writes them."""

    def __init__(self, agent, haproxy: str, tmp: Path):
        self.agent, self.binary, self.tmp = agent, haproxy, tmp
        self.suffix = getattr(agent, "suffix", "")
        self.real = isinstance(agent, RealAgent)
        self.web, self.api = self.name("web"), self.name("api")
        self.out, self.apps, self.instances, self.entries = tmp / "out", [], [], []
        self.app = EchoServer()
        self.port, self.upstream_port = free_port(), free_port()
        register_sidecar(agent, self.web, self.port, self.app.port, upstreams=[
            {"destination_name": self.api, "local_bind_port": self.upstream_port}])
        self.haproxy, self.reloads = None, 0

    def name(self, service: str) -> str:
        return service + self.suffix

    def config(self, entry: dict) -> None:
        self.agent.set_config(entry)
        self.entries.append((entry["Kind"], entry["Name"]))

    def http(self, *services: str) -> None:
        for service in services:
            self.config({"Kind": "service-defaults", "Name": service, "Protocol": "http"})

    def instance(self, service: str, tag: str, version: str | None = None, port: int | None = None) -> str:
        """A passing instance of `service`: an app answering as `tag`, or a port of the test's."""
        if port is None:
            app = MeshApp(self.agent, self.tmp / "apps", service, tag)
            self.apps.append(app)
            port = app.port
        sid = f"{tag}{self.suffix}-sidecar-proxy"
        meta = {"version": version} if version else {}
        if self.real:
            self.agent.register({"Kind": "connect-proxy", "ID": sid, "Name": f"{service}-sidecar-proxy",
                                 "Address": "127.0.0.1", "Port": port, "Meta": meta,
                                 "Proxy": {"DestinationServiceName": service},
                                 "Check": {"CheckID": f"{sid}-ttl", "TTL": "10m", "Status": "passing"}})
        else:
            self.agent.add_instance(service, "127.0.0.1", port, service_id=sid, meta=meta)
        self.instances.append((service, sid))
        return sid

    def set_health(self, service: str, sid: str, status: str) -> None:
        if self.real:
            self.agent.call("PUT", f"/v1/agent/check/{'pass' if status == 'passing' else 'fail'}/{sid}-ttl")
        else:
            self.agent.set_status(service, sid, status)

    def render(self):
        """One run as start.sh makes it: live through the runtime API, else a reload."""
        result = meshgen_run(self.agent, f"{self.web}-sidecar-proxy", self.out, self.binary,
                             runtime_socket=self.out / "admin.sock" if self.haproxy else None)
        assert result.exit_code in (0, 3), result
        if self.haproxy is None:
            self.haproxy = HAProxy(self.binary, self.out / "haproxy.cfg", self.tmp / "haproxy.log",
                                   wait_for_port=self.upstream_port, master_socket=self.tmp / "master.sock")
        elif result.exit_code == 3:
            self.reloads += 1
            self.haproxy.reload()
        return result

    def render_until(self, done, timeout: float = 20.0) -> None:
        """Render until `done()` holds: the real agent's health and config caches take a moment."""
        deadline = time.monotonic() + timeout
        while True:
            self.render()
            if done():
                return
            assert time.monotonic() < deadline, f"not reached in {timeout} s: {self.get('/')}"
            time.sleep(0.3)

    def get(self, path: str = "/", headers: dict | None = None, connection=None) -> tuple[int, str]:
        """One request through the upstream listener: the status and the body (who answered, and
        the path they were asked for)."""
        conn = connection or http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=10)
        try:
            conn.request("GET", path, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            if connection is None:
                conn.close()

    def landed(self, path: str = "/", **kwargs) -> str:
        status, body = self.get(path, **kwargs)
        return body.split()[0] if status == 200 else str(status)

    def close(self) -> None:
        if self.haproxy:
            self.haproxy.stop()
        for app in self.apps:
            app.close()
        self.app.close()
        if self.real:
            for service, sid in self.instances:
                self.agent.deregister(sid)
            for kind in ("service-router", "service-splitter", "service-resolver", "service-defaults"):
                for entry_kind, name in set(self.entries):
                    if entry_kind == kind:
                        self.agent.delete_config(kind, name)
            self.agent.deregister(self.web)


@pytest.fixture
def mesh(agent, any_haproxy, tmp_path):
    built = ChainMesh(agent, any_haproxy, tmp_path)
    yield built
    built.close()


@pytest.fixture
def mesh_on_each_haproxy(agent, haproxy, tmp_path):
    """For what HAProxy's own rules do (routing, rewriting, L7 retries): on every version."""
    built = ChainMesh(agent, haproxy, tmp_path)
    yield built
    built.close()


def test_a_canary_split_holds_its_weights(mesh):
    """service-splitter 90/10 across two subsets: over 2000 requests, within 5 points."""
    api = mesh.api
    mesh.http(api)
    mesh.config({"Kind": "service-resolver", "Name": api, "Subsets": {
        "v1": {"Filter": "Service.Meta.version == v1"}, "v2": {"Filter": "Service.Meta.version == v2"}}})
    mesh.config({"Kind": "service-splitter", "Name": api, "Splits": [
        {"Weight": 90, "ServiceSubset": "v1"}, {"Weight": 10, "ServiceSubset": "v2"}]})
    mesh.instance(api, "api-v1", "v1")
    mesh.instance(api, "api-v2", "v2")
    mesh.render_until(lambda: {mesh.landed() for _ in range(60)} == {"api-v1", "api-v2"})
    connection = http.client.HTTPConnection("127.0.0.1", mesh.upstream_port, timeout=10)
    landed = [mesh.landed(connection=connection) for _ in range(2000)]
    assert set(landed) == {"api-v1", "api-v2"}
    assert abs(landed.count("api-v2") / 2000 - 0.10) < 0.05, landed.count("api-v2")


def test_routes_send_by_path_header_and_query_and_rewrite_the_prefix(mesh_on_each_haproxy):
    """service-router: /admin/ to another service with its prefix rewritten; a header and a query
    parameter each to the v2 subset; everything else to the default subset, v1."""
    mesh = mesh_on_each_haproxy
    api, admin = mesh.api, mesh.name("admin")
    mesh.http(api, admin)
    mesh.config({"Kind": "service-resolver", "Name": api, "DefaultSubset": "v1", "Subsets": {
        "v1": {"Filter": "Service.Meta.version == v1"}, "v2": {"Filter": "Service.Meta.version == v2"}}})
    mesh.config({"Kind": "service-router", "Name": api, "Routes": [
        {"Match": {"HTTP": {"PathPrefix": "/admin/"}}, "Destination": {"Service": admin, "PrefixRewrite": "/"}},
        {"Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "yes"}]}}, "Destination": {"ServiceSubset": "v2"}},
        {"Match": {"HTTP": {"QueryParam": [{"Name": "version", "Exact": "2"}]}}, "Destination": {"ServiceSubset": "v2"}},
    ]})
    mesh.instance(api, "api-v1", "v1")
    mesh.instance(api, "api-v2", "v2")
    mesh.instance(admin, "admin-1")
    mesh.render_until(lambda: mesh.landed("/admin/x") == "admin-1")
    assert mesh.get("/admin/users?id=7") == (200, "admin-1 /users?id=7")     # the prefix rewritten
    assert mesh.get("/administrator") == (200, "api-v1 /administrator")      # not under /admin/
    assert mesh.landed("/", headers={"x-canary": "yes"}) == "api-v2"
    assert mesh.landed("/", headers={"x-canary": "no"}) == "api-v1"
    assert mesh.landed("/?version=2") == "api-v2"
    assert mesh.landed("/?version=20") == "api-v1"
    assert {mesh.landed("/") for _ in range(50)} == {"api-v1"}


@pytest.fixture
def double_mesh_on_each_haproxy(haproxy, tmp_path):
    """For HAProxy's reading of route values: every version, on the double alone, since the
    agent only passes the values through."""
    double = DoubleAgent().start()
    double.suffix = ""
    built = ChainMesh(double, haproxy, tmp_path)
    yield built
    built.close()
    double.stop()


def test_route_values_that_look_like_haproxy_syntax_route_exactly_their_requests(double_mesh_on_each_haproxy):
    """Header and query values HAProxy's ACL parser would read as flags, as the end of an inline
    ACL, or as two words, and a path prefix after "/" of the same kind: each sends exactly the
    requests carrying it to v2."""
    mesh = double_mesh_on_each_haproxy
    api = mesh.api
    mesh.http(api)
    mesh.config({"Kind": "service-resolver", "Name": api, "DefaultSubset": "v1", "Subsets": {
        "v1": {"Filter": "Service.Meta.version == v1"}, "v2": {"Filter": "Service.Meta.version == v2"}}})
    to_v2 = {"Destination": {"ServiceSubset": "v2"}}
    mesh.config({"Kind": "service-router", "Name": api, "Routes": [
        *({"Match": {"HTTP": {"Header": [{"Name": "x-env", "Exact": value}]}}, **to_v2} for value in ("-i", "}", "a b")),
        *({"Match": {"HTTP": {"QueryParam": [{"Name": "q", "Exact": value}]}}, **to_v2} for value in ("-i", "-beta", "}", "--")),
        {"Match": {"HTTP": {"PathPrefix": "/-m"}}, **to_v2},
        {"Match": {"HTTP": {"PathExact": "/}"}}, **to_v2},
    ]})
    mesh.instance(api, "api-v1", "v1")
    mesh.instance(api, "api-v2", "v2")
    mesh.render_until(lambda: mesh.landed("/", headers={"x-env": "-i"}) == "api-v2")
    to = {("/", "-i"): "api-v2", ("/", "}"): "api-v2", ("/", "a b"): "api-v2", ("/", "-I"): "api-v1",
          ("/", "a"): "api-v1", ("/", "}}"): "api-v1", ("/", None): "api-v1",
          ("/?q=-i", None): "api-v2", ("/?q=-beta", None): "api-v2", ("/?q=}", None): "api-v2",
          ("/?q=--", None): "api-v2", ("/?q=-", None): "api-v1", ("/?q=i", None): "api-v1",
          ("/?q=-betax", None): "api-v1", ("/-m/x", None): "api-v2", ("/m", None): "api-v1",
          ("/}", None): "api-v2", ("/}x", None): "api-v1"}
    landed = {(path, env): mesh.landed(path, headers={"x-env": env} if env is not None else None)
              for path, env in to}
    assert landed == to


def test_case_insensitive_routes_match_paths_in_either_case_but_not_regexes(double_mesh_on_each_haproxy):
    """Match.HTTP.CaseInsensitive: Consul sets Envoy's case_sensitive false, which applies to
    PathPrefix and PathExact and not to PathRegex; the prefix is rewritten whatever its case."""
    mesh = double_mesh_on_each_haproxy
    api, admin = mesh.api, mesh.name("admin")
    mesh.http(api, admin)
    mesh.config({"Kind": "service-resolver", "Name": api, "DefaultSubset": "v1", "Subsets": {
        "v1": {"Filter": "Service.Meta.version == v1"}, "v2": {"Filter": "Service.Meta.version == v2"}}})
    mesh.config({"Kind": "service-router", "Name": api, "Routes": [
        {"Match": {"HTTP": {"PathPrefix": "/Admin/", "CaseInsensitive": True}},
         "Destination": {"Service": admin, "PrefixRewrite": "/"}},
        {"Match": {"HTTP": {"PathExact": "/Health", "CaseInsensitive": True}}, "Destination": {"ServiceSubset": "v2"}},
        {"Match": {"HTTP": {"PathRegex": "/Api/[0-9]+", "CaseInsensitive": True}}, "Destination": {"ServiceSubset": "v2"}},
        {"Match": {"HTTP": {"PathPrefix": "/Docs"}}, "Destination": {"ServiceSubset": "v2"}},
    ]})
    mesh.instance(api, "api-v1", "v1")
    mesh.instance(api, "api-v2", "v2")
    mesh.instance(admin, "admin-1")
    mesh.render_until(lambda: mesh.landed("/admin/x") == "admin-1")
    assert [mesh.get(path) for path in ("/ADMIN/Users", "/aDmIn/x?y=Z")] == [
        (200, "admin-1 /Users"), (200, "admin-1 /x?y=Z")]
    landed = {path: mesh.landed(path) for path in (
        "/health", "/HEALTH", "/Health", "/health/", "/Api/1", "/api/1", "/Docs/x", "/docs/x")}
    assert landed == {"/health": "api-v2", "/HEALTH": "api-v2", "/Health": "api-v2", "/health/": "api-v1",
                      "/Api/1": "api-v2", "/api/1": "api-v1", "/Docs/x": "api-v2", "/docs/x": "api-v1"}


@pytest.fixture
def double_mesh(any_haproxy, tmp_path):
    """For what Consul 1.8.7 has not: a resolver's LoadBalancer is Consul 1.9+."""
    double = DoubleAgent().start()
    double.suffix = ""
    built = ChainMesh(double, any_haproxy, tmp_path)
    yield built
    built.close()
    double.stop()


def test_a_resolvers_load_balancer_policy_decides_where_requests_land(double_mesh):
    """Consul compiles LoadBalancer onto the chain node: least_request sends a request away from
    an instance busy with a slow one; random does not alternate as round robin does; ring_hash
    and maglev keep what their hash policy names on one instance."""
    mesh = double_mesh
    api = mesh.api
    mesh.http(api)
    mesh.instance(api, "api-1")
    mesh.instance(api, "api-2")
    mesh.config({"Kind": "service-resolver", "Name": api, "LoadBalancer": {"Policy": "least_request"}})
    mesh.render_until(lambda: "balance leastconn" in (mesh.out / "haproxy.cfg").read_text())
    slow = threading.Thread(target=mesh.get, args=("/slow",))
    slow.start()
    time.sleep(0.5)
    quick = []
    for i in range(6):                             # only those that landed while it was busy
        landed = mesh.landed(f"/quick-{i}")
        if slow.is_alive():
            quick.append(landed)
        time.sleep(0.1)         # HAProxy counts a request until its stream ends, just after the answer
    slow.join()
    assert len(quick) >= 2 and len(set(quick)) == 1, quick   # round robin: half to the busy one

    mesh.config({"Kind": "service-resolver", "Name": api, "LoadBalancer": {"Policy": "random"}})
    mesh.render_until(lambda: "balance random(1)" in (mesh.out / "haproxy.cfg").read_text())
    connection = http.client.HTTPConnection("127.0.0.1", mesh.upstream_port, timeout=10)
    landed = [mesh.landed(connection=connection) for _ in range(200)]
    assert set(landed) == {"api-1", "api-2"}
    assert any(a == b for a, b in zip(landed, landed[1:]))   # round robin strictly alternates
    mesh.instance(api, "api-3")                 # a server added through the runtime API, or a reload
    mesh.render_until(lambda: "api-3" in {mesh.landed() for _ in range(30)})

    # ring_hash on a header: each user always to the same instance; users spread over them.
    mesh.config({"Kind": "service-resolver", "Name": api, "LoadBalancer": {
        "Policy": "ring_hash", "HashPolicies": [{"Field": "header", "FieldValue": "x-user"}]}})
    mesh.render_until(lambda: "hash-type consistent" in (mesh.out / "haproxy.cfg").read_text())
    connection = http.client.HTTPConnection("127.0.0.1", mesh.upstream_port, timeout=10)   # the reload closed the last
    by_user = {user: {mesh.landed(headers={"x-user": user}, connection=connection) for _ in range(5)}
               for user in (f"user-{i}" for i in range(20))}
    assert all(len(landed) == 1 for landed in by_user.values()), by_user
    assert len(set().union(*by_user.values())) > 1, by_user
    # maglev on the source address: every request of this one client to one instance.
    mesh.config({"Kind": "service-resolver", "Name": api, "LoadBalancer": {
        "Policy": "maglev", "HashPolicies": [{"SourceIP": True}]}})
    mesh.render_until(lambda: "balance source" in (mesh.out / "haproxy.cfg").read_text())
    assert len({mesh.landed() for _ in range(30)}) == 1


def test_a_subset_filter_keeps_other_versions_out(mesh):
    api = mesh.api
    mesh.http(api)
    mesh.config({"Kind": "service-resolver", "Name": api, "DefaultSubset": "v1", "Subsets": {
        "v1": {"Filter": "Service.Meta.version == v1"}}})
    mesh.instance(api, "api-v1", "v1")
    mesh.instance(api, "api-v2", "v2")
    mesh.render_until(lambda: mesh.landed() == "api-v1")
    assert {mesh.landed() for _ in range(200)} == {"api-v1"}
    config = (mesh.out / "haproxy.cfg").read_text()
    assert f":{mesh.apps[0].port} " in config and f":{mesh.apps[1].port} " not in config


def test_failover_while_the_primary_has_no_healthy_instance_and_back(mesh):
    """The resolver's failover target takes the requests while every instance of the primary is
    critical, and gives them back once one passes again: live, with no reload."""
    api, backup = mesh.api, mesh.name("api-backup")
    mesh.http(api, backup)
    mesh.config({"Kind": "service-resolver", "Name": api, "Failover": {"*": {"Service": backup}}})
    primaries = [mesh.instance(api, f"api-{n}") for n in (1, 2)]
    mesh.instance(backup, "backup-1")
    mesh.render_until(lambda: mesh.landed() in ("api-1", "api-2"))
    for sid in primaries:
        mesh.set_health(api, sid, "critical")
    mesh.render_until(lambda: mesh.landed() == "backup-1")
    assert {mesh.landed() for _ in range(50)} == {"backup-1"}
    shown = run_meshgen("show", "--sidecar-for", mesh.web, "--json", env=agent_env(mesh.agent))
    backend, = json.loads(shown.stdout)["upstreams"][0]["backends"]
    assert (backend["targets"], backend["serving"]) == ([f"{api}.default.dc1", f"{backup}.default.dc1"],
                                                        f"{backup}.default.dc1")
    mesh.set_health(api, primaries[0], "passing")
    mesh.render_until(lambda: mesh.landed() == "api-1")
    assert {mesh.landed() for _ in range(50)} == {"api-1"}
    assert mesh.reloads == 0


def test_a_redirect_sends_the_upstream_to_another_service(mesh):
    api, other = mesh.api, mesh.name("api-next")
    mesh.http(api, other)
    mesh.instance(api, "api-1")
    mesh.instance(other, "next-1")
    mesh.render_until(lambda: mesh.landed() == "api-1")
    mesh.config({"Kind": "service-resolver", "Name": api, "Redirect": {"Service": other}})
    mesh.render_until(lambda: mesh.landed() == "next-1")
    assert {mesh.landed() for _ in range(50)} == {"next-1"}


def test_the_connect_timeout_and_the_request_timeout_fire(mesh):
    """The resolver's ConnectTimeout ends a connect that never completes; a route's
    RequestTimeout ends a request the app does not answer in time (504)."""
    api, slow = mesh.api, mesh.name("slow")
    mesh.http(api, slow)
    blackhole = Blackhole()
    try:
        mesh.config({"Kind": "service-resolver", "Name": slow, "ConnectTimeout": "300ms"})
        mesh.config({"Kind": "service-router", "Name": api, "Routes": [
            {"Match": {"HTTP": {"PathPrefix": "/stuck"}}, "Destination": {"Service": slow}},
            {"Match": {"HTTP": {"PathPrefix": "/slow"}}, "Destination": {"RequestTimeout": "1s"}}]})
        mesh.instance(api, "api-1")
        mesh.instance(slow, "stuck-1", port=blackhole.port)
        mesh.render_until(lambda: mesh.landed() == "api-1")
        started = time.monotonic()
        status, _ = mesh.get("/stuck")
        took = time.monotonic() - started
        # HAProxy tries 4 times (retries 3, its default), each given 300 ms.
        assert status == 503 and 0.9 < took < 3.0, (status, took)
        started = time.monotonic()
        status, _ = mesh.get("/slow")
        took = time.monotonic() - started
        assert status == 504 and 0.9 < took < 2.5, (status, took)
        assert mesh.get("/fast") == (200, "api-1 /fast")
    finally:
        blackhole.close()


def test_a_route_retries_on_the_status_codes_it_names_as_often_as_it_says(mesh_on_each_haproxy):
    """RetryOnStatusCodes with NumRetries 2: a request the app fails twice still gets its 200, one
    it fails three times does not; a route without retries passes the first 503 on."""
    mesh = mesh_on_each_haproxy
    api = mesh.api
    mesh.http(api)
    mesh.config({"Kind": "service-router", "Name": api, "Routes": [
        {"Match": {"HTTP": {"PathPrefix": "/fail-"}}, "Destination": {"NumRetries": 2, "RetryOnStatusCodes": [503]}}]})
    mesh.instance(api, "api-1")
    mesh.render_until(lambda: mesh.landed("/ready") == "api-1")
    assert mesh.get("/fail-2-a") == (200, "api-1 /fail-2-a")
    assert mesh.get("/fail-3-b")[0] == 503
    mesh.config({"Kind": "service-router", "Name": api, "Routes": [
        {"Match": {"HTTP": {"PathPrefix": "/other"}}, "Destination": {"NumRetries": 2, "RetryOnStatusCodes": [503]}}]})
    mesh.render_until(lambda: "/other" in (mesh.out / "haproxy.cfg").read_text())
    assert mesh.get("/fail-1-c")[0] == 503


def test_a_config_entry_change_reaches_haproxy_under_start_sh(mesh):
    """start.sh's --wait wakes on the upstream's discovery chain: a resolver's default subset
    moved from v1 to v2, then the resolver deleted, moves the requests each time, with no
    restart of start.sh."""
    from test_start_sh import SHELLS, StartSh
    api = mesh.api
    mesh.http(api)
    subsets = {"v1": {"Filter": "Service.Meta.version == v1"}, "v2": {"Filter": "Service.Meta.version == v2"}}
    mesh.config({"Kind": "service-resolver", "Name": api, "DefaultSubset": "v1", "Subsets": subsets})
    mesh.instance(api, "api-v1", "v1")
    mesh.instance(api, "api-v2", "v2")
    script = StartSh(SHELLS["bash"], mesh.agent, mesh.binary, mesh.out, mesh.tmp / "start.log",
                     MESHGEN_SERVICE_ID=mesh.web, MESHGEN_WAIT="30s")
    try:
        wait_listening(mesh.upstream_port, script.process, timeout=30)

        def lands_only(tags: set, timeout: float = 20) -> None:
            deadline = time.monotonic() + timeout
            while {mesh.landed() for _ in range(20)} != tags:
                assert time.monotonic() < deadline, script.log()
                time.sleep(0.1)
        lands_only({"api-v1"})
        mesh.config({"Kind": "service-resolver", "Name": api, "DefaultSubset": "v2", "Subsets": subsets})
        lands_only({"api-v2"})
        mesh.agent.delete_config("service-resolver", api)
        lands_only({"api-v1", "api-v2"})
        assert script.process.poll() is None and script.log().count("starting HAProxy") == 1
    finally:
        assert script.stop() == 0
