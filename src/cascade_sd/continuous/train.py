"""Training of the built-in continuous autoencoder and of continuous AR models (target and draft).

Same conventions as the discrete trainers: AdamW, linear warm-up + cosine (``train.target.lr_at``),
time limits, seeded data order; a draft model is trained the same way as the target, only smaller
(the CSpD paper pairs MAR-B with MAR-L, both trained on the data).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from cascade_sd.continuous.model import AEConfig, ContinuousAE, ContinuousAR, ContinuousConfig
from cascade_sd.errors import DataError, check_int, check_range
from cascade_sd.train.target import _batches, lr_at

_BATCH = 64  # inference batch for encoding/evaluation on CPU (activations stay in cache)


def _unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def _check_budget(steps: int, batch_size: int, lr: float, max_seconds: float | None) -> None:
    check_int("steps", steps, 1)
    check_int("batch_size", batch_size, 1)
    check_range("lr", lr, 0.0, lo_open=True)
    if max_seconds is not None:
        check_range("max_seconds", max_seconds, 0.0, lo_open=True)


@torch.no_grad()
def encode_images(model: ContinuousAE, images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, 1, H, W] → standardised latent tokens [N, grid², d]."""
    return torch.cat([model.encode(_unit(images[i : i + _BATCH])) for i in range(0, images.shape[0], _BATCH)])


