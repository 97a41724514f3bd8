"""The locked environment and run provenance: what the lock pins, what is installed, which commit ran.

The lock is ``requirements.lock`` (every dependency but torch, with hashes; made by ``uv pip
compile``, see ``tools/refresh-lock``) plus ``requirements-torch.txt`` (the one torch pin, kept out of
the hashed lock so that a CUDA build of the same release can replace the CPU wheel). Both sit at
the top of the checkout. ``python -m cascade_sd.provenance`` writes the files derived from the
lock (``environment.yml``, the overlay that tests the lowest supported transformers).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from cascade_sd.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
LOCK = "requirements.lock"
TORCH_PIN = "requirements-torch.txt"
# Installed but never pinned: the installers themselves and this package.
_UNPINNED = {"pip", "cascade-sd"}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)")
_HASH = re.compile(r"--hash=(sha256:[0-9a-f]{64})")


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def public_version(version: str) -> str:
    """The release without a local label (``2.13.0+cpu`` → ``2.13.0``): the build variant is not a mismatch."""
    return version.split("+", 1)[0]


@dataclass(frozen=True)
class Pin:
    """One locked requirement: exact version and the hashes pip must see."""

    name: str
    version: str
    hashes: tuple[str, ...] = ()

    def requirement(self) -> str:
        """The pin as a requirements line (hashes on continuation lines)."""
        return " \\\n    ".join([f"{self.name}=={self.version}", *(f"--hash={h}" for h in self.hashes)])


def read_lock(path: str | Path) -> dict[str, Pin]:
    """Pins of a requirements file of ``name==version`` lines (hashes and comments allowed), by normalised name."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"lock file {path} not found; it lives at the top of a cascade-sd checkout")
    # Join backslash continuations so that each requirement and its hashes are one logical line.
    logical = re.sub(r"\\\n", " ", path.read_text()).splitlines()
    pins: dict[str, Pin] = {}
    for line in logical:
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        m = _PIN.match(text)
        if m is None:
            raise DataError(f"lock file {path}: {text.split()[0]!r} is not a name==version pin")
        pins[normalize(m.group(1))] = Pin(normalize(m.group(1)), m.group(3), tuple(_HASH.findall(text)))
    return pins


def locked(root: Path = ROOT) -> dict[str, Pin]:
    """Every pin of the environment: the lock plus the torch pin."""
    return read_lock(root / LOCK) | read_lock(root / TORCH_PIN)


def lock_sha256(root: Path = ROOT) -> str:
    """SHA-256 over the lock and the torch pin (the identity of the environment a run was meant to use)."""
    h = hashlib.sha256()
    for name in (LOCK, TORCH_PIN):
        h.update(name.encode() + b"\0" + (root / name).read_bytes())
    return h.hexdigest()


def installed() -> dict[str, str]:
    """Installed distributions of this interpreter: normalised name → version (first on sys.path wins)."""
    out: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(normalize(name), dist.version)
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class Mismatch:
    """A locked package that is missing or installed at another release."""

    name: str
    locked: str
    installed: str | None


def compare(pins: dict[str, Pin], have: dict[str, str]) -> tuple[list[Mismatch], list[str]]:
    """(mismatches, installed packages the lock does not pin); local build labels are not mismatches."""
    bad = [Mismatch(n, p.version, have.get(n)) for n, p in sorted(pins.items())
           if n not in have or public_version(have[n]) != public_version(p.version)]
    extra = sorted(n for n in have if n not in pins and n not in _UNPINNED)
    return bad, extra


def git_state(root: Path = ROOT) -> tuple[str, bool | None]:
    """(commit, dirty) of the checkout the package runs from; ("unknown", None) outside git.

    Dirty means tracked changes or untracked files that git does not ignore."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)

    try:
        sha = git("rev-parse", "HEAD")
        if sha.returncode != 0:
            return "unknown", None
        return sha.stdout.strip(), bool(git("status", "--porcelain").stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def run_provenance(root: Path = ROOT) -> tuple[dict[str, str], str]:
    """MLflow tags (commit, dirty, lock hash, whether the environment matches it) and the package list text."""
    commit, dirty = git_state(root)
    have = installed()
    tags = {"git.commit": commit, "git.dirty": "unknown" if dirty is None else str(dirty).lower()}
    try:
        bad, _ = compare(locked(root), have)
        tags |= {"lock.sha256": lock_sha256(root), "lock.matches": str(not bad).lower(),
                 "lock.mismatches": str(len(bad))}
    except (DataError, OSError):
        tags |= {"lock.sha256": "not found", "lock.matches": "unknown"}
    return tags, "".join(f"{n}=={v}\n" for n, v in have.items())


def overlay(lowest: dict[str, Pin], main: dict[str, Pin]) -> str:
    """Requirements (with hashes) of the pins of ``lowest`` that ``main`` lacks or pins differently."""
    lines = [p.requirement() for n, p in sorted(lowest.items()) if n not in main or main[n].version != p.version]
    return "".join(line + "\n" for line in lines)


def environment_yml(pins: dict[str, Pin]) -> str:
    """A conda environment with exactly the locked pins (torch included, no hashes: conda's pip runs once)."""
    head = ("# Generated from requirements.lock and requirements-torch.txt by `python -m cascade_sd.provenance\n"
            "# environment-yml` (tools/refresh-lock runs it); do not edit by hand.\n"
            "# torch: the CPU build from PyTorch's CPU index; on a GPU machine install the CUDA build of the\n"
            "# same release first, which then satisfies the pin (README).\n"
            "name: cascade-sd\nchannels:\n  - conda-forge\ndependencies:\n  - python=3.11\n  - pip\n  - pip:\n"
            "      - --extra-index-url https://download.pytorch.org/whl/cpu\n")
    body = "".join(f"      - {p.name}=={p.version}\n" for _, p in sorted(pins.items()))
    return head + body + "      - -e .\n"


def main(argv: list[str] | None = None) -> None:
    """``environment-yml`` (print environment.yml) or ``overlay LOWEST MAIN`` (print the overlay requirements)."""
    ap = argparse.ArgumentParser(prog="python -m cascade_sd.provenance")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("environment-yml")
    ov = sub.add_parser("overlay")
    ov.add_argument("lowest")
    ov.add_argument("main")
    args = ap.parse_args(argv)
    if args.cmd == "environment-yml":
        sys.stdout.write(environment_yml(locked()))
    else:
        sys.stdout.write(overlay(read_lock(args.lowest), read_lock(args.main)))


if __name__ == "__main__":
    main()
