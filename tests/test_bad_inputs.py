"""Every bad input a new user tried (and more): one line on stderr, exit 2, naming the field and what is
allowed, before any model forward. The commands run in-process through the CLI's entry point with every
torch module's forward replaced by a failure, so a check that comes after compute fails here."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cascade_sd.cli import run

TOY = "toy:vocab=7,len=12,seed=0"


def _files(root: Path) -> dict[str, str]:
    """Inputs the table refers to by name: a plain file, a corrupt checkpoint, decode folders with a corrupt
    drift.npz or no stats.json, configs with bad fields."""
    (root / "a-file").write_text("not a folder")
    (root / "corrupt.pt").write_bytes(b"\x00garbage")
    bad_drift = root / "bad-drift"
    bad_drift.mkdir()
    (bad_drift / "drift.npz").write_bytes(b"PK\x03\x04 truncated")
    (bad_drift / "stats.json").write_text(json.dumps({"method": "lantern", "tree": "chain-2"}))
    no_stats = root / "no-stats"
    no_stats.mkdir()
    np.savez(no_stats / "tokens.npz", tokens=np.zeros((1, 12), np.int64), labels=np.zeros(1, np.int64))
    configs = {
        "cfg-unknown-field": {"target": {"stepz": 3}},
        "cfg-steps-0": {"target": {"steps": 0}},
        "cfg-unknown-tree": {"decode": {"groups": [{"tree": "tree-99"}]}},
        "cfg-unknown-method": {"decode": {"groups": [{"tree": "chain-4", "methods": ["medusa"]}]}},
        "cfg-jacobi-tree": {"decode": {"groups": [{"drafter": "jacobi", "tree": "chain-4"}]}},
        "cfg-window-no-jacobi": {"decode": {"groups": [{"tree": "chain-4", "jacobi_window": 8}]}},
        "cfg-nan-lr": {"target": {"lr": float("nan")}},
        "cfg-inf-cfg": {"sample": {"cfg_scale": float("inf")}},
    }
    for name, body in configs.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump({"results": str(root / "results"), **body}))
    (root / "cfg-not-yaml.yaml").write_text("target: [unclosed")
    return ({name: str(root / name) for name in ["a-file", "bad-drift", "no-stats"]} | {"corrupt": str(root / "corrupt.pt")}
            | {c: str(root / f"{c}.yaml") for c in [*configs, "cfg-not-yaml"]})


DECODE = ["decode", "--bundle", TOY, "--out-dir", "{tmp}/out"]
BENCH = ["bench", "--bundle", TOY, "--drafters", "eagle", "--repeats", "1"]
RULES_BENCH = ["bench-rules", "--bundle", TOY]
CONT = ["decode", "--model", "continuous", "--bundle", "{a-file}", "--out-dir", "{tmp}/out"]

# (arguments, text the one line must contain: the field and what is allowed)
CASES = [
    # decode: choices
    (DECODE + ["--method", "medusa"], "method='medusa' is not allowed; choose one of"),
    (DECODE + ["--tree", "tree-99"], "tree='tree-99'"),
    (DECODE + ["--tree", "chain-0"], "tree='chain-0': chain length 0 is out of range; allowed [1, inf]"),
    (DECODE + ["--drafter", "medusa"], "drafter='medusa' is not allowed"),
    (DECODE + ["--model", "diffusion"], "model='diffusion' is not allowed"),
    (DECODE + ["--dtype", "float8"], "dtype='float8'"),
    (DECODE + ["--device", "gpu"], "device='gpu'"),
    (DECODE + ["--device", "cuda:0"], "device='cuda:0' but no CUDA device is available; allowed here: 'cpu'"),
    (DECODE + ["--method", "lantern_pp", "--tree", "dynamic"], "lantern_pp"),
    # decode: numbers, including non-finite ones
    (DECODE + ["--per-class", "0"], "'--per-class'"),
    (DECODE + ["--per-class", "-1"], "'--per-class'"),
    (DECODE + ["--per-class", "x"], "'--per-class'"),
    (DECODE + ["--seed", "-1"], "'--seed'"),
    (DECODE + ["--temperature", "-1"], "temperature=-1.0 is out of range; allowed [0, inf]"),
    (DECODE + ["--temperature", "nan"], "temperature=nan is not a finite number"),
    (DECODE + ["--temperature", "inf"], "temperature=inf is not a finite number"),
    (DECODE + ["--top-k", "-1"], "top_k=-1 is out of range"),
    (DECODE + ["--top-k", "1.5"], "'--top-k'"),
    (DECODE + ["--top-p", "0"], "top_p=0.0 is out of range; allowed (0, 1]"),
    (DECODE + ["--top-p", "1.5"], "top_p=1.5 is out of range"),
    (DECODE + ["--top-p", "nan"], "top_p=nan is not a finite number"),
    (DECODE + ["--cfg-scale", "inf"], "cfg_scale=inf is not a finite number"),
    (DECODE + ["--cfg-scale", "-inf"], "cfg_scale=-inf is not a finite number"),
    (DECODE + ["--cfg-scale", "nan"], "cfg_scale=nan is not a finite number"),
    (DECODE + ["--cfg-scale", "-1"], "cfg_scale=-1.0 is out of range"),
    (DECODE + ["--tree", "dynamic", "--tree-top-k", "0"], "tree_top_k=0 is out of range"),
    (DECODE + ["--tree", "dynamic", "--tree-top-k", "12"], "tree_top_k=12 is out of range; allowed [1, 7]"),
    (DECODE + ["--tree", "dynamic", "--tree-top-k", "2", "--depth", "0"], "depth=0"),
    (DECODE + ["--tree", "dynamic", "--total-tokens", "abc"], "total_tokens='abc'"),
    (DECODE + ["--tree", "dynamic", "--tree-top-k", "2", "--total-tokens", "1"], "total_tokens=1"),
    (DECODE + ["--drift-draws", "0"], "'--drift-draws'"),
    (DECODE + ["--drift-rows", "0"], "'--drift-rows'"),
    # decode: conditions
    (DECODE + ["--labels", ","], "labels=','"),
    (DECODE + ["--labels", "a,b"], "labels='a,b' is not a comma-separated list of integers"),
    (DECODE + ["--labels", "5"], "labels: 5 is out of range; allowed 0..1"),
    (DECODE + ["--labels", "-1"], "labels: -1 is out of range; allowed 0..1"),
    (DECODE + ["--labels", "1", "--per-class", "2"], "give either --labels or --per-class"),
    (DECODE + ["--captions", "{a-file}"], "--captions needs a t2i target"),
    # decode: rule parameters
    (DECODE + ["--method", "lantern", "--delta", "2"], "delta=2.0 is out of range"),
    (DECODE + ["--method", "lantern", "--delta", "abc"], "delta='abc'"),
    (DECODE + ["--method", "lantern", "--delta", "nan"], "delta=nan is not a finite number"),
    (DECODE + ["--method", "lantern", "--delta"], "--delta needs a value"),
    (DECODE + ["--method", "lantern", "--window", "3"], "--window is not an option of method='lantern'"),
    (DECODE + ["--foo", "1"], "--foo is not an option of method='strict'"),
    # decode: the drafter-free Jacobi source
    (DECODE + ["--jacobi", "sjd"], "need --drafter jacobi; got --drafter eagle"),
    (DECODE + ["--drafter", "jacobi", "--jacobi", "sjd-xl"], "jacobi='sjd-xl' is not allowed"),
    (DECODE + ["--drafter", "jacobi", "--jacobi-window", "1"], "jacobi_window=1 is out of range; allowed [2, inf]"),
    (DECODE + ["--drafter", "jacobi", "--jacobi", "sjd-pac", "--jacobi-window", "8"], "allowed jacobi_window >= 14"),
    (DECODE + ["--drafter", "jacobi", "--jacobi-code", "reference-code"], "available for jacobi in ['scd-mc', 'sjd-pac']"),
    (DECODE + ["--drafter", "jacobi", "--jacobi", "sjd-pac", "--jacobi-code", "reference-code", "--method", "gsd"],
     "allowed method: 'strict'"),
    (DECODE + ["--drafter", "jacobi", "--jacobi", "sjd-pac", "--jacobi-code", "reference-code", "--record-drift"],
     "longest-row verification has no per-node law"),
    (BENCH + ["--jacobi", "sjd", "--jacobi-code", "exact,reference-code"], "got jacobi='sjd'"),
    (RULES_BENCH + ["--drafter", "jacobi", "--jacobi", "scd-mc", "--jacobi-code", "reference-code", "--rules", "coolsd"],
     "got method='coolsd' (allowed: 'strict')"),
    (DECODE + ["--drafter", "jacobi", "--tree", "dynamic"], "tree='dynamic': drafter='jacobi' verifies its own window"),
    (DECODE + ["--drafter", "jacobi", "--method", "cascade"], "breadth_source='target'"),
    (BENCH + ["--jacobi-window", "8"], "apply to --jacobi rows; give --jacobi"),
    (RULES_BENCH + ["--drafter", "jacobi", "--jacobi", "medusa"], "jacobi='medusa' is not allowed"),
    (DECODE + ["stray"], "unexpected argument 'stray'"),
    # decode: bundles and folders
    (["decode", "--out-dir", "{tmp}/out"], "Missing option '--bundle'"),
    (["decode", "--bundle", TOY], "Missing option '--out-dir'"),
    (["decode", "--bundle", "{tmp}/nowhere", "--out-dir", "{tmp}/out"], "nowhere"),
    (["decode", "--bundle", "toy:vocab=abc", "--out-dir", "{tmp}/out"], "toy"),
    (["decode", "--bundle", "{a-file}", "--out-dir", "{tmp}/out"], "a-file"),
    (["decode", "--bundle", TOY, "--out-dir", "{a-file}/out"], "out_dir="),
    (["decode", "--bundle", TOY, "--out-dir", "{a-file}"], "out_dir="),
    (["decode", "--bundle", TOY, "--out-dir", "/proc/cascade-sd-out"], "out_dir="),
    (CONT + ["--top-k", "5"], "do not apply to --model continuous"),
    # bench and bench-rules
    (BENCH + ["--batch-sizes", "0"], "batch_sizes"),
    (BENCH + ["--batch-sizes", "a,b"], "batch_sizes='a,b'"),
    (BENCH + ["--trees", "tree-99"], "tree='tree-99'"),
    (BENCH + ["--waves", "0"], "'--waves'"),
    (BENCH + ["--repeats", "0"], "'--repeats'"),
    (BENCH + ["--drafters", "medusa"], "drafter='medusa' is not allowed"),
    (BENCH + ["--threads", "0"], "'--threads'"),
    (BENCH + ["--cfg-scale", "inf"], "cfg_scale=inf is not a finite number"),
    (BENCH + ["--method", "medusa"], "method='medusa' is not allowed"),
    (RULES_BENCH + ["--tree", "tree-99"], "tree='tree-99'"),
    (RULES_BENCH + ["--rules", "medusa"], "medusa"),
    (RULES_BENCH + ["--defaults-only", "--sweep-only"], "defaults_only and sweep_only exclude each other"),
    (RULES_BENCH + ["--top-p", "2"], "top_p=2.0 is out of range"),
    # audit and drift on folders
    (["audit", "{tmp}/nowhere"], "run="),
    (["audit", "{bad-drift}"], "drift.npz"),
    (["audit", "{tmp}", "--tolerance", "-1"], "'--tolerance'"),
    (["drift", "{no-stats}", "--bundle", TOY], "stats.json"),
    (["drift", "{bad-drift}", "--bundle", TOY, "--images", "0"], "'--images'"),
    # configs
    (["doctor", "-c", "{tmp}/missing.yaml"], "missing.yaml"),
    (["doctor", "-c", "{cfg-not-yaml}"], "cfg-not-yaml.yaml"),
    (["doctor", "-c", "{cfg-unknown-field}"], "unknown field target.stepz"),
    (["doctor", "-c", "{cfg-steps-0}"], "target.steps=0 is out of range"),
    (["doctor", "-c", "{cfg-unknown-tree}"], "decode.groups.0.tree='tree-99'"),
    (["doctor", "-c", "{cfg-unknown-method}"], "medusa"),
    (["doctor", "-c", "{cfg-jacobi-tree}"], "drafter 'jacobi' verifies its own window; leave out tree"),
    (["doctor", "-c", "{cfg-window-no-jacobi}"], "jacobi_window needs drafter: jacobi"),
    (["doctor", "-c", "{cfg-nan-lr}"], "target.lr=nan"),
    (["doctor", "-c", "{cfg-inf-cfg}"], "sample.cfg_scale=inf"),
    # other commands
    (["train", "drafter", "--arch", "medusa", "--target", "{corrupt}", "--distill", "{corrupt}",
      "--out", "{tmp}/d.pt", "--metrics", "{tmp}/m.json"], "arch='medusa' is not allowed"),
    (["grid", "decode", "--bundle", "{tmp}", "--tree", "chain-2", "--drafter", "eagle", "--method", "lantern",
      "--setting", "delta=abc", "--seed", "0", "--out-dir", "{tmp}/cell"], "delta"),
    (["track", "finish", "--status", "DONE"], "status='DONE' is not allowed; choose one of 'FAILED', 'FINISHED'"),
    (["nonsense"], "No such command 'nonsense'"),
]


@pytest.fixture()
def no_forward(monkeypatch):
    """Any torch module called (a model forward) fails the test: every check must come first."""
    def forbidden(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__} forward ran before the bad input was reported")

    monkeypatch.setattr(torch.nn.Module, "__call__", forbidden)


@pytest.mark.parametrize("args, expected", CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_before_compute(args, expected, tmp_path, capsys, no_forward):
    names = _files(tmp_path) | {"tmp": str(tmp_path)}
    argv = [a.format(**names) for a in args]
    expected = expected.format(**names)
    code = run(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err, out)
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cell").exists()  # nothing half-written


def test_the_table_holds_at_least_the_64_cases_of_the_audit():
    assert len(CASES) >= 64 and len({tuple(a) for a, _ in CASES}) == len(CASES)
