"""τ against measured drift: frontiers and the equal-drift comparison."""

from __future__ import annotations

import json

from analysis.tau_vs_drift import frontier, load_grid, load_rows, main, report, tau_at

ROWS = [
    {"tree": "chain-4", "method": "cascade", "params": {}, "drift_mean": 0.02, "tau": 2.0, "speedup": 1.1},
    {"tree": "chain-4", "method": "cascade", "params": {"tau_b": 0.5}, "drift_mean": 0.10, "tau": 2.6, "speedup": 1.3},
    {"tree": "chain-4", "method": "cascade", "params": {"tau_b": 0.7}, "drift_mean": 0.12, "tau": 2.4, "speedup": 1.2},
    {"tree": "chain-4", "method": "lantern", "params": {}, "drift_mean": 0.05, "tau": 2.2, "speedup": 1.2,
     "drift_paper_bound_mean": 0.1, "paper_bound_violated_fraction": 0.25},
    {"tree": "chain-4", "method": "lantern", "params": {"delta": 0.01}, "drift_mean": 0.01, "tau": 1.9, "speedup": 1.0,
     "drift_paper_bound_mean": 0.01, "paper_bound_violated_fraction": 0.5},
]


def test_frontier_keeps_the_best_tau_at_each_drift():
    assert frontier([(0.12, 2.4), (0.02, 2.0), (0.10, 2.6)]) == [(0.02, 2.0), (0.10, 2.6)]
    front = frontier([(0.02, 2.0), (0.10, 2.6)])
    assert tau_at(front, 0.05) == 2.0 and tau_at(front, 0.2) == 2.6 and tau_at(front, 0.01) is None


def test_grid_cells_become_rows_with_their_overrides(tmp_path):
    cell = {"tree": "chain-4", "drafter": "eagle", "method": "lantern", "tau": 2.5, "speedup": 1.1, "drift_mean": 0.2,
            "rule_params": {"k": 1000, "delta": 0.2, "residual": "reference-code"}, "paper_bound_mean": 0.2,
            "paper_bound_violated_fraction": 0.4}
    other = cell | {"drafter": "eagle3"}
    (tmp_path / "a").mkdir()
    (tmp_path / "a/cell.json").write_text(json.dumps(cell))
    (tmp_path / "other.json").write_text(json.dumps(other))
    (tmp_path / "vanilla.json").write_text(json.dumps({"tree": "-", "drafter": "-", "method": "vanilla", "tau": 1.0}))
    rows = load_grid(tmp_path)
    assert rows == [{"tree": "chain-4", "method": "lantern", "tau": 2.5, "speedup": 1.1, "params": {"delta": 0.2},
                     "drift_mean": 0.2, "drift_paper_bound_mean": 0.2, "paper_bound_violated_fraction": 0.4}]


def test_report_and_cli(tmp_path):
    text = report(ROWS, rules=("cascade",))
    assert "| lantern | defaults | 0.0500 | 2.20 | 1.20 | 0.1000 (25%) | 2.00 |" in text
    assert "| lantern | delta=0.01 | 0.0100 | 1.90 | 1.00 | 0.0100 (50%) | none that low |" in text
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS + [{"tree": "-", "method": "vanilla", "params": {}, "tau": 1.0}]))
    assert len(load_rows([path])) == len(ROWS)
    main([str(path), "--out", str(tmp_path / "out")])
    assert (tmp_path / "out/tau_vs_drift.png").stat().st_size > 0 and "### chain-4" in (tmp_path / "out/tau_vs_drift.md").read_text()
