"""The CSpD accept/resample step for continuous tokens (DESIGN 5; arXiv 2411.11925, Sec. 3).

Speculative sampling with densities: a drafted x ~ q is kept with probability min(1, p(x)/q(x));
after a rejection the token is redrawn from the residual [p − q]_+ (normalised) by
acceptance–rejection with proposal p: draw y ~ p, keep it with probability (p(y) − q(y))_+ / p(y).
The output then has law p exactly (the continuous analogue of Leviathan et al.'s lemma).

Here p and q are Gaussians (diagonal covariance). For a diffusion head they are the laws of the
last denoising step given the shared noise of the earlier steps (``heads.py``); for a
closed-form Gaussian head they are the head's output laws. ``ratio_temperature`` is the authors'
softened ratio (their code divides the log-ratio by 42): min(1, (p/q)^(1/T)); T = 1 is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cascade_sd.errors import check_int, check_range


@dataclass
class GaussianLaw:
    """N(mean, diag(std²)) per row: ``mean`` [..., d], ``std`` broadcastable to it (positive)."""

    mean: torch.Tensor
    std: torch.Tensor

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log density of ``x`` [..., d] (summed over the last dimension)."""
        z = (x - self.mean) / self.std
        log_std = torch.log(self.std).expand_as(z)
        return (-0.5 * z.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        """The point mean + std·noise for standard-normal ``noise`` (reparameterised draw)."""
        return self.mean + self.std * noise

    def expand(self, *leading: int) -> "GaussianLaw":
        """The same law repeated along new leading dimensions (for vectorised tries)."""
        return GaussianLaw(self.mean.expand(*leading, *self.mean.shape),
                           self.std.expand(*leading, *self.std.shape))


def check_ratio_temperature(value: float) -> None:
    """One-line error unless the softened-ratio temperature is a number >= 1 (1 = exact)."""
    check_range("ratio_temperature", float(value), 1.0)


def acceptance_probability(log_p: torch.Tensor, log_q: torch.Tensor, ratio_temperature: float = 1.0) -> torch.Tensor:
    """min(1, exp((log p − log q) / T)): CSpD's acceptance of a drafted token (T = 1: exact)."""
    return torch.exp(torch.clamp((log_p - log_q) / ratio_temperature, max=0.0))


def residual_keep_probability(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """(p(y) − q(y))_+ / p(y) = (1 − q/p)_+ for a proposal y ~ p (the acceptance–rejection test)."""
    return -torch.expm1(torch.clamp(log_q - log_p, max=0.0))


def sample_residual(
    p: GaussianLaw,
    q: GaussianLaw,
    generator: torch.Generator | None = None,
    *,
    max_tries: int = 4096,
    chunk: int = 64,
    need: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one y per row from [p − q]_+ by acceptance–rejection with proposal p.

    Tries are drawn ``chunk`` at a time and the first kept one is used, which has the same law as
    trying one at a time. Rows where ``need`` is False are skipped (returned as the mean, 0 tries).
    Returns (y [..., d], tries [...] = index of the kept try + 1, capped [...]).
    A row with no kept try within ``max_tries`` (only when TV(p, q) is tiny, then its probability is
    at most (1 − TV)^max_tries) keeps its last proposal, a draw from p, and is flagged ``capped``.
    """
    check_int("max_tries", max_tries, 1)
    check_int("chunk", chunk, 1)
    batch_shape = p.mean.shape[:-1]
    y = p.mean.clone()
    tries = torch.zeros(batch_shape, dtype=torch.long, device=p.mean.device)
    done = torch.zeros(batch_shape, dtype=torch.bool, device=p.mean.device) if need is None else ~need
    used = 0
    while used < max_tries and not bool(done.all()):
        n = min(chunk, max_tries - used)
        noise = torch.randn((n, *p.mean.shape), generator=generator, dtype=p.mean.dtype, device=p.mean.device)
        proposals = p.expand(n).sample(noise)
        keep_prob = residual_keep_probability(p.expand(n).log_prob(proposals), q.expand(n).log_prob(proposals))
        coins = torch.rand(keep_prob.shape, generator=generator, dtype=keep_prob.dtype, device=keep_prob.device)
        kept = coins < keep_prob
        any_kept = kept.any(0)
        first = kept.to(torch.int8).argmax(0)
        new = any_kept & ~done
        pick = torch.where(new, first, torch.full_like(first, n - 1))
        chosen = proposals.gather(0, pick[None, ..., None].expand(1, *p.mean.shape))[0]
        take = new | (~done & (used + n >= max_tries))
        y = torch.where(take[..., None], chosen, y)
        tries = torch.where(take, used + pick + 1, tries)
        done = done | new
        used += n
    return y, tries, ~done


@dataclass
class StepOutcome:
    """Result of verifying drafted tokens of each row: the output tokens and bookkeeping."""

    accepted: torch.Tensor  # [B] number of leading drafted tokens kept
    correction: torch.Tensor  # [B, d] resampled token after the first rejection (undefined where none)
    rejected: torch.Tensor  # [B] bool: a rejection happened within the row's drafted tokens
    tries: torch.Tensor  # [B] acceptance–rejection tries of the correction (0 where no rejection)
    capped: torch.Tensor  # [B] bool: the residual sampler hit max_tries


def verify_drafts(
    drafts: torch.Tensor,
    p: GaussianLaw,
    q: GaussianLaw,
    limit: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    ratio_temperature: float = 1.0,
    max_tries: int = 4096,
) -> StepOutcome:
    """Walk γ drafted tokens [B, γ, d] left to right with laws p, q [B, γ, d]; row b considers only its
    first ``limit[b]`` drafts. Keeps drafts until the first rejection, then redraws that position from
    the residual of its own (p, q) pair (Sec. 3 of the paper; lemma: output law = p)."""
    accept_p = acceptance_probability(p.log_prob(drafts), q.log_prob(drafts), ratio_temperature)
    coins = torch.rand(accept_p.shape, generator=generator, dtype=accept_p.dtype, device=accept_p.device)
    ok = coins < accept_p
    gamma = drafts.shape[1]
    ok &= torch.arange(gamma, device=drafts.device)[None, :] < limit[:, None]
    accepted = torch.cumprod(ok.to(torch.long), dim=1).sum(1)
    rejected = accepted < limit
    at = accepted.clamp(max=gamma - 1)
    rows = torch.arange(drafts.shape[0], device=drafts.device)
    p_rej = GaussianLaw(p.mean[rows, at], p.std.expand_as(p.mean)[rows, at])
    q_rej = GaussianLaw(q.mean[rows, at], q.std.expand_as(q.mean)[rows, at])
    correction, tries, capped = sample_residual(p_rej, q_rej, generator, max_tries=max_tries, need=rejected)
    return StepOutcome(accepted, correction, rejected, tries, capped)
