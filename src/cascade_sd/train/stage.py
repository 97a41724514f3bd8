"""Training stages stop at step counts, so the same config and seed give the same model on any machine;
``StageClock`` times a stage against the time its config expects and warns when it runs far over.

A wall-clock budget (``max_seconds``) stays available as an opt-in mode: a stage trained under one
says so in its metrics, its checkpoint and its MLflow run, because its model depends on machine load.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable

from cascade_sd.progress import Progress

# A stage "far over" its expected time: more than this factor (a quiet machine stays within ±20%).
OVER_FACTOR = 1.5
# The projection is made once this share of the steps is done.
_PROJECT_AT = 0.1


class StageWarning(RuntimeWarning):
    """A training stage ran (or is projected to run) far over its expected time, or is wall-clock limited."""


class StageClock:
    """Wall and CPU time of one training stage of ``steps`` steps against ``expected_seconds`` (None: no
    expectation). ``on_log`` wraps a trainer's progress callback to project the total early and to
    show the step and loss on a terminal."""

    def __init__(self, stage: str, steps: int, expected_seconds: float | None,
                 max_seconds: float | None = None) -> None:
        self.stage, self.steps, self.expected, self.max_seconds = stage, steps, expected_seconds, max_seconds
        self.warned = False
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self.progress = Progress(stage, steps, "steps")
        if max_seconds is not None:
            self._warn(f"{stage}: wall-clock mode (max_seconds={max_seconds:g}): the step count, and so the model, "
                       "depends on how busy the machine is; every output of this stage says so")

    def _warn(self, message: str) -> None:
        warnings.warn(message, StageWarning, stacklevel=3)

    def _over(self, seconds: float, what: str) -> None:
        if self.expected is None or self.warned or seconds <= OVER_FACTOR * self.expected:
            return
        self.warned = True
        self._warn(f"{self.stage}: {what} {seconds:.0f} s, over {OVER_FACTOR:g}x the {self.expected:.0f} s expected "
                   "on a quiet 2-core machine: the machine is busy or slower (the model is the same: training "
                   "stops at its step count)")

    def log_every(self, every: int) -> int:
        """How often the trainer should call ``on_log``: ``every`` steps, or often enough for a smooth
        progress line on a terminal (``on_log`` still passes only every ``every``-th step on)."""
        return max(1, min(every, self.steps // 200)) if self.progress.show else every

    def on_log(self, inner: Callable[[int, dict], None] | None = None, every: int = 1) -> Callable[[int, dict], None]:
        """A progress callback that projects the stage's total time from its first tenth, updates the
        progress line, then calls ``inner`` on every ``every``-th step and the last."""
        def log(step: int, metrics: dict) -> None:
            if step >= max(1, int(_PROJECT_AT * self.steps)):
                self._over((time.perf_counter() - self.start) / step * self.steps, "projected to take")
            if "loss" in metrics:
                self.progress.update(step, loss=float(metrics["loss"]))
            else:
                self.progress.update(step)
            if inner is not None and (step % every == 0 or step >= self.steps):
                inner(step, metrics)

        return log

    def finish(self, steps_done: int) -> dict[str, Any]:
        """Metrics every stage records: steps, wall and CPU seconds, the expectation and the stopping rule."""
        seconds, cpu = time.perf_counter() - self.start, time.process_time() - self.cpu_start
        self.progress.close()
        self._over(seconds, "took")
        return {
            "steps": steps_done,
            "planned_steps": self.steps,
            "stage_seconds": seconds,
            "stage_cpu_seconds": cpu,
            "expected_seconds": self.expected,
            "over_expected_time": self.expected is not None and seconds > OVER_FACTOR * self.expected,
            "wall_clock_limited": self.max_seconds is not None,
            "stopped_by": "steps" if steps_done >= self.steps else "max_seconds" if self.max_seconds is not None else "early",
        }
