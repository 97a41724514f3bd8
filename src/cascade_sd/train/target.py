"""Training of the target GPT on cached VQ codes: next-token cross entropy with CFG class dropout.

Follows LlamaGen's c2i recipe (AdamW betas (0.9, 0.95), weight decay only on matrices, grad clip 1.0,
class dropout 0.1) with a linear warm-up and cosine decay added for short CPU budgets.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from cascade_sd.errors import ConfigError, DataError, check_int, check_range
from cascade_sd.models.gpt import GPT, GPTConfig

# Steps timed (after the first, warm-up step) before the cosine horizon is estimated from max_seconds.
_HORIZON_PROBE_STEPS = 10
# The cosine decays to this fraction of the peak learning rate.
_MIN_LR_RATIO = 0.1


def _check_codes(name: str, codes: torch.Tensor, labels: torch.Tensor, config: GPTConfig) -> None:
    """Raise DataError unless codes [N, block_size] / labels [N] fit the model's vocabulary and classes."""
    if codes.dim() != 2 or codes.shape[1] != config.block_size or codes.shape[0] == 0:
        raise DataError(f"{name}_codes must be [N>0, {config.block_size}], got {tuple(codes.shape)}")
    if labels.shape != (codes.shape[0],):
        raise DataError(f"{name}_labels must be [{codes.shape[0]}], got {tuple(labels.shape)}")
    if codes.dtype != torch.long or labels.dtype != torch.long:
        raise DataError(f"{name} codes and labels must be int64, got {codes.dtype} and {labels.dtype}")
    if int(codes.min()) < 0 or int(codes.max()) >= config.vocab_size:
        raise DataError(f"{name}_codes hold values outside [0, vocab_size={config.vocab_size})")
    if int(labels.min()) < 0 or int(labels.max()) >= config.num_classes:
        raise DataError(f"{name}_labels hold values outside [0, num_classes={config.num_classes})")


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless index batches drawn from successive seeded permutations of range(n) (epochs without gaps)."""
    buffer = torch.empty(0, dtype=torch.long)
    while True:
        while buffer.numel() < batch_size:
            buffer = torch.cat([buffer, torch.randperm(n, generator=generator)])
        yield buffer[:batch_size]
        buffer = buffer[batch_size:]


def lr_at(step: int, lr: float, warmup_steps: int, horizon: int) -> float:
    """Learning rate for 0-based ``step``: linear warm-up, then cosine to _MIN_LR_RATIO·lr at ``horizon``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(horizon - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return lr * (_MIN_LR_RATIO + (1 - _MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate_nll_bits(
    model: GPT, codes: torch.Tensor, labels: torch.Tensor, batch_size: int, *, unconditional: bool = False
) -> float:
    """Mean next-token NLL in bits per token over ``codes``, conditioned on labels or on the null class."""
    was_training = model.training
    model.eval()
    device = model.output.weight.device
    total, count = 0.0, 0
    for start in range(0, codes.shape[0], batch_size):
        x = codes[start : start + batch_size].to(device)
        cond = model.null_cond(x.shape[0]) if unconditional else labels[start : start + batch_size].to(device)
        logits = model(cond, x[:, :-1]).logits
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1), reduction="sum"))
        count += x.numel()
    model.train(was_training)
    return total / count / math.log(2)


