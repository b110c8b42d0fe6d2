"""Property tests over everything the agent answers: the sidecar's registration, an upstream's
health entries, the CA roots and the leaf, the intentions and the authorize answer, a discovery
chain with a router, a splitter and resolvers, and a prepared query's answer.

The paths are not listed by hand: each case walks the well-formed answer it breaks and picks
among ALL its leaves (strings, numbers, booleans) and object keys, so a field the agent adds
later is fuzzed without editing this file. A case is one of:
- `strings`: one to three leaves or keys replaced by hostile text (zone IDs, line ends of every
  kind, `#`, quotes, backslashes, leading `-`, braces, `%[`, `${`, NUL, a megabyte...);
- `types`: values replaced by any JSON (wrong types, containers) or deleted;
- `pem`: a certificate or key damaged the ways files and proxies damage them.

Every case ends one of two ways:
- exit 1, one line `meshgen: error: ...`, and the output directory byte for byte as it was; or
- exit 0 or 3, a bundle that passed `haproxy -c` (meshgen runs it in the bundle's final place),
  every stderr line one `meshgen: ...` line (a bad item costs one `skipped:` line). For
  `strings` cases, the STRUCTURE of every rendered file is that of a reference: the same answers
  with each changed value put back (or, where the case cost an item, with a value of the wrong
  type there, which costs the same item): haproxy.cfg tokenised as HAProxy reads it (same
  directive per line, same number of words, the same ACL operators and flags in the same
  places), intentions.map and callers.map (same entries, same decisions), public.crt-list, and
  manifest.json (same keys, servers and intentions).
In all, the token is nowhere but the token file, and key files are 0600.
"""
from __future__ import annotations

import itertools
import json
import re
import shutil
import zlib
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import meshgen
from campaign_support import SECRET_TOKEN, haproxy_version, record, scaled, secret_leaks
from harness import ROOT, DoubleAgent, snapshot

CANARY = "INJECTED"
EXAMPLES_PER_HAPROXY = scaled(450)

RICH_SIDECAR = {
    "name": "www", "port": 8080, "address": "127.0.0.1",
    "connect": {"sidecar_service": {"port": 21000, "proxy": {
        "config": {"protocol": "http", "unsecured_bind_port": 8081, "syslog_server": "127.0.0.1:514",
                   "envoy_prometheus_bind_addr": "127.0.0.1:9102", "max_inbound_connections": 500,
                   "local_connect_timeout_ms": 2000},
        "upstreams": [
            {"destination_name": "redis", "local_bind_port": 6379,
             "config": {"destination_mode": "tcp", "advanced_check": "redis",
                        "limits": {"max_connections": 100},
                        "passive_health_check": {"max_failures": 3, "interval": "10s"}}},
            {"destination_name": "billing", "datacenter": "dc1", "local_bind_port": 9191,
             "config": {"protocol": "http2", "connect_timeout_ms": 1500}},
            {"destination_type": "prepared_query", "destination_name": "geo", "local_bind_port": 9292},
        ],
        "expose": {"paths": [{"path": "/health", "local_path_port": 8080, "listener_port": 21500}]},
    }}},
}

BILLING_CHAIN = [
    {"Kind": "service-defaults", "Name": "billing", "Protocol": "http2"},
    {"Kind": "service-defaults", "Name": "ledger", "Protocol": "http2"},
    {"Kind": "service-resolver", "Name": "billing", "DefaultSubset": "v1",
     "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"}, "v2": {"Filter": "Service.Meta.version == v2"}},
     "Failover": {"v1": {"Service": "ledger"}}},
    {"Kind": "service-splitter", "Name": "billing", "Splits": [{"Weight": 75, "ServiceSubset": "v1"},
                                                              {"Weight": 25, "ServiceSubset": "v2"}]},
    {"Kind": "service-router", "Name": "billing", "Routes": [
        {"Match": {"HTTP": {"PathPrefix": "/admin", "Header": [{"Name": "x-team", "Exact": "ops"}]}},
         "Destination": {"Service": "ledger", "PrefixRewrite": "/", "RequestTimeout": "2s", "NumRetries": 2,
                         "RetryOnStatusCodes": [503]}}]},
]

# ----------------------------------------------------------------------------- generators

