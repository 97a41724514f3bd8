"""The cost of the exact sequence law against decoding the same images, and what it measures (issue 23).

Per rule setting and tree family: decode ``images`` images one at a time (warm, synchronised), once
plainly and once with per-node drift recorded; then time ``api.sequence_log_prob`` on those images
and on as many target images. Each row gives both cost ratios, τ, the measured sequence TV (both
ways, 95% CIs) and KL, and the hybrid bound from the recorded drift.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import numpy as np
import torch

from analysis.estimators import sequence_bound
from analysis.sequence_tv import measure
from cascade_sd import api, defaults
from cascade_sd.acceptance import RULES
from cascade_sd.bench import _sync, rule_settings


def _decode_one_by_one(bundle: api.Bundle, labels: list[int], opts: dict[str, Any], sampling: dict[str, Any],
                       seed: int, **extra: Any) -> tuple[float, torch.Tensor, list[dict[str, Any]]]:
    """(seconds, tokens [B, N], each image's stats and arrays) of decoding ``labels`` at batch 1."""
    device = next(bundle.target.parameters()).device
    total, tokens, results = 0.0, [], []
    for i, label in enumerate(labels):
        _sync(device)
        start = time.perf_counter()
        res = api.decode(bundle, [label], seed=seed + i, **sampling, **opts, **extra)
        _sync(device)
        total += time.perf_counter() - start
        tokens.append(res.tokens.cpu())
        results.append({**res.stats, **res.arrays})
    return total, torch.cat(tokens), results


def run_sequence_bench(bundle: api.Bundle, *, trees: Iterable[str] = ("chain-4", "dynamic"),
                       rules: Iterable[str] | None = None, defaults_only: bool = True, images: int = 4, seed: int = 0,
                       drafter: str = defaults.DRAFTER, sampling: dict[str, Any] | None = None,
                       echo: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """One row per (tree, rule setting); ``echo`` gets each row as it is measured."""
    sampling = sampling or dict(defaults.SAMPLING)
    classes = bundle.target.config.num_classes
    labels = [(i * classes) // images for i in range(images)]  # spread over the classes
    rows = []
    for tree in trees:
        for method, params in rule_settings(rules, defaults_only=defaults_only, tree=tree):
            if tree == "dynamic" and RULES[method].static_tree_only:
                continue
            opts = {"method": method, "tree": tree, "drafter": drafter, **params}
            _decode_one_by_one(bundle, labels[:1], opts, sampling, seed + 10_000)  # warm-up
            decode_s, tokens, stats = _decode_one_by_one(bundle, labels, opts, sampling, seed)
            drift_s, _, drifted = _decode_one_by_one(bundle, labels, opts, sampling, seed, record_drift=True)
            shape = {"total_tokens": stats[0]["total_tokens"]} if tree == "dynamic" else {}
            start = time.perf_counter()
            on_sd = api.sequence_log_prob(bundle, labels, tokens, **opts, **sampling, **shape)
            seq_s = time.perf_counter() - start
            vanilla = api.decode(bundle, labels, method="vanilla", seed=seed + 20_000, **sampling).tokens.cpu()
            on_target = api.sequence_log_prob(bundle, labels, vanilla, **opts, **sampling, **shape)
            measured = measure({"sampler_log_sd": on_sd.log_sd.numpy(), "sampler_log_target": on_sd.log_target.numpy(),
                                "target_log_sd": on_target.log_sd.numpy(),
                                "target_log_target": on_target.log_target.numpy(),
                                "exact": np.concatenate([on_sd.exact.numpy(), on_target.exact.numpy()])})
            hybrid = sequence_bound(np.concatenate([d["drift"] for d in drifted]))
            row = {"tree": tree, "method": method, "params": params, "images": images,
                   "tau": float(np.mean([s["mean_accepted_length"] for s in stats])),
                   "decode_s_per_image": decode_s / images, "drift_decode_s_per_image": drift_s / images,
                   "sequence_s_per_image": seq_s / images, "cost_ratio": seq_s / decode_s,
                   "cost_ratio_vs_drift": seq_s / drift_s, "hybrid_bound": hybrid.value, **measured.as_dict()}
            rows.append(row)
            if echo is not None:
                echo(row)
    return rows


def format_row(row: dict[str, Any]) -> str:
    """One Markdown table row (``HEADER`` names the columns)."""
    params = ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "defaults"
    tv, tvt, kl = row["sequence_tv_ci"], row["sequence_tv_target_ci"], row["sequence_kl_ci"]
    return (f"| {row['tree']} | {row['method']} | {params} | {row['tau']:.2f} | {row['decode_s_per_image']:.2f} "
            f"| {row['drift_decode_s_per_image']:.2f} | {row['sequence_s_per_image']:.2f} | {row['cost_ratio']:.1f} "
            f"| {row['cost_ratio_vs_drift']:.2f} | {row['sequence_tv']:.3f} [{tv[0]:.3f}, {tv[1]:.3f}] "
            f"| {row['sequence_tv_target']:.3f} [{tvt[0]:.3f}, {tvt[1]:.3f}] | {row['sequence_kl']:.2f} "
            f"[{kl[0]:.2f}, {kl[1]:.2f}] | {row['hybrid_bound']:.2f} | {'yes' if row['sequence_tv_agree'] else 'NO'} |")


HEADER = ("| tree | rule | setting | τ | decode s/img | decode+drift s/img | log P_SD s/img | × decode | × decode+drift "
          "| TV (sampler's images) | TV (target's images) | KL nats | Σ_t E[TV_t] | agree |\n" + "|---" * 14 + "|")
