"""Relaxed rules inside the engine: the tree walk emits exactly the law ``induced_law`` computes.

A one-level draft tree is walked for many identical rows (seeded) and the empirical law of the
emitted token is compared with the exact induced law of the root, token by token within five
binomial standard errors: point-mass children (q's top tokens) for every rule, CASCADE with its
tree signals included; sampled children (drawn without replacement from q by sequential
categorical draws, an implementation independent of the engine's) for the context-free rules.
Then every rule decodes on a toy bundle with each tree family and records its drift.
"""

from __future__ import annotations

import pytest
import torch

from cascade_sd import api
from cascade_sd.acceptance import RULES, NodeContext, RuleResources, TreeView, get_rule, induced_law
from cascade_sd.decoding.tree import DraftTree, DrafterOutputs
from cascade_sd.decoding.verify import walk_tree
from cascade_sd.errors import ConfigError

VOCAB, KIDS, ROWS = 6, 3, 40000
PARAMS = {
    "strict": {},
    "lantern": {"k": 3, "delta": 0.3},
    "lantern_pp": {"k": 3, "lam": 3.0},
    "coolsd": {"delta": 2.0},
    "gsd": {"window": 3, "p_threshold": 0.5, "dist_threshold": 4.0},
    "cascade": {"tau_b": 0.0, "tau_d": 0.0, "kl_threshold": 100.0},
    "cascade_bounded": {"tau_b": 0.0, "tau_d": 0.0, "kl_threshold": 100.0, "eps": 0.1},
}


def rule_for(name: str):
    rule = get_rule(name, **PARAMS[name])
    book = torch.nn.functional.normalize(torch.randn(VOCAB, 2, generator=torch.Generator().manual_seed(3)), dim=-1)
    rule.bind(RuleResources(vocab=VOCAB, codebook=book, token_embeddings=book))
    return rule


