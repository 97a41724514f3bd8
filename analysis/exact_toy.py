"""Exact output laws of whole sequences on toy bundles (DESIGN 6, issue 5 item 3).

The engine's output law is computed by recursion over rounds and prefixes: every round starts
from a committed prefix, builds its draft tree through the engine's own phases
(``SpeculativeEngine.round_at``), and the walk is enumerated through the rule's methods (every
accept/reject coin, every bonus token). Dynamic trees are a deterministic function of the
prefix; static trees are enumerated over every draft draw (children drawn without replacement
from q in rank order), level by level, which limits them to tiny trees and vocabularies.

Two sequence bounds are computed exactly. ``hybrid_bound`` = Σ_t E[TV(method's law of token t
given the emitted prefix, p(· | prefix))], from the joint law itself: TV(method, target) is at
most this (hybrid argument). ``node_drift_sum`` = E[Σ over verified nodes of TV(node law, p)],
the quantity drift recording measures on real runs; it is at least the hybrid bound by convexity.
The node law is what the enumerated walk emits at the node, averaged over every draw of the
node's subtree given the rest of the realised tree (the path, siblings, cousins): computed from
whole-tree realisations, each with the signals the engine gives that realisation, so it checks
the recorder's per-draw signals (``draw_extras``) without sharing their code.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator

import torch

from cascade_sd import api
from cascade_sd.acceptance import NodeContext
from cascade_sd.decoding.engine import SpeculativeEngine
from cascade_sd.decoding.jacobi import JacobiDrafting
from cascade_sd.decoding.processing import SamplingParams
from cascade_sd.decoding.tree import DraftTree, StaticTree
from cascade_sd.errors import ConfigError
from cascade_sd.metrics.drift import tv_distance

#: Enumeration guard: largest number of static-tree realisations per round.
MAX_REALISATIONS = 20000


@dataclass
class JointLaw:
    """Exact law over whole token sequences with the exact sequence bounds (module docstring)."""

    law: dict[tuple[int, ...], float]
    hybrid_bound: float
    node_drift_sum: float
    node_drift_by_position: list[float]  # E[TV of the node emitting position t], t = 0..n−1

    def tv(self, other: dict[tuple[int, ...], float]) -> float:
        """Exact TV distance to another sequence law."""
        keys = set(self.law) | set(other)
        return 0.5 * sum(abs(self.law.get(k, 0.0) - other.get(k, 0.0)) for k in keys)


def as_float64(bundle: api.Bundle) -> api.Bundle:
    """The bundle's target and drafters converted to float64 in place (for exact-law analyses)."""
    bundle.target.double()
    for drafter in bundle.drafters.values():
        drafter.double()
    return bundle


def _draw_prob(q: torch.Tensor, seq: tuple[int, ...]) -> float:
    """Probability of drawing ``seq`` in this order without replacement from q."""
    prob, left = 1.0, 1.0
    for x in seq:
        if left <= 0:
            return 0.0
        prob *= float(q[x]) / left
        left -= float(q[x])
    return prob


def realisations(engine: SpeculativeEngine, cond: torch.Tensor, prefix: torch.Tensor,
                  ) -> Iterator[tuple[DraftTree, torch.Tensor, object, object, float, torch.Tensor]]:
    """Every static draft-tree realisation with its probability and its drafted tokens [1, T+1] (−1 =
    not drawn), level by level, through ``round_at``."""
    tree: StaticTree = engine.tree
    n1 = tree.size + 1
    parent = tree.parent.tolist()
    depth = tree.node_depth.tolist()
    count = [0]

    def rec(forced: torch.Tensor, level: int, prob: float):
        out = engine.round_at(cond, prefix, forced=forced)
        if level > tree.depth:
            yield (*out, prob, forced)
            return
        drafted = out[0]
        groups: dict[int, list[int]] = {}
        for node in range(1, n1):
            if depth[node] == level:
                groups.setdefault(parent[node], []).append(node)
        options = []
        for par, kids in groups.items():
            if par != 0 and int(forced[0, par]) < 0:  # parent not drawn: nor are its children
                options.append([((), 1.0, kids)])
                continue
            q = drafted.q[0, par].double()
            support = torch.nonzero(q > 0).squeeze(-1).tolist()
            width = min(len(kids), len(support))
            options.append([(seq, _draw_prob(q, seq), kids) for seq in itertools.permutations(support, width)])
        for combo in itertools.product(*options):
            count[0] += 1
            if count[0] > MAX_REALISATIONS:
                raise ConfigError(f"exact static-tree enumeration exceeds {MAX_REALISATIONS} realisations; "
                                  "use a smaller tree or vocabulary")
            nxt, p_combo = forced.clone(), prob
            for seq, p_seq, kids in combo:
                p_combo *= p_seq
                for node, tok in zip(kids, list(seq) + [-1] * (len(kids) - len(seq))):
                    nxt[0, node] = tok
            if p_combo > 0:
                yield from rec(nxt, level + 1, p_combo)

    start = torch.full((1, n1), -1, dtype=torch.long)
    start[0, 0] = int(prefix[0, -1])
    yield from rec(start, 1, 1.0)


