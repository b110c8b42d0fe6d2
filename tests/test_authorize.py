"""Intentions enforced inside a real HAProxy (each supported version), real mutual TLS, the
double as the agent: authorize.lua names the caller, intentions.map decides. Every case that
must be refused is checked by a byte failing to come back, and the log's reason."""
from __future__ import annotations

import http.client
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import meshgen
from harness import (DoubleAgent, EchoServer, free_port, HAProxy, HttpApp, Identity, meshgen_run,
                     register_sidecar, talk)


@dataclass
class Sidecar:
    double: DoubleAgent
    port: int
    haproxy: HAProxy
    out: Path
    ids: Path
    proxy_id: str
    binary: str

    def identity(self, service: str) -> Identity:
        return Identity.from_double(self.double, self.ids, service)

    def render(self):
        """A render with live changes on, as start.sh runs it."""
        return meshgen_run(self.double, self.proxy_id, self.out, self.binary,
                           runtime_socket=self.out / "admin.sock")


@pytest.fixture
def start_sidecar(double, haproxy, tmp_path):
    """Starts the `web` sidecar under HAProxy with the given Config, in front of an echo app
    (tcp) or an HTTP app, on the intentions set so far; stops everything after."""
    started, echo, http_app = [], EchoServer(), HttpApp()

    def start(config: dict | None = None) -> Sidecar:
        port = free_port()
        app = http_app if (config or {}).get("protocol") == "http" else echo
        proxy_id = register_sidecar(double, "web", port, app.port, config or {})
        out = tmp_path / "out"
        assert meshgen_run(double, proxy_id, out, haproxy).exit_code == 3
        process = HAProxy(haproxy, out / "haproxy.cfg", tmp_path / "haproxy.log", wait_for_port=port)
        started.append(process)
        return Sidecar(double, port, process, out, tmp_path / "ids", proxy_id, haproxy)

    yield start
    for process in started:
        process.stop()
    echo.close()
    http_app.close()


def test_allowed_identity_reaches_the_app(double, start_sidecar):
    double.set_intention("api", "web", "allow")
    sidecar = start_sidecar()
    client = sidecar.identity("api").context()
    for _ in range(6):      # after the first, by the certificate's digest, without the script
        assert talk(sidecar.port, client) == b"ping\n"
    sidecar.haproxy.wait_for_log("authz=allow", count=6)    # a line is written as its connection ends
    allowed = [line for line in sidecar.haproxy.log().splitlines() if "authz=allow" in line]
    assert len(allowed) == 6
    assert all(f'spiffe="{double.service_uri("api")}"' in line and
               "intention: default/api => default/web (precedence 9): allow" in line for line in allowed)


def test_refused_identities(double, start_sidecar):
    double.set_intention("api", "web", "allow")
    double.set_intention("intruder", "web", "deny")
    sidecar = start_sidecar()
    foreign = DoubleAgent()  # another CA altogether
    cases = {
        "denied by intention": sidecar.identity("intruder").context(),
        "no client certificate": sidecar.identity("api").context(with_cert=False),
        "certificate of another CA": Identity.from_double(foreign, sidecar.ids / "foreign", "api").context(),
        "no URI SAN": Identity.custom(double, sidecar.ids, "bare").context(),
        "two URI SANs": Identity.custom(double, sidecar.ids, "two", double.service_uri("api"),
                                        double.service_uri("web")).context(),
        "URI that is not SPIFFE": Identity.custom(double, sidecar.ids, "https", "https://api.example/").context(),
        # Signed by our CA, and its service is allowed, but of another trust domain.
        "identity of another trust domain": Identity.custom(
            double, sidecar.ids, "elsewhere", "spiffe://other.consul/ns/default/dc/dc1/svc/api").context(),
        "an agent's identity, not a service's": Identity.custom(
            double, sidecar.ids, "agent", double.service_uri("api").split("/ns/")[0] + "/agent/client/dc/dc1/id/x"
        ).context(),
    }
    for case, context in cases.items():
        assert talk(sidecar.port, context) is None, case
    assert talk(sidecar.port, None, b"\x16\x03\x01 garbage, not TLS\n") is None
    log = sidecar.haproxy.wait_for_log("is not of a service")
    assert "intention: default/intruder => default/web (precedence 9): deny" in log
    assert 'reason="client certificate has 0 URI SANs, want 1"' in log
    assert 'reason="client certificate has 2 URI SANs, want 1"' in log
    assert 'reason="client certificate is of trust domain other.consul, not this mesh\'s"' in log
    assert log.count("authz=allow") == 0
    assert log.count("authz=deny") == 6


