"""MLflow conventions in one place (DESIGN 8).

The workflow's files under ``results/`` are the source of truth; MLflow indexes them. One init
job creates the schema, the experiment, a parent run "workflow" and one run per stage under it
(so parallel jobs never race to migrate a fresh SQLite file or to create a stage); every other
job opens a child run under its stage. The workflow's start, success and error hooks reopen and
close the parent and stage runs, so a finished workflow reads FINISHED (or FAILED) in the UI.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from cascade_sd.io import atomic_write_json  # noqa: E402
from cascade_sd.provenance import run_provenance  # noqa: E402

T = TypeVar("T")
PARENT_FILE = "parent.json"
STAGES = {
    "models": "data, tokenizer, target, judge and drafter training, or checkpoint import",
    "samples": "vanilla samples and their quality",
    "grid": "the decode grid: cells, their evaluation, the audit, figures and heat-maps",
    "cspd": "continuous-token models and the CSpD cells",
}


def workflow_stages(config: Mapping[str, Any]) -> list[str]:
    """The stages a config's workflow runs (built-in models add samples; CSpD is optional)."""
    builtin = config["models"]["source"] == "builtin"
    cspd = builtin and config.get("continuous", {}).get("enabled", False)
    return ["models", *(["samples"] if builtin else []), "grid", *(["cspd"] if cspd else [])]


def default_tracking_uri(results_dir: str | os.PathLike) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an SQLite file under ``<results>/mlflow/``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    db = Path(results_dir).resolve() / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def retry_locked(fn: Callable[[], T], attempts: int = 20, delay: float = 0.25) -> T:
    """Call ``fn``, retrying briefly while SQLite reports ``database is locked``."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # mlflow wraps sqlite errors in several exception types
            if "database is locked" not in str(exc) or i == attempts - 1:
                raise
            time.sleep(delay * (1 + random.random()) * min(i + 1, 8))
    raise AssertionError("unreachable")


def _client(uri: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def environment_tags() -> tuple[dict[str, str], str]:
    """Tags every run carries (commit and dirty flag, lock hash and whether the environment matches it,
    hardware, library versions) and the installed package list logged beside them."""
    import mlflow
    import numpy
    import torch

    import cascade_sd

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    provenance, packages = run_provenance()
    return provenance | {
        "hardware.cpu": platform.processor() or platform.machine(),
        "hardware.cores": str(os.cpu_count()),
        "hardware.device": device,
        "torch_threads": str(torch.get_num_threads()),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "default",
        "version.cascade_sd": cascade_sd.__version__,
        "version.python": platform.python_version(),
        "version.torch": torch.__version__,
        "version.numpy": numpy.__version__,
        "version.mlflow": mlflow.__version__,
    }, packages


def _log_packages(client: Any, run_id: str, packages: str) -> None:
    """The installed package list (``name==version`` lines) as the run's ``environment/packages.txt``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "packages.txt"
        path.write_text(packages)
        retry_locked(lambda: client.log_artifact(run_id, str(path), "environment"))


def init_tracking(results_dir: str | os.PathLike, experiment: str, params: Mapping[str, Any],
                  stages: list[str] | None = None) -> dict[str, Any]:
    """Create schema, experiment, the parent run and one run per stage under it (default: every
    stage in ``STAGES``); write ``<results>/mlflow/parent.json``."""
    results_dir = Path(results_dir)
    on_server = bool(os.environ.get("MLFLOW_TRACKING_URI"))
    uri = default_tracking_uri(results_dir)
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        # Local runs keep artifacts beside the database; a server decides its own store.
        artifacts = None if on_server else (results_dir.resolve() / "mlflow" / "artifacts").as_uri()
        exp_id = client.create_experiment(experiment, artifact_location=artifacts)
    else:
        exp_id = exp.experiment_id
    # The UI then opens the experiment on its training-runs table (not the GenAI traces overview).
    client.set_experiment_tag(exp_id, "mlflow.experimentKind", "custom_model_development")
    tags, packages = environment_tags()
    run = client.create_run(exp_id, run_name="workflow", tags=tags | {"cascade_sd.role": "parent"})
    _log_packages(client, run.info.run_id, packages)
    for key, value in flatten(params).items():
        client.log_param(run.info.run_id, key, _param_str(value))
    stage_ids = {}
    for stage in stages or list(STAGES):
        child = client.create_run(exp_id, run_name=stage, tags=tags | {
            "cascade_sd.role": "stage", "cascade_sd.stage": stage, "mlflow.parentRunId": run.info.run_id,
            "mlflow.note.content": STAGES[stage]})
        stage_ids[stage] = child.info.run_id
    info = {"tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": run.info.run_id, "stage_run_ids": stage_ids}
    atomic_write_json(results_dir / "mlflow" / PARENT_FILE, info)
    return info


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into dotted keys (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _param_str(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:6000]


class RunLogger:
    """Thin handle the CLI jobs log through; every call retries on a locked database."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def params(self, params: Mapping[str, Any]) -> None:
        """Log (flattened) parameters."""
        from mlflow.entities import Param

        items = [Param(k, _param_str(v)) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            retry_locked(lambda: self.client.log_batch(self.run_id, params=items[i : i + 100]))

    def metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric (flattened) metrics. Non-numeric and non-finite values are skipped: a metric that
        does not apply to a run (a bound for a rule without one) is absent, not NaN."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step or 0)
            for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ]
        for i in range(0, len(items), 500):
            retry_locked(lambda: self.client.log_batch(self.run_id, metrics=items[i : i + 500]))

    def tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags."""
        for k, v in tags.items():
            retry_locked(lambda: self.client.set_tag(self.run_id, k, str(v)))

    def artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a file into the run's artifacts."""
        retry_locked(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))


