"""The hostile-input and fault campaign's shared parts: how big a run is, where its figures go,
and the secret scan every part of it ends with.

CI runs each part at the size its issue asks for. benchmarks/run_campaign.py runs them again,
optionally bigger (MESHGEN_CAMPAIGN_SCALE), and prints the figures each part recorded."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from harness import describe_haproxy
from meshgen import SECRET_FILES

# A token no real agent would hand out: any sighting of it on disk or in a log is a leak.
SECRET_TOKEN = "c0ffee00-5ec2-e7ab-1e55-70ce4e9a11ed"


def scaled(count: int) -> int:
    """`count`, times MESHGEN_CAMPAIGN_SCALE when the campaign script asks for a longer run."""
    return max(1, round(count * float(os.environ.get("MESHGEN_CAMPAIGN_SCALE", "1"))))


def haproxy_version(binary: str) -> str:
    """`2.6.12`, as `haproxy -vv` reports it, to label figures by the build that produced them."""
    build = describe_haproxy(binary)
    return build.version if build else Path(binary).name


def record(part: str, **figures) -> None:
    """Append one part's figures to the report the campaign script prints; a no-op under plain
    pytest."""
    report = os.environ.get("MESHGEN_CAMPAIGN_REPORT")
    if report:
        with open(report, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"part": part, **figures}) + "\n")


def secret_leaks(out_dir: Path, *texts: str, token: str = SECRET_TOKEN) -> list[str]:
    """Where the token shows up, and key files that are not 0600: every file under the output
    directory, and the given texts (logs, stderr, argv)."""
    leaks = []
    needle = token.encode()
    for path in sorted(out_dir.rglob("*")) if out_dir.exists() else []:
        if path.is_symlink() or not path.is_file():
            continue
        if path.name in SECRET_FILES and stat.S_IMODE(path.stat().st_mode) != 0o600:
            leaks.append(f"{path}: mode {stat.S_IMODE(path.stat().st_mode):o}, want 600")
        if needle in path.read_bytes():
            leaks.append(f"{path}: holds the token")
    leaks += [f"text {i}: holds the token" for i, text in enumerate(texts) if token in text]
    return leaks


def argv_leaks(token: str = SECRET_TOKEN) -> list[str]:
    """Processes on this machine whose command line holds the token."""
    leaks = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if token.encode() in cmdline.read_bytes():
                leaks.append(f"pid {cmdline.parent.name}: {cmdline.read_bytes()[:120]!r}")
        except OSError:
            continue
    return leaks