@pytest.mark.parametrize("acl_default", [None, "allow", "deny"])
def test_a_caller_no_intention_names_gets_the_agents_decision(double, start_sidecar, acl_default, monkeypatch):
    """ACLs off: allow; ACLs on: their default policy; a `*` intention: its action. Consul
    decides, meshgen only asks it about a caller no intention names."""
    if acl_default:
        double.enable_acls(acl_default)
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", double.add_token({"service_prefix:": "write"}))
    double.set_intention("named", "web", "deny" if acl_default != "deny" else "allow")
    sidecar = start_sidecar()
    stranger = sidecar.identity("stranger").context()
    assert (talk(sidecar.port, stranger) == b"ping\n") is (acl_default != "deny")
    double.set_intention("*", "web", "deny" if acl_default != "deny" else "allow")
    assert sidecar.render().applied_live
    assert (talk(sidecar.port, stranger) == b"ping\n") is (acl_default == "deny")
    named = talk(sidecar.port, sidecar.identity("named").context()) == b"ping\n"
    assert named is (acl_default == "deny")


def test_no_connection_asks_the_agent_and_a_dead_agent_changes_no_decision(double, start_sidecar):
    """Fail static: decisions live in HAProxy, so with the agent gone, allowed callers still get
    in, on every thread, and denied ones are still refused; a render in the meantime fails and
    leaves HAProxy's files as they were."""
    for i in range(5):
        double.set_intention(f"allowed{i}", "web", "allow")
        double.set_intention(f"denied{i}", "web", "deny")
    sidecar = start_sidecar()
    calls = double.count("/v1/agent/connect/authorize")
    double.stop()
    for _ in range(4):          # more connections than threads: each thread decides
        for i in range(5):
            assert talk(sidecar.port, sidecar.identity(f"allowed{i}").context()) == b"ping\n"
            assert talk(sidecar.port, sidecar.identity(f"denied{i}").context()) is None
    before = (sidecar.out / "intentions.map").read_bytes()
    with pytest.raises(meshgen.MeshgenError, match="cannot reach the Consul agent"):
        sidecar.render()
    assert (sidecar.out / "intentions.map").read_bytes() == before
    assert double.count("/v1/agent/connect/authorize") == calls


def test_a_revoked_intention_refuses_the_next_connection_without_a_reload(double, start_sidecar):
    double.set_intention("api", "web", "allow")
    sidecar = start_sidecar()
    client = sidecar.identity("api").context()
    assert talk(sidecar.port, client) == b"ping\n"
    pid = sidecar.haproxy.process.pid
    double.set_intention("api", "web", "deny")
    result = sidecar.render()
    assert result.applied_live and result.live_change == "intentions", result
    assert talk(sidecar.port, client) is None
    double.delete_intention("api", "web")
    assert sidecar.render().applied_live
    assert talk(sidecar.port, client) == b"ping\n"     # ACLs off: the agent allows unnamed callers
    assert sidecar.haproxy.process.pid == pid and sidecar.haproxy.process.poll() is None


class OpenConnection:
    """A connection kept open after its first echo, as a long-lived client keeps it."""

    def __init__(self, port: int, context):
        self.tls = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5))
        assert self.echoes()

    def echoes(self) -> bool:
        try:
            self.tls.sendall(b"ping\n")
            return self.tls.recv(64) == b"ping\n"
        except (ssl.SSLError, OSError):
            return False

    def close(self) -> None:
        self.tls.close()


def test_a_revoked_callers_open_connections_are_shut_down_and_no_one_elses(double, start_sidecar):
    """Consul's guide: a deny must not leave open connections for ever. The live change shuts
    down the revoked caller's connections; another caller's stay open and keep working."""
    double.set_intention("api", "web", "allow")
    double.set_intention("billing", "web", "allow")
    sidecar = start_sidecar()
    revoked = [OpenConnection(sidecar.port, sidecar.identity("api").context()) for _ in range(3)]
    kept = [OpenConnection(sidecar.port, sidecar.identity("billing").context()) for _ in range(3)]
    double.set_intention("api", "web", "deny")
    result = sidecar.render()
    assert result.applied_live, result
    assert [connection.echoes() for connection in revoked] == [False] * 3
    assert [connection.echoes() for connection in kept] == [True] * 3
    for connection in revoked + kept:
        connection.close()


