"""Crash consistency: `meshgen render` killed with SIGKILL at random points of its run,
hundreds of times, while another process keeps loading the bundle the way HAProxy does. Every
read finds one run's complete set, and the next run cleans up what the killed ones left."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509

import meshgen

from campaign_support import SECRET_TOKEN, argv_leaks, record, scaled, secret_leaks
from harness import ROOT, agent_env

KILLS = scaled(200)


def read_like_haproxy(out: Path):
    """haproxy.cfg through the stable name, then the files at the paths it pins."""
    config = (out / "haproxy.cfg").read_text()
    bundle = re.search(r"crt (\S+)/leaf\.pem", config).group(1)
    leaf = x509.load_pem_x509_certificate(Path(bundle, "leaf.pem").read_bytes())
    Path(bundle, "roots.pem").read_bytes()
    Path(bundle, "authorize.lua").read_bytes()
    maxconn = int(re.search(r"maxconn (\d+)", config).group(1))
    return maxconn, leaf.serial_number


# The reader runs in a process of its own, as HAProxy does: it reads until SIGTERM, then prints
# how often it saw each (maxconn, leaf serial) pair and every read that failed.
READER = """
import json, signal, sys
sys.path.insert(0, sys.argv[2])
from test_atomic_write import read_like_haproxy
from pathlib import Path
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
seen, errors = {}, []
while not stop:
    try:
        pair = read_like_haproxy(Path(sys.argv[1]))
    except Exception as err:
        errors.append(f"{type(err).__name__}: {err}")
        continue
    seen["%d %d" % pair] = seen.get("%d %d" % pair, 0) + 1
print(json.dumps({"seen": seen, "errors": errors[:20], "error_count": len(errors)}))
"""


def test_killed_renders_never_leave_a_mixed_or_partial_bundle(seeded_double, any_haproxy, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "meshgen.py"), "render", "--sidecar-for", "www",
               "--out", str(out), "--haproxy", any_haproxy]
    env = agent_env(seeded_double, CONSUL_HTTP_TOKEN=SECRET_TOKEN)
    generations = {}   # maxconn -> leaf serial: what one complete run of that generation holds

    def next_generation(n: int) -> None:
        seeded_double.update_service("www-sidecar-proxy",
                                     lambda s: s["Proxy"]["Config"].update(max_inbound_connections=n))
        seeded_double.renew_leaf("www")
        generations[n] = seeded_double.leaves["www"]["_serial"]

    next_generation(1)
    assert subprocess.run(command, env=env, capture_output=True).returncode == 3
    reader = subprocess.Popen([sys.executable, "-c", READER, str(out), str(ROOT / "tests")],
                              stdout=subprocess.PIPE, text=True)
    # How long a run that writes takes with the reader busy beside it: the kills aim inside it.
    durations = []
    for timing_generation in (10001, 10002, 10003):
        next_generation(timing_generation)
        start = time.monotonic()
        subprocess.run(command, env=env, check=False, capture_output=True)
        durations.append(time.monotonic() - start)
    full_run = sorted(durations)[1]
    rng = random.Random(2026)
    killed_after_writing, leaks = 0, []
    try:
        for n in range(2, KILLS + 2):
            next_generation(n)
            before = read_like_haproxy(out)
            entries_before = set(out.iterdir())
            process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.5, 1.05) * full_run)
            leaks += argv_leaks()
            process.send_signal(signal.SIGKILL)
            process.wait()
            after = read_like_haproxy(out)
            assert after in (before, (n, generations[n]))
            started_writing = bool(set(out.iterdir()) - entries_before) or after != before
            killed_after_writing += started_writing and process.returncode == -signal.SIGKILL
    finally:
        reader.send_signal(signal.SIGTERM)
        report = json.loads(reader.communicate(timeout=30)[0])
    assert report["error_count"] == 0, report["errors"]
    pairs = {tuple(map(int, pair.split())): n for pair, n in report["seen"].items()}
    mixed = {pair: n for pair, n in pairs.items() if generations.get(pair[0]) != pair[1]}
    assert mixed == {}
    reads = sum(pairs.values())
    assert reads > KILLS
    # The kills must have landed inside the write for the test to mean anything.
    assert killed_after_writing >= KILLS // 6
    final = subprocess.run(command, env=env, capture_output=True, text=True)
    assert final.returncode in (0, 3), final.stderr
    assert read_like_haproxy(out) == (KILLS + 1, generations[KILLS + 1])
    assert not [p for p in out.iterdir() if p.name.startswith(meshgen.STAGE_PREFIX)]
    # Kept: the live bundle, the one before it (a reload may be reading it), and the one HAProxy
    # was last loaded on (its Lua script reads the token file there); nothing a killed run left.
    kept = {p.name for p in out.iterdir() if p.name.startswith(meshgen.BUNDLE_PREFIX)}
    loaded = json.loads((out / meshgen.STATE_FILE).read_text())["loaded_bundle"]
    assert len(kept) <= 3 and {os.readlink(out / meshgen.LIVE), loaded} <= kept, (kept, loaded)
    assert leaks + secret_leaks(out, final.stderr) == []
    record("crash_consistency", kills=KILLS, killed_while_writing=killed_after_writing,
           reads=reads, torn_or_mixed_reads=report["error_count"] + len(mixed),
           distinct_generations_read=len(pairs))