# Strings a validator might let through: real values, and the edges of each field's syntax.
PLAUSIBLE = ["redis", "www", "billing", "a", "A.b-c_d", "x" * 128, "x" * 129, "127.0.0.1", "::1",
             "0.0.0.0", "[::1]", "localhost", "10.0.0.5:9000", "[::1]:8080", "host.example:1",
             "/tmp/app.sock", "/dev/log", "/../etc/passwd", "/", "21000", "0", "-1", "65536",
             "99999999999999999999", "1e3", "0x10", "tcp", "http", "HTTP2", "grpc", "udp", "service",
             "prepared_query", "dc2", "5s", "1m30s", "100ms", "10", "0700", "777", "true", "null", ""]
# Characters that end a word or a line, start a comment, quote, escape or expand, in haproxy.cfg,
# a map, a crt-list or a terminal.
SEPARATORS = ["\n", "\r\n", "\r", " ", "\t", "#", '"', "'", "\\", "${", "$", "\x00", "\x0b", "\x0c",
              "\u2028", "\u2029", "\u0085", "\u00a0", "%", "%[", "{", "}", ",", "|", "%25"]
TAILS = ["", " 10.9.9.9:1", "\n    server evil 10.9.9.9:1", "\nglobal\n    lua-load /tmp/x.lua", "}",
         " } || { always_true", "\u2028global", " -i"]
# Whole values that mean something else to HAProxy, or to an address parser.
WHOLE = ["fe80::1%eth0", "fe80::1%25eth0", "::1%lo]:80\nglobal", "[fe80::1%eth0]:21000", "-i", "-m",
         "--", "-beta", "-f /etc/passwd", "}", "{", "!", "||", "%[src]", "${HOME}", "\"${HOME}\"", "#",
         "\u2028", "\u2029", "\u0085", "\x00", ""]
MEGABYTE = 1 << 20


@st.composite
def hostile_text(draw, original: str) -> str:
    """A value for a field whose well-formed value is `original`: the original or a plausible
    value with a separator and more after it, a separator before it, a whole hostile value,
    random Unicode, or a megabyte."""
    base = draw(st.sampled_from([original, original, *PLAUSIBLE]))
    how = draw(st.sampled_from(["attack", "prefix", "suffix", "whole", "unicode", "megabyte"]))
    if how == "attack":
        return f"{base}{draw(st.sampled_from(SEPARATORS))}{CANARY}{draw(st.sampled_from(TAILS))}"
    if how == "prefix":
        return draw(st.sampled_from(SEPARATORS + ["-", "-i ", "--"])) + base
    if how == "suffix":
        return base + draw(st.sampled_from(SEPARATORS))
    if how == "whole":
        return draw(st.sampled_from(WHOLE))
    if how == "unicode":
        return draw(st.text(max_size=30))
    return (base or "x") * (MEGABYTE // max(1, len(base or "x")) + 1)


strings = st.one_of(st.sampled_from(PLAUSIBLE), hostile_text(""), st.text(min_size=300, max_size=5000))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70),
                    st.floats(allow_nan=False, allow_infinity=False), strings)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(strings, inner, max_size=4)), max_leaves=8)
DELETE = object()


# ----------------------------------------------------------------------------- paths

def leaf_paths(document, path: tuple = ()) -> list[tuple]:
    """Every scalar's path in a JSON document (lists by index)."""
    if isinstance(document, dict):
        return [p for key, value in document.items() for p in leaf_paths(value, path + (key,))]
    if isinstance(document, list):
        return [p for i, value in enumerate(document) for p in leaf_paths(value, path + (i,))]
    return [path]


def key_paths(document, path: tuple = ()) -> list[tuple]:
    """Every object key's path in a JSON document (the path ends with the key)."""
    if isinstance(document, dict):
        return [p for key, value in document.items() for p in [path + (key,), *key_paths(value, path + (key,))]]
    if isinstance(document, list):
        return [p for i, value in enumerate(document) for p in key_paths(value, path + (i,))]
    return []


def container_paths(document, path: tuple = ()) -> list[tuple]:
    """Every object's and list's path, the document's own included."""
    if isinstance(document, dict):
        return [path, *[p for key, value in document.items() for p in container_paths(value, path + (key,))]]
    if isinstance(document, list):
        return [path, *[p for i, value in enumerate(document) for p in container_paths(value, path + (i,))]]
    return []


