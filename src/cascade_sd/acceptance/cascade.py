"""CASCADE: context-aware relaxation from draft-tree redundancy (DESIGN 4.7; arXiv 2605.07230).

Two signals per round (every choice a named option, reconstructed from the authors' code):
- breadth: nodes of one tree level whose next-token predictions are nearly the same (cosine of
  their representations > ``tau_b``) are interchangeable; S(x) = the other nodes of x's level
  paired with x. Representations: ``logits`` (top-``breadth_top_k`` kept, the rest zeroed, L2-normalised),
  ``probs`` or ``hidden`` (mean removed), from the drafter or the target (``breadth_source``);
  drafter leaves have no output and pair with nothing.
- depth: s_d = cosine between the target's representation at the parent and at x (``logits`` or
  mean-removed ``hidden``), counted when > ``tau_d`` and the gate passes: KL(p_parent ‖ p_x) <
  ``kl_threshold`` (``kl``) or x inside the top-``confidence_mass`` nucleus of p_parent.
Boost s = [s_d] + Σ p_j(u) over the distinct tokens u ≠ x of S(x). Accept with
min(1, p_j(x)/(q_j(x) − s)) (1 when s ≥ q_j(x); q = 1 for point masses) — the authors' test
r ≤ (p(x) + r·s)/q(x) with one uniform r. ``cascade`` keeps the strict residual (lossy, no
bound); ``cascade_bounded`` caps the extra acceptance of each sibling at ε/n (n siblings) and
uses the TV-optimal residual norm([p_j − q_j·f]_+), so each node drifts by at most ε.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cascade_sd.acceptance.base import AcceptanceRule, NodeContext, NodeState, Param, TreeView, gather, normalise, remove_token
from cascade_sd.acceptance.strict import strict_ratio, strict_residual

SIGNAL_PARAMS = {
    "breadth": Param(True, kind="bool", doc="use the breadth (interchangeability) signal"),
    "breadth_source": Param("drafter", kind="choice", choices=("drafter", "target"), doc="whose outputs are compared"),
    "breadth_repr": Param("logits", kind="choice", choices=("logits", "probs", "hidden"), doc="breadth representation"),
    "breadth_top_k": Param(10, kind="int", lo=1, doc="logits kept before the cosine (logits representation)"),
    "tau_b": Param(0.9, lo=-1.0, hi=1.0, doc="τ_b, breadth similarity threshold (0.9 LlamaGen-like, 0.5 Chameleon-like)"),
    "depth_signal": Param(True, kind="bool", doc="use the depth (convergence) signal"),
    "depth_repr": Param("logits", kind="choice", choices=("logits", "hidden"), doc="depth representation"),
    "tau_d": Param(0.625, lo=-1.0, hi=1.0, doc="τ_d, depth similarity threshold"),
    "gate": Param("kl", kind="choice", choices=("kl", "confidence"), doc="depth gate"),
    "kl_threshold": Param(4.0, lo=0.0, doc="KL gate: KL(p_parent ‖ p_x) below this"),
    "confidence_mass": Param(0.8, lo=0.0, hi=1.0, doc="confidence gate: x inside this top mass of p_parent"),
}


@dataclass
class Signals:
    """Per-round signals: depth boost per node [B, T+1] and breadth pairs [B, T+1, T+1]."""

    depth_boost: torch.Tensor
    pairs: torch.Tensor


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.double(), dim=-1)


def _centred(x: torch.Tensor) -> torch.Tensor:
    return _unit(x - x.double().mean(-1, keepdim=True))


def _logit_repr(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Logits with all but the top_k entries zeroed, L2-normalised (DESIGN 4.7)."""
    logits = logits.double()
    keep = logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices
    return _unit(torch.zeros_like(logits).scatter(-1, keep, logits.gather(-1, keep)))


