"""Benchmark: vanilla and speculative variants in one process, warm, medians (DESIGN 7, 11).

Speedup = median vanilla time / median method time at the same batch size, over runs that
alternate vanilla and the method (so a drifting machine slows both alike). Each run decodes
batch × ``waves`` images at most batch at a time: vanilla in ``waves`` consecutive batches, the
speculative engine with continuous batching (a finished image's row goes to the next one). The
cost model predicts the speedup from τ and the measured per-round model costs (step compression,
vanilla's target forwards over the method's, is the hardware-independent part of it):
``predicted = τ · t_vanilla_step / (t_draft_round + t_verify_round)``, where t_vanilla_step is
vanilla's time per token step at that batch size and the round's draft and verify costs are its
model time in rounds that computed the whole batch. achieved / predicted shows what the engine
loses outside model forwards and, for batches, what the batch loses once no image is left to
join it (its last rows finish at different rounds and run smaller, less efficient forwards).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Iterable

import numpy as np
import torch

from cascade_sd import api
from cascade_sd.acceptance import RULES
from cascade_sd.decoding.processing import SamplingParams
from cascade_sd.errors import ConfigError, check_choice, check_int
from cascade_sd.metrics.drift import paper_bound_cell
from cascade_sd.progress import Progress


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> tuple[float, Any]:
    """Synchronised wall time of one call and its result."""
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def _timed_pairs(baseline, method, repeats: int, device: torch.device) -> tuple[list[float], list[float], list[Any]]:
    """Wall times of ``repeats`` alternating baseline/method runs after one warm-up of each, so slow
    drifts of the machine hit both alike; returns (baseline times, method times, method results)."""
    baseline()
    method()
    base_times, method_times, results = [], [], []
    for _ in range(repeats):
        base_times.append(_timed(baseline, device)[0])
        seconds, result = _timed(method, device)
        method_times.append(seconds)
        results.append(result)
    return base_times, method_times, results


def time_images(bundle: api.Bundle, method: str, opts: dict[str, Any], images: int, *, seed: int,
                sampling: dict[str, Any]) -> tuple[float, list[float]]:
    """Total wall time of decoding ``images`` images one at a time (synchronised) and each one's τ."""
    device = next(bundle.target.parameters()).device
    classes = bundle.target.config.num_classes
    total, taus = 0.0, []
    for i in range(images):
        _sync(device)
        start = time.perf_counter()
        res = api.decode(bundle, [i % classes], method=method, seed=seed + i, **sampling, **opts)
        _sync(device)
        total += time.perf_counter() - start
        taus.append(res.stats.get("mean_accepted_length", 1.0))
    return total, taus


