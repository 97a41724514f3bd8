"""LlamaGen checkpoints: full-size files in each save format import into a bundle; t2i captions; dtypes."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade_sd import api
from cascade_sd.acceptance import get_rule
from cascade_sd.decoding.processing import SamplingParams
from cascade_sd.errors import CheckpointError, ConfigError
from cascade_sd.models.adapters.llamagen import Captions, import_llamagen
from cascade_sd.models.checkpoint import extract_state_dict, read_external
from cascade_sd.models.drafters import create_drafter, target_hash
from cascade_sd.models.gpt import GPT, GPTConfig
from cascade_sd.models.vq import VQConfig, VQModel
from cascade_sd.train.drafter import distill_data, load_distill, save_distill, train_drafter

BIN = Path(sys.executable).parent


def _random_gpt(config: GPTConfig, seed: int) -> GPT:
    """A GPT with every weight random (LlamaGen zero-initialises the head; a loaded file is not zero)."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    torch.nn.init.normal_(model.output.weight, std=0.02)
    return model


@pytest.fixture(scope="module")
def full_size(tmp_path_factory) -> dict:
    """Random-weight VQ-16 and c2i GPT-B at 256 px written as LlamaGen training checkpoints."""
    folder = tmp_path_factory.mktemp("llamagen")
    torch.manual_seed(0)
    vq = VQModel(VQConfig.preset("VQ-16")).eval()
    gpt = _random_gpt(GPTConfig.preset("GPT-B", block_size=256), seed=1)
    ema = {k: v + 0.01 for k, v in gpt.state_dict().items()}
    args = argparse.Namespace(gpt_model="GPT-B", gpt_type="c2i", image_size=256, downsample_size=16, vocab_size=16384)
    torch.save({"model": vq.state_dict(), "steps": 10, "args": argparse.Namespace(vq_model="VQ-16")}, folder / "vq_ds16_c2i.pt")
    torch.save({"model": gpt.state_dict(), "ema": ema, "optimizer": {"state": {}, "param_groups": []}, "steps": 3,
                "args": args}, folder / "c2i_B_256.pt")
    sd = dict(gpt.state_dict())
    sd["freqs_cis"] = torch.zeros(257, 32, 2)  # known extras some files carry
    sd["layers.0.attention.kv_cache.k_cache"] = torch.zeros(1, 12, 257, 64)
    torch.save(sd, folder / "c2i_B_fsdp.pt")  # bare state dict, no args (FSDP export)
    return {"folder": folder, "vq": vq, "gpt": gpt, "ema": ema}


def _logits(model: GPT, seed: int = 5) -> torch.Tensor:
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(torch.tensor([3, 1000]), tokens).logits


def test_gpt_xl_full_size_matches_the_manifest():
    with torch.device("meta"):
        xl = GPT(GPTConfig.preset("GPT-XL", block_size=576))
    shapes = {k: tuple(v.shape) for k, v in xl.state_dict().items()}
    assert shapes["tok_embeddings.weight"] == (16384, 1280) and shapes["output.weight"] == (16384, 1280)
    assert shapes["cls_embedding.embedding_table.weight"] == (1001, 1280)
    assert shapes["layers.35.attention.wqkv.weight"] == (3840, 1280)
    assert shapes["layers.35.feed_forward.w2.weight"] == (1280, 3584)
    assert "layers.36.attention.wo.weight" not in shapes
    n_params = sum(math.prod(s) for s in shapes.values())
    assert abs(n_params - 775e6) / 775e6 < 0.02


def test_training_checkpoint_imports_as_a_bundle(full_size, tmp_path):
    f = full_size["folder"]
    info = import_llamagen(f / "vq_ds16_c2i.pt", f / "c2i_B_256.pt", tmp_path / "bundle")
    assert info["gpt_model"] == "GPT-B" and info["grid"] == [16, 16] and info["image_size"] == 256
    assert json.loads((tmp_path / "bundle/bundle.json").read_text())["target_hash"] == info["target_hash"]
    b = api.load_bundle(tmp_path / "bundle")
    torch.testing.assert_close(_logits(b.target), _logits(full_size["gpt"]), rtol=0, atol=0)
    assert b.codebook.shape == (16384, 8)
    torch.testing.assert_close(b.codebook, full_size["vq"].codebook_vectors())
    # LANTERN's latent neighbour table comes from the real 16384-code codebook (k + 1 columns: the
    # authors' residual zeroes nearest[x, :k+1]).
    rule = get_rule("lantern", k=50)
    rule.bind(b.rule_resources())
    nbrs = rule.neighbours
    assert nbrs.shape == (16384, 51)
    sims = b.codebook @ b.codebook.T
    top = sims[:5].topk(52, dim=-1).indices[:, 1:]
    assert all(set(top[i].tolist()) == set(nbrs[i].tolist()) for i in range(5))


