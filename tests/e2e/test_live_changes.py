"""Changes the running HAProxy takes through its runtime API, each proven by its effect: new CA
roots, a new leaf and upstream instances, with no reload, on every HAProxy version. Where HAProxy
does not take a change (its issue #3165 on 2.6.12 and 3.0.11), meshgen sees that and asks for
a reload, and no connection is refused either way."""
from __future__ import annotations

import http.client
import json
import random
import re
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

import meshgen
from harness import (EchoServer, HAProxy, Identity, free_port, meshgen_run, register_sidecar, roots_pem,
                     run_meshgen, served_certificate, talk)

# After a `commit ssl ca-file`, these keep serving the old certificate on a later `commit ssl
# cert` (HAProxy issue #3165; fixed in 2.8.25 and 3.2.26 as in 3.3): a leaf renewal after a
# root rotation needs a reload there, until the next one.
KEEPS_OLD_CERT_AFTER_CA_COMMIT = {"haproxy-2.6.12", "haproxy-3.0.11"}


class PeerSidecar:
    """A sidecar of `service` elsewhere in the mesh: mutual TLS with a leaf from the double,
    answering each line (or each HTTP request, keep-alive) with its tag and the serial of the
    client certificate it was shown."""

    def __init__(self, double, directory: Path, service: str, tag: str):
        self.double, self.directory, self.service, self.tag = double, directory, service, tag
        self.context = self._context()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _context(self) -> ssl.SSLContext:
        """A fresh leaf from the double's active root, and the roots it lists now, as a sidecar
        takes them from its own agent."""
        identity = Identity.custom(self.double, self.directory / self.tag, self.tag,
                                   self.double.service_uri(self.service))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(identity.cert), str(identity.key))
        context.load_verify_locations(cadata=roots_pem(self.double))
        context.verify_mode = ssl.CERT_REQUIRED
        # No session tickets: a resumed session shows the certificate of the handshake that
        # made it, and this peer reports what HAProxy presents now.
        context.num_tickets = 0
        context.options |= ssl.OP_NO_TICKET
        return context

    def refresh(self) -> None:
        self.context = self._context()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                serial = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number
                answer = f"{self.tag} {serial:x}\n".encode()
                while request := tls.recv(4096):
                    if request.startswith(b"GET "):
                        answer_http = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer)
                        tls.sendall(answer_http)
                    else:
                        tls.sendall(answer)
        except (OSError, ssl.SSLError):
            pass

    def close(self) -> None:
        self.listener.close()


