"""CSpD decoding end to end on tiny random continuous models (issue 8): exactness, caches, errors."""

import copy
import functools

import numpy as np
import pytest
import torch
from scipy import stats

from cascade_sd.continuous.decoding import ContinuousSampling, _Streams, cspd_decode, vanilla_continuous
from cascade_sd.continuous.model import ContinuousAR, ContinuousConfig, load_continuous, save_model
from cascade_sd.continuous.train import train_continuous
from cascade_sd.errors import CheckpointError, ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(head: str, latent_dim: int = 2, grid: int = 2) -> ContinuousConfig:
    return ContinuousConfig(latent_dim=latent_dim, grid_size=grid, num_classes=3, dim=32, n_layer=1, n_head=2,
                            head=head, head_width=32, head_blocks=1, train_steps=100, sample_steps=4)


def _data(config: ContinuousConfig, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic latents: each token is half the previous one plus a class offset and noise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, config.num_classes, (n,), generator=gen)
    x = torch.zeros(n, config.tokens, config.latent_dim)
    for i in range(config.tokens):
        prev = x[:, i - 1] if i else torch.zeros(n, config.latent_dim)
        x[:, i] = 0.5 * prev + (labels[:, None] - 1.0) + 0.5 * torch.randn(n, config.latent_dim, generator=gen)
    return x, labels


@functools.lru_cache(maxsize=None)
def _trained(head: str, grid: int = 2) -> ContinuousAR:
    """A tiny model trained briefly on synthetic latents (a random diffusion head's x̂₀ is meaningless)."""
    config = _config(head, grid=grid)
    x, y = _data(config, 3000, 0)
    model, _ = train_continuous(x[:2500], y[:2500], x[2500:], y[2500:], config, steps=150, batch_size=64,
                                lr=3e-3, warmup_steps=10, seed=0)
    return model


def _model(seed: int, head: str, latent_dim: int = 2, grid: int = 2) -> ContinuousAR:
    """An untrained tiny model (for error paths and checkpoints)."""
    torch.manual_seed(seed)
    return ContinuousAR(_config(head, latent_dim, grid)).eval()


def _draft(target: ContinuousAR, seed: int = 1, scale: float = 0.1) -> ContinuousAR:
    """The target with every weight perturbed: a draft whose laws overlap the target's in part."""
    draft = copy.deepcopy(target)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return draft


def _two_sample_p(a: torch.Tensor, b: torch.Tensor, seed: int = 0) -> float:
    """Bonferroni-combined KS p-value over every coordinate of the flattened images and 6 projections."""
    a, b = a.flatten(1).double().numpy(), b.flatten(1).double().numpy()
    dirs = np.concatenate([np.eye(a.shape[1]), np.random.default_rng(seed).normal(size=(6, a.shape[1]))])
    pvals = [stats.ks_2samp(a @ v, b @ v).pvalue for v in dirs]
    return min(1.0, min(pvals) * len(pvals))


@pytest.mark.parametrize("head", ["gaussian", "diffusion"])
@pytest.mark.parametrize("cfg_scale,gamma,prefill", [(1.0, 2, 0.0), (2.5, 3, 0.25)])
def test_cspd_samples_the_target_law(head, cfg_scale, gamma, prefill):
    """Vanilla target samples vs CSpD samples (different random draft): a seeded two-sample test on
    every token coordinate and random projections of whole images; the draft's own law must differ."""
    target = _trained(head)
    draft = _draft(target)
    params = ContinuousSampling(cfg_scale=cfg_scale)
    labels = torch.arange(3).repeat(2000)
    ref = vanilla_continuous(target, labels, params, generator=torch.Generator().manual_seed(1)).tokens
    out = cspd_decode(target, draft, labels, params, gamma=gamma, prefill=prefill,
                      generator=torch.Generator().manual_seed(2))
    assert 0.05 < out.stats["acceptance_rate"] < 0.95  # both branches (keep, resample) are exercised
    assert out.stats["capped_resamples"] == 0
    assert _two_sample_p(out.tokens, ref) > 1e-3
    drafted = vanilla_continuous(draft, labels, params, generator=torch.Generator().manual_seed(3)).tokens
    assert _two_sample_p(drafted, ref) < 1e-6  # the test has power against the draft's law


