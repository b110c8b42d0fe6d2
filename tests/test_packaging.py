"""`pip install .` gives a working `meshgen` that finds its template and Lua script."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib

from harness import ROOT


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


def _lowest_declared(requirement: str) -> str:
    """`click>=8.1` -> `click==8.1`: the oldest release the project says it works with."""
    name, floor = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement).groups()
    return f"{name}=={floor}"


def test_oldest_declared_dependencies_give_the_same_commands(any_haproxy, tmp_path):
    """pyproject.toml allows click 8.1, where a command named after its function keeps a
    `-command` suffix: the commands must be render, check and show on every allowed version."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
                          *map(_lowest_declared, declared)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--no-deps", str(ROOT)],
                         capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    versions = subprocess.run([str(venv / "bin" / "python"), "-c",
                               "import click, importlib.metadata as m; print(m.version('click'))"],
                              capture_output=True, text=True).stdout.split()
    assert versions == ["8.1.0"]
    listed = subprocess.run([str(venv / "bin" / "meshgen"), "--help"], capture_output=True, text=True).stdout
    commands = re.findall(r"^  (\S+)", listed.split("Commands:")[1].split("\n\n")[0], re.M)
    assert commands == ["check", "render", "show", "status"]
    definition = tmp_path / "www.json"
    definition.write_text(json.dumps(json.loads((ROOT / "demo" / "services.json").read_text())["services"][0]))
    run = subprocess.run([str(venv / "bin" / "meshgen"), "check", str(definition), "--haproxy", any_haproxy],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
