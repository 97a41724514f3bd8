"""Drafter config and the shared EAGLE body: fc over [token embedding; feature] → one decoder layer → head.

Index convention (shared with the engine): the drafter's input at image token j is the pair (feature
h_j, token t_j), where h_j is the target feature at the output that predicts token j; its output is a
predicted feature ĥ_{j+1} whose logits give the draft law q for token j+1. Token j sits at sequence
position ``cls_token_num + j`` and uses the target's 2D RoPE table. Deeper draft steps feed ĥ back in
as the feature. The token embedding and the output head are frozen copies of the target's weights,
kept in the drafter's state dict so that a drafter checkpoint is self-contained.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Mapping

import torch
from torch import nn

from cascade_sd.errors import ConfigError, check_choice
from cascade_sd.models.checkpoint import state_hash
from cascade_sd.models.gpt import (
    GPT,
    GPTConfig,
    GPTOutput,
    TransformerBlock,
    check_rows,
    check_step_inputs,
    keep_rows,
    precompute_rope_2d,
    require_cache,
)

ARCHS = ("eagle", "eagle3")


def target_hash(target: GPT) -> str:
    """Content hash of a target's weights; equals the hash of its package checkpoint (``state_hash``)."""
    return state_hash(target.state_dict())


@dataclass
class DrafterConfig:
    """Shape of a drafter and the target it belongs to; width fields mirror the target's ``GPTConfig``."""

    arch: str
    dim: int
    n_head: int
    vocab_size: int
    block_size: int
    grid_width: int
    cls_token_num: int
    target_hash: str
    target_layers: tuple[int, ...] = ()
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    head_hidden: int = 0  # > 0: the target's head is Linear(dim, head_hidden) → GELU → Linear (Janus)

    def __post_init__(self) -> None:
        self.target_layers = tuple(self.target_layers)
        self.validate()

    def gpt_config(self) -> GPTConfig:
        """The decoder layer and RoPE table in the target's config language (one layer, no dropout)."""
        return GPTConfig(
            dim=self.dim, n_layer=1, n_head=self.n_head, n_kv_head=self.n_kv_head, multiple_of=self.multiple_of,
            ffn_dim_multiplier=self.ffn_dim_multiplier, rope_base=self.rope_base, norm_eps=self.norm_eps,
            token_dropout_p=0.0, attn_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0,
            class_dropout_prob=0.0, model_type="c2i" if self.cls_token_num == 1 else "t2i",
            cls_token_num=self.cls_token_num, vocab_size=self.vocab_size, block_size=self.block_size,
            grid_width=self.grid_width,
        )

    def validate(self) -> None:
        """Raise a one-line ConfigError naming the first invalid field, its value and what is allowed."""
        check_choice("arch", self.arch, ARCHS)
        self.gpt_config()  # shared fields: same names, ranges and messages as the target's config
        if self.arch == "eagle" and self.target_layers:
            raise ConfigError(f"target_layers={self.target_layers!r} is not allowed for arch='eagle'; allowed: ()")
        if self.arch == "eagle3" and (
            len(self.target_layers) != 3
            or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in self.target_layers)
        ):
            raise ConfigError(
                f"target_layers={self.target_layers!r} is not allowed for arch='eagle3'; "
                "allowed: 3 non-negative layer indices (low, mid, high)"
            )
        if not isinstance(self.target_hash, str) or not self.target_hash:
            raise ConfigError(f"target_hash={self.target_hash!r} is not allowed; expected the target's non-empty hash")
        if not isinstance(self.head_hidden, int) or isinstance(self.head_hidden, bool) or self.head_hidden < 0:
            raise ConfigError(f"head_hidden={self.head_hidden!r} is out of range; allowed 0 (linear head) or a width >= 1")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (what checkpoints store)."""
        out = asdict(self)
        out["target_layers"] = list(self.target_layers)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DrafterConfig":
        """Build from a dict; an unknown or missing key is a ConfigError naming it."""
        known = {f.name: f for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(f"DrafterConfig key {key!r} is unknown; allowed: {', '.join(known)}")
        for name, f in known.items():
            if name not in data and f.default is MISSING:
                raise ConfigError(f"DrafterConfig key {name!r} is missing; it is required")
        return cls(**dict(data))

    @classmethod
    def for_target(
        cls, target: GPT, arch: str, target_hash: str, target_layers: tuple[int, ...] | None = None
    ) -> "DrafterConfig":
        """Config of an ``arch`` drafter for ``target``; eagle3 fuses layers (0, n_layer//2, n_layer-1) by default."""
        check_choice("arch", arch, ARCHS)
        c = target.config
        if arch == "eagle3":
            layers = (0, c.n_layer // 2, c.n_layer - 1) if target_layers is None else tuple(target_layers)
            bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < c.n_layer]
            if bad:
                raise ConfigError(
                    f"target_layers={layers!r} is out of range; allowed indices 0..{c.n_layer - 1} (target layers)"
                )
        else:
            layers = () if target_layers is None else tuple(target_layers)
        return cls(
            arch=arch, dim=c.dim, n_head=c.n_head, vocab_size=c.vocab_size, block_size=c.block_size,
            grid_width=c.grid_cols, cls_token_num=c.cls_token_num, target_hash=target_hash, target_layers=layers,
            n_kv_head=c.n_kv_head, multiple_of=c.multiple_of, ffn_dim_multiplier=c.ffn_dim_multiplier,
            norm_eps=c.norm_eps, rope_base=c.rope_base, head_hidden=getattr(target, "head_hidden", 0),
        )


class Drafter(nn.Module, ABC):
    """EAGLE drafter body with a cached ``step`` for decoding and an uncached ``forward`` for training."""

    arch: str = ""

    def __init__(self, config: DrafterConfig) -> None:
        super().__init__()
        config.validate()
        if config.arch != self.arch:
            raise ConfigError(f"arch={config.arch!r} is not allowed for {type(self).__name__}; allowed: {self.arch!r}")
        self.config = config
        gpt_cfg = config.gpt_config()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        # EAGLE-1's fc over concat(token embedding, feature), with bias as in its reference code.
        self.fc = nn.Linear(2 * config.dim, config.dim, bias=True)
        self.layer = TransformerBlock(gpt_cfg)
        if config.head_hidden:  # the target's two-layer image head (Janus's proj_out → GELU → vision_head)
            self.output: nn.Module = nn.Sequential(nn.Linear(config.dim, config.head_hidden), nn.GELU(),
                                                   nn.Linear(config.head_hidden, config.vocab_size))
        else:
            self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # Frozen copies of the target's embedding and head: training never updates them (EAGLE).
        self.tok_embeddings.weight.requires_grad_(False)
        self.output.requires_grad_(False)
        # Plain float32 attributes as in GPT: not in state_dict, not cast by .to(dtype).
        self._rope_cos, self._rope_sin = precompute_rope_2d(
            gpt_cfg.head_dim, config.block_size, gpt_cfg.grid_cols, config.cls_token_num, config.rope_base
        )

    @property
    def needs_layers(self) -> bool:
        """True when ``target_features`` reads per-layer outputs (call the target with return_layers=True)."""
        return False

    @abstractmethod
    def target_features(self, out: GPTOutput) -> torch.Tensor:
        """The drafter's input feature [B, T, dim] from a target output (arch-specific)."""

    @abstractmethod
    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits [B, T, V] from drafter features (arch-specific: with or without a final norm)."""

    def input_feature(self, h: torch.Tensor) -> torch.Tensor:
        """The feature as it enters ``fc`` (identity here; EAGLE-3 norms it)."""
        return h

    def copy_target_weights(self, target: GPT) -> None:
        """Copy the target's token embedding and output head into the frozen drafter copies."""
        with torch.no_grad():
            self.tok_embeddings.weight.copy_(target.tok_embeddings.weight)
            self.output.load_state_dict(target.output.state_dict())

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for sequence ``positions`` (table moved to their device once)."""
        if self._rope_cos.device != positions.device:
            self._rope_cos = self._rope_cos.to(positions.device)
            self._rope_sin = self._rope_sin.to(positions.device)
        return self._rope_cos[positions], self._rope_sin[positions]

    def _check_inputs(self, h: torch.Tensor, tokens: torch.Tensor) -> None:
        """Raise ValueError unless h is [B, T, dim] and tokens [B, T]."""
        if h.dim() != 3 or h.shape[2] != self.config.dim or tokens.shape != h.shape[:2]:
            raise ValueError(f"h must be [B, T, {self.config.dim}] and tokens [B, T], got {tuple(h.shape)} "
                             f"and {tuple(tokens.shape)}")

    def _body(
        self,
        h: torch.Tensor,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor | None,
        mask: torch.Tensor | None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """fc(concat(embedding, feature)) → decoder layer → ĥ; mask [B|1, 1, T, S] or None (causal)."""
        x = self.fc(torch.cat([self.tok_embeddings(tokens), self.input_feature(h.to(self.fc.weight.dtype))], dim=-1))
        cos, sin = self._rope(positions)
        return self.layer(x, cos, sin, slots, mask, rows)

    def features(
        self,
        h: torch.Tensor,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Uncached ĥ [B, T, dim] without the head (``forward`` minus logits; for training-time-test chains).

        Defaults: token j at position cls_token_num + j and a causal mask; chains pass their own
        ``positions`` ([T] or [B, T]) and ``attn_mask`` (bool [B|1, T, T], True = may attend).
        """
        self._check_inputs(h, tokens)
        T = tokens.shape[1]
        if positions is None:
            positions = torch.arange(T, device=tokens.device) + self.config.cls_token_num
        if attn_mask is not None and (attn_mask.dtype != torch.bool or attn_mask.dim() != 3
                                      or tuple(attn_mask.shape[1:]) != (T, T)):
            raise ValueError(f"attn_mask must be a bool tensor [B|1, {T}, {T}], got {attn_mask.dtype} "
                             f"{tuple(attn_mask.shape)}")
        return self._body(h, tokens, positions, None, None if attn_mask is None else attn_mask.unsqueeze(1))

    def forward(
        self,
        h: torch.Tensor,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Uncached pass over pairs (h_j, t_j) → (float32 logits [B, T, V] for token j+1, ĥ_{j+1} [B, T, dim])."""
        h_out = self.features(h, tokens, positions=positions, attn_mask=attn_mask)
        return self.head(h_out), h_out

    def setup_cache(
        self,
        max_batch_size: int,
        max_seq_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Allocate the decoder layer's zeroed k/v cache [max_batch_size, n_kv_head, max_seq_len, head_dim]."""
        weight = self.fc.weight
        self.layer.attention.allocate_cache(max_batch_size, max_seq_len, dtype or weight.dtype, device or weight.device)

    def extend_cache(self, n: int) -> None:
        """Append ``n`` zeroed slots to the cache out of place, so k/v written earlier keep their autograd history.

        Training-time test grows one chain block per step this way: the keys of earlier blocks carry
        gradients and must not be overwritten in place.
        """
        self._require_cache(1)
        attn = self.layer.attention
        k = attn.k_cache
        pad = k.new_zeros(k.shape[0], k.shape[1], n, k.shape[3])
        attn.k_cache = torch.cat([k, pad], dim=2)
        attn.v_cache = torch.cat([attn.v_cache, pad], dim=2)

    @property
    def cache_shape(self) -> tuple[int, int] | None:
        """(max_batch_size, max_seq_len) of the allocated cache, or None before ``setup_cache``."""
        k = self.layer.attention.k_cache
        return None if k is None else (k.shape[0], k.shape[2])

    def _require_cache(self, batch: int) -> tuple[int, int]:
        """Return the cache shape, raising if it is missing or too small for ``batch`` rows."""
        return require_cache(self.cache_shape, batch, "drafter")

    def step(
        self,
        h: torch.Tensor,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor,
        slots: torch.Tensor,
        attn_mask: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached pass: write k/v at ``slots`` ([T] or [B, T]), attend where ``attn_mask`` [B|1, T, S] is True;
        ``rows`` [B]: the cache rows the inputs belong to (default: the leading B rows).

        Returns float32 logits [B, T, V] (draft law for the next token) and ĥ [B, T, dim].
        """
        self._check_inputs(h, tokens)
        bsz, T = tokens.shape
        max_rows, S = self._require_cache(bsz)
        check_step_inputs(bsz, T, S, positions, slots, attn_mask)
        check_rows(rows, bsz, max_rows)
        h_out = self._body(h, tokens, positions, slots, attn_mask.unsqueeze(1), rows)
        return self.head(h_out), h_out

    def copy_cache(self, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """For each row b, copy k/v from ``src_slots[b]`` to ``dst_slots[b]`` (both [B, K]); overlaps are safe."""
        if src_slots.shape != dst_slots.shape or src_slots.dim() != 2:
            raise ValueError(f"src_slots and dst_slots must both be [B, K], got {tuple(src_slots.shape)} "
                             f"and {tuple(dst_slots.shape)}")
        self._require_cache(src_slots.shape[0])
        rows = torch.arange(src_slots.shape[0], device=src_slots.device)[:, None]
        attn = self.layer.attention
        for cache in (attn.k_cache, attn.v_cache):
            cache[rows, :, dst_slots] = cache[rows, :, src_slots]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep cache rows ``rows``, in this order, as rows 0..len−1 (images leaving a decode batch)."""
        self._require_cache(rows.numel())
        attn = self.layer.attention
        for cache in (attn.k_cache, attn.v_cache):
            keep_rows(cache, rows, dim=0)