def test_max_connection_lifetime_ends_connections_while_meshgen_waits(double, start_sidecar):
    """Consul's guide: bound a connection's life. No connection ends before the lifetime; one
    held open ends while `render --wait` waits, with nothing changed; a new one gets in."""
    double.set_intention("api", "web", "allow")
    sidecar = start_sidecar({"max_connection_lifetime_ms": 2000})
    client = sidecar.identity("api").context()
    held = OpenConnection(sidecar.port, client)
    result, ended = lifetime_while_waiting(sidecar, held)
    assert result.waited_out
    assert ended and 2.0 <= ended[0] < 6, ended
    assert talk(sidecar.port, client) == b"ping\n"
    held.close()


def lifetime_while_waiting(sidecar: Sidecar, held: OpenConnection):
    """A `render --wait 6s` with the runtime socket, which ends connections past their
    lifetime as it waits: its result, and how long `held` lived from now (if it ended)."""
    opened, ended = time.monotonic(), []

    def watch_it() -> None:
        while held.echoes():
            time.sleep(0.1)
        ended.append(time.monotonic() - opened)
    watcher = threading.Thread(target=watch_it)
    watcher.start()
    result = meshgen_run(sidecar.double, sidecar.proxy_id, sidecar.out, sidecar.binary,
                         runtime_socket=sidecar.out / "admin.sock", wait=6)
    watcher.join(5)
    return result, ended


def test_no_token_reaches_the_bundle(double, start_sidecar, monkeypatch):
    token = "0b6b3c36-1d1f-4c2e-9a55-authz-token"
    double.enable_acls("deny")
    double.add_token({"service_prefix:": "write"}, secret=token)
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", token)
    double.set_intention("api", "web", "allow")
    sidecar = start_sidecar()
    assert talk(sidecar.port, sidecar.identity("api").context()) == b"ping\n"
    for path in (sidecar.out / "live").iterdir():
        assert token.encode() not in path.read_bytes(), path
    assert token not in sidecar.haproxy.log()


def test_http_mode_looks_each_request_up(double, start_sidecar):
    """The caller is read once per connection, its decision on every request: a revocation
    refuses the next request of a keep-alive connection."""
    double.set_intention("api", "web", "allow")
    sidecar = start_sidecar({"protocol": "http"})
    context = sidecar.identity("api").context()
    connection = http.client.HTTPSConnection("127.0.0.1", sidecar.port, context=context, timeout=5)
    for i in range(3):
        connection.request("GET", f"/request/{i}")
        response = connection.getresponse()
        assert (response.status, response.read()) == (200, f"/request/{i}".encode())
    double.set_intention("api", "web", "deny")
    assert sidecar.render().applied_live
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        connection.request("GET", "/after")
        connection.getresponse()


