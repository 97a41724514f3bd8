"""SJD-PAC as its public code verifies and redrafts (``jacobi='sjd-pac'``, ``jacobi_code='reference-code'``).

KangJialiang/SJD-PAC 4fbc099, ``scheduler/sjd_pac_iteration_lumina_mgpt.py``, ``SJDPACSpeculativeSampler``
(L134–222), read in ../shared/jacobi_family.md §4.3–4.7. It keeps the code's three departures from
exactness:

1. **Longest row.** Every node is tested once, independently (one coin per node, L167–168), with strict's
   test p_b(x) > u·q_b(x) against its sibling group's recursive residual target p_b and the q_b without the
   earlier siblings' tokens (L152–165); the row with the longest accepted prefix is committed, ties to the
   lowest row (L171–175), instead of the first accepted sibling per depth.
2. **Uniform bonus.** A fully accepted main path draws the new root from the uniform pad (L199–208).
3. **Residual siblings.** Past the commit, a column whose draft passed keeps it as branch 0 and fills the
   other branches with draws without replacement from that test's residual; a failed column draws all W
   from the residual (the last sibling's fully recursed one in tree columns, L185–214). Each is recorded
   with q := the column's stale p (L216–220), which the siblings are not drawn from.

The committed row's columns are read below the last accepted node along first children (the lowest row);
past the tree depth D the code reads row 0's chain (L181–183) and a shorter row's column D is its pad,
q = 0, whose residual is p (L196). A row at its accept limit (the grid's end; the code has none) draws
its bonus from p, as the pad does. Where the code would divide 0 by 0 (no q mass left for a sibling, an
empty residual) q_b is 0 and a residual falls back to p. Strict verification only: the rule interface
walks a tree, and this code does not walk.
"""

from __future__ import annotations

import torch

from cascade_sd.acceptance.base import normalise
from cascade_sd.decoding.processing import draw_without_replacement, sample_from_law
from cascade_sd.decoding.tree import DraftTree, StaticTree
from cascade_sd.decoding.verify import WalkResult

#: A row's node "at" depth D below a shorter row's leaf: its pad column (q = 0, so its residual is p).
PAD = -2