class CascadeRule(AcceptanceRule):
    """Faithful CASCADE: boosted acceptance, strict residual; declares no bound."""

    name = "cascade"
    residual_independent_of_candidate = True  # strict residual / G*, whatever x was
    needs_tree = True
    strength = "tau_b"
    strength_increases = False
    sweep = ({}, {"tau_b": 0.7, "tau_d": 0.5}, {"tau_b": 0.5, "tau_d": 0.3})
    parameters = dict(SIGNAL_PARAMS)

    # ------------------------------------------------------------------ signals (once per round)
    def prepare(self, view: TreeView) -> Signals:
        """Depth boost of every node and the breadth pairs of every level."""
        tree, prm = view.tree, self.params
        b, n1 = tree.tokens.shape
        rows = torch.arange(b, device=tree.tokens.device)[:, None]
        parent = tree.parent.clamp_min(0)
        depth_boost = torch.zeros(b, n1, dtype=torch.float64, device=tree.tokens.device)
        if prm["depth_signal"]:
            sim = self.depth_similarity(view)
            p_par = view.p[rows, parent]
            if prm["gate"] == "kl":
                kl = (p_par * (p_par.clamp_min(1e-300).log() - view.p.clamp_min(1e-300).log())).where(p_par > 0, 0.0)
                gate = kl.sum(-1) < prm["kl_threshold"]
            else:
                px = p_par.gather(-1, tree.tokens.unsqueeze(-1))
                gate = (p_par * (p_par > px)).sum(-1) < prm["confidence_mass"]
            ok = (sim > prm["tau_d"]) & gate & (tree.parent >= 0)
            depth_boost = torch.where(ok, sim, depth_boost)
        pairs = torch.zeros(b, n1, n1, dtype=torch.bool, device=tree.tokens.device)
        if prm["breadth"]:
            sim, comparable = self.breadth_similarity(view)
            pairs = (sim > prm["tau_b"]) & comparable
        return Signals(depth_boost=depth_boost, pairs=pairs)

    def depth_similarity(self, view: TreeView) -> torch.Tensor:
        """s_d of every node [B, T+1]: cosine of the target's representation at the node and at its parent."""
        tree = view.tree
        rows = torch.arange(tree.tokens.shape[0], device=tree.tokens.device)[:, None]
        rep = _centred(view.target_hidden) if self.params["depth_repr"] == "hidden" else _unit(view.target_logits)
        return (rep * rep[rows, tree.parent.clamp_min(0)]).sum(-1)

    def breadth_similarity(self, view: TreeView) -> tuple[torch.Tensor, torch.Tensor]:
        """(cosine [B, T+1, T+1] between node representations, mask of the pairs the breadth signal may
        use: two distinct drafted nodes of one level, both with a representation)."""
        tree = view.tree
        n1 = tree.tokens.shape[1]
        rep, has = self._breadth_repr(view)
        sim = rep @ rep.transpose(1, 2)
        same_level = tree.depth[:, :, None] == tree.depth[:, None, :]
        other = ~torch.eye(n1, dtype=torch.bool, device=sim.device)
        comparable = same_level & other & has[:, :, None] & has[:, None, :]
        comparable[:, 0] = False
        comparable[:, :, 0] = False
        return sim, comparable

    def _breadth_repr(self, view: TreeView) -> tuple[torch.Tensor, torch.Tensor]:
        """(unit representations [B, T+1, ·], which nodes have one [B, T+1])."""
        prm = self.params
        if prm["breadth_source"] == "target":
            logits, hidden = view.target_logits, view.target_hidden
            has = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        else:
            logits, hidden, has = view.drafter_logits, view.drafter_hidden, view.drafter_ran
        if prm["breadth_repr"] == "hidden":
            return _centred(hidden), has
        if prm["breadth_repr"] == "probs":
            return _unit(logits.double().softmax(-1)), has
        return _logit_repr(logits, prm["breadth_top_k"]), has

    def node_extras(self, prepared: Signals, view: TreeView, node: torch.Tensor, kids: torch.Tensor) -> dict[str, Any]:
        """Per candidate child: its token, depth boost and partner tokens (−1 padded)."""
        tokens = view.tree.tokens
        safe = kids.clamp_min(0)
        child_tokens = torch.where(kids >= 0, tokens.gather(1, safe), torch.full_like(kids, -1))
        rows = torch.arange(kids.shape[0], device=kids.device)[:, None]
        partner = prepared.pairs[rows, safe] & (kids >= 0)[..., None]
        partner_tokens = torch.where(partner, tokens[:, None, :].expand_as(partner), torch.full_like(partner, -1,
                                                                                                     dtype=torch.long))
        return {"child_tokens": child_tokens, "depth_boost": prepared.depth_boost.gather(1, safe) * (kids >= 0),
                "partner_tokens": partner_tokens}

    # ------------------------------------------------------------------ acceptance
    def boost(self, state: NodeState, x: torch.Tensor, ctx: NodeContext) -> torch.Tensor:
        """s(x) [B] from the node's extras; 0 for tokens that are not among the listed children."""
        if "child_tokens" not in ctx.extras:
            return torch.zeros_like(gather(state.p, x))
        # One context row may serve many enumerated branches (induced_law): broadcast it.
        ex = {key: t.expand(x.shape[0], *t.shape[1:]) for key, t in ctx.extras.items()}
        match = ex["child_tokens"] == x[:, None]
        found = match.any(-1)
        k = match.float().argmax(-1)
        rows = torch.arange(x.shape[0], device=x.device)
        s = torch.where(found & self.params["depth_signal"], ex["depth_boost"][rows, k].to(state.p.dtype),
                        torch.zeros_like(gather(state.p, x)))
        partners = ex["partner_tokens"][rows, k]
        valid = (partners >= 0) & found[:, None] & self.params["breadth"]
        mask = torch.zeros_like(state.p, dtype=torch.bool).scatter(-1, partners.clamp_min(0), valid)
        mask = mask.scatter(-1, x.unsqueeze(-1), False)  # distinct tokens u ≠ x
        return s + (state.p * mask).sum(-1)

    def accept_prob(self, state: NodeState, x: torch.Tensor, ctx: NodeContext) -> torch.Tensor:
        """min(1, p_j(x)/(q_j(x) − s)), 1 when s ≥ q_j(x)."""
        px, s = gather(state.p, x), self.boost(state, x, ctx)
        qx = torch.ones_like(px) if state.q is None else gather(state.q, x)
        relaxed = torch.where(qx > s, (px / (qx - s).clamp_min(1e-300)).clamp(max=1.0), torch.ones_like(px))
        return torch.where(qx > 0, relaxed, torch.zeros_like(px))

    def single_sample_law(self, state: NodeState, ctx: NodeContext) -> torch.Tensor:
        """The base class's vectorised law without its V×V intermediates: only the listed children
        can be boosted, every other token is accepted with the strict ratio (``boost`` is 0)."""
        q, vocab = state.q[0], state.q.shape[-1]
        every = NodeState(p=state.p.expand(vocab, -1), q=state.q.expand(vocab, -1))  # views, no V×V copy
        a = strict_ratio(every, torch.arange(vocab, device=q.device))
        kids = ctx.extras.get("child_tokens")
        if kids is not None:
            kids = kids[0][kids[0] >= 0]
            rows = kids.shape[0]
            boosted = self.accept_prob(NodeState(p=state.p.expand(rows, -1), q=state.q.expand(rows, -1)), kids, ctx)
            a = a.scatter(0, kids, boosted)
        return self._mix_with_residual(state, ctx, a)

    def reject(self, state: NodeState, x: torch.Tensor, ctx: NodeContext) -> NodeState:
        """Faithful: the strict residual unchanged (as the authors' code does)."""
        return strict_residual(state, x)


