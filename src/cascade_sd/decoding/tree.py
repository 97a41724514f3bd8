"""Draft-tree shapes (DESIGN 3): static rank-path trees and EAGLE-2 dynamic-tree settings.

A *static* tree is a list of rank paths: path (r1, r2, …) is the r2-th sampled child of the
r1-th child of the root. Children of one node are drawn without replacement from the drafter's
q, in rank order, so the rank-r child is distributed as q_r = q without the r earlier siblings,
renormalised. A *dynamic* tree (EAGLE-2) is grown per prefix from q's top-k and reranked by
cumulative log q; its tokens are deterministic (point masses).

Node 0 is always the root (the last committed token, not yet seen by the target); drafted nodes
are 1..T in breadth-first order with siblings in rank order.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass
from functools import cached_property

import torch

from cascade_sd.errors import ConfigError, check_range

STATIC_PRESETS = ("chain-N", "tree-25", "tree-57")


def geometric_rank_paths(n_nodes: int, alpha: float, max_depth: int = 5, max_children: int = 10) -> list[tuple[int, ...]]:
    """The ``n_nodes`` rank paths of highest modelled acceptance, Π α(1−α)^rank (best-first).

    A simple model of sibling acceptance (the rank-r child is reached after r rejections); it
    yields prefix- and sibling-closed trees. Ties break by insertion order, so it is deterministic.
    """
    counter = 0
    heap: list[tuple[float, int, tuple[int, ...]]] = []
    for r in range(max_children):
        heap.append((-alpha * (1 - alpha) ** r, counter, (r,)))
        counter += 1
    heapq.heapify(heap)
    out: list[tuple[int, ...]] = []
    while len(out) < n_nodes:
        score, _, path = heapq.heappop(heap)
        out.append(path)
        if len(path) < max_depth:
            for r in range(max_children):
                heapq.heappush(heap, (score * alpha * (1 - alpha) ** r, counter, path + (r,)))
                counter += 1
    return out


@dataclass(frozen=True)
class StaticTree:
    """A fixed draft-tree topology given by rank paths (root excluded)."""

    paths: tuple[tuple[int, ...], ...]
    name: str = "custom"

    def __post_init__(self) -> None:
        ordered = tuple(sorted(set(self.paths), key=lambda p: (len(p), p)))
        if not ordered:
            raise ConfigError("tree: a static tree needs at least one rank path")
        present = set(ordered)
        for path in ordered:
            if any(r < 0 for r in path):
                raise ConfigError(f"tree: rank path {path} has a negative rank")
            if len(path) > 1 and path[:-1] not in present:
                raise ConfigError(f"tree: rank path {path} has no parent path {path[:-1]}")
            if path[-1] > 0 and path[:-1] + (path[-1] - 1,) not in present:
                raise ConfigError(f"tree: rank path {path} skips sibling rank {path[-1] - 1}")
        object.__setattr__(self, "paths", ordered)

    @classmethod
    def preset(cls, name: str) -> "StaticTree":
        """``chain-N`` (N ≥ 1), ``tree-25`` or ``tree-57`` (depth 5, from ``geometric_rank_paths``)."""
        chain = re.fullmatch(r"chain-(\d+)", name)
        if chain:
            n = int(chain.group(1))
            if n < 1:
                raise ConfigError(f"tree={name!r}: chain length {n} is out of range; allowed [1, inf]")
            return cls(tuple((0,) * d for d in range(1, n + 1)), name)
        if name == "tree-25":
            return cls(tuple(geometric_rank_paths(25, 0.55)), name)
        if name == "tree-57":
            return cls(tuple(geometric_rank_paths(57, 0.4)), name)
        raise ConfigError(f"tree={name!r} is not a known preset; choose one of {', '.join(STATIC_PRESETS)} or 'dynamic'")

    @property
    def size(self) -> int:
        """Number of drafted nodes (root excluded)."""
        return len(self.paths)

    @cached_property
    def depth(self) -> int:
        """Maximum draft depth."""
        return max(len(p) for p in self.paths)

    @cached_property
    def parent(self) -> torch.Tensor:
        """Parent node index of nodes 0..T (root's parent is −1)."""
        index = {(): 0} | {p: i + 1 for i, p in enumerate(self.paths)}
        return torch.tensor([-1] + [index[p[:-1]] for p in self.paths])

    @cached_property
    def node_depth(self) -> torch.Tensor:
        """Depth of nodes 0..T (root 0)."""
        return torch.tensor([0] + [len(p) for p in self.paths])

    @cached_property
    def children(self) -> torch.Tensor:
        """[T+1, K] child indices of each node in rank order, padded with −1."""
        kids: list[list[int]] = [[] for _ in range(self.size + 1)]
        for i, parent in enumerate(self.parent.tolist()[1:], start=1):
            kids[parent].append(i)
        width = max(len(k) for k in kids)
        return torch.tensor([k + [-1] * (width - len(k)) for k in kids])


@dataclass(frozen=True)
class DynamicTreeSpec:
    """EAGLE-2 dynamic tree: expand top_k per frontier node for ``depth`` steps, keep total_tokens − 1."""

    top_k: int = 10
    depth: int = 5
    total_tokens: int = 60

    def __post_init__(self) -> None:
        check_range("tree_top_k", self.top_k, 1, 64)  # the user-facing name of this field
        check_range("depth", self.depth, 1, 32)
        check_range("total_tokens", self.total_tokens, 2, self.candidates + 1)

    @property
    def size(self) -> int:
        """Number of drafted nodes kept (root excluded)."""
        return self.total_tokens - 1

    @property
    def candidates(self) -> int:
        """Candidates stored before the rerank: top_k at depth 1, top_k² at each deeper level."""
        return self.top_k + (self.depth - 1) * self.top_k**2


@dataclass
class DrafterOutputs:
    """The drafter's guided logits [B, T+1, V] and hidden states [B, T+1, D] at each node, and
    whether it ran there ([B, T+1]; leaves of static trees are never expanded). Kept only for
    rules that read the tree (CASCADE's breadth signal)."""

    logits: torch.Tensor
    hidden: torch.Tensor
    ran: torch.Tensor


@dataclass
class DraftTree:
    """One round's drafted trees, batched: node 0 is the root, nodes 1..T drafted.

    ``q`` [B, T+1, V] is the drafter law at each node (the law its children were drawn from);
    ``sampled`` tells whether children are draws from q (static) or q's top tokens (dynamic).
    """

    tokens: torch.Tensor
    parent: torch.Tensor
    depth: torch.Tensor
    children: torch.Tensor
    q: torch.Tensor
    sampled: bool
    drafter: DrafterOutputs | None = None
    ancestors: torch.Tensor | None = None  # the ancestor mask, when drafting already built it
    distinct_siblings: bool = False  # siblings never share a token (drawn without replacement, or q's top-k)

    @property
    def size(self) -> int:
        """Number of drafted nodes T (root excluded)."""
        return self.tokens.shape[1] - 1

    def ancestor_mask(self) -> torch.Tensor:
        """Bool [B, T+1, T+1]: node i may attend to node j iff j is i or an ancestor of i."""
        if self.ancestors is not None:
            return self.ancestors
        batch, n = self.parent.shape
        mask = torch.eye(n, dtype=torch.bool, device=self.parent.device).expand(batch, n, n).clone()
        # Parents precede children (BFS order), so one pass in node order closes the relation.
        for i in range(1, n):
            par = self.parent[:, i]
            mask[:, i] |= mask[torch.arange(batch, device=par.device), par]
        return mask
