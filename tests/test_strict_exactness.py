"""Exactness of the strict rule (DESIGN 4.1-4.2, issue 3 "Exactness").

- the pure Fraction reference (tests/reference_strict.py) gives a node law equal to p *exactly*,
  for point-mass candidate lists (duplicates included) and for n siblings sampled without
  replacement;
- the implementation (``induced_law`` and the rule's own methods, float64) equals p within
  1e-12, and agrees with the reference also on the split accepted-vs-bonus, which is not p;
- greedy, degenerate (p == q, disjoint supports), batched-vs-row-by-row, the declared bound and
  the registry's one-line errors.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference_strict as ref
from strategies import (
    candidate_lists,
    law_pairs,
    laws,
    rational_law_pairs,
    rational_laws,
    vocab_sizes,
)

from cascade_sd.acceptance import NodeContext, NodeState, get_rule, induced_law
from cascade_sd.errors import ConfigError

TOL = 1e-12
CTX = NodeContext(depth=1)


def fast(n: int):
    """``n`` examples per run under the session's seeded profile (tests/conftest.py)."""
    return settings(max_examples=n)


STRICT = get_rule("strict")


def as_tensor(law) -> torch.Tensor:
    return torch.tensor([float(v) for v in law], dtype=torch.float64)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max().item()


def n_sequences(support: int, n: int) -> int:
    """Number of ordered draw sequences of n distinct tokens from a support of this size."""
    return math.perm(support, min(n, support))


def top_candidates(q: torch.Tensor, n: int) -> list[int]:
    """q's top-n tokens, ties in token order (what ``induced_law(sampled=False)`` verifies)."""
    return sorted(range(q.numel()), key=lambda i: -q[i].item())[:n]


# --- float64 walkers through the rule's own methods ------------------------------------------


def point_walker(rule, p: torch.Tensor, candidates: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted, bonus) sub-laws for point-mass siblings in tree order, duplicates of a rejected
    token skipped; uses only ``rule.start/accept_prob/reject/bonus_law``."""
    vocab = p.numel()
    accepted = torch.zeros(vocab, dtype=torch.float64)
    state = rule.start(p.unsqueeze(0), None, False, CTX)
    weight = 1.0
    rejected: set[int] = set()
    for x in candidates:
        if x in rejected:
            continue
        xs = torch.tensor([x])
        a = rule.accept_prob(state, xs, CTX).item()
        accepted[x] += weight * a
        weight *= 1.0 - a
        rejected.add(x)
        state = rule.reject(state, xs, CTX)
    return accepted, weight * rule.bonus_law(state, CTX)[0]


def sampled_walker(rule, p: torch.Tensor, q: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted, bonus) sub-laws for n siblings drawn from q without replacement.

    Engine-faithful: the draw probabilities come from the *original* q with the already drawn
    siblings removed (how the drafter samples a tree), not from the rule's state, so a rule
    whose proposal bookkeeping is wrong shows up. Branches are walked as a batch of rows.
    """
    vocab = p.numel()
    accepted = torch.zeros(vocab, dtype=torch.float64)
    bonus = torch.zeros(vocab, dtype=torch.float64)
    state = rule.start(p.unsqueeze(0), q.unsqueeze(0), True, CTX)
    weight = torch.ones(1, dtype=torch.float64)
    drawn = torch.zeros(1, vocab, dtype=torch.bool)
    for _ in range(n):
        left = torch.where(drawn, torch.zeros_like(q), q.expand_as(drawn))
        total = left.sum(-1)
        done = total <= 0  # q's support ran out: bonus token now
        if done.any():
            bonus += (weight[done].unsqueeze(-1) * rule.bonus_law(take(state, done), CTX)).sum(0)
        rows, xs = (left > 0).nonzero(as_tuple=True)
        if rows.numel() == 0:
            return accepted, bonus
        reach = weight[rows] * left[rows, xs] / total[rows]
        expanded = take(state, rows)
        a = rule.accept_prob(expanded, xs, CTX)
        accepted.index_add_(0, xs, reach * a)
        weight = reach * (1 - a)
        state = rule.reject(expanded, xs, CTX)
        drawn = drawn[rows].clone()
        drawn[torch.arange(rows.numel()), xs] = True
        keep = weight > 0
        weight, state, drawn = weight[keep], take(state, keep), drawn[keep]
        if weight.numel() == 0:
            return accepted, bonus
    bonus += (weight.unsqueeze(-1) * rule.bonus_law(state, CTX)).sum(0)
    return accepted, bonus


def take(state: NodeState, idx: torch.Tensor) -> NodeState:
    return NodeState(p=state.p[idx], q=None if state.q is None else state.q[idx])


# --- composite inputs -------------------------------------------------------------------------