def get_path(document, path: tuple):
    for key in path:
        document = document[key]
    return document


def set_path(document, path: tuple, value):
    """Set (or delete) one value deep in a JSON document; a path through something that is no
    longer a container leaves the document as it is."""
    if not path:
        return document if value is DELETE else value
    node = document
    for key in path[:-1]:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return document
    last = path[-1]
    if isinstance(node, dict) and value is DELETE:
        node.pop(last, None)
    elif isinstance(node, dict):
        node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return document


def rename_key(document, path: tuple, new: str):
    """The key at `path` renamed to `new`, in its place among its siblings."""
    parent = get_path(document, path[:-1]) if _reaches(document, path[:-1]) else None
    if not isinstance(parent, dict) or path[-1] not in parent:
        return document
    items = [(new if key == path[-1] else key, value) for key, value in parent.items()]
    parent.clear()
    parent.update(items)
    return document


def _reaches(document, path: tuple) -> bool:
    try:
        get_path(document, path)
    except (KeyError, IndexError, TypeError):
        return False
    return True


def as_text(value) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)


# Fields meshgen reads that the well-formed answers leave out, so that no walk finds them.
ABSENT_FIELDS = [
    ("Proxy", "LocalServiceSocketPath"), ("Proxy", "Config", "bind_address"), ("Proxy", "Config", "bind_port"),
    ("Proxy", "Config", "envoy_stats_bind_addr"), ("Proxy", "Config", "local_service_mode"),
    ("Proxy", "Config", "local_request_timeout_ms"), ("Proxy", "Config", "local_idle_timeout_ms"),
    *[("Proxy", "Upstreams", i, key) for i in (0, 1, 2) for key in (
        "LocalBindAddress", "LocalBindSocketPath", "LocalBindSocketMode", "DestinationPeer", "Datacenter")],
    ("Proxy", "Expose", "Paths", 0, "Protocol"), *[(i, "Service", "SocketPath") for i in (0, 1)],
]


@st.composite
def string_changes(draw, document) -> list[tuple]:
    """One to three changes of one answer, each ("leaf" | "key", path, hostile text)."""
    leaves, keys = leaf_paths(document), key_paths(document)
    # Most draws go to the answer's strings: those are what the template prints.
    absent = [p for p in ABSENT_FIELDS if _reaches(document, p[:-1]) and not _reaches(document, p)]
    paths = {"string": [p for p in leaves if isinstance(get_path(document, p), str)] or leaves,
             "leaf": leaves + absent, "key": keys or leaves}
    changes = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["string", "string", "leaf", "key"]))
        path = draw(st.sampled_from(paths[kind]))
        kind = "key" if kind == "key" and keys else "leaf"
        original = path[-1] if kind == "key" else get_path(document, path) if _reaches(document, path) else ""
        changes.append((kind, path, draw(hostile_text(as_text(original) if original is not None else ""))))
    return changes


@st.composite
def type_changes(draw, document) -> list[tuple]:
    """One to three values anywhere in one answer replaced by any JSON, or deleted."""
    paths = leaf_paths(document) + container_paths(document)
    return [(draw(st.sampled_from(paths)), draw(st.one_of(json_values, st.just(DELETE))))
            for _ in range(draw(st.integers(1, 3)))]


# What a changed value can be replaced by in a reference: 0 puts the original back (for a key: a
# name the answer does not use, left out as the hostile name is); the others are values no
# field's grammar takes (for a key: its own name back), which cost the item the way a hostile
# value does. Two are needed: meshgen refuses a megabyte itself, the agent refuses a control
# character (a subset filter), and an item costs what it costs where it was refused. The last
# leaves the field out: to Consul, an empty value is an unset one (syslog_server "" is no syslog).
STAND_INS = (0, 1, 2, 3, 4)
REFUSED_BY_EVERY_GRAMMAR = {1: "\x01", 2: {}, 3: "x" * MEGABYTE}


