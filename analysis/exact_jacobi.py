"""Exact output laws of Jacobi-family decoding on toy bundles (DESIGN 5b, 6; issue 24 item 2).

The sampler's state between rounds is the committed prefix *and* the window: every column's candidates
and the law q they were drawn from. The recursion runs over (prefix, window) states. Each round is built
by the engine's own phases from a given window (``SpeculativeEngine.round_at`` drafts from the Jacobi
source's state), its walk is enumerated by ``exact_toy.enumerated_walk`` (every coin, every bonus), and
the next window's law is enumerated here from DESIGN 5b's description of each variant, without the
sampler's code: independent redraws from the stale law (SJD), the maximal coupling to the old draft
(SCD-MC; the reference code's old q for a kept token), candidates without replacement (SJD-PAC's tree
columns) and fresh columns (uniform token, one-hot or uniform q). SJD-PAC's reference code is enumerated
round by round from its own verification and redraft (``_pac_reference_round``). SCD's Gumbel sharing keeps a
continuous noise table in its state and is covered by the chi-square tests instead.

Node drift is exact too: a verified node's law is its walk's emission averaged over the draws of its own
children, the column below it, given everything those draws do not produce (DESIGN 6): the prefix, the
earlier columns and the law the column's last redraft read. That law is its recorded q, except where
the reference code records an old q for a kept token: then the fresh token and the keeps are the
column's own draws, and its law is averaged over them given the stale laws its redrafts read (what
``keep_mixture`` tracks in the engine). Later columns are left out: an SCD-MC column's redraft read this
column's old token, which a kept token still is. SJD-PAC's reference code does not walk and has no node
laws (NaN); its sequence law is exact.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import replace

import torch

from analysis.exact_toy import JointLaw, _draw_prob, enumerated_walk, hybrid_bound, target_conditionals, toy_engine
from cascade_sd import api
from cascade_sd.acceptance.base import normalise
from cascade_sd.errors import ConfigError
from cascade_sd.metrics.drift import tv_distance

#: A column: (candidates, its recorded q, what its node law is conditioned on: the stale p its last redraft
#: read, or q for a fresh column; for the reference code's SCD-MC the tagged history of every stale p its
#: redrafts read); a window: one column per position. Laws are tuples of floats (hashable keys).
Column = tuple[tuple[int, ...], tuple[float, ...], tuple]


def _column_options(spec, c: int, vocab: int, stale: torch.Tensor | None, q_old: torch.Tensor | None,
                    d_old: int | None, old_key: tuple = ()) -> list[tuple[Column, float]]:
    """Every value of new column ``c`` with its probability, given its stale law, old q, old draft and the
    old column's conditioning key."""
    tree_col = c < spec.tree_columns
    if stale is None:  # a fresh column: a uniform token (or W of them), one-hot or uniform q
        uniform = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
        if spec.init == "uniform":
            width = min(spec.candidates if tree_col else 1, vocab)
            key = tuple(uniform.tolist())
            return [((seq, key, key), _draw_prob(uniform, seq)) for seq in itertools.permutations(range(vocab), width)]
        one_hot = [tuple(torch.nn.functional.one_hot(torch.tensor(t), vocab).double().tolist()) for t in range(vocab)]
        return [(((t,), one_hot[t], one_hot[t]), 1.0 / vocab) for t in range(vocab)]
    key = tuple(stale.tolist())
    support = torch.nonzero(stale > 0).flatten().tolist()
    if tree_col:  # SJD-PAC's tree column: W candidates without replacement from the stale law
        width = min(spec.candidates, len(support))
        return [((seq, key, key), _draw_prob(stale, seq)) for seq in itertools.permutations(support, width)]
    given = key  # the reference SCD-MC's q is a keep's outcome: condition on its stale laws, all of them
    if spec.code == "reference-code":
        given = (old_key if old_key[:1] == ("history",) else ("history",)) + (key,)
    if spec.variant == "sjd" or d_old is None:  # an independent draw (also where no old draft exists)
        return [(((t,), key, given), float(stale[t])) for t in support]
    accept = min(1.0, float(stale[d_old]) / float(q_old[d_old]))
    residual = (stale - q_old).clamp_min(0.0)
    residual = residual / residual.sum() if float(residual.sum()) > 0 else stale
    kept_key = tuple(q_old.tolist()) if spec.code == "reference-code" else key
    out = [(((d_old,), kept_key, given), accept)]
    out += [(((t,), key, given), (1.0 - accept) * float(residual[t])) for t in range(vocab) if residual[t] > 0]
    return out