class LiveSidecar:
    """The `web` sidecar with an upstream `api`, under HAProxy in master-worker mode as start.sh
    runs it, rendered in-process with --runtime-socket."""

    def __init__(self, double, haproxy: str, tmp_path: Path, peers: int = 2, protocol: str = "tcp"):
        self.double, self.binary, self.out = double, haproxy, tmp_path / "out"
        self.app = EchoServer()
        self.port, self.upstream_port = free_port(), free_port()
        register_sidecar(double, "web", self.port, self.app.port, upstreams=[{
            "destination_name": "api", "local_bind_port": self.upstream_port, "config": {"protocol": protocol}}])
        self.protocol, self.connections = protocol, threading.local()
        double.set_intention("*", "web", "allow")
        self.peers = {f"api-{n}": PeerSidecar(double, tmp_path / "peers", "api", f"api-{n}") for n in range(peers)}
        for sid, peer in self.peers.items():
            double.add_instance("api", "127.0.0.1", peer.port, service_id=sid)
        assert self.render().exit_code == 3                      # HAProxy is not running yet
        self.haproxy = HAProxy(haproxy, self.out / "haproxy.cfg", tmp_path / "haproxy.log",
                               wait_for_port=self.port, master_socket=tmp_path / "master.sock")
        self.client = Identity.from_double(double, tmp_path / "ids", "api").context(verify_server=False)
        self.anonymous = Identity.from_double(double, tmp_path / "ids", "api").context(
            with_cert=False, verify_server=False)

    def render(self) -> meshgen.RenderResult:
        return meshgen_run(self.double, "web-sidecar-proxy", self.out, self.binary,
                           runtime_socket=self.out / "admin.sock")

    def through_upstream(self) -> tuple[str, int] | None:
        """One request from the local app through the upstream listener: which peer answered,
        and the serial of the certificate this sidecar showed it."""
        answer = talk(self.upstream_port, None) if self.protocol == "tcp" else self._get()
        if answer is None:
            return None
        tag, serial = answer.decode().split()
        return tag, int(serial, 16)

    def _get(self) -> bytes | None:
        """One request on this thread's keep-alive connection: HAProxy reuses its own to the
        servers, so removed servers have idle connections to drop."""
        if getattr(self.connections, "http", None) is None:
            self.connections.http = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=5)
        try:
            self.connections.http.request("GET", "/")
            response = self.connections.http.getresponse()
            return response.read() if response.status == 200 else None
        except (OSError, http.client.HTTPException):
            self.connections.http.close()
            self.connections.http = None
            return None

    def servers_running(self) -> set:
        """(name, address, port, weight, admin state) of every server HAProxy has in
        upstream_api, from `show servers state`: one left in maintenance shows too."""
        lines = meshgen.RuntimeAPI(self.out / "admin.sock")("show servers state upstream_api").splitlines()[2:]
        return {(f[3], f[4], f[18], int(f[7]), f[6]) for f in (line.split() for line in lines)}

    def servers_rendered(self) -> set:
        """The same, read from the haproxy.cfg on disk: each server ready (admin state 0)."""
        backend = (self.out / "haproxy.cfg").read_text().split("\nbackend upstream_api\n")[1].split("\n\n")[0]
        return {(name, host, port, int(weight), "0") for name, host, port, weight
                in re.findall(r"^    server (\S+) (\S+):(\d+) weight (\d+)$", backend, re.M)}

    def close(self) -> None:
        self.haproxy.stop()
        self.app.close()
        for peer in self.peers.values():
            peer.close()


@pytest.fixture
def live(double, haproxy, tmp_path):
    sidecar = LiveSidecar(double, haproxy, tmp_path)
    yield sidecar
    sidecar.close()


class Load:
    """Requests in a loop from threads until stopped: each outcome True (answered) or False."""

    def __init__(self, **requests):
        self.outcomes = {name: [] for name in requests}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(name, request, pause), daemon=True)
                         for name, (request, pause) in requests.items()]
        for thread in self._threads:
            thread.start()

    def _run(self, name, request, pause):
        while not self._stop.is_set():
            self.outcomes[name].append(bool(request()))
            time.sleep(pause)

    def run_on(self, requests: int = 10, timeout: float = 20.0) -> None:
        """Until every thread has made `requests` more requests from now."""
        start = {name: len(o) for name, o in self.outcomes.items()}
        deadline = time.monotonic() + timeout
        while any(len(o) < start[name] + requests for name, o in self.outcomes.items()):
            assert time.monotonic() < deadline, "the load stalled"
            time.sleep(0.05)

    def stop(self) -> dict:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        return {name: (len(o), o.count(False)) for name, o in self.outcomes.items()}


