"""Figures and the results table of the decode grid (DESIGN 9), each PNG with the CSV behind it.

Input: the per-cell evaluation JSONs (``cascade-sd grid evaluate``) and each cell's sample grid.
Output in one folder: ``results_table.{csv,md}`` (the papers' columns plus drift), ``pareto``
(speedup vs in-domain FID per rule), ``strength`` (τ and speedup vs relaxation strength),
``drift_vs_bound``, ``accept_hist`` (accepted-length histograms), ``samples`` (one grid per
method at its defaults), ``measured_tv`` (τ and speedup against the *measured* sequence TV) and
``tv_vs_bound`` (measured sequence TV against the hybrid and certified bounds).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cascade_sd.acceptance import RULES  # noqa: E402
from cascade_sd.io import atomic_write_text  # noqa: E402
from cascade_sd.metrics.drift import paper_bound_cell  # noqa: E402

TABLE_COLUMNS = ["method", "setting", "tree", "drafter", "tau", "tau_min", "tau_max", "speedup", "speedup_min", "speedup_max", "step_compression",
                 "fid_in_domain", "fid_corrected", "fid_lower", "fid_upper", "kid_in_domain", "kid_lower", "kid_upper", "judge_accuracy", "judge_lower",
                 "judge_upper", "drift_mean", "drift_bound_mean", "paper_bound_mean", "paper_bound_violated_fraction",
                 "sequence_bound", "sequence_lower", "sequence_upper", "certified_bound", "certified_lower",
                 "certified_upper", "measured_tv", "measured_tv_lower", "measured_tv_upper", "measured_tv_target",
                 "measured_tv_target_lower", "measured_tv_target_upper", "measured_kl", "measured_kl_lower",
                 "measured_kl_upper", "measured_images", "classifier_tv", "classifier_lower", "classifier_upper", "images"]


def load_evals(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Evaluation JSONs in grid order (vanilla first)."""
    return [json.loads(Path(p).read_text()) for p in paths]


