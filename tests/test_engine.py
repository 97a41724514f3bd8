"""The speculative engine with the strict rule: exact output law, greedy equivalence, oracle
drafter, cache consistency, degenerate laws, batching statistics."""

import itertools

import pytest
import torch
from scipy import stats

from cascade_sd.acceptance import get_rule
from cascade_sd.acceptance.base import NodeState, remove_token
from cascade_sd.acceptance.strict import StrictRule
from cascade_sd.decoding.engine import SpeculativeEngine
from cascade_sd.decoding.processing import SamplingParams, target_law
from cascade_sd.decoding.tree import DynamicTreeSpec, StaticTree
from cascade_sd.decoding.vanilla import causal_mask, vanilla_decode, with_null_condition
from cascade_sd.models.drafters.oracle import OracleDrafter
from cascade_sd.models.toy import toy_target

TREES = {
    "chain-3": StaticTree.preset("chain-3"),
    "tree-25": StaticTree.preset("tree-25"),
    "dynamic": DynamicTreeSpec(top_k=2, depth=3, total_tokens=6),
}
# For the sampled-law test: branching at every depth, small enough for 60 000 rows per decode.
BRANCHY = StaticTree(((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1)), "branchy-8")
LAW_TREES = {"chain-3": TREES["chain-3"], "branchy-8": BRANCHY, "dynamic": TREES["dynamic"]}


pytestmark = pytest.mark.usefixtures("one_thread")


def exact_joint(model, label: int, params: SamplingParams) -> dict[tuple[int, ...], float]:
    """Exact law of whole sequences from uncached forwards of every prefix (DESIGN 3's p)."""
    cfg = model.config
    seqs = list(itertools.product(range(cfg.vocab_size), repeat=cfg.block_size))
    toks = torch.tensor(seqs)
    cond = with_null_condition(model, torch.full((len(seqs),), label), params)
    reps = cond.shape[0] // len(seqs)
    logits = model(cond, torch.cat([toks[:, :-1]] * reps)).logits
    p = target_law(logits.double(), params)
    probs = p.gather(-1, toks[..., None]).squeeze(-1).prod(-1)
    return dict(zip(seqs, probs.tolist()))


def bundle(seed: int, vocab: int = 3, length: int = 4):
    target = toy_target(f"toy:vocab={vocab},len={length},seed={seed}")
    # An independent random model as drafter: q differs from p everywhere.
    drafter = OracleDrafter(toy_target(f"toy:vocab={vocab},len={length},seed={seed + 100}"))
    return target, drafter


# The fixture's sampling settings; test_the_sampled_law_test_has_power_against_verification_bugs checks that
# each gives the chi-square test its stated power against real verification bugs.
SAMPLED_LAW_PARAMS = [SamplingParams(cfg_scale=2.0, top_k=2), SamplingParams(cfg_scale=1.5, top_p=0.8, temperature=1.3)]
SAMPLES = 150_000  # 60 000 left a 2% optimistic ratio undetected with probability 0.36


@torch.no_grad()
@pytest.mark.parametrize("tree", list(LAW_TREES))
@pytest.mark.parametrize("params", SAMPLED_LAW_PARAMS, ids=["cfg-topk", "cfg-topp-temp"])
def test_strict_decode_samples_the_exact_joint_law(tree, params):
    """Chi-square against the enumerated joint law, n = SAMPLES at level 1e-3: for every tree and setting
    here the test fails a strict rule with a 2% optimistic acceptance ratio (TV ≈ 0.009) or a residual
    read as p with probability ≥ 0.99 (test_the_sampled_law_test_has_power_against_verification_bugs
    computes it from the mutants' exact laws); the seed makes the test deterministic."""
    _check_sampled_law(tree, params)


@torch.no_grad()
@pytest.mark.parametrize("tree", list(LAW_TREES))
def test_continuous_batching_samples_the_exact_joint_law(tree):
    """The same chi-square test with 7 000 rows serving 60 000 images: rows that finish take the
    next image (its prefill, first token and cache rows reused), so every wave but the first
    starts mid-batch."""
    res = _check_sampled_law(tree, SamplingParams(cfg_scale=2.0, top_k=2), max_rows=7_000)
    assert res.stats["mean_rows_per_round"] > 6_000


