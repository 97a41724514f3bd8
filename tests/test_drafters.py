"""Drafters (EAGLE, EAGLE-3) on toy targets: shapes, cached step = uncached forward, chain simulation,
self-distillation data, training, CASCADE redundancy weights, configs and checkpoint/hash checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cascade_sd.decoding.processing import SamplingParams, split_cfg
from cascade_sd.decoding.vanilla import with_null_condition
from cascade_sd.errors import CheckpointError, ConfigError, DataError
from cascade_sd.models.drafters import (
    DrafterConfig,
    create_drafter,
    load_drafter,
    save_drafter,
    target_hash,
)
from cascade_sd.models.gpt import prefix_mask
from cascade_sd.models.toy import toy_target
from cascade_sd.train.drafter import (
    chain_mask,
    distill_data,
    drafter_loss,
    evaluate_drafter,
    heldout_split,
    load_distill,
    redundancy_weights,
    save_distill,
    train_drafter,
    unrolled,
)

SPEC = "toy:vocab=7,len=6,seed=0,layers=3,dim=32,heads=4"
CFG = SamplingParams(cfg_scale=3.0)
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target():
    return toy_target(SPEC)


@pytest.fixture(scope="module")
def data(target):
    return distill_data(target, 24, CFG, seed=0, batch_size=24, with_layers=True)


TRAIN = dict(batch_size=16, lr=3e-3, seed=0, max_seconds=None, holdout=0.25)


@pytest.fixture(scope="module")
def trained(target, data):
    """Drafters trained briefly on the toy's distill data: {arch: (drafter, metrics)}."""
    return {arch: train_drafter(target, data, arch, steps=100, **TRAIN) for arch in ("eagle", "eagle3")}


