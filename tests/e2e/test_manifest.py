"""Live changes are planned from each bundle's manifest.json, rendered from the model beside
haproxy.cfg, never from haproxy.cfg's text: a template laid out differently changes nothing, and
servers HAProxy knows by a DNS name are compared by that name."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from harness import ROOT, agent_env, run_meshgen
from test_live_changes import LiveSidecar, PeerSidecar


class RenderedByCopy(LiveSidecar):
    """The same sidecar, rendered by a copy of meshgen whose haproxy.cfg template is indented
    otherwise: each leading group of four spaces is a tab and two spaces."""

    def __init__(self, double, haproxy: str, tmp_path: Path):
        self.checkout = tmp_path / "checkout"
        (self.checkout / "templates").mkdir(parents=True)
        for name in ("meshgen.py", "authorize.lua"):
            shutil.copy(ROOT / name, self.checkout / name)
        for template in (ROOT / "templates").iterdir():
            text = template.read_text()
            if template.name == "haproxy.cfg.j2":
                text = re.sub(r"^((?:    )+)", lambda m: "\t  " * (len(m[1]) // 4), text, flags=re.M)
            (self.checkout / "templates" / template.name).write_text(text)
        super().__init__(double, haproxy, tmp_path)

    def render(self) -> subprocess.CompletedProcess:
        run = subprocess.run([sys.executable, str(self.checkout / "meshgen.py"), "render", "--proxy-id",
                              "web-sidecar-proxy", "--out", str(self.out), "--haproxy", self.binary,
                              "--runtime-socket", str(self.out / "admin.sock")],
                             env=agent_env(self.double), capture_output=True, text=True, timeout=120)
        run.exit_code = run.returncode
        return run


def test_a_template_indented_otherwise_still_changes_instances_live(double, any_haproxy, tmp_path):
    """With every line of the haproxy.cfg template indented by tabs, an instance joining and
    the old ones leaving go in live (exit 0, no reload): afterwards every request lands on the
    one instance left, which joined without a reload."""
    live = RenderedByCopy(double, any_haproxy, tmp_path)
    joined = PeerSidecar(double, tmp_path / "pool", "api", "api-joined")
    try:
        config = (live.out / "haproxy.cfg").read_text()
        assert "\n\t  default-server ssl crt " in config and "\n\t  server 127.0.0.1:" in config
        workers = live.haproxy.workers()
        double.add_instance("api", "127.0.0.1", joined.port, service_id="api-joined")
        run = live.render()
        assert run.returncode == 0, run.stderr
        for sid in ("api-0", "api-1"):
            double.remove_instance("api", sid)
        run = live.render()
        assert run.returncode == 0, run.stderr
        assert {live.through_upstream()[0] for _ in range(20)} == {"api-joined"}
        assert live.haproxy.workers() == workers
        assert live.servers_running() == {("127.0.0.1:%d" % joined.port, "127.0.0.1", str(joined.port), 1, "0")}
    finally:
        joined.close()
        live.close()


def status(out: Path) -> tuple[int, dict]:
    run = run_meshgen("status", "--out", str(out), "--json")
    return run.code, {row["what"]: row for row in json.loads(run.stdout)}


def test_servers_by_dns_name_are_compared_by_that_name(double, any_haproxy, tmp_path):
    """An instance registered by a host name: HAProxy resolves it when it loads the config, and
    `show servers state` gives the address it got with the name beside it. Adding such a server
    through the runtime API would leave it unresolved, so its joining is a reload; from then on
    `meshgen status` agrees with HAProxy, and changes to other servers go live, compared with the
    name server included."""
    live = LiveSidecar(double, any_haproxy, tmp_path, peers=1)
    by_name = PeerSidecar(double, tmp_path / "pool", "api", "api-by-name")
    try:
        workers = live.haproxy.workers()
        double.add_instance("api", "localhost", by_name.port, service_id="api-by-name")
        result = live.render()
        assert result.exit_code == 3 and not result.applied_live, result
        live.haproxy.reload()
        code, rows = status(live.out)
        assert code == 0, rows
        assert f"localhost:{by_name.port} localhost {by_name.port} 1" in rows["servers of upstream_api"]["running"]
        workers = live.haproxy.workers()
        double.remove_instance("api", "api-0")
        result = live.render()
        assert result.applied_live, result
        assert live.haproxy.workers() == workers
        assert {live.through_upstream()[0] for _ in range(20)} == {"api-by-name"}
        assert status(live.out)[0] == 0
    finally:
        by_name.close()
        live.close()
