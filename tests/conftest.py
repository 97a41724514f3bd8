"""Shared test fixtures."""

import shutil

import pytest
import torch

from workflow_run import run_ci_workflow


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