def test_a_root_rotation_in_consul_order_refuses_no_peer_and_needs_no_reload(double, live, haproxy_build,
                                                                               tmp_path):
    """Consul's order: the new root joins the trust bundle, peers get leaves from it at their
    own pace, this sidecar's leaf comes last. A peer holding a new-root leaf connects every
    50 ms from the moment meshgen applied the roots; peers behind the upstream move to
    new-root leaves too. No connection fails, nothing reloads until this sidecar's own leaf
    changes, and then only where HAProxy keeps the old certificate."""
    workers = live.haproxy.workers()
    load = Load(inbound=(lambda: talk(live.port, live.client) == b"ping\n", 0.0),
                outbound=(live.through_upstream, 0.0))
    try:
        load.run_on()
        double.rotate_root(reissue_leaves=False)             # 1. the new root joins the bundle
        result = live.render()
        assert result.applied_live and result.live_change == "CA roots", result
        assert live.render().changed is False
        new_root_peer = Identity.custom(double, tmp_path / "peer", "api-new", double.service_uri("api"),
                                        root=double.roots[-1]).context(verify_server=False)
        window = Load(new_root_peer=(lambda: talk(live.port, new_root_peer) == b"ping\n", 0.05))
        for peer in live.peers.values():                      # 2. peers move to the new root
            peer.refresh()
        window.run_on(15)
        load.run_on()
        assert live.haproxy.workers() == workers              # no reload through the window
        assert talk(live.port, live.anonymous) is None
        window_outcomes = window.stop()
        double.reissue_leaves()                               # 3. this sidecar's own leaf
        result = live.render()
        if haproxy_build.name in KEEPS_OLD_CERT_AFTER_CA_COMMIT:
            assert result.exit_code == 3, result
            assert served_certificate(live.port, live.client).serial_number != double.leaves["web"]["_serial"]
            live.haproxy.reload()
        else:
            assert result.applied_live and result.live_change == "leaf certificate", result
            assert live.haproxy.workers() == workers
        load.run_on()
    finally:
        outcomes = load.stop()
    assert window_outcomes["new_root_peer"][1] == 0, window_outcomes
    assert all(failed == 0 for _, failed in outcomes.values()), outcomes
    new_root = x509.load_pem_x509_certificate(double._roots_json()["Roots"][-1]["RootCert"].encode())
    served_certificate(live.port, live.client).verify_directly_issued_by(new_root)
    assert live.through_upstream()[1] == double.leaves["web"]["_serial"]
    assert talk(live.port, live.anonymous) is None


def test_a_leaf_renewal_goes_live_under_load(double, live):
    """A renewal on a process that has had no ca-file commit goes live on every version: the
    public listener serves the new serial and still demands a client certificate, and peers
    behind the upstream are shown the new one."""
    workers = live.haproxy.workers()
    before = live.through_upstream()[1]
    load = Load(inbound=(lambda: talk(live.port, live.client) == b"ping\n", 0.0),
                outbound=(live.through_upstream, 0.0))
    try:
        load.run_on()
        double.renew_leaf("web")
        result = live.render()
        assert result.applied_live and result.live_change == "leaf certificate", result
        load.run_on()
    finally:
        outcomes = load.stop()
    serial = double.leaves["web"]["_serial"]
    assert serial != before
    assert served_certificate(live.port, live.client).serial_number == serial
    assert live.through_upstream()[1] == serial
    assert talk(live.port, live.anonymous) is None
    assert live.haproxy.workers() == workers
    assert all(failed == 0 for _, failed in outcomes.values()), outcomes


