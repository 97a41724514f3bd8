"""LANTERN and LANTERN++: latent-proximity relaxation (DESIGN 4.3–4.4; arXiv 2410.03355, 2502.06352).

Neighbours n_1, n_2, … of token x are the other codebook entries by L2 distance of their vectors
(``neighbour_table``, built once per codebook and cached). With c_m = Σ_{i≤m} p_j(n_i) over the
first k neighbours, A = {x, n_1..n_{m*}} for the largest admissible m*: c_m ≤ δ (LANTERN) or
c_m ≤ (λ − 1)·p_j(x) (LANTERN++). Accept with min(1, p_j(A)/q_j(x)) (q = 1 for point masses).
On rejection the *clean* residual zeroes exactly A; the *reference-code* variant zeroes x and
all k neighbours. (The reference code's static-tree quirk of zeroing them in q is not
reproduced: drafts here always follow the drafter's own law.)
"""

from __future__ import annotations

import hashlib
from abc import abstractmethod
from pathlib import Path

import torch

from cascade_sd.acceptance.base import (MASS_EPS, AcceptanceRule, NodeContext, NodeState, Param, RuleResources,
                                        chain_bound, gather, normalise, remove_token)
from cascade_sd.errors import ConfigError, check_range
from cascade_sd.io import atomic_torch_save

_TABLES: dict[tuple[str, int], torch.Tensor] = {}


def neighbour_table(codebook: torch.Tensor, k: int, cache_dir: str | Path | None = None) -> torch.Tensor:
    """[V, k] indices of each entry's k nearest *other* entries by L2 distance (ties by index).

    Cached in memory per (codebook content, k) and, with ``cache_dir``, on disk.
    """
    codebook = codebook.detach().float().cpu()
    vocab = codebook.shape[0]
    check_range("k", k, 1, vocab - 1)
    digest = hashlib.sha256(codebook.numpy().tobytes()).hexdigest()[:16]
    key = (digest, k)
    if key in _TABLES:
        return _TABLES[key]
    path = Path(cache_dir) / f"lantern-neighbours-{digest}-k{k}.pt" if cache_dir else None
    if path is not None and path.is_file():
        table = torch.load(path, weights_only=True)
        if table.shape != (vocab, k):
            raise ConfigError(f"neighbour cache {path} has shape {tuple(table.shape)}, expected {(vocab, k)}; delete it")
    else:
        rows = []
        for start in range(0, vocab, 1024):  # chunked: a full V×V distance matrix is 1 GB at V = 16384
            dist = torch.cdist(codebook[start:start + 1024].double(), codebook.double())
            idx = torch.arange(start, min(start + 1024, vocab))
            dist[idx - start, idx] = float("inf")
            rows.append(torch.sort(dist, dim=-1, stable=True).indices[:, :k].to(torch.int32))
        table = torch.cat(rows)
        if path is not None:
            atomic_torch_save(table, path)
    _TABLES[key] = table
    return table


