"""Per-node drift along real runs (DESIGN 6): TV(law a node emits, target law p) at every visited node.

The law of a node comes from the rule's own methods (``induced_law``). Enumeration is exact for
point-mass candidates and single sampled candidates, and for several sampled siblings while the
V^n draw sequences stay small; beyond that (static trees with many children on a real
vocabulary) the law is a Rao-Blackwellised Monte-Carlo estimate: sibling draws are sampled, the
accept/reject coins are marginalised exactly, and strict verification on the same draws serves
as a control variate. Its TV is still biased upward by the remaining noise; such nodes are
flagged as not exact. Rules that read the draft tree (CASCADE) on sampled trees
are also flagged: their node law is computed with the signals of the realised draft, which move
with the very draws the law should be marginalised over, so it is conditional, not the node law.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from cascade_sd.acceptance.base import AcceptanceRule, NodeContext
from cascade_sd.acceptance.law import induced_law
from cascade_sd.acceptance.strict import StrictRule

_STRICT = StrictRule()

#: Largest number of enumerated (draw sequence × vocabulary) entries computed exactly.
EXACT_LIMIT = 2**23


def tv_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Total-variation distance ½‖a − b‖₁ along the last dimension."""
    return 0.5 * (a - b).abs().sum(-1)


def _draw_sequences(q: torch.Tensor, n_candidates: int, draws: int, generator: torch.Generator | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``draws`` sibling sequences without replacement from q (exponential race): (keys, tokens) [draws, n]."""
    race = torch.empty(draws, q.shape[-1], dtype=torch.float64).exponential_(generator=generator).clamp_min(1e-300)
    return (q.unsqueeze(0) / race).topk(min(n_candidates, q.shape[-1]), dim=-1)


def monte_carlo_law(rule: AcceptanceRule, p: torch.Tensor, q: torch.Tensor, ctx: NodeContext, keys: torch.Tensor,
                    seqs: torch.Tensor) -> torch.Tensor:
    """Unbiased estimate [V] of the induced law from given sibling draw sequences [draws, n];
    the accept/reject coins are marginalised exactly through the rule's methods."""
    draws, vocab = seqs.shape[0], p.shape[-1]
    state = rule.start(p.expand(draws, vocab), q.expand(draws, vocab), True, ctx)
    weight = torch.ones(draws, dtype=torch.float64)
    law = torch.zeros(vocab, dtype=torch.float64)
    for j in range(seqs.shape[1]):
        drawn = keys[:, j] > 0  # rows whose q is exhausted go straight to the bonus token
        law += (weight * ~drawn).unsqueeze(-1).mul(rule.bonus_law(state, ctx)).sum(0)
        weight = weight * drawn
        x = seqs[:, j]
        a = rule.accept_prob(state, x, ctx)
        law.index_add_(0, x, weight * a)
        weight = weight * (1 - a)
        state = rule.reject(state, x, ctx)
    law += (weight.unsqueeze(-1) * rule.bonus_law(state, ctx)).sum(0)
    return law / draws


def node_law(rule: AcceptanceRule, p: torch.Tensor, q: torch.Tensor, *, n_candidates: int, sampled: bool,
             ctx: NodeContext, mc_draws: int = 256, generator: torch.Generator | None = None) -> tuple[torch.Tensor, bool]:
    """(law [V], exact?) of one node: exact enumeration when tractable, else a Monte-Carlo estimate.

    The estimate uses strict verification on the same draws as a control variate: strict's law
    is exactly p, so p + (rule estimate − strict estimate) is unbiased for the rule's law and its
    draw noise largely cancels (entries may dip slightly below 0).
    """
    support = int((q > 0).sum())
    n_eff = min(n_candidates, support)
    exact = not (sampled and rule.needs_tree)
    if not sampled or n_eff <= 1 or float(support) ** n_eff * p.shape[-1] <= EXACT_LIMIT:
        return induced_law(rule, p, q, n_candidates=n_candidates, sampled=sampled, context=ctx), exact
    keys, seqs = _draw_sequences(q, n_candidates, mc_draws, generator)
    estimate = monte_carlo_law(rule, p, q, ctx, keys, seqs) - monte_carlo_law(_STRICT, p, q, ctx, keys, seqs)
    return p + estimate, False


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
    exact: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.drift = np.zeros((self.batch, self.n_tokens))
        fill = 0.0 if self.rule.declares_bound else np.nan
        self.bound = np.full((self.batch, self.n_tokens), fill)
        self.exact = np.ones((self.batch, self.n_tokens), dtype=bool)

    def visit(self, rows: torch.Tensor, positions: torch.Tensor, p: torch.Tensor, q: torch.Tensor, sampled: bool,
              ctx: NodeContext, *, images: torch.Tensor | None = None) -> None:
        """Record nodes of ``rows`` (indices) that verify candidates; their tokens land at ``positions``.
        ``images`` [B] names the image of each row when the batch no longer holds every image in order."""
        for r in rows.tolist():
            image = r if images is None else int(images[r])
            if image >= self.batch:
                continue
            n = int(ctx.n_candidates[r]) if torch.is_tensor(ctx.n_candidates) else int(ctx.n_candidates)
            pr, qr = p[r].double().cpu(), q[r].double().cpu()
            one = NodeContext(depth=ctx.depth, n_candidates=n, extras={k: v[r : r + 1].cpu() for k, v in ctx.extras.items()})
            law, exact = node_law(self.rule, pr, qr, n_candidates=n, sampled=sampled, ctx=one,
                                  mc_draws=self.mc_draws, generator=self.generator)
            pos = int(positions[r])
            self.drift[image, pos] = float(tv_distance(law, pr))
            self.exact[image, pos] = exact
            if self.rule.declares_bound:
                self.bound[image, pos] = float(self.rule.tv_bound(pr[None], qr[None], one, sampled=sampled)[0])

    def summary(self) -> dict[str, float]:
        """Mean per-node drift over emitted tokens, mean declared bound, share of exact nodes."""
        return {
            "drift_mean": float(self.drift.mean()),
            "drift_bound_mean": float(np.nanmean(self.bound)) if self.rule.declares_bound else float("nan"),
            "drift_exact_fraction": float(self.exact.mean()),
            "drift_sequence_sum": float(self.drift.sum(1).mean()),
        }