@pytest.mark.parametrize("protocol, changes", [("tcp", 200), ("http", 100)])
def test_instance_changes_go_live_and_haproxy_runs_what_the_config_says(double, haproxy, protocol, changes,
                                                                       tmp_path):
    """Instances join, leave and change weight 200 times under load (100 over HTTP, where the
    app keeps one connection alive and HAProxy pools its own to the servers): each change goes
    live, `show servers state` equals the servers in haproxy.cfg after each, the next request
    lands on a listed instance, no request fails and nothing reloads."""
    live = LiveSidecar(double, haproxy, tmp_path, protocol=protocol)
    pool = {f"api-{n}": PeerSidecar(double, tmp_path / "pool", "api", f"api-{n}") for n in range(2, 6)}
    listed = dict(live.peers)
    rng = random.Random(12)
    workers = live.haproxy.workers()
    load = Load(outbound=(live.through_upstream, 0.0))
    landed_elsewhere, kinds = [], {"join": 0, "leave": 0, "weight": 0}
    try:
        for change in range(changes):
            kind = rng.choice([k for k in kinds if (k != "join" or pool) and (k != "leave" or len(listed) > 1)])
            kinds[kind] += 1
            if kind == "join":
                sid = rng.choice(sorted(pool))
                listed[sid] = pool.pop(sid)
                double.add_instance("api", "127.0.0.1", listed[sid].port, service_id=sid)
            elif kind == "leave":
                sid = rng.choice(sorted(listed))
                pool[sid] = listed.pop(sid)
                double.remove_instance("api", sid)
            else:
                double.set_weight("api", rng.choice(sorted(listed)), rng.randint(1, 256))
            result = live.render()
            assert result.applied_live, (change, result)
            assert live.servers_running() == live.servers_rendered(), change
            answer = live.through_upstream()
            if answer is None or answer[0] not in listed:
                landed_elsewhere.append((change, answer))
        outcomes = load.stop()
        assert live.haproxy.workers() == workers
    finally:
        load.stop()
        live.close()
        for peer in pool.values():
            peer.close()
    assert min(kinds.values()) > changes / 5, kinds
    assert landed_elsewhere == []
    assert outcomes["outbound"][0] > changes and outcomes["outbound"][1] == 0, outcomes


class SaysSuccess:
    """An admin socket that answers every change as if it had made it, and makes none; what
    HAProxy shows (`show ...`) it asks the real one."""

    def __init__(self, path: Path, real: Path):
        self.path, self.real = path, meshgen.RuntimeAPI(real)
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                command = conn.recv(65536).decode()
                answer = (self.real(command.strip()) + "\n" if command.startswith("show ") else
                          "Transaction created for certificate\n" if command.startswith("set ssl") else
                          "New server registered.\n" if command.startswith("add server") else
                          "Server deleted.\n" if command.startswith("del server") else "Success!\n")
                conn.sendall(answer.encode())

    def close(self):
        self.server.close()


def test_success_from_the_runtime_api_is_not_taken_for_an_effect(double, any_haproxy, tmp_path):
    """Against an admin socket that says `Success!` to everything and changes nothing, no
    change counts as applied: meshgen looks at what HAProxy serves and runs, and asks for a
    reload (exit 3), which alone brings the change."""
    live = LiveSidecar(double, any_haproxy, tmp_path)
    liar = SaysSuccess(tmp_path / "liar.sock", live.out / "admin.sock")
    try:
        def render_through_liar():
            return meshgen_run(double, "web-sidecar-proxy", live.out, any_haproxy, runtime_socket=liar.path)

        double.renew_leaf("web")
        assert render_through_liar().exit_code == 3
        assert served_certificate(live.port, live.client).serial_number != double.leaves["web"]["_serial"]
        live.haproxy.reload()
        assert served_certificate(live.port, live.client).serial_number == double.leaves["web"]["_serial"]
        double.rotate_root(reissue_leaves=False)
        new_root_peer = Identity.custom(double, tmp_path / "peer", "api-new", double.service_uri("api"),
                                        root=double.roots[-1]).context(verify_server=False)
        assert render_through_liar().exit_code == 3
        assert talk(live.port, new_root_peer) is None
        live.haproxy.reload()
        assert talk(live.port, new_root_peer) == b"ping\n"
        double.remove_instance("api", "api-0")
        assert render_through_liar().exit_code == 3
        assert live.servers_running() != live.servers_rendered()
        live.haproxy.reload()
        assert live.servers_running() == live.servers_rendered()
    finally:
        liar.close()
        live.close()


