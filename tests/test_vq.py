"""VQ tokenizer: LlamaGen key/shape compatibility, code helpers, loading, token cache, training loop."""

from __future__ import annotations

import argparse
import math
import re

import numpy as np
import pytest
import torch

from cascade_sd.data.token_cache import read_token_cache, tokenize_images, write_token_cache
from cascade_sd.errors import CheckpointError, ConfigError
from cascade_sd.models.checkpoint import save_checkpoint, state_hash
from cascade_sd.models.vq import VQConfig, VQModel, load_llamagen_vq, load_vq
from cascade_sd.train.tokenizer import train_tokenizer

# --- LlamaGen VQ-16 manifest (llamagen.md, "VQ tokenizer") -------------------------------------
_RES = ("norm1", "conv1", "norm2", "conv2")
_ATTN = ("norm", "q", "k", "v", "proj_out")


def _wb(prefix: str) -> set[str]:
    """Weight and bias keys of one layer."""
    return {f"{prefix}.weight", f"{prefix}.bias"}


def _llamagen_vq16_keys() -> set[str]:
    """Every state-dict key of LlamaGen's VQ-16, written out from the fact sheet's patterns."""
    keys: set[str] = set()
    mid = [f"mid.0.{m}" for m in _RES] + [f"mid.1.{m}" for m in _ATTN] + [f"mid.2.{m}" for m in _RES]
    for side in ("encoder", "decoder"):
        for name in ["conv_in", "norm_out", "conv_out", *mid]:
            keys |= _wb(f"{side}.{name}")
    for level in range(5):
        for j in range(2):
            keys |= set().union(*(_wb(f"encoder.conv_blocks.{level}.res.{j}.{m}") for m in _RES))
        for j in range(3):
            keys |= set().union(*(_wb(f"decoder.conv_blocks.{level}.res.{j}.{m}") for m in _RES))
        if level < 4:
            keys |= _wb(f"encoder.conv_blocks.{level}.downsample.conv")
            keys |= _wb(f"decoder.conv_blocks.{level}.upsample.conv")
    for j in range(2):
        keys |= set().union(*(_wb(f"encoder.conv_blocks.4.attn.{j}.{m}") for m in _ATTN))
    for j in range(3):
        keys |= set().union(*(_wb(f"decoder.conv_blocks.0.attn.{j}.{m}") for m in _ATTN))
    # Width changes (128,128,256,256,512): encoder levels 2 and 4, decoder blocks 1 and 3 (coarse first).
    for prefix in ("encoder.conv_blocks.2", "encoder.conv_blocks.4", "decoder.conv_blocks.1", "decoder.conv_blocks.3"):
        keys |= _wb(f"{prefix}.res.0.nin_shortcut")
    keys |= {"quantize.embedding.weight", "quantize.codebook_used"}
    keys |= _wb("quant_conv") | _wb("post_quant_conv")
    return keys


def _pattern(key: str) -> str:
    """Key with its numeric path components replaced by N."""
    return re.sub(r"\.\d+(?=\.)", ".N", key)


@pytest.fixture(scope="module")
def vq16_state() -> tuple[dict[str, torch.Tensor], int]:
    """State dict and parameter count of a full-size VQ-16 built on the meta device (no memory)."""
    with torch.device("meta"):
        model = VQModel(VQConfig.preset("VQ-16"))
    return model.state_dict(), sum(p.numel() for p in model.parameters())


def _tiny(**overrides: object) -> VQModel:
    """Seeded random tiny tokenizer."""
    torch.manual_seed(0)
    return VQModel(VQConfig.preset("tiny", **overrides))


def _micro() -> VQConfig:
    """A very small config for loop tests (same code paths as tiny)."""
    return VQConfig.preset(
        "tiny", base_channels=8, norm_groups=4, z_channels=16, codebook_size=64,
        encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2), image_size=16,
        enc_num_res_blocks=1, dec_num_res_blocks=1,
    )


