"""Relaxed acceptance rules (DESIGN 4.3–4.7, issue 4).

For every rule, through the hypothesis strategies used for strict: the induced law is a
distribution, the declared per-node bound is at least the exact TV, acceptance is monotone in
the relaxation strength, and zero relaxation reproduces the strict laws exactly. Then
hand-computed examples straight from DESIGN 4 and the parameter errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import law_pairs
from cascade_sd.acceptance import RULES, NodeContext, NodeState, RuleResources, get_rule, induced_law
from cascade_sd.errors import ConfigError

TOL = 1e-12
RELAXED = ["lantern", "lantern_pp", "coolsd", "gsd", "cascade", "cascade_bounded"]
#: Strong but valid settings, so the relaxation actually bites on small vocabularies.
STRONG = {
    "lantern": {"k": 3, "delta": 0.3},
    "lantern_pp": {"k": 3, "lam": 3.0},
    "coolsd": {"delta": 2.0},
    "gsd": {"window": 3, "p_threshold": 0.5, "dist_threshold": 4.0},
    "cascade": {},
    "cascade_bounded": {"eps": 0.1},
}
#: Zero relaxation (DESIGN 4, issue 4 item 3). LANTERN's reference residual is not lossless at δ = 0 (or
#: λ = 1): neighbours of zero probability still count as pooled and k + 1 neighbours leave q (REFERENCES.md).
ZERO = {
    "lantern": {"k": 3, "delta": 0.0, "residual": "clean"},
    "lantern_pp": {"k": 3, "lam": 1.0, "residual": "clean"},
    "coolsd": {"delta": 1.0, "nu": 0.0, "mu": 0.0},
    "gsd": {"window": 0},
    "cascade": {"breadth": False, "depth_signal": False},
    "cascade_bounded": {"eps": 0.0},
}


def fast(n: int):
    """``n`` examples per run under the session's seeded profile (tests/conftest.py)."""
    return settings(max_examples=n)


def codebook(vocab: int, seed: int = 0) -> torch.Tensor:
    """A seeded random unit-norm codebook (2-D, so neighbours are well spread)."""
    return torch.nn.functional.normalize(torch.randn(vocab, 2, generator=torch.Generator().manual_seed(seed)), dim=-1)


def make(name: str, vocab: int, **params):
    """Rule ``name`` bound to a random codebook of ``vocab`` entries (k capped at V − 1)."""
    if "k" in params:
        params["k"] = min(params["k"], vocab - 1)
    rule = get_rule(name, **params)
    rule.bind(RuleResources(vocab=vocab, codebook=codebook(vocab), token_embeddings=codebook(vocab, 1)))
    return rule


@st.composite
def contexts(draw, vocab: int, depth: int) -> NodeContext:
    """A random node context: CASCADE's candidate children, their depth boosts, tests and partner
    tokens and the parent's normalised log-law (its kl gate), and GSD's node logits."""
    n_kids = draw(st.integers(1, min(vocab, 4)))
    kids = draw(st.lists(st.integers(0, vocab - 1), min_size=n_kids, max_size=n_kids, unique=True))
    boosts = [draw(st.sampled_from([0.0, 0.0, 0.3, 0.7, 1.0])) for _ in kids]
    partners = [[draw(st.integers(-1, vocab - 1)) for _ in range(3)] for _ in kids]
    logits = torch.tensor([draw(st.lists(st.floats(-3, 3), min_size=vocab, max_size=vocab))], dtype=torch.float64)
    extras = {"child_tokens": torch.tensor([kids]), "depth_boost": torch.tensor([boosts], dtype=torch.float64),
              "depth_ok": torch.tensor([boosts]) > 0, "partner_tokens": torch.tensor([partners]),
              "parent_lsn": torch.log_softmax(torch.nn.functional.normalize(logits, dim=-1), -1), "node_logits": logits}
    return NodeContext(depth=depth, extras=extras)


@st.composite
def node_inputs(draw):
    """(p, q, n_candidates, sampled, context) over a small vocabulary."""
    p, q = draw(law_pairs())
    vocab = p.shape[-1]
    depth = draw(st.integers(1, 3))
    sampled = draw(st.booleans())
    n = draw(st.integers(1, min(3, vocab) if sampled else vocab))
    ctx = draw(contexts(vocab, depth))
    return p, q, n, sampled, ctx


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