def _check_sampled_law(tree: str, params: SamplingParams, max_rows: int | None = None):
    target, drafter = bundle(seed=3)
    law = exact_joint(target, 1, params)
    n = SAMPLES
    engine = SpeculativeEngine(target, drafter, get_rule("strict"), LAW_TREES[tree], params)
    res = engine.decode(torch.ones(n, dtype=torch.long), torch.Generator().manual_seed(0), max_rows=max_rows)
    hist = res.stats["accept_histogram"]
    assert len(hist) == 3 and min(hist) > 50  # 0, 1 and 2 accepted drafts all occur: the walk is exercised
    seqs = list(law)
    index = {s: i for i, s in enumerate(seqs)}
    flat = res.tokens @ torch.tensor([3**k for k in reversed(range(4))])
    lookup = torch.tensor([index[s] for s in itertools.product(range(3), repeat=4)])
    counts = torch.bincount(lookup[flat], minlength=len(seqs)).double()
    expected = torch.tensor([law[s] for s in seqs], dtype=torch.float64) * n
    support = expected > 0
    assert counts[~support].sum() == 0, "emitted a sequence the target law excludes"
    chi2 = stats.chisquare(counts[support], expected[support] * counts[support].sum() / expected[support].sum())
    assert chi2.pvalue > 1e-3, (chi2, 0.5 * (counts / n - expected / n).abs().sum())
    return res


@torch.no_grad()
@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("max_rows", [None, 3])
def test_greedy_equals_vanilla_greedy(tree, cfg_scale, max_rows):
    """With ``max_rows=3`` three rows serve seven images: each image that joins mid-batch decodes
    what vanilla decodes."""
    target = toy_target("toy:vocab=13,len=20,seed=5,layers=2,dim=32,heads=4")
    drafter = OracleDrafter(toy_target("toy:vocab=13,len=20,seed=6,layers=2,dim=32,heads=4"))
    params = SamplingParams(temperature=0.0, cfg_scale=cfg_scale)
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    res = SpeculativeEngine(target, drafter, get_rule("strict"), TREES[tree], params).decode(labels, max_rows=max_rows)
    assert torch.equal(res.tokens, vanilla_decode(target, labels, params).tokens)
    s = res.stats
    assert s["tokens_per_second"] == pytest.approx(7 * 20 / s["seconds"])
    if max_rows:
        # One target forward per round, the first prefill, and one prefill per round in which images joined.
        assert 2 < s["mean_rows_per_round"] <= 3
        assert s["batched_rounds"] + 2 <= s["target_forwards"] <= s["batched_rounds"] + 5


@torch.no_grad()
@pytest.mark.parametrize("tree", ["chain-3", "tree-25"])
@pytest.mark.parametrize("max_rows", [None, 2])
def test_drafter_equal_to_target_accepts_every_draft(tree, max_rows):
    """With continuous batching the oracle's own cache is prefilled for each joining image; a wrong
    row would make q differ from p and drafts be rejected."""
    target = toy_target("toy:vocab=9,len=24,seed=2,dim=32,heads=4")
    engine = SpeculativeEngine(target, OracleDrafter(target), get_rule("strict"), TREES[tree], SamplingParams(cfg_scale=2.0))
    res = engine.decode(torch.tensor([0, 1, 0]), torch.Generator().manual_seed(1), max_rows=max_rows)
    depth = TREES[tree].depth
    hist = res.stats["accept_histogram"]
    # Every round accepts the full depth except where the grid's end caps it.
    assert sum(hist[:depth]) <= 3 * depth and hist[depth] > 0
    assert res.stats["mean_accepted_length"] > depth


