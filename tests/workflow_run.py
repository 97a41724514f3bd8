"""Running this checkout's workflow from tests, and the outputs that must repeat exactly across runs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def snakemake(*args: str, timeout: int = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run this checkout's workflow with the test's interpreter on PATH (SQLite tracking unless ``env`` says)."""
    full = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    full.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([str(BIN / "snakemake"), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=full | (env or {}))


# What a second run of the `.test` DAG repeats: every model, the vanilla samples, a decode cell of each
# kind (LANTERN's drift on eagle, CASCADE's probed drift on eagle-rw2) and a CSpD cell. The rest of
# the DAG is more cells of the same jobs and reductions over their outputs.
REPEATED_TARGETS = (
    *(f"metrics/{name}.json" for name in ("tokenizer", "target", "judge", "drafter-eagle", "drafter-eagle3",
                                           "drafter-eagle-rw2", "autoencoder", "continuous_target", "continuous_draft")),
    "samples/vanilla/seed0/grid.png",
    "decode/tree~chain-2/drafter~eagle/method~lantern/setting~default/seed0/stats.json",
    "decode/tree~chain-2/drafter~eagle-rw2/method~cascade/setting~default/seed0/stats.json",
    "continuous/decode/cspd-g2-p0.15-t1/seed0/stats.json",
)


def run_ci_workflow(results: Path, env: dict[str, str] | None = None,
                    targets: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The `.test` DAG into ``results`` on 2 cores: all of it, or what ``targets`` (paths under ``results``) need."""
    return snakemake("--configfile", ".test/config.yaml", "--config", f"results={results}", "--cores", "2",
                     *(str(results / t) for t in targets), timeout=1200, env=env)


def _npz_digest(path: Path) -> str:
    with np.load(path) as data:
        h = hashlib.sha256()
        for key in sorted(data.files):
            h.update(key.encode() + data[key].tobytes())
        return h.hexdigest()


def reproducible_outputs(results: Path) -> dict[str, str]:
    """Every trained model's checkpoint hash and a digest of every decoded token (or latent) file, by path."""
    out = {str(p.relative_to(results)): json.loads(p.read_text())["checkpoint_hash"]
           for p in sorted((results / "metrics").glob("*.json")) if "checkpoint_hash" in json.loads(p.read_text())}
    for pattern in ("data/tokens.npz", "samples/**/tokens.npz", "decode/**/tokens.npz", "continuous/decode/**/images.npz"):
        out |= {str(p.relative_to(results)): _npz_digest(p) for p in sorted(results.glob(pattern))}
    return out