# ---------------------------------------------------------------------------- every rule
@pytest.mark.parametrize("name", RELAXED)
@given(node_inputs())
@fast(60)
def test_induced_law_is_a_distribution_within_the_declared_bound(name, inputs):
    p, q, n, sampled, ctx = inputs
    rule = make(name, p.shape[-1], **STRONG[name])
    law = induced_law(rule, p, q, n_candidates=n, sampled=sampled, context=ctx)
    assert (law >= -TOL).all()
    assert abs(float(law.sum()) - 1.0) < 1e-9
    ctx_n = NodeContext(depth=ctx.depth, n_candidates=n, extras=ctx.extras)
    bound = rule.tv_bound(p.unsqueeze(0), q.unsqueeze(0), ctx_n, sampled=sampled)
    assert (bound is None) == (not rule.declares_bound)
    if bound is not None:
        assert tv(law, p) <= float(bound[0]) + TOL


@pytest.mark.parametrize("name", ["strict", *RELAXED])
@given(node_inputs(), st.integers(0, 7))
@fast(30)
def test_bonus_after_reject_is_the_bonus_law_of_the_rejected_state(name, inputs, token):
    """The walk draws the bonus after a rejected last sibling from ``bonus_after_reject``: the same
    law as ``bonus_law`` of ``reject``'s state, for point-mass and sampled candidates."""
    p, q, n, sampled, ctx = inputs
    rule = make(name, p.shape[-1], **STRONG.get(name, {}))
    x = torch.tensor([token % p.shape[-1]])
    ctx_n = NodeContext(depth=ctx.depth, n_candidates=n, extras=ctx.extras)
    state = rule.start(p.unsqueeze(0), q.unsqueeze(0), sampled, ctx_n)
    assert torch.equal(rule.bonus_after_reject(state, x, ctx_n), rule.bonus_law(rule.reject(state, x, ctx_n), ctx_n))


@pytest.mark.parametrize("name", [n for n in RELAXED if n != "gsd"])  # a wider GSD window can lower p(C)/q(C)
@given(node_inputs(), st.integers(0, 7))
@fast(40)
def test_acceptance_is_monotone_in_the_relaxation_strength(name, inputs, token):
    p, q, n, sampled, ctx = inputs
    vocab = p.shape[-1]
    cls = RULES[name]
    base = dict(STRONG[name])
    values = {"delta": [0.0, 0.05, 0.2, 0.5] if name == "lantern" else [1.0, 1.5, 2.0, 4.0],
              "lam": [1.0, 2.0, 5.0, 20.0], "eps": [0.0, 0.02, 0.1, 0.5], "tau_b": [0.99, 0.9, 0.5, -0.5]}
    x = torch.tensor([token % vocab])
    ctx_n = NodeContext(depth=ctx.depth, n_candidates=n, extras=ctx.extras)
    state = NodeState(p=p.unsqueeze(0), q=q.unsqueeze(0) if sampled else None)
    probs = [float(make(name, vocab, **{**base, cls.strength: v}).accept_prob(state, x, ctx_n))
             for v in values[cls.strength]]
    if not cls.strength_increases:
        assert values[cls.strength] == sorted(values[cls.strength], reverse=True)
    assert all(a <= b + TOL for a, b in zip(probs, probs[1:])), probs


@pytest.mark.parametrize("name", RELAXED)
@given(node_inputs())
@fast(60)
def test_zero_relaxation_gives_the_strict_laws(name, inputs):
    p, q, n, sampled, ctx = inputs
    rule = make(name, p.shape[-1], **ZERO[name])
    strict = get_rule("strict")
    law = induced_law(rule, p, q, n_candidates=n, sampled=sampled, context=ctx)
    assert torch.allclose(law, induced_law(strict, p, q, n_candidates=n, sampled=sampled), atol=TOL, rtol=0)
    assert torch.allclose(law, p, atol=TOL, rtol=0)


