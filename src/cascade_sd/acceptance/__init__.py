"""Acceptance rules: the interface, the registry and the exact induced law of a node."""

from cascade_sd.acceptance.base import AcceptanceRule, NodeContext, NodeState
from cascade_sd.acceptance.law import induced_law
from cascade_sd.acceptance.registry import RULES, get_rule, register
from cascade_sd.acceptance.strict import StrictRule

register(StrictRule)

__all__ = ["AcceptanceRule", "NodeContext", "NodeState", "RULES", "get_rule", "induced_law", "register", "StrictRule"]
