"""Training loop for the in-domain judge (DESIGN 2): seeded AdamW + one-cycle schedule, random ±2 px shifts.

Training runs in channels-last memory format (about 1.5× faster convolutions on CPU); the returned
judge is converted back to the default format. Measured with the defaults on Fashion-MNIST, 2 CPU
threads, idle machine: 91.6% test accuracy in about 60 s (1876 steps).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from cascade_sd.data.datasets import ImageSet, to_model_range
from cascade_sd.errors import ConfigError, DataError, check_range
from cascade_sd.metrics.quality import judge_accuracy
from cascade_sd.models.judge import Judge, JudgeConfig

MAX_SHIFT = 2


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = MAX_SHIFT) -> torch.Tensor:
    """Translate each image [B, C, H, W] by an independent integer offset in [-max_shift, max_shift], filling with -1."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(b)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]


def judge_steps(n: int, epochs: float, batch_size: int) -> int:
    """Optimiser steps of ``epochs`` passes over ``n`` images (the judge's stopping rule)."""
    return max(1, math.ceil(epochs * math.ceil(n / batch_size)))


def train_judge(
    train: ImageSet,
    test: ImageSet,
    config: JudgeConfig,
    *,
    epochs: float = 4.0,
    batch_size: int = 128,
    lr: float = 5e-3,
    seed: int = 0,
    max_seconds: float | None = None,
    augment: bool = True,
    weight_decay: float = 1e-4,
    on_log: Callable[[int, dict], None] | None = None,
) -> tuple[Judge, dict[str, Any]]:
    """Train a judge on ``train`` and report its ``test`` accuracy; same seed + data → same weights on CPU.

    ``max_seconds`` caps the wall time (the run then stops early and says so in the metrics);
    ``on_log(step, {"loss": ...})`` is called after every step.
    """
    config.validate()
    check_range("judge.epochs", epochs, 0.0, lo_open=True)
    check_range("judge.batch_size", batch_size, 1)
    check_range("judge.lr", lr, 0.0, lo_open=True)
    check_range("judge.weight_decay", weight_decay, 0.0)
    if max_seconds is not None:
        check_range("judge.max_seconds", max_seconds, 0.0, lo_open=True)
    if train.num_classes != config.num_classes:
        raise ConfigError(
            f"judge.num_classes={config.num_classes} does not match the data ({train.source} has {train.num_classes} classes)"
        )
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"judge training needs non-empty train and test sets, got {len(train)} and {len(test)}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        judge = Judge(config).to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(seed)
    x_all = to_model_range(train.images)
    y_all = train.labels
    n = x_all.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = judge_steps(n, epochs, batch_size)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=0.2)

    judge.train()
    start, cpu_start = time.perf_counter(), time.process_time()
    step, loss_sum, correct, seen, stopped_early = 0, 0.0, 0, 0, False
    while step < total_steps and not stopped_early:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, batch_size):
            if step >= total_steps:
                break
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                stopped_early = True
                break
            idx = order[i : i + batch_size]
            x, y = x_all[idx], y_all[idx]
            if augment:
                x = random_shift(x, generator)
            logits = judge(x.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            loss_sum += float(loss.detach()) * y.shape[0]
            correct += int((logits.argmax(dim=1) == y).sum())
            seen += y.shape[0]
            if on_log is not None:
                on_log(step, {"loss": float(loss.detach())})
    train_seconds, train_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    judge = judge.to(memory_format=torch.contiguous_format).eval()
    metrics = {
        "test_accuracy": judge_accuracy(judge, test.images, test.labels),
        "train_accuracy_running": correct / max(seen, 1),
        "train_loss_running": loss_sum / max(seen, 1),
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "steps": step,
        "planned_steps": total_steps,
        "epochs_completed": step / steps_per_epoch,
        "stopped_early": stopped_early,
        "train_examples": n,
        "test_examples": len(test),
    }
    return judge, metrics
