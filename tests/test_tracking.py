"""MLflow conventions: init job, stage runs, child runs with params/tags/metrics/artifacts, failure status,
and the workflow hooks that reopen and end the parent and stage runs."""

import json
import multiprocessing as mp

import pytest

from cascade_sd.tracking import child_run, finish_tracking, flatten, init_tracking, reopen_tracking


def _job(results: str, i: int) -> None:
    with child_run(results, f"job{i}", stage="grid", params={"i": i, "nested": {"a": i}}, seed=i) as run:
        run.metrics({"value": float(i), "skip": "text", "not_applicable": float("nan"), "none": None})


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    # One database for the module: creating MLflow's schema takes seconds.
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tmp_path_factory.mktemp("results")
    init_tracking(path, "exp", {"seed": 0, "target": {"dim": 8}}, ["models", "grid"])
    yield path
    mp.undo()


def _runs(results):
    import mlflow

    info = json.loads((results / "mlflow" / "parent.json").read_text())
    mlflow.set_tracking_uri(info["tracking_uri"])
    return info, mlflow.search_runs(experiment_ids=[info["experiment_id"]], output_format="list")


def test_init_writes_parent_and_sqlite(results):
    import mlflow

    info, runs = _runs(results)
    assert info["tracking_uri"].startswith("sqlite:///") and (results / "mlflow" / "mlflow.db").is_file()
    parent = [r for r in runs if r.info.run_id == info["parent_run_id"]]
    assert len(parent) == 1 and parent[0].data.tags["cascade_sd.role"] == "parent"
    assert parent[0].data.params["target.dim"] == "8"
    experiment = mlflow.MlflowClient().get_experiment(info["experiment_id"])
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs table
    _assert_provenance(results, parent[0])


def _assert_provenance(results, run) -> None:
    """Commit and dirty flag, the lock's hash and match, and the installed package list as an artifact."""
    from cascade_sd.provenance import compare, git_state, installed, lock_sha256, locked

    commit, dirty = git_state()
    tags = run.data.tags
    assert tags["git.commit"] == commit and len(commit) == 40
    assert tags["git.dirty"] == str(dirty).lower()
    mismatches, _ = compare(locked(), installed())
    assert tags["lock.sha256"] == lock_sha256() and tags["lock.matches"] == str(not mismatches).lower()
    assert tags["lock.mismatches"] == str(len(mismatches))
    listed = (results / "mlflow" / "artifacts" / run.info.run_id / "artifacts" / "environment" / "packages.txt")
    lines = listed.read_text().splitlines()
    assert lines == [f"{n}=={v}" for n, v in installed().items()] and "torch==" + installed()["torch"] in lines


def _run_jobs(results, n: int, *, timeout: float) -> list[int | None]:
    """Start ``n`` job processes at once (spawned: fresh interpreters, like Snakemake's); their exit codes."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_job, args=(str(results), i)) for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    return [p.exitcode for p in procs]


@pytest.mark.slow
def test_sixteen_parallel_jobs_on_a_fresh_sqlite_database(tmp_path, monkeypatch):
    """16 processes open child runs at once on a database created just before: none is lost."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    init_tracking(tmp_path, "fresh", {"seed": 0})
    assert _run_jobs(tmp_path, 16, timeout=300) == [0] * 16
    info, runs = _runs(tmp_path)
    children = [r for r in runs if r.data.tags.get("cascade_sd.job", "").startswith("job")]
    assert sorted(r.data.tags["cascade_sd.job"] for r in children) == sorted(f"job{i}" for i in range(16))
    assert all(r.info.status == "FINISHED" and r.data.metrics["value"] == float(r.data.params["i"]) for r in children)


