"""Toy bundles and relaxed settings shared by the exact-law tests (analysis/exact_toy)."""

from __future__ import annotations

from analysis.exact_toy import as_float64, target_conditionals, target_joint_law
from cascade_sd import api
from cascade_sd.decoding.tree import StaticTree

SMALL_TREE = StaticTree(((0,), (1,), (0, 0)))  # two children at the root, one grandchild
#: Siblings at level 1 and cousins at level 2, whose drafter outputs exist (level 2 < depth 3).
COUSINS = StaticTree(((0,), (1,), (0, 0), (1, 0), (0, 0, 0)))
RELAXED = {
    "lantern": {"k": 2, "delta": 0.3},
    "lantern_pp": {"k": 2, "lam": 3.0},
    "coolsd": {"delta": 2.0},
    "gsd": {"dist_threshold": 4.0, "p_threshold": 0.5, "window": 1},  # on 4 tokens: clusters for 3 of them
    "cascade": {"tau_b": 0.0, "tau_d": 0.0, "kl_threshold": 1e6},
    "cascade_bounded": {"eps": 0.1, "tau_b": 0.0, "tau_d": 0.0, "kl_threshold": 1e6},
}


def toy(seed: int, length: int = 3) -> tuple[api.Bundle, dict]:
    """A float64 3-token toy bundle and its target's joint law at CFG 2."""
    bundle = as_float64(api.load_bundle(f"toy:vocab=3,len={length},seed={seed}"))
    return bundle, target_joint_law(target_conditionals(bundle, 1, cfg_scale=2.0), length)
