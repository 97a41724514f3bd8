"""Drift estimators with bootstrap confidence intervals (DESIGN 6, issue 5).

- ``sequence_bound``: the certified upper bound on TV between a method's image-token law and the
  target's, Σ_t E[per-position TV] (hybrid argument), from the exact per-node drift recorded along
  runs; the CI is a bootstrap over images.
- ``token_marginal_tv``: per position, the plug-in TV between the empirical token marginals of
  two sample sets. Biased *upward* by sampling noise (≈ √(V/n) for spread laws); the same
  estimator on two halves of one set (``noise_floor``) shows the bias. Its interval is the
  *basic* bootstrap (2θ̂ − upper, 2θ̂ − lower quantiles), which moves against the bias the
  resampling adds; the percentile interval would sit above the estimate.
- ``classifier_tv``: a two-sample estimate on judge features: a held-out logistic-regression
  classifier's balanced accuracy gives TV ≥ 2·acc − 1. Biased *downward* (a linear classifier on
  these features sees only part of the difference); a lower bound, not an estimate of TV itself.
- ``sampler_tv``, ``target_tv``, ``sequence_kl``: the sequence-level distance itself, unbiased,
  from the exact log-ratio r(x) = log P_SD(x) − log P(x) of each image
  (``cascade_sd.metrics.sequence``): TV = E_{x∼P_SD}[(1 − e^{−r})₊] from the sampler's images,
  TV = E_{x∼P}[(1 − e^{r})₊] from the target's, KL(P_SD ‖ P) = E_{x∼P_SD}[r]. Every TV term lies in
  [0, 1], so its interval is the Wilson score interval at the largest variance a [0, 1] term with
  that mean can have, μ(1 − μ): it cannot collapse when a few images happen to agree (a Student-t
  interval over 2 images of equal terms has width 0). KL's terms are unbounded: Student-t.
  ``tv_estimates_agree`` checks the two TV estimates against each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scipy import stats

from cascade_sd.errors import DataError, check_range
from cascade_sd.metrics.quality import bootstrap_ci


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a (1 − alpha) bootstrap interval."""

    value: float
    lower: float
    upper: float

    def as_dict(self, prefix: str) -> dict[str, float]:
        """``{prefix: value, prefix_lower: …, prefix_upper: …}``."""
        return {prefix: self.value, f"{prefix}_lower": self.lower, f"{prefix}_upper": self.upper}


def sequence_bound(drift: np.ndarray, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> Estimate:
    """Σ_t E[TV_t] from per-node drift [images, positions], with a bootstrap CI over images."""
    drift = np.asarray(drift, dtype=np.float64)
    if drift.ndim != 2 or drift.shape[0] < 1:
        raise DataError(f"drift must be [images, positions] with at least one image, got shape {drift.shape}")
    return Estimate(*bootstrap_ci(drift.sum(1), n_boot=n_boot, alpha=alpha, seed=seed))


def _marginals(tokens: np.ndarray, vocab: int) -> np.ndarray:
    """[positions, V] empirical token frequencies of samples [n, positions]."""
    n, positions = tokens.shape
    counts = np.zeros((positions, vocab))
    np.add.at(counts, (np.broadcast_to(np.arange(positions), tokens.shape), tokens), 1.0)
    return counts / n


def token_marginal_tv(a: np.ndarray, b: np.ndarray, vocab: int, *, n_boot: int = 200, alpha: float = 0.05,
                      seed: int = 0) -> tuple[np.ndarray, Estimate]:
    """(per-position plug-in TV [positions], mean over positions with a basic-bootstrap CI over samples)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise DataError(f"token samples must be [n, positions] with equal positions and n ≥ 2, got {a.shape} and {b.shape}")
    per_position = 0.5 * np.abs(_marginals(a, vocab) - _marginals(b, vocab)).sum(1)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        ra, rb = a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))]
        boots.append(0.5 * np.abs(_marginals(ra, vocab) - _marginals(rb, vocab)).sum(1).mean())
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    value = float(per_position.mean())
    return per_position, Estimate(value, max(0.0, 2 * value - float(hi)), 2 * value - float(lo))


def noise_floor(tokens: np.ndarray, vocab: int, *, seed: int = 0) -> float:
    """Mean plug-in token-marginal TV between two random halves of one sample set (pure bias)."""
    tokens = np.asarray(tokens)
    order = np.random.default_rng(seed).permutation(len(tokens))
    half = len(tokens) // 2
    per_position, _ = token_marginal_tv(tokens[order[:half]], tokens[order[half : 2 * half]], vocab, n_boot=1)
    return float(per_position.mean())


def classifier_tv(features_a: np.ndarray, features_b: np.ndarray, *, holdout: float = 0.5, n_boot: int = 1000,
                  alpha: float = 0.05, seed: int = 0) -> Estimate:
    """Lower-bound estimate of TV between two feature samples: max(0, 2·balanced held-out accuracy − 1)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    check_range("holdout", holdout, 0.0, 1.0, lo_open=True)
    xa, xb = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if xa.ndim != 2 or xb.ndim != 2 or xa.shape[1] != xb.shape[1] or min(len(xa), len(xb)) < 4:
        raise DataError(f"features must be [n, d] with equal d and n ≥ 4, got {xa.shape} and {xb.shape}")
    rng = np.random.default_rng(seed)
    x = np.concatenate([xa, xb])
    y = np.concatenate([np.zeros(len(xa)), np.ones(len(xb))])
    test = np.zeros(len(x), dtype=bool)
    for label in (0, 1):
        idx = np.flatnonzero(y == label)
        test[rng.choice(idx, max(1, int(round(holdout * len(idx)))), replace=False)] = True
    scaler = StandardScaler().fit(x[~test])
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(x[~test]), y[~test])
    correct = clf.predict(scaler.transform(x[test])) == y[test]
    y_test = y[test]

    def tv_of(c: np.ndarray, labels: np.ndarray) -> float:
        accs = [c[labels == k].mean() for k in (0, 1) if (labels == k).any()]
        return max(0.0, 2.0 * float(np.mean(accs)) - 1.0)

    value = tv_of(correct, y_test)
    boots = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(correct), len(correct))
        boots.append(tv_of(correct[pick], y_test[pick]))
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return Estimate(value, float(lo), float(hi))


