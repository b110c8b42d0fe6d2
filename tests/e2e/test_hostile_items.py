"""One bad item costs only itself, on the double and on Consul 1.8.7 (which stores all of these
as they are): an instance with an address no grammar takes is left out, an intention whose
source names no caller meshgen could match is left out (such a caller is refused by
authorize.lua anyway), a chain whose route value HAProxy could misread refuses its upstream's
listener, and in the same run the CA roots and a revocation still go out."""
from __future__ import annotations

from harness import agent_env, free_port, load_seed, run_meshgen
from real_consul import RealAgent


def _decision(out, caller: str) -> str | None:
    for line in (out / "intentions.map").read_text().splitlines():
        if line.startswith(f"{caller} "):
            return line.split(" ", 1)[1].split("|", 1)[0]
    return None


def _servers(out, backend: str) -> list[str]:
    section = (out / "haproxy.cfg").read_text().split(f"\nbackend {backend}\n")[1].split("\n\n")[0]
    return [line.split()[2] for line in section.splitlines() if line.strip().startswith("server ")]


def _roots(out) -> str:
    return (out / "roots.pem").read_text()


def test_poisoned_items_cost_only_themselves_and_the_rest_still_goes_out(agent, tmp_path, any_haproxy):
    suffix = agent.suffix
    www, redis, billing, api = (name + suffix for name in ("www", "redis", "billing", "api"))
    load_seed(agent, suffix, sidecar_ports={"www": free_port(), "redis": free_port()})
    agent.update_service(f"{www}-sidecar-proxy", lambda s: s["Proxy"]["Upstreams"].append(
        {"DestinationName": billing, "LocalBindPort": free_port(), "DestinationType": "service"})) \
        if not isinstance(agent, RealAgent) else _add_billing_upstream(agent, www, billing)
    agent.set_intention(api, www, "allow")
    out = tmp_path / "out"
    args = ["render", "--sidecar-for", www, "--out", str(out), "--haproxy", any_haproxy]
    first = run_meshgen(*args, env=agent_env(agent))
    assert first.code == 3 and "skipped" not in first.stderr, first.stderr
    good_redis = _servers(out, f"upstream_{redis}")
    roots_before = _roots(out)
    # The poison, all at once ...
    if isinstance(agent, RealAgent):
        agent.register({"Kind": "connect-proxy", "ID": f"{redis}-bad-sidecar", "Name": f"{redis}-sidecar-proxy",
                        "Address": "10.0.0.1 backup", "Port": 21999, "Proxy": {"DestinationServiceName": redis}})
    else:
        agent.add_instance(redis, "10.0.0.1 backup", 21999)
    agent.set_intention("x\n    server evil 10.9.9.9:1", www, "allow")
    agent.set_config({"Kind": "service-defaults", "Name": billing, "Protocol": "http"})
    agent.set_config({"Kind": "service-router", "Name": billing, "Routes": [
        {"Match": {"HTTP": {"PathPrefix": "/it's"}}}]})
    # ... and in the same run, work that must still be done: new CA roots and a revocation.
    agent.rotate_root()
    agent.set_intention(api, www, "deny")
    try:
        run = run_meshgen(*args, env=agent_env(agent))
    finally:
        if isinstance(agent, RealAgent):
            agent.deregister(f"{redis}-bad-sidecar")
            agent.delete_intention("x\n    server evil 10.9.9.9:1", www)
            agent.delete_config("service-router", billing)
            agent.delete_config("service-defaults", billing)
    assert run.code == 3, run.stderr
    skipped = [line for line in run.stderr.splitlines() if ": skipped: " in line]
    assert len(skipped) == 3, run.stderr
    assert _decision(out, f"default/default/{api}") == "deny"               # the revocation went out
    assert _roots(out) != roots_before                                # and the new roots
    assert _servers(out, f"upstream_{redis}") == good_redis           # the bad instance alone is out
    assert _servers(out, f"upstream_{billing}") == []                 # its listener refuses
    assert "evil" not in (out / "haproxy.cfg").read_text() + (out / "intentions.map").read_text()


def _add_billing_upstream(agent: RealAgent, www: str, billing: str) -> None:
    registration = agent.call("GET", f"/v1/agent/service/{www}-sidecar-proxy").json()
    upstreams = registration["Proxy"]["Upstreams"] + [{"DestinationName": billing, "LocalBindPort": free_port(),
                                                       "DestinationType": "service"}]
    agent.register({"Kind": "connect-proxy", "ID": registration["ID"], "Name": registration["Service"],
                    "Address": registration["Address"], "Port": registration["Port"],
                    "Proxy": dict(registration["Proxy"], Upstreams=upstreams)})
