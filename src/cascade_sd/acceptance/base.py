"""The acceptance-rule interface (DESIGN 4.1).

At a tree node a rule holds the residual target law ``p_j`` and, for sampled siblings, the
proposal ``q_j`` the next candidate is drawn from (``None`` for point-mass candidates). For each
candidate child it answers ``accept_prob``; on rejection ``reject`` returns the next state; after
the last sibling the bonus token is drawn from ``bonus_law`` (of ``reject``'s state when that
sibling was rejected: ``bonus_after_reject``, which a rule may compute without the next
proposal). Everything is batched over rows ([B, V] laws, [B] candidates) so the engine walks all
images of a batch at once, and the exact induced law of a node is computed by enumerating
outcomes through these same methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from cascade_sd.errors import ConfigError, check_choice, check_range

# Residual masses below this are treated as empty: the branch is reached with probability ~0.
MASS_EPS = 1e-30


@dataclass
class NodeState:
    """Residual target law ``p`` [B, V] and the current proposal ``q`` [B, V] (None: point masses)."""

    p: torch.Tensor
    q: torch.Tensor | None

    def rows(self, idx: torch.Tensor) -> "NodeState":
        """The state of rows ``idx``."""
        return NodeState(p=self.p[idx], q=None if self.q is None else self.q[idx])

    def put(self, idx: torch.Tensor, other: "NodeState") -> "NodeState":
        """This state with rows ``idx`` replaced by ``other`` (no proposal if ``other`` has none)."""
        q = None if self.q is None or other.q is None else self.q.index_put((idx,), other.q)
        return NodeState(p=self.p.index_put((idx,), other.p), q=q)


@dataclass
class NodeContext:
    """What a rule may read at a node: draft depth (1 = root's children), number of candidate
    children (an int or a [B] tensor) and optional extras.

    ``extras`` carries context-aware inputs (per-candidate signals built by the rule's
    ``node_extras``); context-free rules ignore it.
    """

    depth: int = 1
    n_candidates: int | torch.Tensor = 1
    extras: dict[str, Any] = field(default_factory=dict)

    def rows(self, idx: torch.Tensor, batch: int) -> "NodeContext":
        """The context of rows ``idx`` of a ``batch``-row node (entries shared by every row stay as they are)."""
        pick = lambda v: v[idx] if torch.is_tensor(v) and v.dim() and v.shape[0] == batch else v
        return NodeContext(depth=self.depth, n_candidates=pick(self.n_candidates),
                           extras={k: pick(v) for k, v in self.extras.items()})


@dataclass(frozen=True)
class Param:
    """One rule parameter: default, kind and allowed values (validated with a one-line error).

    ``kind`` is "float", "int", "bool" or "choice"; ``lo``/``hi`` bound numbers (``lo_open``
    excludes lo); ``choices`` lists the strings a "choice" allows; ``optional`` allows None.
    """

    default: Any
    kind: str = "float"
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False
    doc: str = ""

    def check(self, name: str, value: Any) -> Any:
        """The validated value (CLI strings are parsed)."""
        if value is None and self.optional:
            return None
        if self.kind == "choice":
            check_choice(name, value, self.choices)
            return value
        if isinstance(value, str):
            value = self.parse(name, value)
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"{name}={value!r} is not allowed; expected on/off (true/false)")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.kind == "int" and value != int(value)):
            raise ConfigError(f"{name}={value!r} is not allowed; expected a{'n integer' if self.kind == 'int' else ' number'}")
        value = int(value) if self.kind == "int" else float(value)
        check_range(name, value, self.lo, self.hi, lo_open=self.lo_open)
        return value

    def parse(self, name: str, text: str) -> Any:
        """Parse a command-line string for this parameter."""
        if self.optional and text.lower() in ("none", "auto", ""):
            return None
        if self.kind == "bool":
            table = {"on": True, "true": True, "1": True, "yes": True, "off": False, "false": False, "0": False, "no": False}
            if text.lower() not in table:
                raise ConfigError(f"{name}={text!r} is not allowed; expected on/off (true/false)")
            return table[text.lower()]
        if self.kind == "choice":
            return text
        try:
            return int(text) if self.kind == "int" else float(text)
        except ValueError:
            raise ConfigError(f"{name}={text!r} is not allowed; expected a{'n integer' if self.kind == 'int' else ' number'}") from None


@dataclass
class RuleResources:
    """What a rule may need from the bundle, given once per decode: vocabulary size, the
    tokenizer's codebook vectors [V, d] and the target's input token embeddings [V, D] (None when
    the bundle has none)."""

    vocab: int
    codebook: torch.Tensor | None = None
    cache_dir: str | None = None
    token_embeddings: torch.Tensor | None = None


@dataclass
class TreeView:
    """One verified round, for context-aware rules: the draft tree and representations per node.

    ``target_logits`` [B, T+1, V]: CFG-guided target logits at each node (its children's law
    before temperature/filtering); ``target_hidden`` [B, T+1, D]: the target's last hidden state
    (conditional stream); ``drafter_logits`` [B, T+1, V] and ``drafter_hidden`` [B, T+1, D']: the
    drafter's outputs at each node (zeros where it did not run, flagged by ``drafter_ran``
    [B, T+1]; None unless the rule ``reads_drafter``); ``p`` [B, T+1, V]: target laws; ``params``:
    the sampling parameters that made p.
    """

    tree: Any
    p: torch.Tensor
    target_logits: torch.Tensor
    target_hidden: torch.Tensor
    drafter_logits: torch.Tensor | None = None
    drafter_hidden: torch.Tensor | None = None
    drafter_ran: torch.Tensor | None = None
    params: Any = None


@dataclass
class ProbeOutputs:
    """The models' outputs at hypothetical children x [K] of one node (drift analysis): CFG-guided
    target logits [K, V], the target's law at x [K, V] and hidden state [K, D], and the drafter's
    guided logits [K, V] and hidden state [K, D'] (None where the drafter does not run at that level)."""

    target_logits: torch.Tensor
    target_hidden: torch.Tensor
    p: torch.Tensor
    drafter_logits: torch.Tensor | None = None
    drafter_hidden: torch.Tensor | None = None


def normalise(mass: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Normalise rows of a non-negative ``mass``; rows with (numerically) no mass take ``fallback``.

    Such rows are reached with probability ~0, so the fallback never changes an induced law.
    """
    total = mass.sum(-1, keepdim=True)
    return torch.where(total <= MASS_EPS, fallback, mass / total)  # empty rows' quotients are discarded


def remove_token(law: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``law`` with each row's token ``x`` zeroed and the row renormalised (all-zero if nothing is left)."""
    out = law.scatter(-1, x.unsqueeze(-1), 0.0)
    total = out.sum(-1, keepdim=True)
    return out.div_(total.clamp_min(MASS_EPS)).mul_(total > MASS_EPS)  # finite quotients: × 0 clears them


def gather(law: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``law[b, x[b]]`` for every row."""
    return law.gather(-1, x.unsqueeze(-1)).squeeze(-1)


class AcceptanceRule(ABC):
    """Base class of every acceptance rule; subclasses register under ``name``."""

    name: ClassVar[str]
    #: Parameters with defaults and allowed values (``cascade-sd rules`` lists them).
    parameters: ClassVar[dict[str, Param]] = {}
    #: Whether the rule states a per-node TV bound (``tv_bound`` returns a tensor, not None).
    declares_bound: ClassVar[bool] = False
    #: The paper's own per-node bound in words (``paper_bound``), or None.
    paper_bound_text: ClassVar[str | None] = None
    #: Whether the rule reads the round's draft-tree representations (``prepare``/``node_extras``).
    needs_tree: ClassVar[bool] = False
    #: Whether it reads the drafter's outputs across the tree (static drafting then expands every
    #: node above the last level, and the view carries the drafter's logits).
    reads_drafter: ClassVar[bool] = False
    #: Whether the rule is defined for static (sampled) trees only (LANTERN++'s setting).
    static_tree_only: ClassVar[bool] = False
    #: Parameter that sets the relaxation strength, for sweeps and tests, and whether larger
    #: values relax more (``strength_increases``) or less (similarity thresholds).
    strength: ClassVar[str | None] = None
    strength_increases: ClassVar[bool] = True
    #: Whether the bonus law after rejecting a single sampled candidate is the same for every
    #: candidate (strict-type residuals); lets ``induced_law`` skip enumerating the draws.
    residual_independent_of_candidate: ClassVar[bool] = False
    #: Settings benchmarked and swept by the workflow: the paper's defaults ({}) first, then overrides.
    sweep: ClassVar[tuple[dict[str, Any], ...]] = ({},)

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.parameters))
        if unknown:
            allowed = ", ".join(self.parameters) or "none"
            raise ConfigError(f"parameter {unknown[0]!r} does not belong to rule {self.name!r}; its parameters: {allowed}")
        self.params = {k: spec.check(k, params.get(k, spec.default)) for k, spec in self.parameters.items()}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Parameter defaults."""
        return {k: spec.default for k, spec in cls.parameters.items()}

    def bind(self, resources: RuleResources) -> None:
        """Read what the rule needs from the bundle (once per decode); checks vocabulary-dependent params."""

    def prepare(self, view: TreeView) -> Any:
        """Per-round precomputation for context-aware rules (``needs_tree``); None by default."""
        return None

    def node_extras(self, prepared: Any, view: TreeView, node: torch.Tensor, kids: torch.Tensor) -> dict[str, Any]:
        """Extras of ``NodeContext`` at ``node`` [B] whose candidate children are ``kids`` [B, K] (−1 padded)."""
        return {}

    @property
    def draw_dependent(self) -> bool:
        """Whether a candidate's signals move with the draft draws (its own outputs, its siblings'): then
        a node's law on a sampled tree needs ``draw_extras`` for every possible draw (DESIGN 6)."""
        return False

    #: Whether the draw-dependent signals can only raise a candidate's acceptance above its value
    #: without them (so a candidate accepted for sure without them needs no probe).
    signals_only_raise: ClassVar[bool] = False

    def signals_can_fire(self, prepared: Any, view: TreeView, row: int, node: int, n_candidates: int) -> bool:
        """Whether any draw of the node's children could carry a signal (False: the node's law is the
        law without signals, and no probe is needed)."""
        return True

    def draw_extras(self, prepared: Any, view: TreeView, row: int, node: int, seqs: torch.Tensor,
                    probe: Any) -> dict[str, Any]:
        """``node_extras`` of one row had the node's children been ``seqs`` [D, n] (one row per draw
        sequence); ``probe(tokens)`` gives ``ProbeOutputs`` at hypothetical children. Rules whose
        ``draw_dependent`` is true implement it."""
        raise NotImplementedError(f"rule {self.name!r} has no draw-dependent signals")

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

    def bonus_after_reject(self, state: NodeState, x: torch.Tensor, ctx: NodeContext) -> torch.Tensor:
        """``bonus_law`` of ``reject``'s state: the bonus law once the last candidate ``x`` [B] was
        rejected. A rule may override it to skip what only a further sibling would read (the next
        proposal); it must return the same law."""
        return self.bonus_law(self.reject(state, x, ctx), ctx)

    def single_sample_law(self, state: NodeState, ctx: NodeContext) -> torch.Tensor | None:
        """Law [V] emitted with one candidate x ~ q from ``state`` (one row), or None to enumerate.

        Default, for rules whose bonus law after a rejection is the same whatever x was:
        law = q·a + (1 − Σ_x q(x)·a(x))·R, through the rule's own methods in one vectorised call.
        """
        if not self.residual_independent_of_candidate:
            return None
        vocab = state.p.shape[-1]
        every = NodeState(p=state.p.expand(vocab, vocab), q=state.q.expand(vocab, vocab))
        return self._mix_with_residual(state, ctx, self.accept_prob(every, torch.arange(vocab, device=state.p.device), ctx))

    def _mix_with_residual(self, state: NodeState, ctx: NodeContext, accept: torch.Tensor) -> torch.Tensor:
        """q·a + (1 − Σ q·a)·R for acceptance ``accept`` [V] of every token and the candidate-independent
        bonus law R after a rejection (taken after rejecting q's most likely token)."""
        q = state.q[0]
        a = accept * (q > 0)
        residual = self.bonus_after_reject(state, torch.argmax(q).view(1), ctx)[0]
        return q * a + (1 - (q * a).sum()).clamp_min(0.0) * residual

    def tv_bound(self, p: torch.Tensor, q: torch.Tensor, ctx: NodeContext, *, sampled: bool = True) -> torch.Tensor | None:
        """Declared per-node bound [B] on TV(induced law, p) for ``ctx.n_candidates`` siblings drawn
        from q (``sampled``) or q's top tokens as point masses; None when the rule states none."""
        return None

    def paper_bound(self, p: torch.Tensor, q: torch.Tensor, ctx: NodeContext, *, sampled: bool = True
                    ) -> torch.Tensor | None:
        """The per-node TV bound the rule's *paper* states [B], reported beside the declared one (it
        need not hold: e.g. LANTERN's δ assumes point-mass drafts); None when the paper states none."""
        return None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


def chain_bound(first: torch.Tensor, accept_first: torch.Tensor, n_candidates: int | torch.Tensor,
                per_sibling: float | torch.Tensor) -> torch.Tensor:
    """Per-node TV bound over sibling chains (coupling with strict verification, DESIGN 6).

    TV ≤ β₀ + (1 − a₀)·B_rest: β₀ bounds the first sibling's drift, a₀ is its acceptance
    probability and B_rest ≤ (n − 1)·per_sibling bounds the later siblings (each measured from
    its own residual, which strict verification would reproduce exactly). Capped at 1.
    """
    n = torch.as_tensor(n_candidates, dtype=first.dtype, device=first.device)
    rest = ((n - 1).clamp_min(0) * per_sibling).clamp(max=1.0)
    return (first + (1 - accept_first).clamp_min(0) * rest).clamp(max=1.0)
