"""The speed benchmark (vanilla vs speculative variants in one process) on a toy bundle."""

import pytest

from cascade_sd import api
from cascade_sd.bench import format_table, run_bench
from cascade_sd.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_rows_follow_the_cost_model_and_count_every_image():
    bundle = api.load_bundle("toy:vocab=7,len=12,seed=0")
    rows = run_bench(bundle, batch_sizes=(1, 3), trees=("chain-3", "dynamic"), drafters=("eagle",), repeats=1, waves=2,
                     sampling={"cfg_scale": 2.0}, tree_options={"tree_top_k": 2, "depth": 3, "total_tokens": 6})
    assert [(r["batch"], r["tree"]) for r in rows] == [(1, "-"), (1, "chain-3"), (1, "dynamic"),
                                                       (3, "-"), (3, "chain-3"), (3, "dynamic")]
    for r in rows:
        assert r["images"] == 2 * r["batch"]
        assert r["tokens_per_second"] == pytest.approx(r["images"] * 12 / r["seconds"])
        if r["method"] == "vanilla":
            continue
        assert r["speedup"] > 0 and r["tau"] >= 1 and r["predicted_speedup"] > 0 and 0 <= r["engine_overhead_fraction"] < 1
        assert r["achieved_over_predicted"] == pytest.approx(r["speedup"] / r["predicted_speedup"])
        assert 1 <= r["mean_rows_per_round"] <= r["batch"]
    table = format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| 3 | 6 | strict | eagle | dynamic |" in table


def test_bench_rejects_bad_settings_before_compute():
    bundle = api.load_bundle("toy:vocab=7,len=12,seed=0")
    with pytest.raises(ConfigError, match=r"^waves=0 is out of range"):
        run_bench(bundle, waves=0)
    with pytest.raises(ConfigError, match=r"^drafter='medusa' is not allowed"):
        run_bench(bundle, drafters=("medusa",))
    with pytest.raises(ConfigError, match=r"^temperature=-1"):
        run_bench(bundle, sampling={"temperature": -1.0})
