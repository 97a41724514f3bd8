"""The speculative decoding engine (DESIGN 3): draft → verify in one target forward → walk → commit.

Conventions. Token index j = 0..N−1 over the grid. The target's output for token j (the input one
position earlier) gives the law p_j and the feature H_j. The drafter's input at token j is
(H_j, t_j) and predicts q for token j+1; deeper draft steps feed the drafter's own output.
A round starts with m committed tokens; the root is t_{m−1} (committed, not yet seen by the
target). The target sees the root and all T drafted nodes in one forward; accepted nodes'
KV entries are compacted into place (no recompute) and the bonus token becomes the next root.

Batching: every row keeps its own committed length m and its own slots (per-row positions,
slots and masks). A row whose image is complete hands its row to the next queued image
(continuous batching, when ``decode`` gets more images than ``max_rows``): a target forward over
the new image's condition alone (``step(rows=...)``) writes its prefix into that row's slots,
and m restarts at 1; stale entries of the old image are never visible, since every mask only
admits slots the row's current image wrote. When the queue is empty, finished rows leave the
batch: both caches move the remaining rows to the front (``select_rows``, copying only rows that
change place), so no forward computes a finished row. What the batch still loses while its last
rows finish (smaller, less efficient forwards) shows in the benchmark's achieved/predicted
speedup. The drafter's entries for committed tokens are always computed from real target
features in the next round's catch-up forward, so its cache needs no compaction. With CFG both
streams ride in one batch ([cond rows; uncond rows]).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from cascade_sd.acceptance.base import AcceptanceRule, ProbeOutputs, TreeView
from cascade_sd.decoding.jacobi import JacobiDrafting, NoDrafter
from cascade_sd.decoding.processing import (
    NodeLaws,
    SamplingParams,
    draw_without_replacement,
    sample_from_law,
    split_cfg,
    target_law,
)
from cascade_sd.decoding.tree import DraftTree, DrafterOutputs, DynamicTreeSpec, StaticTree
from cascade_sd.decoding.vanilla import DecodeResult, causal_mask, inference_decode, with_null_condition
from cascade_sd.decoding.verify import walk_tree
from cascade_sd.metrics.drift import DrawSignals, DriftRecorder
from cascade_sd.metrics.speed import RoundStats
from cascade_sd.models.gpt import GPTOutput


#: Hypothetical children probed per forward when drift recording needs draw-dependent signals.
PROBE_CHUNK = 256


@dataclass
class _Round:
    """Per-round tensors the engine passes between phases."""

    q_root: torch.Tensor
    h_root: torch.Tensor
    logits_root: torch.Tensor


@dataclass(frozen=True)
class _Level:
    """One level of a static tree, precomputed once per decode. Its nodes are drawn from the laws of
    their distinct parents (``uniq``, in node order; ``uniq_at`` locates them among the nodes
    expanded one level up); node i is entry (its parent among ``uniq``, its sibling rank) of the
    level's flattened top-``kmax`` draws (``pick``). The drafter then expands the level's nodes that
    have children (``expand``; every node when the rule reads the tree's drafter outputs).
    Consecutive indices are kept as slices: indexing with them is a view, not a gather."""

    nodes: slice  # breadth-first order: a level's nodes are consecutive
    parent: torch.Tensor | slice
    kmax: int
    pick: torch.Tensor | slice
    uniq_at: torch.Tensor | slice
    expand: torch.Tensor | slice
    expand_parent: torch.Tensor | slice
    slots: torch.Tensor  # the expanded nodes' drafter scratch slots [E], the same in every row
    scratch: torch.Tensor  # [E, drafter slots]: the scratch slots of each expanded node's drafted ancestors-or-self


class SpeculativeEngine:
    """One implementation of tree speculative decoding for any target, drafter, rule and tree."""

    def __init__(
        self,
        target: torch.nn.Module,
        drafter: torch.nn.Module | JacobiDrafting,
        rule: AcceptanceRule,
        tree: StaticTree | DynamicTreeSpec,
        params: SamplingParams,
        *,
        profile: bool = False,
        drift: DriftRecorder | None = None,
    ) -> None:
        self.target = target
        self.drift = drift
        self.stats = RoundStats()
        # A drafter-free engine (DESIGN 5b) drafts from the Jacobi window; its tree is the window's.
        self.jacobi = drafter if isinstance(drafter, JacobiDrafting) else None
        self.drafter = NoDrafter() if self.jacobi is not None else drafter
        self.rule = rule
        self.tree = tree if self.jacobi is None else self.jacobi.shape
        self.params = params
        self.profile = profile
        self.reps = 2 if params.uses_cfg else 1
        self.device = next(target.parameters()).device

    # ------------------------------------------------------------------ helpers
    def _rep(self, x: torch.Tensor) -> torch.Tensor:
        """Repeat rows for the CFG streams."""
        return torch.cat([x] * self.reps, 0) if self.reps > 1 else x

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed(self, key: str, fn, *args, forwards: int = 1, **kwargs):
        """Run a model call, adding its (synchronised, if profiling) duration and ``forwards`` forwards
        to the round stats."""
        if self.profile:
            self._sync()
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        if self.profile:
            self._sync()
        self.stats.add_model(key, time.perf_counter() - start, forwards)
        return out

    def _target_forward(self, embed, inputs: torch.Tensor, **kwargs) -> GPTOutput:
        """One timed target forward; embedding its inputs is part of it."""
        return self._timed("target", lambda: self.target.step(embed(inputs), **kwargs))

    def _law(self, logits: torch.Tensor) -> torch.Tensor:
        """Processed law (CFG, temperature, top-k/p) in float64 from [cond; uncond] logits."""
        return target_law(logits, self.params, dtype=torch.float64)

    # ------------------------------------------------------------------ drafting
    def _drafter_committed(self, m: torch.Tensor) -> torch.Tensor:
        """Bool [rows, drafter slots]: the committed slots (< m) every drafted node of a row sees."""
        return self.drafter_keys[None] < m[:, None]

    def _drafter_step(self, h, tokens, positions, slots, mask):
        return self._timed("drafter", self.drafter.step, h, self._rep(tokens), positions=self._rep(positions),
                           slots=self._rep(slots), attn_mask=self._rep(mask))

    def _draft_static(self, rnd: _Round, root_tok: torch.Tensor, m: torch.Tensor, gen, forced=None) -> DraftTree:
        tree: StaticTree = self.tree
        b, v = rnd.q_root.shape
        n1 = tree.size + 1
        tokens, valid, q, h = self._static_buffers(rnd)
        tokens[:, 0], q[:, 0], h[:, 0] = root_tok, rnd.q_root, rnd.h_root
        parent, depth = self.static_parent, self.static_depth
        # Per stream row: the committed slots every drafted node sees, and the root's position.
        m_streams = self._rep(m)
        committed = self._drafter_committed(m_streams)
        positions = (self.cls + m_streams - 1)[:, None] + depth  # depth-based positions of every node
        positions.clamp_(max=self.max_pos)
        seen = committed[:, None, :]  # every expanded node's drafter mask: these slots and its scratch
        logits_all = torch.zeros(b, n1, v, dtype=rnd.logits_root.dtype, device=self.device) if self.rule.reads_drafter else None
        if logits_all is not None:
            logits_all[:, 0] = split_cfg(rnd.logits_root, self.params)
        parents = rnd.q_root[:, None]  # the drafter laws the level's children are drawn from (``uniq_at``)
        for d, level in enumerate(self.static_levels, start=1):
            nodes, uniq_q = level.nodes, _take(parents, level.uniq_at)
            if forced is not None:  # analysis: the drafted tokens are given, not sampled
                tokens[:, nodes] = forced[:, nodes].clamp_min(0)
                valid[:, nodes] = _take(valid, level.parent) & (forced[:, nodes] >= 0)
            elif level.kmax == 1:  # lone children: a without-replacement sample of one is a draw from q
                tokens[:, nodes] = _take(sample_from_law(uniq_q, gen), level.pick)
            else:
                # Children of one node: a without-replacement sample from q in rank order. A rank-0
                # child always exists (q has mass); later siblings may run out. The walk never reaches
                # a child of a node that was not drawn, so a node's own flag is all it needs.
                drawn, exists = draw_without_replacement(uniq_q, level.kmax, gen)
                tokens[:, nodes] = _take(drawn.flatten(1), level.pick)
                valid[:, nodes] = _take(exists.flatten(1), level.pick)
            if d < tree.depth:
                grow = level.expand
                logits, h_out = self._timed("drafter", self.drafter.step, _take(h, level.expand_parent),
                                            self._rep(_take(tokens, grow)), positions=_take(positions, grow),
                                            slots=level.slots, attn_mask=seen | level.scratch)
                parents = q[:, grow] = self._law(logits)
                h[:, grow] = h_out
                if logits_all is not None:
                    logits_all[:, grow] = split_cfg(logits, self.params)
        children = self.static_children.expand(b, -1, -1)
        if forced is not None or not self.chain:  # a chain's lone children always exist
            kid_ok = valid.gather(1, children.clamp_min(0).flatten(1)).view_as(children)
            children = torch.where(kid_ok & (children >= 0), children, -1)
        outputs = None
        if logits_all is not None:
            outputs = DrafterOutputs(logits=logits_all, hidden=h[:b], ran=self.static_ran.expand(b, n1))
        return DraftTree(tokens=tokens, parent=parent.expand(b, n1), depth=depth.expand(b, n1), children=children,
                         q=q, sampled=True, drafter=outputs, ancestors=self.static_anc.expand(b, n1, n1),
                         distinct_siblings=forced is None)

    def _draft_dynamic(self, rnd: _Round, root_tok: torch.Tensor, m: torch.Tensor) -> DraftTree:
        """EAGLE-2: expand the top_k frontier by q's top_k each, keep every candidate, rerank at the end."""
        spec: DynamicTreeSpec = self.tree
        k, dmax = spec.top_k, spec.depth
        b, v = rnd.q_root.shape
        dev = self.device
        cap = spec.candidates
        tok = torch.zeros(b, cap, dtype=torch.long, device=dev)
        par = torch.full((b, cap), -1, dtype=torch.long, device=dev)  # storage index of the parent, −1 = root
        score = torch.full((b, cap), float("-inf"), dtype=torch.float64, device=dev)
        layer = torch.zeros(cap, dtype=torch.long, device=dev)
        # The drafter's outputs are kept per expansion: slot 0 = root, then top_k slots per expanded
        # depth, and a last ``spare`` slot of zeros for candidates never expanded.
        spare = 1 + (dmax - 1) * k
        slot = torch.full((b, cap + 1), spare, dtype=torch.long, device=dev)  # by storage index + 1 (0 = root)
        slot[:, 0] = 0
        qs = _outputs(rnd.q_root, spare)
        hs = _outputs(rnd.h_root, spare)
        ls = _outputs(split_cfg(rnd.logits_root, self.params), spare) if self.rule.reads_drafter else None
        anc = torch.zeros(b, cap + 1, cap + 1, dtype=torch.bool, device=dev)  # row/col 0 = root
        anc[:, 0, 0] = True
        rows = torch.arange(b, device=dev)[:, None]
        vals, idx = rnd.q_root.topk(k, dim=-1)
        tok[:, :k], score[:, :k] = idx, vals.log()
        first = torch.arange(k, device=dev)
        anc[:, first + 1, 0] = True
        anc[:, first + 1, first + 1] = True
        layer[:k] = 1
        front = first.expand(b, k)  # storage indices of the frontier, per row
        committed = self._drafter_committed(m)
        for d in range(1, dmax):
            parent_slot = self._rep(slot.gather(1, par.gather(1, front) + 1))
            h_in = hs.gather(1, parent_slot[..., None].expand(-1, -1, hs.shape[-1]))
            pos = (self.cls + m - 1 + d)[:, None].expand(b, k).clamp(max=self.max_pos)
            mask = committed[:, None].expand(b, k, self.drafter_slots).clone()
            mask[:, :, self.n_tokens : self.n_tokens + cap] = anc[rows, front + 1, 1:]
            logits, h_out = self._drafter_step(h_in, tok.gather(1, front), pos, self.n_tokens + front, mask)
            qf = self._law(logits)
            at = slice(1 + (d - 1) * k, 1 + d * k)
            slot.scatter_(1, front + 1, torch.arange(at.start, at.stop, device=dev).expand(b, k))
            qs[:, at] = qf
            hs[:, at] = h_out  # each stream row (cond rows, then uncond rows) keeps its own features
            if ls is not None:
                ls[:, at] = split_cfg(logits, self.params)
            cv, ci = qf.topk(k, dim=-1)
            lo = k + (d - 1) * k * k
            new = torch.arange(lo, lo + k * k, device=dev)
            tok[:, new] = ci.flatten(1)
            par[:, new] = front.repeat_interleave(k, dim=1)
            score[:, new] = (score.gather(1, front)[..., None] + cv.log()).flatten(1)
            layer[new] = d + 1
            anc[rows, new + 1] = anc[rows, par[:, new] + 1]
            anc[:, new + 1, new + 1] = True
            front = new[score[:, new].topk(k, dim=-1).indices]
        # EAGLE-2 rerank: keep the total_tokens − 1 best by cumulative log q (stable: parents, stored
        # earlier with a score ≥ their children's, win ties, so the selection is ancestor-closed),
        # then lay them out in storage (= breadth-first) order.
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, : spec.size]
        keep = torch.sort(order, dim=-1).values
        new_index = torch.zeros(b, cap, dtype=torch.long, device=dev)
        new_index.scatter_(1, keep, torch.arange(1, spec.size + 1, device=dev).expand(b, -1))
        kept_par = par.gather(1, keep)
        parent = torch.cat([torch.full((b, 1), -1, device=dev),
                            torch.where(kept_par >= 0, new_index.gather(1, kept_par.clamp_min(0)), torch.zeros_like(kept_par))], 1)
        tokens = torch.cat([root_tok[:, None], tok.gather(1, keep)], 1)
        depth = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=dev), layer[keep]], 1)
        pick = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=dev), keep + 1], 1)  # root, then kept
        kept_slot = slot.gather(1, pick)[..., None]
        q = qs.gather(1, kept_slot.expand(-1, -1, v))
        outputs = None
        if ls is not None:
            outputs = DrafterOutputs(logits=ls.gather(1, kept_slot.expand(-1, -1, v)),
                                     hidden=hs[:b].gather(1, kept_slot.expand(-1, -1, hs.shape[-1])),
                                     ran=kept_slot[..., 0] < spare)
        # The kept nodes' rows and columns of the drafting ancestor mask (row/col 0 = root).
        ancestors = anc.gather(1, pick[..., None].expand(-1, -1, cap + 1)).gather(2, pick[:, None].expand(-1, spec.size + 1, -1))
        return DraftTree(tokens=tokens, parent=parent, depth=depth, children=_children_from_parent(parent, k),
                         q=q, sampled=False, drafter=outputs, ancestors=ancestors, distinct_siblings=True)

    def _static_buffers(self, rnd: _Round) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A static tree's tokens and validity flags [rows, T+1], drafter laws [rows, T+1, V] and
        features [stream rows, T+1, D]: allocated at the first round of a decode, then reused (the
        live rows' views). Every round writes the root and all drafted and expanded nodes; what it
        never writes keeps its initial value: zero laws and features at the leaves, true flags of
        lone children."""
        b, v = rnd.q_root.shape
        if self.draft_buffers is None:
            n1, dev = self.tree.size + 1, self.device
            h = rnd.h_root
            self.draft_buffers = (torch.zeros(b, n1, dtype=torch.long, device=dev),
                                  torch.ones(b, n1, dtype=torch.bool, device=dev),
                                  torch.zeros(b, n1, v, dtype=torch.float64, device=dev),
                                  torch.zeros(h.shape[0], n1, h.shape[-1], dtype=h.dtype, device=dev))
        tokens, valid, q, h = self.draft_buffers
        return tokens[:b], valid[:b], q[:b], h[: rnd.h_root.shape[0]]

    # ------------------------------------------------------------------ round phases
    def _setup(self, cond: torch.Tensor, probe: bool = False) -> torch.Tensor:
        """Allocate both caches for ``cond`` [B] and return the condition streams ([cond; null] with CFG);
        ``probe`` reserves the probe slots (``_probe``) whatever the drift recorder."""
        target, drafter = self.target, self.drafter
        cfg = target.config
        self.cls, self.n_tokens = cfg.cls_token_num, cfg.block_size
        self.max_pos = cfg.cls_token_num + cfg.block_size - 1
        # Drafter scratch: one slot per drafted node (static) or per stored candidate (dynamic), + trash.
        scratch = self.tree.size if isinstance(self.tree, StaticTree) else self.tree.candidates
        # Drift recording of a draw-dependent rule on a sampled tree probes hypothetical children in
        # slots of their own, after the tree's (no real query ever sees them).
        probing = probe or (self.drift is not None and self.rule.draw_dependent and isinstance(self.tree, StaticTree))
        self.probe_width = min(PROBE_CHUNK, cfg.vocab_size) if probing else 0
        self.drafter_probe = self.n_tokens + scratch
        self.drafter_slots = self.n_tokens + scratch + self.probe_width + 1
        self.drafter_keys = torch.arange(self.drafter_slots, device=self.device)
        self.draft_buffers = None
        if isinstance(self.tree, StaticTree):
            self._prepare_static()
        streams = with_null_condition(target, cond.to(self.device), self.params)
        self.t_slots = self.cls + self.n_tokens + self.tree.size + self.probe_width
        self.target_probe = self.t_slots - self.probe_width
        # 0, 1, 2, …: every per-round index range is a slice of it (a view, not a new tensor).
        self.iota = torch.arange(max(self.t_slots, streams.shape[0]), device=self.device)
        self.t_keys = self.iota[: self.t_slots]
        # A chain's accepted path is nodes 1..a, already in consecutive slots: nothing to compact.
        self.chain = isinstance(self.tree, StaticTree) and self.tree.size == self.tree.depth
        target.setup_cache(streams.shape[0], self.t_slots, device=self.device)
        drafter.setup_cache(streams.shape[0], self.drafter_slots, device=self.device)
        if hasattr(drafter, "begin"):
            drafter.begin(streams)
        self.layers = getattr(drafter, "needs_layers", False)
        return streams

    def _prefill(self, streams: torch.Tensor, rows: torch.Tensor | None = None):
        """Target forward over the condition tokens (of cache ``rows``, default all); its last output
        gives p_0 and H_0."""
        pos = torch.arange(self.cls, device=self.device)
        return self._target_forward(self.target.embed_cond, streams, positions=pos, slots=pos,
                                    attn_mask=causal_mask(0, self.cls, self.t_slots, self.device), return_hidden=True,
                                    return_layers=self.layers, rows=rows)

    def _refill(self, cond: torch.Tensor, rows: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Start the images ``cond`` [k] in batch rows ``rows`` [k]: prefill their condition into those
        rows of both caches; return their first token and the drafter's input feature for it."""
        streams = with_null_condition(self.target, cond, self.params)
        stream_rows = self._rep_rows(rows)
        out = self._prefill(streams, stream_rows)
        if hasattr(self.drafter, "begin"):
            self.drafter.begin(streams, rows=stream_rows)
        first = sample_from_law(self._law(out.logits[:, -1]), generator)
        return first, self._features(out, slice(-1, None))[:, 0]

    def _rep_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Stream rows of batch rows ``rows``: [rows; rows + live] with CFG."""
        return torch.cat([rows + i * self.live for i in range(self.reps)]) if self.reps > 1 else rows

    def _condition_padding(self, valid: torch.Tensor | None, images: torch.Tensor) -> None:
        """Hide the padded condition slots of the images in the batch (t2i captions, prompts)."""
        if valid is not None:
            self.target.set_condition_mask(self._rep(valid[images].to(self.device)))

    def _catch_up(self, feats: torch.Tensor, tokens: torch.Tensor, m: torch.Tensor, pend_len: torch.Tensor) -> _Round:
        """Drafter forward over the ``pend_len`` tokens committed last, from real target features."""
        n = self.n_tokens
        trash = self.drafter_slots - 1
        width = feats.shape[1]
        steps = self.iota[:width]
        j = (m - pend_len)[:, None] + steps
        ok = steps < pend_len[:, None]
        slots = torch.where(ok, j, trash)
        keys = self.drafter_keys
        # Committed tokens see every committed slot up to their own; padding sees only the trash slot.
        mask = ((keys <= j[..., None]) & ok[..., None]) | (keys == slots[..., None])
        logits, h = self._drafter_step(feats, tokens.gather(1, j.clamp(0, n - 1)), (self.cls + j).clamp(max=self.max_pos),
                                       slots, mask)
        # Each stream row's last committed token, at flat index row·width + its last step.
        last = self.iota[: feats.shape[0]] * width + self._rep((pend_len - 1).clamp_min(0))
        root_logits = logits.flatten(0, 1).index_select(0, last)
        return _Round(q_root=self._law(root_logits), h_root=h.flatten(0, 1).index_select(0, last), logits_root=root_logits)

    def _verify(self, tree: DraftTree, m: torch.Tensor, *, lazy_laws: bool = True):
        """One target forward over root + drafted nodes (tree attention, depth-based positions); the
        target laws as a tensor, or as ``NodeLaws`` (computed where the walk reads) when ``lazy_laws``."""
        b, n1 = tree.tokens.shape
        base = self.cls + m - 1
        t_pos = (base[:, None] + tree.depth).clamp(max=self.max_pos)
        t_slot = base[:, None] + self.iota[:n1]
        t_mask = self.t_keys[None, None].expand(b, n1, self.t_slots) < base[:, None, None]
        t_mask = t_mask.scatter(2, t_slot[:, None].expand(b, n1, n1), tree.ancestor_mask())
        out = self._target_forward(self.target.embed_tokens, self._rep(tree.tokens), positions=self._rep(t_pos),
                                   slots=self._rep(t_slot), attn_mask=self._rep(t_mask), return_hidden=True,
                                   return_layers=self.layers)
        # The walk reads ≤ depth + 1 nodes per row: on trees wider than a chain, compute p only there.
        # Context-aware rules read every node's law.
        lazy = lazy_laws and not self.rule.needs_tree and not self.chain
        p = NodeLaws(out.logits, self.params) if lazy else self._law(out.logits)
        view = prepared = None
        if self.rule.needs_tree:
            drafted = tree.drafter if self.rule.reads_drafter else None
            view = TreeView(tree=tree, p=p, target_logits=split_cfg(out.logits, self.params),
                            target_hidden=out.hidden[:b], drafter_logits=drafted and drafted.logits,
                            drafter_hidden=drafted and drafted.hidden, drafter_ran=drafted and drafted.ran,
                            params=self.params)
            prepared = self.rule.prepare(view)
        return out, p, view, prepared

    def _draft(self, rnd: _Round, root_tok: torch.Tensor, m: torch.Tensor, generator, forced=None) -> DraftTree:
        if isinstance(self.tree, StaticTree):
            return self._draft_static(rnd, root_tok, m, generator, forced)
        return self._draft_dynamic(rnd, root_tok, m)

    @torch.no_grad()
    def round_at(self, cond: torch.Tensor, prefix: torch.Tensor, *, forced: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[DraftTree, torch.Tensor, TreeView | None, object]:
        """The draft tree, target laws and rule view of the round that starts after ``prefix`` [B, m ≥ 1].

        For analysis (exact laws on toy bundles): the same phases as ``decode``, with the committed
        prefix teacher-forced. ``forced`` [B, T+1] fixes a static tree's drafted tokens instead of
        sampling them (−1 = the child was not drawn).
        """
        streams = self._setup(cond)
        b, m_len = prefix.shape
        prefix = prefix.to(self.device)
        out = self._prefill(streams)
        feats = self.drafter.target_features(out)[:, -1:]
        if m_len > 1:
            pos = self.cls + torch.arange(m_len - 1, device=self.device)
            out = self.target.step(self.target.embed_tokens(self._rep(prefix[:, :-1])), positions=pos, slots=pos,
                                   attn_mask=causal_mask(self.cls, m_len - 1, self.t_slots, self.device),
                                   return_hidden=True, return_layers=self.layers)
            feats = torch.cat([feats, self.drafter.target_features(out)], 1)
        m = torch.full((b,), m_len, dtype=torch.long, device=self.device)
        if self.jacobi is not None:  # the window the caller set (``JacobiDrafting.start`` or a state of its own)
            tree = self.jacobi.draft(prefix[:, -1], self.static_anc.expand(b, -1, -1))
        else:
            tree = self._draft(self._catch_up(feats, prefix, m, m), prefix[:, -1], m, generator, forced)
        _, p, view, prepared = self._verify(tree, m, lazy_laws=False)
        return tree, p, view, prepared

    @torch.no_grad()
    def rounds_along(self, cond: torch.Tensor, tokens: torch.Tensor, image: torch.Tensor, m: torch.Tensor, *,
                     forced: torch.Tensor | None = None, probe: bool = False
                     ) -> tuple[DraftTree, torch.Tensor, TreeView | None, object]:
        """``round_at`` for many rounds along given sequences ``tokens`` [K, L] (conditions ``cond`` [K]): row
        i is the round that starts after m[i] committed tokens of sequence image[i]. The target's
        teacher-forced pass and the drafter's catch-up run once per sequence, and both caches copy each
        sequence's row to its rounds' rows (committed entries do not depend on where rounds started:
        decode computes them from the same real target features); row i then drafts and verifies as
        decode does after m[i] tokens. ``forced`` [R, T+1] as in ``round_at``; ``probe`` keeps the
        probe slots, so ``_probe`` can follow.
        """
        k, length = tokens.shape
        r = m.numel()
        m, image, tokens = m.to(self.device), image.to(self.device), tokens.to(self.device)
        streams = self._setup(cond[image], probe)
        self.live = r
        first = self._rep_rows(self.iota[:k])  # the sequences' stream rows, before the copies
        out = self._prefill(with_null_condition(self.target, cond.to(self.device), self.params), first)
        feats = self.drafter.target_features(out)[:, -1:]
        pos = self.cls + self.iota[: length - 1]
        if length > 1:
            out = self.target.step(self.target.embed_tokens(self._rep(tokens[:, :-1])), positions=pos, slots=pos,
                                   attn_mask=causal_mask(self.cls, length - 1, self.t_slots, self.device),
                                   return_hidden=True, return_layers=self.layers, rows=first)
            feats = torch.cat([feats, self.drafter.target_features(out)], 1)
        steps = self.iota[:length]
        mask = (self.drafter_keys[None] <= steps[:, None]).expand(len(first), -1, -1)
        logits, h = self._timed("drafter", self.drafter.step, feats, self._rep(tokens),
                                positions=(self.cls + steps).clamp(max=self.max_pos), slots=steps, attn_mask=mask,
                                rows=first)
        source = torch.cat([image + i * k for i in range(self.reps)])  # each row's sequence, per stream
        copies = first[source]
        self.target.select_rows(copies)
        self.drafter.select_rows(copies)
        at = self._rep(m - 1)
        root_logits = logits[source, at]
        rnd = _Round(q_root=self._law(root_logits), h_root=h[source, at], logits_root=root_logits)
        tree = self._draft(rnd, tokens[image, m - 1], m, None, forced)
        _, p, view, prepared = self._verify(tree, m, lazy_laws=False)
        return tree, p, view, prepared

    # ------------------------------------------------------------------ decode
    @inference_decode
    def decode(self, cond: torch.Tensor, generator: torch.Generator | None = None, *, max_rows: int | None = None,
               valid: torch.Tensor | None = None, progress: Callable[[int, int], None] | None = None) -> DecodeResult:
        """Generate the full token grid for each condition in ``cond`` ([B] labels), at most ``max_rows``
        images at a time (default all; see the module docstring). ``valid`` [B, cls] marks real condition
        slots where conditions are padded. ``progress(tokens_done, tokens_total)`` is called after each round."""
        self.stats = RoundStats()
        total = cond.shape[0]
        b = total if max_rows is None else min(max_rows, total)
        cond = cond.to(self.device)
        valid = None if valid is None or bool(valid.all()) else valid
        images = torch.arange(b, device=self.device)  # the image each row decodes
        self._condition_padding(valid, images)
        try:
            return self._decode(cond, images, generator, valid, progress)
        finally:
            if valid is not None:
                self.target.set_condition_mask(None)

    def _decode(self, cond: torch.Tensor, images: torch.Tensor, generator, valid: torch.Tensor | None,
                progress: Callable[[int, int], None] | None) -> DecodeResult:
        start = time.perf_counter()
        b, total = images.numel(), cond.shape[0]
        streams = self._setup(cond[:b])
        n, dev = self.n_tokens, self.device
        out = self._prefill(streams)
        result = torch.zeros(total, n, dtype=torch.long, device=dev)
        # Rows of the images still decoding, with room for a round's writes past the grid.
        tokens = torch.zeros(b, n + self.tree.depth + 1, dtype=torch.long, device=dev)
        tokens[:, 0] = sample_from_law(self._law(out.logits[:, -1]), generator)
        feats = self._features(out, slice(-1, None))
        m = torch.ones(b, dtype=torch.long, device=dev)
        pend_len = torch.ones(b, dtype=torch.long, device=dev)
        if self.jacobi is not None:
            self.jacobi.start(b, generator)
        queued = b  # the next image to start
        while images.numel():
            round_start = time.perf_counter()
            self.stats.begin_round()
            self.live = live = images.numel()
            # 1. Drafter catch-up; 2. draft tree (or the Jacobi window); 3. one target forward over the tree.
            root = tokens[self.iota[:live], m - 1]
            if self.jacobi is None:
                tree = self._draft(self._catch_up(feats, tokens, m, pend_len), root, m, generator)
            else:
                tree = self.jacobi.draft(root, self.static_anc.expand(live, -1, -1))
            out, p, view, prepared = self._verify(tree, m, lazy_laws=self.jacobi is None)
            # 4. Walk the tree with the acceptance rule; rows near the end cannot accept past the grid.
            visit = None if self.drift is None else partial(self._record_drift, tree=tree, p=p, m=m, images=images,
                                                            view=view, prepared=prepared)
            if self.jacobi is not None and self.jacobi.verifies:  # SJD-PAC's reference code (strict only)
                walk = self.jacobi.verify(tree, p, generator, n - 1 - m)
            else:
                walk = walk_tree(self.rule, tree, p, generator=generator, max_accept=n - 1 - m, view=view,
                                 prepared=prepared, visit=visit)
            a = walk.accepted
            # 5. Commit accepted tokens + bonus, compact the target cache, queue features for the drafter.
            feats = self._commit(tokens, tree, walk, m, out)
            if self.jacobi is not None:  # the columns past the commit are redrafted from this forward's laws
                self.jacobi.advance(tree, walk, p, generator)
            m, pend_len = m + a + 1, a + 1
            done = m >= n
            if any(done.tolist()):  # 6. finished images hand their rows to queued ones, or leave the batch
                result[images[done]] = tokens[done, :n]
                rows = done.nonzero().squeeze(-1)[: total - queued]
                if rows.numel():
                    new = torch.arange(queued, queued + rows.numel(), device=dev)
                    queued += rows.numel()
                    images = images.index_put((rows,), new)
                    self._condition_padding(valid, images)
                    first, feat = self._refill(cond[new], rows, generator)
                    if self.jacobi is not None:
                        self.jacobi.restart(rows, generator)
                    tokens[rows] = 0
                    tokens[rows, 0] = first
                    m[rows], pend_len[rows], done[rows] = 1, 1, False
                    feats[self._rep_rows(rows), 0] = feat
            if any(done.tolist()):
                keep = (~done).nonzero().squeeze(-1)
                images, tokens, m, pend_len = images[keep], tokens[keep], m[keep], pend_len[keep]
                stream_rows = self._rep_rows(keep)
                feats = feats[stream_rows]
                self.target.select_rows(stream_rows)
                self.drafter.select_rows(stream_rows)
                if self.jacobi is not None:
                    self.jacobi.select_rows(keep)
            self.stats.record_round(a, time.perf_counter() - round_start, computed_rows=live)
            if progress is not None:  # finished images' tokens plus the live rows' committed ones
                progress((queued - images.numel()) * n + int(m.clamp(max=n).sum()), total * n)
        seconds = time.perf_counter() - start
        stats = self.stats.summary(seconds=seconds, batch=b, tokens_per_image=n, images=total)
        arrays = {}
        if self.drift is not None:
            stats |= self.drift.summary()
            arrays = self.drift.arrays()
        return DecodeResult(tokens=result, stats=stats, arrays=arrays)

    def _commit(self, tokens, tree: DraftTree, walk, m: torch.Tensor, out):
        """Write accepted tokens + bonus into ``tokens`` (in place), move the accepted path's KV entries
        into consecutive slots (no recompute) and return the drafter's next input features."""
        a = walk.accepted
        width = int(a.max()) + 1
        steps = self.iota[:width]
        path = walk.path[:, :width].clamp_min(0)
        path_tok = tree.tokens.gather(1, path)
        new_tok = torch.where(steps == a[:, None], walk.bonus[:, None], path_tok.roll(-1, 1))
        # Positions m..m+a get the accepted tokens and the bonus; the writes past m+a land on
        # positions the next round writes again (``tokens`` has room past the grid).
        tokens.scatter_(1, m[:, None] + steps, new_tok)
        # Accepted node k of the path sits at slot base + node; it belongs at base + k. Chains (and
        # any path through nodes 1..a) are already in place.
        k_steps = steps[1:]
        moving = None if self.chain else (k_steps <= a[:, None]) & (path[:, 1:] != k_steps)
        if moving is not None and bool(moving.any()):
            base = (self.cls + m - 1)[:, None]
            noop = torch.full_like(moving, self.t_slots - 1, dtype=torch.long)
            self.target.copy_cache(self._rep(torch.where(moving, base + path[:, 1:], noop)),
                                   self._rep(torch.where(moving, base + k_steps[None], noop)))
        return self._features(out, self._rep(path))

    def _features(self, out: GPTOutput, pick: torch.Tensor | slice) -> torch.Tensor:
        """The drafter's input features at target outputs ``pick`` (per stream row [rows, K], or a slice),
        selected before the drafter builds them (EAGLE-3 fuses layers: a drafter forward, timed as one)."""
        if isinstance(pick, slice):
            take = lambda x: x[:, pick]
        else:
            take = lambda x: x.gather(1, pick[..., None].expand(-1, -1, x.shape[-1]))
        sel = GPTOutput(logits=out.logits, hidden=None if out.hidden is None else take(out.hidden),
                        layers=None if out.layers is None else [take(x) for x in out.layers])
        return self._timed("drafter", self.drafter.target_features, sel, forwards=0)

    def _record_drift(self, rows: torch.Tensor, nodes: torch.Tensor, ctx, *, tree: DraftTree, p: torch.Tensor,
                      m: torch.Tensor, images: torch.Tensor, view: TreeView | None, prepared) -> None:
        """Drift of the verified nodes: the token a node at depth d emits lands at position m + d − 1."""
        every = torch.arange(p.shape[0], device=p.device)
        draws = None
        if self.probe_width:
            draws = DrawSignals(prepared=prepared, view=view, nodes=nodes, probe=partial(self._probe, tree=tree, m=m))
        mixture = None if self.jacobi is None else self.jacobi.draft_laws(nodes)
        self.drift.visit(rows, m + ctx.depth - 1, p[every, nodes], tree.q[every, nodes], tree.sampled, ctx,
                         images=images, draws=draws, mixture=mixture)

    @torch.no_grad()
    def _probe(self, row: int, node: int, tokens: torch.Tensor, *, tree: DraftTree, m: torch.Tensor,
               drafter: bool = True) -> ProbeOutputs:
        """The target's (and, with ``drafter``, the drafter's) outputs at hypothetical children ``tokens`` [K]
        of ``node`` in batch row ``row``, computed as the verify and drafting forwards would have
        (positions, ancestors, cached prefix), ``probe_width`` at a time in the probe slots; nothing real
        is overwritten."""
        dev, c = self.device, self.probe_width
        stream_rows = self._rep_rows(torch.tensor([row], device=dev))
        depth = int(tree.depth[row, node])
        base = int(self.cls + m[row] - 1)
        pos = min(base + depth + 1, self.max_pos)
        anc = tree.ancestor_mask()[row, node].nonzero().flatten()  # ancestors-or-self of the node
        seen = self.t_keys < base
        seen[base + anc] = True
        drafted = None if not (drafter and self.rule.reads_drafter) or depth + 1 >= self.tree.depth else anc[anc > 0]
        parts: list[list] = []
        for lo in range(0, tokens.numel(), c):
            chunk = tokens[lo : lo + c].to(dev)
            k = chunk.numel()
            own = torch.arange(k, device=dev)
            slots = self.target_probe + own
            mask = seen.expand(k, -1).clone()
            mask[own, slots] = True
            out = self.target.step(self.target.embed_tokens(self._rep(chunk[None])),
                                   positions=torch.full((k,), pos, device=dev), slots=slots,
                                   attn_mask=self._rep(mask[None]), return_hidden=True, rows=stream_rows)
            logits = split_cfg(out.logits, self.params)[0]
            part = [logits, out.hidden[0], self._law(out.logits)[0], None, None]
            if drafted is not None:  # the drafter's step for node x: its parent's feature and x's token
                dslots = self.drafter_probe + own
                dmask = (self.drafter_keys < m[row]).expand(k, -1).clone()
                dmask[:, self.n_tokens + drafted - 1] = True
                dmask[own, dslots] = True
                h = self.draft_buffers[3][stream_rows, node][:, None].expand(-1, k, -1)
                d_logits, d_hidden = self.drafter.step(h, self._rep(chunk[None]), positions=torch.full((k,), pos, device=dev),
                                                       slots=dslots, attn_mask=self._rep(dmask[None]), rows=stream_rows)
                part[3:] = [split_cfg(d_logits, self.params)[0], d_hidden[0]]
            parts.append(part)
        cat = [None if parts[0][i] is None else torch.cat([pt[i] for pt in parts]) for i in range(5)]
        return ProbeOutputs(target_logits=cat[0], target_hidden=cat[1], p=cat[2], drafter_logits=cat[3],
                            drafter_hidden=cat[4])

    def _prepare_static(self) -> None:
        tree: StaticTree = self.tree
        dev = self.device
        self.static_parent = tree.parent.to(dev)
        self.static_depth = tree.node_depth.to(dev)
        self.static_children = tree.children.to(dev)
        rank = torch.tensor([0] + [p[-1] for p in tree.paths], device=dev)
        one = DraftTree(tokens=torch.zeros(1, tree.size + 1, dtype=torch.long), parent=tree.parent[None],
                        depth=tree.node_depth[None], children=tree.children[None], q=torch.zeros(1, 1, 1), sampled=True)
        self.static_anc = one.ancestor_mask().to(dev)
        self.static_levels = []
        levels = [torch.nonzero(self.static_depth == d).squeeze(-1) for d in range(1, tree.depth + 1)]
        self.static_ran = torch.zeros(tree.size + 1, dtype=torch.bool, device=dev)
        above = torch.zeros(1, dtype=torch.long, device=dev)  # the nodes the drafter expanded one level up
        self.static_ran[above] = True
        for d, nodes in enumerate(levels, start=1):
            parent = self.static_parent[nodes]
            uniq, where = torch.unique(parent, return_inverse=True)
            kmax = int(rank[nodes].max()) + 1
            # The drafter expands the nodes whose children are drafted; rules that read the drafter's
            # outputs across the tree (``reads_drafter``) get them at every node above the last level.
            if d == tree.depth:
                expand = nodes[:0]
            else:
                expand = nodes if self.rule.reads_drafter else torch.unique(self.static_parent[levels[d]])
            self.static_ran[expand] = True
            # Drafted node i (i ≥ 1) writes drafter scratch slot n_tokens + i − 1 (the root is committed).
            scratch = torch.zeros(len(expand), self.drafter_slots, dtype=torch.bool, device=dev)
            scratch[:, self.n_tokens : self.n_tokens + tree.size] = self.static_anc[0, expand, 1:]
            self.static_levels.append(_Level(
                nodes=_as_slice(nodes), parent=_as_slice(parent), kmax=kmax, pick=_as_slice(where * kmax + rank[nodes]),
                uniq_at=_as_slice(torch.searchsorted(above, uniq)), expand=_as_slice(expand),
                expand_parent=_as_slice(self.static_parent[expand]), slots=self.n_tokens + expand - 1, scratch=scratch))
            above = expand


def _outputs(root: torch.Tensor, spare: int) -> torch.Tensor:
    """[rows, spare + 1, ...] storage for a dynamic tree's drafter outputs: the root's in slot 0,
    zeros in slot ``spare``, the expansion slots in between written as the tree grows."""
    out = root.new_empty(root.shape[0], spare + 1, *root.shape[1:])
    out[:, 0], out[:, spare] = root, 0
    return out


def _take(x: torch.Tensor, index: torch.Tensor | slice) -> torch.Tensor:
    """``x[:, index]``: a view for a slice, ``index_select`` (cheaper than advanced indexing) otherwise."""
    return x[:, index] if isinstance(index, slice) else x.index_select(1, index)


def _as_slice(index: torch.Tensor) -> torch.Tensor | slice:
    """``index`` as a slice when it is a run of consecutive integers (or empty), else unchanged."""
    if not len(index):
        return slice(0, 0)
    lo = int(index[0])
    return slice(lo, lo + len(index)) if torch.equal(index.cpu(), torch.arange(lo, lo + len(index))) else index


def _children_from_parent(parent: torch.Tensor, width: int) -> torch.Tensor:
    """[B, T+1, width] children lists (in node order, −1 padded) from a per-row parent array."""
    b, n1 = parent.shape
    onehot = torch.nn.functional.one_hot(parent[:, 1:].clamp_min(0), n1) & (parent[:, 1:] >= 0)[..., None]
    rank = (onehot.cumsum(1) * onehot).sum(-1) - 1  # sibling rank of each node
    children = torch.full((b, n1, width), -1, dtype=torch.long, device=parent.device)
    nodes = torch.arange(1, n1, device=parent.device).expand(b, -1)
    children[torch.arange(b, device=parent.device)[:, None], parent[:, 1:].clamp_min(0), rank] = nodes
    return children
