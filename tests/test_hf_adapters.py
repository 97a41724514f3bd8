"""transformers adapters: tiny random Chameleon (Anole-style and Lumina-mGPT-style rows) and Janus
targets run the unchanged engine: strict greedy equals vanilla greedy, strict samples the exact law."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from scipy import stats

from transformers import ChameleonConfig, ChameleonForConditionalGeneration, JanusConfig, JanusForConditionalGeneration

from cascade_sd import api
from cascade_sd.decoding.processing import SamplingParams, target_law
from cascade_sd.decoding.vanilla import with_null_condition
from cascade_sd.errors import ConfigError
from cascade_sd.models.adapters.hf import Prompts, chameleon_target, janus_target
from cascade_sd.models.drafters import create_drafter
from cascade_sd.train.drafter import distill_data, train_drafter

PROMPT_LEN = 4
PROMPTS = [[3, 4, 5], [6, 7]]  # different lengths: left padding is exercised
ROW_ID = 9  # Lumina-mGPT-style newline id in the tiny vocabulary


pytestmark = pytest.mark.usefixtures("one_thread")


def test_runs_on_the_intended_transformers():
    """These tests run on the locked transformers, or on the one CI names (the lowest pyproject allows)."""
    import transformers

    from cascade_sd.provenance import locked

    expected = os.environ.get("CASCADE_SD_EXPECT_TRANSFORMERS") or locked()["transformers"].version
    assert transformers.__version__ == expected


def _chameleon(codes: int, seed: int) -> ChameleonForConditionalGeneration:
    """A tiny random Chameleon whose vocabulary holds ``codes`` IMGIMG tokens at ids 10.."""
    vocab_map = {"<pad>": 0, "<image>": 1}
    for i in range(codes):
        vocab_map["IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(i)) + "Z"] = 10 + i
    cfg = ChameleonConfig(vocab_size=10 + codes, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, vocabulary_map=vocab_map, pad_token_id=0,
                          vq_config={"embed_dim": 8, "num_embeddings": codes, "base_channels": 32,
                                     "channel_multiplier": [1], "resolution": 8, "latent_channels": 8,
                                     "num_res_blocks": 1, "attn_resolutions": []})
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # a peaked random head so that laws are far from uniform
        model.lm_head.weight.mul_(40.0)
    return model


def _janus(codes: int, seed: int) -> JanusForConditionalGeneration:
    cfg = JanusConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "vocab_size": 40},
        vision_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 16,
                       "patch_size": 8, "intermediate_size": 16, "num_image_tokens": 4},
        vq_config={"embed_dim": 8, "num_embeddings": codes, "base_channels": 32, "channel_multiplier": [1, 1],
                   "num_res_blocks": 1, "projection_dim": 32, "image_token_embed_dim": 32, "num_patches": 2,
                   "attn_resolutions": []})
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.model.generation_head.vision_head.weight.mul_(20.0)
    return model


FAMILIES = {
    "anole": lambda codes, seed: chameleon_target(_chameleon(codes, seed), grid=(2, 2), prompt_length=PROMPT_LEN,
                                                  null_prompt=[1]),
    "lumina": lambda codes, seed: chameleon_target(_chameleon(codes, seed), grid=(2, 1), prompt_length=PROMPT_LEN,
                                                   null_prompt=[1], row_token_id=ROW_ID),
    "janus": lambda codes, seed: janus_target(_janus(codes, seed), prompt_length=PROMPT_LEN, bos_id=3, boi_id=5,
                                              pad_id=0),
}


def _bundle(family: str, codes: int, seed: int = 0) -> api.Bundle:
    target = FAMILIES[family](codes, seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 7)
        drafters = {arch: create_drafter(target, arch).eval() for arch in ("eagle", "eagle3")}
    return api.bundle_for(target, family, drafters)


#: Jacobi settings of the greedy tests (with a continuous-batching size or None).
JACOBI_GREEDY = [({"variant": "sjd", "window": 4}, None), ({"variant": "scd-mc", "window": 6}, 3),
                 ({"variant": "scd-gumbel", "window": 5}, None),
                 ({"variant": "sjd-pac", "window": 8, "width": 2, "depth": 2}, 3)]


@torch.no_grad()
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_strict_greedy_equals_vanilla_greedy(family, cfg_scale):
    b = _bundle(family, codes=7)
    prompts = PROMPTS * 2
    vanilla = api.decode(b, prompts, method="vanilla", temperature=0.0, cfg_scale=cfg_scale).tokens
    for tree, drafter, max_batch in (("chain-3", "eagle", None), ("tree-25", "eagle3", None), ("dynamic", "eagle", None),
                                     ("chain-3", "eagle3", 3), ("tree-25", "eagle", 3)):
        sd = api.decode(b, prompts, method="strict", tree=tree, drafter=drafter, temperature=0.0, cfg_scale=cfg_scale,
                        tree_top_k=3, depth=3, total_tokens=8, max_batch=max_batch)
        assert torch.equal(sd.tokens, vanilla), (family, tree, max_batch)
    for jacobi, max_batch in JACOBI_GREEDY:  # the drafter-free window, through the same adapter
        sd = api.decode(b, prompts, method="strict", drafter="jacobi", jacobi=jacobi, temperature=0.0,
                        cfg_scale=cfg_scale, max_batch=max_batch)
        assert torch.equal(sd.tokens, vanilla), (family, jacobi, max_batch)
    if family == "lumina":  # every row ends with the newline token, and only there
        width = b.target.config.grid_width
        assert (vanilla[:, width - 1 :: width] == 7).all() and (vanilla.reshape(-1, 2, width)[..., :-1] < 7).all()
        assert b.target.image_codes(vanilla).shape == (len(prompts), 2)


def _exact_joint(target, prompt: list[int], params: SamplingParams) -> dict[tuple[int, ...], float]:
    """Exact law of whole engine-token sequences from uncached forwards of every prefix (DESIGN 3's p)."""
    cfg = target.config
    seqs = list(itertools.product(range(cfg.vocab_size), repeat=cfg.block_size))
    toks = torch.tensor(seqs)
    ids, valid = target.prepare_condition([prompt] * len(seqs))
    streams = with_null_condition(target, ids, params)
    reps = streams.shape[0] // len(seqs)
    target.set_condition_mask(torch.cat([valid] * reps))
    try:
        logits = target(streams, torch.cat([toks[:, :-1]] * reps)).logits
    finally:
        target.set_condition_mask(None)
    p = target_law(logits.double(), params)
    probs = p.gather(-1, toks[..., None]).squeeze(-1).prod(-1)
    return dict(zip(seqs, probs.tolist()))


@torch.no_grad()
@pytest.mark.parametrize("family,opts", [
    ("anole", {"tree": "chain-3"}), ("lumina", {"tree": "dynamic"}), ("janus", {"tree": "dynamic"}),
    ("lumina", {"drafter": "jacobi", "jacobi": {"variant": "scd-mc", "window": 3}})],
    ids=["anole-chain-3", "lumina-dynamic", "janus-dynamic", "lumina-jacobi-scd-mc"])
def test_strict_decode_through_the_adapter_samples_the_exact_law(family, opts):
    """Chi-square against the enumerated joint law with CFG and top-k on. As in the engine test,
    n = 60 000 samples catch a TV deviation of 0.02 at level 1e-3 with probability > 0.99."""
    b = _bundle(family, codes=3, seed=1)
    params = SamplingParams(cfg_scale=2.0, top_k=2)
    prompt = PROMPTS[0]
    law = _exact_joint(b.target, prompt, params)
    n = 60_000
    res = api.decode(b, [prompt] * n, method="strict", cfg_scale=2.0, top_k=2, seed=0, tree_top_k=2, depth=3,
                     total_tokens=6, **opts)
    assert min(res.stats["accept_histogram"][:2]) > 50  # rejections and acceptances both occur
    seqs = list(law)
    index = {s: i for i, s in enumerate(seqs)}
    V, N = b.target.config.vocab_size, b.target.config.block_size
    flat = res.tokens @ torch.tensor([V**k for k in reversed(range(N))])
    lookup = torch.tensor([index[s] for s in itertools.product(range(V), repeat=N)])
    counts = torch.bincount(lookup[flat], minlength=len(seqs)).double()
    expected = torch.tensor([law[s] for s in seqs], dtype=torch.float64) * n
    support = expected > 1e-9 * n
    assert counts[~support].sum() == 0, "emitted a sequence the target law excludes"
    chi2 = stats.chisquare(counts[support], expected[support] * counts[support].sum() / expected[support].sum())
    assert chi2.pvalue > 1e-3, (chi2, 0.5 * (counts / n - expected / n).abs().sum())


def test_prompts_are_validated_and_the_hash_guards_drafters():
    b = _bundle("anole", codes=3)
    with pytest.raises(ConfigError, match="prompts: each needs 1..4 token ids"):
        api.decode(b, [[1, 2, 3, 4, 5]], method="vanilla")
    with pytest.raises(ConfigError, match="lists of token ids"):
        api.decode(b, torch.tensor([1, 2]), method="vanilla")
    padded = Prompts.from_lists(PROMPTS, PROMPT_LEN, pad_id=0)
    assert padded.ids.tolist() == [[0, 3, 4, 5], [0, 0, 6, 7]] and padded.valid.sum().item() == 5
    other = _bundle("anole", codes=3, seed=5)
    with pytest.raises(Exception, match="another target"):
        api.bundle_for(b.target, "x", {"eagle": other.drafters["eagle"]})


@torch.no_grad()
def test_codebook_rules_run_on_adapters():
    b = _bundle("janus", codes=7)
    assert b.codebook.shape == (7, 8)
    res = api.decode(b, PROMPTS, method="lantern", tree="tree-25", cfg_scale=3.0, k=3)
    assert res.tokens.shape == (2, 4) and res.stats["mean_accepted_length"] >= 1.0


def test_drafters_train_on_prompts_through_the_same_trainer():
    target = FAMILIES["janus"](7, 0)
    params = SamplingParams(cfg_scale=3.0)
    data = distill_data(target, 3, params, seed=0, batch_size=4, with_layers=True, conditions=PROMPTS)
    assert data.conditions.shape == (6, PROMPT_LEN) and int(data.condition_mask.sum()) == 15
    again = distill_data(target, 3, params, seed=0, batch_size=4, with_layers=True, conditions=PROMPTS)
    assert torch.equal(data.tokens, again.tokens)
    drafter, metrics = train_drafter(target, data, "eagle3", steps=4, batch_size=4, lr=1e-3, seed=0,
                                     max_seconds=None, holdout=0.34)
    assert metrics["steps"] == 4 and 0.0 <= metrics["top1_agreement"] <= 1.0
    b = api.bundle_for(target, "janus", {"eagle3": drafter})
    res = api.decode(b, PROMPTS, method="strict", drafter="eagle3", tree="chain-3", cfg_scale=3.0, temperature=0.0)
    assert torch.equal(res.tokens, api.decode(b, PROMPTS, method="vanilla", cfg_scale=3.0, temperature=0.0).tokens)
