"""Quality metrics (DESIGN 7), always in-domain: judge accuracy (fidelity), FID/KID on judge features,
and the percentile bootstrap used for every confidence interval.

The FID/KID here use the judge's penultimate features, not Inception: the numbers are only
comparable with other in-domain numbers from the same judge checkpoint.
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cascade_sd.errors import ConfigError, DataError, check_range
from cascade_sd.models.judge import Judge


def _check_images(name: str, images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise DataError(f"{name} must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")


def judge_input(judge: Judge, imgs: torch.Tensor) -> torch.Tensor:
    """Map uint8 [0, 255] (or float [0, 1]) images of any size/channels to the judge's input in [-1, 1]."""
    device = next(judge.parameters()).device
    x = imgs.to(device=device, dtype=torch.float32)
    if imgs.dtype == torch.uint8:
        x = x / 255.0
    x = x.mean(dim=1, keepdim=True).expand(-1, judge.config.in_channels, -1, -1)
    size = judge.config.image_size
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x * 2.0 - 1.0


@torch.no_grad()
def judge_correct(judge: Judge, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 500) -> torch.Tensor:
    """Bool [N]: whether the judge (eval mode, no grad) assigns each uint8 image [N, 1, 32, 32] to its label."""
    _check_images("images", images)
    if images.shape[0] == 0 or tuple(labels.shape) != (images.shape[0],):
        raise DataError(f"labels must be [N] with N = {images.shape[0]} > 0, got {tuple(labels.shape)}")
    was_training = judge.training
    judge.eval()
    try:
        out = []
        for start in range(0, images.shape[0], batch_size):
            logits = judge(judge_input(judge, images[start : start + batch_size]))
            out.append((logits.argmax(dim=1) == labels[start : start + batch_size].to(logits.device)).cpu())
    finally:
        judge.train(was_training)
    return torch.cat(out)


def judge_accuracy(judge: Judge, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 500) -> float:
    """Fraction of uint8 images [N, 1, 32, 32] the judge assigns to ``labels``."""
    return float(judge_correct(judge, images, labels, batch_size=batch_size).double().mean())


class JudgeFeatureExtractor(nn.Module):
    """Judge penultimate features as a torchmetrics FID/KID ``feature`` module.

    Accepts uint8 [B, C, H, W] in [0, 255] or float in [0, 1] (torchmetrics' ``normalize`` convention),
    of any channel count and size: channels are averaged and the image resized to the judge's input.
    Always runs the judge in eval mode without gradients (restoring its mode after) and returns
    float64 features; ``num_features`` spares torchmetrics its dummy forward pass.
    """

    def __init__(self, judge: Judge) -> None:
        super().__init__()
        self.judge = judge
        self.num_features = judge.config.feature_dim

    def train(self, mode: bool = True) -> "JudgeFeatureExtractor":
        """Record the mode without passing it to the judge (a metric's ``.train()`` must not touch its BatchNorm)."""
        self.training = mode
        return self

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """Features [B, num_features] (float64) of a batch of images."""
        was_training = self.judge.training
        self.judge.eval()
        try:
            return self.judge.features(judge_input(self.judge, imgs)).to(torch.float64)
        finally:
            self.judge.train(was_training)


