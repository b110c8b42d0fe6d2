#!/usr/bin/env python3
"""The data path: what two meshgen sidecars cost a request, beside a bare mutual-TLS pair and
beside no sidecar at all. Prints figures; needs wrk (`apt-get install wrk`).

An app (an HAProxy of one thread answering a 1 KB body to every request) is reached through
(direct) nothing, (floor) two HAProxy with nothing but mutual TLS between them, built from the
same certificates and global TLS settings meshgen renders (no Lua, no maps, no logs, HAProxy's
default connection reuse), (meshgen) the two sidecars meshgen renders for a client service and
a server service on the agent double, (quiet) the same with the server's Config access_log
false, and, with --baseline REF, (before) the sidecars the meshgen of git REF renders. wrk (one thread, 16 connections) sends GET / in four modes: HTTP
keep-alive, HTTP with a new connection per request (`Connection: close`), TCP (sidecars in TCP
mode, HTTP keep-alive through them) and TCP with a new connection per request (a handshake
between the sidecars each time). Each mode runs at the most wrk gets and, except the last, at
about 1000 and 4000 requests per second (wrk's per-connection delay: the rate reached is
printed). The configurations take turns, cell after cell, for --rounds rounds; medians are
printed. Per cell: the rate reached, latency p50/p99 and what it adds over direct, and the CPU
time per request of each side's HAProxy (from /proc; the app's and wrk's not counted). Memory:
RSS and PSS of each side after the keep-alive maximum (one process each: haproxy -db, no
master). Access logs go to /dev/null.

--parts tls: new connections per second through the bare pair under TLS settings side by side
(HAProxy's defaults, then each candidate), with CPU per connection of each side.

    python3 benchmarks/datapath_bench.py [--haproxy PATH|all] [--seconds 3] [--rounds 2]
        [--baseline REF] [--parts data,tls]
"""
from __future__ import annotations

import argparse
import http.client
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from consul_double import ConsulDouble  # noqa: E402
from harness import free_port, haproxy_builds, register_sidecar, wait_listening, wait_passing  # noqa: E402
from authorize_bench import haproxy_cpu  # noqa: E402

CONNECTIONS = 16
BODY = b"x" * 1024
# Each mode at these rates (requests per second; None: as many as wrk gets).
MODES = {"http keep-alive": (1000, 4000, None), "http new connection": (1000, 4000, None),
         "tcp": (1000, 4000, None), "tcp new connection": (None,)}

# TLS settings measured by --parts tls, as global lines. Each keeps certificate verification
# both ways and an ephemeral key exchange on every handshake, resumed or not.
X25519 = ["ssl-default-bind-curves X25519", ".if version_atleast(3.0)", "ssl-default-server-curves X25519", ".endif"]
HYBRID = ["ssl-default-bind-curves X25519MLKEM768:X25519", "ssl-default-server-curves X25519MLKEM768:X25519"]
NO_TICKETS = ["ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets"]
TLS_CANDIDATES = {
    "HAProxy's defaults": [],
    "X25519 only": X25519,
    "hybrid ML-KEM, one share": HYBRID,          # OpenSSL 3.5+ only
    "no tickets (session cache)": NO_TICKETS,
    "no resumption": NO_TICKETS + ["tune.ssl.cachesize 0"],
}


# ----------------------------------------------------------------------------- processes

