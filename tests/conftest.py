"""Shared test fixtures and the Hypothesis profile."""

import os
import random
import shutil

import pytest
import torch
from hypothesis import HealthCheck, core, settings

from workflow_run import run_ci_workflow

# Property tests explore new examples on every run (not derandomised) from one seed per session, shown in
# the header: `--hypothesis-seed=N` (or CASCADE_SD_HYPOTHESIS_SEED=N) replays a run; a failure also prints
# its example as a @reproduce_failure blob.
settings.register_profile("cascade-sd", deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("cascade-sd")


def pytest_configure(config):
    if config.getoption("hypothesis_seed", None) is None:
        seed = int(os.environ.get("CASCADE_SD_HYPOTHESIS_SEED") or random.SystemRandom().randrange(2**31))
        config.option.hypothesis_seed = str(seed)
        core.global_force_seed = seed


def pytest_report_header(config):
    return f"hypothesis seed {config.option.hypothesis_seed} (replay: --hypothesis-seed={config.option.hypothesis_seed})"


@pytest.fixture(scope="module")
def one_thread():
    """Toy-sized ops run fastest (and least disturbed by other jobs) on one thread; restored afterwards.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ci_workflow(tmp_path_factory):
    """The `.test` workflow run once per session (SQLite tracking); its results folder."""
    results = tmp_path_factory.mktemp("ci-workflow") / "results"
    res = run_ci_workflow(results)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    yield results
    shutil.rmtree(results, ignore_errors=True)
