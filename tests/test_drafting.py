"""Draft trees carry the drafter's own laws: the q the engine stores at every expanded node equals
an uncached drafter pass along that node's path (both CFG streams, EAGLE and EAGLE-3 features),
for static and dynamic trees."""

import pytest
import torch

from cascade_sd import api
from cascade_sd.acceptance import get_rule
from cascade_sd.decoding.engine import SpeculativeEngine
from cascade_sd.decoding.processing import SamplingParams, target_law
from cascade_sd.decoding.tree import DynamicTreeSpec, StaticTree
from cascade_sd.decoding.vanilla import with_null_condition

pytestmark = pytest.mark.usefixtures("one_thread")

TREES = {"tree-25": StaticTree.preset("tree-25"), "dynamic": DynamicTreeSpec(top_k=2, depth=4, total_tokens=12)}


def reference_law(bundle, arch: str, cond: torch.Tensor, prefix: torch.Tensor, path: list[int],
                  params: SamplingParams) -> torch.Tensor:
    """The drafter's law after the committed ``prefix`` and the drafted ``path`` tokens, from uncached
    passes: (H_j, t_j) pairs for committed tokens, then the drafter's own features (DESIGN 2)."""
    target, drafter = bundle.target, bundle.drafters[arch]
    streams = with_null_condition(target, cond, params)
    reps = streams.shape[0] // cond.shape[0]
    out = target(streams, torch.cat([prefix[:, :-1]] * reps), return_hidden=True, return_layers=True)
    h, tokens = drafter.target_features(out), torch.cat([prefix] * reps)
    for token in path:
        _, h_out = drafter(h, tokens)
        h = torch.cat([h, h_out[:, -1:]], 1)
        tokens = torch.cat([tokens, torch.full((tokens.shape[0], 1), token)], 1)
    logits, _ = drafter(h, tokens)
    return target_law(logits[:, -1], params, dtype=torch.float64)[0]


@torch.no_grad()
@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("arch", ["eagle", "eagle3"])
def test_stored_draft_laws_equal_uncached_drafter_passes(tree, arch):
    bundle = api.load_bundle("toy:vocab=9,len=12,seed=2")
    params = SamplingParams(cfg_scale=2.5)
    engine = SpeculativeEngine(bundle.target, bundle.drafters[arch], get_rule("strict"), TREES[tree], params)
    cond, prefix = torch.tensor([1]), torch.tensor([[3, 1, 4, 1]])
    draft, _, _, _ = engine.round_at(cond, prefix, generator=torch.Generator().manual_seed(0))
    parent, tokens = draft.parent[0].tolist(), draft.tokens[0].tolist()
    expanded = [n for n in range(len(tokens)) if float(draft.q[0, n].sum()) > 0.5]  # nodes the drafter ran at
    assert max(int(draft.depth[0, n]) for n in expanded) >= 2  # deeper steps feed the drafter's own features
    for node in expanded:
        path, at = [], node
        while at > 0:
            path.insert(0, tokens[at])
            at = parent[at]
        want = reference_law(bundle, arch, cond, prefix, path, params)
        torch.testing.assert_close(draft.q[0, node], want, atol=1e-5, rtol=0, msg=f"node {node} (path {path})")


@torch.no_grad()
@pytest.mark.parametrize("tree", list(TREES))
def test_ancestor_mask_built_while_drafting_equals_the_one_from_parents(tree):
    bundle = api.load_bundle("toy:vocab=9,len=12,seed=2")
    engine = SpeculativeEngine(bundle.target, bundle.drafters["eagle"], get_rule("strict"), TREES[tree],
                               SamplingParams(cfg_scale=2.5))
    cond, prefix = torch.tensor([1, 2, 0]), torch.tensor([[3, 1, 4, 1], [2, 7, 1, 8], [5, 0, 5, 0]])
    draft, _, _, _ = engine.round_at(cond, prefix, generator=torch.Generator().manual_seed(0))
    carried = draft.ancestor_mask()
    assert carried is draft.ancestors
    draft.ancestors = None
    assert torch.equal(carried, draft.ancestor_mask())
    if tree == "dynamic":  # the rows grew different trees, so the mask is really per row
        assert not torch.equal(draft.parent[0], draft.parent[1]) or not torch.equal(draft.parent[1], draft.parent[2])


@torch.no_grad()
@pytest.mark.parametrize("tree", ["chain-4", "tree-57", "dynamic"])
def test_drafted_siblings_are_distinct_as_the_tree_declares(tree):
    """The walk skips its repeated-sibling bookkeeping on drafted trees; that is sound only if no two
    valid siblings of a drafted tree share a token (small vocabulary: tree-57 wants up to 10 ranks of 9)."""
    bundle = api.load_bundle("toy:vocab=9,len=12,seed=2")
    shape = DynamicTreeSpec(top_k=3, depth=3, total_tokens=10) if tree == "dynamic" else StaticTree.preset(tree)
    engine = SpeculativeEngine(bundle.target, bundle.drafters["eagle"], get_rule("strict"), shape, SamplingParams())
    checked = 0
    for seed in range(5):
        draft, _, _, _ = engine.round_at(torch.tensor([1, 2, 0, 1]), torch.tensor([[3, 1, 4, 1]] * 4),
                                         generator=torch.Generator().manual_seed(seed))
        assert draft.distinct_siblings
        kids = draft.children
        tokens = draft.tokens.gather(1, kids.clamp_min(0).flatten(1)).view_as(kids)
        for row, node in zip(*torch.nonzero((kids >= 0).sum(-1) > 1, as_tuple=True)):
            valid = tokens[row, node][kids[row, node] >= 0]
            assert valid.unique().numel() == valid.numel(), (row, node, valid)
            checked += 1
    assert checked >= 20 if tree != "chain-4" else checked == 0


@torch.no_grad()
@pytest.mark.parametrize("method", ["strict", "cascade"])
def test_static_drafting_expands_the_nodes_with_children(method):
    """The drafter runs at the nodes whose children it drafts; a rule that reads the drafter's outputs
    across the tree (CASCADE's breadth signal) gets them at every node above the last level."""
    bundle = api.load_bundle("toy:vocab=9,len=12,seed=2")
    tree = StaticTree.preset("tree-25")
    rule = get_rule(method)
    engine = SpeculativeEngine(bundle.target, bundle.drafters["eagle"], rule, tree, SamplingParams(cfg_scale=2.5))
    draft, _, _, _ = engine.round_at(torch.tensor([1]), torch.tensor([[3, 1, 4, 1]]),
                                     generator=torch.Generator().manual_seed(0))
    ran = draft.q[0].sum(-1) > 0.5
    want = tree.node_depth < tree.depth if rule.needs_tree else (tree.children >= 0).any(-1)
    assert ran.tolist() == want.tolist()
    if rule.needs_tree:
        assert draft.drafter.ran[0].tolist() == want.tolist()