def run_bench(
    bundle: api.Bundle,
    *,
    batch_sizes: Iterable[int] = (1, 16),
    trees: Iterable[str] = ("chain-4", "tree-25", "tree-57", "dynamic"),
    drafters: Iterable[str] | None = None,
    method: str = "strict",
    repeats: int = 3,
    waves: int = 1,
    seed: int = 0,
    sampling: dict[str, Any] | None = None,
    tree_options: dict[str, Any] | None = None,
    rule_params: dict[str, Any] | None = None,
    jacobi: Iterable[api.JacobiOptions] = (),
    on_row: Callable[[dict[str, Any]], None] | None = None,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """One row per (batch size, drafter, tree) and per Jacobi setting (drafter-free, ``jacobi``: variant names
    or option dicts): τ, step compression, tokens/s, speedup, overhead, predicted speedup. ``on_row`` gets
    each row as it is measured (a batch's vanilla row after its speculative rows); ``progress`` counts the
    settings measured."""
    check_int("waves", waves, 1)
    sampling = sampling or {}
    SamplingParams(**sampling)  # validate every setting before any compute
    drafters = list(drafters or bundle.drafters)
    batch_sizes, trees = list(batch_sizes), list(trees)
    for batch in batch_sizes:
        check_int("batch_sizes", batch, 1)
    settings = [(name, tree, None) for name in drafters for tree in trees]
    settings += [(api.JACOBI, api.WINDOW, api.jacobi_spec(api.JACOBI, j)) for j in jacobi]
    for name, tree, spec in settings:
        api.check_setting(bundle, method, tree, name, jacobi=spec, **(tree_options or {}), **(rule_params or {}))
    device = next(bundle.target.parameters()).device
    n_tokens = bundle.target.config.block_size
    classes = bundle.target.config.num_classes
    rows: list[dict[str, Any]] = []
    if progress is not None:
        progress.total = len(batch_sizes) * len(settings)
    for batch in batch_sizes:
        labels = torch.arange(batch * waves) % classes
        images = labels.numel()
        last_vanilla: dict[str, Any] = {}
        vanilla = lambda: last_vanilla.update(run=api.decode(bundle, labels, method="vanilla", seed=seed,
                                                             max_batch=batch, **sampling))
        batch_rows, all_vanilla = [], []
        for name, tree, spec in settings:
            run = lambda: api.decode(bundle, labels, method=method, tree=tree, drafter=name, seed=seed, profile=True,
                                     max_batch=batch, jacobi=spec, **sampling, **(tree_options or {}),
                                     **(rule_params or {}))
            label = tree if spec is None else jacobi_label(spec)
            if progress is not None:
                progress.update(progress.done, now=f"batch {batch} {name} {label}")
            van_times, sd_times, results = _timed_pairs(vanilla, run, repeats, device)
            all_vanilla += van_times
            t_van, t_sd = statistics.median(van_times), statistics.median(sd_times)
            s = results[-1].stats  # the same seed: every run decodes the same tokens
            timing = {k: statistics.median(r.stats[k] for r in results)
                      for k in ("engine_overhead_fraction", "full_batch_round_model_seconds")}
            predicted = s["mean_accepted_length"] * (t_van / (waves * n_tokens)) / timing["full_batch_round_model_seconds"]
            achieved = t_van / t_sd
            batch_rows.append({
                "batch": batch, "images": images, "method": method, "drafter": name, "tree": label,
                "tau": s["mean_accepted_length"],
                "step_compression": last_vanilla["run"].stats["target_forwards"] / s["target_forwards"],
                "seconds": t_sd, "tokens_per_second": images * n_tokens / t_sd, "speedup": achieved,
                "predicted_speedup": predicted, "achieved_over_predicted": achieved / predicted,
                "engine_overhead_fraction": timing["engine_overhead_fraction"], "padding_fraction": s["padding_fraction"],
                "mean_rows_per_round": s["mean_rows_per_round"],
                "target_forwards": s["target_forwards"], "drafter_forwards": s["drafter_forwards"],
                "accept_histogram": s["accept_histogram"],
            })
            if progress is not None:
                progress.update(progress.done + 1)
            if on_row is not None:
                on_row(batch_rows[-1])
        t_van = statistics.median(all_vanilla) if all_vanilla else _timed(vanilla, device)[0]
        rows.append({"batch": batch, "images": images, "method": "vanilla", "drafter": "-", "tree": "-", "tau": 1.0,
                     "step_compression": 1.0, "seconds": t_van, "tokens_per_second": images * n_tokens / t_van, "speedup": 1.0})
        if on_row is not None:
            on_row(rows[-1])
        rows += batch_rows
    return rows


def _cell(value: float | None) -> str:
    """A ratio to two decimals, or – where it does not apply (vanilla's predicted speedup)."""
    return "–" if value is None else f"{value:.2f}"


TABLE_HEAD = ("| batch | images | method | drafter | tree | τ | steps ÷ | tokens/s | speedup | predicted | achieved/pred "
              "| overhead | rows/round | padding |\n" + "|" + "---|" * 14)


def jacobi_label(spec: Any) -> str:
    """A Jacobi setting in a table's tree column: ``sjd L=16``, ``sjd-pac L=64 W=3 D=3``."""
    tail = f" W={spec.width} D={spec.depth}" if spec.pac else ""
    code = " (reference code)" if spec.code == "reference-code" else ""
    return f"{spec.variant} L={spec.window}{tail}{code}"


def format_table(rows: list[dict[str, Any]], *, head: bool = True) -> str:
    """Markdown table of benchmark rows (``head=False``: the rows only, to print one as it is measured)."""
    lines = [TABLE_HEAD] if head else []
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['images']} | {r['method']} | {r['drafter']} | {r['tree']} | {r['tau']:.2f} "
            f"| {_cell(r.get('step_compression'))} | {r['tokens_per_second']:.0f} "
            f"| {r['speedup']:.2f} | {_cell(r.get('predicted_speedup'))} "
            f"| {_cell(r.get('achieved_over_predicted'))} | {r.get('engine_overhead_fraction', 0):.1%} "
            f"| {r.get('mean_rows_per_round', r['batch']):.1f} | {r.get('padding_fraction', 0):.1%} |"
        )
    return "\n".join(lines)


