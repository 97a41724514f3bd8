"""The target law p (DESIGN 3): CFG on logits, then temperature, top-k and top-p.

Every decoding method, acceptance rule and drift computation obtains p and the drafter's q from
this one module, so "exact" always means exact w.r.t. the same processed law.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from cascade_sd.errors import check_range

# LlamaGen divides logits by max(T, 1e-5); below this temperature we treat sampling as greedy.
GREEDY_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Processing applied to raw logits; temperature 0 means greedy (a point mass at argmax)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0

    def __post_init__(self) -> None:
        check_range("temperature", self.temperature, 0.0)
        check_range("top_k", self.top_k, 0)
        check_range("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        check_range("cfg_scale", self.cfg_scale, 0.0)

    @property
    def greedy(self) -> bool:
        """True when the law is a point mass at the argmax."""
        return self.temperature < GREEDY_EPS

    @property
    def uses_cfg(self) -> bool:
        """True when an unconditional stream is needed (scale != 1)."""
        return self.cfg_scale != 1.0

    def to_dict(self) -> dict:
        """Plain dict for logging."""
        return asdict(self)


def apply_cfg(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: u + s·(c − u) (LlamaGen's sampling)."""
    return uncond_logits + scale * (cond_logits - uncond_logits)


def split_cfg(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Combine a batch laid out as [cond rows; uncond rows] into guided logits (no-op without CFG)."""
    if not params.uses_cfg:
        return logits
    cond, uncond = logits.chunk(2, dim=0)
    return apply_cfg(cond, uncond, params.cfg_scale)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering along the last dim; removed entries become -inf.

    Top-p keeps the smallest set of highest-probability tokens whose cumulative mass reaches
    ``top_p`` (the token that crosses the threshold is kept), as in LlamaGen/HF.
    """
    out = logits
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum > top_p
        remove_sorted[..., 1:] = remove_sorted[..., :-1].clone()
        remove_sorted[..., 0] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        out = out.masked_fill(remove, float("-inf"))
    return out


def law_from_logits(logits: torch.Tensor, params: SamplingParams, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Next-token law from already-guided logits: temperature, top-k, top-p, softmax.

    Greedy parameters give a one-hot law at the argmax (first index on ties).
    """
    logits = logits.to(dtype or logits.dtype)
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)
    scaled = logits / max(params.temperature, GREEDY_EPS)
    return filter_logits(scaled, params.top_k, params.top_p).softmax(dim=-1)


def target_law(logits: torch.Tensor, params: SamplingParams, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The law p from raw model logits laid out as [cond; uncond] when CFG is on (DESIGN 3)."""
    return law_from_logits(split_cfg(logits, params), params, dtype)


def sample_from_law(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row of ``probs`` [..., V] (unnormalised is fine) → LongTensor [...].

    Inverse CDF: the first token whose cumulative mass exceeds u·total, u ~ U[0, 1); a token of
    zero mass never has a cumulative mass above its predecessor's, so it is never drawn.
    """
    flat = probs.reshape(-1, probs.shape[-1])
    cdf = flat.cumsum(-1)
    u = torch.rand(flat.shape[0], 1, generator=generator, dtype=cdf.dtype, device=cdf.device)
    pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=flat.shape[-1] - 1)
    return pick.reshape(probs.shape[:-1])
