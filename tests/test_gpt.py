"""Tests of the LlamaGen-compatible target GPT: names/shapes, 2D RoPE, KV-cached decoding, checkpoints, training."""

from __future__ import annotations

import argparse
import math
import re

import pytest
import torch

from cascade_sd.errors import CheckpointError, ConfigError, DataError
from cascade_sd.models.checkpoint import save_checkpoint
from cascade_sd.models.gpt import (
    GPT,
    GPTConfig,
    apply_rotary_emb,
    load_gpt,
    load_llamagen_gpt,
    precompute_rope_2d,
    prefix_mask,
    save_gpt,
)
from cascade_sd.train.target import train_target

# LlamaGen GPT-B c2i state dict (llamagen.md), layer indices replaced by N.
LLAMAGEN_GPT_B = {
    "tok_embeddings.weight": (16384, 768),
    "cls_embedding.embedding_table.weight": (1001, 768),
    "layers.N.attention.wqkv.weight": (2304, 768),
    "layers.N.attention.wo.weight": (768, 768),
    "layers.N.feed_forward.w1.weight": (2048, 768),
    "layers.N.feed_forward.w3.weight": (2048, 768),
    "layers.N.feed_forward.w2.weight": (768, 2048),
    "layers.N.attention_norm.weight": (768,),
    "layers.N.ffn_norm.weight": (768,),
    "norm.weight": (768,),
    "output.weight": (16384, 768),
}

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def _toy(**overrides) -> GPTConfig:
    """A small dropout-free config with a non-square 3x4 grid."""
    base = dict(dim=32, n_layer=2, n_head=4, vocab_size=17, num_classes=3, block_size=12, grid_width=4,
                token_dropout_p=0.0, attn_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    return GPTConfig(**{**base, **overrides})


def _random_model(config: GPTConfig, seed: int = 0) -> GPT:
    """A GPT in eval mode whose output head is re-initialised to non-zero weights."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    torch.nn.init.normal_(model.output.weight, std=0.5)
    return model


def _state_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = GPT(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_gpt_b_has_llamagen_names_and_shapes():
    shapes = _state_shapes(GPTConfig.preset("GPT-B"))
    patterns: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        pattern = re.sub(r"\.\d+\.", ".N.", key)
        assert patterns.setdefault(pattern, shape) == shape, key
    assert patterns == LLAMAGEN_GPT_B
    assert {int(k.split(".")[1]) for k in shapes if k.startswith("layers.")} == set(range(12))
    n_params = sum(math.prod(s) for s in shapes.values())
    assert abs(n_params - 111e6) / 111e6 < 0.03


def test_t2i_xl_caption_projection_and_null_caption():
    shapes = _state_shapes(GPTConfig.preset("GPT-XL", model_type="t2i", cls_token_num=120))
    assert shapes["cls_embedding.cap_proj.fc1.weight"] == (1280, 2048)
    assert shapes["cls_embedding.cap_proj.fc2.weight"] == (1280, 1280)
    assert shapes["cls_embedding.uncond_embedding"] == (120, 2048)
    assert shapes["layers.35.feed_forward.w1.weight"] == (3584, 1280)
    assert not any("embedding_table" in k for k in shapes)


def test_no_cache_or_rope_in_state_dict():
    model = _random_model(_toy())
    before = set(model.state_dict())
    model.setup_cache(2, 13)
    assert set(model.state_dict()) == before
    assert not any("cache" in k or "freqs" in k or "rope" in k for k in before)


def test_presets_and_init():
    tiny = GPTConfig.preset("tiny")
    assert (tiny.dim, tiny.n_layer, tiny.n_head, tiny.vocab_size) == (256, 6, 8, 2048)
    assert (tiny.grid_rows, tiny.grid_cols, tiny.num_classes, tiny.block_size) == (8, 8, 10, 64)
    assert tiny.resid_dropout_p == 0.0 and tiny.class_dropout_prob == 0.1
    assert GPTConfig.preset("tiny", ffn_dropout_p=0.2).ffn_dropout_p == 0.2
    assert GPTConfig.preset("GPT-3B").ffn_hidden == 8704 and GPTConfig.preset("GPT-L").ffn_hidden == 2816
    torch.manual_seed(0)
    model = GPT(_toy())
    assert torch.count_nonzero(model.output.weight) == 0  # LlamaGen zero-inits the head
    assert abs(float(model.tok_embeddings.weight.detach().std()) - 0.02) < 0.005


def _decode_check(model: GPT, cond: torch.Tensor, tokens: torch.Tensor, chunks: list[int], per_row: bool) -> None:
    """Prefill the condition, then feed ``tokens`` in ``chunks`` through ``step``; compare with forward."""
    cfg = model.config
    B, m = tokens.shape
    full = model(cond, tokens[:, :-1], return_hidden=True, return_layers=True)
    S = cfg.cls_token_num + m + 3
    model.setup_cache(B + 1, S)
    outs, hiddens, layers = [], [], []
    start = 0
    pieces = [model.embed_cond(cond)] + list(model.embed_tokens(tokens[:, :-1]).split(chunks, dim=1))
    for x in pieces:
        T = x.shape[1]
        idx = torch.arange(start, start + T)
        pos = idx.expand(B, T) if per_row else idx
        out = model.step(x, positions=pos, slots=pos, attn_mask=prefix_mask(B, T, start, S), return_layers=True)
        outs.append(out.logits)
        hiddens.append(out.hidden)
        layers.append(out.layers[-1])
        start += T
    c = cfg.cls_token_num - 1
    torch.testing.assert_close(torch.cat(outs, 1)[:, c:], full.logits, atol=TOL, rtol=0)
    torch.testing.assert_close(torch.cat(hiddens, 1)[:, c:], full.hidden, atol=TOL, rtol=0)
    torch.testing.assert_close(torch.cat(layers, 1)[:, c:], full.layers[-1], atol=TOL, rtol=0)


@pytest.mark.parametrize("n_kv_head", [None, 2])
def test_kv_cached_decoding_matches_forward(n_kv_head):
    model = _random_model(_toy(n_kv_head=n_kv_head))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 17, (3, 12), generator=g)
    cond = torch.tensor([0, 2, 3])  # 3 = null class
    with torch.no_grad():
        _decode_check(model, cond, tokens, [1] * 11, per_row=False)  # one token at a time
        _decode_check(model, cond, tokens, [5, 1, 4, 1], per_row=True)  # chunks under a causal mask


def test_t2i_decoding_with_several_condition_positions():
    cfg = _toy(model_type="t2i", cls_token_num=3, caption_dim=8)
    model = _random_model(cfg)
    g = torch.Generator().manual_seed(2)
    caption = torch.randn(2, 3, 8, generator=g)
    tokens = torch.randint(0, 17, (2, 12), generator=g)
    with torch.no_grad():
        assert model(caption, tokens[:, :-1]).logits.shape == (2, 12, 17)
        _decode_check(model, caption, tokens, [2, 9], per_row=False)


def test_copy_cache_compacts_accepted_paths():
    """Per row: write a 3-node draft tree to scratch slots, compact the accepted path, continue decoding."""
    model = _random_model(_toy())
    g = torch.Generator().manual_seed(3)
    B, k = 2, 4
    cond = torch.tensor([1, 0])
    prefix = torch.randint(0, 17, (B, k), generator=g)
    a, b, c, d = (torch.randint(0, 17, (B,), generator=g) for _ in range(4))
    S = 16
    P = 1 + k  # first slot/position after the committed prefix
    with torch.no_grad():
        model.setup_cache(B, S)
        x = torch.cat([model.embed_cond(cond), model.embed_tokens(prefix)], 1)
        model.step(x, positions=torch.arange(P), slots=torch.arange(P), attn_mask=prefix_mask(B, P, 0, S))
        # Tree: a and b are siblings (depth 1), c is b's child (depth 2); slots P, P+1, P+2.
        tree = torch.zeros(1, 3, S, dtype=torch.bool)
        tree[:, :, :P] = True
        tree[0, 0, P] = tree[0, 1, P + 1] = True
        tree[0, 2, P + 1] = tree[0, 2, P + 2] = True
        model.step(model.embed_tokens(torch.stack([a, b, c], 1)), positions=torch.tensor([P, P, P + 1]),
                   slots=torch.arange(P, P + 3), attn_mask=tree)
        # Row 0 accepts b, c; row 1 accepts a (its second copy is a no-op).
        model.copy_cache(torch.tensor([[P + 1, P + 2], [P, P + 1]]), torch.tensor([[P, P + 1], [P, P + 1]]))
        pos = torch.tensor([[P + 2], [P + 1]])
        mask = torch.arange(S)[None, None, :] <= pos[:, :, None]
        got = model.step(model.embed_tokens(d[:, None]), positions=pos, slots=pos, attn_mask=mask).logits[:, 0]
        row0 = torch.cat([prefix[0], b[:1], c[:1], d[:1]])[None]
        row1 = torch.cat([prefix[1], a[1:], d[1:]])[None]
        want0 = model(cond[:1], row0).logits[0, -1]
        want1 = model(cond[1:], row1).logits[0, -1]
    torch.testing.assert_close(got[0], want0, atol=TOL, rtol=0)
    torch.testing.assert_close(got[1], want1, atol=TOL, rtol=0)


def _expected_rotation(x: torch.Tensor, row: int, col: int, base: float) -> torch.Tensor:
    """Rotate pairs (2j, 2j+1) of x [..., hd]: the first hd/4 by row·f_j, the rest by col·f_j; f_j = base^(-4j/hd)."""
    hd = x.shape[-1]
    f = torch.tensor([base ** (-4.0 * j / hd) for j in range(hd // 4)], dtype=torch.float64)
    angle = torch.cat([row * f, col * f])
    z = torch.complex(x[..., 0::2].double(), x[..., 1::2].double()) * torch.polar(torch.ones_like(angle), angle)
    return torch.stack([z.real, z.imag], -1).flatten(-2).float()


def test_rope_2d_rows_columns_and_zero_condition():
    cfg = _toy(model_type="t2i", cls_token_num=3, caption_dim=8, rope_base=100.0)  # 3x4 grid, head_dim 8
    model = GPT(cfg)
    x = torch.randn(1, 1, 4, cfg.head_dim)
    for p in range(cfg.cls_token_num):
        cos, sin = model._rope(torch.tensor([p]))
        assert torch.count_nonzero(apply_rotary_emb(x, cos, sin)) == 0
    for i in range(cfg.block_size):
        cos, sin = model._rope(torch.tensor([cfg.cls_token_num + i]))
        want = _expected_rotation(x, i // 4, i % 4, cfg.rope_base)
        torch.testing.assert_close(apply_rotary_emb(x, cos, sin), want, atol=1e-5, rtol=0)


def test_rope_equals_llamagen_table_on_square_grid():
    """Reference: LlamaGen's precompute_freqs_cis_2d(grid_size=8, n_elem=64, base=10000, cls_token_num=1)."""
    grid, n_elem, base, cls = 8, 64, 10000, 1
    half_dim = n_elem // 2
    freqs = 1.0 / (base ** (torch.arange(0, half_dim, 2)[: (half_dim // 2)].float() / half_dim))
    t = torch.arange(grid, device=freqs.device)
    freqs = torch.outer(t, freqs)
    freqs_grid = torch.concat(
        [freqs[:, None, :].expand(-1, grid, -1), freqs[None, :, :].expand(grid, -1, -1)], dim=-1
    )
    cache = torch.stack([torch.cos(freqs_grid), torch.sin(freqs_grid)], dim=-1).flatten(0, 1)
    ref = torch.cat([torch.zeros(cls, n_elem // 2, 2), cache])
    cos, sin = precompute_rope_2d(n_elem, grid * grid, grid, cls, float(base))
    torch.testing.assert_close(torch.stack([cos, sin], -1), ref, atol=0, rtol=0)


def test_non_square_toy_config():
    cfg = GPTConfig(dim=16, n_layer=1, n_head=2, vocab_size=5, block_size=3, grid_width=3, num_classes=2)
    assert (cfg.grid_rows, cfg.grid_cols) == (1, 3)
    model = _random_model(cfg)
    tokens = torch.tensor([[4, 0, 2], [1, 1, 3]])
    with torch.no_grad():
        assert model(torch.tensor([0, 2]), tokens).logits.shape == (2, 4, 5)
        _decode_check(model, torch.tensor([1, 2]), tokens, [1, 1], per_row=False)


def test_cfg_null_row_and_label_dropout():
    model = _random_model(GPTConfig.preset("tiny", n_layer=1))
    table = model.cls_embedding.embedding_table.weight
    assert table.shape[0] == 11 and model.config.null_class == 10
    null = model.null_cond(3)
    assert null.tolist() == [10, 10, 10]
    torch.testing.assert_close(model.embed_cond(null)[:, 0], table[10].expand(3, -1))
    labels = torch.arange(10).repeat(100)
    d1 = model.drop_labels(labels, generator=torch.Generator().manual_seed(5))
    d2 = model.drop_labels(labels, generator=torch.Generator().manual_seed(5))
    assert torch.equal(d1, d2)
    dropped = d1 == 10
    assert 50 < int(dropped.sum()) < 150 and torch.equal(d1[~dropped], labels[~dropped])
    t2i = _random_model(_toy(model_type="t2i", cls_token_num=3, caption_dim=8, class_dropout_prob=0.5))
    caption = torch.randn(64, 3, 8)
    out = t2i.drop_labels(caption, generator=torch.Generator().manual_seed(0))
    was_dropped = (out == t2i.null_cond(64)).all(dim=(1, 2))
    assert 0 < int(was_dropped.sum()) < 64 and torch.equal(out[~was_dropped], caption[~was_dropped])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"dim": 100, "n_head": 3}, "dim=100"),
        ({"dim": 24, "n_head": 4}, "head_dim=6"),
        ({"model_type": "x2i"}, "model_type='x2i'"),
        ({"resid_dropout_p": 1.0}, "resid_dropout_p=1.0"),
        ({"cls_token_num": 2}, "cls_token_num=2"),
        ({"vocab_size": 0}, "vocab_size=0"),
        ({"n_kv_head": 3}, "n_kv_head=3"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=re.escape(field)) as err:
        GPTConfig.preset("tiny", **kwargs)
    assert "\n" not in str(err.value)


def test_config_dict_round_trip_and_unknown_keys():
    cfg = _toy()
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="'bogus'"):
        GPTConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ConfigError, match="preset='GPT-Q'"):
        GPTConfig.preset("GPT-Q")


def test_package_checkpoint_round_trip(tmp_path):
    model = _random_model(_toy())
    path = tmp_path / "gpt.pt"
    save_checkpoint(path, "gpt", model.config.to_dict(), model.state_dict(), {"note": 1})
    loaded, ckpt = load_gpt(path)
    assert loaded.config == model.config and ckpt.extra == {"note": 1} and not loaded.training
    tokens = torch.randint(0, 17, (2, 5))
    with torch.no_grad():
        cond = torch.tensor([0, 1])
        torch.testing.assert_close(loaded(cond, tokens).logits, model(cond, tokens).logits)
    assert save_gpt(tmp_path / "again.pt", model) == ckpt.hash


def test_llamagen_format_loads_and_wrong_vocab_is_one_line_error(tmp_path):
    model = _random_model(_toy())
    sd = dict(model.state_dict())
    sd["freqs_cis"] = torch.zeros(13, 4, 2)
    sd["layers.0.attention.kv_cache.k_cache"] = torch.zeros(1, 4, 16, 8)
    path = tmp_path / "c2i_toy.pt"
    args = argparse.Namespace(gpt_model="GPT-B", vocab_size=17, image_size=48)
    torch.save({"model": sd, "args": args, "optimizer": {"state": {}, "param_groups": []}, "steps": 7}, path)
    loaded = load_llamagen_gpt(path, _toy())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    with pytest.raises(CheckpointError, match="tok_embeddings.weight|output.weight") as err:
        load_llamagen_gpt(path, _toy(vocab_size=16))
    assert "\n" not in str(err.value)


def test_package_checkpoint_with_wrong_shapes_is_checkpoint_error(tmp_path):
    model = _random_model(_toy())
    path = tmp_path / "bad.pt"
    save_checkpoint(path, "gpt", _toy(vocab_size=20).to_dict(), model.state_dict())
    with pytest.raises(CheckpointError, match="mis-shaped") as err:
        load_gpt(path)
    assert "\n" not in str(err.value)


def test_train_target_short_run_is_finite_and_deterministic():
    cfg = _toy(class_dropout_prob=0.1)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 17, (40, 12), generator=g)
    labels = torch.randint(0, 3, (40,), generator=g)
    logs: list[int] = []
    kwargs = dict(steps=20, batch_size=8, lr=3e-3, warmup_steps=5, weight_decay=0.05, seed=7, max_seconds=None,
                  eval_batches=2)
    model, metrics = train_target(codes[:32], labels[:32], codes[32:], labels[32:], cfg, **kwargs,
                                  on_log=lambda step, m: logs.append(step), log_every=10)
    assert metrics["steps"] == 20 and logs == [10, 20]
    for key in ("test_nll_bits", "test_nll_bits_uncond", "train_loss_bits", "train_tokens_per_s", "seconds"):
        assert math.isfinite(metrics[key]) and metrics[key] > 0, key
    assert metrics["train_loss_bits"] < math.log2(17) + 0.5
    again, _ = train_target(codes[:32], labels[:32], codes[32:], labels[32:], cfg, **kwargs, on_log=None)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_train_target_stops_at_max_seconds_and_rejects_bad_input():
    cfg = _toy()
    codes = torch.randint(0, 17, (16, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(16, dtype=torch.long)
    kwargs = dict(batch_size=4, lr=1e-3, warmup_steps=0, weight_decay=0.0, seed=0, eval_batches=1, on_log=None)
    _, metrics = train_target(codes, labels, codes, labels, cfg, steps=100_000, max_seconds=0.3, **kwargs)
    assert metrics["stopped_by"] == "max_seconds" and metrics["steps"] < 100_000
    assert metrics["lr_horizon"] <= 100_000
    with pytest.raises(DataError, match="vocab_size=17"):
        train_target(codes + 17, labels, codes, labels, cfg, steps=1, max_seconds=None, **kwargs)
    with pytest.raises(ConfigError, match="steps=0"):
        train_target(codes, labels, codes, labels, cfg, steps=0, max_seconds=None, **kwargs)


def test_select_rows_keeps_live_rows_and_their_condition_mask():
    """Rows leaving a decode batch: the kept rows' k/v (every layer) and caption padding move to the front."""
    model = _random_model(_toy())
    model.setup_cache(4, 6)
    model._kv.copy_(torch.randn(model._kv.shape, generator=torch.Generator().manual_seed(0)))
    valid = torch.tensor([[True], [False], [True], [False]])
    model.set_condition_mask(valid)
    before = model._kv.clone()
    model.select_rows(torch.tensor([1, 3, 2]))
    assert torch.equal(model._kv[:, :, :3], before[:, :, [1, 3, 2]])
    assert torch.equal(model._cond_valid, valid[[1, 3, 2]])
    model.select_rows(torch.tensor([0, 1]))  # rows already in place: nothing moves
    assert torch.equal(model._kv[:, :, :2], before[:, :, [1, 3]])


@pytest.mark.parametrize("n_kv_head", [None, 2])
def test_step_on_chosen_cache_rows_matches_the_leading_rows(n_kv_head):
    """``step(rows=...)`` (a new image joining a running batch) computes what a step over the leading
    rows computes, writes only the chosen rows and leaves every other row untouched."""
    model = _random_model(_toy(n_kv_head=n_kv_head))
    g = torch.Generator().manual_seed(4)
    cond = torch.tensor([2, 0])
    tokens = torch.randint(0, 17, (2, 5), generator=g)
    S, P = 10, 6
    x = torch.cat([model.embed_cond(cond), model.embed_tokens(tokens)], 1)
    with torch.no_grad():
        model.setup_cache(2, S)
        want = model.step(x, positions=torch.arange(P), slots=torch.arange(P), attn_mask=prefix_mask(2, P, 0, S))
        lead = model._kv.clone()
        model.setup_cache(4, S)
        model._kv.normal_(generator=g)  # stale entries of earlier images must not matter
        before = model._kv.clone()
        rows = torch.tensor([3, 1])
        got = model.step(x, positions=torch.arange(P), slots=torch.arange(P), attn_mask=prefix_mask(2, P, 0, S), rows=rows)
        torch.testing.assert_close(got.logits, want.logits, atol=TOL, rtol=0)
        torch.testing.assert_close(model._kv[:, :, rows, :, :P], lead[:, :, :, :, :P], atol=0, rtol=0)
        assert torch.equal(model._kv[:, :, rows, :, P:], before[:, :, rows, :, P:])
        assert torch.equal(model._kv[:, :, [0, 2]], before[:, :, [0, 2]])
        with pytest.raises(ValueError, match=r"rows must lie in \[0, 4\)"):
            model.step(x, positions=torch.arange(P), slots=torch.arange(P), attn_mask=prefix_mask(2, P, 0, S),
                       rows=torch.tensor([4, 0]))
