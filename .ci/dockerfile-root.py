#!/usr/bin/env python3
"""Builds the file system the Dockerfile's image would have, without a Docker engine: the base
image's Debian suite by debootstrap, then the Dockerfile's own steps (ARG, ENV, RUN, COPY, USER,
ENTRYPOINT) performed in a chroot of it, in order. What it builds is what the Dockerfile says,
not a copy of its steps kept here:

    .ci/dockerfile-root.py [--build-arg NAME=VALUE]... [--stage NAME=DIR]... DOCKERFILE ROOT

The context is the Dockerfile's directory. `COPY --from=NAME` copies from DIR, a directory
standing in for that stage's image (there is no registry to pull it from); a stage not given is
an error. The Debian base is kept in ROOT.base, built once; ROOT is rebuilt only when the
Dockerfile, its build arguments, a stage or a file it copies changed. ROOT/.image.json records
what `docker run` would use: the user (uid:gid), the environment and the entrypoint. Needs
root, debootstrap and the network to the Debian archive and PyPI, as `docker build` would."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each step, continuation lines joined, comments dropped."""
    steps, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        keyword, _, rest = text.partition(" ")
        steps.append((keyword.upper(), rest.strip()))
    return steps


def final_stage(steps: list) -> tuple[str, list]:
    """The image the last FROM names, and the steps after it."""
    last = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last][1].split()[0], steps[last + 1:]


def debian_suite(image: str) -> str:
    match = re.fullmatch(r"(?:docker\.io/)?(?:library/)?debian:([a-z]+)(?:-slim)?", image)
    if match is None:
        raise SystemExit(f"dockerfile-root: FROM {image}: only Debian images (debian:SUITE[-slim]) are built here")
    return match[1]


def debian_archive() -> str:
    sources = ""
    for path in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        if path.is_file():
            sources += path.read_text() + "\n"
    match = re.search(r"^URIs: *(http\S*debian)/*$", sources, re.M) or \
        re.search(r"^deb (?:\[[^]]*\] )?(http\S*debian)/* ", sources, re.M)
    if match is None:
        raise SystemExit("dockerfile-root: no Debian archive in this machine's apt sources")
    return match[1]


def build_base(suite: str, base: Path) -> None:
    if (base / ".debootstrap-done").is_file():
        return
    shutil.rmtree(base, ignore_errors=True)
    subprocess.run(["debootstrap", "--variant=minbase", suite, str(base), debian_archive()], check=True,
                   stdout=subprocess.DEVNULL)
    (base / ".debootstrap-done").write_text(suite + "\n")


def copy_sources(arguments: str) -> tuple[dict, list, str]:
    """COPY's flags, sources and destination."""
    words = shlex.split(arguments)
    flags = dict(word[2:].split("=", 1) for word in words if word.startswith("--"))
    rest = [word for word in words if not word.startswith("--")]
    return flags, rest[:-1], rest[-1]


def digest(dockerfile: Path, build_args: dict, stages: dict, steps: list) -> str:
    """Of everything the image is made from: this script, the Dockerfile, its arguments, each
    copied file."""
    hashed = hashlib.sha256(Path(__file__).read_bytes() + dockerfile.read_bytes()
                            + json.dumps([build_args, sorted(stages.items())]).encode())
    for keyword, arguments in steps:
        if keyword != "COPY":
            continue
        flags, sources, _ = copy_sources(arguments)
        base = Path(stages[flags["from"]]) if "from" in flags else dockerfile.parent
        for source in sources:
            path = base / source.lstrip("/")
            for file in sorted([path] if path.is_file() else path.rglob("*")):
                if file.is_file() and "__pycache__" not in file.parts:
                    hashed.update(str(file.relative_to(base)).encode() + b"\0" + file.read_bytes())
    return hashed.hexdigest()


