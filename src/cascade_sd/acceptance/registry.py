"""Rule registry: ``get_rule(name, **params)``; a new rule is one module plus ``register``."""

from __future__ import annotations

from typing import Any

from cascade_sd.acceptance.base import AcceptanceRule
from cascade_sd.errors import check_choice

RULES: dict[str, type[AcceptanceRule]] = {}


def register(cls: type[AcceptanceRule]) -> type[AcceptanceRule]:
    """Class decorator / call that adds a rule under its ``name``."""
    RULES[cls.name] = cls
    return cls


def get_rule(name: str, **params: Any) -> AcceptanceRule:
    """Instantiate rule ``name``; unknown names, unknown parameters and bad values are one-line errors."""
    check_choice("method", name, RULES)
    return RULES[name](**params)


def overrides(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The entries of a rule's full parameter dict that differ from its defaults, as the rule resolves
    them (a ``variant`` parameter, where a rule has one, fills the defaults of the others)."""
    base = {k: params[k] for k in ("variant",) if k in params and k in RULES[name].parameters}
    plain, resolved = get_rule(name).params, get_rule(name, **base).params
    return {k: v for k, v in params.items() if (plain if k in base else resolved).get(k) != v}
