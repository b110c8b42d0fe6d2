"""authorize.lua's certificate parsing fuzzed inside a running HAProxy (2.6 and 2.8).

Clients connect over mutual TLS with certificates our CA signed, but built to be hostile: URI
SANs that are almost the allowed identity, several of them, other name types, SANs whose DER
lies about its lengths, random unknown extensions, certificates past the script's size limit.
Intentions allow only `api`. Each case must be refused, except the control: the exact `api`
identity buried in the same noise, which must get in when the certificate is within the size
limit. HAProxy must never crash, and its memory must stay bounded."""
from __future__ import annotations

import datetime as dt
import re
import ssl
import time
import zlib
from collections import Counter

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID, ObjectIdentifier
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st

from campaign_support import SECRET_TOKEN, argv_leaks, haproxy_version, record, scaled, secret_leaks
from harness import Identity, rss_kib, talk
from test_authorize import start_sidecar  # noqa: F401  (fixture)

EXAMPLES_PER_HAPROXY = scaled(300)
MAX_DER = 16384             # authorize.lua refuses larger client certificates unread
RSS_GROWTH_LIMIT_KIB = 8192

ALLOWED = "api"


def der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + der_length(len(content)) + content


# ----------------------------------------------------------------------------- hostile parts

def uris(td: str):
    """URIs that look like, but are not, the allowed identity."""
    other_service = st.text(alphabet=st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-_."), min_size=1,
                            max_size=20).filter(lambda s: s != ALLOWED)
    return st.one_of(
        st.builds(lambda s: f"spiffe://{td}/ns/default/dc/dc1/svc/{s}", other_service),
        st.builds(lambda s: f"spiffe://other.consul/ns/default/dc/dc1/svc/{s}", st.just(ALLOWED)),
        st.sampled_from([f"spiffe://{td}/ns/default/dc/dc1/svc/{ALLOWED}{tail}" for tail in
                         ("/", "/x", "?x=1", "#frag", " ", "%00", "\t", ";x")]),
        st.sampled_from([f"{scheme}{td}/ns/default/dc/dc1/svc/{ALLOWED}" for scheme in
                         ("SPIFFE://", "spiffe:/", "spiffe:", "https://", "spiffe:///", "")]),
        st.builds(lambda n: f"spiffe://{td}/" + "a/" * n + f"svc/{ALLOWED}", st.integers(0, 3000)),
        st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=200),
    )


def general_names(td: str):
    """Name entries the cryptography builder accepts: the walk must skip all but URIs."""
    return st.one_of(
        uris(td).map(x509.UniformResourceIdentifier),
        st.from_regex(r"[a-z]{1,20}(\.[a-z]{1,10}){0,3}", fullmatch=True).map(x509.DNSName),
        st.ip_addresses().map(x509.IPAddress),
        st.from_regex(r"[a-z]{1,10}@[a-z]{1,10}\.com", fullmatch=True).map(x509.RFC822Name),
        st.binary(max_size=64).map(lambda b: x509.OtherName(ObjectIdentifier("1.3.6.1.4.1.9999.1"),
                                                             tlv(0x04, b))),
    )


def raw_san(td: str):
    """SubjectAltName contents written byte by byte, lengths and tags not to be believed."""
    uri = st.one_of(uris(td).map(str.encode), st.binary(max_size=300),
                    st.just(f"spiffe://{td}/ns/default/dc/dc1/svc/{ALLOWED}\x00evil".encode()))
    names = st.lists(st.one_of(uri.map(lambda u: tlv(0x86, u)),
                               st.binary(max_size=40).map(lambda b: tlv(0x82, b)),
                               st.binary(max_size=40)), max_size=8)
    lie = st.sampled_from(["none", "longer", "shorter", "long-form", "huge", "indefinite"])

    def build(parts, how):
        body = b"".join(parts)
        if how == "longer":
            return b"\x30" + der_length(len(body) + 7) + body
        if how == "shorter":
            return b"\x30" + der_length(max(0, len(body) - 3)) + body
        if how == "long-form":
            return b"\x30\x84" + len(body).to_bytes(4, "big") + body
        if how == "huge":
            return b"\x30\x83\xff\xff\xff" + body
        if how == "indefinite":
            return b"\x30\x80" + body + b"\x00\x00"
        return tlv(0x30, body)
    return st.one_of(st.builds(build, names, lie), st.binary(max_size=200))


