"""Vanilla autoregressive decoding: one target forward per token with a static KV cache.

The baseline for every speedup (DESIGN 3, 7). With CFG the batch is laid out as
[cond rows; uncond rows] and both streams share each forward.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from cascade_sd.decoding.processing import SamplingParams, sample_from_law, target_law


@dataclass
class DecodeResult:
    """Tokens [B, N] of the image grid, per-run statistics and per-token arrays (e.g. drift [B, N])."""

    tokens: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, Any] = field(default_factory=dict)


def inference_decode(fn: Callable[..., DecodeResult]) -> Callable[..., DecodeResult]:
    """Run a decode under ``torch.inference_mode`` (a quarter less dispatch time per tensor op than
    ``no_grad``, measured on CPU) and return ordinary tensors, so callers may train on its tokens."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> DecodeResult:
        with torch.inference_mode():
            res = fn(*args, **kwargs)
        plain = {k: v.clone() if torch.is_tensor(v) else v for k, v in res.arrays.items()}
        return DecodeResult(tokens=res.tokens.clone(), stats=res.stats, arrays=plain)

    return run


def with_null_condition(model: torch.nn.Module, cond: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Double the condition batch with the null condition when CFG is on ([cond; null])."""
    if not params.uses_cfg:
        return cond
    return torch.cat([cond, model.null_condition(cond).to(cond.device)], dim=0)


@contextlib.contextmanager
def condition_padding(model: torch.nn.Module, valid: torch.Tensor | None, params: SamplingParams) -> Iterator[None]:
    """Hide padded condition columns (t2i captions, prompts) while decoding; both CFG streams share the
    mask, as LlamaGen's t2i sampler does. A mask without padding is a no-op."""
    if valid is None or bool(valid.all()):
        yield
        return
    model.set_condition_mask(torch.cat([valid] * (2 if params.uses_cfg else 1)).to(model.tok_embeddings.weight.device))
    try:
        yield
    finally:
        model.set_condition_mask(None)


def causal_mask(start: int, length: int, cache_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Bool mask [1, length, cache_len]: query at slot start+t sees slots 0..start+t."""
    q = torch.arange(start, start + length, device=device).unsqueeze(1)
    k = torch.arange(cache_len, device=device).unsqueeze(0)
    return (k <= q).unsqueeze(0)


@inference_decode
def vanilla_decode(
    model: torch.nn.Module,
    cond: torch.Tensor,
    params: SamplingParams,
    *,
    generator: torch.Generator | None = None,
    num_tokens: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> DecodeResult:
    """Sample ``num_tokens`` image tokens (default: the whole grid) for each condition in ``cond``;
    ``progress`` gets the tokens sampled so far (all rows) after every step."""
    cfg = model.config
    n = num_tokens if num_tokens is not None else cfg.block_size
    batch = cond.shape[0]
    device = next(model.parameters()).device
    cls = cfg.cls_token_num
    cache_len = cls + n
    streams = with_null_condition(model, cond.to(device), params)
    model.setup_cache(streams.shape[0], cache_len, device=device)

    start = time.perf_counter()
    tokens = torch.empty(batch, n, dtype=torch.long, device=device)
    x = model.embed_cond(streams)
    pos = torch.arange(cls, device=device)
    out = model.step(x, positions=pos, slots=pos, attn_mask=causal_mask(0, cls, cache_len, device), return_hidden=False)
    for i in range(n):
        probs = target_law(out.logits[:, -1], params)
        tokens[:, i] = sample_from_law(probs, generator).to(device)
        if progress is not None:
            progress(batch * (i + 1))
        if i == n - 1:
            break
        tok = tokens[:, i : i + 1]
        x = model.embed_tokens(torch.cat([tok, tok], 0) if params.uses_cfg else tok)
        slot = torch.tensor([cls + i], device=device)
        out = model.step(x, positions=slot, slots=slot, attn_mask=causal_mask(cls + i, 1, cache_len, device), return_hidden=False)
    seconds = time.perf_counter() - start
    return DecodeResult(tokens=tokens, stats={"target_forwards": n, "seconds": seconds, "tokens_per_second": batch * n / seconds})