class Chroot:
    """The image's root with /proc mounted and the host's resolver, as `docker build` gives a
    step; ARG and ENV values in each step's environment."""

    HOST_CA = "/run/build-host-ca.crt"

    def __init__(self, root: Path):
        self.root, self.env, self.user = root, {"PATH": DEFAULT_PATH, "HOME": "/root"}, "0:0"
        # The build host's way to the registries, as `docker build` passes proxy variables to
        # its steps: its proxy settings, and the CAs it trusts (for pip; a host behind a
        # TLS-inspecting proxy trusts one more). In the steps' environment, never the image's.
        self.build_env = {k: v for k, v in os.environ.items()
                          if k.lower() in ("http_proxy", "https_proxy", "no_proxy")}

    def __enter__(self):
        subprocess.run(["mount", "-t", "proc", "proc", str(self.root / "proc")], check=True)
        resolv = self.root / "etc/resolv.conf"
        if resolv.is_symlink():
            resolv.unlink()
        shutil.copy("/etc/resolv.conf", resolv)
        if Path("/etc/ssl/certs/ca-certificates.crt").is_file():
            shutil.copy("/etc/ssl/certs/ca-certificates.crt", self.root / self.HOST_CA.lstrip("/"))
            self.build_env["PIP_CERT"] = self.HOST_CA
        return self

    def __exit__(self, *_):
        (self.root / self.HOST_CA.lstrip("/")).unlink(missing_ok=True)
        subprocess.run(["umount", str(self.root / "proc")], check=False)

    def run(self, command: str) -> None:
        environment = {**self.build_env, **self.env}
        subprocess.run(["chroot", f"--userspec={self.user}", str(self.root), "/usr/bin/env", "-i",
                        *(f"{k}={v}" for k, v in environment.items()), "/bin/sh", "-c", command], check=True)

    def resolve_user(self, spec: str) -> str:
        """uid:gid of USER's name or number, from the image's own /etc/passwd."""
        name = spec.split(":")[0]
        for line in (self.root / "etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if name in (fields[0], fields[2]):
                return f"{fields[2]}:{fields[3]}"
        raise SystemExit(f"dockerfile-root: USER {spec}: no such user in the image")

    def home(self) -> str:
        uid = self.user.split(":")[0]
        for line in (self.root / "etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[2] == uid:
                return fields[5]
        return "/"

    def copy(self, arguments: str, context: Path, stages: dict) -> None:
        flags, sources, destination = copy_sources(arguments)
        base = Path(stages[flags["from"]]) if "from" in flags else context
        target = self.root / destination.lstrip("/")
        for source in sources:
            path = base / source.lstrip("/")
            if path.is_dir():
                shutil.copytree(path, target, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__"))
                continue
            into = target / path.name if destination.endswith("/") or target.is_dir() else target
            into.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, into)
            if "chmod" in flags:
                os.chmod(into, int(flags["chmod"], 8))


def substitute(text: str, values: dict) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m[1] or m[2], ""), text)


def build(dockerfile: Path, root: Path, build_args: dict, stages: dict) -> None:
    steps = instructions(dockerfile)
    stage_names = {words[-1]: words[0] for words in (s[1].split() for s in steps if s[0] == "FROM")
                   if len(words) == 3 and words[1].upper() == "AS"}
    image, steps = final_stage(steps)
    for keyword, arguments in steps:
        stage = copy_sources(arguments)[0].get("from") if keyword == "COPY" else None
        if stage is not None and stage not in stages:
            raise SystemExit(f"dockerfile-root: COPY --from={stage} ({stage_names.get(stage, stage)}): "
                             f"give --stage {stage}=DIR")
    wanted = digest(dockerfile, build_args, stages, steps)
    marker = root / ".image.json"
    if marker.is_file() and json.loads(marker.read_text()).get("digest") == wanted:
        return
    base = root.with_name(root.name + ".base")
    build_base(debian_suite(image), base)
    # A run killed before its cleanup may have left /proc mounted there: never delete into it.
    subprocess.run(["umount", str(root / "proc")], stderr=subprocess.DEVNULL, check=False)
    shutil.rmtree(root, ignore_errors=True)
    subprocess.run(["cp", "-a", str(base), str(root)], check=True)
    entrypoint: list = []
    with Chroot(root) as chroot:
        for keyword, arguments in steps:
            if keyword == "ARG":
                name, _, default = arguments.partition("=")
                chroot.env[name] = build_args.get(name, default.strip('"'))
            elif keyword == "ENV":
                for word in shlex.split(arguments):
                    name, _, value = word.partition("=")
                    chroot.env[name] = substitute(value, chroot.env)
            elif keyword == "RUN":
                chroot.run(arguments)
            elif keyword == "COPY":
                chroot.copy(arguments, dockerfile.parent, stages)
            elif keyword == "USER":
                chroot.user = chroot.resolve_user(substitute(arguments, chroot.env))
            elif keyword == "ENTRYPOINT":
                entrypoint = json.loads(arguments)
            else:
                raise SystemExit(f"dockerfile-root: {keyword} is not an instruction this script performs")
    # ARG values are the build's only: a container sees ENV alone, and HOME as its user's.
    hidden = {a.partition("=")[0] for k, a in steps if k == "ARG"} | {"HOME"}
    marker.write_text(json.dumps({
        "digest": wanted, "user": chroot.user, "home": chroot.home(), "entrypoint": entrypoint,
        "env": {k: v for k, v in chroot.env.items() if k not in hidden}}, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dockerfile", type=Path)
    parser.add_argument("root", type=Path)
    parser.add_argument("--build-arg", action="append", default=[])
    parser.add_argument("--stage", action="append", default=[])
    options = parser.parse_args()
    started = time.monotonic()
    build(options.dockerfile.resolve(), options.root.resolve(),
          dict(a.split("=", 1) for a in options.build_arg), dict(s.split("=", 1) for s in options.stage))
    print(f"dockerfile-root: {options.root} ready in {time.monotonic() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
