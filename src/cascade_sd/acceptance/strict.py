"""The strict (lossless) rule (DESIGN 4.2): speculative sampling over a draft tree.

Point-mass candidate x: accept with p_j(x); residual = p_j without x, renormalised.
Sampled candidate x ~ q_j: accept with min(1, p_j(x)/q_j(x)); residual norm(max(p_j − q_j, 0));
next proposal q_j without x, renormalised (sampling without replacement). The induced law of
every node is p exactly, for any tree (Leviathan et al. 2023; SpecInfer's multi-candidate form).
"""

from __future__ import annotations

import torch

from cascade_sd.acceptance.base import AcceptanceRule, NodeContext, NodeState, normalise, remove_token


def strict_ratio(state: NodeState, x: torch.Tensor) -> torch.Tensor:
    """p_j(x) for point masses, min(1, p_j(x)/q_j(x)) for sampled candidates (0 where q_j(x) = 0)."""
    idx = x.unsqueeze(-1)
    px = state.p.gather(-1, idx)
    if state.q is None:
        return px.squeeze(-1)
    qx = state.q.gather(-1, idx)
    # min(p, q)/q = min(1, p/q) for q > 0, and 0 for q = 0: a token the proposal cannot produce is
    # never accepted. The denominator is raised to the smallest normal float (2.2e-308 in float64):
    # no where is needed, and only a q below it, never drawn in practice, sees its ratio shrink.
    return torch.minimum(px, qx).div_(qx.clamp_min(torch.finfo(qx.dtype).tiny)).squeeze(-1)


def strict_residual_law(state: NodeState, x: torch.Tensor) -> torch.Tensor:
    """The strict residual target law after rejecting x: p_j without x (point masses) or
    norm([p_j − q_j]_+) (sampled candidates)."""
    if state.q is None:
        return normalise(state.p.scatter(-1, x.unsqueeze(-1), 0.0), state.p)
    return normalise((state.p - state.q).clamp_min_(0.0), state.p)


def strict_residual(state: NodeState, x: torch.Tensor) -> NodeState:
    """Strict residual after rejecting x, with the proposal losing x (sampling without replacement)."""
    return NodeState(p=strict_residual_law(state, x), q=None if state.q is None else remove_token(state.q, x))


class StrictRule(AcceptanceRule):
    """Lossless verification; declares a per-node TV bound of exactly 0."""

    name = "strict"
    residual_independent_of_candidate = True  # strict residual / G*, whatever x was
    declares_bound = True

    def accept_prob(self, state: NodeState, x: torch.Tensor, ctx: NodeContext) -> torch.Tensor:
        """p_j(x) for point masses, min(1, p_j(x)/q_j(x)) for sampled candidates."""
        return strict_ratio(state, x)

    def reject(self, state: NodeState, x: torch.Tensor, ctx: NodeContext) -> NodeState:
        """Strict residual; the proposal loses x (sampling without replacement)."""
        return strict_residual(state, x)

    def bonus_after_reject(self, state: NodeState, x: torch.Tensor, ctx: NodeContext) -> torch.Tensor:
        """The strict residual alone: after the last sibling no proposal is read."""
        return strict_residual_law(state, x)

    def tv_bound(self, p: torch.Tensor, q: torch.Tensor, ctx: NodeContext, *, sampled: bool = True) -> torch.Tensor:
        """Strict is exact: the bound is 0."""
        return torch.zeros(p.shape[:-1], dtype=p.dtype, device=p.device)