def test_status_tells_whether_haproxy_runs_the_bundle_on_disk(double, any_haproxy, tmp_path):
    """`meshgen status` compares what HAProxy serves and runs with the live bundle: the same
    after live changes (exit 0); after a render HAProxy was not reloaded for, the leaf and the
    servers differ (exit 3), and no change goes in live, until the reload."""
    live = LiveSidecar(double, any_haproxy, tmp_path)

    def status() -> tuple[int, dict]:
        run = run_meshgen("status", "--out", str(live.out), "--json")
        return run.code, {row["what"]: row["same"] for row in json.loads(run.stdout)}
    try:
        code, rows = status()
        assert code == 0 and all(rows.values()) and "servers of upstream_api" in rows, rows
        double.renew_leaf("web")
        double.remove_instance("api", "api-0")
        assert live.render().applied_live
        assert status() == (0, rows)
        double.renew_leaf("web")
        double.remove_instance("api", "api-1")
        assert meshgen_run(double, "web-sidecar-proxy", live.out, any_haproxy).exit_code == 3  # no socket
        code, rows = status()
        assert code == 3 and not rows["leaf serial"] and not rows["servers of upstream_api"], rows
        assert rows["CA roots (SHA-1)"] and rows["client without a certificate"]
        # HAProxy was not reloaded on that bundle: the live one no longer describes what it runs.
        double.renew_leaf("web")
        assert live.render().exit_code == 3
        assert served_certificate(live.port, live.client).serial_number != double.leaves["web"]["_serial"]
        live.haproxy.reload()
        code, rows = status()
        assert code == 0 and all(rows.values()), rows
    finally:
        live.close()


class Killed(BaseException):
    pass


def test_a_run_killed_between_its_live_change_and_its_swap_is_made_good_by_the_next(double, any_haproxy, tmp_path,
                                                                                  monkeypatch):
    """A run makes its change in HAProxy before it swaps the bundle in. Killed right between,
    it leaves HAProxy ahead of the live bundle; the next run sees the change again, makes it
    again (a server already gone, a leaf already served) and swaps: HAProxy and disk agree."""
    live = LiveSidecar(double, any_haproxy, tmp_path)

    def status_code() -> int:
        return run_meshgen("status", "--out", str(live.out)).code
    try:
        double.renew_leaf("web")
        double.remove_instance("api", "api-0")

        def killed(*_):
            raise Killed()
        monkeypatch.setattr(meshgen, "publish_bundle", killed)
        with pytest.raises(Killed):
            live.render()
        monkeypatch.undo()
        assert served_certificate(live.port, live.client).serial_number == double.leaves["web"]["_serial"]
        assert status_code() == 3                           # the live bundle is behind HAProxy
        result = live.render()
        assert result.applied_live, result
        assert status_code() == 0
        assert live.servers_running() == live.servers_rendered()
    finally:
        live.close()


def test_a_run_killed_after_its_live_change_then_reverted_in_consul_asks_for_a_reload(double, haproxy, tmp_path,
                                                                                    monkeypatch):
    """Killed between its live change and its swap, a run leaves HAProxy holding an instance that
    the live bundle does not list; if Consul then takes the instance away again, the next
    render equals the live bundle. It must still ask for the reload that puts HAProxy back on
    the live bundle, or requests keep landing on the instance Consul removed."""
    live = LiveSidecar(double, haproxy, tmp_path)
    extra = PeerSidecar(double, tmp_path / "peers", "api", "api-extra")
    try:
        double.add_instance("api", "127.0.0.1", extra.port, service_id="api-extra")

        def killed(*_):
            raise Killed()
        monkeypatch.setattr(meshgen, "publish_bundle", killed)
        with pytest.raises(Killed):
            live.render()
        monkeypatch.undo()
        assert "api-extra" in {live.through_upstream()[0] for _ in range(30)}   # HAProxy took it
        double.remove_instance("api", "api-extra")                             # Consul reverts
        result = live.render()
        assert result.exit_code == 3, result
        live.haproxy.reload()
        assert "api-extra" not in {live.through_upstream()[0] for _ in range(30)}
        assert live.servers_running() == live.servers_rendered()
        assert live.render().exit_code == 0
    finally:
        extra.close()
        live.close()
