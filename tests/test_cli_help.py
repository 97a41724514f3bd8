"""What a user reads first: every `--help` is readable at 100 columns, and the CLI, the Python API and
the workflow decode with one set of defaults."""

import inspect

import pytest
import typer
import yaml
from typer.testing import CliRunner

from cascade_sd import api, defaults
from cascade_sd.cli import app
from cascade_sd.config import SCHEMA_PATH

COMMAND = typer.main.get_command(app)


def _commands(group: typer.core.TyperGroup, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    for name, cmd in group.commands.items():
        out += _commands(cmd, prefix + (name,)) if hasattr(cmd, "commands") else [prefix + (name,)]
    return out


@pytest.mark.parametrize("path", _commands(COMMAND), ids=lambda p: " ".join(p) or "cascade-sd")
def test_help_fits_100_columns_uncut(path):
    res = CliRunner().invoke(app, [*path, "--help"], terminal_width=100)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert not any(mark in res.output for mark in ("…", "<bool>", "╭")), res.output  # nothing cut, no box
    listed = res.output.partition("\nCommands:\n")[2].splitlines()
    assert not [line for line in listed if line.endswith("...")], res.output  # each command's summary whole


def _option_defaults(*path: str) -> dict[str, object]:
    cmd = COMMAND
    for name in path:
        cmd = cmd.commands[name]
    return {p.name: p.default for p in cmd.params}


def test_cli_api_and_workflow_share_one_set_of_defaults():
    """`cascade-sd decode`, the benches, `api.decode` and `api.sequence_log_prob` with no flags sample as the
    workflow's first grid group does: chain-4, EAGLE, CFG 3 (the schema's sample.* and decode.*)."""
    config = yaml.safe_load(open(SCHEMA_PATH.parents[2] / "config" / "config.yaml"))
    assert {k: config["sample"][k] for k in defaults.SAMPLING} == defaults.SAMPLING
    assert config["decode"]["groups"][0]["tree"] == defaults.TREE == "chain-4"
    assert config["decode"]["groups"][0]["drafter"] == defaults.DRAFTER
    assert config["continuous"]["decode"]["cfg_scale"] == defaults.CONTINUOUS_CFG_SCALE == defaults.CFG_SCALE == 3.0
    expected = {**defaults.SAMPLING, "tree": defaults.TREE, "drafter": defaults.DRAFTER, **defaults.DYNAMIC}
    for path in (("decode",), ("bench-rules",)):
        got = _option_defaults(*path)
        assert {k: got[k] if k != "total_tokens" else int(got[k]) for k in expected} == expected, path
    bench = _option_defaults("bench")
    assert {k: bench[k] for k in defaults.SAMPLING} == defaults.SAMPLING
    assert _option_defaults("bench-sequence")["cfg_scale"] == defaults.CFG_SCALE
    assert _option_defaults("continuous", "bench")["cfg_scale"] == defaults.CONTINUOUS_CFG_SCALE
    for fn in (api.decode, api.sequence_log_prob):
        sig = inspect.signature(fn).parameters
        assert {k: sig[k].default for k in expected} == expected, fn.__name__
