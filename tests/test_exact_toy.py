"""Exact joint output laws on toy bundles (DESIGN 6, issue 5 item 3).

Strict decoding's exact joint law equals the target's (to 1e-12) for chain, small static and
dynamic trees; every rule's law sums to one; the exact sequence TV is at most the hybrid bound
Σ_t E[TV_t], which is at most the node-level drift sum that drift recording measures.
"""

from __future__ import annotations

import pytest

from analysis.exact_toy import as_float64, exact_joint_law, target_conditionals, target_joint_law
from cascade_sd import api
from cascade_sd.acceptance import RULES
from cascade_sd.decoding.tree import StaticTree
from cascade_sd.errors import ConfigError

SMALL_TREE = StaticTree(((0,), (1,), (0, 0)))  # two children at the root, one grandchild
RELAXED = {
    "lantern": {"k": 2, "delta": 0.3},
    "lantern_pp": {"k": 2, "lam": 3.0},
    "coolsd": {"delta": 2.0},
    "gsd": {"dist_threshold": 2.0, "p_threshold": 0.0},
    "cascade": {"tau_b": 0.0, "tau_d": 0.0},
    "cascade_bounded": {"eps": 0.1, "tau_b": 0.0, "tau_d": 0.0},
}


def toy(seed: int, length: int = 3) -> tuple[api.Bundle, dict]:
    bundle = as_float64(api.load_bundle(f"toy:vocab=3,len={length},seed={seed}"))
    return bundle, target_joint_law(target_conditionals(bundle, 1, cfg_scale=2.0), length)


@pytest.mark.parametrize("tree", ["chain-2", SMALL_TREE, "dynamic"], ids=["chain-2", "small-static", "dynamic"])
def test_strict_joint_law_is_the_targets(tree):
    bundle, target = toy(0)
    joint = exact_joint_law(bundle, 1, method="strict", tree=tree, cfg_scale=2.0)
    assert sum(joint.law.values()) == pytest.approx(1.0, abs=1e-12)
    assert joint.tv(target) < 1e-12
    assert joint.hybrid_bound < 1e-12 and joint.node_drift_sum < 1e-12


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("tree", ["chain-2", "dynamic"])
@pytest.mark.parametrize("method", list(RELAXED))
def test_relaxed_joint_laws_stay_within_the_sequence_bounds(method, tree, seed):
    bundle, target = toy(seed)
    if tree == "dynamic" and RULES[method].static_tree_only:  # LANTERN++ is defined on static trees only
        with pytest.raises(ConfigError, match="needs a static tree"):
            exact_joint_law(bundle, 1, method=method, tree=tree, **RELAXED[method])
        return
    joint = exact_joint_law(bundle, 1, method=method, tree=tree, cfg_scale=2.0, **RELAXED[method])
    assert sum(joint.law.values()) == pytest.approx(1.0, abs=1e-12)
    assert all(prob >= 0 for prob in joint.law.values())
    assert joint.tv(target) <= joint.hybrid_bound + 1e-12
    if joint.node_drift_sum is not None:
        assert joint.hybrid_bound <= joint.node_drift_sum + 1e-12
    else:
        assert method.startswith("cascade") and tree == "chain-2"


@pytest.mark.slow
def test_longer_sequences_and_a_static_tree_keep_the_bounds():
    bundle, target = toy(1, length=4)
    for method in ("coolsd", "cascade_bounded"):
        joint = exact_joint_law(bundle, 1, method=method, tree=SMALL_TREE, cfg_scale=2.0, **RELAXED[method])
        assert joint.tv(target) <= joint.hybrid_bound + 1e-12
        assert joint.tv(target) > 1e-3  # the relaxation shows at this length
