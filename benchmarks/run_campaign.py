#!/usr/bin/env python3
"""The hostile-input and fault campaign, rerun and summed up: runs the campaign's tests (the
same ones CI runs) and prints one table of what was tried, how many cases, and what held.

    python3 benchmarks/run_campaign.py [--scale 2] [--only fuzz_agent_answers ...]

--scale multiplies every part's case count (MESHGEN_CAMPAIGN_SCALE). A part whose test fails
is printed as FAILED, and the script exits 1.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PARTS = {
    "fuzz_agent_answers": "tests/test_fuzz_agent.py",
    "fuzz_client_certificates": "tests/test_fuzz_der_haproxy.py",
    "crash_consistency": "tests/test_atomic_write.py",
    "reloads_under_load": "tests/e2e/test_reload_campaign.py",
    "watch_faults": "tests/e2e/test_watch_faults.py",
}


def run_part(test: str, report: Path, scale: float) -> tuple[bool, float]:
    env = dict(os.environ, MESHGEN_CAMPAIGN_REPORT=str(report), MESHGEN_CAMPAIGN_SCALE=str(scale))
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stdout[-3000:], file=sys.stderr)
    return result.returncode == 0, time.monotonic() - start


def rows_for(part: str, records: list[dict]) -> list[tuple[str, str, str, str]]:
    """(what was tried, HAProxy, cases, what held) for each record of one part."""
    rows = []
    for r in records:
        if part == "fuzz_agent_answers" and "sweep" in r:
            rows.append(("every string field of every agent answer set to `-i`, then to `}` (a flag, the end of "
                         "a condition)", r["haproxy"], str(r["sweep"]),
                         f"{r['accepted']} accepted, {r['structure_findings']} of them changed haproxy.cfg's "
                         "structure; the rest refused or skipped in one line"))
        elif part == "fuzz_agent_answers":
            def total(how, kinds=("strings", "types", "pem")):
                return sum(r.get(f"{kind}_{how}", 0) for kind in kinds)
            rows.append(("hypothesis over every leaf and key of each agent answer (registration, health, roots, "
                         "leaf, intentions, authorize, discovery chain, prepared query): hostile strings (zone IDs, "
                         "line ends incl. U+2028/2029/0085, NUL, #, quotes, leading -, braces, %[, ${, a megabyte), "
                         "wrong types, damaged PEMs",
                         r["haproxy"], str(r["cases"]),
                         f"{total('rendered')} new bundles and {total('unchanged')} unchanged passed haproxy -c; "
                         f"{total('skipped')} cost an item (one skipped: line each); {total('refused')} refused "
                         f"with one line, DIR unchanged ({r['haproxy_c_rejections']} of them by haproxy -c); "
                         f"of {sum(r.get(f'strings_{h}', 0) for h in ('rendered', 'unchanged', 'skipped'))} "
                         f"accepted string cases, {r['structure_findings']} changed a file's structure"))
        elif part == "fuzz_client_certificates":
            rows.append(("hostile client certificates over mTLS (SANs, raw DER, size)", r["haproxy"],
                         str(r["cases"]),
                         f"{r['refused']} refused ({r['tls_refused']} by OpenSSL in the handshake, "
                         f"the rest by authorize.lua with a logged reason), {r['controls_in']} controls let in; "
                         f"{r['oversized']} over 16 KiB refused; no crash; worker RSS "
                         f"{r['rss_quarter_kib'] // 1024}->{r['rss_end_kib'] // 1024} MiB"))
        elif part == "crash_consistency":
            rows.append(("SIGKILL of meshgen render at random points, reader process", "-",
                         str(r["kills"]),
                         f"{r['killed_while_writing']} killed mid-write; {r['reads']} reads, "
                         f"{r['torn_or_mixed_reads']} torn or mixed"))
        elif part == "reloads_under_load":
            rows.append(("render + reload of both sidecars under PING load", r["haproxy"],
                         f"{r['cycles']} cycles",
                         f"{r['requests']} requests, {r['failed']} failed; old workers peak "
                         f"{r['peak_old_workers']}, {r['old_workers_after_hard_stop']} after "
                         f"hard-stop-after; master RSS {r['master_rss_growth_kib']:+d} KiB"))
        elif part == "watch_faults":
            faults = r["faults"]
            served = sum(f["served"] for f in faults)
            checks = sum(f["client_checks"] for f in faults)
            slowest = max(f["change_live_after_s"] for f in faults)
            rows.append(("agent faults during start.sh's --wait: " + ", ".join(f["fault"] for f in faults),
                         r["haproxy"], f"{len(faults)} faults",
                         f"live config unchanged during each; {served}/{checks} client checks served; "
                         f"next change live within {slowest} s; {r['wrapper_restarts']} wrapper restarts"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--only", nargs="*", choices=sorted(PARTS), default=sorted(PARTS, key=list(PARTS).index))
    args = parser.parse_args()
    table, failed = [], []
    with tempfile.TemporaryDirectory(prefix="meshgen-campaign-") as scratch:
        for part in args.only:
            report = Path(scratch) / f"{part}.jsonl"
            ok, seconds = run_part(PARTS[part], report, args.scale)
            records = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
            if not ok:
                failed.append(part)
                table.append((part, "-", "-", "FAILED"))
            table += rows_for(part, [r for r in records if r["part"] == part])
            print(f"{part}: {'passed' if ok else 'FAILED'} in {seconds:.0f} s", file=sys.stderr)
    print("| what was tried | HAProxy | cases | what held |")
    print("|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    print("\nSecrets: every part runs with a Consul token and ends with a scan: the token in no "
          "file of the output directory but the token file, in no log line (meshgen's stderr, "
          "start.sh's and HAProxy's logs) and, in every part but the agent-answer fuzz (in-process), "
          "in no process's argv; key files 0600. A leak fails the part.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
