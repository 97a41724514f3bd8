"""Pure-Python exact reference of the strict (lossless) rule, DESIGN 4.1-4.2, with Fractions.

This is the specification in executable form, written from DESIGN.md alone: it does not import
``cascade_sd``. Laws are lists of ``fractions.Fraction``; every probability below is exact.

One node with target law ``p`` and drafter law ``q``:

- **point-mass siblings** ``x_1, x_2, ...`` (tree order; a duplicate of an already-rejected
  token is skipped): with residual ``p_j`` (``p_1 = p``) accept ``x_j`` with ``p_j(x_j)``; on
  rejection ``p_{j+1}`` = ``p_j`` with ``x_j`` removed, renormalised;
- **sampled siblings**: ``n`` candidates drawn from ``q`` without replacement; with residual
  ``p_j`` and proposal ``q_j`` (``q_1 = q``) the candidate ``x ~ q_j`` is accepted with
  ``min(1, p_j(x)/q_j(x))``; on rejection ``p_{j+1} = norm(max(p_j - q_j, 0))`` and
  ``q_{j+1}`` = ``q_j`` without ``x``, renormalised. Fewer than ``n`` candidates are drawn when
  ``q``'s support runs out;
- after the last sibling is rejected the bonus token is drawn from the final residual.

``node_law_*`` return a :class:`NodeOutcome`: the law of the emitted token split into the part
emitted by accepting a sibling and the part emitted as the bonus token.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

Law = list[Fraction]


@dataclass
class NodeOutcome:
    """Exact sub-laws of the emitted token: by acceptance, as the bonus, and their sum."""

    accepted: Law
    bonus: Law

    @property
    def law(self) -> Law:
        return [a + b for a, b in zip(self.accepted, self.bonus)]

    @property
    def accept_mass(self) -> Fraction:
        """Probability that some sibling is accepted."""
        return sum(self.accepted, Fraction(0))


def _exact(law: Sequence) -> Law:
    out = [Fraction(v) for v in law]
    assert all(v >= 0 for v in out), "a law has a negative entry"
    assert sum(out) == 1, "a law must sum to exactly 1"
    return out


def normalise(mass: Sequence[Fraction]) -> Law:
    """``mass / sum(mass)``; the sum must be positive."""
    total = sum(mass, Fraction(0))
    assert total > 0, "cannot normalise an empty mass"
    return [v / total for v in mass]


def without(law: Sequence[Fraction], x: int) -> Law:
    """``law`` with token ``x`` removed, renormalised; all zeros when nothing else is left."""
    rest = [Fraction(0) if i == x else v for i, v in enumerate(law)]
    return normalise(rest) if sum(rest) > 0 else [Fraction(0)] * len(law)


# --- point-mass siblings -----------------------------------------------------------------


def point_accept_prob(p_j: Sequence[Fraction], x: int) -> Fraction:
    """Acceptance probability of a point-mass candidate: ``p_j(x)``."""
    return Fraction(p_j[x])


def point_residual(p_j: Sequence[Fraction], x: int) -> Law:
    """Residual after rejecting point mass ``x``: ``p_j`` without ``x``, renormalised."""
    return without(p_j, x)


def node_law_point_masses(p: Sequence, candidates: Sequence[int]) -> NodeOutcome:
    """Exact law of the emitted token for point-mass siblings ``candidates`` (duplicates skipped)."""
    p = _exact(p)
    vocab = len(p)
    accepted = [Fraction(0)] * vocab
    weight = Fraction(1)  # probability that every sibling so far was rejected
    p_j = p
    rejected: set[int] = set()
    for x in candidates:
        if x in rejected:
            continue  # duplicate of a rejected token: skipped (DESIGN 4.1)
        a = point_accept_prob(p_j, x)
        accepted[x] += weight * a
        weight *= 1 - a
        rejected.add(x)
        if weight == 0:
            break  # every later branch has probability 0
        p_j = point_residual(p_j, x)
    bonus = [weight * v for v in p_j]
    return NodeOutcome(accepted=accepted, bonus=bonus)


# --- sampled siblings (without replacement) ----------------------------------------------


def sampled_accept_prob(p_j: Sequence[Fraction], q_j: Sequence[Fraction], x: int) -> Fraction:
    """Acceptance probability of a candidate drawn from ``q_j``: ``min(1, p_j(x)/q_j(x))``."""
    assert q_j[x] > 0, "a sampled candidate has positive proposal probability"
    return min(Fraction(1), Fraction(p_j[x]) / Fraction(q_j[x]))


def sampled_residual(p_j: Sequence[Fraction], q_j: Sequence[Fraction]) -> Law:
    """Residual target after a rejection: ``norm(max(p_j - q_j, 0))``."""
    return normalise([max(a - b, Fraction(0)) for a, b in zip(p_j, q_j)])


def sampled_next_proposal(q_j: Sequence[Fraction], x: int) -> Law:
    """Next proposal after drawing ``x``: ``q_j`` without ``x``, renormalised (all zeros if empty)."""
    return without(q_j, x)


def draw_sequences(q: Sequence, n: int) -> list[tuple[tuple[int, ...], Fraction]]:
    """Every ordered sequence of up to ``n`` distinct draws from ``q`` without replacement and
    its probability (shorter only when ``q``'s support runs out); probabilities sum to 1."""
    q = _exact(q)
    out: list[tuple[tuple[int, ...], Fraction]] = []

    def visit(seq: tuple[int, ...], prob: Fraction, q_j: Law) -> None:
        if len(seq) == n or sum(q_j) == 0:
            out.append((seq, prob))
            return
        for x, qx in enumerate(q_j):
            if qx > 0:
                visit(seq + (x,), prob * qx, without(q_j, x))

    visit((), Fraction(1), q)
    return out


def node_law_sampled(p: Sequence, q: Sequence, n: int) -> NodeOutcome:
    """Exact law of the emitted token for ``n`` siblings sampled from ``q`` without replacement.

    Enumerates every ordered draw sequence (``draw_sequences``) and, along each, every
    accept/reject outcome of the strict rule.
    """
    p, q = _exact(p), _exact(q)
    assert n >= 1
    vocab = len(p)
    accepted = [Fraction(0)] * vocab
    bonus = [Fraction(0)] * vocab
    for seq, prob in draw_sequences(q, n):
        weight = prob  # probability of this draw sequence and of every sibling so far rejected
        p_j, q_j = p, q
        for x in seq:
            a = sampled_accept_prob(p_j, q_j, x)
            accepted[x] += weight * a
            weight *= 1 - a
            if weight == 0:
                break
            # Rejection has positive probability only if p_j(x) < q_j(x), so the residual has mass.
            p_j, q_j = sampled_residual(p_j, q_j), sampled_next_proposal(q_j, x)
        if weight:
            for i, v in enumerate(p_j):
                bonus[i] += weight * v
    return NodeOutcome(accepted=accepted, bonus=bonus)
