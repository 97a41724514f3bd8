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
    """Accumulates per-round counts and timings during one decode call.

    Model time is added with ``add_model``; the part added between ``begin_round`` and
    ``record_round`` is that round's model time, so forwards outside rounds (the prefill) count
    in the totals but never in the engine-overhead share of round time.
    """

    accepted: list[torch.Tensor] = field(default_factory=list)
    round_seconds: list[float] = field(default_factory=list)
    round_model_seconds: list[float] = field(default_factory=list)
    computed_rows: list[int] = field(default_factory=list)
    live_rows: int = 0
    forwards: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    model_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    _in_round: float = 0.0

    def add_model(self, key: str, seconds: float, forwards: int = 1) -> None:
        """Count ``forwards`` forwards of model ``key`` ("target" or "drafter") that took ``seconds``."""
        self.forwards[key] += forwards
        self.model_seconds[key] += seconds
        self._in_round += seconds

    def begin_round(self) -> None:
        """Start a round: model time added from here on is the round's."""
        self._in_round = 0.0

    def record_round(self, accepted: torch.Tensor, seconds: float, *, computed_rows: int) -> None:
        """Close a batched round: accepted counts of its live rows, its wall time and the rows its
        forwards computed (live rows plus any finished rows riding along as padding). The counts stay
        tensors until ``summary``: no per-round conversion (nor, on a GPU, a per-round copy)."""
        self.accepted.append(accepted)
        self.round_seconds.append(seconds)
        self.round_model_seconds.append(self._in_round)
        self.computed_rows.append(computed_rows)
        self.live_rows += int(accepted.numel())

    def summary(self, *, seconds: float, batch: int, tokens_per_image: int, images: int | None = None) -> dict[str, Any]:
        """The statistics dict every decode result carries, for ``images`` images (default ``batch``)
        decoded at most ``batch`` at a time.

        ``full_batch_round_model_seconds``: mean model time of a round that computed all ``batch``
        rows, the per-round draft + verify cost of the speedup cost model (DESIGN 7).
        """
        images = batch if images is None else images
        acc = torch.cat(self.accepted).detach().cpu().numpy() if self.accepted else np.zeros(0, dtype=np.int64)
        round_total = float(sum(self.round_seconds))
        model_in_rounds = float(sum(self.round_model_seconds))
        full = [m for m, rows in zip(self.round_model_seconds, self.computed_rows) if rows == batch]
        computed = sum(self.computed_rows)
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
            "seconds_per_image": seconds / images,
            "tokens_per_second": images * tokens_per_image / seconds,
            "engine_overhead_fraction": max(0.0, 1.0 - model_in_rounds / round_total) if round_total > 0 else 0.0,
            "padding_fraction": 1.0 - self.live_rows / computed if computed else 0.0,
            "mean_rows_per_round": computed / len(self.computed_rows) if self.computed_rows else 0.0,
            "full_batch_round_model_seconds": float(np.mean(full)) if full else float("nan"),
        }
