"""Calibration of the drift estimators (issue 5): 95% bootstrap intervals cover the known truth
in at least 90% of seeded repetitions, and the stated bias directions show."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.estimators import classifier_tv, noise_floor, sequence_bound, token_marginal_tv
from cascade_sd.errors import DataError

REPS = 100


def test_sequence_bound_interval_covers_the_true_sum_of_means():
    means = np.array([0.0, 0.05, 0.2, 0.1])  # per-position expected drift; truth Σ = 0.35
    covered = 0
    for rep in range(REPS):
        rng = np.random.default_rng(rep)
        drift = rng.uniform(0.0, 2.0 * means, size=(60, 4))  # E = means
        est = sequence_bound(drift, n_boot=500, seed=rep)
        covered += est.lower <= means.sum() <= est.upper
    assert covered >= 0.9 * REPS


def test_token_marginal_interval_covers_a_known_tv():
    p = np.array([0.30, 0.25, 0.20, 0.15, 0.10])
    q = np.array([0.22, 0.33, 0.12, 0.23, 0.10])
    truth = 0.5 * np.abs(p - q).sum()
    covered = 0
    for rep in range(REPS):
        rng = np.random.default_rng(1000 + rep)
        a = rng.choice(5, size=(3000, 1), p=p)
        b = rng.choice(5, size=(3000, 1), p=q)
        _, est = token_marginal_tv(a, b, 5, n_boot=300, seed=rep)
        covered += est.lower <= truth <= est.upper
    assert covered >= 0.9 * REPS


def test_token_marginal_plug_in_is_biased_upward():
    rng = np.random.default_rng(0)
    same = rng.choice(50, size=(400, 3))
    assert noise_floor(same, 50) > 0.05  # equal laws, yet a clearly positive plug-in TV


def test_classifier_tv_covers_the_gaussian_truth():
    mu = 1.0  # TV(N(0, I), N(mu·e1, I)) = 2Φ(mu/2) − 1, which an optimal linear classifier attains
    truth = 2 * (0.5 * (1 + math.erf(mu / 2 / math.sqrt(2)))) - 1
    covered = 0
    reps = 40
    for rep in range(reps):
        rng = np.random.default_rng(2000 + rep)
        a = rng.normal(size=(1500, 3))
        b = rng.normal(size=(1500, 3)) + np.array([mu, 0.0, 0.0])
        est = classifier_tv(a, b, n_boot=300, seed=rep)
        covered += est.lower <= truth <= est.upper
    assert covered >= 0.9 * reps


def test_estimators_reject_bad_shapes():
    with pytest.raises(DataError, match="drift must be"):
        sequence_bound(np.zeros(5))
    with pytest.raises(DataError, match="token samples must be"):
        token_marginal_tv(np.zeros((3, 2), dtype=int), np.zeros((3, 4), dtype=int), 5)
