"""Reusable hypothesis strategies for acceptance-rule tests (strict now, relaxed rules later).

Every law is built from a list of non-negative integer (or, for generic float laws, float)
weights over a vocabulary, with a *shape* picked at random so that the corner cases show up
often: exact zeros, point masses, uniform and near-uniform laws, very peaked laws. Pairs
``(p, q)`` additionally pick a *relation* between the two supports (independent, equal laws,
q's support inside p's, p's inside q's, disjoint, partly overlapping).

- ``laws(vocab)`` / ``rational_laws(vocab)``: one law as a float64 tensor / a list of
  ``fractions.Fraction`` summing to exactly 1;
- ``law_pairs(vocab=None)`` / ``rational_law_pairs(vocab=None)``: ``(p, q)`` over the same
  vocabulary (drawn from 2..8 when not given);
- ``candidate_lists(vocab)``: candidate tokens for point-mass siblings, duplicates allowed.

The module does not import ``cascade_sd``: strategies describe inputs, not the implementation.
"""

from __future__ import annotations

from fractions import Fraction

import torch
from hypothesis import strategies as st

MIN_VOCAB = 2
MAX_VOCAB = 8

#: Shapes of a law on its support.
SHAPES = ("generic", "sparse", "point", "uniform", "near_uniform", "peaked")
#: Relations between the supports of p and q in a pair.
RELATIONS = ("independent", "equal", "q_inside_p", "p_inside_q", "disjoint", "overlap")


def vocab_sizes(min_vocab: int = MIN_VOCAB, max_vocab: int = MAX_VOCAB) -> st.SearchStrategy[int]:
    """Vocabulary sizes (default 2..8: small enough to enumerate every draw sequence)."""
    return st.integers(min_vocab, max_vocab)


def _ensure_mass(draw, weights: list, support: list[int]) -> list:
    """Give one support token weight 1 when the drawn weights are all zero."""
    if not any(w > 0 for w in weights):
        weights[draw(st.sampled_from(support))] = 1
    return weights


@st.composite
def _zeroed(draw, support: list[int]) -> set[int]:
    """Tokens of the support to zero out: each with chance about 1/4, never all of them."""
    out = {i for i in support if draw(st.sampled_from((False, False, False, True)))}
    if len(out) == len(support):
        out.discard(draw(st.sampled_from(support)))
    return out


@st.composite
def integer_weights(draw, vocab: int, support: list[int] | None = None, shape: str | None = None) -> list[int]:
    """Non-negative integer weights over ``range(vocab)``, zero outside ``support``, not all zero."""
    support = list(range(vocab)) if support is None else sorted(support)
    assert support, "support must be non-empty"
    shape = draw(st.sampled_from(SHAPES)) if shape is None else shape
    w = [0] * vocab
    if shape == "point":
        w[draw(st.sampled_from(support))] = 1
    elif shape == "uniform":
        for i in support:
            w[i] = 1
    elif shape == "near_uniform":
        for i in support:
            w[i] = 1000 + draw(st.integers(-3, 3))
    elif shape == "peaked":
        top = draw(st.sampled_from(support))
        for i in support:
            w[i] = draw(st.integers(0, 3))
        w[top] = 10 ** draw(st.integers(6, 12))
    elif shape == "sparse":
        for i in support:
            w[i] = draw(st.sampled_from([0, 0, 1, 2, 5, 17, 100]))
    else:  # generic: positive weights, some tokens of the support zeroed
        for i in support:
            w[i] = draw(st.integers(1, 10**6))
        for i in draw(_zeroed(support)):
            w[i] = 0
    return _ensure_mass(draw, w, support)


@st.composite
def float_weights(draw, vocab: int, support: list[int] | None = None) -> list[float]:
    """Float weights: the integer shapes, or generic floats in [0, 1] with exact zeros."""
    support = list(range(vocab)) if support is None else sorted(support)
    if draw(st.booleans()):
        return [float(v) for v in draw(integer_weights(vocab, support))]
    w = [0.0] * vocab
    unit = st.floats(1e-12, 1.0, allow_nan=False, allow_infinity=False, allow_subnormal=False)
    for i in support:
        w[i] = draw(st.one_of(unit, st.floats(1e-9, 1e-3)))
    for i in draw(_zeroed(support)):
        w[i] = 0.0
    return _ensure_mass(draw, w, support)


