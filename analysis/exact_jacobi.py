"""Exact output laws of Jacobi-family decoding on toy bundles (DESIGN 5b, 6; issue 24 item 2).

The sampler's state between rounds is the committed prefix *and* the window: every column's candidates
and the law q they were drawn from. The recursion runs over (prefix, window) states. Each round is built
by the engine's own phases from a given window (``SpeculativeEngine.round_at`` drafts from the Jacobi
source's state), its walk is enumerated by ``exact_toy.enumerated_walk`` (every coin, every bonus), and
the next window's law is enumerated here from DESIGN 5b's description of each variant, without the
sampler's code: independent redraws from the stale law (SJD), the maximal coupling to the old draft
(SCD-MC; the reference code's old q for a kept token), candidates without replacement (SJD-PAC's tree
columns) and fresh columns (uniform token, one-hot or uniform q). SCD's Gumbel sharing keeps a
continuous noise table in its state and is covered by the chi-square tests instead.

Node drift is exact too: a verified node's law is its walk's emission averaged over the draws of its own
children (the column below it, given that column's q and the rest of the state), the quantity the
engine's drift recorder marginalises.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import replace

import torch

from analysis.exact_toy import JointLaw, _draw_prob, enumerated_walk, hybrid_bound, target_conditionals, toy_engine
from cascade_sd import api
from cascade_sd.errors import ConfigError
from cascade_sd.metrics.drift import tv_distance

#: A column: (candidates, key of its q in the law table); a window: one column per position.
Column = tuple[tuple[int, ...], tuple[float, ...]]


def _column_options(spec, c: int, vocab: int, stale: torch.Tensor | None, q_old: torch.Tensor | None,
                    d_old: int | None) -> list[tuple[Column, float]]:
    """Every value of new column ``c`` with its probability, given its stale law, old q and old draft."""
    tree_col = c < spec.tree_columns
    if stale is None:  # a fresh column: a uniform token (or W of them), one-hot or uniform q
        uniform = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
        if spec.init == "uniform":
            width = min(spec.candidates if tree_col else 1, vocab)
            return [((seq, tuple(uniform.tolist())), _draw_prob(uniform, seq))
                    for seq in itertools.permutations(range(vocab), width)]
        return [(((t,), tuple(torch.nn.functional.one_hot(torch.tensor(t), vocab).double().tolist())), 1.0 / vocab)
                for t in range(vocab)]
    key = tuple(stale.tolist())
    support = torch.nonzero(stale > 0).flatten().tolist()
    if tree_col:  # SJD-PAC's tree column: W candidates without replacement from the stale law
        width = min(spec.candidates, len(support))
        return [((seq, key), _draw_prob(stale, seq)) for seq in itertools.permutations(support, width)]
    if spec.variant == "sjd" or d_old is None:  # an independent draw (also where no old draft exists)
        return [(((t,), key), float(stale[t])) for t in support]
    accept = min(1.0, float(stale[d_old]) / float(q_old[d_old]))
    residual = (stale - q_old).clamp_min(0.0)
    residual = residual / residual.sum() if float(residual.sum()) > 0 else stale
    kept_key = tuple(q_old.tolist()) if spec.code == "reference-code" else key
    out = [(((d_old,), kept_key), accept)]
    out += [(((t,), key), (1.0 - accept) * float(residual[t])) for t in range(vocab) if residual[t] > 0]
    return out


def _window_law(spec, vocab: int, stale: list, q_old: list, d_old: list) -> list[tuple[tuple[Column, ...], float]]:
    """The joint law of the next window: columns are redrawn independently given the round."""
    options = [_column_options(spec, c, vocab, stale[c], q_old[c], d_old[c]) for c in range(len(stale))]
    out = []
    for combo in itertools.product(*options):
        prob = 1.0
        for _, pr in combo:
            prob *= pr
        if prob > 0:
            out.append((tuple(col for col, _ in combo), prob))
    return out


def _set_window(source, window: tuple[Column, ...]) -> None:
    """Load one window into the engine's Jacobi source (batch of one row)."""
    w = source.spec.candidates
    cand = torch.zeros(1, len(window), w, dtype=torch.long)
    exists = torch.zeros(1, len(window), w, dtype=torch.bool)
    for c, (seq, _) in enumerate(window):
        cand[0, c, : len(seq)] = torch.tensor(seq)
        exists[0, c, : len(seq)] = True
    source.cand, source.exists = cand, exists
    source.q = torch.tensor([[key for _, key in window]], dtype=torch.float64)


