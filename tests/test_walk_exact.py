"""Exact laws of the real tree walk (issue 25 item 1: exact-law tests that drive ``walk_tree``).

``walk_tree`` is run once per pattern of its acceptance coins, each coin forced to accept (0) or
reject (1); every comparison it makes, ``coin < accept_prob``, is recorded with the probabilities it
compared, and every bonus draw returns a handle to the law it was drawn from. A pattern's weight is the
product over compared coins of a or 1 − a, and ½ per coin never compared. Whether a coin is compared
depends only on the coins before it, so these weights are a probability law over patterns under which
each compared coin accepts with its true probability: the weighted outcomes are the walk's exact law.

Checked against ``analysis/exact_toy.enumerated_walk``, which re-implements the walk from the rule's
methods: every rule and tree family gives the same block law per round and the same sequence law
(float64, ≤ 1e-12); strict's sequence law from the real walk is the target's; rows of one batch walk
independently of each other and of their neighbours' depth limits.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import pytest
import torch

from analysis.exact_toy import (as_float64, enumerated_walk, realisations, target_conditionals, target_joint_law,
                                toy_engine)
from cascade_sd import api
from cascade_sd.acceptance import RULES
from cascade_sd.decoding import verify
from cascade_sd.decoding.tree import StaticTree
from toys import COUSINS, RELAXED, SMALL_TREE

TOY, CFG = "toy:vocab=3,len=3,seed=2", 2.0
DYNAMIC = {"tree_top_k": 2, "depth": 2, "total_tokens": 4}
TREES = {"chain-2": "chain-2", "small": SMALL_TREE, "dynamic": "dynamic"}
SETTINGS = [("strict", {}), *RELAXED.items(), ("lantern", {"k": 2, "delta": 0.3, "residual": "reference-code"}),
            ("cascade", {"tau_b": -1.0, "tau_d": -1.0, "kl_threshold": 100.0})]
#: A bonus handle: the index of the drawn law in the walk's registry, past every real token.
HANDLE = 10**6

pytestmark = pytest.mark.usefixtures("one_thread")


class _Coins:
    """Forced coins whose comparisons ``coin < a`` are recorded as (coin index, a)."""

    def __init__(self, bits: list[bool], batch: int, dtype: torch.dtype) -> None:
        self.bits, self.batch, self.dtype, self.compared = bits, batch, dtype, []

    def __getitem__(self, i: int) -> "_Coin":
        return _Coin(self, i)


class _Coin:
    def __init__(self, coins: _Coins, i: int) -> None:
        self.coins, self.i = coins, i

    def __lt__(self, a: torch.Tensor) -> torch.Tensor:
        self.coins.compared.append((self.i, a.detach().clone()))
        value = 0.0 if self.coins.bits[self.i] else 1.0  # 0 accepts any a > 0; 1 rejects any a ≤ 1
        return torch.full((self.coins.batch,), value, dtype=self.coins.dtype) < a


def real_walk_law(rule, tree, p, view, prepared, max_accept: torch.Tensor, monkeypatch) -> list[dict]:
    """Each row's exact law of the emitted block (accepted tokens, then the bonus) under ``walk_tree``."""
    batch = p.shape[0]
    n_coins = int(tree.depth.max()) * tree.children.shape[-1]
    laws: list[dict] = [defaultdict(float) for _ in range(batch)]
    for pattern in itertools.product([True, False], repeat=n_coins):
        coins, registry = _Coins(list(pattern), batch, p.dtype), []

        def rand(*size, **kw):
            assert tuple(size) == (n_coins, batch), size
            return coins

        def draw(law, generator=None):
            registry.extend(law.double())
            return torch.arange(HANDLE + len(registry) - len(law), HANDLE + len(registry))

        with monkeypatch.context() as m:
            m.setattr(verify.torch, "rand", rand)
            m.setattr(verify, "sample_from_law", draw)
            walk = verify.walk_tree(rule, tree, p, max_accept=max_accept, view=view, prepared=prepared)
        weight = torch.full((batch,), 0.5 ** (n_coins - len({i for i, _ in coins.compared})), dtype=torch.float64)
        for i, a in coins.compared:
            weight *= a.double() if pattern[i] else 1 - a.double()
        for r in range(batch):
            if weight[r] <= 0:
                continue
            assert int(walk.bonus[r]) >= HANDLE, "a row ended without a bonus draw"
            law = registry[int(walk.bonus[r]) - HANDLE]
            accepted = tuple(tree.tokens[r, walk.path[r, 1:int(walk.accepted[r]) + 1]].tolist())
            for y in torch.nonzero(law > 0).flatten().tolist():
                laws[r][accepted + (y,)] += float(weight[r] * law[y])
    return laws


def _round_laws(engine, cond: torch.Tensor, prefix: tuple[int, ...], limit: int, monkeypatch):
    """(real walk's block law, enumerated walk's block law) of the round after ``prefix``, over the draft draws."""
    pre = torch.tensor([prefix])
    found = (list(realisations(engine, cond, pre)) if isinstance(engine.tree, StaticTree)
             else [(*engine.round_at(cond, pre), 1.0, None)])
    real, enum = defaultdict(float), defaultdict(float)
    for tree, p, view, prepared, weight, _ in found:
        for block, prob in real_walk_law(engine.rule, tree, p, view, prepared, torch.tensor([limit]),
                                         monkeypatch)[0].items():
            real[block] += weight * prob
        for block, prob in enumerated_walk(engine.rule, tree, p, view, prepared, limit)[0]:
            enum[block] += weight * prob
    return real, enum