def to_float_law(weights: list) -> torch.Tensor:
    """Normalised float64 tensor from non-negative weights (ints, floats or Fractions)."""
    t = torch.tensor([float(v) for v in weights], dtype=torch.float64)
    return t / t.sum()


def to_rational_law(weights: list[int]) -> list[Fraction]:
    """Normalised exact law from non-negative integer weights: sums to exactly 1."""
    total = sum(weights)
    return [Fraction(v, total) for v in weights]


def laws(vocab: int, support: list[int] | None = None) -> st.SearchStrategy[torch.Tensor]:
    """A float64 probability vector [vocab] (zero outside ``support`` when given)."""
    return float_weights(vocab, support).map(to_float_law)


def rational_laws(vocab: int, support: list[int] | None = None) -> st.SearchStrategy[list[Fraction]]:
    """A list of ``vocab`` Fractions summing to exactly 1 (zero outside ``support`` when given)."""
    return integer_weights(vocab, support).map(to_rational_law)


@st.composite
def supports(draw, vocab: int, relation: str | None = None) -> tuple[list[int], list[int], str]:
    """Supports (allowed non-zero tokens) of p and q for a relation; returns (sp, sq, relation).

    The laws drawn on these supports may still put exact zeros inside them.
    """
    relation = draw(st.sampled_from(RELATIONS)) if relation is None else relation
    tokens = list(range(vocab))
    perm = draw(st.permutations(tokens))
    # Sizes are drawn as "vocab minus a small number" so that large supports stay common.
    if relation in ("q_inside_p", "p_inside_q"):
        outer = vocab - draw(st.integers(0, vocab - 2))  # >= 2
        inner = outer - draw(st.integers(1, outer - 1))  # strictly smaller, >= 1
        big, small = perm[:outer], perm[:inner]
        sp, sq = (big, small) if relation == "q_inside_p" else (small, big)
    elif relation == "disjoint":
        cut = draw(st.sampled_from(range(1, vocab)))
        sp, sq = perm[:cut], perm[cut:]
        if draw(st.booleans()):
            sq = sq[: len(sq) - draw(st.integers(0, len(sq) - 1))]
    elif relation == "overlap":
        a = vocab - draw(st.integers(0, vocab - 1))
        b = draw(st.integers(0, a - 1))
        sp, sq = perm[:a], perm[b:]
    else:  # independent, equal
        sp, sq = tokens, tokens
    return sorted(sp), sorted(sq), relation


@st.composite
def law_pairs(draw, vocab: int | None = None, relation: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, q)`` float64 laws over the same vocabulary (2..8 unless given), related as drawn."""
    vocab = draw(vocab_sizes()) if vocab is None else vocab
    sp, sq, relation = draw(supports(vocab, relation))
    p = draw(laws(vocab, sp))
    q = p.clone() if relation == "equal" else draw(laws(vocab, sq))
    return p, q


@st.composite
def rational_law_pairs(
    draw, vocab: int | None = None, relation: str | None = None
) -> tuple[list[Fraction], list[Fraction]]:
    """``(p, q)`` exact laws (Fractions summing to 1) over the same vocabulary, related as drawn."""
    vocab = draw(vocab_sizes()) if vocab is None else vocab
    sp, sq, relation = draw(supports(vocab, relation))
    p = draw(rational_laws(vocab, sp))
    q = list(p) if relation == "equal" else draw(rational_laws(vocab, sq))
    return p, q


@st.composite
def candidate_lists(draw, vocab: int, min_size: int = 1, max_size: int | None = None) -> list[int]:
    """Candidate tokens (point-mass siblings) in tree order; duplicates allowed and frequent."""
    max_size = 2 * vocab if max_size is None else max_size
    pool = list(range(vocab))
    if draw(st.booleans()):  # a small pool makes repeats likely
        pool = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=max(1, vocab // 2), unique=True))
    return draw(st.lists(st.sampled_from(pool), min_size=min_size, max_size=max_size))
