"""Walk a verified draft tree with an acceptance rule (DESIGN 3 "engine round", 4.1).

Pure function of the tree, the target laws at its nodes and a generator: from the root, try the
children of the current node in sibling order; an accepted child becomes the current node; when
every child is rejected (or at a leaf, or at the row's depth limit) the bonus token is drawn from
the rule's final law. Vectorised over the batch: every row walks its own tree at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
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


def _count(mask: torch.Tensor) -> int:
    """Number of true entries of a small bool vector, counted in Python: a fraction of the cost of a
    tensor reduction plus ``item`` on the batch sizes a walk sees."""
    return sum(mask.tolist())


def _draw(mask: torch.Tensor, law: torch.Tensor, out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Sample from ``law`` only for rows in ``mask``, writing into a copy of ``out``."""
    if all(mask.tolist()):  # the same draws as below, without the row selection
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
    max_depth = int(tree.depth.max())
    # Rows near the end of the grid stop early; most rounds have none, and skip that check.
    first_limit = max_depth + 1 if max_accept is None else int(max_accept.min()) + 1
    cur = torch.zeros(batch, dtype=torch.long, device=dev)
    active = torch.ones(batch, dtype=torch.bool, device=dev)  # rows that accepted at every depth so far
    n_active = batch
    bonus = torch.zeros(batch, dtype=torch.long, device=dev)
    width = tree.children.shape[-1]
    # Per-node reads go through one flat (row, node) index, base + cur: index_select on [B·(T+1), ...]
    # views costs a fraction of indexing with two index tensors.
    base = torch.arange(0, batch * n_nodes, n_nodes, device=dev)
    children = tree.children.reshape(batch * n_nodes, width)
    kid_tokens = tree.tokens.gather(1, tree.children.clamp_min(0).flatten(1)).view(batch * n_nodes, width)
    q_flat = tree.q.reshape(batch * n_nodes, -1)
    law_at = p.at if isinstance(p, NodeLaws) else partial(torch.index_select, p.reshape(batch * n_nodes, vocab), 0)
    start_at = lambda at, ctx: rule.start(law_at(at), q_flat.index_select(0, at), tree.sampled, ctx)  # fresh node state
    # One coin per candidate, candidate k at depth d in entry (d − 1)·width + k.
    coins = torch.rand(max_depth * width, batch, generator=generator, dtype=p.dtype, device=dev)
    # DESIGN 4.1: a sibling equal to a rejected one is skipped (only siblings can repeat a token).
    track = width > 1 and not tree.distinct_siblings
    rows = torch.arange(batch, device=dev) if track else None
    visited = [cur]  # the current node after each depth
    for depth in range(1, max_depth + 1):
        at = base + cur
        kids, kid_tok = children.index_select(0, at), kid_tokens.index_select(0, at)  # [B, K]
        kid_ok = kids >= 0
        extras = rule.node_extras(prepared, view, cur, kids) if view is not None else {}
        ctx = NodeContext(depth=depth, n_candidates=kid_ok.sum(-1), extras=extras)
        walking = active & kid_ok[:, 0]
        if depth >= first_limit:  # active rows have accepted depth − 1 tokens
            walking &= max_accept >= depth
        state = start_at(at, ctx)
        n_walk = n_pending = _count(walking)  # rows still trying this node's children
        if n_walk < n_active:  # rows at a leaf or at their limit emit the bonus from the fresh node law
            bonus = _draw(active & ~walking, rule.bonus_law(state, ctx), bonus, generator)
        if not n_walk:
            n_active = 0
            break
        if visit is not None:
            visit(walking.nonzero().squeeze(-1), cur, ctx)
        pending, bonus_drawn = walking, False
        rejected = torch.zeros(batch, vocab, dtype=torch.bool, device=dev) if track else None
        for k in range(width):
            node, x = kids[:, k], kid_tok[:, k]
            valid, n_valid = pending, n_pending  # every walking row has a first child
            if k > 0:
                valid = pending & kid_ok[:, k]
                if rejected is not None:
                    valid &= ~rejected[rows, x]
                n_valid = _count(valid)
                if not n_valid:
                    continue
            acc = valid & (coins[(depth - 1) * width + k] < rule.accept_prob(state, x, ctx))
            cur = torch.where(acc, node, cur)
            pending = pending ^ acc  # accepted rows were pending: this clears them
            n_acc = _count(acc)
            n_rej = n_valid - n_acc
            n_pending -= n_acc
            rej = valid ^ acc if n_rej else None  # accepted rows were valid
            if n_rej:  # only rejected rows need the rule's next state: compute it for them alone
                whole = n_rej == batch
                idx = None if whole else rej.nonzero().squeeze(-1)
                sub, sub_x, sub_ctx = (state, x, ctx) if whole else (state.rows(idx), x[idx], ctx.rows(idx, batch))
                if k == width - 1 and n_rej == n_pending:  # the rows left, at the last sibling: their bonus
                    drawn = sample_from_law(rule.bonus_after_reject(sub, sub_x, sub_ctx), generator)
                    bonus = drawn if whole else bonus.index_put((idx,), drawn)
                    bonus_drawn = True
                else:
                    residual = rule.reject(sub, sub_x, sub_ctx)
                    state = residual if whole else state.put(idx, residual)
            if rej is not None and rejected is not None:
                rejected[rows, x] |= rej
            if not n_pending:
                break
        # Rows still pending rejected every valid child: they emit the bonus from the last residual.
        active, n_active = walking, n_walk - n_pending
        if n_pending:
            if not bonus_drawn:
                bonus = _draw(pending, rule.bonus_law(state, ctx), bonus, generator)
            active = walking ^ pending
        visited.append(cur)
    if n_active:
        ctx = NodeContext(depth=max_depth + 1)
        fresh = rule.bonus_law(start_at(base + cur, ctx), ctx)
        bonus = _draw(active, fresh, bonus, generator)
    visited += [cur] * (max_depth + 1 - len(visited))
    accepted = tree.depth.gather(1, cur[:, None]).squeeze(1)  # each accept moved one level down
    steps = torch.arange(max_depth + 1, device=dev)
    path = torch.stack(visited, 1).masked_fill_(steps[None] > accepted[:, None], -1)
    return WalkResult(path=path, accepted=accepted, bonus=bonus, last_node=cur)
