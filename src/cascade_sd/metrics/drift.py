"""Per-node drift along real runs (DESIGN 6): TV(law a node emits, target law p) at every visited node.

The law of a node comes from the rule's own methods. It is marginalised over the node's own draft
draws, conditioned on the path taken and on the rest of the tree. Enumeration is exact for
point-mass candidates and single sampled candidates, and for several sampled siblings while the
V^n draw sequences stay small; beyond that (static trees with many children on a real
vocabulary) the law is a Rao-Blackwellised Monte-Carlo estimate: sibling draws are sampled, the
accept/reject coins are marginalised exactly, and strict verification on the same draws serves
as a control variate. Its TV is biased upward by the remaining noise; such nodes are flagged as
not exact and carry a batch-means standard error.

Rules whose signals move with the draws (CASCADE: a child's own outputs and its siblings')
evaluate them for every possible draw (``DrawSignals``): the engine probes the target and the
drafter at each hypothetical child (one batched forward per ``PROBE_CHUNK`` tokens), so the law
of a single sampled child is exact, and several siblings are enumerated or sampled as above with
each draw's own signals. No draw is ever treated as if it carried no signal.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from cascade_sd.acceptance.base import AcceptanceRule, NodeContext, NodeState, TreeView
from cascade_sd.acceptance.law import induced_law, sequence_law
from cascade_sd.acceptance.strict import StrictRule
from cascade_sd.decoding.keep_mixture import strict_mixture_law

_STRICT = StrictRule()

#: Drift above a bound by more than this counts as over it (float64 round-off of the node laws).
TOLERANCE = 1e-9

#: Largest number of enumerated (draw sequence × vocabulary) entries computed exactly.
EXACT_LIMIT = 2**23
#: Batches of Monte-Carlo draws whose spread gives a node's standard error.
MC_BATCHES = 8
#: Largest number of sibling draw sequences enumerated with their own signals (beyond: Monte Carlo).
DRAW_EXACT_LIMIT = 4096


def tv_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Total-variation distance ½‖a − b‖₁ along the last dimension."""
    return 0.5 * (a - b).abs().sum(-1)


