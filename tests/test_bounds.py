"""Closed-form per-node drift derived with sympy and checked against the induced laws (issue 5 item 5)."""

from __future__ import annotations

import pytest
import torch

from analysis.bounds import CLOSED_FORMS, check_bound_tightness, check_declared_bound, check_numeric
from cascade_sd.acceptance import RULES, register
from cascade_sd.acceptance.registry import RULES as REGISTRY
from cascade_sd.acceptance.strict import StrictRule


@pytest.mark.parametrize("name", list(CLOSED_FORMS))
def test_closed_form_is_derived_and_matches_the_induced_laws(name):
    form = CLOSED_FORMS[name]
    assert form.derive() >= 3  # feasible cases proved symbolically
    assert check_numeric(form) <= 1e-12


@pytest.mark.parametrize("name", list(CLOSED_FORMS))
def test_declared_bound_is_tight_where_the_closed_form_is_attained(name):
    """An upper bound can only fail by being too small; this checks the other side: where the closed
    form is attained, the declared bound equals the exact TV (a doubled bound fails here)."""
    gap, excess = check_bound_tightness(CLOSED_FORMS[name])
    assert gap <= 1e-12 and excess <= 1e-12, (gap, excess)


def test_a_loose_bound_is_caught_by_the_tightness_check(monkeypatch):
    """Mutation: COOL-SD declaring twice its bound still holds as an upper bound; only tightness sees it."""
    declared = RULES["coolsd"].tv_bound
    monkeypatch.setattr(RULES["coolsd"], "tv_bound", lambda self, *args, **kwargs: 2 * declared(self, *args, **kwargs))
    assert check_declared_bound("coolsd", FIRING["coolsd"]).worst_excess <= 1e-12  # still an upper bound
    gap, excess = check_bound_tightness(CLOSED_FORMS["coolsd"])
    assert excess <= 1e-12 and gap > 0.01


#: Rules whose declared bound is checked with the relaxation biting: the largest exact TV seen must
#: be at least this (a check whose signals never fire sees strict's TV of 0 and proves nothing).
FIRING = {"lantern": {"delta": 0.3, "k": 3}, "lantern_pp": {"lam": 4.0, "k": 3}, "coolsd": {"delta": 2.0},
          "cascade_bounded": {"eps": 0.1}}


@pytest.mark.parametrize("name", list(RULES))
def test_declared_bounds_hold_on_random_instances(name):
    check = check_declared_bound(name, FIRING.get(name))
    if not RULES[name].declares_bound:
        assert check is None
        return
    assert check.worst_excess <= 1e-12
    if name != "strict":
        assert check.largest_tv > 0.02, "the rule's relaxation never fired in the check"


def test_bounded_cascade_with_an_optimistic_eps_is_caught():
    """Mutation: cascade_bounded that accepts with ε = 0.1 but declares half of it."""
    from analysis.bounds import _bound_rule

    class HalfEps(RULES["cascade_bounded"]):
        def tv_bound(self, p, q, ctx, *, sampled=True):
            return super().tv_bound(p, q, ctx, sampled=sampled) / 2

    rule = _bound_rule("cascade_bounded", {"eps": 0.1}, 6, 0)
    rule.__class__ = HalfEps
    check = check_declared_bound("cascade_bounded", rule=rule)
    assert check.worst_excess > 0.01


class _TooOptimistic(StrictRule):
    """Strict acceptance made lossy (always accept) while claiming strict's bound of 0."""

    name = "too_optimistic"

    def accept_prob(self, state, x, ctx):
        return torch.ones_like(x, dtype=state.p.dtype)


def test_a_wrong_bound_is_caught():
    register(_TooOptimistic)
    try:
        assert check_declared_bound("too_optimistic").worst_excess > 0.05
    finally:
        REGISTRY.pop("too_optimistic")
