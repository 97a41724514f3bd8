"""GSD: grouped verification (DESIGN 4.6; arXiv 2508.07747).

The cluster C(x) holds x and the tokens within ``group_size``/2 ranks of x in the target's
probability order that pass two filters: a probability-gap filter (min/max of p_j(x), p_j(y)
at least ``p_threshold``) and an embedding-distance filter (L2 distance of codebook vectors at
most ``dist_threshold``). Accept with min(1, p_j(C)/q_j(C)) (q(C) = 1 for point masses); on
rejection the strict residual. The filters' exact form is not in the paper's text: both are
named options here. GSD states no per-node bound; its acceptance is not monotone in G.
"""

from __future__ import annotations

import torch

from cascade_sd.acceptance.base import AcceptanceRule, NodeContext, NodeState, Param, RuleResources, gather
from cascade_sd.acceptance.strict import strict_residual
from cascade_sd.errors import ConfigError


class GSDRule(AcceptanceRule):
    """Cluster-level acceptance with the strict residual; no declared bound."""

    name = "gsd"
    residual_independent_of_candidate = True  # strict residual / G*, whatever x was
    strength = "group_size"
    sweep = ({}, {"group_size": 2}, {"group_size": 8})
    parameters = {
        "group_size": Param(4, kind="int", lo=0, doc="G: neighbours in probability order, G/2 each side (0 = strict)"),
        "p_threshold": Param(0.15, lo=0.0, hi=1.0, doc="probability-gap filter: min(p(x), p(y)) ≥ t·max(p(x), p(y))"),
        "dist_threshold": Param(0.5, lo=0.0, doc="embedding filter: L2 distance of codebook vectors ≤ t"),
    }
    codebook: torch.Tensor | None = None

    def bind(self, resources: RuleResources) -> None:
        """Keep the codebook vectors for the distance filter."""
        if resources.codebook is None:
            raise ConfigError("method='gsd' needs a tokenizer codebook; this bundle has none")
        self.codebook = resources.codebook.detach().double()

    def cluster(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Bool [B, V]: C(x) under law p (always contains x)."""
        half = self.params["group_size"] // 2
        members = torch.zeros_like(p, dtype=torch.bool).scatter(-1, x.unsqueeze(-1), True)
        if half == 0:
            return members
        if self.codebook is None:
            raise ConfigError("rule 'gsd' has no codebook; call bind() first")
        if p.shape[0] > 1 and p.stride(0) == 0:  # one law broadcast over many candidates: sort it once
            order = torch.argsort(p[:1], dim=-1, descending=True, stable=True).expand_as(p)
            rank = torch.argsort(order[:1], dim=-1).expand_as(p).gather(-1, x.unsqueeze(-1))
        else:
            order = torch.argsort(p, dim=-1, descending=True, stable=True)
            rank = torch.argsort(order, dim=-1).gather(-1, x.unsqueeze(-1))
        offsets = torch.arange(-half, half + 1, device=p.device)
        window = (rank + offsets).clamp(0, p.shape[-1] - 1)
        tokens = order.gather(-1, window)
        px, py = gather(p, x).unsqueeze(-1), p.gather(-1, tokens)
        gap_ok = torch.minimum(px, py) >= self.params["p_threshold"] * torch.maximum(px, py)
        book = self.codebook.to(p.device)
        dist_ok = (book[tokens] - book[x].unsqueeze(1)).norm(dim=-1) <= self.params["dist_threshold"]
        return members.scatter(-1, tokens, gap_ok & dist_ok) | members

    def accept_prob(self, state: NodeState, x: torch.Tensor, ctx: NodeContext) -> torch.Tensor:
        """min(1, p_j(C)/q_j(C)); min(1, p_j(C)) for point masses."""
        members = self.cluster(state.p, x)
        pc = (state.p * members).sum(-1)
        if state.q is None:
            return pc.clamp(max=1.0)
        qc = (state.q * members).sum(-1)
        return torch.where(gather(state.q, x) > 0, (pc / qc.clamp_min(1e-300)).clamp(max=1.0), torch.zeros_like(pc))

    def single_sample_law(self, state: NodeState, ctx: NodeContext) -> torch.Tensor:
        """The base class's vectorised law in O(V·G): every token's cluster from its rank window
        (in-range ranks only, so each member counts once), without V×V membership masks."""
        half = self.params["group_size"] // 2
        if half == 0:
            return super().single_sample_law(state, ctx)
        if self.codebook is None:
            raise ConfigError("rule 'gsd' has no codebook; call bind() first")
        p, q = state.p[0], state.q[0]
        vocab = p.shape[-1]
        order = torch.argsort(p, descending=True, stable=True)
        rank = torch.argsort(order)
        offsets = torch.tensor([o for o in range(-half, half + 1) if o != 0], device=p.device)
        window = rank[:, None] + offsets
        inside = (window >= 0) & (window < vocab)
        tokens = order[window.clamp(0, vocab - 1)]
        py = p[tokens]
        gap_ok = torch.minimum(p[:, None], py) >= self.params["p_threshold"] * torch.maximum(p[:, None], py)
        book = self.codebook.to(p.device)
        dist_ok = (book[tokens] - book[:, None]).norm(dim=-1) <= self.params["dist_threshold"]
        member = inside & gap_ok & dist_ok
        pc = p + (py * member).sum(-1)
        qc = q + (q[tokens] * member).sum(-1)
        return self._mix_with_residual(state, ctx, (pc / qc.clamp_min(1e-300)).clamp(max=1.0))

    def reject(self, state: NodeState, x: torch.Tensor, ctx: NodeContext) -> NodeState:
        """The strict residual."""
        return strict_residual(state, x)