def table_rows(evals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per cell with the columns of ``TABLE_COLUMNS``."""
    rows = []
    for e in evals:
        ci = lambda key: e.get(key) or [None, None]  # noqa: E731
        rows.append({
            "method": e["method"], "setting": e["setting"], "tree": e["tree"], "drafter": e["drafter"],
            "tau": e["tau"], "tau_min": e["tau_range"][0], "tau_max": e["tau_range"][1],
            "speedup": e["speedup"], "speedup_min": e["speedup_range"][0],
            "speedup_max": e["speedup_range"][1], "step_compression": e["step_compression"],
            "fid_in_domain": e.get("fid_in_domain"),
            "fid_corrected": e.get("fid_in_domain_corrected"),
            "fid_lower": ci("fid_in_domain_ci")[0], "fid_upper": ci("fid_in_domain_ci")[1],
            "kid_in_domain": e.get("kid_in_domain"), "kid_lower": ci("kid_in_domain_ci")[0],
            "kid_upper": ci("kid_in_domain_ci")[1], "judge_accuracy": e.get("judge_accuracy"),
            "judge_lower": ci("judge_accuracy_ci")[0], "judge_upper": ci("judge_accuracy_ci")[1],
            "drift_mean": e.get("drift_mean"), "drift_bound_mean": e.get("drift_bound_mean"),
            "paper_bound_mean": e.get("paper_bound_mean"), "paper_bound_violated_fraction": e.get("paper_bound_violated_fraction"),
            "sequence_bound": e.get("sequence_bound"), "sequence_lower": ci("sequence_bound_ci")[0],
            "sequence_upper": ci("sequence_bound_ci")[1],
            "certified_bound": e.get("certified_sequence_bound"), "certified_lower": ci("certified_sequence_bound_ci")[0],
            "certified_upper": ci("certified_sequence_bound_ci")[1],
            "measured_tv": e.get("sequence_tv"), "measured_tv_lower": ci("sequence_tv_ci")[0],
            "measured_tv_upper": ci("sequence_tv_ci")[1], "measured_tv_target": e.get("sequence_tv_target"),
            "measured_tv_target_lower": ci("sequence_tv_target_ci")[0],
            "measured_tv_target_upper": ci("sequence_tv_target_ci")[1], "measured_kl": e.get("sequence_kl"),
            "measured_kl_lower": ci("sequence_kl_ci")[0], "measured_kl_upper": ci("sequence_kl_ci")[1],
            "measured_images": e.get("sequence_images"), "classifier_tv": e.get("classifier_tv"),
            "classifier_lower": ci("classifier_tv_ci")[0], "classifier_upper": ci("classifier_tv_ci")[1],
            "images": e["images"],
        })
    return rows


def _fmt(x: Any, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def _paper_cell(r: dict[str, Any]) -> str:
    return paper_bound_cell(r.get("paper_bound_mean"), r.get("paper_bound_violated_fraction"))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The papers' format (method, τ, speedup, FID, fidelity) plus drift per node and per sequence.

    FID (n) is the plug-in value at the grid's common sample size; the bracketed interval and the
    debiased value target the population FID (basic bootstrap), so they sit below it.
    """
    lines = ["| method | setting | tree | drafter | τ | steps ÷ | speedup (seed range) | FID (n) | FID debiased [95% CI] "
             "| judge acc [95% CI] | drift/node | declared bound | paper's bound (nodes over it) | Σ_t E[TV_t] [95% CI] "
             "| measured TV [95% CI] (images) | TV from target images | KL(P_SD‖P) nats |",
             "|" + "---|" * 17]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['setting']} | {r['tree']} | {r['drafter']} | {r['tau']:.2f} "
            f"| {r['step_compression']:.2f} | {r['speedup']:.2f} ({r['speedup_min']:.2f}–{r['speedup_max']:.2f}) "
            f"| {_fmt(r['fid_in_domain'], 1)} | {_fmt(r['fid_corrected'], 1)} [{_fmt(r['fid_lower'], 1)}, {_fmt(r['fid_upper'], 1)}] "
            f"| {_fmt(r['judge_accuracy'], 3)} [{_fmt(r['judge_lower'], 3)}, {_fmt(r['judge_upper'], 3)}] "
            f"| {_fmt(r['drift_mean'], 4)} | {_fmt(r['drift_bound_mean'], 4)} | {_paper_cell(r)} "
            f"| {_fmt(r['sequence_bound'], 3)} [{_fmt(r['sequence_lower'], 3)}, {_fmt(r['sequence_upper'], 3)}] "
            f"| {_interval(r, 'measured_tv', 3)} ({r['measured_images'] or '–'}) | {_interval(r, 'measured_tv_target', 3)} "
            f"| {_interval(r, 'measured_kl', 2)} |")
    return "\n".join(lines)