def _path(tree, block: tuple[int, ...]) -> list[int]:
    """The nodes the walk accepted for an emitted block (siblings hold distinct tokens): root first."""
    nodes = [0]
    for x in block[:-1]:
        kids = [k for k in tree.children[0, nodes[-1]].tolist() if k >= 0 and int(tree.tokens[0, k]) == x]
        nodes.append(kids[0])
    return nodes


def exact_jacobi_law(bundle: api.Bundle, label: int, *, jacobi: dict | str, method: str = "strict",
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, cfg_scale: float = 1.0,
                     **rule_params) -> JointLaw:
    """The exact law over whole sequences of Jacobi-family decoding for one label, its hybrid bound and its node
    drift (run the bundle in float64)."""
    spec = api.jacobi_spec(api.JACOBI, jacobi)
    if spec.variant == "scd-gumbel":
        raise ConfigError("exact_jacobi_law: jacobi='scd-gumbel' keeps a continuous noise table in its state; "
                          "its law is checked by sampling (tests/test_jacobi.py)")
    engine = toy_engine(bundle, method=method, tree=api.WINDOW, drafter=api.JACOBI, jacobi=spec,
                        temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale, **rule_params)
    source, rule = engine.jacobi, engine.rule
    n, vocab = bundle.target.config.block_size, bundle.target.config.vocab_size
    cols = source.columns
    conditionals = target_conditionals(bundle, label, temperature=temperature, top_k=top_k, top_p=top_p,
                                       cfg_scale=cfg_scale)
    first = conditionals[()]
    cond = torch.tensor([label])
    fresh = _window_law(spec, vocab, [None] * cols, [None] * cols, [None] * cols)
    frontier: dict = defaultdict(float)
    for y in torch.nonzero(first > 0).flatten().tolist():
        for window, prob in fresh:
            frontier[((y,), window)] += float(first[y]) * prob
    law: dict[tuple[int, ...], float] = defaultdict(float)
    forwards: dict = {}  # the target's outputs depend on the prefix and the window's tokens, not on its q
    nodes: dict = {}  # (prefix, node, the rest of the state, its children's q) → [position, reach, mass, Σ mass·law, p]
    while frontier:
        nxt: dict = defaultdict(float)
        for (prefix, window), prob in frontier.items():
            _set_window(source, window)
            tokens = (prefix, tuple(seq for seq, _ in window))
            if tokens not in forwards:
                forwards[tokens] = engine.round_at(cond, torch.tensor([prefix]))
            tree, p, view, prepared = forwards[tokens]
            tree = source.draft(tree.tokens[:, 0], tree.ancestors)  # this window's q
            if view is not None:
                view = replace(view, tree=tree)
            blocks, visits = enumerated_walk(rule, tree, p, view, prepared, n - 1 - len(prefix))
            for node, depth, reach, emits in visits:  # a node at walk depth d draws its children from column d − 1
                c = depth - 1
                key = (prefix, node, window[:c] + window[c + 1:], window[c][1])
                group = nodes.setdefault(key, [len(prefix) + depth - 1, reach, 0.0, torch.zeros_like(emits),
                                               p[0, node].double()])
                if abs(group[1] - reach) > 1e-9:
                    raise AssertionError(f"reach of node {node} depends on its own children's draws")
                group[2] += prob
                group[3] += prob * emits
            for block, p_block in blocks:
                seq = prefix + block
                if len(seq) >= n:
                    law[seq[:n]] += prob * p_block
                    continue
                # The first-child path below the last accepted node: stale laws, old q and old drafts.
                below, node = [], _path(tree, block)[-1]
                for _ in range(cols + 1):
                    node = int(tree.children[0, node, 0]) if node >= 0 else -1
                    below.append(node)
                stale = [p[0, v].double() if v >= 0 else None for v in below[:cols]]
                q_old = [tree.q[0, v].double() if v >= 0 else None for v in below[:cols]]
                d_old = [int(tree.tokens[0, below[c + 1]]) if below[c] >= 0 and below[c + 1] >= 0 else None
                         for c in range(cols)]
                for new, p_new in _window_law(spec, vocab, stale, q_old, d_old):
                    nxt[(seq, new)] += prob * p_block * p_new
        frontier = nxt
    by_position = [0.0] * n
    for position, reach, mass, total, p_node in nodes.values():
        if mass > 0:
            by_position[position] += reach * mass * float(tv_distance(total / mass, p_node))
    law = dict(law)
    return JointLaw(law=law, hybrid_bound=hybrid_bound(law, conditionals), node_drift_sum=sum(by_position),
                    node_drift_by_position=by_position)
