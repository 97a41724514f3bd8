"""Measured sequence-level drift of a decode run (issue 23): TV and KL from exact log-ratios.

A run's ``sequence.npz`` (grid decode cells; ``cascade-sd drift RUN`` for any decode folder) holds,
for some of the sampler's images and as many target images, log P_SD(x) and log P(x) computed
exactly (``cascade_sd.metrics.sequence``). From them: TV estimated both ways, KL(P_SD ‖ P), and the
checks the measurement makes possible — the two TV estimates agree, and the measured TV stays
below the hybrid bound Σ_t E[TV_t] and below the rule's certified bound Σ_t (declared node bound),
each beyond the intervals (``problems``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from analysis.estimators import Estimate, sampler_tv, sequence_kl, target_tv, tv_estimates_agree
from cascade_sd.errors import DataError

#: Allowed excess of a measured TV over a bound: log P_SD and log P read the target's laws from different
#: forward passes (tree attention vs a teacher-forced sequence); in float32 an exact sampler's log-ratio
#: is ~1e-6 per image, not 0.
NUMERICAL_TOLERANCE = 1e-4

KEYS = ("sampler_log_sd", "sampler_log_target", "target_log_sd", "target_log_target", "exact")


@dataclass(frozen=True)
class Measured:
    """Sequence TV from the sampler's images (``tv``) and from the target's (``tv_target``), KL, the
    per-image log-ratios on the sampler's images, and whether every log P_SD was exact."""

    tv: Estimate
    tv_target: Estimate
    kl: Estimate
    log_ratio: np.ndarray
    exact: bool

    @property
    def agree(self) -> bool:
        """Whether the two TV estimates agree (``tv_estimates_agree``)."""
        return tv_estimates_agree(self.tv, self.tv_target)

    def as_dict(self) -> dict[str, object]:
        """Flat fields for a results row (values, [lower, upper] intervals, images, flags)."""
        return {"sequence_tv": self.tv.value, "sequence_tv_ci": [self.tv.lower, self.tv.upper],
                "sequence_tv_target": self.tv_target.value,
                "sequence_tv_target_ci": [self.tv_target.lower, self.tv_target.upper],
                "sequence_kl": self.kl.value, "sequence_kl_ci": [self.kl.lower, self.kl.upper],
                "sequence_images": int(len(self.log_ratio)), "sequence_exact": self.exact,
                "sequence_tv_agree": self.agree}


def load(paths: list[Path]) -> dict[str, np.ndarray] | None:
    """The arrays of every ``sequence.npz`` in ``paths`` that exists, concatenated (None if none does)."""
    found = [p for p in paths if p.is_file()]
    if not found:
        return None
    parts = []
    for path in found:
        try:
            with np.load(path) as z:
                parts.append({k: z[k] for k in KEYS})
        except (OSError, KeyError, ValueError) as err:
            raise DataError(f"{path}: not a sequence-law file ({err})") from None
    return {k: np.concatenate([p[k] for p in parts]) for k in KEYS}


def measure(arrays: dict[str, np.ndarray], *, alpha: float = 0.05) -> Measured:
    """TV both ways and KL with (1 − alpha) Student-t intervals over images."""
    on_sd = arrays["sampler_log_sd"] - arrays["sampler_log_target"]
    on_target = arrays["target_log_sd"] - arrays["target_log_target"]
    return Measured(tv=sampler_tv(on_sd, alpha=alpha), tv_target=target_tv(on_target, alpha=alpha),
                    kl=sequence_kl(on_sd, alpha=alpha), log_ratio=on_sd, exact=bool(arrays["exact"].all()))


def problems(measured: Measured, hybrid: Estimate | None, certified: Estimate | None) -> list[str]:
    """What the measurement contradicts: the two TV estimates disagree, or the measured TV exceeds the
    hybrid bound or the certified bound beyond both intervals (each would be a bug or a false bound)."""
    out = []
    if not measured.agree:
        out.append(f"the two sequence-TV estimates disagree: {_fmt(measured.tv)} from the sampler's images vs "
                   f"{_fmt(measured.tv_target)} from the target's")
    for name, bound in (("hybrid bound Σ_t E[TV_t]", hybrid), ("certified bound Σ_t (declared node bound)", certified)):
        if bound is not None and measured.tv.lower > bound.upper + NUMERICAL_TOLERANCE:
            out.append(f"measured sequence TV {_fmt(measured.tv)} exceeds the {name} {_fmt(bound)}")
    return out


def _fmt(e: Estimate) -> str:
    return f"{e.value:.4g} [{e.lower:.4g}, {e.upper:.4g}]"
