"""The target model: a GPT that follows LlamaGen's ``Transformer`` (names, shapes, maths) plus a static KV cache.

Parameter names and shapes equal LlamaGen's (``llamagen.md``), so its c2i/t2i checkpoints load with a
strict key check; neither the KV cache nor the RoPE table is ever part of ``state_dict()``.
Sequence layout (as LlamaGen): ``cls_token_num`` condition positions, then the image tokens in raster
order; image token ``i`` sits at sequence position ``cls_token_num + i``, grid row ``i // grid_cols``
and column ``i % grid_cols``.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cascade_sd.errors import CheckpointError, ConfigError, check_choice, check_int, check_range
from cascade_sd.models.checkpoint import (
    Checkpoint,
    load_checkpoint,
    load_external_state_dict,
    load_state_strict,
    save_checkpoint,
)

MODEL_TYPES = ("c2i", "t2i")
_DROPOUTS = ("token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p", "class_dropout_prob")

# LlamaGen's GPT_models table (dim / layers / heads); every other field keeps LlamaGen's ModelArgs default.
_PRESETS: dict[str, dict[str, Any]] = {
    "GPT-B": {"dim": 768, "n_layer": 12, "n_head": 12},
    "GPT-L": {"dim": 1024, "n_layer": 24, "n_head": 16},
    "GPT-XL": {"dim": 1280, "n_layer": 36, "n_head": 20},
    "GPT-XXL": {"dim": 1536, "n_layer": 48, "n_head": 24},
    "GPT-3B": {"dim": 3200, "n_layer": 24, "n_head": 32},
    # The built-in ~5M target of DESIGN 2: 8x8 grid of a 2048-code tokenizer, 10 classes.
    "tiny": {
        "dim": 256,
        "n_layer": 6,
        "n_head": 8,
        "vocab_size": 2048,
        "num_classes": 10,
        "block_size": 64,
        "token_dropout_p": 0.0,
        "attn_dropout_p": 0.0,
        "resid_dropout_p": 0.0,
        "ffn_dropout_p": 0.0,
        "class_dropout_prob": 0.1,
    },
}


def find_multiple(n: int, k: int) -> int:
    """Round ``n`` up to a multiple of ``k`` (LlamaGen's helper for the SwiGLU width)."""
    return n if n % k == 0 else n + k - n % k


def _check_float(field: str, value: object, lo: float, hi: float | None = None, **kw: bool) -> None:
    """Raise ConfigError unless ``value`` is a real number within the given bounds."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{field}={value!r} is not allowed; expected a number")
    check_range(field, float(value), lo, hi, **kw)


@dataclass
class GPTConfig:
    """Architecture of the target; field names and defaults are LlamaGen's ``ModelArgs``."""

    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    class_dropout_prob: float = 0.1
    model_type: str = "c2i"
    num_classes: int = 1000
    caption_dim: int = 2048
    cls_token_num: int = 1
    vocab_size: int = 16384
    block_size: int = 256
    grid_width: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (``n_kv_head``, defaulting to ``n_head`` as in LlamaGen)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def grid_cols(self) -> int:
        """Tokens per grid row: ``grid_width`` or isqrt(block_size)."""
        return math.isqrt(self.block_size) if self.grid_width is None else self.grid_width

    @property
    def grid_rows(self) -> int:
        """Rows of the token grid (the last one may be partial for toy sizes)."""
        return -(-self.block_size // self.grid_cols)

    @property
    def null_class(self) -> int:
        """Label of the null (unconditional) class used for CFG: the extra embedding row."""
        return self.num_classes

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU width, computed exactly as LlamaGen's ``FeedForward``."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def max_positions(self) -> int:
        """Sequence positions with a RoPE entry: condition positions plus the full grid."""
        return self.cls_token_num + self.grid_rows * self.grid_cols

    def validate(self) -> None:
        """Raise a one-line ConfigError naming the first invalid field, its value and what is allowed."""
        for name in ("dim", "n_layer", "n_head", "multiple_of", "num_classes", "caption_dim", "cls_token_num",
                     "vocab_size", "block_size"):
            check_int(name, getattr(self, name), 1)
        for name in ("n_kv_head", "grid_width"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        if self.dim % self.n_head:
            raise ConfigError(f"dim={self.dim} is not allowed; must be divisible by n_head={self.n_head}")
        if self.head_dim % 4:
            raise ConfigError(
                f"dim={self.dim} is not allowed with n_head={self.n_head}; "
                f"head_dim={self.head_dim} must be a multiple of 4 (2D RoPE splits it into row and column halves)"
            )
        if self.n_head % self.kv_heads:
            raise ConfigError(f"n_kv_head={self.n_kv_head} is not allowed; must divide n_head={self.n_head}")
        if self.ffn_dim_multiplier is not None:
            _check_float("ffn_dim_multiplier", self.ffn_dim_multiplier, 0.0, lo_open=True)
        _check_float("rope_base", self.rope_base, 1.0, lo_open=True)
        _check_float("norm_eps", self.norm_eps, 0.0, lo_open=True)
        _check_float("initializer_range", self.initializer_range, 0.0)
        for name in _DROPOUTS:
            _check_float(name, getattr(self, name), 0.0, 1.0, hi_open=True)
        check_choice("model_type", self.model_type, MODEL_TYPES)
        if self.model_type == "c2i" and self.cls_token_num != 1:
            raise ConfigError(f"cls_token_num={self.cls_token_num} is not allowed for model_type='c2i'; allowed: 1")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (what checkpoints store)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GPTConfig":
        """Build from a dict; an unknown key is a ConfigError naming it."""
        names = [f.name for f in fields(cls)]
        for key in data:
            if key not in names:
                raise ConfigError(f"GPTConfig key {key!r} is unknown; allowed: {', '.join(names)}")
        return cls(**dict(data))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        """A named size (LlamaGen's GPT-B/L/XL/XXL/3B or the built-in ``tiny``) with field overrides."""
        check_choice("preset", name, _PRESETS)
        return cls.from_dict({**_PRESETS[name], **overrides})


@dataclass
class GPTOutput:
    """Result of a forward pass: float32 logits and, on request, final normed hidden states and block outputs."""

    logits: torch.Tensor
    hidden: torch.Tensor | None = None
    layers: list[torch.Tensor] | None = None


def precompute_rope_2d(
    head_dim: int, block_size: int, grid_cols: int, cls_token_num: int, base: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [cls_token_num + rows*cols, head_dim // 2] of LlamaGen's 2D RoPE.

    As LlamaGen's ``precompute_freqs_cis_2d``: frequencies ``base^(-4i/head_dim)`` over the half head
    dimension; the first half of the rotation pairs turns with the token's row, the second with its
    column; condition positions get all-zero cos and sin. Rows/columns come from ``grid_cols`` so
    non-square toy grids work (for a square grid the table equals LlamaGen's).
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    rows = -(-block_size // grid_cols)
    index = torch.arange(rows * grid_cols)
    row = (index // grid_cols).float()
    col = (index % grid_cols).float()
    angles = torch.cat([row[:, None] * freqs[None, :], col[:, None] * freqs[None, :]], dim=-1)
    zeros = torch.zeros(cls_token_num, half)
    return torch.cat([zeros, torch.cos(angles)]), torch.cat([zeros, torch.sin(angles)])


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or unchanged when it is already float64 (exact-law analyses run toy models in float64)."""
    return x if x.dtype == torch.float64 else x.float()


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` [B, T, H, head_dim] by cos/sin [T, head_dim/2] or [B, T, head_dim/2].

    Same arithmetic as LlamaGen's ``apply_rotary_emb`` (computed in float32, cast back).
    """
    xs = at_least_float32(x).reshape(*x.shape[:-1], -1, 2)
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack(
        [xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin],
        dim=-1,
    )
    return out.flatten(3).type_as(x)


def prefix_mask(batch: int, T: int, start: int, S: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Causal mask [batch, T, S] for T new tokens written at cache slots start..start+T-1 (True = may attend)."""
    query = torch.arange(T, device=device)[:, None] + start
    key = torch.arange(S, device=device)[None, :]
    return (key <= query).unsqueeze(0).expand(batch, T, S)


def require_cache(shape: tuple[int, int] | None, batch: int, owner: str) -> tuple[int, int]:
    """Return a KV-cache shape (B, S), raising if it is missing or too small for ``batch`` rows."""
    if shape is None:
        raise RuntimeError(f"{owner} KV cache is not allocated; call setup_cache(max_batch_size, max_seq_len) first")
    if batch > shape[0]:
        raise ValueError(f"batch={batch} exceeds the {owner} cache's max_batch_size={shape[0]}")
    return shape


def check_step_inputs(
    bsz: int, T: int, S: int, positions: torch.Tensor, slots: torch.Tensor, attn_mask: torch.Tensor
) -> None:
    """Validate the shapes of a cached ``step`` call's positions, slots and boolean mask."""
    for name, t in (("positions", positions), ("slots", slots)):
        if tuple(t.shape) not in ((T,), (bsz, T)):
            raise ValueError(f"{name} must be [{T}] or [{bsz}, {T}], got {tuple(t.shape)}")
    if attn_mask.dtype != torch.bool or attn_mask.dim() != 3 or tuple(attn_mask.shape[1:]) != (T, S) or (
        attn_mask.shape[0] not in (1, bsz)
    ):
        raise ValueError(f"attn_mask must be a bool tensor [{bsz} or 1, {T}, {S}], got {attn_mask.dtype} "
                         f"{tuple(attn_mask.shape)}")


def write_slots(kc: torch.Tensor, vc: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                rows: torch.Tensor | None = None) -> None:
    """Store k/v [B, H, T, hd] into caches [B', H, S, hd] at ``slots`` ([T] shared or [B, T] per row), in
    cache rows ``rows`` [B] (default: the leading B rows)."""
    if slots.dim() == 1 and rows is None:
        kc[:, :, slots] = k.to(kc.dtype)
        vc[:, :, slots] = v.to(vc.dtype)
    else:
        index = (rows if rows is not None else torch.arange(k.shape[0], device=slots.device))[:, None]
        at = slots if slots.dim() == 2 else slots[None]
        kc[index, :, at] = k.transpose(1, 2).to(kc.dtype)
        vc[index, :, at] = v.transpose(1, 2).to(vc.dtype)


def check_rows(rows: torch.Tensor | None, bsz: int, max_rows: int) -> None:
    """Validate the cache rows [B] a cached pass writes (None: the leading ``bsz`` rows)."""
    if rows is None:
        return
    if rows.dim() != 1 or rows.numel() != bsz or rows.dtype != torch.long:
        raise ValueError(f"rows must be a LongTensor [{bsz}], got {rows.dtype} {tuple(rows.shape)}")
    if bsz and not (0 <= int(rows.min()) and int(rows.max()) < max_rows):
        raise ValueError(f"rows must lie in [0, {max_rows}) (the cache's max_batch_size)")


def copy_slots(kv: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
    """In all-layer k/v storage [L, 2, B, H, S, hd], copy row b's ``src_slots[b]`` to ``dst_slots[b]``
    (both [B, K]); sources are gathered before writing, so overlapping slot sets are safe."""
    if src_slots.shape != dst_slots.shape or src_slots.dim() != 2:
        raise ValueError(f"src_slots and dst_slots must both be [B, K], got {tuple(src_slots.shape)} "
                         f"and {tuple(dst_slots.shape)}")
    # As one index over the flattened (row, head, slot) dims: index_select/index_copy_ move whole
    # head_dim vectors, far cheaper than advanced indexing over two non-adjacent dims.
    layers, _, _, heads, seq, head_dim = kv.shape
    rows = torch.arange(src_slots.shape[0], device=kv.device)
    base = (rows[:, None] * heads + torch.arange(heads, device=kv.device)) * seq  # [B, H]: (row, head) offsets
    flat = kv.view(layers * 2, -1, head_dim)
    at = lambda slots: (base[:, :, None] + slots[:, None, :]).flatten()  # [B·H·K]
    flat.index_copy_(1, at(dst_slots), flat.index_select(1, at(src_slots)))


def keep_rows(cache: torch.Tensor, rows: torch.Tensor, dim: int) -> None:
    """Make the entries of ``cache`` at ``rows`` (in this order) along its batch dim ``dim`` its leading
    rows, in place; only rows that change place are copied (rows leaving a decode batch)."""
    moved = (rows != torch.arange(rows.numel(), device=rows.device)).nonzero().squeeze(-1)
    if moved.numel():
        cache.index_copy_(dim, moved, cache.index_select(dim, rows[moved]))


def hide_condition_padding(mask: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor, batch: int) -> torch.Tensor:
    """``mask`` [B|1, T, S] with padded condition slots (``valid`` [B, cls] False) hidden from every
    query but their own slot: LlamaGen's t2i masking (llamagen.md: masked columns, diagonal kept)."""
    if valid.dim() != 2 or valid.dtype != torch.bool or valid.shape[0] != batch or valid.device != mask.device:
        raise ValueError(f"condition mask must be bool [{batch}, cls] on {mask.device}; got {valid.dtype} "
                         f"{tuple(valid.shape)} on {valid.device}")
    hidden = torch.zeros(batch, mask.shape[-1], dtype=torch.bool, device=mask.device)
    hidden[:, : valid.shape[1]] = ~valid
    own = slots[..., None] == torch.arange(mask.shape[-1], device=mask.device)
    return mask & ~(hidden[:, None, :] & ~own)


class RMSNorm(nn.Module):
    """LlamaGen's RMSNorm: normalised in float32, cast back, then scaled."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension."""
        xf = at_least_float32(x)
        out = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class FeedForward(nn.Module):
    """LlamaGen's SwiGLU MLP: ``w2(silu(w1 x) * w3 x)``, no biases."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.ffn_hidden
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the gated MLP."""
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Attention(nn.Module):
    """LlamaGen's attention (fused ``wqkv``, ``wo``) with an optional static KV cache held outside the state dict."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.dim = config.dim
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.head_dim
        self.wqkv = nn.Linear(config.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.attn_dropout_p = config.attn_dropout_p
        self.resid_dropout = nn.Dropout(config.resid_dropout_p)
        # Plain attributes, not buffers: the cache must never appear in state_dict().
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def cache_storage(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype, device: torch.device,
                      n_layers: int = 1) -> torch.Tensor:
        """Zeroed k/v storage [n_layers, 2, max_batch_size, n_kv_head, max_seq_len, head_dim] (validated sizes)."""
        check_int("max_batch_size", max_batch_size, 1)
        check_int("max_seq_len", max_seq_len, 1)
        shape = (n_layers, 2, max_batch_size, self.n_kv_head, max_seq_len, self.head_dim)
        return torch.zeros(shape, dtype=dtype, device=device)

    def allocate_cache(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype, device: torch.device) -> None:
        """Zeroed k/v caches [max_batch_size, n_kv_head, max_seq_len, head_dim] owned by this layer.

        Two separate tensors (not views of one), so a drafter trained through its cache can write
        k and v with autograd history.
        """
        storage = self.cache_storage(max_batch_size, max_seq_len, dtype, device)[0]
        self.k_cache, self.v_cache = storage[0].clone(), storage[1].clone()

    def use_cache(self, storage: torch.Tensor) -> None:
        """Take k/v caches as views of ``storage`` [2, B, n_kv_head, S, head_dim] (a model-wide buffer)."""
        self.k_cache, self.v_cache = storage[0], storage[1]

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal self-attention over ``x`` (no cache) or attention to the cache under ``mask`` [B|1, 1, T, S];
        with a cache, ``x`` belongs to cache rows ``rows`` [B] (default: the leading B rows)."""
        bsz, seqlen, _ = x.shape
        kv_size = self.n_kv_head * self.head_dim
        xq, xk, xv = self.wqkv(x).split([self.dim, kv_size, kv_size], dim=-1)
        xq = apply_rotary_emb(xq.view(bsz, seqlen, self.n_head, self.head_dim), cos, sin)
        xk = apply_rotary_emb(xk.view(bsz, seqlen, self.n_kv_head, self.head_dim), cos, sin)
        xv = xv.view(bsz, seqlen, self.n_kv_head, self.head_dim)
        xq, xk, xv = (t.transpose(1, 2) for t in (xq, xk, xv))
        keys, values = xk, xv
        if slots is not None and rows is None:
            keys, values = self.k_cache[:bsz], self.v_cache[:bsz]
            write_slots(keys, values, xk, xv, slots)
        elif slots is not None:
            write_slots(self.k_cache, self.v_cache, xk, xv, slots, rows)
            keys, values = self.k_cache[rows], self.v_cache[rows]
        if self.n_kv_head != self.n_head:
            keys = keys.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            values = values.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        out = F.scaled_dot_product_attention(
            xq,
            keys,
            values,
            attn_mask=mask,
            is_causal=mask is None,
            dropout_p=self.attn_dropout_p if self.training else 0.0,
        )
        out = out.transpose(1, 2).contiguous().view(bsz, seqlen, self.dim)
        return self.resid_dropout(self.wo(out))


class TransformerBlock(nn.Module):
    """LlamaGen's pre-norm block: ``h = x + attn(norm(x)); out = h + ffn(norm(h))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Apply attention and MLP with residuals."""
        h = x + self.attention(self.attention_norm(x), cos, sin, slots, mask, rows)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """LlamaGen's class embedding; row ``num_classes`` is the null class for CFG."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels [B] -> embeddings [B, 1, dim]."""
        return self.embedding_table(labels).unsqueeze(1)


class MLP(nn.Module):
    """LlamaGen's caption projection: fc1, tanh-GELU, fc2, no biases."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project caption features."""
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """LlamaGen's t2i condition: projected caption features and a learned null caption (a persistent buffer)."""

    def __init__(self, caption_dim: int, dim: int, token_num: int) -> None:
        super().__init__()
        self.cap_proj = MLP(caption_dim, dim, dim)
        # LlamaGen registers this as a buffer (it is in the state dict but not trained).
        self.register_buffer("uncond_embedding", torch.randn(token_num, caption_dim) / caption_dim**0.5)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        """Caption features [B, N, caption_dim] -> [B, N, dim]."""
        return self.cap_proj(caption)


class GPT(nn.Module):
    """LlamaGen-compatible AR image transformer with an uncached forward and a cached ``step`` for decoding."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        if config.model_type == "c2i":
            self.cls_embedding: nn.Module = LabelEmbedder(config.num_classes, config.dim)
        else:
            self.cls_embedding = CaptionEmbedder(config.caption_dim, config.dim, config.cls_token_num)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self._kv: torch.Tensor | None = None  # all layers' k/v, allocated by setup_cache
        self._cond_valid: torch.Tensor | None = None  # t2i caption padding, see set_condition_mask
        # Plain float32 attributes (like LlamaGen's freqs_cis): not in state_dict, not cast by .to(dtype).
        self._rope_cos, self._rope_sin = precompute_rope_2d(
            config.head_dim, config.block_size, config.grid_cols, config.cls_token_num, config.rope_base
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """LlamaGen's init: N(0, initializer_range) for every Linear/Embedding weight, zero output head."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        nn.init.zeros_(self.output.weight)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for sequence ``positions`` (table moved to their device once)."""
        if self._rope_cos.device != positions.device:
            self._rope_cos = self._rope_cos.to(positions.device)
            self._rope_sin = self._rope_sin.to(positions.device)
        return self._rope_cos[positions], self._rope_sin[positions]

    def drop_labels(self, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Classifier-free-guidance dropout: replace each condition by the null one with prob class_dropout_prob.

        As LlamaGen's ``token_drop`` (labels -> ``num_classes``; t2i captions -> ``uncond_embedding``), but
        called explicitly by the trainer so that ``embed_cond`` and inference are never stochastic.
        """
        drop = torch.rand(cond.shape[0], generator=generator, device=cond.device) < self.config.class_dropout_prob
        if self.config.model_type == "c2i":
            return torch.where(drop, torch.full_like(cond, self.config.null_class), cond)
        null = self.cls_embedding.uncond_embedding.to(cond.dtype)
        return torch.where(drop[:, None, None], null, cond)

    def null_cond(self, batch: int) -> torch.Tensor:
        """The unconditional condition for ``batch`` rows: null-class labels (c2i) or the null caption (t2i)."""
        device = self.tok_embeddings.weight.device
        if self.config.model_type == "c2i":
            return torch.full((batch,), self.config.null_class, dtype=torch.long, device=device)
        return self.cls_embedding.uncond_embedding.unsqueeze(0).expand(batch, -1, -1)

    def prepare_condition(self, cond: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """User conditions → (tensor, padding mask or None): class labels [B] (c2i) or ``Captions`` /
        caption features [B, n, caption_dim] (t2i, left-padded to cls_token_num); one-line errors."""
        from cascade_sd.models.adapters.llamagen import Captions

        cfg = self.config
        if cfg.model_type == "t2i":
            features, valid = (cond.features, cond.valid) if isinstance(cond, Captions) else (cond, None)
            caps = Captions.from_arrays(features, valid, tokens=cfg.cls_token_num, dim=cfg.caption_dim)
            return caps.features, caps.valid
        if isinstance(cond, Captions):
            raise ConfigError("captions were given but the target is class-conditional (c2i); pass labels")
        labels = torch.as_tensor(cond, dtype=torch.long).reshape(-1)
        bad = labels[(labels < 0) | (labels >= cfg.num_classes)]
        if bad.numel():
            raise ConfigError(f"labels: {int(bad[0])} is out of range; allowed 0..{cfg.num_classes - 1}")
        return labels, None

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """The unconditional counterpart of ``cond`` for CFG (here independent of its content)."""
        return self.null_cond(cond.shape[0])

    def embed_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """Condition -> embeddings [B, cls_token_num, dim]; c2i labels [B] (num_classes = null), t2i features."""
        cfg = self.config
        if cfg.model_type == "c2i":
            if cond.dim() != 1 or cond.dtype != torch.long:
                raise ValueError(
                    f"c2i condition must be a LongTensor [B] of labels, got {cond.dtype} {tuple(cond.shape)}"
                )
            return self.cls_embedding(cond)
        if cond.dim() != 3 or tuple(cond.shape[1:]) != (cfg.cls_token_num, cfg.caption_dim):
            raise ValueError(
                f"t2i condition must be [B, {cfg.cls_token_num}, {cfg.caption_dim}], got {tuple(cond.shape)}"
            )
        return self.cls_embedding(cond.to(self.tok_embeddings.weight.dtype))

    def set_condition_mask(self, valid: torch.Tensor | None) -> None:
        """t2i caption padding: ``valid`` [B, cls_token_num] (False = padding) for every stream row, or None;
        applies to ``forward`` and ``step`` (see ``hide_condition_padding``)."""
        self._cond_valid = valid

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens [B, T] -> embeddings [B, T, dim]."""
        return self.tok_embeddings(tokens)

    def forward(
        self, cond: torch.Tensor, tokens: torch.Tensor, *, return_hidden: bool = False, return_layers: bool = False
    ) -> GPTOutput:
        """Uncached causal pass over [condition, tokens]; output i (of m+1) predicts image token i.

        Outputs start at the last condition position, as LlamaGen's ``logits[:, cls_token_num - 1:]``.
        """
        cfg = self.config
        if tokens.dim() != 2 or tokens.shape[1] > cfg.block_size:
            raise ValueError(f"tokens must be [B, m] with m <= block_size={cfg.block_size}, got {tuple(tokens.shape)}")
        h = torch.cat([self.embed_cond(cond), self.embed_tokens(tokens)], dim=1)
        h = self.tok_dropout(h)
        seq = torch.arange(h.shape[1], device=h.device)
        cos, sin = self._rope(seq)
        mask = None
        if self._cond_valid is not None:
            causal = prefix_mask(1, h.shape[1], 0, h.shape[1], h.device)
            mask = hide_condition_padding(causal, seq, self._cond_valid, h.shape[0]).unsqueeze(1)
        start = cfg.cls_token_num - 1
        layers: list[torch.Tensor] = []
        for layer in self.layers:
            h = layer(h, cos, sin, mask=mask)
            if return_layers:
                layers.append(h[:, start:])
        h = self.norm(h[:, start:])
        return GPTOutput(
            logits=at_least_float32(self.output(h)),
            hidden=h if return_hidden else None,
            layers=layers if return_layers else None,
        )

    def setup_cache(
        self,
        max_batch_size: int,
        max_seq_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Allocate zeroed per-layer k/v caches [max_batch_size, n_kv_head, max_seq_len, head_dim].

        ``max_seq_len`` counts condition and image slots (and any scratch slots a draft tree needs).
        Default dtype/device: those of the weights. The cache is not moved by ``.to()``; call again.
        """
        weight = self.output.weight
        # One buffer for all layers, so compaction (copy_cache) is a single indexed copy.
        self._kv = self.layers[0].attention.cache_storage(max_batch_size, max_seq_len, dtype or weight.dtype,
                                                          device or weight.device, n_layers=len(self.layers))
        for layer, storage in zip(self.layers, self._kv):
            layer.attention.use_cache(storage)

    @property
    def cache_shape(self) -> tuple[int, int] | None:
        """(max_batch_size, max_seq_len) of the allocated cache, or None before ``setup_cache``."""
        k = self.layers[0].attention.k_cache
        return None if k is None else (k.shape[0], k.shape[2])

    def reset_cache(self) -> None:
        """Zero every cache entry (keeps the allocation) so a new generation starts clean."""
        for layer in self.layers:
            if layer.attention.k_cache is not None:
                layer.attention.k_cache.zero_()
                layer.attention.v_cache.zero_()

    def _require_cache(self, batch: int) -> tuple[int, int]:
        """Return the cache shape, raising if it is missing or too small for ``batch`` rows."""
        return require_cache(self.cache_shape, batch, "GPT")

    def step(
        self,
        x: torch.Tensor,
        *,
        positions: torch.Tensor,
        slots: torch.Tensor,
        attn_mask: torch.Tensor,
        return_hidden: bool = True,
        return_layers: bool = False,
        rows: torch.Tensor | None = None,
    ) -> GPTOutput:
        """Cached pass over embedded inputs ``x`` [B, T, dim]: write k/v at ``slots``, attend where ``attn_mask``.

        ``positions`` ([T] or [B, T]) are sequence positions for 2D RoPE (< cls_token_num: condition, no
        rotation); ``slots`` ([T] or [B, T]) are cache entries to write; ``attn_mask`` [B|1, T, S] (True =
        may attend, S = cache length) must let every query see at least itself. ``rows`` [B]: the cache
        rows ``x`` belongs to (default: the leading B rows; the engine prefills images that join a
        running batch this way). Logits [B, T, V] float32.
        """
        bsz, T, _ = x.shape
        max_rows, S = self._require_cache(bsz)
        check_step_inputs(bsz, T, S, positions, slots, attn_mask)
        check_rows(rows, bsz, max_rows)
        cos, sin = self._rope(positions)
        if self._cond_valid is not None:
            valid = self._cond_valid if rows is None else self._cond_valid[rows]
            attn_mask = hide_condition_padding(attn_mask, slots, valid, bsz)
        mask = attn_mask.unsqueeze(1)
        h = self.tok_dropout(x)
        layers: list[torch.Tensor] = []
        for layer in self.layers:
            h = layer(h, cos, sin, slots, mask, rows)
            if return_layers:
                layers.append(h)
        h = self.norm(h)
        return GPTOutput(
            logits=at_least_float32(self.output(h)),
            hidden=h if return_hidden else None,
            layers=layers if return_layers else None,
        )

    def copy_cache(self, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """For each row b, copy every layer's k/v from ``src_slots[b]`` to ``dst_slots[b]`` (both [B, K]).

        Used to compact an accepted draft-tree path into consecutive slots without recomputing it.
        """
        self._require_cache(src_slots.shape[0])
        copy_slots(self._kv, src_slots, dst_slots)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep cache rows ``rows`` (and their condition padding), in this order, as rows 0..len−1:
        the engine drops images that finished decoding from the batch."""
        self._require_cache(rows.numel())
        keep_rows(self._kv, rows, dim=2)
        if self._cond_valid is not None:
            self._cond_valid = self._cond_valid[rows]


def save_gpt(path: str | os.PathLike, model: GPT, extra: Mapping[str, Any] | None = None) -> str:
    """Write ``model`` as a package checkpoint of kind "gpt"; return its content hash."""
    return save_checkpoint(path, "gpt", model.config.to_dict(), model.state_dict(), extra)


def load_gpt(path: str | os.PathLike) -> tuple[GPT, Checkpoint]:
    """Load a package GPT checkpoint (config, strict weights, hash verified); the model is in eval mode."""
    ckpt = load_checkpoint(path, "gpt")
    try:
        config = GPTConfig.from_dict(ckpt.config)
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path}: invalid GPT config ({exc})") from None
    model = GPT(config)
    load_state_strict(model, ckpt.state_dict, str(path))
    return model.eval(), ckpt


def load_llamagen_gpt(
    path: str | os.PathLike, config: GPTConfig, trusted: bool = False, *, prefer_ema: bool = False
) -> GPT:
    """Load a LlamaGen GPT file (``model``/``ema``/bare state dict) into a GPT built from ``config``; eval mode."""
    state = load_external_state_dict(path, trusted=trusted, prefer_ema=prefer_ema)
    model = GPT(config)
    load_state_strict(model, state, str(path))
    return model.eval()