@given(node_inputs(), st.sampled_from([0.0, 0.01, 0.05, 0.2]))
@fast(80)
def test_bounded_cascade_never_exceeds_eps(inputs, eps):
    p, q, n, sampled, ctx = inputs
    rule = make("cascade_bounded", p.shape[-1], eps=eps, tau_b=-1.0, tau_d=-1.0)
    law = induced_law(rule, p, q, n_candidates=n, sampled=sampled, context=ctx)
    assert tv(law, p) <= eps + TOL


# ---------------------------------------------------------------------------- hand examples
def line_codebook() -> torch.Tensor:
    """Four codes on a line at 0, 1, 2, 3: neighbours of code 0 are 1, 2, 3 in that order."""
    return torch.tensor([[0.0], [1.0], [2.0], [3.0]])


def lantern(**params):
    rule = get_rule("lantern", **params)
    rule.bind(RuleResources(vocab=4, codebook=line_codebook()))
    return rule


def test_lantern_pools_only_its_k_nearest_neighbours():
    """k = 2 on a 1-D codebook 0..4: the third neighbour (mass .05, still under δ = .3) is not pooled."""
    p = torch.tensor([[0.2, 0.05, 0.05, 0.05, 0.65]], dtype=torch.float64)
    rule = _bound(get_rule("lantern", k=2, delta=0.3), torch.arange(5.0)[:, None])
    assert float(rule.accept_prob(NodeState(p=p, q=None), torch.tensor([0]), NodeContext())) == pytest.approx(0.3)


def test_lantern_point_mass_tv_is_exactly_c_m_star():
    p = torch.tensor([0.2, 0.05, 0.03, 0.72], dtype=torch.float64)
    q = torch.tensor([0.9, 0.05, 0.03, 0.02], dtype=torch.float64)  # top token of q: 0
    rule = lantern(k=3, delta=0.1, residual="clean")  # c_1 = .05, c_2 = .08, c_3 = .8 → m* = 2, c* = 0.08
    law = induced_law(rule, p, q, n_candidates=1, sampled=False)
    assert torch.allclose(law, torch.tensor([0.28, 0.0, 0.0, 0.72], dtype=torch.float64), atol=TOL)
    assert tv(law, p) == pytest.approx(0.08, abs=TOL)
    assert float(rule.tv_bound(p[None], q[None], NodeContext(), sampled=False)[0]) == pytest.approx(0.08, abs=TOL)


def test_lantern_residual_variants():
    p = torch.tensor([[0.1, 0.05, 0.25, 0.6]], dtype=torch.float64)
    x = torch.tensor([0])
    state = NodeState(p=p, q=None)
    clean = lantern(k=2, delta=0.1, residual="clean").reject(state, x, NodeContext())  # A = {0, 1}
    ref = lantern(k=2, delta=0.1, residual="reference-code").reject(state, x, NodeContext())  # x, nearest[0, :3]
    assert torch.allclose(clean.p, torch.tensor([[0.0, 0.0, 0.25, 0.6]], dtype=torch.float64) / 0.85)
    assert torch.allclose(ref.p, torch.full((1, 4), 0.25, dtype=torch.float64))  # nothing left: uniform
    acc = lantern(k=2, delta=0.1).accept_prob(state, x, NodeContext())
    assert float(acc) == pytest.approx(0.15)


