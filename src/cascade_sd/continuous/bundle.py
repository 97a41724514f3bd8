"""The continuous bundle (autoencoder, target, draft) and its decode entry, behind ``cascade_sd.api``.

A continuous bundle folder holds ``autoencoder.pt``, ``target.pt`` and ``draft.pt``; the AR models
record the autoencoder's hash, and the draft must match the target's latent size and head schedule.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cascade_sd.continuous.decoding import ContinuousSampling, check_cspd_params, cspd_decode, vanilla_continuous
from cascade_sd.continuous.model import ContinuousAE, ContinuousAR, check_pair, load_autoencoder, load_continuous
from cascade_sd.decoding.vanilla import DecodeResult
from cascade_sd.errors import CheckpointError, ConfigError, check_choice

FILES = {"autoencoder": "autoencoder.pt", "target": "target.pt", "draft": "draft.pt"}
METHODS = ("vanilla", "cspd")


@dataclass
class ContinuousBundle:
    """Loaded continuous models; ``draft`` is None in a target-only folder (vanilla decoding only)."""

    name: str
    autoencoder: ContinuousAE
    target: ContinuousAR
    draft: ContinuousAR | None = None


def load_continuous_bundle(folder: str | os.PathLike, *, device: str | torch.device = "cpu") -> ContinuousBundle:
    """Load a continuous bundle folder; hashes and the draft/target pairing are checked before use."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"bundle={str(folder)!r} is not a folder; a continuous bundle holds "
                          f"{', '.join(FILES.values())}")
    for role in ("autoencoder", "target"):
        if not (folder / FILES[role]).is_file():
            raise CheckpointError(f"bundle {folder}: no {FILES[role]} (train the continuous models first)")
    ae, ae_ckpt = load_autoencoder(folder / FILES["autoencoder"])
    models: dict[str, ContinuousAR] = {}
    for role in ("target", "draft"):
        path = folder / FILES[role]
        if not path.is_file():
            continue
        model, ckpt = load_continuous(path)
        if ckpt.extra.get("autoencoder_hash") != ae_ckpt.hash:
            raise CheckpointError(f"checkpoint {path}: trained on another autoencoder's latents "
                                  f"(autoencoder_hash mismatch); retrain it on {FILES['autoencoder']}")
        models[role] = model.to(device)
    if models["target"].config.latent_dim != ae.config.latent_dim or \
            models["target"].config.grid_size != ae.config.grid_size:
        raise CheckpointError(f"bundle {folder}: target latent size does not match the autoencoder's")
    if "draft" in models:
        check_pair(models["target"], models["draft"])
    return ContinuousBundle(str(folder), ae.to(device), models["target"], models.get("draft"))


def decode_continuous(bundle: ContinuousBundle, labels: Any, *, method: str = "cspd", seed: int = 0,
                      temperature: float = 1.0, cfg_scale: float = 1.0, gamma: int = 4, prefill: float = 0.15,
                      ratio_temperature: float = 1.0, max_tries: int = 4096) -> DecodeResult:
    """Decode one image per label with ``vanilla`` or ``cspd``; everything is validated before compute."""
    check_choice("method", method, METHODS)
    params = ContinuousSampling(cfg_scale=cfg_scale, temperature=temperature)
    check_cspd_params(gamma, prefill, ratio_temperature)
    device = bundle.target.tok_in.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).to(device)
    if method == "vanilla":
        result = vanilla_continuous(bundle.target, labels, params, generator=gen)
    else:
        if bundle.draft is None:
            raise CheckpointError(f"bundle {bundle.name}: no {FILES['draft']}; method 'cspd' needs a draft model")
        result = cspd_decode(bundle.target, bundle.draft, labels, params, gamma=gamma, prefill=prefill,
                             ratio_temperature=ratio_temperature, max_tries=max_tries, generator=gen)
    result.stats |= {"method": method, "model": "continuous", "cfg_scale": cfg_scale, "temperature": temperature}
    return result
