"""The exact induced law of one node, computed through the rule's own methods (DESIGN 4.1).

For sampled candidates the enumeration branches over every draw sequence of the siblings
(without replacement from q) and over accept/reject; for point masses the candidates are q's
top tokens and only accept/reject branches. No second formula: a rule's law is what its
``accept_prob``/``reject``/``bonus_law`` imply. Cost grows as V^n_candidates: for small V.
"""

from __future__ import annotations

import torch

from cascade_sd.acceptance.base import AcceptanceRule, NodeContext, NodeState


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float64)
    return t.unsqueeze(0) if t.dim() == 1 else t


def _take(state: NodeState, idx: torch.Tensor) -> NodeState:
    return NodeState(p=state.p[idx], q=None if state.q is None else state.q[idx])


def induced_law(
    rule: AcceptanceRule,
    p: torch.Tensor,
    q: torch.Tensor,
    *,
    n_candidates: int = 1,
    sampled: bool = True,
    depth: int = 1,
    context: NodeContext | None = None,
) -> torch.Tensor:
    """Law [V] (float64) of the token a node emits, marginalised over draft draws and coins.

    ``sampled=True``: ``n_candidates`` siblings drawn from q without replacement (fewer if q's
    support is smaller); ``sampled=False``: q's top ``n_candidates`` tokens as point masses.
    """
    p, q = _as_rows(p), _as_rows(q)
    ctx = context or NodeContext(depth=depth)
    vocab = p.shape[-1]
    law = torch.zeros(vocab, dtype=torch.float64)
    state = rule.start(p, q, sampled, ctx)
    weight = torch.ones(1, dtype=torch.float64)
    if not sampled:
        order = torch.argsort(q[0], descending=True, stable=True)[:n_candidates]
        for x in order:
            xs = x.view(1)
            a = rule.accept_prob(state, xs, ctx)
            law[x] += (weight * a).sum()
            weight = weight * (1 - a)
            state = rule.reject(state, xs, ctx)
        return law + (weight.unsqueeze(-1) * rule.bonus_law(state, ctx)).sum(0)
    for _ in range(n_candidates):
        m = weight.shape[0]
        rows = torch.arange(m).repeat_interleave(vocab)
        xs = torch.arange(vocab).repeat(m)
        expanded = _take(state, rows)
        draw = expanded.q.gather(-1, xs.unsqueeze(-1)).squeeze(-1)
        reach = weight[rows] * draw
        live = reach > 0
        # Branches whose proposal is exhausted go straight to the bonus token.
        exhausted = state.q.sum(-1) <= 0
        law += (weight[exhausted].unsqueeze(-1) * rule.bonus_law(_take(state, exhausted), ctx)).sum(0)
        if not live.any():
            return law
        rows, xs, reach, expanded = rows[live], xs[live], reach[live], _take(expanded, live)
        a = rule.accept_prob(expanded, xs, ctx)
        law.index_add_(0, xs, reach * a)
        weight = reach * (1 - a)
        state = rule.reject(expanded, xs, ctx)
        keep = weight > 0
        weight, state = weight[keep], _take(state, keep)
        if weight.numel() == 0:
            return law
    return law + (weight.unsqueeze(-1) * rule.bonus_law(state, ctx)).sum(0)
