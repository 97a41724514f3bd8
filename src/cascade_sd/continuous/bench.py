"""Batch-1 benchmark of CSpD against vanilla continuous decoding, in one process (warm, synchronised,
medians over images): τ, acceptance, residual tries, seconds per image, speedup, and the cost split
that explains it (draft share of CSpD time, draft cost per token relative to a vanilla token)."""

from __future__ import annotations

import statistics
from typing import Any, Iterable

from cascade_sd.continuous.bundle import ContinuousBundle, decode_continuous
from cascade_sd.continuous.decoding import check_cspd_params, pool_round_stats


def bench_continuous(bundle: ContinuousBundle, *, gammas: Iterable[int] = (2, 4, 8), prefill: float = 0.15,
                     ratio_temperatures: Iterable[float] = (1.0,), images: int = 5, seed: int = 0,
                     cfg_scale: float = 1.0, temperature: float = 1.0) -> list[dict[str, Any]]:
    """One row for vanilla and one per (γ, ratio temperature); every setting is warmed up first."""
    sampling = {"cfg_scale": cfg_scale, "temperature": temperature}
    classes = bundle.target.config.num_classes
    n = bundle.target.config.tokens
    settings = [{"method": "vanilla"}] + [{"method": "cspd", "gamma": g, "prefill": prefill, "ratio_temperature": t}
                                          for g in gammas for t in ratio_temperatures]
    for s in settings[1:]:
        check_cspd_params(s["gamma"], s["prefill"], s["ratio_temperature"])
    for s in settings:
        decode_continuous(bundle, [0], seed=seed + 10_000, **sampling, **s)
    rows = []
    for s in settings:
        stats = [decode_continuous(bundle, [i % classes], seed=seed + i, **sampling, **s).stats for i in range(images)]
        row: dict[str, Any] = {**s, "seconds_per_image": statistics.median(st["seconds"] for st in stats)}
        if s["method"] == "cspd":
            pooled = pool_round_stats(stats)
            total = sum(st["seconds"] for st in stats)
            row |= {k: pooled[k] for k in ("tau", "acceptance_rate", "mean_tries")}
            row |= {"draft_share": sum(st["drafter_seconds"] for st in stats) / total,
                    "draft_token_seconds": (sum(st["drafter_seconds"] for st in stats)
                                            / sum(st["drafter_forwards"] for st in stats))}
        rows.append(row)
    vanilla = rows[0]["seconds_per_image"]
    for row in rows:
        row["speedup"] = vanilla / row["seconds_per_image"]
        if "draft_token_seconds" in row:
            row["draft_cost_ratio"] = row.pop("draft_token_seconds") / (vanilla / n)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of ``bench_continuous`` rows."""
    cols = ["method", "gamma", "ratio_temperature", "tau", "acceptance_rate", "mean_tries", "seconds_per_image",
            "speedup", "draft_share", "draft_cost_ratio"]
    lines = ["  ".join(f"{c:>12}" for c in cols)]
    for row in rows:
        cells = [row.get(c, "") for c in cols]
        lines.append("  ".join(f"{v:>12.3f}" if isinstance(v, float) else f"{v!s:>12}" for v in cells))
    return "\n".join(lines)
