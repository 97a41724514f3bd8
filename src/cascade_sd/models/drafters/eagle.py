"""EAGLE-1/2 drafter (arXiv 2401.15077): fc over [token embedding; target last hidden state] → one layer → head."""

from __future__ import annotations

import torch

from cascade_sd.models.drafters.base import Drafter
from cascade_sd.models.gpt import GPTOutput, at_least_float32


class EagleDrafter(Drafter):
    """EAGLE-1 style: the feature is the target's final normed hidden state; no norm before the head."""

    arch = "eagle"

    def target_features(self, out: GPTOutput) -> torch.Tensor:
        """The target's final normed hidden state (call the target with return_hidden=True)."""
        if out.hidden is None:
            raise ValueError("eagle drafter needs the target's hidden state; call the target with return_hidden=True")
        return out.hidden

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The target's head applied directly: ĥ regresses onto post-norm target features (EAGLE-1's code)."""
        return at_least_float32(self.output(h))
