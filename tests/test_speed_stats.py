"""Speed statistics are defined once (DESIGN 3): τ, accepted-count histogram, round bookkeeping."""

import numpy as np
import pytest
import torch

from cascade_sd.metrics.speed import RoundStats, accept_histogram, mean_accepted_length


def test_tau_is_mean_of_accepted_plus_one():
    assert mean_accepted_length(np.array([0, 2, 4])) == pytest.approx(3.0)
    assert mean_accepted_length(np.array([0, 0])) == 1.0
    assert np.isnan(mean_accepted_length(np.array([], dtype=int)))


def test_histogram_counts_rounds_per_accepted_length():
    assert accept_histogram(np.array([0, 2, 2, 5])) == [1, 0, 2, 0, 0, 1]
    assert accept_histogram(np.array([1]), max_len=3) == [0, 1, 0, 0]


def test_round_stats_summary():
    s = RoundStats()
    s.record_round(torch.tensor([1, 3]), 0.5, active_rows=2, batch=2)
    s.record_round(torch.tensor([0]), 0.25, active_rows=1, batch=2)
    s.forwards["target"] += 3
    s.forwards["drafter"] += 6
    s.model_seconds["target"] += 0.3
    s.model_seconds["drafter"] += 0.3
    out = s.summary(seconds=1.0, batch=2, tokens_per_image=8)
    assert out["mean_accepted_length"] == pytest.approx((2 + 4 + 1) / 3)
    assert out["accept_histogram"] == [1, 1, 0, 1]
    assert out["rounds"] == 3 and out["batched_rounds"] == 2
    assert out["padding_fraction"] == pytest.approx(0.25)
    assert out["engine_overhead_fraction"] == pytest.approx(1 - 0.6 / 0.75)
    assert out["tokens_per_second"] == pytest.approx(16.0)
    assert out["target_forwards"] == 3 and out["drafter_forwards"] == 6
