"""Toy model family for exactness tests: tiny vocabulary and length, random weights from a seed.

A toy target *is* the package's GPT with a tiny config, so decoding code cannot tell it apart
from the built-in or a LlamaGen target (DESIGN 6). Its output head is re-initialised with a
larger scale so that next-token laws are far from uniform and exactness tests have teeth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cascade_sd.errors import ConfigError
from cascade_sd.models.gpt import GPT, GPTConfig


@dataclass(frozen=True)
class ToySpec:
    """Parsed ``toy:vocab=5,len=3,seed=0`` spec (optional: classes, dim, layers, heads, scale)."""

    vocab: int = 5
    len: int = 3
    seed: int = 0
    classes: int = 2
    dim: int = 16
    layers: int = 1
    heads: int = 2
    scale: float = 0.5

    @classmethod
    def parse(cls, spec: str) -> "ToySpec":
        """Parse the ``toy:key=value,...`` form; unknown keys or bad values are one-line errors."""
        if not spec.startswith("toy:") and spec != "toy":
            raise ConfigError(f"spec={spec!r} is not a toy spec; expected 'toy:vocab=V,len=N,seed=S'")
        fields = {f: type(getattr(cls(), f)) for f in cls.__dataclass_fields__}
        kwargs: dict[str, object] = {}
        body = spec[4:] if spec.startswith("toy:") else ""
        for item in filter(None, body.split(",")):
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in fields:
                raise ConfigError(f"toy spec field {key!r} is unknown; allowed: {', '.join(fields)}")
            try:
                kwargs[key] = fields[key](value)
            except ValueError:
                raise ConfigError(f"toy spec {key}={value!r} is not a valid {fields[key].__name__}") from None
        out = cls(**kwargs)
        for key in ("vocab", "len", "classes", "dim", "layers", "heads"):
            if getattr(out, key) < 1:
                raise ConfigError(f"toy spec {key}={getattr(out, key)} is out of range; allowed >= 1")
        if out.vocab < 2:
            raise ConfigError(f"toy spec vocab={out.vocab} is out of range; allowed >= 2")
        return out

    def gpt_config(self) -> GPTConfig:
        """The GPT config of this toy target (1-row grid of ``len`` tokens)."""
        return GPTConfig(
            dim=self.dim, n_layer=self.layers, n_head=self.heads, multiple_of=8, vocab_size=self.vocab, block_size=self.len,
            grid_width=self.len, num_classes=self.classes, cls_token_num=1, token_dropout_p=0.0,
            resid_dropout_p=0.0, ffn_dropout_p=0.0, attn_dropout_p=0.0, class_dropout_prob=0.0,
        )


def toy_target(spec: str | ToySpec) -> GPT:
    """A toy GPT with seeded random weights and a sharpened output head, in eval mode."""
    spec = ToySpec.parse(spec) if isinstance(spec, str) else spec
    gen = torch.Generator().manual_seed(spec.seed)
    model = GPT(spec.gpt_config())
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 if p.dim() > 1 else p)
        model.output.weight.copy_(torch.randn(model.output.weight.shape, generator=gen) * spec.scale / spec.dim**0.5)
    return model.eval()
