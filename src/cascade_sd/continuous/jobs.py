"""Workflow jobs of the CSpD branch (DESIGN 5, 9): train the continuous models, decode and evaluate
each cell (vanilla, or CSpD at one γ / pre-fill / ratio temperature), and the CSpD figure and table.
Config in, files out (atomic), one MLflow child run each, like ``cascade_sd.jobs``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cascade_sd.continuous.bundle import decode_continuous, load_continuous_bundle
from cascade_sd.continuous.decoding import pool_round_stats
from cascade_sd.continuous.model import AEConfig, ContinuousConfig, save_model
from cascade_sd.continuous.train import decode_latents, encode_images, train_autoencoder, train_continuous
from cascade_sd.errors import ConfigError
from cascade_sd.imaging import save_grid
from cascade_sd.io import atomic_savez, atomic_torch_save, atomic_write_json, atomic_write_text
from cascade_sd.tracking import child_run
from cascade_sd.train.stage import StageClock

ROLES = ("target", "draft")
_ARCH = ("dim", "n_layer", "n_head", "head_width", "head_blocks")


def cells(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Vanilla, CSpD at each γ (default pre-fill), at each pre-fill (default γ) and at each extra ratio
    temperature (defaults otherwise); duplicates removed, order kept."""
    dc = config["continuous"]["decode"]
    g0, p0 = dc["gamma"], dc["prefill"]
    found = [{"method": "vanilla", "gamma": 0, "prefill": 0.0, "ratio_temperature": 1.0}]
    found += [{"method": "cspd", "gamma": g, "prefill": p0, "ratio_temperature": 1.0} for g in dc["gammas"]]
    found += [{"method": "cspd", "gamma": g0, "prefill": p, "ratio_temperature": 1.0} for p in dc["prefills"]]
    found += [{"method": "cspd", "gamma": g0, "prefill": p0, "ratio_temperature": t} for t in dc["ratio_temperatures"]]
    unique: list[dict[str, Any]] = []
    for cell in found:
        if cell not in unique:
            unique.append(cell)
    return unique


def cell_slug(cell: dict[str, Any]) -> str:
    """Folder name of a cell: ``vanilla`` or ``cspd-g4-p0.15-t1``."""
    if cell["method"] == "vanilla":
        return "vanilla"
    return f"cspd-g{cell['gamma']}-p{cell['prefill']:g}-t{cell['ratio_temperature']:g}"


def cell_from_slug(config: dict[str, Any], slug: str) -> dict[str, Any]:
    """The cell of this config named ``slug``; one-line error naming the allowed slugs otherwise."""
    known = {cell_slug(c): c for c in cells(config)}
    if slug not in known:
        raise ConfigError(f"cell={slug!r} is not in this config's CSpD grid; allowed: {', '.join(known)}")
    return known[slug]


def train_autoencoder_job(config: dict[str, Any], model_out: Path, latents_out: Path, metrics_out: Path,
                          grid_out: Path) -> dict[str, Any]:
    """Train the continuous autoencoder, encode both splits once, save reconstructions of test images."""
    from cascade_sd.jobs import _images, stage_done, setup_runtime

    setup_runtime(config, training=True)
    ac = config["continuous"]["autoencoder"]
    ae_cfg = AEConfig(latent_dim=ac["latent_dim"], base_channels=ac["base_channels"], res_blocks=ac["res_blocks"],
                      latent_noise=ac["latent_noise"])
    train, test = _images(config, "train"), _images(config, "test")
    with child_run(config["results"], "train_autoencoder", stage="cspd", params={"autoencoder": ac}, seed=config["seed"]) as run:
        clock = StageClock("continuous autoencoder", ac["steps"], ac["expected_seconds"], ac["max_seconds"])
        model, metrics = train_autoencoder(train.images, test.images, ae_cfg, steps=ac["steps"],
                                           batch_size=ac["batch_size"], lr=ac["lr"], seed=config["seed"],
                                           max_seconds=ac["max_seconds"], log_every=clock.log_every(100),
                                           on_log=clock.on_log(lambda s, m: run.metrics(m, step=s), every=100))
        metrics = stage_done(run, metrics, clock, metrics["steps"])
        digest = save_model(model_out, model, extra={"metrics": metrics})
        atomic_torch_save({"autoencoder_hash": digest, "train": encode_images(model, train.images),
                           "train_labels": train.labels, "test": encode_images(model, test.images),
                           "test_labels": test.labels}, latents_out)
        show = test.images[:40]
        save_grid(torch.cat([show, decode_latents(model, encode_images(model, show))]), grid_out, nrow=10)
        metrics |= {"checkpoint_hash": digest}
        atomic_write_json(metrics_out, metrics)
        run.metrics(metrics)
        run.artifact(grid_out)
    return metrics