class NullLogger(RunLogger):
    """Stand-in when tracking is off: every call does nothing."""

    def __init__(self) -> None:
        super().__init__(None, "")

    def params(self, params: Mapping[str, Any]) -> None:
        """No-op."""

    def metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """No-op."""

    def tags(self, tags: Mapping[str, Any]) -> None:
        """No-op."""

    def artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """No-op."""


def _parent_info(results_dir: str | os.PathLike | None) -> dict[str, Any] | None:
    """``parent.json`` of a results folder, or None when tracking was never initialised there."""
    parent_file = Path(results_dir) / "mlflow" / PARENT_FILE if results_dir else None
    if parent_file is None or not parent_file.is_file():
        return None
    return json.loads(parent_file.read_text())


@contextlib.contextmanager
def child_run(
    results_dir: str | os.PathLike | None, job: str, *, stage: str, params: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> Iterator[RunLogger]:
    """Open a job's run under its stage's run (``STAGES``); FAILED on exception, FINISHED otherwise.

    Without ``results_dir`` or without a parent (a job run by hand before ``init``), tracking is
    off and a ``NullLogger`` is yielded: the job's files are still written.
    """
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}; allowed: {', '.join(STAGES)}")
    info = _parent_info(results_dir)
    if info is None:
        yield NullLogger()
        return
    client = _client(info["tracking_uri"])
    tags, packages = environment_tags()
    parent = info.get("stage_run_ids", {}).get(stage, info["parent_run_id"])
    tags |= {"mlflow.parentRunId": parent, "cascade_sd.job": job, "cascade_sd.stage": stage}
    if seed is not None:
        tags["seed"] = str(seed)
    run = retry_locked(lambda: client.create_run(info["experiment_id"], run_name=job, tags=tags))
    logger = RunLogger(client, run.info.run_id)
    _log_packages(client, run.info.run_id, packages)
    if params:
        logger.params(params)
    try:
        yield logger
    except BaseException:
        retry_locked(lambda: client.set_terminated(run.info.run_id, "FAILED"))
        raise
    retry_locked(lambda: client.set_terminated(run.info.run_id, "FINISHED"))


def reopen_tracking(results_dir: str | os.PathLike) -> bool:
    """Mark the parent and stage runs RUNNING again when a later ``snakemake`` call resumes a workflow
    (its start hook); False when tracking was never initialised there."""
    info = _parent_info(results_dir)
    if info is None:
        return False
    client = _client(info["tracking_uri"])
    for run_id in [info["parent_run_id"], *info.get("stage_run_ids", {}).values()]:
        retry_locked(lambda: client.update_run(run_id, status="RUNNING"))
    return True


def finish_tracking(results_dir: str | os.PathLike, status: str) -> dict[str, str]:
    """End the parent run with the workflow's ``status`` (FINISHED or FAILED) and each stage run with its
    jobs': FAILED if one failed or never ended, KILLED if the workflow failed before the stage ran
    any job, FINISHED otherwise. Returns run name → status (empty without tracking)."""
    if status not in ("FINISHED", "FAILED"):
        raise ValueError(f"status={status!r}; allowed: FINISHED, FAILED")
    info = _parent_info(results_dir)
    if info is None:
        return {}
    client = _client(info["tracking_uri"])
    ended = {}
    for stage, run_id in info.get("stage_run_ids", {}).items():
        jobs = retry_locked(lambda: client.search_runs(
            [info["experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{run_id}'", max_results=10_000))
        states = {r.info.status for r in jobs}
        stage_status = ("FAILED" if states & {"FAILED", "RUNNING", "KILLED", "SCHEDULED"} else
                        "KILLED" if not jobs and status == "FAILED" else "FINISHED")
        retry_locked(lambda: client.set_terminated(run_id, stage_status))
        ended[stage] = stage_status
    retry_locked(lambda: client.set_terminated(info["parent_run_id"], status))
    ended["workflow"] = status
    return ended
