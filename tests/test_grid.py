"""The decode grid's bookkeeping (cells, settings, config checks) and its quality statistics
(FID by eigenvalues, basic-bootstrap coverage, unbiased KID)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import linalg

from cascade_sd.acceptance import RULES
from cascade_sd.config import validate_config
from cascade_sd.errors import ConfigError, DataError
from cascade_sd.grid import (CELL_STATS, drafter_names, grid_rows, load_cell_stats, mlflow_params, parse_setting,
                             setting_slug)
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


def test_a_jacobi_group_names_its_window_and_compares_target_outputs_for_cascade():
    cfg = validate_config({"decode": {"groups": [
        {"drafter": "jacobi", "jacobi": "sjd-pac", "jacobi_window": 16, "pac_width": 2, "methods": ["gsd", "cascade"]},
        {"drafter": "jacobi", "methods": ["strict"]},
    ]}})
    rows = [(r["tree"], r["drafter"], r["method"], r["setting"]) for r in grid_rows(cfg)[1:]]
    assert rows == [("sjd-pac-L16-W2-D3", "jacobi", "strict", "default"), ("sjd-pac-L16-W2-D3", "jacobi", "gsd", "default"),
                    ("sjd-pac-L16-W2-D3", "jacobi", "cascade", "breadth_source=target"),
                    ("sjd-L16", "jacobi", "strict", "default")]
    assert mlflow_params(dict(zip(("tree", "drafter", "method", "setting"), rows[0])), {}, cfg["decode"])["jacobi"] == {
        "variant": "sjd-pac", "window": 16, "width": 2, "depth": 3, "code": "exact"}


@pytest.mark.parametrize("group,match", [
    ({"tree": "chain-4", "drafter": "medusa"}, "decode.groups.0.drafter='medusa' is not trained"),
    ({"tree": "dynamic", "methods": ["lantern_pp"]}, "'lantern_pp' needs a static tree"),
    ({"tree": "chain-4", "methods": ["lanternn"]}, "contains 'lanternn'"),
    ({"tree": "chain-0"}, "decode.groups.0.tree='chain-0'"),
    ({"drafter": "eagle"}, "decode.groups.0 needs a tree"),
    ({"drafter": "jacobi", "jacobi": "sjd-pac", "jacobi_window": 8}, "jacobi_window=8 does not fit"),
    ({"tree": "chain-4", "pac_width": 2}, "pac_width needs drafter: jacobi"),
    ({"drafter": "jacobi", "jacobi": "sjd-pac", "jacobi_code": "reference-code", "methods": ["strict"]},
     "has no per-node law"),
    ({"drafter": "jacobi", "jacobi": "scd-mc", "jacobi_code": "reference-code"}, r"allowed methods: \[strict\]"),
])
def test_bad_groups_are_rejected_at_parse_time(group, match):
    with pytest.raises(ConfigError, match=match):
        validate_config({"decode": {"groups": [group]}})


def test_a_cell_written_by_an_older_grid_decode_is_a_clear_error(tmp_path):
    """grid evaluate names the stale cell and the field it lacks (a results folder kept across versions)."""
    import json

    stats = {k: 1 for k in CELL_STATS}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    assert load_cell_stats(tmp_path) == stats
    del stats["step_compression"]
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    with pytest.raises(DataError, match="no 'step_compression' .* rerun its decode job"):
        load_cell_stats(tmp_path)


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


def _fake_cell(folder, seed: int, method: str, rng, tree: str = "tree-57", drafter: str = "eagle") -> None:
    """A decode folder as grid_decode_job writes it (stats and drift only: no quality inputs)."""
    import json

    folder.mkdir(parents=True)
    hist = rng.integers(1, 50, size=5).tolist()
    stats = {"tree": tree, "drafter": drafter, "method": method, "setting": "default", "seed": seed,
             "rule_params": {"delta": 0.1} if method == "lantern" else {}, "images": 3, "tau": 2.5, "rounds": 40,
             "accept_histogram": hist, "vanilla_seconds_per_image": 1.0, "seconds_per_image": 0.5, "speedup": 2.0,
             "step_compression": 2.2 + seed, "sampling": {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "cfg_scale": 3.0}}
    (folder / "stats.json").write_text(json.dumps(stats))
    drift = rng.uniform(0, 0.1, size=(3, 9))
    np.savez(folder / "drift.npz", drift=drift, drift_bound=np.full_like(drift, 0.2),
             drift_paper_bound=np.full_like(drift, 0.1 if method == "lantern" else np.nan),
             drift_exact=np.ones_like(drift, dtype=bool), drift_visited=np.ones_like(drift, dtype=bool))
    if method != "strict":  # exact log-ratios of 2 sampler and 2 target images (a TV well under Σ_t E[TV_t] ≈ 0.45)
        log_p = rng.normal(-100.0, 5.0, size=4)
        np.savez(folder / "sequence.npz", sampler_log_target=log_p[:2], sampler_log_sd=log_p[:2] + rng.uniform(0, 0.3, 2),
                 target_log_target=log_p[2:], target_log_sd=log_p[2:] - rng.uniform(0, 0.3, 2), exact=np.ones(4, bool))


def test_real_checkpoint_cells_are_evaluated_and_drawn_without_quality(tmp_path):
    """With no judge (imported checkpoints): τ, speedup and drift per cell; the table shows – for FID and
    fidelity and the Pareto plot (which needs FID) is not drawn."""
    import matplotlib.pyplot as plt

    from analysis.figures import make_all
    from cascade_sd.grid import grid_evaluate_job

    rng = np.random.default_rng(0)
    cfg = validate_config({"results": str(tmp_path / "results"), "decode": {"bootstrap": 20}})
    from cascade_sd.tracking import init_tracking

    init_tracking(cfg["results"], cfg["mlflow"]["experiment"], cfg)
    evals, grids = [], []
    for method in ("strict", "lantern"):
        dirs = [tmp_path / method / f"seed{s}" for s in (0, 1)]
        for s, d in enumerate(dirs):
            _fake_cell(d, s, method, rng)
        plt.imsave(dirs[0] / "grid.png", rng.uniform(size=(8, 8)))
        out = tmp_path / f"{method}.json"
        result = grid_evaluate_job(cfg, None, None, dirs, out)
        assert result["images"] == 6 and result["tau"] == 2.5 and "fid_in_domain" not in result
        assert 0 < result["drift_mean"] < 0.1 and result["sequence_bound_ci"][0] <= result["sequence_bound"]
        if method == "lantern":  # measured from the four images' log-ratios, both ways, checked against the bounds
            assert result["sequence_images"] == 4 and 0 < result["sequence_tv"] < 0.26 and not result["sequence_problems"]
            assert result["sequence_tv_agree"] and result["certified_sequence_bound"] == pytest.approx(1.8)
        evals.append(out)
        grids.append(dirs[0] / "grid.png")
    with pytest.raises(ConfigError, match="both --judge and --reference"):
        grid_evaluate_job(cfg, tmp_path / "judge.pt", None, [tmp_path / "strict/seed0"], tmp_path / "x.json")
    _assert_rule_params_filterable(cfg["results"])
    rows = make_all(evals, grids, tmp_path / "figures")
    table = (tmp_path / "figures/results_table.md").read_text()
    assert "| lantern | default | tree-57 | eagle | 2.50 | 2.70 | 2.00 (2.00–2.00) | – | – [–, –] | – [–, –] |" in table
    assert not (tmp_path / "figures/pareto.png").exists() and (tmp_path / "figures/strength.png").exists()
    for name in ("measured_tv", "tv_vs_bound"):
        assert (tmp_path / f"figures/{name}.png").exists() and "lantern" in (tmp_path / f"figures/{name}.csv").read_text()
    assert len(rows) == 2


def _assert_rule_params_filterable(results) -> None:
    """Every rule parameter (paper defaults filled in) and sampling parameter is an MLflow param of the cell's
    evaluate run, which nests under the "grid" stage run: a filter by a rule parameter finds it."""
    import json

    import mlflow

    from cascade_sd.acceptance import get_rule

    info = json.loads((Path(results) / "mlflow/parent.json").read_text())
    mlflow.set_tracking_uri(info["tracking_uri"])
    delta = get_rule("lantern").params["delta"]
    found = mlflow.search_runs([info["experiment_id"]], filter_string=f"params.`rule.delta` = '{delta}'",
                               output_format="list")
    assert [r.info.run_name for r in found] == ["evaluate lantern [tree-57, eagle]"]
    run = found[0]
    assert run.data.tags["mlflow.parentRunId"] == info["stage_run_ids"]["grid"]
    assert {f"rule.{k}" for k in get_rule("lantern").params} <= set(run.data.params)
    assert run.data.params["sampling.cfg_scale"] == "3.0" and run.data.params["cell.method"] == "lantern"


def test_every_cell_is_evaluated_in_one_call_and_a_missing_cell_fails_first(tmp_path):
    """grid_evaluate_all_job walks the config's grid: one JSON per cell at the Paramspace path, and a
    cell with no decode output is an error naming it before any cell is evaluated."""
    import json

    from cascade_sd.grid import cell_path, grid_evaluate_all_job
    from cascade_sd.tracking import init_tracking

    rng = np.random.default_rng(1)
    cfg = validate_config({"results": str(tmp_path / "results"),
                           "decode": {"bootstrap": 20, "seeds": [0, 1], "groups": [{"tree": "tree-57", "methods": ["lantern"]}]}})
    init_tracking(cfg["results"], cfg["mlflow"]["experiment"], cfg)
    cells = grid_rows(cfg)
    assert [c["method"] for c in cells] == ["vanilla", "strict", "lantern"]
    decode_dir, out_dir = tmp_path / "decode", tmp_path / "eval"
    for cell in cells[:2]:
        for seed in (0, 1):
            _fake_cell(decode_dir / cell_path(cell) / f"seed{seed}", seed, cell["method"], rng, cell["tree"], cell["drafter"])
    with pytest.raises(ConfigError, match=r"method~lantern/setting~default/seed0 and 1 more"):
        grid_evaluate_all_job(cfg, None, None, decode_dir, out_dir)
    assert not out_dir.exists()
    for seed in (0, 1):
        _fake_cell(decode_dir / cell_path(cells[2]) / f"seed{seed}", seed, "lantern", rng)
    results = grid_evaluate_all_job(cfg, None, None, decode_dir, out_dir)
    assert [r["method"] for r in results] == ["vanilla", "strict", "lantern"]
    assert cell_path(cells[2]) == "tree~tree-57/drafter~eagle/method~lantern/setting~default"
    for cell, result in zip(cells, results):
        assert json.loads((out_dir / f"{cell_path(cell)}.json").read_text()) == result
        assert result["images"] == 6 and result["seeds"] == [0, 1]


def test_redundancy_archs_pick_the_weighted_drafters():
    cfg = validate_config({"drafter": {"redundancy_archs": ["eagle"]},
                           "decode": {"groups": [{"tree": "chain-4", "drafter": "eagle-rw2", "methods": ["cascade"]}]}})
    assert drafter_names(cfg) == ["eagle", "eagle-rw2", "eagle3"]
    with pytest.raises(ConfigError, match="decode.groups.0.drafter='eagle3-rw2' is not trained"):
        validate_config({"drafter": {"redundancy_archs": ["eagle"]},
                         "decode": {"groups": [{"tree": "chain-4", "drafter": "eagle3-rw2"}]}})
    with pytest.raises(ConfigError, match="drafter.redundancy_archs contains 'eagle3', which is not in drafter.archs"):
        validate_config({"drafter": {"archs": ["eagle"], "redundancy_archs": ["eagle3"]}})


def test_real_checkpoint_config_needs_its_files(tmp_path):
    with pytest.raises(ConfigError, match=r"models.vq is required when models.source='llamagen'"):
        validate_config({"models": {"source": "llamagen"}})
    with pytest.raises(ConfigError, match=r"models.gpt='.*nope.pt': file not found"):
        (tmp_path / "vq.pt").write_bytes(b"x")
        validate_config({"models": {"source": "llamagen", "vq": str(tmp_path / "vq.pt"), "gpt": str(tmp_path / "nope.pt")}})
    with pytest.raises(ConfigError, match="models.image_size=300"):
        validate_config({"models": {"image_size": 300}})
