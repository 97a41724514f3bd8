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

from cascade_sd.acceptance.base import AcceptanceRule, NodeContext, NodeState, TreeView
from cascade_sd.decoding.processing import sample_from_law
from cascade_sd.decoding.tree import DraftTree


@dataclass
class WalkResult:
    """Accepted node indices per row ([B, D+1], root first, −1 padded), counts, bonus token."""

    path: torch.Tensor
    accepted: torch.Tensor
    bonus: torch.Tensor
    last_node: torch.Tensor


def _where_state(cond: torch.Tensor, a: NodeState, b: NodeState) -> NodeState:
    c = cond.unsqueeze(-1)
    q = None if a.q is None else torch.where(c, a.q, b.q)
    return NodeState(p=torch.where(c, a.p, b.p), q=q)


def _draw(mask: torch.Tensor, law: torch.Tensor, out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Sample from ``law`` only for rows in ``mask``, writing into a copy of ``out``."""
    idx = mask.nonzero().squeeze(-1)
    out = out.clone()
    out[idx] = sample_from_law(law[idx], generator)
    return out


def walk_tree(
    rule: AcceptanceRule,
    tree: DraftTree,
    p: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    max_accept: torch.Tensor | None = None,
    view: TreeView | None = None,
    prepared: Any = None,
    visit: Callable[[torch.Tensor, torch.Tensor, NodeContext], None] | None = None,
) -> WalkResult:
    """Verify ``tree`` against target laws ``p`` [B, T+1, V] (float64); see module docstring.

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
    path = torch.full((batch, max_depth + 1), -1, dtype=torch.long, device=dev)
    path[:, 0] = 0
    bonus = torch.zeros(batch, dtype=torch.long, device=dev)
    width = tree.children.shape[-1]
    for depth in range(1, max_depth + 1):
        kids = tree.children[rows, cur]
        extras = rule.node_extras(prepared, view, cur, kids) if view is not None else {}
        ctx = NodeContext(depth=depth, n_candidates=(kids >= 0).sum(-1), extras=extras)
        walking = active & (kids[:, 0] >= 0) & (accepted < limit)
        # Rows at a leaf or at their limit emit the bonus token from the fresh node law.
        stop = active & ~walking
        if stop.any():
            fresh = rule.bonus_law(rule.start(p[rows, cur], tree.q[rows, cur], tree.sampled, ctx), ctx)
            bonus = _draw(stop, fresh, bonus, generator)
            active &= ~stop
        if not walking.any():
            break
        if visit is not None:
            visit(walking.nonzero().squeeze(-1), cur, ctx)
        state = rule.start(p[rows, cur], tree.q[rows, cur], tree.sampled, ctx)
        took = torch.zeros(batch, dtype=torch.bool, device=dev)
        pending = walking.clone()
        rejected = torch.zeros(batch, vocab, dtype=torch.bool, device=dev)
        for k in range(width):
            node = kids[:, k]
            x = tree.tokens[rows, node.clamp_min(0)]
            # DESIGN 4.1: a sibling equal to a rejected one is skipped.
            valid = pending & (node >= 0) & ~rejected[rows, x]
            if not valid.any():
                continue
            a = rule.accept_prob(state, x, ctx)
            coin = torch.rand(batch, generator=generator, dtype=a.dtype, device=dev)
            acc = valid & (coin < a)
            rej = valid & ~acc
            if acc.any():
                cur = torch.where(acc, node, cur)
                took |= acc
                pending &= ~acc
            if rej.any():  # only rejected rows need the rule's next residual
                state = _where_state(rej, rule.reject(state, x, ctx), state)
                rejected[rows, x] |= rej
            if not pending.any():
                break
        fail = walking & ~took
        if fail.any():
            bonus = _draw(fail, rule.bonus_law(state, ctx), bonus, generator)
            active &= ~fail
        accepted += took.long()
        path[:, depth] = torch.where(took, cur, path[:, depth])
    if active.any():
        ctx = NodeContext(depth=max_depth + 1)
        fresh = rule.bonus_law(rule.start(p[rows, cur], tree.q[rows, cur], tree.sampled, ctx), ctx)
        bonus = _draw(active, fresh, bonus, generator)
    return WalkResult(path=path, accepted=accepted, bonus=bonus, last_node=cur)
