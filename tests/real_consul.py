"""Real Consul agents for the tests: the Consul install-deps.sh puts in .deps/ (Debian's 1.8.7),
started on loopback, and driven through its HTTP API with the same calls the tests make on the
double. Where 1.8.7 differs from the current Consul the double models, the tests say so
(docs/consul-reference.md, "Differences measured on 1.8.7")."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from harness import ROOT, free_port


def consul_binary() -> str | None:
    installed = ROOT / ".deps" / "consul-bullseye" / "consul"
    if os.access(installed, os.X_OK):
        return str(installed)
    return shutil.which("consul")


def consul_version(binary: str) -> str:
    output = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=10).stdout
    match = re.search(r"Consul v(\S+)", output)
    return match.group(1) if match else "unknown"


class ConsulProcess:
    """One `consul agent` on loopback ports of its own: a dev agent (server and client in one,
    state in memory), or with dev=False a server with its data on disk (server=True) or a client
    agent; `join` names the serf address of an agent to join; `limits`, the agent's `limits` block
    (such as a low http_max_conns_per_client)."""

    def __init__(self, binary: str, *, acl_master_token: str | None = None, bind: str = "127.0.0.1",
                 server: bool = True, join: str | None = None, dev: bool = True, limits: dict | None = None):
        self.binary, self.bind, self.token, self.limits = binary, bind, acl_master_token, limits
        self.server, self.join, self.dev = server, join, dev
        self.ports = {name: free_port() for name in ("http", "serf_lan", "serf_wan", "server")}
        self.url = f"http://{bind}:{self.ports['http']}"
        self.serf_lan = f"{bind}:{self.ports['serf_lan']}"
        self.data_dir = Path(tempfile.mkdtemp(prefix="meshgen-consul-"))
        self.log_path = self.data_dir / "consul.log"
        self.process: subprocess.Popen | None = None

    def _command(self) -> list[str]:
        hcl = {"ports": {"http": self.ports["http"], "serf_lan": self.ports["serf_lan"],
                         "serf_wan": self.ports["serf_wan"], "server": self.ports["server"],
                         "dns": -1, "grpc": -1}}
        if self.limits:
            hcl["limits"] = self.limits
        if self.token:
            hcl["acl"] = {"enabled": True, "default_policy": "deny", "down_policy": "extend-cache",
                          "tokens": {"master": self.token, "agent": self.token}}
        command = [self.binary, "agent", "-bind", self.bind, "-client", self.bind,
                   "-node", f"node-{self.bind}-{self.ports['http']}", "-log-level", "warn"]
        if self.dev:
            command.append("-dev")
        else:
            command += ["-data-dir", str(self.data_dir / "data")]
            hcl["connect"] = {"enabled": True}
            if self.server:
                command += ["-server", "-bootstrap-expect", "1"]
        if self.join:
            command += ["-retry-join", self.join]
        # The configuration in a file, not in argv: it holds the master token.
        config = self.data_dir / "agent.json"
        config.touch(mode=0o600)
        config.write_text(json.dumps(hcl))
        return command + ["-config-file", str(config)]

    def start(self, timeout: float = 30.0) -> "ConsulProcess":
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self._command(), stdout=self._log, stderr=subprocess.STDOUT)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Until the agent signs leaves: its CA has roots and a leaf can be had."""
        headers = {"X-Consul-Token": self.token} if self.token else {}
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"consul exited with {self.process.returncode}:\n{self.log()[-2000:]}")
            try:
                roots = requests.get(self.url + "/v1/agent/connect/ca/roots", headers=headers, timeout=2)
                leaf = requests.get(self.url + "/v1/agent/connect/ca/leaf/meshgen-ready", headers=headers,
                                    timeout=5)
                if roots.ok and roots.json().get("Roots") and leaf.ok:
                    return
            except (requests.RequestException, ValueError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"consul not ready after {timeout}s:\n{self.log()[-2000:]}")
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process:
            self._log.close()

    def kill(self) -> None:
        """As a crash: no leave, no goodbye."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
            self._log.close()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


class RealAgent:
    """A real agent, through the HTTP API calls the tests make of the double."""

    def __init__(self, url: str, token: str | None = None, suffix: str = ""):
        self.url, self.token, self.suffix = url, token, suffix

    def request(self, method: str, path: str, token: str | None = None, **kwargs) -> requests.Response:
        token = token or self.token
        headers = {"X-Consul-Token": token} if token else {}
        return requests.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def call(self, method: str, path: str, token: str | None = None, **kwargs) -> requests.Response:
        response = self.request(method, path, token, **kwargs)
        response.raise_for_status()
        return response

    def call_status(self, method: str, path: str, token: str | None = None, **kwargs) -> int:
        """The status code alone, refusals included."""
        return self.request(method, path, token, **kwargs).status_code

    def register(self, definition: dict) -> str:
        service = definition.get("service", definition)
        self.call("PUT", "/v1/agent/service/register", json=service)
        return service.get("id") or service.get("ID") or service.get("name") or service["Name"]

    def deregister(self, service_id: str) -> None:
        """1.8.7 removes an app's sidecar with the app: a sidecar gone already is no error."""
        try:
            self.call("PUT", f"/v1/agent/service/deregister/{service_id}")
        except requests.HTTPError as err:
            if err.response.status_code != 404:
                raise

    def set_intention(self, source: str, destination: str, action: str) -> None:
        """Through the intentions API every version has (1.8 has no /intentions/exact)."""
        body = {"SourceName": source, "DestinationName": destination, "Action": action,
                "SourceType": "consul"}
        for intention in self.call("GET", "/v1/connect/intentions").json() or []:
            if (intention["SourceName"], intention["DestinationName"]) == (source, destination):
                self.call("PUT", f"/v1/connect/intentions/{intention['ID']}", json=body)
                return
        self.call("POST", "/v1/connect/intentions", json=body)

    def delete_intention(self, source: str, destination: str) -> None:
        for intention in self.call("GET", "/v1/connect/intentions").json() or []:
            if (intention["SourceName"], intention["DestinationName"]) == (source, destination):
                self.call("DELETE", f"/v1/connect/intentions/{intention['ID']}")

    def create_token(self, rules: str, secret: str | None = None) -> str:
        """A token of a policy of these rules (ACL agents), with `secret` as its SecretID if
        given: its SecretID."""
        policy = self.call("PUT", "/v1/acl/policy", json={
            "Name": f"meshgen-test-{time.monotonic_ns()}", "Rules": rules}).json()
        token = {"Policies": [{"ID": policy["ID"]}], **({"SecretID": secret} if secret else {})}
        return self.call("PUT", "/v1/acl/token", json=token).json()["SecretID"]

    def delete_token(self, secret: str) -> None:
        accessor = self.call("GET", "/v1/acl/token/self", token=secret).json()["AccessorID"]
        self.call("DELETE", f"/v1/acl/token/{accessor}")

    def set_config(self, entry: dict) -> None:
        """A config entry written as an operator writes it (`PUT /v1/config`)."""
        self.call("PUT", "/v1/config", json=entry)

    def delete_config(self, kind: str, name: str) -> None:
        self.call("DELETE", f"/v1/config/{kind}/{name}")

    def leaf(self, service: str) -> dict:
        return self.call("GET", f"/v1/agent/connect/ca/leaf/{service}").json()

    def roots(self) -> dict:
        return self.call("GET", "/v1/agent/connect/ca/roots").json()

    def rotate_root(self) -> None:
        """A CA rotation as an operator starts one: a new private key for the built-in CA. The
        new root is listed at once beside the old one; leaves follow later (about 20 s on 1.8.7)."""
        key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()).decode()
        self.call("PUT", "/v1/connect/ca/configuration", json={"Provider": "consul", "Config": {"PrivateKey": key}})

    def stop(self) -> None:
        pass
