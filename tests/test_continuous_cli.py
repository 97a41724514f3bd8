"""``cascade-sd decode --model continuous``, the continuous bundle, and the CSpD config: outputs and
one-line errors before any compute (issue 8)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cascade_sd.config import validate_config
from cascade_sd.continuous.bundle import decode_continuous, load_continuous_bundle
from cascade_sd.continuous.jobs import cell_from_slug, cell_slug, cells
from cascade_sd.continuous.model import AEConfig, ContinuousAE, ContinuousAR, ContinuousConfig, save_model
from cascade_sd.errors import CheckpointError, ConfigError

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.usefixtures("one_thread")


def _ar(dim: int, latent_dim: int = 4) -> ContinuousAR:
    return ContinuousAR(ContinuousConfig(latent_dim=latent_dim, grid_size=8, dim=dim, n_layer=1, n_head=2,
                                         head_width=16, head_blocks=1, train_steps=50, sample_steps=3)).eval()


def _bundle(folder: Path, *, draft_latent: int = 4, draft_hash: str | None = None) -> Path:
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    digest = save_model(folder / "autoencoder.pt", ContinuousAE(AEConfig(base_channels=8)).eval())
    save_model(folder / "target.pt", _ar(32), extra={"autoencoder_hash": digest})
    save_model(folder / "draft.pt", _ar(16, draft_latent), extra={"autoencoder_hash": draft_hash or digest})
    return folder


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "cascade-sd"), *args], capture_output=True, text=True, timeout=300)


def test_decode_command_writes_latents_grid_and_stats(tmp_path):
    bundle = _bundle(tmp_path / "b")
    res = _cli("decode", "--model", "continuous", "--method", "cspd", "--bundle", str(bundle), "--labels", "0,3",
               "--out-dir", str(tmp_path / "out"), "--gamma", "3", "--prefill=0.25", "--cfg-scale", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    stats = json.loads((tmp_path / "out/stats.json").read_text())
    assert stats["gamma"] == 3 and stats["prefill_tokens"] == 16 and stats["model"] == "continuous"
    assert sum(stats["accept_histogram"]) == stats["rounds"] and stats["mean_accepted_length"] >= 1
    assert (tmp_path / "out/grid.png").stat().st_size > 0
    assert (tmp_path / "out/latents.npz").stat().st_size > 0


@pytest.mark.parametrize("args,message", [
    (["--gamma", "0"], "gamma=0 is out of range"),
    (["--prefill", "1"], "prefill=1.0 is out of range; allowed [0, 1)"),
    (["--delta", "0.1"], "'--delta' is not an option of --model continuous"),
    (["--gamma", "two"], "--gamma='two' is not a valid int"),
    (["--top-k", "5"], "--top-k, --top-p and --record-drift do not apply to --model continuous"),
    (["--dtype", "bfloat16"], "dtype='bfloat16' is not allowed for continuous models"),
])
def test_decode_command_bad_flags(tmp_path, args, message):
    bundle = _bundle(tmp_path / "b")
    res = _cli("decode", "--model", "continuous", "--method", "cspd", "--bundle", str(bundle), "--labels", "0",
               "--out-dir", str(tmp_path / "out"), *args)
    assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_model_kind(tmp_path):
    res = _cli("decode", "--model", "analog", "--bundle", "toy:vocab=5,len=3,seed=0", "--out-dir", str(tmp_path))
    assert res.returncode == 2 and "model='analog' is not allowed" in res.stderr


def test_bundle_checks(tmp_path):
    with pytest.raises(ConfigError, match="draft latent_dim=3 does not match the target's 4"):
        load_continuous_bundle(_bundle(tmp_path / "a", draft_latent=3))
    with pytest.raises(CheckpointError, match="draft.pt: trained on another autoencoder's latents"):
        load_continuous_bundle(_bundle(tmp_path / "b", draft_hash="0" * 64))
    with pytest.raises(CheckpointError, match="no autoencoder.pt"):
        load_continuous_bundle(tmp_path)
    bundle = load_continuous_bundle(_bundle(tmp_path / "c"))
    with pytest.raises(ConfigError, match="^method='strict' is not allowed; choose one of 'cspd', 'vanilla'"):
        decode_continuous(bundle, [0], method="strict")
    with pytest.raises(ConfigError, match="^labels: 10 is out of range"):
        decode_continuous(bundle, [10])


def test_config_section_and_cells():
    config = validate_config({})
    names = [cell_slug(c) for c in cells(config)]
    assert names == ["vanilla", "cspd-g2-p0.15-t1", "cspd-g4-p0.15-t1", "cspd-g8-p0.15-t1", "cspd-g4-p0-t1",
                     "cspd-g4-p0.3-t1"]
    assert cell_from_slug(config, "cspd-g8-p0.15-t1")["gamma"] == 8
    with pytest.raises(ConfigError, match="cell='cspd-g5-p0-t1' is not in this config's CSpD grid; allowed: vanilla"):
        cell_from_slug(config, "cspd-g5-p0-t1")


@pytest.mark.parametrize("section,message", [
    ({"decode": {"prefill": 1.0}}, "continuous.decode.prefill"),
    ({"decode": {"gammas": [0]}}, "continuous.decode.gammas"),
    ({"head": "flow"}, "continuous.head"),
])
def test_bad_continuous_config(section, message):
    with pytest.raises(ConfigError, match=message):
        validate_config({"continuous": section})


def test_continuous_branch_needs_builtin_models(tmp_path):
    for name in ("vq.pt", "gpt.pt"):
        (tmp_path / name).write_bytes(b"x")
    real = {"source": "llamagen", "vq": str(tmp_path / "vq.pt"), "gpt": str(tmp_path / "gpt.pt")}
    with pytest.raises(ConfigError, match="continuous.enabled=true is not allowed with models.source='llamagen'"):
        validate_config({"models": real})
    assert validate_config({"models": real, "continuous": {"enabled": False}})["continuous"]["enabled"] is False


def test_public_api_has_the_same_shape(tmp_path):
    from cascade_sd import api

    bundle = api.load_bundle(_bundle(tmp_path / "b"), model="continuous")
    res = api.decode(bundle, [1, 2], method="cspd", seed=3, gamma=2, prefill=0.0)
    assert res.tokens.shape == (2, 64, 4) and res.stats["mean_accepted_length"] >= 1
    again = api.decode(bundle, [1, 2], method="cspd", seed=3, gamma=2, prefill=0.0)
    assert torch.equal(res.tokens, again.tokens)
    assert api.decode(bundle, [1], method="vanilla").stats["target_forwards"] == 64
    for bad in ({"top_k": 5}, {"max_batch": 1}):
        with pytest.raises(ConfigError, match="top_k, top_p, record_drift and max_batch do not apply to continuous"):
            api.decode(bundle, [1], **bad)
    with pytest.raises(ConfigError, match="^model='audio' is not allowed"):
        api.load_bundle(tmp_path, model="audio")


def test_bench_command_prints_every_setting(tmp_path):
    bundle = _bundle(tmp_path / "b")
    res = _cli("continuous", "bench", "--bundle", str(bundle), "--gammas", "2,3", "--ratio-temperatures", "1,42",
               "--images", "1", "--threads", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["method", "gamma", "ratio_temperature"] and len(lines) == 6
    assert lines[1].split()[0] == "vanilla" and all(line.split()[0] == "cspd" for line in lines[2:])
    bad = _cli("continuous", "bench", "--bundle", str(bundle), "--gammas", "0", "--images", "1")
    assert bad.returncode == 2 and "gamma=0 is out of range" in bad.stderr
