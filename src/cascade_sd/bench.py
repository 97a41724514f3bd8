"""Benchmark: vanilla and speculative variants in one process, warm, medians (DESIGN 7, 11).

Speedup = vanilla time / method time measured here, at the same batch size. The cost model
predicts the speedup from τ and the measured per-round model costs:
``predicted = τ · t_vanilla_step / (t_draft_round + t_verify_round)``, where t_vanilla_step is
vanilla's time per token step at that batch size; achieved / predicted shows what the engine
loses outside model forwards (and, for batches, to padding).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Iterable

import torch

from cascade_sd import api
from cascade_sd.decoding.processing import SamplingParams


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_runs(fn, repeats: int, device: torch.device) -> tuple[float, Any]:
    """Median wall time of ``repeats`` runs after one warm-up run; returns (median, last result)."""
    fn()
    times, result = [], None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def run_bench(
    bundle: api.Bundle,
    *,
    batch_sizes: Iterable[int] = (1, 16),
    trees: Iterable[str] = ("chain-4", "tree-25", "tree-57", "dynamic"),
    drafters: Iterable[str] | None = None,
    method: str = "strict",
    repeats: int = 3,
    seed: int = 0,
    sampling: dict[str, Any] | None = None,
    tree_options: dict[str, Any] | None = None,
    rule_params: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One row per (batch size, drafter, tree): τ, tokens/s, speedup, overhead, predicted speedup."""
    sampling = sampling or {}
    SamplingParams(**sampling)  # validate before any compute
    drafters = list(drafters or bundle.drafters)
    for name in drafters:
        bundle.drafter(name)
    device = next(bundle.target.parameters()).device
    n_tokens = bundle.target.config.block_size
    classes = bundle.target.config.num_classes
    rows: list[dict[str, Any]] = []
    for batch in batch_sizes:
        labels = torch.arange(batch) % classes
        t_van, van = _timed_runs(lambda: api.decode(bundle, labels, method="vanilla", seed=seed, **sampling), repeats, device)
        step = t_van / n_tokens
        rows.append({"batch": batch, "method": "vanilla", "drafter": "-", "tree": "-", "tau": 1.0,
                     "seconds": t_van, "tokens_per_second": batch * n_tokens / t_van, "speedup": 1.0})
        for name in drafters:
            for tree in trees:
                run = lambda: api.decode(bundle, labels, method=method, tree=tree, drafter=name, seed=seed, profile=True,
                                         **sampling, **(tree_options or {}), **(rule_params or {}))
                t_sd, res = _timed_runs(run, repeats, device)
                s = res.stats
                per_round = (s["target_seconds"] + s["drafter_seconds"]) / max(s["batched_rounds"], 1)
                predicted = s["mean_accepted_length"] * step / per_round
                achieved = t_van / t_sd
                rows.append({
                    "batch": batch, "method": method, "drafter": name, "tree": tree, "tau": s["mean_accepted_length"],
                    "seconds": t_sd, "tokens_per_second": batch * n_tokens / t_sd, "speedup": achieved,
                    "predicted_speedup": predicted, "achieved_over_predicted": achieved / predicted,
                    "engine_overhead_fraction": s["engine_overhead_fraction"], "padding_fraction": s["padding_fraction"],
                    "target_forwards": s["target_forwards"], "drafter_forwards": s["drafter_forwards"],
                    "accept_histogram": s["accept_histogram"],
                })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of benchmark rows."""
    head = "| batch | method | drafter | tree | τ | tokens/s | speedup | predicted | achieved/pred | overhead | padding |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['method']} | {r['drafter']} | {r['tree']} | {r['tau']:.2f} | {r['tokens_per_second']:.0f} "
            f"| {r['speedup']:.2f} | {r.get('predicted_speedup', float('nan')):.2f} "
            f"| {r.get('achieved_over_predicted', float('nan')):.2f} | {r.get('engine_overhead_fraction', 0):.1%} "
            f"| {r.get('padding_fraction', 0):.1%} |"
        )
    return "\n".join(lines)
