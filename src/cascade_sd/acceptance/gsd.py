"""GSD: grouped speculative decoding (DESIGN 4.6; arXiv 2508.07747), as its public code does it.

Reference: ``junhyukso/GSD`` 4216c7c, ``scheduler/jacobi_iteration_lumina_mgpt.py`` L296–337 (the
cluster and its acceptance) and L1196–1199 (the distance table). At a node, the tokens are sorted
by the target's CFG-guided logits in *ascending* order; x sits at index i. The window is the
``2w`` tokens ``[i − w, i + w)`` (w = 7: 7 below x, x, 6 above; truncated at the top). A window
token y joins C(x) when ``|p_j(y) − p_j(x)| < p_threshold`` (absolute) and the *squared* L2
distance between the target model's input token embeddings of y and x is ``< dist_threshold``.
Accept with min(1, p_j(C)/q_j(C)) (q(C) = 1 for point masses); on rejection the strict residual
(lossy by design; no bound). When the cluster cannot be formed the reference falls back to
min(1, p_j(x)/q_j(x)): with ``i < w`` its slice ``[i − w : i + w]`` starts at a negative index,
comes out empty and the reduction over it raises; here the same tokens take the strict ratio.

Departure (listed in REFERENCES.md): the reference filters distances only while every window
id is below 10000 (its table holds the first 10000 rows of Lumina-mGPT's vocabulary, which covers
all image tokens); the engine's vocabulary is the image codebook, so every token is filtered.
Without the node's logits (analyses of bare laws, ``induced_law`` without a tree) the order is
p_j's (ties by index), which agrees with the logits' order wherever p_j > 0.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from cascade_sd.acceptance.base import AcceptanceRule, NodeContext, NodeState, Param, RuleResources, TreeView, gather
from cascade_sd.acceptance.strict import strict_ratio, strict_residual
from cascade_sd.errors import ConfigError

#: Distance tables by (embeddings digest, threshold, device): a decode builds its rule afresh, the table once.
_CLOSE: dict[tuple[str, float, str], torch.Tensor] = {}
#: float64 entries per row block while a table is built (V = 16384: 1024 rows, 128 MB per temporary).
_BLOCK = 2**24


class GSDRule(AcceptanceRule):
    """Cluster-level acceptance with the strict residual; no declared bound."""

    name = "gsd"
    residual_independent_of_candidate = True  # the strict residual, whatever x was
    needs_tree = True  # reads the node's target logits (the sort order)
    strength = "window"
    sweep = ({}, {"window": 3}, {"window": 14})
    parameters = {
        "window": Param(7, kind="int", lo=0, doc="w: the window [i − w, i + w) in ascending target-logit order (0 = strict)"),
        "p_threshold": Param(0.15, lo=0.0, hi=1.0, lo_open=True, doc="probability filter: |p(y) − p(x)| < t"),
        "dist_threshold": Param(0.5, lo=0.0, lo_open=True,
                                doc="embedding filter: squared L2 distance of target input embeddings < t"),
    }
    embeddings: torch.Tensor | None = None

    def bind(self, resources: RuleResources) -> None:
        """Keep the target's input token embeddings for the distance filter."""
        if resources.token_embeddings is None:
            raise ConfigError("method='gsd' needs the target's input token embeddings; this bundle has none")
        self.embeddings = resources.token_embeddings.detach().double()
        self._digest = hashlib.sha256(self.embeddings.cpu().numpy().tobytes()).hexdigest()[:16]

    def node_extras(self, prepared: Any, view: TreeView, node: torch.Tensor, kids: torch.Tensor) -> dict[str, Any]:
        """The node's CFG-guided target logits [B, V] (the sort order of the window)."""
        rows = torch.arange(node.shape[0], device=node.device)
        return {"node_logits": view.target_logits[rows, node]}

    def _order(self, p: torch.Tensor, ctx: NodeContext) -> torch.Tensor:
        """Tokens in ascending order of the node's logits (of p_j without them), ties by index [B, V]."""
        key = ctx.extras.get("node_logits")
        key = p if key is None else key.expand(p.shape[0], -1)
        if key.shape[0] > 1 and key.stride(0) == 0:  # one row broadcast over many candidates: sort it once
            return torch.sort(key[:1].double(), dim=-1, stable=True).indices.expand_as(p)
        return torch.sort(key.double(), dim=-1, stable=True).indices

    def _windows(self, p: torch.Tensor, x: torch.Tensor, ctx: NodeContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(window tokens [B, 2w], in range [B, 2w], cluster formed [B]) of candidates x."""
        w, vocab = self.params["window"], p.shape[-1]
        order = self._order(p, ctx)
        if order.shape[0] > 1 and order.stride(0) == 0:  # one order for every candidate
            rank = torch.argsort(order[0])[x].unsqueeze(-1)
        else:
            rank = torch.argsort(order, dim=-1).gather(-1, x.unsqueeze(-1))  # i: x's index in the order
        at = rank + torch.arange(-w, w, device=p.device)
        inside = at < vocab
        formed = rank.squeeze(-1) >= w  # [i − w : i + w] starts at a negative index: no cluster (module docstring)
        return order.gather(-1, at.clamp(0, vocab - 1)), inside, formed

    def _members(self, p: torch.Tensor, x: torch.Tensor, tokens: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        """Which window tokens [B, 2w] pass both filters."""
        gap_ok = (p.gather(-1, tokens) - gather(p, x).unsqueeze(-1)).abs() < self.params["p_threshold"]
        dist_ok = self._close_table(p.device)[x.unsqueeze(-1), tokens]
        return inside & gap_ok & dist_ok

    def _close_table(self, device: torch.device) -> torch.Tensor:
        """[V, V] bool: squared L2 distance of the target's input embeddings of (x, y) < dist_threshold,
        built once per embeddings, threshold and device (kept in memory), as the reference builds its
        distance table once (L1196–1199). One GEMM gives |x|² + |y|² − 2x·y; pairs within its rounding
        slack of the threshold are decided by the direct Σ (y − x)², so the table equals the direct
        expression everywhere."""
        if self.embeddings is None:
            raise ConfigError("rule 'gsd' has no embeddings; call bind() first")
        thr = self.params["dist_threshold"]
        key = (self._digest, thr, str(device))
        if key not in _CLOSE:
            book = self.embeddings.to(device)
            sq = (book * book).sum(-1)
            step, blocks = max(1, _BLOCK // len(book)), []
            for lo in range(0, len(book), step):
                rows = book[lo : lo + step]
                scale = sq[lo : lo + step, None] + sq[None]
                approx = scale - 2 * rows @ book.T
                close = approx < thr
                i, j = ((approx - thr).abs() <= 1e-9 * scale + 1e-12).nonzero().T  # far above float64 rounding
                close[i, j] = (book[j] - rows[i]).pow(2).sum(-1) < thr
                blocks.append(close)
            _CLOSE[key] = torch.cat(blocks)
        return _CLOSE[key]

    def accept_prob(self, state: NodeState, x: torch.Tensor, ctx: NodeContext) -> torch.Tensor:
        """min(1, p_j(C)/q_j(C)); min(1, p_j(C)) for point masses; the strict ratio without a cluster."""
        strict = strict_ratio(state, x)
        if self.params["window"] == 0:
            return strict
        tokens, inside, formed = self._windows(state.p, x, ctx)
        member = self._members(state.p, x, tokens, inside)
        pc = (state.p.gather(-1, tokens) * member).sum(-1)
        if state.q is None:
            grouped = pc.clamp(max=1.0)
        else:
            qc = (state.q.gather(-1, tokens) * member).sum(-1)
            grouped = torch.where(gather(state.q, x) > 0, (pc / qc.clamp_min(1e-300)).clamp(max=1.0),
                                  torch.zeros_like(pc))
        return torch.where(formed, grouped, strict)

    def single_sample_law(self, state: NodeState, ctx: NodeContext) -> torch.Tensor:
        """The base class's vectorised law in O(V·w): every token's window from one sort of the node."""
        vocab = state.p.shape[-1]
        every = NodeState(p=state.p.expand(vocab, -1), q=state.q.expand(vocab, -1))
        return self._mix_with_residual(state, ctx, self.accept_prob(every, torch.arange(vocab, device=state.p.device), ctx))

    def reject(self, state: NodeState, x: torch.Tensor, ctx: NodeContext) -> NodeState:
        """The strict residual."""
        return strict_residual(state, x)
