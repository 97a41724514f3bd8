"""``cascade-sd grid ...``: the decode-grid steps of the workflow (DESIGN 9), one command per rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cascade_sd.cli_app import new_app

grid_app = new_app(help="Decode-grid steps: decode a cell, evaluate it, figures, heat-maps.")

ConfigOpt = typer.Option(None, "--config", "-c", help="Experiment config YAML.")


def _cell(tree: str, drafter: str, method: str, setting: str) -> dict[str, str]:
    return {"tree": tree, "drafter": drafter, "method": method, "setting": setting}


@grid_app.command("decode", short_help="Decode one grid cell for every seed (samples, drift, timing).")
def decode(
    config: Optional[Path] = ConfigOpt,
    bundle: Path = typer.Option(..., help="bundle folder (results/models)"),
    tree: str = typer.Option(...), drafter: str = typer.Option(...), method: str = typer.Option(...),
    setting: str = typer.Option("default", help="rule overrides as name=value,name=value"),
    seed: list[int] = typer.Option(..., min=0, help="repeat for several seeds"),
    out_dir: Path = typer.Option(..., help="the cell's folder; each seed writes seed<S>/"),
) -> None:
    """One grid cell for each seed: quality samples, drift on a few rows, batch-1 speedup vs vanilla."""
    from cascade_sd.config import load_config
    from cascade_sd.grid import grid_decode_job, grid_rows

    cfg = load_config(config)
    cell = _cell(tree, drafter, method, setting)
    if cell not in grid_rows(cfg):
        from cascade_sd.errors import ConfigError

        raise ConfigError(f"cell {cell} is not in this config's decode grid; see decode.groups")
    for stats in grid_decode_job(cfg, bundle, cell, sorted(set(seed)), out_dir):
        typer.echo(json.dumps({k: v for k, v in stats.items() if k != "accept_histogram"}))


@grid_app.command("reference")
def reference(config: Optional[Path] = ConfigOpt, judge: Path = typer.Option(...), out: Path = typer.Option(...)) -> None:
    """Judge features of the test split (FID/KID reference), once for the whole grid."""
    from cascade_sd.config import load_config
    from cascade_sd.grid import reference_features_job

    typer.echo(json.dumps(reference_features_job(load_config(config), judge, out)))


@grid_app.command("evaluate", short_help="Quality, τ, speedup and drift of every grid cell.")
def evaluate(
    config: Optional[Path] = ConfigOpt,
    decode_dir: Path = typer.Option(..., help="the grid's decode folder (results/decode): <cell>/seed<S>/ per cell and seed"),
    judge: Optional[Path] = typer.Option(None),
    reference: Optional[Path] = typer.Option(None, help="features from `cascade-sd grid reference`"),
    no_quality: bool = typer.Option(False, help="no in-domain judge (real checkpoints): τ, speedup and drift only"),
    out_dir: Path = typer.Option(..., help="writes <cell>.json per cell (results/eval/grid)"),
) -> None:
    """Quality (bootstrap CIs), τ, speedup and drift of every grid cell over its seeds, one line per cell."""
    from cascade_sd.config import load_config
    from cascade_sd.errors import ConfigError
    from cascade_sd.grid import grid_evaluate_all_job

    if no_quality == (judge is not None or reference is not None):
        raise ConfigError("grid evaluate: give --judge and --reference, or --no-quality (not both)")
    for result in grid_evaluate_all_job(load_config(config), judge, reference, decode_dir, out_dir):
        typer.echo(json.dumps({k: v for k, v in result.items() if k != "accept_histogram"}))


@grid_app.command("figures")
def figures(
    evals: list[Path] = typer.Argument(..., help="evaluation JSONs, in grid order"),
    config: Optional[Path] = ConfigOpt,
    grids: list[Path] = typer.Option(..., "--grid", help="a sample grid PNG per evaluation, in the same order (repeat)"),
    out_dir: Path = typer.Option(...),
) -> None:
    """Results table (CSV + Markdown) and the grid figures, each with its CSV."""
    from analysis.figures import make_all
    from cascade_sd.config import load_config
    from cascade_sd.tracking import child_run

    cfg = load_config(config)
    pngs = list(grids)
    if len(pngs) != len(evals):
        from cascade_sd.errors import ConfigError

        raise ConfigError(f"grids: {len(pngs)} sample grids for {len(evals)} evaluations; give one per evaluation")
    with child_run(cfg["results"], "figures", stage="grid", params={"cells": len(evals)}, seed=cfg["seed"]) as run:
        make_all(evals, pngs, out_dir)
        for path in sorted(out_dir.glob("*")):
            if path.suffix in (".png", ".csv", ".md") and not path.name.startswith("redundancy"):
                run.artifact(path, "figures")
    typer.echo((out_dir / "results_table.md").read_text())


@grid_app.command("heatmaps")
def heatmaps(
    config: Optional[Path] = ConfigOpt,
    bundle: Path = typer.Option(...),
    drafter: str = typer.Option("eagle"),
    label: int = typer.Option(0, min=0),
    out_dir: Path = typer.Option(...),
) -> None:
    """CASCADE's breadth and depth similarity heat-maps on replayed dynamic-tree rounds."""
    from analysis.redundancy import heatmaps as draw, replay
    from cascade_sd import api
    from cascade_sd.acceptance import get_rule
    from cascade_sd.config import load_config
    from cascade_sd.jobs import setup_runtime

    cfg = load_config(config)
    device = setup_runtime(cfg)
    dc, sc = cfg["decode"], cfg["sample"]
    b = api.load_bundle(bundle, device=device)
    sampling = {k: sc[k] for k in ("temperature", "top_k", "top_p", "cfg_scale")}
    rounds = replay(b, label=label, seed=cfg["seed"], rounds=dc["heatmap_rounds"], drafter=drafter, sampling=sampling,
                    tree_top_k=dc["tree_top_k"], depth=dc["depth"], total_tokens=dc["total_tokens"])
    params = get_rule("cascade").params
    from cascade_sd.tracking import child_run

    with child_run(cfg["results"], "redundancy_heatmaps", stage="grid", params={"drafter": drafter, "label": label, **params},
                   seed=cfg["seed"]) as run:
        draw(rounds, out_dir, tau_b=params["tau_b"], tau_d=params["tau_d"])
        for name in ("redundancy_breadth", "redundancy_depth"):
            run.artifact(out_dir / f"{name}.png", "figures")
            run.artifact(out_dir / f"{name}.csv", "figures")
    typer.echo(f"wrote {out_dir}/redundancy_breadth.png and redundancy_depth.png")