def train_continuous_job(config: dict[str, Any], role: str, latents: Path, model_out: Path,
                         metrics_out: Path) -> dict[str, Any]:
    """Train the continuous target or draft on the cached latents; records the autoencoder's hash."""
    from cascade_sd.errors import check_choice
    from cascade_sd.jobs import stage_done, setup_runtime

    check_choice("role", role, ROLES)
    setup_runtime(config, training=True)
    cc = config["continuous"]
    rc = cc[role]
    data = torch.load(latents, weights_only=True)
    model_cfg = ContinuousConfig(latent_dim=data["train"].shape[-1], grid_size=int(data["train"].shape[1] ** 0.5),
                                 num_classes=int(data["train_labels"].max()) + 1, head=cc["head"],
                                 sample_steps=cc["sample_steps"], **{k: rc[k] for k in _ARCH})
    with child_run(config["results"], f"train_continuous_{role}", stage="cspd", params={role: rc, "model": model_cfg.to_dict()},
                   seed=config["seed"]) as run:
        clock = StageClock(f"continuous {role}", rc["steps"], rc["expected_seconds"], rc["max_seconds"])
        model, metrics = train_continuous(
            data["train"], data["train_labels"], data["test"], data["test_labels"], model_cfg, steps=rc["steps"],
            batch_size=rc["batch_size"], lr=rc["lr"], warmup_steps=rc["warmup_steps"], seed=config["seed"],
            max_seconds=rc["max_seconds"], log_every=clock.log_every(50),
            on_log=clock.on_log(lambda s, m: run.metrics(m, step=s), every=50))
        metrics = stage_done(run, metrics, clock, metrics["steps"])
        digest = save_model(model_out, model, extra={"metrics": metrics, "autoencoder_hash": data["autoencoder_hash"]})
        metrics |= {"checkpoint_hash": digest}
        atomic_write_json(metrics_out, metrics)
        run.metrics(metrics)
    return metrics


def _time_batch1(bundle: Any, cell: dict[str, Any], images: int, seed: int, sampling: dict[str, Any]) -> float:
    """Wall seconds to decode ``images`` images one at a time (each call synchronises)."""
    opts = {k: cell[k] for k in ("gamma", "prefill", "ratio_temperature")} if cell["method"] == "cspd" else {}
    classes = bundle.target.config.num_classes
    return sum(decode_continuous(bundle, [i % classes], method=cell["method"], seed=seed + i, **sampling,
                                 **opts).stats["seconds"] for i in range(images))


