"""τ against measured drift per tree family, from ``cascade-sd bench-rules --out`` rows and grid cells.

For every rule the settings of its strength sweep give points (mean per-node drift, τ); their
upper frontier (best τ at most a given drift) is what a rule offers. The report answers "at equal
measured drift, does CASCADE reach a higher τ than rule B?": for every setting of B, CASCADE's
frontier value at B's drift ("none that low" where no CASCADE setting drifts that little).

    python -m analysis.tau_vs_drift results/bench/rules-*.json --grid results/eval/grid --out results/bench
writes ``tau_vs_drift.md`` (tables) and ``tau_vs_drift.png`` (one panel per tree family); ``--grid``
adds the workflow's decode-grid cells (EAGLE drafter) to the bench rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from analysis.figures import _colour, _save  # noqa: E402
from cascade_sd.io import atomic_write_text  # noqa: E402
from cascade_sd.metrics.drift import paper_bound_cell  # noqa: E402


def load_rows(paths: list[Path]) -> list[dict[str, Any]]:
    """Bench rows with drift recorded (vanilla and drift-less rows dropped)."""
    rows = []
    for path in paths:
        rows += [r for r in json.loads(Path(path).read_text()) if r["method"] != "vanilla" and "drift_mean" in r]
    return rows


def load_grid(folder: Path, drafter: str = "eagle") -> list[dict[str, Any]]:
    """The workflow's evaluated grid cells (``eval/grid/**.json``) of one drafter as bench rows."""
    from cascade_sd.acceptance.registry import overrides

    rows = []
    for path in sorted(Path(folder).rglob("*.json")):
        cell = json.loads(path.read_text())
        if cell["method"] == "vanilla" or cell["drafter"] != drafter or "drift_mean" not in cell:
            continue
        rows.append({"tree": cell["tree"], "method": cell["method"], "tau": cell["tau"], "speedup": cell["speedup"],
                     "params": overrides(cell["method"], cell["rule_params"]),
                     "drift_mean": cell["drift_mean"], "drift_paper_bound_mean": cell.get("paper_bound_mean"),
                     "paper_bound_violated_fraction": cell.get("paper_bound_violated_fraction")})
    return rows


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (drift, τ) points no other point beats on both (lower drift and higher τ), by drift."""
    best, out = float("-inf"), []
    for drift, tau in sorted(points):
        if tau > best:
            out.append((drift, tau))
            best = tau
    return out


def tau_at(front: list[tuple[float, float]], drift: float) -> float | None:
    """The best τ a frontier reaches with drift at most ``drift`` (None below its smallest drift)."""
    reach = [tau for d, tau in front if d <= drift + 1e-12]
    return max(reach) if reach else None


def _params(p: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in p.items()) or "defaults"


def report(rows: list[dict[str, Any]], rules: tuple[str, ...] = ("cascade", "cascade_bounded")) -> str:
    """Markdown: per tree family, every setting (drift, τ, speedup, the paper's bound) and each of
    ``rules``' best τ at that setting's drift."""
    lines: list[str] = []
    for tree in sorted({r["tree"] for r in rows}):
        here = sorted((r for r in rows if r["tree"] == tree), key=lambda r: (r["method"], r["drift_mean"]))
        fronts = {rule: frontier([(r["drift_mean"], r["tau"]) for r in here if r["method"] == rule]) for rule in rules}
        lines += [f"### {tree}", "", "| method | params | drift/node | τ | speedup | paper's bound (nodes over it) "
                  + "".join(f"| {rule} τ at this drift " for rule in rules) + "|",
                  "|" + "---|" * (6 + len(rules))]
        for r in here:
            paper_s = paper_bound_cell(r.get("drift_paper_bound_mean"), r.get("paper_bound_violated_fraction"))
            best = "".join(
                f"| {'–' if r['method'] == rule else _fmt(tau_at(fronts[rule], r['drift_mean']))} " for rule in rules)
            lines.append(f"| {r['method']} | {_params(r['params'])} | {r['drift_mean']:.4f} | {r['tau']:.2f} "
                         f"| {r['speedup']:.2f} | {paper_s} {best}|")
        lines.append("")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "none that low" if x is None else f"{x:.2f}"


def figure(rows: list[dict[str, Any]], out: Path) -> None:
    """τ vs mean per-node drift, one panel per tree family, one colour per rule (its frontier as a line)."""
    trees = sorted({r["tree"] for r in rows})
    fig, axes = plt.subplots(1, len(trees), figsize=(4.2 * len(trees) + 1.5, 4), squeeze=False, layout="constrained")
    for ax, tree in zip(axes[0], trees):
        for method in sorted({r["method"] for r in rows if r["tree"] == tree}):
            pts = [(r["drift_mean"], r["tau"]) for r in rows if r["tree"] == tree and r["method"] == method]
            ax.scatter(*zip(*pts), color=_colour(method), s=18, label=method)
            ax.plot(*zip(*frontier(pts)), color=_colour(method), lw=1)
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_title(tree)
        ax.set_xlabel("measured TV per node (mean)")
    axes[0, 0].set_ylabel("τ (mean accepted length)")
    handles = {}
    for ax in axes[0]:
        handles |= dict(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(list(handles.values()), list(handles), loc="outside right center", fontsize=8)
    _save(fig, out / "tau_vs_drift.png")


def main(argv: list[str] | None = None) -> None:
    """Tables and figure from bench-rules JSON files and/or the workflow's grid cells."""
    ap = argparse.ArgumentParser(prog="python -m analysis.tau_vs_drift")
    ap.add_argument("rows", nargs="*", type=Path, help="bench-rules --out files")
    ap.add_argument("--grid", type=Path, help="the workflow's eval/grid folder")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    rows = load_rows(args.rows) + (load_grid(args.grid) if args.grid else [])
    if not rows:
        ap.error("no rows with drift: give bench-rules files or --grid")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "tau_vs_drift.md", report(rows) + "\n")
    figure(rows, args.out)


if __name__ == "__main__":
    main()