# --- architecture ----------------------------------------------------------------------------
def test_vq16_matches_llamagen_names_and_shapes(vq16_state):
    sd, n_params = vq16_state
    expected = _llamagen_vq16_keys()
    assert set(sd) == expected
    assert {_pattern(k) for k in sd} == {_pattern(k) for k in expected}
    shapes = {
        "quantize.embedding.weight": (16384, 8),
        "quantize.codebook_used": (65536,),
        "quant_conv.weight": (8, 256, 1, 1),
        "post_quant_conv.weight": (256, 8, 1, 1),
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.conv_out.weight": (256, 512, 3, 3),
        "decoder.conv_in.weight": (512, 256, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
        "encoder.conv_blocks.4.attn.1.q.weight": (512, 512, 1, 1),
        "decoder.conv_blocks.0.attn.2.proj_out.weight": (512, 512, 1, 1),
        "decoder.conv_blocks.4.res.2.conv2.weight": (128, 128, 3, 3),
        "encoder.conv_blocks.3.downsample.conv.weight": (256, 256, 3, 3),
        "decoder.conv_blocks.3.upsample.conv.weight": (128, 128, 3, 3),
        "encoder.conv_blocks.2.res.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.conv_blocks.4.res.0.nin_shortcut.weight": (512, 256, 1, 1),
        "decoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.conv_blocks.3.res.0.nin_shortcut.weight": (128, 256, 1, 1),
        "encoder.mid.1.q.weight": (512, 512, 1, 1),
        "decoder.norm_out.weight": (128,),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert abs(n_params - 72e6) / 72e6 < 0.02


def test_presets_and_grid():
    assert VQConfig.preset("VQ-16").downsample == 16 and VQConfig.preset("VQ-16").grid_size == 16
    assert VQConfig.preset("VQ-8").downsample == 8 and VQConfig.preset("VQ-8").grid_size == 32
    tiny = VQConfig.preset("tiny")
    assert (tiny.downsample, tiny.grid_size, tiny.codebook_size) == (4, 8, 2048)
    assert VQConfig.from_dict(tiny.to_dict()) == tiny
    assert VQConfig.preset("tiny", codebook_size=512).codebook_size == 512


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="norm_groups") as exc:
        VQConfig.preset("tiny", norm_groups=6)
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="bogus"):
        VQConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="codebook_size"):
        VQConfig.preset("tiny", codebook_size=0)
    with pytest.raises(ConfigError, match="preset"):
        VQConfig.preset("VQ-32")


# --- code helpers ----------------------------------------------------------------------------
def test_tiny_encode_decode_shapes():
    model = _tiny().eval()
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    codes = model.encode_to_codes(x)
    assert codes.shape == (3, 64) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < 2048
    img = model.decode_codes(codes)
    assert img.shape == (3, 1, 32, 32) and float(img.abs().max()) <= 1.0
    assert model.codebook_vectors().shape == (2048, 8)
    assert torch.allclose(model.codebook_vectors().norm(dim=1), torch.ones(2048), atol=1e-5)


def test_codebook_rows_quantise_to_themselves_in_raster_order():
    model = _tiny().eval()
    codes = torch.randint(0, 2048, (2, 64), generator=torch.Generator().manual_seed(2))
    rows = model.codebook_vectors()[codes]  # [2, 64, 8], raster order
    latent = rows.view(2, 8, 8, 8).permute(0, 3, 1, 2)  # [B, D, h, w]
    with torch.no_grad():
        z_q, indices, _ = model.quantize(latent)
    assert torch.equal(indices.view(2, 64), codes)
    assert torch.allclose(z_q, latent, atol=1e-6)


def test_straight_through_gradient_reaches_encoder():
    model = _tiny().train()
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    recon, losses = model(x)
    assert set(losses) == {"vq_loss", "commit_loss", "entropy_loss", "codebook_usage"}
    (recon - x).pow(2).mean().backward()  # reconstruction only: must pass the quantiser
    grad = model.encoder.conv_in.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is None
    model.zero_grad()
    _, losses = model(x)
    losses["vq_loss"].backward()
    assert model.quantize.embedding.weight.grad.abs().sum() > 0


# --- loading ---------------------------------------------------------------------------------
def test_llamagen_format_checkpoint_loads(tmp_path):
    model = _tiny().eval()
    path = tmp_path / "vq_tiny.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
            "steps": 10,
            "args": argparse.Namespace(vq_model="VQ-16", codebook_size=2048),
        },
        path,
    )
    loaded = load_llamagen_vq(path, VQConfig.preset("tiny"))
    assert state_hash(loaded.state_dict()) == state_hash(model.state_dict())
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    assert torch.equal(loaded.encode_to_codes(x), model.encode_to_codes(x))
    no_usage = load_llamagen_vq(path, VQConfig.preset("tiny", codebook_show_usage=False))
    assert "quantize.codebook_used" not in no_usage.state_dict()


