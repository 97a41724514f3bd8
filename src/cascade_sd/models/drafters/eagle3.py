"""EAGLE-3 drafter (arXiv 2503.01840): fuses low, middle and high target layers; trained with training-time test."""

from __future__ import annotations

import torch
from torch import nn

from cascade_sd.models.drafters.base import Drafter, DrafterConfig
from cascade_sd.models.gpt import GPTOutput, RMSNorm, at_least_float32


class Eagle3Drafter(Drafter):
    """EAGLE-3 style: ``fc_fuse`` over the concatenated target layers, then the EAGLE body and its own final norm."""

    arch = "eagle3"

    def __init__(self, config: DrafterConfig) -> None:
        super().__init__(config)
        # EAGLE-3 fuses the three layer outputs with one bias-free linear map (its ``fc``).
        self.fc_fuse = nn.Linear(len(config.target_layers) * config.dim, config.dim, bias=False)
        # Its outputs are not post-norm target features, so it norms before the head (EAGLE-3's ``norm``).
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # Fused layers and its own outputs are raw residual streams: EAGLE-3 norms the incoming feature
        # (its midlayer's ``hidden_norm``) before joining it with the token embedding.
        self.hidden_norm = RMSNorm(config.dim, config.norm_eps)

    @property
    def needs_layers(self) -> bool:
        """Always True: the fused feature reads the target's per-layer outputs."""
        return True

    def fuse(self, layers: torch.Tensor) -> torch.Tensor:
        """Fused feature [B, T, dim] from the selected layer outputs stacked as [B, T, 3, dim] (low, mid, high)."""
        return self.fc_fuse(layers.flatten(-2).to(self.fc_fuse.weight.dtype))

    def target_features(self, out: GPTOutput) -> torch.Tensor:
        """fc_fuse(cat(out.layers[i] for i in target_layers)) (call the target with return_layers=True)."""
        ids = self.config.target_layers
        if out.layers is None or len(out.layers) <= max(ids):
            have = "none" if out.layers is None else len(out.layers)
            raise ValueError(f"eagle3 drafter needs target layers {ids} (got {have}); call the target with "
                             "return_layers=True")
        return self.fuse(torch.stack([out.layers[i] for i in ids], dim=-2))

    def input_feature(self, h: torch.Tensor) -> torch.Tensor:
        """RMSNorm of the incoming feature (EAGLE-3's ``hidden_norm``)."""
        return self.hidden_norm(h)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Own RMSNorm, then the target's head."""
        return at_least_float32(self.output(self.norm(h)))