@st.composite
def hostile_certificates(draw, td: str):
    """(certificate builder parts, whether this is the allowed control)."""
    control = draw(st.integers(0, 4)) == 0
    extensions = []
    if control:
        extras = draw(st.lists(general_names(td).filter(lambda n: not isinstance(n, x509.UniformResourceIdentifier)),
                               max_size=4))
        extensions.append((x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"spiffe://{td}/ns/default/dc/dc1/svc/{ALLOWED}"), *extras]), False))
    elif draw(st.booleans()):
        names = draw(st.lists(general_names(td), max_size=6))
        assume(names)
        extensions.append((x509.SubjectAlternativeName(names), draw(st.booleans())))
    else:
        extensions.append((x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
                                                      draw(raw_san(td))), False))
    for n in range(draw(st.integers(0, 3))):
        size = draw(st.sampled_from([0, 1, 100, 4000, MAX_DER, 40000]))
        extensions.append((x509.UnrecognizedExtension(ObjectIdentifier(f"1.3.6.1.4.1.9999.2.{n}"),
                                                      draw(st.binary(min_size=size, max_size=size))
                                                      if size <= 100 else bytes(size)), False))
    subject = draw(st.lists(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e),
                                    min_size=1, max_size=64), max_size=20))
    return extensions, subject, control


def sign(double, key, extensions, subject) -> bytes:
    signer_cert, signer_key = double.active_root.signer
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, v) for v in subject]))
               .issuer_name(signer_cert.subject).public_key(key.public_key())
               .serial_number(double.ca.next_serial())
               .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(hours=1)))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def web_sidecar(double, start_sidecar, monkeypatch):
    """The `web` sidecar with ACLs on and intentions letting in `api` alone."""
    double.enable_acls("deny")
    double.add_token({"service_prefix:": "write"}, SECRET_TOKEN)
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", SECRET_TOKEN)
    double.set_intention(ALLOWED, "web", "allow")
    double.set_intention("*", "web", "deny")
    return start_sidecar()


def test_hostile_client_certificates_are_refused_and_haproxy_holds(double, web_sidecar, haproxy, tmp_path):
    port, process, out = web_sidecar.port, web_sidecar.haproxy, web_sidecar.out
    td = double.ca.trust_domain
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    roots = Identity.from_double(double, tmp_path / "ids", ALLOWED).roots.read_text()
    seen = {"cases": 0, "refused": 0, "controls_in": 0, "controls_too_large": 0, "oversized": 0,
            "client_cannot_send": 0}
    rss = []

    @settings(max_examples=EXAMPLES_PER_HAPROXY, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=hostile_certificates(td))
    @seed(zlib.crc32(haproxy_version(haproxy).encode()))   # reproducible, and other cases per build
    def one_case(case):
        extensions, subject, control = case
        try:
            cert_pem = sign(double, key, extensions, subject)
        except ValueError:
            assume(False)   # the builder refused it: nothing to send
        der_size = len(x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER))
        identity = Identity(tmp_path / "ids", "case", cert_pem.decode(), key_pem, roots)
        try:
            context = identity.context()
        except ssl.SSLError:
            seen["client_cannot_send"] += 1
            assume(False)   # OpenSSL will not even load it as a client certificate
        answer = talk(port, context)
        seen["cases"] += 1
        seen["oversized"] += der_size > MAX_DER
        if control and der_size <= MAX_DER:
            assert answer == b"ping\n", (case, der_size)
            seen["controls_in"] += 1
        else:
            assert answer is None, (case, der_size)
            seen["refused"] += 1
            seen["controls_too_large"] += control
        assert process.process.poll() is None, "HAProxy died"
        if seen["cases"] in (EXAMPLES_PER_HAPROXY // 4, EXAMPLES_PER_HAPROXY):
            rss.append(rss_kib(process.process.pid))

    before = rss_kib(process.process.pid)
    one_case()
    # HAProxy writes a connection's log line when it ends, which may be just after the client
    # saw it refused: wait for every case's line.
    deadline = time.monotonic() + 5
    while True:
        log = process.log()
        reasons = Counter(re.sub(r"\d+", "N", r) for r in re.findall(r'authz=deny reason="([^"]*)"', log))
        seen["tls_refused"] = log.count("SSL handshake failure")
        script_refused = sum(reasons.values())
        if script_refused + seen["tls_refused"] >= seen["refused"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert seen["cases"] >= EXAMPLES_PER_HAPROXY * 0.9
    assert seen["controls_in"] >= 5, seen        # the allowed identity still gets through
    assert seen["oversized"] >= 5, seen
    assert "runtime error" not in log and "authorize.lua error" not in log, log[-2000:]
    # Every refusal is logged with its reason: the script's decision, or OpenSSL's refusal of a
    # certificate it cannot parse (a SAN whose DER is broken) during the handshake.
    assert script_refused + seen["tls_refused"] == seen["refused"], (reasons, seen)
    # Past 16 KiB authorize.lua refuses unread; far past it (some 80 KiB) OpenSSL already does.
    assert reasons["client certificate too large"] >= 1, reasons
    time.sleep(0.2)
    assert process.process.poll() is None
    growth = rss[-1] - rss[0]
    assert growth < RSS_GROWTH_LIMIT_KIB, (before, rss)
    assert argv_leaks() + secret_leaks(out, log) == []
    record("fuzz_client_certificates", haproxy=haproxy_version(haproxy), **seen,
           rss_start_kib=before, rss_quarter_kib=rss[0], rss_end_kib=rss[-1], reasons=dict(reasons))