def _interval(r: dict[str, Any], key: str, digits: int) -> str:
    if r.get(key) is None:
        return "–"
    if r.get(f"{key}_lower") is None:
        return _fmt(r[key], digits)
    return f"{_fmt(r[key], digits)} [{_fmt(r[f'{key}_lower'], digits)}, {_fmt(r[f'{key}_upper'], digits)}]"


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """CSV written to a temp file and renamed."""
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _save(fig: plt.Figure, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def _colour(method: str) -> Any:
    names = ["vanilla", *RULES]
    return plt.get_cmap("tab10")(names.index(method) % 10 if method in names else 9)


def _label(row: dict[str, Any]) -> str:
    extra = "" if row["setting"] == "default" else f" {row['setting']}"
    where = "" if row["method"] == "vanilla" else f" [{row['tree']}, {row['drafter']}]"
    return f"{row['method']}{extra}{where}"


def pareto(rows: list[dict[str, Any]], out: Path) -> None:
    """Speedup vs debiased in-domain FID per rule (error bars: its bootstrap CI, speedup seed range)."""
    fig, ax = plt.subplots(figsize=(7, 5))
    seen = set()
    for r in rows:
        yerr = [[max(r["fid_corrected"] - r["fid_lower"], 0.0)], [max(r["fid_upper"] - r["fid_corrected"], 0.0)]]
        xerr = [[r["speedup"] - r["speedup_min"]], [r["speedup_max"] - r["speedup"]]]
        ax.errorbar(r["speedup"], r["fid_corrected"], xerr=xerr, yerr=yerr, fmt="o" if r["setting"] == "default" else "s",
                    color=_colour(r["method"]), alpha=0.8, capsize=2,
                    label=r["method"] if r["method"] not in seen else None)
        seen.add(r["method"])
    ax.set_xlabel("wall-clock speedup vs vanilla (batch 1)")
    ax.set_ylabel("in-domain FID, debiased (lower is better)")
    ax.set_title("Speed–quality trade-off (circles: paper defaults, squares: sweep)")
    ax.legend(fontsize=8)
    _save(fig, out / "pareto.png")
    write_csv(out / "pareto.csv", rows, ["method", "setting", "tree", "drafter", "speedup", "speedup_min", "speedup_max",
                                         "fid_in_domain", "fid_corrected", "fid_lower", "fid_upper"])


def strength_value(method: str, params: dict[str, Any]) -> float | None:
    """The rule's relaxation-strength parameter in a cell's effective parameters."""
    name = RULES[method].strength if method in RULES else None
    value = params.get(name) if name else None
    return float(value) if isinstance(value, (int, float)) else None


def _series_colour(i: int) -> Any:
    """A distinct colour for the i-th series of a figure (tab10, then tab20's lighter half)."""
    return plt.get_cmap("tab10")(i) if i < 10 else plt.get_cmap("tab20")((2 * (i - 10) + 1) % 20)


def _range_err(pts: list[dict[str, Any]], key: str) -> list[list[float]]:
    """Error bars spanning each point's seed range (``key_min`` .. ``key_max``)."""
    return [[p[key] - p[f"{key}_min"] for p in pts], [p[f"{key}_max"] - p[key] for p in pts]]


def strength(rows: list[dict[str, Any]], evals: list[dict[str, Any]], out: Path) -> None:
    """τ and speedup vs each rule's strength parameter (one panel pair per rule with a sweep); error bars span
    the seeds, τ's axis starts at 1 (no drafted token accepted) and speedup's at 0 with vanilla marked, so
    seed noise does not read as a trend."""
    data = []
    for r, e in zip(rows, evals):
        s = strength_value(r["method"], e.get("rule_params", {}))
        if s is not None:
            data.append({**r, "strength_param": RULES[r["method"]].strength, "strength": s})
    methods = sorted({d["method"] for d in data}, key=list(RULES).index)
    fig, axes = plt.subplots(2, max(len(methods), 1), figsize=(3.2 * max(len(methods), 1), 5.8), squeeze=False)
    tau_top = max([d["tau_max"] for d in data], default=2.0) * 1.08
    speed_top = max([d["speedup_max"] for d in data] + [1.0]) * 1.12
    for j, method in enumerate(methods):
        groups = sorted({(d["tree"], d["drafter"]) for d in data if d["method"] == method})
        for i, group in enumerate(groups):
            pts = sorted((d for d in data if d["method"] == method and (d["tree"], d["drafter"]) == group),
                         key=lambda d: d["strength"])
            xs = [d["strength"] for d in pts]
            style = dict(fmt="o-" if len(pts) > 1 else "o", color=_series_colour(i), capsize=3)
            axes[0, j].errorbar(xs, [d["tau"] for d in pts], yerr=_range_err(pts, "tau"),
                                label=f"{group[0]}, {group[1]}", **style)
            axes[1, j].errorbar(xs, [d["speedup"] for d in pts], yerr=_range_err(pts, "speedup"), **style)
        axes[0, j].set_title(method)
        axes[0, j].set_ylim(1.0, tau_top)
        axes[1, j].set_ylim(0.0, speed_top)
        axes[1, j].axhline(1.0, color="grey", lw=0.8, ls="--")
        axes[1, j].set_xlabel(RULES[method].strength + ("" if RULES[method].strength_increases else " (lower relaxes more)"))
        axes[0, j].legend(fontsize=6, loc="lower right")
    axes[0, 0].set_ylabel("τ (mean accepted length)\nbars: range over seeds")
    axes[1, 0].set_ylabel("speedup vs vanilla (dashed)\nbars: range over seeds")
    _save(fig, out / "strength.png")
    write_csv(out / "strength.csv", data, ["method", "tree", "drafter", "strength_param", "strength", "tau", "tau_min",
                                           "tau_max", "speedup", "speedup_min", "speedup_max"])


def drift_vs_bound(rows: list[dict[str, Any]], out: Path) -> None:
    """Measured mean per-node drift next to the declared bound's mean (no bar: none declared) and, where
    the rule's paper states a bound, that bound (marker) with the share of nodes over it."""
    data = [r for r in rows if r["method"] != "vanilla" and r["drift_mean"] is not None]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(data)), 4.5))
    x = np.arange(len(data))
    ax.bar(x - 0.2, [r["drift_mean"] for r in data], 0.4, label="measured TV per node", color="tab:blue")
    bounds = [r["drift_bound_mean"] if r["drift_bound_mean"] is not None else 0.0 for r in data]
    ax.bar(x + 0.2, bounds, 0.4, label="declared bound (mean)", color="tab:orange")
    paper = [(i, r) for i, r in enumerate(data) if r.get("paper_bound_mean") is not None]
    if paper:
        ax.scatter([x[i] for i, _ in paper], [r["paper_bound_mean"] for _, r in paper], marker="_", s=300,
                   color="black", zorder=3, label="paper's bound (mean; % nodes over it)")
        for i, r in paper:
            ax.annotate(f"{r['paper_bound_violated_fraction']:.0%}", (x[i], r["paper_bound_mean"]), fontsize=6,
                        xytext=(0, 4), textcoords="offset points", ha="center")
    for i, r in enumerate(data):
        if r["drift_bound_mean"] is None:
            ax.text(x[i] + 0.2, 0.0, "none", rotation=90, ha="center", va="bottom", fontsize=7)
    for i, r in enumerate(data):
        if r["drift_mean"] < 1e-9:  # float round-off of an exact rule: say so rather than leave a gap
            ax.text(x[i] - 0.2, 0.0, f"{r['drift_mean']:.0e}", rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [_label(r) for r in data], rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("total variation per node")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylim(0.0, 1.0)  # TV ≤ 1: room above every bar, marker and label
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=3, fontsize=8, frameon=False)
    _save(fig, out / "drift_vs_bound.png")
    write_csv(out / "drift_vs_bound.csv", data, ["method", "setting", "tree", "drafter", "drift_mean",
                                                 "drift_bound_mean", "paper_bound_mean", "paper_bound_violated_fraction",
                                                 "sequence_bound", "sequence_lower", "sequence_upper"])


