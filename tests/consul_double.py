"""A Consul agent double: the HTTP API a Connect sidecar uses, as docs/consul-reference.md
describes it for current Consul ("What the agent double models"), served on loopback from a
thread.

Tests drive it through the Python API of `ConsulDouble`; users run it from the command line with
a services file in the seed's registration shape:

    python tests/consul_double.py --port 8500 demo/services.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import functools
import hashlib
import json
import random
import re
import socket
import socketserver
import ssl
import sys
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MAX_WAIT = 600.0
DEFAULT_WAIT = 300.0
LEAF_TTL = dt.timedelta(hours=72)
SIDECAR_MIN_PORT = 21000


class HTTPError(Exception):
    def __init__(self, status: int, body: str, headers: dict | None = None):
        super().__init__(body)
        self.status, self.body, self.headers = status, body, headers or {}


# --------------------------------------------------------------------------- certificates

def _colon_hex(data: bytes) -> str:
    return ":".join(f"{b:02x}" for b in data)


def _key_id(public_key) -> bytes:
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).digest()


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class CARoot:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    create_index: int
    intermediate: x509.Certificate | None = None
    intermediate_key: ec.EllipticCurvePrivateKey | None = None

    @property
    def id(self) -> str:
        return _colon_hex(self.cert.fingerprint(hashes.SHA1()))

    @property
    def signer(self):
        """The certificate and key that sign leaves: the intermediate when there is one."""
        if self.intermediate is not None:
            return self.intermediate, self.intermediate_key
        return self.cert, self.key


class CertificateAuthority:
    """Consul's built-in CA (docs/consul-reference.md, the leaf): EC P-256 roots, leaves with an empty subject and one
    critical URI SAN, serials from one counter shared by everything the CA signs."""

    def __init__(self, cluster_id: str | None = None):
        self.cluster_id = (cluster_id or str(uuid.uuid4())).lower()
        self.trust_domain = f"{self.cluster_id}.consul"
        self._serial = 0

    def next_serial(self) -> int:
        self._serial += 1
        return self._serial

    def new_root(self, create_index: int, with_intermediate: bool = False) -> CARoot:
        key = ec.generate_private_key(ec.SECP256R1())
        uid = uuid.uuid4().hex[:8]
        now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        name = x509.Name([x509.NameAttribute(
            NameOID.COMMON_NAME, f"pri-{uid}.consul.ca.{self.cluster_id[:8]}.consul")])
        cert = self._ca_cert(name, name, key.public_key(), key, now, now + dt.timedelta(days=3650),
                             f"spiffe://{self.trust_domain}")
        root = CARoot(cert, key, create_index)
        if with_intermediate:
            ikey = ec.generate_private_key(ec.SECP256R1())
            iname = x509.Name([x509.NameAttribute(
                NameOID.COMMON_NAME, f"sec-{uuid.uuid4().hex[:8]}.consul.ca.{self.cluster_id[:8]}.consul")])
            root.intermediate = self._ca_cert(iname, name, ikey.public_key(), key, now,
                                              now + dt.timedelta(days=365),
                                              f"spiffe://{self.trust_domain}")
            root.intermediate_key = ikey
        return root

    def _ca_cert(self, subject, issuer, public_key, signing_key, not_before, not_after, uri):
        return (x509.CertificateBuilder()
                .subject_name(subject).issuer_name(issuer).public_key(public_key)
                .serial_number(self.next_serial())
                .not_valid_before(not_before).not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False,
                                             False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier(_key_id(public_key)), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier(_key_id(signing_key.public_key()),
                                                           None, None), critical=False)
                .add_extension(x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(uri)]), critical=False)
                .sign(signing_key, hashes.SHA256()))

    def issue_leaf(self, root: CARoot, *uris: str, ttl: dt.timedelta = LEAF_TTL,
                   not_before: dt.datetime | None = None):
        """A leaf as Consul 1.11+ signs it, NotBefore back-dated one minute (or as given), its SAN
        the given URIs: one SPIFFE ID for a real leaf; none or several to make the broken ones
        tests need."""
        signer_cert, signer_key = root.signer
        key = ec.generate_private_key(ec.SECP256R1())
        if not_before is None:
            not_before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) - dt.timedelta(minutes=1)
        # Without URIs the subject is a CN, as in Consul before 1.11: a leaf with neither is invalid.
        subject = x509.Name([] if uris else [x509.NameAttribute(NameOID.COMMON_NAME, "legacy")])
        builder = (x509.CertificateBuilder()
                .subject_name(subject).issuer_name(signer_cert.subject)
                .public_key(key.public_key()).serial_number(self.next_serial())
                .not_valid_before(not_before).not_valid_after(not_before + ttl)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(True, False, True, True, True, False, False, False,
                                             False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .add_extension(x509.SubjectKeyIdentifier(_key_id(key.public_key())), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier(_key_id(signer_key.public_key()),
                                                           None, None), critical=False))
        if uris:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(u) for u in uris]), critical=True)
        return builder.sign(signer_key, hashes.SHA256()), key


# --------------------------------------------------------------------------- registrations

def _norm(key: str) -> str:
    return key.replace("_", "").lower()


def _get(obj: dict, name: str, default=None):
    """Field lookup as Consul's decoder does it: case-insensitive, snake_case accepted."""
    want = _norm(name)
    for key, value in obj.items():
        if _norm(key) == want:
            return value
    return default


def _upstream(raw: dict) -> dict:
    out = {"DestinationType": _get(raw, "DestinationType") or "service"}
    for name in ("DestinationPeer", "DestinationName", "Datacenter", "LocalBindAddress",
                 "LocalBindPort", "LocalBindSocketPath", "LocalBindSocketMode", "Config"):
        value = _get(raw, name)
        if value not in (None, "", 0, {}):
            out[name] = value
    out["MeshGateway"] = _get(raw, "MeshGateway") or {}
    return out


def _proxy(raw: dict, defaults: dict) -> dict:
    proxy = dict(defaults)
    for name in ("DestinationServiceName", "DestinationServiceID", "LocalServiceAddress",
                 "LocalServicePort", "LocalServiceSocketPath", "Mode", "Config"):
        value = _get(raw, name)
        if value not in (None, "", 0, {}):
            proxy[name] = value
    upstreams = [_upstream(u) for u in _get(raw, "Upstreams") or []]
    if upstreams:
        proxy["Upstreams"] = upstreams
    proxy["MeshGateway"] = _get(raw, "MeshGateway") or {}
    expose = _get(raw, "Expose") or {}
    paths = [{"ListenerPort": _get(p, "ListenerPort"), "Path": _get(p, "Path"),
              "LocalPathPort": _get(p, "LocalPathPort"), "Protocol": _get(p, "Protocol") or "http",
              "ParsedFromCheck": False} for p in _get(expose, "Paths") or []]
    proxy["Expose"] = {k: v for k, v in (("Checks", _get(expose, "Checks")), ("Paths", paths)) if v}
    return proxy


# --------------------------------------------------------------------------- the agent state

@dataclass
class Instance:
    """One catalog entry as /v1/health/connect returns it: a sidecar (or native) instance."""
    service: dict
    node: dict
    checks: list


@dataclass
class Fault:
    status: int | None = None
    body: bytes | None = None
    delay: float = 0.0
    drop: bool = False
    times: int | None = None


@dataclass
class Token:
    secret: str
    accessor: str
    rules: dict  # "service:<name>" or "service_prefix:<prefix>" -> "read" | "write"


