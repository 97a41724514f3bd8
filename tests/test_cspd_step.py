"""Exactness of CSpD's accept/resample step with closed-form Gaussian laws (issue 8, DESIGN 5)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats

from cascade_sd.continuous.step import (
    GaussianLaw, acceptance_probability, residual_keep_probability, sample_residual, verify_drafts,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _law(mean: float, std: float) -> GaussianLaw:
    return GaussianLaw(torch.tensor([[mean]], dtype=torch.float64), torch.tensor([[std]], dtype=torch.float64))


def _output_density(p: GaussianLaw, q: GaussianLaw, grid: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Density of the step's output on a 1-D grid, through the implementation's acceptance and keep
    probabilities: q·a + P(reject)·(p·keep)/∫p·keep (the acceptance–rejection loop's output law)."""
    x = grid[:, None]
    log_p, log_q = p.log_prob(x), q.log_prob(x)
    accepted = log_q.exp() * acceptance_probability(log_p, log_q, temperature)
    kept = log_p.exp() * residual_keep_probability(log_p, log_q)
    dx = float(grid[1] - grid[0])
    reject = 1 - torch.trapezoid(accepted, dx=dx)
    return accepted + reject * kept / torch.trapezoid(kept, dx=dx)


@settings(max_examples=60)
@given(mp=st.floats(-3, 3), mq=st.floats(-3, 3), sp=st.floats(0.2, 3), sq=st.floats(0.2, 3))
def test_step_reproduces_p_on_a_grid(mp, mq, sp, sq):
    p, q = _law(mp, sp), _law(mq, sq)
    grid = torch.linspace(min(mp, mq) - 14 * max(sp, sq), max(mp, mq) + 14 * max(sp, sq), 80001, dtype=torch.float64)
    dx = float(grid[1] - grid[0])
    target = p.log_prob(grid[:, None]).exp()
    tv = float(torch.trapezoid((target - q.log_prob(grid[:, None]).exp()).clamp_min(0), dx=dx))
    assume(tv > 1e-4)  # with p ≈ q nothing is resampled and the residual term is 0/0 numerically
    l1 = float(torch.trapezoid((_output_density(p, q, grid) - target).abs(), dx=dx))
    assert l1 < 1e-6


def test_softened_ratio_is_not_exact():
    """The authors' temperature (42) accepts more and drifts: the grid check must see it."""
    p, q = _law(0.0, 1.0), _law(1.0, 1.0)
    grid = torch.linspace(-20, 20, 80001, dtype=torch.float64)
    out = _output_density(p, q, grid, temperature=42.0)
    l1 = float(torch.trapezoid((out - p.log_prob(grid[:, None]).exp()).abs(), dx=float(grid[1] - grid[0])))
    assert l1 > 0.1


def test_residual_sampler_matches_the_residual_law():
    """Samples of [p − q]_+ (acceptance–rejection with proposal p) vs its CDF by numerical integration."""
    p, q = _law(0.3, 1.0), _law(-0.2, 0.7)
    n = 20000
    gen = torch.Generator().manual_seed(0)
    y, tries, capped = sample_residual(p.expand(n), q.expand(n), gen)
    grid = torch.linspace(-15, 15, 60001, dtype=torch.float64)
    resid = (p.log_prob(grid[:, None]).exp() - q.log_prob(grid[:, None]).exp()).clamp_min(0)
    cdf = torch.cumulative_trapezoid(resid, dx=float(grid[1] - grid[0]))
    cdf = torch.cat([torch.zeros(1, dtype=cdf.dtype), cdf]) / cdf[-1]
    result = stats.kstest(y.reshape(-1).numpy(), lambda v: np.interp(v, grid.numpy(), cdf.numpy()))
    assert result.pvalue > 1e-3
    tv = float(torch.trapezoid(resid, dx=float(grid[1] - grid[0])))
    assert not capped.any()
    assert abs(float(tries.double().mean()) - 1 / tv) < 0.05 / tv  # geometric with success prob TV(p, q)


