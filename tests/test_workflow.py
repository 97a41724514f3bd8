"""The Snakemake workflow: dry runs, lint, config rejection at parse time, and the CI-sized run."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from analysis.sequence_tv import NUMERICAL_TOLERANCE

from workflow_run import BIN, ROOT, snakemake


@pytest.mark.parametrize("extra", [[], ["--configfile", ".test/config.yaml"], ["--profile", "profiles/gpu"],
                                   ["--profile", "profiles/slurm"]], ids=["default", "test", "gpu", "slurm"])
def test_dry_run(extra, tmp_path):
    res = snakemake("-n", *extra, "--config", f"results={tmp_path}/results")
    assert res.returncode == 0, res.stderr[-2000:]
    for rule in ("mlflow_init", "train_tokenizer", "tokenize", "train_target", "train_judge", "generate_vanilla", "summary",
                 "train_drafter", "grid_decode", "grid_evaluate", "grid_audit", "grid_figures", "redundancy_heatmaps",
                 "train_autoencoder", "train_continuous", "cspd_cell", "cspd_figures"):
        assert rule in res.stdout
    resolved = yaml.safe_load((tmp_path / "results/config.resolved.yaml").read_text())
    if "profiles/gpu" in extra:
        assert resolved["device"] == "cuda" and resolved["decode"]["batch_size"] == 200


def test_real_checkpoint_experiment_dry_run(tmp_path):
    """config/gpu.yaml with the user's files in place: import instead of training, no judge."""
    for name in ("vq.pt", "gpt.pt"):
        (tmp_path / name).write_bytes(b"weights")
    where = tmp_path / "files.yaml"
    where.write_text(yaml.safe_dump({"results": str(tmp_path / "results"),
                                     "models": {"vq": str(tmp_path / "vq.pt"), "gpt": str(tmp_path / "gpt.pt")}}))
    res = snakemake("-n", "--configfile", "config/gpu.yaml", str(where))
    assert res.returncode == 0, res.stderr[-2000:]
    for rule in ("import_llamagen", "distill", "train_drafter", "grid_decode", "grid_evaluate", "grid_audit",
                 "grid_figures", "redundancy_heatmaps"):
        assert rule in res.stdout
    for rule in ("train_tokenizer", "train_target", "train_judge", "grid_reference", "generate_vanilla",
                 "train_autoencoder", "cspd_cell"):
        assert f"rule {rule}" not in res.stdout and f"\n{rule} " not in res.stdout
    resolved = yaml.safe_load((tmp_path / "results/config.resolved.yaml").read_text())
    assert resolved["sample"] == {**resolved["sample"], "top_k": 2000, "cfg_scale": 3.0, "temperature": 1.0}


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


def _runs(results: Path) -> tuple[dict, list]:
    import mlflow

    info = json.loads((results / "mlflow/parent.json").read_text())
    mlflow.set_tracking_uri(info["tracking_uri"])
    return info, mlflow.search_runs(experiment_ids=[info["experiment_id"]], output_format="list")


TIMING_KEYS = {"vanilla_seconds_per_image", "seconds_per_image", "speedup", "sequence_seconds_per_image"}