def test_lantern_reference_residual_is_the_authors():
    """Issue 22 repro: 1-D codebook 0..4, p = [.1, .3, .2, .3, .1], δ = 0.1, k = 1, reject x = 2 (point
    mass). Nothing is pooled (p(1) = .3 > δ), so the reference zeroes only x; sampled drafts zero
    ``nearest[x, :k+1]`` in q (LlamaGen) or in p (Lumina), and only when a neighbour was pooled."""
    book = torch.arange(5.0)[:, None]
    p = torch.tensor([[0.1, 0.3, 0.2, 0.3, 0.1]], dtype=torch.float64)
    x = torch.tensor([2])
    ref = _bound(get_rule("lantern", k=1, delta=0.1, residual="reference-code"), book)
    assert torch.allclose(ref.reject(NodeState(p=p, q=None), x, NodeContext()).p,
                          torch.tensor([[0.125, 0.375, 0.0, 0.375, 0.125]], dtype=torch.float64))
    # Pooled (δ = .35 ≥ p(1)): nearest[2, :2] = {1, 3} leave q (LlamaGen) or p (Lumina).
    q = torch.tensor([[0.05, 0.1, 0.6, 0.05, 0.2]], dtype=torch.float64)
    pooled = lambda res: _bound(get_rule("lantern", k=1, delta=0.35, residual=res), book).reject(
        NodeState(p=p, q=q), x, NodeContext()).p
    llamagen = torch.tensor([[0.05, 0.3, 0.0, 0.3, 0.0]], dtype=torch.float64)  # [p − q∘(not 1, 3)]_+
    lumina = torch.tensor([[0.05, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # [p∘(not 1, 3) − q]_+
    assert torch.allclose(pooled("reference-code"), llamagen / llamagen.sum())
    assert torch.allclose(pooled("reference-code-lumina"), lumina / lumina.sum())
    clean = torch.tensor([[0.05, 0.0, 0.0, 0.25, 0.0]], dtype=torch.float64)  # [p − q]_+ without A = {2, 1}
    assert torch.allclose(pooled("clean"), clean / clean.sum())


def _bound(rule, book: torch.Tensor):
    rule.bind(RuleResources(vocab=book.shape[0], codebook=book, token_embeddings=book))
    return rule


def test_lantern_k_is_capped_by_default_and_checked_when_explicit():
    rule = get_rule("lantern")
    rule.bind(RuleResources(vocab=4, codebook=line_codebook()))
    assert rule.params["k"] == 3
    with pytest.raises(ConfigError, match=r"k=5 is out of range; allowed \[1, 3\]"):
        get_rule("lantern", k=5).bind(RuleResources(vocab=4, codebook=line_codebook()))
    with pytest.raises(ConfigError, match="needs a tokenizer codebook"):
        get_rule("lantern").bind(RuleResources(vocab=4))


def test_lantern_pp_uses_the_multiplicative_threshold():
    p = torch.tensor([[0.1, 0.15, 0.1, 0.65]], dtype=torch.float64)
    rule = get_rule("lantern_pp", k=3, lam=3.0)  # (λ−1)·p(x) = 0.2: c_1 = .15 ok, c_2 = .25 not (λ·p(x) would pool it)
    rule.bind(RuleResources(vocab=4, codebook=line_codebook()))
    assert float(rule.accept_prob(NodeState(p=p, q=None), torch.tensor([0]), NodeContext())) == pytest.approx(0.25)


def test_lantern_family_pools_exactly_k_neighbours_under_its_threshold_sampled_by_hand():
    """Sampled candidate x = 0 on a 1-D codebook 0..4 (neighbours 1, 2, 3, 4 in that order):
    accept min(1, p(A)/q(x)) with A = x plus the longest prefix of its k nearest whose mass stays under
    the threshold (LANTERN: δ; LANTERN++: (λ − 1)·p(x)), all by hand."""
    book = torch.arange(5.0)[:, None]
    p = torch.tensor([[0.2, 0.05, 0.05, 0.05, 0.65]], dtype=torch.float64)
    q = torch.tensor([[0.6, 0.1, 0.1, 0.1, 0.1]], dtype=torch.float64)
    x, ctx = torch.tensor([0]), NodeContext()
    lantern_rule = _bound(get_rule("lantern", k=2, delta=0.3, residual="clean"), book)  # c = .05 + .05, k stops it
    assert float(lantern_rule.accept_prob(NodeState(p=p, q=q), x, ctx)) == pytest.approx((0.2 + 0.1) / 0.6)
    pp = _bound(get_rule("lantern_pp", k=3, lam=1.6), book)  # (λ − 1)·p(x) = .12: c_2 = .10 ok, c_3 = .15 not
    assert float(pp.accept_prob(NodeState(p=p, q=q), x, ctx)) == pytest.approx((0.2 + 0.1) / 0.6)


@given(law_pairs(), st.sampled_from([1.1, 2.0, 5.0]), st.integers(1, 3))
@fast(60)
def test_coolsd_one_node_tv_matches_the_closed_form(pair, delta, depth):
    p, q = pair
    rule = get_rule("coolsd", delta=delta)
    omega = delta * math.exp(-0.7 * depth + 0.7)
    law = induced_law(rule, p, q, n_candidates=1, sampled=True, depth=depth)
    if omega >= 1:
        closed = float(torch.minimum((q - p).clamp_min(0), (omega - 1) * p).sum())
    else:
        closed = 0.0  # ω < 1 is lossless
    assert tv(law, p) == pytest.approx(closed, abs=1e-12)
    declared = float(rule.tv_bound(p[None], q[None], NodeContext(depth=depth), sampled=True)[0])
    assert declared == pytest.approx(closed, abs=1e-12)  # one sibling: the declared bound is this TV, not more


def _cascade_ctx(children, boosts, partners, vocab=3) -> NodeContext:
    """CASCADE extras by hand; the kl gate reads a uniform parent law (KL(p ‖ uniform) ≤ log V < 4)."""
    boosts = torch.tensor([boosts], dtype=torch.float64)
    return NodeContext(extras={"child_tokens": torch.tensor([children]), "depth_boost": boosts, "depth_ok": boosts > 0,
                               "partner_tokens": torch.tensor([partners]),
                               "parent_lsn": torch.full((1, vocab), -math.log(vocab), dtype=torch.float64)})


def test_cascade_acceptance_is_p_over_q_minus_s():
    p = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)
    rule = get_rule("cascade")
    accept = lambda ctx, q=q: float(rule.accept_prob(NodeState(p=p, q=q), torch.tensor([0]), ctx))
    # s = 0.1 (depth) + p(1) = 0.3 (breadth) = 0.4 → min(1, 0.2 / (0.5 − 0.4)) = 1
    assert accept(_cascade_ctx([0, 2], [0.1, 0.0], [[1, -1], [-1, -1]])) == pytest.approx(1.0)
    # no partner, no depth signal → strict 0.4; with depth boost 0.2: 0.2 / 0.3
    assert accept(_cascade_ctx([0, 2], [0.0, 0.0], [[-1, -1], [-1, -1]])) == pytest.approx(0.4)
    with_depth = _cascade_ctx([0, 2], [0.2, 0.0], [[-1, -1], [-1, -1]])
    assert accept(with_depth) == pytest.approx(2 / 3)
    # point masses: q = 1 → min(1, 0.2 / 0.8)
    assert accept(with_depth, None) == pytest.approx(0.25)
    bounded = get_rule("cascade_bounded", eps=0.05)  # cap: strict 0.4 + 0.05
    assert float(bounded.accept_prob(NodeState(p=p, q=q), torch.tensor([0]), with_depth)) == pytest.approx(0.45)


@pytest.mark.parametrize("count", ["node", "token"])
def test_cascade_breadth_partner_with_token_zero_counts(count):
    """Issue 22 repro: depth boost 0, p = [.3,.1,.1,.2,.2,.1], q(2) = .5, x = 2. A partner carrying token 0
    boosts by p(0) = .3 (accept .1/(.5 − .3) = .5) wherever the −1 padding sits."""
    p = torch.tensor([[0.3, 0.1, 0.1, 0.2, 0.2, 0.1]], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.1, 0.5, 0.1, 0.1, 0.1]], dtype=torch.float64)
    rule = get_rule("cascade", breadth_count=count)
    for partners in ([[0, -1]], [[-1, 0]]):
        ctx = _cascade_ctx([2], [0.0], partners, vocab=6)
        assert float(rule.accept_prob(NodeState(p=p, q=q), torch.tensor([2]), ctx)) == pytest.approx(0.5)