def _drafter(target, arch: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return create_drafter(target, arch, **kw).eval()


@pytest.mark.parametrize("arch", ["eagle", "eagle3"])
def test_shapes_and_features(target, arch):
    d = _drafter(target, arch)
    tokens = torch.randint(0, 7, (2, 5))
    out = target(torch.tensor([0, 1]), tokens, return_hidden=True, return_layers=d.needs_layers)
    feats = d.target_features(out)
    assert feats.shape == (2, 6, 32)
    logits, h = d(feats[:, :5], tokens)
    assert logits.shape == (2, 5, 7) and logits.dtype == torch.float32 and h.shape == (2, 5, 32)
    assert d.needs_layers is (arch == "eagle3")
    trainable = {n for n, p in d.named_parameters() if p.requires_grad}
    assert "tok_embeddings.weight" not in trainable and "output.weight" not in trainable
    assert torch.equal(d.output.weight, target.output.weight)
    assert torch.equal(d.tok_embeddings.weight, target.tok_embeddings.weight)
    if arch == "eagle":
        assert torch.equal(feats, out.hidden)


def test_eagle3_uses_configured_layers(target):
    d = _drafter(target, "eagle3")
    assert d.config.target_layers == (0, 1, 2)
    d = _drafter(target, "eagle3", target_layers=(2, 2, 0))
    out = target(torch.tensor([0]), torch.randint(0, 7, (1, 4)), return_hidden=True, return_layers=True)
    expected = d.fc_fuse(torch.cat([out.layers[2], out.layers[2], out.layers[0]], dim=-1))
    torch.testing.assert_close(d.target_features(out), expected, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="return_layers=True"):
        d.target_features(target(torch.tensor([0]), torch.zeros(1, 2, dtype=torch.long), return_hidden=True))
    with pytest.raises(ConfigError, match="target_layers=.* out of range"):
        create_drafter(target, "eagle3", target_layers=(0, 1, 3))


@pytest.mark.parametrize("arch", ["eagle", "eagle3"])
@pytest.mark.parametrize("per_row", [False, True])
def test_cached_step_matches_forward(target, arch, per_row):
    d = _drafter(target, arch, seed=1)
    B, T, S = 2, 5, 8
    torch.manual_seed(2)
    h, tokens = torch.randn(B, T, 32), torch.randint(0, 7, (B, T))
    ref_logits, ref_h = d(h, tokens)
    d.setup_cache(B, S)
    logits, hs, start = [], [], 0
    for n in (2, 1, 1, 1):  # prefill two pairs, then one at a time
        slots = torch.arange(start, start + n)
        pos = slots + d.config.cls_token_num
        if per_row:
            slots, pos = slots.expand(B, n), pos.expand(B, n)
        lg, ho = d.step(h[:, start:start + n], tokens[:, start:start + n], positions=pos, slots=slots,
                        attn_mask=prefix_mask(B, n, start, S))
        logits.append(lg)
        hs.append(ho)
        start += n
    torch.testing.assert_close(torch.cat(logits, 1), ref_logits, atol=TOL, rtol=0)
    torch.testing.assert_close(torch.cat(hs, 1), ref_h, atol=TOL, rtol=0)
    k = d.layer.attention.k_cache
    before = k[:, :, :2].clone()
    d.copy_cache(torch.tensor([[0, 1], [0, 1]]), torch.tensor([[6, 7], [6, 7]]))
    assert torch.equal(k[:, :, 6:8], before)
    rows = k.clone(), d.layer.attention.v_cache.clone()
    d.select_rows(torch.tensor([1]))  # image 0 finished: row 1 moves to the front
    assert torch.equal(d.layer.attention.k_cache[0], rows[0][1]) and torch.equal(d.layer.attention.v_cache[0], rows[1][1])


@pytest.mark.parametrize("arch", ["eagle", "eagle3"])
def test_chain_metric_matches_sequential_decoding(target, data, trained, arch):
    """The parallel chains of ``unrolled``/``evaluate_drafter`` equal chains drafted and verified one at a time."""
    d = trained[arch][0]
    seqs = torch.arange(0, 48, 6)  # both classes
    tokens, hidden, layers = data.rows(seqs)
    feats = d.fuse(layers) if arch == "eagle3" else hidden
    N, D, b = 6, 4, seqs.shape[0]
    greedy = unrolled(d, feats[:, :N - 1], tokens, D, lambda k, prev: split_cfg(prev, CFG).argmax(-1).repeat(2, 1))
    streams = with_null_condition(target, data.conditions[seqs], CFG)
    tau = []
    for j in range(N - D):
        h_in, t_in = feats[:, : j + 1], tokens[:, : j + 1]
        accepted, alive = torch.zeros(b, dtype=torch.long), torch.ones(b, dtype=torch.bool)
        for depth in range(D):
            logits, h_out = d(h_in, t_in)
            torch.testing.assert_close(logits[:, -1], greedy[depth][:, j], atol=TOL, rtol=0)
            draft = split_cfg(logits[:, -1], CFG).argmax(-1)
            best = split_cfg(target(streams, t_in[:, : j + 1 + depth]).logits[:, -1], CFG).argmax(-1)
            alive &= draft == best
            accepted += alive.long()
            h_in = torch.cat([h_in, h_out[:, -1:]], 1)
            t_in = torch.cat([t_in, draft.repeat(2)[:, None]], 1)
        tau.append(accepted + 1)
    metrics = evaluate_drafter(d, target, data, seqs)
    assert metrics["chain_tau"] == pytest.approx(float(torch.stack(tau).float().mean()))
    assert int(torch.stack(tau).max()) >= 3  # trained drafters: matches past depth 1 are exercised
    assert metrics["chain_depth"] == D and len(metrics["drafter_nll_bits_per_position"]) == N - 1


def test_unrolled_cache_path_matches_recomputed_chains(target, data):
    """Training-time test through the grown cache equals re-running all blocks under chain_mask (values and grads)."""
    d = _drafter(target, "eagle3", seed=5).train()
    tokens, hidden, layers = data.rows(torch.arange(3))
    T, depth = 5, 3
    anchors = torch.arange(T)

    def next_tok(k, _):
        return tokens[:, (anchors + k).clamp(max=T)]

    def grads(logits):
        d.zero_grad()
        sum((lg * torch.linspace(-1, 1, 7)).sum() for lg in logits).backward()
        return [p.grad.clone() for p in (d.fc.weight, d.fc_fuse.weight, d.layer.attention.wqkv.weight)]

    cached = unrolled(d, d.fuse(layers[:, :T]), tokens, depth, next_tok)
    g_cached = grads(cached)
    feats = d.fuse(layers[:, :T])
    hs, toks, pos, ref = [feats], [tokens[:, :T]], [anchors + 1], []
    for k in range(depth):
        if k:
            hs.append(h)
            toks.append(next_tok(k, None))
            pos.append((anchors + k).clamp(max=5) + 1)
        mask = chain_mask(T, T, k)[None]
        h = d.features(torch.cat(hs, 1), torch.cat(toks, 1), positions=torch.cat(pos), attn_mask=mask)[:, k * T:]
        ref.append(d.head(h))
    for a, b in zip(cached, ref):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)
    for a, b in zip(g_cached, grads(ref)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_training_beats_untrained_and_is_deterministic(target, data, trained):
    _, heldout = heldout_split(data.n_sequences, TRAIN["holdout"], seed=0)
    for arch, (_, metrics) in trained.items():
        before = evaluate_drafter(_drafter(target, arch), target, data, heldout)
        assert metrics["top1_agreement"] > before["top1_agreement"] + 0.1, arch
        assert metrics["chain_tau"] > before["chain_tau"] + 0.3, arch
        assert metrics["eval_sequences"] == heldout.shape[0]
        assert len(metrics["agreement_by_depth"]) == 4
    assert trained["eagle"][1]["unroll"] == 1 and trained["eagle3"][1]["unroll"] == 3
    again, _ = train_drafter(target, data, "eagle3", steps=100, **TRAIN)
    first = trained["eagle3"][0].state_dict()
    assert all(torch.equal(v, first[k]) for k, v in again.state_dict().items())


def test_redundancy_weights_and_loss(target, data):
    torch.manual_seed(0)
    feats = torch.linalg.qr(torch.randn(8, 8))[0][:5]  # 5 orthonormal rows: cosine 0 between distinct positions
    feats[3] = feats[0] * 2.0 + 0.1 * feats[1]  # position 0 recurs at 3 (cos ≈ 0.999)
    w = redundancy_weights(feats[None], 4.0, 0.625)
    assert w.tolist() == [[4.0, 1.0, 1.0, 1.0, 1.0]]
    assert torch.equal(redundancy_weights(feats, 1.0, 0.625), torch.ones(5))
    d = _drafter(target, "eagle")
    tokens, hidden, _ = data.rows(torch.arange(4))
    ones = torch.ones(tokens.shape)
    _, base = drafter_loss(d, tokens, hidden, None, ones, 1)
    _, double = drafter_loss(d, tokens, hidden, None, 2 * ones, 1)
    assert double["dist_loss"] == pytest.approx(2 * base["dist_loss"], rel=1e-5)
    assert double["feature_loss"] == pytest.approx(base["feature_loss"], rel=1e-6)


def test_checkpoint_round_trip_and_hash_mismatch(target, tmp_path):
    d = _drafter(target, "eagle3", seed=4)
    path = tmp_path / "drafter.pt"
    save_drafter(path, d)
    loaded, ckpt = load_drafter(path, target_hash(target))
    assert ckpt.kind == "drafter" and loaded.config == d.config
    assert all(torch.equal(a, b) for a, b in zip(d.state_dict().values(), loaded.state_dict().values()))
    other = target_hash(toy_target(SPEC.replace("seed=0", "seed=1")))
    with pytest.raises(CheckpointError) as err:
        load_drafter(path, other)
    msg = str(err.value)
    assert "\n" not in msg and other[:12] in msg and d.config.target_hash[:12] in msg


def test_config_errors_name_the_field(target):
    good = DrafterConfig.for_target(target, "eagle", "abc").to_dict()
    cases = [
        ({"arch": "medusa"}, "arch='medusa'"),
        ({"n_head": 3}, "dim=32"),
        ({"vocab_size": 0}, "vocab_size=0"),
        ({"target_layers": [0, 1]}, "target_layers="),
        ({"arch": "eagle3", "target_layers": [0, 1]}, "target_layers="),
        ({"target_hash": ""}, "target_hash=''"),
        ({"colour": 1}, "'colour' is unknown"),
    ]
    for change, pattern in cases:
        with pytest.raises(ConfigError, match=pattern) as err:
            DrafterConfig.from_dict({**good, **change})
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="'dim' is missing"):
        DrafterConfig.from_dict({k: v for k, v in good.items() if k != "dim"})
    assert DrafterConfig.from_dict(good) == DrafterConfig.for_target(target, "eagle", "abc")