# One L7 intention api => web, in Consul's form: the first permission that matches decides.
L7_PERMISSIONS = [
    {"Action": "deny", "HTTP": {"PathPrefix": "/admin", "Header": [{"Name": "x-debug", "Present": True}]}},
    {"Action": "allow", "HTTP": {"PathPrefix": "/admin", "Methods": ["GET"]}},
    {"Action": "allow", "HTTP": {"PathRegex": "/invoices/[0-9]+", "Methods": ["GET", "HEAD"]}},
    {"Action": "allow", "HTTP": {"PathExact": "/health", "Header": [{"Name": "user-agent", "Suffix": "probe"}]}},
    {"Action": "deny", "HTTP": {"PathPrefix": "/api", "Header": [{"Name": "x-team", "Exact": "blue", "Invert": True}]}},
    {"Action": "allow", "HTTP": {"PathPrefix": "/api"}},
    {"Action": "allow", "HTTP": {"Header": [{"Name": "x-token", "Regex": "[a-f0-9]{8}"},
                                            {"Name": "x-mode", "Prefix": "ro-"}]}},
    {"Action": "allow", "HTTP": {"Header": [{"Name": "x-odd", "Exact": "a b#$c"}]}},
]
# (method, path, headers) -> the permission that decides, as the intention above reads;
# None: no permission matches, so Consul's default decides.
L7_REQUESTS = [
    ("GET", "/admin/users", {}, 2),
    ("GET", "/admin", {}, 2),
    ("GET", "/admin/users", {"x-debug": "1"}, 1),
    ("POST", "/admin/users", {}, None),
    ("GET", "/ADMIN/users", {}, None),                          # paths match case-sensitively
    ("GET", "/invoices/42", {}, 3),
    ("HEAD", "/invoices/42", {}, 3),
    ("DELETE", "/invoices/42", {}, None),
    ("GET", "/invoices/42x", {}, None),                         # a regex matches the whole path
    ("GET", "/v2/invoices/42", {}, None),
    ("GET", "/health", {"user-agent": "kube-probe"}, 4),
    ("GET", "/health", {"user-agent": "curl"}, None),
    ("GET", "/health/", {"user-agent": "kube-probe"}, None),   # exact is exact
    ("GET", "/api/v1", {"x-team": "blue"}, 6),                  # inverted: blue does not match 5
    ("GET", "/api/v1", {"x-team": "red"}, 5),
    ("GET", "/api/v1", {}, 5),                                  # no header: not blue either
    ("GET", "/other", {"x-token": "deadbeef", "x-mode": "ro-1"}, 7),
    ("GET", "/other", {"x-token": "deadbeef", "x-mode": "rw-1"}, None),
    ("GET", "/other", {"x-token": "deadbeefcafe", "x-mode": "ro-1"}, None),
    ("GET", "/other", {"x-odd": "a b#$c"}, 8),                   # taken literally: no comment, no variable
    ("GET", "/other", {"x-odd": "a b"}, None),
    ("GET", "/other", {}, None),
]


def request_status(port: int, context, method: str, path: str, headers: dict) -> int | None:
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
    try:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


@pytest.mark.parametrize("default", ["deny", "allow"])
def test_l7_permissions_decide_each_request_as_the_intention_says(double, start_sidecar, default, monkeypatch):
    """The first permission that matches decides; a request none matches gets Consul's default
    (ACLs on with default deny: deny; ACLs off: allow). Denied is a 403 whose log line names
    the intention and the permission; allowed reaches the app."""
    if default == "deny":
        double.enable_acls("deny")
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", double.add_token({"service_prefix:": "write"}))
    double.set_intention("api", "web", "allow", permissions=L7_PERMISSIONS)
    sidecar = start_sidecar({"protocol": "http"})
    context = sidecar.identity("api").context()
    wrong = []
    for method, path, headers, permission in L7_REQUESTS:
        action = L7_PERMISSIONS[permission - 1]["Action"] if permission else default
        status = request_status(sidecar.port, context, method, path, headers)
        if status != {"allow": 200, "deny": 403}[action]:
            wrong.append((method, path, headers, action, status))
    assert wrong == []
    log = sidecar.haproxy.wait_for_log("l7=deny:permission-5")
    assert 'reason="L7 intention: default/api => default/web (precedence 9)" l7=deny:permission-1' in log
    assert f"l7={default}:default" in log


def test_l7_intentions_deny_on_a_tcp_service(double, start_sidecar):
    double.set_intention("api", "web", "allow", permissions=[{"Action": "allow", "HTTP": {"PathPrefix": "/"}}])
    sidecar = start_sidecar()
    assert talk(sidecar.port, sidecar.identity("api").context()) is None
    assert "L7 intention on a tcp service" in sidecar.haproxy.wait_for_log("authz=deny")


def test_a_live_change_of_five_thousand_callers_commits_them_all(double, start_sidecar):
    """Over 16 KiB of map lines: one `add map` of them all was dropped by HAProxy's command
    buffer (2.6.12 without a word), the empty version committed, and every caller refused."""
    callers = [f"caller-{n:04d}" for n in range(5000)]
    for name in callers:
        double.set_intention(name, "web", "allow")
    sidecar = start_sidecar()
    allowed, revoked = sidecar.identity("caller-4999").context(), sidecar.identity("caller-0000").context()
    assert talk(sidecar.port, allowed) == b"ping\n"
    double.set_intention("caller-0000", "web", "deny")
    double.set_intention("newcomer", "web", "deny")
    result = sidecar.render()
    assert result.applied_live and result.live_change == "intentions", result
    runtime = meshgen.RuntimeAPI(sidecar.out / "admin.sock")
    loaded = sidecar.out.resolve() / meshgen.running_bundle(runtime, sidecar.out)   # HAProxy's name for it
    shown = runtime(f"show map {loaded / 'intentions.map'}")
    assert len(shown.splitlines()) == 5003          # every caller, the newcomer, this namespace's line and "*"
    assert talk(sidecar.port, revoked) is None
    assert talk(sidecar.port, allowed) == b"ping\n"