def test_cascade_breadth_counts_partner_nodes_or_distinct_tokens():
    """Two partner nodes carrying the same token: the authors' code adds p_j(token) once per node."""
    p = torch.tensor([[0.1, 0.1, 0.1, 0.7]], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.6, 0.1, 0.2]], dtype=torch.float64)
    ctx = _cascade_ctx([1], [0.0], [[0, 0, -1]], vocab=4)
    per_node = get_rule("cascade").accept_prob(NodeState(p=p, q=q), torch.tensor([1]), ctx)
    per_token = get_rule("cascade", breadth_count="token").accept_prob(NodeState(p=p, q=q), torch.tensor([1]), ctx)
    assert float(per_node) == pytest.approx(0.1 / (0.6 - 0.2)) and float(per_token) == pytest.approx(0.1 / (0.6 - 0.1))


def test_cascade_kl_gate_reads_the_residual_against_the_normalised_parent_law():
    """gate=kl: KL(p_j ‖ softmax(normalize(parent logits))) < threshold; it never reads x, so a peaked
    residual (low entropy, far from the near-uniform reference) closes the depth boost for every candidate."""
    vocab = 4
    flat = torch.full((1, vocab), 0.25, dtype=torch.float64)
    peaked = torch.tensor([[0.97, 0.01, 0.01, 0.01]], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.7, 0.1, 0.1]], dtype=torch.float64)
    ctx = _cascade_ctx([1], [0.3], [[-1]], vocab=vocab)
    rule = get_rule("cascade", kl_threshold=1.0)  # KL(flat ‖ uniform) = 0; KL(peaked ‖ uniform) ≈ 1.2
    assert float(rule.accept_prob(NodeState(p=flat, q=q), torch.tensor([1]), ctx)) == pytest.approx(0.25 / (0.7 - 0.3))
    assert float(rule.accept_prob(NodeState(p=peaked, q=q), torch.tensor([1]), ctx)) == pytest.approx(0.01 / 0.7)