def in_domain_fid_kid(
    judge: Judge,
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    kid_subset_size: int | None = None,
    kid_subsets: int = 100,
    seed: int = 0,
    batch_size: int = 500,
) -> dict[str, float]:
    """In-domain FID and KID between uint8 image sets on judge features; deterministic given ``seed``."""
    # Imported here: torchmetrics pulls in scipy.signal and friends, seconds of start-up for every CLI call.
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_images("real", real)
    _check_images("fake", fake)
    n, m = real.shape[0], fake.shape[0]
    if n < 2 or m < 2:
        raise DataError(f"in-domain FID/KID needs at least 2 real and 2 fake images, got {n} and {m}")
    subset = min(1000, n, m) if kid_subset_size is None else kid_subset_size
    check_range("kid_subset_size", subset, 2, min(n, m))
    check_range("kid_subsets", kid_subsets, 1)
    extractor = JudgeFeatureExtractor(judge)
    fid = FrechetInceptionDistance(feature=extractor)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        kid = KernelInceptionDistance(feature=extractor, subsets=kid_subsets, subset_size=subset)
    for images, is_real in ((real, True), (fake, False)):
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size]
            fid.update(batch, real=is_real)
            kid.update(batch, real=is_real)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {
        "fid_in_domain": float(fid.compute()),
        "kid_in_domain_mean": float(kid_mean),
        "kid_in_domain_std": float(kid_std),
    }


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    stat: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap: (stat(values), lower, upper) of a (1 − alpha) interval over resamples."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise DataError(f"bootstrap_ci needs a non-empty 1-D array of values, got shape {x.shape}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)):
        raise ConfigError(f"n_boot={n_boot!r} is not allowed; use a positive integer")
    check_range("n_boot", int(n_boot), 1)
    check_range("alpha", alpha, 0.0, 1.0, lo_open=True, hi_open=True)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(int(n_boot), x.size))
    boots = np.array([float(stat(x[row])) for row in idx])
    lo, hi = np.quantile(boots, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(stat(x)), float(lo), float(hi)


def judge_features(judge: Judge, images: torch.Tensor, *, batch_size: int = 500) -> np.ndarray:
    """Judge penultimate features [N, D] (float64) of uint8 images, as FID/KID use them."""
    _check_images("images", images)
    extractor = JudgeFeatureExtractor(judge)
    return torch.cat([extractor(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)]).cpu().numpy()


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(cov)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _frechet(mu_r: np.ndarray, cov_r: np.ndarray, root_r: np.ndarray, fake: np.ndarray) -> float:
    """FID against a reference given as (μ_r, Σ_r, Σ_r^½): tr((Σ_r Σ_f)^½) = Σ √eig(Σ_r^½ Σ_f Σ_r^½)."""
    mu_f, cov_f = fake.mean(0), np.cov(fake, rowvar=False)
    eig = np.linalg.eigvalsh(root_r @ cov_f @ root_r)
    return float(((mu_r - mu_f) ** 2).sum() + np.trace(cov_r) + np.trace(cov_f) - 2.0 * np.sqrt(np.clip(eig, 0, None)).sum())


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """FID between two feature sets: ‖μ_r − μ_f‖² + tr(Σ_r + Σ_f − 2(Σ_r Σ_f)^½) (float64)."""
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise DataError(f"FID needs at least 2 feature rows per set, got {real.shape[0]} and {fake.shape[0]}")
    cov_r = np.cov(real, rowvar=False)
    return _frechet(real.mean(0), cov_r, _psd_sqrt(cov_r), fake)


def fid_bootstrap_ci(real: np.ndarray, fake: np.ndarray, *, n_boot: int = 200, alpha: float = 0.05,
                     seed: int = 0) -> dict[str, float]:
    """FID at this sample size n, its bootstrap bias-corrected value and a basic-bootstrap interval.

    Resampling the generated set (reference fixed) with replacement shows FID's O(1/n) upward
    bias (duplicates make it larger still). The *basic* interval [2F − q_hi, 2F − q_lo] and the
    corrected value 2F − mean(F*) target the population FID, so they sit below the raw F; compare
    raw values only at equal n (the grid uses one n everywhere).
    """
    check_range("n_boot", n_boot, 1)
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise DataError(f"FID needs at least 2 feature rows per set, got {real.shape[0]} and {fake.shape[0]}")
    mu_r, cov_r = real.mean(0), np.cov(real, rowvar=False)
    root_r = _psd_sqrt(cov_r)
    rng = np.random.default_rng(seed)
    m = fake.shape[0]
    boots = np.array([_frechet(mu_r, cov_r, root_r, fake[rng.integers(0, m, m)]) for _ in range(n_boot)])
    raw = _frechet(mu_r, cov_r, root_r, fake)
    q_lo, q_hi = np.quantile(boots, [alpha / 2.0, 1.0 - alpha / 2.0])
    return {"fid": raw, "fid_corrected": float(2 * raw - boots.mean()), "lower": float(2 * raw - q_hi),
            "upper": float(2 * raw - q_lo)}


def _kid_terms(real: np.ndarray, fake: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Cubic-kernel (x·y/d + 1)³ pieces of KID: the real–real term, K_ff [m, m], K_rf column means [m]."""
    n, m, d = real.shape[0], fake.shape[0], real.shape[1]
    if n < 2 or m < 2:
        raise DataError(f"KID needs at least 2 feature rows per set, got {n} and {m}")
    k_rr = (real @ real.T / d + 1.0) ** 3
    rr = float((k_rr.sum() - np.trace(k_rr)) / (n * (n - 1)))
    return rr, (fake @ fake.T / d + 1.0) ** 3, ((real @ fake.T / d + 1.0) ** 3).mean(0)


def _kid(rr: float, k_ff: np.ndarray, rf: np.ndarray, idx: np.ndarray) -> float:
    """KID of the resample ``idx``; pairs of copies of one image are left out like the diagonal."""
    distinct = idx[:, None] != idx[None, :]
    return rr + float(k_ff[np.ix_(idx, idx)][distinct].mean()) - 2.0 * float(rf[idx].mean())


def kid_bootstrap_ci(real: np.ndarray, fake: np.ndarray, *, n_boot: int = 200, alpha: float = 0.05,
                     seed: int = 0) -> tuple[float, float, float]:
    """(KID, lower, upper): the unbiased MMD² with the cubic kernel, and a percentile bootstrap over
    the generated set with the reference fixed (pairs of copies of one image are excluded, so a
    resample stays unbiased)."""
    check_range("n_boot", n_boot, 1)
    rr, k_ff, rf = _kid_terms(real, fake)
    rng = np.random.default_rng(seed)
    m = fake.shape[0]
    boots = [_kid(rr, k_ff, rf, rng.integers(0, m, m)) for _ in range(n_boot)]
    lo, hi = np.quantile(boots, [alpha / 2.0, 1.0 - alpha / 2.0])
    return _kid(rr, k_ff, rf, np.arange(m)), float(lo), float(hi)
