"""authorize.lua's DER walk under fuzzing, in the Lua versions HAProxy embeds (5.3 in 2.6,
5.4 in 2.8): random, truncated, bit-flipped and oversized certificates. Every input ends in a
SPIFFE ID or a refusal with a reason, never a Lua error that would bypass the decision."""
from __future__ import annotations

import random
import re
import shutil
import struct
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings, strategies as st

from harness import ROOT, DoubleAgent

RUNNER = r"""
core = { register_action = function() end }   -- the one part of HAProxy's API loaded at start
local m = dofile(arg[1])
local data = io.open(arg[2], "rb"):read("a")
local pos = 1
while pos <= #data do
    local n = string.unpack(">I4", data, pos)
    local der = data:sub(pos + 4, pos + 3 + n)
    pos = pos + 4 + n
    local ok, uri, why = pcall(m.spiffe_id, der)
    if not ok then
        io.write("ERROR ", tostring(uri), "\n")
    elseif uri then
        io.write("URI ", uri, "\n")
    else
        io.write("DENY ", tostring(why), "\n")
    end
end
"""

LUAS = ["lua5.3", "lua5.4"]


@pytest.fixture(params=LUAS)
def lua(request, tmp_path):
    binary = shutil.which(request.param)
    if binary is None:
        pytest.skip(f"{request.param} is not installed (.ci/run installs it)")
    runner = tmp_path / "runner.lua"
    runner.write_text(RUNNER)

    def walk(inputs: list[bytes]) -> list[str]:
        blob = tmp_path / "inputs.bin"
        blob.write_bytes(b"".join(struct.pack(">I", len(d)) + d for d in inputs))
        result = subprocess.run([binary, str(runner), str(ROOT / "authorize.lua"), str(blob)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert len(lines) == len(inputs)
        return lines
    return walk


def leaf_der(double, *uris) -> bytes:
    cert, _ = double.ca.issue_leaf(double.active_root, *uris)
    return cert.public_bytes(serialization.Encoding.DER)


SPIFFE = re.compile(r"URI spiffe://[\w.-]+/[\w.~%/-]+")


def assert_safe(lines: list[str]) -> None:
    for line in lines:
        assert not line.startswith("ERROR"), line
        assert line.startswith("DENY ") or SPIFFE.fullmatch(line), line


def test_valid_leaves_give_their_spiffe_id(lua):
    double = DoubleAgent()
    uris = [double.service_uri(s) for s in ("api", "web", "a.b-c_d")]
    lines = lua([leaf_der(double, uri) for uri in uris])
    assert lines == [f"URI {uri}" for uri in uris]


def test_the_walk_agrees_with_cryptography_on_san_shapes(lua):
    double = DoubleAgent()
    uri = double.service_uri("api")
    cases = [(), (uri,), (uri, double.service_uri("web")), ("https://x.example/",)]
    ders = [leaf_der(double, *c) for c in cases]
    expected = []
    for der in ders:
        cert = x509.load_der_x509_certificate(der)
        try:
            found = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
                .get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            found = []
        expected.append(len(found))
    lines = lua(ders)
    assert expected == [0, 1, 2, 1]
    assert lines == ["DENY client certificate has 0 URI SANs, want 1", f"URI {uri}",
                     "DENY client certificate has 2 URI SANs, want 1",
                     "DENY client certificate URI is not a SPIFFE ID"]


def test_every_truncation_is_refused(lua):
    der = leaf_der(DoubleAgent(), DoubleAgent().service_uri("api"))
    lines = lua([der[:n] for n in range(len(der))])
    assert_safe(lines)
    assert all(line.startswith("DENY") for line in lines)


def test_bit_flips_never_error(lua):
    double = DoubleAgent()
    der = leaf_der(double, double.service_uri("api"))
    rng = random.Random(11)
    inputs = []
    for _ in range(3000):
        mutated = bytearray(der)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
        inputs.append(bytes(mutated))
    assert_safe(lua(inputs))


def test_oversized_and_deeply_nested_input_is_refused(lua):
    nested = b""
    for _ in range(2000):
        nested = b"\x30\x82" + len(nested).to_bytes(2, "big") + nested if len(nested) < 65535 else nested
    lines = lua([b"\x30" * 20000, b"\x30\x84\xff\xff\xff\xff", nested, b"", b"\x30\x80\x00\x00"])
    assert_safe(lines)
    assert all(line.startswith("DENY") for line in lines)


# The fixture only writes a scratch file per call, so sharing it across examples is sound.
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(min_size=0, max_size=600), min_size=50, max_size=100))
def test_random_bytes_are_refused_or_parsed_safely(lua, blobs):
    assert_safe(lua(blobs))


CALLER_RUNNER = r"""
core = { register_action = function() end }
local m = dofile(arg[1])
for uri in io.lines(arg[2]) do
    io.write(tostring(m.caller_of(uri)), "\n")
end
"""


@pytest.mark.parametrize("binary", LUAS)
def test_the_caller_is_the_namespace_and_service_of_a_service_identity(binary, tmp_path):
    """intentions.map names callers partition/namespace/service (a SPIFFE ID without a partition
    is of "default"); any identity that is not a service's (an agent's, a mesh gateway's, a bare
    domain), or whose names no intention could hold, names none, and is refused."""
    lua = shutil.which(binary)
    if lua is None:
        pytest.skip(f"{binary} is not installed (.ci/run installs it)")
    uris = {
        "spiffe://1111.consul/ns/default/dc/dc1/svc/api": "default/default/api",
        "spiffe://1111.consul/ap/team/ns/billing/dc/dc1/svc/api": "team/billing/api",
        "spiffe://1111.consul/ns/default/dc/dc1/svc/-i": "nil",
        "spiffe://1111.consul/ap/te~am/ns/billing/dc/dc1/svc/api": "nil",
        "spiffe://1111.consul/agent/client/dc/dc1/id/abc": "nil",
        "spiffe://1111.consul/ns/default/dc/dc1/svc/api/extra": "nil",
        "spiffe://1111.consul/ns/default/dc/dc1/svc/": "nil",
        "spiffe://1111.consul": "nil",
    }
    (tmp_path / "runner.lua").write_text(CALLER_RUNNER)
    (tmp_path / "uris").write_text("\n".join(uris) + "\n")
    result = subprocess.run([lua, str(tmp_path / "runner.lua"), str(ROOT / "authorize.lua"),
                             str(tmp_path / "uris")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == list(uris.values())
