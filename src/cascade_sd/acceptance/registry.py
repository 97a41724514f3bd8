"""Rule registry: ``get_rule(name, **params)``; a new rule is one module plus ``register``."""

from __future__ import annotations

from typing import Any

from cascade_sd.acceptance.base import AcceptanceRule
from cascade_sd.errors import ConfigError, check_choice

RULES: dict[str, type[AcceptanceRule]] = {}


def register(cls: type[AcceptanceRule]) -> type[AcceptanceRule]:
    """Class decorator / call that adds a rule under its ``name``."""
    RULES[cls.name] = cls
    return cls


def get_rule(name: str, **params: Any) -> AcceptanceRule:
    """Instantiate rule ``name``; unknown names or parameters are one-line errors."""
    check_choice("method", name, RULES)
    cls = RULES[name]
    unknown = sorted(set(params) - set(cls.defaults))
    if unknown:
        allowed = ", ".join(cls.defaults) or "none"
        raise ConfigError(f"parameter {unknown[0]!r} does not belong to rule {name!r}; its parameters: {allowed}")
    return cls(**params)