def apply_strings(document, changes: list[tuple], stand_ins: tuple | None = None):
    """The answer with the changes made, or with each made with its stand-in instead."""
    document = json.loads(json.dumps(document))
    for at, (kind, path, text) in enumerate(changes):
        stand_in = stand_ins[at] if stand_ins is not None else None
        if not _reaches(document, path[:-1] if kind == "leaf" else path):
            continue    # an earlier change renamed a key on the way
        if kind == "leaf" and stand_in == 0 and not _reaches(document, path):
            continue    # a field the well-formed answer leaves out stays out
        if kind == "key":
            name = text if stand_in is None else f"{path[-1]}x" if stand_in == 0 else path[-1]
            document = rename_key(document, path, name)
        else:
            value = (text if stand_in is None else get_path(document, path) if stand_in == 0
                     else DELETE if stand_in == 4 else REFUSED_BY_EVERY_GRAMMAR[stand_in])
            document = set_path(document, path, value)
    return document


@st.composite
def pem_damage(draw, pem: str):
    """A PEM made wrong the ways files and proxies make it wrong."""
    how = draw(st.sampled_from(["truncate", "flip", "junk", "double", "strip"]))
    if how == "truncate":
        return pem[:draw(st.integers(0, len(pem)))]
    if how == "flip":
        at = draw(st.integers(30, len(pem) - 30))
        return pem[:at] + draw(st.sampled_from("A/+=\n-")) + pem[at + 1:]
    if how == "junk":
        at = draw(st.integers(0, len(pem)))
        return pem[:at] + draw(strings) + pem[at:]
    if how == "double":
        return pem + pem
    return pem.replace("\n", "")

# ----------------------------------------------------------------------------- structure

def haproxy_words(line: str) -> list[str]:
    """One line of haproxy.cfg split into words as HAProxy's parser splits it: blanks separate
    words outside quotes; '...' is literal; "..." and bare text take backslash escapes; `#`
    outside quotes ends the line; `${NAME}` outside single quotes expands (to nothing here: no
    variable is set for HAProxy), so a word made only of one disappears."""
    words, word, started, quote, i = [], [], False, None, 0
    while i < len(line):
        ch = line[i]
        if quote == "'":
            if ch == "'":
                quote = None
            else:
                word.append(ch)
        elif ch == "\\" and i + 1 < len(line):
            word.append(line[i + 1])
            started, i = True, i + 1
        elif ch == "$" and line.startswith("${", i) and "}" in line[i:]:
            i = line.index("}", i)
            started = started or quote is not None
        elif quote == '"':
            if ch == '"':
                quote = None
            else:
                word.append(ch)
        elif ch in "'\"":
            quote, started = ch, True
        elif ch == "#":
            break
        elif ch in " \t":
            if started or word:
                words.append("".join(word))
            word, started = [], False
        else:
            word.append(ch)
        i += 1
    if started or word or quote:
        words.append("".join(word))
    return words


def config_lines(text: str) -> list[str]:
    """haproxy.cfg's lines as HAProxy reads them: a line ends at a newline (fgets), and a
    carriage return or NUL ends what the parser reads of it; nothing else ends a line."""
    return [re.split("[\r\x00]", line, maxsplit=1)[0] for line in text.split("\n")]


# Words with a meaning of their own in a condition: HAProxy reads a value there that is one of
# these, or begins with "-", as an operator or a flag, not as the value.
OPERATORS = {"{", "}", "!", "||", "or", "if", "unless"}


def line_shape(words: list[str]) -> tuple:
    """What must not change in one line: its keyword, how many words it has, and where a
    condition's operators and flags are. After `--` an ACL's words are values, but `}` still
    ends an anonymous ACL (HAProxy finds the brace before it parses the ACL)."""
    in_condition, flags_done = False, False
    marks = []
    for at, word in enumerate(words):
        if at == 0:
            in_condition = word == "acl"
            continue
        if word in ("if", "unless") or (words[0] == "acl" and at == 1):
            in_condition = True
        if not in_condition:
            continue
        if word in OPERATORS:
            marks.append((at, word))
            flags_done = flags_done and word not in ("{", "}", "||", "or", "!")
        elif word.startswith("-") and not flags_done:
            marks.append((at, word if word == "--" else "-flag"))
            flags_done = word == "--"
    return (words[0], len(words), tuple(marks))


def config_shape(text: str) -> list[tuple]:
    return [line_shape(words) for words in map(haproxy_words, config_lines(text)) if words]