MAX_SEQUENCES = 360  # keeps the pure-Python enumeration of draw sequences fast


@st.composite
def rational_sampled_inputs(draw):
    """Rational (p, q) and a sibling count n with a small number of draw sequences."""
    p, q = draw(rational_law_pairs())
    vocab = len(p)
    support = sum(1 for v in q if v > 0)
    ns = [n for n in range(1, vocab + 1) if n_sequences(support, n) <= MAX_SEQUENCES]
    return p, q, draw(st.sampled_from(ns))


@st.composite
def rational_point_inputs(draw):
    """Rational p and a point-mass candidate list (duplicates allowed)."""
    vocab = draw(vocab_sizes())
    p = draw(rational_laws(vocab))
    return p, draw(candidate_lists(vocab))


@st.composite
def float_inputs(draw):
    """Float (p, q) and a sibling count n in 1..vocab (often above q's support)."""
    p, q = draw(law_pairs())
    return p, q, draw(st.integers(1, p.numel()))


# --- 1. the pure reference is exact -------------------------------------------------------------


@fast(80)
@given(rational_point_inputs())
def test_reference_point_masses_law_is_exactly_p(inputs):
    p, candidates = inputs
    out = ref.node_law_point_masses(p, candidates)
    assert out.law == p
    assert all(isinstance(v, Fraction) for v in out.law)


@fast(80)
@given(rational_sampled_inputs())
def test_reference_sampled_law_is_exactly_p(inputs):
    p, q, n = inputs
    assert sum(prob for _, prob in ref.draw_sequences(q, n)) == 1
    out = ref.node_law_sampled(p, q, n)
    assert out.law == p


@fast(60)
@given(rational_law_pairs())
def test_reference_point_masses_from_q_top_is_exactly_p(pq):
    """The point-mass mode of ``induced_law``: q's top-n tokens as the candidates."""
    p, q = pq
    for n in range(1, len(p) + 1):
        assert ref.node_law_point_masses(p, top_candidates(as_tensor(q), n)).law == p


# --- 2. the implementation equals p ---------------------------------------------------------------


@fast(80)
@given(float_inputs(), st.booleans())
def test_induced_law_equals_p(inputs, sampled):
    p, q, n = inputs
    law = induced_law(STRICT, p, q, n_candidates=n, sampled=sampled)
    assert law.dtype == torch.float64 and law.shape == p.shape
    assert max_abs(law, p) <= TOL


@pytest.mark.parametrize("sampled", [True, False])
def test_induced_law_more_candidates_than_q_support(sampled):
    p = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0], dtype=torch.float64)
    q = torch.tensor([0.0, 0.0, 0.75, 0.0, 0.25], dtype=torch.float64)
    for n in range(1, 6):
        assert max_abs(induced_law(STRICT, p, q, n_candidates=n, sampled=sampled), p) <= TOL


@fast(60)
@given(float_inputs())
def test_engine_faithful_sampled_walk_equals_p(inputs):
    """Siblings drawn from the original q without replacement, verified by the rule's methods."""
    p, q, n = inputs
    accepted, bonus = sampled_walker(STRICT, p, q, n)
    assert max_abs(accepted + bonus, p) <= TOL


@fast(60)
@given(st.data())
def test_point_mass_lists_with_duplicates_equal_p(data):
    vocab = data.draw(vocab_sizes())
    p = data.draw(laws(vocab))
    candidates = data.draw(candidate_lists(vocab))
    accepted, bonus = point_walker(STRICT, p, candidates)
    assert max_abs(accepted + bonus, p) <= TOL


# --- 3. implementation vs reference on the same rational inputs ---------------------------------


@fast(60)
@given(rational_sampled_inputs())
def test_implementation_matches_reference_sampled(inputs):
    p, q, n = inputs
    out = ref.node_law_sampled(p, q, n)
    pt, qt = as_tensor(p), as_tensor(q)
    assert max_abs(induced_law(STRICT, pt, qt, n_candidates=n, sampled=True), as_tensor(out.law)) <= TOL
    # Beyond the total law: which tokens come from an accepted sibling and which from the bonus.
    accepted, bonus = sampled_walker(STRICT, pt, qt, n)
    assert max_abs(accepted, as_tensor(out.accepted)) <= TOL
    assert max_abs(bonus, as_tensor(out.bonus)) <= TOL


@fast(60)
@given(rational_law_pairs(), st.integers(1, 8))
def test_implementation_matches_reference_point_masses(pq, n):
    p, q = pq
    n = min(n, len(p))
    pt, qt = as_tensor(p), as_tensor(q)
    out = ref.node_law_point_masses(p, top_candidates(qt, n))
    assert max_abs(induced_law(STRICT, pt, qt, n_candidates=n, sampled=False), as_tensor(out.law)) <= TOL