def enumerated_walk(rule, tree: DraftTree, p: torch.Tensor, view, prepared, limit: int
          ) -> tuple[list[tuple[tuple[int, ...], float]], list[tuple[int, int, float, torch.Tensor]]]:
    """Enumerated walk of one realised tree (mirrors ``walk_tree``): its (emitted block, probability)
    outcomes, and every verified node with its walk depth (it emits block position depth − 1), the
    probability the walk verifies it and the law it emits there given this realisation."""
    outcomes: list[tuple[tuple[int, ...], float]] = []
    visits: list[tuple[int, int, float, torch.Tensor]] = []
    q = tree.q[0]

    def rec(node: int, depth: int, accepted: int, emitted: tuple[int, ...], prob: float) -> None:
        kids = tree.children[0, node]
        kids = kids[kids >= 0]
        extras = rule.node_extras(prepared, view, torch.tensor([node]), kids[None]) if view is not None else {}
        ctx = NodeContext(depth=depth, n_candidates=len(kids), extras=extras)
        pn = p[0, node].double()
        if len(kids) == 0 or accepted >= limit:
            law = rule.bonus_law(rule.start(pn[None], q[node][None], tree.sampled, ctx), ctx)[0]
            for y in torch.nonzero(law > 0).squeeze(-1).tolist():
                outcomes.append((emitted + (y,), prob * float(law[y])))
            return
        emits = torch.zeros_like(pn)
        state = rule.start(pn[None], q[node][None].double(), tree.sampled, ctx)
        weight, rejected = 1.0, set()
        for kid in kids.tolist():
            x = int(tree.tokens[0, kid])
            if x in rejected:  # DESIGN 4.1: a sibling equal to a rejected one is skipped
                continue
            a = float(rule.accept_prob(state, torch.tensor([x]), ctx)[0])
            emits[x] += weight * a
            if a > 0:
                rec(kid, depth + 1, accepted + 1, emitted + (x,), prob * weight * a)
            weight *= 1 - a
            if weight <= 0:
                break
            state = rule.reject(state, torch.tensor([x]), ctx)
            rejected.add(x)
        if weight > 0:
            law = rule.bonus_law(state, ctx)[0]
            emits += weight * law
            for y in torch.nonzero(law > 0).squeeze(-1).tolist():
                outcomes.append((emitted + (y,), prob * weight * float(law[y])))
        visits.append((node, depth, prob, emits))

    rec(0, 1, 0, (), 1.0)
    return outcomes, visits


def _round_drift(found: list, walks: list, descendants: list[set[int]] | None) -> dict[int, float]:
    """E[Σ over the round's verified nodes at walk depth d of TV(node law, p)] per depth d: node laws
    averaged over the draws of each node's subtree given the rest of the realisation (``descendants``
    of every node; None for a dynamic tree, whose only realisation is the draft)."""
    groups: dict[tuple, list] = {}
    for (drafted, p, _, _, weight, forced), (_, visits) in zip(found, walks):
        for node, depth, reach, emits in visits:
            rest = () if descendants is None else tuple(
                int(t) for i, t in enumerate(forced[0].tolist()) if i not in descendants[node])
            group = groups.setdefault((node, rest), [depth, reach, 0.0, torch.zeros_like(emits), p[0, node].double()])
            if abs(group[1] - reach) > 1e-9:  # the walk reaches a node whatever its own subtree holds
                raise AssertionError(f"reach of node {node} depends on its subtree draws: {group[1]} vs {reach}")
            group[2] += weight
            group[3] += weight * emits
    by_depth: dict[int, float] = {}
    for depth, reach, mass, acc, pn in groups.values():
        if mass > 0:
            by_depth[depth] = by_depth.get(depth, 0.0) + reach * mass * float(tv_distance(acc / mass, pn))
    return by_depth


def toy_engine(bundle: api.Bundle, *, method: str = "strict", tree: str | StaticTree = "chain-2",
               drafter: str = "eagle", tree_top_k: int = 2, depth: int = 2, total_tokens: int = 4,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, cfg_scale: float = 1.0,
               jacobi: api.JacobiOptions = None, **rule_params) -> SpeculativeEngine:
    """The speculative engine of one setting on a bundle, its rule bound and its tree checked as ``api.decode``
    would (the engine whose rounds the exact laws enumerate); ``drafter='jacobi'`` drafts from a Jacobi window."""
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale)
    spec = api.jacobi_spec(drafter, jacobi)
    rule, shape, _ = api._rule_and_tree(bundle, method, api.WINDOW if spec else tree, drafter, params, tree_top_k,
                                        depth, total_tokens, rule_params, spec)
    source = (bundle.drafter(drafter) if spec is None
              else JacobiDrafting(spec, bundle.target.config.vocab_size, next(bundle.target.parameters()).device))
    return SpeculativeEngine(bundle.target, source, rule, shape, params)


