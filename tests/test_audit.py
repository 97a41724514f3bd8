"""`cascade-sd audit` (issue 5 item 6): a deliberately wrong bound fails, a correct one passes."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import numpy as np
import pytest
from typer.testing import CliRunner

from cascade_sd import api
from cascade_sd.acceptance import register
from cascade_sd.acceptance.coolsd import CoolSDRule
from cascade_sd.acceptance.registry import RULES
from cascade_sd.cli import app
from cascade_sd.io import atomic_savez, atomic_write_json

BUNDLE = "toy:vocab=16,len=6,seed=0"


class _UnderstatedCoolSD(CoolSDRule):
    """COOL-SD claiming a tenth of its true per-node bound: a wrong declaration."""

    name = "understated_coolsd"

    def tv_bound(self, p, q, ctx, *, sampled=True):
        return super().tv_bound(p, q, ctx, sampled=sampled) / 10


@pytest.fixture
def understated():
    register(_UnderstatedCoolSD)
    yield
    RULES.pop("understated_coolsd")


def write_run(folder, method: str, **params) -> None:
    res = api.decode(api.load_bundle(BUNDLE), [0, 1, 0, 1], method=method, tree="chain-3", seed=2, cfg_scale=2.0,
                     record_drift=True, **params)
    atomic_savez(folder / "drift.npz", **res.arrays)
    atomic_write_json(folder / "stats.json", res.stats)


def test_audit_passes_a_correct_bound_and_fails_a_wrong_one(tmp_path, understated):
    runner = CliRunner()
    write_run(tmp_path / "good", "coolsd", delta=4.0)
    ok = runner.invoke(app, ["audit", str(tmp_path / "good")])
    assert ok.exit_code == 0, ok.output
    assert "within bound" in ok.output
    write_run(tmp_path / "bad", "understated_coolsd", delta=4.0)
    bad = runner.invoke(app, ["audit", str(tmp_path)])
    assert bad.exit_code == 1
    assert "violated" in bad.output and "within bound" in bad.output
    summary = json.loads((tmp_path / "audit.json").read_text())
    assert {s["verdict"] for s in summary} == {"violated", "within bound"}


def test_audit_reads_and_logs_an_mlflow_run(tmp_path):
    run_dir = tmp_path / "out"
    write_run(run_dir, "coolsd", delta=2.0)
    (tmp_path / "mlflow").mkdir(exist_ok=True)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    experiment = mlflow.create_experiment("audit", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifacts(str(run_dir))
    result = CliRunner().invoke(app, ["audit", run.info.run_id, "--results", str(tmp_path)])
    assert result.exit_code == 0, result.output
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"audit.md", "audit.json"} <= artifacts


def test_audit_of_a_folder_without_drift_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cascade_sd.cli", "audit", str(tmp_path)], capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "holds no drift.npz" in result.stderr


def test_paper_bound_shares_count_every_verified_node_and_every_run():
    """Zero-drift verified nodes belong in the denominator; unvisited positions do not; a run counts
    as over the paper's bound when any of its nodes is."""
    import numpy as np

    from analysis.audit import audit_arrays, format_audit
    from cascade_sd.metrics.drift import paper_bound_stats

    drift = np.array([[0.0, 0.0, 0.3, 0.05], [0.0, 0.02, 0.0, 0.0]])
    paper = np.array([[0.0, 0.1, 0.1, 0.1], [0.0, 0.1, 0.1, 0.1]])
    visited = np.array([[False, True, True, True], [False, True, True, False]])
    stats = paper_bound_stats(drift, paper, visited)
    assert stats == {"paper_bound_mean": 0.1, "paper_bound_violated_fraction": 0.2, "paper_bound_violated": True}
    nan = np.full_like(drift, np.nan)
    runs = [audit_arrays(f"r{i}", {"method": "lantern"}, drift[i:i + 1], nan[:1], np.ones((1, 4), bool),
                         paper=paper[i:i + 1], visited=visited[i:i + 1]) for i in range(2)]
    assert [r.paper_violated for r in runs] == [True, False]
    assert "lantern: the paper's stated bound is exceeded at some node in 1 of 2 runs." in format_audit(runs)


def test_drift_measures_a_decode_folder_and_the_audit_checks_it(tmp_path):
    """`cascade-sd drift RUN` writes the exact log-ratios of a decode folder; the audit then prints the measured
    sequence TV beside both bounds and fails once the two TV estimates contradict each other."""
    runner = CliRunner()
    run = tmp_path / "run"
    decoded = runner.invoke(app, ["decode", "--bundle", BUNDLE, "--out-dir", str(run), "--method", "coolsd", "--tree",
                                  "chain-3", "--labels", "0,1,0,1,0,1", "--cfg-scale", "2.0", "--record-drift",
                                  "--delta", "4.0"])
    assert decoded.exit_code == 0, decoded.output
    measured = runner.invoke(app, ["drift", str(run), "--bundle", BUNDLE, "--images", "6"])
    assert measured.exit_code == 0, measured.output
    row = json.loads(measured.output.strip().splitlines()[-1])
    assert row["sequence_images"] == 6 and row["sequence_exact"] and row["sequence_tv_agree"]
    assert 0.0 < row["sequence_tv"] <= 1.0
    audit = runner.invoke(app, ["audit", str(run)])
    assert audit.exit_code == 0, audit.output
    assert "Measured sequence-level drift" in audit.output and "| pass |" in audit.output
    arrays = dict(np.load(run / "sequence.npz"))
    arrays["target_log_sd"] = arrays["target_log_target"] - 50.0  # the target's images: never emitted by the sampler
    arrays["sampler_log_sd"] = arrays["sampler_log_target"]  # the sampler's images: exactly the target's law
    atomic_savez(run / "sequence.npz", **arrays)
    contradicted = runner.invoke(app, ["audit", str(run)])
    assert contradicted.exit_code == 1
    assert "disagree" in contradicted.output


def test_drift_rejects_a_folder_it_cannot_measure(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["drift", str(tmp_path), "--bundle", BUNDLE])
    assert missing.exit_code != 0 and "needs tokens.npz and stats.json" in str(missing.exception or missing.output)
