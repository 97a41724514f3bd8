"""The speed benchmark (vanilla vs speculative variants in one process) on a toy bundle."""

import json

import pytest
from typer.testing import CliRunner

from analysis.sequence_tv import NUMERICAL_TOLERANCE
from cascade_sd import api
from cascade_sd.bench import format_table, run_bench
from cascade_sd.cli import app
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


def test_bench_prints_each_row_as_it_is_measured(tmp_path):
    """`cascade-sd bench`: the header, then one line per setting as it is measured (a batch's vanilla row
    after its speculative rows, when its median is known), all rows in --out; no progress line off a TTY."""
    bundle = api.load_bundle("toy:vocab=7,len=12,seed=0")
    streamed: list[tuple[int, str]] = []
    rows = run_bench(bundle, batch_sizes=(1, 2), trees=("chain-2",), drafters=("eagle",), repeats=1,
                     on_row=lambda r: streamed.append((r["batch"], r["method"])))
    assert streamed == [(1, "strict"), (1, "vanilla"), (2, "strict"), (2, "vanilla")]
    assert sorted(streamed) == sorted((r["batch"], r["method"]) for r in rows)
    out = tmp_path / "rows.json"
    res = CliRunner().invoke(app, ["bench", "--bundle", "toy:vocab=7,len=12,seed=0", "--batch-sizes", "1,2",
                                   "--trees", "chain-2,chain-3", "--drafters", "eagle", "--repeats", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines[0].startswith("| batch |") and len(lines) == 2 + 6 and "\r" not in res.output
    assert [line.split("|")[3].strip() for line in lines[2:]] == ["strict", "strict", "vanilla"] * 2
    assert len(json.loads(out.read_text())) == 6


def test_bench_rejects_bad_settings_before_compute():
    bundle = api.load_bundle("toy:vocab=7,len=12,seed=0")
    with pytest.raises(ConfigError, match=r"^waves=0 is out of range"):
        run_bench(bundle, waves=0)
    with pytest.raises(ConfigError, match=r"^drafter='medusa' is not allowed"):
        run_bench(bundle, drafters=("medusa",))
    with pytest.raises(ConfigError, match=r"^temperature=-1"):
        run_bench(bundle, sampling={"temperature": -1.0})


def test_bench_sequence_prints_a_row_per_setting_as_measured(tmp_path):
    """`bench-sequence`: the exact sequence law's cost against decoding the same images, with what it
    measures; strict's log-ratios are 0, a relaxed rule's are not."""
    out = tmp_path / "rows.json"
    res = CliRunner().invoke(app, ["bench-sequence", "--bundle", "toy:vocab=16,len=6,seed=0", "--rules", "strict,coolsd",
                                   "--trees", "chain-2,dynamic", "--images", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())
    assert [(r["tree"], r["method"]) for r in rows] == [("chain-2", "strict"), ("chain-2", "coolsd"),
                                                        ("dynamic", "strict"), ("dynamic", "coolsd")]
    assert len(res.output.strip().splitlines()) == 2 + len(rows)  # header, rule, one line per row
    for r in rows:
        assert r["sequence_exact"] and r["cost_ratio"] > 0 and r["sequence_images"] == 3
        exact_law = abs(r["sequence_kl"]) < NUMERICAL_TOLERANCE and r["sequence_tv"] < NUMERICAL_TOLERANCE  # float32 passes
        assert exact_law == (r["method"] == "strict"), r