@pytest.mark.slow
def test_ci_workflow_runs_end_to_end(ci_workflow, tmp_path):
    """The `.test` config runs the whole DAG (models, decode grid, evaluation, audit, figures, heat-maps,
    MLflow runs, the HTML report); a cell decoded twice gives the same tokens and metrics; a decode job
    killed with SIGKILL is never taken as done and its rerun completes."""
    results = ci_workflow
    for seed in (0, 1):
        assert (results / f"samples/vanilla/seed{seed}/grid.png").stat().st_size > 0
        quality = json.loads((results / f"eval/vanilla_seed{seed}.json").read_text())
        assert 0.0 <= quality["judge_accuracy"] <= 1.0 and quality["fid_in_domain"] >= 0.0
    target = json.loads((results / "metrics/target.json").read_text())
    assert target["test_nll_bits"] > 0
    for name in ("tokenizer", "target", "judge", "drafter-eagle", "drafter-eagle3", "drafter-eagle-rw2", "autoencoder",
                 "continuous_target", "continuous_draft"):  # every stage stops at its step count and says so
        stage = json.loads((results / f"metrics/{name}.json").read_text())
        assert stage["steps"] == stage["planned_steps"] and stage["stopped_by"] == "steps", name
        assert stage["stage_seconds"] > 0 and not stage["wall_clock_limited"], name
    assert "| vanilla | 1 |" in (results / "summary.md").read_text()

    figures = results / "figures"
    for name in ("pareto", "strength", "drift_vs_bound", "accept_hist", "speed", "samples", "redundancy_breadth",
                 "redundancy_depth", "results_table", "measured_tv", "tv_vs_bound"):
        assert (figures / f"{name}.csv").stat().st_size > 0
    # Measured sequence TV in every speculative cell with a trained drafter: exact, both estimates agreeing,
    # strict's exactly 0. The drafter-free SJD cells have none (api.sequence_log_prob does not cover them).
    jacobi = []
    for path in (results / "eval/grid").glob("**/*.json"):
        cell = json.loads(path.read_text())
        if cell["method"] == "vanilla":
            continue
        assert cell["step_compression"] > 1.0, path
        if cell["drafter"] == "jacobi":
            jacobi.append(cell["method"])
            assert cell["tree"] == "sjd-L4" and "sequence_tv" not in cell and cell["tau"] > 1.0, path
            assert cell["method"] != "strict" or cell["drift_mean"] < NUMERICAL_TOLERANCE, path
            continue
        assert cell["sequence_exact"] and cell["sequence_tv_agree"] and not cell["sequence_problems"], path
        assert 0.0 <= cell["sequence_tv_ci"][0] <= cell["sequence_tv"] <= cell["sequence_tv_ci"][1] <= 1.0
        assert cell["sequence_tv_ci"][0] <= cell["sequence_bound_ci"][1] + NUMERICAL_TOLERANCE, path  # TV ≤ Σ_t E[TV_t]
        if cell["method"] == "strict":  # exact up to float32 differences between forward passes
            assert cell["sequence_tv"] < NUMERICAL_TOLERANCE and abs(cell["sequence_kl"]) < NUMERICAL_TOLERANCE, path
    table = (figures / "results_table.md").read_text()
    for method in ("vanilla", "strict", "lantern", "lantern_pp", "coolsd", "gsd", "cascade", "cascade_bounded"):
        assert f"| {method} |" in table
    assert "eagle-rw2" in table and sorted(jacobi) == ["gsd", "strict"] and "| sjd-L4 | jacobi |" in table
    cspd = (figures / "cspd_table.md").read_text()
    assert "| vanilla | vanilla |" in cspd and "| cspd-g2-p0.15-t1 | cspd |" in cspd and "t42" in cspd
    for row in (json.loads(p.read_text()) for p in (results / "continuous/decode").glob("*/eval.json")):
        assert row["tau"] >= 1.0 and row.get("capped_resamples", 0) == 0 and row["fid_in_domain"] >= 0.0
    assert json.loads((results / "metrics/autoencoder.json").read_text())["test_psnr_db"] > 10
    audit = json.loads((results / "decode/audit.json").read_text())
    assert audit and all(a["verdict"] not in ("violated", "measured TV contradicts") for a in audit)
    assert all("sequence_tv" in a for a in audit if a["method"] != "vanilla" and "drafter~jacobi" not in a["run"])
    cells = sorted((results / "decode").glob("**/seed0/stats.json"))
    assert len(cells) == 12

    info, runs = _runs(results)
    _assert_runs_close_and_nest_by_stage(info, runs)
    jobs = {r.data.tags["cascade_sd.job"] for r in runs if "cascade_sd.job" in r.data.tags}
    assert {"data", "train_tokenizer", "tokenize", "train_target", "train_judge", "generate_vanilla_seed0",
            "train_drafter_eagle_rw2", "grid_reference", "audit", "figures", "redundancy_heatmaps"} <= jobs
    assert sum(j.startswith("decode ") for j in jobs) == 24 and sum(j.startswith("evaluate ") for j in jobs) == 12
    assert {"train_autoencoder", "train_continuous_target", "train_continuous_draft"} <= jobs
    assert sum(j.startswith("cspd decode ") for j in jobs) == 4 and sum(j.startswith("cspd evaluate ") for j in jobs) == 4
    assert all(r.info.status == "FINISHED" for r in runs if r.info.run_id != info["parent_run_id"])

    # Same config and seed: identical tokens and metrics (timings aside).
    lantern = next(c.parent for c in cells if "method~lantern/" in str(c))
    cell = dict(part.split("~", 1) for part in lantern.parent.relative_to(results / "decode").parts)
    again = subprocess.run([str(BIN / "cascade-sd"), "grid", "decode", "-c", str(results / "config.resolved.yaml"),
                            "--bundle", str(results / "models"), *[f"--{k}={v}" for k, v in cell.items()],
                            "--seed", "0", "--out-dir", str(tmp_path / "again")], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    first, second = (json.loads((d / "stats.json").read_text()) for d in (lantern, tmp_path / "again/seed0"))
    assert {k: v for k, v in first.items() if k not in TIMING_KEYS} == {k: v for k, v in second.items() if k not in TIMING_KEYS}
    for name in ("tokens.npz", "drift.npz"):
        a, b = np.load(lantern / name), np.load(tmp_path / "again/seed0" / name)
        assert all(np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f") for k in a.files)

    # The HTML report bundles figures, tables and captions.
    report = snakemake("--configfile", ".test/config.yaml", "--config", f"results={results}",
                       "--report", str(tmp_path / "report.html"), timeout=300)
    assert report.returncode == 0 and (tmp_path / "report.html").stat().st_size > 10_000, report.stderr[-2000:]

    # A further invocation has nothing to do (outputs are complete and up to date).
    again = snakemake("--configfile", ".test/config.yaml", "--config", f"results={results}", "-n")
    assert "Nothing to be done" in again.stdout + again.stderr

    _kill_and_rerun_decode(results, lantern, first["tau"], tmp_path / "killed.log")
    _continuous_batching_hands_over_drafter_features(results / "models")


STAGE_OF = {"data": "models", "train_": "models", "tokenize": "models", "distill": "models",
            "generate_vanilla": "samples", "evaluate_": "samples", "decode ": "grid", "evaluate ": "grid",
            "grid_reference": "grid", "audit": "grid", "figures": "grid", "redundancy_heatmaps": "grid",
            "train_autoencoder": "cspd", "train_continuous": "cspd", "cspd ": "cspd"}


def _assert_runs_close_and_nest_by_stage(info: dict, runs: list) -> None:
    """After `snakemake` exits 0 every run is FINISHED, the parent and its stage runs included (the end
    hook); every job's run sits under its stage's run; a decode cell's rule and sampling parameters are
    params a filter finds."""
    import mlflow

    assert {r.info.status for r in runs} == {"FINISHED"}
    stages = info["stage_run_ids"]
    assert set(stages) == {"models", "samples", "grid", "cspd"}
    by_id = {r.info.run_id: r for r in runs}
    assert all(by_id[i].data.tags["mlflow.parentRunId"] == info["parent_run_id"] for i in stages.values())
    for r in runs:
        job = r.data.tags.get("cascade_sd.job")
        if job is None:
            continue
        stage = next(v for k, v in sorted(STAGE_OF.items(), key=lambda kv: -len(kv[0])) if job.startswith(k))
        assert r.data.tags["mlflow.parentRunId"] == stages[stage], job
    found = mlflow.search_runs([info["experiment_id"]], output_format="list",
                               filter_string="params.`rule.delta` = '0.1' AND tags.`cascade_sd.job` LIKE 'decode lantern [%'")
    assert len(found) == 2  # LANTERN at its paper default δ = 0.1, one run per seed
    assert all(r.data.params["sampling.cfg_scale"] == "3.0" and r.data.params["rule.k"] == "1000" for r in found)


def _continuous_batching_hands_over_drafter_features(models: Path) -> None:
    """Greedy decoding fixes every image's drafts, so images that join a running batch accept exactly
    what they accept in a full batch only if their drafter inputs (features, tokens, slots) are right."""
    import torch

    from cascade_sd import api

    bundle = api.load_bundle(models)
    labels = torch.arange(6) % bundle.target.config.num_classes
    for drafter in bundle.drafters:
        kw = {"tree": "tree-25", "drafter": drafter, "temperature": 0.0, "cfg_scale": 2.0}
        full, joined = (api.decode(bundle, labels, max_batch=rows, **kw) for rows in (None, 2))
        assert torch.equal(full.tokens, joined.tokens), drafter
        hist = full.stats["accept_histogram"]
        assert hist == joined.stats["accept_histogram"] and sum(hist[1:]) > 0, (drafter, hist)


def _kill_and_rerun_decode(results: Path, cell_dir: Path, tau: float, log: Path) -> None:
    """SIGKILL a decode job mid-run: its outputs are not taken as done, its MLflow run is not FINISHED,
    and after ``--unlock`` the rerun reproduces the cell."""
    target = str(cell_dir / "stats.json")
    base = ("--configfile", ".test/config.yaml", "--config", f"results={results}", "--cores", "1")
    before = {r.info.run_id for r in _runs(results)[1]}

    def new_runs() -> list:
        return [r for r in _runs(results)[1] if r.info.run_id not in before]

    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with log.open("w") as out:
        proc = subprocess.Popen([str(BIN / "snakemake"), *base, "--allowed-rules", "grid_decode", "--force", target],
                                cwd=ROOT, env=env,
                                start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not any(r.info.status == "RUNNING" for r in new_runs()):
            assert proc.poll() is None, f"snakemake exited ({proc.returncode}) with no seed's run open: " + log.read_text()[-3000:]
            assert time.time() < deadline, "the forced decode job never opened its MLflow run"
            time.sleep(0.2)
        assert proc.poll() is None, "the decode job finished before it could be killed: " + log.read_text()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)  # a seed's run is open (an earlier seed may be done)
        proc.wait(30)
    at_kill = new_runs()
    killed = [r for r in at_kill if r.info.status != "FINISHED"]
    assert len(killed) == 1, [(r.data.tags, r.info.status) for r in at_kill]
    job = killed[0].data.tags.get("cascade_sd.job", "")
    assert job.startswith("decode lantern"), killed[0].data.tags
    assert not (cell_dir.parent / f"seed{killed[0].data.tags['seed']}" / "stats.json").exists()

    # (No --allowed-rules from here: with it, Snakemake 9.27 plans the job in a dry run but then reports
    # "Nothing to be done" for real while the output is missing.)
    assert snakemake(*base[:4], "--unlock").returncode == 0
    plan = snakemake(*base, "-n", target)
    assert "rule grid_decode" in plan.stdout and "Missing output files" in plan.stdout, plan.stdout[-2000:]
    rerun = snakemake(*base, target, timeout=600)
    assert "Finished jobid" in rerun.stdout + rerun.stderr, (rerun.stdout + rerun.stderr)[-2000:]
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-4000:]
    assert json.loads((cell_dir / "stats.json").read_text())["tau"] == tau
    statuses = {r.info.run_id: r.info.status for r in new_runs()}  # the killed run stays open; both seeds redone
    assert statuses[killed[0].info.run_id] != "FINISHED"
    assert list(statuses.values()).count("FINISHED") == len(at_kill) - 1 + 2