def _tv_err(r: dict[str, Any]) -> list[list[float]]:
    return [[r["measured_tv"] - r["measured_tv_lower"]], [r["measured_tv_upper"] - r["measured_tv"]]]


def measured_tv(rows: list[dict[str, Any]], out: Path) -> None:
    """τ and speedup against the measured sequence TV (from the sampler's images; x error bars: its 95% CI,
    speedup bars: the seed range), one series per rule and tree: who is fastest at equal measured TV."""
    data = [r for r in rows if r["method"] != "vanilla" and r.get("measured_tv_lower") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    markers = {key: m for key, m in zip(sorted({(r["tree"], r["drafter"]) for r in data}), "osD^v<>ph")}
    for (method, tree, drafter), group in _groups(data):
        pts = sorted(group, key=lambda r: r["measured_tv"])
        style = dict(color=_colour(method), marker=markers[tree, drafter], linestyle="none", capsize=2, alpha=0.85,
                     label=f"{method} [{tree}, {drafter}]")
        axes[0].errorbar([r["measured_tv"] for r in pts], [r["tau"] for r in pts],
                         xerr=np.hstack([_tv_err(r) for r in pts]), **style)
        axes[1].errorbar([r["measured_tv"] for r in pts], [r["speedup"] for r in pts],
                         xerr=np.hstack([_tv_err(r) for r in pts]),
                         yerr=[[r["speedup"] - r["speedup_min"] for r in pts], [r["speedup_max"] - r["speedup"] for r in pts]],
                         **style)
    axes[0].set_ylabel("τ (mean accepted length)")
    axes[1].set_ylabel("wall-clock speedup vs vanilla (batch 1)")
    for ax in axes:
        ax.set_xlabel("measured sequence TV to the target (exact log P_SD, 95% CI)")
        ax.set_xlim(-0.03, 1.03)
    if data:
        axes[0].legend(fontsize=7)
    else:
        axes[0].text(0.5, 0.5, "no cell measured its sequence TV (decode.sequence_rows = 0)", ha="center",
                     transform=axes[0].transAxes)
    _save(fig, out / "measured_tv.png")
    write_csv(out / "measured_tv.csv", data, ["method", "setting", "tree", "drafter", "tau", "speedup", "speedup_min",
                                              "speedup_max", "measured_tv", "measured_tv_lower", "measured_tv_upper",
                                              "measured_tv_target", "measured_kl", "measured_images"])


def _groups(data: list[dict[str, Any]]) -> list[tuple[tuple[str, str, str], list[dict[str, Any]]]]:
    """Cells by (rule, tree, drafter), rules in registry order."""
    key = lambda r: (r["method"], r["tree"], r["drafter"])  # noqa: E731
    keys = sorted({key(r) for r in data}, key=lambda k: (list(RULES).index(k[0]), k[1], k[2]))
    return [(k, [r for r in data if key(r) == k]) for k in keys]


def tv_vs_bound(rows: list[dict[str, Any]], out: Path) -> None:
    """Per cell: the measured sequence TV (both estimates) above the classifier lower bound and under the hybrid
    bound Σ_t E[TV_t] and the certified bound Σ_t (declared node bound), all with 95% CIs; log scale, since
    the bounds pass 1 (vacuous) long before the TV saturates."""
    data = [r for r in rows if r["method"] != "vanilla" and r.get("measured_tv_lower") is not None]
    fig, ax = plt.subplots(figsize=(max(7, 0.5 * len(data)), 5))
    x = np.arange(len(data))
    series = [("measured_tv", "measured TV (sampler's images)", "o", -0.24),
              ("measured_tv_target", "measured TV (target's images)", "s", -0.12),
              ("classifier", "classifier lower bound (judge features)", "x", 0.0),
              ("sequence", "hybrid bound Σ_t E[TV_t]", "^", 0.12), ("certified", "certified bound Σ_t declared", "v", 0.24)]
    for key, label, marker, dx in series:
        value = {"classifier": "classifier_tv", "sequence": "sequence_bound", "certified": "certified_bound"}.get(key, key)
        pts = [(i, r) for i, r in enumerate(data) if r.get(value) is not None and r.get(f"{key}_lower") is not None]
        if not pts:
            continue
        vals = np.array([r[value] for _, r in pts])
        lower = np.array([r[f"{key}_lower"] for _, r in pts], dtype=np.float64)
        upper = np.array([r[f"{key}_upper"] for _, r in pts], dtype=np.float64)
        ax.errorbar([x[i] + dx for i, _ in pts], vals, yerr=[vals - lower, upper - vals], fmt=marker, capsize=2,
                    label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xticks(x, [_label(r) for r in data], rotation=75, ha="right", fontsize=7)
    ax.set_yscale("symlog", linthresh=1e-3)
    tops = [r.get(k) for r in data for k in ("sequence_upper", "certified_upper", "measured_tv_upper")]
    ax.set_ylim(0.0, 1.5 * max([t for t in tops if t is not None], default=1.0))  # nothing clipped, no negative half
    ax.set_ylabel("sequence-level total variation (bounds above 1 are vacuous)")
    if data:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no cell measured its sequence TV (decode.sequence_rows = 0)", ha="center", transform=ax.transAxes)
    _save(fig, out / "tv_vs_bound.png")
    write_csv(out / "tv_vs_bound.csv", data, ["method", "setting", "tree", "drafter", "measured_tv", "measured_tv_lower",
                                              "measured_tv_upper", "measured_tv_target", "measured_tv_target_lower",
                                              "measured_tv_target_upper", "classifier_tv", "classifier_lower",
                                              "classifier_upper", "sequence_bound", "sequence_lower", "sequence_upper",
                                              "certified_bound", "certified_lower", "certified_upper"])


def accept_hist(evals: list[dict[str, Any]], out: Path) -> None:
    """Accepted-length distributions (share of rounds accepting k drafted tokens) per cell at defaults."""
    data = [e for e in evals if e["method"] != "vanilla" and e["setting"] == "default" and e["accept_histogram"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / max(len(data), 1)
    rows = []
    for i, e in enumerate(data):
        h = np.asarray(e["accept_histogram"], dtype=np.float64)
        share = h / h.sum()
        ax.bar(np.arange(len(h)) + i * width, share, width, label=e["name"], color=_series_colour(i))
        rows += [{"cell": e["name"], "accepted": k, "rounds": int(h[k]), "share": share[k]} for k in range(len(h))]
    kmax = max((len(e["accept_histogram"]) for e in data), default=0)
    ax.set_xticks(np.arange(kmax) + 0.4 - width / 2, [str(k) for k in range(kmax)])  # under each group's centre
    ax.set_xlabel("drafted tokens accepted in a round")
    ax.set_ylabel("share of rounds")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, out / "accept_hist.png")
    write_csv(out / "accept_hist.csv", rows, ["cell", "accepted", "rounds", "share"])


def speed(rows: list[dict[str, Any]], out: Path) -> None:
    """Step compression (tokens per target forward, the hardware-independent part) beside the measured
    batch-1 speedup (seed range) for every speculative cell at its defaults, drafter-based and Jacobi alike."""
    data = [r for r in rows if r["method"] != "vanilla" and r["setting"] in ("default", "breadth_source=target")]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(data) + 2), 4.5))
    x = np.arange(len(data))
    ax.bar(x - 0.2, [r["step_compression"] for r in data], 0.4, label="step compression (vanilla forwards ÷ method's)",
           color="0.65")
    ax.bar(x + 0.2, [r["speedup"] for r in data], 0.4, yerr=_range_err(data, "speedup"), capsize=2,
           label="wall-clock speedup, batch 1 (seed range)", color=[_colour(r["method"]) for r in data])
    ax.axhline(1.0, color="black", lw=0.8, ls=":")
    ax.set_xticks(x, [_label(r) for r in data], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("× vanilla")
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.01))
    _save(fig, out / "speed.png")
    write_csv(out / "speed.csv", data, ["method", "setting", "tree", "drafter", "tau", "step_compression", "speedup",
                                        "speedup_min", "speedup_max"])


