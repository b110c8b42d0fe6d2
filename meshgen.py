#!/usr/bin/env python3
"""meshgen: render a validated HAProxy bundle for a Consul Connect sidecar.

One run is a pipeline, and this file reads top to bottom in its order:
options and Consul client, fetch, model, certificate checks, render, validate, write, exit code.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import difflib
import fcntl
import functools
import hashlib
import ipaddress
import json
import math
import os
import random
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote, unquote, urlencode, urlsplit

import click
import jinja2
import urllib3
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

EXIT_UNCHANGED = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CHANGED = 3

EXIT_CODES_HELP = """\b
Exit codes:
  0  nothing changed, HAProxy needs nothing
  3  files changed: reload HAProxy
  1  error: nothing on disk changed
  2  usage error"""

STATUS_EXIT_CODES_HELP = """\b
Exit codes:
  0  HAProxy runs the live bundle
  3  it runs something else: reload HAProxy
  1  error: HAProxy or the bundle could not be read"""

# The output directory, as `render --out DIR` leaves it:
#
# DIR/
#   .bundle-<digest>/           one complete bundle per run that changed something, named by a
#     haproxy.cfg leaf.pem      digest of what it was made from; the previous one is kept for a
#     roots.pem authorize.lua   reload that began before the swap, and the one HAProxy loaded
#     public.crt-list           for as long as it runs on it
#     intentions.map callers.map servers.map
#     manifest.json             what the live path and `status` compare: servers, options, maps,
#                               serial, listener, from the model (nothing reads haproxy.cfg back)
#   .stage-<random>/            a bundle being written; renamed to .bundle-<digest> once durable
#   live -> .bundle-<digest>    swapped by one rename: the bundle HAProxy runs on
#   haproxy.cfg -> live/haproxy.cfg, leaf.pem -> live/leaf.pem, ...    stable names
#   .meshgen-state.json         what the last run saw, for the next run's --wait
#   (DIR itself is flock'ed by the one run that writes it: no lock file to leave behind)
#   .meshgen-live-change        names the bundle a run is changing HAProxy to through the runtime
#                               API, until that run has swapped. Left behind by a killed run, it
#                               tells the next: the same bundle again is made live and swapped;
#                               any other means HAProxy holds what no bundle says, so reload
BUNDLE_PREFIX = ".bundle-"
STAGE_PREFIX = ".stage-"
LIVE = "live"
STATE_FILE = ".meshgen-state.json"
LIVE_CHANGE_MARKER = ".meshgen-live-change"
INTENTIONS_MAP = "intentions.map"
CALLERS_MAP = "callers.map"                      # filled by authorize.lua in HAProxy's memory
SERVERS_MAP = "servers.map"                      # likewise, for upstream servers' certificates
PUBLIC_LISTENER = "public_listener"              # haproxy.cfg's names, as the runtime API knows them
CONNECTIONS_TABLE = "meshgen_connections"
SECRET_FILES = ("leaf.pem",)     # written 0600


class MeshgenError(Exception):
    """The one error type: its message is the single line the user sees."""


class AgentUnavailable(MeshgenError):
    """The agent answered 5xx: it could not reach its servers for an answer it does not cache."""


class AgentRefused(MeshgenError):
    """The agent would not serve this client now: connection refused, a connection closed or
    reset unanswered (how Consul enforces limits.http_max_conns_per_client), or 429."""


def _one_line(text: str, limit: int = 300) -> str:
    """Text from outside (agent bodies, haproxy output) made safe for one line of stderr."""
    flat = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# =========================================================================== options, Consul client

@dataclass(frozen=True)
class ConsulSettings:
    """Where and how to reach the local agent, as the consul CLI's variables describe it."""
    base_url: str               # scheme://host:port[/prefix]; http://localhost for a unix socket
    unix_socket: str | None
    token: str | None
    ca_file: str | None
    client_cert: tuple[str, str] | None
    tls_server_name: str | None
    verify: bool
    timeout: float
    namespace: str | None
    partition: str | None


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("1", "t", "true", "yes"):
        return True
    if value.lower() in ("0", "f", "false", "no"):
        return False
    raise MeshgenError(f"{name}: {value!r} is not a boolean")


def _read_token_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as err:
        raise MeshgenError(f"token file {path}: {err.strerror}") from None


def resolve_token(token_file: str | None) -> str | None:
    """Precedence as the consul CLI: --token-file, CONSUL_HTTP_TOKEN_FILE, CONSUL_HTTP_TOKEN.
    There is no --token flag: a token in argv is readable by every user of the machine."""
    path = token_file or os.environ.get("CONSUL_HTTP_TOKEN_FILE")
    token = _read_token_file(path) if path else os.environ.get("CONSUL_HTTP_TOKEN", "").strip()
    if token and not re.fullmatch(r"[\x21-\x7e]+", token):
        raise MeshgenError("Consul token: contains whitespace or control characters")
    return token or None


def consul_settings(http_addr: str, token_file: str | None, ca_file: str | None,
                    client_cert: str | None, client_key: str | None, tls_server_name: str | None,
                    timeout: float, namespace: str | None, partition: str | None) -> ConsulSettings:
    addr = http_addr.strip()
    unix_socket = None
    if "://" not in addr:
        addr = ("https://" if _env_bool("CONSUL_HTTP_SSL", False) else "http://") + addr
    parts = urlsplit(addr)
    if parts.scheme == "unix":
        unix_socket, addr = parts.path, "http://localhost"
    elif parts.scheme == "http" and _env_bool("CONSUL_HTTP_SSL", False):
        addr = "https://" + addr[len("http://"):]
    elif parts.scheme not in ("http", "https"):
        raise MeshgenError(f"--http-addr: Unknown protocol scheme: {parts.scheme}")
    if unix_socket is None and not parts.hostname:
        raise MeshgenError(f"--http-addr: {http_addr!r} has no host")
    if bool(client_cert) != bool(client_key):
        raise MeshgenError("both client cert and client key must be provided")
    if timeout <= 0:
        raise MeshgenError(f"--timeout: {timeout} is not a positive number of seconds")
    return ConsulSettings(
        base_url=addr.rstrip("/"), unix_socket=unix_socket, token=resolve_token(token_file),
        ca_file=ca_file, client_cert=(client_cert, client_key) if client_cert else None,
        tls_server_name=tls_server_name.split(":")[0] if tls_server_name else None,
        verify=_env_bool("CONSUL_HTTP_SSL_VERIFY", True), timeout=timeout,
        namespace=namespace or None, partition=partition or None)


class _UnixSocketConnection(urllib3.connection.HTTPConnection):
    def __init__(self, socket_path: str, **kwargs):
        super().__init__("localhost", **kwargs)
        self._socket_path = socket_path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._socket_path)
        self.sock = sock


class _UnixSocketPool(urllib3.HTTPConnectionPool):
    """unix:// agent addresses: urllib3 dials TCP, so this pool dials the socket instead."""

    def __init__(self, socket_path: str, **kwargs):
        super().__init__("localhost", **kwargs)
        self._socket_path = socket_path

    def _new_conn(self):
        return _UnixSocketConnection(self._socket_path, timeout=self.timeout.connect_timeout)


class _TrackingPool:
    """Remembers the connections it opens, so that close() can also end those still in a long
    poll: a run that stops waiting gives its connections back to the agent before it renders."""

    def _new_conn(self):
        conn = super()._new_conn()
        self.opened.add(conn)
        return conn

    def close_all(self) -> None:
        for conn in list(self.opened):
            sock = getattr(conn, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.close()


class _TCPPool(_TrackingPool, urllib3.HTTPConnectionPool):
    pass


class _TLSPool(_TrackingPool, urllib3.HTTPSConnectionPool):
    pass


class _UnixPool(_TrackingPool, _UnixSocketPool):
    pass


class UpstreamKey(NamedTuple):
    """What identifies an upstream, as Consul keeps upstreams unique."""
    kind: str                 # service | prepared_query
    name: str
    datacenter: str = ""
    peer: str = ""


class Query(NamedTuple):
    """One read of the agent whose answer a run renders from, and a later --wait blocks on (or
    polls, when it cannot block): a discovery chain, a target's instances, a prepared query.
    Written into the state file as its JSON."""
    method: str               # GET, or POST (a discovery chain with overrides)
    path: str
    params: tuple             # ((name, value), ...)
    body: str = ""            # JSON, for POST
    blocks: bool = True       # False: polled (prepared queries cannot block)

    def __str__(self) -> str:
        return json.dumps(list(self))

    @classmethod
    def parse(cls, text: str) -> "Query":
        method, path, params, body, blocks = json.loads(text)
        return cls(method, path, tuple(tuple(p) for p in params), body, blocks)

    def ask(self, client: "ConsulClient", extra: dict | None = None) -> "Reply":
        return client.request(self.method, self.path, dict(self.params, **(extra or {})),
                              json.loads(self.body) if self.body else None,
                              absent_ok=self.path.startswith(CONFIG_PATH))


@dataclass(frozen=True)
class Reply:
    data: object
    index: int | None
    filtered_by_acls: bool = False    # the agent left out what the token may not read


class ConsulClient:
    """GET and decode one agent endpoint; every failure becomes a MeshgenError naming it.

    Built on urllib3 rather than requests: with a thousand upstreams, requests' per-call
    overhead was most of a run (1000 health fetches: 2.8 s through requests, 1.0 s here)."""

    def __init__(self, settings: ConsulSettings, pool_size: int = 8, block: bool = False):
        """`block`: never more than `pool_size` connections; a request waits for a free one."""
        self.settings = settings
        parts = urlsplit(settings.base_url)
        self.prefix = parts.path.rstrip("/")
        headers = {name: value for name, value in (
            ("X-Consul-Token", settings.token), ("X-Consul-Namespace", settings.namespace),
            ("X-Consul-Partition", settings.partition)) if value}
        common = dict(maxsize=pool_size, block=block, headers=headers, retries=False,
                      timeout=urllib3.Timeout(connect=settings.timeout, read=settings.timeout))
        if settings.unix_socket:
            self.pool = _UnixPool(settings.unix_socket, **common)
        elif parts.scheme == "https":
            if not settings.verify:
                urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
            cert, key = settings.client_cert or (None, None)
            self.pool = _TLSPool(
                parts.hostname, parts.port or 443, cert_reqs="CERT_REQUIRED" if settings.verify else "CERT_NONE",
                ca_certs=settings.ca_file, cert_file=cert, key_file=key,
                server_hostname=settings.tls_server_name, assert_hostname=settings.verify and None, **common)
        else:
            self.pool = _TCPPool(parts.hostname, parts.port or 80, **common)
        self.pool.opened = weakref.WeakSet()

    def close(self) -> None:
        self.pool.close_all()

    def hang_up(self) -> None:
        """Close the idle keep-alive connections (the next request opens one again): the agent
        counts them against this address's cap while the run waits."""
        for conn in list(self.pool.pool.queue if self.pool.pool else ()):
            if conn is not None:
                conn.close()

    def get(self, path: str, params: dict | None = None) -> Reply:
        return self.request("GET", path, params)

    def request(self, method: str, path: str, params: dict | None = None, body: dict | None = None,
                absent_ok: bool = False) -> Reply:
        """The decoded answer; with `absent_ok`, a 404 is an answer too: data None, and the index
        Consul gives it, which a blocking query can wait on."""
        where = f"{method} {path}"
        url = self.prefix + path + ("?" + urlencode(params) if params else "")
        try:
            response = self.pool.request(method, url, redirect=False,
                                         body=None if body is None else json.dumps(body).encode())
        except urllib3.exceptions.NewConnectionError:
            raise AgentRefused(f"{where}: cannot reach the Consul agent at "
                               f"{self.settings.unix_socket or self.settings.base_url} (connection refused)") from None
        except urllib3.exceptions.TimeoutError:
            raise MeshgenError(f"{where}: the Consul agent did not answer within "
                               f"{self.settings.timeout:g}s") from None
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise AgentRefused(f"{where}: cannot reach the Consul agent at "
                               f"{self.settings.unix_socket or self.settings.base_url} "
                               f"({_one_line(type(err).__name__)})") from None
        index = response.headers.get("X-Consul-Index")
        index = int(index) if index and re.fullmatch(r"[0-9]{1,20}", index) else None
        if response.status == 404 and absent_ok:
            return Reply(None, index)
        if response.status != 200:
            error = AgentUnavailable if response.status >= 500 else AgentRefused if response.status == 429 else MeshgenError
            raise error(f"{where}: {_status_message(response.status, response.data.decode('utf-8', 'replace'))}")
        try:
            data = json.loads(response.data)
        except (ValueError, RecursionError) as err:
            raise MeshgenError(f"{where}: malformed JSON from the Consul agent ({_one_line(str(err))})") from None
        return Reply(data, index, response.headers.get("X-Consul-Results-Filtered-By-ACLs") == "true")


def _status_message(status: int, body: str) -> str:
    text = _one_line(body) or "(empty body)"
    if status == 403 and text == "ACL not found":
        return "403 ACL not found: the agent does not know this Consul token"
    if status == 403:
        return f"403 {text}"
    if status == 429:
        return f"429 rate limited by Consul, try again later: {text}"
    return f"{status} {text}"


# =========================================================================== fetch

def find_sidecar_id(client: ConsulClient, service_id: str) -> str:
    """As `consul connect proxy -sidecar-for` does: the one connect-proxy whose
    Proxy.DestinationServiceID is the app's service ID."""
    services = client.get("/v1/agent/services").data
    if not isinstance(services, dict):
        raise MeshgenError("GET /v1/agent/services: expected a JSON object")
    matches = sorted(sid for sid, svc in services.items()
                     if isinstance(svc, dict) and svc.get("Kind") == "connect-proxy"
                     and isinstance(svc.get("Proxy"), dict)
                     and svc["Proxy"].get("DestinationServiceID") == service_id)
    if not matches:
        raise MeshgenError(f"--sidecar-for {service_id}: no connect-proxy service on this agent "
                           f"has Proxy.DestinationServiceID {service_id!r} (with ACLs on, the agent "
                           "hides services the token cannot read: it needs service:read on the "
                           f"sidecar's own service, such as {service_id + '-sidecar-proxy'!r})")
    if len(matches) > 1:
        raise MeshgenError(f"--sidecar-for {service_id}: several sidecars front it "
                           f"({', '.join(matches)}); choose one with --proxy-id")
    return matches[0]


def fetch_registration(client: ConsulClient, proxy_id: str) -> dict:
    data = client.get(f"/v1/agent/service/{quote(proxy_id, safe='')}").data
    if not isinstance(data, dict):
        raise MeshgenError(f"GET /v1/agent/service/{proxy_id}: expected a JSON object")
    return data


@dataclass(frozen=True)
class AgentData:
    """What the agent said. The roots, leaf and intentions are still raw (the model step checks
    them); each upstream's discovery chain is checked already, since it names the targets whose
    instances were fetched next. Each Reply keeps the index Consul gave it, for --wait. A chain
    or an answer the agent could not give is the MeshgenError saying why: it costs its own
    upstream or target only (the model step decides how)."""
    roots: Reply
    leaf: Reply
    intentions: Reply | AgentUnavailable   # of this service, highest precedence first; or why not
    chains: dict      # UpstreamKey -> ChainOutcome, for upstreams that follow one
    answers: dict     # Query -> Reply or MeshgenError: each chain's, target's and prepared query's,
                      # the mesh entry's (MESH_QUERY; data None where there is none)
    mesh_unreadable: AgentUnavailable | None = None   # why the mesh entry is not in answers


@dataclass(frozen=True)
class ChainOutcome:
    """The chain an upstream follows this run: the agent's answer now, or, when that is bad, the
    one the last run followed (`problem` says why); None when there is neither, and then the
    upstream's listener refuses connections rather than route where Consul did not say."""
    chain: Chain | None
    raw: dict | None          # the answer it was parsed from, kept for the next run
    problem: str = ""


def fetch_agent_data(client: ConsulClient, service: str, upstreams: tuple[Upstream, ...],
                     kept_chains: dict, workers: int = 8) -> AgentData:
    """The requests of one run, in parallel, in two rounds: the chains name the targets whose
    instances the second round fetches. Eight workers: with more, Python's threads spend the
    time handing the interpreter lock around (1000 upstreams: 2.3 s with 8, 2.6 s with 16,
    2.5 s with 4 on this 2-core machine). `kept_chains`: the chains the last run followed, by
    str(Query), for an upstream whose chain is bad now."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        roots = pool.submit(client.get, "/v1/agent/connect/ca/roots")
        leaf = pool.submit(client.get, f"/v1/agent/connect/ca/leaf/{quote(service, safe='')}")
        intentions = pool.submit(fetch_intentions, client, service)
        chained = {u: chain_query(u) for u in upstreams if u.follows_chain}
        mesh = pool.submit(fetch_mesh_entry, client, MESH_QUERY)
        firsts = {q: pool.submit(_attempt, fetch_chain, client, q) for q in chained.values()}
        firsts |= {q: pool.submit(_attempt, fetch_instances, client, q)
                   for q in [direct_query(u) for u in upstreams if not u.follows_chain]}
        answers = {q: future.result() for q, future in firsts.items()}
        chains = {u.key: choose_chain(u, answers[q], kept_chains.get(str(q))) for u, q in chained.items()}
        targets = sorted({t.query for outcome in chains.values() if outcome.chain for t in outcome.chain.targets})
        seconds = {q: pool.submit(_attempt, fetch_instances, client, q) for q in targets}
        answers.update((q, future.result()) for q, future in seconds.items())
        try:
            answers.update([mesh.result()])
            unreadable = None
        except AgentUnavailable as err:
            unreadable = err
        return AgentData(roots.result(), leaf.result(), intentions.result(), chains, answers, unreadable)


def _attempt(fetch, *args):
    """The answer, or the MeshgenError that says why there is none."""
    try:
        return fetch(*args)
    except MeshgenError as err:
        return err


def choose_chain(upstream: Upstream, answer: Reply | MeshgenError, kept: dict | None) -> ChainOutcome:
    try:
        if isinstance(answer, MeshgenError):
            raise answer
        return ChainOutcome(check_chain(upstream, parse_chain(answer.data, upstream)), answer.data)
    except MeshgenError as err:
        problem = _one_line(str(err))
    if isinstance(kept, dict) and isinstance(kept.get("Chain"), dict):
        try:
            return ChainOutcome(check_chain(upstream, parse_chain(kept, upstream)), kept, problem)
        except MeshgenError:
            pass      # the registration changed since, and the old chain no longer fits it
    return ChainOutcome(None, None, problem)


INTENTIONS_PATH = "/v1/connect/intentions"


def fetch_intentions(client: ConsulClient, service: str) -> Reply | AgentUnavailable:
    """The intentions that apply to `service`, in Consul's order. 1.8 sends no index with them:
    then the intentions table's, from the list endpoint, which --wait blocks on. The agent does
    not cache them (1.8.7, `?cached` or not): with its servers out of reach it answers 500, and
    that is returned, for the last intentions seen to stay in force."""
    try:
        return _fetch_intentions(client, service)
    except AgentUnavailable as err:
        return err


def _fetch_intentions(client: ConsulClient, service: str) -> Reply:
    # The index first: an intention written between the two reads then moves the index past
    # the one recorded, and the next --wait wakes for it. Read second, it would mark the write
    # as seen while the match list predates it, and the revocation would be lost for good.
    index = client.get(INTENTIONS_PATH).index
    reply = client.get(f"{INTENTIONS_PATH}/match", {"by": "destination", "name": service})
    if not isinstance(reply.data, dict):
        raise MeshgenError(f"GET {INTENTIONS_PATH}/match: expected a JSON object")
    entries = reply.data.get(service)
    entries = [] if entries is None else entries     # null on 1.8.7 when none match
    if not isinstance(entries, list):
        raise MeshgenError(f"GET {INTENTIONS_PATH}/match: {service}: expected a JSON list of intentions")
    return Reply(entries, index)


def fetch_default_decision(client: ConsulClient, service: str, caller_uri: str) -> tuple[bool, str]:
    """The agent's own decision for a caller no intention names: Consul's wildcards, ACL
    default policy and version defaults, without a rule of ours (docs/consul-reference.md)."""
    path = "/v1/agent/connect/authorize"
    data = client.request("POST", path, body={"Target": service, "ClientCertURI": caller_uri}).data
    if not isinstance(data, dict) or not isinstance(data.get("Authorized"), bool):
        raise MeshgenError(f"POST {path}: expected a JSON object with a boolean Authorized")
    reason = data.get("Reason")
    return data["Authorized"], reason if isinstance(reason, str) else ""


CONFIG_PATH = "/v1/config/"
# The mesh-wide config entry (Consul 1.10+): request normalization and TLS versions.
MESH_QUERY = Query("GET", CONFIG_PATH + "mesh/mesh", ())


def fetch_mesh_entry(client: ConsulClient, query: Query, extra: dict | None = None) -> tuple[Query, Reply]:
    """The mesh entry, data None when there is none. A Consul older than the entry (1.8.7
    answers 500 "invalid config entry kind: mesh") has none, ever: polled, not blocked on, since
    such an agent answers at once."""
    try:
        reply = query.ask(client, extra)
    except AgentUnavailable as err:
        if "invalid config entry kind" not in str(err):
            raise
        return query._replace(blocks=False), Reply(None, None)
    if reply.data is not None and not isinstance(reply.data, dict):
        raise MeshgenError(f"GET {query.path}: expected a JSON object")
    return query, reply


CHAIN_PATH = "/v1/discovery-chain/"


def chain_query(upstream: Upstream) -> Query:
    """The upstream's compiled discovery chain, as Consul compiles it for Envoy: the upstream's
    own protocol and connect timeout, where its Config sets them, override the chain's. Cached:
    with its servers out of reach, the agent answers with the last chain it knew."""
    overrides = {}
    if upstream.protocol:
        overrides["OverrideProtocol"] = upstream.protocol
    if upstream.connect_timeout_ms:
        overrides["OverrideConnectTimeout"] = f"{upstream.connect_timeout_ms}ms"
    params = (("compile-dc", upstream.datacenter),) if upstream.datacenter else ()
    return Query("POST" if overrides else "GET", CHAIN_PATH + quote(upstream.name, safe=""), params + (("cached", ""),),
                 json.dumps(overrides, sort_keys=True) if overrides else "")


def fetch_chain(client: ConsulClient, query: Query, extra: dict | None = None) -> Reply:
    reply = query.ask(client, extra)
    if not isinstance(reply.data, dict) or not isinstance(reply.data.get("Chain"), dict):
        raise MeshgenError(f"{query.method} {query.path}: expected a JSON object with a Chain")
    return reply


def direct_query(upstream: Upstream) -> Query:
    """The instances of an upstream that follows no chain: a prepared query's (which cannot
    block, so it is polled), or a peer's."""
    params = (("dc", upstream.datacenter),) if upstream.datacenter else ()
    if upstream.kind == "prepared_query":
        return Query("GET", f"/v1/query/{quote(upstream.name, safe='')}/execute", params + (("connect", "true"),),
                     blocks=False)
    return Query("GET", f"/v1/health/connect/{quote(upstream.name, safe='')}",
                 params + (("peer", upstream.peer), ("passing", ""), ("cached", "")))