def _window_law(spec, vocab: int, stale: list, q_old: list, d_old: list, old_key: list
                ) -> list[tuple[tuple[Column, ...], float]]:
    """The joint law of the next window: columns are redrawn independently given the round."""
    return _product([_column_options(spec, c, vocab, stale[c], q_old[c], d_old[c], old_key[c])
                     for c in range(len(stale))])


def _product(options: list[list[tuple[Column, float]]]) -> list[tuple[tuple[Column, ...], float]]:
    """The joint law of independent columns."""
    out = []
    for combo in itertools.product(*options):
        prob = 1.0
        for _, pr in combo:
            prob *= pr
        if prob > 0:
            out.append((tuple(col for col, _ in combo), prob))
    return out


def _draws(law: torch.Tensor, width: int, key: tuple[float, ...]) -> list[tuple[Column, float]]:
    """Every ordered draw of ``width`` tokens without replacement from ``law`` (fewer where its support ends)."""
    support = torch.nonzero(law > 0).flatten().tolist()
    width = min(width, len(support))
    return [((seq, key, key), _draw_prob(law, seq)) for seq in itertools.permutations(support, width)]


def _pac_reference_round(spec, tree, p: torch.Tensor, limit: int, vocab: int):
    """Every outcome of SJD-PAC's reference-code round, read from its code (KangJialiang/SJD-PAC 4fbc099,
    SJDPACSpeculativeSampler L134–222; ../shared/jacobi_family.md §4.3–4.4): (emitted block, probability,
    options of each next column). One coin per node against its sibling group's recursive residual target
    with the without-replacement q; the longest accepted row, lowest first; its new root from the last
    sibling's residual (p past a short row, or at the limit; uniform after the whole main path); past the
    commit a passed draft stays as branch 0 beside draws from its own residual, a failed one gives W draws
    from the last sibling's residual, each with q := the stale p."""
    tokens, parent, depth = tree.tokens[0].tolist(), tree.parent[0].tolist(), tree.depth[0].tolist()
    kids = [[k for k in row if k >= 0] for row in tree.children[0].tolist()]
    law_p, law_q = p[0].double(), tree.q[0].double()
    accept, last_res = {}, {}
    for n, group in enumerate(kids):
        p_b, removed = law_p[n], []
        for k in group:
            q_b = law_q[n].clone()
            q_b[removed] = 0.0
            q_b = normalise(q_b, torch.zeros_like(q_b))
            x = tokens[k]
            accept[k] = min(1.0, float(p_b[x] / q_b[x])) if q_b[x] > 0 else float(p_b[x] > 0)
            last_res[n] = (p_b - q_b).clamp_min(0.0)
            p_b = normalise(last_res[n], p_b)
            removed.append(x)
    main = [0]
    while kids[main[-1]]:
        main.append(kids[main[-1]][0])
    uniform = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
    drafted = sorted(accept)

    def row_node(last: int, e: int):
        """The committed row's node at depth e: below the last accepted node by first children, then the pad
        of a shorter row at depth D and row 0's chain past it; None past the window."""
        if e <= depth[last]:
            node = last
            while depth[node] > e:
                node = parent[node]
            return node
        node = last
        for d in range(depth[last] + 1, e + 1):
            if node not in ("pad", None) and kids[node]:
                node = kids[node][0]
            elif node not in ("pad", None) and node not in main and d == spec.depth:
                node = "pad"
            else:
                node = main[d] if d < len(main) else None
        return node

    for pattern in itertools.product((True, False), repeat=len(drafted)):
        passed = dict(zip(drafted, pattern))
        weight = 1.0
        for k in drafted:
            weight *= accept[k] if passed[k] else 1.0 - accept[k]
        if weight == 0.0:
            continue
        ok = {0: True}
        for k in drafted:  # node order: parents first
            ok[k] = passed[k] and ok[parent[k]] and depth[k] <= limit
        last = max((n for n in ok if ok[n]), key=lambda n: (depth[n], -n))
        a = depth[last]
        if a >= limit or (not kids[last] and last != main[-1]):
            root_law = law_p[last]
        elif kids[last]:
            root_law = normalise(last_res[last], law_p[last])
        else:
            root_law = uniform
        options = []
        for c in range(len(main) - 1):
            width = spec.candidates if c < spec.tree_columns else 1
            e = a + 2 + c
            par, x = row_node(last, e - 1), row_node(last, e)
            par = main[spec.depth] if par == "pad" else par
            if par is None or x is None:
                options.append(_column_options(spec, c, vocab, None, None, None))
                continue
            key = tuple(law_p[par].tolist())
            if x == "pad":
                options.append(_draws(law_p[par], width, key))
            elif passed[x]:
                own = normalise((law_p[par] - law_q[par]).clamp_min(0.0), law_p[par])
                options.append([(((tokens[x],) + seq, key, key), pr) for (seq, *_), pr in _draws(own, width - 1, key)])
            else:
                options.append(_draws(normalise(last_res[par], law_p[par]), width, key))
        path = [row_node(last, d) for d in range(1, a + 1)]
        for y in torch.nonzero(root_law > 0).flatten().tolist():
            yield tuple(tokens[v] for v in path) + (y,), weight * float(root_law[y]), options