def test_cascade_lumina_confidence_gate_gates_depth_and_breadth():
    """variant=lumina: the boost needs p_j(x) ≥ the probability at which p_j's top mass reaches 0.8."""
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)  # cumsum .5, .8 → cutoff p = .3
    q = torch.tensor([[0.1, 0.6, 0.1, 0.2]], dtype=torch.float64)
    rule = get_rule("cascade", variant="lumina")
    assert (rule.params["gate"], rule.params["tau_b"], rule.params["depth_repr"]) == ("confidence", 0.5,
                                                                                      "parent_grandparent")
    ctx = _cascade_ctx([1, 2], [0.05, 0.05], [[0, -1], [0, -1]], vocab=4)
    # x = 1 (p = .3, in the top mass): s = .05 + p(0) = .55 → .3 / (.6 − .55) > 1 → 1
    assert float(rule.accept_prob(NodeState(p=p, q=q), torch.tensor([1]), ctx)) == pytest.approx(1.0)
    # x = 2 (p = .15, outside): neither boost → strict .15 / .6
    assert float(rule.accept_prob(NodeState(p=p, q=q.roll(1, -1)), torch.tensor([2]), ctx)) == pytest.approx(0.25)


def test_gsd_is_the_reference_cluster():
    """The window [i − 7, i + 7) in ascending logit order, |p(y) − p(x)| < .15, squared distance < .5."""
    vocab = 20
    logits = torch.arange(vocab, dtype=torch.float64)[None]  # ascending order = token order
    p = torch.full((1, vocab), 0.01, dtype=torch.float64)
    p[0, 10], p[0, 12], p[0, 17] = 0.3, 0.2, 0.32  # x = 10: window [3, 17) holds 12, not 17
    p /= p.sum()
    q = torch.full((1, vocab), 0.1 / 17, dtype=torch.float64)
    q[0, 10] = q[0, 12] = q[0, 17] = 0.3  # p(C)/q(C) < 1 here, so a wrong window changes the acceptance
    q[0, 5] = 0.05  # and p/q < 1 for the fallback below
    q /= q.sum()
    book = torch.zeros(vocab, 1)
    book[4] = 1.0  # squared distance 1 ≥ .5: token 4 never joins
    rule = _bound(get_rule("gsd"), book)
    ctx = NodeContext(extras={"node_logits": logits})
    x = torch.tensor([10])
    window = [t for t in range(3, 17) if t != 4 and abs(float(p[0, t] - p[0, 10])) < 0.15]
    assert window == [10, 12]  # the 0.01 tokens fail the probability filter; 17 is past i + 7
    expected = min(1.0, float(p[0, window].sum()) / float(q[0, window].sum()))
    assert expected < 0.9 and float(rule.accept_prob(NodeState(p=p, q=q), x, ctx)) == pytest.approx(expected)
    # Rank 5 < 7: the reference's slice starts at a negative index, raises, and falls back to p/q.
    assert float(rule.accept_prob(NodeState(p=p, q=q), torch.tensor([5]), ctx)) == pytest.approx(float(p[0, 5] / q[0, 5]))