@torch.no_grad()
def test_degenerate_logits_give_deterministic_outcomes():
    """A target whose every law is a point mass: any drafter, any seed → the same tokens."""
    target = toy_target("toy:vocab=6,len=10,seed=7")
    with torch.no_grad():
        target.output.weight.mul_(1e4)
    drafter = OracleDrafter(toy_target("toy:vocab=6,len=10,seed=8"))
    params = SamplingParams()
    labels = torch.tensor([0, 1])
    ref = vanilla_decode(target, labels, SamplingParams(temperature=0.0)).tokens
    for seed in range(3):
        for tree in TREES.values():
            out = SpeculativeEngine(target, drafter, get_rule("strict"), tree, params).decode(
                labels, torch.Generator().manual_seed(seed))
            assert torch.equal(out.tokens, ref)


@torch.no_grad()
@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("label", [0, 1])
def test_target_cache_equals_fresh_forward_after_rounds(tree, label):
    """After decoding, the compacted KV cache holds exactly what a fresh forward over the
    accepted sequence computes (checked through the logits of a further step). One image per
    decode: its cache rows stay in place until it is complete."""
    target = toy_target("toy:vocab=9,len=16,seed=4,layers=2,dim=32,heads=4")
    drafter = OracleDrafter(toy_target("toy:vocab=9,len=16,seed=9,layers=2,dim=32,heads=4"))
    params = SamplingParams(cfg_scale=2.0)
    labels = torch.tensor([label])
    res = SpeculativeEngine(target, drafter, get_rule("strict"), TREES[tree], params).decode(
        labels, torch.Generator().manual_seed(3))
    assert res.stats["batched_rounds"] > 3
    n, cls = target.config.block_size, target.config.cls_token_num
    # Slots cls .. cls+n-2 hold tokens 0..n-2 for both streams; compare with a fresh forward.
    cond = with_null_condition(target, labels, params)
    fresh = target(cond, torch.cat([res.tokens[:, :-1]] * 2))
    cached_k = target.layers[-1].attention.k_cache[:, :, : cls + n - 1].clone()
    target.setup_cache(cond.shape[0], cls + n)
    pos = torch.arange(cls + n - 1)
    x = torch.cat([target.embed_cond(cond), target.embed_tokens(torch.cat([res.tokens[:, :-1]] * 2))], 1)
    out = target.step(x, positions=pos, slots=pos, attn_mask=causal_mask(0, cls + n - 1, cls + n))
    assert torch.allclose(target.layers[-1].attention.k_cache[:, :, : cls + n - 1], cached_k, atol=1e-5)
    assert torch.allclose(out.logits[:, cls - 1 :], fresh.logits, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("tree", list(TREES))
def test_finished_images_leave_the_batch_with_their_cache_rows_moved(tree):
    """Rows leave the batch as their images complete: each compaction keeps the live rows' k/v
    (both CFG streams, target and drafter) and the batch decodes the same greedy images as one
    image at a time."""
    target = toy_target("toy:vocab=13,len=20,seed=5,layers=2,dim=32,heads=4")
    drafter = OracleDrafter(toy_target("toy:vocab=13,len=20,seed=6,layers=2,dim=32,heads=4"))
    params = SamplingParams(temperature=0.0, cfg_scale=3.0)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    shrinks = {"target": [], "drafter": []}

    def checked(name, model):
        real = model.select_rows

        def select_rows(rows):
            before = model._kv[:, :, rows].clone()
            real(rows)
            assert torch.equal(model._kv[:, :, : rows.numel()], before)
            shrinks[name].append(rows.numel())
        return select_rows

    target.select_rows, drafter.model.select_rows = checked("target", target), checked("drafter", drafter.model)
    res = SpeculativeEngine(target, drafter, get_rule("strict"), TREES[tree], params).decode(labels)
    del target.select_rows, drafter.model.select_rows
    steps = shrinks["target"]
    assert len(steps) >= 2 and steps[-1] == 0 and steps == sorted(steps, reverse=True) and shrinks["drafter"] == steps
    assert res.stats["mean_rows_per_round"] < len(labels) and res.stats["padding_fraction"] == 0
    one_by_one = [SpeculativeEngine(target, drafter, get_rule("strict"), TREES[tree], params).decode(label[None]).tokens
                  for label in labels]
    assert torch.equal(res.tokens, torch.cat(one_by_one))


@torch.no_grad()
def test_statistics_are_consistent():
    target, drafter = bundle(seed=11, vocab=5, length=12)
    res = SpeculativeEngine(target, drafter, get_rule("strict"), TREES["tree-25"], SamplingParams()).decode(
        torch.tensor([0, 1, 1, 0]), torch.Generator().manual_seed(0))
    s = res.stats
    hist = s["accept_histogram"]
    assert sum(hist) == s["rounds"]
    # Every image: 1 prefill token + Σ over its rounds of (a + 1) = 12 tokens.
    assert sum((a + 1) * c for a, c in enumerate(hist)) == 4 * (12 - 1)
    assert s["mean_accepted_length"] == pytest.approx(4 * 11 / s["rounds"])
    assert s["target_forwards"] == s["batched_rounds"] + 1
    # Per round: the catch-up forward and one per drafted level above the leaves.
    assert s["drafter_forwards"] == s["batched_rounds"] * TREES["tree-25"].depth
    assert s["padding_fraction"] == 0 and 0 <= s["engine_overhead_fraction"] <= 1
    assert 1 <= s["mean_rows_per_round"] <= 4 and s["full_batch_round_model_seconds"] > 0



class _ResidualIsP(StrictRule):
    """Mutation: after a rejection the next sibling and the bonus read p, not the residual norm((p − q)+)."""

    name = "mutant_residual_is_p"

    def reject(self, state, x, ctx):
        return NodeState(p=state.p, q=None if state.q is None else remove_token(state.q, x))

    def bonus_after_reject(self, state, x, ctx):
        return state.p


class _Accept102(StrictRule):
    """Mutation: acceptance min(1, 1.02·p/q), a 2% optimistic ratio."""

    name = "mutant_accept_102"

    def accept_prob(self, state, x, ctx):
        return (1.02 * super().accept_prob(state, x, ctx)).clamp(max=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("mutant", [_ResidualIsP, _Accept102], ids=["residual-is-p", "accept-x1.02"])
@pytest.mark.parametrize("tree", list(LAW_TREES))
def test_the_sampled_law_test_has_power_against_verification_bugs(mutant, tree, monkeypatch):
    """The chi-square fixture above must see each kind of verification bug: for every mutation, the exact
    law of the mutated sampler on the fixture (analysis/exact_toy) moves the chi-square noncentrality
    λ = n·Σ (p_mut − p)²/p enough that the test (level 1e-3, n = SAMPLES) fails it with probability ≥ 0.99,
    for every sampling setting of the fixture."""
    from analysis.exact_toy import exact_joint_law
    from cascade_sd import api
    from cascade_sd.acceptance.registry import RULES as REGISTRY

    monkeypatch.setitem(REGISTRY, mutant.name, mutant)
    target, drafter = bundle(seed=3)
    toy = api.Bundle(name="fixture", target=target.double(), target_hash="fixture", drafters={"oracle": drafter.double()})
    shape = {"tree_top_k": 2, "depth": 3, "total_tokens": 6} if tree == "dynamic" else {}
    for params in SAMPLED_LAW_PARAMS:
        sampling = {k: getattr(params, k) for k in ("temperature", "top_k", "top_p", "cfg_scale")}
        law = exact_joint(target, 1, params)
        moved = exact_joint_law(toy, 1, method=mutant.name, tree=tree if tree == "dynamic" else LAW_TREES[tree],
                                drafter="oracle", **shape, **sampling).law
        cells = [s for s in law if law[s] > 0]
        lam = SAMPLES * sum((moved.get(s, 0.0) - law[s]) ** 2 / law[s] for s in cells)
        df = len(cells) - 1
        power = stats.ncx2.sf(stats.chi2.isf(1e-3, df), df, lam)
        assert power >= 0.99, (params, lam, power, 0.5 * sum(abs(moved.get(s, 0.0) - law[s]) for s in cells))