def map_entries(text: str) -> list[tuple[str, str]]:
    """A map file's entries as HAProxy loads them: a line is one entry, leading blanks skipped,
    `#` there starts a comment; the key ends at the first blank, the value is the rest."""
    entries = []
    for line in text.split("\n"):
        line = line.lstrip(" \t").rstrip(" \t\r")
        if not line or line.startswith("#"):
            continue
        key, *value = re.split(r"[ \t]+", line, maxsplit=1)
        entries.append((key, value[0] if value else ""))
    return entries


def intentions_shape(text: str) -> list[tuple]:
    """Per entry: whether it has a key and a value, and the decision (the value's first field);
    a caller name may differ from the reference's, and with it the entries' sorted order
    (map_traces checks that "*" stays last), a decision may not."""
    return sorted((bool(key), value.split("|")[0]) for key, value in map_entries(text))


def manifest_shape(text: str) -> tuple:
    manifest = json.loads(text)
    return (sorted(manifest), sorted(value.split("|")[0] for _, value in manifest.get("intentions", [])),
            [(len(b.get("servers", [])) if isinstance(b, dict) else len(b)) for b in manifest.get("backends", [])])


def bundle_shape(out: Path) -> dict:
    """The structure of every file of the live bundle that holds values from the agent."""
    shape = {"haproxy.cfg": config_shape((out / "haproxy.cfg").read_text()),
             "intentions.map": intentions_shape((out / "intentions.map").read_text())}
    for name, shape_of in (("callers.map", lambda t: len(map_entries(t))),
                           ("public.crt-list", lambda t: [len(line) for line in map(haproxy_words, config_lines(t))]),
                           ("manifest.json", manifest_shape)):
        if (out / name).exists():
            shape[name] = shape_of((out / name).read_text())
    return shape


def shape_differences(case: dict, reference: dict) -> list[str]:
    """Where a case's bundle differs in structure from its reference's, one line each."""
    differences = []
    for name in sorted(set(case) | set(reference)):
        got, want = case.get(name), reference.get(name)
        if got == want:
            continue
        if isinstance(got, list) and isinstance(want, list):
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            differences.append(f"{name}: from item {at}: {got[at:at + 2]} where the reference has {want[at:at + 2]}"
                               f" ({len(got)} items, reference {len(want)})")
        else:
            differences.append(f"{name}: {str(got)[:300]} where the reference has {str(want)[:300]}")
    return differences


# ----------------------------------------------------------------------------- the heuristics of `types` cases

def _literal_lines() -> set[str]:
    template = (ROOT / "templates" / "haproxy.cfg.j2").read_text()
    return {line.strip() for line in template.splitlines() if "{{" not in line and "{%" not in line}


LITERAL_LINES = _literal_lines()
QUOTING = re.compile(r"[\"'\\$]")
SINGLE_QUOTED = re.compile(r"'[^'\n]*'")


def injection_traces(config: str) -> list[str]:
    """Signs that a value from the agent changed haproxy.cfg's syntax rather than filling a
    word: the canary anywhere outside single quotes; a control, non-ASCII, quoting, escaping or
    `$` character on a line that carries values; a `#` that does not begin a comment line.
    Single quotes hold an L7 permission's value, which HAProxy takes literally: meshgen
    refuses a value with a quote of its own, so what is inside cannot end them."""
    unquoted = SINGLE_QUOTED.sub("QUOTED", config)
    traces = [f"canary at offset {unquoted.index(CANARY)}"] if CANARY in unquoted else []
    for number, line in enumerate(unquoted.split("\n"), 1):
        stripped = line.strip()
        if not line.isascii() or any(ord(ch) < 32 or ord(ch) == 127 for ch in line):
            traces.append(f"line {number}: control or non-ASCII character: {line!r}")
        elif stripped in LITERAL_LINES or stripped.startswith("#"):
            continue
        elif "#" in line or QUOTING.search(line):
            traces.append(f"line {number}: comment or quoting character in a line with values: {line!r}")
    return traces


MAP_LINE = re.compile(r"(\*|(?:[A-Za-z0-9][A-Za-z0-9_.-]*/){2}[A-Za-z0-9][A-Za-z0-9_.-]*|[A-Za-z0-9][A-Za-z0-9_.-]*/(?:[A-Za-z0-9][A-Za-z0-9_.-]*|\*)/\*) (allow|deny|l7-[0-9]+)\|[A-Za-z0-9 ._:/*=>(),?-]{0,200}")


