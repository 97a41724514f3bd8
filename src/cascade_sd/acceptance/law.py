"""The exact induced law of one node, computed through the rule's own methods (DESIGN 4.1).

For sampled candidates the enumeration branches over every draw sequence of the siblings
(without replacement from q) and over accept/reject; for point masses the candidates are q's
top tokens and only accept/reject branches. No second formula: a rule's law is what its
``accept_prob``/``reject``/``bonus_law`` imply. Cost grows as V^n_candidates: for small V.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from cascade_sd.acceptance.base import AcceptanceRule, NodeContext, NodeState


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float64)
    return t.unsqueeze(0) if t.dim() == 1 else t


def _without(law: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The draw law after ``x`` was drawn: ``law`` without x, renormalised (zeros when exhausted)."""
    out = law.scatter(-1, x.unsqueeze(-1), 0.0)
    total = out.sum(-1, keepdim=True)
    return torch.where(total > 0, out / total.clamp_min(1e-300), torch.zeros_like(out))


def sequence_law(rule: AcceptanceRule, p: torch.Tensor, q: torch.Tensor, ctx: NodeContext, seqs: torch.Tensor,
                 weights: torch.Tensor, drawn: torch.Tensor | None = None, *, chunk: int = 512,
                 accepted: torch.Tensor | None = None) -> torch.Tensor:
    """Law [V] of the token a node emits, averaged over given sibling draw sequences ``seqs`` [D, n]
    with ``weights`` [D] (their probabilities for an exact enumeration, 1/D for a Monte-Carlo
    estimate); the accept/reject coins are marginalised exactly through the rule's methods.

    ``drawn`` [D, n] marks which entries were really drawn (False once q is exhausted: the branch
    goes straight to the bonus token). ``ctx.extras`` hold one row for every draw or a row per draw
    sequence (draw-dependent signals); draws are processed ``chunk`` at a time. ``accepted`` [n, V],
    when given, receives the part of the law emitted by accepting sibling j (row j); the rest is the
    bonus token's.
    """
    p, q = _as_rows(p), _as_rows(q)
    draws, vocab = seqs.shape[0], p.shape[-1]
    per_draw = _per_draw(ctx, draws)
    law = torch.zeros(vocab, dtype=torch.float64, device=p.device)
    for lo in range(0, draws, chunk):
        idx = torch.arange(lo, min(lo + chunk, draws))
        sub = ctx.rows(idx, draws) if per_draw else ctx
        state = rule.start(p.expand(len(idx), vocab), q.expand(len(idx), vocab), True, sub)
        weight = weights[idx].to(torch.float64)
        for j in range(seqs.shape[1]):
            if drawn is not None:
                live = drawn[idx, j]
                law += (weight * ~live).unsqueeze(-1).mul(rule.bonus_law(state, sub)).sum(0)
                weight = weight * live
            x = seqs[idx, j]
            a = rule.accept_prob(state, x, sub)
            law.index_add_(0, x, weight * a)
            if accepted is not None:
                accepted[j].index_add_(0, x, weight * a)
            weight = weight * (1 - a)
            going = weight > 0  # a branch accepted for sure (or unreachable) needs no residual: same law, less work
            if not going.all():
                if per_draw:
                    sub = sub.rows(going, len(going))
                idx, x, weight, state = idx[going], x[going], weight[going], state.rows(going)
                if not idx.numel():
                    break
            if j == seqs.shape[1] - 1:  # every sibling rejected: the bonus from the last residual
                law += (weight.unsqueeze(-1) * rule.bonus_after_reject(state, x, sub)).sum(0)
            else:
                state = rule.reject(state, x, sub)
    return law


def _per_draw(ctx: NodeContext, draws: int) -> bool:
    """Whether ``ctx`` carries a row of extras per draw sequence (else one row shared by all)."""
    return any(torch.is_tensor(v) and v.dim() and v.shape[0] == draws and draws > 1 for v in ctx.extras.values())


def induced_law(
    rule: AcceptanceRule,
    p: torch.Tensor,
    q: torch.Tensor,
    *,
    n_candidates: int = 1,
    sampled: bool = True,
    depth: int = 1,
    context: NodeContext | None = None,
    vectorised: bool = True,
) -> torch.Tensor:
    """Law [V] (float64) of the token a node emits, marginalised over draft draws and coins.

    ``sampled=True``: ``n_candidates`` siblings drawn from q without replacement (fewer if q's
    support is smaller); ``sampled=False``: q's top ``n_candidates`` tokens as point masses.
    The draw probabilities follow the drafter's sampling (q without the earlier siblings),
    independently of whatever proposal the rule's state carries, as in the engine.
    With ``vectorised`` (default) a single sampled candidate uses the rule's
    ``single_sample_law`` when it has one (tests prove each equal to this enumeration).
    """
    p, q = _as_rows(p), _as_rows(q)
    ctx = replace(context, n_candidates=n_candidates) if context else NodeContext(depth=depth, n_candidates=n_candidates)
    vocab = p.shape[-1]
    law = torch.zeros(vocab, dtype=torch.float64)
    state = rule.start(p, q, sampled, ctx)
    if sampled and n_candidates == 1 and vectorised:
        fast = rule.single_sample_law(state, ctx)
        if fast is not None:
            return fast
    weight = torch.ones(1, dtype=torch.float64)
    if not sampled:
        return point_mass_law(rule, state, torch.argsort(q[0], descending=True, stable=True)[:n_candidates], ctx)[0]
    draw = q.clone()
    for _ in range(n_candidates):
        m = weight.shape[0]
        rows = torch.arange(m).repeat_interleave(vocab)
        xs = torch.arange(vocab).repeat(m)
        reach = weight[rows] * draw[rows, xs]
        live = reach > 0
        # Branches whose draw law is exhausted go straight to the bonus token.
        exhausted = draw.sum(-1) <= 0
        law += (weight[exhausted].unsqueeze(-1) * rule.bonus_law(state.rows(exhausted), ctx)).sum(0)
        if not live.any():
            return law
        rows, xs, reach = rows[live], xs[live], reach[live]
        expanded = state.rows(rows)
        a = rule.accept_prob(expanded, xs, ctx)
        law.index_add_(0, xs, reach * a)
        weight = reach * (1 - a)
        state, draw = rule.reject(expanded, xs, ctx), _without(draw[rows], xs)
        keep = weight > 0
        weight, state, draw = weight[keep], state.rows(keep), draw[keep]
        if weight.numel() == 0:
            return law
    return law + (weight.unsqueeze(-1) * rule.bonus_law(state, ctx)).sum(0)


def point_mass_law(rule: AcceptanceRule, state: NodeState, tokens: torch.Tensor, ctx: NodeContext
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(law [V], acceptance [n]) of a node (one row of ``state``) whose candidates are the point masses
    ``tokens`` [n], tried in order: candidate k is accepted with probability Π_{i<k}(1 − a_i)·a_k, and
    the bonus token follows every rejection (the walk of ``walk_tree``, enumerated)."""
    law = torch.zeros(state.p.shape[-1], dtype=torch.float64, device=state.p.device)
    accept = torch.zeros(len(tokens), dtype=torch.float64, device=state.p.device)
    weight = torch.ones(1, dtype=torch.float64, device=state.p.device)
    for k, x in enumerate(tokens):
        xs = x.view(1)
        a = rule.accept_prob(state, xs, ctx)
        accept[k] = (weight * a).sum()
        law[x] += accept[k]
        weight = weight * (1 - a)
        state = rule.reject(state, xs, ctx)
    return law + (weight.unsqueeze(-1) * rule.bonus_law(state, ctx)).sum(0), accept