class _LatentProximity(AcceptanceRule):
    """Shared mechanics of LANTERN and LANTERN++; subclasses define the admissible neighbour mass."""

    neighbours: torch.Tensor | None = None

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self._k_explicit = "k" in params

    def bind(self, resources: RuleResources) -> None:
        """Build (or fetch) the neighbour table of the bundle's codebook; cap or check k against V − 1."""
        if resources.codebook is None:
            raise ConfigError(f"method={self.name!r} needs a tokenizer codebook; this bundle has none")
        if resources.codebook.shape[0] != resources.vocab:
            raise ConfigError(f"codebook has {resources.codebook.shape[0]} entries but the target's vocab_size is "
                              f"{resources.vocab}")
        k = self.params["k"]
        if k > resources.vocab - 1:
            if self._k_explicit:
                raise ConfigError(f"k={k} is out of range; allowed [1, {resources.vocab - 1}] for this codebook")
            k = self.params["k"] = resources.vocab - 1
        self.neighbours = neighbour_table(resources.codebook, k, resources.cache_dir).long()

    @abstractmethod
    def threshold(self, px: torch.Tensor) -> torch.Tensor:
        """Largest admissible neighbour mass c_{m*} for candidates with p_j(x) = ``px``."""

    def _nbrs(self, x: torch.Tensor) -> torch.Tensor:
        if self.neighbours is None:
            raise ConfigError(f"rule {self.name!r} has no neighbour table; call bind() with a codebook first")
        return self.neighbours.to(x.device)[x]

    def _set(self, p: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(neighbours [..., k], in-A mask [..., k], c_{m*} [...]) of candidates x under law p."""
        nbrs = self._nbrs(x)
        mass = p.gather(-1, nbrs)
        cum = mass.cumsum(-1)
        inside = cum <= self.threshold(p.gather(-1, x.unsqueeze(-1)))  # a prefix: cum is non-decreasing
        return nbrs, inside, (mass * inside).sum(-1)

    def accept_prob(self, state: NodeState, x: torch.Tensor, ctx: NodeContext) -> torch.Tensor:
        """min(1, p_j(A)/q_j(x)); min(1, p_j(A)) for point masses."""
        _, _, c = self._set(state.p, x)
        pa = gather(state.p, x) + c
        if state.q is None:
            return pa.clamp(max=1.0)
        qx = gather(state.q, x)
        return torch.where(qx > 0, (pa / qx.clamp_min(1e-300)).clamp(max=1.0), torch.zeros_like(pa))

    def _zeroed(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Mask [B, V] of the tokens the residual loses: A (clean) or x with all k neighbours."""
        nbrs, inside, _ = self._set(p, x)
        if self.params["residual"] == "reference-code":
            inside = torch.ones_like(inside)
        mask = torch.zeros_like(p, dtype=torch.bool).scatter(-1, x.unsqueeze(-1), True)
        return mask.scatter(-1, nbrs, inside) | mask

    def reject(self, state: NodeState, x: torch.Tensor, ctx: NodeContext) -> NodeState:
        """Residual without the zeroed set; the proposal loses x (sampling without replacement)."""
        keep = ~self._zeroed(state.p, x)
        outside = normalise(state.p * keep, state.p)
        if state.q is None:
            return NodeState(p=outside, q=None)
        residual = normalise((state.p - state.q).clamp_min(0.0) * keep, outside)
        return NodeState(p=residual, q=remove_token(state.q, x))

    def single_sample_law(self, state: NodeState, ctx: NodeContext) -> torch.Tensor:
        """The enumerated law in O(V·k) (``accept_prob``'s formula for every token at once): the
        residual after rejecting x is a base law with x's zeroed set Z_x removed and
        renormalised, so Σ_x w_x·R_x is one scatter over the neighbour table (same fallbacks as
        ``reject``; tests prove it equals the enumeration)."""
        p, q = state.p[0], state.q[0]
        nbrs, inside, c = self._set_all(state.p)
        nbrs, inside, c = nbrs[0], inside[0], c[0]
        # accept_prob for every token at once: min(1, p(A_x)/q(x)), 0 where q(x) = 0
        a = torch.where(q > 0, ((p + c) / q.clamp_min(1e-300)).clamp(max=1.0), torch.zeros_like(q))
        weight = q * (1 - a)  # probability of drawing and rejecting each x
        if self.params["residual"] == "reference-code":
            inside = torch.ones_like(inside)
        strict = (p - q).clamp_min(0.0)
        law = q * a
        # Z_x = {x} ∪ its zeroed neighbours; R_x = base∘1[∉Z_x] / mass, base = [p − q]_+, else p.
        flat = nbrs.flatten()
        for base in (strict, p):
            near = base[nbrs] * inside
            mass = base.sum() - base - near.sum(-1)  # base outside Z_x, for every x
            # Emptiness by support count (exact), not by the rounded mass difference.
            live = (base > 0).sum() - (base > 0).long() - (near > 0).sum(-1)
            use = (weight > 0) & (live > 0)
            coef = torch.where(use, weight / mass.clamp_min(MASS_EPS), torch.zeros_like(weight))
            removed = torch.zeros_like(p).index_add_(0, flat, (coef.unsqueeze(-1) * inside).flatten()) + coef
            law = law + base * (coef.sum() - removed)
            weight = torch.where(use, torch.zeros_like(weight), weight)
        return law + weight.sum() * p  # both empty: ``normalise`` falls back to p

    def _first_sampled(self, p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(β₀, a₀) of one sibling drawn from q: coupling with strict verification (DESIGN 6).

        β₀ = Σ_y min([q(y) − p(y)]_+, c(y)) (extra acceptance) + Σ_y [q(y) − p(A_y)]_+ · r(Z_y \\ y)
        (rejections whose residual lost the zeroed set Z_y that the strict residual r keeps).
        """
        b, v = p.shape
        nbrs, inside, c = self._set_all(p)
        strict = (p - q).clamp_min(0.0)
        total = strict.sum(-1, keepdim=True)
        r = torch.where(total > 0, strict / total.clamp_min(1e-300), torch.zeros_like(strict))
        zeroed = inside if self.params["residual"] == "clean" else torch.ones_like(inside)
        lost = (r.unsqueeze(1).expand(b, v, v).gather(-1, nbrs) * zeroed).sum(-1)
        extra = torch.minimum((q - p).clamp_min(0.0), c).sum(-1)
        rejections = (q - p - c).clamp_min(0.0)
        accept = torch.minimum(q, p + c).sum(-1)
        return extra + (rejections * lost).sum(-1), accept

    def _set_all(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``_set`` for every token of the vocabulary at once: [B, V, k] / [B, V]."""
        if self.neighbours is None:
            raise ConfigError(f"rule {self.name!r} has no neighbour table; call bind() with a codebook first")
        nbrs = self.neighbours.to(p.device)
        mass = p[:, nbrs]
        inside = mass.cumsum(-1) <= self.threshold(p).unsqueeze(-1)
        return nbrs.expand(p.shape[0], *nbrs.shape), inside, (mass * inside).sum(-1)

    def tv_bound(self, p: torch.Tensor, q: torch.Tensor, ctx: NodeContext, *, sampled: bool = True) -> torch.Tensor:
        """Sampled siblings: coupling bound β₀ + (1 − a₀)·(n − 1) (capped at 1; the papers' per-node
        δ does not carry over to sampled candidates). Point masses: Σ_j reach_j·c_{m*,j} along the
        deterministic sibling chain (the relaxed target moves c_{m*} onto x, TV(p, p̃) = c_{m*});
        the reference-code residual also drops the other neighbours, so its term is their whole mass."""
        if sampled:
            first, accept = self._first_sampled(p, q)
            return chain_bound(first, accept, ctx.n_candidates, 1.0)
        n = torch.as_tensor(ctx.n_candidates, device=p.device).expand(p.shape[0])
        order = torch.argsort(q, dim=-1, descending=True, stable=True)
        state, reach = NodeState(p=p, q=None), torch.ones(p.shape[0], dtype=p.dtype, device=p.device)
        bound = torch.zeros_like(reach)
        for j in range(int(n.max()) if n.numel() else 0):
            x = order[:, j]
            nbrs, _, c = self._set(state.p, x)
            if self.params["residual"] == "reference-code":  # all k neighbours lose their mass
                c = state.p.gather(-1, nbrs).sum(-1)
            live = j < n
            bound = bound + torch.where(live, reach * c, torch.zeros_like(c))
            reach = reach * (1 - self.accept_prob(state, x, ctx))
            state = self.reject(state, x, ctx)
        return bound.clamp(max=1.0)


class LanternRule(_LatentProximity):
    """LANTERN: neighbour mass c_{m*} ≤ δ joins the candidate."""

    name = "lantern"
    declares_bound = True
    strength = "delta"
    sweep = ({}, {"delta": 0.05}, {"delta": 0.2}, {"delta": 0.4})
    parameters = {
        "k": Param(1000, kind="int", lo=1, doc="neighbours considered (default capped at V − 1)"),
        "delta": Param(0.1, lo=0.0, hi=1.0, doc="δ, largest neighbour mass moved onto the candidate"),
        "residual": Param("clean", kind="choice", choices=("clean", "reference-code"), doc="residual variant"),
    }

    def threshold(self, px: torch.Tensor) -> torch.Tensor:
        return torch.full_like(px, self.params["delta"])


class LanternPPRule(_LatentProximity):
    """LANTERN++: neighbour mass c_{m*} ≤ (λ − 1)·p_j(x) joins the candidate (static trees)."""

    name = "lantern_pp"
    declares_bound = True
    strength = "lam"
    sweep = ({}, {"k": 5, "lam": 10.0}, {"k": 5, "lam": 20.0})
    parameters = {
        "k": Param(10, kind="int", lo=1, doc="neighbours considered (paper: 5 or 10)"),
        "lam": Param(5.0, lo=1.0, doc="λ ≥ 1, multiplicative bound p(A) ≤ λ·p(x) (paper: 5, 10, 20)"),
        "residual": Param("clean", kind="choice", choices=("clean", "reference-code"), doc="residual variant"),
    }

    def threshold(self, px: torch.Tensor) -> torch.Tensor:
        return (self.params["lam"] - 1.0) * px