class ConsulDouble:
    """The agent: state behind one lock, a condition that wakes blocking queries."""

    def __init__(self, datacenter: str = "dc1", node: str = "node-1", node_address: str = "127.0.0.1",
                 with_intermediate: bool = False):
        self.datacenter, self.node_name = datacenter, node
        self.node = {"ID": str(uuid.uuid5(uuid.NAMESPACE_DNS, node)), "Node": node,
                     "Address": node_address, "Datacenter": datacenter,
                     "TaggedAddresses": {"lan": node_address, "lan_ipv4": node_address,
                                         "wan": node_address, "wan_ipv4": node_address},
                     "Meta": {"consul-network-segment": "", "consul-version": "1.17.0"},
                     "CreateIndex": 5, "ModifyIndex": 5}
        self.lock = threading.Condition()
        self.raft_index = 10
        self.ca = CertificateAuthority()
        self.roots: list[CARoot] = [self.ca.new_root(self._bump(), with_intermediate)]
        self.roots_index = self.raft_index
        self.with_intermediate = with_intermediate
        self.leaf_ttl = LEAF_TTL
        self.leaves: dict[str, dict] = {}
        self._held_root: str | None = None   # leaves of this root stay valid during a rotation
        self.services: dict[str, dict] = {}       # agent-local services by ID
        self.instances: dict[str, list[Instance]] = {}   # health/connect by destination name
        self.health_index: dict[str, int] = {}
        # What health answers for a name nothing serves: Consul gives the services table's
        # index (so a watcher blocks), never 1; 1 with nothing listed is 1.8.7's ACL-filtered answer.
        self.unserved_index = self.raft_index
        # Encoded health answers: a real agent answers in well under a millisecond, and
        # benchmarks should measure meshgen, not this double's JSON encoder.
        self.health_bodies: dict[tuple, bytes] = {}
        self.queries: dict[str, str] = {}          # prepared query name -> service name
        self.intentions: list[tuple[str, str, str, bool]] = []
        self.intentions_index = 1
        self.config_entries: dict[tuple[str, str], dict] = {}    # (Kind, Name) -> the entry
        self.config_index = 1
        self.default_intention_policy: str | None = None
        self.acl_enabled, self.acl_default_policy = False, "allow"
        self.tokens: dict[str, Token] = {}
        self.faults: dict[str, Fault] = {}
        self.requests: dict[str, int] = {}
        self.request_log: list[tuple[str, str, dict]] = []
        # Called with (method, path) once an answer is computed, before it is sent: a test can
        # change the state between any two reads of a run.
        self.after_answer = None
        self.latency = 0.0
        self.connections: set = set()
        self.restores = 0
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, host: str = "127.0.0.1", port: int = 0, unix_socket: str | None = None,
              tls: tuple[str, str] | None = None) -> "ConsulDouble":
        """Serve on host:port, or on a unix socket; over TLS with (certfile, keyfile)."""
        if unix_socket:
            self._server = _UnixHTTPServer(unix_socket, _handler_for(self))
        else:
            self._server = _TCPHTTPServer((host, port), _handler_for(self))
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.scheme = "https" if tls else "http"
        self._server.daemon_threads = True
        self._server.request_queue_size = 256
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self._probing = threading.Event()
        threading.Thread(target=self._probe_sidecars, args=(self._probing,), daemon=True).start()
        return self

    def _probe_sidecars(self, stopped: threading.Event) -> None:
        """Consul's "Connect Sidecar Listening" check on this agent's sidecars: a TCP connect
        to the sidecar's port, critical until it listens. Consul runs it every 10 s; the double
        every 0.2 s, so that tests do not wait on it."""
        while not stopped.wait(0.2):
            with self.lock:
                local = [(dest, inst) for dest, entries in self.instances.items() for inst in entries
                         if inst.node["Node"] == self.node_name]
            for dest, inst in local:
                status = "passing" if _listening(inst.service) else "critical"
                with self.lock:
                    if inst.checks[1]["Status"] != status:
                        inst.checks[1]["Status"] = status
                        inst.checks[1]["ModifyIndex"] = self._bump()
                        self._health_changed(dest, self.raft_index)
                        self._changed()

    def stop(self) -> None:
        """Stop as an agent does: no more accepts, and every open connection closed."""
        if getattr(self, "_probing", None):
            self._probing.set()
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            for conn in list(self.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self.lock:
                self.lock.notify_all()

    @property
    def address(self) -> str:
        if isinstance(self._server, _UnixHTTPServer):
            return self._server.server_address
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    @property
    def url(self) -> str:
        if isinstance(self._server, _UnixHTTPServer):
            return f"unix://{self.address}"
        return f"{self.scheme}://{self.address}"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ test API: state
    def _bump(self) -> int:
        self.raft_index += 1
        return self.raft_index

    def _changed(self) -> None:
        self.lock.notify_all()

    def _health_changed(self, name: str, index: int) -> None:
        self.health_index[name] = index
        self.health_bodies = {k: v for k, v in self.health_bodies.items() if k[0] != name}

    def register(self, definition: dict) -> str:
        """Register a service as `consul services register` does, in the seed's shape
        ({"service": {...}} or the bare service). A `connect.sidecar_service` block is expanded
        with Consul's defaults (docs/consul-reference.md, the registration). Returns the service ID."""
        wrapped = _get(definition, "service")
        raw = wrapped if isinstance(wrapped, dict) else definition
        name = _get(raw, "Name")
        sid = _get(raw, "ID") or name
        port = _get(raw, "Port") or 0
        address = _get(raw, "Address") or ""
        with self.lock:
            if _get(raw, "Kind") == "connect-proxy":
                service = self._agent_service(raw, "connect-proxy", sid, name, port, address,
                                              _proxy(_get(raw, "Proxy") or {}, {}))
            else:
                service = self._agent_service(raw, "", sid, name, port, address, None)
            self._store(service)
            sidecar = _get(_get(raw, "Connect") or {}, "SidecarService")
            if sidecar is not None:
                proxy = _proxy(_get(sidecar, "Proxy") or {}, {
                    "DestinationServiceName": name, "DestinationServiceID": sid,
                    "LocalServiceAddress": "127.0.0.1", "LocalServicePort": port})
                sc_port = _get(sidecar, "Port") or self._free_sidecar_port()
                sc = self._agent_service(sidecar, "connect-proxy", _get(sidecar, "ID") or f"{sid}-sidecar-proxy",
                                         _get(sidecar, "Name") or f"{name}-sidecar-proxy", sc_port,
                                         _get(sidecar, "Address") or address, proxy)
                self._store(sc)
            self._changed()
        return sid

    def _agent_service(self, raw, kind, sid, name, port, address, proxy) -> dict:
        service = {}
        if kind:
            service["Kind"] = kind
        service.update({"ID": sid, "Service": name, "Tags": list(_get(raw, "Tags") or []),
                        "Meta": dict(_get(raw, "Meta") or {}), "Port": port, "Address": address})
        weights = _get(raw, "Weights") or {}
        service["Weights"] = {"Passing": _get(weights, "Passing") or 1, "Warning": _get(weights, "Warning") or 1}
        service["EnableTagOverride"] = bool(_get(raw, "EnableTagOverride"))
        if proxy is not None:
            service["Proxy"] = proxy
        service["Datacenter"] = self.datacenter
        return service

    def _free_sidecar_port(self) -> int:
        used = {s["Port"] for s in self.services.values()}
        return next(p for p in range(SIDECAR_MIN_PORT, SIDECAR_MIN_PORT + 256) if p not in used)

    def _store(self, service: dict) -> None:
        self.services[service["ID"]] = service
        if service.get("Kind") == "connect-proxy":
            dest = service["Proxy"]["DestinationServiceName"]
            entries = [i for i in self.instances.get(dest, []) if i.service["ID"] != service["ID"]
                       or i.node["Node"] != self.node_name]
            status = "passing" if _listening(service) else "critical"
            entries.append(self._instance(service, self.node, status))
            self.instances[dest] = entries
            self._health_changed(dest, self._bump())

    def _instance(self, agent_service: dict, node: dict, status: str) -> Instance:
        index = self._bump()
        svc = {k: v for k, v in agent_service.items() if k not in ("Datacenter", "ContentHash")}
        proxy = dict(svc.get("Proxy") or {})
        proxy.setdefault("Mode", "")
        proxy = {k: proxy[k] for k in sorted(proxy, key=lambda k: k != "DestinationServiceName")}
        svc["Proxy"] = proxy
        svc.update({"Connect": {}, "PeerName": "", "CreateIndex": index, "ModifyIndex": index})
        checks = [self._check(node["Node"], f"service:{svc['ID']}:1", "Connect Sidecar Listening",
                              svc["ID"], status, index),
                  self._check(node["Node"], f"service:{svc['ID']}:2",
                              f"Connect Sidecar Aliasing {proxy.get('DestinationServiceID', '')}",
                              svc["ID"], "passing", index)]
        checks.insert(0, self._check(node["Node"], "serfHealth", "Serf Health Status", "", "passing",
                                     node["CreateIndex"]))
        return Instance(svc, node, checks)

    @staticmethod
    def _check(node, check_id, name, service_id, status, index) -> dict:
        return {"Node": node, "CheckID": check_id, "Name": name, "Status": status, "Notes": "",
                "Output": "", "ServiceID": service_id, "ServiceName": service_id,
                "ServiceTags": [], "Type": "", "Interval": "", "Timeout": "", "ExposedPort": 0,
                "Definition": {}, "CreateIndex": index, "ModifyIndex": index}

    def deregister(self, service_id: str) -> None:
        with self.lock:
            service = self.services.pop(service_id)
            if service.get("Kind") == "connect-proxy":
                dest = service["Proxy"]["DestinationServiceName"]
                self.instances[dest] = [i for i in self.instances.get(dest, [])
                                        if not (i.service["ID"] == service_id and i.node["Node"] == self.node_name)]
                self._health_changed(dest, self._bump())
            self._changed()

    def update_service(self, service_id: str, mutate) -> None:
        """Re-register a local service after `mutate(agent_service_dict)` changed it."""
        with self.lock:
            service = json.loads(json.dumps(self.services[service_id]))
            mutate(service)
            self._store(service)
            self._changed()

    def add_instance(self, destination: str, address: str, port: int, *, node: str = "node-2",
                     address_on_node: bool = False, status: str = "passing", weight: int = 1,
                     datacenter: str | None = None, service_id: str | None = None, meta: dict | None = None) -> str:
        """A remote sidecar of `destination` in the catalog. With `address_on_node` the service
        address is empty and `address` is the node's, to exercise BestAddress's fallback."""
        with self.lock:
            sid = service_id or f"{destination}-sidecar-proxy-{len(self.instances.get(destination, [])) + 1}"
            node_obj = dict(self.node, ID=str(uuid.uuid5(uuid.NAMESPACE_DNS, node)), Node=node,
                            Address=address if address_on_node else "10.0.0.12",
                            Datacenter=datacenter or self.datacenter)
            svc = {"Kind": "connect-proxy", "ID": sid, "Service": f"{destination}-sidecar-proxy",
                   "Tags": [], "Meta": dict(meta or {}), "Port": port, "Address": "" if address_on_node else address,
                   "Weights": {"Passing": weight, "Warning": 1}, "EnableTagOverride": False,
                   "Proxy": {"DestinationServiceName": destination, "DestinationServiceID": destination,
                             "LocalServiceAddress": "127.0.0.1", "LocalServicePort": 1,
                             "MeshGateway": {}, "Expose": {}}}
            self.instances.setdefault(destination, []).append(self._instance(svc, node_obj, status))
            self._health_changed(destination, self._bump())
            self._changed()
            return sid

    def set_status(self, destination: str, service_id: str, status: str) -> None:
        with self.lock:
            for inst in self.instances.get(destination, []):
                if inst.service["ID"] == service_id:
                    inst.checks[1]["Status"] = status
                    inst.checks[1]["ModifyIndex"] = self._bump()
            self._health_changed(destination, self.raft_index)
            self._changed()

    def remove_instance(self, destination: str, service_id: str) -> None:
        with self.lock:
            self.instances[destination] = [i for i in self.instances.get(destination, [])
                                           if i.service["ID"] != service_id]
            self._health_changed(destination, self._bump())
            self._changed()

    def set_weight(self, destination: str, service_id: str, weight: int) -> None:
        with self.lock:
            for inst in self.instances.get(destination, []):
                if inst.service["ID"] == service_id:
                    inst.service["Weights"]["Passing"] = weight
            self._health_changed(destination, self._bump())
            self._changed()

    def remove_instances(self, destination: str) -> None:
        with self.lock:
            self.instances[destination] = []
            self._health_changed(destination, self._bump())
            self._changed()

    def reset_health_index(self, destination: str, index: int) -> None:
        """Make an index go backwards, as after a snapshot restore (docs/consul-reference.md, blocking queries). A restore
        abandons the state store's watches, so blocked queries answer at once."""
        with self.lock:
            self._health_changed(destination, index)
            self.restores += 1
            self._changed()

    def add_prepared_query(self, name: str, service: str) -> None:
        with self.lock:
            self.queries[name] = service

    def rotate_root(self, reissue_leaves: bool = True) -> None:
        """A CA rotation: a new active root, the old one kept with Active=false, and leaves
        re-issued by the new root on their next fetch. Consul re-issues leaves 0-30 s after the
        roots change; `reissue_leaves=False` holds them back until `reissue_leaves()`."""
        with self.lock:
            self.roots.append(self.ca.new_root(self._bump(), self.with_intermediate))
            self.roots_index = self.raft_index
            self._held_root = None if reissue_leaves else self.roots[-2].id
            if reissue_leaves:
                self.leaves.clear()
            self._changed()

    def reissue_leaves(self) -> None:
        with self.lock:
            self._held_root = None
            self.leaves.clear()
            self._changed()

    def drop_old_roots(self) -> None:
        with self.lock:
            self.roots = self.roots[-1:]
            self.roots_index = self._bump()
            self._changed()

    def renew_leaf(self, service: str) -> None:
        with self.lock:
            self.leaves.pop(service, None)
            self._issue_leaf(service)
            self._changed()

    def set_intention(self, source: str, destination: str, action: str, l7: bool = False,
                      permissions: list | None = None) -> None:
        """An L4 intention, or with `permissions` (or l7=True: one allowing every path) an L7
        one, which has Permissions and no Action (1.9+)."""
        if l7 and permissions is None:
            permissions = [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]
        with self.lock:
            self._set_intentions([i for i in self.intentions if (i[0], i[1]) != (source, destination)]
                                 + [(source, destination, action, permissions)])

    def delete_intention(self, source: str, destination: str) -> None:
        with self.lock:
            self._set_intentions([i for i in self.intentions if (i[0], i[1]) != (source, destination)])

    def _set_intentions(self, intentions: list) -> None:
        self.intentions = intentions
        self.intentions_index = self._bump()
        self._changed()

    def enable_acls(self, default_policy: str = "deny") -> None:
        with self.lock:
            self.acl_enabled, self.acl_default_policy = True, default_policy
            self.health_bodies.clear()

    def add_token(self, rules: dict, secret: str | None = None) -> str:
        with self.lock:
            token = Token(secret or str(uuid.uuid4()), str(uuid.uuid4()), rules)
            self.tokens[token.secret] = token
            self.health_bodies.clear()
            return token.secret

    def inject(self, path_prefix: str, *, status: int | None = None, body: bytes | str | None = None,
               delay: float = 0.0, drop: bool = False, times: int | None = None) -> None:
        """Make requests whose path starts with `path_prefix` fail: a status and body, a delay,
        or a dropped connection; for `times` requests or until `clear_faults`."""
        if isinstance(body, str):
            body = body.encode()
        self.faults[path_prefix] = Fault(status, body, delay, drop, times)

    def clear_faults(self) -> None:
        self.faults.clear()

    def count(self, path_prefix: str = "") -> int:
        return sum(n for path, n in self.requests.items() if path.startswith(path_prefix))

    # ------------------------------------------------------------------ leaf issuing
    @property
    def active_root(self) -> CARoot:
        return self.roots[-1]

    def service_uri(self, service: str) -> str:
        return f"spiffe://{self.ca.trust_domain}/ns/default/dc/{self.datacenter}/svc/{service}"

    def _issue_leaf(self, service: str) -> dict:
        cert, key = self.ca.issue_leaf(self.active_root, self.service_uri(service), ttl=self.leaf_ttl)
        index = self._bump()
        chain = _pem(cert) + (_pem(self.active_root.intermediate) if self.active_root.intermediate else "")
        leaf = {"SerialNumber": _colon_hex(cert.serial_number.to_bytes(
                    (cert.serial_number.bit_length() + 7) // 8 or 1, "big")),
                "CertPEM": chain,
                "PrivateKeyPEM": key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.TraditionalOpenSSL,
                                                   serialization.NoEncryption()).decode(),
                "Service": service, "ServiceURI": self.service_uri(service),
                "ValidAfter": _rfc3339(cert.not_valid_before_utc),
                "ValidBefore": _rfc3339(cert.not_valid_after_utc),
                "CreateIndex": index, "ModifyIndex": index,
                "_root": self.active_root.id, "_serial": cert.serial_number,
                "_soft_expiry": time.time() + random.uniform(0.6, 0.9) * self.leaf_ttl.total_seconds()}
        self.leaves[service] = leaf
        return leaf

    def _current_leaf(self, service: str) -> dict:
        leaf = self.leaves.get(service)
        signed_by_current = leaf is not None and leaf["_root"] in (self.active_root.id, self._held_root)
        if not signed_by_current or time.time() >= leaf["_soft_expiry"]:
            leaf = self._issue_leaf(service)
        return leaf

    # ------------------------------------------------------------------ ACL
    def _token(self, secret: str | None) -> Token | None:
        if not self.acl_enabled:
            return None
        if secret is None or secret == "":
            return Token("", "", {"service_prefix:": self.acl_default_policy}
                         if self.acl_default_policy == "allow" else {})
        token = self.tokens.get(secret)
        if token is None:
            raise HTTPError(403, "ACL not found")
        return token

    def _allowed(self, token: Token | None, name: str, access: str) -> bool:
        if token is None:
            return True
        policy = token.rules.get(f"service:{name}")
        if policy is None:
            prefixes = [p for p in token.rules if p.startswith("service_prefix:")
                        and name.startswith(p.split(":", 1)[1])]
            if prefixes:
                policy = token.rules[max(prefixes, key=len)]
        return policy == "write" or (policy == "read" and access == "read")

    def _require(self, token: Token | None, name: str, access: str) -> None:
        if self._allowed(token, name, access):
            return
        if token.secret == "":
            raise HTTPError(403, f"Permission denied: anonymous token lacks permission 'service:{access}' "
                                 f"on \"{name}\". The anonymous token is used implicitly when a request "
                                 "does not specify a token.")
        raise HTTPError(403, f"Permission denied: token with AccessorID '{token.accessor}' lacks "
                             f"permission 'service:{access}' on \"{name}\"")

    # ------------------------------------------------------------------ blocking
    def _block(self, current, query: dict, deadline_of=None) -> None:
        """Index blocking (docs/consul-reference.md): wait while `current()` <= index, up to `wait` plus jitter."""
        if "index" not in query:
            return
        index = _parse_index(query["index"])
        if index == 0:
            return
        wait = _parse_wait(query.get("wait"))
        deadline = time.monotonic() + wait + random.uniform(0, wait / 16)
        restores = self.restores
        while current() <= index and self.restores == restores:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.lock.wait(remaining)

    # ------------------------------------------------------------------ endpoints
    def handle(self, method: str, path: str, query: dict, headers: dict, body: bytes):
        route = self._route(method, path)
        for name in ("ns", "partition"):
            if name in query:
                raise HTTPError(400, f'Invalid query parameter: "{name}" - '
                                     f'{"Namespaces" if name == "ns" else "Partitions"} are a Consul Enterprise feature')
        for header, what in (("X-Consul-Namespace", "Namespaces"), ("X-Consul-Partition", "Partitions")):
            if headers.get(header.lower()):
                raise HTTPError(400, f'Invalid header: "{header}" - {what} are a Consul Enterprise feature')
        if "stale" in query and "consistent" in query:
            raise HTTPError(400, "Cannot specify ?stale with ?consistent, conflicting semantics.")
        secret = _token_from(query, headers)
        handler, arg = route
        with self.lock:
            return handler(arg, query, secret, body)

    def _route(self, method: str, path: str):
        routes = [
            (r"/v1/agent/service/(.+)", ("GET",), self._agent_service_ep),
            (r"/v1/agent/services", ("GET",), self._agent_services_ep),
            (r"/v1/agent/connect/ca/roots", ("GET",), self._roots_ep),
            (r"/v1/agent/connect/ca/leaf/(.+)", ("GET",), self._leaf_ep),
            (r"/v1/agent/connect/authorize", ("POST",), self._authorize_ep),
            (r"/v1/health/connect/(.*)", ("GET",), self._health_ep),
            (r"/v1/health/state/([^/]+)", ("GET",), self._checks_in_state_ep),
            (r"/v1/catalog/connect/(.*)", ("GET",), self._catalog_ep),
            (r"/v1/query/([^/]+)/execute", ("GET",), self._query_ep),
            (r"/v1/agent/self", ("GET",), self._self_ep),
            (r"/v1/discovery-chain/(.+)", ("GET", "POST"), self._chain_ep),
            (r"/v1/config", ("PUT",), self._config_put_ep),
            (r"/v1/config/(.+)", ("GET", "DELETE"), self._config_ep),
            (r"/v1/connect/intentions/exact", ("PUT", "DELETE"), self._intention_ep),
            (r"/v1/connect/intentions/match", ("GET",), self._intentions_match_ep),
            (r"/v1/connect/intentions", ("GET", "POST"), self._intentions_ep),
            (r"/v1/connect/intentions/([^/]+)", ("GET", "PUT", "DELETE"), self._intention_by_id_ep),
        ]
        for pattern, methods, handler in routes:
            match = re.fullmatch(pattern, path)
            if match:
                if method not in methods:
                    raise HTTPError(405, f"method {method} not allowed",
                                    {"Allow": ",".join(("OPTIONS",) + methods)})
                arg = unquote(match.group(1)) if match.groups() else None
                if handler in (self._intentions_ep, self._intention_by_id_ep, self._config_ep, self._chain_ep):
                    return functools.partial(handler, method), arg
                return handler, arg
        raise HTTPError(404, "Invalid URL path: not a recognized HTTP API endpoint\n")

    def _agent_service_ep(self, service_id, query, secret, body):
        if service_id not in self.services:
            raise HTTPError(404, f"unknown service ID: {service_id}")
        token = self._token(secret)
        self._require(token, self.services[service_id]["Service"], "read")
        if "hash" in query:
            wait = _parse_wait(query.get("wait"))
            deadline = time.monotonic() + wait + random.uniform(0, wait / 16)
            while (service_id in self.services and _content_hash(self.services[service_id]) == query["hash"]
                   and time.monotonic() < deadline):
                self.lock.wait(deadline - time.monotonic())
            if service_id not in self.services:
                raise HTTPError(404, f"unknown service ID: {service_id}")
        service = dict(self.services[service_id])
        content_hash = _content_hash(service)
        ordered = {k: v for k, v in service.items() if k not in ("Proxy", "Datacenter")}
        ordered["ContentHash"] = content_hash
        if "Proxy" in service:
            ordered["Proxy"] = service["Proxy"]
        ordered["Datacenter"] = service["Datacenter"]
        return 200, ordered, {"X-Consul-ContentHash": content_hash}

    def _agent_services_ep(self, _, query, secret, body):
        token = self._token(secret)
        selected = {sid: s for sid, s in self.services.items() if self._allowed(token, s["Service"], "read")}
        if "filter" in query:
            predicate = _filter(query["filter"])
            selected = {sid: s for sid, s in selected.items() if predicate(s)}
        headers = {}
        if secret and len(selected) < len(self.services):
            headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
        return 200, {sid: {k: v for k, v in s.items()} for sid, s in sorted(selected.items())}, headers

    def _roots_json(self) -> dict:
        active = self.active_root.id
        roots = []
        for root in self.roots:
            roots.append({
                "ID": root.id, "Name": "Consul CA Primary Cert",
                "SerialNumber": root.cert.serial_number,
                "SigningKeyID": _colon_hex(_key_id(root.signer[1].public_key())),
                "ExternalTrustDomain": self.ca.cluster_id,
                "NotBefore": _rfc3339(root.cert.not_valid_before_utc),
                "NotAfter": _rfc3339(root.cert.not_valid_after_utc),
                "RootCert": _pem(root.cert),
                "IntermediateCerts": [_pem(root.intermediate)] if root.intermediate else None,
                "Active": root.id == active, "PrivateKeyType": "ec", "PrivateKeyBits": 256,
                "CreateIndex": root.create_index, "ModifyIndex": root.create_index})
        return {"ActiveRootID": active, "TrustDomain": self.ca.trust_domain, "Roots": roots}

    def _roots_ep(self, _, query, secret, body):
        self._block(lambda: self.roots_index, query)
        return 200, self._roots_json(), _meta(self.roots_index, cache=True)

    def _leaf_ep(self, service, query, secret, body):
        self._require(self._token(secret), service, "write")
        leaf = self._current_leaf(service)
        if "index" in query and _parse_index(query["index"]) != 0:
            self._block(lambda: self._current_leaf(service)["ModifyIndex"], query)
            leaf = self._current_leaf(service)
        public = {k: v for k, v in leaf.items() if not k.startswith("_")}
        return 200, public, {"X-Consul-Index": str(max(1, leaf["ModifyIndex"])), "X-Cache": "MISS"}

    def _authorize_ep(self, _, query, secret, body):
        fields = _decode_strict(body, ("Target", "ClientCertURI", "ClientCertSerial"))
        target = _get(fields, "Target") or ""
        if not target:
            raise HTTPError(400, "Target service must be specified")
        uri = _get(fields, "ClientCertURI") or ""
        source = _parse_service_uri(uri)
        token = self._token(secret)
        self._require(token, target, "write")
        for precedence, (src, dst) in ((9, (source, target)), (8, ("*", target)),
                                       (6, (source, "*")), (5, ("*", "*"))):
            for i_src, i_dst, action, l7 in self.intentions:
                if (i_src, i_dst) == (src, dst):
                    text = (f"default/{i_src} => default/{i_dst} "
                            f"(Precedence: {precedence}, Action: {action.upper()})")
                    if l7:
                        return 200, {"Authorized": False, "Reason": f"Matched L7 intention: {text}"}, {}
                    return 200, {"Authorized": action == "allow",
                                 "Reason": f"Matched L4 intention: {text}"}, {}
        if self.default_intention_policy:
            return 200, {"Authorized": self.default_intention_policy == "allow",
                         "Reason": "Default intention policy"}, {}
        allowed = not self.acl_enabled or self.acl_default_policy == "allow"
        return 200, {"Authorized": allowed, "Reason": "Default behavior configured by ACLs"}, {}

    def _health_entries(self, name: str, query: dict, secret) -> list[dict]:
        token = self._token(secret)
        dc = query.get("dc", self.datacenter)
        passing = _parse_passing(query)
        entries = []
        for inst in self.instances.get(name, []):
            if inst.node["Datacenter"] != dc:
                continue
            if passing and any(c["Status"] != "passing" for c in inst.checks):
                continue
            if "filter" in query and not _filter(query["filter"])({"Service": inst.service, "Node": inst.node}):
                continue
            if not self._allowed(token, inst.service["Service"], "read"):
                continue
            entries.append({"Node": inst.node, "Service": inst.service, "Checks": inst.checks})
        return entries

    def _health_ep(self, name, query, secret, body):
        if not name:
            raise HTTPError(400, "Missing service name")
        self._check_dc(query)
        _parse_passing(query)
        self._block(lambda: self.health_index.get(name, self.unserved_index), query)
        key = (name, query.get("dc"), _parse_passing(query), query.get("filter"), secret, "pretty" in query)
        if key not in self.health_bodies:
            self.health_bodies[key] = _encode(self._health_entries(name, query, secret), "pretty" in query)
        headers = _meta(self.health_index.get(name, self.unserved_index))
        token = self._token(secret)
        if any(not self._allowed(token, inst.service["Service"], "read") for inst in self.instances.get(name, [])):
            headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
        return 200, self.health_bodies[key], headers

    def _checks_index(self) -> int:
        """The checks table's index: any instance's check, or an instance registered or gone with
        its checks, moves it (so on Consul 1.8.7 too, checked there)."""
        return max([self.unserved_index, *self.health_index.values()])

    def _checks_in_state_ep(self, state, query, secret, body):
        if state not in ("any", "passing", "warning", "critical"):
            raise HTTPError(400, f"Bad check state {state!r}")
        self._check_dc(query)
        self._block(self._checks_index, query)
        token = self._token(secret)
        predicate = _filter(query["filter"]) if "filter" in query else (lambda check: True)
        checks = [check for instances in self.instances.values() for inst in instances for check in inst.checks
                  if (state == "any" or check["Status"] == state) and predicate(check)
                  and self._allowed(token, inst.service["Service"], "read")]
        return 200, checks, _meta(self._checks_index())

    def _catalog_ep(self, name, query, secret, body):
        if not name:
            raise HTTPError(400, "Missing service name")
        self._check_dc(query)
        self._block(lambda: self.health_index.get(name, self.unserved_index), query)
        flat = []
        for entry in self._health_entries(name, {k: v for k, v in query.items() if k != "passing"}, secret):
            node, svc = entry["Node"], entry["Service"]
            flat.append({"ID": node["ID"], "Node": node["Node"], "Address": node["Address"],
                         "Datacenter": node["Datacenter"], "TaggedAddresses": node["TaggedAddresses"],
                         "NodeMeta": node["Meta"], "ServiceKind": svc.get("Kind", ""),
                         "ServiceID": svc["ID"], "ServiceName": svc["Service"],
                         "ServiceTags": svc["Tags"], "ServiceAddress": svc["Address"],
                         "ServiceWeights": svc["Weights"], "ServiceMeta": svc["Meta"],
                         "ServicePort": svc.get("Port", 0), "ServiceSocketPath": "",
                         "ServiceEnableTagOverride": False, "ServiceProxy": svc["Proxy"],
                         "ServiceConnect": {}, "ServiceLocality": None,
                         "CreateIndex": svc["CreateIndex"], "ModifyIndex": svc["ModifyIndex"]})
        return 200, flat, _meta(self.health_index.get(name, self.unserved_index))

    def _query_ep(self, name, query, secret, body):
        if name not in self.queries:
            raise HTTPError(404, "Query not found")
        connect = query.get("connect", "false")
        if connect.lower() not in ("1", "t", "true", "0", "f", "false", ""):
            raise HTTPError(500, f"Error parsing 'connect' value: strconv.ParseBool: parsing \"{connect}\": invalid syntax")
        service = self.queries[name]
        nodes = self._health_entries(service, {"passing": "", **({"dc": query["dc"]} if "dc" in query else {})}, secret)
        return 200, {"Service": service, "Nodes": nodes, "DNS": {"TTL": ""},
                     "Datacenter": query.get("dc", self.datacenter), "PeerName": "", "Failovers": 0,
                     "Index": 0, "LastContact": 0, "KnownLeader": True, "ConsistencyLevel": "",
                     "NotModified": False, "Backend": 0, "ResultsFilteredByACLs": False}, _meta(self.raft_index)

    def _self_ep(self, _, query, secret, body):
        return 200, {"Config": {"Datacenter": self.datacenter, "NodeName": self.node_name,
                                "NodeID": self.node["ID"], "Version": "1.17.0"},
                     "Member": {"Name": self.node_name, "Addr": self.node["Address"]}}, {}

    def _intention_ep(self, _, query, secret, body):
        """PUT (upsert) or DELETE /v1/connect/intentions/exact?source=S&destination=D: how the
        demo and a user flip intentions. No ACL check here (Consul wants intentions:write)."""
        source, destination = query.get("source", ""), query.get("destination", "")
        if not source or not destination:
            raise HTTPError(400, "required query parameter 'source' and 'destination' not set")
        if body:
            action = str(_get(_decode_strict(body, ("Action", "Description", "Meta")), "Action") or "")
            if action not in ("allow", "deny"):
                raise HTTPError(400, f'Invalid intention: action must be "allow" or "deny", got "{action}"')
            self.set_intention(source, destination, action)
        else:
            self._set_intentions([i for i in self.intentions if (i[0], i[1]) != (source, destination)])
        return 200, True, {}

    # The API every version has (1.8 has no /exact): list, create, update and delete by ID.
    # An intention's ID is derived from its source and destination, which identify it.

    def _intention_json(self, source: str, destination: str, action: str) -> dict:
        return {"ID": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{source}=>{destination}")),
                "SourceNS": "default", "SourceName": source, "DestinationNS": "default",
                "DestinationName": destination, "SourceType": "consul", "Action": action}

    def _intention_from_body(self, body: bytes) -> tuple[str, str, str]:
        data = _decode_strict(body, ("SourceName", "DestinationName", "Action", "SourceType",
                                     "SourceNS", "DestinationNS", "Description", "Meta"))
        source, destination = str(_get(data, "SourceName") or ""), str(_get(data, "DestinationName") or "")
        action = str(_get(data, "Action") or "")
        if not source or not destination:
            raise HTTPError(400, "Invalid intention: SourceName and DestinationName must be set")
        if action not in ("allow", "deny"):
            raise HTTPError(400, f'Invalid intention: action must be "allow" or "deny", got "{action}"')
        return source, destination, action

    def _intentions_ep(self, method, _, query, secret, body):
        if method == "GET":
            self._block(lambda: self.intentions_index, query)
            return 200, [self._intention_json(s, d, a) for s, d, a, _ in self.intentions], _meta(self.intentions_index)
        source, destination, action = self._intention_from_body(body)
        if any((i[0], i[1]) == (source, destination) for i in self.intentions):
            raise HTTPError(500, "duplicate intention found")
        self.set_intention(source, destination, action)
        return 200, {"ID": self._intention_json(source, destination, action)["ID"]}, {}

    def _intention_by_id_ep(self, method, intention_id, query, secret, body):
        current = [i for i in self.intentions
                   if self._intention_json(i[0], i[1], i[2])["ID"] == intention_id]
        if not current:
            raise HTTPError(404, "Intention not found")
        source, destination, action, _ = current[0]
        if method == "GET":
            return 200, self._intention_json(source, destination, action), {}
        self._set_intentions([i for i in self.intentions if i is not current[0]])
        if method == "PUT":
            self.set_intention(*self._intention_from_body(body))
        return 200, True, {}

    # Precedence of (source, destination) patterns: exact beats *, the destination first.
    _PRECEDENCE = {(False, False): 9, (True, False): 8, (False, True): 6, (True, True): 5}

    def _intentions_match_ep(self, _, query, secret, body):
        """GET /v1/connect/intentions/match?by=destination&name=X (docs/consul-reference.md): the intentions
        that apply to X, highest precedence first; an L7 one carries Permissions, no Action."""
        if query.get("by") != "destination" or not query.get("name"):
            raise HTTPError(400, "required query parameter 'by' set to 'destination' and 'name'")
        name = query["name"]
        self._require(self._token(secret), name, "read")
        self._block(lambda: self.intentions_index, query)
        matching = []
        for source, destination, action, l7 in self.intentions:
            if destination in (name, "*"):
                entry = dict(self._intention_json(source, destination, action),
                             Precedence=self._PRECEDENCE[(source == "*", destination == "*")])
                if l7:
                    del entry["Action"]
                    entry["Permissions"] = l7
                matching.append(entry)
        matching.sort(key=lambda entry: -entry["Precedence"])
        return 200, {name: matching}, _meta(self.intentions_index)

    # ------------------------------------------------------------------ config entries, chains
    # Config entries as `PUT /v1/config` takes them, and the discovery chain Consul compiles
    # from them (docs/consul-reference.md, the discovery chain): resolvers (subsets, default subset, redirect, failover, connect
    # timeout), splitters and routers, for one datacenter and the default namespace.

    def set_config(self, entry: dict) -> None:
        kind, name = entry["Kind"], entry["Name"]
        if kind in ("service-splitter", "service-router") and self._protocol(name) == "tcp":
            raise HTTPError(500, f'discovery chain "{name}" uses a protocol "tcp" that does not permit '
                                 "advanced routing or splitting")
        with self.lock:
            self.config_entries[kind, name] = entry
            self.config_index = self._bump()
            self.lock.notify_all()

    def delete_config(self, kind: str, name: str) -> None:
        with self.lock:
            self.config_entries.pop((kind, name), None)
            self.config_index = self._bump()
            self.lock.notify_all()

    def _config_put_ep(self, _, query, secret, body):
        self._require(self._token(secret), "", "write")
        entry = json.loads(body or b"{}")
        if not entry.get("Kind") or not entry.get("Name"):
            raise HTTPError(400, "Request decoding failed: Kind and Name are required")
        self.set_config(entry)
        return 200, True, {}

    def _config_ep(self, method, path, query, secret, body):
        kind, _, name = path.partition("/")
        if method == "DELETE":
            self._require(self._token(secret), "", "write")
            self.delete_config(kind, name)
            return 200, True, {}
        if (kind, name) not in self.config_entries:
            raise HTTPError(404, f"Config entry not found for {kind!r} / {name!r}")
        return 200, self.config_entries[kind, name], _meta(self.config_index)

    def _protocol(self, service: str) -> str:
        defaults = self.config_entries.get(("service-defaults", service), {})
        proxy = self.config_entries.get(("proxy-defaults", "global"), {}).get("Config") or {}
        return (defaults.get("Protocol") or proxy.get("protocol") or "tcp").lower()

    def _chain_ep(self, method, service, query, secret, body):
        self._require(self._token(secret), service, "read")
        overrides = json.loads(body) if method == "POST" and body else {}
        self._block(lambda: self.config_index, query)
        chain = _ChainCompiler(self, service, query.get("compile-dc") or self.datacenter,
                               overrides.get("OverrideProtocol") or "", overrides.get("OverrideConnectTimeout") or "")
        return 200, {"Chain": chain.compile()}, _meta(self.config_index)

    def _check_dc(self, query: dict) -> None:
        dc = query.get("dc")
        if dc and dc != self.datacenter and not any(
                i.node["Datacenter"] == dc for entries in self.instances.values() for i in entries):
            raise HTTPError(500, "No path to datacenter")


class _ChainCompiler:
    """Consul's discovery-chain compiler, for what the double models (see set_config)."""

    def __init__(self, agent: ConsulDouble, service: str, datacenter: str, protocol: str, connect_timeout: str):
        self.agent, self.service, self.dc = agent, service, datacenter
        self.protocol = protocol or agent._protocol(service)
        self.connect_timeout = connect_timeout
        self.overrides = {key: value for key, value in (("OverrideProtocol", protocol),
                                                         ("OverrideConnectTimeout", connect_timeout)) if value}
        self.nodes, self.targets = {}, {}

    def entry(self, kind: str, name: str) -> dict | None:
        return self.agent.config_entries.get((kind, name))

    def compile(self) -> dict:
        router = self.entry("service-router", self.service) if self.protocol != "tcp" else None
        start = self.router(router) if router else self.split_or_resolve(self.service)
        chain = {"ServiceName": self.service, "Namespace": "default", "Datacenter": self.dc}
        if self.overrides:      # Consul's is a hash of the overrides too (its value differs)
            chain["CustomizationHash"] = f"{zlib.crc32(json.dumps(self.overrides, sort_keys=True).encode()):08x}"
        return dict(chain, Protocol=self.protocol, StartNode=start, Nodes=self.nodes, Targets=self.targets)

    def router(self, router: dict) -> str:
        routes = []
        catch_all = {"Match": {"HTTP": {"PathPrefix": "/"}}, "Destination": {"Service": self.service}}
        for route in (router.get("Routes") or []) + [catch_all]:
            destination = dict(route.get("Destination") or {})
            if not destination.get("Service"):
                destination.setdefault("Namespace", "default")     # as 1.8.7 normalizes it
            elif route is catch_all:
                destination["Namespace"] = "default"
            nxt = self.split_or_resolve(destination.get("Service") or self.service, destination.get("ServiceSubset", ""))
            routes.append({"Definition": {"Match": route.get("Match") or {"HTTP": {"PathPrefix": "/"}},
                                          "Destination": destination}, "NextNode": nxt})
        name = f"router:{self.service}.default"
        self.nodes[name] = {"Type": "router", "Name": f"{self.service}.default", "Routes": routes}
        return name

    def split_or_resolve(self, service: str, subset: str = "") -> str:
        splitter = self.entry("service-splitter", service) if self.protocol != "tcp" else None
        if subset or not splitter:
            return self.resolve(service, subset)
        name = f"splitter:{service}.default"
        self.nodes[name] = {"Type": "splitter", "Name": f"{service}.default", "Splits": [
            {"Weight": split["Weight"], "NextNode": self._split_to(service, split)} for split in splitter["Splits"]]}
        return name

    def _split_to(self, service: str, split: dict) -> str:
        """A split to the splitter's own service goes to its resolver, as Consul compiles it."""
        other = split.get("Service") or service
        if other == service:
            return self.resolve(service, split.get("ServiceSubset", ""))
        return self.split_or_resolve(other, split.get("ServiceSubset", ""))

    def resolve(self, service: str, subset: str, depth: int = 0) -> str:
        resolver = self.entry("service-resolver", service) or {}
        redirect = resolver.get("Redirect")
        if redirect and depth < 8:
            return self.resolve(redirect.get("Service") or service, redirect.get("ServiceSubset", ""), depth + 1)
        subset = subset or resolver.get("DefaultSubset", "")
        target = self.target(service, subset)
        body = {"ConnectTimeout": self.connect_timeout or resolver.get("ConnectTimeout") or "5s", "Target": target}
        if not resolver:
            body["Default"] = True
        failover = (resolver.get("Failover") or {})
        failover = failover.get(subset) or failover.get("*")
        if failover:
            body["Failover"] = {"Targets": [self.target(failover.get("Service") or service,
                                                        failover.get("ServiceSubset", ""), dc)
                                            for dc in failover.get("Datacenters") or [self.dc]]}
        name = f"resolver:{target}"
        self.nodes[name] = {"Type": "resolver", "Name": target, "Resolver": body}
        return name

    def target(self, service: str, subset: str, dc: str | None = None) -> str:
        dc = dc or self.dc
        resolver = self.entry("service-resolver", service) or {}
        target_id = f"{subset + '.' if subset else ''}{service}.default.{dc}"
        definition = (resolver.get("Subsets") or {}).get(subset) or {} if subset else {}
        sni = f"{target_id}.internal.{self.agent.ca.cluster_id}.consul"
        self.targets[target_id] = {"ID": target_id, "Service": service, **({"ServiceSubset": subset} if subset else {}),
                                   "Namespace": "default", "Datacenter": dc, "MeshGateway": {},
                                   "Subset": definition, "SNI": sni, "Name": sni}
        return target_id


# --------------------------------------------------------------------------- request parsing

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _parse_wait(value: str | None) -> float:
    """Go's time.ParseDuration, default 5 min, capped at 10 min."""
    if value is None:
        return DEFAULT_WAIT
    if not re.fullmatch(r"(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+", value):
        raise HTTPError(400, "Invalid wait time")
    return min(MAX_WAIT, sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(value)))


def _parse_index(value: str) -> int:
    if not value.isdigit():
        raise HTTPError(400, "Invalid index")
    return int(value)


def _parse_passing(query: dict) -> bool:
    if "passing" not in query:
        return False
    value = query["passing"]
    if value == "":
        return True
    if value.lower() in ("1", "t", "true"):
        return True
    if value.lower() in ("0", "f", "false"):
        return False
    raise HTTPError(400, "Invalid value for ?passing")


def _token_from(query: dict, headers: dict) -> str | None:
    if "token" in query:
        return query["token"]
    if headers.get("x-consul-token"):
        return headers["x-consul-token"]
    auth = headers.get("authorization", "")
    scheme, _, rest = auth.partition(" ")
    if rest and scheme.lower() == "bearer":
        return rest.split(" ")[0]
    return None


def _decode_strict(body: bytes, allowed: tuple[str, ...]) -> dict:
    """lib.DecodeJSON: unknown fields are refused, key case is free."""
    if not body.strip():
        raise HTTPError(400, "Request decode failed: EOF")
    try:
        data = json.loads(body)
    except ValueError:
        raise HTTPError(400, "Request decode failed: invalid character in JSON") from None
    if not isinstance(data, dict):
        raise HTTPError(400, "Request decode failed: json: cannot unmarshal into Go value")
    for key in data:
        if key.lower() not in {a.lower() for a in allowed}:
            raise HTTPError(400, f'Request decode failed: json: unknown field "{key}"')
    return data


_SERVICE_PATH = re.compile(r"(?:/ap/([^/]+))?/ns/([^/]+)/dc/([^/]+)/svc/([^/]+)")
_OTHER_PATHS = re.compile(r"|/agent/client/dc/[^/]+/id/[^/]+|/agent/server/dc/[^/]+|/gateway/mesh/dc/[^/]+")


def _parse_service_uri(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.scheme != "spiffe" or not parts.netloc:
        raise HTTPError(400, "ClientCertURI not a valid Connect identifier")
    match = _SERVICE_PATH.fullmatch(parts.path)
    if match:
        return unquote(match.group(4))
    if _OTHER_PATHS.fullmatch(parts.path):
        raise HTTPError(400, "ClientCertURI not a valid Service identifier")
    raise HTTPError(400, "ClientCertURI not a valid Connect identifier")


def _filter(expression: str):
    """The subset of go-bexpr that sidecar lookups use: `Selector == "value"` joined by `and`."""
    clauses = []
    for clause in re.split(r"\s+and\s+", expression.strip()):
        match = re.fullmatch(r'([A-Za-z.]+)\s*==\s*(?:"([^"]*)"|([A-Za-z0-9_.-]+))', clause.strip())
        if not match:
            raise HTTPError(500, "rpc error making call: Failed to create boolean expression evaluator: "
                                 f"1:1 (0): no match found, expected: {expression!r}")
        clauses.append((match.group(1).split("."), match.group(2) if match.group(2) is not None else match.group(3)))

    def select(obj, path):
        for part in path:
            obj = obj.get(part) if isinstance(obj, dict) else None
        return obj

    return lambda service: all(select(service, path) == value for path, value in clauses)


def _content_hash(service: dict) -> str:
    material = json.dumps({k: v for k, v in service.items() if k not in ("Datacenter", "ContentHash")},
                          sort_keys=True).encode()
    return format(int.from_bytes(hashlib.sha256(material).digest()[:8], "big"), "x")


def _encode(payload, pretty: bool) -> bytes:
    """Compact JSON without a newline, or ?pretty: 4-space indents and a newline, as Consul's `?pretty` gives."""
    if pretty:
        return json.dumps(payload, indent=4).encode() + b"\n"
    return json.dumps(payload, separators=(",", ":")).encode()


def _listening(service: dict) -> bool:
    """Whether a sidecar's port accepts a TCP connection, as Consul's check on it tests."""
    try:
        socket.create_connection((service.get("Address") or "127.0.0.1", service["Port"]), timeout=0.2).close()
        return True
    except OSError:
        return False


def _meta(index: int, cache: bool = False) -> dict:
    headers = {"X-Consul-Index": str(max(1, index)), "X-Consul-KnownLeader": "true",
               "X-Consul-LastContact": "0"}
    if cache:
        headers["X-Cache"] = "MISS"
    return headers


def _rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- HTTP plumbing

class _QuietErrors:
    """A client that hangs up mid-request (HAProxy stopping, a test ending) is not an error."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class _TCPHTTPServer(_QuietErrors, ThreadingHTTPServer):
    pass


class _UnixHTTPServer(_QuietErrors, socketserver.ThreadingUnixStreamServer):
    def get_request(self):
        request, _ = super().get_request()
        return request, ("local", 0)

def _handler_for(agent: ConsulDouble):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def setup(self):
            super().setup()
            # Go's net/http sets TCP_NODELAY; without it headers and body sent apart meet the
            # client's delayed ACK and every keep-alive response waits ~40 ms.
            if self.connection.family in (socket.AF_INET, socket.AF_INET6):
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            agent.connections.add(self.connection)

        def finish(self):
            agent.connections.discard(self.connection)
            super().finish()

        def _read_body(self) -> bytes:
            # Go's server takes chunked bodies; HAProxy 3.0's httpclient sends one even when
            # the request names a Content-Length.
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                body = b""
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return body
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _serve(self, method: str) -> None:
            parts = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
            body = self._read_body()
            headers = {k.lower(): v for k, v in self.headers.items()}
            with agent.lock:
                agent.requests[parts.path] = agent.requests.get(parts.path, 0) + 1
                agent.request_log.append((method, parts.path, dict(query, **(
                    {"_token": _token_from(query, headers)} if _token_from(query, headers) else {}))))
                fault = next((f for p, f in agent.faults.items() if parts.path.startswith(p)), None)
                if fault is not None and fault.times is not None:
                    fault.times -= 1
                    if fault.times < 0:
                        fault = None
            delay = agent.latency + (fault.delay if fault else 0.0)
            if delay:
                time.sleep(delay)
            if fault and fault.drop:
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if fault and (fault.status is not None or fault.body is not None):
                status = fault.status or 200
                self._send(status, fault.body or b"", "application/json" if status == 200 else
                           "text/plain; charset=utf-8", {})
                return
            if method == "OPTIONS":
                self._send(200, b"", None, {})
                return
            try:
                status, payload, extra = agent.handle(method, parts.path, query, headers, body)
                if agent.after_answer is not None:
                    agent.after_answer(method, parts.path)
                data = payload if isinstance(payload, bytes) else _encode(payload, "pretty" in query)
                self._send(status, data, "application/json", extra)
            except HTTPError as err:
                self._send(err.status, err.body.encode(), "text/plain; charset=utf-8", err.headers)

        def _send(self, status, data, content_type, extra):
            self.send_response(status)
            if content_type:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Consul-Default-ACL-Policy", agent.acl_default_policy)
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._serve("GET")

        def do_POST(self):
            self._serve("POST")

        def do_PUT(self):
            self._serve("PUT")

        def do_DELETE(self):
            self._serve("DELETE")

        def do_OPTIONS(self):
            self._serve("OPTIONS")

    return Handler


def load_services_file(agent: ConsulDouble, path: str) -> list[str]:
    """A JSON file holding one registration or a list of them, in the seed's shape; an optional
    top-level {"services": [...], "intentions": [[src, dst, action], ...]} form adds intentions."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if isinstance(data, dict) and "services" in data:
        registrations, intentions = data["services"], data.get("intentions", [])
    else:
        registrations, intentions = (data if isinstance(data, list) else [data]), []
    ids = [agent.register(r) for r in registrations]
    for source, destination, action in intentions:
        agent.set_intention(source, destination, action)
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description="A Consul agent double for trying meshgen without Consul.")
    parser.add_argument("services", nargs="*", help="registration files in the seed's JSON shape")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8500)
    args = parser.parse_args()
    agent = ConsulDouble().start(args.host, args.port)
    for path in args.services:
        for sid in load_services_file(agent, path):
            print(f"registered {sid}", flush=True)
    print(f"consul double listening on {agent.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        agent.stop()


if __name__ == "__main__":
    main()