def test_softened_ratio_drifts_detectably():
    target = _trained("gaussian")
    draft = _draft(target)
    labels = torch.arange(3).repeat(2000)
    params = ContinuousSampling()
    ref = vanilla_continuous(target, labels, params, generator=torch.Generator().manual_seed(1)).tokens
    soft = cspd_decode(target, draft, labels, params, gamma=2, prefill=0.0, ratio_temperature=42.0,
                       generator=torch.Generator().manual_seed(2))
    assert _two_sample_p(soft.tokens, ref) < 1e-6


def test_identical_draft_accepts_everything_and_caches_match_a_fresh_pass():
    target = _trained("diffusion", grid=4)
    labels = torch.tensor([0, 1, 2, 1])
    params = ContinuousSampling(cfg_scale=2.0)
    out = cspd_decode(target, copy.deepcopy(target), labels, params, gamma=3, prefill=0.2,
                      generator=torch.Generator().manual_seed(0))
    n = target.config.tokens
    assert out.stats["acceptance_rate"] == 1.0 and out.stats["rejections"] == 0
    hist = out.stats["accept_histogram"]
    assert sum(hist) == out.stats["rounds"] and hist[3] >= out.stats["rounds"] - len(labels)
    fresh = copy.deepcopy(target)
    seq = torch.cat([out.tokens, torch.zeros(len(labels), 1, 2)], 1)
    with torch.no_grad():
        _Streams(fresh, labels, params, n + 1).forward(seq, torch.arange(n).expand(len(labels), -1))
    assert torch.allclose(target._kv[..., :n, :], fresh._kv[..., :n, :], atol=1e-5)


def test_cspd_is_deterministic_given_the_seed():
    target = _trained("diffusion")
    draft = _draft(target)
    run = [cspd_decode(target, draft, torch.tensor([0, 2]), ContinuousSampling(), gamma=2,
                       generator=torch.Generator().manual_seed(5)).tokens for _ in range(2)]
    assert torch.equal(run[0], run[1])


@pytest.mark.parametrize("kwargs,field", [
    ({"gamma": 0}, "gamma"), ({"gamma": 1.5}, "gamma"), ({"prefill": 1.0}, "prefill"),
    ({"prefill": -0.1}, "prefill"), ({"prefill": "x"}, "prefill"), ({"ratio_temperature": 0.5}, "ratio_temperature"),
])
def test_bad_cspd_parameters(kwargs, field):
    target = _model(0, "gaussian")
    with pytest.raises(ConfigError, match=f"^{field}="):
        cspd_decode(target, copy.deepcopy(target), torch.tensor([0]), ContinuousSampling(), **kwargs)


@pytest.mark.parametrize("other", [{"latent_dim": 3}, {"grid": 3}])
def test_mismatched_draft_is_refused(other):
    with pytest.raises(ConfigError, match="^draft (latent_dim|grid_size)=.*CSpD needs the same latent size"):
        cspd_decode(_model(0, "gaussian"), _model(1, "gaussian", **other), torch.tensor([0]), ContinuousSampling())


def test_bad_labels_and_sampling():
    with pytest.raises(ConfigError, match="^labels: 3 is out of range"):
        vanilla_continuous(_model(0, "gaussian"), torch.tensor([3]), ContinuousSampling())
    with pytest.raises(ConfigError, match="^cfg_scale="):
        ContinuousSampling(cfg_scale=0.5)
    with pytest.raises(ConfigError, match="^temperature="):
        ContinuousSampling(temperature=0.0)


def test_checkpoint_round_trip_and_corruption(tmp_path):
    model = _model(0, "diffusion")
    path = tmp_path / "m.pt"
    save_model(path, model)
    loaded, _ = load_continuous(path)
    x = torch.randn(2, 3, 2)
    assert torch.equal(loaded(torch.tensor([0, 1]), x), model(torch.tensor([0, 1]), x))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_continuous(path)
