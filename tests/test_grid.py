"""The decode grid's bookkeeping (cells, settings, config checks) and its quality statistics
(FID by eigenvalues, basic-bootstrap coverage, unbiased KID)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from cascade_sd.acceptance import RULES
from cascade_sd.config import validate_config
from cascade_sd.errors import ConfigError
from cascade_sd.grid import drafter_names, grid_rows, parse_setting, setting_slug
from cascade_sd.metrics.quality import fid_bootstrap_ci, frechet_distance, kid_bootstrap_ci


@pytest.mark.parametrize("method", list(RULES))
def test_every_sweep_setting_round_trips_through_its_slug(method):
    for params in RULES[method].sweep:
        slug = setting_slug(dict(params))
        assert "/" not in slug and " " not in slug
        assert parse_setting(method, slug) == {k: RULES[method].parameters[k].check(k, v) for k, v in params.items()}


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="'lam' is not a parameter of method='lantern'"):
        parse_setting("lantern", "lam=2")
    with pytest.raises(ConfigError, match="delta"):
        parse_setting("lantern", "delta=2")


def test_grid_has_vanilla_once_and_strict_in_every_group():
    cfg = validate_config({"decode": {"groups": [
        {"tree": "chain-4", "sweep": True},
        {"tree": "dynamic", "drafter": "eagle3-rw2", "methods": ["cascade"]},
    ]}})
    rows = grid_rows(cfg)
    assert [r["method"] for r in rows].count("vanilla") == 1 and rows[0]["method"] == "vanilla"
    chain = [r for r in rows if r["tree"] == "chain-4"]
    assert {r["method"] for r in chain} == set(RULES)
    assert len(chain) == sum(len(RULES[m].sweep) for m in RULES)
    dyn = [(r["method"], r["setting"]) for r in rows if r["tree"] == "dynamic"]
    assert dyn == [("strict", "default"), ("cascade", "default")]
    assert drafter_names(cfg) == ["eagle", "eagle-rw2", "eagle3", "eagle3-rw2"]


@pytest.mark.parametrize("group,match", [
    ({"tree": "chain-4", "drafter": "medusa"}, "decode.groups.0.drafter='medusa' is not trained"),
    ({"tree": "dynamic", "methods": ["lantern_pp"]}, "'lantern_pp' needs a static tree"),
    ({"tree": "chain-4", "methods": ["lanternn"]}, "contains 'lanternn'"),
    ({"tree": "chain-0"}, "decode.groups.0.tree='chain-0'"),
])
def test_bad_groups_are_rejected_at_parse_time(group, match):
    with pytest.raises(ConfigError, match=match):
        validate_config({"decode": {"groups": [group]}})


def test_frechet_distance_matches_the_matrix_square_root_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 12)), rng.normal(size=(250, 12)) * 1.3 + 0.2
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-9)


def test_fid_basic_bootstrap_interval_covers_the_population_fid():
    """Gaussian features with a closed-form population FID: the 95% basic interval must cover it in
    ≥ 90% of seeded repetitions (the raw finite-n FID is biased upward and would not)."""
    d, sd, mu = 4, 1.3, np.full(4, 0.3)
    true = float((mu ** 2).sum() + d * (1 + sd ** 2 - 2 * sd))
    rng = np.random.default_rng(1)
    real = rng.normal(size=(20000, d))
    hits = sum(ci["lower"] <= true <= ci["upper"]
               for ci in (fid_bootstrap_ci(real, rng.normal(size=(100, d)) * sd + mu, n_boot=200, seed=r)
                          for r in range(60)))
    assert hits >= 0.9 * 60


def test_kid_is_the_unbiased_mmd_and_centred_at_zero_for_one_distribution():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(60, 5)), rng.normal(size=(40, 5)) + 0.5
    k = lambda x, y: (x @ y.T / 5 + 1) ** 3  # noqa: E731
    kaa, kbb = k(a, a), k(b, b)
    naive = ((kaa.sum() - np.trace(kaa)) / (60 * 59) + (kbb.sum() - np.trace(kbb)) / (40 * 39) - 2 * k(a, b).mean())
    value, lo, hi = kid_bootstrap_ci(a, b, n_boot=50)
    assert value == pytest.approx(naive, rel=1e-12) and lo <= hi
    same = [kid_bootstrap_ci(rng.normal(size=(50, 5)), rng.normal(size=(50, 5)), n_boot=1)[0] for _ in range(200)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(200)
