"""Speed statistics of speculative decoding, defined once (DESIGN 3, 7).

A *round* is one draft → verify → commit cycle of one image; ``a`` is the number of drafted
tokens it accepted. **Mean accepted length τ = mean over rounds of (a + 1)** (the +1 is the
bonus token). The first token of every image comes from the prefill forward and is not a round.
Forward counts are per batch (one forward serves every row of the batch).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


def mean_accepted_length(accepted: np.ndarray) -> float:
    """τ = mean over rounds of (accepted + 1)."""
    accepted = np.asarray(accepted)
    return float((accepted + 1).mean()) if accepted.size else float("nan")


def accept_histogram(accepted: np.ndarray, max_len: int | None = None) -> list[int]:
    """Counts of rounds that accepted 0, 1, 2, … drafted tokens."""
    accepted = np.asarray(accepted, dtype=np.int64)
    size = (max_len if max_len is not None else int(accepted.max(initial=0))) + 1
    return np.bincount(accepted, minlength=size).tolist()


@dataclass
class RoundStats:
    """Accumulates per-round counts and timings during one decode call."""

    accepted: list[np.ndarray] = field(default_factory=list)
    round_seconds: list[float] = field(default_factory=list)
    active_rows: int = 0
    row_slots: int = 0
    forwards: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    model_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def record_round(self, accepted: torch.Tensor, seconds: float, *, active_rows: int, batch: int) -> None:
        """Add one batched round: accepted counts of its active rows and its wall time."""
        self.accepted.append(accepted.detach().cpu().numpy())
        self.round_seconds.append(seconds)
        self.active_rows += active_rows
        self.row_slots += batch

    def summary(self, *, seconds: float, batch: int, tokens_per_image: int) -> dict[str, Any]:
        """The statistics dict every decode result carries."""
        acc = np.concatenate(self.accepted) if self.accepted else np.zeros(0, dtype=np.int64)
        round_total = float(sum(self.round_seconds))
        model_in_rounds = float(sum(self.model_seconds.values()))
        return {
            "mean_accepted_length": mean_accepted_length(acc),
            "accept_histogram": accept_histogram(acc),
            "rounds": int(acc.size),
            "batched_rounds": len(self.round_seconds),
            "target_forwards": int(self.forwards["target"]),
            "drafter_forwards": int(self.forwards["drafter"]),
            "target_seconds": float(self.model_seconds["target"]),
            "drafter_seconds": float(self.model_seconds["drafter"]),
            "seconds": seconds,
            "seconds_per_image": seconds / batch,
            "tokens_per_second": batch * tokens_per_image / seconds,
            "engine_overhead_fraction": max(0.0, 1.0 - model_in_rounds / round_total) if round_total > 0 else 0.0,
            "padding_fraction": 1.0 - self.active_rows / self.row_slots if self.row_slots else 0.0,
        }
