"""CASCADE's redundancy signals made visible (DESIGN 4.7, 9): breadth similarity within the levels
of real draft trees and depth similarity along accepted paths.

One image is decoded with ``cascade`` on the dynamic tree; rounds are then replayed after evenly
spaced prefixes of that image through the engine's own phases (``round_at``; a dynamic tree is
a deterministic function of the prefix). The *accepted path* of a replayed round is the tree
path that spells the image's continuation (teacher-forced). Similarities come from the rule's
own ``breadth_similarity`` / ``depth_similarity``, so the maps show exactly what the rule sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from analysis.figures import _save, write_csv  # noqa: E402
from cascade_sd import api  # noqa: E402
from cascade_sd.acceptance import get_rule  # noqa: E402
from cascade_sd.decoding.engine import SpeculativeEngine  # noqa: E402
from cascade_sd.decoding.processing import SamplingParams  # noqa: E402


def replay(bundle: api.Bundle, *, label: int, seed: int, rounds: int, drafter: str, sampling: dict[str, Any],
           tree_top_k: int, depth: int, total_tokens: int, **rule_params: Any) -> list[dict[str, Any]]:
    """Per replayed round: node levels, the breadth similarity matrix and the comparable pairs, and
    the depth similarity along the accepted path (NaN past where the tree stops spelling it)."""
    opts = {"tree_top_k": tree_top_k, "depth": depth, "total_tokens": total_tokens}
    image = api.decode(bundle, [label], method="cascade", tree="dynamic", drafter=drafter, seed=seed, **sampling,
                       **opts, **rule_params).tokens[0].cpu()
    rule = get_rule("cascade", **rule_params)
    rule.bind(bundle.rule_resources())
    engine = SpeculativeEngine(bundle.target, bundle.drafter(drafter), rule, api.make_tree("dynamic", **opts),
                               SamplingParams(**sampling))
    n = image.shape[0]
    cond = torch.tensor([label], device=next(bundle.target.parameters()).device)
    out = []
    with torch.no_grad():
        for m in np.linspace(1, n - depth - 1, rounds).round().astype(int):
            tree, _, view, _ = engine.round_at(cond, image[None, :m])
            sim, comparable = rule.breadth_similarity(view)
            s_d = rule.depth_similarity(view)[0][0].cpu().numpy()
            tokens, parent = tree.tokens[0].cpu().numpy(), tree.parent[0].cpu().numpy()
            path, node = [], 0
            for step in range(depth):
                kids = np.nonzero((parent == node) & (tokens == int(image[m + step])))[0] if m + step < n else []
                if len(kids) == 0:
                    break
                node = int(kids[0])
                path.append(float(s_d[node]))
            out.append({"prefix": int(m), "level": tree.depth[0].cpu().numpy(), "breadth": sim[0].cpu().numpy(),
                        "comparable": comparable[0].cpu().numpy(), "path": path + [float("nan")] * (depth - len(path))})
    return out


def heatmaps(rounds: list[dict[str, Any]], out: Path, *, tau_b: float, tau_d: float) -> None:
    """``redundancy_breadth.png`` (one round's node×node similarity by level, and the share of same-level
    pairs above τ_b per round and level) and ``redundancy_depth.png`` (rounds × accepted depth), with CSVs."""
    out.mkdir(parents=True, exist_ok=True)
    depth = len(rounds[0]["path"])
    share = np.full((len(rounds), depth), np.nan)
    rows = []
    for i, r in enumerate(rounds):
        for lev in range(1, depth + 1):
            on = r["comparable"] & (r["level"][:, None] == lev)
            if on.any():
                share[i, lev - 1] = float((r["breadth"][on] > tau_b).mean())
                rows.append({"prefix": r["prefix"], "level": lev, "pairs": int(on.sum()),
                             "mean_similarity": float(r["breadth"][on].mean()), "share_above_tau_b": share[i, lev - 1]})
    show = max(rounds, key=lambda r: r["comparable"].sum())
    order = np.argsort(show["level"][1:], kind="stable") + 1
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"wspace": 0.35})  # room for the colorbar + label
    im = axes[0].imshow(show["breadth"][np.ix_(order, order)], cmap="viridis", vmin=-1, vmax=1)
    for edge in np.nonzero(np.diff(show["level"][order]))[0]:
        axes[0].axhline(edge + 0.5, color="w", lw=0.6)
        axes[0].axvline(edge + 0.5, color="w", lw=0.6)
    axes[0].set_title(f"breadth similarity, round after prefix {show['prefix']} (nodes by level)")
    fig.colorbar(im, ax=axes[0], fraction=0.046)
    im = axes[1].imshow(share, cmap="magma", vmin=0, vmax=1, aspect="auto")
    axes[1].set_xticks(range(depth), [str(d) for d in range(1, depth + 1)])
    axes[1].set_yticks(range(len(rounds)), [str(r["prefix"]) for r in rounds])
    axes[1].set_xlabel("tree level")
    axes[1].set_ylabel("round (prefix length)")
    axes[1].set_title(f"share of same-level pairs with similarity > τ_b = {tau_b}")
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    _save(fig, out / "redundancy_breadth.png")
    write_csv(out / "redundancy_breadth.csv", rows, ["prefix", "level", "pairs", "mean_similarity", "share_above_tau_b"])

    path = np.array([r["path"] for r in rounds])
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(path, cmap="viridis", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(depth), [str(d) for d in range(1, depth + 1)])
    ax.set_yticks(range(len(rounds)), [str(r["prefix"]) for r in rounds])
    ax.set_xlabel("step along the accepted path")
    ax.set_ylabel("round (prefix length)")
    ax.set_title(f"depth similarity s_d (parent vs child; τ_d = {tau_d}; blank: path ended)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, out / "redundancy_depth.png")
    write_csv(out / "redundancy_depth.csv",
              [{"prefix": r["prefix"], "step": k + 1, "depth_similarity": v} for r in rounds for k, v in enumerate(r["path"])],
              ["prefix", "step", "depth_similarity"])
