"""Drift of every rule at its paper defaults on a bundle: a measurement script (issue 5).

For each rule: decode ``images`` images (batch ``batch``) twice, without and with drift recorded
on the first ``drift_rows`` images of each batch (same seed, so the same tokens), and report the
sequence bound Σ_t E[TV_t] with its bootstrap CI over the recorded images, the mean per-node
drift, the share of exactly computed nodes, the token-marginal TV against vanilla samples (with
the plug-in noise floor of vanilla against vanilla) and the cost of recording as a fraction of
decode time.

    python -m analysis.drift_report --bundle results/models --tree chain-4 --images 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from analysis.estimators import noise_floor, sequence_bound, token_marginal_tv
from cascade_sd import api
from cascade_sd.bench import rule_settings
from cascade_sd.io import atomic_write_json


def _decode_all(bundle: api.Bundle, labels: torch.Tensor, batch: int, seed: int, **kwargs) -> tuple[np.ndarray, float, list]:
    tokens, seconds, results = [], 0.0, []
    for start in range(0, len(labels), batch):
        t0 = time.perf_counter()
        res = api.decode(bundle, labels[start:start + batch], seed=seed + start, **kwargs)
        seconds += time.perf_counter() - t0
        tokens.append(res.tokens.cpu().numpy())
        results.append(res)
    return np.concatenate(tokens), seconds, results


def drift_report(bundle: api.Bundle, *, tree: str, drafter: str, images: int, batch: int, drift_rows: int,
                 seed: int = 0, cfg_scale: float = 3.0, rules: list[str] | None = None, repeats: int = 3) -> list[dict]:
    """One row per rule at its defaults (see module docstring); plain and recorded decodes alternate
    ``repeats`` times and the cost is the ratio of their medians (its per-repeat range beside it)."""
    classes = bundle.target.config.num_classes
    vocab = bundle.target.config.vocab_size
    labels = torch.arange(images) % classes
    vanilla, _, _ = _decode_all(bundle, labels, batch, seed + 7919, method="vanilla", cfg_scale=cfg_scale)
    reference, _, _ = _decode_all(bundle, labels, batch, seed + 104729, method="vanilla", cfg_scale=cfg_scale)
    floor = float(token_marginal_tv(vanilla, reference, vocab, n_boot=1)[1].value)
    rows = [{"method": "vanilla (second sample set)", "token_marginal_tv": floor, "noise_floor": noise_floor(vanilla, vocab)}]
    for name, _ in rule_settings(rules, defaults_only=True, tree=tree):
        opts = {"method": name, "tree": tree, "drafter": drafter, "cfg_scale": cfg_scale}
        api.decode(bundle, labels[:2], **opts)  # warm-up
        plain_s, drift_s = [], []
        for _ in range(repeats):
            tokens, seconds, _ = _decode_all(bundle, labels, batch, seed, **opts)
            plain_s.append(seconds)
            again, seconds, results = _decode_all(bundle, labels, batch, seed, record_drift=True, drift_rows=drift_rows,
                                                  **opts)
            drift_s.append(seconds)
            assert np.array_equal(tokens, again), "drift recording changed the decoded tokens"
        ratios = [d / p - 1.0 for p, d in zip(plain_s, drift_s)]
        drift = np.concatenate([r.arrays["drift"] for r in results])
        exact = np.concatenate([r.arrays["drift_exact"] for r in results])
        seq = sequence_bound(drift, seed=seed)
        _, marginal = token_marginal_tv(tokens, vanilla, vocab, seed=seed)
        rows.append({
            "method": name, "tree": tree, "images": images, "drift_images": int(drift.shape[0]),
            **seq.as_dict("sequence_bound"), "drift_mean_per_node": float(drift.mean()),
            "exact_fraction": float(exact.mean()), **marginal.as_dict("token_marginal_tv"),
            "decode_seconds": statistics.median(plain_s),
            "recording_cost_fraction": statistics.median(drift_s) / statistics.median(plain_s) - 1.0,
            "recording_cost_range": [min(ratios), max(ratios)],
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def format_report(rows: list[dict]) -> str:
    """Markdown table of ``drift_report`` rows."""
    lines = ["| method | Σ_t E[TV_t] [95% CI] | mean drift / node | exact nodes | token-marginal TV vs vanilla [95% CI] "
             "| recording cost |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "sequence_bound" not in r:
            lines.append(f"| {r['method']} | - | - | - | {r['token_marginal_tv']:.3f} (noise floor; halves: "
                         f"{r['noise_floor']:.3f}) | - |")
            continue
        lines.append(
            f"| {r['method']} | {r['sequence_bound']:.3f} [{r['sequence_bound_lower']:.3f}, {r['sequence_bound_upper']:.3f}] "
            f"| {r['drift_mean_per_node']:.4f} | {r['exact_fraction']:.0%} | {r['token_marginal_tv']:.3f} "
            f"[{r['token_marginal_tv_lower']:.3f}, {r['token_marginal_tv_upper']:.3f}] | {r['recording_cost_fraction']:.1%} "
            f"({r['recording_cost_range'][0]:.0%} to {r['recording_cost_range'][1]:.0%}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--tree", default="chain-4")
    parser.add_argument("--drafter", default="eagle")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--drift-rows", type=int, default=5)
    parser.add_argument("--rules", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="alternating plain/recorded decodes per rule")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = drift_report(api.load_bundle(args.bundle), tree=args.tree, drafter=args.drafter, images=args.images,
                        batch=args.batch, drift_rows=args.drift_rows, rules=args.rules.split(",") if args.rules else None,
                        repeats=args.repeats)
    if args.out:
        atomic_write_json(args.out, rows)
    print(format_report(rows))


if __name__ == "__main__":
    main()