def mean_ci(terms: np.ndarray, *, alpha: float = 0.05) -> Estimate:
    """Mean of per-image ``terms`` with a Student-t (1 − alpha) interval; one image gives (−∞, ∞)."""
    terms = _terms(terms)
    value = float(terms.mean())
    if len(terms) == 1:
        return Estimate(value, -np.inf, np.inf)
    half = float(stats.t.ppf(1 - alpha / 2, len(terms) - 1) * terms.std(ddof=1) / np.sqrt(len(terms)))
    return Estimate(value, value - half, value + half)


def bounded_mean_ci(terms: np.ndarray, *, alpha: float = 0.05) -> Estimate:
    """Mean of per-image ``terms`` in [0, 1] with the Wilson score (1 − alpha) interval at variance μ(1 − μ),
    the largest a [0, 1] term with mean μ can have: valid whatever the spread the images happen to show."""
    terms = _terms(terms)
    n, mu = len(terms), float(np.clip(terms.mean(), 0.0, 1.0))
    z2 = float(stats.norm.ppf(1 - alpha / 2)) ** 2
    centre = (mu + z2 / (2 * n)) / (1 + z2 / n)
    half = float(np.sqrt(z2 * (mu * (1 - mu) / n + z2 / (4 * n * n)))) / (1 + z2 / n)
    return Estimate(float(terms.mean()), max(0.0, centre - half), min(1.0, centre + half))


def _terms(terms: np.ndarray) -> np.ndarray:
    terms = np.asarray(terms, dtype=np.float64)
    if terms.ndim != 1 or len(terms) < 1 or not np.isfinite(terms).all():
        raise DataError(f"per-image terms must be a finite vector with at least one entry, got shape {terms.shape}")
    return terms


def sampler_tv(log_ratio: np.ndarray, *, alpha: float = 0.05) -> Estimate:
    """TV(P_SD, P) = E_{x∼P_SD}[(1 − P(x)/P_SD(x))₊] from r = log P_SD − log P on the sampler's images."""
    return bounded_mean_ci(-np.expm1(-np.maximum(np.asarray(log_ratio, dtype=np.float64), 0.0)), alpha=alpha)


def target_tv(log_ratio: np.ndarray, *, alpha: float = 0.05) -> Estimate:
    """TV(P_SD, P) = E_{x∼P}[(1 − P_SD(x)/P(x))₊] from r = log P_SD − log P on the target's images."""
    return bounded_mean_ci(-np.expm1(np.minimum(np.asarray(log_ratio, dtype=np.float64), 0.0)), alpha=alpha)


def sequence_kl(log_ratio: np.ndarray, *, alpha: float = 0.05) -> Estimate:
    """KL(P_SD ‖ P) = E_{x∼P_SD}[log P_SD(x) − log P(x)] in nats, from the sampler's images."""
    return mean_ci(log_ratio, alpha=alpha)


def tv_estimates_agree(a: Estimate, b: Estimate) -> bool:
    """Whether two estimates of one TV agree: their intervals overlap."""
    return bool(a.lower <= b.upper and b.lower <= a.upper)