def test_a_caller_whose_name_no_intention_could_hold_is_refused_even_under_an_allow_all(double, start_sidecar):
    """meshgen leaves out an intention whose source is no plain name (Consul 1.8.7 stores "-i",
    "web~x", a name of 200 characters): a deny for such a caller cannot be rendered, so such a
    caller may never reach the line for unnamed callers either."""
    double.set_intention("*", "web", "allow")
    sidecar = start_sidecar()
    assert talk(sidecar.port, sidecar.identity("plain").context()) == b"ping\n"
    for odd in ("-i", "web~x", "a" * 129, "web%41"):
        uri = double.service_uri("api").rsplit("/", 1)[0] + "/" + odd
        assert talk(sidecar.port, Identity.custom(double, sidecar.ids, f"odd{len(odd)}", uri).context()) is None, odd


def _from_port(port: int, context, source_port: int):
    """An OpenConnection from a chosen local port."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    raw.bind(("127.0.0.1", source_port))
    raw.settimeout(5)
    raw.connect(("127.0.0.1", port))
    connection = OpenConnection.__new__(OpenConnection)
    connection.tls = context.wrap_socket(raw)
    assert connection.echoes()
    return connection


def test_a_new_connection_from_a_reused_port_gets_its_own_lifetime(double, start_sidecar):
    """The tracked entry of a connection outlives it by a minute; a new connection from the same
    address and port found that entry and took its start time, and was cut as if 3.1 s old when
    0.3 s old. Now each connection's entry carries its own start."""
    double.set_intention("api", "web", "allow")
    sidecar = start_sidecar({"max_connection_lifetime_ms": 3000})
    client = sidecar.identity("api").context()
    source_port = free_port()
    first = _from_port(sidecar.port, client, source_port)
    time.sleep(1.5)
    first.tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST: no TIME_WAIT
    first.close()
    second = _from_port(sidecar.port, client, source_port)
    result, lived = lifetime_while_waiting(sidecar, second)
    assert result.waited_out
    assert lived and 3.0 <= lived[0] < 6, lived       # its own three seconds, not what was left of the first's
    second.close()


# Values HAProxy's ACL parser would read as flags ("-i", "-beta", "--"), as the end of an
# inline ACL ("}"), or as two words: each must decide exactly the requests that carry it.
HOSTILE_VALUES = ["-i", "-beta", "}", "--", "a b"]


def test_l7_values_that_look_like_haproxy_syntax_decide_exactly_their_requests(double, start_sidecar):
    double.set_intention("api", "web", "allow", permissions=[
        *({"Action": "deny", "HTTP": {"Header": [{"Name": "X-Env", "Exact": value}]}} for value in HOSTILE_VALUES),
        {"Action": "deny", "HTTP": {"Header": [{"Name": "X-Tail", "Suffix": "}"}]}},
        {"Action": "deny", "HTTP": {"Header": [{"Name": "X-Head", "Prefix": "-i"}]}},
        {"Action": "allow", "HTTP": {"PathPrefix": "/"}},
    ])
    sidecar = start_sidecar({"protocol": "http"})
    context = sidecar.identity("api").context()
    denied = [{"X-Env": value} for value in HOSTILE_VALUES] + [
        {"x-env": "-i"}, {"X-Tail": "a}"}, {"X-Tail": "}"}, {"X-Head": "-i"}, {"X-Head": "-ix"}]
    allowed = [{}, {"X-Env": "i"}, {"X-Env": "-I"}, {"X-Env": "beta"}, {"X-Env": "-beta2"}, {"X-Env": "}}"},
               {"X-Env": "{"}, {"X-Env": "-"}, {"X-Env": "a"}, {"X-Env": "b"}, {"X-Env": "a  b"},
               {"X-Tail": "}a"}, {"X-Head": "x-i"}, {"X-Head": "-"}]
    statuses = {repr(headers): request_status(sidecar.port, context, "GET", "/", headers)
                for headers in denied + allowed}
    assert statuses == {**{repr(h): 403 for h in denied}, **{repr(h): 200 for h in allowed}}
