"""Many sidecars on one agent, as on a busy node: registering them and their upstreams' instances,
and counting the connections a process holds to the agent (from the agent's side of the socket
table, as `ss` lists them)."""
from __future__ import annotations

import subprocess
import time


def register_instance(agent, service: str, port: int, instance: str = "1") -> str:
    """A sidecar instance of `service` elsewhere in the mesh, with a passing TTL check (as a
    sidecar's health is checked): its ID."""
    proxy_id = f"{service}-sidecar-proxy-{instance}"
    agent.register({"ID": proxy_id, "Name": f"{service}-sidecar-proxy", "Kind": "connect-proxy",
                    "Address": "127.0.0.1", "Port": port, "Proxy": {"DestinationServiceName": service},
                    "Check": {"TTL": "3600s", "Status": "passing"}})
    return proxy_id


def register_app(agent, name: str, public_port: int, upstreams: list[str], first_bind_port: int) -> str:
    """An app and its sidecar with these upstreams, each on its own local port: the app's ID."""
    agent.register({"service": {"name": name, "id": name, "port": 1, "address": "127.0.0.1", "connect": {
        "sidecar_service": {"port": public_port, "proxy": {"upstreams": [
            {"destination_name": upstream, "local_bind_port": first_bind_port + i}
            for i, upstream in enumerate(upstreams)]}}}}})
    return name


def agent_connections(pid: int, agent_port: int) -> int:
    """The established TCP connections process `pid` holds to the agent's port."""
    lines = subprocess.run(["ss", "-tnpH", "state", "established", f"( dport = :{agent_port} )"],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    return sum(f"pid={pid}," in line for line in lines)


def most_connections(pid: int, agent_port: int, seconds: float, step: float = 0.1) -> int:
    """The most connections `pid` held to the agent at any look over `seconds`."""
    most, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        most = max(most, agent_connections(pid, agent_port))
        time.sleep(step)
    return most
