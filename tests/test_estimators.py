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


def test_measured_sequence_tv_and_kl_cover_the_exact_values():
    """On a toy whose joint laws are enumerable, the sequence TV measured from the sampler's images and from
    the target's, and the KL, cover the exact values (99.9% intervals; a deterministic seeded check)."""
    from analysis.estimators import sampler_tv, sequence_kl, target_tv, tv_estimates_agree
    from analysis.exact_toy import as_float64, exact_joint_law, target_conditionals, target_joint_law
    from cascade_sd import api

    bundle = as_float64(api.load_bundle("toy:vocab=4,len=3,seed=2"))
    setting = {"method": "coolsd", "tree": "chain-2", "cfg_scale": 2.0, "delta": 2.0}
    joint = exact_joint_law(bundle, 1, **setting)
    target = target_joint_law(target_conditionals(bundle, 1, cfg_scale=2.0), 3)
    exact_tv = joint.tv(target)
    exact_kl = sum(p * math.log(p / target[x]) for x, p in joint.law.items() if p > 0)
    labels = [1] * 150
    sd = api.decode(bundle, labels, method="coolsd", tree="chain-2", cfg_scale=2.0, delta=2.0, seed=5).tokens
    vanilla = api.decode(bundle, labels, method="vanilla", cfg_scale=2.0, seed=6).tokens
    on_sd = api.sequence_log_prob(bundle, labels, sd, **setting).log_ratio.numpy()
    on_target = api.sequence_log_prob(bundle, labels, vanilla, **setting).log_ratio.numpy()
    for estimate, exact in ((sampler_tv(on_sd, alpha=1e-3), exact_tv), (target_tv(on_target, alpha=1e-3), exact_tv),
                            (sequence_kl(on_sd, alpha=1e-3), exact_kl)):
        assert estimate.lower <= exact <= estimate.upper, (estimate, exact)
    assert tv_estimates_agree(sampler_tv(on_sd), target_tv(on_target))
    assert exact_tv > 0.1


def test_tv_intervals_do_not_collapse_on_a_few_equal_images_and_bad_terms_are_errors():
    """Two images with the same term: a Student-t interval would have width 0; the bounded-variance (Wilson)
    interval still spans what two images cannot exclude."""
    from analysis.estimators import mean_ci, sampler_tv

    zero = sampler_tv(np.array([-1.0, -2.0]))  # P_SD < P on both images: each term is 0
    assert zero.value == 0.0 and zero.lower == 0.0 and zero.upper > 0.6
    one = sampler_tv(np.array([30.0, 40.0]))
    assert one.value == pytest.approx(1.0) and one.lower < 0.4 and one.upper == 1.0
    assert sampler_tv(np.full(200, 30.0)).lower > 0.98  # many images: tight
    with pytest.raises(DataError, match="finite vector"):
        mean_ci(np.array([np.nan, 1.0]))


def test_sequence_checks_flag_a_tv_above_a_bound_and_disagreeing_estimates():
    from analysis.estimators import Estimate
    from analysis.sequence_tv import measure, problems

    r = np.full(8, 20.0)  # every image ~e^20 times likelier under the sampler: TV ≈ 1 both ways
    near_one = measure({"sampler_log_sd": r, "sampler_log_target": np.zeros(8), "target_log_sd": -r,
                        "target_log_target": np.zeros(8), "exact": np.ones(16, bool)})
    assert near_one.agree and near_one.tv.value == pytest.approx(1.0)
    assert problems(near_one, Estimate(2.0, 1.8, 2.2), None) == []
    assert "exceeds the hybrid bound" in problems(near_one, Estimate(0.5, 0.4, 0.6), None)[0]
    assert "exceeds the certified bound" in problems(near_one, None, Estimate(0.5, 0.4, 0.6))[0]
    mixed = measure({"sampler_log_sd": r, "sampler_log_target": np.zeros(8), "target_log_sd": np.zeros(8),
                     "target_log_target": np.zeros(8), "exact": np.ones(16, bool)})
    assert not mixed.agree and "disagree" in problems(mixed, None, None)[0]