def test_gsd_window_ends_six_above_and_starts_seven_below_the_draft():
    """Ascending logit order = token order, x = 9 (rank 9): the tokens at ranks 2 (= 9 − 7) and 15 (= 9 + 6)
    join its cluster, the one at rank 16 (= 9 + 7) does not, by hand."""
    vocab = 20
    logits = torch.arange(vocab, dtype=torch.float64)[None]
    p = torch.full((1, vocab), 0.01, dtype=torch.float64)
    p[0, [2, 9, 15, 16]] = 0.2  # the only tokens within .15 of p(x)
    p /= p.sum()
    q = torch.full((1, vocab), 0.001, dtype=torch.float64)
    q[0, [2, 9, 15]], q[0, 16] = 0.5, 0.1  # rank 16 would move p(C)/q(C) from .67 to .84
    q /= q.sum()
    rule = _bound(get_rule("gsd"), torch.zeros(vocab, 1))  # every embedding distance 0: no one is filtered out
    ctx = NodeContext(extras={"node_logits": logits})
    cluster = [2, 9, 15]
    expected = float(p[0, cluster].sum() / q[0, cluster].sum())
    assert expected < 1 and float(rule.accept_prob(NodeState(p=p, q=q), torch.tensor([9]), ctx)) == pytest.approx(expected)


@pytest.mark.parametrize("block", [2**24, 300 * 7])  # one row block, and 43 blocks of 7 rows
def test_gsd_distance_table_equals_the_direct_squared_distance(block, monkeypatch):
    """The GEMM-built table decides every pair as Σ (y − x)² < t does, pairs exactly at the threshold included."""
    monkeypatch.setattr("cascade_sd.acceptance.gsd._BLOCK", block)
    monkeypatch.setattr("cascade_sd.acceptance.gsd._CLOSE", {})
    gen = torch.Generator().manual_seed(3)
    book = torch.randn(300, 24, generator=gen, dtype=torch.float64) * 0.3
    book[1] = book[0].clone()
    book[1, 0] += 0.5 ** 0.5  # (y − x)² = 0.5 up to rounding: the expansion alone may land either side
    direct = (book[None] - book[:, None]).pow(2).sum(-1)
    for thr in (0.5, float(direct[0, 1]), float(direct.median())):
        rule = get_rule("gsd", dist_threshold=thr)
        rule.bind(RuleResources(vocab=300, codebook=book, token_embeddings=book))
        table = rule._close_table(torch.device("cpu"))
        assert torch.equal(table, direct < thr)
        assert 0 < int(table.sum()) < 300 * 300


# ---------------------------------------------------------------------------- parameters
def test_parameter_errors_are_one_line():
    with pytest.raises(ConfigError, match=r"delta=-0.1 is out of range; allowed \[0, 1\]"):
        get_rule("lantern", delta=-0.1)
    with pytest.raises(ConfigError, match="residual='dirty' is not allowed; choose one of 'clean', 'reference-code', "
                                          "'reference-code-lumina'"):
        get_rule("lantern", residual="dirty")
    with pytest.raises(ConfigError, match="parameter 'lam' does not belong to rule 'lantern'"):
        get_rule("lantern", lam=2.0)
    with pytest.raises(ConfigError, match=r"lam=0.5 is out of range; allowed \[1, inf\]"):
        get_rule("lantern_pp", lam=0.5)
    with pytest.raises(ConfigError, match="breadth='maybe' is not allowed; expected on/off"):
        get_rule("cascade", breadth="maybe")
    assert get_rule("cascade", breadth="off").params["breadth"] is False
    assert get_rule("coolsd", delta="2").params["delta"] == 2.0


def test_every_rule_declares_its_bound_or_none():
    declared = {name for name, cls in RULES.items() if cls.declares_bound}
    assert declared == {"strict", "lantern", "lantern_pp", "coolsd", "cascade_bounded"}
    for name in RELAXED:
        assert RULES[name].strength in RULES[name].parameters


