"""Jacobi-family drafting: the target drafts for itself (DESIGN 5b; ../shared/jacobi_family.md).

A window of C columns (the next C positions) holds draft tokens, each with the law q it was drawn
from. The engine verifies the window as a static draft tree (a chain of C drafts, or SJD-PAC's
Cartesian-product tree of W candidates per column for the first D − 1 columns followed by a chain),
so every acceptance rule walks it unchanged. After the walk, the columns past the committed tokens
are redrafted from the *stale* target laws of that forward, read along the first-child path below
the last accepted node:

- ``sjd`` (arXiv 2410.01699; tyshiwo1/Accelerating-T2I-AR-with-SJD b389cfb, jacobi_iteration_lumina_mgpt.py
  L1113–1125): an independent draw from the stale law p_s, recorded q := p_s.
- ``scd-mc`` (arXiv 2510.24211; junhyukso/SCD 7322379, lumina1/scheduler/..._SCDMC.py L248–322): maximal
  coupling to the old draft d ~ q_old: keep d with min(1, p_s(d)/q_old(d)), else draw from
  norm((p_s − q_old)₊); the new draft is ~ p_s and q := p_s, also when d was kept.
- ``scd-gumbel`` (same repo, ..._GS.py L36–53, L1192–1195): argmax(log p_s + G) with one Gumbel vector G
  per absolute position, kept until the position is committed; q := p_s.
- ``sjd-pac`` (arXiv 2603.18599; KangJialiang/SJD-PAC 4fbc099, sjd_pac_iteration_lumina_mgpt.py): W
  candidates per tree column drawn without replacement from the column's q (verified by the rules'
  sequential rejection without replacement, first accepted sibling per depth), SCD-MC continuation
  on the chain columns.

Fresh columns (nothing stale yet) get a uniform random token with a one-hot q (SJD, SCD) or a uniform q
(SJD-PAC). Every draft is drawn from its recorded q given everything the verification conditions on,
so strict verification samples the target exactly; each row advances by its own accepted length.
``code="reference-code"`` reproduces the published departures from exactness: SCD-MC's repository records
the old q for a kept token (..._SCDMC.py L292–293); SJD-PAC's verifies and redrafts as ``pac_reference``
says (longest row, uniform bonus, residual siblings). REFERENCES.md lists every departure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from cascade_sd.acceptance.base import normalise
from cascade_sd.decoding.keep_mixture import KeepMixture
from cascade_sd.decoding.pac_reference import PacReference
from cascade_sd.decoding.processing import draw_without_replacement, sample_from_law
from cascade_sd.decoding.tree import DraftTree, StaticTree
from cascade_sd.decoding.verify import WalkResult
from cascade_sd.errors import ConfigError, check_choice, check_int

VARIANTS = ("sjd", "scd-mc", "scd-gumbel", "sjd-pac")
#: Window length L (nodes per verify forward, the root included) in each reference repository's scripts.
DEFAULT_WINDOW = {"sjd": 16, "scd-mc": 32, "scd-gumbel": 32, "sjd-pac": 64}
CODES = ("exact", "reference-code")
#: The variants whose reference code departs from exactness in a way offered here.
REFERENCE_CODE = ("scd-mc", "sjd-pac")


@dataclass(frozen=True)
class JacobiSpec:
    """A Jacobi draft source: variant, window length L, SJD-PAC's tree width W and depth D, and ``code``."""

    variant: str = "sjd"
    window: int | None = None
    width: int = 3
    depth: int = 3
    code: str = "exact"

    def __post_init__(self) -> None:
        check_choice("jacobi", self.variant, VARIANTS)
        check_choice("jacobi_code", self.code, CODES)
        if self.window is None:
            object.__setattr__(self, "window", DEFAULT_WINDOW[self.variant])
        check_int("jacobi_window", self.window, 2)
        if self.code == "reference-code" and self.variant not in REFERENCE_CODE:
            raise ConfigError(f"jacobi_code='reference-code' is available for jacobi in {list(REFERENCE_CODE)}; "
                              f"got jacobi={self.variant!r} (use jacobi_code='exact')")
        if self.variant == "sjd-pac":
            check_int("pac_width", self.width, 1)
            check_int("pac_depth", self.depth, 1)
            need = 1 + sum(self.width ** d for d in range(1, self.depth))
            if self.window < need + 1:
                raise ConfigError(f"jacobi_window={self.window} does not fit pac_width={self.width}, "
                                  f"pac_depth={self.depth}: the tree alone has {need} nodes; allowed "
                                  f"jacobi_window >= {need + 1}")

    def slug(self) -> str:
        """A path-safe name of the setting (the decode grid's tree column): ``sjd-L16``, ``sjd-pac-L64-W3-D3``,
        ``scd-mc-L32-reference``."""
        tail = f"-W{self.width}-D{self.depth}" if self.pac else ""
        return f"{self.variant}-L{self.window}{tail}" + ("-reference" if self.code == "reference-code" else "")

    @classmethod
    def from_slug(cls, slug: str) -> "JacobiSpec":
        """Inverse of ``slug`` (one-line error for anything else)."""
        match = re.fullmatch(r"(?P<v>[a-z-]+?)-L(?P<L>\d+)(?:-W(?P<W>\d+)-D(?P<D>\d+))?(?P<ref>-reference)?", slug)
        if match is None or match["v"] not in VARIANTS:
            raise ConfigError(f"tree={slug!r} is not a Jacobi setting; expected <variant>-L<window>[-W<w>-D<d>]"
                              f"[-reference] with variant in {list(VARIANTS)}")
        extra = {"width": int(match["W"]), "depth": int(match["D"])} if match["W"] else {}
        return cls(match["v"], int(match["L"]), code="reference-code" if match["ref"] else "exact", **extra)

    def to_dict(self) -> dict:
        return {"variant": self.variant, "window": self.window, "width": self.width, "depth": self.depth,
                "code": self.code}

    @property
    def pac(self) -> bool:
        return self.variant == "sjd-pac"

    @property
    def verifies_itself(self) -> bool:
        """SJD-PAC's reference code verifies with its own longest-row selection (``pac_reference``)."""
        return self.pac and self.code == "reference-code"

    @property
    def init(self) -> str:
        """Fresh columns' q: ``uniform`` (SJD-PAC) or ``one-hot`` (SJD, SCD)."""
        return "uniform" if self.pac else "one-hot"

    @property
    def tree_columns(self) -> int:
        """Columns with W candidates (SJD-PAC's tree depths 1..D−1); 0 for the chain variants."""
        return self.depth - 1 if self.pac else 0

    @property
    def candidates(self) -> int:
        return self.width if self.pac else 1

    def tree(self) -> StaticTree:
        """The window as a static tree: a chain of L − 1 drafts, or the W-ary tree of depth D − 1 whose
        first-child path continues as a chain to L − 1 drafts in all."""
        if not self.pac:
            return StaticTree.preset(f"chain-{self.window - 1}")
        paths: list[tuple[int, ...]] = [()]
        full = []
        for _ in range(self.tree_columns):
            paths = [p + (b,) for p in paths for b in range(self.width)]
            full += paths
        chain = self.window - 1 - len(full)
        full += [(0,) * d for d in range(self.tree_columns + 1, self.tree_columns + 1 + chain)]
        return StaticTree(tuple(full), f"jacobi-{self.variant}-{self.window}")


