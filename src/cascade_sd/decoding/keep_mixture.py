"""The law of each Jacobi window draft jointly with its recorded q, for SCD-MC's reference code (DESIGN 6).

That code records the old q for a token kept by the maximal coupling and p_stale for a resampled one
(junhyukso/SCD 7322379, lumina1/scheduler/jacobi_iteration_lumina_mgpt_SCDMC.py L292–293), so a draft's
recorded q is an outcome of its own draws: a node's law must be averaged over them (its fresh token, its
coupling coins, its residual draws), given the stale laws its redrafts read. Each column carries

- a point part, point(x) = P(draft = x, recorded q = the point mass at x): the fresh uniform token with its
  one-hot q, kept since;
- components k, mass_k(x) = P(draft = x, recorded q = Q_k), one per coupling that resampled.

A coupling with stale law p_s keeps point(x)·p_s(x) and mass_k·min(1, p_s/Q_k) where they are, and moves
the rest, drawn from each part's residual [p_s − q]₊, into a new component with Q = p_s (the point part's
residual mass is p_s(y)·(Σ point − point(y))). With q := p_s for every redraft (the exact code) all of it
would be one component, p_s itself.
"""

from __future__ import annotations

import torch

from cascade_sd.acceptance.base import normalise


def keep_prob(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """min(1, p/q) elementwise, 1 where q = 0 < p (the test u·q(x) < p(x)), 0 where both vanish."""
    return torch.where(q > 0, (p / q.clamp_min(1e-300)).clamp(max=1.0), (p > 0).to(p.dtype))


class KeepMixture:
    """Point part [B, C, V] and components (mass, Q) [B, C, K, V] of every row's window columns (module
    docstring); a column is coupled at most once per round it waits, C − 1 times, so K = C slots suffice."""

    def __init__(self, rows: int, columns: int, vocab: int, device: torch.device) -> None:
        self.slots = columns
        self.point, self.mass, self.q = self._fresh(rows, columns, vocab, device)

    def _fresh(self, rows: int, columns: int, vocab: int, device: torch.device):
        """Fresh columns: a uniform token with its one-hot q, averaged over the token."""
        point = torch.full((rows, columns, vocab), 1.0 / vocab, dtype=torch.float64, device=device)
        mass = point.new_zeros(rows, columns, self.slots, vocab)
        return point, mass, mass.clone()

    def restart(self, rows: torch.Tensor) -> None:
        self.point[rows], self.mass[rows], self.q[rows] = self._fresh(rows.numel(), *self.point.shape[1:],
                                                                      self.point.device)

    def select_rows(self, keep: torch.Tensor) -> None:
        self.point, self.mass, self.q = self.point[keep], self.mass[keep], self.q[keep]

    def advance(self, old_column: torch.Tensor, has_old: torch.Tensor, has_stale: torch.Tensor,
                p_s: torch.Tensor) -> None:
        """The new window's parts: column c couples old column ``old_column[:, c]`` to its stale law ``p_s``
        where ``has_old``; a stale column without an old draft is a plain draw from p_s; the rest are fresh."""
        b, cols, vocab = p_s.shape
        col = old_column.clamp(0, cols - 1)
        point = self.point.gather(1, col[..., None].expand(-1, -1, vocab))
        idx = col[..., None, None].expand(-1, -1, self.slots, vocab)
        mass, q = self.mass.gather(1, idx), self.q.gather(1, idx)
        kept_point = point * p_s
        kept = mass * keep_prob(p_s[:, :, None], q)
        moved = (mass.sum(-1) - kept.sum(-1)).clamp_min(0.0)  # [B, C, K]
        residual = normalise((p_s[:, :, None] - q).clamp_min(0.0), p_s[:, :, None].expand_as(q))
        new = (moved[..., None] * residual).sum(2) + p_s * (point.sum(-1, keepdim=True) - point)
        empty = kept.sum(-1) <= 0  # the new component takes the first slot without mass
        if bool((has_old & ~empty.any(-1)).any()):
            raise RuntimeError("KeepMixture: a column ran out of component slots")
        slot = (torch.arange(self.slots, device=q.device)[None, None]
                == empty.to(torch.int8).argmax(-1, keepdim=True))[..., None]
        kept = torch.where(slot, new[:, :, None], kept)
        q = torch.where(slot, p_s[:, :, None], q)
        fresh_point, fresh_mass, fresh_q = self._fresh(b, cols, vocab, p_s.device)
        plain_mass = fresh_mass.clone()
        plain_mass[:, :, 0] = p_s
        plain_q = plain_mass.clone()
        old, plain = has_old[..., None], (has_stale & ~has_old)[..., None]
        self.point = torch.where(old, kept_point, torch.where(plain, 0.0, fresh_point))
        old, plain = old[..., None], plain[..., None]
        self.mass = torch.where(old, kept, torch.where(plain, plain_mass, fresh_mass))
        self.q = torch.where(old, q, torch.where(plain, plain_q, fresh_q))

    def at(self, column: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(point [B, V], mass [B, K, V], Q [B, K, V]) of column ``column`` [B] of every row."""
        rows = torch.arange(column.shape[0], device=column.device)
        return self.point[rows, column], self.mass[rows, column], self.q[rows, column]


def strict_mixture_law(p: torch.Tensor, point: torch.Tensor, mass: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Law [V] strict verification emits at a one-candidate node whose draft and recorded q follow
    ``KeepMixture`` parts: accept x with min(1, p/q), else draw from [p − q]₊ (DESIGN 3). A point mass
    verifies to p exactly, so the point part contributes (Σ point)·p."""
    accept = keep_prob(p[None], q)
    rejected = (mass * (1.0 - accept)).sum(-1, keepdim=True)
    residual = normalise((p[None] - q).clamp_min(0.0), p[None].expand_as(q))
    return point.sum() * p + (mass * accept + rejected * residual).sum(0)