def map_traces(intentions_map: str) -> list[str]:
    """Lines of intentions.map that are not one caller, one decision and a reason of safe
    characters: a value from the agent that made a line of its own, or broke one."""
    lines = [line for line in intentions_map.split("\n") if line and not line.startswith("#")]
    traces = [f"not a map line: {line!r}" for line in lines if not MAP_LINE.fullmatch(line)]
    if [line for line in lines if line.startswith("* ")] != lines[-1:]:
        traces.append("the unnamed callers' line is not the last one, or not alone")
    return traces


@pytest.fixture
def fuzz_agent(tmp_path):
    double = DoubleAgent().start()
    double.register({"service": RICH_SIDECAR})
    double.add_instance("redis", "10.0.0.21", 21000)
    double.add_instance("redis", "10.0.0.22", 21000, weight=5)
    double.add_instance("billing", "10.0.0.31", 21000, meta={"version": "v1"})
    double.add_instance("billing", "10.0.0.32", 21000, meta={"version": "v2"})
    double.add_instance("ledger", "10.0.0.33", 21000)
    for entry in BILLING_CHAIN + [MESH_ENTRY]:
        double.set_config(entry)
    double.add_instance("geo", "10.0.0.41", 21000)
    double.add_prepared_query("geo", "geo")
    double.set_intention("api", "www", "allow")
    # An L7 intention too, so that its permissions' paths, methods and headers are walked.
    double.set_intention("web", "www", "allow", permissions=[
        {"Action": "deny", "HTTP": {"PathExact": "/admin", "Methods": ["DELETE"]}},
        {"Action": "allow", "HTTP": {"PathPrefix": "/api", "Header": [{"Name": "x-team", "Exact": "ops"}]}}])
    double.set_intention("*", "www", "deny")
    yield double
    double.stop()


# The mesh entry: request normalization, TLS both ways (every field set, so that all are walked).
MESH_ENTRY = {"Kind": "mesh", "HTTP": {"SanitizeXForwardedClientCert": False, "Incoming": {"RequestNormalization": {
    "MergeSlashes": True, "PathWithEscapedSlashesAction": "UNESCAPE_AND_REDIRECT", "HeadersWithUnderscoresAction": "DROP_HEADER"}}},
    "TLS": {"Incoming": {"TLSMinVersion": "TLSv1_2", "TLSMaxVersion": "TLSv1_3",
                         "CipherSuites": ["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"]},
            "Outgoing": {"TLSMinVersion": "TLSv1_2"}}}


# ----------------------------------------------------------------------------- the run

def agent_answers(double) -> dict:
    """The well-formed answers each case starts from, as the agent encodes them."""
    def get(path, query=None, method="GET", body=b""):
        status, payload, _ = double.handle(method, path, query or {}, {}, body)
        assert status == 200
        return json.loads(payload if isinstance(payload, bytes) else json.dumps(payload))
    return {"registration": get("/v1/agent/service/www-sidecar-proxy"),
            "health": get("/v1/health/connect/redis"),
            "roots": get("/v1/agent/connect/ca/roots"),
            "leaf": get("/v1/agent/connect/ca/leaf/www"),
            "intentions": get("/v1/connect/intentions/match", {"by": "destination", "name": "www"}),
            "authorize": {"Authorized": False, "Reason": "Matched L4 intention: default/* => default/www"},
            # As meshgen asks for it: billing's Config sets its protocol and connect timeout.
            "chain": get("/v1/discovery-chain/billing", method="POST",
                         body=b'{"OverrideConnectTimeout": "1500ms", "OverrideProtocol": "http2"}'),
            "prepared_query": get("/v1/query/geo/execute", {"connect": "true"}),
            "mesh": get("/v1/config/mesh/mesh")}


ENDPOINTS = {"registration": "/v1/agent/service/www-sidecar-proxy", "health": "/v1/health/connect/redis",
             "roots": "/v1/agent/connect/ca/roots", "leaf": "/v1/agent/connect/ca/leaf/www",
             "intentions": "/v1/connect/intentions/match", "authorize": "/v1/agent/connect/authorize",
             "chain": "/v1/discovery-chain/billing", "prepared_query": "/v1/query/geo/execute",
             "mesh": "/v1/config/mesh/mesh"}
KINDS = ["strings", "strings", "strings", "types", "pem"]