def _draw_sequences(q: torch.Tensor, n_candidates: int, draws: int, generator: torch.Generator | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``draws`` sibling sequences without replacement from q (exponential race): (keys, tokens) [draws, n]."""
    race = torch.empty(draws, q.shape[-1], dtype=torch.float64).exponential_(generator=generator).clamp_min(1e-300)
    return (q.unsqueeze(0) / race).topk(min(n_candidates, q.shape[-1]), dim=-1)


def monte_carlo_law(rule: AcceptanceRule, p: torch.Tensor, q: torch.Tensor, ctx: NodeContext, keys: torch.Tensor,
                    seqs: torch.Tensor, strict_ctx: NodeContext | None = None) -> tuple[torch.Tensor, float]:
    """(law [V], standard error of its TV) from sampled sibling draw sequences [D, n]: the accept/reject
    coins are marginalised exactly through the rule's methods, and strict verification on the same
    draws is a control variate (strict's law is exactly p, so p + (rule − strict) is unbiased and
    most draw noise cancels; entries may dip slightly below 0). ``ctx`` carries per-draw extras when
    the signals move with the draws. The SE is the spread over ``MC_BATCHES`` batches of draws."""
    draws = seqs.shape[0]
    strict_ctx = strict_ctx or NodeContext(depth=ctx.depth, n_candidates=ctx.n_candidates)
    per_batch = []
    for part in torch.arange(draws).chunk(MC_BATCHES):
        w = torch.full((part.numel(),), 1.0 / part.numel(), dtype=torch.float64)
        drawn = keys[part] > 0
        per_batch.append(p + sequence_law(rule, p, q, ctx.rows(part, draws), seqs[part], w, drawn=drawn)
                         - sequence_law(_STRICT, p, q, strict_ctx, seqs[part], w, drawn=drawn))
    law = torch.stack(per_batch).mean(0)
    spread = torch.stack([tv_distance(b, p) for b in per_batch])
    return law, float(spread.std() / len(per_batch) ** 0.5)


def enumerable(p: torch.Tensor, q: torch.Tensor, n_candidates: int, sampled: bool) -> bool:
    """Whether ``induced_law`` enumerates a node's draws within ``EXACT_LIMIT`` (else Monte Carlo)."""
    support = int((q > 0).sum())
    n_eff = min(n_candidates, support)
    return not sampled or n_eff <= 1 or float(support) ** n_eff * p.shape[-1] <= EXACT_LIMIT


def node_law(rule: AcceptanceRule, p: torch.Tensor, q: torch.Tensor, *, n_candidates: int, sampled: bool,
             ctx: NodeContext, mc_draws: int = 256, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, bool, float]:
    """(law [V], exact?, standard error of its TV) of one node: exact enumeration when tractable, else
    a Monte-Carlo estimate (``monte_carlo_law``)."""
    exact = not (sampled and rule.draw_dependent)  # without DrawSignals, such a law would be conditional
    if enumerable(p, q, n_candidates, sampled):
        return induced_law(rule, p, q, n_candidates=n_candidates, sampled=sampled, context=ctx), exact, 0.0
    keys, seqs = _draw_sequences(q, n_candidates, mc_draws, generator)
    law, se = monte_carlo_law(rule, p, q, ctx, keys, seqs)
    return law, False, se


@dataclass
class DrawSignals:
    """What a node law needs when the rule's signals move with the draws: the rule's round signals
    (``prepared``), the round's view, the node of every batch row [B] and
    ``probe(row, node, tokens) -> ProbeOutputs`` at hypothetical children."""

    prepared: Any
    view: TreeView
    nodes: torch.Tensor
    probe: Callable[..., Any]

    def extras(self, rule: AcceptanceRule, row: int, node: int, seqs: torch.Tensor) -> dict[str, Any]:
        """``rule.draw_extras`` of ``row``'s ``node`` for draw sequences [D, n], computed on the model's
        device and returned on the CPU, where node laws are computed (float64)."""
        probe = lambda tokens, drafter=True: self.probe(row, node, tokens, drafter=drafter)
        out = rule.draw_extras(self.prepared, self.view, row, node, seqs.to(self.nodes.device), probe)
        return {k: v.cpu() if torch.is_tensor(v) else v for k, v in out.items()}


def _draw_sequences_exact(q: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ordered draw of n distinct tokens from q's support with its probability (without replacement)."""
    support = torch.nonzero(q > 0).flatten().tolist()
    seqs, weights = [], []
    for seq in itertools.permutations(support, n):
        prob, left = 1.0, 1.0
        for x in seq:
            prob *= float(q[x]) / left
            left -= float(q[x])
        seqs.append(seq)
        weights.append(prob)
    return torch.tensor(seqs, dtype=torch.long), torch.tensor(weights, dtype=torch.float64)


def draw_node_law(rule: AcceptanceRule, p: torch.Tensor, q: torch.Tensor, ctx: NodeContext, draws: DrawSignals,
                  row: int, *, mc_draws: int = 256, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, bool, float]:
    """(law [V], exact?, standard error of its TV) of a node whose signals move with the draws: every
    draw sequence of its children (all of them while few, else ``mc_draws`` sampled ones) gets the
    signals it would produce (``rule.draw_extras`` over the engine's probe)."""
    node = int(draws.nodes[row])
    n = int(ctx.n_candidates)
    support = torch.nonzero(q > 0).flatten()
    n_eff = min(n, support.numel())
    strict_ctx = NodeContext(depth=ctx.depth, n_candidates=n)
    if not rule.signals_can_fire(draws.prepared, draws.view, row, node, n):  # every draw: no signal, no dependence
        law, _, se = node_law(rule, p, q, n_candidates=n, sampled=True, ctx=strict_ctx, mc_draws=mc_draws,
                              generator=generator)
        return law, enumerable(p, q, n, True), se
    if n_eff == 1:
        sure = torch.zeros_like(support, dtype=torch.bool)
        if rule.signals_only_raise:  # accepted for sure without signals: no probe, no rejection
            sure = rule.accept_prob(NodeState(p=p.expand(len(support), -1), q=q.expand(len(support), -1)),
                                    support, strict_ctx) >= 1.0
        law = torch.zeros_like(p).index_add_(0, support[sure], q[support[sure]])
        rest = support[~sure]
        if rest.numel():
            extras = draws.extras(rule, row, node, rest[:, None])
            law += sequence_law(rule, p, q, NodeContext(depth=ctx.depth, n_candidates=n, extras=extras), rest[:, None],
                                q[rest])
        return law, True, 0.0
    if math.perm(support.numel(), n_eff) <= DRAW_EXACT_LIMIT:
        seqs, weights = _draw_sequences_exact(q, n_eff)
        extras = draws.extras(rule, row, node, seqs)
        law = sequence_law(rule, p, q, NodeContext(depth=ctx.depth, n_candidates=n, extras=extras), seqs, weights)
        return law, True, 0.0
    keys, seqs = _draw_sequences(q, n_eff, mc_draws, generator)
    every = NodeContext(depth=ctx.depth, n_candidates=n, extras=draws.extras(rule, row, node, seqs))
    law, se = monte_carlo_law(rule, p, q, every, keys, seqs, strict_ctx)
    return law, False, se


@dataclass
class DriftRecorder:
    """Collects, per image and token position, the drift of the node that emitted the token and
    the rule's declared bound there (NaN when it declares none). Positions never recorded (the
    prefill token, bonus tokens drawn from a fresh node law) have drift exactly 0. Only the first
    ``batch`` images of a decode batch are recorded (a cheap unbiased subset when labels are
    spread over the batch)."""

    rule: AcceptanceRule
    batch: int
    n_tokens: int
    mc_draws: int = 256
    generator: torch.Generator | None = None
    drift: np.ndarray = field(init=False)
    bound: np.ndarray = field(init=False)
    paper: np.ndarray = field(init=False)
    exact: np.ndarray = field(init=False)
    se: np.ndarray = field(init=False)
    visited: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        shape = (self.batch, self.n_tokens)
        self.drift = np.zeros(shape)
        self.bound = np.full(shape, 0.0 if self.rule.declares_bound else np.nan)
        self.paper = np.full(shape, 0.0 if self.rule.paper_bound_text else np.nan)
        self.exact = np.ones(shape, dtype=bool)
        self.se = np.zeros(shape)
        self.visited = np.zeros(shape, dtype=bool)

    def visit(self, rows: torch.Tensor, positions: torch.Tensor, p: torch.Tensor, q: torch.Tensor, sampled: bool,
              ctx: NodeContext, *, images: torch.Tensor | None = None, draws: DrawSignals | None = None,
              mixture: tuple[torch.Tensor, ...] | None = None) -> None:
        """Record nodes of ``rows`` (indices) that verify candidates; their tokens land at ``positions``.
        ``images`` [B] names the image of each row when the batch no longer holds every image in order;
        ``draws`` is given when the rule's signals move with the draws (then every draw gets its own);
        ``mixture`` holds ``KeepMixture`` parts when a one-candidate node's draft and recorded q follow them
        instead of draft ~ q (strict only)."""
        for r in rows.tolist():
            image = r if images is None else int(images[r])
            if image >= self.batch:
                continue
            n = int(ctx.n_candidates[r]) if torch.is_tensor(ctx.n_candidates) else int(ctx.n_candidates)
            pr, qr = p[r].double().cpu(), q[r].double().cpu()
            one = NodeContext(depth=ctx.depth, n_candidates=n, extras={k: v[r : r + 1].cpu() for k, v in ctx.extras.items()})
            se = 0.0
            if mixture is not None:
                law, exact = strict_mixture_law(pr, *(part[r].double().cpu() for part in mixture)), True
            elif draws is not None and sampled and self.rule.draw_dependent:
                law, exact, se = draw_node_law(self.rule, pr, qr, one, draws, r, mc_draws=self.mc_draws,
                                               generator=self.generator)
            else:
                law, exact, se = node_law(self.rule, pr, qr, n_candidates=n, sampled=sampled, ctx=one,
                                          mc_draws=self.mc_draws, generator=self.generator)
            pos = int(positions[r])
            self.drift[image, pos] = float(tv_distance(law, pr))
            self.visited[image, pos] = True
            self.exact[image, pos] = exact
            self.se[image, pos] = se
            if self.rule.declares_bound:
                self.bound[image, pos] = float(self.rule.tv_bound(pr[None], qr[None], one, sampled=sampled)[0])
            if self.rule.paper_bound_text:
                self.paper[image, pos] = float(self.rule.paper_bound(pr[None], qr[None], one, sampled=sampled)[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-position arrays a run stores in ``drift.npz``."""
        return {"drift": self.drift, "drift_bound": self.bound, "drift_paper_bound": self.paper,
                "drift_exact": self.exact, "drift_se": self.se,
                "drift_visited": self.visited}

    def summary(self) -> dict[str, float]:
        """Mean per-node drift over emitted tokens, mean declared bound (for rules that declare one),
        share of exact nodes, and for rules whose paper states a bound, its mean and the share of
        verified nodes whose drift exceeds it."""
        out = {
            "drift_mean": float(self.drift.mean()),
            "drift_exact_fraction": float(self.exact.mean()),
            "drift_sequence_sum": float(self.drift.sum(1).mean()),
        }
        if self.rule.declares_bound:
            out["drift_bound_mean"] = float(np.nanmean(self.bound))
        if self.rule.paper_bound_text:
            stats = paper_bound_stats(self.drift, self.paper, self.visited)
            out |= {"drift_paper_bound_mean": stats["paper_bound_mean"],
                    "paper_bound_violated_fraction": stats["paper_bound_violated_fraction"]}
        return out


def paper_bound_cell(mean: float | None, fraction: float | None, spec: str = ".4f", missing: str = "–") -> str:
    """A table cell for a paper's stated bound: its mean and, in brackets, the share of nodes over it."""
    return missing if mean is None else f"{mean:{spec}} ({fraction:.0%})"


def paper_bound_stats(drift: np.ndarray, paper: np.ndarray, visited: np.ndarray) -> dict[str, Any]:
    """A paper's stated bound over the verified nodes (``visited``): its mean, the share of those nodes
    whose drift exceeds it, and whether any does (one definition for the recorder, grid and audit)."""
    if not visited.any():
        return {"paper_bound_mean": None, "paper_bound_violated_fraction": 0.0, "paper_bound_violated": False}
    over = (drift > paper + TOLERANCE)[visited]
    return {"paper_bound_mean": float(paper[visited].mean()), "paper_bound_violated_fraction": float(over.mean()),
            "paper_bound_violated": bool(over.any())}