@pytest.mark.parametrize("name", ["strict", *RELAXED])
@given(node_inputs())
@fast(40)
def test_single_sample_fast_path_equals_the_enumeration(name, inputs):
    """Rules with a vectorised single-sample law must give exactly the enumerated one; for the
    default path, the claim behind it (same bonus law after any rejection) must hold too."""
    p, q, _, _, ctx = inputs
    rule = make(name, p.shape[-1], **STRONG.get(name, {}))
    one = NodeContext(depth=ctx.depth, extras=ctx.extras)
    assert rule.single_sample_law(NodeState(p=p[None], q=q[None]), one) is not None
    fast_law = induced_law(rule, p, q, n_candidates=1, sampled=True, context=ctx)
    slow_law = induced_law(rule, p, q, n_candidates=1, sampled=True, context=ctx, vectorised=False)
    assert torch.allclose(fast_law, slow_law, atol=TOL, rtol=0)
    if rule.residual_independent_of_candidate:
        state = NodeState(p=p[None], q=q[None])
        laws = [rule.bonus_law(rule.reject(state, torch.tensor([x]), one), one)[0]
                for x in torch.nonzero(q > 0).flatten()]
        assert all(torch.allclose(law, laws[0], atol=1e-12, rtol=0) for law in laws)


@given(node_inputs())
@fast(40)
def test_lantern_reference_code_vectorised_law_equals_the_per_token_loop(inputs):
    p, q, _, _, ctx = inputs
    rule = make("lantern", p.shape[-1], k=3, delta=0.3, residual="reference-code")
    fast_law = induced_law(rule, p, q, n_candidates=1, sampled=True, context=ctx)
    slow_law = induced_law(rule, p, q, n_candidates=1, sampled=True, context=ctx, vectorised=False)
    assert torch.allclose(fast_law, slow_law, atol=TOL, rtol=0)


@pytest.mark.parametrize("name,params", [
    ("lantern", {"k": 60, "delta": 0.3, "residual": "clean"}), ("lantern", {"k": 60, "delta": 0.6, "residual": "clean"}),
    ("lantern_pp", {"k": 60, "lam": 30.0, "residual": "clean"}),
])
@pytest.mark.parametrize("sharpness", [0.5, 2.0, 6.0])
def test_lantern_scan_over_many_chunks_matches_the_enumeration(name, params, sharpness):
    """The neighbour scan stops early and works in growing chunks; with k = 60 it spans several
    chunks, and its law and coupling bound must still be the enumeration's (flat and peaked laws)."""
    gen = torch.Generator().manual_seed(int(sharpness * 10))
    p, q = (torch.softmax(sharpness * torch.randn(64, generator=gen, dtype=torch.float64), -1) for _ in range(2))
    rule = make(name, 64, **params)
    fast_law = induced_law(rule, p, q, n_candidates=1, sampled=True)
    slow_law = induced_law(rule, p, q, n_candidates=1, sampled=True, vectorised=False)
    assert torch.allclose(fast_law, slow_law, atol=TOL, rtol=0)
    assert rule.tv_bound(p[None], q[None], NodeContext(), sampled=True)[0] >= 0.5 * (fast_law - p).abs().sum() - TOL
    scan = rule._scan(p, q)
    assert scan.rejected.numel() < 64
    if sharpness == 6.0:  # peaked laws: several rejectable tokens whose scan leaves the first chunk
        assert scan.rejected.numel() > 5 and int(scan.m.max()) > 8


def test_nearest_equals_a_stable_full_sort_with_many_ties():
    from cascade_sd.acceptance.lantern import _nearest

    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        v = int(torch.randint(3, 40, (1,), generator=g))
        k = int(torch.randint(1, v, (1,), generator=g))
        dist = torch.randint(0, 5, (7, v), generator=g).double()  # coarse values: ties everywhere
        assert torch.equal(_nearest(dist, k), torch.sort(dist, dim=-1, stable=True).indices[:, :k])


def test_overrides_are_the_entries_that_differ_from_the_resolved_defaults():
    from cascade_sd.acceptance.registry import overrides

    assert overrides("cascade", get_rule("cascade").params) == {}
    assert overrides("cascade", get_rule("cascade", tau_b=0.5).params) == {"tau_b": 0.5}
    # the Lumina variant's own defaults (tau_b 0.5, tau_d 0.9, ...) are not overrides; the variant is
    assert overrides("cascade", get_rule("cascade", variant="lumina").params) == {"variant": "lumina"}
    assert overrides("lantern", get_rule("lantern", delta=0.2).params) == {"delta": 0.2}
