"""In-domain judge (DESIGN 2): a small CNN classifier whose accuracy scores fidelity and whose
penultimate features feed the in-domain FID/KID."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch
from torch import nn

from cascade_sd.errors import CheckpointError, ConfigError, check_range
from cascade_sd.models.checkpoint import Checkpoint, load_checkpoint, load_state_strict, save_checkpoint


@dataclass
class JudgeConfig:
    """Architecture of the judge: conv stages (conv-BN-ReLU-maxpool), a feature layer, a classifier."""

    channels: tuple[int, ...] = (16, 32, 64)
    feature_dim: int = 128
    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 32

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)

    def validate(self) -> "JudgeConfig":
        """Raise ConfigError on the first invalid field; return self for chaining."""
        if not self.channels:
            raise ConfigError("judge.channels=() is not allowed; give at least one stage width")
        for c in self.channels:
            check_range("judge.channels", c, 1)
        check_range("judge.feature_dim", self.feature_dim, 1)
        check_range("judge.num_classes", self.num_classes, 2)
        check_range("judge.in_channels", self.in_channels, 1)
        check_range("judge.image_size", self.image_size, 1)
        stride = 2 ** len(self.channels)
        if self.image_size % stride:
            raise ConfigError(
                f"judge.image_size={self.image_size} is not allowed; it must be divisible by 2**len(channels)={stride}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (channels as a list)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "JudgeConfig":
        """Build and validate from a dict; unknown keys are a ConfigError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"judge.{unknown[0]} is not a judge setting; allowed keys: {', '.join(sorted(known))}")
        return cls(**dict(d)).validate()


class Judge(nn.Module):
    """CNN classifier for images in [-1, 1]; ``features`` is the penultimate layer used for FID/KID."""

    def __init__(self, config: JudgeConfig) -> None:
        super().__init__()
        self.config = config.validate()
        layers: list[nn.Module] = []
        c_in = config.in_channels
        for c_out in config.channels:
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.stages = nn.Sequential(*layers)
        side = config.image_size // 2 ** len(config.channels)
        self.feature = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, config.feature_dim), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [B, feature_dim] of images [B, in_channels, S, S] in [-1, 1]."""
        return self.feature(self.stages(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_classes]."""
        return self.classifier(self.features(x))


def save_judge(path: str | os.PathLike, judge: Judge, extra: Mapping[str, Any] | None = None) -> str:
    """Write the judge checkpoint (config + weights + hash) atomically; return its hash."""
    return save_checkpoint(path, "judge", judge.config.to_dict(), judge.state_dict(), extra)


def load_judge(path: str | os.PathLike) -> tuple[Judge, Checkpoint]:
    """Load a judge checkpoint into a fresh Judge in eval mode; a config/weights mismatch is a CheckpointError."""
    ckpt = load_checkpoint(path, "judge")
    try:
        config = JudgeConfig.from_dict(ckpt.config)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: invalid judge config ({exc})") from None
    judge = Judge(config)
    load_state_strict(judge, ckpt.state_dict, str(path))
    return judge.eval(), ckpt