def skipped_lines(stderr: str) -> list[str]:
    return [line for line in stderr.split("\n") if ": skipped: " in line]


class Renderer:
    """`meshgen render` of one set of answers, each time into a fresh copy of the output
    directory the well-formed answers made, so every case and its reference start from the same
    last run (a bad chain or target keeps that run's data)."""

    def __init__(self, double, tmp_path: Path, haproxy: str):
        self.double, self.tmp, self.haproxy, self.runs = double, tmp_path, haproxy, 0
        self.runner = CliRunner()
        self.env = {"CONSUL_HTTP_ADDR": double.url, "CONSUL_HTTP_TOKEN": SECRET_TOKEN}
        self.base = tmp_path / "base"
        first = self.render(None, None, self.base, validate=True, fresh=False)
        assert first.exit_code == 3, first.stderr
        self.references: dict[str, tuple[dict, int]] = {}

    def render(self, target, document, out: Path, validate: bool, fresh: bool = True):
        self.double.clear_faults()
        if target is not None:
            self.double.inject(ENDPOINTS[target], body=json.dumps(document))
        if fresh:
            if out.exists():
                shutil.rmtree(out)
            shutil.copytree(self.base, out, symlinks=True)
        check = ["--haproxy", self.haproxy] if validate else ["--no-validate"]
        result = self.runner.invoke(meshgen.cli, ["render", "--sidecar-for", "www", "--out", str(out),
                                                  "--timeout", "10", *check], env=self.env)
        self.double.clear_faults()
        return result

    def reference(self, target, document) -> tuple[dict, int]:
        """The structure of the bundle these answers make, and how many items it skipped (-1:
        refused)."""
        key = json.dumps([target, document], sort_keys=True)
        if key not in self.references:
            result = self.render(target, document, self.tmp / "reference", validate=False)
            self.references[key] = ((bundle_shape(self.tmp / "reference"), len(skipped_lines(result.stderr)))
                                    if result.exit_code in (0, 3) else ({}, -1))
        return self.references[key]


def structure_findings(renderer: Renderer, target: str, answer, changes, out: Path, stderr: str) -> list[str]:
    """How an accepted `strings` case's bundle differs from its reference: the same answer with
    a known value in place of each hostile one, skipping as many items as the case did. The
    references tried put every original back first, then give some changed leaves a value no
    grammar takes (which costs the item a hostile value costs); none may match."""
    skipped, shape = len(skipped_lines(stderr)), bundle_shape(out)
    differences = None
    for stand_ins in sorted(itertools.product(STAND_INS, repeat=len(changes)), key=lambda s: sum(map(bool, s))):
        reference, reference_skipped = renderer.reference(target, apply_strings(answer, changes, stand_ins))
        if reference_skipped == skipped:
            found = shape_differences(shape, reference)
            if not found:
                return []
            differences = differences or found
    return differences or [f"{skipped} item(s) skipped, and no reference with known values in place of the "
                           "changed ones skips as many"]


def draw_case(data, answers: dict) -> tuple:
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    if kind == "pem":
        field = data.draw(st.sampled_from(["RootCert", "CertPEM", "PrivateKeyPEM"]), label="field")
        target = "roots" if field == "RootCert" else "leaf"
        document = json.loads(json.dumps(answers[target]))
        holder = document["Roots"][0] if target == "roots" else document
        holder[field] = data.draw(pem_damage(holder[field]), label="pem")
        return kind, target, document, None
    target = data.draw(st.sampled_from(sorted(ENDPOINTS)), label="answer")
    answer = answers[target]
    if kind == "strings":
        changes = data.draw(string_changes(answer), label="changes")
        return kind, target, apply_strings(answer, changes), changes
    document = json.loads(json.dumps(answer))
    for path, value in data.draw(type_changes(answer), label="changes"):
        document = set_path(document, path, value)
    return kind, target, document, None


