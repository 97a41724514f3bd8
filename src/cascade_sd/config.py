"""Experiment configuration: load YAML, fill defaults, validate against the workflow's schema.

The Snakefile and every CLI job use this one function, so a bad value is rejected before any
compute with one line naming the field, the value and what is allowed (DESIGN 11).
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from cascade_sd.errors import ConfigError

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


def load_schema() -> dict[str, Any]:
    """The JSON schema of the experiment config (read from the checkout; the package installs editable)."""
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _fill_defaults(schema: dict[str, Any], value: dict[str, Any]) -> None:
    for key, sub in schema.get("properties", {}).items():
        if key not in value and "default" in sub:
            value[key] = copy.deepcopy(sub["default"])
        if isinstance(value.get(key), dict) and sub.get("type") == "object":
            _fill_defaults(sub, value[key])


def _describe(error: jsonschema.ValidationError) -> str:
    field = ".".join(str(p) for p in error.absolute_path) or "<config>"
    s = error.schema
    validator = error.validator
    if validator == "additionalProperties":
        allowed = ", ".join(sorted(s.get("properties", {})))
        extra = sorted(set(error.instance) - set(s.get("properties", {})))
        where = f"{field}." if field != "<config>" else ""
        return f"config: unknown field {where}{extra[0]}; allowed fields here: {allowed}"
    if validator == "enum":
        return f"config: {field}={error.instance!r} is not allowed; choose one of {', '.join(map(repr, s['enum']))}"
    if validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        lo = s.get("minimum", s.get("exclusiveMinimum"))
        hi = s.get("maximum", s.get("exclusiveMaximum"))
        left = "(" if "exclusiveMinimum" in s else "["
        right = ")" if "exclusiveMaximum" in s else "]"
        rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        return f"config: {field}={error.instance!r} is out of range; allowed {rng}"
    if validator == "type":
        return f"config: {field}={error.instance!r} has the wrong type; expected {s['type']}"
    return f"config: {field}={error.instance!r}: {error.message}"


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Return a defaults-filled copy of ``config`` or raise a one-line ConfigError."""
    schema = load_schema()
    value = copy.deepcopy(config or {})
    if not isinstance(value, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(value).__name__}")
    _check_finite(value)
    _fill_defaults(schema, value)
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(value), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(_describe(errors[0]))
    _check_models(value["models"])
    if value["models"]["source"] != "builtin" and value["continuous"]["enabled"]:
        raise ConfigError(f"config: continuous.enabled=true is not allowed with models.source="
                          f"{value['models']['source']!r}; the CSpD branch trains built-in models (set it to false)")
    from cascade_sd.grid import check_decode

    check_decode(value)
    return value


def _check_finite(value: Any, field: str = "") -> None:
    """YAML reads .nan and .inf as numbers the schema's bounds let through: reject them by name."""
    if isinstance(value, dict):
        for key, sub in value.items():
            _check_finite(sub, f"{field}.{key}" if field else str(key))
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            _check_finite(sub, f"{field}.{i}")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config: {field}={value!r} is not a finite number")


def _check_models(models: dict[str, Any]) -> None:
    """Real checkpoints: both files named and present (one-line errors before any job)."""
    if models["source"] == "builtin":
        return
    for key in ("vq", "gpt"):
        path = models[key]
        if path is None:
            raise ConfigError(f"config: models.{key} is required when models.source={models['source']!r}; "
                              "give the path of your local checkpoint file")
        if not Path(path).is_file():
            raise ConfigError(f"config: models.{key}={path!r}: file not found")


def load_config(path: str | os.PathLike | None) -> dict[str, Any]:
    """Read a YAML config (or ``{}`` when ``path`` is None) and validate it."""
    if path is None:
        return validate_config({})
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    return validate_config(data)
