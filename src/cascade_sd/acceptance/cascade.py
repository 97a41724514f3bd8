"""CASCADE: context-aware relaxation from draft-tree redundancy (DESIGN 4.7; arXiv 2605.07230).

Defaults reproduce the authors' final LlamaGen code (``selinyldrm/Deepseek-JanusPro-EAGLE``,
commit 8c40c9c "final cascade"; ``models/ea_model_llamagen.py`` L689–801 for verification,
``models/drafters/cnets_llamagen.py`` L847–867 for the breadth pairs); ``variant=lumina`` gives
their Chameleon-family path (``models/ea_model_lumina_mgpt.py`` L296–345, L682–845,
``models/drafters/cnets_lumina_mgpt.py`` L936–946, L1325–1338). Every reading is a named option.

- **Breadth.** Nodes of one tree level whose next-token predictions are nearly the same are
  interchangeable: cosine of their representations > ``tau_b``. LlamaGen: the drafter's logits
  after the generation logits processor (temperature, top-k, top-p; filtered entries 0),
  L2-normalised (``processed``), τ_b = 0.9; Lumina: the softmax of those logits (``processed_probs``),
  τ_b = 0.5. S(x) = the other nodes of x's level paired with x; the boost adds p_j(token(v)) once
  per partner *node* v (``breadth_count=node``; ``token``: once per distinct token ≠ x). Nodes without
  a drafter output (the last level) pair with nothing; so do nodes that were not drawn.
- **Depth.** LlamaGen: s_d = cosine of the target's L2-normalised logits at x and at its parent
  (``depth_repr=logits``), counted when s_d > ``tau_d`` = 0.625 and the gate passes. Their gate is
  KL(p_j ‖ softmax(normalize(parent logits))) < ``kl_threshold`` = 4 (``gate=kl``), with p_j the
  current residual: it never reads x and acts as an entropy gate. Lumina: s_d = cosine of the
  softmaxed *hidden states* of x's parent and grandparent (``parent_grandparent``; from depth 2 on,
  whatever x is), τ_d = 0.9, and the confidence gate p_j(x) ≥ the probability at which p_j's
  descending cumulative mass reaches ``confidence_mass`` = 0.8 gates breadth too (``breadth_gated``).
  Other readings: ``depth_repr=hidden`` (mean-removed), ``gate=pair_kl`` (KL(p_parent ‖ p_x)),
  ``gate=none``.
- **Acceptance.** s = [s_d] + breadth; the authors' test r ≤ (p_j(x) + r·s)/q_j(x) with one uniform r is
  min(1, p_j(x)/(q_j(x) − s)) (1 when s ≥ q_j(x); q = 1 for point masses). ``cascade`` keeps the strict
  residual (as their code; lossy, no bound). ``cascade_bounded`` (ours) caps each sibling's extra
  acceptance at ε/n and uses the TV-optimal residual norm([p_j − q_j·f]_+): each node drifts ≤ ε.

Not copied: their code attaches the breadth pairs of a level to nodes by level offset, while the
drafter rows it compares exist only for nodes with children; on the 57-node tree the pairs land
on other nodes. Here pairs belong to the nodes whose outputs were compared.

Signals move with the draft draws (x's own outputs and its siblings' do), so a node's law is
marginalised over draws with the signals each draw would produce: ``draw_extras`` builds them for
hypothetical children from a probe of the target and drafter at those children.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from cascade_sd.acceptance.base import (AcceptanceRule, NodeContext, NodeState, Param, ProbeOutputs, TreeView, gather,
                                        normalise, remove_token)
from cascade_sd.acceptance.strict import strict_ratio, strict_residual
from cascade_sd.decoding.processing import GREEDY_EPS, SamplingParams, filter_logits

VARIANTS = {
    "llamagen": {"breadth_repr": "processed", "tau_b": 0.9, "breadth_gated": False, "depth_repr": "logits",
                 "tau_d": 0.625, "gate": "kl"},
    "lumina": {"breadth_repr": "processed_probs", "tau_b": 0.5, "breadth_gated": True,
               "depth_repr": "parent_grandparent", "tau_d": 0.9, "gate": "confidence"},
}

SIGNAL_PARAMS = {
    "variant": Param("llamagen", kind="choice", choices=tuple(VARIANTS),
                     doc="the authors' code path whose defaults fill every unset signal option"),
    "breadth": Param(True, kind="bool", doc="use the breadth (interchangeability) signal"),
    "breadth_source": Param("drafter", kind="choice", choices=("drafter", "target"), doc="whose outputs are compared"),
    "breadth_repr": Param(None, kind="choice", optional=True,
                          choices=("processed", "processed_probs", "logits", "probs", "hidden"),
                          doc="breadth representation (variant: processed / processed_probs)"),
    "breadth_top_k": Param(10, kind="int", lo=1, doc="logits kept before the cosine (breadth_repr=logits only)"),
    "tau_b": Param(None, lo=-1.0, hi=1.0, optional=True, doc="τ_b, breadth similarity threshold (variant: 0.9 / 0.5)"),
    "breadth_count": Param("node", kind="choice", choices=("node", "token"),
                           doc="breadth boost per partner node, or per distinct partner token ≠ x"),
    "breadth_gated": Param(None, kind="bool", optional=True, doc="the gate also gates breadth (variant: off / on)"),
    "depth_signal": Param(True, kind="bool", doc="use the depth (convergence) signal"),
    "depth_repr": Param(None, kind="choice", optional=True, choices=("logits", "hidden", "parent_grandparent"),
                        doc="depth representation (variant: logits / parent_grandparent)"),
    "tau_d": Param(None, lo=-1.0, hi=1.0, optional=True, doc="τ_d, depth similarity threshold (variant: 0.625 / 0.9)"),
    "gate": Param(None, kind="choice", optional=True, choices=("kl", "pair_kl", "confidence", "none"),
                  doc="depth gate (variant: kl / confidence)"),
    "kl_threshold": Param(4.0, lo=0.0, doc="kl gates: KL below this"),
    "confidence_mass": Param(0.8, lo=0.0, hi=1.0, doc="confidence gate: x inside this top mass of p_j"),
}


@dataclass
class Signals:
    """Per-round signals: depth boost and its test per node [B, T+1], breadth pairs [B, T+1, T+1],
    the breadth representation of every node and which nodes have one."""

    depth_boost: torch.Tensor
    depth_ok: torch.Tensor
    pairs: torch.Tensor
    rep: torch.Tensor | None
    has_rep: torch.Tensor | None


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.double(), dim=-1)


def _centred(x: torch.Tensor) -> torch.Tensor:
    return _unit(x - x.double().mean(-1, keepdim=True))


def _logit_repr(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Logits with all but the top_k entries zeroed, L2-normalised."""
    logits = logits.double()
    keep = logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices
    return _unit(torch.zeros_like(logits).scatter(-1, keep, logits.gather(-1, keep)))