def samples(evals: list[dict[str, Any]], grids: list[Path], out: Path) -> None:
    """Each cell's sample grid at its defaults in one figure (rows of classes, as decoded)."""
    pairs = [(e, g) for e, g in zip(evals, grids) if e["setting"] == "default"]
    cols = min(6, max(len(pairs), 1))
    nrows = (len(pairs) + cols - 1) // cols
    images = [plt.imread(g) for _, g in pairs]
    aspect = images[0].shape[1] / images[0].shape[0] if images else 1.0  # panels as wide as the grids are
    fig, axes = plt.subplots(nrows, cols, figsize=(max(2.2, 3.6 * aspect) * cols, 3.9 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (e, _), image in zip(axes.flat, pairs, images):
        ax.imshow(image, cmap="gray")
        ax.set_title(e["name"], fontsize=7)
    _save(fig, out / "samples.png")
    write_csv(out / "samples.csv", [{"cell": e["name"], "grid": str(g)} for e, g in pairs], ["cell", "grid"])


def make_all(eval_paths: list[Path], grids: list[Path], out: Path) -> list[dict[str, Any]]:
    """Every grid figure and the results table into ``out`` (the Pareto plot only when the cells have
    in-domain FID); returns the table rows."""
    out.mkdir(parents=True, exist_ok=True)
    evals = load_evals(eval_paths)
    rows = table_rows(evals)
    write_csv(out / "results_table.csv", rows, TABLE_COLUMNS)
    atomic_write_text(out / "results_table.md", markdown_table(rows) + "\n")
    if all(r["fid_corrected"] is not None for r in rows):  # no Pareto front without quality (real checkpoints)
        pareto(rows, out)
    strength(rows, evals, out)
    drift_vs_bound(rows, out)
    accept_hist(evals, out)
    speed(rows, out)
    samples(evals, grids, out)
    measured_tv(rows, out)
    tv_vs_bound(rows, out)
    return rows
