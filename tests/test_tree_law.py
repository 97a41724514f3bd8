"""Exact (enumerated) law of what one verified draft tree emits, for random small trees.

Through the strict rule's own methods, enumerate every draft draw (children sampled without
replacement from the drafter law at their parent, or q's top tokens as point masses) and every
accept/reject outcome; complete the emitted tokens with the target's own conditionals up to a
fixed length. The result must equal the target's joint law exactly (to 1e-12): the first
emitted token and the whole emitted path follow p.
"""

import itertools
from collections import defaultdict

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade_sd.acceptance import NodeContext, get_rule

RULE = get_rule("strict")


def random_law(key: tuple[int, ...], seed: int, vocab: int, sparse: bool) -> torch.Tensor:
    """A deterministic pseudo-random law for a prefix (same prefix → same law)."""
    g = torch.Generator().manual_seed(hash((seed,) + key) % (2**31))
    w = torch.rand(vocab, generator=g, dtype=torch.float64) ** 3
    if sparse:
        w[torch.rand(vocab, generator=g) < 0.3] = 0.0
        if w.sum() == 0:
            w[int(torch.randint(vocab, (1,), generator=g))] = 1.0
    return w / w.sum()


def complete(prefix, prob, length, p_fn, out):
    """Extend ``prefix`` with the target's conditionals to ``length`` tokens, accumulating into ``out``."""
    if len(prefix) == length:
        out[prefix] += prob
        return
    law = p_fn(prefix)
    for x in range(len(law)):
        if law[x] > 0:
            complete(prefix + (x,), prob * float(law[x]), length, p_fn, out)


def emit(prefix, node, prob, children, sampled, p_fn, q_fn, length, out, depth=1):
    """Enumerate the walk at a tree node whose emitted prefix is ``prefix``."""
    kids = children.get(node, [])
    p = p_fn(prefix).unsqueeze(0)
    if not kids:
        complete(prefix, prob, length, p_fn, out)  # leaf: bonus token from the fresh law p
        return
    q = q_fn(prefix).unsqueeze(0)
    ctx = NodeContext(depth=depth)

    def step(state, draw, j, weight, tried):
        if j == len(kids) or (sampled and draw.sum() <= 0):
            bonus = RULE.bonus_law(state, ctx)[0]
            for x in range(len(bonus)):
                if bonus[x] > 0:
                    complete(prefix + (x,), weight * float(bonus[x]), length, p_fn, out)
            return
        if sampled:
            options = [(x, float(draw[0, x])) for x in range(draw.shape[-1]) if draw[0, x] > 0]
        else:
            options = [(int(torch.argsort(q[0], descending=True, stable=True)[j]), 1.0)]
        for x, w in options:
            xs = torch.tensor([x])
            a = float(RULE.accept_prob(state, xs, ctx)[0])
            if a > 0:
                emit(prefix + (x,), kids[j], weight * w * a, children, sampled, p_fn, q_fn, length, out, depth + 1)
            if a < 1:
                nxt = draw.clone()
                nxt[0, x] = 0
                nxt = nxt / nxt.sum() if nxt.sum() > 0 else nxt
                step(RULE.reject(state, xs, ctx), nxt, j + 1, weight * w * (1 - a), tried | {x})

    step(RULE.start(p, q, sampled, ctx), q.clone(), 0, prob, frozenset())


@st.composite
def trees(draw):
    """Random rank-path topologies: node → ordered child list, up to depth 3."""
    children: dict[int, list[int]] = {}
    nxt = 1
    frontier = [(0, 0)]
    while frontier:
        node, d = frontier.pop(0)
        if d == 3:
            continue
        k = draw(st.integers(0 if node else 1, 3))
        children[node] = list(range(nxt, nxt + k))
        frontier += [(c, d + 1) for c in children[node]]
        nxt += k
    return children


@settings(max_examples=25)
@given(children=trees(), vocab=st.integers(2, 4), seed=st.integers(0, 10**6), sampled=st.booleans(),
       sparse=st.booleans())
def test_tree_emission_completed_by_target_equals_joint_law(children, vocab, seed, sampled, sparse):
    length = 4
    p_fn = lambda pre: random_law(pre, seed, vocab, sparse)
    q_fn = lambda pre: random_law(pre, seed + 1, vocab, sparse)
    out: dict[tuple[int, ...], float] = defaultdict(float)
    emit((), 0, 1.0, children, sampled, p_fn, q_fn, length, out)
    truth: dict[tuple[int, ...], float] = defaultdict(float)
    complete((), 1.0, length, p_fn, truth)
    for seq in itertools.product(range(vocab), repeat=length):
        assert abs(out[seq] - truth[seq]) < 1e-12, (seq, out[seq], truth[seq])
