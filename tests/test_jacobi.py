"""Jacobi-family drafting (DESIGN 5b; issue 24): exact with strict verification, by enumeration and by sampling.

analysis/exact_jacobi enumerates the sampler's (prefix, window) states with its own reading of each
variant's redraft; with the strict rule every exact variant's law is the target's (float64, ≤ 1e-12), the
reference code's SCD-MC is not, and relaxed rules on SJD stay within the hybrid bound. The chi-square test
decodes with the real engine at batch > 1 (rows advancing by their own accepted lengths, finished images
handing their rows on), for SCD's Gumbel sharing too, and its power against the reference code's bias is
computed from that variant's exact law.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy import stats

from analysis.exact_jacobi import exact_jacobi_law
from analysis.exact_toy import as_float64, hybrid_bound, target_conditionals, target_joint_law
from cascade_sd import api
from cascade_sd.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = 2.0
EXACT = {"sjd-w2": {"variant": "sjd", "window": 2}, "sjd-w3": {"variant": "sjd", "window": 3},
         "scd-mc-w3": {"variant": "scd-mc", "window": 3},
         "sjd-pac-w4": {"variant": "sjd-pac", "window": 4, "width": 2, "depth": 2}}
REFERENCE_SCD = {"variant": "scd-mc", "window": 3, "code": "reference-code"}


def _toy(spec: str):
    bundle = as_float64(api.load_bundle(spec))
    n = bundle.target.config.block_size
    conditionals = target_conditionals(bundle, 1, cfg_scale=CFG)
    return bundle, target_joint_law(conditionals, n), conditionals


def _tv(a: dict, b: dict) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


@pytest.fixture(scope="module")
def len4():
    return _toy("toy:vocab=3,len=4,seed=2")


@pytest.mark.parametrize("jacobi", list(EXACT.values()), ids=list(EXACT))
def test_strict_jacobi_law_is_the_targets(len4, jacobi):
    bundle, target, _ = len4
    law = exact_jacobi_law(bundle, 1, jacobi=jacobi, cfg_scale=CFG).law
    assert sum(law.values()) == pytest.approx(1.0, abs=1e-12)
    assert _tv(law, target) < 1e-12


def test_exact_variants_have_no_node_drift_where_a_kept_token_is_verified():
    """On five positions an SCD-MC token kept against a stale law is verified. Its node law, averaged over the
    column's own draws given what those draws do not produce (the earlier columns, the stale law; not the
    next column, whose redraft read the kept token), is the target's: strict's node drift is 0."""
    bundle, _, _ = _toy("toy:vocab=2,len=5,seed=2")
    for jacobi in (EXACT["scd-mc-w3"], EXACT["sjd-pac-w4"]):
        assert exact_jacobi_law(bundle, 1, jacobi=jacobi, cfg_scale=CFG).node_drift_sum < 1e-12


def test_reference_code_scd_mc_is_not_exact():
    """The repository's SCD-MC records the old q for a kept token: its law moves away from the target's once
    a token kept against a stale law is verified, which takes five positions (the last is always a bonus)."""
    bundle, target, _ = _toy("toy:vocab=2,len=5,seed=2")
    law = exact_jacobi_law(bundle, 1, jacobi=REFERENCE_SCD, cfg_scale=CFG).law
    exact = exact_jacobi_law(bundle, 1, jacobi={**REFERENCE_SCD, "code": "exact"}, cfg_scale=CFG).law
    assert sum(law.values()) == pytest.approx(1.0, abs=1e-12)
    assert _tv(exact, target) < 1e-12
    assert _tv(law, target) > 0.01


@pytest.mark.parametrize("method,params", [("coolsd", {"delta": 2.0}), ("lantern", {"k": 2, "delta": 0.3}),
                                           ("gsd", {"dist_threshold": 4.0, "p_threshold": 0.5, "window": 1}),
                                           ("cascade", {"tau_b": 0.0, "tau_d": 0.0, "breadth_source": "target"})])
def test_relaxed_rules_on_sjd_stay_within_the_hybrid_bound(len4, method, params):
    bundle, target, conditionals = len4
    joint = exact_jacobi_law(bundle, 1, jacobi=EXACT["sjd-w3"], method=method, cfg_scale=CFG, **params)
    assert sum(joint.law.values()) == pytest.approx(1.0, abs=1e-12)
    assert 1e-3 < _tv(joint.law, target) <= joint.hybrid_bound + 1e-12
    assert joint.hybrid_bound == pytest.approx(hybrid_bound(joint.law, conditionals), abs=1e-12)
    assert joint.hybrid_bound <= joint.node_drift_sum + 1e-12


# ---------------------------------------------------------------------------------------------- sampling
SAMPLES = 60_000
FIXTURE, LENGTH = "toy:vocab=3,len=5,seed=2", 5  # five positions: a token kept against a stale law gets verified
LEVEL = 1e-3


def _counts(tokens: torch.Tensor, seqs: list) -> torch.Tensor:
    """Counts of each sequence in ``seqs`` and, last, of any other sequence."""
    index = {s: i for i, s in enumerate(seqs)}
    flat = tokens @ torch.tensor([3**k for k in reversed(range(LENGTH))])
    lookup = torch.tensor([index.get(s, len(seqs)) for s in itertools.product(range(3), repeat=LENGTH)])
    return torch.bincount(lookup[flat], minlength=len(seqs) + 1).double()


@pytest.fixture(scope="module")
def fixture_law():
    bundle = api.load_bundle(FIXTURE)
    law = target_joint_law(target_conditionals(as_float64(api.load_bundle(FIXTURE)), 1, cfg_scale=CFG), LENGTH)
    return bundle, law


@torch.no_grad()
@pytest.mark.parametrize("jacobi,max_batch", [
    ({"variant": "sjd", "window": 3}, None), ({"variant": "scd-mc", "window": 3}, None),
    ({"variant": "scd-gumbel", "window": 4}, None), ({"variant": "sjd-pac", "window": 4, "width": 2, "depth": 2}, None),
    ({"variant": "scd-mc", "window": 3}, 7_000)], ids=["sjd", "scd-mc", "scd-gumbel", "sjd-pac", "scd-mc-rows"])
def test_strict_jacobi_decode_samples_the_target_law(fixture_law, jacobi, max_batch):
    """Chi-square (level 1e-3) of SAMPLES decoded images against the target's joint law; with ``max_batch``
    finished images hand their rows to new ones (their windows restart)."""
    bundle, law = fixture_law
    res = api.decode(bundle, [1] * SAMPLES, method="strict", drafter="jacobi", jacobi=jacobi, cfg_scale=CFG, seed=0,
                     max_batch=max_batch)
    assert len(res.stats["accept_histogram"]) >= 3 and min(res.stats["accept_histogram"][:3]) > 50
    seqs = list(law)
    counts = _counts(res.tokens, seqs)
    assert counts[-1] == 0, "emitted a sequence the target law excludes"
    expected = torch.tensor([law[s] for s in seqs], dtype=torch.float64) * SAMPLES
    chi2 = stats.chisquare(counts[:-1], expected * counts[:-1].sum() / expected.sum())
    assert chi2.pvalue > LEVEL, (chi2, 0.5 * (counts[:-1] / SAMPLES - expected / SAMPLES).abs().sum())


def test_the_chi_square_test_sees_the_reference_code_bias(fixture_law):
    """The test above, on its fixture, fails the reference code's SCD-MC (its exact law) with probability ≥ 0.99."""
    _, law = fixture_law
    moved = exact_jacobi_law(as_float64(api.load_bundle(FIXTURE)), 1, jacobi=REFERENCE_SCD, cfg_scale=CFG).law
    cells = [s for s in law if law[s] > 0]
    lam = SAMPLES * sum((moved.get(s, 0.0) - law[s]) ** 2 / law[s] for s in cells)
    df = len(cells) - 1
    assert stats.ncx2.sf(stats.chi2.isf(LEVEL, df), df, lam) >= 0.99, lam