@fast(60)
@given(rational_point_inputs())
def test_point_walker_matches_reference_split(inputs):
    p, candidates = inputs
    out = ref.node_law_point_masses(p, candidates)
    accepted, bonus = point_walker(STRICT, as_tensor(p), candidates)
    assert max_abs(accepted, as_tensor(out.accepted)) <= TOL
    assert max_abs(bonus, as_tensor(out.bonus)) <= TOL


@fast(80)
@given(rational_law_pairs(), st.data())
def test_one_step_matches_reference(pq, data):
    """accept_prob and reject of one sibling against the reference's one-step formulas."""
    p, q = pq
    vocab = len(p)
    pt, qt = as_tensor(p), as_tensor(q)
    x = data.draw(st.sampled_from([i for i in range(vocab) if q[i] > 0]))
    xs = torch.tensor([x])
    # sampled sibling
    state = STRICT.start(pt.unsqueeze(0), qt.unsqueeze(0), True, CTX)
    a = ref.sampled_accept_prob(p, q, x)
    assert abs(STRICT.accept_prob(state, xs, CTX).item() - float(a)) <= TOL
    if a < 1:
        nxt = STRICT.reject(state, xs, CTX)
        assert max_abs(nxt.p[0], as_tensor(ref.sampled_residual(p, q))) <= TOL
        assert max_abs(nxt.q[0], as_tensor(ref.sampled_next_proposal(q, x))) <= TOL
    # point-mass sibling
    state = STRICT.start(pt.unsqueeze(0), qt.unsqueeze(0), False, CTX)
    assert state.q is None
    assert abs(STRICT.accept_prob(state, xs, CTX).item() - float(ref.point_accept_prob(p, x))) <= TOL
    if p[x] < 1:
        nxt = STRICT.reject(state, xs, CTX)
        assert max_abs(nxt.p[0], as_tensor(ref.point_residual(p, x))) <= TOL


def test_sampled_edges_are_exact():
    """A token the proposal cannot produce is never accepted (0, not NaN, also where p = 0), p ≥ q
    accepts with probability exactly 1, and a proposal that loses its last token has no mass left."""
    p = torch.tensor([[0.5, 0.0, 0.3, 0.2]], dtype=torch.float64)
    q = torch.tensor([[0.0, 0.0, 0.3, 0.7]], dtype=torch.float64)
    state = STRICT.start(p, q, True, CTX)
    probs = [STRICT.accept_prob(state, torch.tensor([x]), CTX).item() for x in range(4)]
    assert probs == [0.0, 0.0, 1.0, 0.2 / 0.7]
    last = NodeState(p=p, q=torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64))
    assert STRICT.reject(last, torch.tensor([3]), CTX).q.tolist() == [[0.0, 0.0, 0.0, 0.0]]


# --- 4. greedy ---------------------------------------------------------------------------------


def one_hot(vocab: int, i: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(i), vocab).to(torch.float64)


@fast(40)
@given(law_pairs(), st.data())
def test_greedy_accepts_iff_argmax(pq, data):
    base, q = pq
    vocab = base.numel()
    top = int(base.argmax())
    p = one_hot(vocab, top)  # the greedy target law
    everything = torch.arange(vocab).unsqueeze(-1)
    # point masses: every token, one row each
    rows = p.expand(vocab, vocab)
    a = STRICT.accept_prob(NodeState(p=rows, q=None), everything.squeeze(-1), CTX)
    assert a.tolist() == [1.0 if x == top else 0.0 for x in range(vocab)]
    # sampled candidates: every token q can draw
    drawable = [x for x in range(vocab) if q[x] > 0]
    xs = torch.tensor(drawable)
    state = NodeState(p=p.expand(len(drawable), vocab), q=q.expand(len(drawable), vocab))
    a = STRICT.accept_prob(state, xs, CTX)
    assert a.tolist() == [1.0 if x == top else 0.0 for x in drawable]
    # along a candidate list the non-argmax siblings are rejected surely and the residual stays
    # the point mass: the emitted token is the argmax, accepted iff it is among the candidates.
    candidates = data.draw(candidate_lists(vocab))
    accepted, bonus = point_walker(STRICT, p, candidates)
    assert accepted.tolist() == (p if top in candidates else torch.zeros(vocab)).tolist()
    assert max_abs(accepted + bonus, p) <= TOL
    n = data.draw(st.integers(1, min(vocab, 4)))  # q(argmax) = 0 makes every draw order live
    accepted, bonus = sampled_walker(STRICT, p, q, n)
    assert max_abs(accepted + bonus, p) <= TOL
    for sampled in (True, False):
        assert max_abs(induced_law(STRICT, p, q, n_candidates=n, sampled=sampled), p) <= TOL


# --- 5. degenerate laws ---------------------------------------------------------------------------


