"""Vanilla decoding on toy targets: seeded determinism, greedy = argmax of the full forward,
and the sampled law equals the target's exact joint law (CFG, top-k, top-p on)."""

import itertools

import pytest
import torch
from scipy import stats

from cascade_sd.decoding.processing import SamplingParams, target_law
from cascade_sd.decoding.vanilla import vanilla_decode, with_null_condition
from cascade_sd.errors import ConfigError
from cascade_sd.models.toy import ToySpec, toy_target


def exact_joint(model, label: int, params: SamplingParams) -> dict[tuple[int, ...], float]:
    """Enumerate every token sequence and multiply the target laws from uncached forwards."""
    cfg = model.config
    cond = with_null_condition(model, torch.tensor([label]), params)
    law: dict[tuple[int, ...], float] = {}
    for seq in itertools.product(range(cfg.vocab_size), repeat=cfg.block_size):
        prob = 1.0
        for i, tok in enumerate(seq):
            prefix = torch.tensor([seq[:i]] * cond.shape[0], dtype=torch.long).reshape(cond.shape[0], i)
            p = target_law(model(cond, prefix).logits[:, -1].double(), params)
            prob *= p[0, tok].item()
        law[seq] = prob
    return law


def test_toy_spec_parsing_and_errors():
    spec = ToySpec.parse("toy:vocab=5,len=3,seed=0")
    assert (spec.vocab, spec.len, spec.seed) == (5, 3, 0)
    with pytest.raises(ConfigError, match="field 'colour' is unknown"):
        ToySpec.parse("toy:colour=3")
    with pytest.raises(ConfigError, match="vocab=1 is out of range"):
        ToySpec.parse("toy:vocab=1")
    with pytest.raises(ConfigError, match="not a valid int"):
        ToySpec.parse("toy:len=x")


def test_toy_targets_are_seeded_and_non_uniform():
    a, b, c = toy_target("toy:seed=1"), toy_target("toy:seed=1"), toy_target("toy:seed=2")
    tok = torch.zeros(1, 0, dtype=torch.long)
    la, lb, lc = (m(torch.tensor([0]), tok).logits for m in (a, b, c))
    assert torch.equal(la, lb) and not torch.equal(la, lc)
    p = la.softmax(-1)
    assert p.max() - p.min() > 0.1  # far from uniform: exactness tests have teeth


@torch.no_grad()
def test_same_seed_same_tokens():
    model = toy_target("toy:vocab=7,len=6,seed=3")
    params = SamplingParams(cfg_scale=2.0, top_k=5)
    labels = torch.tensor([0, 1, 1, 0])
    run = lambda s: vanilla_decode(model, labels, params, generator=torch.Generator().manual_seed(s)).tokens
    assert torch.equal(run(11), run(11))
    assert not torch.equal(run(11), run(12))


@torch.no_grad()
@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_greedy_matches_uncached_argmax(cfg_scale):
    model = toy_target("toy:vocab=11,len=8,seed=4,layers=2,dim=32,heads=4")
    params = SamplingParams(temperature=0.0, cfg_scale=cfg_scale)
    labels = torch.tensor([0, 1])
    tokens = vanilla_decode(model, labels, params).tokens
    cond = with_null_condition(model, labels, params)
    for i in range(tokens.shape[1]):
        prefix = torch.cat([tokens[:, :i]] * (2 if params.uses_cfg else 1))
        expected = target_law(model(cond, prefix).logits[:, -1], params).argmax(-1)
        assert torch.equal(tokens[:, i], expected)


@torch.no_grad()
@pytest.mark.parametrize("params", [SamplingParams(cfg_scale=2.0), SamplingParams(cfg_scale=1.5, top_k=3, top_p=0.9)])
def test_sampled_law_equals_exact_joint(params):
    model = toy_target("toy:vocab=4,len=2,seed=5")
    law = exact_joint(model, 1, params)
    n = 6000
    tokens = vanilla_decode(model, torch.ones(n, dtype=torch.long), params, generator=torch.Generator().manual_seed(0)).tokens
    seqs = list(law)
    index = {s: i for i, s in enumerate(seqs)}
    counts = torch.zeros(len(seqs))
    for row in tokens.tolist():
        counts[index[tuple(row)]] += 1
    expected = torch.tensor([law[s] for s in seqs]) * n
    support = expected > 0
    assert counts[~support].sum() == 0  # never a token the processed law excludes
    chi2 = stats.chisquare(counts[support], expected[support] * counts[support].sum() / expected[support].sum())
    assert chi2.pvalue > 1e-3
    tv = 0.5 * (counts / n - expected / n).abs().sum()
    assert tv < 0.03