# ---------------------------------------------------------------------------------------------- inputs
BAD = [
    ({"jacobi": {"variant": "sjd", "window": 1}}, "jacobi_window=1"),
    ({"jacobi": {"variant": "sjd-pac", "window": 8, "width": 3, "depth": 3}}, "does not fit pac_width=3"),
    ({"jacobi": "sjd-xl"}, "jacobi='sjd-xl'"),
    ({"jacobi": {"variant": "sjd", "code": "reference-code"}}, "reference-code"),
    ({"jacobi": {"variant": "sjd", "size": 4}}, "jacobi option='size'"),
    ({"jacobi": "sjd", "tree": "dynamic"}, "tree='dynamic'"),
    ({"jacobi": "sjd", "method": "cascade"}, "breadth_source='target'"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m for _, m in BAD])
def test_bad_jacobi_settings_are_one_line_errors(kwargs, message, monkeypatch):
    bundle = api.load_bundle("toy:vocab=5,len=4,seed=0")
    monkeypatch.setattr(type(bundle.target), "forward", lambda *a, **k: pytest.fail("a forward ran"))
    kwargs = {"method": "strict", **kwargs}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")) as err:
        api.decode(bundle, [1], drafter="jacobi", **kwargs)
    assert "\n" not in str(err.value)


