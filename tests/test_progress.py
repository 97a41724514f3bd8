"""Progress lines: drawn in place on a terminal only, silent in logs and CI; results stay on stdout."""

import io

from cascade_sd.progress import Progress, enabled
from cascade_sd.train.stage import StageClock


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_silent_off_a_terminal_and_in_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    assert not enabled(io.StringIO()) and enabled(_Tty())
    monkeypatch.setenv("CI", "true")
    assert not enabled(_Tty())
    log = io.StringIO()
    with Progress("train", 10, "steps", stream=log) as line:
        line.update(5, loss=1.5)
    assert log.getvalue() == ""


def test_a_terminal_line_shows_count_fields_and_time_left(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    tty, out = _Tty(), io.StringIO()
    line = Progress("target", 440, "steps", stream=tty)
    line.start -= 10.0  # ten seconds in
    line.update(110, loss=3.21987)
    assert line.line().startswith("target  110/440 steps  loss 3.22  0:10, ~0:3")
    line.echo("| row |", out=out)  # a result line clears the progress line first and goes to its own stream
    assert out.getvalue() == "| row |\n"
    line.update(440)
    line.close()
    text = tty.getvalue()
    assert text.endswith("\n") and "440/440 steps" in text.splitlines()[-1] and "| row |" not in text


def test_stage_clock_updates_progress_and_passes_every_nth_step_on(monkeypatch):
    """On a terminal the trainer reports often (for the line) while MLflow still sees every 50th step."""
    monkeypatch.delenv("CI", raising=False)
    clock = StageClock("target", 400, None)
    clock.progress.stream, clock.progress.show = _Tty(), True
    assert clock.log_every(50) == 2
    logged: list[int] = []
    log = clock.on_log(lambda step, m: logged.append(step), every=50)
    for step in range(2, 401, 2):
        log(step, {"loss": 1.0 / step})
    assert logged == list(range(50, 401, 50)) and clock.progress.done == 400
    clock.progress.show = False
    assert clock.log_every(50) == 50