@torch.no_grad()
def decode_latents(model: ContinuousAE, tokens: torch.Tensor) -> torch.Tensor:
    """Latent tokens [N, grid², d] → uint8 images [N, 1, H, W]."""
    out = [model.decode(tokens[i : i + _BATCH]) for i in range(0, tokens.shape[0], _BATCH)]
    return ((torch.cat(out) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def reconstruction_psnr(model: ContinuousAE, images: torch.Tensor) -> float:
    """Mean test PSNR (dB, pixels in [0, 1]) of encode → decode."""
    recon = decode_latents(model, encode_images(model, images)).float() / 255
    mse = (recon - images.float() / 255).square().flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def train_autoencoder(train_images: torch.Tensor, test_images: torch.Tensor, config: AEConfig, *, steps: int,
                      batch_size: int, lr: float, seed: int, max_seconds: float | None = None,
                      on_log: Callable[[int, dict], None] | None = None, log_every: int = 100
                      ) -> tuple[ContinuousAE, dict]:
    """MSE autoencoder; the decoder sees latents with Gaussian noise of ``latent_noise`` × their std, so
    it tolerates the last-step noise of the AR model's sampler. Stores per-channel latent statistics."""
    _check_budget(steps, batch_size, lr, max_seconds)
    expected = (1, config.image_size, config.image_size)
    for name, images in (("train_images", train_images), ("test_images", test_images)):
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != expected or not images.shape[0]:
            raise DataError(f"{name} must be uint8 [N>0, {', '.join(map(str, expected))}], got "
                            f"{images.dtype} {tuple(images.shape)}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ContinuousAE(config)
        gen = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=1e-4)
        batches = _batches(train_images.shape[0], batch_size, gen)
        start, done = time.perf_counter(), 0
        model.train()
        while done < steps and (max_seconds is None or time.perf_counter() - start < max_seconds):
            x = _unit(train_images[next(batches)])
            z = model.encode_map(x)
            z = z + config.latent_noise * z.detach().std(dim=(0, 2, 3), keepdim=True) * torch.randn(
                z.shape, generator=gen)
            loss = F.mse_loss(model.decode_map(z), x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if on_log is not None and done % log_every == 0:
                on_log(done, {"loss": loss.item(), "seconds": time.perf_counter() - start})
        seconds = time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            sample = train_images[torch.randperm(train_images.shape[0], generator=gen)[:2048]]
            z = torch.cat([model.encode_map(_unit(sample[i : i + _BATCH])) for i in range(0, len(sample), _BATCH)])
            model.latent_mean.copy_(z.mean(dim=(0, 2, 3)))
            model.latent_std.copy_(z.std(dim=(0, 2, 3)).clamp_min(1e-6))
    return model, {"test_psnr_db": reconstruction_psnr(model, test_images), "steps": done, "seconds": seconds,
                   "params": sum(p.numel() for p in model.parameters())}


def _check_latents(name: str, latents: torch.Tensor, labels: torch.Tensor, config: ContinuousConfig) -> None:
    expected = (config.tokens, config.latent_dim)
    if latents.dim() != 3 or tuple(latents.shape[1:]) != expected or not latents.shape[0]:
        raise DataError(f"{name} latents must be [N>0, {expected[0]}, {expected[1]}] (the model's grid and "
                        f"latent size), got {tuple(latents.shape)}")
    if labels.shape != (latents.shape[0],) or int(labels.min()) < 0 or int(labels.max()) >= config.num_classes:
        raise DataError(f"{name} labels must be [{latents.shape[0]}] in 0..{config.num_classes - 1}")


@torch.no_grad()
def evaluate_head_loss(model: ContinuousAR, latents: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> float:
    """Mean head loss on held-out latents (seeded noise): ε-MSE for diffusion heads, NLL/dim for Gaussian."""
    gen = torch.Generator().manual_seed(seed)
    total = [float(model.loss(labels[i : i + _BATCH], latents[i : i + _BATCH], batch_mul=1, generator=gen))
             * min(_BATCH, latents.shape[0] - i) for i in range(0, latents.shape[0], _BATCH)]
    return sum(total) / latents.shape[0]


def train_continuous(train_latents: torch.Tensor, train_labels: torch.Tensor, test_latents: torch.Tensor,
                     test_labels: torch.Tensor, config: ContinuousConfig, *, steps: int, batch_size: int, lr: float,
                     warmup_steps: int, seed: int, max_seconds: float | None = None, batch_mul: int = 4,
                     weight_decay: float = 0.05, on_log: Callable[[int, dict], None] | None = None,
                     log_every: int = 50) -> tuple[ContinuousAR, dict]:
    """Train a class-conditional continuous AR model (class dropout for CFG); returns it in eval mode
    with its held-out head loss. The cosine horizon shrinks to the step count ``max_seconds`` allows."""
    _check_budget(steps, batch_size, lr, max_seconds)
    check_int("warmup_steps", warmup_steps, 0)
    check_int("batch_mul", batch_mul, 1)
    _check_latents("train", train_latents, train_labels, config)
    _check_latents("test", test_latents, test_labels, config)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ContinuousAR(config)
        gen = torch.Generator().manual_seed(seed)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                       {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
        batches = _batches(train_latents.shape[0], batch_size, gen)
        horizon, done, start = steps, 0, time.perf_counter()
        model.train()
        while done < steps and (max_seconds is None or time.perf_counter() - start < max_seconds):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(done, lr, warmup_steps, horizon)
            idx = next(batches)
            labels = train_labels[idx]
            labels = torch.where(torch.rand(labels.shape, generator=gen) < config.class_dropout_prob,
                                 torch.full_like(labels, model.null_class), labels)
            loss = model.loss(labels, train_latents[idx], batch_mul=batch_mul, generator=gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            done += 1
            if max_seconds is not None and done == 11:
                horizon = min(steps, max(done, int(max_seconds / ((time.perf_counter() - start) / done))))
            if on_log is not None and done % log_every == 0:
                on_log(done, {"loss": loss.item(), "seconds": time.perf_counter() - start})
        seconds = time.perf_counter() - start
    model.eval()
    n_eval = min(test_latents.shape[0], 1000)
    return model, {"test_head_loss": evaluate_head_loss(model, test_latents[:n_eval], test_labels[:n_eval], seed),
                   "steps": done, "seconds": seconds, "lr_horizon": horizon,
                   "tokens_per_s": done * batch_size * config.tokens / seconds if seconds > 0 else math.nan,
                   "params": sum(p.numel() for p in model.parameters())}
