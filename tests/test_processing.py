"""The target law p: CFG, temperature, top-k and top-p on hand-made logits (DESIGN 3)."""

import math

import pytest
import torch

from cascade_sd.decoding.processing import (
    NodeLaws,
    SamplingParams,
    apply_cfg,
    filter_logits,
    law_from_logits,
    draw_without_replacement,
    sample_from_law,
    target_law,
)
from cascade_sd.errors import ConfigError


def test_cfg_combines_cond_and_uncond_on_logits():
    c = torch.tensor([[2.0, 0.0, -1.0]])
    u = torch.tensor([[1.0, 1.0, 1.0]])
    assert torch.allclose(apply_cfg(c, u, 3.0), torch.tensor([[4.0, -2.0, -5.0]]))
    stacked = torch.cat([c, u])
    law = target_law(stacked, SamplingParams(cfg_scale=3.0))
    assert law.shape == (1, 3)
    assert torch.allclose(law, torch.softmax(torch.tensor([[4.0, -2.0, -5.0]]), -1))


def test_no_cfg_keeps_batch():
    logits = torch.randn(4, 7)
    assert target_law(logits, SamplingParams()).shape == (4, 7)


def test_temperature_scales_logits():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    law = law_from_logits(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(law, torch.softmax(logits / 0.5, -1))


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0, 2.5]])
    out = filter_logits(logits, top_k=2)
    assert torch.isinf(out).tolist() == [[True, False, True, True, False]]
    law = law_from_logits(logits, SamplingParams(top_k=2))
    assert law[0, [0, 2, 3]].sum() == 0
    assert math.isclose(law[0, 1] / law[0, 4], math.exp(0.5), rel_tol=1e-6)


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: keep the first two (the crossing token is kept).
    law = law_from_logits(logits, SamplingParams(top_p=0.7))
    assert torch.allclose(law, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    # A threshold below the top token still keeps that token.
    law = law_from_logits(logits, SamplingParams(top_p=0.1))
    assert law.tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_top_p_respects_unsorted_order():
    probs = torch.tensor([[0.05, 0.3, 0.15, 0.5]])
    law = law_from_logits(probs.log(), SamplingParams(top_p=0.7))
    assert torch.allclose(law, torch.tensor([[0.0, 0.375, 0.0, 0.625]]))


def test_top_k_then_top_p():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    law = law_from_logits(probs.log(), SamplingParams(top_k=3, top_p=0.75))
    # After top-k: 0.4/0.9, 0.3/0.9, 0.2/0.9 → cumulative 0.444, 0.778: keep two.
    assert torch.allclose(law, torch.tensor([[4 / 7, 3 / 7, 0.0, 0.0]]))


def test_greedy_is_point_mass_at_argmax():
    logits = torch.tensor([[0.1, 0.9, 0.3], [2.0, 1.0, 0.0]])
    law = law_from_logits(logits, SamplingParams(temperature=0.0))
    assert law.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    assert sample_from_law(law).tolist() == [1, 0]


def test_float64_law_sums_to_one():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    law = law_from_logits(logits, SamplingParams(top_k=20, top_p=0.9), dtype=torch.float64)
    assert law.dtype == torch.float64
    assert torch.allclose(law.sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-12)


def test_sampling_is_seeded():
    law = torch.softmax(torch.randn(5, 30, generator=torch.Generator().manual_seed(1)), -1)
    a = sample_from_law(law, torch.Generator().manual_seed(7))
    b = sample_from_law(law, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"temperature": -0.1}, "temperature"), ({"top_k": -1}, "top_k"), ({"top_p": 0.0}, "top_p"),
     ({"top_p": 1.5}, "top_p"), ({"cfg_scale": -1.0}, "cfg_scale")],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"^{field}=") as err:
        SamplingParams(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("params", [SamplingParams(cfg_scale=2.5, top_k=5, top_p=0.7, temperature=1.3),
                                    SamplingParams(), SamplingParams(temperature=0.0, cfg_scale=1.5)],
                         ids=["cfg-filtered", "plain", "greedy-cfg"])
def test_node_laws_equal_the_full_target_law_where_read(params):
    """Lazily computed node laws are bit-for-bit the entries of the full target_law tensor."""
    streams = 2 if params.uses_cfg else 1
    logits = torch.randn(streams * 3, 7, 11, generator=torch.Generator().manual_seed(0))
    full = target_law(logits, params, dtype=torch.float64)
    laws = NodeLaws(logits, params)
    assert tuple(laws.shape) == (3, 7, 11)
    rows, nodes = torch.arange(3), torch.tensor([6, 0, 3])
    assert torch.equal(laws[rows, nodes], full[rows, nodes])
    assert torch.equal(laws[torch.tensor([2, 2]), torch.tensor([1, 5])], full[[2, 2], [1, 5]])


def test_draw_without_replacement_follows_q():
    """The first two draws are ordered without replacement: P(a, b) = q(a)·q(b)/(1 − q(a)).
    200 000 seeded draws; every ordered pair within five binomial standard errors; q = 0 never drawn."""
    q = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0], dtype=torch.float64)
    n = 200_000
    tokens, exists = draw_without_replacement(q.expand(n, -1), 2, torch.Generator().manual_seed(0))
    assert bool(exists.all())
    counts = torch.bincount(tokens[:, 0] * 5 + tokens[:, 1], minlength=25).double() / n
    exact = (q[:, None] * q[None, :] / (1 - q[:, None])).fill_diagonal_(0.0).flatten()
    se = (exact * (1 - exact) / n).sqrt()
    assert bool(((counts - exact).abs() <= 5 * se + 1e-12).all()), (counts - exact).abs().max()