def test_bare_state_dict_needs_the_image_size_and_infers_the_preset(full_size, tmp_path):
    """Also: ``ema=True`` takes the training file's ema weights."""
    f = full_size["folder"]
    with pytest.raises(ConfigError, match="image_size: .* has no args") as err:
        import_llamagen(f / "vq_ds16_c2i.pt", f / "c2i_B_fsdp.pt", tmp_path / "b")
    assert "\n" not in str(err.value)
    info = import_llamagen(f / "vq_ds16_c2i.pt", f / "c2i_B_fsdp.pt", tmp_path / "b", image_size=256)
    assert info["gpt_model"] == "GPT-B"
    ema = import_llamagen(f / "vq_ds16_c2i.pt", f / "c2i_B_256.pt", tmp_path / "ema", ema=True)
    assert ema["weights"] == "ema" and ema["target_hash"] != info["target_hash"]
    with pytest.raises(ConfigError, match="gpt_model='GPT-L' but .*says 'GPT-B'"):
        import_llamagen(f / "vq_ds16_c2i.pt", f / "c2i_B_fsdp.pt", tmp_path / "c", gpt_model="GPT-L", image_size=256)
    with pytest.raises(ConfigError, match="image_size=384 but .*args says 256"):
        import_llamagen(f / "vq_ds16_c2i.pt", f / "c2i_B_256.pt", tmp_path / "c", image_size=384)


@pytest.mark.parametrize("container", ["model", "ema", "module", "state_dict", "bare"])
def test_every_llamagen_container_yields_the_weights(container, tmp_path):
    weights = {"tok_embeddings.weight": torch.randn(4, 2), "freqs_cis": torch.zeros(3, 1, 2)}
    other = {"tok_embeddings.weight": torch.randn(4, 2)}
    obj = {"bare": weights, "model": {"model": weights, "steps": 1, "args": argparse.Namespace(gpt_model="GPT-B")},
           "ema": {"model": other, "ema": weights}, "module": {"module": weights},
           "state_dict": {"state_dict": weights, "epoch": 2}}[container]
    torch.save(obj, tmp_path / "c.pt")
    sd = extract_state_dict(read_external(tmp_path / "c.pt", trusted=False), prefer_ema=container == "ema")
    assert list(sd) == ["tok_embeddings.weight"] and torch.equal(sd["tok_embeddings.weight"], weights["tok_embeddings.weight"])


class _Unsafe:
    pass


def test_corrupt_mismatched_and_unsafe_files_are_one_line_errors(full_size, tmp_path):
    f = full_size["folder"]
    data = (f / "c2i_B_256.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 3])
    small = dict(full_size["vq"].state_dict())
    small["quantize.embedding.weight"] = small["quantize.embedding.weight"][:8192]
    torch.save({"model": small}, tmp_path / "vq_8192.pt")
    torch.save({"model": {"x": torch.zeros(1)}, "args": _Unsafe()}, tmp_path / "unsafe.pt")
    cases = [
        (f / "vq_ds16_c2i.pt", tmp_path / "truncated.pt", CheckpointError, "corrupt or truncated"),
        (tmp_path / "vq_8192.pt", f / "c2i_B_256.pt", CheckpointError, "vocab_size=16384 does not match .*codebook_size=8192"),
        (f / "vq_ds16_c2i.pt", tmp_path / "unsafe.pt", CheckpointError, "--trusted-checkpoint"),
        (f / "vq_ds16_c2i.pt", tmp_path / "missing.pt", CheckpointError, "file not found"),
        (f / "c2i_B_256.pt", f / "c2i_B_256.pt", CheckpointError, "not a LlamaGen VQ"),
    ]
    for vq, gpt, kind, message in cases:
        with pytest.raises(kind, match=message) as err:
            import_llamagen(vq, gpt, tmp_path / "out")
        assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "target.pt").exists()


