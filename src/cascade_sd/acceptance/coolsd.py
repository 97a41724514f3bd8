"""COOL-SD: annealed relaxation of the acceptance ratio (DESIGN 4.5; arXiv 2601.09212).

At draft depth i a candidate x is accepted with f_i(x) = min(1, ω_i·p_j(x)/q_j(x)),
ω_i = δ·exp(−ν·i − μ) (q = 1 for point masses); on rejection the residual is the TV-optimal
G* = norm([p_j − q_j·f_i]_+) over the whole vocabulary. For ω ≥ 1, G* is the strict residual;
for ω < 1 the node is lossless (q·f ≤ p everywhere). The paper's μ is unconfirmed: default
μ = −ν, so ω_1 = δ.
"""

from __future__ import annotations

import math

import torch

from cascade_sd.acceptance.base import (AcceptanceRule, NodeContext, NodeState, Param, chain_bound, gather, normalise,
                                        remove_token)


class CoolSDRule(AcceptanceRule):
    """Annealed ratio relaxation with the TV-optimal residual; declares its per-node TV bound."""

    name = "coolsd"
    residual_independent_of_candidate = True  # strict residual / G*, whatever x was
    declares_bound = True
    strength = "delta"
    sweep = ({}, {"delta": 2.0}, {"delta": 4.0})
    parameters = {
        "delta": Param(1.1, lo=0.0, lo_open=True, doc="δ, the relaxation knob (paper: 1.1 and 2)"),
        "nu": Param(0.7, lo=0.0, doc="ν, annealing rate over draft depth"),
        "mu": Param(None, optional=True, doc="μ, offset (unconfirmed in the paper; default −ν so ω₁ = δ)"),
    }

    def omega(self, depth: int) -> float:
        """ω_i = δ·exp(−ν·i − μ) at draft depth i (DESIGN 4.5)."""
        nu = self.params["nu"]
        mu = -nu if self.params["mu"] is None else self.params["mu"]
        return self.params["delta"] * math.exp(-nu * depth - mu)

    def _ratio(self, state: NodeState, ctx: NodeContext) -> torch.Tensor:
        """f over the whole vocabulary [B, V] for sampled candidates."""
        omega = self.omega(ctx.depth)
        q = state.q
        return torch.where(q > 0, (omega * state.p / q.clamp_min(1e-300)).clamp(max=1.0), torch.zeros_like(q))

    def accept_prob(self, state: NodeState, x: torch.Tensor, ctx: NodeContext) -> torch.Tensor:
        """min(1, ω·p_j(x)/q_j(x)); min(1, ω·p_j(x)) for point masses."""
        px = gather(state.p, x)
        omega = self.omega(ctx.depth)
        if state.q is None:
            return (omega * px).clamp(max=1.0)
        qx = gather(state.q, x)
        return torch.where(qx > 0, (omega * px / qx.clamp_min(1e-300)).clamp(max=1.0), torch.zeros_like(px))

    def reject(self, state: NodeState, x: torch.Tensor, ctx: NodeContext) -> NodeState:
        """G* = norm([p_j − q_j·f]_+); the proposal loses x (sampling without replacement)."""
        if state.q is None:
            point = torch.zeros_like(state.p).scatter(-1, x.unsqueeze(-1), 1.0)
            f = self.accept_prob(state, x, ctx).unsqueeze(-1)
            return NodeState(p=normalise((state.p - point * f).clamp_min(0.0), state.p), q=None)
        mass = (state.p - state.q * self._ratio(state, ctx)).clamp_min(0.0)
        return NodeState(p=normalise(mass, state.p), q=remove_token(state.q, x))

    def tv_bound(self, p: torch.Tensor, q: torch.Tensor, ctx: NodeContext, *, sampled: bool = True) -> torch.Tensor:
        """One sampled sibling: Σ_{q>p} min(q − p, (ω − 1)·p) (exact for ω ≥ 1, 0 for ω ≤ 1);
        point masses: min(1, ω·p(x)) − p(x) for the top token of q. Later siblings add ≤ (ω − 1)
        each (``chain_bound``)."""
        omega = self.omega(ctx.depth)
        extra = max(omega - 1.0, 0.0)
        if not sampled:
            px = gather(p, q.argmax(-1))
            first = ((omega * px).clamp(max=1.0) - px).clamp_min(0.0)
            accept = (omega * px).clamp(max=1.0)
        else:
            first = torch.minimum((q - p).clamp_min(0.0), extra * p).sum(-1)
            accept = torch.minimum(q, omega * p).sum(-1)
        return chain_bound(first, accept, ctx.n_candidates, extra)