class BoundedCascadeRule(CascadeRule):
    """CASCADE with each sibling's extra acceptance capped at ε/n and the TV-optimal residual."""

    name = "cascade_bounded"
    declares_bound = True
    strength = "eps"
    strength_increases = True
    sweep = ({}, {"eps": 0.01}, {"eps": 0.2})
    parameters = {**SIGNAL_PARAMS, "eps": Param(0.05, lo=0.0, hi=1.0, doc="ε, per-node drift budget")}

    def accept_prob(self, state: NodeState, x: torch.Tensor, ctx: NodeContext) -> torch.Tensor:
        """min(CASCADE's f, strict f + ε/n): the extra acceptance mass of a sibling is ≤ ε/n."""
        n = torch.as_tensor(ctx.n_candidates, dtype=state.p.dtype, device=state.p.device).clamp_min(1)
        cap = (strict_ratio(state, x) + self.params["eps"] / n).clamp(max=1.0)
        return torch.minimum(super().accept_prob(state, x, ctx), cap)

    def reject(self, state: NodeState, x: torch.Tensor, ctx: NodeContext) -> NodeState:
        """G* = norm([p_j − q_j·f]_+) with f the strict ratio on every token but x (whose f is
        boosted; its residual entry is 0 either way, so G* equals the strict residual)."""
        f_x = self.accept_prob(state, x, ctx).unsqueeze(-1)
        if state.q is None:
            point = torch.zeros_like(state.p).scatter(-1, x.unsqueeze(-1), 1.0)
            return NodeState(p=normalise((state.p - point * f_x).clamp_min(0.0), state.p), q=None)
        f = torch.where(state.q > 0, (state.p / state.q.clamp_min(1e-300)).clamp(max=1.0), torch.zeros_like(state.p))
        f = f.scatter(-1, x.unsqueeze(-1), f_x)
        residual = normalise((state.p - state.q * f).clamp_min(0.0), state.p)
        return NodeState(p=residual, q=remove_token(state.q, x))

    def tv_bound(self, p: torch.Tensor, q: torch.Tensor, ctx: NodeContext, *, sampled: bool = True) -> torch.Tensor:
        """ε: each of the n siblings adds at most ε/n acceptance mass beyond strict (DESIGN 4.7)."""
        return torch.full(p.shape[:-1], self.params["eps"], dtype=p.dtype, device=p.device)
