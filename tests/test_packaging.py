"""`pip install .` gives a working `meshgen` that finds its template and Lua script."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_pip_install_in_a_fresh_venv(any_haproxy, tmp_path):
    venv = tmp_path / "venv"
    # System site-packages already hold click, jinja2, urllib3 and cryptography; meshgen itself,
    # its entry point and its data files come from this checkout, built as `pip install .` does.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(ROOT)],
                         capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    definition = tmp_path / "www.json"
    services = json.loads((ROOT / "demo" / "services.json").read_text())["services"]
    definition.write_text(json.dumps(services[0]))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run([str(venv / "bin" / "meshgen"), "check", str(definition), "--haproxy", any_haproxy],
                         cwd=elsewhere, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    installed = subprocess.run([str(venv / "bin" / "python"), "-c", "import meshgen; print(meshgen.__file__)"],
                               cwd=elsewhere, capture_output=True, text=True).stdout
    assert str(ROOT) not in installed and "site-packages" in installed
    assert (venv / "share" / "meshgen" / "templates" / "haproxy.cfg.j2").is_file()
