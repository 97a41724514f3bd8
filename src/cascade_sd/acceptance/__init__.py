"""Acceptance rules: the interface, the registry and the exact induced law of a node."""

from cascade_sd.acceptance.base import AcceptanceRule, NodeContext, NodeState, Param, RuleResources, TreeView
from cascade_sd.acceptance.cascade import BoundedCascadeRule, CascadeRule
from cascade_sd.acceptance.coolsd import CoolSDRule
from cascade_sd.acceptance.gsd import GSDRule
from cascade_sd.acceptance.lantern import LanternPPRule, LanternRule
from cascade_sd.acceptance.law import induced_law
from cascade_sd.acceptance.registry import RULES, get_rule, register
from cascade_sd.acceptance.strict import StrictRule

for _rule in (StrictRule, LanternRule, LanternPPRule, CoolSDRule, GSDRule, CascadeRule, BoundedCascadeRule):
    register(_rule)

__all__ = ["AcceptanceRule", "NodeContext", "NodeState", "Param", "RuleResources", "TreeView", "RULES", "get_rule",
           "induced_law", "register"]
