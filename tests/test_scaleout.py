"""Several machines' path, for real: PostgreSQL (Debian package) behind an `mlflow server` on
loopback, the `.test` workflow logging to it through MLFLOW_TRACKING_URI, runs read back with
search_runs. `.ci/run` installs PostgreSQL; a missing installation is a failure, not a skip. The run
repeats the session's SQLite run of the same config and seed for every model, the vanilla samples and
a decode cell of each kind (``REPEATED_TARGETS``): every checkpoint and every decoded token must come
out identical."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from workflow_run import REPEATED_TARGETS, reproducible_outputs, run_ci_workflow

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the package's ``postgres`` user when needed."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _wait_http(url: str, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@pytest.fixture()
def mlflow_server():
    """PostgreSQL cluster in a temp folder + mlflow server, both on loopback; yields the server URI."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    assert bins, "PostgreSQL is not installed (apt-get install postgresql; .ci/run does this)"
    pg = Path(bins[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="cascade-pg-"))
    root.chmod(0o777)
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    sock.chmod(0o777)
    pg_port, port = _free_port(), _free_port()
    subprocess.run(_as_postgres([str(pg / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]), check=True,
                   capture_output=True)
    subprocess.run(_as_postgres([str(pg / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "pg.log"), "-o",
                                 f"-p {pg_port} -k {sock} -c listen_addresses=127.0.0.1", "start"]), check=True,
                   capture_output=True)
    server = None
    try:
        subprocess.run([str(pg / "createdb"), "-h", "127.0.0.1", "-p", str(pg_port), "-U", "postgres", "mlflow"],
                       check=True, capture_output=True)
        log = open(root / "mlflow.log", "w")
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"postgresql://postgres@127.0.0.1:{pg_port}/mlflow",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "2"], stdout=log, stderr=subprocess.STDOUT,
            env=os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true"})
        _wait_http(f"http://127.0.0.1:{port}/health", 120)
        yield f"http://127.0.0.1:{port}"
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        subprocess.run(_as_postgres([str(pg / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_workflow_logs_to_a_postgres_backed_mlflow_server(mlflow_server, ci_workflow, tmp_path):
    results = tmp_path / "results"
    res = run_ci_workflow(results, env={"MLFLOW_TRACKING_URI": mlflow_server}, targets=REPEATED_TARGETS)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]

    # Same config and seed as the session's run: identical checkpoints and decoded tokens.
    first, second = reproducible_outputs(ci_workflow), reproducible_outputs(results)
    assert len(second) >= 14 and {"metrics/target.json", "metrics/tokenizer.json", "metrics/continuous_draft.json",
                                  "data/tokens.npz", "samples/vanilla/seed0/tokens.npz"} <= set(second)
    assert sum(k.startswith("decode/") for k in second) == 4 and any(k.startswith("continuous/decode/") for k in second)
    assert {k: first.get(k) for k in second} == second, sorted(k for k in second if first.get(k) != second[k])

    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    exp = mlflow.get_experiment_by_name("cascade-sd-test")
    runs = mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="list")
    parent = [r for r in runs if r.data.tags.get("cascade_sd.role") == "parent"]
    stages = {r.info.run_id: r for r in runs if r.data.tags.get("cascade_sd.role") == "stage"}
    children = [r for r in runs if "cascade_sd.job" in r.data.tags]
    assert len(parent) == 1 and all(r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for r in stages.values())
    assert all(stages[r.data.tags["mlflow.parentRunId"]].data.tags["cascade_sd.stage"] == r.data.tags["cascade_sd.stage"]
               for r in children)  # every job under its stage's run
    assert all(r.info.status == "FINISHED" for r in [*parent, *stages.values(), *children])  # the end hook ran
    jobs = {r.data.tags["cascade_sd.job"] for r in children}
    assert {"train_target", "train_drafter_eagle_rw2", "train_continuous_draft", "grid_reference"} <= jobs
    decodes = mlflow.search_runs(experiment_ids=[exp.experiment_id], filter_string="tags.`cascade_sd.job` LIKE 'decode %'")
    assert len(decodes) == len(list((results / "decode").glob("**/stats.json"))) == 4
    assert {"metrics.tau", "metrics.speedup", "metrics.drift_mean"} <= set(decodes.columns)
    assert (decodes["metrics.tau"] >= 1.0).all()