def fetch_instances(client: ConsulClient, query: Query, extra: dict | None = None) -> Reply:
    reply = query.ask(client, extra)
    prepared = query.path.startswith("/v1/query/")
    entries = reply.data.get("Nodes") if prepared and isinstance(reply.data, dict) else reply.data
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise MeshgenError(f"GET {query.path}: expected a JSON list of health entries")
    # Current Consul says when ACLs filtered the answer; 1.8.7 says nothing, but answers
    # index 1 (which no written table has) and does not block on it.
    if not entries and not prepared and (reply.filtered_by_acls or reply.index == 1):
        name = unquote(query.path.rsplit("/", 1)[1])
        raise MeshgenError(f"GET {query.path}: the agent hid the instances of {name!r}: the token "
                           f"cannot read them (it needs service:read on {name!r} and its sidecars, "
                           "and node:read)")
    return Reply(entries, reply.index)


# =========================================================================== wait for a change
#
# `render --wait` blocks on what the previous run saw: the registration by its ContentHash, the
# roots, the leaf, the intentions, each upstream's discovery chain and each of its targets'
# instances by index. A prepared query cannot block, so it is polled. The previous run's markers
# live beside the bundle (STATE_FILE).
#
# Every sidecar on a node dials its agent from the same address, and Consul refuses more than
# limits.http_max_conns_per_client (200) connections from one address. So a waiting run holds at
# most --agent-connections, whatever its number of upstreams:
#   direct  when the watch fits, one long poll per endpoint, as above;
#   budget  otherwise BUDGET_CONNECTIONS: a long poll on the intentions; one on the datacenter's
#           health checks (CHECKS_SIGNAL: any instance's check, or an instance registered or gone
#           with its checks, moves its index; Consul 1.8.7 and the double alike), after which this
#           sidecar's targets are re-read from the agent's cache (`?cached`: no server is asked);
#           and every RESWEEP_SECONDS, on the third connection, the registration, roots, leaf,
#           chains and targets, each from the agent's own state or cache, for what moves no check
#           (a config entry, a weight, an instance without checks).
# An agent that refuses (connection refused or cut, 429) gets a jittered, bounded backoff and
# one line saying so; the wait goes on, and ends in an error if the agent still refuses then.

@dataclass(frozen=True)
class WatchState:
    proxy_id: str
    service: str
    registration_hash: str
    roots_index: int
    active_root_id: str        # a restarted agent can bring a new CA at the same roots index
    leaf_index: int
    queries: dict              # str(Query) -> its index, or a digest when it is polled
    intentions_index: int
    intentions_seen: list      # the match list, and the agent's answer for an unnamed caller:
    unnamed_caller: list       # kept in force while the agent cannot read them
    connection_lifetime_ms: int    # Config max_connection_lifetime_ms: swept while waiting
    loaded_bundle: str         # the bundle HAProxy was last told to load: its runtime names
    kept_chains: dict          # str(Query) -> the chain answer each upstream followed
    kept_instances: dict       # str(Query) -> [[address, weight, service], ...] each target had
    skipped: list              # what this run left out, one line each (for `status`)
    mesh_seen: list | None = None  # [the mesh entry, or None for none]: kept in force while unreadable

    @classmethod
    def of_run(cls, proxy_id: str, registration: dict, sidecar: Sidecar, data: AgentData,
               intentions: tuple[int, list, list], upstreams: "ModelledUpstreams",
               loaded_bundle: str) -> "WatchState":
        mesh = [reply.data for query, reply in data.answers.items() if query.path == MESH_QUERY.path]
        return cls(proxy_id, sidecar.service, content_hash(registration),
                   data.roots.index or 0, str(data.roots.data.get("ActiveRootID", "")), data.leaf.index or 0,
                   {str(query): _marker(query, reply) for query, reply in sorted(data.answers.items())},
                   *intentions, sidecar.max_connection_lifetime_ms, loaded_bundle,
                   upstreams.kept_chains, upstreams.kept_instances, list(upstreams.skipped), mesh or None)


def content_hash(registration) -> str | None:
    """The agent's hash of a registration, --wait's marker for it; None for an answer that is not one."""
    return str(registration.get("ContentHash", "")) if isinstance(registration, dict) else None


def _marker(query: Query, reply: Reply | MeshgenError):
    """What tells a change: the index, or for a prepared query (no index) a digest of the answer;
    for a query the agent did not answer, a digest of why, so that the same refusal again is no
    change (the query is then polled, as it has no index to block on)."""
    if isinstance(reply, MeshgenError):
        return "error:" + hashlib.sha256(str(reply).encode()).hexdigest()[:16]
    if not query.blocks:
        return hashlib.sha256(json.dumps(reply.data, sort_keys=True).encode()).hexdigest()
    return reply.index or 0


