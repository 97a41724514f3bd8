"""LANTERN and LANTERN++: latent-proximity relaxation (DESIGN 4.3–4.4; arXiv 2410.03355, 2502.06352).

Neighbours n_1, n_2, … of token x are the other codebook entries by L2 distance of their vectors
(``neighbour_table``, built once per codebook and cached). With c_m = Σ_{i≤m} p_j(n_i) over the
first k neighbours, A = {x, n_1..n_{m*}} for the largest admissible m*: c_m ≤ δ (LANTERN) or
c_m ≤ (λ − 1)·p_j(x) (LANTERN++). Accept with min(1, p_j(A)/q_j(x)) (q = 1 for point masses).

On rejection the default *reference-code* residuals are the authors' (``jadohu/LANTERN`` 3a56e45;
LANTERN++ is the same code with δ > 1 read as λ): only when at least one
neighbour was pooled (m* ≥ 1), the first **k + 1** neighbours ``nearest[x, :k+1]`` (x itself is
not in that list) are zeroed
- ``reference-code`` (LlamaGen, ``models/ea_model_llamagen.py`` L646–661): on sampled drafts in the
  proposal q_j *before* ``[p_j − q_j]_+``, so their target mass stays in the residual; on point-mass
  drafts (EAGLE-2, L769–778) in p_j, together with x;
- ``reference-code-lumina`` (``models/ea_model_lumina_mgpt.py`` L696–717): in p_j, then
  ``[p_j − q_j]_+`` (sampled) or x zeroed (point masses);
and an all-zero residual falls back to the uniform law (x included), as their code does. The
*clean* residual (ours, a named option) zeroes exactly A in the strict residual, so the relaxed
target of DESIGN 4.3 is what a rejection leaves.
"""

from __future__ import annotations

import hashlib
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from cascade_sd.acceptance.base import (MASS_EPS, AcceptanceRule, NodeContext, NodeState, Param, RuleResources,
                                        chain_bound, gather, normalise, remove_token)
from cascade_sd.acceptance.law import sequence_law
from cascade_sd.acceptance.strict import strict_ratio, strict_residual_law
from cascade_sd.errors import ConfigError, check_range
from cascade_sd.io import atomic_torch_save

_TABLES: dict[tuple[str, int], torch.Tensor] = {}
RESIDUALS = ("clean", "reference-code", "reference-code-lumina")
#: A residual row whose base mass outside Z_x is below this share of the total is summed directly.
TIGHT = 1e-3


@dataclass(frozen=True)
class _Scan:
    """One node's neighbour scan: c [V] (exact on W, else truncated once p + c ≥ q), the tokens W
    that can be rejected (q(x) > p(x) + c_x, sorted) and their m* [|W|]."""

    c: torch.Tensor
    rejected: torch.Tensor
    m: torch.Tensor


