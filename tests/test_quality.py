"""Judge model, its training loop, and the in-domain quality metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from cascade_sd.data import ImageSet
from cascade_sd.errors import CheckpointError, ConfigError
from cascade_sd.metrics.quality import (
    JudgeFeatureExtractor,
    bootstrap_ci,
    in_domain_fid_kid,
    judge_accuracy,
)
from cascade_sd.models.checkpoint import save_checkpoint
from cascade_sd.models.judge import Judge, JudgeConfig, load_judge, save_judge
from cascade_sd.train.judge import random_shift, train_judge

SMALL = JudgeConfig(channels=(8, 16, 32), feature_dim=32)


def _judge(config: JudgeConfig = SMALL, seed: int = 0) -> Judge:
    torch.manual_seed(seed)
    return Judge(config).eval()


def _squares(n: int, seed: int) -> ImageSet:
    """Trivially separable set: class k is a bright 8×8 square at one of 10 grid cells, plus faint noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = torch.randint(0, 40, (n, 1, 32, 32), generator=g, dtype=torch.uint8)
    for i, k in enumerate(labels.tolist()):
        r, c = 2 + 10 * (k // 4), 2 + 7 * (k % 4)
        images[i, 0, r : r + 8, c : c + 8] = 230
    return ImageSet(images, labels.to(torch.int64), 10, [str(k) for k in range(10)], "synthetic", "train")


def _noise(n: int, lo: int, hi: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (n, 1, 32, 32), generator=g, dtype=torch.uint8)


def test_judge_shapes_and_config() -> None:
    judge = _judge(JudgeConfig())
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    assert judge.features(x).shape == (4, 128)
    assert judge(x).shape == (4, 10)
    cfg = JudgeConfig.from_dict(JudgeConfig(channels=(8, 16), feature_dim=20).to_dict())
    assert cfg.channels == (8, 16) and cfg.feature_dim == 20
    with pytest.raises(ConfigError, match="judge.image_size"):
        JudgeConfig(channels=(8, 8, 8, 8, 8, 8)).validate()
    with pytest.raises(ConfigError, match="judge.depth"):
        JudgeConfig.from_dict({"depth": 3})


def test_checkpoint_roundtrip(tmp_path: Path) -> None:
    judge = _judge()
    digest = save_judge(tmp_path / "judge.pt", judge, {"test_accuracy": 0.5})
    loaded, ckpt = load_judge(tmp_path / "judge.pt")
    assert ckpt.hash == digest and ckpt.extra["test_accuracy"] == 0.5 and not loaded.training
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    assert torch.equal(loaded(x), judge(x))
    save_checkpoint(tmp_path / "bad.pt", "judge", JudgeConfig(feature_dim=64).to_dict(), judge.state_dict())
    with pytest.raises(CheckpointError, match="does not match"):
        load_judge(tmp_path / "bad.pt")


def test_random_shift_moves_content_within_two_pixels() -> None:
    x = torch.full((64, 1, 32, 32), -1.0)
    x[:, :, 15, 15] = 1.0
    out = random_shift(x, torch.Generator().manual_seed(0))
    pos = (out[:, 0] == 1.0).flatten(1).float().argmax(dim=1)
    rows, cols = pos // 32, pos % 32
    assert out.shape == x.shape and int((out == 1.0).sum()) == 64
    assert rows.min() >= 13 and rows.max() <= 17 and cols.min() >= 13 and cols.max() <= 17
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 5


def test_train_judge_separable_and_deterministic() -> None:
    train, test = _squares(200, seed=1), _squares(100, seed=2)
    judge, metrics = train_judge(train, test, SMALL, epochs=4, batch_size=32, lr=5e-3, seed=3, max_seconds=None)
    assert metrics["test_accuracy"] >= 0.95
    assert judge_accuracy(judge, test.images, test.labels) == metrics["test_accuracy"]
    assert metrics["steps"] == 4 * 7 and not metrics["stopped_early"] and not judge.training
    again, _ = train_judge(train, test, SMALL, epochs=0.5, batch_size=32, lr=5e-3, seed=3, max_seconds=None)
    twice, _ = train_judge(train, test, SMALL, epochs=0.5, batch_size=32, lr=5e-3, seed=3, max_seconds=None)
    for (name, a), b in zip(again.state_dict().items(), twice.state_dict().values()):
        assert torch.equal(a, b), name


def test_feature_extractor_fits_torchmetrics() -> None:
    judge = _judge()
    extractor = JudgeFeatureExtractor(judge)
    big = torch.randint(0, 255, (2, 3, 299, 299), dtype=torch.uint8)
    feats = extractor(big)
    assert feats.shape == (2, SMALL.feature_dim) and feats.dtype == torch.float64
    small = torch.randint(0, 255, (2, 1, 32, 32), dtype=torch.uint8)
    assert torch.allclose(extractor(small), judge.features(small.float() / 127.5 - 1).double(), atol=1e-5)
    fid = FrechetInceptionDistance(feature=extractor)
    fid.train()
    fid.update(small, real=True)
    assert not judge.training


def test_fid_self_is_zero_and_different_sets_are_far() -> None:
    judge = _judge()
    real = torch.cat([_squares(100, seed=5).images, _noise(100, 0, 256, seed=6)])
    far = _noise(200, 100, 140, seed=7)
    same = in_domain_fid_kid(judge, real, real)
    diff = in_domain_fid_kid(judge, real, far, kid_subsets=20)
    assert set(same) == {"fid_in_domain", "kid_in_domain_mean", "kid_in_domain_std"}
    assert diff["fid_in_domain"] > 0
    assert abs(same["fid_in_domain"]) < 1e-3 * diff["fid_in_domain"]
    assert diff["kid_in_domain_mean"] > 10 * abs(same["kid_in_domain_mean"])
    first = in_domain_fid_kid(judge, real, far, kid_subset_size=50, kid_subsets=10, seed=1)
    assert first == in_domain_fid_kid(judge, real, far, kid_subset_size=50, kid_subsets=10, seed=1)
    with pytest.raises(ConfigError, match="kid_subset_size"):
        in_domain_fid_kid(judge, real, far, kid_subset_size=500)


def test_bootstrap_ci_contains_estimate_and_narrows() -> None:
    rng = np.random.default_rng(0)
    small = rng.normal(1.0, 1.0, size=50)
    large = rng.normal(1.0, 1.0, size=2000)
    est_s, lo_s, hi_s = bootstrap_ci(small)
    est_l, lo_l, hi_l = bootstrap_ci(large)
    assert lo_s <= est_s <= hi_s and lo_l <= est_l <= hi_l
    assert (hi_l - lo_l) < 0.5 * (hi_s - lo_s)
    assert est_s == pytest.approx(float(small.mean()))
    assert bootstrap_ci(small, seed=4) == bootstrap_ci(small, seed=4)
    est, lo, hi = bootstrap_ci(small, stat=np.median, n_boot=200)
    assert lo <= est <= hi
    with pytest.raises(ConfigError, match="alpha"):
        bootstrap_ci(small, alpha=1.5)
