"""Training stages stop at step counts and time themselves against their expected time."""

from __future__ import annotations

import warnings

import pytest

from cascade_sd.train import stage
from cascade_sd.train.stage import StageClock, StageWarning


@pytest.fixture()
def clock_time(monkeypatch):
    """A settable wall clock for the stage module."""
    now = {"t": 100.0}
    monkeypatch.setattr(stage.time, "perf_counter", lambda: now["t"])
    return now


def test_on_time_stage_records_steps_and_times_without_warning(clock_time):
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clock = StageClock("target", 100, expected_seconds=50.0)
        log = clock.on_log(lambda s, m: seen.append(s))
        clock_time["t"] += 6.0
        log(10, {})  # projected 60 s: within 1.5 x 50
        clock_time["t"] += 54.0
        info = clock.finish(100)
    assert seen == [10]
    assert info | {"stage_cpu_seconds": 0} == {
        "steps": 100, "planned_steps": 100, "stage_seconds": 60.0, "stage_cpu_seconds": 0, "expected_seconds": 50.0,
        "over_expected_time": False, "wall_clock_limited": False, "stopped_by": "steps"}


def test_slow_stage_warns_once_early_and_is_flagged(clock_time):
    clock = StageClock("tokenizer", 100, expected_seconds=10.0)
    log = clock.on_log()
    clock_time["t"] += 1.0
    log(5, {})  # before a tenth of the steps: no projection yet
    clock_time["t"] += 1.0
    with pytest.warns(StageWarning, match=r"tokenizer: projected to take 20 s, over 1.5x the 10 s expected"):
        log(10, {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log(20, {})
        clock_time["t"] += 100.0
        info = clock.finish(100)
    assert info["over_expected_time"] and info["stage_seconds"] == 102.0


def test_stage_over_at_the_end_warns_and_no_expectation_never_does(clock_time):
    clock = StageClock("judge", 10, expected_seconds=1.0)
    clock_time["t"] += 2.0
    with pytest.warns(StageWarning, match="judge: took 2 s"):
        assert clock.finish(10)["over_expected_time"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        free = StageClock("judge", 10, expected_seconds=None)
        clock_time["t"] += 1e6
        assert not free.finish(10)["over_expected_time"]


def test_wall_clock_mode_is_opt_in_and_says_so(clock_time):
    with pytest.warns(StageWarning, match=r"target: wall-clock mode \(max_seconds=30\)"):
        clock = StageClock("target", 100, expected_seconds=None, max_seconds=30.0)
    info = clock.finish(42)
    assert info["wall_clock_limited"] and info["stopped_by"] == "max_seconds" and info["steps"] == 42