def _nearest(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k smallest entries per row, ties by index: what a stable full sort gives, via
    top-k (the full sort is kept only for rows where ties straddle the k-th place)."""
    vals, idx = dist.topk(k, dim=-1, largest=False, sorted=False)
    by_index = idx.sort(dim=-1).indices
    idx, vals = idx.gather(-1, by_index), vals.gather(-1, by_index)
    order = vals.sort(dim=-1, stable=True).indices
    out = idx.gather(-1, order)
    kth = vals.max(dim=-1, keepdim=True).values
    straddle = ((dist == kth).sum(-1) > (vals == kth).sum(-1)).nonzero().flatten()
    if straddle.numel():
        out[straddle] = torch.sort(dist[straddle], dim=-1, stable=True).indices[:, :k]
    return out


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
            rows.append(_nearest(dist, k).to(torch.int32))
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
        """Build (or fetch) the neighbour table of the bundle's codebook (k + 1 columns, capped at V − 1,
        for the reference-code residual); cap or check k against V − 1."""
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
        self.neighbours = neighbour_table(resources.codebook, min(k + 1, resources.vocab - 1), resources.cache_dir).long()

    @abstractmethod
    def threshold(self, px: torch.Tensor) -> torch.Tensor:
        """Largest admissible neighbour mass c_{m*} for candidates with p_j(x) = ``px``."""

    def _nbrs(self, x: torch.Tensor) -> torch.Tensor:
        """The k neighbours [..., k] a candidate may pool."""
        return self._table(x.device)[x, : self.params["k"]]

    @property
    def _reference(self) -> bool:
        return self.params["residual"] != "clean"

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

    def reject(self, state: NodeState, x: torch.Tensor, ctx: NodeContext) -> NodeState:
        """The next residual (module docstring); the proposal loses x (sampling without replacement)."""
        if self._reference:
            return self._reference_residual(state, x)
        nbrs, inside, _ = self._set(state.p, x)
        keep = ~torch.zeros_like(state.p, dtype=torch.bool).scatter(-1, nbrs, inside).scatter(-1, x.unsqueeze(-1), True)
        outside = normalise(state.p * keep, state.p)
        if state.q is None:
            return NodeState(p=outside, q=None)
        residual = normalise((state.p - state.q).clamp_min(0.0) * keep, outside)
        return NodeState(p=residual, q=remove_token(state.q, x))

    def _reference_residual(self, state: NodeState, x: torch.Tensor) -> NodeState:
        """The authors' residuals (module docstring): ``nearest[x, :k+1]`` zeroed in q (LlamaGen, sampled)
        or in p (point masses, Lumina) only when a neighbour was pooled; uniform when nothing is left."""
        _, inside, _ = self._set(state.p, x)
        pooled = inside[..., :1].expand(-1, self._table(x.device).shape[1])  # m* ≥ 1: the first neighbour joined A
        zeroed = torch.zeros_like(state.p, dtype=torch.bool).scatter(-1, self._table(x.device)[x], pooled)
        uniform = torch.full_like(state.p, 1.0 / state.p.shape[-1])
        if state.q is None:
            kept = state.p.scatter(-1, x.unsqueeze(-1), 0.0).masked_fill(zeroed, 0.0)
            return NodeState(p=normalise(kept, uniform), q=None)
        if self.params["residual"] == "reference-code":
            mass = (state.p - state.q.masked_fill(zeroed, 0.0)).clamp_min(0.0)
        else:
            mass = (state.p.masked_fill(zeroed, 0.0) - state.q).clamp_min(0.0)
        return NodeState(p=normalise(mass, uniform), q=remove_token(state.q, x))

    def _scan(self, p: torch.Tensor, q: torch.Tensor) -> _Scan:
        """Neighbour scan of every token x of one node (p, q: [V]), only as far as the law needs.

        Tokens with q(x) ≤ p(x) are always accepted, and a scan stops once p(x) + c ≥ q(x) (then
        too). Only the rest, W, are ever rejected; for them the scan runs to m* so that c and A_x
        are complete. Chunks grow geometrically; carrying the running sum into each chunk's
        cumsum keeps the comparisons identical to ``_set``'s single cumsum.
        """
        nbrs = self._table(p.device)[:, : self.params["k"]]
        thr = self.threshold(p)
        c, m = torch.zeros_like(p), torch.zeros(p.shape[0], dtype=torch.long, device=p.device)
        active, open_ = torch.nonzero(q > p).flatten(), []
        start, width = 0, 8
        while active.numel() and start < nbrs.shape[1]:
            block = nbrs[:, start:start + width][active]  # slice first: a view, then gather
            cum = torch.cat([c[active, None], p[block]], dim=-1).cumsum(-1)[:, 1:]
            count = (cum <= thr[active, None]).sum(-1)  # a prefix: cum is non-decreasing
            m[active] += count
            c[active] = torch.where(count > 0, cum.gather(-1, (count - 1).clamp_min(0)[:, None])[:, 0], c[active])
            stopped = count < block.shape[1]
            saturated = p[active] + c[active] >= q[active]
            open_.append(active[stopped & ~saturated])
            active = active[~stopped & ~saturated]
            start, width = start + width, width * 2
        rejected = torch.cat([*open_, active]).sort().values
        return _Scan(c=c, rejected=rejected, m=m[rejected])

    def single_sample_law(self, state: NodeState, ctx: NodeContext) -> torch.Tensor:
        """The enumerated law; for the clean residual in O(V + |W|·k) (``accept_prob``'s formula for every token at once):
        the residual after rejecting x ∈ W is a base law with x's zeroed set Z_x removed and
        renormalised, so Σ_x w_x·R_x is one scatter over W's neighbour rows (same fallbacks as
        ``reject``; tests prove it equals the enumeration)."""
        if self._reference:  # every draw through accept_prob / bonus_after_reject
            support = torch.nonzero(state.q[0] > 0).flatten()
            return sequence_law(self, state.p, state.q, ctx, support[:, None], state.q[0, support])
        p, q = state.p[0], state.q[0]
        scan = self._scan(p, q)
        w = scan.rejected
        nbrs, inside = self._zeroed_rows(scan)
        # accept_prob: min(1, p(A_x)/q(x)) is 1 off W (and q(x)·a = 0 where q(x) = 0)
        weight = q[w] - p[w] - scan.c[w]  # q(x)·(1 − a(x)) > 0: drawing and rejecting x ∈ W
        law = q.clone()
        law[w] = p[w] + scan.c[w]
        # Z_x = {x} ∪ its zeroed neighbours; R_x = base∘1[∉Z_x] / mass_x, base = [p − q]_+, else p.
        # Σ_x coef_x·R_x is a scatter over W's neighbour rows, O(|W|·k). Where Z_x holds nearly all
        # of the base mass, 1 − base(Z_x) and the scattered differences cancel badly: those rows
        # (``tight``) sum their complement directly, O(V) each.
        flat = nbrs.flatten()
        for base in ((p - q).clamp_min(0.0), p):
            near = base[nbrs] * inside
            total = base.sum()
            mass = total - base[w] - near.sum(-1)
            live = (base > 0).sum() - (base[w] > 0).long() - (near > 0).sum(-1)  # exact support count
            tight = mass < TIGHT * total
            keep = torch.ones(int(tight.sum()), p.shape[0], dtype=torch.bool, device=p.device)
            keep.scatter_(1, nbrs[tight], ~inside[tight]).scatter_(1, w[tight, None], False)  # rows: distinct tokens
            mass[tight] = (base * keep).sum(-1)
            use = (weight > 0) & (live > 0)
            coef = torch.where(use, weight / mass.clamp_min(MASS_EPS), torch.zeros_like(weight))
            loose = torch.where(tight, torch.zeros_like(coef), coef)
            removed = torch.zeros_like(p).index_add_(0, flat, (loose.unsqueeze(-1) * inside).flatten())
            removed[w] += loose
            law = law + base * (loose.sum() - removed) + base * (coef[tight] @ keep.to(base.dtype))
            weight = torch.where(use, torch.zeros_like(weight), weight)
        return law + weight.sum() * p  # both empty: ``normalise`` falls back to p

    def _zeroed_rows(self, scan: _Scan) -> tuple[torch.Tensor, torch.Tensor]:
        """Neighbour rows [|W|, k'] of W and the mask of those the clean residual zeroes (A_x \\ x)."""
        table = self._table(scan.c.device)
        width = int(scan.m.max()) if scan.m.numel() else 0
        nbrs = table[scan.rejected, :width]
        return nbrs, torch.arange(width, device=nbrs.device) < scan.m[:, None]

    def _first_sampled(self, p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(β₀, a₀) of one sibling drawn from q: coupling with strict verification (DESIGN 6).

        β₀ = Σ_y min([q(y) − p(y)]_+, c(y)) (extra acceptance) + Σ_y [q(y) − p(A_y)]_+ · r(Z_y \\ y)
        (rejections whose residual lost the zeroed set Z_y that the strict residual r keeps);
        both sums only involve tokens with q(y) > p(y), the second only W.
        """
        first, accept = [], []
        for pr, qr in zip(p, q):
            scan = self._scan(pr, qr)
            w = scan.rejected
            strict = (pr - qr).clamp_min(0.0)
            total = strict.sum()
            r = strict / total if total > 0 else torch.zeros_like(strict)
            nbrs, zeroed = self._zeroed_rows(scan)
            rejections = qr[w] - pr[w] - scan.c[w]
            extra = torch.minimum((qr - pr).clamp_min(0.0), scan.c).sum()
            first.append(extra + (rejections * (r[nbrs] * zeroed).sum(-1)).sum())
            accept.append(qr.sum() - rejections.sum())
        return torch.stack(first), torch.stack(accept)

    def _table(self, device: torch.device) -> torch.Tensor:
        if self.neighbours is None:
            raise ConfigError(f"rule {self.name!r} has no neighbour table; call bind() with a codebook first")
        return self.neighbours.to(device)

    def _coupling_first(self, p: torch.Tensor, q: torch.Tensor, ctx: NodeContext, sampled: bool
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(β₀, a₀) of the first sibling for any residual, through the rule's own methods: coupled with
        strict verification on the same draw and coin, the two differ when only the relaxed rule
        accepts (a − a_strict) or when both reject and the residuals differ (TV of the two)."""
        first, accept = [], []
        for pr, qr in zip(p, q):
            if sampled:
                xs = torch.nonzero(qr > 0).flatten()
                w = qr[xs]
                state = NodeState(p=pr.expand(len(xs), -1), q=qr.expand(len(xs), -1))
            else:
                xs = torch.argsort(qr, descending=True, stable=True)[:1]
                w = torch.ones(1, dtype=pr.dtype, device=pr.device)
                state = NodeState(p=pr[None], q=None)
            a, a_strict = self.accept_prob(state, xs, ctx), strict_ratio(state, xs)
            both = a < 1  # only draws the relaxed rule may reject have residuals to compare
            rejected = state.rows(both)
            relaxed = self.bonus_after_reject(rejected, xs[both], ctx)
            split = 0.5 * (relaxed - strict_residual_law(rejected, xs[both])).abs().sum(-1)
            first.append((w * (a - a_strict).clamp_min(0.0)).sum() + (w[both] * (1 - a[both]) * split).sum())
            accept.append((w * a).sum())
        return torch.stack(first), torch.stack(accept)

    def tv_bound(self, p: torch.Tensor, q: torch.Tensor, ctx: NodeContext, *, sampled: bool = True) -> torch.Tensor:
        """Certified per-node bound. Clean residual, sampled siblings: coupling bound β₀ + (1 − a₀)·(n − 1)
        (capped at 1); point masses: Σ_j reach_j·c_{m*,j} along the deterministic sibling chain (the
        relaxed target moves c_{m*} onto x, TV(p, p̃) = c_{m*}). Reference-code residuals: the same
        coupling bound with β₀ from the rule's own methods (their residual also drops neighbours
        outside A). The papers' own bounds (δ; (λ − 1)·p(x)) are ``paper_bound``: they hold for
        point-mass drafts only."""
        if self._reference:
            first, accept = self._coupling_first(p, q, ctx, sampled)
            return chain_bound(first, accept, ctx.n_candidates, 1.0)
        if sampled:
            first, accept = self._first_sampled(p, q)
            return chain_bound(first, accept, ctx.n_candidates, 1.0)
        n = torch.as_tensor(ctx.n_candidates, device=p.device).expand(p.shape[0])
        order = torch.argsort(q, dim=-1, descending=True, stable=True)
        state, reach = NodeState(p=p, q=None), torch.ones(p.shape[0], dtype=p.dtype, device=p.device)
        bound = torch.zeros_like(reach)
        for j in range(int(n.max()) if n.numel() else 0):
            x = order[:, j]
            _, _, c = self._set(state.p, x)
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
        "residual": Param("reference-code", kind="choice", choices=RESIDUALS,
                          doc="residual: the authors' LlamaGen or Lumina code, or clean (ours; module docstring)"),
    }

    paper_bound_text = "δ"

    def threshold(self, px: torch.Tensor) -> torch.Tensor:
        return torch.full_like(px, self.params["delta"])

    def paper_bound(self, p: torch.Tensor, q: torch.Tensor, ctx: NodeContext, *, sampled: bool = True) -> torch.Tensor:
        """LANTERN's TV(p, p̃) ≤ δ (arXiv 2410.03355, its relaxed target for one drafted token)."""
        return torch.full(p.shape[:-1], self.params["delta"], dtype=p.dtype, device=p.device)


class LanternPPRule(_LatentProximity):
    """LANTERN++: neighbour mass c_{m*} ≤ (λ − 1)·p_j(x) joins the candidate (static trees)."""

    name = "lantern_pp"
    static_tree_only = True
    declares_bound = True
    strength = "lam"
    sweep = ({}, {"k": 5, "lam": 10.0}, {"k": 5, "lam": 20.0})
    parameters = {
        "k": Param(10, kind="int", lo=1, doc="neighbours considered (paper: 5 or 10)"),
        "lam": Param(5.0, lo=1.0, doc="λ ≥ 1, multiplicative bound p(A) ≤ λ·p(x) (paper: 5, 10, 20)"),
        "residual": Param("reference-code", kind="choice", choices=RESIDUALS,
                          doc="residual: the authors' LlamaGen or Lumina code, or clean (ours; module docstring)"),
    }

    paper_bound_text = "(λ − 1)·p(x)"

    def threshold(self, px: torch.Tensor) -> torch.Tensor:
        return (self.params["lam"] - 1.0) * px

    def paper_bound(self, p: torch.Tensor, q: torch.Tensor, ctx: NodeContext, *, sampled: bool = True) -> torch.Tensor:
        """LANTERN++'s TV ≤ (λ − 1)·p(x) for the drafted token x (arXiv 2502.06352), at the node's first
        candidate: averaged over its draw x ~ q (sampled), or q's top token (point masses)."""
        if sampled:
            return (self.params["lam"] - 1.0) * (q * p).sum(-1)
        top = torch.argsort(q, dim=-1, descending=True, stable=True)[..., :1]
        return (self.params["lam"] - 1.0) * p.gather(-1, top).squeeze(-1)