def cell_job(config: dict[str, Any], bundle_dir: Path, slug: str, judge: Path, reference: Path,
             out_dir: Path) -> dict[str, Any]:
    """One cell, every seed: quality images (seed<S>/images.npz, grid.png, stats.json), warm batch-1
    timing of vanilla and the cell's method in this process, and the cell's evaluation (eval.json)."""
    from cascade_sd.grid import _quality
    from cascade_sd.jobs import setup_runtime

    cell = cell_from_slug(config, slug)
    device = setup_runtime(config)
    dc = config["continuous"]["decode"]
    sampling = {"cfg_scale": dc["cfg_scale"], "temperature": dc["temperature"]}
    opts = {k: cell[k] for k in ("gamma", "prefill", "ratio_temperature")} if cell["method"] == "cspd" else {}
    bundle = load_continuous_bundle(bundle_dir, device=device)
    classes = bundle.target.config.num_classes
    labels = torch.arange(classes).repeat_interleave(dc["per_class"])
    vanilla = {"method": "vanilla"}
    for c in (vanilla, cell):  # warm-up both before timing either
        _time_batch1(bundle, c, 1, 10_000, sampling)
    seed_stats, seed_dirs = [], []
    for seed in config["continuous"]["decode"]["seeds"]:
        with child_run(config["results"], f"cspd decode {slug} seed{seed}", stage="cspd",
                       params={"cell": cell, "rule": opts, "sampling": sampling, "decode": dc}, seed=seed) as run:
            tokens, totals = [], []
            for start in range(0, len(labels), dc["batch_size"]):
                res = decode_continuous(bundle, labels[start:start + dc["batch_size"]], method=cell["method"],
                                        seed=seed * 100_003 + start, **sampling, **opts)
                tokens.append(res.tokens.cpu())
                totals.append(res.stats)
            images = decode_latents(bundle.autoencoder, torch.cat(tokens))
            timing_seed = 10_000 + seed * dc["timing_images"]
            t_van = _time_batch1(bundle, vanilla, dc["timing_images"], timing_seed, sampling)
            t_sd = _time_batch1(bundle, cell, dc["timing_images"], timing_seed, sampling)
            stats = {**cell, "cell": slug, "seed": seed, "images": len(labels),
                     "vanilla_seconds_per_image": t_van / dc["timing_images"],
                     "seconds_per_image": t_sd / dc["timing_images"], "speedup": t_van / t_sd,
                     **pool_round_stats(totals)}
            folder = out_dir / f"seed{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            atomic_savez(folder / "images.npz", images=images.numpy(), labels=labels.numpy())
            save_grid(images, folder / "grid.png", nrow=dc["per_class"])
            atomic_write_json(folder / "stats.json", stats)
            run.metrics({k: v for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
            run.artifact(folder / "grid.png")
            seed_stats.append(stats)
            seed_dirs.append(folder)
    with child_run(config["results"], f"cspd evaluate {slug}", stage="cspd",
                   params={"cell": cell, "rule": opts, "sampling": sampling}, seed=config["seed"]) as run:
        result = {**cell, "cell": slug, "seeds": [s["seed"] for s in seed_stats],
                  "speedup": float(np.mean([s["speedup"] for s in seed_stats])),
                  "speedup_range": [min(s["speedup"] for s in seed_stats), max(s["speedup"] for s in seed_stats)],
                  "seconds_per_image": float(np.mean([s["seconds_per_image"] for s in seed_stats])),
                  **pool_round_stats(seed_stats),
                  **_quality(judge, reference, seed_dirs, config["decode"]["bootstrap"], config["seed"])}
        atomic_write_json(out_dir / "eval.json", result)
        run.metrics({k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        run.artifact(out_dir / "eval.json")
    return result


def figures_job(config: dict[str, Any], evals: list[Path], out_dir: Path) -> list[dict[str, Any]]:
    """CSpD table (Markdown + CSV) and figure: speedup and τ vs γ, FID vs γ, per pre-fill and temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    rows = [json.loads(Path(p).read_text()) for p in evals]
    cols = ["cell", "method", "gamma", "prefill", "ratio_temperature", "tau", "acceptance_rate", "mean_tries",
            "capped_resamples", "speedup", "speedup_min", "speedup_max", "fid_in_domain_corrected", "fid_in_domain",
            "fid_lower", "fid_upper", "kid_in_domain", "judge_accuracy"]
    flat = [r | {"speedup_min": r["speedup_range"][0], "speedup_max": r["speedup_range"][1],
                 "fid_lower": r["fid_in_domain_ci"][0], "fid_upper": r["fid_in_domain_ci"][1]} for r in rows]
    frame = pd.DataFrame([{c: r.get(c) for c in cols} for r in flat])
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "cspd_table.csv", frame.to_csv(index=False))
    atomic_write_text(out_dir / "cspd_table.md", _markdown(frame))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    spd = frame[frame.method == "cspd"]
    groups = list(spd.groupby(["prefill", "ratio_temperature"]))
    for i, ((prefill, temp), part) in enumerate(groups):
        part = part.sort_values("gamma")
        label = f"pre-fill {prefill:g}" + ("" if temp == 1 else f", ratio T {temp:g}")
        style = dict(fmt="o-" if len(part) > 1 else "s", capsize=3, label=label)
        x = part.gamma + 0.08 * (i - (len(groups) - 1) / 2)  # side by side where cells share a γ
        axes[0].errorbar(x, part.speedup, yerr=[part.speedup - part.speedup_min,
                                                part.speedup_max - part.speedup], **style)
        fid = part.fid_in_domain_corrected  # the bootstrap CI is the debiased estimate's (as in pareto.png)
        axes[1].errorbar(x, fid, yerr=[(fid - part.fid_lower).clip(lower=0), (part.fid_upper - fid).clip(lower=0)],
                         **style)
    van = frame[frame.method == "vanilla"]
    axes[0].axhline(1.0, color="grey", lw=0.8, ls="--", label="vanilla")
    if len(van):
        axes[1].axhline(float(van.fid_in_domain_corrected.iloc[0]), color="grey", lw=0.8, ls="--", label="vanilla")
    axes[0].set(xlabel="γ (drafted tokens per round)", ylabel="speedup vs vanilla (batch 1)\nbars: range over seeds",
                ylim=(0.0, max(1.0, float(frame.speedup_max.max())) * 1.1))
    axes[1].set(xlabel="γ", ylabel="in-domain FID, debiased\nbars: 95% bootstrap CI")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = out_dir / ".cspd.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out_dir / "cspd.png")
    atomic_write_text(out_dir / "cspd.csv", frame.to_csv(index=False))
    return rows


def _markdown(frame: Any) -> str:
    """The table as Markdown with 3 significant digits."""
    head = "| " + " | ".join(frame.columns) + " |\n| " + " | ".join("---" for _ in frame.columns) + " |\n"
    body = "".join("| " + " | ".join(_fmt(v) for v in row) + " |\n" for row in frame.itertuples(index=False))
    return head + body


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value:.3g}" if isinstance(value, float) else str(value)
