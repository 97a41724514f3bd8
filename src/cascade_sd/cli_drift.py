"""``cascade-sd drift RUN``: measured sequence-level drift of a decode folder (issue 23).

The folder's setting (rule and parameters, tree, drafter, sampling) comes from its ``stats.json``;
some of its images, spread over the folder, get their exact log P_SD and log P
(``cascade_sd.metrics.sequence``), and as many fresh target images the same, for TV estimated
both ways and KL (``analysis.sequence_tv``). Written to ``RUN/sequence.npz``, which ``cascade-sd
audit RUN`` reads beside the per-node drift.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

from cascade_sd import defaults
from cascade_sd.errors import CascadeError, DataError

SAMPLING = ("temperature", "top_k", "top_p", "cfg_scale")


def _setting(folder: Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """(stats.json, tokens [B, N], labels [B]) of a decode folder; one-line errors for anything missing."""
    stats_path, tokens_path = folder / "stats.json", folder / "tokens.npz"
    if not stats_path.is_file() or not tokens_path.is_file():
        raise DataError(f"run={str(folder)!r} is not a decode folder: it needs tokens.npz and stats.json")
    try:
        stats = json.loads(stats_path.read_text())
        with np.load(tokens_path) as z:
            tokens, labels = z["tokens"], z["labels"]
    except (OSError, KeyError, ValueError) as err:
        raise DataError(f"run={str(folder)!r}: unreadable tokens.npz or stats.json ({err})") from None
    if stats.get("method") in (None, "vanilla", "cspd") or str(stats.get("tree", "")).startswith("static:"):
        raise DataError(f"run={str(folder)!r} holds method={stats.get('method')!r}, tree={stats.get('tree')!r}; "
                        "allowed: a speculative rule on chain-N, tree-25, tree-57 or dynamic")
    return stats, tokens, labels


def drift_cmd(
    run: Path = typer.Argument(..., help="a decode folder (cascade-sd decode --out-dir, or a grid cell's seed folder)"),
    bundle: str = typer.Option(..., help="the bundle the folder was decoded with"),
    images: int = typer.Option(8, min=1, help="the folder's images (spread over it) whose exact log P_SD is computed"),
    seed: int = typer.Option(0, min=0, help="seed of the target images decoded for the second TV estimate"),
    temperature: Optional[float] = typer.Option(None, help="sampling, when stats.json does not record it"),
    top_k: Optional[int] = typer.Option(None, help="sampling, when stats.json does not record it"),
    top_p: Optional[float] = typer.Option(None, help="sampling, when stats.json does not record it"),
    cfg_scale: Optional[float] = typer.Option(None, help="sampling, when stats.json does not record it"),
    device: str = typer.Option("cpu"),
) -> None:
    """Exact log P_SD of a decode folder's images and of target images: measured sequence TV (both ways) and KL."""
    import torch

    from analysis import sequence_tv
    from cascade_sd import api
    from cascade_sd.io import atomic_savez

    stats, tokens, labels = _setting(run)
    given = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "cfg_scale": cfg_scale}
    sampling = {**stats.get("sampling", {}), **{k: v for k, v in given.items() if v is not None}}
    if set(sampling) != set(SAMPLING):
        missing = sorted(set(SAMPLING) - set(sampling))
        raise CascadeError(f"run={str(run)!r}: stats.json records no {missing[0]}; give --{missing[0].replace('_', '-')}")
    b = api.load_bundle(bundle, device=device)
    shape = {k: stats[k] for k in ("tree_top_k", "depth", "total_tokens") if k in stats and stats["tree"] == "dynamic"}
    rows = min(images, len(labels))
    pick = np.arange(rows) * (len(labels) // rows)
    chosen = torch.as_tensor(labels[pick], dtype=torch.long)
    setting = dict(method=stats["method"], tree=stats["tree"], drafter=stats["drafter"], **sampling, **shape,
                   **stats.get("rule_params", {}))
    on_sd = api.sequence_log_prob(b, chosen, torch.as_tensor(tokens[pick], dtype=torch.long), **setting)
    target = api.decode(b, chosen, method="vanilla", seed=seed, **sampling).tokens.cpu()
    on_target = api.sequence_log_prob(b, chosen, target, **setting)
    arrays = {"sampler_log_sd": on_sd.log_sd.numpy(), "sampler_log_target": on_sd.log_target.numpy(),
              "target_log_sd": on_target.log_sd.numpy(), "target_log_target": on_target.log_target.numpy(),
              "exact": np.concatenate([on_sd.exact.numpy(), on_target.exact.numpy()])}
    atomic_savez(run / "sequence.npz", labels=chosen.numpy(), sampler_tokens=tokens[pick].astype(np.int32),
                 target_tokens=target.numpy().astype(np.int32), **arrays)
    measured = sequence_tv.measure(arrays)
    typer.echo(json.dumps(measured.as_dict()))
    if not measured.agree:
        typer.echo(f"error: {sequence_tv.problems(measured, None, None)[0]}", err=True)
        raise typer.Exit(1)


def bench_sequence_cmd(
    bundle: str = typer.Option(..., help="bundle folder or toy spec"),
    trees: str = typer.Option("chain-4,dynamic", help="comma-separated tree families"),
    rules: Optional[str] = typer.Option(None, help="comma-separated rules (default: all)"),
    sweep: bool = typer.Option(False, help="each rule's strength sweep too, not only its paper defaults"),
    images: int = typer.Option(4, min=2, help="images (spread over the classes) per setting, and as many target images"),
    seed: int = typer.Option(0, min=0),
    cfg_scale: float = typer.Option(defaults.CFG_SCALE, help="classifier-free guidance scale (the workflow's)"),
    threads: Optional[int] = typer.Option(None, min=1),
    out: Optional[Path] = typer.Option(None, help="JSON file for the rows (rewritten after every row)"),
) -> None:
    """Cost of the exact sequence law against decoding the same images (plainly and with drift recorded),
    with the measured sequence TV both ways, KL and the hybrid bound; one row per setting as it is measured."""
    import torch

    from cascade_sd import api
    from cascade_sd.bench_sequence import HEADER, format_row, run_sequence_bench
    from cascade_sd.io import atomic_write_json

    if threads:
        torch.set_num_threads(threads)
    b = api.load_bundle(bundle)
    rows: list[dict[str, Any]] = []
    typer.echo(HEADER)

    def echo(row: dict[str, Any]) -> None:
        rows.append(row)
        typer.echo(format_row(row))
        if out:
            atomic_write_json(out, rows)

    run_sequence_bench(b, trees=[t.strip() for t in trees.split(",") if t.strip()],
                       rules=[r.strip() for r in rules.split(",")] if rules else None, defaults_only=not sweep,
                       images=images, seed=seed, sampling={"cfg_scale": cfg_scale}, echo=echo)