def test_fuzzed_agent_answers_keep_every_file_structure_or_fail_cleanly(fuzz_agent, haproxy, tmp_path):
    renderer = Renderer(fuzz_agent, tmp_path, haproxy)
    answers = agent_answers(fuzz_agent)
    assert bundle_shape(renderer.base) == renderer.reference(None, None)[0]
    out = tmp_path / "out"
    outcomes = Counter()
    findings = []
    rejected_by_haproxy = 0

    @settings(max_examples=EXAMPLES_PER_HAPROXY, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    @seed(zlib.crc32(haproxy_version(haproxy).encode()))   # reproducible, and other cases per build
    def one_case(data):
        nonlocal rejected_by_haproxy
        kind, target, document, changes = draw_case(data, answers)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(renderer.base, out, symlinks=True)
        before = snapshot(out)
        result = renderer.render(target, document, out, validate=True, fresh=False)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
        assert result.exit_code in (0, 1, 3), (result.exit_code, result.output)
        lines = result.stderr.rstrip("\n").split("\n") if result.stderr else []
        # One line each, also where a log viewer or terminal breaks lines.
        assert all(line.startswith("meshgen: ") and not re.search("[\r\x00\x0b\x0c\x85\u2028\u2029]", line)
                   for line in lines), result.stderr[:2000]
        if result.exit_code == 1:
            assert len(lines) == 1 and lines[0].startswith("meshgen: error: "), result.stderr[:2000]
            assert snapshot(out) == before
            outcomes[(kind, "refused")] += 1
            rejected_by_haproxy += "haproxy -c rejected" in result.stderr
        else:
            how = "skipped" if skipped_lines(result.stderr) else "rendered" if result.exit_code == 3 else "unchanged"
            outcomes[(kind, how)] += 1
            if kind == "strings":
                differences = structure_findings(renderer, target, answers[target], changes, out, result.stderr)
                if differences:
                    findings.append((target, [(k, p, t[:80]) for k, p, t in changes], differences))
            else:
                config = (out / "haproxy.cfg").read_text()
                assert injection_traces(config) == [], (kind, target, config)
                intentions_map = (out / "intentions.map").read_text()
                assert map_traces(intentions_map) == [], (kind, target, intentions_map)
        assert secret_leaks(out, result.stdout, result.stderr) == []

    one_case()
    total = sum(outcomes.values())
    record("fuzz_agent_answers", haproxy=haproxy_version(haproxy), cases=total,
           haproxy_c_rejections=rejected_by_haproxy, structure_findings=len(findings),
           **{f"{kind}_{how}": n for (kind, how), n in sorted(outcomes.items())})
    assert findings == [], "\n".join(map(repr, findings[:10]))
    assert total >= EXAMPLES_PER_HAPROXY
    # Both endings must be exercised for the property to mean anything.
    accepted = sum(n for (kind, how), n in outcomes.items() if kind == "strings" and how != "refused")
    assert sum(n for (_, how), n in outcomes.items() if how == "refused") > total // 10
    assert accepted > total // 10, outcomes


# Every string field of every answer, each with the values a condition reads as a flag or as its
# end, quoted or not: random draws reach a given field of the ~280 too rarely for these. The
# first health entry, and a prepared query's first node, stand for the others.
SWEEP = ["-i", "}"]


def sweep_paths(target: str, answer) -> list[tuple]:
    alike = target in ("health", "prepared_query")
    return [path for path in leaf_paths(answer) if isinstance(get_path(answer, path), str)
            and not (alike and any(isinstance(key, int) and key > 0 for key in path))]


def test_every_string_field_with_each_syntax_value_keeps_structure_or_costs_its_item(fuzz_agent, any_haproxy,
                                                                                     tmp_path):
    renderer = Renderer(fuzz_agent, tmp_path, any_haproxy)
    answers = agent_answers(fuzz_agent)
    out = tmp_path / "out"
    findings, accepted = [], 0
    for target, answer in sorted(answers.items()):
        for path in sweep_paths(target, answer):
            for text in SWEEP:
                changes = [("leaf", path, text)]
                result = renderer.render(target, apply_strings(answer, changes), out, validate=False)
                assert result.exit_code in (0, 1, 3), (target, path, text, result.output)
                if result.exit_code != 1:
                    accepted += 1
                    differences = structure_findings(renderer, target, answer, changes, out, result.stderr)
                    findings += [(target, path, text, differences)] if differences else []
    record("fuzz_agent_answers", haproxy=haproxy_version(any_haproxy), sweep=sum(len(sweep_paths(t, a)) for t, a in
           answers.items()) * len(SWEEP), accepted=accepted, structure_findings=len(findings))
    assert findings == [], "\n".join(map(repr, findings))
    assert accepted > 50
