"""Per-node drift in closed form, derived with sympy and checked against the implementation (DESIGN 6).

For a rule with a closed form, ``derive`` builds the node's emitted law symbolically from the
rule's formulas in DESIGN 4 (three-token vocabulary, laws on the simplex), splits the min/max
into every feasible case, and proves per case that the TV distance to p equals (or stays below)
the stated expression (``sympy.simplify`` of the difference is 0, or the excess is minus a
slack that the case makes non-negative). ``check_numeric`` then compares the expression with the
implementation's exact induced law (``induced_law``) on random instances. Any registered rule
gets the numeric check of its declared bound (``check_declared_bound``); a rule gets the
symbolic one by adding a ``ClosedForm`` to ``CLOSED_FORMS`` (see analysis/README.md).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Callable

import sympy as sp
import torch

from cascade_sd.acceptance import RULES, NodeContext, RuleResources, get_rule, induced_law

P = sp.symbols("p0:3", nonnegative=True)
Q = sp.symbols("q0:3", nonnegative=True)
SIMPLEX = {P[2]: 1 - P[0] - P[1], Q[2]: 1 - Q[0] - Q[1]}


@dataclass
class ClosedForm:
    """A rule's one-node TV in closed form: ``relation`` "equals" or "at most" ``expression``.

    ``setting``: ``n_candidates`` candidates, sampled from q or q's top tokens as point masses;
    ``derive()`` returns the number of feasible cases it proved (raises AssertionError otherwise);
    ``value(p, q, params)`` evaluates the expression on float64 tensors for the numeric check.
    """

    rule: str
    relation: str
    expression: str
    sampled: bool
    n_candidates: int
    derive: Callable[[], int]
    value: Callable[[torch.Tensor, torch.Tensor, dict], float]
    params: dict = field(default_factory=dict)


def _witness(conditions: list[sp.Expr], symbols: tuple, tries: int = 4000, seed: int = 0) -> dict | None:
    """A random point of the simplex pair satisfying every strict inequality in ``conditions`` (or None)."""
    free = (P[0], P[1], Q[0], Q[1], *symbols)
    tests = [sp.lambdify(free, c.subs(SIMPLEX), "math") for c in conditions]
    rng = random.Random(seed)
    for _ in range(tries):
        a, b = sorted(rng.random() for _ in range(2)), sorted(rng.random() for _ in range(2))
        values = (a[0], a[1] - a[0], b[0], b[1] - b[0], *(rng.uniform(0.0, 3.0) for _ in symbols))
        if all(t(*values) > 0 for t in tests):
            return dict(zip(free, values))
    return None


def _ratio_rule_cases(omega: sp.Expr) -> int:
    """One sampled candidate, acceptance f = min(1, ω·p/q), residual norm([p − q·f]_+), ω ≥ 1.

    Per token the regime is q ≤ p, p < q ≤ ω·p or q > ω·p; in each feasible combination the TV
    of the emitted law must equal Σ_{q>p} min(q − p, (ω − 1)·p) (resolved in that regime).
    """
    proved = 0
    for regimes in itertools.product(range(3), repeat=3):
        conds, f, closed = [], [], 0
        for y, r in enumerate(regimes):
            p, q = P[y], Q[y]
            if r == 0:
                conds.append(p - q)  # q < p: f = 1
                f.append(sp.Integer(1))
            elif r == 1:
                conds += [q - p, omega * p - q]  # p < q < ω·p: f = 1 (capped)
                f.append(sp.Integer(1))
                closed += q - p
            else:
                conds.append(q - omega * p)  # q > ω·p: f = ω·p/q
                f.append(omega * p / q)
                closed += (omega - 1) * p
        env = _witness(conds, tuple(omega.free_symbols))
        if env is None:
            continue
        # [p − q·f]_+ is p − q where q < p and 0 in the other two regimes (p − min(q, ω·p) ≤ 0).
        residual = [P[y] - Q[y] if r == 0 else sp.Integer(0) for y, r in enumerate(regimes)]
        mass = sum(residual)
        accept = sum(Q[y] * f[y] for y in range(3))
        law = [Q[y] * f[y] + (1 - accept) * residual[y] / mass if mass != 0 else Q[y] * f[y] for y in range(3)]
        diffs = [sp.simplify((law[y] - P[y]).subs(SIMPLEX)) for y in range(3)]
        tv = sum(d for d in diffs if d.subs(env) > 0)
        assert sp.simplify(tv - sp.sympify(closed).subs(SIMPLEX)) == 0, (regimes, tv, closed)
        proved += 1
    return proved


def derive_strict() -> int:
    """Strict with one sampled candidate: the emitted law equals p in every case (ω = 1)."""
    proved = 0
    for signs in itertools.product((0, 1), repeat=3):
        conds = [P[y] - Q[y] if s == 0 else Q[y] - P[y] for y, s in enumerate(signs)]
        env = _witness(conds, ())
        if env is None:
            continue
        f = [sp.Integer(1) if s == 0 else P[y] / Q[y] for y, s in enumerate(signs)]
        residual = [P[y] - Q[y] if s == 0 else sp.Integer(0) for y, s in enumerate(signs)]
        accept = sum(Q[y] * f[y] for y in range(3))
        mass = sum(residual)
        for y in range(3):
            law = Q[y] * f[y] + ((1 - accept) * residual[y] / mass if mass != 0 else 0)
            assert sp.simplify((law - P[y]).subs(SIMPLEX)) == 0, (signs, y)
        proved += 1
    return proved


def derive_coolsd() -> int:
    """COOL-SD with one sampled candidate, ω = δ·exp(−ν·i − μ) ≥ 1: TV = Σ_{q>p} min(q − p, (ω − 1)·p)."""
    omega = sp.Symbol("omega", positive=True)
    return _ratio_rule_cases(1 + omega)  # ω ≥ 1 written as 1 + ω', ω' > 0


def derive_lantern() -> int:
    """LANTERN with one point-mass candidate x = 0 whose neighbours are 1, 2 (k = 2): TV = c_{m*}."""
    proved = 0
    for m_star in range(3):  # the case c_{m*} ≤ δ < c_{m*+1}
        inside = list(range(1, m_star + 1))
        c = sum((P[i] for i in inside), sp.Integer(0))
        outside = [y for y in (1, 2) if y not in inside]
        law = {0: P[0] + c} | {y: sp.Integer(0) for y in inside}
        rest = 1 - P[0] - c
        for y in outside:  # rejected with probability 1 − p(A): the residual is p without A
            law[y] = rest * P[y] / rest
        tv = law[0] - P[0]  # only x gains mass; A \ {x} loses it
        assert sp.simplify(tv.subs(SIMPLEX) - c.subs(SIMPLEX)) == 0
        assert all(sp.simplify((law[y] - P[y]).subs(SIMPLEX)) == 0 for y in outside)
        proved += 1
    return proved


def derive_bounded_cascade() -> int:
    """Bounded CASCADE with one point-mass candidate x = 0 and boost s: f = min(1, p/(1 − s), p + ε);
    TV = f − p ≤ ε in every case (the excess over ε is minus the case's non-negative slack)."""
    s, eps = sp.Symbol("s", nonnegative=True), sp.Symbol("eps", nonnegative=True)
    p = P[0]
    proved = 0
    for f in (sp.Integer(1), p / (1 - s), p + eps):
        tv = f - p  # law = f·δ_x + (1 − f)·(p without x): only x gains mass
        cap_slack = sp.simplify((p + eps) - f)  # ≥ 0 in every case: f is a minimum that includes p + ε
        assert sp.simplify(tv - eps + cap_slack) == 0
        proved += 1
    return proved


def _coolsd_value(p: torch.Tensor, q: torch.Tensor, params: dict) -> float:
    omega = get_rule("coolsd", **params).omega(1)
    return float(torch.minimum((q - p).clamp_min(0), max(omega - 1, 0.0) * p).sum())


def _lantern_value(p: torch.Tensor, q: torch.Tensor, params: dict, rule=None) -> float:
    x = int(torch.argsort(q, descending=True, stable=True)[0])
    _, _, c = rule._set(p[None], torch.tensor([x]))
    return float(c[0])


CLOSED_FORMS: dict[str, ClosedForm] = {
    "strict": ClosedForm("strict", "equals", "0", True, 1, derive_strict, lambda p, q, prm: 0.0),
    "coolsd": ClosedForm("coolsd", "equals", "Σ_{q>p} min(q − p, (ω − 1)·p)", True, 1, derive_coolsd, _coolsd_value,
                         {"delta": 2.0}),
    "lantern": ClosedForm("lantern", "equals", "c_{m*} = Σ_{i≤m*} p(n_i)", False, 1, derive_lantern, _lantern_value,
                          {"delta": 0.2, "residual": "clean"}),  # the clean residual: the relaxed target exactly
    "cascade_bounded": ClosedForm("cascade_bounded", "at most", "ε", False, 1, derive_bounded_cascade,
                                  lambda p, q, prm: prm["eps"], {"eps": 0.05}),
}


def _instances(vocab: int, count: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        p = torch.rand(vocab, generator=g, dtype=torch.float64) ** 3
        q = torch.rand(vocab, generator=g, dtype=torch.float64) ** 3
        yield p / p.sum(), q / q.sum()


def _bound_rule(name: str, params: dict, vocab: int, seed: int):
    rule = get_rule(name, **params)
    book = torch.nn.functional.normalize(torch.randn(vocab, 2, generator=torch.Generator().manual_seed(seed)), dim=-1)
    rule.bind(RuleResources(vocab=vocab, codebook=book, token_embeddings=book))
    return rule


def firing_context(rule, p: torch.Tensor, n_candidates: int, depth: int = 1) -> NodeContext:
    """A node context in which the rule's context signals fire for whichever token is drafted:
    CASCADE lists every token as a child with a strong depth boost that passes its gate and one
    breadth partner; GSD orders the window by p itself. Context-free rules get a plain context."""
    vocab = p.shape[-1]
    if rule.name.startswith("cascade"):
        every = torch.arange(vocab)
        extras = {"child_tokens": every[None], "depth_boost": torch.full((1, vocab), 0.9, dtype=torch.float64),
                  "depth_ok": torch.ones(1, vocab, dtype=torch.bool),
                  "partner_tokens": ((every + 1) % vocab)[None, :, None],
                  "parent_lsn": torch.full((1, vocab), -float(torch.log(torch.tensor(float(vocab)))), dtype=torch.float64)}
        return NodeContext(depth=depth, n_candidates=n_candidates, extras=extras)
    if rule.name == "gsd":
        return NodeContext(depth=depth, n_candidates=n_candidates, extras={"node_logits": p.clamp_min(1e-300).log()[None]})
    return NodeContext(depth=depth, n_candidates=n_candidates)


def check_numeric(form: ClosedForm, *, vocab: int = 6, count: int = 200, seed: int = 0) -> float:
    """Largest violation (TV − expression for "at most", |TV − expression| for "equals") over instances,
    with the rule's signals firing (``firing_context``)."""
    rule = _bound_rule(form.rule, form.params, vocab, seed)
    worst = 0.0
    for p, q in _instances(vocab, count, seed):
        ctx = firing_context(rule, p, form.n_candidates)
        law = induced_law(rule, p, q, n_candidates=form.n_candidates, sampled=form.sampled, context=ctx)
        tv = 0.5 * float((law - p).abs().sum())
        value = _lantern_value(p, q, form.params, rule) if form.rule == "lantern" else form.value(p, q, form.params)
        worst = max(worst, tv - value if form.relation == "at most" else abs(tv - value))
    return worst


@dataclass
class BoundCheck:
    """Result of ``check_declared_bound``: the largest (exact TV − declared bound) and the largest
    exact TV seen (a check whose signals never fire would see only ~0 there)."""

    worst_excess: float
    largest_tv: float


def check_declared_bound(name: str, params: dict | None = None, *, vocab: int = 6, count: int = 100,
                         seed: int = 0, rule=None) -> BoundCheck | None:
    """Exact TV vs the declared bound over random instances, 1–3 candidates, sampled and point masses,
    with the rule's signals firing (``firing_context``); None when the rule declares no bound. Works
    for any registered rule, or for a given ``rule`` instance (e.g. a deliberately wrong bound)."""
    rule = rule if rule is not None else (_bound_rule(name, params or {}, vocab, seed) if RULES[name].declares_bound
                                          else None)
    if rule is None:
        return None
    worst, largest = -1.0, 0.0
    for i, (p, q) in enumerate(_instances(vocab, count, seed)):
        n, sampled = 1 + i % 3, bool(i % 2)
        ctx = firing_context(rule, p, n)
        law = induced_law(rule, p, q, n_candidates=n, sampled=sampled, context=ctx)
        bound = float(rule.tv_bound(p[None], q[None], ctx, sampled=sampled)[0])
        tv = 0.5 * float((law - p).abs().sum())
        worst, largest = max(worst, tv - bound), max(largest, tv)
    return BoundCheck(worst_excess=worst, largest_tv=largest)


def check_bound_tightness(form: ClosedForm, *, vocab: int = 6, count: int = 200, seed: int = 0) -> tuple[float, float]:
    """How tight the rule's *declared* bound is in the closed form's setting: (largest |declared − exact TV|
    over the instances where the closed form says the bound is attained, largest exact TV − declared).
    An "equals" form is attained everywhere; an "at most" form (bounded CASCADE's ε) where the cap binds,
    i.e. where the exact TV reaches the expression. A declared bound that is too loose (doubled, say)
    fails the first number; one that is too tight fails the second."""
    rule = _bound_rule(form.rule, form.params, vocab, seed)
    gap, excess, attained = 0.0, -1.0, 0
    for p, q in _instances(vocab, count, seed):
        ctx = firing_context(rule, p, form.n_candidates)
        law = induced_law(rule, p, q, n_candidates=form.n_candidates, sampled=form.sampled, context=ctx)
        tv = 0.5 * float((law - p).abs().sum())
        declared = float(rule.tv_bound(p[None], q[None], ctx, sampled=form.sampled)[0])
        value = _lantern_value(p, q, form.params, rule) if form.rule == "lantern" else form.value(p, q, form.params)
        excess = max(excess, tv - declared)
        if form.relation == "equals" or abs(tv - value) <= 1e-12:
            gap, attained = max(gap, abs(declared - tv)), attained + 1
    if attained == 0:
        raise AssertionError(f"{form.rule}: no instance attains the closed form; the tightness check saw nothing")
    return gap, excess