class JacobiDrafting:
    """The window state of every batch row and its redrafting (module docstring); the engine's draft
    source on drafter-free settings."""

    def __init__(self, spec: JacobiSpec, vocab: int, device: torch.device, *, track_keeps: bool = False) -> None:
        """``track_keeps``: carry each column's law jointly with its recorded q (``keep_mixture``), for the
        drift of SCD-MC's reference code, whose recorded q depends on its coupling coins."""
        self.spec, self.vocab, self.device = spec, vocab, device
        self.track_keeps = track_keeps
        self.mixture: KeepMixture | None = None
        self.shape = spec.tree()
        self.columns = self.shape.depth
        w = spec.candidates
        depth = self.shape.node_depth
        rank = torch.tensor([0] + [p[-1] for p in self.shape.paths])
        #: Each drafted node's entry in the flattened [C, W] candidate table (the root's is unused).
        self.node_entry = ((depth - 1).clamp_min(0) * w + rank).to(device)
        self.node_column = depth.clamp(max=self.columns - 1).to(device)  # the column a node's children fill
        self.children = self.shape.children.to(device)
        #: SJD-PAC's reference code verifies the window itself (strict only): see ``pac_reference``.
        self.reference = PacReference(self.shape, spec.depth, device) if spec.verifies_itself else None

    @property
    def verifies(self) -> bool:
        """Whether this source verifies its window itself instead of the rule's walk."""
        return self.reference is not None

    def verify(self, tree: DraftTree, p: torch.Tensor, generator: torch.Generator | None,
               max_accept: torch.Tensor | None) -> WalkResult:
        """The reference code's own verification (only where ``verifies``)."""
        return self.reference.verify(tree, p, generator, max_accept)

    # ------------------------------------------------------------------ state
    def _fresh(self, rows: int, cols: int, gen: torch.Generator | None):
        """Fresh columns: uniform random candidates and their q (one-hot at the draft, or uniform)."""
        uniform = torch.full((rows, cols, self.vocab), 1.0 / self.vocab, dtype=torch.float64, device=self.device)
        cand, exists = draw_without_replacement(uniform, self.spec.candidates, gen)
        q = uniform if self.spec.init == "uniform" else torch.nn.functional.one_hot(
            cand[..., 0], self.vocab).to(torch.float64)
        return cand, exists, q

    def start(self, batch: int, gen: torch.Generator | None) -> None:
        """Fresh windows for ``batch`` rows."""
        self.cand, self.exists, self.q = self._fresh(batch, self.columns, gen)
        self.gumbel = self._gumbel(batch, self.columns, gen) if self.spec.variant == "scd-gumbel" else None
        self.mixture = KeepMixture(batch, self.columns, self.vocab, self.device) if self.track_keeps else None

    def restart(self, rows: torch.Tensor, gen: torch.Generator | None) -> None:
        """Fresh windows for batch rows ``rows`` (a new image took them over)."""
        cand, exists, q = self._fresh(rows.numel(), self.columns, gen)
        self.cand[rows], self.exists[rows], self.q[rows] = cand, exists, q
        if self.gumbel is not None:
            self.gumbel[rows] = self._gumbel(rows.numel(), self.columns, gen)
        if self.mixture is not None:
            self.mixture.restart(rows)

    def select_rows(self, keep: torch.Tensor) -> None:
        """Keep batch rows ``keep`` (finished images left the batch)."""
        self.cand, self.exists, self.q = self.cand[keep], self.exists[keep], self.q[keep]
        if self.gumbel is not None:
            self.gumbel = self.gumbel[keep]
        if self.mixture is not None:
            self.mixture.select_rows(keep)

    def draft_laws(self, nodes: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """``KeepMixture`` parts of the drafts below ``nodes`` [B] while ``track_keeps``, else None."""
        return None if self.mixture is None else self.mixture.at(self.node_column[nodes])

    def _gumbel(self, rows: int, cols: int, gen: torch.Generator | None) -> torch.Tensor:
        u = torch.rand(rows, cols, self.vocab, dtype=torch.float64, device=self.device, generator=gen)
        return -(-u.clamp_min(1e-300).log()).log()

    # ------------------------------------------------------------------ draft
    def draft(self, root: torch.Tensor, ancestors: torch.Tensor) -> DraftTree:
        """The round's draft tree: the root (last committed token) and every column's candidates."""
        b = root.shape[0]
        flat = self.cand.flatten(1)
        tokens = torch.cat([root[:, None], flat.index_select(1, self.node_entry[1:])], 1)
        ok = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=self.device),
                        self.exists.flatten(1).index_select(1, self.node_entry[1:])], 1)
        kids = self.children.expand(b, -1, -1)
        kid_ok = ok.gather(1, kids.clamp_min(0).flatten(1)).view_as(kids)
        n1 = tokens.shape[1]
        return DraftTree(tokens=tokens, parent=self.shape.parent.to(self.device).expand(b, n1),
                         depth=self.shape.node_depth.to(self.device).expand(b, n1),
                         children=torch.where(kid_ok & (kids >= 0), kids, -1),
                         q=self.q.index_select(1, self.node_column), sampled=True, ancestors=ancestors,
                         distinct_siblings=self.reference is None)

    # ------------------------------------------------------------------ advance
    def advance(self, tree: DraftTree, walk: WalkResult, p: torch.Tensor, gen: torch.Generator | None) -> None:
        """Redraft every row's window for the round after it committed ``accepted`` + 1 tokens: new column
        c is position m + a + 1 + c, whose stale law is p at the (a + 1 + c)-th node of the first-child path
        below the last accepted node and whose old draft is that node's first child (module docstring)."""
        if self.reference is not None:
            self.cand, self.exists, self.q = self.reference.advance(
                tree, walk, p, self._fresh, self.columns, self.spec.candidates, self.spec.tree_columns, gen)
            return
        accepted, last_node = walk.accepted, walk.last_node
        b, cols, dev = accepted.shape[0], self.columns, self.device
        rows = torch.arange(b, device=dev)
        # path[:, i]: depth a + 1 + i node of the first-child path below the last accepted node (−1: none).
        path = torch.full((b, cols + 1), -1, dtype=torch.long, device=dev)
        cur = last_node
        for i in range(cols + 1):
            cur = torch.where(cur >= 0, tree.children[rows, cur.clamp_min(0), 0], cur)
            path[:, i] = cur
        stale_node, old_node = path[:, :cols], path[:, 1:]
        has_stale = stale_node >= 0
        p_s = p[rows[:, None], stale_node.clamp_min(0)]  # [B, C, V]
        q_old = tree.q[rows[:, None], stale_node.clamp_min(0)]
        d_old = tree.tokens[rows[:, None], old_node.clamp_min(0)]
        has_old = has_stale & (old_node >= 0)

        cand, exists, q = self._fresh(b, cols, gen)  # fresh everywhere, then the stale columns
        w, spec = self.spec.candidates, self.spec
        chain_tok, chain_q = self._redraft(p_s, q_old, d_old, has_old, accepted, gen)
        cand[..., 0] = torch.where(has_stale, chain_tok, cand[..., 0])
        exists[..., 0] |= has_stale
        q = torch.where(has_stale[..., None], chain_q, q)
        if spec.tree_columns:  # SJD-PAC: the tree columns' W candidates, without replacement from their q
            t = spec.tree_columns
            drawn, ok = draw_without_replacement(q[:, :t], w, gen)
            stale_t = has_stale[:, :t, None]
            cand[:, :t] = torch.where(stale_t, drawn, cand[:, :t])
            exists[:, :t] = torch.where(stale_t, ok, exists[:, :t])
        if self.mixture is not None:
            self.mixture.advance(self.node_column[stale_node.clamp_min(0)], has_old, has_stale, p_s)
        self.cand, self.exists, self.q = cand, exists, q

    def _redraft(self, p_s, q_old, d_old, has_old, accepted, gen):
        """(token, recorded q) of each column's redraft from its stale law (variant by variant)."""
        variant = self.spec.variant
        if variant == "sjd":
            return sample_from_law(p_s, gen), p_s
        if variant == "scd-gumbel":
            shift = accepted + 1  # the table follows absolute positions: column c moves to c − (a + 1)
            cols = self.columns
            idx = torch.arange(cols, device=self.device)[None] + shift[:, None]
            fresh = self._gumbel(accepted.shape[0], cols, gen)
            kept = self.gumbel.gather(1, idx.clamp(max=cols - 1)[..., None].expand(-1, -1, self.vocab))
            self.gumbel = torch.where((idx < cols)[..., None], kept, fresh)
            score = p_s.clamp_min(0).log() + self.gumbel
            return score.argmax(-1), p_s
        # Maximal coupling (SCD-MC; SJD-PAC's continuation): keep the old draft with min(1, p_s/q_old).
        px = p_s.gather(-1, d_old[..., None]).squeeze(-1)
        qx = q_old.gather(-1, d_old[..., None]).squeeze(-1)
        u = torch.rand(px.shape, dtype=px.dtype, device=self.device, generator=gen)
        keep = has_old & (u * qx < px)
        residual = normalise((p_s - q_old).clamp_min(0.0), p_s)
        law = torch.where(has_old[..., None], residual, p_s)  # no old draft: a plain draw from p_s
        tok = torch.where(keep, d_old, sample_from_law(law, gen))
        if self.spec.code == "reference-code":  # the repository records the old q for a kept token
            return tok, torch.where(keep[..., None], q_old, p_s)
        return tok, p_s


class NoDrafter(torch.nn.Module):
    """The drafter slot of a drafter-free engine: no cache to keep, no input features to build."""

    def setup_cache(self, *args, **kwargs) -> None:
        pass

    def select_rows(self, rows: torch.Tensor) -> None:
        pass

    def target_features(self, out) -> torch.Tensor:
        return out.hidden[..., :0]
