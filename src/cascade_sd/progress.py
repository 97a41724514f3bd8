"""Progress lines for commands that run longer than a few seconds: one line rewritten in place on a
terminal (stderr is a TTY), nothing at all in logs, pipes and CI, so workflow logs stay clean.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

# Redraw at most this often (seconds); the last update is always drawn by ``close``.
_INTERVAL = 0.25


def enabled(stream: IO[str] | None = None) -> bool:
    """Whether progress is shown: ``stream`` (default stderr) is a terminal and ``CI`` is not set."""
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("CI")


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """``label  done/total unit  key value …  elapsed, ~left`` on one line; ``update`` sets ``done``."""

    def __init__(self, label: str, total: int | None, unit: str = "", *, stream: IO[str] | None = None,
                 show: bool | None = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.show = enabled(self.stream) if show is None else show
        self.label, self.total, self.unit = label, total, unit
        self.start = self._drawn_at = time.perf_counter()
        self.done, self.fields, self._width, self._pending = 0, {}, 0, False

    def line(self) -> str:
        """The current line's text."""
        elapsed = time.perf_counter() - self.start
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        parts = [self.label, f"{count} {self.unit}".rstrip()]
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.fields.items()]
        left = ""
        if self.total and 0 < self.done < self.total:
            left = f", ~{_clock(elapsed / self.done * (self.total - self.done))} left"
        return "  ".join(parts) + f"  {_clock(elapsed)}{left}"

    def update(self, done: int, **fields: Any) -> None:
        """Record progress (``done`` out of ``total``) and named values such as the loss; redraw if due."""
        self.done = done
        self.fields.update(fields)
        self._pending = True
        now = time.perf_counter()
        if self.show and now - self._drawn_at >= _INTERVAL:
            self._draw(now)

    def _draw(self, now: float) -> None:
        text = self.line()
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width, self._drawn_at, self._pending = len(text), now, False

    def echo(self, text: str, out: IO[str] | None = None) -> None:
        """Print a result line to ``out`` (default stdout) without mixing it into the progress line."""
        if self.show and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
        print(text, file=sys.stdout if out is None else out, flush=True)
        if self.show and (self.done or self.fields):  # nothing to show before the first update
            self._draw(time.perf_counter())

    def close(self) -> None:
        """Draw the last state and end the line (only if anything was drawn)."""
        if self.show and (self._pending or self._width):
            if self._pending:  # the last state was not drawn yet
                self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
        self.show = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
