"""Closed-form per-node drift derived with sympy and checked against the induced laws (issue 5 item 5)."""

from __future__ import annotations

import pytest
import torch

from analysis.bounds import CLOSED_FORMS, check_declared_bound, check_numeric
from cascade_sd.acceptance import RULES, register
from cascade_sd.acceptance.registry import RULES as REGISTRY
from cascade_sd.acceptance.strict import StrictRule


@pytest.mark.parametrize("name", list(CLOSED_FORMS))
def test_closed_form_is_derived_and_matches_the_induced_laws(name):
    form = CLOSED_FORMS[name]
    assert form.derive() >= 3  # feasible cases proved symbolically
    assert check_numeric(form) <= 1e-12


@pytest.mark.parametrize("name", list(RULES))
def test_declared_bounds_hold_on_random_instances(name):
    worst = check_declared_bound(name)
    if RULES[name].declares_bound:
        assert worst <= 1e-12
    else:
        assert worst is None


class _TooOptimistic(StrictRule):
    """Strict acceptance made lossy (always accept) while claiming strict's bound of 0."""

    name = "too_optimistic"

    def accept_prob(self, state, x, ctx):
        return torch.ones_like(x, dtype=state.p.dtype)


def test_a_wrong_bound_is_caught():
    register(_TooOptimistic)
    try:
        assert check_declared_bound("too_optimistic") > 0.05
    finally:
        REGISTRY.pop("too_optimistic")