def test_parallel_child_runs_all_logged(results):
    assert _run_jobs(results, 4, timeout=120) == [0] * 4
    info, runs = _runs(results)
    children = [r for r in runs if r.data.tags.get("cascade_sd.job", "").startswith("job")]
    assert all(r.data.tags["mlflow.parentRunId"] == info["stage_run_ids"]["grid"] for r in children)
    assert sorted(r.data.tags["cascade_sd.job"] for r in children) == ["job0", "job1", "job2", "job3"]
    for r in children:
        assert r.info.status == "FINISHED"
        assert r.data.metrics["value"] == float(r.data.params["i"])
        assert r.data.params["nested.a"] == r.data.params["i"]
        assert not {"skip", "not_applicable", "none"} & set(r.data.metrics)  # absent, not NaN
        assert {"git.commit", "git.dirty", "lock.sha256", "version.torch", "hardware.cores", "seed"} <= set(r.data.tags)
        _assert_provenance(results, r)


def test_failed_job_is_marked_failed(results):
    with pytest.raises(RuntimeError):
        with child_run(results, "boom", stage="models"):
            raise RuntimeError("x")
    _, runs = _runs(results)
    assert [r.info.status for r in runs if r.data.tags.get("cascade_sd.job") == "boom"] == ["FAILED"]


def test_artifacts_are_copied(results, tmp_path_factory):
    f = tmp_path_factory.mktemp("a") / "grid.txt"
    f.write_text("hello")
    with child_run(results, "art", stage="grid") as run:
        run.artifact(f)
    _, runs = _runs(results)
    run = next(r for r in runs if r.data.tags.get("cascade_sd.job") == "art")
    assert (results / "mlflow" / "artifacts" / run.info.run_id / "artifacts" / "grid.txt").read_text() == "hello"


def test_no_parent_means_tracking_off(tmp_path):
    with child_run(tmp_path, "job", stage="grid") as run:
        run.metrics({"x": 1.0})
    assert not (tmp_path / "mlflow" / "mlflow.db").exists()
    assert finish_tracking(tmp_path, "FINISHED") == {} and not reopen_tracking(tmp_path)


def test_unknown_stage_is_refused(results):
    with pytest.raises(ValueError, match="stage='train'; allowed: models, samples, grid, cspd"):
        with child_run(results, "job", stage="train"):
            pass


def test_stage_runs_nest_under_the_parent(results):
    info, runs = _runs(results)
    stages = {r.data.tags["cascade_sd.stage"]: r for r in runs if r.data.tags.get("cascade_sd.role") == "stage"}
    assert set(stages) == {"models", "grid"} == set(info["stage_run_ids"])
    for name, run in stages.items():
        assert run.info.run_name == name and run.info.run_id == info["stage_run_ids"][name]
        assert run.data.tags["mlflow.parentRunId"] == info["parent_run_id"]


def _status(run_id: str) -> str:
    import mlflow

    return mlflow.MlflowClient().get_run(run_id).info.status


def test_workflow_hooks_end_and_reopen_parent_and_stages(tmp_path, monkeypatch):
    """Success ends everything FINISHED; a resumed workflow reopens; a failure marks the failing stage
    FAILED, a stage that never ran KILLED and the parent FAILED."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    info = init_tracking(tmp_path, "hooks", {"seed": 0}, ["models", "samples", "grid"])
    ids = info["stage_run_ids"]
    with child_run(tmp_path, "train", stage="models"):
        pass
    with child_run(tmp_path, "sample", stage="samples"):
        pass
    assert finish_tracking(tmp_path, "FINISHED") == {
        "models": "FINISHED", "samples": "FINISHED", "grid": "FINISHED", "workflow": "FINISHED"}
    assert {_status(i) for i in [info["parent_run_id"], *ids.values()]} == {"FINISHED"}
    assert reopen_tracking(tmp_path)
    assert {_status(i) for i in [info["parent_run_id"], *ids.values()]} == {"RUNNING"}
    with pytest.raises(RuntimeError):
        with child_run(tmp_path, "cell", stage="samples"):
            raise RuntimeError("x")
    ended = finish_tracking(tmp_path, "FAILED")
    assert ended == {"models": "FINISHED", "samples": "FAILED", "grid": "KILLED", "workflow": "FAILED"}
    assert [_status(ids[s]) for s in ("models", "samples", "grid")] == ["FINISHED", "FAILED", "KILLED"]
    assert _status(info["parent_run_id"]) == "FAILED"
    with pytest.raises(ValueError, match="status='DONE'"):
        finish_tracking(tmp_path, "DONE")


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
