"""The acceptance-rule interface (DESIGN 4.1).

At a tree node a rule holds the residual target law ``p_j`` and, for sampled siblings, the
proposal ``q_j`` the next candidate is drawn from (``None`` for point-mass candidates). For each
candidate child it answers ``accept_prob``; on rejection ``reject`` returns the next state; after
the last sibling the bonus token is drawn from ``bonus_law``. Everything is batched over rows
([B, V] laws, [B] candidates) so the engine walks all images of a batch at once, and the exact
induced law of a node is computed by enumerating outcomes through these same methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

# Residual masses below this are treated as empty: the branch is reached with probability ~0.
MASS_EPS = 1e-30


@dataclass
class NodeState:
    """Residual target law ``p`` [B, V] and the current proposal ``q`` [B, V] (None: point masses)."""

    p: torch.Tensor
    q: torch.Tensor | None


@dataclass
class NodeContext:
    """What a rule may read at a node: draft depth (1 = root's children) and optional extras.

    ``extras`` carries context-aware inputs (target/drafter representations, codebook
    neighbours, sibling outputs); context-free rules ignore it.
    """

    depth: int = 1
    extras: dict[str, Any] = field(default_factory=dict)


def normalise(mass: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Normalise rows of a non-negative ``mass``; rows with (numerically) no mass take ``fallback``.

    Such rows are reached with probability ~0, so the fallback never changes an induced law.
    """
    total = mass.sum(-1, keepdim=True)
    empty = total <= MASS_EPS
    return torch.where(empty, fallback, mass / torch.where(empty, torch.ones_like(total), total))


def remove_token(law: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``law`` with each row's token ``x`` zeroed and the row renormalised (all-zero if nothing is left)."""
    out = law.scatter(-1, x.unsqueeze(-1), 0.0)
    total = out.sum(-1, keepdim=True)
    return torch.where(total > MASS_EPS, out / total.clamp_min(MASS_EPS), torch.zeros_like(out))


def gather(law: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``law[b, x[b]]`` for every row."""
    return law.gather(-1, x.unsqueeze(-1)).squeeze(-1)


class AcceptanceRule(ABC):
    """Base class of every acceptance rule; subclasses register under ``name``."""

    name: ClassVar[str]
    #: Parameter names and their defaults (``cascade-sd rules`` lists them).
    defaults: ClassVar[dict[str, Any]] = {}
    #: Whether the rule states a per-node TV bound (``tv_bound`` returns a tensor, not None).
    declares_bound: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        self.params = {**self.defaults, **params}

    def start(self, p: torch.Tensor, q: torch.Tensor | None, sampled: bool, ctx: NodeContext) -> NodeState:
        """State before the first sibling: the full target law and the drafter law (if sampled)."""
        return NodeState(p=p, q=q if sampled else None)

    @abstractmethod
    def accept_prob(self, state: NodeState, x: torch.Tensor, ctx: NodeContext) -> torch.Tensor:
        """Probability [B] of accepting candidate ``x`` [B] in ``state``."""

    @abstractmethod
    def reject(self, state: NodeState, x: torch.Tensor, ctx: NodeContext) -> NodeState:
        """The state after ``x`` was rejected: next residual ``p_{j+1}`` and proposal ``q_{j+1}``."""

    def bonus_law(self, state: NodeState, ctx: NodeContext) -> torch.Tensor:
        """Law [B, V] of the token emitted after every sibling was rejected (or at a leaf)."""
        return state.p

    def tv_bound(self, p: torch.Tensor, q: torch.Tensor | None, ctx: NodeContext) -> torch.Tensor | None:
        """Declared per-node bound [B] on TV(induced law, p), or None when the rule states none."""
        return None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"
