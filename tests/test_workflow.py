"""The Snakemake workflow: dry runs, lint, config rejection at parse time, and the CI-sized run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def snakemake(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([str(BIN / "snakemake"), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("extra", [[], ["--configfile", ".test/config.yaml"]])
def test_dry_run(extra, tmp_path):
    res = snakemake("-n", *extra, "--config", f"results={tmp_path}/results")
    assert res.returncode == 0, res.stderr[-2000:]
    for rule in ("mlflow_init", "train_tokenizer", "tokenize", "train_target", "train_judge", "generate_vanilla", "summary"):
        assert rule in res.stdout


def test_lint_is_clean():
    res = snakemake("--lint")
    assert res.returncode == 0 and "Congratulations" in res.stdout + res.stderr, res.stdout[-3000:]


def test_bad_config_is_rejected_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"results": str(tmp_path / "r"), "target": {"steps": 0}}))
    res = snakemake("-n", "--configfile", str(bad))
    assert res.returncode != 0
    assert "config: target.steps=0 is out of range; allowed [1, inf]" in res.stdout + res.stderr
    assert not (tmp_path / "r" / "mlflow").exists()


@pytest.mark.slow
def test_ci_workflow_runs_end_to_end(tmp_path):
    """The `.test` config runs the whole DAG: models, samples, evaluation, summary, MLflow runs."""
    results = tmp_path / "results"
    res = snakemake("--configfile", ".test/config.yaml", "--config", f"results={results}", "--cores", "2", timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    for seed in (0, 1):
        assert (results / f"samples/vanilla/seed{seed}/grid.png").stat().st_size > 0
        quality = json.loads((results / f"eval/vanilla_seed{seed}.json").read_text())
        assert 0.0 <= quality["judge_accuracy"] <= 1.0 and quality["fid_in_domain"] >= 0.0
    target = json.loads((results / "metrics/target.json").read_text())
    assert target["test_nll_bits"] > 0
    assert "| vanilla | 1 |" in (results / "summary.md").read_text()

    import mlflow

    info = json.loads((results / "mlflow/parent.json").read_text())
    mlflow.set_tracking_uri(info["tracking_uri"])
    runs = mlflow.search_runs(experiment_ids=[info["experiment_id"]], output_format="list")
    jobs = {r.data.tags.get("cascade_sd.job") for r in runs if r.info.run_id != info["parent_run_id"]}
    assert {"data", "train_tokenizer", "tokenize", "train_target", "train_judge", "generate_vanilla_seed0"} <= jobs
    assert all(r.info.status == "FINISHED" for r in runs if r.info.run_id != info["parent_run_id"])

    # A second invocation has nothing to do (outputs are complete and up to date).
    again = snakemake("--configfile", ".test/config.yaml", "--config", f"results={results}", "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
    shutil.rmtree(results)