def test_distill_data_round_trip_and_checks(target, data, tmp_path):
    assert data.hidden.shape == (48, 2, 6, 32) and data.layers.shape == (48, 2, 6, 3, 32)
    assert data.hidden.dtype == torch.float16 and data.target_hash == target_hash(target)
    seq = data.tokens[:3]
    null = target(target.null_cond(3), seq[:, :-1], return_hidden=True).hidden
    torch.testing.assert_close(data.hidden[:3, 1].float(), null, atol=2e-3, rtol=1e-3)
    again = distill_data(target, 24, CFG, seed=0, batch_size=24, with_layers=True)
    assert torch.equal(again.tokens, data.tokens) and torch.equal(again.hidden, data.hidden)
    path = tmp_path / "distill.pt"
    save_distill(path, data)
    loaded = load_distill(path, data.target_hash)
    assert loaded.params == CFG and loaded.layer_ids == data.layer_ids
    assert torch.equal(loaded.hidden, data.hidden) and torch.equal(loaded.layers, data.layers)
    with pytest.raises(CheckpointError, match=f"made by target {data.target_hash[:12]}"):
        load_distill(path, "0" * 64)
    other = toy_target(SPEC.replace("seed=0", "seed=1"))
    with pytest.raises(CheckpointError, match="regenerate"):
        train_drafter(other, data, "eagle", steps=1, batch_size=4, lr=1e-3, seed=0, max_seconds=None)
    no_layers = dataclasses.replace(data, layers=None, layer_ids=())
    with pytest.raises(DataError, match="with_layers=True"):
        train_drafter(target, no_layers, "eagle3", steps=1, batch_size=4, lr=1e-3, seed=0, max_seconds=None)