def test_cli_imports_and_reports_bad_flags(full_size, tmp_path):
    f = full_size["folder"]
    cmd = [str(BIN / "cascade-sd"), "import", "llamagen", "--vq", str(f / "vq_ds16_c2i.pt"), "--gpt"]
    bad = subprocess.run(cmd + [str(f / "c2i_B_256.pt"), "--out", str(tmp_path / "b"), "--image-size", "300"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "image_size=300" in bad.stderr


# --- t2i: caption features with LlamaGen's left padding ----------------------------------------
def _t2i_bundle(seed: int = 0) -> api.Bundle:
    config = GPTConfig(dim=64, n_layer=2, n_head=4, vocab_size=12, block_size=6, grid_width=3, model_type="t2i",
                       cls_token_num=5, caption_dim=16, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    target = _random_gpt(config, seed)
    torch.nn.init.normal_(target.output.weight, std=1.0)
    torch.nn.init.normal_(target.cls_embedding.uncond_embedding, std=1.0)
    digest = target_hash(target)
    torch.manual_seed(seed + 1)
    return api.Bundle(name="t2i", target=target, target_hash=digest,
                      drafters={"eagle": create_drafter(target, "eagle", target_hash=digest).eval()})


def _captions(rows: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, n, 16)).astype(np.float32)


def test_captions_are_left_padded_and_validated(tmp_path):
    caps = Captions.from_arrays(_captions(2, 3, 0), tokens=5, dim=16)
    assert caps.features.shape == (2, 5, 16) and caps.valid[:, :2].sum() == 0 and caps.valid[:, 2:].all()
    np.savez(tmp_path / "c.npz", caption_embs=_captions(2, 120, 0)[..., :1].repeat(2048, -1))
    assert len(Captions.load(tmp_path / "c.npz")) == 2
    for bad, match in [(np.zeros((2, 3)), "caption_embs must be"), (np.full((1, 2, 16), np.nan), "NaN")]:
        with pytest.raises(ConfigError, match=match):
            Captions.from_arrays(bad, tokens=5, dim=16)
    with pytest.raises(ConfigError, match="emb_masks must be"):
        Captions.from_arrays(_captions(2, 3, 0), np.ones((2, 4)), tokens=5, dim=16)


def test_padded_caption_columns_are_invisible():
    b = _t2i_bundle()
    feats = _captions(2, 5, 1)
    valid = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=bool)
    law = api.next_token_law(b, Captions.from_arrays(feats, valid, tokens=5, dim=16), [[1, 2], [3, 4]], cfg_scale=2.0)
    changed = feats.copy()
    changed[0, :2] += 5.0
    changed[1, 0] -= 5.0
    same = api.next_token_law(b, Captions.from_arrays(changed, valid, tokens=5, dim=16), [[1, 2], [3, 4]], cfg_scale=2.0)
    torch.testing.assert_close(same, law, rtol=0, atol=1e-12)
    changed[0, 3] += 5.0  # a real column does matter
    moved = api.next_token_law(b, Captions.from_arrays(changed, valid, tokens=5, dim=16), [[1, 2], [3, 4]], cfg_scale=2.0)
    assert (moved[0] - law[0]).abs().max() > 1e-6  # (the random t2i laws are peaked: the change is ~4e-4)
    assert b.target._cond_valid is None  # the mask does not outlive the call


def test_t2i_strict_greedy_equals_vanilla_with_padding():
    b = _t2i_bundle(seed=3)
    caps = Captions.from_arrays(_captions(3, 4, 2), np.array([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]], bool),
                                tokens=5, dim=16)
    kw = {"temperature": 0.0, "cfg_scale": 3.0, "seed": 0}
    vanilla = api.decode(b, caps, method="vanilla", **kw).tokens
    assert torch.equal(api.decode(b, caps, method="vanilla", max_batch=2, **kw).tokens, vanilla)
    for tree in ("chain-3", "tree-25", "dynamic"):
        for max_batch in (None, 2):  # 2: the third caption joins mid-batch with its own padding
            sd = api.decode(b, caps, method="strict", tree=tree, tree_top_k=3, depth=3, total_tokens=8,
                            max_batch=max_batch, **kw)
            assert torch.equal(sd.tokens, vanilla), (tree, max_batch)
    for jacobi in ("sjd", {"variant": "sjd-pac", "window": 8, "width": 2, "depth": 2}):  # drafter-free, padded captions
        sd = api.decode(b, caps, method="strict", drafter="jacobi", jacobi=jacobi, max_batch=2, **kw)
        assert torch.equal(sd.tokens, vanilla), jacobi
    assert b.target._cond_valid is None
    with pytest.raises(ConfigError, match="caption_embs must be"):
        api.decode(b, [1, 2], method="vanilla")


def test_bfloat16_weights_decode_and_cuda_absence_is_an_error():
    b = api.load_bundle("toy:vocab=6,len=5,seed=0", dtype="bfloat16")
    assert b.target.output.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for d in b.drafters.values() for p in d.parameters())
    res = api.decode(b, [0, 1], method="strict", tree="tree-25", cfg_scale=2.0)
    assert res.tokens.shape == (2, 5) and res.stats["mean_accepted_length"] >= 1.0
    with pytest.raises(ConfigError, match="dtype='float8' is not allowed"):
        api.load_bundle("toy:vocab=6,len=5,seed=0", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            api.load_bundle("toy:vocab=6,len=5,seed=0", device="cuda")


def test_t2i_drafter_distils_on_the_users_captions(tmp_path):
    b = _t2i_bundle(seed=4)
    caps = Captions.from_arrays(_captions(3, 4, 5), np.array([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]], bool),
                                tokens=5, dim=16)
    data = distill_data(b.target, 2, SamplingParams(cfg_scale=2.0), seed=1, batch_size=4, with_layers=False,
                        conditions=caps)
    assert data.conditions.shape == (6, 5, 16) and data.condition_mask.shape == (6, 5)
    save_distill(tmp_path / "d.pt", data)
    loaded = load_distill(tmp_path / "d.pt", expect_target_hash=b.target_hash)
    assert torch.equal(loaded.condition_mask, data.condition_mask)
    drafter, _ = train_drafter(b.target, loaded, "eagle", steps=3, batch_size=4, lr=1e-3, seed=0, max_seconds=None,
                               holdout=0.34)
    res = api.decode(api.bundle_for(b.target, "t2i", {"eagle": drafter}), caps, method="strict", tree="chain-3",
                     cfg_scale=2.0)
    assert res.tokens.shape == (3, 6)
    with pytest.raises(ConfigError, match="needs its conditions"):
        distill_data(b.target, 1, SamplingParams(), seed=0, batch_size=2, with_layers=False)