def _step_samples(p: GaussianLaw, q: GaussianLaw, n: int, gen: torch.Generator, temperature: float = 1.0):
    """n independent single-draft steps: x ~ q, keep or redraw; returns the outputs [n, d]."""
    drafts = q.expand(n).sample(torch.randn((n, *q.mean.shape), generator=gen, dtype=q.mean.dtype))
    out = verify_drafts(drafts, p.expand(n), q.expand(n), torch.ones(n, dtype=torch.long), gen,
                        ratio_temperature=temperature)
    return torch.where(out.accepted[:, None] == 1, drafts[:, 0], out.correction)


def _two_sample_p(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> float:
    """Bonferroni-combined KS p-value over the coordinates and 4 random projections."""
    dirs = np.concatenate([np.eye(a.shape[1]), rng.normal(size=(4, a.shape[1]))])
    pvals = [stats.ks_2samp(a @ v, b @ v).pvalue for v in dirs]
    return min(1.0, min(pvals) * len(pvals))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_step_reproduces_p_in_several_dimensions(seed):
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    d, n = 3, 20000
    p = GaussianLaw(torch.randn(1, d, generator=gen, dtype=torch.float64),
                    0.5 + torch.rand(1, d, generator=gen, dtype=torch.float64))
    q = GaussianLaw(p.mean + 0.8 * torch.randn(1, d, generator=gen, dtype=torch.float64),
                    0.5 + torch.rand(1, d, generator=gen, dtype=torch.float64))
    out = _step_samples(p, q, n, gen).numpy()
    ref = p.expand(n).sample(torch.randn((n, 1, d), generator=gen, dtype=torch.float64))[:, 0].numpy()
    assert _two_sample_p(out, ref, rng) > 1e-3
    # Power: the same test sees the drift of the softened ratio and of drafts kept without resampling.
    soft = _step_samples(p, q, n, gen, temperature=42.0).numpy()
    assert _two_sample_p(soft, ref, rng) < 1e-6
    raw = q.expand(n).sample(torch.randn((n, 1, d), generator=gen, dtype=torch.float64))[:, 0].numpy()
    assert _two_sample_p(raw, ref, rng) < 1e-6


def test_verify_drafts_degenerate_cases():
    gen = torch.Generator().manual_seed(0)
    b, gamma, d = 5, 4, 2
    same = GaussianLaw(torch.randn(b, gamma, d, generator=gen), torch.full((b, gamma, d), 0.3))
    drafts = same.sample(torch.randn(b, gamma, d, generator=gen))
    limit = torch.tensor([4, 3, 2, 1, 0])
    out = verify_drafts(drafts, same, same, limit, gen)
    assert out.accepted.tolist() == limit.tolist() and not out.rejected.any() and (out.tries == 0).all()
    far = GaussianLaw(same.mean + 100.0, same.std)  # p puts no mass near the drafts
    out = verify_drafts(drafts, far, same, torch.full((b,), gamma), gen)
    assert (out.accepted == 0).all() and out.rejected.all() and (out.tries == 1).all()
    assert torch.allclose(out.correction, far.mean[:, 0], atol=3.0)  # drawn from p's neighbourhood


def test_capped_residual_is_flagged():
    """Nearly equal laws make the residual rare; a tiny try budget must flag the cap, not hide it."""
    p, q = _law(0.0, 1.0), _law(1e-4, 1.0)
    gen = torch.Generator().manual_seed(0)
    _, tries, capped = sample_residual(p.expand(200), q.expand(200), gen, max_tries=8, chunk=4)
    assert capped.sum() > 150 and int(tries.max()) == 8


def test_log_prob_matches_scipy():
    law = GaussianLaw(torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([2.0, 0.3], dtype=torch.float64))
    x = torch.tensor([1.0, 0.0], dtype=torch.float64)
    expected = stats.norm(0.5, 2.0).logpdf(1.0) + stats.norm(-1.0, 0.3).logpdf(0.0)
    assert math.isclose(float(law.log_prob(x)), expected, rel_tol=1e-12)
