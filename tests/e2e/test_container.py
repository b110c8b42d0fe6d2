"""The container, proven by running it. No Docker engine runs here, so .ci/dockerfile-root.py
performs the Dockerfile's own steps in a chroot of the Debian suite it names (built once, kept
under .deps/image); start.sh then runs in that chroot as the image's user, with the image's
environment, against a real Consul 1.8.7 agent on the host's loopback with ACLs on and the
minimal policy (docs/security.md) for the sidecar's token, and traffic through the sidecar decides."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from harness import ROOT, EchoServer, Identity, free_port, register_sidecar, talk, wait_listening
from test_real_agent import MINIMAL_POLICY

IMAGE_ROOT = Path(os.environ.get("MESHGEN_IMAGE_ROOT", ROOT / ".deps" / "image")).resolve()


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "building the image's root needs root (chroot, mount)"
    if shutil.which("debootstrap") is None:
        return "debootstrap is not installed (install-deps.sh installs it)"
    return None


@pytest.fixture
def image(consul) -> dict:
    """The image's root, built from the Dockerfile (or as cached): its user, env, entrypoint.
    The Consul stage's binary is the one the tests run."""
    if (why := _unavailable()) is not None:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    stage = IMAGE_ROOT.with_name(IMAGE_ROOT.name + ".consul-stage")
    (stage / "bin").mkdir(parents=True, exist_ok=True)
    if not (stage / "bin" / "consul").is_file() or \
            (stage / "bin" / "consul").read_bytes() != Path(consul).read_bytes():
        shutil.copy(consul, stage / "bin" / "consul")
    started = time.monotonic()
    subprocess.run([str(ROOT / ".ci" / "dockerfile-root.py"), "--stage", f"consul={stage}",
                    str(ROOT / "Dockerfile"), str(IMAGE_ROOT)], check=True, timeout=1200)
    print(f"image root ready in {time.monotonic() - started:.0f} s")
    return json.loads((IMAGE_ROOT / ".image.json").read_text())


class InImage:
    """A command in the image's root as `docker run` would start it: the image's user and
    environment (plus `env`), /proc mounted."""

    def __init__(self, image: dict, command: list[str], log: Path, **env):
        environment = [f"{k}={v}" for k, v in {"HOME": image["home"], **image["env"], **env}.items()]
        self.log_path, self._log = log, open(log, "wb")
        subprocess.run(["mount", "-t", "proc", "proc", str(IMAGE_ROOT / "proc")], check=True)
        try:
            self.process = subprocess.Popen(
                ["chroot", f"--userspec={image['user']}", str(IMAGE_ROOT), "/usr/bin/env", "-i", *environment,
                 *command], stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError:
            subprocess.run(["umount", str(IMAGE_ROOT / "proc")], check=False)
            raise

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        subprocess.run(["umount", str(IMAGE_ROOT / "proc")], check=False)
        return self.process.returncode


def processes_in_image() -> dict:
    """PID -> (uid, command) of every process whose root is the image's."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.readlink(proc / "root") == str(IMAGE_ROOT):
                uid = int((proc / "status").read_text().split("\nUid:")[1].split()[0])
                found[proc.name] = (uid, (proc / "cmdline").read_bytes().split(b"\0")[0].decode())
        except (OSError, IndexError):
            continue
    return found


def test_the_image_runs_the_sidecar_as_its_user_against_a_real_agent(image, real_consul_acl, tmp_path):
    """start.sh, the image's entrypoint, renders with the image's meshgen and starts the image's
    HAProxy as uid 10001: a caller an intention allows is let in and echoed, one without an
    intention is refused (ACLs on: default deny). On SIGTERM everything in the image stops."""
    agent = real_consul_acl
    suffix = "-" + uuid.uuid4().hex[:6]
    web, api, stranger = "web" + suffix, "api" + suffix, "stranger" + suffix
    echo, port = EchoServer(), free_port()
    register_sidecar(agent, web, port, echo.port)
    agent.set_intention(api, web, "allow")
    token_dir = IMAGE_ROOT / "run" / f"meshgen-test{suffix}"
    token_dir.mkdir(parents=True)
    uid, gid = (int(part) for part in image["user"].split(":"))
    policy = "\n".join([f'service "{web}-sidecar-proxy" {{ policy = "read" }}',
                        f'service "{web}" {{ policy = "write" }}', 'node_prefix "" { policy = "read" }'])
    (token_dir / "token").write_text(agent.create_token(policy))
    for path in (token_dir, token_dir / "token"):
        os.chown(path, uid, gid)
    (token_dir / "token").chmod(0o600)
    shutil.rmtree(IMAGE_ROOT / image["env"]["MESHGEN_OUT"].lstrip("/"), ignore_errors=True)
    container = InImage(image, image["entrypoint"], tmp_path / "container.log", MESHGEN_SERVICE_ID=web,
                        CONSUL_HTTP_ADDR=agent.url, CONSUL_HTTP_TOKEN_FILE=f"/run/{token_dir.name}/token",
                        MESHGEN_WAIT="5s")
    try:
        wait_listening(port, container.process, timeout=60)
        assert talk(port, Identity.from_agent(agent, tmp_path / "ids", api).context()) == b"ping\n"
        assert talk(port, Identity.from_agent(agent, tmp_path / "ids", stranger).context()) is None
        running = processes_in_image()
        haproxy = [uid_ for uid_, command in running.values() if command.endswith("haproxy")]
        assert haproxy and set(haproxy) == {uid}, running
        assert {uid_ for uid_, _ in running.values()} == {uid}, running
    finally:
        code = container.stop()
        echo.close()
        shutil.rmtree(token_dir, ignore_errors=True)
        agent.delete_intention(api, web)
        agent.deregister(web)
    log = container.log_path.read_text(errors="replace")
    assert code == 0, log
    assert processes_in_image() == {}, log
    assert "starting HAProxy" in log and "stopped" in log


def _rules(hcl: str) -> list[str]:
    return [line for line in (raw.split("#")[0].strip() for raw in hcl.splitlines()) if line]


def test_compose_gives_each_sidecar_the_measured_minimal_policy():
    """docker-compose.yml's sidecar tokens get the policy test_real_agent.py measures as enough
    on Consul 1.8.7 (www with its upstream redis; redis, which has none, without the upstream
    rule), and the agents' tokens are others."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    policies = ROOT / "docker" / "acl"
    measured = {"www": [r.format(service="www", upstream="redis") for r in MINIMAL_POLICY.values()],
                "redis": [r.format(service="redis", upstream="") for k, r in MINIMAL_POLICY.items()
                          if k != "upstream and its sidecars"]}
    for service, rules in measured.items():
        assert _rules((policies / f"{service}-sidecar.hcl").read_text()) == rules
        environment = compose["services"][service]["environment"]
        assert environment["CONSUL_HTTP_TOKEN"] == f"${{{service.upper()}_SIDECAR_TOKEN:?set it in .env}}"
        assert f"{service.upper()}_SIDECAR_TOKEN" not in environment["CONSUL_LOCAL_CONFIG"]
        assert f"-node={service} " in environment["MESHGEN_CONSUL_AGENT_ARGS"]
        assert f'node "{service}" {{ policy = "write" }}' in _rules((policies / f"{service}-agent.hcl").read_text())