def rule_settings(rules: Iterable[str] | None = None, *, defaults_only: bool = False, sweep_only: bool = False,
                  tree: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(rule, parameters) pairs: every rule's sweep (its paper defaults first), its defaults only, or
    its sweep without the defaults; by default, rules for static trees only are left out of a dynamic tree."""
    if defaults_only and sweep_only:
        raise ConfigError("defaults_only and sweep_only exclude each other; choose one")
    names = list(rules) if rules else [n for n in RULES if not (tree == "dynamic" and RULES[n].static_tree_only)]
    for name in names:
        check_choice("rules", name, RULES)
    part = slice(0, 1) if defaults_only else slice(1, None) if sweep_only else slice(None)
    return [(name, dict(setting)) for name in names for setting in RULES[name].sweep[part]]


def _quality(bundle: api.Bundle, tokens: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None,
             seed: int) -> dict[str, Any]:
    """Judge accuracy with a bootstrap CI and in-domain FID of decoded tokens (needs tokenizer and judge)."""
    from cascade_sd.jobs import decode_to_images
    from cascade_sd.metrics.quality import bootstrap_ci, in_domain_fid_kid, judge_correct

    images = decode_to_images(bundle.tokenizer, tokens.cpu())
    acc, lo, hi = bootstrap_ci(judge_correct(bundle.judge, images, labels.cpu()).double().numpy(), seed=seed)
    out = {"judge_accuracy": acc, "judge_accuracy_ci": [lo, hi]}
    if reference is not None:
        fid = in_domain_fid_kid(bundle.judge, reference, images, kid_subset_size=max(2, len(images) // 2), seed=seed)
        out["fid_in_domain"] = fid["fid_in_domain"]
    return out


def run_rule_bench(
    bundle: api.Bundle,
    *,
    tree: str,
    drafter: str,
    rules: Iterable[str] | None = None,
    timing_images: int = 4,
    drift_images: int = 2,
    quality_images: int = 0,
    quality_batch: int = 50,
    reference: torch.Tensor | None = None,
    seed: int = 0,
    sampling: dict[str, Any] | None = None,
    tree_options: dict[str, Any] | None = None,
    defaults_only: bool = False,
    sweep_only: bool = False,
    jacobi: api.JacobiOptions = None,
    on_row=None,
) -> list[dict[str, Any]]:
    """Every rule setting on one tree family vs vanilla, in one process.

    Speed: ``timing_images`` images decoded one at a time (batch 1) after a warm-up, summed wall
    time; speedup = vanilla time / method time. Drift: exact mean per-node TV (``record_drift``)
    over ``drift_images`` images. Quality (needs tokenizer and judge): ``quality_images`` images at
    batch ``quality_batch``, judge accuracy with a bootstrap CI and in-domain FID against
    ``reference``; τ is taken from these runs when present (more rounds).

    ``drafter='jacobi'`` (``jacobi``: the variant or its options) verifies the Jacobi window instead of
    ``tree``; rules whose breadth signal reads a trained drafter compare the target's outputs there
    (``breadth_source='target'``, shown in the params column).
    """
    sampling, tree_options = sampling or {}, tree_options or {}
    SamplingParams(**sampling)
    spec = api.jacobi_spec(drafter, jacobi)
    settings = [("vanilla", {})] + rule_settings(rules, defaults_only=defaults_only, sweep_only=sweep_only, tree=tree)
    if spec is not None:
        tree = api.WINDOW
        settings = [(name, {**params, "breadth_source": "target"} if name != "vanilla" and RULES[name](**params)
                     .reads_drafter else params) for name, params in settings]
    for name, params in settings[1:]:  # validate every setting before any compute
        api.check_setting(bundle, name, tree, drafter, jacobi=spec, record_drift=bool(drift_images), **tree_options,
                          **params)
    if spec is None:
        bundle.drafter(drafter)
    classes = bundle.target.config.num_classes
    rows: list[dict[str, Any]] = []
    base_seconds = None
    for name, params in settings:
        opts = {} if name == "vanilla" else {"tree": tree, "drafter": drafter, "jacobi": spec, **tree_options, **params}

        time_images(bundle, name, opts, timing_images, seed=seed, sampling=sampling)  # warm-up
        seconds, taus = time_images(bundle, name, opts, timing_images, seed=seed, sampling=sampling)
        base_seconds = seconds if name == "vanilla" else base_seconds
        shown = tree if spec is None else jacobi_label(spec)
        row = {"tree": shown if name != "vanilla" else "-", "drafter": drafter if name != "vanilla" else "-",
               "method": name, "params": params, "seconds": seconds, "speedup": base_seconds / seconds,
               "tau": float(np.mean(taus))}
        if name != "vanilla" and drift_images:
            res = api.decode(bundle, torch.arange(drift_images) % classes, method=name, seed=seed, record_drift=True,
                             **sampling, **opts)
            row |= {k: res.stats[k] for k in ("drift_mean", "drift_bound_mean", "drift_exact_fraction",
                                               "drift_sequence_sum", "drift_paper_bound_mean",
                                               "paper_bound_violated_fraction") if k in res.stats}
        if quality_images and bundle.tokenizer is not None and bundle.judge is not None:
            labels = torch.arange(quality_images) % classes
            tokens, accepted = [], []
            for start in range(0, quality_images, quality_batch):
                res = api.decode(bundle, labels[start:start + quality_batch], method=name, seed=seed + 1000 + start,
                                 **sampling, **opts)
                tokens.append(res.tokens)
                if name != "vanilla":
                    accepted.append(res.stats["mean_accepted_length"] * res.stats["rounds"])
                    accepted.append(res.stats["rounds"])
            row |= _quality(bundle, torch.cat(tokens), labels, reference, seed)
            if accepted:
                row["tau"] = sum(accepted[::2]) / sum(accepted[1::2])
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def format_rule_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of rule-bench rows (the papers' format plus drift)."""
    head = ("| tree | method | params | τ | speedup | drift (mean/node) | declared bound | paper's bound (nodes over it) "
            "| exact nodes | judge acc [95% CI] | FID (in-domain) |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "defaults"
        ci = r.get("judge_accuracy_ci")
        judge = f"{r['judge_accuracy']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"
        fid = f"{r['fid_in_domain']:.1f}" if "fid_in_domain" in r else "-"
        drift = f"{r['drift_mean']:.4f}" if "drift_mean" in r else "0"
        bound = r.get("drift_bound_mean")
        bound_s = "-" if "drift_mean" not in r else ("none" if bound is None else f"{bound:.4f}")
        paper = r.get("drift_paper_bound_mean")
        paper_s = paper_bound_cell(paper, r.get("paper_bound_violated_fraction"), missing="-")
        exact = f"{r['drift_exact_fraction']:.0%}" if "drift_exact_fraction" in r else "-"
        lines.append(f"| {r['tree']} | {r['method']} | {params} | {r['tau']:.2f} | {r['speedup']:.2f} | {drift} | {bound_s} "
                     f"| {paper_s} | {exact} | {judge} | {fid} |")
    return "\n".join(lines)
