"""Per-token heads of the continuous AR model: a MAR-style diffusion MLP and a closed-form Gaussian.

Both expose the law of a token's *last sampling step* given the noise of the earlier steps
(``last_step_law``), which is what CSpD's trajectory alignment needs (DESIGN 5):
- **DiffusionHead** (MAR, arXiv 2406.11838, simplified): an MLP predicts the noise ε from
  (x_t, t, condition); trained with the ε-MSE loss over a cosine schedule of ``train_steps``;
  sampled by DDPM ancestral steps on ``sample_steps`` evenly spaced timesteps. Given the initial
  noise and the noise of every step but the last, the last step is the Gaussian
  N(x̂₀(x₁), σ₁²) — so draft and target, fed the same noise, give two Gaussians at the last step.
- **GaussianHead**: mean and log-std from the condition; its law is closed-form, which makes the
  accept/resample step's exactness checkable (issue 8).
CFG (MAR): ε (or the mean) of the two streams is mixed as u + s·(c − u); temperature scales the
per-step noise as MAR's sampler does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cascade_sd.continuous.step import GaussianLaw

# Tokens are standardised (zero mean, unit variance per channel), so x̂₀ is clipped to ±X0_CLIP as DDPM
# clips it to the data range: at high noise x̂₀ = (x − √(1−ᾱ) ε̂)/√ᾱ multiplies ε̂'s error by 1/√ᾱ.
X0_CLIP = 5.0


def cosine_alpha_bar(train_steps: int, s: float = 0.008) -> torch.Tensor:
    """ᾱ_t for t = 0..train_steps-1 of the improved-DDPM cosine schedule (β capped at 0.999), float64."""
    u = torch.arange(train_steps + 1, dtype=torch.float64) / train_steps
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0)


class SamplingSchedule:
    """DDPM ancestral sampling on ``sample_steps`` evenly spaced timesteps of a ``train_steps`` schedule.

    Step i (i = S-1 … 0) maps x at timestep τ_i to timestep τ_{i-1} (clean after i = 0) with the
    posterior mean of x̂₀ = (x − √(1−ᾱ) ε̂)/√ᾱ (clipped to ±X0_CLIP) and variance β̃_i (DDPM, Ho et
    al. 2020, eqs. 6-7); the last step's β̃_0 is 0 and uses β̃_1 instead (improved DDPM's clipped
    log-variance), so it is a proper Gaussian.
    """

    def __init__(self, train_steps: int, sample_steps: int) -> None:
        alpha_bar = cosine_alpha_bar(train_steps)
        self.timesteps = torch.tensor([round((i + 1) * train_steps / sample_steps) - 1 for i in range(sample_steps)])
        ab = alpha_bar[self.timesteps]
        prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
        beta = 1 - ab / prev
        self.sqrt_ab = ab.sqrt().float()
        self.sqrt_one_minus_ab = (1 - ab).sqrt().float()
        self.coef_x0 = (prev.sqrt() * beta / (1 - ab)).float()
        self.coef_xt = ((1 - beta).sqrt() * (1 - prev) / (1 - ab)).float()
        var = beta * (1 - prev) / (1 - ab)
        var[0] = var[1] if sample_steps > 1 else beta[0]
        self.sigma = var.sqrt().float()

    @property
    def steps(self) -> int:
        """Number of sampling steps S."""
        return len(self.timesteps)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [.., dim] of (float) timesteps, as in DDPM/MAR."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """Pre-norm residual MLP block."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h + MLP(norm(h))."""
        return h + self.fc2(F.silu(self.fc1(self.norm(h))))