@pytest.mark.parametrize("k", [3, 6])
def test_draw_without_replacement_runs_out_past_the_support(k):
    """Draws past q's support (and past the vocabulary) do not exist; the ones before them are the support."""
    q = torch.tensor([[0.0, 0.7, 0.0, 0.3], [0.2, 0.2, 0.2, 0.4]], dtype=torch.float64)
    tokens, exists = draw_without_replacement(q, k, torch.Generator().manual_seed(1))
    assert tokens.shape == exists.shape == (2, k)
    assert exists[0].tolist() == [True, True] + [False] * (k - 2)
    assert exists[1].tolist() == [True] * min(k, 4) + [False] * (k - min(k, 4))
    assert sorted(tokens[0, :2].tolist()) == [1, 3] and len(set(tokens[1, : min(k, 4)].tolist())) == min(k, 4)
    assert bool((tokens >= 0).all() & (tokens < 4).all())


def test_the_target_law_is_guided_as_llamagen_samples_computed_by_hand():
    """p from the package (the law every engine and exactness test uses) against CFG done here by hand on
    the model's two raw outputs: softmax(u + s·(c − u)), u the null condition's logits (LlamaGen's
    sampling). An independent reference: a wrong guidance formula cannot agree with itself here."""
    from cascade_sd import api

    bundle = api.load_bundle("toy:vocab=7,len=12,seed=0")
    target, prefix, scale = bundle.target, torch.tensor([[3, 5, 1]]), 2.5
    label = torch.tensor([1])
    with torch.no_grad():
        c = target(label, prefix).logits[0, -1].double()
        u = target(target.null_condition(label), prefix).logits[0, -1].double()
    by_hand = torch.softmax(u + scale * (c - u), dim=-1)
    package = api.next_token_law(bundle, [1], prefix, cfg_scale=scale)[0]
    assert torch.allclose(package, by_hand, atol=1e-6) and (package - torch.softmax(c, -1)).abs().max() > 1e-3


def test_temperature_and_top_k_are_applied_as_documented_by_hand():
    """The processed law (DESIGN 3) from the model's raw outputs by hand: guide, divide by the temperature,
    keep the top-k logits, softmax; against the package's law at T = 1.7 and T = 0.6 (a temperature
    that is ignored, inverted or applied after the softmax disagrees)."""
    from cascade_sd import api

    bundle = api.load_bundle("toy:vocab=7,len=12,seed=0")
    target, prefix, label = bundle.target, torch.tensor([[2, 6]]), torch.tensor([0])
    with torch.no_grad():
        c = target(label, prefix).logits[0, -1].double()
        u = target(target.null_condition(label), prefix).logits[0, -1].double()
    for temperature, top_k in ((1.7, 0), (0.6, 4)):
        logits = (u + 3.0 * (c - u)) / temperature
        if top_k:
            logits = logits.masked_fill(logits < logits.topk(top_k).values[-1], float("-inf"))
        by_hand = torch.softmax(logits, dim=-1)
        package = api.next_token_law(bundle, [0], prefix, cfg_scale=3.0, temperature=temperature, top_k=top_k)[0]
        assert torch.allclose(package, by_hand, atol=1e-6), (temperature, top_k)
