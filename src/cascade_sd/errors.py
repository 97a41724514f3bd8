"""Error types whose message is one line naming the field, the value and what is allowed."""

from __future__ import annotations

import math


class CascadeError(Exception):
    """Base class: every user-facing error of the package (the CLI prints it as one line)."""


class ConfigError(CascadeError, ValueError):
    """A configuration or parameter value is outside what is allowed."""


class DataError(CascadeError):
    """Input data is missing or malformed."""


class CheckpointError(CascadeError):
    """A checkpoint file is corrupt, of the wrong kind, or mismatched with its use."""


def check_choice(field: str, value: object, allowed: "list | tuple | set") -> None:
    """Raise ConfigError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        choices = ", ".join(repr(a) for a in sorted(allowed, key=str))
        raise ConfigError(f"{field}={value!r} is not allowed; choose one of {choices}")


def check_int(field: str, value: object, lo: int) -> None:
    """Raise ConfigError unless ``value`` is an integer (not a bool) with ``value >= lo``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{field}={value!r} is not allowed; expected an integer >= {lo}")
    check_range(field, value, lo)


def check_range(
    field: str,
    value: float,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    """Raise ConfigError unless ``value`` is finite and ``lo <= value <= hi`` (bounds optional, open or
    closed): an infinite or NaN setting is never meaningful and would otherwise decode garbage."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{field}={value!r} is not a finite number; allowed {_interval(lo, hi, lo_open, hi_open)}")
    bad = (
        (lo is not None and (value < lo or (lo_open and value == lo)))
        or (hi is not None and (value > hi or (hi_open and value == hi)))
        or value != value  # NaN
    )
    if bad:
        raise ConfigError(f"{field}={value!r} is out of range; allowed {_interval(lo, hi, lo_open, hi_open)}")


def _interval(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    """``[lo, hi]`` with open ends as parentheses and a missing bound as ±inf."""
    lo_s = "-inf" if lo is None else f"{lo:g}"
    hi_s = "inf" if hi is None else f"{hi:g}"
    return f"{'(' if lo_open else '['}{lo_s}, {hi_s}{')' if hi_open else ']'}"