class Process:
    """One HAProxy in the foreground (no master): its CPU and memory from /proc."""

    def __init__(self, haproxy: str, config: Path, port: int):
        self.popen = subprocess.Popen([haproxy, "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        wait_listening(port, self.popen)

    def cpu(self) -> float:
        return haproxy_cpu(self.popen.pid)

    def memory_kib(self) -> tuple[int, int]:
        """RSS and PSS."""
        values = {}
        for line in Path(f"/proc/{self.popen.pid}/smaps_rollup").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("Rss", "Pss"):
                values[name] = int(rest.split()[0])
        return values["Rss"], values["Pss"]

    def stop(self) -> None:
        self.popen.terminate()
        self.popen.wait()


@dataclass
class Setup:
    """What one configuration runs: a client side and a server side (none for direct), and the
    port wrk sends to."""
    name: str
    port: int
    sides: list = field(default_factory=list)      # (config path, port to wait for), client first


def app_config(scratch: Path, port: int) -> Path:
    body = scratch / "body"
    body.write_bytes(BODY)
    config = scratch / "app.cfg"
    config.write_text(f"""global
    nbthread 1
defaults
    mode http
    timeout client 30s
    timeout server 30s
    timeout connect 5s
frontend app
    bind 127.0.0.1:{port}
    http-request return status 200 content-type text/plain file {body}
""")
    return config


def floor_configs(scratch: Path, name: str, http: bool, tls: list[str], leaf: Path, roots: Path,
                  client_port: int, server_port: int, app_port: int) -> tuple[Path, Path]:
    """A bare mutual-TLS pair: the client side dials the server side with the same leaf and
    roots as a sidecar; nothing else."""
    head = "global\n" + "".join(f"    {line.strip()}\n" if not line.startswith(".") else f"{line}\n" for line in tls) + f"""
defaults
    mode {"http" if http else "tcp"}
    timeout client 1h
    timeout server 1h
    timeout connect 5s
"""
    verify = f"crt {leaf} ca-file {roots} verify required"
    client, server = scratch / f"{name}-client.cfg", scratch / f"{name}-server.cfg"
    # From 3.3 HAProxy sends the Host header as SNI and checks the certificate against it.
    no_sni = ".if version_atleast(3.3)\n    default-server no-sni-auto no-check-sni-auto\n.endif\n" if http else ""
    client.write_text(head + f"""frontend upstream
    bind 127.0.0.1:{client_port}
    default_backend server_side
backend server_side
{no_sni}    server s 127.0.0.1:{server_port} ssl {verify}
""")
    server.write_text(head + f"""frontend public
    bind 127.0.0.1:{server_port} ssl {verify}
    default_backend app
backend app
    server app 127.0.0.1:{app_port}
""")
    return client, server


def tls_lines(config: str) -> list[str]:
    """The TLS settings of a rendered haproxy.cfg's global section, for the floor to share."""
    section = config.split("\nglobal\n", 1)[1].split("\n\n", 1)[0].split("\ndefaults\n", 1)[0]
    kept = [line.strip() for line in section.splitlines()
            if line.strip().startswith(("ssl-default", "tune.ssl", ".if", ".endif", ".else"))]
    return [line for i, line in enumerate(kept)       # no .if block left empty
            if not (line.startswith(".if") and i + 1 < len(kept) and kept[i + 1] == ".endif")
            and not (line == ".endif" and i > 0 and kept[i - 1].startswith(".if"))]


# ----------------------------------------------------------------------------- meshgen sidecars

def meshgen_checkout(ref: str | None, scratch: Path) -> Path:
    """This checkout, or the files meshgen renders from at git `ref`."""
    if ref is None:
        return ROOT
    where = scratch / f"meshgen-{ref}"
    where.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where


def render(checkout: Path, double, proxy_id: str, out: Path, haproxy: str) -> Path:
    result = subprocess.run([sys.executable, str(checkout / "meshgen.py"), "render", "--proxy-id", proxy_id,
                             "--out", str(out), "--haproxy", haproxy, "--http-addr", double.url],
                            capture_output=True, text=True, env={**os.environ, "CONSUL_HTTP_TOKEN": ""})
    if result.returncode != 3:
        raise SystemExit(f"meshgen render {proxy_id}: exit {result.returncode}: {result.stderr}")
    return out / "haproxy.cfg"


@dataclass
class Mesh:
    """A client and a server service on the double, each with a sidecar, per protocol."""
    app_port: int
    ports: dict            # protocol -> (upstream port, public port)
    proxies: dict          # protocol -> (client proxy id, server proxy id)


def register(double, app_port: int) -> Mesh:
    ports, proxies = {}, {}
    for protocol in ("http", "tcp"):
        upstream_port, public_port = free_port(), free_port()
        server = register_sidecar(double, f"api-{protocol}", public_port, app_port, config={"protocol": protocol})
        client = register_sidecar(double, f"web-{protocol}", free_port(), free_port(), upstreams=[
            {"destination_name": f"api-{protocol}", "local_bind_port": upstream_port,
             "config": {"protocol": protocol}}])
        double.set_intention(f"web-{protocol}", f"api-{protocol}", "allow")
        ports[protocol], proxies[protocol] = (upstream_port, public_port), (client, server)
    return Mesh(app_port, ports, proxies)


def setups(mesh: Mesh, double, haproxy: str, scratch: Path, checkouts: dict) -> dict:
    """For each protocol, every configuration: direct, floor, meshgen (and before), and quiet:
    meshgen's with the server's Config access_log false."""
    found = {}
    for protocol in ("http", "tcp"):
        upstream_port, public_port = mesh.ports[protocol]
        client_id, server_id = mesh.proxies[protocol]
        rendered = {}
        # The agent lists the server's sidecar as an upstream instance once its port listens.
        listening = socket.create_server(("127.0.0.1", public_port))
        wait_passing(double, f"api-{protocol}", server_id)
        for label, checkout in checkouts.items():
            base = scratch / label / protocol
            rendered[label] = (render(checkout, double, client_id, base / "client", haproxy),
                               render(checkout, double, server_id, base / "server", haproxy))
        register_sidecar(double, f"api-{protocol}", public_port, mesh.app_port,
                         config={"protocol": protocol, "access_log": False})
        wait_passing(double, f"api-{protocol}", server_id)
        rendered["quiet"] = (rendered["meshgen"][0],
                             render(ROOT, double, server_id, scratch / "quiet" / protocol / "server", haproxy))
        listening.close()
        server_out = rendered["meshgen"][1].parent
        floor = floor_configs(scratch, f"floor-{protocol}", protocol == "http",
                              tls_lines(rendered["meshgen"][1].read_text()), server_out / "leaf.pem",
                              server_out / "roots.pem", upstream_port, public_port, mesh.app_port)
        found[protocol] = [Setup("direct", mesh.app_port),
                           Setup("floor", upstream_port, [(floor[0], upstream_port), (floor[1], public_port)])]
        found[protocol] += [Setup(label, upstream_port, [(client, upstream_port), (server, public_port)])
                            for label, (client, server) in rendered.items()]
    return found


# ----------------------------------------------------------------------------- load

@dataclass
class Cell:
    rate: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us: list          # per side, per request
    memory: list          # per side, (RSS KiB, PSS KiB)


def wrk_script(scratch: Path, new_connection: bool, rate: int | None) -> Path:
    lines = []
    if new_connection:
        lines.append('wrk.headers["Connection"] = "close"')
    if rate:
        lines.append(f"function delay() return {max(1, round(CONNECTIONS * 1000 / rate))} end")
    lines.append("""function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format("RESULT %d %d %d %d %d\\n", summary.requests, summary.duration,
        latency:percentile(50), latency:percentile(99), e.connect + e.read + e.write + e.status + e.timeout))
end""")
    script = scratch / f"wrk-{int(new_connection)}-{rate}.lua"
    script.write_text("\n".join(lines) + "\n")
    return script


def warm_up(port: int) -> None:
    """A few requests on new connections and on one kept open: TLS sessions, Lua states and the
    sidecars' maps are as they are under load."""
    for _ in range(4):
        keep = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        for _ in range(5):
            keep.request("GET", "/")
            if keep.getresponse().read() != BODY:
                raise SystemExit(f"port {port}: the app's body did not come back")
        keep.close()


def run_cell(haproxy: str, setup: Setup, mode: str, rate: int | None, seconds: int, scratch: Path) -> Cell:
    sides = [Process(haproxy, config, port) for config, port in reversed(setup.sides)][::-1]
    try:
        warm_up(setup.port)
        script = wrk_script(scratch, mode.endswith("new connection"), rate)
        before = [side.cpu() for side in sides]
        output = subprocess.run(["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--timeout", "5s", "-s",
                                 str(script), f"http://127.0.0.1:{setup.port}/"],
                                capture_output=True, text=True, check=True).stdout
        used = [side.cpu() - start for side, start in zip(sides, before)]
        memory = [side.memory_kib() for side in sides]
    finally:
        for side in sides:
            side.stop()
    result = next(line for line in output.splitlines() if line.startswith("RESULT")).split()
    requests, duration_us, p50, p99, errors = (int(x) for x in result[1:])
    return Cell(requests / (duration_us / 1e6), p50 / 1000, p99 / 1000, errors,
                [cpu / max(requests, 1) * 1e6 for cpu in used], memory)


# ----------------------------------------------------------------------------- report

def median_cell(cells: list[Cell]) -> Cell:
    sides = len(cells[0].cpu_us)
    return Cell(statistics.median(c.rate for c in cells), statistics.median(c.p50_ms for c in cells),
                statistics.median(c.p99_ms for c in cells), sum(c.errors for c in cells),
                [statistics.median(c.cpu_us[i] for c in cells) for i in range(sides)],
                [tuple(statistics.median(c.memory[i][j] for c in cells) for j in (0, 1)) for i in range(sides)])


def load_label(rate: int | None) -> str:
    return f"{rate} rps" if rate else "max"


def report(results: dict, names: list[str]) -> None:
    print(f"{'mode':<20} {'load':>8} {'config':<8} {'rps':>8} {'p50 ms':>7} {'p99 ms':>7} {'+p50':>6} {'+p99':>6}"
          f" {'client us/req':>13} {'server us/req':>13} {'err':>4}")
    for mode, loads in MODES.items():
        for rate in loads:
            direct = results[(mode, rate, "direct")]
            for name in names:
                cell = results[(mode, rate, name)]
                cpu = [f"{us:13.1f}" for us in cell.cpu_us] or [f"{'-':>13}"] * 2
                print(f"{mode:<20} {load_label(rate):>8} {name:<8} {cell.rate:>8.0f} {cell.p50_ms:>7.2f} "
                      f"{cell.p99_ms:>7.2f} {cell.p50_ms - direct.p50_ms:>6.2f} {cell.p99_ms - direct.p99_ms:>6.2f} "
                      f"{cpu[0]} {cpu[1]} {cell.errors:>4}")
    print("\nsummary (medians; ratios of one run's cells):")
    for mode in MODES:
        floor_max = results[(mode, None, "floor")]
        for name in names:
            if name in ("direct", "floor"):
                continue
            cell = results[(mode, None, name)]
            at_1000 = ""
            if (mode, 1000, name) in results:
                mine, floor = results[(mode, 1000, name)], results[(mode, 1000, "floor")]
                at_1000 = (f" client {mine.cpu_us[0] / floor.cpu_us[0]:.2f}x server"
                           f" {mine.cpu_us[1] / floor.cpu_us[1]:.2f}x at 1000 rps;")
            print(f"  {mode:<20} {name:<8} CPU per request vs floor: client {cell.cpu_us[0] / floor_max.cpu_us[0]:.2f}x"
                  f" server {cell.cpu_us[1] / floor_max.cpu_us[1]:.2f}x at max,{at_1000}"
                  f" max rate {cell.rate / floor_max.rate:.2f}x floor's,"
                  f" {cell.rate / results[(mode, None, 'direct')].rate:.2f}x direct's")
        for name in names:
            if "before" in names and name == "meshgen":
                before, now = results[(mode, None, "before")], results[(mode, None, "meshgen")]
                print(f"  {mode:<20} meshgen vs before: max rate {now.rate / before.rate:.2f}x, CPU per request "
                      f"client {now.cpu_us[0] / before.cpu_us[0]:.2f}x server {now.cpu_us[1] / before.cpu_us[1]:.2f}x")
    print("\nmemory after the keep-alive maximum (one process per side, -db), MiB:")
    for name in names:
        if name == "direct":
            continue
        memory = results[("http keep-alive", None, name)].memory
        print(f"  {name:<8} client RSS {memory[0][0] / 1024:5.1f} PSS {memory[0][1] / 1024:5.1f}   "
              f"server RSS {memory[1][0] / 1024:5.1f} PSS {memory[1][1] / 1024:5.1f}")


def data_path(haproxy: str, args, scratch: Path) -> None:
    double, app_port = ConsulDouble().start(), free_port()
    app = Process(haproxy, app_config(scratch, app_port), app_port)
    try:
        mesh = register(double, app_port)
        checkouts = {"meshgen": ROOT}
        if args.baseline:
            checkouts["before"] = meshgen_checkout(args.baseline, scratch)
        by_protocol = setups(mesh, double, haproxy, scratch, checkouts)
        names = [s.name for s in by_protocol["http"]]
        samples: dict = {}
        for _ in range(args.rounds):
            for mode, loads in MODES.items():
                for rate in loads:
                    for setup in by_protocol["tcp" if mode.startswith("tcp") else "http"]:
                        cell = run_cell(haproxy, setup, mode, rate, args.seconds, scratch)
                        samples.setdefault((mode, rate, setup.name), []).append(cell)
        results = {key: median_cell(cells) for key, cells in samples.items()}
    finally:
        app.stop()
        double.stop()
    report(results, names)


def tls_settings(haproxy: str, openssl: str, args, scratch: Path) -> None:
    double, app_port = ConsulDouble().start(), free_port()
    app = Process(haproxy, app_config(scratch, app_port), app_port)
    try:
        mesh = register(double, app_port)
        upstream_port, public_port = mesh.ports["http"]
        out = scratch / "tls-render"
        config = render(ROOT, double, mesh.proxies["http"][1], out, haproxy)
        rendered = tls_lines(config.read_text())
        candidates = {**TLS_CANDIDATES, "meshgen's": rendered}
        if tuple(int(x) for x in openssl.split(".")[:2]) < (3, 5):
            del candidates["hybrid ML-KEM, one share"]          # no ML-KEM before OpenSSL 3.5
        setups_by_name = {}
        for i, (name, lines) in enumerate(candidates.items()):
            client, server = floor_configs(scratch, f"tls{i}", True, lines, out / "leaf.pem", out / "roots.pem",
                                           upstream_port, public_port, app_port)
            setups_by_name[name] = Setup(name, upstream_port, [(client, upstream_port), (server, public_port)])
        samples: dict = {}
        for _ in range(args.rounds):
            for name, setup in setups_by_name.items():
                samples.setdefault(name, []).append(
                    run_cell(haproxy, setup, "http new connection", None, args.seconds, scratch))
    finally:
        app.stop()
        double.stop()
    results = {name: median_cell(cells) for name, cells in samples.items()}
    base = results["HAProxy's defaults"]
    print(f"\nnew connections through the bare pair (HTTP, Connection: close, {CONNECTIONS} connections):")
    print(f"  meshgen's settings: {' | '.join(rendered) or '(none)'}")
    print(f"  {'settings':<28} {'conn/s':>8} {'vs defaults':>11} {'client us/conn':>15} {'server us/conn':>15}")
    for name, cell in results.items():
        print(f"  {name:<28} {cell.rate:>8.0f} {cell.rate / base.rate:>11.2f} {cell.cpu_us[0]:>15.0f} "
              f"{cell.cpu_us[1]:>15.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--haproxy", default="all",
                        help="an HAProxy binary, or `all`: every build install-deps.sh installed, in turn")
    parser.add_argument("--seconds", type=int, default=3, help="per cell")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", metavar="REF", help="also the sidecars meshgen at git REF renders")
    parser.add_argument("--parts", default="data,tls")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("needs wrk: apt-get install wrk")
    parts = set(args.parts.split(","))
    for build in haproxy_builds(args.haproxy):
        print(f"\n=== HAProxy {build.version} (Lua {build.lua}, OpenSSL {build.openssl}); {os.cpu_count()} cores; "
              f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        with tempfile.TemporaryDirectory() as tmp:
            if "data" in parts:
                data_path(build.path, args, Path(tmp))
            if "tls" in parts:
                tls_settings(build.path, build.openssl, args, Path(tmp))
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
