"""The sampler's exact sequence law (cascade_sd.metrics.sequence; issue 23 item 1).

``api.sequence_log_prob`` equals analysis/exact_toy's joint law, sequence by sequence, for every
rule on chains, dynamic trees and a branching static tree (float64, ≤ 1e-9); it sums to one over
every sequence of a toy, and its target log-probability is the target's joint law. Each relaxed
setting is checked to move the law away from the target's, so a recursion that ignored the
relaxation would fail.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from analysis.exact_toy import as_float64, exact_joint_law, target_conditionals, target_joint_law
from cascade_sd import api
from cascade_sd.acceptance import RULES
from cascade_sd.errors import ConfigError
from toys import RELAXED, SMALL_TREE

SAMPLING = {"cfg_scale": 2.0}
DYNAMIC = {"tree_top_k": 2, "depth": 2, "total_tokens": 4}
SETTINGS = [("strict", {}), *RELAXED.items(),
            ("lantern", {"k": 2, "delta": 0.3, "residual": "reference-code"}),
            ("cascade", {"tau_b": -1.0, "tau_d": -1.0, "kl_threshold": 100.0})]  # negative depth cosines count
TREES = {"chain-2": "chain-2", "small-static": SMALL_TREE, "dynamic": "dynamic"}
#: On 4 tokens of length 3 every setting moves the law (the relaxed settings of tests/toys.py); length 4
#: on 3 tokens accepts two candidates in a round (paths of depth 2) and temperature 1.3 reshapes p.
TOYS = {"v4": ("toy:vocab=4,len=3,seed=2", SAMPLING),
        "v3-len4": ("toy:vocab=3,len=4,seed=0", {"cfg_scale": 2.0, "temperature": 1.3})}
CASES = [pytest.param("v4", m, prm, tree, id=f"v4-{m}-{i}-{name}") for i, (m, prm) in enumerate(SETTINGS)
         for name, tree in TREES.items()]
CASES += [pytest.param("v3-len4", m, prm, tree, id=f"v3-len4-{m}-{i}-{tree}") for i, (m, prm) in enumerate(SETTINGS)
          if m in ("strict", "coolsd", "cascade", "cascade_bounded", "lantern_pp") for tree in ("chain-2", "dynamic")]
CASES += [pytest.param("v4", "cascade", {"variant": "lumina", "tau_b": -1.0, "tau_d": -1.0}, "dynamic",
                       id="v4-cascade-lumina-dynamic")]  # its depth signal needs depth 2: never on a length-3 chain


@pytest.fixture(scope="module")
def bundles():
    return {key: as_float64(api.load_bundle(spec)) for key, (spec, _) in TOYS.items()}


@pytest.fixture(scope="module")
def bundle(bundles):
    return bundles["v4"]


def _every_sequence(bundle) -> torch.Tensor:
    cfg = bundle.target.config
    return torch.tensor(list(itertools.product(range(cfg.vocab_size), repeat=cfg.block_size)))


def _draw_dependent(method: str, params: dict) -> bool:
    return RULES[method](**params).draw_dependent


@pytest.mark.parametrize("toy,method,params,tree", CASES)
def test_sequence_law_equals_the_exact_joint_law(bundles, toy, method, params, tree):
    bundle, sampling = bundles[toy], TOYS[toy][1]
    shape = DYNAMIC if tree == "dynamic" else {}
    seqs = _every_sequence(bundle)
    if tree == "dynamic" and RULES[method].static_tree_only:
        with pytest.raises(ConfigError, match="needs a static tree"):
            api.sequence_log_prob(bundle, [1] * len(seqs), seqs, method=method, tree=tree, **params)
        return
    if tree is SMALL_TREE and _draw_dependent(method, params):
        with pytest.raises(ConfigError, match="needs tree=chain-N or dynamic"):
            api.sequence_log_prob(bundle, [1] * len(seqs), seqs, method=method, tree=tree, **params)
        return
    joint = exact_joint_law(bundle, 1, method=method, tree=tree, **shape, **sampling, **params)
    got = api.sequence_log_prob(bundle, [1] * len(seqs), seqs, method=method, tree=tree, **shape, **sampling, **params)
    exact = torch.tensor([joint.law.get(tuple(s), 0.0) for s in seqs.tolist()], dtype=torch.float64)
    target = target_joint_law(target_conditionals(bundle, 1, **sampling), bundle.target.config.block_size)
    assert bool(got.exact.all())
    assert float((got.log_sd.exp() - exact).abs().max()) <= 1e-9
    assert float(got.log_sd.exp().sum()) == pytest.approx(1.0, abs=1e-9)
    assert got.log_target.exp().tolist() == pytest.approx([target[tuple(s)] for s in seqs.tolist()], abs=1e-12)
    tv = joint.tv(target)
    assert tv < 1e-12 if method == "strict" else tv > 0.01, "the relaxation must move the law on this toy"


def test_sampled_sibling_draws_are_flagged_and_close(bundle, monkeypatch):
    """Past the enumeration limit, a branching static tree's sibling draws are sampled: flagged as not
    exact, and within Monte-Carlo noise of the exact law (which the relaxation moves by far more)."""
    from cascade_sd.metrics import sequence

    monkeypatch.setattr(sequence, "DRAW_EXACT_LIMIT", 0)
    seqs = _every_sequence(bundle)
    params = RELAXED["coolsd"]
    joint = exact_joint_law(bundle, 1, method="coolsd", tree=SMALL_TREE, **SAMPLING, **params)
    got = api.sequence_log_prob(bundle, [1] * len(seqs), seqs, method="coolsd", tree=SMALL_TREE, mc_draws=4096,
                                **SAMPLING, **params)
    exact = torch.tensor([joint.law.get(tuple(s), 0.0) for s in seqs.tolist()], dtype=torch.float64)
    target = target_joint_law(target_conditionals(bundle, 1, **SAMPLING), bundle.target.config.block_size)
    assert not bool(got.exact.any())
    error = 0.5 * float((got.log_sd.exp() - exact).abs().sum())
    assert error < 0.03 < 0.1 < joint.tv(target), (error, joint.tv(target))


def test_strict_sequence_law_is_the_targets_on_a_larger_toy():
    """Strict speculative decoding emits exactly the target's law: log P_SD = log P per sequence, here on
    sequences too many to enumerate, decoded by the engine itself."""
    bundle = as_float64(api.load_bundle("toy:vocab=16,len=8,seed=1"))
    labels = [0, 1, 1, 0]
    for tree, shape in (("chain-4", {}), ("dynamic", {"tree_top_k": 3, "depth": 3, "total_tokens": 8})):
        tokens = api.decode(bundle, labels, method="strict", tree=tree, cfg_scale=3.0, seed=0, **shape).tokens
        got = api.sequence_log_prob(bundle, labels, tokens, method="strict", tree=tree, cfg_scale=3.0, **shape)
        assert torch.allclose(got.log_sd, got.log_target, atol=1e-9, rtol=0)
        relaxed = api.sequence_log_prob(bundle, labels, tokens, method="coolsd", tree=tree, cfg_scale=3.0, delta=2.0,
                                        **shape)
        assert float((relaxed.log_sd - relaxed.log_target).abs().max()) > 1e-3


@pytest.mark.parametrize("tokens,match", [
    (torch.zeros(2, 3, dtype=torch.long), r"tokens has shape \(2, 3\); expected \(1, 3\)"),
    (torch.tensor([[0, 1, 4]]), r"tokens hold ids outside \[0, 3\]"),
])
def test_bad_tokens_are_one_line_errors(bundle, tokens, match):
    with pytest.raises(ConfigError, match=match):
        api.sequence_log_prob(bundle, [1], tokens)


def test_rounds_split_across_engine_calls_give_the_same_law(bundles):
    """Round starts are rebuilt ``max_rows`` at a time, several sequences per call or one sequence over
    several calls: the law does not depend on how they are cut."""
    bundle, sampling = bundles["v3-len4"], TOYS["v3-len4"][1]
    seqs = _every_sequence(bundle)[:20]
    setting = {"method": "cascade", "tree": "chain-2", **sampling, **SETTINGS[-1][1]}
    whole = api.sequence_log_prob(bundle, [1] * len(seqs), seqs, **setting)
    cut = api.sequence_log_prob(bundle, [1] * len(seqs), seqs, max_rows=2, **setting)
    assert torch.allclose(whole.log_sd, cut.log_sd, atol=1e-12, rtol=0)
    assert torch.allclose(whole.log_target, cut.log_target, atol=1e-12, rtol=0)