def train_target(
    train_codes: torch.Tensor,
    train_labels: torch.Tensor,
    test_codes: torch.Tensor,
    test_labels: torch.Tensor,
    config: GPTConfig,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int,
    weight_decay: float,
    seed: int,
    max_seconds: float | None,
    eval_batches: int,
    on_log: Callable[[int, dict], None] | None,
    log_every: int = 50,
    device: torch.device | str = "cpu",
) -> tuple[GPT, dict]:
    """Train a c2i GPT from scratch on token grids; return it (eval mode) and its metrics.

    Stops after ``steps`` or when ``max_seconds`` of training have passed. The cosine horizon is
    ``steps``, or, with ``max_seconds``, min(steps, the step count the speed of steps 2..11 predicts);
    past the horizon the rate stays at its floor. Deterministic for a given seed when ``max_seconds``
    is None (with it, the horizon and stopping point depend on measured speed). The test NLL uses the
    first ``eval_batches * batch_size`` test grids. Sets no thread counts; the caller does.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("eval_batches", eval_batches),
                        ("log_every", log_every)):
        check_int(name, value, 1)
    check_int("warmup_steps", warmup_steps, 0)
    check_range("lr", lr, 0.0, lo_open=True)
    check_range("weight_decay", weight_decay, 0.0)
    if max_seconds is not None:
        check_range("max_seconds", max_seconds, 0.0, lo_open=True)
    if config.model_type != "c2i":
        raise ConfigError(f"model_type={config.model_type!r} is not allowed for train_target; allowed: 'c2i'")
    _check_codes("train", train_codes, train_labels, config)
    _check_codes("test", test_codes, test_labels, config)

    device = torch.device(device)
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        # Global RNG (init, dropout) and the data generator both flow from ``seed``; the caller's state is restored.
        torch.manual_seed(seed)
        model = GPT(config).to(device)
        data_gen = torch.Generator().manual_seed(seed)
        drop_gen = torch.Generator(device=device).manual_seed(seed + 1)
        # LlamaGen's configure_optimizers: decay 2-D+ tensors (matrices, embeddings), not norms.
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
        model.train()

        horizon = steps
        tokens_per_step = batch_size * config.block_size
        losses: list[float] = []
        start = time.perf_counter()
        after_warmup = start
        stopped_by = "steps"
        done = 0
        batches = _batches(train_codes.shape[0], batch_size, data_gen)
        while done < steps:
            rate = lr_at(done, lr, warmup_steps, horizon)
            for group in optimizer.param_groups:
                group["lr"] = rate
            idx = next(batches)
            codes = train_codes[idx].to(device)
            labels = model.drop_labels(train_labels[idx].to(device), generator=drop_gen)
            logits = model(labels, codes[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            done += 1
            now = time.perf_counter()
            if done == 1:
                after_warmup = now
            if max_seconds is not None and done == 1 + _HORIZON_PROBE_STEPS:
                per_step = (now - after_warmup) / _HORIZON_PROBE_STEPS
                horizon = min(steps, max(done, int(max_seconds / per_step)))
            if on_log is not None and (done % log_every == 0 or done == steps):
                speed = (done - 1) * tokens_per_step / (now - after_warmup) if done > 1 else 0.0
                on_log(done, {"loss": losses[-1], "lr": rate, "seconds": now - start, "tokens_per_s": speed})
            if max_seconds is not None and now - start >= max_seconds:
                stopped_by = "max_seconds"
                break
        seconds = time.perf_counter() - start
        timed_seconds = seconds - (after_warmup - start)

    model.eval()
    n_eval = min(test_codes.shape[0], eval_batches * batch_size)
    test_x, test_y = test_codes[:n_eval], test_labels[:n_eval]
    tail = losses[-min(len(losses), 50):]
    metrics = {
        "test_nll_bits": evaluate_nll_bits(model, test_x, test_y, batch_size),
        "test_nll_bits_uncond": evaluate_nll_bits(model, test_x, test_y, batch_size, unconditional=True),
        "train_loss_bits": sum(tail) / len(tail) / math.log(2),
        # Warm-up (the first step) excluded when there is more than one step.
        "train_tokens_per_s": (
            (done - 1) * tokens_per_step / timed_seconds if done > 1 else tokens_per_step / seconds
        ),
        "steps": done,
        "seconds": seconds,
        "lr_horizon": horizon,
        "stopped_by": stopped_by,
        "eval_tokens": n_eval * config.block_size,
        "params": sum(p.numel() for p in model.parameters()),
    }
    return model, metrics