@fast(60)
@given(law_pairs(relation="equal"))
def test_equal_laws_first_sampled_candidate_always_accepted(pq):
    p, q = pq
    drawable = [x for x in range(p.numel()) if q[x] > 0]
    state = STRICT.start(p.expand(len(drawable), -1), q.expand(len(drawable), -1), True, CTX)
    a = STRICT.accept_prob(state, torch.tensor(drawable), CTX)
    assert a.tolist() == [1.0] * len(drawable)
    first = (q[drawable] * a).sum().item()  # probability that the first sibling is accepted
    assert abs(first - 1.0) <= TOL
    accepted, bonus = sampled_walker(STRICT, p, q, 1)
    assert max_abs(accepted, p) <= TOL and bonus.abs().max().item() <= TOL


# vocab <= 6: every sibling is rejected, so all (up to 5!) draw orders are enumerated.
@fast(50)
@given(st.integers(2, 6).flatmap(lambda v: law_pairs(vocab=v, relation="disjoint")), st.booleans())
def test_disjoint_supports_reject_everything_and_bonus_is_p(pq, sampled):
    p, q = pq
    drafted = [x for x in range(p.numel()) if q[x] > 0]
    state = STRICT.start(p.unsqueeze(0), q.unsqueeze(0), sampled, CTX)
    for x in drafted:  # every sibling q can produce, in token order
        xs = torch.tensor([x])
        assert STRICT.accept_prob(state, xs, CTX).item() == 0.0
        state = STRICT.reject(state, xs, CTX)
        assert max_abs(STRICT.bonus_law(state, CTX)[0], p) <= TOL
    n = len(drafted)
    assert max_abs(induced_law(STRICT, p, q, n_candidates=n, sampled=sampled), p) <= TOL
    if sampled:
        accepted, bonus = sampled_walker(STRICT, p, q, n)
    else:
        accepted, bonus = point_walker(STRICT, p, drafted)
    assert accepted.abs().max().item() == 0.0
    assert max_abs(bonus, p) <= TOL


# --- 6. batched rows == row by row -------------------------------------------------------------------


@fast(25)
@given(st.data())
def test_batched_calls_match_row_by_row(data):
    vocab = data.draw(vocab_sizes())
    batch = data.draw(st.integers(2, 6))
    pairs = [data.draw(law_pairs(vocab=vocab)) for _ in range(batch)]
    p = torch.stack([a for a, _ in pairs])
    q = torch.stack([b for _, b in pairs])
    steps = data.draw(st.integers(1, vocab))
    for sampled in (True, False):
        state = STRICT.start(p, q, sampled, CTX)
        singles = [STRICT.start(p[i : i + 1], q[i : i + 1], sampled, CTX) for i in range(batch)]
        for _ in range(steps):
            xs = torch.tensor(data.draw(st.lists(st.integers(0, vocab - 1), min_size=batch, max_size=batch)))
            a = STRICT.accept_prob(state, xs, CTX)
            assert a.shape == (batch,)
            nxt = STRICT.reject(state, xs, CTX)
            bonus = STRICT.bonus_law(nxt, CTX)
            for i in range(batch):
                xi = xs[i : i + 1]
                assert abs(STRICT.accept_prob(singles[i], xi, CTX).item() - a[i].item()) <= 1e-15
                singles[i] = STRICT.reject(singles[i], xi, CTX)
                assert max_abs(singles[i].p[0], nxt.p[i]) <= 1e-15
                assert (singles[i].q is None) == (nxt.q is None) == (not sampled)
                if sampled:
                    assert max_abs(singles[i].q[0], nxt.q[i]) <= 1e-15
                assert max_abs(STRICT.bonus_law(singles[i], CTX)[0], bonus[i]) <= 1e-15
            state = nxt


# --- 7. declared bound and registry errors ----------------------------------------------------------


def test_strict_declares_a_zero_bound():
    assert STRICT.declares_bound is True
    assert type(STRICT).declares_bound is True
    p = torch.full((3, 4), 0.25, dtype=torch.float64)
    q = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 3, dtype=torch.float64)
    bound = STRICT.tv_bound(p, q, CTX)
    assert bound is not None and bound.shape == (3,)
    assert bound.tolist() == [0.0, 0.0, 0.0]
    assert STRICT.tv_bound(p, None, CTX).tolist() == [0.0, 0.0, 0.0]


def test_unknown_rule_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as err:
        get_rule("nope")
    msg = str(err.value)
    assert "\n" not in msg
    assert "method" in msg and "'nope'" in msg
    assert "'strict'" in msg  # the allowed values are listed


def test_unknown_parameter_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as err:
        get_rule("strict", delta=0.1)
    msg = str(err.value)
    assert "\n" not in msg
    assert "delta" in msg and "strict" in msg