class DiffusionHead(nn.Module):
    """ε-prediction MLP conditioned on the trunk's hidden state at the token's position."""

    def __init__(self, latent_dim: int, cond_dim: int, width: int, blocks: int, train_steps: int,
                 sample_steps: int, time_dim: int = 64) -> None:
        super().__init__()
        self.latent_dim, self.train_steps, self.time_dim = latent_dim, train_steps, time_dim
        self.schedule = SamplingSchedule(train_steps, sample_steps)
        self.register_buffer("alpha_bar", cosine_alpha_bar(train_steps).float(), persistent=False)
        self.x_in = nn.Linear(latent_dim, width)
        self.c_in = nn.Linear(cond_dim, width)
        self.t_in = nn.Sequential(nn.Linear(time_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(ResBlock(width) for _ in range(blocks))
        self.norm_out = nn.LayerNorm(width)
        self.out = nn.Linear(width, latent_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def noise_vectors(self) -> int:
        """Standard-normal vectors one token's sampling consumes: x_T and one per step."""
        return self.schedule.steps + 1

    def _eps(self, x: torch.Tensor, c: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.x_in(x) + c + t_emb
        for block in self.blocks:
            h = block(h)
        return self.out(self.norm_out(h))

    def loss(self, x0: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """ε-MSE at uniformly drawn timesteps (DDPM's simple loss) for targets x0 [N, d], conditions [N, C]."""
        t = torch.randint(0, self.train_steps, (x0.shape[0],), generator=generator, device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device)
        ab = self.alpha_bar.to(x0.device)[t][:, None]
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        pred = self._eps(xt, self.c_in(cond), self.t_in(timestep_embedding(t, self.time_dim)))
        return F.mse_loss(pred, eps)

    def last_step_law(self, cond: torch.Tensor, noise: torch.Tensor, *, uncond: torch.Tensor | None = None,
                      cfg_scale: float = 1.0, temperature: float = 1.0) -> GaussianLaw:
        """Run steps S-1 … 1 from x_T = noise[0] with per-step noise noise[1:S]; return the law of the
        last step, N(x̂₀ mixture mean, (σ₀·temperature)²). ``noise`` is [S+1, N, d]; cond [N, C]."""
        sch = self.schedule
        c = self.c_in(cond if uncond is None else torch.cat([cond, uncond]))
        t_emb = self.t_in(timestep_embedding(sch.timesteps.to(cond.device), self.time_dim))
        x = noise[0]
        for i in range(sch.steps - 1, -1, -1):
            xin = x if uncond is None else torch.cat([x, x])
            eps = self._eps(xin, c, t_emb[i])
            if uncond is not None:
                e_c, e_u = eps.chunk(2)
                eps = e_u + cfg_scale * (e_c - e_u)
            x0_hat = ((x - sch.sqrt_one_minus_ab[i] * eps) / sch.sqrt_ab[i]).clamp(-X0_CLIP, X0_CLIP)
            mean = sch.coef_x0[i] * x0_hat + sch.coef_xt[i] * x
            std = (sch.sigma[i] * temperature).to(x.device)
            if i == 0:
                return GaussianLaw(mean, std.expand(1))
            x = mean + std * noise[sch.steps - i]
        raise AssertionError("unreachable: the loop returns at i = 0")


class GaussianHead(nn.Module):
    """Closed-form head: token ~ N(mean(c), diag(std(c)²)); one noise vector per token."""

    noise_vectors = 1

    def __init__(self, latent_dim: int, cond_dim: int, min_log_std: float = -5.0) -> None:
        super().__init__()
        self.latent_dim, self.min_log_std = latent_dim, min_log_std
        self.proj = nn.Linear(cond_dim, 2 * latent_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def _params(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.proj(cond).chunk(2, dim=-1)
        return mean, log_std.clamp(min=self.min_log_std, max=3.0)

    def loss(self, x0: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean negative log-likelihood per dimension of targets x0 [N, d]."""
        mean, log_std = self._params(cond)
        return (0.5 * ((x0 - mean) / log_std.exp()).square() + log_std).mean() + 0.5 * math.log(2 * math.pi)

    def last_step_law(self, cond: torch.Tensor, noise: torch.Tensor, *, uncond: torch.Tensor | None = None,
                      cfg_scale: float = 1.0, temperature: float = 1.0) -> GaussianLaw:
        """N(mean, std²); with CFG the means mix as u + s·(c − u) and the conditional std is kept."""
        mean, log_std = self._params(cond)
        if uncond is not None:
            mean_u, _ = self._params(uncond)
            mean = mean_u + cfg_scale * (mean - mean_u)
        return GaussianLaw(mean, log_std.exp() * temperature)