def test_jacobi_options_need_the_jacobi_drafter():
    bundle = api.load_bundle("toy:vocab=5,len=4,seed=0")
    with pytest.raises(ConfigError, match="needs drafter='jacobi'"):
        api.decode(bundle, [1], drafter="eagle", jacobi="sjd")
    with pytest.raises(ConfigError, match="does not cover drafter='jacobi'"):
        api.sequence_log_prob(bundle, [1], [[0, 1, 2, 3]], drafter="jacobi")


# ---------------------------------------------------------------------------------------------- drift
DRIFT_CASES = [("strict", {}, EXACT["sjd-w3"]), ("coolsd", {"delta": 2.0}, EXACT["sjd-w3"]),
               ("gsd", {"dist_threshold": 4.0, "p_threshold": 0.5, "window": 1}, EXACT["sjd-w3"]),
               ("lantern", {"k": 2, "delta": 0.3}, EXACT["scd-mc-w3"]), ("coolsd", {"delta": 2.0}, EXACT["sjd-pac-w4"])]


@pytest.mark.parametrize("method,params,jacobi", DRIFT_CASES,
                         ids=[f"{m}-{j['variant']}" for m, _, j in DRIFT_CASES])
def test_recorded_drift_on_a_jacobi_window_is_the_exact_node_drift(len4, method, params, jacobi):
    """Position by position, the drift the engine records while decoding (node laws marginalised over each
    node's own window draws) averages to analysis/exact_jacobi's exact node drift within 4.5 standard
    errors over 600 images; strict's is exactly 0."""
    bundle, _, _ = len4
    joint = exact_jacobi_law(bundle, 1, jacobi=jacobi, method=method, cfg_scale=CFG, **params)
    res = api.decode(bundle, [1] * 600, method=method, drafter="jacobi", jacobi=jacobi, cfg_scale=CFG, seed=4,
                     record_drift=True, **params)
    drift = res.arrays["drift"]
    assert res.stats["drift_exact_fraction"] == 1.0
    if method == "strict":
        assert joint.node_drift_sum < 1e-12 and drift.max() < 1e-12
        return
    assert joint.node_drift_sum > 0.01, "the relaxation never fired on this toy"
    se = drift.std(0, ddof=1) / len(drift) ** 0.5
    exact = torch.tensor(joint.node_drift_by_position).numpy()
    assert (abs(drift.mean(0) - exact) <= 4.5 * se + 1e-9).all(), (drift.mean(0), exact, se)


def test_the_gumbel_table_follows_absolute_positions():
    """SCD's Gumbel sharing ties one noise vector to each absolute position until it is committed: after a
    row commits a + 1 tokens, its column c holds the old column c + a + 1's noise (fresh noise past the old
    window), and each redraft is the argmax of log p_stale + that noise."""
    from cascade_sd.decoding.jacobi import JacobiDrafting, JacobiSpec

    source = JacobiDrafting(JacobiSpec("scd-gumbel", window=6), vocab=5, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    source.start(2, gen)
    old = source.gumbel.clone()
    p_s = torch.softmax(torch.randn(2, 5, 5, generator=gen, dtype=torch.float64), -1)
    tok, q = source._redraft(p_s, p_s, torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.bool),
                             torch.tensor([0, 2]), gen)
    assert torch.equal(source.gumbel[0, :4], old[0, 1:]) and torch.equal(source.gumbel[1, :2], old[1, 3:])
    assert not torch.equal(source.gumbel[1, 2:], old[1, :3])  # past the old window: new noise
    assert torch.equal(tok, (p_s.log() + source.gumbel).argmax(-1)) and torch.equal(q, p_s)