def exact_joint_law(bundle: api.Bundle, label: int, *, method: str = "strict", tree: str | StaticTree = "chain-2",
                    drafter: str = "eagle", tree_top_k: int = 2, depth: int = 2, total_tokens: int = 4,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, cfg_scale: float = 1.0,
                    **rule_params) -> JointLaw:
    """The engine's exact law over whole sequences for one label, with its sequence bounds.

    Run the bundle in float64 (``as_float64``) so that "exact" means agreement to ~1e-15.
    """
    engine = toy_engine(bundle, method=method, tree=tree, drafter=drafter, tree_top_k=tree_top_k, depth=depth,
                        total_tokens=total_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        cfg_scale=cfg_scale, **rule_params)
    rule, shape = engine.rule, engine.tree
    n = bundle.target.config.block_size
    cond = torch.tensor([label])
    with torch.no_grad():
        first = engine._law(engine._prefill(engine._setup(cond)).logits[:, -1])[0].double()
    rounds: dict[tuple[int, ...], tuple[list[tuple[tuple[int, ...], float]], float]] = {}
    descendants = None
    if isinstance(shape, StaticTree):
        anc = engine.static_anc[0].cpu()  # anc[v, u]: u is an ancestor-or-self of v
        descendants = [set((anc[:, u].nonzero().flatten()).tolist()) - {u} for u in range(shape.size + 1)]

    def block_law(prefix: tuple[int, ...]) -> tuple[list[tuple[tuple[int, ...], float]], float]:
        if prefix not in rounds:
            pre = torch.tensor([prefix])
            if isinstance(shape, StaticTree):
                found = list(realisations(engine, cond, pre))
            else:
                found = [(*engine.round_at(cond, pre), 1.0, None)]
            walks = [enumerated_walk(rule, drafted, p, view, prepared, n - 1 - len(prefix))
                     for drafted, p, view, prepared, _, _ in found]
            merged = [(block, r[4] * prob) for r, (outs, _) in zip(found, walks) for block, prob in outs]
            rounds[prefix] = merged, _round_drift(found, walks, descendants)
        return rounds[prefix]

    law: dict[tuple[int, ...], float] = {}
    by_position = [0.0] * n
    frontier = {(y,): float(first[y]) for y in torch.nonzero(first > 0).squeeze(-1).tolist()}
    while frontier:
        nxt: dict[tuple[int, ...], float] = {}
        for prefix, prob in frontier.items():
            blocks, drift = block_law(prefix)
            for depth, value in drift.items():  # a node at walk depth d emits position len(prefix) + d − 1
                by_position[len(prefix) + depth - 1] += prob * value
            for block, p_block in blocks:
                seq = prefix + block
                target = law if len(seq) >= n else nxt
                target[seq[:n]] = target.get(seq[:n], 0.0) + prob * p_block
        frontier = nxt
    conditionals = target_conditionals(bundle, label, temperature=temperature, top_k=top_k, top_p=top_p,
                                       cfg_scale=cfg_scale)
    return JointLaw(law=law, hybrid_bound=hybrid_bound(law, conditionals), node_drift_sum=sum(by_position),
                    node_drift_by_position=by_position)


def target_conditionals(bundle: api.Bundle, label: int, *, temperature: float = 1.0, top_k: int = 0,
                        top_p: float = 1.0, cfg_scale: float = 1.0) -> dict[tuple[int, ...], torch.Tensor]:
    """The target law p(· | prefix) for every prefix shorter than the sequence (``api.next_token_law``)."""
    n = bundle.target.config.block_size
    vocab = bundle.target.config.vocab_size
    out: dict[tuple[int, ...], torch.Tensor] = {}
    for length in range(n):
        for prefix in itertools.product(range(vocab), repeat=length):
            out[prefix] = api.next_token_law(bundle, [label], [list(prefix)], temperature=temperature, top_k=top_k,
                                             top_p=top_p, cfg_scale=cfg_scale)[0]
    return out


def target_joint_law(conditionals: dict[tuple[int, ...], torch.Tensor], n: int) -> dict[tuple[int, ...], float]:
    """The target's law over whole sequences of length ``n`` from its conditionals."""
    law: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(n):
        law = {pre + (y,): prob * float(conditionals[pre][y]) for pre, prob in law.items()
               for y in torch.nonzero(conditionals[pre] > 0).squeeze(-1).tolist()}
    return law


def hybrid_bound(law: dict[tuple[int, ...], float], conditionals: dict[tuple[int, ...], torch.Tensor]) -> float:
    """Σ_t E_method[TV(method's law of token t given the prefix, p(· | prefix))] from an exact joint law."""
    marginals: dict[tuple[int, ...], float] = {}
    for seq, prob in law.items():
        for t in range(len(seq) + 1):
            marginals[seq[:t]] = marginals.get(seq[:t], 0.0) + prob
    total = 0.0
    for prefix, p in conditionals.items():
        reach = marginals.get(prefix, 0.0)
        if reach <= 0:
            continue
        method = torch.tensor([marginals.get(prefix + (y,), 0.0) / reach for y in range(len(p))], dtype=torch.float64)
        total += reach * float(tv_distance(method, p.double()))
    return total
