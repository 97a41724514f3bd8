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
    s.add_model("target", 0.5)  # a prefill: counted in the totals, outside every round
    s.begin_round()
    s.add_model("target", 0.2)
    s.add_model("drafter", 0.2, forwards=3)
    s.record_round(torch.tensor([1, 3]), 0.5, computed_rows=2)
    s.begin_round()
    s.add_model("target", 0.1)
    s.add_model("drafter", 0.1, forwards=3)
    s.record_round(torch.tensor([0]), 0.25, computed_rows=2)  # one finished row rode along
    s.begin_round()
    s.add_model("target", 0.05)
    s.record_round(torch.tensor([2]), 0.1, computed_rows=1)  # the batch shrank to its live row
    out = s.summary(seconds=2.0, batch=2, tokens_per_image=8)
    assert out["mean_accepted_length"] == pytest.approx((2 + 4 + 1 + 3) / 4)
    assert out["accept_histogram"] == [1, 1, 1, 1]
    assert out["rounds"] == 4 and out["batched_rounds"] == 3
    assert out["target_forwards"] == 4 and out["drafter_forwards"] == 6
    assert out["target_seconds"] == pytest.approx(0.85) and out["drafter_seconds"] == pytest.approx(0.3)
    assert out["padding_fraction"] == pytest.approx(1 - 4 / 5)
    assert out["mean_rows_per_round"] == pytest.approx(5 / 3)
    # Only model time inside rounds counts against round time; the prefill's 0.5 s does not.
    assert out["engine_overhead_fraction"] == pytest.approx(1 - 0.65 / 0.85)
    # The cost model's round cost: mean model time of the rounds that computed the whole batch.
    assert out["full_batch_round_model_seconds"] == pytest.approx((0.4 + 0.2) / 2)
    assert out["tokens_per_second"] == pytest.approx(8.0)