def laws(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(VOCAB, generator=g, dtype=torch.float64) ** 2
    q = torch.rand(VOCAB, generator=g, dtype=torch.float64) ** 2
    return p / p.sum(), q / q.sum()


def one_level_tree(tokens: torch.Tensor, p: torch.Tensor, q: torch.Tensor, sampled: bool) -> tuple[DraftTree, torch.Tensor]:
    """Rows × (root + KIDS children); children's own laws equal p (their rows are never verified)."""
    rows = tokens.shape[0]
    parent = torch.tensor([-1] + [0] * KIDS).expand(rows, -1)
    depth = torch.tensor([0] + [1] * KIDS).expand(rows, -1)
    children = torch.tensor([list(range(1, KIDS + 1))] + [[-1] * KIDS] * KIDS).expand(rows, -1, -1)
    full = torch.cat([torch.zeros(rows, 1, dtype=torch.long), tokens], 1)
    qs = torch.stack([q] * (KIDS + 1)).expand(rows, -1, -1)
    ps = torch.stack([p] * (KIDS + 1)).expand(rows, -1, -1)
    g = torch.Generator().manual_seed(11)
    reps = torch.randn(KIDS + 1, 8, generator=g, dtype=torch.float64).expand(rows, -1, -1)
    outputs = DrafterOutputs(logits=torch.randn(KIDS + 1, VOCAB, generator=g).expand(rows, -1, -1),
                             hidden=reps, ran=torch.ones(rows, KIDS + 1, dtype=torch.bool))
    tree = DraftTree(tokens=full, parent=parent, depth=depth, children=children, q=qs, sampled=sampled, drafter=outputs)
    return tree, ps


def emitted_law(rule, tree: DraftTree, ps: torch.Tensor) -> tuple[torch.Tensor, NodeContext]:
    """Empirical law of the first emitted token over all rows, and the root's context."""
    view = prepared = None
    ctx = NodeContext(depth=1, n_candidates=KIDS)
    if rule.needs_tree:
        view = TreeView(tree=tree, p=ps, target_logits=torch.randn(KIDS + 1, VOCAB, generator=torch.Generator()
                                                                      .manual_seed(5)).expand(ps.shape[0], -1, -1),
                        target_hidden=tree.drafter.hidden, drafter_logits=tree.drafter.logits,
                        drafter_hidden=tree.drafter.hidden, drafter_ran=tree.drafter.ran)
        prepared = rule.prepare(view)
        extras = rule.node_extras(prepared, view, torch.zeros(ps.shape[0], dtype=torch.long), tree.children[:, 0])
        ctx = NodeContext(depth=1, n_candidates=KIDS, extras={k: v[:1] for k, v in extras.items()})
    walk = walk_tree(rule, tree, ps, generator=torch.Generator().manual_seed(7), max_accept=torch.ones(ps.shape[0],
                     dtype=torch.long), view=view, prepared=prepared)
    first = torch.where(walk.accepted > 0, tree.tokens.gather(1, walk.path[:, 1:2].clamp_min(0)).squeeze(1), walk.bonus)
    return torch.bincount(first, minlength=VOCAB).double() / ps.shape[0], ctx


def assert_close(empirical: torch.Tensor, exact: torch.Tensor) -> None:
    se = (exact * (1 - exact) / ROWS).sqrt()
    assert ((empirical - exact).abs() <= 5 * se + 1e-9).all(), (empirical, exact)


@pytest.mark.parametrize("name", list(PARAMS))
def test_walk_matches_induced_law_for_point_mass_children(name):
    p, q = laws()
    rule = rule_for(name)
    top = torch.argsort(q, descending=True, stable=True)[:KIDS]
    tree, ps = one_level_tree(top.expand(ROWS, -1), p, q, sampled=False)
    empirical, ctx = emitted_law(rule, tree, ps)
    exact = induced_law(rule, p, q, n_candidates=KIDS, sampled=False, context=ctx)
    if name not in ("strict", "gsd"):
        assert 0.5 * float((exact - p).abs().sum()) > 1e-3  # the relaxation bites in this example
    assert_close(empirical, exact)


@pytest.mark.parametrize("rows", [1, 2])
def test_walk_skips_a_sibling_repeating_a_rejected_token(rows):
    """DESIGN 4.1 on a hand-made tree [x, x, y] (point masses) where p(x) = 0: x is rejected in every
    row, its repeat is never tested, y is. One row exercises the all-rows-rejected path."""
    p, q = laws()
    p[2] = 0.0
    p /= p.sum()
    tree, ps = one_level_tree(torch.tensor([2, 2, 4]).expand(rows, -1), p, q, sampled=False)
    rule, tested = rule_for("strict"), []
    real = rule.accept_prob
    rule.accept_prob = lambda state, x, ctx: tested.append(x.tolist()) or real(state, x, ctx)
    walk_tree(rule, tree, ps, generator=torch.Generator().manual_seed(0), max_accept=torch.ones(rows, dtype=torch.long))
    assert tested == [[2] * rows, [4] * rows]


@pytest.mark.parametrize("name", [n for n in PARAMS if not rule_for(n).draw_dependent])
def test_walk_matches_induced_law_for_sampled_children(name):
    """Rules whose signals do not move with the draws (GSD reads only the node's logits)."""
    p, q = laws(1)
    rule = rule_for(name)
    g = torch.Generator().manual_seed(2)
    tokens = torch.zeros(ROWS, KIDS, dtype=torch.long)
    remaining = q.expand(ROWS, -1).clone()
    for j in range(KIDS):  # sequential draws without replacement
        tokens[:, j] = torch.multinomial(remaining, 1, generator=g).squeeze(1)
        remaining.scatter_(1, tokens[:, j : j + 1], 0.0)
    tree, ps = one_level_tree(tokens, p, q, sampled=True)
    empirical, ctx = emitted_law(rule, tree, ps)
    assert_close(empirical, induced_law(rule, p, q, n_candidates=KIDS, sampled=True, context=ctx))


@pytest.mark.parametrize("tree", ["chain-3", "tree-25", "dynamic"])
def test_every_rule_decodes_a_toy_bundle_and_records_drift(tree):
    bundle = api.load_bundle("toy:vocab=16,len=6,seed=0")
    for name in RULES:
        if tree == "dynamic" and RULES[name].static_tree_only:
            with pytest.raises(ConfigError, match="needs a static tree"):
                api.decode(bundle, [0], method=name, tree=tree)
            continue
        res = api.decode(bundle, [0, 1], method=name, tree=tree, seed=3, cfg_scale=2.0, total_tokens=12,
                         record_drift=True, drift_draws=64)
        plain = api.decode(bundle, [0, 1], method=name, tree=tree, seed=3, cfg_scale=2.0, total_tokens=12)
        assert torch.equal(res.tokens, plain.tokens)  # drift recording uses its own random stream
        assert res.tokens.shape == (2, 6) and int(res.tokens.max()) < 16
        drift = res.arrays["drift"]
        assert drift.shape == (2, 6) and (drift >= 0).all() and (drift <= 1).all()
        if name == "strict":
            assert drift.max() < 1e-12
        if RULES[name].declares_bound:
            assert (drift <= res.arrays["drift_bound"] + 1e-12).all()
