"""MLflow conventions in one place (DESIGN 8).

The workflow's files under ``results/`` are the source of truth; MLflow indexes them. One init
job creates the schema, the experiment and a parent run (so parallel jobs never race to migrate
a fresh SQLite file); every other job opens a child run under that parent.
"""

from __future__ import annotations

import contextlib
import json
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


def init_tracking(results_dir: str | os.PathLike, experiment: str, params: Mapping[str, Any]) -> dict[str, str]:
    """Create schema, experiment and the parent run; write ``<results>/mlflow/parent.json``."""
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
    tags, packages = environment_tags()
    run = client.create_run(exp_id, run_name="workflow", tags=tags | {"cascade_sd.role": "parent"})
    _log_packages(client, run.info.run_id, packages)
    for key, value in flatten(params).items():
        client.log_param(run.info.run_id, key, _param_str(value))
    info = {"tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": run.info.run_id}
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
        """Log numeric (flattened) metrics; non-numeric values are skipped."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step or 0)
            for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
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


@contextlib.contextmanager
def child_run(
    results_dir: str | os.PathLike | None, job: str, *, params: Mapping[str, Any] | None = None, seed: int | None = None
) -> Iterator[RunLogger]:
    """Open a child run of the workflow's parent run; FAILED on exception, FINISHED otherwise.

    Without ``results_dir`` or without a parent (a job run by hand before ``init``), tracking is
    off and a ``NullLogger`` is yielded: the job's files are still written.
    """
    parent_file = Path(results_dir) / "mlflow" / PARENT_FILE if results_dir else None
    if parent_file is None or not parent_file.is_file():
        yield NullLogger()
        return
    info = json.loads(parent_file.read_text())
    client = _client(info["tracking_uri"])
    tags, packages = environment_tags()
    tags |= {"mlflow.parentRunId": info["parent_run_id"], "cascade_sd.job": job}
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
