"""Vanilla and speculative (CSpD) decoding of continuous tokens (DESIGN 5; arXiv 2411.11925).

CSpD round, per image row with n tokens committed:
1. the draft model proposes γ tokens, drawing and keeping each token's head noise;
2. one target forward over [input n, drafts 1..γ] gives the conditions of tokens n..n+γ; the
   target head runs on the drafts' noise (aligned trajectories), so each position has a pair of
   last-step Gaussians (p, q) given the same earlier noise;
3. ``verify_drafts`` keeps drafts with prob. min(1, p/q) and redraws the first rejected one from
   [p − q]_+; if every considered draft is kept, one more token comes from the target (fresh noise).
Given the shared earlier noise both laws are Gaussian, the step reproduces the target's last-step
Gaussian exactly, and the shared noise is drawn as the target's sampler would draw it: so
with ``ratio_temperature`` 1 the output has the target sampler's law (the paper treats the last
step as a Gaussian approximation; conditioned on the shared noise it is exact). The first
``prefill`` fraction of tokens is decoded by the target alone.
Batches keep per-row positions (rows advance independently; finished rows ride along as padding).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cascade_sd.continuous.model import ContinuousAR, check_pair
from cascade_sd.continuous.step import GaussianLaw, check_ratio_temperature, verify_drafts
from cascade_sd.decoding.vanilla import DecodeResult
from cascade_sd.errors import ConfigError, check_int, check_range
from cascade_sd.metrics.speed import RoundStats


@dataclass(frozen=True)
class ContinuousSampling:
    """Sampling settings shared by target and draft: CFG scale on the head (MAR) and noise temperature."""

    cfg_scale: float = 1.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_range("cfg_scale", float(self.cfg_scale), 1.0)
        check_range("temperature", float(self.temperature), 0.0, lo_open=True)

    @property
    def uses_cfg(self) -> bool:
        """Whether the null-class stream is run (cfg_scale > 1)."""
        return self.cfg_scale > 1.0


def check_cspd_params(gamma: object, prefill: object, ratio_temperature: object = 1.0) -> None:
    """One-line errors for γ < 1, a pre-fill ratio outside [0, 1) or a ratio temperature < 1."""
    check_int("gamma", gamma, 1)
    if not isinstance(prefill, (int, float)) or isinstance(prefill, bool):
        raise ConfigError(f"prefill={prefill!r} is not allowed; expected a number in [0, 1)")
    check_range("prefill", float(prefill), 0.0, 1.0, hi_open=True)
    check_ratio_temperature(float(ratio_temperature))


def _check_labels(model: ContinuousAR, labels: torch.Tensor) -> torch.Tensor:
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    bad = labels[(labels < 0) | (labels >= model.config.num_classes)]
    if bad.numel():
        raise ConfigError(f"labels: {int(bad[0])} is out of range; allowed 0..{model.config.num_classes - 1}")
    if not labels.numel():
        raise ConfigError("labels: at least one label is needed")
    return labels


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Streams:
    """One model's view of a batch: CFG stream labels and input embeddings at per-row positions."""

    def __init__(self, model: ContinuousAR, labels: torch.Tensor, params: ContinuousSampling, cache_len: int) -> None:
        self.model, self.params = model, params
        null = torch.full_like(labels, model.null_class)
        self.labels = torch.cat([labels, null]) if params.uses_cfg else labels
        self.copies = 2 if params.uses_cfg else 1
        model.setup_cache(self.labels.shape[0], cache_len)
        self.slots = torch.arange(cache_len, device=labels.device)

    def forward(self, seq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states [copies, B, T, dim] at ``positions`` [B, T]; the input at position p is the class
        token (p = 0) or token p−1 of ``seq`` [B, L, d]. Writes the inputs' k/v at slot = position."""
        b = seq.shape[0]
        prev = (positions - 1).clamp(min=0)
        tokens = seq.gather(1, prev[..., None].expand(*prev.shape, seq.shape[-1]))
        x = self.model.tok_in(tokens.repeat(self.copies, 1, 1))
        cls = self.model.cls_embedding(self.labels).expand_as(x)
        x = torch.where((positions == 0).repeat(self.copies, 1)[..., None], cls, x)
        pos = positions.repeat(self.copies, 1)
        mask = self.slots[None, None, :] <= pos[..., None]
        z = self.model.step(x, pos, mask)
        return z.view(self.copies, b, *z.shape[1:])

    def law(self, z: torch.Tensor, noise: torch.Tensor) -> GaussianLaw:
        """Last-step law of the head for conditions z [copies, B, T, dim] and noise [V, B, T, d]."""
        b, t = z.shape[1], z.shape[2]
        flat = z.reshape(self.copies, b * t, z.shape[-1])
        law = self.model.head.last_step_law(
            flat[0], noise.reshape(noise.shape[0], b * t, -1), uncond=flat[1] if self.copies == 2 else None,
            cfg_scale=self.params.cfg_scale, temperature=self.params.temperature)
        return GaussianLaw(law.mean.view(b, t, -1), law.std.expand_as(law.mean).view(b, t, -1))


def _noise(model: ContinuousAR, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """Standard-normal head noise [V, *shape, d] for one token per entry of ``shape``."""
    device = model.tok_in.weight.device
    return torch.randn((model.head.noise_vectors, *shape, model.config.latent_dim), generator=generator,
                       device=device)


@torch.no_grad()
def _vanilla_tokens(streams: _Streams, seq: torch.Tensor, start: int, stop: int,
                    generator: torch.Generator | None, stats: RoundStats | None = None) -> None:
    """Fill tokens start..stop-1 of ``seq`` one target forward at a time."""
    b = seq.shape[0]
    for i in range(start, stop):
        t0 = time.perf_counter()
        z = streams.forward(seq, torch.full((b, 1), i, device=seq.device))
        noise = _noise(streams.model, (b, 1), generator)
        seq[:, i] = streams.law(z, noise).sample(noise[-1])[:, 0]
        if stats is not None:
            stats.add_model("target", time.perf_counter() - t0)


@torch.no_grad()
def vanilla_continuous(model: ContinuousAR, labels: torch.Tensor, params: ContinuousSampling, *,
                       generator: torch.Generator | None = None) -> DecodeResult:
    """Plain AR decoding: one target forward and one head sampling per token (the speedup baseline)."""
    labels = _check_labels(model, labels)
    device = model.tok_in.weight.device
    n = model.config.tokens
    _sync(device)
    start = time.perf_counter()
    streams = _Streams(model, labels.to(device), params, 1 + n)
    seq = torch.zeros(labels.shape[0], n, model.config.latent_dim, device=device)
    _vanilla_tokens(streams, seq, 0, n, generator)
    _sync(device)
    seconds = time.perf_counter() - start
    return DecodeResult(tokens=seq, stats={"target_forwards": n, "seconds": seconds,
                                           "seconds_per_image": seconds / labels.shape[0],
                                           "tokens_per_second": labels.shape[0] * n / seconds})


@torch.no_grad()
def cspd_decode(target: ContinuousAR, draft: ContinuousAR, labels: torch.Tensor, params: ContinuousSampling, *,
                gamma: int = 4, prefill: float = 0.15, ratio_temperature: float = 1.0, max_tries: int = 4096,
                generator: torch.Generator | None = None) -> DecodeResult:
    """Continuous speculative decoding; ``.stats`` carries τ, the accepted-length histogram, acceptance
    rate, forwards, the residual sampler's mean tries and wall times (DESIGN 3, 5)."""
    check_cspd_params(gamma, prefill, ratio_temperature)
    check_pair(target, draft)
    labels = _check_labels(target, labels)
    device = target.tok_in.weight.device
    n, d, b = target.config.tokens, target.config.latent_dim, labels.shape[0]
    n_pre = math.ceil(prefill * n)
    rows = torch.arange(b, device=device)
    stats = RoundStats()
    tries: list[np.ndarray] = []
    drafts_seen = drafts_kept = capped = 0
    _sync(device)
    start = time.perf_counter()
    labels = labels.to(device)
    t_streams = _Streams(target, labels, params, 1 + n + gamma)
    d_streams = _Streams(draft, labels, params, 1 + n + gamma)
    seq = torch.zeros(b, n + gamma, d, device=device)  # committed tokens, then scratch for drafts
    # Target-only pre-fill; the draft then reads the pre-filled inputs in one pass.
    _vanilla_tokens(t_streams, seq, 0, n_pre, generator, stats)
    if n_pre > 1:
        d_streams.forward(seq, torch.arange(n_pre - 1, device=device).expand(b, -1))
    length = torch.full((b,), n_pre, device=device)
    steps = torch.arange(gamma + 1, device=device)
    while bool((length < n).any()):
        _sync(device)
        round_start = time.perf_counter()
        stats.begin_round()
        active = length < n
        limit = torch.where(active, (n - length).clamp(max=gamma), torch.zeros_like(length))
        # 1. Draft γ tokens into the scratch tail of ``seq``; the first call (re)reads input length-1,
        #    which the draft has not seen when the previous round kept all its drafts.
        noise = _noise(target, (b, gamma + 1), generator)
        q_mean = torch.empty(b, gamma, d, device=device)
        q_std = torch.empty(b, gamma, d, device=device)
        t0 = time.perf_counter()
        pos = torch.stack([(length - 1).clamp(min=0), length], 1)
        for j in range(gamma):
            q = d_streams.law(d_streams.forward(seq, pos)[:, :, -1:], noise[:, :, j : j + 1])
            q_mean[:, j], q_std[:, j] = q.mean[:, 0], q.std[:, 0]
            seq[rows, length + j] = q.sample(noise[-1, :, j : j + 1])[:, 0]
            pos = (length + j + 1)[:, None]
        _sync(device)
        stats.add_model("drafter", time.perf_counter() - t0, forwards=gamma)
        drafts = seq[rows[:, None], length[:, None] + steps[:gamma]]
        # 2. One target forward over inputs length..length+γ, its head on the drafts' noise.
        t0 = time.perf_counter()
        p = t_streams.law(t_streams.forward(seq, length[:, None] + steps), noise)
        _sync(device)
        stats.add_model("target", time.perf_counter() - t0)
        # 3. Accept/resample; a bonus token from the target where every considered draft was kept.
        out = verify_drafts(drafts, GaussianLaw(p.mean[:, :gamma], p.std[:, :gamma]), GaussianLaw(q_mean, q_std),
                            limit, generator, ratio_temperature=ratio_temperature, max_tries=max_tries)
        k = out.accepted
        fresh = torch.randn((b, d), generator=generator, device=device)
        bonus = GaussianLaw(p.mean[rows, k], p.std[rows, k]).sample(fresh)
        last = length + k
        write = active & (last < n)
        seq[rows[write], last[write]] = torch.where(out.rejected[:, None], out.correction, bonus)[write]
        commit = k + write.long()
        stats.record_round(k[active], time.perf_counter() - round_start, computed_rows=b)
        drafts_seen += int((k + out.rejected.long())[active].sum())
        drafts_kept += int(k[active].sum())
        tries.append(out.tries[out.rejected & active].cpu().numpy())
        capped += int((out.capped & active).sum())
        length = length + commit
    _sync(device)
    seconds = time.perf_counter() - start
    summary = stats.summary(seconds=seconds, batch=b, tokens_per_image=n)
    all_tries = np.concatenate(tries) if tries else np.zeros(0)
    summary.update({
        "gamma": gamma, "prefill": prefill, "prefill_tokens": n_pre, "ratio_temperature": ratio_temperature,
        "acceptance_rate": drafts_kept / drafts_seen if drafts_seen else float("nan"),
        "rejections": int(all_tries.size),
        "mean_tries": float(all_tries.mean()) if all_tries.size else float("nan"),
        "max_tries_seen": int(all_tries.max()) if all_tries.size else 0,
        "capped_resamples": capped,
    })
    return DecodeResult(tokens=seq[:, :n].contiguous(), stats=summary)


def pool_round_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool τ, the histogram, acceptance (kept / (kept + rejected) drafts) and residual tries over decode
    calls or seeds, weighted by their round and rejection counts; vanilla parts have no rounds."""
    rounds = sum(p.get("rounds", 0) for p in parts)
    if not rounds:
        return {"tau": 1.0, "rounds": 0}
    tau_rounds = sum(p.get("tau", p.get("mean_accepted_length")) * p["rounds"] for p in parts)
    kept, rejections = tau_rounds - rounds, sum(p["rejections"] for p in parts)
    hist = np.zeros(max(len(p["accept_histogram"]) for p in parts), dtype=np.int64)
    for p in parts:
        hist[: len(p["accept_histogram"])] += p["accept_histogram"]
    tries = sum(p["mean_tries"] * p["rejections"] for p in parts if p["rejections"])
    return {"tau": tau_rounds / rounds, "rounds": rounds, "accept_histogram": hist.tolist(),
            "acceptance_rate": kept / (kept + rejections) if kept + rejections else float("nan"),
            "rejections": rejections, "mean_tries": tries / rejections if rejections else float("nan"),
            "capped_resamples": sum(p["capped_resamples"] for p in parts), "prefill_tokens": parts[0]["prefill_tokens"]}