class PacReference:
    """The reference code's verification and redraft on one window shape (module docstring)."""

    def __init__(self, shape: StaticTree, tree_depth: int, device: torch.device) -> None:
        self.device = device
        parent, depth = shape.parent.tolist(), shape.node_depth.tolist()
        kids = [[k for k in row if k >= 0] for row in shape.children.tolist()]
        self.max_depth = shape.depth
        main = [0]
        while kids[main[-1]]:
            main.append(kids[main[-1]][0])
        self.chain_end = main[-1]
        # below[n][e]: the committed row's node at depth e when n is the last accepted node (module docstring).
        below = []
        for n in range(len(parent)):
            row, cur = [-1] * (self.max_depth + 2), n
            while cur >= 0:
                row[depth[cur]], cur = cur, parent[cur]
            cur = n
            for e in range(depth[n] + 1, self.max_depth + 2):
                if cur >= 0 and kids[cur]:
                    cur = kids[cur][0]
                elif cur >= 0 and cur not in main and e == tree_depth:
                    cur = PAD
                else:
                    cur = main[e] if e < len(main) else -1
                row[e] = cur
            below.append(row)
        self.below = torch.tensor(below, device=device)
        self.main_at_tree_depth = main[tree_depth]  # past a shorter row's pad, row 0's chain (L181–183)
        self.parent, self.depth, self.kids = parent, torch.tensor(depth, device=device), kids
        #: Parents with one child (the chain, W = 1 columns) are tested at once; sibling groups one by one.
        only = [n for n, k in enumerate(kids) if len(k) == 1]
        self.only_parent = torch.tensor(only, dtype=torch.long, device=device)
        self.only_child = torch.tensor([kids[n][0] for n in only], dtype=torch.long, device=device)
        self.groups = [(n, k) for n, k in enumerate(kids) if len(k) > 1]

    def verify(self, tree: DraftTree, p: torch.Tensor, generator: torch.Generator | None,
               max_accept: torch.Tensor | None) -> WalkResult:
        """Test every node, commit the longest accepted row and draw its new root (departures 1, 2)."""
        b, n1, vocab = p.shape
        rows = torch.arange(b, device=self.device)
        coins = torch.rand(b, n1, dtype=p.dtype, device=self.device, generator=generator)  # one per node
        passed = torch.zeros(b, n1, dtype=torch.bool, device=self.device)
        last_res = torch.zeros_like(p)  # per parent: the residual after its last sibling's test
        if self.only_parent.numel():  # a lone child: p_0 = p, q_0 = q (no earlier sibling)
            par, kid = self.only_parent, self.only_child
            p_n, q_n = p.index_select(1, par), tree.q.index_select(1, par)
            x = tree.tokens.index_select(1, kid)[..., None]
            there = tree.children[:, par, 0] >= 0
            passed[:, kid] = there & (p_n.gather(-1, x).squeeze(-1) > coins[:, kid] * q_n.gather(-1, x).squeeze(-1))
            last_res[:, par] = torch.where(there[..., None], (p_n - q_n).clamp_min(0.0), 0.0)
        for n, kids in self.groups:
            p_b, q_n = p[:, n], tree.q[:, n]
            removed = torch.zeros(b, vocab, dtype=torch.bool, device=self.device)
            for rank, k in enumerate(kids):
                there = tree.children[:, n, rank] >= 0
                x = tree.tokens[:, k]
                q_b = normalise(q_n.masked_fill(removed, 0.0), torch.zeros_like(q_n))
                px, qx = p_b[rows, x], q_b[rows, x]
                passed[:, k] = there & (px > coins[:, k] * qx)
                res = (p_b - q_b).clamp_min(0.0)
                last_res[:, n] = torch.where(there[:, None], res, last_res[:, n])
                p_b = torch.where(there[:, None], normalise(res, p_b), p_b)
                removed[rows, x] = removed[rows, x] | there
        ok = passed.clone()
        ok[:, 0] = True
        if max_accept is not None:  # a row accepts no node past its limit
            ok &= self.depth[None] <= max_accept[:, None]
        for n in range(1, n1):  # parents precede children
            ok[:, n] &= ok[:, self.parent[n]]
        index = torch.arange(n1, device=self.device)
        score = torch.where(ok, self.depth[None] * n1 + (n1 - 1 - index)[None], -1)
        last = score.argmax(1)  # the deepest accepted node, lexicographically lowest among equals
        a = self.depth[last]
        capped = a >= max_accept if max_accept is not None else torch.zeros_like(a, dtype=torch.bool)
        p_last = p[rows, last]
        uniform = torch.full_like(p_last, 1.0 / vocab)
        has_kids = tree.children[rows, last, 0] >= 0
        law = torch.where(has_kids[:, None], normalise(last_res[rows, last], p_last),
                          torch.where((last == self.chain_end)[:, None], uniform, p_last))
        law = torch.where(capped[:, None], p_last, law)
        path = self.below[last][:, : self.max_depth + 1]
        path = path.masked_fill(torch.arange(self.max_depth + 1, device=self.device)[None] > a[:, None], -1)
        self._passed, self._last_res = passed, last_res
        return WalkResult(path=path, accepted=a, bonus=sample_from_law(law, generator), last_node=last)

    def advance(self, tree: DraftTree, walk: WalkResult, p: torch.Tensor, fresh, columns: int, width: int,
                tree_columns: int, generator: torch.Generator | None):
        """The next window's (candidates, exists, q) after ``verify``'s commit (departure 3); ``fresh(rows,
        cols, gen)`` gives the uniform columns past the old window."""
        b = p.shape[0]
        rows = torch.arange(b, device=self.device)[:, None]
        e = walk.accepted[:, None] + 2 + torch.arange(columns, device=self.device)[None]  # new column c's depth
        line = self.below[walk.last_node]  # [B, max_depth + 2]
        par = line.gather(1, (e - 1).clamp(max=self.max_depth + 1))
        par = par.masked_fill(par == PAD, self.main_at_tree_depth)
        x = torch.where(e <= self.max_depth + 1, line.gather(1, e.clamp(max=self.max_depth + 1)), -1)
        stale = (par >= 0) & (x != -1)
        pad = x == PAD
        par0, x0 = par.clamp_min(0), x.clamp_min(0)
        p_par, q_par = p[rows, par0], tree.q[rows, par0]
        kept = stale & ~pad & self._passed[rows, x0]
        own = normalise((p_par - q_par).clamp_min(0.0), p_par)  # a passed draft's own test residual
        failed = torch.where(pad[..., None], p_par, normalise(self._last_res[rows, par0], p_par))
        cand, exists, q = fresh(b, columns, generator)
        w_failed, ok_failed = draw_without_replacement(failed, width, generator)
        kept_cand, kept_ok = tree.tokens[rows, x0][..., None], torch.ones_like(ok_failed[..., :1])
        if width > 1:  # branches 1..W−1 beside a kept draft: draws from its own residual
            w_kept, ok_kept = draw_without_replacement(own, width - 1, generator)
            kept_cand, kept_ok = torch.cat([kept_cand, w_kept], -1), torch.cat([kept_ok, ok_kept], -1)
        new_cand = torch.where(kept[..., None], kept_cand, w_failed)
        new_ok = torch.where(kept[..., None], kept_ok, ok_failed)
        chain = torch.arange(columns, device=self.device)[None, :, None] >= tree_columns
        new_ok &= ~chain | (torch.arange(width, device=self.device) == 0)  # chain columns hold one draft
        cand = torch.where(stale[..., None], new_cand, cand)
        exists = torch.where(stale[..., None], new_ok, exists)
        q = torch.where(stale[..., None], p_par, q)
        return cand, exists, q