def _set_window(source, window: tuple[Column, ...]) -> None:
    """Load one window into the engine's Jacobi source (batch of one row)."""
    w = source.spec.candidates
    cand = torch.zeros(1, len(window), w, dtype=torch.long)
    exists = torch.zeros(1, len(window), w, dtype=torch.bool)
    for c, (seq, *_) in enumerate(window):
        cand[0, c, : len(seq)] = torch.tensor(seq)
        exists[0, c, : len(seq)] = True
    source.cand, source.exists = cand, exists
    source.q = torch.tensor([[q for _, q, _ in window]], dtype=torch.float64)


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
    fresh = _window_law(spec, vocab, [None] * cols, [None] * cols, [None] * cols, [()] * cols)
    frontier: dict = defaultdict(float)
    for y in torch.nonzero(first > 0).flatten().tolist():
        for window, prob in fresh:
            frontier[((y,), window)] += float(first[y]) * prob
    law: dict[tuple[int, ...], float] = defaultdict(float)
    forwards: dict = {}  # the target's outputs depend on the prefix and the window's tokens, not on its q
    nodes: dict = {}  # (prefix, node, earlier columns, what the column is conditioned on) → [position, reach, mass,
    #                   Σ mass·law, p]
    while frontier:
        nxt: dict = defaultdict(float)
        for (prefix, window), prob in frontier.items():
            _set_window(source, window)
            tokens = (prefix, tuple(seq for seq, *_ in window))
            if tokens not in forwards:
                forwards[tokens] = engine.round_at(cond, torch.tensor([prefix]))
            tree, p, view, prepared = forwards[tokens]
            tree = source.draft(tree.tokens[:, 0], tree.ancestors)  # this window's q
            if spec.verifies_itself:  # SJD-PAC's reference code: its own verification, no walk, no node laws
                for block, p_block, options in _pac_reference_round(spec, tree, p, n - 1 - len(prefix), vocab):
                    seq = prefix + block
                    if len(seq) >= n:
                        law[seq[:n]] += prob * p_block
                        continue
                    for new, p_new in _product(options):
                        nxt[(seq, new)] += prob * p_block * p_new
                continue
            if view is not None:
                view = replace(view, tree=tree)
            blocks, visits = enumerated_walk(rule, tree, p, view, prepared, n - 1 - len(prefix))
            for node, depth, reach, emits in visits:  # a node at walk depth d draws its children from column d − 1
                c = depth - 1
                key = (prefix, node, window[:c], window[c][2])
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
                old_key = [window[int(tree.depth[0, below[c + 1]]) - 1][2] if d_old[c] is not None else ()
                           for c in range(cols)]
                for new, p_new in _window_law(spec, vocab, stale, q_old, d_old, old_key):
                    nxt[(seq, new)] += prob * p_block * p_new
        frontier = nxt
    by_position = [float("nan") if spec.verifies_itself else 0.0] * n
    for position, reach, mass, total, p_node in nodes.values():
        if mass > 0:
            by_position[position] += reach * mass * float(tv_distance(total / mass, p_node))
    law = dict(law)
    return JointLaw(law=law, hybrid_bound=hybrid_bound(law, conditionals), node_drift_sum=sum(by_position),
                    node_drift_by_position=by_position)
