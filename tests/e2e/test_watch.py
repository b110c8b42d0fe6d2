"""`render --wait` and `--runtime-socket`: blocking queries instead of polling, certificate
rotation without a reload."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from cryptography import x509

import meshgen

from harness import (ROOT, agent_env, EchoServer, free_port, HAProxy, Identity, load_seed, register_sidecar,
                     seed_definition, served_certificate, talk, wait_passing)
from real_consul import ConsulProcess, RealAgent

pytestmark = pytest.mark.usefixtures("any_haproxy")


def render(double, out, haproxy, *extra, wait=None, sidecar_for="www"):
    command = [sys.executable, str(ROOT / "meshgen.py"), "render", "--sidecar-for", sidecar_for, "--out",
               str(out), "--haproxy", haproxy, *extra] + (["--wait", wait] if wait else [])
    return subprocess.Popen(command, env=agent_env(double), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(process, timeout=60):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, err


@pytest.fixture
def seeded(seeded_double, any_haproxy, tmp_path):
    out = tmp_path / "out"
    code, err = finish(render(seeded_double, out, any_haproxy, wait="20s"))
    assert code == 3, err                          # the first run returns at once
    state = json.loads((out / meshgen.STATE_FILE).read_text())
    assert state["proxy_id"] == "www-sidecar-proxy" and state["roots_index"] > 0
    return seeded_double, out, any_haproxy


CHANGES = {
    "registration": lambda d: d.update_service("www-sidecar-proxy",
                                               lambda s: s["Proxy"]["Config"].update(max_inbound_connections=9)),
    "roots": lambda d: d.rotate_root(reissue_leaves=False),
    "leaf": lambda d: d.renew_leaf("www"),
    "instances": lambda d: d.add_instance("redis", "10.0.0.9", 21000),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_change_in_each_watched_thing_ends_the_wait(seeded, change):
    double, out, haproxy = seeded
    process = render(double, out, haproxy, wait="30s")
    time.sleep(0.5)
    assert process.poll() is None                  # blocked: nothing has changed yet
    changed_at = time.monotonic()
    CHANGES[change](double)
    code, err = finish(process)
    assert time.monotonic() - changed_at < 5, "the wait did not end with the change"
    assert code == 3, err


REAL_CHANGES = {
    "registration": lambda agent, names: agent.register({"service": dict(
        names["www_definition"], connect={"sidecar_service": dict(
            names["www_definition"]["connect"]["sidecar_service"], proxy=dict(
                names["www_definition"]["connect"]["sidecar_service"]["proxy"],
                config={"max_inbound_connections": 9}))})}),
    "roots": lambda agent, names: agent.rotate_root(),
    "instances": lambda agent, names: agent.deregister(names["redis_sidecar"]),
}


@pytest.mark.parametrize("change", sorted(REAL_CHANGES))
def test_a_change_on_a_real_agent_ends_the_wait(consul, change, any_haproxy, tmp_path, request):
    """The same on Consul 1.8.7, for what an operator can change there at will: a new
    registration, a CA rotation (a new key), an instance leaving. (A leaf is renewed only by
    its agent, about 20 s after a rotation on 1.8.7, so that case runs on the double alone.)
    An agent of its own: a rotation on the session's agent would re-issue other tests' leaves."""
    process = ConsulProcess(consul).start()
    request.addfinalizer(process.remove)
    suffix = "-" + uuid.uuid4().hex[:6]
    agent = RealAgent(process.url, suffix=suffix)
    listener = socket.create_server(("127.0.0.1", 0))
    load_seed(agent, suffix, sidecar_ports={"www": free_port(), "redis": listener.getsockname()[1]})
    wait_passing(agent, "redis" + suffix, f"redis{suffix}-sidecar-proxy")
    names = {"redis_sidecar": f"redis{suffix}-sidecar-proxy",
             "www_definition": seed_definition("www", suffix)}
    out = tmp_path / "out"
    try:
        code, err = finish(render(agent, out, any_haproxy, wait="20s", sidecar_for="www" + suffix))
        assert code == 3, err
        process = render(agent, out, any_haproxy, wait="30s", sidecar_for="www" + suffix)
        time.sleep(0.5)
        assert process.poll() is None                  # blocked: nothing has changed yet
        changed_at = time.monotonic()
        REAL_CHANGES[change](agent, names)
        code, err = finish(process)
        assert time.monotonic() - changed_at < 5, "the wait did not end with the change"
        assert code == 3, err
    finally:
        listener.close()
        for name in ("www", "redis"):
            agent.deregister(name + suffix)


def test_an_idle_wait_asks_each_endpoint_once_per_period(seeded):
    double, out, haproxy = seeded
    before = dict(double.requests)
    periods = 3
    for _ in range(periods):
        start = time.monotonic()
        code, err = finish(render(double, out, haproxy, wait="1s"))
        assert (code, time.monotonic() - start >= 1.0) == (0, True), err
        assert "unchanged after waiting 1s" in err
    asked = {path: n - before.get(path, 0) for path, n in double.requests.items() if n != before.get(path, 0)}
    # The roots twice: one plain read to catch an agent that came back with a new CA at the
    # same index, then the blocking one.
    assert asked == {"/v1/agent/service/www-sidecar-proxy": periods, "/v1/agent/connect/ca/roots": 2 * periods,
                     "/v1/agent/connect/ca/leaf/www": periods, "/v1/health/connect/redis": periods,
                     "/v1/agent/services": periods}     # --sidecar-for looks the sidecar up first


def test_an_index_that_goes_backwards_is_reset(seeded):
    double, out, haproxy = seeded
    process = render(double, out, haproxy, wait="30s")
    time.sleep(0.5)
    double.reset_health_index("redis", 3)
    code, err = finish(process)
    assert code == 0, err                           # same data: nothing to write
    state = json.loads((out / meshgen.STATE_FILE).read_text())
    assert state["instances"]["service|redis||"] == 3
    code, _ = finish(render(double, out, haproxy, wait="1s"))
    assert code == 0                                # and it blocks on the new index again


def test_prepared_queries_are_polled(double, any_haproxy, tmp_path):
    load_seed(double)
    double.add_prepared_query("cache-query", "cache")
    double.update_service("www-sidecar-proxy", lambda s: s["Proxy"]["Upstreams"].append(
        {"DestinationType": "prepared_query", "DestinationName": "cache-query", "LocalBindPort": 7000,
         "MeshGateway": {}}))
    out = tmp_path / "out"
    assert finish(render(double, out, any_haproxy))[0] == 3
    polls_before = double.count("/v1/query/cache-query/execute")
    process = render(double, out, any_haproxy, "--poll-interval", "0.2", wait="30s")
    deadline = time.monotonic() + 10
    while double.count("/v1/query/cache-query/execute") < polls_before + 3:   # polled, again and again
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert process.poll() is None                   # and still waiting: nothing changed
    double.add_instance("cache", "10.0.0.20", 21000)
    code, err = finish(process)
    assert code == 3, err


# ----------------------------------------------------------------------------- runtime API

@pytest.fixture
def running(double, haproxy, tmp_path):
    """The `web` sidecar under HAProxy in master-worker mode, and a way to run meshgen on it
    with the runtime socket."""
    echo = EchoServer()
    port = free_port()
    register_sidecar(double, "web", port, echo.port)
    double.set_intention("*", "web", "allow")
    out = tmp_path / "out"

    def render_live():
        command = [sys.executable, str(ROOT / "meshgen.py"), "render", "--proxy-id", "web-sidecar-proxy",
                   "--out", str(out), "--haproxy", haproxy, "--runtime-socket", str(out / "admin.sock")]
        result = subprocess.run(command, env=agent_env(double), capture_output=True, text=True, timeout=60)
        return result.returncode, result.stderr

    code, err = render_live()
    assert code == 3, err                             # HAProxy is not running yet: a (re)load
    process = HAProxy(haproxy, out / "haproxy.cfg", tmp_path / "haproxy.log", wait_for_port=port,
                      master_socket=tmp_path / "master.sock")
    # The client presents its certificate; which root signed the server's is checked below.
    client = Identity.from_double(double, tmp_path / "ids", "api").context(verify_server=False)
    yield port, client, process, render_live, out
    process.stop()
    echo.close()


def test_a_root_rotation_never_refuses_a_new_root_peer(double, running, haproxy_build, tmp_path):
    """A root rotation in Consul's order, with a peer that already holds a leaf of the new root
    connecting right after the first step. From 3.0 the new roots go live through the runtime
    API (no reload); 2.6 and 2.8 answer Success to that and keep the old bundle, so meshgen asks
    for a reload there instead. Either way the peer gets in and no request fails."""
    port, client, process, render_live, _ = running
    live_roots = haproxy_build.branch not in ("2.6", "2.8")
    workers = process.workers()
    outcomes, stop = [], threading.Event()

    def load():
        while not stop.is_set():
            outcomes.append(talk(port, client) == b"ping\n")

    thread = threading.Thread(target=load)
    thread.start()
    try:
        time.sleep(0.3)
        double.rotate_root(reissue_leaves=False)     # step 1: the new root joins the trust bundle
        code, err = render_live()
        if live_roots:
            assert code == 0 and "CA roots changed, applied live" in err, err
        else:
            assert code == 3 and "reload HAProxy" in err, err
            process.reload()
        assert render_live()[0] == 0                 # done once, then nothing to do
        new_root_peer = Identity.custom(double, tmp_path / "peer", "api-new", double.service_uri("api"),
                                        root=double.roots[-1])
        assert talk(port, new_root_peer.context(verify_server=False)) == b"ping\n"
        assert talk(port, new_root_peer.context(with_cert=False, verify_server=False)) is None
        after_roots = process.workers()
        time.sleep(0.3)
        double.reissue_leaves()                      # step 2: a leaf from the new root
        code, err = render_live()
        assert code == 3 and "reload HAProxy" in err, err
        process.reload()
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
    assert (after_roots == workers) == live_roots    # step 1 cost a reload only where it must
    assert len(outcomes) > 20 and outcomes.count(False) == 0
    new_root = x509.load_pem_x509_certificate(double._roots_json()["Roots"][-1]["RootCert"].encode())
    served_certificate(port, client).verify_directly_issued_by(new_root)


def test_a_live_leaf_update_keeps_client_verification_only_from_3_0(double, running, haproxy_build):
    """Why a new leaf asks for a reload: after `set ssl cert` + `commit` on a bind with
    `verify required` and a certificate without a DNS name (Consul's leaves), HAProxy 2.6 and
    2.8 stop asking clients for a certificate; authorize.lua then refuses every connection (no
    identity): fail closed, but mutual TLS is gone. 3.0 and later keep verification and serve the
    new certificate."""
    port, client, process, _, out = running
    assert talk(port, client) == b"ping\n"
    double.renew_leaf("web")
    leaf = double.leaves["web"]
    target = f"ssl cert {(out / meshgen.LIVE).resolve() / 'leaf.pem'}"
    assert "Transaction" in runtime(out, f"set {target} <<\n{leaf['CertPEM']}{leaf['PrivateKeyPEM']}")
    assert "Success" in runtime(out, f"commit {target}")
    if haproxy_build.branch in ("2.6", "2.8"):
        assert talk(port, client) is None
        assert 'authz=deny reason="no client certificate"' in process.wait_for_log("no client certificate")
    else:
        assert talk(port, client) == b"ping\n"
        new_leaf = x509.load_pem_x509_certificate(leaf["CertPEM"].encode())
        assert served_certificate(port, client).serial_number == new_leaf.serial_number
        anonymous = Identity.from_double(double, out.parent / "ids", "api").context(with_cert=False,
                                                                                   verify_server=False)
        assert talk(port, anonymous) is None
        assert "no client certificate" not in process.log()    # refused in the handshake


def runtime(out, command: str) -> str:
    import meshgen
    return meshgen.runtime_command(out / "admin.sock", command)


def test_a_refused_live_update_asks_for_a_reload(seeded):
    double, out, haproxy = seeded
    double.renew_leaf("www")
    code, err = finish(render(double, out, haproxy, "--runtime-socket", str(out / "no-such.sock")))
    assert code == 3 and "reload HAProxy" in err
