"""Public API and CLI: toy bundles, decode/next_token_law, and one-line errors before compute."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cascade_sd import api
from cascade_sd.errors import CheckpointError, ConfigError
from cascade_sd.models.drafters import create_drafter, save_drafter
from cascade_sd.models.gpt import save_gpt
from cascade_sd.models.toy import toy_target

CLI = [str(Path(sys.executable).parent / "cascade-sd")]


@pytest.fixture(scope="module")
def bundle():
    return api.load_bundle("toy:vocab=6,len=8,seed=1")


def test_toy_bundle_has_both_drafters_and_is_seeded(bundle):
    assert set(bundle.drafters) == {"eagle", "eagle3"}
    again = api.load_bundle("toy:vocab=6,len=8,seed=1")
    for name in bundle.drafters:
        for a, b in zip(bundle.drafters[name].parameters(), again.drafters[name].parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("method, tree, drafter", [("vanilla", "tree-57", "eagle"), ("strict", "chain-3", "eagle"),
                                                   ("strict", "tree-25", "eagle3"), ("strict", "dynamic", "eagle")])
def test_decode_shapes_stats_and_determinism(bundle, method, tree, drafter):
    kw = dict(method=method, tree=tree, drafter=drafter, cfg_scale=2.0, seed=3, tree_top_k=3, depth=3, total_tokens=8)
    a = api.decode(bundle, [0, 1, 1], **kw)
    b = api.decode(bundle, [0, 1, 1], **kw)
    assert a.tokens.shape == (3, 8) and a.tokens.dtype == torch.long
    assert torch.equal(a.tokens, b.tokens)
    if method != "vanilla":
        assert {"mean_accepted_length", "accept_histogram", "target_forwards", "drafter_forwards"} <= set(a.stats)


def test_next_token_law_matches_processing(bundle):
    law = api.next_token_law(bundle, [0, 1], [[1, 2], [3, 4]], cfg_scale=2.0, top_k=3)
    assert law.shape == (2, 6) and law.dtype == torch.float64
    assert torch.allclose(law.sum(-1), torch.ones(2, dtype=torch.float64))
    assert ((law > 0).sum(-1) <= 3).all()


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"tree": "tree-99"}, r"^tree='tree-99' is not a known preset"),
        ({"drafter": "medusa"}, r"^drafter='medusa' is not allowed; choose one of 'eagle', 'eagle3'$"),
        ({"tree": "dynamic", "tree_top_k": 0}, r"^tree_top_k=0 is out of range"),
        ({"tree": "dynamic", "tree_top_k": 2, "depth": 0}, r"^depth=0 is out of range"),
        ({"tree": "dynamic", "tree_top_k": 2, "total_tokens": 1}, r"^total_tokens=1 is out of range"),
        ({"tree": "dynamic", "tree_top_k": 2, "depth": 2, "total_tokens": 50}, r"^total_tokens=50 is out of range"),
        ({"temperature": -0.5}, r"^temperature=-0.5 is out of range"),
        ({"max_batch": 0}, r"^max_batch=0 is out of range"),
        ({"method": "vanilla", "max_batch": 0}, r"^max_batch=0 is out of range"),
        ({"method": "nope"}, r"^method='nope' is not allowed; choose one of 'cascade', 'cascade_bounded', 'coolsd', 'gsd', 'lantern', 'lantern_pp', 'strict', 'vanilla'$"),
        ({"delta": 0.1}, r"^parameter 'delta' does not belong to rule 'strict'"),
        ({"method": "lantern_pp", "tree": "dynamic"}, r"^method='lantern_pp' needs a static tree"),
        ({"tree": "dynamic", "tree_top_k": 20, "total_tokens": 30}, r"^tree_top_k=20 is out of range; allowed \[1, 6\]"),
    ],
)
def test_bad_input_is_a_one_line_error(bundle, kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        api.decode(bundle, [0], **kwargs)
    assert "\n" not in str(err.value)


def test_out_of_range_labels(bundle):
    with pytest.raises(ConfigError, match=r"labels: 5 is out of range; allowed 0..1"):
        api.decode(bundle, [5])


def test_drafter_for_another_target_is_rejected(tmp_path):
    target = toy_target("toy:vocab=6,len=8,seed=1")
    other = toy_target("toy:vocab=6,len=8,seed=2")
    save_gpt(tmp_path / "target.pt", target)
    save_drafter(tmp_path / "drafter-eagle.pt", create_drafter(other, "eagle"))
    with pytest.raises(CheckpointError, match=r"was trained for target [0-9a-f]{12}, but this target is [0-9a-f]{12}"):
        api.load_bundle(tmp_path)
    save_drafter(tmp_path / "drafter-eagle.pt", create_drafter(target, "eagle"))
    assert set(api.load_bundle(tmp_path).drafters) == {"eagle"}


def test_cli_decode_and_errors(tmp_path):
    out = tmp_path / "dec"
    res = subprocess.run(CLI + ["decode", "--bundle", "toy:vocab=5,len=6", "--out-dir", str(out), "--labels", "0,1",
                                "--tree", "chain-3", "--cfg-scale", "2"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["mean_accepted_length"] >= 1 and (out / "tokens.npz").is_file()
    bad = subprocess.run(CLI + ["decode", "--bundle", "toy:vocab=5,len=6", "--out-dir", str(out), "--tree", "dynamic",
                                "--tree-top-k", "2", "--depth", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: depth=0 is out of range; allowed [1, 32]"


def test_check_setting_accepts_auto_on_a_small_dynamic_tree():
    """'auto' is resolved by timing later: the check must not hold it to the default 60 nodes (a dynamic
    tree with top-k 2 and depth 2 has only 7)."""
    bundle = api.load_bundle("toy:vocab=7,len=12,seed=0")
    rule = api.check_setting(bundle, "strict", "dynamic", "eagle", tree_top_k=2, depth=2, total_tokens="auto")
    assert rule.name == "strict"
