"""The exact probability that the speculative sampler emits a given token sequence (DESIGN 6).

A decode draws token 0 from the target's law p_0, then runs rounds. A round that starts after m
committed tokens x_<m drafts its tree from x_<m alone and emits a block x_m..x_{m+ℓ−1}: ℓ − 1
accepted candidates along one path of the tree and a bonus token. With α(m) the probability that
a round starts right after x_<m (α(1) = 1) and c_m(ℓ) the probability that it emits exactly
x_m..x_{m+ℓ−1},

    α(m') = Σ_{m + ℓ = m'} α(m) · c_m(ℓ),        P_SD(x) = p_0(x_0) · α(N).

c_m(ℓ) sums, over the tree nodes v at depth ℓ − 1 whose path spells x_m..x_{m+ℓ−2}, the
probability reach(v) that the walk arrives at v times the bonus part of v's law at x_{m+ℓ−1};
reach(child) = reach(v) · (the probability that v accepts that child). A node's law splits into
those accept parts and the bonus part; it is the drift recorder's node law (the rule's own
methods, every draw with the signals it would carry), so no rule has a second formula here.

Each round is rebuilt by the engine's own phases with x_<m teacher-forced (``rounds_along``: one
target pass per sequence, one batch row per round start): a dynamic tree is a function of x_<m; a static tree is drafted with every
node at depth d forced to x_{m+d−1}, the only token through which a path can spell x (each node's
drafter law is then its path's). Exact for chains and dynamic trees with every rule, and for
static trees with several sampled siblings while their draws can be enumerated; beyond that the
sibling draws are sampled (the result is flagged as an estimate). Rules whose signals move with
the draws (CASCADE) are exact on chains and dynamic trees; on branching static trees their signals
depend on the cousins' draws, which this recursion does not carry (an error says so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial

import torch

from cascade_sd.acceptance.base import NodeContext, ProbeOutputs
from cascade_sd.acceptance.law import point_mass_law, sequence_law
from cascade_sd.decoding.engine import SpeculativeEngine
from cascade_sd.decoding.tree import StaticTree
from cascade_sd.errors import ConfigError
from cascade_sd.metrics.drift import (DRAW_EXACT_LIMIT, DrawSignals, _draw_sequences, _draw_sequences_exact,
                                      draw_node_law, node_law)

#: Round starts (batch rows) rebuilt per engine call.
ROWS_PER_CALL = 256


@dataclass
class SequenceLogProb:
    """Per image [B]: log P_SD(x) of the speculative sampler, log P(x) of the target (the same
    processing: CFG, temperature, top-k/p), and whether P_SD is exact (False: sampled sibling draws)."""

    log_sd: torch.Tensor
    log_target: torch.Tensor
    exact: torch.Tensor

    @property
    def log_ratio(self) -> torch.Tensor:
        """log P_SD(x) − log P(x) per image."""
        return self.log_sd - self.log_target


def check_supported(engine: SpeculativeEngine) -> None:
    """One-line error for the tree/rule pairs whose sequence law this recursion cannot give."""
    tree = engine.tree
    if isinstance(tree, StaticTree) and tree.size != tree.depth and engine.rule.draw_dependent:
        raise ConfigError(f"sequence log-probability of method={engine.rule.name!r} needs tree=chain-N or dynamic: its "
                          "signals move with the cousins' draws on a branching static tree")


@torch.no_grad()
def sequence_log_prob(engine: SpeculativeEngine, cond: torch.Tensor, tokens: torch.Tensor, *, mc_draws: int = 256,
                      generator: torch.Generator | None = None, rows_per_call: int = ROWS_PER_CALL) -> SequenceLogProb:
    """log P_SD and log P of the sequences ``tokens`` [B, N] under conditions ``cond`` [B] (module docstring).

    The engine's models should run in float64 for agreement with exact enumerations to ~1e-12.
    """
    check_supported(engine)
    n = tokens.shape[1]
    b = tokens.shape[0]
    dev = engine.device
    tokens, cond = tokens.to(dev), cond.to(dev)
    first = engine._law(engine._prefill(engine._setup(cond)).logits[:, -1])
    log_first = first.gather(1, tokens[:, :1])[:, 0].log().cpu()
    log_c = torch.full((b, n - 1, engine.tree.depth + 2), -math.inf, dtype=torch.float64)
    log_p = torch.zeros(b, n - 1, dtype=torch.float64)
    exact = torch.ones(b, dtype=torch.bool)
    image = torch.arange(b).repeat_interleave(n - 1)  # one batch row per (image, round start m = 1..N−1)
    start = torch.arange(1, n).repeat(b)
    for lo in range(0, len(image), rows_per_call):  # several images' rounds per engine call
        rows = slice(lo, lo + rows_per_call)
        seqs = torch.unique(image[rows])
        local = torch.searchsorted(seqs, image[rows])
        c, lp, ok = _blocks(engine, cond[seqs.to(dev)], tokens[seqs.to(dev)], local, start[rows], mc_draws, generator)
        log_c[image[rows], start[rows] - 1], log_p[image[rows], start[rows] - 1] = c.log(), lp
        exact[image[rows][~ok]] = False
    alpha = torch.full((b, n + engine.tree.depth + 2), -math.inf, dtype=torch.float64)
    alpha[:, 1] = 0.0
    for m in range(1, n):  # α(m + ℓ) += α(m)·c_m(ℓ), in log space
        ell = torch.arange(1, log_c.shape[-1])
        alpha[:, m + ell] = torch.logaddexp(alpha[:, m + ell], alpha[:, m : m + 1] + log_c[:, m - 1, 1:])
    return SequenceLogProb(log_sd=log_first + alpha[:, n], log_target=log_first + log_p.sum(1),
                           exact=exact)


def _forced(engine: SpeculativeEngine, tokens: torch.Tensor, m: torch.Tensor) -> torch.Tensor | None:
    """A static tree's drafted tokens: every node at depth d holds x_{m+d−1} (the root x_{m−1})."""
    if not isinstance(engine.tree, StaticTree):
        return None
    depth = engine.tree.node_depth.to(tokens.device)
    at = ((m - 1)[:, None] + depth[None]).clamp(max=tokens.shape[1] - 1)
    return tokens.gather(1, at)