def _filtered(logits: torch.Tensor, params: SamplingParams | None) -> torch.Tensor:
    """Logits after the generation logits processor (temperature, top-k, top-p): filtered entries −inf."""
    logits = logits.double()
    if params is None:
        return logits
    return filter_logits(logits / max(params.temperature, GREEDY_EPS), params.top_k, params.top_p)


def _kl(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) along the last dim from p and log q (terms with p = 0 are 0)."""
    return (p * (p.clamp_min(1e-300).log() - log_q)).where(p > 0, 0.0).sum(-1)


def _confidence_cutoff(p: torch.Tensor, mass: float) -> torch.Tensor:
    """The probability [B] of the token at which p's descending cumulative mass first reaches ``mass``
    (the authors' ``compute_confidence_gate``; the smallest probability when it never does)."""
    sorted_p = torch.sort(p, dim=-1, descending=True).values
    reach = sorted_p.cumsum(-1) >= mass
    first = torch.where(reach.any(-1), reach.float().argmax(-1), torch.full_like(reach[..., 0], p.shape[-1] - 1,
                                                                                  dtype=torch.long))
    return sorted_p.gather(-1, first.unsqueeze(-1)).squeeze(-1)


def _valid_nodes(tree: Any) -> torch.Tensor:
    """Bool [B, T+1]: the root and every node its parent's children list holds (drawn nodes)."""
    kids = tree.children.flatten(1)
    count = torch.zeros(tree.tokens.shape, dtype=torch.long, device=kids.device)
    count.scatter_add_(1, kids.clamp_min(0), (kids >= 0).long())  # −1 padding adds 0: no last-write-wins
    count[:, 0] += 1
    return count > 0


class CascadeRule(AcceptanceRule):
    """Faithful CASCADE: boosted acceptance, strict residual; declares no bound."""

    name = "cascade"
    residual_independent_of_candidate = True  # the strict residual, whatever x was
    needs_tree = True
    strength = "tau_b"
    strength_increases = False
    sweep = ({}, {"tau_b": 0.7, "tau_d": 0.5}, {"tau_b": 0.5, "tau_d": 0.3})
    parameters = dict(SIGNAL_PARAMS)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        for key, value in VARIANTS[self.params["variant"]].items():
            if self.params[key] is None:
                self.params[key] = value

    @property
    def reads_drafter(self) -> bool:  # type: ignore[override]
        """The breadth signal compares the drafter's outputs unless ``breadth_source='target'``."""
        return self.params["breadth"] and self.params["breadth_source"] == "drafter"

    @property
    def draw_dependent(self) -> bool:
        """Whether a child's signals depend on the child drawn (its outputs, its siblings)."""
        prm = self.params
        depth = prm["depth_signal"] and (prm["depth_repr"] != "parent_grandparent" or prm["gate"] == "pair_kl")
        return depth or prm["breadth"]

    @property
    def signals_only_raise(self) -> bool:  # type: ignore[override]
        """s ≥ 0 in min(1, p/(q − s)) unless a negative τ_d lets a negative depth cosine count (breadth
        adds probabilities); bounded CASCADE caps above strict."""
        return not self.params["depth_signal"] or self.params["tau_d"] >= 0

    # ------------------------------------------------------------------ representations
    def _breadth_rep(self, logits: torch.Tensor, hidden: torch.Tensor, params: SamplingParams | None) -> torch.Tensor:
        """Unit breadth representations of outputs ``logits`` [..., V] / ``hidden`` [..., D]."""
        kind = self.params["breadth_repr"]
        if kind == "hidden":
            return _centred(hidden)
        if kind == "probs":
            return _unit(logits.double().softmax(-1))
        if kind == "logits":
            return _logit_repr(logits, self.params["breadth_top_k"])
        filtered = _filtered(logits, params)
        if kind == "processed_probs":  # Lumina: softmax of the processed logits (filtered entries 0)
            return _unit(filtered.softmax(-1))
        return _unit(filtered.masked_fill(torch.isinf(filtered), 0.0))  # LlamaGen: −inf set to 0

    def _depth_rep(self, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        kind = self.params["depth_repr"]
        if kind == "logits":
            return _unit(logits)
        if kind == "hidden":
            return _centred(hidden)
        return _unit(hidden.double().softmax(-1))  # parent_grandparent: the authors apply softmax to hidden states

    def _view_breadth(self, view: TreeView) -> tuple[torch.Tensor, torch.Tensor]:
        """(breadth representations [B, T+1, ·], which nodes have one [B, T+1])."""
        valid = _valid_nodes(view.tree)
        if self.params["breadth_source"] == "target":
            return self._breadth_rep(view.target_logits, view.target_hidden, view.params), valid
        rep = self._breadth_rep(view.drafter_logits, view.drafter_hidden, view.params)
        return rep, view.drafter_ran & valid

    # ------------------------------------------------------------------ similarities
    def depth_similarity(self, view: TreeView) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_d of every node [B, T+1], where it is defined): between the node and its parent, or between
        its parent and grandparent (``parent_grandparent``)."""
        tree = view.tree
        rows = torch.arange(tree.tokens.shape[0], device=tree.tokens.device)[:, None]
        parent = tree.parent.clamp_min(0)
        rep = self._depth_rep(view.target_logits, view.target_hidden)
        if self.params["depth_repr"] == "parent_grandparent":
            return (rep[rows, parent] * rep[rows, parent.gather(1, parent)]).sum(-1), tree.parent > 0
        return (rep * rep[rows, parent]).sum(-1), tree.parent >= 0

    def breadth_similarity(self, view: TreeView) -> tuple[torch.Tensor, torch.Tensor]:
        """(cosine [B, T+1, T+1] between node representations, mask of the pairs the breadth signal may
        use: two distinct drawn nodes of one level, both with a representation)."""
        rep, has = self._view_breadth(view)
        return self._similarity(view.tree, rep, has)

    @staticmethod
    def _similarity(tree: Any, rep: torch.Tensor, has: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n1 = tree.tokens.shape[1]
        same_level = tree.depth[:, :, None] == tree.depth[:, None, :]
        other = ~torch.eye(n1, dtype=torch.bool, device=rep.device)
        comparable = same_level & other & has[:, :, None] & has[:, None, :]
        comparable[:, 0] = False
        comparable[:, :, 0] = False
        return rep @ rep.transpose(1, 2), comparable

    # ------------------------------------------------------------------ signals (once per round)
    def prepare(self, view: TreeView) -> Signals:
        """Depth boost and test of every node, and the breadth pairs of every level."""
        tree, prm = view.tree, self.params
        b, n1 = tree.tokens.shape
        boost = torch.zeros(b, n1, dtype=torch.float64, device=tree.tokens.device)
        ok = torch.zeros(b, n1, dtype=torch.bool, device=tree.tokens.device)
        if prm["depth_signal"]:
            boost, defined = self.depth_similarity(view)
            ok = defined & (boost > prm["tau_d"])
            if prm["gate"] == "pair_kl":
                rows = torch.arange(b, device=tree.tokens.device)[:, None]
                ok &= _kl(view.p[rows, tree.parent.clamp_min(0)], view.p.clamp_min(1e-300).log()) < prm["kl_threshold"]
        pairs = torch.zeros(b, n1, n1, dtype=torch.bool, device=tree.tokens.device)
        rep = has = None
        if prm["breadth"]:
            rep, has = self._view_breadth(view)
            sim, comparable = self._similarity(tree, rep, has)
            pairs = (sim > prm["tau_b"]) & comparable
        return Signals(depth_boost=boost, depth_ok=ok, pairs=pairs, rep=rep, has_rep=has)

    @property
    def _gated(self) -> bool:
        """Whether the gate is read at all (it gates depth, and breadth when ``breadth_gated``)."""
        return self.params["depth_signal"] or (self.params["breadth"] and self.params["breadth_gated"])

    def _parent_extras(self, view: TreeView, rows: torch.Tensor, node: torch.Tensor) -> dict[str, Any]:
        """What the state-dependent kl gate reads at the node: log softmax(normalize(its logits)) [B, V]."""
        if self.params["gate"] != "kl" or not self._gated:
            return {}
        return {"parent_lsn": F.log_softmax(_unit(view.target_logits[rows, node]), dim=-1)}

    def node_extras(self, prepared: Signals, view: TreeView, node: torch.Tensor, kids: torch.Tensor) -> dict[str, Any]:
        """Per candidate child: its token, depth boost and test, and partner tokens (−1 padded)."""
        tokens = view.tree.tokens
        safe, kid_ok = kids.clamp_min(0), kids >= 0
        rows = torch.arange(kids.shape[0], device=kids.device)
        child_tokens = torch.where(kid_ok, tokens.gather(1, safe), torch.full_like(kids, -1))
        partner = prepared.pairs[rows[:, None], safe] & kid_ok[..., None]
        partner_tokens = torch.where(partner, tokens[:, None, :].expand_as(partner),
                                     torch.full_like(partner, -1, dtype=torch.long))
        return {"child_tokens": child_tokens, "depth_boost": prepared.depth_boost.gather(1, safe) * kid_ok,
                "depth_ok": prepared.depth_ok.gather(1, safe) & kid_ok, "partner_tokens": partner_tokens,
                **self._parent_extras(view, rows, node)}

    def signals_can_fire(self, prepared: Signals, view: TreeView, row: int, node: int, n_candidates: int) -> bool:
        """False when no draw can carry a signal: the depth test is closed for every child (a single
        child sees p_j = p at the node, so the kl gate is decided there; the parent-grandparent signal
        needs a grandparent), and no breadth partner can exist (no output at the children's level, or a
        single child without cousins that have one)."""
        prm, tree = self.params, view.tree
        depth = prm["depth_signal"]
        if depth and prm["depth_repr"] == "parent_grandparent":
            depth = int(tree.parent[row, node]) >= 0
        if depth and prm["gate"] == "kl" and n_candidates == 1:
            lsn = F.log_softmax(_unit(view.target_logits[row, node]), dim=-1)
            depth = bool(_kl(view.p[row, node], lsn) < prm["kl_threshold"])
        return depth or self._partners(prepared, view, row, node, n_candidates)[0]

    def _partners(self, prepared: Signals, view: TreeView, row: int, node: int, n: int) -> tuple[bool, torch.Tensor]:
        """(whether a child of the node can have a breadth partner, the cousins with a representation):
        the children's level has representations where its realised nodes have them, and a partner is a
        sibling (n > 1) or a cousin."""
        tree = view.tree
        if not self.params["breadth"]:
            return False, tree.tokens.new_zeros(0)
        level = (tree.depth[row] == int(tree.depth[row, node]) + 1) & prepared.has_rep[row]
        cousins = (level & (tree.parent[row] != node)).nonzero().flatten()
        return bool(level.any()) and (n > 1 or cousins.numel() > 0), cousins

    def draw_extras(self, prepared: Signals, view: TreeView, row: int, node: int, seqs: torch.Tensor,
                    probe: Callable[[torch.Tensor], ProbeOutputs]) -> dict[str, Any]:
        """``node_extras`` of one row as they would be had the node's children been ``seqs`` [D, n]: the
        signals of every hypothetical child come from ``probe`` (the target's and drafter's outputs at
        it); the level's other nodes (cousins) keep their realised outputs."""
        prm, tree = self.params, view.tree
        d, n = seqs.shape
        dev = seqs.device
        uniq, inv = torch.unique(seqs, return_inverse=True)
        partners, cousins = self._partners(prepared, view, row, node, n)  # without: no partner for any draw
        need_target = prm["depth_signal"] and (prm["depth_repr"] != "parent_grandparent" or prm["gate"] == "pair_kl")
        need_target |= partners and prm["breadth_source"] == "target"
        out = probe(uniq, drafter=partners and prm["breadth_source"] == "drafter") if need_target or partners else None
        boost = torch.zeros(len(uniq), dtype=torch.float64, device=dev)
        ok = torch.zeros(len(uniq), dtype=torch.bool, device=dev)
        if prm["depth_signal"]:
            here = self._depth_rep(view.target_logits[row, node], view.target_hidden[row, node])
            if prm["depth_repr"] == "parent_grandparent":
                up = int(tree.parent[row, node])
                if up >= 0:
                    above = self._depth_rep(view.target_logits[row, up], view.target_hidden[row, up])
                    boost = (here * above).sum(-1).expand(len(uniq)).clone()
                    ok = (boost > prm["tau_d"]).expand(len(uniq)).clone()
            else:
                boost = self._depth_rep(out.target_logits, out.target_hidden) @ here
                ok = boost > prm["tau_d"]
            if prm["gate"] == "pair_kl":
                ok &= _kl(view.p[row, node].expand(len(uniq), -1), out.p.clamp_min(1e-300).log()) < prm["kl_threshold"]
        partner_tokens = torch.full((d, n, 1), -1, dtype=torch.long, device=dev)
        if partners:
            if prm["breadth_source"] == "target":
                rep_u, has_u = self._breadth_rep(out.target_logits, out.target_hidden, view.params), True
            elif out.drafter_logits is None:
                rep_u, has_u = None, False  # the children's level is the last: no drafter output there
            else:
                rep_u, has_u = self._breadth_rep(out.drafter_logits, out.drafter_hidden, view.params), True
            if has_u:
                rep = rep_u[inv]  # [D, n, ·]
                sib = (rep @ rep.transpose(1, 2)) > prm["tau_b"]
                sib &= ~torch.eye(n, dtype=torch.bool, device=dev)
                sib_tokens = torch.where(sib, seqs[:, None, :].expand(d, n, n), torch.full_like(seqs[:, None, :].expand(d, n, n), -1))
                near = (rep @ prepared.rep[row, cousins].T) > prm["tau_b"]  # [D, n, C]
                cousin_tokens = torch.where(near, tree.tokens[row, cousins].expand_as(near), torch.full_like(near, -1, dtype=torch.long))
                partner_tokens = torch.cat([sib_tokens, cousin_tokens], -1)
        rows = torch.tensor([row], device=dev)
        return {"child_tokens": seqs, "depth_boost": boost[inv], "depth_ok": ok[inv], "partner_tokens": partner_tokens,
                **self._parent_extras(view, rows, torch.tensor([node], device=dev))}

    # ------------------------------------------------------------------ acceptance
    def _gate(self, state: NodeState, x: torch.Tensor, ex: dict[str, torch.Tensor]) -> torch.Tensor:
        """The state-dependent gate [B] (kl: on the residual p_j; confidence: p_j(x) in p_j's top mass)."""
        gate = self.params["gate"]
        if gate == "kl":
            return _kl(state.p, ex["parent_lsn"]) < self.params["kl_threshold"]
        if gate == "confidence":
            return gather(state.p, x) >= _confidence_cutoff(state.p, self.params["confidence_mass"])
        return torch.ones_like(x, dtype=torch.bool)  # none, or pair_kl (folded into depth_ok)

    def boost(self, state: NodeState, x: torch.Tensor, ctx: NodeContext) -> torch.Tensor:
        """s(x) [B] from the node's extras; 0 for tokens that are not among the listed children."""
        zero = torch.zeros_like(gather(state.p, x))
        if "child_tokens" not in ctx.extras:
            return zero
        # One context row may serve many enumerated branches (induced_law): broadcast it.
        ex = {key: t.expand(x.shape[0], *t.shape[1:]) for key, t in ctx.extras.items()}
        match = ex["child_tokens"] == x[:, None]
        found = match.any(-1)
        k = match.float().argmax(-1)
        rows = torch.arange(x.shape[0], device=x.device)
        gate = (self._gate(state, x, ex) if self._gated else torch.ones_like(found)) & found
        s = zero
        if self.params["depth_signal"]:
            s = torch.where(gate & ex["depth_ok"][rows, k], ex["depth_boost"][rows, k].to(state.p.dtype), zero)
        if self.params["breadth"]:
            partners = ex["partner_tokens"][rows, k]
            valid = (partners >= 0) & (gate if self.params["breadth_gated"] else found)[:, None]
            if self.params["breadth_count"] == "node":
                s = s + (state.p.gather(-1, partners.clamp_min(0)) * valid).sum(-1)
            else:  # distinct tokens u ≠ x; scatter_add, so the −1 padding cannot overwrite a real token 0
                hits = torch.zeros_like(state.p).scatter_add(-1, partners.clamp_min(0), valid.to(state.p.dtype)) > 0
                s = s + (state.p * hits.scatter(-1, x.unsqueeze(-1), False)).sum(-1)
        return s

    def accept_prob(self, state: NodeState, x: torch.Tensor, ctx: NodeContext) -> torch.Tensor:
        """min(1, p_j(x)/(q_j(x) − s)), 1 when s ≥ q_j(x)."""
        px, s = gather(state.p, x), self.boost(state, x, ctx)
        qx = torch.ones_like(px) if state.q is None else gather(state.q, x)
        relaxed = torch.where(qx > s, (px / (qx - s).clamp_min(1e-300)).clamp(max=1.0), torch.ones_like(px))
        return torch.where(qx > 0, relaxed, torch.zeros_like(px))

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
