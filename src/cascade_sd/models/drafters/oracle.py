"""The oracle drafter: the target itself behind the drafter interface (q = p exactly).

For tests and sanity checks: with it every strict draft is accepted, so τ = depth + 1 and any
shortfall points at the engine. It keeps its own copy of the target and its own KV cache, with
the condition prefilled in ``cls_token_num`` extra leading slots.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cascade_sd.models.gpt import GPT, GPTOutput


class OracleDrafter(nn.Module):
    """Drafts with an exact copy of the target; ignores the feature input."""

    arch = "oracle"
    needs_layers = False

    def __init__(self, target: GPT) -> None:
        super().__init__()
        self.model = copy.deepcopy(target).eval()
        self.cls = target.config.cls_token_num

    def target_features(self, out: GPTOutput) -> torch.Tensor:
        """The target's final hidden states (unused by the oracle, kept for the interface)."""
        return out.hidden

    def setup_cache(self, max_batch: int, max_len: int, *, dtype=None, device=None) -> None:
        """Allocate the copy's cache with room for the condition prefix."""
        self.model.setup_cache(max_batch, max_len + self.cls, dtype=dtype, device=device)

    def begin(self, cond_streams: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Prefill the condition (both CFG streams) into the leading slots of cache ``rows`` (default: the
        leading rows)."""
        pos = torch.arange(self.cls, device=cond_streams.device)
        _, s = self.model.cache_shape
        mask = (torch.arange(s, device=pos.device)[None, :] <= pos[:, None]).unsqueeze(0)
        self.model.step(self.model.embed_cond(cond_streams), positions=pos, slots=pos, attn_mask=mask, return_hidden=False,
                        rows=rows)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep cache rows ``rows``, in this order, as rows 0..len−1 (images leaving a decode batch)."""
        self.model.select_rows(rows)

    def step(self, h: torch.Tensor, tokens: torch.Tensor, *, positions, slots, attn_mask, rows=None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Target logits for ``tokens`` at the caller's slots (shifted past the condition) of cache ``rows``."""
        b, t = tokens.shape
        prefix = torch.ones(attn_mask.shape[0], t, self.cls, dtype=torch.bool, device=attn_mask.device)
        out = self.model.step(self.model.embed_tokens(tokens), positions=positions, slots=slots + self.cls,
                              attn_mask=torch.cat([prefix, attn_mask], dim=-1), return_hidden=True, rows=rows)
        return out.logits, out.hidden
