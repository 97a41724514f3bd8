"""Built-in continuous-token models (DESIGN 5): an autoencoder with a grid of latent vectors and an AR
transformer over those vectors with a per-token head (MAR-style diffusion MLP, or closed-form
Gaussian). The trunk reuses the target's LlamaGen blocks and 2D RoPE; only the token interface
differs (a linear embedding of vectors instead of a code table, a head instead of logits).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch
from torch import nn

from cascade_sd.continuous.heads import DiffusionHead, GaussianHead
from cascade_sd.errors import CheckpointError, ConfigError, check_choice, check_int, check_range
from cascade_sd.models.checkpoint import Checkpoint, load_checkpoint, load_state_strict, save_checkpoint
from cascade_sd.models.gpt import (
    GPTConfig, LabelEmbedder, RMSNorm, TransformerBlock, precompute_rope_2d, require_cache,
)
from cascade_sd.models.vq import Decoder, Encoder, VQConfig

HEADS = ("diffusion", "gaussian")


def _from_dict(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    """Build a config dataclass, rejecting unknown keys by name (one-line error)."""
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{prefix}.{key} is not a field; allowed: {', '.join(sorted(known))}")
    return cls(**data)


@dataclass
class ContinuousConfig:
    """AR model over a ``grid_size``² grid of ``latent_dim``-vectors, class-conditional (null class = num_classes)."""

    latent_dim: int = 4
    grid_size: int = 8
    num_classes: int = 10
    dim: int = 256
    n_layer: int = 6
    n_head: int = 4
    head: str = "diffusion"
    head_width: int = 256
    head_blocks: int = 3
    train_steps: int = 1000
    sample_steps: int = 12
    class_dropout_prob: float = 0.1
    dropout_p: float = 0.0

    def __post_init__(self) -> None:
        for name in ("latent_dim", "grid_size", "num_classes", "dim", "n_layer", "n_head", "head_width",
                     "head_blocks", "train_steps", "sample_steps"):
            check_int(f"continuous.{name}", getattr(self, name), 1)
        check_choice("continuous.head", self.head, HEADS)
        if self.dim % self.n_head or (self.dim // self.n_head) % 4:
            raise ConfigError(f"continuous.n_head={self.n_head} is not allowed; dim={self.dim} must split into "
                              "heads whose width is a multiple of 4 (2D RoPE)")
        if self.sample_steps > self.train_steps:
            raise ConfigError(f"continuous.sample_steps={self.sample_steps} is out of range; allowed "
                              f"[1, train_steps={self.train_steps}]")
        check_range("continuous.class_dropout_prob", self.class_dropout_prob, 0.0, 1.0, hi_open=True)
        check_range("continuous.dropout_p", self.dropout_p, 0.0, 1.0, hi_open=True)

    @property
    def tokens(self) -> int:
        """Tokens per image, N = grid_size²."""
        return self.grid_size**2

    def trunk_config(self) -> GPTConfig:
        """The LlamaGen block configuration of the trunk (vocabulary unused: inputs are vectors)."""
        return GPTConfig(dim=self.dim, n_layer=self.n_layer, n_head=self.n_head, multiple_of=32,
                         token_dropout_p=self.dropout_p, resid_dropout_p=self.dropout_p,
                         ffn_dropout_p=self.dropout_p, num_classes=self.num_classes, vocab_size=1,
                         block_size=self.tokens, class_dropout_prob=self.class_dropout_prob)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for checkpoints and MLflow."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ContinuousConfig":
        """Validated config from a dict."""
        return _from_dict(cls, data, "continuous")


def check_pair(target: "ContinuousAR", draft: "ContinuousAR") -> None:
    """Draft and target must emit the same tokens with the same head schedule (aligned trajectories)."""
    t, d = target.config, draft.config
    for name in ("latent_dim", "grid_size", "num_classes", "head", "train_steps", "sample_steps"):
        if getattr(t, name) != getattr(d, name):
            raise ConfigError(f"draft {name}={getattr(d, name)!r} does not match the target's "
                              f"{getattr(t, name)!r}; CSpD needs the same latent size and head schedule")


class ContinuousAR(nn.Module):
    """Class token, then latents 0..N-2 as inputs; the hidden state at input i conditions token i's head."""

    def __init__(self, config: ContinuousConfig) -> None:
        super().__init__()
        self.config = config
        trunk = config.trunk_config()
        self.cls_embedding = LabelEmbedder(config.num_classes, config.dim)
        self.tok_in = nn.Linear(config.latent_dim, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(trunk) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, trunk.norm_eps)
        if config.head == "diffusion":
            self.head: nn.Module = DiffusionHead(config.latent_dim, config.dim, config.head_width,
                                                 config.head_blocks, config.train_steps, config.sample_steps)
        else:
            self.head = GaussianHead(config.latent_dim, config.dim)
        cos, sin = precompute_rope_2d(trunk.head_dim, config.tokens, config.grid_size, 1, trunk.rope_base)
        self._rope_cos, self._rope_sin = cos, sin
        self._kv: torch.Tensor | None = None
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)

    @property
    def null_class(self) -> int:
        """Label of the null (unconditional) class."""
        return self.config.num_classes

    def inputs(self, labels: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Embedded sequence [B, 1 + m, dim]: class token, then latents [B, m, d]."""
        return torch.cat([self.cls_embedding(labels), self.tok_in(latents)], dim=1)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = positions.clamp(max=self._rope_cos.shape[0] - 1)
        return self._rope_cos.to(positions.device)[positions], self._rope_sin.to(positions.device)[positions]

    def forward(self, labels: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Uncached causal pass; hidden [B, m + 1, dim] where row i conditions token i (training)."""
        h = self.inputs(labels, latents)
        cos, sin = self._rope(torch.arange(h.shape[1], device=h.device))
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.norm(h)

    def setup_cache(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate zeroed k/v storage for all layers ([L, 2, B, H, S, hd])."""
        weight = self.tok_in.weight
        self._kv = self.layers[0].attention.cache_storage(max_batch_size, max_seq_len, weight.dtype, weight.device,
                                                          n_layers=len(self.layers))
        for layer, storage in zip(self.layers, self._kv):
            layer.attention.use_cache(storage)

    def step(self, x: torch.Tensor, positions: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """Cached pass over embedded inputs x [B, T, dim] at ``positions`` [B, T] (slot = position);
        ``attn_mask`` [B, T, S] bool. Returns normed hidden states [B, T, dim]."""
        require_cache(None if self._kv is None else (self._kv.shape[2], self._kv.shape[4]), x.shape[0], "continuous")
        cos, sin = self._rope(positions)
        mask = attn_mask.unsqueeze(1)
        h = x
        for layer in self.layers:
            h = layer(h, cos, sin, positions, mask)
        return self.norm(h)

    def loss(self, labels: torch.Tensor, latents: torch.Tensor, *, batch_mul: int = 4,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Head loss over every token of latents [B, N, d], each token repeated ``batch_mul`` times
        with independent noise (MAR's diffusion_batch_mul: the trunk pass is the expensive part)."""
        z = self(labels, latents[:, :-1])
        cond = z.reshape(-1, z.shape[-1]).repeat(batch_mul, 1)
        target = latents.reshape(-1, latents.shape[-1]).repeat(batch_mul, 1)
        return self.head.loss(target, cond, generator)


@dataclass
class AEConfig:
    """Continuous autoencoder: the tokenizer's encoder/decoder (DESIGN 2) without the quantiser."""

    latent_dim: int = 4
    base_channels: int = 16
    ch_mult: tuple[int, ...] = (1, 2, 2)
    res_blocks: int = 1
    z_channels: int = 64
    norm_groups: int = 8
    image_size: int = 32
    latent_noise: float = 0.1

    def __post_init__(self) -> None:
        self.ch_mult = tuple(self.ch_mult)
        check_range("autoencoder.latent_noise", self.latent_noise, 0.0)
        self.vq_config()

    def vq_config(self) -> VQConfig:
        """The encoder/decoder architecture as a VQConfig (its codebook fields are unused)."""
        return VQConfig(codebook_embed_dim=self.latent_dim, base_channels=self.base_channels,
                        encoder_ch_mult=self.ch_mult, decoder_ch_mult=self.ch_mult, z_channels=self.z_channels,
                        enc_num_res_blocks=self.res_blocks, dec_num_res_blocks=self.res_blocks,
                        norm_groups=self.norm_groups, in_channels=1, image_size=self.image_size, codebook_size=1)

    @property
    def grid_size(self) -> int:
        """Side of the latent grid."""
        return self.vq_config().grid_size

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples become lists)."""
        return {**asdict(self), "ch_mult": list(self.ch_mult)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AEConfig":
        """Validated config from a dict."""
        return _from_dict(cls, data, "autoencoder")


class ContinuousAE(nn.Module):
    """Image [B,1,H,W] in [-1,1] ↔ standardised latent tokens [B, N, latent_dim] in raster order."""

    def __init__(self, config: AEConfig) -> None:
        super().__init__()
        self.config = config
        vq = config.vq_config()
        self.encoder = Encoder(vq)
        self.decoder = Decoder(vq)
        self.quant_conv = nn.Conv2d(vq.z_channels, config.latent_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_dim, vq.z_channels, 1)
        # Per-channel statistics of training latents, so tokens have zero mean and unit variance.
        self.register_buffer("latent_mean", torch.zeros(config.latent_dim))
        self.register_buffer("latent_std", torch.ones(config.latent_dim))

    def encode_map(self, x: torch.Tensor) -> torch.Tensor:
        """Raw latent map [B, d, h, w]."""
        return self.quant_conv(self.encoder(x))

    def decode_map(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent map → image (unclamped)."""
        return self.decoder(self.post_quant_conv(z))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images → standardised tokens [B, N, d]."""
        z = self.encode_map(x).flatten(2).transpose(1, 2)
        return (z - self.latent_mean) / self.latent_std

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Standardised tokens [B, N, d] → images in [-1, 1]."""
        side = self.config.grid_size
        if tokens.dim() != 3 or tokens.shape[1:] != (side * side, self.config.latent_dim):
            raise ConfigError(f"latent tokens must be [B, {side * side}, {self.config.latent_dim}], "
                              f"got {tuple(tokens.shape)}")
        z = tokens * self.latent_std + self.latent_mean
        z = z.transpose(1, 2).reshape(tokens.shape[0], self.config.latent_dim, side, side)
        return self.decode_map(z).clamp(-1.0, 1.0)


def save_model(path: str | os.PathLike, model: ContinuousAE | ContinuousAR,
               extra: Mapping[str, Any] | None = None) -> str:
    """Write an autoencoder ("cae") or AR model ("car") checkpoint; return its hash."""
    kind = "cae" if isinstance(model, ContinuousAE) else "car"
    return save_checkpoint(path, kind, model.config.to_dict(), model.state_dict(), extra)


def _load(path: str | os.PathLike, kind: str, build: Any) -> tuple[Any, Checkpoint]:
    ckpt = load_checkpoint(path, kind)
    try:
        model = build(ckpt.config)
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path}: invalid config ({exc})") from None
    load_state_strict(model, ckpt.state_dict, str(path))
    return model.eval(), ckpt


def load_autoencoder(path: str | os.PathLike) -> tuple[ContinuousAE, Checkpoint]:
    """Load a continuous autoencoder checkpoint (hash verified, eval mode)."""
    return _load(path, "cae", lambda c: ContinuousAE(AEConfig.from_dict(c)))


def load_continuous(path: str | os.PathLike) -> tuple[ContinuousAR, Checkpoint]:
    """Load a continuous AR checkpoint (hash verified, eval mode)."""
    return _load(path, "car", lambda c: ContinuousAR(ContinuousConfig.from_dict(c)))
