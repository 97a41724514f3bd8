"""Checkpoint container: weights + the config that built them + a content hash (DESIGN 11).

Two on-disk formats are read:
- the package's own: ``{"format": FORMAT, "kind", "config", "state_dict", "hash", "extra"}``;
- LlamaGen's training format: a dict with ``model`` (and optionally ``ema``, ``optimizer``,
  ``steps``, an ``argparse.Namespace`` under ``args``), or ``module`` / ``state_dict``, or a bare
  state dict (FSDP export). Known harmless extras are dropped before the strict key check.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from cascade_sd.errors import CheckpointError
from cascade_sd.io import atomic_torch_save

FORMAT = "cascade-sd/1"
KINDS = ("vq", "gpt", "judge", "drafter", "cae", "car")

# Buffers some LlamaGen files carry that the package's modules recompute (llamagen.md).
_KNOWN_EXTRAS = re.compile(r"(^|\.)freqs_cis$|\.kv_cache\.(k_cache|v_cache)$")


def state_hash(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over sorted names, dtypes, shapes and raw bytes of every tensor."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class Checkpoint:
    """A loaded package checkpoint."""

    kind: str
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    hash: str
    extra: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    path: str | os.PathLike,
    kind: str,
    config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Write a checkpoint atomically and return its content hash."""
    if kind not in KINDS:
        raise CheckpointError(f"kind={kind!r} is not allowed; choose one of {', '.join(KINDS)}")
    sd = {k: v.detach().cpu() for k, v in state_dict.items()}
    digest = state_hash(sd)
    atomic_torch_save(
        {
            "format": FORMAT,
            "kind": kind,
            "config": dict(config),
            "state_dict": sd,
            "hash": digest,
            "extra": dict(extra or {}),
        },
        path,
    )
    return digest


def read_external(path: Path, trusted: bool) -> Any:
    """``torch.load`` on CPU: weights_only with argparse.Namespace allow-listed unless ``trusted``; one-line errors."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    try:
        if trusted:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # torch raises many types for truncated/corrupt/unsafe files
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Weights only load failed" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(
                f"checkpoint {path}: contains pickled objects beyond tensors and argparse.Namespace; "
                "pass --trusted-checkpoint only if you trust its source"
            ) from None
        raise CheckpointError(f"checkpoint {path}: corrupt or truncated file ({type(exc).__name__}: {msg[:120]})") from None


def load_checkpoint(path: str | os.PathLike, kind: str) -> Checkpoint:
    """Load a package checkpoint of ``kind``, verifying format, kind and content hash."""
    path = Path(path)
    obj = read_external(path, trusted=False)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: not a cascade-sd checkpoint (format={FORMAT!r} expected)")
    if obj.get("kind") != kind:
        raise CheckpointError(f"checkpoint {path}: kind={obj.get('kind')!r}, expected {kind!r}")
    sd = obj["state_dict"]
    digest = state_hash(sd)
    if digest != obj.get("hash"):
        raise CheckpointError(f"checkpoint {path}: content hash mismatch (file modified or corrupt)")
    return Checkpoint(kind=kind, config=dict(obj["config"]), state_dict=sd, hash=digest, extra=dict(obj.get("extra", {})))


def extract_state_dict(obj: Any, *, prefer_ema: bool = False) -> dict[str, torch.Tensor]:
    """Pull the model state dict out of a LlamaGen-style container and drop known extras."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a dict of tensors")
    if prefer_ema and "ema" in obj:
        sd = obj["ema"]
    elif "model" in obj:
        sd = obj["model"]
    elif "module" in obj:
        sd = obj["module"]
    elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        sd = obj["state_dict"]
    else:
        sd = obj
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError("checkpoint state dict holds non-tensor values; expected model weights")
    return {k: v for k, v in sd.items() if not _KNOWN_EXTRAS.search(k)}


def load_external_state_dict(
    path: str | os.PathLike, *, trusted: bool = False, prefer_ema: bool = False
) -> dict[str, torch.Tensor]:
    """Read a LlamaGen-format file (weights_only, argparse.Namespace allow-listed)."""
    return extract_state_dict(read_external(Path(path), trusted), prefer_ema=prefer_ema)


def load_state_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming missing/unexpected/mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(
                f"{len(shapes)} mis-shaped (e.g. {k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)})"
            )
        raise CheckpointError(f"checkpoint {source}: does not match the model: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)