def _joint_laws(engine, bundle, monkeypatch) -> tuple[dict, dict]:
    """Sequence laws from the real walk and from the enumerated walk, rounds recursed from the first token
    (drawn from the target's law by the prefill in both)."""
    n = bundle.target.config.block_size
    cond = torch.tensor([1])
    with torch.no_grad():
        first = engine._law(engine._prefill(engine._setup(cond)).logits[:, -1])[0].double()
    start = {(y,): float(first[y]) for y in torch.nonzero(first > 0).flatten().tolist()}
    rounds = {}
    laws = []
    for side in (0, 1):
        law, frontier = defaultdict(float), dict(start)
        while frontier:
            nxt = defaultdict(float)
            for prefix, prob in frontier.items():
                if prefix not in rounds:
                    rounds[prefix] = _round_laws(engine, cond, prefix, n - 1 - len(prefix), monkeypatch)
                for block, pb in rounds[prefix][side].items():
                    seq = (prefix + block)[:n]
                    (law if len(seq) >= n else nxt)[seq] += prob * pb
            frontier = nxt
        laws.append(law)
    return laws[0], laws[1]


def _tv(a: dict, b: dict) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


@pytest.fixture(scope="module")
def bundle():
    return as_float64(api.load_bundle(TOY))


def _engine(bundle, method: str, params: dict, tree):
    return toy_engine(bundle, method=method, tree=tree, cfg_scale=CFG, **(DYNAMIC if tree == "dynamic" else {}),
                      **params)


CASES = [pytest.param(m, prm, tree, id=f"{m}-{i}-{name}") for i, (m, prm) in enumerate(SETTINGS)
         for name, tree in TREES.items() if not (tree == "dynamic" and RULES[m].static_tree_only)]


@pytest.mark.parametrize("method,params,tree", CASES)
def test_real_walk_sequence_law_equals_the_enumerated_walks(bundle, method, params, tree, monkeypatch):
    """The sequence law built from ``walk_tree`` equals exact_toy's, and strict's is the target's."""
    engine = _engine(bundle, method, params, tree)
    real, enum = _joint_laws(engine, bundle, monkeypatch)
    assert sum(real.values()) == pytest.approx(1.0, abs=1e-12)
    assert _tv(real, enum) < 1e-12
    target = target_joint_law(target_conditionals(bundle, 1, cfg_scale=CFG), bundle.target.config.block_size)
    if method == "strict":
        assert _tv(real, target) < 1e-12
    else:
        assert _tv(real, target) > 1e-3, "the relaxation never fired: the comparison would not see a walk bug"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["strict", "cascade"])
def test_real_walk_round_law_on_a_tree_with_cousins(bundle, method, monkeypatch):
    """Depth 3, two levels of siblings and cousins (CASCADE's breadth pairs read them): the round law after a
    one-token prefix agrees over all 162 realisations of the tree."""
    engine = _engine(bundle, method, RELAXED.get(method, {}), COUSINS)
    real, enum = _round_laws(engine, torch.tensor([1]), (0,), 3, monkeypatch)
    assert sum(real.values()) == pytest.approx(1.0, abs=1e-12)
    assert _tv(real, enum) < 1e-12


@pytest.mark.parametrize("method,tree", [("strict", SMALL_TREE), ("coolsd", SMALL_TREE), ("lantern", "dynamic"),
                                         ("cascade", "dynamic"), ("gsd", SMALL_TREE)])
def test_rows_of_one_batch_walk_independently(bundle, method, tree, monkeypatch):
    """Three rounds in one batch (different prefixes, draws and depth limits, one row capped at no accept) have
    the laws each has alone: the walk's per-row selections (some rows accepting, some drawing their bonus)
    never mix rows."""
    engine = _engine(bundle, method, RELAXED.get(method, {}), tree)
    prefixes, limits = torch.tensor([[0], [2], [1]]), torch.tensor([2, 0, 1])
    cond = torch.ones(3, dtype=torch.long)
    forced = None
    if isinstance(tree, StaticTree):  # a different realisation per row
        forced = torch.cat([next(itertools.islice(realisations(engine, cond[:1], prefixes[r:r + 1]), r, None))[5]
                            for r in range(3)])
    batch = engine.round_at(cond, prefixes, forced=forced)
    together = real_walk_law(engine.rule, *batch, limits, monkeypatch)
    for r in range(3):
        alone = engine.round_at(cond[r:r + 1], prefixes[r:r + 1], forced=None if forced is None else forced[r:r + 1])
        outcomes = defaultdict(float)
        for block, prob in enumerated_walk(engine.rule, *alone, int(limits[r]))[0]:
            outcomes[block] += prob
        assert _tv(together[r], outcomes) < 1e-12
        assert max(len(b) for b in together[r]) <= int(limits[r]) + 1