def _blocks(engine: SpeculativeEngine, cond: torch.Tensor, tokens: torch.Tensor, image: torch.Tensor, m: torch.Tensor,
            mc_draws: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rounds starting after m [R] committed tokens of sequences ``image`` [R] of ``tokens`` [K, N]:
    c_m(ℓ) [R, depth + 2] (entry ℓ), log p(x_m | x_<m) [R], and whether each row's c is exact [R]."""
    rule, n, rows = engine.rule, tokens.shape[1], m.numel()
    probing = rule.draw_dependent and isinstance(engine.tree, StaticTree)
    x = tokens.cpu()[image]
    m = m.to(engine.device)
    tree, p, view, prepared = engine.rounds_along(cond, tokens, image, m, forced=_forced(engine, x.to(engine.device), m),
                                                  probe=probing)
    mc = m.cpu()
    c = torch.zeros(rows, engine.tree.depth + 2, dtype=torch.float64)
    exact = torch.ones(rows, dtype=torch.bool)
    log_p = p[torch.arange(rows), 0].double().cpu().gather(1, x[torch.arange(rows), mc][:, None])[:, 0].log()
    children = tree.children.cpu()
    kid_tokens = tree.tokens.cpu()
    draws = None
    if probing:
        draws = partial(DrawSignals, prepared=prepared, view=view, probe=_PositionProbe(engine, tree, image, m))
    frontier = [[(0, 1.0)] for _ in range(rows)]  # (node, reach) per row at the current depth
    for dv in range(engine.tree.depth + 1):
        # Layers: the k-th frontier node of every row, so the rule's extras are built for whole batches.
        width = max((len(f) for f in frontier), default=0)
        nxt: list[list[tuple[int, float]]] = [[] for _ in range(rows)]
        for k in range(width):
            here = [r for r in range(rows) if len(frontier[r]) > k]
            node = torch.tensor([frontier[r][k][0] if len(frontier[r]) > k else 0 for r in range(rows)])
            kids = children[torch.arange(rows), node]
            extras = {}
            if view is not None:
                extras = rule.node_extras(prepared, view, node.to(engine.device), kids.to(engine.device))
            for r in here:
                v, reach = frontier[r][k]
                t = int(mc[r]) + dv  # the token this node emits lands at position t
                y = int(x[r, t])
                live = kids[r][kids[r] >= 0]
                one = NodeContext(depth=dv + 1, n_candidates=len(live),
                                  extras={key: val[r : r + 1].cpu() for key, val in extras.items()})
                pv, qv = p[r, v].double().cpu(), tree.q[r, v].double().cpu()
                if not len(live) or dv >= n - 1 - int(mc[r]):  # a leaf or the grid's end: the bonus from the fresh law
                    c[r, dv + 1] += reach * float(rule.bonus_law(rule.start(pv[None], qv[None], tree.sampled, one), one)[0, y])
                    continue
                law, accept, ok = _node_parts(rule, pv, qv, one, kid_tokens[r, live], y, tree.sampled, mc_draws, generator,
                                              None if draws is None else draws(nodes=node.to(engine.device)), r)
                exact[r] &= ok
                c[r, dv + 1] += reach * max(float(law[y]) - float(accept.sum()), 0.0)
                for kid, a in zip(live.tolist(), accept.tolist()):
                    if a > 0:
                        nxt[r].append((kid, reach * a))
        frontier = nxt
    return c, log_p, exact


class _PositionProbe:
    """``engine._probe`` for rounds along given sequences, cached per (sequence, position): the target's
    outputs at a hypothetical child of a node at depth d of round m read x_<m+d and the child alone,
    so every round reaching that position shares them (each token is probed once per position).
    Drafter outputs depend on the round's drafted path: those are probed per call."""

    def __init__(self, engine: SpeculativeEngine, tree, image: torch.Tensor, m: torch.Tensor) -> None:
        self.engine, self.tree, self.image, self.m = engine, tree, image, m
        self.depth = tree.depth.cpu()
        self.cache: dict[tuple[int, int], tuple[torch.Tensor, list[torch.Tensor | None]]] = {}

    def __call__(self, row: int, node: int, tokens: torch.Tensor, drafter: bool = True) -> ProbeOutputs:
        probe = partial(self.engine._probe, row, node, tree=self.tree, m=self.m)
        if drafter and self.engine.rule.reads_drafter:
            return probe(tokens, drafter=True)
        at = (int(self.image[row]), int(self.m[row]) + int(self.depth[row, node]))
        vocab = self.engine.target.config.vocab_size
        have, parts = self.cache.setdefault(at, (torch.zeros(vocab, dtype=torch.bool, device=tokens.device), [None] * 3))
        missing = tokens[~have[tokens]].unique()
        if missing.numel():
            out = probe(missing, drafter=False)
            for i, value in enumerate((out.target_logits, out.target_hidden, out.p)):
                if parts[i] is None:
                    parts[i] = value.new_zeros(vocab, *value.shape[1:])
                parts[i][missing] = value
            have[missing] = True
        return ProbeOutputs(target_logits=parts[0][tokens], target_hidden=parts[1][tokens], p=parts[2][tokens])


def _node_parts(rule, p: torch.Tensor, q: torch.Tensor, ctx: NodeContext, kid_tokens: torch.Tensor, y: int,
                sampled: bool, mc_draws: int, generator: torch.Generator | None, draws: DrawSignals | None, row: int
                ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(law [V] of the node, the probability [n] that the walk accepts each child *and emits y* through
    it, exact?): the children are point masses, one sampled draw (forced to y), or sampled siblings."""
    if not sampled:
        law, accept = point_mass_law(rule, rule.start(p[None], q[None], False, ctx), kid_tokens, ctx)
        return law, accept * (kid_tokens == y), True
    n = min(len(kid_tokens), int((q > 0).sum()))  # siblings past q's support are never drawn
    ctx = replace(ctx, n_candidates=n)
    if n == 1:  # the drift recorder's law; the child is y (forced), accepted when drawn with q(y)·a(y)
        if draws is not None and rule.draw_dependent:
            law, ok, _ = draw_node_law(rule, p, q, ctx, draws, row, mc_draws=mc_draws, generator=generator)
        else:
            law, ok, _ = node_law(rule, p, q, n_candidates=1, sampled=True, ctx=ctx, mc_draws=mc_draws, generator=generator)
        ys = torch.tensor([y])
        a = rule.accept_prob(rule.start(p[None], q[None], True, ctx), ys, ctx)
        return law, torch.cat([q[ys] * a, torch.zeros(len(kid_tokens) - 1, dtype=torch.float64)]), ok
    ok = math.perm(int((q > 0).sum()), n) <= DRAW_EXACT_LIMIT
    if ok:
        seqs, weights = _draw_sequences_exact(q, n)
        drawn = None
    else:
        keys, seqs = _draw_sequences(q, n, mc_draws, generator)
        weights, drawn = torch.full((mc_draws,), 1.0 / mc_draws, dtype=torch.float64), keys > 0
    per_sibling = torch.zeros(seqs.shape[1], p.shape[-1], dtype=torch.float64)
    law = sequence_law(rule, p, q, ctx, seqs, weights, drawn, accepted=per_sibling)
    accept = torch.zeros(len(kid_tokens), dtype=torch.float64)
    accept[:n] = per_sibling[:, y]
    return law, accept, ok