def test_misshaped_llamagen_checkpoint_is_one_line_error(tmp_path):
    path = tmp_path / "vq_512.pt"
    torch.save({"model": _tiny(codebook_size=512).state_dict(), "steps": 1}, path)
    with pytest.raises(CheckpointError, match="quantize.embedding.weight") as exc:
        load_llamagen_vq(path, VQConfig.preset("tiny"))
    assert "\n" not in str(exc.value)


def test_package_checkpoint_round_trip(tmp_path):
    model = _tiny(codebook_size=512).eval()
    path = tmp_path / "vq.ckpt"
    digest = save_checkpoint(path, "vq", model.config.to_dict(), model.state_dict())
    loaded, ckpt = load_vq(path)
    assert ckpt.hash == digest and loaded.config == model.config
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    assert torch.equal(loaded.encode_to_codes(x), model.encode_to_codes(x))


# --- token cache -----------------------------------------------------------------------------
def test_token_cache_round_trip_and_rejections(tmp_path):
    model = _tiny(codebook_size=512)
    images = torch.randint(0, 256, (5, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    codes = tokenize_images(model, images, batch_size=2)
    assert codes.dtype == np.int16 and codes.shape == (5, 64)
    assert model.training  # mode restored
    expected = model.encode_to_codes(images.float() / 127.5 - 1.0)
    assert torch.equal(torch.from_numpy(codes).long(), expected)

    digest = state_hash(model.state_dict())
    labels = np.arange(5) % 10
    path = tmp_path / "tokens.npz"
    write_token_cache(path, digest, 8, 512, codes, labels, codes[:2], labels[:2])
    cache = read_token_cache(path, expect_vq_hash=digest)
    assert torch.equal(cache.train_codes, expected) and cache.train_codes.dtype == torch.long
    assert cache.test_labels.tolist() == [0, 1]
    assert (cache.grid_size, cache.codebook_size, cache.vq_hash) == (8, 512, digest)

    with pytest.raises(CheckpointError, match="another|expected") as exc:
        read_token_cache(path, expect_vq_hash="0" * 64)
    assert "\n" not in str(exc.value)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        read_token_cache(truncated)


# --- training loop ---------------------------------------------------------------------------
def test_train_tokenizer_short_run_is_finite_and_deterministic():
    gen = torch.Generator().manual_seed(7)
    train = torch.randint(0, 256, (48, 1, 16, 16), dtype=torch.uint8, generator=gen)
    test = torch.randint(0, 256, (16, 1, 16, 16), dtype=torch.uint8, generator=gen)
    logs: list[tuple[int, dict]] = []
    kwargs = dict(steps=30, batch_size=8, lr=1e-3, seed=0, max_seconds=None, log_every=10, dead_code_steps=5)
    model, metrics = train_tokenizer(train, test, _micro(), on_log=lambda s, d: logs.append((s, d)), **kwargs)
    expected = {"test_psnr_db", "test_codebook_usage", "test_perplexity", "train_seconds", "steps", "steps_per_second"}
    assert expected <= set(metrics)
    assert metrics["steps"] == 30 and [s for s, _ in logs] == [10, 20, 30]
    assert all(math.isfinite(float(v)) for v in metrics.values())
    assert 0 < metrics["test_codebook_usage"] <= 1 and metrics["test_perplexity"] >= 1
    assert metrics["codes_reseeded"] > 0  # dead-code re-seeding ran
    assert not model.training
    again, _ = train_tokenizer(train, test, _micro(), on_log=None, **{**kwargs, "steps": 3})
    twice, _ = train_tokenizer(train, test, _micro(), on_log=None, **{**kwargs, "steps": 3})
    assert state_hash(again.state_dict()) == state_hash(twice.state_dict())
    _, stopped = train_tokenizer(train, test, _micro(), on_log=None, **{**kwargs, "max_seconds": 1e-9})
    assert stopped["steps"] < 30
