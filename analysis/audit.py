"""Drift audit (DESIGN 6, issue 5 item 6): measured per-node drift vs each rule's declared bound.

Input: decode outputs written with ``cascade-sd decode --record-drift`` (``drift.npz`` beside
``stats.json``), found recursively under a results folder, or the artifacts of an MLflow run.
Per run and token position the table gives the mean and largest measured drift, the mean
declared bound and the number of violations (drift > bound + tolerance). A violation at an
exactly computed node fails the audit; at a Monte-Carlo node (flagged not exact, biased upward)
it is reported as inconclusive. Rules without a declared bound are reported, never failed.
Beside the declared (certified) bound, rules whose paper states one (LANTERN: δ; LANTERN++:
(λ − 1)·p(x)) get it reported with the share of verified nodes that exceed it: a finding, not a
failure (the papers' bounds assume point-mass drafts).

Where a run also holds ``sequence.npz`` (exact log P_SD of some of its images and of target
images: grid cells, or ``cascade-sd drift RUN``), the table adds the *measured* sequence TV (from
the sampler's images and from the target's) and KL beside the hybrid bound Σ_t E[TV_t] and the
certified bound Σ_t (declared node bound); the audit fails when the two TV estimates disagree or
the measured TV exceeds either bound beyond both intervals (``analysis.sequence_tv.problems``).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from analysis import sequence_tv
from analysis.estimators import Estimate, sequence_bound
from cascade_sd.acceptance import RULES
from cascade_sd.acceptance.registry import overrides
from cascade_sd.errors import DataError
from cascade_sd.metrics.drift import TOLERANCE, paper_bound_cell, paper_bound_stats


@dataclass
class RunAudit:
    """Audit of one decode output."""

    name: str
    method: str
    params: dict[str, Any]
    rows: list[dict[str, Any]]
    violations: int
    inconclusive: int
    declares_bound: bool
    sequence: dict[str, float] = field(default_factory=dict)
    paper_bound: float | None = None
    paper_violated_fraction: float | None = None
    paper_violated: bool = False
    measured: sequence_tv.Measured | None = None
    certified: Estimate | None = None
    sequence_problems: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """"violated", "measured TV contradicts", "inconclusive", "within bound" or "no declared bound"."""
        if self.sequence_problems:
            return "measured TV contradicts"
        if not self.declares_bound:
            return "no declared bound"
        if self.violations:
            return "violated"
        return "inconclusive" if self.inconclusive else "within bound"


def audit_arrays(name: str, stats: dict[str, Any], drift: np.ndarray, bound: np.ndarray, exact: np.ndarray,
                 tolerance: float = TOLERANCE, paper: np.ndarray | None = None,
                 visited: np.ndarray | None = None, sequence: dict[str, np.ndarray] | None = None) -> RunAudit:
    """Audit one run's per-token arrays [images, positions] (``paper``: the paper's bound, NaN where
    the rule's paper states none; ``visited``: the positions a verified node emitted; ``sequence``:
    the arrays of its ``sequence.npz``)."""
    declares = not np.isnan(bound).all()
    over = declares & (drift > np.nan_to_num(bound, nan=np.inf) + tolerance)
    rows = []
    for t in range(drift.shape[1]):
        rows.append({"position": t, "drift_mean": float(drift[:, t].mean()), "drift_max": float(drift[:, t].max()),
                     "bound_mean": float(np.nanmean(bound[:, t])) if declares else float("nan"),
                     "violations": int((over[:, t] & exact[:, t]).sum()),
                     "inconclusive": int((over[:, t] & ~exact[:, t]).sum())})
    seq = sequence_bound(drift)
    audit = RunAudit(name=name, method=str(stats.get("method", "?")), params=dict(stats.get("rule_params", {})),
                     rows=rows, violations=int((over & exact).sum()), inconclusive=int((over & ~exact).sum()),
                     declares_bound=declares, sequence=seq.as_dict("sequence_bound"))
    if paper is not None and not np.isnan(paper).all():
        if visited is None:
            raise ValueError("audit_arrays: a paper bound needs the visited mask")
        stats = paper_bound_stats(drift, paper, visited)
        audit.paper_bound, audit.paper_violated_fraction = stats["paper_bound_mean"], stats["paper_bound_violated_fraction"]
        audit.paper_violated = stats["paper_bound_violated"]
    if sequence is not None:
        audit.measured = sequence_tv.measure(sequence)
        audit.certified = sequence_bound(np.nan_to_num(bound)) if declares else None
        audit.sequence_problems = sequence_tv.problems(audit.measured, seq, audit.certified)
    return audit


def audit_folder(folder: str | Path, tolerance: float = TOLERANCE) -> list[RunAudit]:
    """Audit every ``drift.npz`` under ``folder`` (with its ``stats.json``)."""
    folder = Path(folder)
    found = sorted(folder.rglob("drift.npz"))
    if not found:
        raise DataError(f"run={str(folder)!r} holds no drift.npz; decode with --record-drift first")
    audits = []
    for path in found:
        stats_path = path.with_name("stats.json")
        stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
        try:
            arrays = np.load(path)
            drift, bound, exact = arrays["drift"], arrays["drift_bound"], arrays["drift_exact"].astype(bool)
            paper, visited = arrays["drift_paper_bound"], arrays["drift_visited"]
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
            raise DataError(f"{path}: not a drift file ({err})") from None
        audits.append(audit_arrays(str(path.parent.relative_to(folder)) or ".", stats, drift, bound, exact, tolerance,
                                   paper, visited, sequence_tv.load([path.with_name("sequence.npz")])))
    return audits


def _est(e: Estimate) -> str:
    return f"{e.value:.4g} [{e.lower:.4g}, {e.upper:.4g}]"


def _paper(a: RunAudit) -> str:
    return paper_bound_cell(a.paper_bound, a.paper_violated_fraction, ".4g")


def format_audit(audits: list[RunAudit], *, per_position: bool = False) -> str:
    """Markdown: one summary row per run (and, optionally, one row per position)."""
    lines = ["| run | method | params | mean drift / node | max drift | mean bound | violations | inconclusive "
             "| paper's bound (nodes over it) | Σ_t E[TV_t] [95% CI] | verdict |", "|" + "---|" * 11]
    for a in audits:
        drift = np.array([r["drift_mean"] for r in a.rows])
        bound = np.array([r["bound_mean"] for r in a.rows])
        changed = overrides(a.method, a.params) if a.method in RULES else a.params
        params = ", ".join(f"{k}={v}" for k, v in changed.items()) or "defaults"
        seq = a.sequence
        lines.append(
            f"| {a.name} | {a.method} | {params} | {drift.mean():.4g} | {max(r['drift_max'] for r in a.rows):.4g} "
            f"| {np.nanmean(bound) if a.declares_bound else float('nan'):.4g} | {a.violations} | {a.inconclusive} "
            f"| {_paper(a)} | {seq['sequence_bound']:.4g} [{seq['sequence_bound_lower']:.4g}, {seq['sequence_bound_upper']:.4g}] "
            f"| {a.verdict} |")
    measured = [a for a in audits if a.measured is not None]
    if measured:
        lines += ["", "Measured sequence-level drift (exact log P_SD; analysis/README.md \"Sequence-level drift\"):", "",
                  "| run | method | images | TV from its images [95% CI] | TV from target images | KL(P_SD‖P) nats "
                  "| Σ_t E[TV_t] | certified Σ_t bound | exact | checks |", "|" + "---|" * 10]
        for a in measured:
            m, seq = a.measured, a.sequence
            cert = "–" if a.certified is None else _est(a.certified)
            lines.append(f"| {a.name} | {a.method} | {len(m.log_ratio)} | {_est(m.tv)} | {_est(m.tv_target)} | {_est(m.kl)} "
                         f"| {seq['sequence_bound']:.4g} | {cert} | {'yes' if m.exact else 'no'} "
                         f"| {'; '.join(a.sequence_problems) or 'pass'} |")
    papers = [a for a in audits if a.paper_bound is not None]
    for method in sorted({a.method for a in papers}):
        mine = [a for a in papers if a.method == method]
        lines.append(f"\n{method}: the paper's stated bound is exceeded at some node in "
                     f"{sum(a.paper_violated for a in mine)} of {len(mine)} runs.")
    if per_position:
        for a in audits:
            lines += ["", f"**{a.name}** ({a.method})", "", "| position | mean drift | max drift | mean bound | violations |",
                      "|---|---|---|---|---|"]
            lines += [f"| {r['position']} | {r['drift_mean']:.4g} | {r['drift_max']:.4g} | {r['bound_mean']:.4g} "
                      f"| {r['violations']} |" for r in a.rows]
    return "\n".join(lines)
