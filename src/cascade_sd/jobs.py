"""Workflow jobs: config in, files out, one MLflow child run each.

Each function is what one Snakemake rule runs through the CLI; they are plain functions so tests
and users can call them directly. Outputs are written atomically; nothing here decodes by itself.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cascade_sd.data import dataset_fingerprint, load_images, to_uint8
from cascade_sd.data.token_cache import read_token_cache, tokenize_images, write_token_cache
from cascade_sd.decoding.processing import SamplingParams
from cascade_sd.decoding.vanilla import vanilla_decode
from cascade_sd.errors import CheckpointError
from cascade_sd.imaging import save_grid
from cascade_sd.io import atomic_savez, atomic_write_json
from cascade_sd.models.checkpoint import save_checkpoint
from cascade_sd.models.gpt import GPT, GPTConfig, load_gpt
from cascade_sd.models.judge import JudgeConfig, load_judge
from cascade_sd.models.vq import VQConfig, VQModel, inference_batch, load_vq
from cascade_sd.tracking import RunLogger, child_run
from cascade_sd.train.stage import StageClock


def setup_runtime(config: dict[str, Any], *, training: bool = False) -> torch.device:
    """Apply the config's thread count and return the torch device it asks for. Training stages also
    switch torch to deterministic kernels: with several threads some CPU kernels (accumulating index
    and scatter ops) otherwise sum in a varying order, and the same seed would not give the same model."""
    torch.set_num_threads(config["threads"])
    device = config["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from cascade_sd.errors import ConfigError

        raise ConfigError("device='cuda' but no CUDA device is available; allowed here: 'cpu' or 'auto'")
    if training:
        if device == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (CUDA docs)
        torch.use_deterministic_algorithms(True, warn_only=device == "cuda")
    return torch.device(device)


def _images(config: dict[str, Any], split: str):
    d = config["data"]
    return load_images(d["source"], split, root=d["root"], limit=d[f"limit_{split}"])


def prepare_data(config: dict[str, Any], out: Path) -> dict[str, Any]:
    """Check the dataset is present and record its fingerprint (the DAG's first node)."""
    train, test = _images(config, "train"), _images(config, "test")
    info = {
        "source": config["data"]["source"],
        "train_examples": len(train.labels),
        "test_examples": len(test.labels),
        "num_classes": train.num_classes,
        "class_names": train.class_names,
        "fingerprint": dataset_fingerprint(config["data"]["source"], config["data"]["root"]),
    }
    with child_run(config["results"], "data", stage="models", params={"data": config["data"]}) as run:
        atomic_write_json(out, info)
        run.metrics({"train_examples": info["train_examples"], "test_examples": info["test_examples"]})
        run.artifact(out)
    return info


def _log_progress(run: RunLogger):
    def on_log(step: int, metrics: dict) -> None:
        run.metrics(metrics, step=step)

    return on_log


def stage_done(run: RunLogger, metrics: dict[str, Any], clock: StageClock, steps_done: int) -> dict[str, Any]:
    """The stage's timing and stopping rule joined to its metrics, with the flags as run tags."""
    metrics = metrics | clock.finish(steps_done)
    run.tags({k: str(metrics[k]).lower() for k in ("stopped_by", "wall_clock_limited", "over_expected_time")})
    return metrics


def per_arch(value: Any, arch: str) -> Any:
    """A drafter setting for ``arch``: one value for every arch, or a mapping arch → value."""
    return value[arch] if isinstance(value, dict) else value


def train_tokenizer_job(config: dict[str, Any], out: Path, metrics_out: Path) -> dict[str, Any]:
    """Train the VQ tokenizer of the config and save it with its metrics."""
    from cascade_sd.train.tokenizer import train_tokenizer

    setup_runtime(config, training=True)
    tc = config["tokenizer"]
    vq_cfg = VQConfig.preset(tc["preset"], codebook_size=tc["codebook_size"], base_channels=tc["base_channels"])
    train, test = _images(config, "train"), _images(config, "test")
    # A seeded test subset: encoding and decoding the full 10k split cost ~50 s on 2 cores.
    pick = torch.randperm(len(test.images), generator=torch.Generator().manual_seed(config["seed"]))[: tc["eval_images"]].sort().values
    with child_run(config["results"], "train_tokenizer", stage="models", params={"tokenizer": tc, "vq": vq_cfg.to_dict()}, seed=config["seed"]) as run:
        clock = StageClock("tokenizer", tc["steps"], tc["expected_seconds"], tc["max_seconds"])
        model, metrics = train_tokenizer(
            train.images, test.images[pick], vq_cfg, steps=tc["steps"], batch_size=tc["batch_size"], lr=tc["lr"],
            seed=config["seed"], max_seconds=tc["max_seconds"], log_every=clock.log_every(100),
            on_log=clock.on_log(_log_progress(run), every=100),
        )
        metrics = stage_done(run, metrics, clock, metrics["steps"]) | {"eval_images": len(pick)}
        digest = save_checkpoint(out, "vq", vq_cfg.to_dict(), model.state_dict(), extra={"metrics": metrics, "data": config["data"]})
        metrics = metrics | {"checkpoint_hash": digest}
        atomic_write_json(metrics_out, metrics)
        run.metrics(metrics)
        run.artifact(metrics_out)
    return metrics


def tokenize_job(config: dict[str, Any], tokenizer: Path, out: Path) -> dict[str, Any]:
    """Tokenise the whole dataset once with the trained tokenizer and cache the codes."""
    setup_runtime(config, training=True)
    vq, ckpt = load_vq(tokenizer)
    train, test = _images(config, "train"), _images(config, "test")
    with child_run(config["results"], "tokenize", stage="models", params={"tokenizer_hash": ckpt.hash}) as run:
        start = time.perf_counter()
        train_codes = tokenize_images(vq, train.images)
        test_codes = tokenize_images(vq, test.images)
        write_token_cache(out, ckpt.hash, vq.config.grid_size, vq.config.codebook_size,
                          train_codes, train.labels.numpy(), test_codes, test.labels.numpy())
        info = {"seconds": time.perf_counter() - start, "train_sequences": len(train_codes), "test_sequences": len(test_codes),
                "tokens_per_image": int(train_codes.shape[1])}
        run.metrics(info)
    return info


def train_target_job(config: dict[str, Any], tokens: Path, tokenizer: Path, out: Path, metrics_out: Path) -> dict[str, Any]:
    """Train the target GPT on the token cache; the checkpoint records its tokenizer's hash."""
    from cascade_sd.train.target import train_target

    setup_runtime(config, training=True)
    _, vq_ckpt = load_vq(tokenizer)
    cache = read_token_cache(tokens, expect_vq_hash=vq_ckpt.hash)
    tc = config["target"]
    gpt_cfg = GPTConfig.preset(
        tc["preset"], dim=tc["dim"], n_layer=tc["n_layer"], n_head=tc["n_head"], vocab_size=cache.codebook_size,
        block_size=cache.grid_size**2, grid_width=cache.grid_size, num_classes=int(cache.train_labels.max()) + 1,
    )
    with child_run(config["results"], "train_target", stage="models", params={"target": tc, "gpt": gpt_cfg.to_dict()}, seed=config["seed"]) as run:
        clock = StageClock("target", tc["steps"], tc["expected_seconds"], tc["max_seconds"])
        model, metrics = train_target(
            cache.train_codes, cache.train_labels, cache.test_codes, cache.test_labels, gpt_cfg,
            steps=tc["steps"], batch_size=tc["batch_size"], lr=tc["lr"], warmup_steps=tc["warmup_steps"],
            weight_decay=tc["weight_decay"], seed=config["seed"], max_seconds=tc["max_seconds"], eval_batches=20,
            log_every=clock.log_every(50), on_log=clock.on_log(_log_progress(run), every=50),
        )
        metrics = stage_done(run, metrics, clock, metrics["steps"]) | {"parameters": sum(p.numel() for p in model.parameters())}
        digest = save_checkpoint(out, "gpt", gpt_cfg.to_dict(), model.state_dict(),
                                 extra={"metrics": metrics, "tokenizer_hash": vq_ckpt.hash})
        metrics["checkpoint_hash"] = digest
        atomic_write_json(metrics_out, metrics)
        run.metrics(metrics)
        run.artifact(metrics_out)
    return metrics


def train_judge_job(config: dict[str, Any], out: Path, metrics_out: Path) -> dict[str, Any]:
    """Train the in-domain judge classifier."""
    from cascade_sd.train.judge import judge_steps, train_judge

    setup_runtime(config, training=True)
    jc = config["judge"]
    train, test = _images(config, "train"), _images(config, "test")
    judge_cfg = JudgeConfig(num_classes=train.num_classes)
    with child_run(config["results"], "train_judge", stage="models", params={"judge": jc, "config": judge_cfg.to_dict()}, seed=config["seed"]) as run:
        clock = StageClock("judge", judge_steps(len(train.labels), jc["epochs"], jc["batch_size"]), jc["expected_seconds"],
                           jc["max_seconds"])
        model, metrics = train_judge(train, test, judge_cfg, epochs=jc["epochs"], batch_size=jc["batch_size"], lr=jc["lr"],
                                     seed=config["seed"], max_seconds=jc["max_seconds"], on_log=clock.on_log())
        metrics = stage_done(run, metrics, clock, metrics["steps"])
        digest = save_checkpoint(out, "judge", judge_cfg.to_dict(), model.state_dict(), extra={"metrics": metrics})
        metrics = metrics | {"checkpoint_hash": digest}
        atomic_write_json(metrics_out, metrics)
        run.metrics(metrics)
        run.artifact(metrics_out)
    return metrics


def load_pair(tokenizer: Path, target: Path) -> tuple[VQModel, GPT]:
    """Load tokenizer and target and check they belong together (vocabulary and hash)."""
    vq, vq_ckpt = load_vq(tokenizer)
    gpt, gpt_ckpt = load_gpt(target)
    if gpt.config.vocab_size != vq.config.codebook_size:
        raise CheckpointError(
            f"target {target}: vocab_size={gpt.config.vocab_size} does not match the tokenizer's codebook_size={vq.config.codebook_size}"
        )
    made_with = gpt_ckpt.extra.get("tokenizer_hash")
    if made_with is not None and made_with != vq_ckpt.hash:
        raise CheckpointError(f"target {target}: trained on tokens of another tokenizer (hash {made_with[:12]} != {vq_ckpt.hash[:12]})")
    return vq.eval(), gpt.eval()


@torch.no_grad()
def decode_to_images(vq: VQModel, tokens: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Token grids [N, h*w] → uint8 images [N, C, H, W] (``inference_batch`` images per call by default)."""
    batch_size = inference_batch(vq) if batch_size is None else batch_size
    return torch.cat([to_uint8(vq.decode_codes(tokens[i : i + batch_size])) for i in range(0, len(tokens), batch_size)])


def generate_job(
    config: dict[str, Any], tokenizer: Path, target: Path, out_dir: Path, *, seed: int, per_class: int | None = None
) -> dict[str, Any]:
    """Vanilla samples for every class: tokens.npz, images.npz, grid.png and stats.json."""
    device = setup_runtime(config)
    sc = config["sample"]
    params = SamplingParams(temperature=sc["temperature"], top_k=sc["top_k"], top_p=sc["top_p"], cfg_scale=sc["cfg_scale"])
    vq, gpt = load_pair(tokenizer, target)
    gpt.to(device)
    per_class = per_class or sc["per_class"]
    classes = gpt.config.num_classes
    labels = torch.arange(classes).repeat_interleave(per_class)
    gen = torch.Generator().manual_seed(seed)
    with child_run(config["results"], f"generate_vanilla_seed{seed}", stage="samples", params={"sample": sc, "per_class": per_class}, seed=seed) as run:
        chunks, seconds = [], 0.0
        for i in range(0, len(labels), sc["batch_size"]):
            res = vanilla_decode(gpt, labels[i : i + sc["batch_size"]].to(device), params, generator=gen)
            chunks.append(res.tokens.cpu())
            seconds += res.stats["seconds"]
        tokens = torch.cat(chunks)
        images = decode_to_images(vq, tokens)
        show = min(sc["grid_per_class"], per_class)
        pick = torch.cat([torch.arange(c * per_class, c * per_class + show) for c in range(classes)])
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_savez(out_dir / "tokens.npz", tokens=tokens.numpy().astype(np.int32), labels=labels.numpy())
        atomic_savez(out_dir / "images.npz", images=images.numpy(), labels=labels.numpy())
        save_grid(images[pick], out_dir / "grid.png", nrow=show)
        stats = {"method": "vanilla", "seed": seed, "images": len(labels), "batch_size": sc["batch_size"],
                 "seconds": seconds, "seconds_per_image": seconds / len(labels), "sampling": params.to_dict()}
        atomic_write_json(out_dir / "stats.json", stats)
        run.metrics(stats)
        run.artifact(out_dir / "grid.png")
        run.artifact(out_dir / "stats.json")
    return stats


def evaluate_job(config: dict[str, Any], samples_dir: Path, judge_path: Path, out: Path) -> dict[str, Any]:
    """In-domain quality of a sample set: judge accuracy, FID and KID against the test split."""
    from cascade_sd.metrics.quality import in_domain_fid_kid, judge_accuracy

    setup_runtime(config)
    judge, _ = load_judge(judge_path)
    judge.eval()
    data = np.load(samples_dir / "images.npz")
    fake, labels = torch.from_numpy(data["images"]), torch.from_numpy(data["labels"])
    real = _images(config, "test").images
    stats = json.loads((samples_dir / "stats.json").read_text())
    with child_run(config["results"], f"evaluate_{samples_dir.name}", stage="samples", params={"samples": str(samples_dir)}, seed=stats.get("seed")) as run:
        quality = {"judge_accuracy": judge_accuracy(judge, fake, labels), "samples": len(labels), "reference_images": len(real)}
        # KID subsets of half the smaller set, so its spread over subsets is informative.
        subset = max(2, min(len(real), len(fake)) // 2)
        quality |= in_domain_fid_kid(judge, real, fake, kid_subset_size=subset, seed=config["seed"])
        quality |= {"label": "in-domain (judge features), not comparable with Inception FID", "samples_dir": str(samples_dir),
                    "seed": stats.get("seed"), "method": stats.get("method"), "seconds_per_image": stats.get("seconds_per_image")}
        atomic_write_json(out, quality)
        run.metrics(quality)
        run.artifact(out)
    return quality


def summarize(tokenizer: Path, target: Path, judge: Path, evals: list[Path], out: Path) -> str:
    """Markdown summary of the built-in models and the evaluated sample sets."""
    tok, tgt, jdg = (json.loads(Path(p).read_text()) for p in (tokenizer, target, judge))
    lines = [
        "# cascade-sd summary",
        "",
        "| model | metric | value |",
        "|---|---|---|",
        f"| tokenizer | test PSNR (dB) | {tok['test_psnr_db']:.2f} |",
        f"| tokenizer | codebook usage (test) | {tok['test_codebook_usage']:.3f} |",
        f"| target | test NLL (bits/token, conditional) | {tgt['test_nll_bits']:.3f} |",
        f"| target | parameters | {tgt['parameters']:,} |",
        f"| judge | test accuracy | {jdg['test_accuracy']:.4f} |",
        *(f"| {name} | training steps (wall time) | {m['steps']} ({m['stage_seconds']:.0f} s) |"
          for name, m in (("tokenizer", tok), ("target", tgt), ("judge", jdg))),
        "",
        *(f"**{name} was trained in wall-clock mode (max_seconds): {m['steps']} of {m['planned_steps']} steps; "
          "its results depend on machine load.**\n" for name, m in (("tokenizer", tok), ("target", tgt), ("judge", jdg))
          if m.get("wall_clock_limited")),
        "| method | seed | samples | s/image | judge accuracy | FID (in-domain) | KID (in-domain) |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in evals:
        q = json.loads(Path(path).read_text())
        lines.append(
            f"| {q['method']} | {q['seed']} | {q['samples']} | {q['seconds_per_image']:.4f} | {q['judge_accuracy']:.3f} "
            f"| {q['fid_in_domain']:.3f} | {q['kid_in_domain_mean']:.4f} ± {q['kid_in_domain_std']:.4f} |"
        )
    text = "\n".join(lines) + "\n"
    from cascade_sd.io import atomic_write_text

    atomic_write_text(out, text)
    return text


def distill_job(config: dict[str, Any], target_path: Path, out: Path, conditions: Any = None) -> dict[str, Any]:
    """Self-distillation data for the drafters: target samples (CFG as configured) and their features.

    ``conditions``: the user's labels or ``Captions`` (t2i) to distil on, each ``distill_per_class`` times;
    default every class of a class-conditional target.
    """
    from cascade_sd.train.drafter import distill_data, save_distill

    device = setup_runtime(config, training=True)
    dc, sc = config["drafter"], config["sample"]
    params = SamplingParams(temperature=sc["temperature"], top_k=sc["top_k"], top_p=sc["top_p"], cfg_scale=sc["cfg_scale"])
    target, _ = load_gpt(target_path)
    with child_run(config["results"], "distill", stage="models", params={"drafter": dc, "sample": sc}, seed=config["seed"]) as run:
        start = time.perf_counter()
        data = distill_data(target.to(device), dc["distill_per_class"], params, seed=config["seed"] + 1,
                            batch_size=dc["distill_batch_size"], with_layers=True, conditions=conditions)
        save_distill(out, data)
        info = {"sequences": data.n_sequences, "streams": data.n_streams, "seconds": time.perf_counter() - start}
        run.metrics(info)
    return info


def train_drafter_job(
    config: dict[str, Any], arch: str, target_path: Path, distill: Path, out: Path, metrics_out: Path,
    *, redundancy_weight: float = 1.0,
) -> dict[str, Any]:
    """Train an ``arch`` drafter on the cached self-distill data; reports agreement and chain τ."""
    from cascade_sd.models.drafters import save_drafter
    from cascade_sd.train.drafter import load_distill, train_drafter

    device = setup_runtime(config, training=True)
    dc = config["drafter"]
    target, ckpt = load_gpt(target_path)
    data = load_distill(distill, expect_target_hash=ckpt.hash)
    name = f"train_drafter_{arch}" + ("" if redundancy_weight == 1.0 else f"_rw{redundancy_weight:g}")
    steps, expected = per_arch(dc["steps"], arch), per_arch(dc["expected_seconds"], arch)
    with child_run(config["results"], name, stage="models", params={"drafter": dc, "arch": arch, "redundancy_weight": redundancy_weight},
                   seed=config["seed"]) as run:
        clock = StageClock(name.removeprefix("train_"), steps, expected, dc["max_seconds"])
        drafter, metrics = train_drafter(
            target.to(device), data, arch, steps=steps, batch_size=dc["batch_size"], lr=dc["lr"],
            seed=config["seed"], max_seconds=dc["max_seconds"], unroll=dc["unroll"] if arch == "eagle3" else 1,
            redundancy_weight=redundancy_weight, redundancy_threshold=dc["redundancy_threshold"],
            log_every=clock.log_every(50), on_log=clock.on_log(_log_progress(run), every=50),
        )
        metrics = stage_done(run, metrics, clock, metrics["steps"]) | {"arch": arch, "redundancy_weight": redundancy_weight}
        metrics["checkpoint_hash"] = save_drafter(out, drafter.cpu(), extra={"metrics": metrics, "target_hash": ckpt.hash})
        atomic_write_json(metrics_out, metrics)
        run.metrics(metrics)
        run.artifact(metrics_out)
    return metrics