def read_state(out_dir: Path) -> WatchState | None:
    try:
        return WatchState(**json.loads((out_dir / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_state(out_dir: Path, state: WatchState) -> None:
    tmp = out_dir / f"{STATE_FILE}.tmp"
    try:
        tmp.write_text(json.dumps(dataclasses.asdict(state), sort_keys=True))
        os.replace(tmp, out_dir / STATE_FILE)
    except OSError as err:
        raise MeshgenError(f"--out {out_dir}: cannot write {STATE_FILE}: {err.strerror or err}") from None


SWEEP_SECONDS = 0.5      # how often a waiting run ends connections past their lifetime
# Default --agent-connections: every sidecar waits over BUDGET_CONNECTIONS, whatever it watches,
# so that 66 sidecars fit under the agent's 200 connections per client (a sidecar with no
# upstream already watches 5 endpoints: fifty such, one long poll each, were 250).
AGENT_CONNECTIONS = 3
BUDGET_CONNECTIONS = 3   # a watch that does not fit: the intentions, the checks signal, one reader
# The render's parallel reads share this many: when a change ends the waits of many sidecars at
# once, their renders must fit beside the others' waits (1000 upstreams: 2.5 s with 4, 2.3 s with 8).
FETCH_CONNECTIONS = 4
CHECKS_SIGNAL = Query("GET", "/v1/health/state/any", (("filter", 'CheckID == ""'),))   # the index, no body
SIGNAL_ROUNDS_SECONDS = 1.0        # a busy datacenter moves its checks all the time: one re-read a second
REREAD_AFTER_SIGNAL = (0.2, 1.5)   # the agent's cache follows its servers within moments; a second look
RESWEEP_SECONDS = 5.0
# Consul 1.8.7 holds a long poll whose client went away, counted against the cap, until its wait
# is over (seen: the connections of ended waits in CLOSE-WAIT on the agent). A budget wait's long
# polls ask for no longer than this, so that what a run leaves behind is gone within a minute.
BUDGET_LONG_POLL_SECONDS = 60.0
BACKOFF_SECONDS = (1.0, 30.0)      # first and longest pause after the agent refused


def _intentions_index(client: ConsulClient, index: int, wait: dict) -> int:
    """The intentions' index once it moves; with the agent's servers out of reach (they are not
    cached), the same index after a second, so that the watch goes on rather than rendering
    the last intentions seen once a second."""
    try:
        return client.get(INTENTIONS_PATH, dict(wait, index=index)).index
    except AgentUnavailable:
        time.sleep(1.0)
        return index


class _Waiting:
    """What the threads of one wait share: whether it is over, and what the agent refused."""

    def __init__(self, agent: str, seconds: float, report):
        self.agent, self.report = agent, report
        self.deadline = time.monotonic() + seconds
        self.changed, self.done = threading.Event(), threading.Event()
        self.nudged = threading.Event()     # a change, or the checks signal moved: the reader looks
        self.signalled: list = []           # when the checks signal moved
        self.read = threading.Event()       # no re-read pending
        self.read.set()
        self.longest_poll = math.inf
        self.lock = threading.Lock()
        self.reported: set = set()
        self.refusing: dict = {}        # watch -> the agent's last refusal, while it lasts

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def over(self) -> bool:
        return self.done.is_set() or self.changed.is_set() or self.remaining() <= 0.05

    def refused(self, watch: str, err: AgentRefused, attempt: int) -> float:
        """Say once what the agent said (the cause, not each endpoint that met it); the pause
        before the next try: doubling from the first, jittered so that the node's sidecars do not
        come back together, never past the longest."""
        first, longest = BACKOFF_SECONDS
        cause = str(err).split(": ", 1)[-1]
        with self.lock:
            self.refusing[watch] = err
            if cause not in self.reported:
                self.reported.add(cause)
                self.report(f"while waiting, the Consul agent at {self.agent} refused: {err}; "
                            f"trying again with backoff (at most {longest:g}s apart)")
        return min(longest, first * 2 ** attempt) * random.uniform(0.5, 1.0)

    def change(self) -> None:
        self.changed.set()
        self.nudged.set()

    def signal(self, _index) -> None:
        """The checks signal moved: the reader re-reads, and the signal asks again only then,
        so that a re-read that ends the wait leaves no long poll behind on the agent."""
        self.signalled.append(time.monotonic())
        self.read.clear()
        self.nudged.set()
        self.read.wait(max(0.0, self.remaining()))

    def answered(self, watch: str) -> None:
        with self.lock:
            self.refusing.pop(watch, None)

    def pause(self, seconds: float) -> None:
        self.changed.wait(max(0.0, min(seconds, self.remaining())))


def _long_poll(waiting: _Waiting, watch: str, ask, marker, moved=None) -> None:
    """Long-poll one endpoint until it differs from `marker`; again if the agent answers early
    (it caps waits at 10 minutes), at most once a second. `moved(new)` is called on a change, if
    given, and the poll goes on from there; without it, a change ends the wait."""
    attempt = 0
    while not waiting.over():
        asked = time.monotonic()
        try:
            # Rounded up, so that an unchanged answer comes at the deadline, not just before.
            answer = ask(marker, {"wait": f"{math.ceil(min(waiting.remaining(), waiting.longest_poll) * 1000)}ms"})
        except AgentRefused as err:
            if waiting.over():
                return
            waiting.pause(waiting.refused(watch, err, attempt))
            attempt += 1
            continue
        except MeshgenError:
            if not waiting.over():
                waiting.change()            # the render that follows says what is wrong
            return
        attempt = 0
        waiting.answered(watch)
        if answer != marker:
            if moved is None:
                waiting.change()
                return
            moved(answer)
            marker = answer
        waiting.pause(SIGNAL_ROUNDS_SECONDS - (time.monotonic() - asked))


FIXED_WATCHES = 4     # registration, roots, leaf, intentions


def _fixed_watches(client: "ConsulClient", state: WatchState) -> list:
    """(name, ask, marker) of what every sidecar has: registration, roots, leaf, intentions."""
    service_path = f"/v1/agent/service/{quote(state.proxy_id, safe='')}"
    leaf_path = f"/v1/agent/connect/ca/leaf/{quote(state.service, safe='')}"
    return [
        ("registration", lambda hash_, wait: content_hash(client.get(service_path, dict(wait, hash=hash_)).data),
         state.registration_hash),
        ("roots", lambda index, wait: client.get("/v1/agent/connect/ca/roots", dict(wait, index=index)).index,
         state.roots_index),
        ("leaf", lambda index, wait: client.get(leaf_path, dict(wait, index=index)).index, state.leaf_index),
        ("intentions", lambda index, wait: _intentions_index(client, index, wait), state.intentions_index),
    ]


def _query_fetch(query: Query):
    if query.path.startswith(CONFIG_PATH):
        return lambda client, query, extra=None: fetch_mesh_entry(client, query, extra)[1]
    return fetch_chain if query.path.startswith(CHAIN_PATH) else fetch_instances


def _query_watch(client: "ConsulClient", text: str, marker) -> tuple:
    query = Query.parse(text)
    fetch = _query_fetch(query)
    return (str(query), lambda index, wait: fetch(client, query, dict(wait, index=index)).index, marker)


def direct_connections(state: WatchState) -> int:
    """The connections of a wait with one long poll per endpoint: one each, and one for the
    polls (prepared queries) if any."""
    blocking = sum(Query.parse(text).blocks for text in state.queries)
    return FIXED_WATCHES + blocking + (blocking < len(state.queries))


def watch_connections(state: WatchState, budget: int) -> int:
    """How many agent connections a wait on `state` holds, with --agent-connections `budget`."""
    direct = direct_connections(state)
    return direct if direct <= budget else BUDGET_CONNECTIONS


def checks_index(client: "ConsulClient") -> int | None:
    """Where the checks signal stands; None if the agent would not say (the long poll will)."""
    try:
        return CHECKS_SIGNAL.ask(client).index or 0
    except MeshgenError:
        return None


def _watch_checks(waiting: "_Waiting", client: "ConsulClient", index: int | None) -> None:
    """The checks signal, from `index` on: each move nudges the reader."""
    if index is None:
        index = checks_index(client) or 0
    _long_poll(waiting, "checks", lambda marker, wait: CHECKS_SIGNAL.ask(client, dict(wait, index=marker)).index,
               index, waiting.signal)


def _reread(client: "ConsulClient", state: WatchState, queries) -> bool:
    """Whether any of `queries` (str(Query)) answers other than the last run saw."""
    for text in queries:
        query = Query.parse(text)
        answer = _attempt(_query_fetch(query), client, query)
        if isinstance(answer, AgentRefused):
            raise answer            # backed off, not a change
        if _marker(query, answer) != state.queries[text]:
            return True
    return False


def _sweep_fixed(client: "ConsulClient", state: WatchState) -> bool:
    """Whether the registration, the roots or the leaf differ from what the last run saw; plain
    reads, from the agent's own state and cache."""
    registration = client.get(f"/v1/agent/service/{quote(state.proxy_id, safe='')}")
    roots = client.get("/v1/agent/connect/ca/roots")
    leaf = client.get(f"/v1/agent/connect/ca/leaf/{quote(state.service, safe='')}")
    return (content_hash(registration.data) != state.registration_hash
            or roots.index != state.roots_index or leaf.index != state.leaf_index)


def wait_for_change(settings: ConsulSettings, state: WatchState, seconds: float, poll_interval: float,
                    budget: int, sweep=None, report=None) -> bool:
    """True as soon as anything the last run saw has changed (or cannot be read: the render
    that follows reports why), False when `seconds` pass without a change. `sweep`, if given,
    runs every SWEEP_SECONDS meanwhile; `report` gets a line when the agent refuses. Never more
    than watch_connections() connections to the agent, all closed on return."""
    connections = watch_connections(state, budget)
    client = ConsulClient(settings, pool_size=connections, block=True)
    waiting = _Waiting(settings.unix_socket or settings.base_url, seconds, report or (lambda line: None))
    budget_mode = direct_connections(state) > budget
    if budget_mode:
        waiting.longest_poll = BUDGET_LONG_POLL_SECONDS
    try:
        return _wait(client, state, waiting, poll_interval, budget_mode, sweep)
    finally:
        waiting.done.set()
        waiting.read.set()
        client.close()


def _wait(client: "ConsulClient", state: WatchState, waiting: _Waiting, poll_interval: float,
          budget_mode: bool, sweep) -> bool:
    # A dev agent restarted (or a cluster rebuilt) comes back with a new CA at indexes that can
    # equal the saved ones (measured on Consul 1.8.7): blocking on them would wait out the whole
    # period while the sidecar serves certificates of a dead CA. One plain read of the roots first.
    attempt = 0
    while True:
        try:
            roots = client.get("/v1/agent/connect/ca/roots")
            break
        except AgentRefused as err:
            waiting.pause(waiting.refused("roots", err, attempt))
            attempt += 1
            if waiting.remaining() <= 0.05:
                raise _still_refused(waiting) from None
        except MeshgenError:
            return True
    waiting.answered("roots")
    if not isinstance(roots.data, dict) or str(roots.data.get("ActiveRootID", "")) != state.active_root_id:
        return True
    fixed = _fixed_watches(client, state)
    # A query the agent refused last time has no index to block on: it is read again with the
    # polls, and the same refusal is no change (see _marker).
    polled = [text for text, marker in state.queries.items()
              if not Query.parse(text).blocks or str(marker).startswith("error:")]
    if budget_mode:
        # The signal's index before the first re-read: a change in between is then either read or signalled.
        threads = [(_long_poll, (waiting, *fixed[3])), (_watch_checks, (waiting, client, checks_index(client)))]
        rereads = sorted(text for text in state.queries if Query.parse(text).blocks)
        targets = [text for text in rereads if not Query.parse(text).path.startswith(CHAIN_PATH)]
    else:
        threads = [(_long_poll, (waiting, *watch)) for watch in fixed + [
            _query_watch(client, text, marker) for text, marker in sorted(state.queries.items())
            if text not in polled]]
        rereads, targets = [], []
    for target, args in threads:
        threading.Thread(target=target, args=args, daemon=True).start()
    now = time.monotonic()
    # A budget wait re-reads everything once at its start: the checks signal starts from where it
    # stands now, so a change since the last run's reads would otherwise wait for the next sweep.
    next_poll, next_sweep = now + poll_interval, now
    due_rereads: list = []
    attempt, retry_at = 0, 0.0
    while True:
        moves = []
        while waiting.signalled:        # pop() alone: the checks thread appends meanwhile
            moves.append(waiting.signalled.pop())
        if moves:
            due_rereads = [max(moves) + delay for delay in REREAD_AFTER_SIGNAL]
        if not due_rereads:
            waiting.read.set()
        wakes = [next_poll if polled else math.inf, *due_rereads[:1], next_sweep if budget_mode else math.inf]
        # While the reader backs off, what is due waits for it (a change still ends the wait).
        wake = min(max(min(wakes), retry_at), waiting.deadline,
                   time.monotonic() + SWEEP_SECONDS if sweep else math.inf)
        waiting.nudged.wait(max(0.0, wake - time.monotonic()))
        waiting.nudged.clear()
        if waiting.changed.is_set():
            return True
        now = time.monotonic()
        if now >= waiting.deadline:
            if waiting.refusing:
                raise _still_refused(waiting)
            return False
        if sweep:
            sweep()
        if now < retry_at:
            continue
        try:
            if due_rereads and now >= due_rereads[0]:
                due_rereads.pop(0)
                if _reread(client, state, targets):
                    return True
            if budget_mode and now >= next_sweep:
                next_sweep = now + RESWEEP_SECONDS
                if _sweep_fixed(client, state) or _reread(client, state, rereads):
                    return True
            if polled and now >= next_poll:
                next_poll = now + poll_interval
                if _reread(client, state, polled):
                    return True
            attempt = 0
            waiting.answered("reader")
        except AgentRefused as err:
            retry_at = now + waiting.refused("reader", err, attempt)
            attempt += 1
        except MeshgenError:
            return True


def _still_refused(waiting: _Waiting) -> MeshgenError:
    last = next(iter(waiting.refusing.values()), None)
    return AgentRefused(f"the wait ended with the Consul agent at {waiting.agent} still refusing: {last}")


# =========================================================================== model

PROTOCOLS = ("tcp", "http", "http2", "grpc")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# One grammar per kind of address, ASCII only: Python's ipaddress alone also takes an IPv6 zone
# ID ("fe80::1%eth0"), and a zone ID may hold spaces, newlines and quotes.
_IPV4 = re.compile(r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])")
_IPV6 = re.compile(r"[0-9A-Fa-f:.]{2,45}")       # then ipaddress checks the groups; no "%zone"
_HOSTNAME = re.compile(r"(?=[A-Za-z0-9_.-]{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?")
# A host name as Docker and Consul register them: labels may hold "_" (myproj_redis_1); the last
# is not all digits, so that libc never reads a name as a shortened IPv4 address ("10.1").
_DNS_NAME = re.compile(r"(?=[A-Za-z0-9_.-]{1,253}\Z)(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})\.)*"
                       r"(?![0-9]+\.?\Z)[A-Za-z0-9_][A-Za-z0-9_-]{0,62}\.?")
_SAFE_PATH = re.compile(r"/[A-Za-z0-9_./+-]{0,250}")
_URL_PATH = re.compile(r"/[A-Za-z0-9_./~%+-]{0,250}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_MS = {"ns": 1e-6, "us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4, "h": 3.6e6}


def _norm(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


def check_name(value, field: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise MeshgenError(f"{field}: {value!r} is not a valid name "
                           "(letters, digits, '-', '_', '.'; at most 128)")
    return value


def check_port(value, field: str) -> int:
    port = check_int(value, field)
    if not 1 <= port <= 65535:
        raise MeshgenError(f"{field}: {value!r} is not a port number (1-65535)")
    return port


def check_int(value, field: str, minimum: int = 0) -> int:
    """Consul decodes Config weakly: numbers may come as JSON numbers or numeric strings."""
    if isinstance(value, bool):
        raise MeshgenError(f"{field}: {value!r} is not a number")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,18}", value.strip()):
        value = int(value.strip())
    if not isinstance(value, int):
        raise MeshgenError(f"{field}: {value!r} is not a whole number")
    if value < minimum:
        raise MeshgenError(f"{field}: {value} is below the minimum {minimum}")
    return value


def check_host(value, field: str) -> str:
    """An IPv4 address, an IPv6 address without a zone, or a DNS name: nothing else may reach an
    address in haproxy.cfg."""
    if isinstance(value, str):
        if _IPV4.fullmatch(value):
            return value
        if ":" in value and _IPV6.fullmatch(value):
            try:
                return str(ipaddress.IPv6Address(value))
            except ValueError:
                pass
        elif _DNS_NAME.fullmatch(value):
            return value
    raise MeshgenError(f"{field}: {value!r} is not an IP address (IPv6 without a zone) or host name")


def check_path(value, field: str) -> str:
    if not isinstance(value, str) or not _SAFE_PATH.fullmatch(value) or "/../" in value + "/":
        raise MeshgenError(f"{field}: {value!r} is not an absolute path of plain characters")
    return value


def check_host_port(value, field: str) -> str:
    """`ip:port` or `host:port`, rendered as HAProxy writes it ([v6]:port)."""
    if isinstance(value, str):
        host, sep, port = value.rpartition(":")
        if sep:
            host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
            return join_host_port(check_host(host, field), check_port(port, field))
    raise MeshgenError(f"{field}: {value!r} is not an address of the form ip:port")


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_duration_ms(value, field: str) -> int:
    """Durations arrive as Go strings ("10s") or, from central config, integer nanoseconds."""
    if isinstance(value, str) and re.fullmatch(r"(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+", value):
        return round(sum(float(n) * _DURATION_MS[u] for n, u in _DURATION.findall(value)))
    nanoseconds = check_int(value, field)
    return nanoseconds // 1_000_000


class ConfigMap:
    """A Config map read as Consul reads it: keys match case- and underscore-insensitively."""

    def __init__(self, raw, field: str):
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise MeshgenError(f"{field}: expected an object, got {type(raw).__name__}")
        self.field = field
        self.values = {_norm(k): (k, v) for k, v in raw.items() if isinstance(k, str)}

    def raw(self, *names: str):
        """The first of `names` set, and the key it was found under; "" counts as unset."""
        for name in names:
            if _norm(name) in self.values:
                key, value = self.values[_norm(name)]
                if value is not None and value != "":
                    return f"{self.field}.{key}", value
        return f"{self.field}.{names[0]}", None

    def int(self, name: str, default, minimum: int = 0):
        field, value = self.raw(name)
        return default if value is None else check_int(value, field, minimum)

    def flag(self, name: str, default: bool) -> bool:
        """A boolean, as JSON or as the strings Consul's own proxy config accepts."""
        field, value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise MeshgenError(f"{field}: {value!r} is not true or false")

    def choice(self, names: tuple[str, ...], choices: tuple[str, ...], default: str) -> str:
        field, value = self.raw(*names)
        if value is None:
            return default
        if not isinstance(value, str) or value.lower() not in choices:
            raise MeshgenError(f"{field}: {value!r} is not one of {', '.join(choices)}")
        return value.lower()

    def sub(self, name: str) -> "ConfigMap":
        field, value = self.raw(name)
        return ConfigMap(value, field)


@dataclass(frozen=True)
class Instance:
    """One healthy sidecar of an upstream, as HAProxy dials it."""
    address: str      # host:port, [v6]:port or unix@/path
    weight: int
    service: str      # the service its certificate must name

    @property
    def server_name(self) -> str:
        return self.address.replace("[", "").replace("]", "").replace("unix@", "unix")


@dataclass(frozen=True)
class PassiveHealthCheck:
    max_failures: int
    interval_ms: int | None
    ejection_ms: int | None


class _Speaks:
    """What a listener's `protocol` means for haproxy.cfg."""
    protocol: str

    @property
    def http(self) -> bool:
        return self.protocol != "tcp"

    @property
    def h2(self) -> bool:
        return self.protocol in ("http2", "grpc")


@dataclass(frozen=True)
class Retries:
    """A route's retry policy, as Consul gives it to Envoy: `count` more tries when one of `on`
    happens (HAProxy's retry-on keywords)."""
    count: int
    on: tuple[str, ...]


@dataclass(frozen=True)
class Backend:
    """One HAProxy backend of an upstream: one resolver of its discovery chain (the only one,
    for an upstream with no config entries), or a prepared query's answer. Its servers are the
    instances of the first of its targets that has any: the resolver's own target, then its
    failover targets in order."""
    name: str
    connect_timeout_ms: int
    identities: tuple[str, ...]          # the services whose certificates may answer
    targets: tuple[str, ...] = ()        # Consul's target IDs: the resolver's, then its failover
    serving: str = ""                    # the target whose instances these are; "" for none
    retries: Retries | None = None
    request_timeout_ms: int | None = None    # a route's RequestTimeout: HTTP's timeout server
    instances: tuple[Instance, ...] = ()
    about: tuple[str, ...] = ()          # haproxy.cfg's comment: the targets, unless the default one
    balance: "Balance" = None            # as the resolver's LoadBalancer says; None: round robin


@dataclass(frozen=True)
class Split:
    backend: str
    weight: str               # in percent, as Consul wrote it; "" when the route does not split
    below: int | None         # taken while the request's draw (0 to 9999) is below this; None: the rest


@dataclass(frozen=True)
class Route:
    """A route of the chain's router, in its order: the first whose matches all hold takes the
    request. The last catches all, and has no matches."""
    label: str                            # route-1, route-2, ...
    matches: tuple[Match, ...]
    splits: tuple[Split, ...]
    rewrite: tuple[str, str] | None = None    # replace-path's regex and replacement
    about: str = ""                           # haproxy.cfg's comment on a split: the weights


@dataclass(frozen=True)
class Upstream(_Speaks):
    kind: str                     # service | prepared_query
    name: str
    datacenter: str | None
    peer: str | None
    bind: str                     # ip:port or a unix socket path
    socket_mode: str | None
    protocol: str | None          # as Config sets it; None until the chain's is known
    connect_timeout_ms: int | None    # as Config sets it; None: the chain's
    max_connections: int | None
    passive_health_check: PassiveHealthCheck | None
    advanced_check: str | None
    backends: tuple[Backend, ...] = ()     # once resolved: the first one is the default
    routes: tuple[Route, ...] = ()         # HTTP routes and splits; none: all to the backend

    @property
    def on_socket(self) -> bool:
        return self.bind.startswith("/")

    @property
    def key(self) -> UpstreamKey:
        return UpstreamKey(self.kind, self.name, self.datacenter or "", self.peer or "")

    @property
    def default_backend(self) -> str:
        """Where a request no route rule sends goes: the catch-all route's last split."""
        return self.routes[-1].splits[-1].backend if self.routes else self.backends[0].name

    @property
    def follows_chain(self) -> bool:
        """Whether Consul compiles a discovery chain for it: a service's, not a peer's (1.8.7
        has no peering) and not a prepared query's."""
        return self.kind == "service" and not self.peer

    @property
    def instances(self) -> tuple[Instance, ...]:
        return tuple(i for backend in self.backends for i in backend.instances)

    @property
    def proxy_name(self) -> str:
        """The backend name in haproxy.cfg and on the runtime API: unique as Consul keeps
        upstreams unique."""
        prefix = "query" if self.kind == "prepared_query" else "upstream"
        suffix = "".join(f".{part}" for part in (self.datacenter, self.peer) if part)
        return f"{prefix}_{self.name}{suffix}"

    @property
    def listener_name(self) -> str:
        """The frontend name: HAProxy 3.3 and later refuse a frontend named as a backend."""
        return f"listener_{self.proxy_name}"


@dataclass(frozen=True)
class ExposePath:
    listener_port: int
    listener_bind: str            # the public listener's address, on this path's port
    path: str
    local_address: str            # where the app serves it: host:port, as Envoy dials it
    protocol: str

    @property
    def h2(self) -> bool:
        return self.protocol == "http2"


@dataclass(frozen=True)
class Sidecar(_Speaks):
    proxy_id: str
    service: str                  # Proxy.DestinationServiceName: the leaf's and authorize's name
    public_bind: str
    local_app: str                # host:port or unix@/path
    protocol: str
    local_connect_timeout_ms: int
    local_request_timeout_ms: int
    local_idle_timeout_ms: int
    max_inbound_connections: int
    max_connection_lifetime_ms: int   # 0: none; enforced by meshgen through the runtime API
    hard_stop_after_ms: int       # how long an old worker may drain after a reload
    unsecured_bind: str | None
    syslog_server: str | None
    access_log: bool              # the public listener's line per connection (HTTP: per request)
    prometheus_bind: str | None
    stats_bind: str | None
    upstreams: tuple[Upstream, ...]
    expose_paths: tuple[ExposePath, ...]
    # The mesh config entry's settings (defined below, with the entry): Consul's defaults until read.
    mesh: "MeshEntry" = dataclasses.field(default_factory=lambda: MeshEntry())

    @property
    def app_response_timeout_ms(self) -> int:
        """HTTP only: how long the app may take to answer; no request timeout leaves the idle one."""
        return self.local_request_timeout_ms or self.local_idle_timeout_ms


def parse_registration(reg: dict, proxy_id: str) -> Sidecar:
    """The agent/service response of a sidecar, validated into a Sidecar without instances."""
    if reg.get("Kind") != "connect-proxy":
        raise MeshgenError(f"service {proxy_id!r} is not a sidecar proxy "
                           f"(Kind is {reg.get('Kind', '')!r}, want 'connect-proxy')")
    proxy = reg.get("Proxy")
    if not isinstance(proxy, dict):
        raise MeshgenError(f"service {proxy_id!r}: Proxy is missing or not an object")
    service = check_name(proxy.get("DestinationServiceName"), "Proxy.DestinationServiceName")
    config = ConfigMap(proxy.get("Config"), "Proxy.Config")
    address = reg.get("Address") or ""
    bind_field, bind_address = config.raw("bind_address")
    bind_host = check_host(bind_address if bind_address is not None else (address or "0.0.0.0"),
                           bind_field if bind_address is not None else "Address")
    bind_port = check_port(config.int("bind_port", reg.get("Port")), "Port or Proxy.Config.bind_port")
    protocol = config.choice(("protocol", "local_service_mode"), PROTOCOLS, "tcp")
    connect_timeout = config.int("local_connect_timeout_ms", 5000)
    unsecured = config.int("unsecured_bind_port", None)
    upstreams = [parse_upstream(u, f"Proxy.Upstreams[{i}]")
                 for i, u in enumerate(_list(proxy.get("Upstreams"), "Proxy.Upstreams"))]
    return Sidecar(
        proxy_id=check_name(reg.get("ID", proxy_id), "ID"),
        service=service,
        public_bind=join_host_port(bind_host, bind_port),
        local_app=_local_app(proxy),
        protocol=protocol,
        local_connect_timeout_ms=connect_timeout if connect_timeout >= 1 else 5000,
        local_request_timeout_ms=config.int("local_request_timeout_ms", 15000),
        local_idle_timeout_ms=config.int("local_idle_timeout_ms", 300000),
        max_inbound_connections=config.int("max_inbound_connections", 0),
        max_connection_lifetime_ms=config.int("max_connection_lifetime_ms", 0),
        hard_stop_after_ms=config.int("hard_stop_after_ms", 300000, minimum=1),
        unsecured_bind=(join_host_port(bind_host, check_port(unsecured, "Proxy.Config.unsecured_bind_port"))
                        if unsecured is not None else None),
        syslog_server=_syslog_server(config),
        access_log=config.flag("access_log", True),
        prometheus_bind=_optional_host_port(config, "prometheus_bind_addr", "envoy_prometheus_bind_addr"),
        stats_bind=_optional_host_port(config, "stats_bind_addr", "envoy_stats_bind_addr"),
        upstreams=tuple(sorted((u for u in upstreams if u is not None), key=lambda u: u.key)),
        expose_paths=tuple(sorted(_expose_paths(proxy, bind_host), key=lambda p: p.listener_port)),
    )


def _list(value, field: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise MeshgenError(f"{field}: expected a list, got {type(value).__name__}")
    return value


def _local_app(proxy: dict) -> str:
    if proxy.get("LocalServiceSocketPath"):
        return "unix@" + check_path(proxy["LocalServiceSocketPath"], "Proxy.LocalServiceSocketPath")
    host = check_host(proxy.get("LocalServiceAddress") or "127.0.0.1", "Proxy.LocalServiceAddress")
    return join_host_port(host, check_port(proxy.get("LocalServicePort"), "Proxy.LocalServicePort"))


def _syslog_server(config: ConfigMap) -> str | None:
    """The seed's `syslog_server`: host, host:port, or a unix socket path such as /dev/log."""
    field, value = config.raw("syslog_server")
    if value is None:
        return None
    if isinstance(value, str) and value.startswith("/"):
        return check_path(value, field)
    if isinstance(value, str) and ":" in value.strip("[]").replace("::", ""):
        return check_host_port(value, field)
    return join_host_port(check_host(value, field), 514)


def _optional_host_port(config: ConfigMap, *names: str) -> str | None:
    field, value = config.raw(*names)
    return None if value is None else check_host_port(value, field)


def parse_upstream(raw, field: str) -> Upstream | None:
    """One entry of Proxy.Upstreams; None for transparent-proxy synthetics (no port, no socket)."""
    if not isinstance(raw, dict):
        raise MeshgenError(f"{field}: expected an object")
    port, socket_path = raw.get("LocalBindPort"), raw.get("LocalBindSocketPath")
    if not port and not socket_path:
        return None
    kind = raw.get("DestinationType") or "service"
    if kind not in ("service", "prepared_query"):
        raise MeshgenError(f"{field}.DestinationType: {kind!r} is not service or prepared_query")
    config = ConfigMap(raw.get("Config"), f"{field}.Config")
    if socket_path:
        bind = check_path(socket_path, f"{field}.LocalBindSocketPath")
        mode = raw.get("LocalBindSocketMode")
        if mode is not None and not (isinstance(mode, str) and re.fullmatch(r"0?[0-7]{3}", mode)):
            raise MeshgenError(f"{field}.LocalBindSocketMode: {mode!r} is not an octal mode such as 0700")
    else:
        bind_host = check_host(raw.get("LocalBindAddress") or "127.0.0.1", f"{field}.LocalBindAddress")
        bind, mode = join_host_port(bind_host, check_port(port, f"{field}.LocalBindPort")), None
    protocol = config.choice(("protocol", "destination_mode"), PROTOCOLS, None)
    check_field, advanced = config.raw("advanced_check")
    if advanced is not None and advanced != "redis":
        raise MeshgenError(f"{check_field}: {advanced!r} is not a known check (redis)")
    max_connections = config.sub("limits").int("max_connections", None, minimum=1)
    return Upstream(
        kind=kind,
        name=check_name(raw.get("DestinationName"), f"{field}.DestinationName"),
        datacenter=check_name(raw["Datacenter"], f"{field}.Datacenter") if raw.get("Datacenter") else None,
        peer=check_name(raw["DestinationPeer"], f"{field}.DestinationPeer") if raw.get("DestinationPeer") else None,
        bind=bind, socket_mode=mode.lstrip("0").zfill(3) if mode else None,
        protocol=protocol,
        connect_timeout_ms=config.int("connect_timeout_ms", None, minimum=1),
        max_connections=max_connections,
        passive_health_check=_passive_health_check(config.sub("passive_health_check")),
        advanced_check=advanced,
    )


def _passive_health_check(config: ConfigMap) -> PassiveHealthCheck | None:
    if not config.values:
        return None
    interval_field, interval = config.raw("interval")
    ejection_field, ejection = config.raw("base_ejection_time")
    return PassiveHealthCheck(
        max_failures=config.int("max_failures", 5, minimum=1),
        interval_ms=None if interval is None else check_duration_ms(interval, interval_field),
        ejection_ms=None if ejection is None else check_duration_ms(ejection, ejection_field))


def _expose_paths(proxy: dict, bind_host: str) -> list[ExposePath]:
    """Plain HTTP listeners for health checks. They reach the app on LocalServiceAddress (or
    127.0.0.1) at LocalPathPort, as Envoy does, even when the app itself serves on a socket."""
    expose = proxy.get("Expose") or {}
    if not isinstance(expose, dict):
        raise MeshgenError("Proxy.Expose: expected an object")
    local_host = check_host(proxy.get("LocalServiceAddress") or "127.0.0.1", "Proxy.LocalServiceAddress")
    paths = []
    for i, raw in enumerate(_list(expose.get("Paths"), "Proxy.Expose.Paths")):
        field = f"Proxy.Expose.Paths[{i}]"
        if not isinstance(raw, dict):
            raise MeshgenError(f"{field}: expected an object")
        path = raw.get("Path")
        if not isinstance(path, str) or not _URL_PATH.fullmatch(path):
            raise MeshgenError(f"{field}.Path: {path!r} is not a URL path of plain characters")
        protocol = raw.get("Protocol") or "http"
        if protocol not in ("http", "http2"):
            raise MeshgenError(f"{field}.Protocol: {protocol!r} is not http or http2")
        listener_port = check_port(raw.get("ListenerPort"), f"{field}.ListenerPort")
        local_port = check_port(raw.get("LocalPathPort"), f"{field}.LocalPathPort")
        paths.append(ExposePath(listener_port, join_host_port(bind_host, listener_port), path,
                                join_host_port(local_host, local_port), protocol))
    return paths


def parse_instances(entries: list, field: str, local_dc: str) -> tuple[tuple[Instance, ...], tuple[str, ...]]:
    """Health entries to dialable instances, and a line for each entry left out because a value
    in it is bad: a bad instance costs itself, never the rest. An entry with a critical check is
    left out; one with a warning counts at its Warning weight (the agent leaves warnings out
    already where the target asks for passing only)."""
    instances, skipped = {}, []
    for i, entry in enumerate(entries):
        try:
            instance = _instance(entry, f"{field}[{i}]", local_dc)
        except MeshgenError as err:
            skipped.append(f"left out {err}")
            continue
        if instance is not None:
            instances[instance.address] = instance
    return tuple(instances[a] for a in sorted(instances)), tuple(skipped)


CHECK_STATUSES = ("passing", "warning", "critical", "maintenance")


def _instance(entry, field: str, local_dc: str) -> Instance | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("Service"), dict):
        raise MeshgenError(f"{field}: expected an object with a Service")
    svc, node = entry["Service"], entry.get("Node") if isinstance(entry.get("Node"), dict) else {}
    statuses = set()
    for i, check in enumerate(_list(entry.get("Checks"), f"{field}.Checks")):
        status = check.get("Status") if isinstance(check, dict) else None
        if status not in CHECK_STATUSES:
            raise MeshgenError(f"{field}.Checks[{i}].Status: {status!r} is not one of {', '.join(CHECK_STATUSES)}")
        statuses.add(status)
    if statuses - {"passing", "warning"}:
        return None
    if svc.get("SocketPath"):
        address = "unix@" + check_path(svc["SocketPath"], f"{field}.Service.SocketPath")
    else:
        where, host, port = _best_address(svc, node, wan=node.get("Datacenter", local_dc) != local_dc)
        address = join_host_port(check_host(host, f"{field}.{where}"), check_port(port, f"{field}.Service.Port"))
    weights = svc.get("Weights") if isinstance(svc.get("Weights"), dict) else {}
    which = "Warning" if "warning" in statuses else "Passing"
    weight = check_int(weights.get(which, 1), f"{field}.Service.Weights.{which}")
    # A sidecar answers for its destination; a connect-native instance for itself.
    if svc.get("Kind") == "connect-proxy":
        proxy = svc.get("Proxy") if isinstance(svc.get("Proxy"), dict) else {}
        service = check_name(proxy.get("DestinationServiceName"), f"{field}.Service.Proxy.DestinationServiceName")
    else:
        service = check_name(svc.get("Service"), f"{field}.Service.Service")
    # HAProxy weights stop at 256; Consul's do not. A Warning weight of 0 sends nothing.
    return Instance(address, min(max(weight, 1 if which == "Passing" else 0), 256), service)


def _best_address(svc: dict, node: dict, wan: bool) -> tuple[str, object, object]:
    """Where to dial an instance, as Consul's BestAddress tells Envoy: the service's address,
    else its node's; for an instance in another datacenter, the WAN tagged address of each
    first. Returns the field it came from, the host and the port."""
    service_wan = (svc.get("TaggedAddresses") or {}).get("wan") if isinstance(svc.get("TaggedAddresses"), dict) else None
    if wan and isinstance(service_wan, dict) and service_wan.get("Address"):
        return "Service.TaggedAddresses.wan.Address", service_wan["Address"], service_wan.get("Port") or svc.get("Port")
    if svc.get("Address"):
        return "Service.Address", svc["Address"], svc.get("Port")
    node_wan = (node.get("TaggedAddresses") or {}).get("wan") if isinstance(node.get("TaggedAddresses"), dict) else None
    if wan and node_wan:
        return "Node.TaggedAddresses.wan", node_wan, svc.get("Port")
    return "Node.Address", node.get("Address"), svc.get("Port")


# =========================================================================== discovery chain
#
# Consul compiles an upstream's service-resolver, service-splitter and service-router entries
# into one discovery chain (docs/consul-reference.md, the discovery chain), and asks a proxy to turn its nodes
# into their nearest native equivalents:
#   resolver   a backend: the instances of its target (a service, or a subset of it by filter,
#              in a datacenter), or while it has none, of its first failover target that has
#              any; its connect timeout. A redirect is compiled in: the target is where it leads.
#   splitter   weighted use_backend rules on one draw of rand(10000) per request.
#   router     routes, in order: the first whose matches hold sets the route, which picks the
#              backend (or split) and rewrites the path prefix; its retries and request
#              timeout are a backend's settings, so a route with its own gets backends of its own.
# An upstream with no config entries has one default resolver: one backend, as before.

RETRYABLE_STATUS = (401, 403, 404, 408, 425, 500, 501, 502, 503, 504)    # HAProxy's retry-on codes
_REWRITE = re.compile(r"/[A-Za-z0-9_./~+-]{0,250}")     # no "%" (log-format) and no "\\" (backrefs)
_QUERY_MATCHES = (("Exact", "exact"), ("Regex", "regex"))


@dataclass(frozen=True)
class Target:
    """A set of instances the chain sends to: a service, or a subset of it, in a datacenter."""
    id: str                   # Consul's: [subset.]service.namespace.datacenter
    service: str
    datacenter: str
    namespace: str
    filter: str               # the subset's filter expression; "" for all instances
    only_passing: bool        # the subset's OnlyPassing: a warning instance is left out

    @property
    def query(self) -> Query:
        # ?cached: the agent answers from its cache, and with the servers out of reach it keeps
        # answering with the last instances it knew (Consul's integration guide: "fail static").
        params = [("dc", self.datacenter)]
        if self.namespace not in ("", "default"):
            params.append(("ns", self.namespace))
        if self.filter:
            params.append(("filter", self.filter))
        if self.only_passing:
            params.append(("passing", ""))
        return Query("GET", f"/v1/health/connect/{quote(self.service, safe='')}", tuple(params) + (("cached", ""),))


@dataclass(frozen=True)
class ChainResolver:
    node: str
    targets: tuple[Target, ...]          # its own, then its failover targets in order
    connect_timeout_ms: int
    request_timeout_ms: int | None = None    # Consul 1.15+: for routes that set none
    unapplied: tuple[str, ...] = ()          # what it asks that meshgen does not render
    balance: "Balance | None" = None         # its LoadBalancer; None: round robin


@dataclass(frozen=True)
class ChainRoute:
    matches: tuple[Match, ...]
    splits: tuple[tuple[int, str], ...]  # (weight in hundredths of a percent, resolver node)
    rewrite: tuple[str, str] | None
    request_timeout_ms: int | None
    retries: Retries | None
    unapplied: tuple[str, ...] = ()


@dataclass(frozen=True)
class Chain:
    protocol: str
    routes: tuple[ChainRoute, ...]       # a chain with no router: one route that catches all
    resolvers: tuple[ChainResolver, ...]

    @property
    def targets(self) -> tuple[Target, ...]:
        return tuple(t for r in self.resolvers for t in r.targets)

    @property
    def unapplied(self) -> tuple[str, ...]:
        """What the chain asks that meshgen does not render, for `render` to name."""
        return tuple(text for part in self.resolvers + self.routes for text in part.unapplied)


def parse_chain(data: dict, upstream: Upstream) -> Chain:
    """The agent's compiled chain, checked: every node and target it names exists, values are
    safe for haproxy.cfg."""
    field = f"discovery chain of {upstream.name}"
    chain = data["Chain"]
    protocol = chain.get("Protocol")
    if protocol not in PROTOCOLS:
        raise MeshgenError(f"{field}.Protocol: {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    nodes, targets = chain.get("Nodes"), chain.get("Targets")
    if not isinstance(nodes, dict) or not isinstance(targets, dict):
        raise MeshgenError(f"{field}: Nodes and Targets must be objects")

    def node(name) -> dict:
        if not isinstance(name, str) or not isinstance(nodes.get(name), dict):
            raise MeshgenError(f"{field}: node {name!r} is not in Nodes")
        return nodes[name]

    def splits(name, depth: int = 0) -> list[tuple[int, str]]:
        """The resolvers a node leads to, by weight out of 10000."""
        found = node(name)
        if found.get("Type") == "resolver":
            return [(10000, name)]
        if found.get("Type") != "splitter" or depth > 8:
            raise MeshgenError(f"{field}.Nodes[{name}]: a {found.get('Type')!r} node cannot follow a route or split")
        led = []
        for i, split in enumerate(_list(found.get("Splits"), f"{field}.Nodes[{name}].Splits")):
            if not isinstance(split, dict) or not isinstance(split.get("Weight"), (int, float)) \
                    or not 0 <= split["Weight"] <= 100:
                raise MeshgenError(f"{field}.Nodes[{name}].Splits[{i}].Weight: a percentage is expected")
            led += [(round(split["Weight"] * weight / 100), resolver)
                    for weight, resolver in splits(split.get("NextNode"), depth + 1)]
        if not led:
            raise MeshgenError(f"{field}.Nodes[{name}].Splits: a splitter must split to something")
        return led

    start = chain.get("StartNode")
    if node(start).get("Type") == "router":
        routes = tuple(parse_route(raw, f"{field}.Nodes[{start}].Routes[{i}]", f"route-{i + 1}", splits)
                       for i, raw in enumerate(_list(node(start).get("Routes"), f"{field}.Nodes[{start}].Routes")))
        if not routes or routes[-1].matches:
            raise MeshgenError(f"{field}.Nodes[{start}].Routes: the last route must catch every request")
    else:
        routes = (ChainRoute((), tuple(splits(start)), None, None, None),)
    used = sorted({resolver for route in routes for _, resolver in route.splits})
    return Chain(protocol, routes, tuple(parse_resolver(name, node(name), targets, field) for name in used))


# Chain settings of newer Consul versions that meshgen does not render; `render` names them
# rather than route differently from Envoy in silence.
UNAPPLIED_DESTINATION = ("RequestHeaders", "ResponseHeaders", "RetryOn", "IdleTimeout")


@dataclass(frozen=True)
class Balance:
    """How a backend picks an instance, from a resolver's LoadBalancer."""
    algorithm: str              # leastconn, random, or by a hash of: header, query, cookie, source
    key: str = ""               # the header's, query parameter's or cookie's name


# Envoy's load-balancing policies that HAProxy has an equivalent of. least_request: Envoy
# picks the less busy of two random hosts, leastconn the least busy of all. random: one draw
# (HAProxy's plain random draws two and takes the less busy). ring_hash and maglev: a
# consistent hash of what the one hash policy names.
_BALANCE = {"least_request": "leastconn", "random": "random"}
_HASH_FIELDS = {"header": "header", "query_parameter": "query", "cookie": "cookie"}


def parse_load_balancer(raw, name: str, field: str) -> tuple[Balance | None, tuple[str, ...]]:
    """The node's LoadBalancer: how to balance, or what of it is not applied."""
    raw = _object(raw, field)
    policy = raw.get("Policy") or "round_robin"
    if not isinstance(policy, str):
        raise MeshgenError(f"{field}.Policy: {_safe_reason(str(policy))!r} is not a policy name")
    if policy == "round_robin":
        return None, ()
    if policy in _BALANCE:
        return Balance(_BALANCE[policy]), ()
    not_applied = (f"{name}: LoadBalancer policy {_safe_reason(str(policy))!r} is not applied (HAProxy balances round robin)",)
    hashes = _list(raw.get("HashPolicies"), f"{field}.HashPolicies")
    if policy not in ("ring_hash", "maglev") or len(hashes) != 1 or not isinstance(hashes[0], dict):
        return None, not_applied
    rule = hashes[0]
    if rule.get("SourceIP") is True:
        return Balance("source"), ()
    kind, key = _HASH_FIELDS.get(rule.get("Field")) if isinstance(rule.get("Field"), str) else None, rule.get("FieldValue")
    if kind is None or rule.get("CookieConfig") or not isinstance(key, str) or not _HEADER_NAME.fullmatch(key):
        return None, not_applied     # Envoy makes the cookie it hashes on; HAProxy does not
    return Balance(kind, key), ()


def parse_resolver(name: str, raw: dict, targets: dict, field: str) -> ChainResolver:
    node_field = f"{field}.Nodes[{name}]"
    field = f"{node_field}.Resolver"
    resolver = raw.get("Resolver")
    if not isinstance(resolver, dict):
        raise MeshgenError(f"{field}: not an object")
    failover = resolver.get("Failover") or {}
    if not isinstance(failover, dict):
        raise MeshgenError(f"{field}.Failover: not an object")
    ids = [resolver.get("Target")] + _list(failover.get("Targets"), f"{field}.Failover.Targets")
    timeout, request_timeout = resolver.get("ConnectTimeout"), resolver.get("RequestTimeout")
    # Consul (1.9+) compiles a resolver's LoadBalancer onto the chain node, beside Resolver.
    balance, unapplied = parse_load_balancer(raw.get("LoadBalancer"), name, f"{node_field}.LoadBalancer")
    return ChainResolver(name, tuple(parse_target(target_id, targets, field) for target_id in ids),
                         check_duration_ms(timeout, f"{field}.ConnectTimeout") if timeout else 5000,
                         check_duration_ms(request_timeout, f"{field}.RequestTimeout") or None
                         if request_timeout else None, unapplied, balance)


def parse_target(target_id, targets: dict, field: str) -> Target:
    raw = targets.get(target_id) if isinstance(target_id, str) else None
    if not isinstance(raw, dict):
        raise MeshgenError(f"{field}: target {target_id!r} is not in Targets")
    field = f"{field}: target {target_id}"
    subset = raw.get("Subset") or {}
    if not isinstance(subset, dict):
        raise MeshgenError(f"{field}.Subset: not an object")
    # Only a string is a filter: an empty object or list read as "no filter" would let the subset
    # reach every instance of the service.
    expression = subset.get("Filter")
    expression = "" if expression is None else expression
    if not isinstance(expression, str) or len(expression) > 1000:
        raise MeshgenError(f"{field}.Subset.Filter: not a filter expression")
    return Target(check_name(target_id, field), check_name(raw.get("Service"), f"{field}.Service"),
                  check_name(raw.get("Datacenter"), f"{field}.Datacenter"),
                  check_name(raw.get("Namespace") or "default", f"{field}.Namespace"),
                  expression, subset.get("OnlyPassing") is True)


def parse_route(raw, field: str, label: str, splits) -> ChainRoute:
    """One route of a router node: its matches, where it leads, and its destination's settings."""
    if not isinstance(raw, dict) or not isinstance(raw.get("Definition"), dict):
        raise MeshgenError(f"{field}.Definition: not an object")
    definition = raw["Definition"]
    match = definition.get("Match") or {}
    http = match.get("HTTP") or {} if isinstance(match, dict) else None
    if not isinstance(http, dict):
        raise MeshgenError(f"{field}.Definition.Match: not an object with an HTTP object")
    matches = http_matches(http, f"{field}.Definition.Match.HTTP", route=True)
    if matches == (Match("path", "prefix", ("/",)),):
        matches = ()        # Consul's catch-all
    destination = definition.get("Destination") or {}
    if not isinstance(destination, dict):
        raise MeshgenError(f"{field}.Definition.Destination: not an object")
    dfield = f"{field}.Definition.Destination"
    rewrite = destination.get("PrefixRewrite") or None
    if rewrite is not None:
        if not isinstance(rewrite, str) or not _REWRITE.fullmatch(rewrite):
            raise MeshgenError(f"{dfield}.PrefixRewrite: {rewrite!r} is not a path of plain characters")
        path = next((m for m in matches if m.subject == "path" and m.how in ("prefix", "exact")), None)
        if path is None:
            raise MeshgenError(f"{dfield}.PrefixRewrite: needs a PathPrefix or PathExact match")
        literal = ("(?i)" if path.ignore_case else "") + "^" + re.escape(path.values[0])
        rewrite = (f"{literal}(.*)", rewrite + "\\1") if path.how == "prefix" else (f"{literal}$", rewrite)
    timeout = destination.get("RequestTimeout")
    return ChainRoute(matches, tuple(splits(raw.get("NextNode"))), rewrite,
                      check_duration_ms(timeout, f"{dfield}.RequestTimeout") or None if timeout else None,
                      parse_retries(destination, dfield),
                      tuple(f"{label}: Destination.{key} is not applied" for key in UNAPPLIED_DESTINATION
                            if destination.get(key)))


def parse_retries(destination: dict, field: str) -> Retries | None:
    """As Consul configures Envoy: the conditions retried on, and NumRetries tries (Envoy's
    default of one when unset); NumRetries alone retries on nothing."""
    count = check_int(destination.get("NumRetries") or 0, f"{field}.NumRetries")
    codes = _list(destination.get("RetryOnStatusCodes"), f"{field}.RetryOnStatusCodes")
    for i, code in enumerate(codes):
        if code not in RETRYABLE_STATUS:
            raise MeshgenError(f"{field}.RetryOnStatusCodes[{i}]: HAProxy retries on "
                               f"{', '.join(map(str, RETRYABLE_STATUS))} only, not {code!r}")
    on = ("conn-failure",) if destination.get("RetryOnConnectFailure") is True else ()
    on += tuple(str(code) for code in sorted(set(codes)))
    if not count and not on:
        return None
    return Retries(count or 1, on or ("none",))


def check_chain(upstream: Upstream, chain: Chain) -> Chain:
    """What the chain asks must fit the upstream: routes and splits need HTTP, the redis check tcp."""
    protocol = upstream.protocol or chain.protocol
    routed = len(chain.routes) > 1 or len(chain.routes[0].splits) > 1
    if routed and protocol == "tcp":
        raise MeshgenError(f"discovery chain of {upstream.name}: routes and splits need an HTTP protocol, not tcp")
    if upstream.advanced_check == "redis" and protocol != "tcp":
        raise MeshgenError(f"upstream {upstream.name}: the redis check needs protocol tcp, not {protocol}")
    return chain


def resolve_upstream(upstream: Upstream, chain: Chain | None, instances: dict) -> Upstream:
    """The upstream with its protocol, backends and routes: from its chain (checked by
    check_chain), or for a prepared query or a peer, from the instances its query gave.
    `instances`: Query -> its instances. An upstream that follows a chain but has none usable
    gets one backend without servers: its listener refuses connections."""
    if upstream.follows_chain and chain is not None:
        return _chain_backends(dataclasses.replace(upstream, protocol=upstream.protocol or chain.protocol),
                               chain, instances)
    found = instances.get(direct_query(upstream), ()) if not upstream.follows_chain else ()
    identities = (upstream.name,) if upstream.kind == "service" or not found \
        else tuple(sorted({i.service for i in found}))
    resolved = dataclasses.replace(upstream, protocol=upstream.protocol or "tcp", backends=(Backend(
        upstream.proxy_name, upstream.connect_timeout_ms or 5000, identities, instances=found),))
    if resolved.advanced_check == "redis" and resolved.http:
        raise MeshgenError(f"upstream {upstream.name}: the redis check needs protocol tcp, not {resolved.protocol}")
    return resolved


def _chain_backends(upstream: Upstream, chain: Chain, instances: dict) -> Upstream:
    resolvers = {r.node: r for r in chain.resolvers}
    single = len(chain.routes) == 1 and len(chain.routes[0].splits) == 1
    backends: dict[tuple, Backend] = {}

    def backend(node: str, route: ChainRoute) -> str:
        resolver = resolvers[node]
        request_timeout = route.request_timeout_ms or resolver.request_timeout_ms
        key = (node, route.retries, request_timeout)
        if key not in backends:
            name = upstream.proxy_name if single else f"{upstream.proxy_name}:{resolver.targets[0].id}"
            if route.retries is not None:
                name += f":retry-{route.retries.count}-{'-'.join(route.retries.on)}"
            if request_timeout != resolver.request_timeout_ms:
                name += f":timeout-{request_timeout}ms"
            # The first target with an instance that takes traffic serves: instances that all
            # weigh 0 (warnings at Weights.Warning 0) take none, so failover goes on past them.
            serving, servers = next(((t.id, instances[t.query]) for t in resolver.targets
                                     if any(i.weight for i in instances[t.query])), ("", ()))
            ids = tuple(t.id for t in resolver.targets)
            about = () if ids == (f"{upstream.name}.default.{resolver.targets[0].datacenter}",) else (
                f"Target {ids[0]}.",) if len(ids) == 1 else (
                f"Target {ids[0]}; while it has no healthy instance, the first of",
                f"{', '.join(ids[1:])} that has one: its instances are the servers.")
            backends[key] = Backend(
                name, resolver.connect_timeout_ms, tuple(sorted({t.service for t in resolver.targets})),
                ids, serving, route.retries, request_timeout, servers, about, resolver.balance)
        return backends[key].name

    routes = []
    for number, route in enumerate(chain.routes, 1):
        total, splits = sum(weight for weight, _ in route.splits), []
        drawn = 0
        for i, (weight, node) in enumerate(route.splits):
            drawn += weight
            last = i == len(route.splits) - 1
            splits.append(Split(backend(node, route), f"{weight / 100:g}" if len(route.splits) > 1 else "",
                                None if last else round(drawn * 10000 / total) if total else 0))
        about = "" if len(splits) == 1 else f"route-{number} splits: " + ", ".join(
            f"{split.weight}% to {split.backend}" for split in splits)
        routes.append(Route(f"route-{number}", route.matches, tuple(splits), route.rewrite, about))
    return dataclasses.replace(upstream, backends=tuple(backends.values()), routes=() if single else tuple(routes))


def default_chain(upstream: Upstream, datacenter: str) -> Chain:
    """The chain Consul compiles for an upstream no config entry names: one default resolver."""
    target = Target(f"{upstream.name}.default.{datacenter}", upstream.name, datacenter, "default", "", False)
    node = f"resolver:{target.id}"
    return Chain(upstream.protocol or "tcp", (ChainRoute((), ((10000, node),), None, None, None),),
                 (ChainResolver(node, (target,), upstream.connect_timeout_ms or 5000),))


def with_chains(sidecar: Sidecar, chains: dict, instances: dict) -> Sidecar:
    """`chains`: UpstreamKey -> Chain; `instances`: Query -> its instances."""
    return dataclasses.replace(sidecar, upstreams=tuple(
        resolve_upstream(u, chains.get(u.key), instances) for u in sidecar.upstreams))


@dataclass(frozen=True)
class ModelledUpstreams:
    """The sidecar's upstreams resolved, what was left out on the way, and what the next run
    keeps for an item that goes bad: each chain followed, each target's instances."""
    sidecar: Sidecar
    skipped: tuple[str, ...]
    kept_chains: dict          # str(Query) -> the chain answer
    kept_instances: dict       # str(Query) -> [[address, weight, service], ...]


def model_upstreams(sidecar: Sidecar, data: AgentData, previous: WatchState | None, local_dc: str) -> ModelledUpstreams:
    """Each upstream from its chain and each target from its instances, every item on its own:
    a bad instance is left out; a target the agent did not answer, or answered malformed, keeps
    the instances the last run had (none if it had none); a bad chain keeps the chain the last
    run followed, else its listener refuses connections. Each costs one line in `skipped`."""
    kept_before = previous.kept_instances if previous else {}
    labels = {direct_query(u): u.proxy_name for u in sidecar.upstreams if not u.follows_chain}
    labels |= {t.query: f"target {t.id}" for o in data.chains.values() if o.chain for t in o.chain.targets}
    instances, skipped, kept_instances = {}, [], {}
    for query, label in sorted(labels.items()):
        try:
            answer = data.answers[query]
            if isinstance(answer, MeshgenError):
                raise answer
            instances[query], left_out = parse_instances(answer.data, f"instances of {label}", local_dc)
            skipped += left_out
        except MeshgenError as err:
            instances[query] = _kept_instances(kept_before.get(str(query)))
            skipped.append(f"instances of {label}: {_one_line(str(err))}: " + (
                "the instances the last run had are kept" if instances[query] else "no instances until it is fixed"))
        kept_instances[str(query)] = [[i.address, i.weight, i.service] for i in instances[query]]
    chains, kept_chains = {}, {}
    for upstream in sidecar.upstreams:
        outcome = data.chains.get(upstream.key)
        if outcome is None:
            continue
        chains[upstream.key] = outcome.chain
        if outcome.raw is not None:
            kept_chains[str(chain_query(upstream))] = outcome.raw
        if outcome.problem:
            skipped.append(f"upstream {upstream.name}: {outcome.problem}: " + (
                "it keeps the chain the last run followed" if outcome.chain
                else "its listener refuses connections until it is fixed"))
    return ModelledUpstreams(with_chains(sidecar, chains, instances), tuple(skipped), kept_chains, kept_instances)


def _kept_instances(kept) -> tuple[Instance, ...]:
    """Instances a state file kept, checked again as any value read back is; none if any of
    them is not as this code writes them."""
    found = []
    try:
        for address, weight, service in kept or ():
            if address.startswith("unix@"):
                check_path(address[len("unix@"):], "state file: instance")
            else:
                check_host_port(address, "state file: instance")
            found.append(Instance(address, min(max(check_int(weight, "state file: weight"), 0), 256),
                                  check_name(service, "state file: service")))
    except (MeshgenError, TypeError, ValueError, AttributeError):
        return ()
    return tuple(found)


# =========================================================================== certificate checks

@dataclass(frozen=True)
class Certificates:
    roots_pem: str           # every root in Roots, then every intermediate
    leaf_pem: str            # the leaf, its intermediates, its key
    spiffe_id: str
    serial: str
    not_after: dt.datetime
    trust_domain: str
    root_ids: tuple[str, ...]
    active_root_id: str

    @property
    def serial_number(self) -> int:
        return int(self.serial.replace(":", ""), 16)

    @property
    def home(self) -> str:
        """partition/namespace of this sidecar's service, as its SPIFFE ID names them."""
        match = re.search(r"^spiffe://[^/]+(?:/ap/([^/]+))?/ns/([^/]+)/", self.spiffe_id)
        return f"{match[1] or 'default'}/{match[2]}"

    @property
    def datacenter(self) -> str:
        """This sidecar's datacenter, as its SPIFFE ID names it (checked to have one)."""
        return re.search(r"/dc/([^/]+)/svc/", self.spiffe_id)[1]


def check_certificates(roots: dict, leaf: dict, service: str, now: dt.datetime) -> Certificates:
    """Before anything is written: the leaf chains to a listed root, matches its key, names
    this service, and is inside its validity window."""
    if not isinstance(roots, dict) or not isinstance(roots.get("Roots"), list) or not roots["Roots"]:
        raise MeshgenError("CA roots: the agent listed no roots")
    if not isinstance(leaf, dict):
        raise MeshgenError("leaf certificate: expected a JSON object")
    root_certs, intermediates, root_pems, ids = [], [], [], []
    for i, root in enumerate(roots["Roots"]):
        if not isinstance(root, dict):
            raise MeshgenError(f"CA roots: Roots[{i}] is not an object")
        root_certs.append(_load_cert(root.get("RootCert"), f"CA roots: Roots[{i}].RootCert"))
        root_pems.append(_pem_of(root_certs[-1]))
        ids.append(str(root.get("ID", "")))
        for j, pem in enumerate(_list(root.get("IntermediateCerts"), f"Roots[{i}].IntermediateCerts")):
            intermediates.append(_load_cert(pem, f"CA roots: Roots[{i}].IntermediateCerts[{j}]"))
    try:
        chain = x509.load_pem_x509_certificates(str(leaf.get("CertPEM", "")).encode())
    except ValueError:
        raise MeshgenError("leaf certificate: CertPEM holds no PEM certificate") from None
    cert = chain[0]
    try:
        key = serialization.load_pem_private_key(str(leaf.get("PrivateKeyPEM", "")).encode(), None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise MeshgenError("leaf certificate: PrivateKeyPEM is not an unencrypted PEM private key") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    try:
        cert_key = cert.public_key().public_bytes(serialization.Encoding.DER, spki)
    except (ValueError, UnsupportedAlgorithm):
        raise MeshgenError("leaf certificate: CertPEM holds a public key meshgen cannot read") from None
    if key.public_key().public_bytes(serialization.Encoding.DER, spki) != cert_key:
        raise MeshgenError("leaf certificate: PrivateKeyPEM does not match the certificate's public key")
    if now >= cert.not_valid_after_utc:
        raise MeshgenError(f"leaf certificate: expired at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ} "
                           f"(now {now:%Y-%m-%dT%H:%M:%SZ}); the agent renews leaves before they expire: "
                           "is it cut off from the Consul servers?")
    if now < cert.not_valid_before_utc:
        raise MeshgenError(f"leaf certificate: not valid until {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} "
                           f"(now {now:%Y-%m-%dT%H:%M:%SZ}); is this machine's clock behind?")
    trust_domain = roots.get("TrustDomain") or ""
    if not isinstance(trust_domain, str) or (trust_domain and not _HOSTNAME.fullmatch(trust_domain)):
        raise MeshgenError(f"CA roots: TrustDomain: {trust_domain!r} is not a domain name")
    spiffe_id = _leaf_spiffe_id(cert, service, trust_domain)
    signers = intermediates + chain[1:]
    issuer, hops = cert, 0
    while not any(_issued_by(issuer, root) for root in root_certs):
        issuer = next((c for c in signers if c is not issuer and _issued_by(issuer, c)), None)
        hops += 1
        if issuer is None or hops > 4:
            raise MeshgenError("leaf certificate: does not chain to any root the agent listed")
    return Certificates(
        roots_pem="".join(root_pems + [_pem_of(c) for c in intermediates]),
        leaf_pem="".join(_pem_of(c) for c in chain) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()).decode(),
        spiffe_id=spiffe_id,
        serial=":".join(f"{b:02x}" for b in cert.serial_number.to_bytes(
            (cert.serial_number.bit_length() + 7) // 8 or 1, "big")),
        not_after=cert.not_valid_after_utc,
        trust_domain=trust_domain,
        root_ids=tuple(ids),
        active_root_id=str(roots.get("ActiveRootID", "")),
    )


def _load_cert(pem, field: str):
    try:
        return x509.load_pem_x509_certificate(str(pem).encode())
    except ValueError:
        raise MeshgenError(f"{field}: not a PEM certificate") from None


def _pem_of(cert) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _issued_by(cert, issuer) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm, x509.DuplicateExtension):
        return False


_SPIFFE_ID = re.compile(r"spiffe://[A-Za-z0-9.-]{1,253}(/[A-Za-z0-9._-]{1,128}){1,10}")


def _leaf_spiffe_id(cert, service: str, trust_domain: str) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise MeshgenError("leaf certificate: has no subject alternative name") from None
    except (ValueError, x509.DuplicateExtension) as err:
        raise MeshgenError(f"leaf certificate: malformed extensions ({_one_line(str(err))})") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise MeshgenError(f"leaf certificate: has {len(uris)} URI SANs, want exactly one SPIFFE ID")
    if not _SPIFFE_ID.fullmatch(uris[0]):     # haproxy.cfg prints it (X-Forwarded-Client-Cert's By)
        raise MeshgenError(f"leaf certificate: SPIFFE ID {_safe_reason(uris[0])!r} has characters no Consul name has")
    parts = urlsplit(uris[0])
    match = re.fullmatch(r"(?:/ap/[^/]+)?/ns/[^/]+/dc/[^/]+/svc/([^/]+)", parts.path)
    if parts.scheme != "spiffe" or not match or match.group(1) != service:
        raise MeshgenError(f"leaf certificate: SPIFFE ID {_one_line(uris[0])!r} is not one of "
                           f"service {service!r}")
    if trust_domain and parts.netloc != trust_domain:
        raise MeshgenError(f"leaf certificate: trust domain {parts.netloc!r} is not the CA's "
                           f"{trust_domain!r}")
    return uris[0]


# =========================================================================== intentions
#
# Consul's intentions for this service become intentions.map in the bundle, which haproxy.cfg
# looks up on each connection (in HTTP mode, each request): the caller's partition/namespace/service, as
# authorize.lua reads it from the SPIFFE ID, to a decision. No agent call on a connection's
# path; every thread, and every worker after a reload, decides alike; with the agent down, the
# last decisions stand (fail static). Consul stays the oracle: a caller that no intention names
# gets what the agent's authorize endpoint answers for such a caller (wildcards, ACL default
# policy, and whatever default a newer Consul adds), never a rule of ours.
#
# An L7 intention (HTTP permissions, Consul 1.9+) makes its callers' decision "l7-N", and
# haproxy.cfg tests each request against intention N's permissions: the first that matches
# decides, and a request that matches none gets Consul's default, as a caller no intention
# names would. That default is the agent's answer only while no "*" intention hides it; with
# one, it is unknown, and such requests are denied. On a tcp service an L7 intention denies,
# as it does for Envoy.

UNNAMED_CALLER = "*"      # intentions.map's last line: a caller no other line reaches is refused
# A caller is partition/namespace/service (OSS: default/default/NAME). A "*" source reaches every
# service of its namespace, partition/namespace/*, or with namespace "*" every service of its
# partition, partition/*/*. haproxy.cfg looks a caller up in that order, most specific first, as
# Consul ranks their precedence, and UNNAMED_CALLER last. The agent's answer for a caller no
# intention names is the line of this sidecar's own namespace (partition/namespace/*), unless an
# intention holds it: the agent was asked about such a caller, and its answer is for them alone.
_REASON_UNSAFE = re.compile(r"[^A-Za-z0-9 ._:/*=>(),-]")
_QUOTABLE = re.compile(r"[\x20-\x26\x28-\x7e]{0,512}")      # printable ASCII but "'"
_HEADER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_METHOD = re.compile(r"[A-Z]{1,16}")
_PATH_MATCHES = (("PathExact", "exact"), ("PathPrefix", "prefix"), ("PathRegex", "regex"))
_HEADER_MATCHES = (("Exact", "exact"), ("Prefix", "prefix"), ("Suffix", "suffix"), ("Regex", "regex"))
# An intention's header condition may also look for a part of the value, and ignore case
# (Consul 1.20.1+, CVE-2024-10006); a route's may not.
_PERMISSION_HEADER_MATCHES = _HEADER_MATCHES + (("Contains", "contains"),)


@dataclass(frozen=True)
class Match:
    """One condition of an HTTP permission or route, finished for haproxy.cfg to print."""
    subject: str                 # path, method, header or query (a query parameter)
    how: str                     # exact, prefix, suffix, contains, regex, present; any (of the methods)
    values: tuple[str, ...]      # printable ASCII without "'"; a regex is anchored, as Envoy's
    header: str = ""             # the header's or query parameter's name
    invert: bool = False
    ignore_case: bool = False    # ASCII letters in either case, as Envoy's ignore_case


@dataclass(frozen=True)
class Permission:
    label: str                   # what the log says decided: allow:permission-1, deny:default
    matches: tuple[Match, ...]   # all must hold; none: every request


@dataclass(frozen=True)
class L7Rules:
    tag: str                     # its callers' decision in intentions.map: l7-1, l7-2, ...
    permissions: tuple[Permission, ...]


@dataclass(frozen=True)
class Decision:
    caller: str       # partition/namespace/service, a wildcard of one, or UNNAMED_CALLER
    verdict: str      # allow, deny, or an L7Rules tag
    reason: str       # logged with the connection: safe characters only, no "|"


    @property
    def map_value(self) -> str:
        """Its value in intentions.map, which haproxy.cfg splits at "|"."""
        return f"{self.verdict}|{self.reason}"


@dataclass(frozen=True)
class Intentions:
    decisions: tuple[Decision, ...]     # named callers by name, then UNNAMED_CALLER
    l7: tuple[L7Rules, ...] = ()
    unmatched: str = "deny"             # for a request none of an L7 intention's permissions match


@dataclass(frozen=True)
class Intention:
    """One entry of the agent's match list, checked."""
    caller: str                          # partition/namespace/name, a wildcard key, or UNNAMED_CALLER
    action: str | None                   # allow or deny; None for an L7 intention
    permissions: tuple[tuple[str, tuple[Match, ...]], ...]   # (allow|deny, matches)
    text: str                            # source => destination (precedence N)
    invalid: bool = False                # a value in it was bad: it denies its callers


def _safe_reason(text: str) -> str:
    return _REASON_UNSAFE.sub("?", text)[:200]


def _intention_name(entry: dict, side: str, field: str) -> str:
    value = entry.get(f"{side}Name")
    return value if value == "*" else check_name(value, f"{field}.{side}Name")


def _quotable(value, field: str) -> str:
    if not isinstance(value, str) or not _QUOTABLE.fullmatch(value):
        raise MeshgenError(f"{field}: {value!r} is not printable ASCII without \"'\" (at most 512 characters)")
    return value


# HAProxy ends an inline ACL at any word "}", quoted or not; every other value is safe after
# "--", which ends the ACL's flags (a leading "-" would be read as one).
_ACL_END_AS_REGEX = {"exact": "^[}]$", "prefix": "^[}]", "suffix": "[}]$", "contains": "[}]"}


def _literal_match(subject: str, how: str, value, field: str, **options) -> Match:
    """A path, header or query parameter condition on one value, in a form HAProxy reads as
    that value whatever its characters."""
    value = _pattern(how, value, field)
    if value == "}" and how in _ACL_END_AS_REGEX:
        how, value = "regex", _ACL_END_AS_REGEX[how]
    return Match(subject, how, (value,), **options)


def _pattern(how: str, value, field: str) -> str:
    value = _quotable(value, field)
    if how != "regex":
        return value
    try:
        re.compile(value)
    except re.error as err:
        raise MeshgenError(f"{field}: {value!r} is not a regular expression ({err})") from None
    return f"^(?:{value})$"    # Consul's (Envoy's) regexes match the whole value


def parse_permission(raw, field: str) -> tuple[str, tuple[Match, ...]]:
    if not isinstance(raw, dict) or raw.get("Action") not in ("allow", "deny"):
        raise MeshgenError(f"{field}.Action: must be allow or deny")
    if raw.get("JWT"):
        # Envoy lets such a permission match only with a valid token; HAProxy cannot check one.
        raise MeshgenError(f"{field}.JWT: meshgen cannot verify JSON Web Tokens")
    http = raw.get("HTTP") or {}
    if not isinstance(http, dict):
        raise MeshgenError(f"{field}.HTTP: not an object")
    return raw["Action"], http_matches(http, f"{field}.HTTP")


def http_matches(http: dict, field: str, route: bool = False) -> tuple[Match, ...]:
    """The conditions of an intention's permission or a router's route: path, methods, headers;
    a route may also match query parameters, and paths regardless of case (but for a regex, as
    Envoy's case_sensitive, which Consul sets from CaseInsensitive)."""
    path_ignore_case = route and _bool(http.get("CaseInsensitive"), f"{field}.CaseInsensitive")
    matches = [_literal_match("path", how, http[key], f"{field}.{key}", ignore_case=path_ignore_case and how != "regex")
               for key, how in _PATH_MATCHES if http.get(key)]
    methods = _list(http.get("Methods"), f"{field}.Methods")
    for i, method in enumerate(methods):
        if not isinstance(method, str) or not _METHOD.fullmatch(method):
            raise MeshgenError(f"{field}.Methods[{i}]: {method!r} is not an HTTP method")
    if methods:
        matches.append(Match("method", "any", tuple(methods)))
    matches += [_header_match(header, f"{field}.Header[{i}]", route)
                for i, header in enumerate(_list(http.get("Header"), f"{field}.Header"))]
    if route:
        matches += [_query_match(param, f"{field}.QueryParam[{i}]")
                    for i, param in enumerate(_list(http.get("QueryParam"), f"{field}.QueryParam"))]
    elif http.get("QueryParam"):
        raise MeshgenError(f"{field}.QueryParam: not a condition here")
    return tuple(matches)


def _query_match(raw, field: str) -> Match:
    return _named_match(raw, field, "query", _QUERY_MATCHES)


def _header_match(raw, field: str, route: bool) -> Match:
    if route:
        return _named_match(raw, field, "header", _HEADER_MATCHES)
    # Envoy ignores ignore_case for a regex, and it means nothing for Present.
    ignore_case = isinstance(raw, dict) and _bool(raw.get("IgnoreCase"), f"{field}.IgnoreCase")
    return _named_match(raw, field, "header", _PERMISSION_HEADER_MATCHES, ignore_case)


def _named_match(raw, field: str, subject: str, kinds: tuple, ignore_case: bool = False) -> Match:
    """A header's or query parameter's condition: its name, and exactly one way to match it."""
    if not isinstance(raw, dict):
        raise MeshgenError(f"{field}: not an object")
    name = raw.get("Name")
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
        raise MeshgenError(f"{field}.Name: {name!r} is not a {subject} name meshgen can match")
    found = [(key, how) for key, how in kinds if raw.get(key) not in (None, "")]
    if raw.get("Present") is True:
        found.append(("Present", "present"))
    if len(found) != 1:
        raise MeshgenError(f"{field}: needs exactly one of Present, {', '.join(key for key, _ in kinds)}")
    key, how = found[0]
    invert = subject == "header" and raw.get("Invert") is True
    if how == "present":
        return Match(subject, how, (), header=name, invert=invert)
    return _literal_match(subject, how, raw[key], f"{field}.{key}", header=name, invert=invert,
                          ignore_case=ignore_case and how != "regex")


def parse_intention(entry, field: str) -> Intention:
    if not isinstance(entry, dict):
        raise MeshgenError(f"{field}: not an object")
    source, destination = _intention_name(entry, "Source", field), _intention_name(entry, "Destination", field)
    caller = _caller_key(entry, source, field)
    namespace = entry.get("SourceNS") or "default"
    permissions = tuple(parse_permission(raw, f"{field}.Permissions[{i}]")
                        for i, raw in enumerate(_list(entry.get("Permissions"), f"{field}.Permissions")))
    action = None if permissions else entry.get("Action")
    if not permissions and action not in ("allow", "deny"):
        raise MeshgenError(f"{field}.Action: {action!r} is neither allow nor deny")
    precedence = entry.get("Precedence")
    text = (f"{namespace}/{source} => {entry.get('DestinationNS') or 'default'}/{destination} "
            f"(precedence {precedence if isinstance(precedence, int) else '?'})")
    return Intention(caller, action, permissions, text)


def _unset_is_default(value):
    """Consul's reading of an unset partition or namespace; any other value stays itself, to be
    checked (a list or a 0 must not pass for "default")."""
    return "default" if value is None or value == "" else value


def _caller_key(entry: dict, source: str, field: str) -> str:
    """The intentions.map key of an intention's source (see UNNAMED_CALLER)."""
    partition = check_name(_unset_is_default(entry.get("SourcePartition")), f"{field}.SourcePartition")
    namespace = _unset_is_default(entry.get("SourceNS"))
    if namespace == "*" and source != "*":
        raise MeshgenError(f"{field}.SourceNS: '*' needs SourceName '*' too")
    if namespace != "*":
        check_name(namespace, f"{field}.SourceNS")
    return f"{partition}/{namespace}/{source}"


def parse_intentions(entries: list, field: str) -> tuple[list[Intention], tuple[str, ...]]:
    """The match list, each intention on its own: a bad one denies the callers it names, and only
    them, in its place in Consul's order (so it still outranks what it outranked); one that names
    no caller meshgen could ever match is left out. Each costs one line."""
    listed, skipped = [], []
    for i, entry in enumerate(entries):
        try:
            listed.append(parse_intention(entry, f"{field}[{i}]"))
        except MeshgenError as err:
            caller = _named_caller(entry)
            if caller is None:
                skipped.append(f"{_one_line(str(err))}: it names no caller meshgen can match, so it is left out")
            else:
                listed.append(Intention(caller, "deny", (), f"{caller} => this service, entry {i} of the match list",
                                        invalid=True))
                skipped.append(f"{_one_line(str(err))}: its callers ({caller}) are denied")
    return listed, tuple(skipped)


def _named_caller(entry) -> str | None:
    """The caller a malformed intention names, if that much of it is sound."""
    try:
        return _caller_key(entry, _intention_name(entry, "Source", ""), "")
    except (MeshgenError, AttributeError):
        return None


def wider_keys(caller: str) -> tuple[str, ...]:
    """The wildcard keys that also reach `caller`, most specific first: the order haproxy.cfg
    looks them up in after the caller's own."""
    partition, namespace, service = caller.split("/")
    return ((f"{partition}/{namespace}/*",) if service != "*" else ()) + (
        (f"{partition}/*/*",) if namespace != "*" else ())


def deciding_intentions(intentions: list[Intention]) -> dict:
    """From Consul's order (highest precedence first), the intention that decides each key: the
    first whose source is the key itself or a wildcard reaching it. A key that a wider wildcard
    reached first gets no line: the lookup falls through to that wildcard's."""
    named, wildcards = {}, set()
    for intention in intentions:
        key = intention.caller
        if not wildcards.intersection(wider_keys(key)):
            named.setdefault(key, intention)
        if key.endswith("/*"):
            wildcards.add(key)
    return named


def decision_of(decisions: dict, caller: str) -> str:
    """A caller's map value, looked up as haproxy.cfg does: its own key, then wider ones."""
    for key in (caller, *wider_keys(caller), UNNAMED_CALLER):
        if key in decisions:
            return decisions[key]
    return "deny|"


def unnamed_caller_uri(leaf_spiffe_id: str, intentions: list[Intention]) -> str:
    """A SPIFFE ID of this mesh for a service that no intention names: the agent's answer for
    it is its answer for every such caller."""
    names = {intention.caller.rsplit("/", 1)[-1] for intention in intentions}
    name = "meshgen-unnamed-caller"
    while name in names:
        name += "-x"
    return f"{leaf_spiffe_id.rsplit('/', 1)[0]}/{name}"


def decide(intentions: list[Intention], http: bool, agent_allows: bool, agent_reason: str,
           home: str = "default/default") -> Intentions:
    """What intentions.map and haproxy.cfg's L7 rules hold: each named caller's decision, the
    agent's for every other caller of this sidecar's own partition and namespace (`home`: the
    agent was asked about such a caller, and its answer holds for them alone), and the rules of
    each L7 intention that decides someone. A caller of another partition or namespace that no
    line reaches is refused."""
    named = deciding_intentions(intentions)
    agent_verdict = "allow" if agent_allows else "deny"
    rules: dict[Intention, L7Rules] = {}

    def decision(caller: str, intention: Intention) -> Decision:
        if intention.invalid:
            return Decision(caller, "deny", _safe_reason(f"intention invalid, so deny: {intention.text}"))
        if intention.action is not None:
            return Decision(caller, intention.action, _safe_reason(f"intention: {intention.text}: {intention.action}"))
        if not http:
            return Decision(caller, "deny", _safe_reason(f"L7 intention on a tcp service: {intention.text}: deny"))
        found = rules.setdefault(intention, L7Rules(f"l7-{len(rules) + 1}", tuple(
            Permission(f"{action}:permission-{i}", matches)
            for i, (action, matches) in enumerate(intention.permissions, 1))))
        return Decision(caller, found.tag, _safe_reason(f"L7 intention: {intention.text}"))
    decisions = [decision(caller, named[caller]) for caller in named]
    home_callers = f"{home}/*"
    if not {home_callers, *wider_keys(home_callers)} & set(named):
        decisions.append(Decision(home_callers, agent_verdict, _safe_reason(
            f"no intention names the caller, the agent says: {agent_reason or agent_verdict}")))
    decisions.sort(key=lambda d: d.caller)
    decisions.append(Decision(UNNAMED_CALLER, "deny", "no intention names a caller of another partition or namespace"))
    # A request no permission of an L7 intention matches gets Consul's default; the agent's
    # answer is that only while no wildcard intention weighs in on it, and unknown otherwise.
    wildcard = any(key.endswith("/*") for key in named)
    return Intentions(tuple(decisions), tuple(rules.values()), unmatched="deny" if wildcard else agent_verdict)


# =========================================================================== mesh config entry
#
# The mesh entry's HTTP.Incoming.RequestNormalization (Consul 1.20.1+, CVE-2024-10005) says what
# Consul has Envoy do to each request on the public listener before anything reads it: the L7
# intentions decide on, and the app gets, the normalized request. With no entry, and on a Consul
# older than the entry (1.8.7), Consul's defaults apply: the path normalized as RFC 3986 says,
# nothing more. Consul leaves upstream listeners alone (Envoy's own default: no normalization),
# and so does meshgen. docs/http.md gives the exact semantics.

_ESCAPED_SLASHES = {"IMPLEMENTATION_SPECIFIC_DEFAULT": "keep", "KEEP_UNCHANGED": "keep", "REJECT_REQUEST": "reject",
                    "UNESCAPE_AND_REDIRECT": "redirect", "UNESCAPE_AND_FORWARD": "forward"}
_UNDERSCORES = {"ALLOW": "allow", "REJECT_REQUEST": "reject", "DROP_HEADER": "drop"}


@dataclass(frozen=True)
class RequestNormalization:
    """What the public listener does to a request before its rules read it (HTTP only)."""
    path: bool = True               # RFC 3986: unreserved characters decoded, dot segments removed
    merge_slashes: bool = False
    escaped_slashes: str = "keep"   # %2F and %5C: keep, reject (400), redirect (307) or forward unescaped
    underscores: str = "allow"      # a header whose name has "_": allow, reject (400) or drop

    @property
    def changes_requests(self) -> bool:
        return self != RequestNormalization(path=False)


# The mesh entry's TLS.Incoming (the public listener) and TLS.Outgoing (every upstream
# connection), as Consul gives them to Envoy; TLS_AUTO or unset leaves HAProxy's defaults.
_TLS_VERSIONS = {"TLS_AUTO": "", "TLSv1_0": "TLSv1.0", "TLSv1_1": "TLSv1.1", "TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}
# Consul's cipher suite names (TLS 1.2 and earlier), as OpenSSL names them.
_CIPHER_SUITES = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
}


@dataclass(frozen=True)
class TLSSettings:
    """One direction's TLS versions and TLS 1.2 cipher suites, in HAProxy's names; empty: HAProxy's."""
    min_version: str = ""
    max_version: str = ""
    ciphers: str = ""           # OpenSSL's cipher list, colon-separated


@dataclass(frozen=True)
class MeshEntry:
    normalization: RequestNormalization = RequestNormalization()
    incoming_tls: TLSSettings = TLSSettings()
    outgoing_tls: TLSSettings = TLSSettings()
    # HTTP.SanitizeXForwardedClientCert: the app gets no X-Forwarded-Client-Cert at all.
    sanitize_client_cert: bool = False


def _object(value, field: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MeshgenError(f"{field}: not an object")
    return value


def _bool(value, field: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise MeshgenError(f"{field}: {value!r} is not true or false")
    return value


def _enum(value, choices: dict, field: str) -> str:
    if value is None or value == "":
        return next(iter(choices.values()))
    if not isinstance(value, str) or value not in choices:
        raise MeshgenError(f"{field}: {_safe_reason(str(value))!r} is not one of {', '.join(choices)}")
    return choices[value]


def parse_mesh_entry(data: dict | None) -> MeshEntry:
    """The mesh entry as GET /v1/config/mesh/mesh returns it, or None when there is none."""
    tls = _object(_object(data, "mesh entry").get("TLS"), "mesh entry TLS")
    http = _object(_object(data, "mesh entry").get("HTTP"), "mesh entry HTTP")
    return MeshEntry(_request_normalization(data), _tls_settings(tls, "Incoming"), _tls_settings(tls, "Outgoing"),
                     _bool(http.get("SanitizeXForwardedClientCert"), "mesh entry HTTP.SanitizeXForwardedClientCert"))


def _tls_settings(tls: dict, direction: str) -> TLSSettings:
    field = f"mesh entry TLS.{direction}"
    raw = _object(tls.get(direction), field)
    low, high = (_TLS_VERSIONS[_enum(raw.get(key), dict(zip(_TLS_VERSIONS, _TLS_VERSIONS)), f"{field}.{key}")]
                 for key in ("TLSMinVersion", "TLSMaxVersion"))
    if low and high and low > high:
        raise MeshgenError(f"{field}: TLSMinVersion {low} is above TLSMaxVersion {high}")
    suites = _list(raw.get("CipherSuites"), f"{field}.CipherSuites")
    for i, suite in enumerate(suites):
        if not isinstance(suite, str) or suite not in _CIPHER_SUITES:
            raise MeshgenError(f"{field}.CipherSuites[{i}]: {_safe_reason(str(suite))!r} is not a cipher suite Consul names")
    return TLSSettings(low, high, ":".join(_CIPHER_SUITES[suite] for suite in suites))


def _request_normalization(data: dict | None) -> RequestNormalization:
    field = "mesh entry HTTP.Incoming.RequestNormalization"
    http = _object(_object(data, "mesh entry").get("HTTP"), "mesh entry HTTP")
    raw = _object(_object(http.get("Incoming"), "mesh entry HTTP.Incoming").get("RequestNormalization"), field)
    return RequestNormalization(
        path=not _bool(raw.get("InsecureDisablePathNormalization"), f"{field}.InsecureDisablePathNormalization"),
        merge_slashes=_bool(raw.get("MergeSlashes"), f"{field}.MergeSlashes"),
        escaped_slashes=_enum(raw.get("PathWithEscapedSlashesAction"), _ESCAPED_SLASHES,
                              f"{field}.PathWithEscapedSlashesAction"),
        underscores=_enum(raw.get("HeadersWithUnderscoresAction"), _UNDERSCORES,
                          f"{field}.HeadersWithUnderscoresAction"))


def with_mesh(sidecar: Sidecar, answers: dict) -> Sidecar:
    reply = next(reply for query, reply in answers.items() if query.path == MESH_QUERY.path)
    return dataclasses.replace(sidecar, mesh=parse_mesh_entry(reply.data))


# =========================================================================== render

HERE = Path(__file__).resolve().parent


TEMPLATES = ("haproxy.cfg", "public.crt-list", "intentions.map", "callers.map",   # from templates/NAME.j2
             "servers.map")
# The bundle's facts for the live path and `meshgen status`, from the model that haproxy.cfg is
# rendered from: nothing reads haproxy.cfg back.
MANIFEST = "manifest.json"
FIXED_BUNDLE_PATH = "/meshgen-bundle"


@dataclass(frozen=True)
class ServerOptions:
    """One default-server line of an upstream's backends, for HAProxy versions from `since` and
    before `before` ("": no bound), as the config's `.if version_atleast()` selects it when
    HAProxy loads it. Defined here once: haproxy.cfg prints it, and a server the runtime API
    adds repeats it, since a dynamic server takes nothing from default-server."""
    text: str
    since: str = ""
    before: str = ""
    why: tuple[str, ...] = ()            # haproxy.cfg's comment on it

    def applies_to(self, version: tuple[int, ...]) -> bool:
        def parsed(text: str) -> tuple[int, ...]:
            return tuple(int(part) for part in text.split("."))
        return (not self.since or version >= parsed(self.since)) and (not self.before or version < parsed(self.before))


def upstream_server_options(upstream: Upstream, bundle: str) -> tuple[ServerOptions, ...]:
    """How every server of an upstream is dialled: mutual TLS with this bundle's leaf and roots,
    health checks as Config asks."""
    check = upstream.passive_health_check
    words = [f"ssl crt {bundle}/leaf.pem ca-file {bundle}/roots.pem verify required"]
    words += ["alpn h2"] if upstream.h2 else []
    words += ["check check-ssl"] if upstream.advanced_check or check else []
    if check:
        words.append(f"observe {'layer7' if upstream.http else 'layer4'} error-limit {check.max_failures} "
                     "on-error mark-down")
        words += [f"inter {check.interval_ms}ms"] if check.interval_ms else []
        words += [f"downinter {check.ejection_ms}ms"] if check.ejection_ms else []
    options = (ServerOptions(" ".join(words)),)
    if upstream.http:
        options += (
            ServerOptions("pool-purge-delay 500ms", before="3.0", why=(
                "Idle connections to a server keep `del server` from removing it before 3.0, which drops",
                "them itself: closing them sooner lets a removed instance go within a second.")),
            ServerOptions("no-sni-auto no-check-sni-auto", since="3.3", why=(
                "From 3.3 HAProxy sends the Host header as SNI and checks the server's certificate against",
                "it. Consul's certificates name no host, only the SPIFFE ID checked above.")))
    return options


@dataclass(frozen=True)
class Server:
    """One server line of an upstream backend, as the manifest records it."""
    name: str
    address: str        # host:port, [v6]:port, name:port, or unix@/path
    weight: int

    @classmethod
    def of(cls, instance: Instance) -> "Server":
        return cls(instance.server_name, instance.address, instance.weight)

    @property
    def by_name(self) -> bool:
        """Addressed by a DNS name: HAProxy resolves it when it loads the config; a server the
        runtime API adds by name is never resolved (seen on 2.6.12 and 3.4.7)."""
        host = self.address.rpartition(":")[0].strip("[]")
        if self.address.startswith("unix@"):
            return False
        try:
            ipaddress.ip_address(host)
            return False
        except ValueError:
            return True

    @property
    def state(self) -> tuple[str, str, str, int]:
        """(name, address or DNS name, port, weight) as `show servers state` shows it (its
        srv_fqdn for a server by name: srv_addr is what the name resolved to)."""
        host, _, port = self.address.rpartition(":")
        return self.name, host.strip("[]"), port, self.weight


@dataclass(frozen=True)
class Servers:
    """An upstream backend's servers, and the options a runtime `add server` must repeat."""
    backend: str
    options: tuple[ServerOptions, ...]
    servers: tuple[Server, ...]

    def options_for(self, version: tuple[int, ...]) -> str:
        return " ".join(option.text for option in self.options if option.applies_to(version))

    def moved(self, bundle: str, to: str) -> "Servers":
        """The same, with the options naming files in the bundle directory `to`."""
        return dataclasses.replace(self, options=tuple(
            dataclasses.replace(option, text=option.text.replace(f"{bundle}/", f"{to}/")) for option in self.options))


@dataclass(frozen=True)
class Manifest:
    """manifest.json: what a bundle holds that the running HAProxy can be asked about.
    `fixed` is a digest of every file but what the runtime API changes (see render_into)."""
    fixed: str
    bundle: str                          # the directory its paths name
    public_listener: str                 # host:port
    leaf_serial: str                     # hex
    roots_sha1: tuple[str, ...]
    intentions: tuple[tuple[str, str], ...]      # intentions.map's (caller, value) lines
    backends: tuple[Servers, ...]

    FORMAT = 1

    def encoded(self) -> bytes:
        """Deterministic: keys sorted, lists in the model's order."""
        document = dataclasses.asdict(self) | {"format": self.FORMAT}
        return (json.dumps(document, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def decoded(cls, data: bytes) -> "Manifest":
        document = json.loads(data)
        if document.get("format") != cls.FORMAT:
            raise ValueError(f"manifest format {document.get('format')!r}, not {cls.FORMAT}")
        return cls(
            fixed=document["fixed"], bundle=document["bundle"], public_listener=document["public_listener"],
            leaf_serial=document["leaf_serial"], roots_sha1=tuple(document["roots_sha1"]),
            intentions=tuple(tuple(line) for line in document["intentions"]),
            backends=tuple(Servers(b["backend"], tuple(ServerOptions(o["text"], o["since"], o["before"], tuple(o["why"]))
                                                      for o in b["options"]),
                                   tuple(Server(v["name"], v["address"], v["weight"]) for v in b["servers"]))
                           for b in document["backends"]))

    def servers(self) -> dict:
        return {servers.backend: servers for servers in self.backends}


def resource(relative: str) -> Path:
    """The templates and Lua script: beside this file in a checkout, under share/ when installed."""
    for base in (HERE, Path(sys.prefix) / "share" / "meshgen"):
        if (base / relative).is_file():
            return base / relative
    raise MeshgenError(f"installation is broken: {relative} not found beside {HERE} "
                       f"or under {Path(sys.prefix) / 'share' / 'meshgen'}")


@dataclass(frozen=True)
class Bundle:
    """Every file of one HAProxy bundle, by name, and the directory name it lives under."""
    name: str
    files: dict

    def mode(self, name: str) -> int:
        return 0o600 if name in SECRET_FILES else 0o644


def bundle_name(*material) -> str:
    """A digest of everything a bundle is made from, template and script included: the same
    input always gives the same name, and a config can name its own directory."""
    digest = hashlib.sha256(repr(material).encode())
    for path in (*(resource(f"templates/{t}.j2") for t in TEMPLATES), resource("authorize.lua")):
        digest.update(path.read_bytes())
    return BUNDLE_PREFIX + digest.hexdigest()[:16]


def render(sidecar: Sidecar, certs: Certificates, intentions: "Intentions", out_dir: Path,
           admin_socket: Path) -> Bundle:
    # Only what reaches the files: a new active root ID with the same certificates is no reload.
    name = bundle_name(sidecar, certs.roots_pem, certs.leaf_pem, certs.trust_domain, intentions,
                       str(out_dir.resolve()), str(admin_socket))
    return render_into(out_dir.resolve() / name, sidecar, certs, intentions, admin_socket)


def _compiled_templates() -> jinja2.BytecodeCache | None:
    """Jinja2's own cache of compiled templates, between runs: compiling the templates was most
    of a run with nothing to change (80 of its 110 ms after the imports). Jinja2 keeps it in a
    directory of the user's, 0700 (`$TMPDIR/_jinja2-cache-UID`), checks that, and rejects an
    entry whose template changed. Without a usable directory, templates compile each run."""
    try:
        return jinja2.FileSystemBytecodeCache()
    except (OSError, RuntimeError):
        return None


def render_into(bundle_dir: Path, sidecar: Sidecar, certs: Certificates, intentions: "Intentions",
                admin_socket: Path) -> Bundle:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resource("templates/haproxy.cfg.j2").parent)),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True,
        lstrip_blocks=True, autoescape=False, bytecode_cache=_compiled_templates())
    lua = resource("authorize.lua").read_bytes()
    files = render_templates(environment, sidecar, certs, intentions, str(bundle_dir), admin_socket)
    files |= {"roots.pem": certs.roots_pem.encode(), "leaf.pem": certs.leaf_pem.encode(), "authorize.lua": lua}
    # What a live change cannot alter, rendered again without the servers and with every path
    # in the bundle the same: two bundles whose digests match differ only where the runtime API
    # reaches (servers, CA roots, leaf, intentions.map).
    fixed = render_templates(environment, without_instances(sidecar), certs, intentions,
                             FIXED_BUNDLE_PATH, admin_socket)
    del fixed[INTENTIONS_MAP]
    files[MANIFEST] = manifest_of(sidecar, certs, intentions, str(bundle_dir),
                                  digest_of(fixed | {"authorize.lua": lua})).encoded()
    return Bundle(bundle_dir.name, files)


def render_templates(environment: jinja2.Environment, sidecar: Sidecar, certs: Certificates,
                     intentions: "Intentions", bundle: str, admin_socket: Path) -> dict:
    values = dict(sidecar=sidecar, trust_domain=certs.trust_domain, spiffe_id=certs.spiffe_id, intentions=intentions,
                  bundle=bundle, admin_socket=str(admin_socket), intentions_map=INTENTIONS_MAP,
                  callers_map=CALLERS_MAP,
                  servers_map=SERVERS_MAP,
                  server_options={u.proxy_name: upstream_server_options(u, bundle) for u in sidecar.upstreams})
    return {name: environment.get_template(f"{name}.j2").render(**values).encode() for name in TEMPLATES}


def without_instances(sidecar: Sidecar) -> Sidecar:
    return dataclasses.replace(sidecar, upstreams=tuple(
        dataclasses.replace(u, backends=tuple(dataclasses.replace(b, instances=()) for b in u.backends))
        for u in sidecar.upstreams))


def digest_of(files: dict) -> str:
    digest = hashlib.sha256()
    for name, data in sorted(files.items()):
        digest.update(b"%d %s %d\n" % (len(name), name.encode(), len(data)) + data)
    return digest.hexdigest()


def manifest_of(sidecar: Sidecar, certs: Certificates, intentions: "Intentions", bundle: str,
                fixed: str) -> "Manifest":
    return Manifest(
        fixed=fixed,
        bundle=bundle,
        public_listener=sidecar.public_bind,
        leaf_serial=f"{certs.serial_number:x}",
        roots_sha1=_fingerprints(certs.roots_pem.encode()),
        intentions=tuple((d.caller, d.map_value) for d in intentions.decisions),
        backends=tuple(Servers(b.name, upstream_server_options(u, bundle),
                               tuple(Server.of(i) for i in b.instances))
                       for u in sidecar.upstreams for b in u.backends))


def _fingerprints(pem: bytes) -> tuple[str, ...]:
    return tuple(sorted(c.fingerprint(hashes.SHA1()).hex().upper() for c in x509.load_pem_x509_certificates(pem)))


# =========================================================================== validate

def find_haproxy(haproxy: str) -> str:
    found = shutil.which(haproxy)
    if found is None:
        raise MeshgenError(f"--haproxy: {haproxy!r} not found; install HAProxy, point --haproxy "
                           "at it, or skip validation with --no-validate")
    return found


def validate(bundle_dir: Path, haproxy: str) -> list[str]:
    """`haproxy -c` on a written bundle, in the place it will run from; its warnings, if any."""
    try:
        result = subprocess.run([haproxy, "-c", "-f", str(bundle_dir / "haproxy.cfg")],
                                capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise MeshgenError(f"haproxy -c could not run: {_one_line(str(err))}") from None
    if result.returncode != 0:
        output = (result.stdout + result.stderr).splitlines()
        alerts = [line for line in output if "ALERT" in line and "Fatal errors" not in line
                  and "Error(s) found" not in line]
        raise MeshgenError("haproxy -c rejected the rendered config: "
                           + _one_line((alerts or output or ["no output"])[0]))
    return [_one_line(line) for line in (result.stdout + result.stderr).splitlines() if "WARNING" in line]


# =========================================================================== write
#
# The layout of DIR is drawn at the top of this file. A bundle goes live in four numbered steps,
# staged (stage_bundle) and then published (publish_bundle); every step before the swap leaves
# the live bundle untouched.


def live_name(out_dir: Path) -> str | None:
    """The name of the bundle that is live now; None when there is none."""
    link = out_dir / LIVE
    return os.readlink(link) if link.is_symlink() and link.is_dir() else None


def live_bundle(out_dir: Path) -> tuple[str | None, dict]:
    """The name and files of the bundle that is live now; (None, {}) when there is none."""
    name = live_name(out_dir)
    if name is None:
        return None, {}
    return name, {p.name: p.read_bytes() for p in sorted((out_dir / LIVE).iterdir()) if p.is_file()}


def write_files(bundle: Bundle, parent: Path) -> Path:
    """The whole bundle in a fresh directory under `parent`, durably, then renamed to its
    name: a directory called .bundle-* is always complete."""
    staging = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=parent))
    for name, data in sorted(bundle.files.items()):
        fd = os.open(staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, bundle.mode(name))
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    os.chmod(staging, 0o755)
    _fsync_dir(staging)
    final = parent / bundle.name
    if final.exists():
        shutil.rmtree(final)
    os.rename(staging, final)
    _fsync_dir(parent)
    return final


def swap_live(out_dir: Path, bundle: Bundle) -> str | None:
    """One rename makes the bundle live: a reader sees all of the old or all of the new.
    Returns the bundle that was live before."""
    previous = live_name(out_dir)
    link = out_dir / f".{LIVE}.tmp"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(bundle.name, link)
    os.replace(link, out_dir / LIVE)
    _fsync_dir(out_dir)
    return previous


def link_names(out_dir: Path, names) -> None:
    """Stable top-level names (DIR/haproxy.cfg ...) that always resolve through `live`."""
    for name in names:
        path, target = out_dir / name, f"{LIVE}/{name}"
        if path.is_symlink() and os.readlink(path) == target:
            continue
        tmp = out_dir / f".{name}.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, path)
    for path in out_dir.iterdir():
        if path.is_symlink() and path.name not in names and os.readlink(path).startswith(f"{LIVE}/"):
            path.unlink()


def remove_stale(out_dir: Path, keep: set) -> None:
    """Bundles no longer needed, and stagings of runs that died before their rename. The
    previous bundle is kept: an HAProxy reload that began before the swap may still read it."""
    for path in out_dir.iterdir():
        if (path.name.startswith((BUNDLE_PREFIX, STAGE_PREFIX)) and path.name not in keep
                and not path.is_symlink()):
            shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stage_bundle(out_dir: Path, bundle: Bundle, haproxy: str | None) -> list[str]:
    """Steps 1 and 2 of making `bundle` live: written and checked, not yet live; `haproxy -c`'s
    warnings. An error leaves the live bundle as it was, and is one line naming --out."""
    try:
        # 1. The whole bundle, durably, in a directory of its own (staged, then renamed).
        out_dir.mkdir(parents=True, exist_ok=True)
        written = write_files(bundle, out_dir)
        # 2. haproxy -c on it where it will run from; a refused bundle is removed again.
        try:
            return validate(written, haproxy) if haproxy else []
        except MeshgenError:
            if live_name(out_dir) != bundle.name:
                shutil.rmtree(written, ignore_errors=True)
            raise
    except OSError as err:
        raise MeshgenError(_write_error(out_dir, err)) from None


def publish_bundle(out_dir: Path, bundle: Bundle, loaded: str) -> tuple[str, ...]:
    """Steps 3 and 4: the staged `bundle` becomes the live one. `loaded`, the bundle HAProxy
    runs on, is kept: HAProxy names its files, and the runtime API changes them, by paths in it.
    Once the swap is done the bundle is live whatever follows, so a failure of step 4 is a note
    (returned), never an error: an error would say that nothing changed, and lose the reload."""
    try:
        # 3. One rename of the `live` link: the swap.
        previous = swap_live(out_dir, bundle)
    except OSError as err:
        raise MeshgenError(_write_error(out_dir, err)) from None
    try:
        # 4. The stable names through `live`, then bundles neither HAProxy nor a reload can
        #    still be reading.
        link_names(out_dir, sorted(bundle.files))
        remove_stale(out_dir, {bundle.name, previous, loaded})
    except OSError as err:
        return (f"the bundle is live, but tidying --out failed: {_write_error(out_dir, err)}",)
    return ()


LOCK_WAIT_SECONDS = 120.0     # longer than a run takes: fetch, haproxy -c, changes made live


@contextlib.contextmanager
def writer_lock(out_dir: Path, shared: bool, notify):
    """A flock on --out itself, held from a run's first read of it to its last write: one writer
    at a time (shared, for a dry run's reads; a dry run creates no directory, since it writes
    nothing). A run that must wait says so once, and gives up after LOCK_WAIT_SECONDS with
    nothing written."""
    try:
        if not shared:
            out_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            if not shared:
                raise
            yield
            return
    except OSError as err:
        raise MeshgenError(_write_error(out_dir, err)) from None
    try:
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, mode)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise MeshgenError(f"--out {out_dir}: another meshgen kept writing it for "
                                       f"{LOCK_WAIT_SECONDS:g} s; gave up, nothing written") from None
                if deadline - time.monotonic() > LOCK_WAIT_SECONDS - 0.05:
                    notify(f"another meshgen is writing --out {out_dir}: waiting for it "
                           f"(at most {LOCK_WAIT_SECONDS:g} s)")
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _read_marker(out_dir: Path) -> str | None:
    try:
        return (out_dir / LIVE_CHANGE_MARKER).read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise MeshgenError(_write_error(out_dir, err)) from None


def _write_marker(out_dir: Path, bundle_name: str) -> None:
    """LIVE_CHANGE_MARKER, durably, before HAProxy is changed live."""
    tmp = out_dir / f"{LIVE_CHANGE_MARKER}.tmp"
    try:
        with open(tmp, "w") as handle:
            handle.write(bundle_name + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, out_dir / LIVE_CHANGE_MARKER)
        _fsync_dir(out_dir)
    except OSError as err:
        raise MeshgenError(_write_error(out_dir, err)) from None


def _write_error(out_dir: Path, err: OSError) -> str:
    where = f" ({err.filename})" if err.filename and str(err.filename) != str(out_dir) else ""
    return f"--out {out_dir}: cannot write the bundle: {err.strerror or err}{where}"


def bundle_diff(old: dict, new: dict) -> list[str]:
    """A unified diff of haproxy.cfg; the other files are only named (secrets, PEMs, a script
    that changes with meshgen itself)."""
    lines = []
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        if name != "haproxy.cfg":
            state = "added" if before is None else "removed" if after is None else "changed"
            shown = "" if name == "authorize.lua" else " (contents not shown)"
            lines.append(f"--- {name}: {state}{shown}\n")
            continue
        lines.extend(difflib.unified_diff(
            (before or b"").decode().splitlines(keepends=True),
            (after or b"").decode().splitlines(keepends=True),
            fromfile=f"live/{name}", tofile=f"new/{name}"))
    return lines


# =========================================================================== apply live
#
# With --runtime-socket, a change the running HAProxy can take through its runtime API goes in
# live instead of by a reload, planned by comparing the live bundle's manifest.json with the new
# one's (docs/live-changes.md): new CA roots, a new leaf, an upstream's instances, intentions
# that change intentions.map alone (L7 permissions are haproxy.cfg's, a reload). HAProxy names
# files by the paths it loaded them from, in the bundle it was last (re)loaded on. Its answer
# `Success!` proves nothing (docs/haproxy-reference.md), so a change counts as applied only once
# its effect is seen:
#   roots    a throwaway CA, made in memory and never written, is committed with the new roots
#            and must let its client in; then the roots alone, and it must be refused. Both
#            commits reached the public listener, so it trusts exactly the new roots.
#   leaf     a handshake with the public listener gets the new serial.
#   both     a client without a certificate is still refused.
#   servers  `show servers state` lists exactly the servers the new manifest lists.
#   intentions  `show map` lists exactly the new lines; then no connection of a caller now
#            denied is left (`show table` of the tracked connections, `show sess`).
# Only while HAProxy runs the bundle meshgen last had it load (after an exit 3 it was not
# reloaded for, the live bundle describes something else). Any other change, or an effect not
# seen, is exit 3: the wrapper reloads HAProxy on the files already on disk. Seen so: 2.6.12
# and 3.0.11 keep the old certificate after a ca-file commit (HAProxy issue #3165) until a
# reload; a server whose connections outlast DRAIN_SECONDS cannot be deleted.


# How long a removed instance's open connections may take to end before meshgen gives up on
# deleting its server and asks for a reload, whose old worker then keeps them to their end.
DRAIN_SECONDS = 2.0


@dataclass(frozen=True)
class LiveChange:
    """What differs between the bundle HAProxy runs and a new one, when it can all go in live."""
    roots_pem: bytes | None
    leaf_pem: bytes | None
    servers: tuple[tuple[Servers, Servers], ...]     # (running, rendered), backends that changed
    intentions: tuple[tuple[str, str], ...] | None = None   # intentions.map's (caller, value) lines

    def describe(self) -> str:
        parts = (["CA roots"] if self.roots_pem else []) + (["leaf certificate"] if self.leaf_pem else [])
        parts += ["intentions"] if self.intentions is not None else []
        parts += [f"servers of {new.backend}" for _, new in self.servers]
        return ", ".join(parts) or "nothing HAProxy runs on"


def plan_live_change(live: Manifest, new: Manifest, live_files: dict, files: dict,
                     loaded_dir: Path) -> LiveChange | None:
    """The change from the live bundle to a new one, from their manifests, if the runtime API
    can make all of it; None when it needs a reload. Server options name files by the paths of
    the bundle HAProxy loaded, the names it knows them by."""
    if set(live_files) != set(files) or live.fixed != new.fixed:
        return None
    running, rendered = live.servers(), new.servers()
    changed = tuple((running[name], rendered[name].moved(new.bundle, str(loaded_dir)))
                    for name in sorted(rendered) if running[name].servers != rendered[name].servers)
    for old, now in changed:
        added = {s.name for s in now.servers} - {s.name for s in old.servers}
        # `show servers state` cannot show a socket server's path, and HAProxy never resolves
        # the name of a server the runtime API adds: no effect to see, so reload.
        if any(s.address.startswith("unix@") for s in now.servers) or \
                any(s.by_name for s in now.servers if s.name in added):
            return None
    return LiveChange(roots_pem=files["roots.pem"] if files["roots.pem"] != live_files["roots.pem"] else None,
                      leaf_pem=files["leaf.pem"] if files["leaf.pem"] != live_files["leaf.pem"] else None,
                      servers=changed,
                      intentions=new.intentions if new.intentions != live.intentions else None)


class ProbeCA:
    """A CA of meshgen's own and one client certificate from it, in memory for one run: the
    probe that tells whether committed roots reached the public listener."""

    # A SPIFFE ID of no trust domain Consul gives: authorize.lua refuses it, and logs it.
    SPIFFE_ID = "spiffe://meshgen-probe.invalid/ns/default/dc/probe/svc/meshgen-probe"

    def __init__(self):
        ca_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshgen live-change probe")])
        now = dt.datetime.now(dt.timezone.utc)

        def signed(subject: x509.Name, key, extension, critical: bool) -> bytes:
            return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                    .public_key(key.public_key()).serial_number(x509.random_serial_number())
                    .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(minutes=10))
                    .add_extension(extension, critical=critical)
                    .sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        self.root_pem = signed(issuer, ca_key, x509.BasicConstraints(ca=True, path_length=None), True)
        self.client_pem = signed(x509.Name([]), client_key, x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(self.SPIFFE_ID)]), True) + client_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _probe_context(client_pem: bytes | None, version: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE      # the probe asks what the listener does, not who it is
    context.minimum_version = context.maximum_version = version
    if client_pem is not None:
        # ssl loads certificates from files only: a file in memory keeps the key off the disk.
        fd = os.memfd_create("meshgen-probe")
        try:
            os.write(fd, client_pem)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
    return context


def _probe_address(public_bind: str) -> tuple[str, int]:
    host, _, port = public_bind.rpartition(":")
    host = host.strip("[]")
    wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1"}
    return wildcard.get(host, host), int(port)


def lets_in(address: tuple[str, int], client_pem: bytes | None, timeout: float = 3.0) -> bool:
    """Whether the listener completes a handshake with this client certificate (or none).
    TLS 1.2, where the server's verdict on a client certificate ends the handshake itself."""
    context = _probe_context(client_pem, ssl.TLSVersion.TLSv1_2)
    try:
        with socket.create_connection(address, timeout=timeout) as raw, context.wrap_socket(raw):
            return True
    except (ssl.SSLError, OSError):
        return False


def served_serial(address: tuple[str, int], timeout: float = 3.0) -> int | None:
    """The serial of the certificate the listener presents. TLS 1.3, where a client without a
    certificate finishes its side of the handshake and so sees the server's."""
    context = _probe_context(None, ssl.TLSVersion.TLSv1_3)
    try:
        with socket.create_connection(address, timeout=timeout) as raw, context.wrap_socket(raw) as conn:
            return x509.load_der_x509_certificate(conn.getpeercert(binary_form=True)).serial_number
    except (ssl.SSLError, OSError, ValueError):
        return None


@dataclass(frozen=True)
class Connection:
    """One the public listener let in, as its stick table tracks it."""
    caller: str
    address: tuple[str, str]     # the client's (address, port)
    since_ms: int                # when it came in: wall-clock milliseconds, modulo 2^32

    def age_ms(self, now: float) -> int:
        return (int(now * 1000) - self.since_ms) % 2**32


MAP_PIECE_BYTES = 8192      # half of HAProxy's default tune.bufsize: room for the command and path


def _pieces(lines: list[str], limit: int) -> list[str]:
    """Consecutive lines joined into pieces of at most `limit` bytes (a longer line alone)."""
    pieces, current = [], ""
    for line in lines:
        if current and len(current) + len(line) > limit:
            pieces.append(current)
            current = ""
        current += line
    return pieces + [current] if current else pieces


class RuntimeAPI:
    """HAProxy's admin socket, one command per connection."""

    def __init__(self, socket_path: Path, timeout: float = 5.0):
        self.socket_path, self.timeout = socket_path, timeout

    def __call__(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(str(self.socket_path))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace").strip()

    def version(self) -> tuple[int, ...]:
        """The running HAProxy's version, as `.if version_atleast()` compares it."""
        match = re.search(r"^Version: (\d+)\.(\d+)(?:\.(\d+))?", self("show info"), re.M)
        if match is None:
            raise OSError(f"no version in `show info` from {self.socket_path}")
        return tuple(int(part) for part in match.groups() if part is not None)

    def commit(self, kind: str, path: Path, pem: bytes) -> bool:
        """`set` then `commit` of a certificate or CA file; aborted if either is refused."""
        if "transaction" not in self(f"set ssl {kind} {path} <<\n{pem.decode()}").lower():
            return False
        if "Success" in self(f"commit ssl {kind} {path}"):
            return True
        self(f"abort ssl {kind} {path}")
        return False

    def replace_map(self, path: Path, entries: tuple[tuple[str, str], ...]) -> bool:
        """Every entry of a map at once (a new version, filled, then committed: no lookup sees
        it half-filled), then whether `show map` lists exactly these entries. The runtime API
        reads a command into one buffer (tune.bufsize, 16 KiB): a larger `add map` is refused
        (3.0+) or dropped without a word (2.6.12), so entries go in pieces well below it, and any
        answer but silence stops the change before its commit."""
        version = re.fullmatch(r"New version created: (\d+)", self(f"prepare map {path}"))
        if version is None:
            return False
        for piece in _pieces([f"{key} {value}\n" for key, value in entries], MAP_PIECE_BYTES):
            if self(f"add map @{version[1]} {path} <<\n{piece}") != "":
                return False
        if self(f"commit map @{version[1]} {path}") != "":
            return False
        shown = set()
        for line in self(f"show map {path}").splitlines():
            _, key, value = (line.split(" ", 2) + ["", ""])[:3]
            shown.add((key, value))
        return shown == set(entries)

    def open_connections(self) -> list["Connection"]:
        """Each connection the public listener has open, from the stick table haproxy.cfg
        tracks them in."""
        found = []
        for line in self(f"show table {CONNECTIONS_TABLE}").splitlines():
            key, open_, since = (re.search(pattern, line) for pattern in (
                r" key=(\S+)\|(\S+)\|(\d+) ", r" conn_cur=(\d+)", r" gpt0=(\d+)"))
            if key and open_ and int(open_[1]) > 0:
                found.append(Connection(key[1], (key[2], key[3]), int(since[1]) if since else 0))
        return found

    def sessions(self, frontend: str) -> list[tuple[str, tuple[str, str]]]:
        """(session ID, (address, port)) of each of the frontend's sessions, from `show sess`.
        Its `age=` is not used: 2.8.25 prints ages of decades, 2.6.12 rounds them up."""
        found = []
        for match in re.finditer(r"^(0x[0-9a-f]+): proto=\S+ src=(\S+) fe=(\S+) ", self("show sess"), re.M):
            host, _, port = match[2].rpartition(":")
            if match[3] == frontend:
                found.append((match[1], (host.strip("[]"), port)))
        return found

    def shut_down(self, frontend: str, addresses: set) -> list[str]:
        """Shut down the frontend's sessions from these client addresses; those still listed."""
        for session, address in self.sessions(frontend):
            if address in addresses:
                self(f"shutdown session {session}")
        return [session for session, address in self.sessions(frontend) if address in addresses]

    def server_states(self, backend: str) -> set | None:
        """(name, address or DNS name, port, weight) of each server that takes traffic, and
        (name, 'not ready') for any other; None if the backend is unknown."""
        lines = self(f"show servers state {backend}").splitlines()
        if not lines or not lines[0].startswith("1"):
            return None
        states = set()
        for line in lines[2:]:
            fields = line.split()
            if len(fields) < 19 or fields[1] != backend:
                continue
            # srv_admin_state 0: not in maintenance; srv_uweight; srv_fqdn, "-" for a server by
            # address (srv_addr then is the address; for one by name, what the name resolved to).
            ready, host = fields[6] == "0", fields[4] if fields[17] == "-" else fields[17]
            states.add((fields[3], host, fields[18], int(fields[7])) if ready else (fields[3], "not ready"))
        return states


def running_bundle(runtime: RuntimeAPI, out_dir: Path) -> str | None:
    """The bundle of `out_dir` the running HAProxy was loaded from, by the path it names its CA
    file by; None if it runs none."""
    for path in map(Path, re.findall(r"^(\S+) - \d+ certificate", runtime("show ssl ca-file"), re.M)):
        if path.name == "roots.pem" and path.parent.parent == out_dir.resolve():
            return path.parent.name
    return None


def apply_live(runtime: RuntimeAPI, out_dir: Path, loaded: str, change: LiveChange,
               listener: tuple[str, int], serial: int) -> str | None:
    """Make `change` in the running HAProxy and check its effect: None once seen, else why not.
    Only on the bundle meshgen last had it load: the live bundle describes that one alone."""
    loaded_dir = out_dir.resolve() / loaded
    try:
        # 1. HAProxy runs the bundle meshgen last had it load: the live one describes it.
        if (running := running_bundle(runtime, out_dir)) != loaded:
            return (f"HAProxy runs {running or 'no bundle of ' + str(out_dir)}, not {loaded}, which "
                    "meshgen last asked it to load")
        # 2. New CA roots: with a probe CA the listener must let in, then without it, refuses.
        if change.roots_pem is not None:
            probe, path = ProbeCA(), loaded_dir / "roots.pem"
            if not (runtime.commit("ca-file", path, change.roots_pem + probe.root_pem)
                    and lets_in(listener, probe.client_pem)):
                return "the new CA roots did not reach the public listener"
            if not runtime.commit("ca-file", path, change.roots_pem) or lets_in(listener, probe.client_pem):
                return "the public listener still trusts a CA that is not in the new roots"
        # 3. A new leaf.
        if change.leaf_pem is not None and not runtime.commit("cert", loaded_dir / "leaf.pem", change.leaf_pem):
            return "HAProxy refused the new leaf certificate"
        # 4. After either: the listener serves the new serial, and still demands a certificate.
        if change.roots_pem is not None or change.leaf_pem is not None:
            if lets_in(listener, None):
                return "the public listener no longer demands a client certificate"
            if (seen := served_serial(listener)) != serial:
                return (f"the public listener serves the certificate with serial {seen:x}, not the new "
                        f"one ({serial:x})" if seen is not None else "the public listener did not answer")
        # 5. Intentions: the whole map at once, then no open connection of a caller now denied.
        if change.intentions is not None:
            if not runtime.replace_map(loaded_dir / INTENTIONS_MAP, change.intentions):
                return "HAProxy does not hold the new intentions"
            if (why := close_denied(runtime, dict(change.intentions))) is not None:
                return why
        # 6. Servers, backend by backend, with the options of the running version.
        version = runtime.version() if change.servers else ()
        for running, rendered in change.servers:
            if (why := change_servers(runtime, running, rendered.options_for(version), rendered)) is not None:
                return why
    except OSError as err:
        return f"the runtime API at {runtime.socket_path} failed: {err.strerror or err}"
    return None


def close_denied(runtime: RuntimeAPI, decisions: dict) -> str | None:
    """Shut down the open connections of callers the new intentions deny; None once HAProxy
    lists none of them. Twice: a connection decided just before the map's commit may be
    tracked just after the first look."""
    def denied(caller: str) -> bool:     # L7 callers are decided on each request instead
        return decision_of(decisions, caller).startswith("deny|")
    addresses: set = set()
    for _ in range(2):
        tracked = runtime.open_connections()
        allowed = {c.address for c in tracked if not denied(c.caller)}
        # An address also held by a let-in caller is a reused port, not the denied connection.
        addresses |= {c.address for c in tracked if denied(c.caller)} - allowed
        left = runtime.shut_down(PUBLIC_LISTENER, addresses)
    return f"HAProxy kept {len(left)} connections of callers now denied" if left else None


def end_old_connections(runtime: RuntimeAPI, lifetime_ms: int) -> None:
    """Consul's guide asks proxies to bound how long a connection outlives its authorization:
    shut down the public listener's connections older than `lifetime_ms`, by when haproxy.cfg
    recorded that each came in (`show sess` has no age to trust)."""
    try:
        now = time.time()
        runtime.shut_down(PUBLIC_LISTENER, {c.address for c in runtime.open_connections()
                                            if c.age_ms(now) >= lifetime_ms})
    except OSError:
        pass    # HAProxy is reloading, or not running: the next sweep tries again


def change_servers(runtime: RuntimeAPI, running: Servers, options: str, rendered: Servers) -> str | None:
    """Add, reweigh and remove one backend's servers until HAProxy runs what is rendered, new
    ones with `options`; new servers first, so that a replaced instance never leaves the
    backend empty."""
    backend, before = rendered.backend, {s.name: s for s in running.servers}
    for server in rendered.servers:
        if server.name not in before:
            runtime(f"add server {backend}/{server.name} {server.address} weight {server.weight} {options}")
            # A dynamic server starts in maintenance, its health checks off.
            runtime(f"enable server {backend}/{server.name}")
            if "check" in options.split():
                runtime(f"enable health {backend}/{server.name}")
        elif before[server.name].weight != server.weight:
            runtime(f"set server {backend}/{server.name} weight {server.weight}")
    for name in sorted(set(before) - {s.name for s in rendered.servers}):
        # In maintenance it takes no new connection; HAProxy deletes it once its open ones end.
        runtime(f"disable server {backend}/{name}")
        deadline = time.monotonic() + DRAIN_SECONDS
        # Already gone is done too: a run killed after its changes but before its swap left it so.
        while not re.search(r"deleted|no such server", answer := runtime(f"del server {backend}/{name}"), re.I):
            if time.monotonic() > deadline:
                return f"HAProxy kept server {backend}/{name}: {_one_line(answer)}"
            time.sleep(0.01)
    if runtime.server_states(backend) != {s.state for s in rendered.servers}:
        return f"HAProxy runs other servers in {backend} than haproxy.cfg lists"
    return None


@dataclass(frozen=True)
class Comparison:
    """One thing the running HAProxy has, beside what the live bundle on disk says."""
    what: str
    running: str
    on_disk: str

    @property
    def same(self) -> bool:
        return self.running == self.on_disk


def _shown_servers(states) -> str:
    if states is None:
        return "no such backend"
    return ", ".join(" ".join(map(str, state)) for state in sorted(states)) or "none"


def live_manifest(out_dir: Path, files: dict) -> Manifest | None:
    """The live bundle's manifest; None for a bundle without one (an older meshgen's)."""
    try:
        return Manifest.decoded(files[MANIFEST])
    except (KeyError, ValueError, TypeError):
        return None


def compare_running(out_dir: Path, runtime: RuntimeAPI) -> list[Comparison]:
    """What the running HAProxy serves and holds, beside the live bundle's manifest: the leaf's
    serial, client verification, the CA roots, each upstream's servers."""
    live, files = live_bundle(out_dir)
    if live is None:
        raise MeshgenError(f"--out {out_dir}: no live bundle there; run `meshgen render` first")
    manifest = live_manifest(out_dir, files)
    if manifest is None:
        raise MeshgenError(f"--out {out_dir}: the live bundle has no {MANIFEST} this meshgen reads; "
                           "run `meshgen render` again")
    listener = _probe_address(manifest.public_listener)
    try:
        running = running_bundle(runtime, out_dir)
        held = re.findall(r"SHA1 FingerPrint: ([0-9A-F]+)",
                          runtime(f"show ssl ca-file {out_dir.resolve() / running / 'roots.pem'}")) if running else []
        served = served_serial(listener)
        rows = [
            Comparison("leaf serial", "no answer" if served is None else f"{served:x}", manifest.leaf_serial),
            Comparison("client without a certificate", "let in" if lets_in(listener, None) else "refused", "refused"),
            Comparison("CA roots (SHA-1)", " ".join(sorted(held)) or "none", " ".join(manifest.roots_sha1)),
        ]
        rows += [Comparison(f"servers of {servers.backend}", _shown_servers(runtime.server_states(servers.backend)),
                            _shown_servers({server.state for server in servers.servers}))
                 for servers in sorted(manifest.backends, key=lambda b: b.backend)]
    except OSError as err:
        raise MeshgenError(f"--runtime-socket {runtime.socket_path}: cannot reach HAProxy: {err.strerror or err}") from None
    return rows


# =========================================================================== commands, exit code

def _consul_options(command):
    options = [
        click.option("--http-addr", envvar="CONSUL_HTTP_ADDR", default="127.0.0.1:8500", show_default=True,
                     help="Agent address: host:port, http://, https:// or unix:///path (CONSUL_HTTP_ADDR)."),
        click.option("--token-file", envvar="CONSUL_HTTP_TOKEN_FILE", default=None,
                     help="File holding the ACL token (CONSUL_HTTP_TOKEN_FILE); else CONSUL_HTTP_TOKEN. "
                          "There is no --token: argv is visible to every user."),
        click.option("--ca-file", envvar="CONSUL_CACERT", default=None,
                     help="CA bundle for an https agent (CONSUL_CACERT)."),
        click.option("--client-cert", envvar="CONSUL_CLIENT_CERT", default=None,
                     help="Client certificate for an https agent (CONSUL_CLIENT_CERT)."),
        click.option("--client-key", envvar="CONSUL_CLIENT_KEY", default=None,
                     help="Client key for an https agent (CONSUL_CLIENT_KEY)."),
        click.option("--tls-server-name", envvar="CONSUL_TLS_SERVER_NAME", default=None,
                     help="Server name to verify on an https agent (CONSUL_TLS_SERVER_NAME)."),
        click.option("--timeout", type=float, default=10.0, show_default=True,
                     help="Seconds each agent request may take."),
        click.option("--namespace", envvar="CONSUL_NAMESPACE", default=None,
                     help="Enterprise namespace; sent only when given (CONSUL_NAMESPACE)."),
        click.option("--partition", envvar="CONSUL_PARTITION", default=None,
                     help="Enterprise admin partition; sent only when given (CONSUL_PARTITION)."),
        click.option("--sidecar-for", "sidecar_for", default=None,
                     help="Service ID of the app; its sidecar is found as Consul's tools find it."),
        click.option("--proxy-id", default=None, help="Service ID of the sidecar proxy itself."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _check_usage(ctx_params: dict) -> None:
    """Usage errors before anything else is looked at."""
    if bool(ctx_params["sidecar_for"]) == bool(ctx_params["proxy_id"]):
        raise click.UsageError("give exactly one of --sidecar-for and --proxy-id")


def _connect(ctx_params: dict, **pool) -> tuple[ConsulSettings, ConsulClient, str]:
    _check_usage(ctx_params)
    sidecar_for, proxy_id = ctx_params.pop("sidecar_for"), ctx_params.pop("proxy_id")
    settings = consul_settings(**ctx_params)
    client = ConsulClient(settings, **pool)
    return settings, client, proxy_id or find_sidecar_id(client, sidecar_for)


@dataclass(frozen=True)
class Model:
    """What one run renders from, and what it saw, for the next one's --wait."""
    sidecar: Sidecar
    certs: Certificates
    intentions: Intentions
    seen: WatchState
    notes: tuple[str, ...] = ()     # what the user should know, though nothing failed
    skipped: tuple[str, ...] = ()   # bad items left out or denied: each cost itself only


def _fetch_model(client: ConsulClient, proxy_id: str, previous: WatchState | None) -> Model:
    """Fetch and model: the registration first, since it names what else to fetch; the agent's
    decision for unnamed callers last, since it must name a caller no intention names. The
    registration, the roots and the leaf are whole: a bad one is the run's error. Anything else
    bad costs only itself (`skipped`). With the agent's servers out of reach, the intentions
    `previous` saw stay in force (fail static)."""
    registration = fetch_registration(client, proxy_id)
    sidecar = parse_registration(registration, proxy_id)
    previous = previous if previous is not None and previous.service == sidecar.service else None
    data = fetch_agent_data(client, sidecar.service, sidecar.upstreams, previous.kept_chains if previous else {})
    notes = ()
    if data.mesh_unreadable is not None:
        data, notes = _last_mesh_entry(data, previous)
    certs = check_certificates(data.roots.data, data.leaf.data, sidecar.service, dt.datetime.now(dt.timezone.utc))
    upstreams = model_upstreams(sidecar, data, previous, certs.datacenter)
    sidecar = with_mesh(upstreams.sidecar, data.answers)
    notes += tuple(f"upstream {key.name}: {text}" for key, outcome in sorted(data.chains.items()) if outcome.chain
                   for text in outcome.chain.unapplied)
    field = f"intentions of {sidecar.service}"
    try:
        if isinstance(data.intentions, AgentUnavailable):
            raise data.intentions
        entries = data.intentions.data
        listed, bad_intentions = parse_intentions(entries, field)
        unnamed = list(fetch_default_decision(client, sidecar.service, unnamed_caller_uri(certs.spiffe_id, listed)))
        index = data.intentions.index or 0
    except AgentUnavailable as err:
        if previous is None:
            raise MeshgenError(f"{err}; no earlier run saw the intentions of {sidecar.service!r}") from None
        entries, unnamed, index = previous.intentions_seen, previous.unnamed_caller, previous.intentions_index
        listed, bad_intentions = parse_intentions(entries, field)
        notes += (f"intentions: {_one_line(str(err))}: the last ones seen stay in force",)
    seen = WatchState.of_run(proxy_id, registration, sidecar, data, (index, entries, unnamed), upstreams,
                             loaded_bundle="")
    return Model(sidecar, certs, decide(listed, sidecar.http, *unnamed, home=certs.home), seen, notes,
                 upstreams.skipped + bad_intentions)


def _last_mesh_entry(data: AgentData, previous: WatchState | None) -> tuple[AgentData, tuple[str, ...]]:
    """Fail static: with the agent's servers out of reach (the mesh entry is not cached; 1.8.7
    cannot even say that it has no such kind), the entry the last run saw, at its marker."""
    err = data.mesh_unreadable
    seen = [(Query.parse(text), marker) for text, marker in (previous.queries if previous else {}).items()
            if Query.parse(text).path == MESH_QUERY.path]
    if not seen or previous.mesh_seen is None:
        raise MeshgenError(f"{err}; no earlier run saw the mesh config entry")
    (query, marker), = seen
    answers = dict(data.answers)
    answers[query] = Reply(previous.mesh_seen[0], marker if query.blocks else None)
    return dataclasses.replace(data, answers=answers, mesh_unreadable=None), (
        f"mesh entry: {_one_line(str(err))}: the last one seen stays in force",)


class MeshgenGroup(click.Group):
    """Turns a MeshgenError into one line on stderr and exit 1, in this one place."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MeshgenError as err:
            click.echo(f"meshgen: error: {_one_line(str(err), 1000)}", err=True)
            ctx.exit(EXIT_ERROR)


@click.group(cls=MeshgenGroup, epilog=EXIT_CODES_HELP)
def cli():
    """Render HAProxy as a Consul Connect sidecar."""


def duration(value: str | None, option: str) -> float | None:
    """Seconds from `30`, `30s`, `5m` or `500ms`."""
    if value is None:
        return None
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    if re.fullmatch(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h))+", value):
        return check_duration_ms(value, option) / 1000
    raise click.BadParameter(f"{value!r} is not a duration such as 30s or 5m", param_hint=option)


# =========================================================================== one run

@dataclass(frozen=True)
class RenderRequest:
    """What `render` was asked to do, options parsed and checked."""
    out_dir: Path
    admin_socket: Path
    haproxy: str | None                 # None: no haproxy -c (--no-validate)
    dry_run: bool = False
    wait_seconds: float | None = None
    poll_seconds: float = 30.0
    agent_connections: int = AGENT_CONNECTIONS
    runtime_socket: Path | None = None
    strict: bool = False                # a bad item fails the run instead of costing itself


@dataclass(frozen=True)
class RenderResult:
    """What one run did, as consul-template's RenderResult says whether it rendered and would
    render. `changed`: the new bundle differs from the live one (on a dry run: would differ).
    `written`: it is live now. `applied_live`: the running HAProxy took the change through its
    runtime API, and its effect was seen, so no reload is due. `live_change`: what could go in
    live (empty when it needs a reload); `not_live_because`: why it did not. `waited_out`:
    --wait passed with nothing changed. `notes`: what the user should know, though nothing
    failed."""
    proxy_id: str
    changed: bool = False
    written: bool = False
    applied_live: bool = False
    live_change: str = ""
    not_live_because: str = ""
    waited_out: bool = False
    diff: str = ""
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()  # bad items this run left out or denied, each at its own cost
    interrupted: bool = False     # a run died changing HAProxy live: it holds what no bundle says

    @property
    def reload_needed(self) -> bool:
        return (self.changed and not self.applied_live) or self.interrupted

    @property
    def exit_code(self) -> int:
        return EXIT_CHANGED if self.reload_needed else EXIT_UNCHANGED


def run_render(settings: ConsulSettings, client: ConsulClient, proxy_id: str, request: RenderRequest,
               notify=lambda line: None) -> RenderResult:
    """One render, step by step; it decides no exit code, and prints only through `notify`, for
    what the user must know while the run is still under way: another run holds --out, the
    agent refuses while the run waits."""
    out_dir = request.out_dir
    # 1. What the last run saw: the markers --wait blocks on.
    previous = _of_proxy(read_state(out_dir), proxy_id)
    # 2. With --wait, once there is a last run: block on Consul until something it saw changes;
    #    meanwhile, with the runtime socket, end connections past their lifetime. No lock is
    #    held while waiting: an operator's run may write meanwhile.
    if request.wait_seconds and previous is not None and not request.dry_run:
        client.hang_up()
        watching = dataclasses.replace(settings, timeout=settings.timeout + request.wait_seconds * 17 / 16)
        sweep = None
        if request.runtime_socket is not None and previous.connection_lifetime_ms:
            runtime = RuntimeAPI(request.runtime_socket)
            sweep = functools.partial(end_old_connections, runtime, previous.connection_lifetime_ms)
        if not wait_for_change(watching, previous, request.wait_seconds, request.poll_seconds,
                               request.agent_connections, sweep, notify):
            return RenderResult(proxy_id, waited_out=True)
    # 3. One writer per --out from here on (a dry run reads under a shared lock): two runs
    #    interleaved would swap in each other's half-cleaned bundles.
    with writer_lock(out_dir, request.dry_run, notify):
        return _render_locked(client, proxy_id, request)


def _of_proxy(stored: WatchState | None, proxy_id: str) -> WatchState | None:
    """What the last run saw, if it rendered this proxy."""
    return stored if stored is not None and stored.proxy_id == proxy_id else None


def _render_locked(client: ConsulClient, proxy_id: str, request: RenderRequest) -> RenderResult:
    """run_render's steps once it holds --out."""
    out_dir = request.out_dir
    # 4. What the last run left: its state (again: another run may have written it while this
    #    one waited), and whether a run was cut short before it said what it had changed.
    stored = read_state(out_dir)
    previous = _of_proxy(stored, proxy_id)
    cut_short = _read_marker(out_dir)
    # 5. Fetch and model: every value checked, certificates verified.
    model = _fetch_model(client, proxy_id, previous)
    sidecar, certs, intentions, seen = model.sidecar, model.certs, model.intentions, model.seen
    if request.strict and model.skipped:
        raise MeshgenError(f"--strict: {len(model.skipped)} bad item(s), nothing written; the first: "
                           f"{model.skipped[0]}")
    # 6. Render in memory, and compare with the live bundle before writing anything.
    bundle = render(sidecar, certs, intentions, out_dir, request.admin_socket)
    live, live_files = live_bundle(out_dir)
    changed = (live, live_files) != (bundle.name, bundle.files)
    # A run cut short between changing things and saying so: with the same bundle still to
    # swap in, this run makes the same change again and swaps; otherwise (Consul moved on, or
    # the killed run had swapped already) HAProxy may hold what no exit code asked for: reload.
    interrupted = cut_short is not None and (cut_short != bundle.name or not changed)
    # 7. A dry run stops here, with the diff; a changed bundle is still checked, as a twin
    #    rendered for a scratch directory (the real one names its final directory).
    if request.dry_run:
        warnings = []
        if changed and request.haproxy:
            with tempfile.TemporaryDirectory(prefix="meshgen-dry-run-") as scratch:
                twin = render(sidecar, certs, intentions, Path(scratch), request.admin_socket)
                warnings = validate(write_files(twin, Path(scratch)), request.haproxy)
        return RenderResult(proxy_id, changed=changed, diff="".join(bundle_diff(live_files, bundle.files)),
                            notes=model.notes, skipped=model.skipped, warnings=tuple(warnings))
    # 8. Write and check the new bundle (stage_bundle's own steps), not yet live.
    loaded = (previous.loaded_bundle if previous else "") or live or bundle.name
    warnings = stage_bundle(out_dir, bundle, request.haproxy) if changed else []
    # 9. With --runtime-socket, a change the runtime API can make goes to the running HAProxy,
    #    and counts only once its effect is seen (see "apply live"); anything else is a reload.
    #    Before the swap, under a marker that names the bundle, kept until this run has said
    #    what it did: a run killed after it leaves the marker, for the next run to see that
    #    HAProxy may hold, or the live bundle may be, what no exit code asked a reload for.
    plan = None
    live_facts = live_manifest(out_dir, live_files) if live is not None else None
    if changed and request.runtime_socket is not None and live_facts is not None and not interrupted:
        plan = plan_live_change(live_facts, Manifest.decoded(bundle.files[MANIFEST]), live_files, bundle.files,
                                out_dir.resolve() / loaded)
    if changed:
        _write_marker(out_dir, bundle.name)
    why_not = None if plan is None else apply_live(
        RuntimeAPI(request.runtime_socket), out_dir, loaded, plan, _probe_address(sidecar.public_bind),
        certs.serial_number)
    applied = plan is not None and why_not is None
    # 10. The swap (publish_bundle's own steps): what a reload loads from now on. With nothing
    #     changed, only what a killed run left behind goes: a run that got as far as its swap
    #     leaves the next one nothing to change. From the swap on, the run has changed the
    #     bundle whatever fails: failures are notes, and the exit code still asks for the reload.
    notes = model.notes
    if changed:
        notes += publish_bundle(out_dir, bundle, loaded)
    else:
        try:
            remove_stale(out_dir, {live, loaded})
        except OSError as err:
            raise MeshgenError(_write_error(out_dir, err)) from None
    reload_needed = (changed and not applied) or interrupted
    if reload_needed:
        loaded = bundle.name    # the wrapper reloads HAProxy on exit 3
    if interrupted:
        notes += ("an earlier run was stopped before it could say whether HAProxy must reload: reload it, "
                  "to be sure it runs the live bundle",)
    # 11. What this run saw, for the next; not rewritten when it is the same. Then the marker
    #     goes: HAProxy holds the live bundle's state, or reloads onto it.
    state = dataclasses.replace(seen, loaded_bundle=loaded)
    try:
        if state != stored:
            write_state(out_dir, state)
    except MeshgenError as err:
        if not (changed or interrupted):
            raise
        notes += (f"the bundle is live, but: {err}; the next run may render again",)
    try:
        (out_dir / LIVE_CHANGE_MARKER).unlink(missing_ok=True)
    except OSError as err:
        notes += (f"{_write_error(out_dir, err)}: the next run will ask for a reload again",)
    # 12. With --runtime-socket: connections past max_connection_lifetime_ms end (a waiting run
    #     also ends them while it waits).
    if request.runtime_socket is not None and sidecar.max_connection_lifetime_ms:
        end_old_connections(RuntimeAPI(request.runtime_socket), sidecar.max_connection_lifetime_ms)
    return RenderResult(proxy_id, changed=changed, written=changed, applied_live=applied, notes=notes,
                        skipped=model.skipped, live_change=plan.describe() if plan else "",
                        not_live_because=why_not or "", warnings=tuple(warnings), interrupted=interrupted)


@cli.command("render", epilog=EXIT_CODES_HELP)
@_consul_options
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Bundle directory: haproxy.cfg, PEMs, authorize.lua, swapped as a whole.")
@click.option("--haproxy", default="haproxy", show_default=True, help="HAProxy binary for `haproxy -c`.")
@click.option("--no-validate", is_flag=True, help="Skip `haproxy -c` (not recommended).")
@click.option("--dry-run", is_flag=True, help="Write nothing; print a diff of what would change.")
@click.option("--admin-socket", type=click.Path(path_type=Path), default=None,
              help="HAProxy admin socket for the runtime API  [default: OUT/admin.sock]")
@click.option("--wait", "wait_for", default=None, metavar="DURATION",
              help="If nothing changed since the last run, block on Consul until something does "
                   "(then render) or DURATION passes (exit 0). The first run returns at once.")
@click.option("--poll-interval", default="30s", show_default=True, metavar="DURATION",
              help="With --wait: how often prepared queries, which cannot block, are polled.")
@click.option("--agent-connections", type=click.IntRange(BUDGET_CONNECTIONS, 4096), default=AGENT_CONNECTIONS,
              show_default=True,
              help="Most connections a run holds to the agent, waiting or fetching. A watch that needs "
                   f"more long polls waits over {BUDGET_CONNECTIONS}: see docs/watching.md.")
@click.option("--max-blocking", type=click.IntRange(3, 4096), default=None, hidden=True,
              help="Replaced by --agent-connections; accepted, and ignored.")
@click.option("--runtime-socket", type=click.Path(path_type=Path), default=None,
              help="HAProxy's admin socket: apply a change of CA roots, leaf or upstream instances "
                   "live, check that it took effect, and exit 0; else exit 3.")
@click.option("--strict", is_flag=True,
              help="A bad instance, intention or chain fails the run (exit 1, nothing written) "
                   "instead of costing only itself; for CI.")
@click.pass_context
def render_command(ctx, out_dir: Path, haproxy: str, no_validate: bool, dry_run: bool,
                   admin_socket: Path | None, wait_for: str | None, poll_interval: str,
                   agent_connections: int, max_blocking: int | None, runtime_socket: Path | None, strict: bool,
                   **consul):
    """Fetch the sidecar from the local agent, render, validate and swap in its bundle."""
    _check_usage(consul)
    request = RenderRequest(
        out_dir=out_dir,
        admin_socket=Path(check_path(str((admin_socket or out_dir / "admin.sock").resolve()), "--admin-socket")),
        haproxy=None if no_validate else find_haproxy(haproxy),
        dry_run=dry_run,
        wait_seconds=duration(wait_for, "--wait"),
        poll_seconds=duration(poll_interval, "--poll-interval"),
        agent_connections=agent_connections,
        runtime_socket=runtime_socket,
        strict=strict)
    check_path(str(out_dir.resolve()), "--out")
    settings, client, proxy_id = _connect(consul, pool_size=min(FETCH_CONNECTIONS, agent_connections), block=True)

    def say(text: str) -> None:
        click.echo(f"meshgen: {proxy_id}: {text}", err=True)
    if max_blocking is not None:
        say("--max-blocking is replaced by --agent-connections, and ignored")
    result = run_render(settings, client, proxy_id, request, notify=say)

    for warning in result.warnings:
        say(f"haproxy -c warns: {warning}")
    for note in result.notes:
        say(note)
    for item in result.skipped:
        say(f"skipped: {item}")
    if result.waited_out:
        say(f"unchanged after waiting {wait_for}")
    elif dry_run:
        click.echo(result.diff, nl=False)
        say(("changed" if result.changed else "unchanged") + " (dry run)")
    elif result.applied_live:
        say(f"changed, applied live through {runtime_socket} and seen to take effect: {result.live_change}")
    elif result.interrupted:
        say("reload HAProxy" + (" (and the bundle changed)" if result.changed else ""))
    elif result.not_live_because:
        say(f"changed, not applied live ({result.live_change}): {result.not_live_because}: reload HAProxy")
    else:
        say("changed, reload HAProxy" if result.changed else "unchanged")
    ctx.exit(result.exit_code)


@cli.command("show")
@_consul_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def show(as_json: bool, **consul):
    """Print what the agent says of a sidecar: listeners, upstreams, instances, certificates."""
    _, client, proxy_id = _connect(consul)
    model = _fetch_model(client, proxy_id, None)
    sidecar, certs, intentions = model.sidecar, model.certs, model.intentions
    summary = {
        "proxy_id": sidecar.proxy_id, "service": sidecar.service, "protocol": sidecar.protocol,
        "public_listener": sidecar.public_bind, "local_app": sidecar.local_app,
        "upstreams": [{"name": u.proxy_name, "listen": u.bind, "protocol": u.protocol,
                       "instances": [{"address": i.address, "weight": i.weight} for i in u.instances],
                       "routes": [{"route": r.label, "when": [_describe(m) for m in r.matches] or ["any request"],
                                   "rewrite": list(r.rewrite) if r.rewrite else None,
                                   "splits": [{"backend": s.backend, "weight": s.weight or "100"} for s in r.splits]}
                                  for r in u.routes],
                       "backends": [{"name": b.name, "targets": list(b.targets), "serving": b.serving,
                                     "connect_timeout_ms": b.connect_timeout_ms,
                                     "request_timeout_ms": b.request_timeout_ms,
                                     "retries": dataclasses.asdict(b.retries) if b.retries else None,
                                     "instances": [{"address": i.address, "weight": i.weight} for i in b.instances]}
                                    for b in u.backends]}
                      for u in sidecar.upstreams],
        "leaf": {"spiffe_id": certs.spiffe_id, "serial": certs.serial,
                 "not_after": certs.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")},
        "roots": [{"id": r, "active": r == certs.active_root_id} for r in certs.root_ids],
        "intentions": [{"caller": d.caller, "decision": d.verdict, "reason": d.reason}
                       for d in intentions.decisions],
        "skipped": list(model.skipped),
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"sidecar     {summary['proxy_id']} for service {summary['service']} ({sidecar.protocol})")
    click.echo(f"public      {sidecar.public_bind} (mutual TLS) -> local app {sidecar.local_app}")
    click.echo(f"leaf        {certs.spiffe_id}  serial {certs.serial}  expires {summary['leaf']['not_after']}")
    for root in summary["roots"]:
        click.echo(f"root        {root['id']}" + ("  (active)" if root["active"] else ""))
    for u in sidecar.upstreams:
        click.echo(f"upstream    {u.proxy_name}  listen {u.bind}  {u.protocol}  "
                   f"{len(u.instances)} healthy instance(s)")
        for r in u.routes:
            splits = ", ".join(f"{s.weight or '100'}% {s.backend}" for s in r.splits)
            rewrite = f"  rewrite {r.rewrite[0]} -> {r.rewrite[1]}" if r.rewrite else ""
            click.echo(f"  {r.label}   {' and '.join(map(_describe, r.matches)) or 'any request'} -> {splits}{rewrite}")
        for b in u.backends:
            failover = f"  failover {', '.join(b.targets[1:])}" if len(b.targets) > 1 else ""
            click.echo(f"  backend   {b.name}  target {b.targets[0] if b.targets else u.name}{failover}  "
                       f"serving {b.serving or 'none'}  connect timeout {b.connect_timeout_ms} ms")
            for i in b.instances:
                click.echo(f"    instance  {i.address}  weight {i.weight}")
    for d in intentions.decisions:
        click.echo(f"intention   {d.caller}  {d.verdict}  {d.reason}")
    for item in model.skipped:
        click.echo(f"skipped     {item}")


def _describe(match: Match) -> str:
    """A route's condition as `show` prints it."""
    if match.subject == "method":
        return f"method {' or '.join(match.values)}"
    subject = "path" if match.subject == "path" else f"{match.subject} {match.header}"
    return f"{'not ' if match.invert else ''}{subject} {match.how} {' '.join(match.values)}".strip()


@cli.command("status", epilog=STATUS_EXIT_CODES_HELP)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The bundle directory `render --out` writes.")
@click.option("--runtime-socket", type=click.Path(path_type=Path), default=None,
              help="HAProxy's admin socket  [default: OUT/admin.sock]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def status(ctx, out_dir: Path, runtime_socket: Path | None, as_json: bool):
    """Whether the running HAProxy runs the live bundle: the leaf it serves, client verification,
    the CA roots it holds, each upstream's servers. Exit 0 if all match, 3 if not (reload)."""
    rows = compare_running(out_dir, RuntimeAPI(runtime_socket or out_dir / "admin.sock"))
    state = read_state(out_dir)
    for item in state.skipped if state else ():
        click.echo(f"meshgen: the last render skipped: {item}", err=True)
    if as_json:
        click.echo(json.dumps([dict(dataclasses.asdict(row), same=row.same) for row in rows], indent=2))
    else:
        for row in rows:
            click.echo(f"{'same' if row.same else 'DIFFERS':8} {row.what}: running {row.running}"
                       + ("" if row.same else f"; on disk {row.on_disk}"))
    ctx.exit(EXIT_UNCHANGED if all(row.same for row in rows) else EXIT_CHANGED)


@cli.command("check")
@click.argument("definition", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--haproxy", default="haproxy", show_default=True, help="HAProxy binary for `haproxy -c`.")
@click.pass_context
def check(ctx, definition: Path, haproxy: str):
    """Check a service definition file offline: expand its sidecar as Consul does, render it
    with throwaway certificates and run `haproxy -c`. Exit 0 valid, 1 invalid."""
    haproxy_path = find_haproxy(haproxy)
    try:
        data = json.loads(definition.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise MeshgenError(f"{definition}: not JSON ({_one_line(str(err))})") from None
    registration = expand_definition(data, str(definition))
    proxy_id = str(registration.get("ID", "sidecar"))
    sidecar = parse_registration(registration, proxy_id)
    # Config entries and instances are Consul's: checked as an upstream with neither renders.
    chains = {u.key: default_chain(u, u.datacenter or "dc1") for u in sidecar.upstreams if u.follows_chain}
    instances = {q: () for q in [t.query for c in chains.values() for t in c.targets] +
                 [direct_query(u) for u in sidecar.upstreams if not u.follows_chain]}
    sidecar = with_chains(sidecar, {key: check_chain(u, chains[key]) for u in sidecar.upstreams
                                    if (key := u.key) in chains}, instances)
    certs = throwaway_certificates(sidecar.service)
    with tempfile.TemporaryDirectory(prefix="meshgen-check-") as scratch:
        # Intentions come from Consul at render time; any decision checks the same config.
        bundle = render(sidecar, certs, decide([], sidecar.http, False, "meshgen check", home=certs.home), Path(scratch),
                        Path(scratch) / "admin.sock")
        warnings = validate(write_files(bundle, Path(scratch)), haproxy_path)
    for warning in warnings:
        click.echo(f"meshgen: {definition}: haproxy -c warns: {warning}", err=True)
    click.echo(f"meshgen: {definition}: valid ({proxy_id}, {len(sidecar.upstreams)} upstream(s))", err=True)


def _field(obj: dict, name: str, default=None):
    """A field of a service definition file: Consul matches keys case-insensitively and
    accepts snake_case for them; Config maps keep their keys as written."""
    for key, value in obj.items():
        if _norm(key) == _norm(name):
            return value
    return default


def expand_definition(data, source: str) -> dict:
    """A definition as users register it ({"service": {... "connect": {"sidecar_service": {}}}})
    becomes the agent/service view of its sidecar, with the defaults of docs/consul-reference.md;
    an agent/service response is taken as it is."""
    if isinstance(data, dict) and data.get("Kind") == "connect-proxy":
        return data
    service = _field(data, "service") if isinstance(data, dict) else None
    service = service if isinstance(service, dict) else data
    if not isinstance(service, dict):
        raise MeshgenError(f"{source}: expected a service definition object")
    name = check_name(_field(service, "name"), f"{source}: service.name")
    sidecar = _field(_field(service, "connect") or {}, "sidecar_service")
    if not isinstance(sidecar, dict):
        raise MeshgenError(f"{source}: service.connect.sidecar_service is missing")
    proxy = _field(sidecar, "proxy") or {}
    upstreams = []
    for raw in _field(proxy, "upstreams") or []:
        upstream = {go: _field(raw, go) for go in (
            "DestinationType", "DestinationName", "Datacenter", "DestinationPeer", "LocalBindAddress",
            "LocalBindPort", "LocalBindSocketPath", "LocalBindSocketMode", "Config")}
        upstreams.append({k: v for k, v in upstream.items() if v is not None})
    expose = _field(proxy, "expose") or {}
    paths = [{go: _field(p, go) for go in ("ListenerPort", "Path", "LocalPathPort", "Protocol")}
             for p in _field(expose, "paths") or []]
    service_id = _field(service, "id") or name
    return {
        "Kind": "connect-proxy", "ID": _field(sidecar, "id") or f"{service_id}-sidecar-proxy",
        "Service": _field(sidecar, "name") or f"{name}-sidecar-proxy",
        "Port": _field(sidecar, "port") or 21000,
        "Address": _field(sidecar, "address") or _field(service, "address") or "",
        "Proxy": {"DestinationServiceName": name, "DestinationServiceID": service_id,
                  "LocalServiceAddress": _field(proxy, "local_service_address") or "127.0.0.1",
                  "LocalServicePort": _field(proxy, "local_service_port") or _field(service, "port"),
                  "LocalServiceSocketPath": _field(proxy, "local_service_socket_path"),
                  "Config": _field(proxy, "config") or {}, "Upstreams": upstreams,
                  "MeshGateway": {}, "Expose": {"Paths": paths} if paths else {}},
    }


def throwaway_certificates(service: str) -> Certificates:
    """A CA and a leaf made on the spot, so `check` can run `haproxy -c` without Consul."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshgen check CA")])
    spiffe_id = f"spiffe://meshgen-check.consul/ns/default/dc/dc1/svc/{service}"

    def build(subject, key, is_ca, extra):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(hours=1))
                   .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
        return (extra(builder) if extra else builder).sign(ca_key, hashes.SHA256())

    ca = build(ca_name, ca_key, True, None)
    leaf = build(x509.Name([]), leaf_key, False, lambda b: b.add_extension(
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True))
    key_pem = leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                     serialization.NoEncryption()).decode()
    return Certificates(roots_pem=_pem_of(ca), leaf_pem=_pem_of(leaf) + key_pem, spiffe_id=spiffe_id,
                        serial="01", not_after=leaf.not_valid_after_utc, trust_domain="meshgen-check.consul",
                        root_ids=("throwaway",), active_root_id="throwaway")


def main() -> None:
    cli(prog_name="meshgen")


if __name__ == "__main__":
    main()
