"""Experiment config: defaults, schema validation and one-line errors before compute."""

from pathlib import Path

import pytest
import yaml

from cascade_sd.config import load_config, validate_config
from cascade_sd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_filled():
    cfg = validate_config({})
    assert cfg["data"]["source"] == "fashion-mnist"
    assert cfg["target"]["dim"] == 256
    assert cfg["sample"]["seeds"] == [0]


@pytest.mark.parametrize("path", ["config/config.yaml", ".test/config.yaml"])
def test_shipped_configs_validate(path):
    cfg = load_config(ROOT / path)
    assert cfg["threads"] >= 1


@pytest.mark.parametrize(
    "bad, expected",
    [
        ({"target": {"steps": 0}}, r"^config: target\.steps=0 is out of range; allowed \[1, inf\]$"),
        ({"data": {"source": "mnist"}}, r"^config: data\.source='mnist' is not allowed; choose one of 'fashion-mnist', 'digits'$"),
        ({"sample": {"top_p": 0}}, r"^config: sample\.top_p=0 is out of range; allowed \(0, 1\]$"),
        ({"target": {"stepz": 3}}, r"^config: unknown field target\.stepz; allowed fields here: .*steps"),
        ({"bogus": 1}, r"^config: unknown field bogus;"),
        ({"threads": "two"}, r"^config: threads='two' has the wrong type"),
        ({"sample": {"seeds": []}}, r"^config: sample\.seeds=\[\]"),
    ],
)
def test_bad_values_give_one_line_errors(bad, expected):
    with pytest.raises(ConfigError, match=expected) as err:
        validate_config(bad)
    assert "\n" not in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("target: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_input_is_not_mutated():
    raw = {"target": {"steps": 5}}
    validate_config(raw)
    assert raw == {"target": {"steps": 5}}
    assert yaml.safe_dump(raw)
