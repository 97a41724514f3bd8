"""Walk a verified draft tree with an acceptance rule (DESIGN 3 "engine round", 4.1).

Pure function of the tree, the target laws at its nodes and a generator: from the root, try the
children of the current node in sibling order; an accepted child becomes the current node; when
every child is rejected (or at a leaf, or at the row's depth limit) the bonus token is drawn from
the rule's final law. Vectorised over the batch: every row walks its own tree at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from cascade_sd.acceptance.base import AcceptanceRule, NodeContext, TreeView
from cascade_sd.decoding.processing import NodeLaws, sample_from_law
from cascade_sd.decoding.tree import DraftTree


@dataclass
class WalkResult:
    """Accepted node indices per row ([B, D+1], root first, −1 padded), counts, bonus token."""

    path: torch.Tensor
    accepted: torch.Tensor
    bonus: torch.Tensor
    last_node: torch.Tensor


def _draw(mask: torch.Tensor, law: torch.Tensor, out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Sample from ``law`` only for rows in ``mask``, writing into a copy of ``out``."""
    if bool(mask.all()):  # the same draws as below, without the row selection
        return sample_from_law(law, generator)
    idx = mask.nonzero().squeeze(-1)
    out = out.clone()
    out[idx] = sample_from_law(law[idx], generator)
    return out


def walk_tree(
    rule: AcceptanceRule,
    tree: DraftTree,
    p: torch.Tensor | NodeLaws,
    *,
    generator: torch.Generator | None = None,
    max_accept: torch.Tensor | None = None,
    view: TreeView | None = None,
    prepared: Any = None,
    visit: Callable[[torch.Tensor, torch.Tensor, NodeContext], None] | None = None,
) -> WalkResult:
    """Verify ``tree`` against target laws ``p`` [B, T+1, V] (float64, or ``NodeLaws`` computing only the
    nodes read); see module docstring.

    ``max_accept`` [B] caps the accepted depth per row (rows near the end of the grid).
    Context-aware rules get ``view`` (the round's representations) and their ``prepared``
    signals; every node's context carries its depth, number of candidate children and the
    rule's ``node_extras``. ``visit(rows, nodes, ctx)`` is told of every node whose candidates
    are verified (drift recording).
    """
    batch, n_nodes, vocab = p.shape
    dev = p.device
    rows = torch.arange(batch, device=dev)
    max_depth = int(tree.depth.max())
    limit = max_accept if max_accept is not None else torch.full((batch,), max_depth, device=dev)
    cur = torch.zeros(batch, dtype=torch.long, device=dev)
    active = torch.ones(batch, dtype=torch.bool, device=dev)
    accepted = torch.zeros(batch, dtype=torch.long, device=dev)
    bonus = torch.zeros(batch, dtype=torch.long, device=dev)
    width = tree.children.shape[-1]
    n_kids = (tree.children >= 0).sum(-1)  # [B, T+1]
    visited = [cur]  # the current node after each depth
    for depth in range(1, max_depth + 1):
        kids = tree.children[rows, cur]
        kid_ok, kid_tok = kids >= 0, tree.tokens.gather(1, kids.clamp_min(0))  # [B, K]
        extras = rule.node_extras(prepared, view, cur, kids) if view is not None else {}
        ctx = NodeContext(depth=depth, n_candidates=n_kids[rows, cur], extras=extras)
        walking = active & kid_ok[:, 0] & (accepted < limit)
        state = rule.start(p[rows, cur], tree.q[rows, cur], tree.sampled, ctx)
        # Rows at a leaf or at their limit emit the bonus token from the fresh node law.
        stop = active & ~walking
        if stop.any():
            bonus = _draw(stop, rule.bonus_law(state, ctx), bonus, generator)
            active &= ~stop
        n_pending = int(walking.sum())  # rows still trying this node's children
        if not n_pending:
            break
        if visit is not None:
            visit(walking.nonzero().squeeze(-1), cur, ctx)
        pending = walking
        # DESIGN 4.1: a sibling equal to a rejected one is skipped (only siblings can repeat a token).
        track = width > 1 and not tree.distinct_siblings
        rejected = torch.zeros(batch, vocab, dtype=torch.bool, device=dev) if track else None
        for k in range(width):
            node, x = kids[:, k], kid_tok[:, k]
            valid, n_valid = pending, n_pending  # every walking row has a first child
            if k > 0:
                valid = pending & kid_ok[:, k]
                if rejected is not None:
                    valid &= ~rejected[rows, x]
                n_valid = int(valid.sum())
                if not n_valid:
                    continue
            a = rule.accept_prob(state, x, ctx)
            coin = torch.rand(batch, generator=generator, dtype=a.dtype, device=dev)
            acc = valid & (coin < a)
            cur = torch.where(acc, node, cur)
            missed = ~acc
            pending = pending & missed
            rej = valid & missed
            n_rej = int(rej.sum())
            n_pending -= n_valid - n_rej
            if n_rej == batch:
                state = rule.reject(state, x, ctx)
            elif n_rej:  # only rejected rows need the rule's next residual: compute it for them alone
                idx = rej.nonzero().squeeze(-1)
                state = state.put(idx, rule.reject(state.rows(idx), x[idx], ctx.rows(idx, batch)))
            if n_rej and rejected is not None:
                rejected[rows, x] |= rej
            if not n_pending:
                break
        # Rows still pending rejected every valid child: they emit the bonus from the last residual.
        if n_pending:
            bonus = _draw(pending, rule.bonus_law(state, ctx), bonus, generator)
            active &= ~pending
        accepted += walking & ~pending
        visited.append(cur)
    if active.any():
        ctx = NodeContext(depth=max_depth + 1)
        fresh = rule.bonus_law(rule.start(p[rows, cur], tree.q[rows, cur], tree.sampled, ctx), ctx)
        bonus = _draw(active, fresh, bonus, generator)
    visited += [cur] * (max_depth + 1 - len(visited))
    steps = torch.arange(max_depth + 1, device=dev)
    path = torch.stack(visited, 1).masked_fill_(steps[None] > accepted[:, None], -1)
    return WalkResult(path=path, accepted=accepted, bonus=bonus, last_node=cur)
