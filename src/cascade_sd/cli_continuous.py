"""``cascade-sd continuous ...`` (the CSpD branch's workflow steps) and ``decode --model continuous``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from cascade_sd import defaults
from cascade_sd.cli_app import new_app
from cascade_sd.errors import CascadeError

continuous_app = new_app(help="Continuous tokens and CSpD: train, decode a cell, figures.")

ConfigOpt = typer.Option(None, "--config", "-c", help="Experiment config YAML.")

# Flags of ``decode --model continuous`` beyond the shared ones, with their types.
CSPD_FLAGS = {"gamma": int, "prefill": float, "ratio_temperature": float, "max_tries": int}


@continuous_app.command("train-autoencoder")
def train_autoencoder_cmd(config: Optional[Path] = ConfigOpt, out: Path = typer.Option(...),
                          latents: Path = typer.Option(..., help="latent cache of both splits to write"),
                          metrics: Path = typer.Option(...), grid: Path = typer.Option(...)) -> None:
    """Train the continuous autoencoder and encode the dataset once."""
    from cascade_sd.config import load_config
    from cascade_sd.continuous.jobs import train_autoencoder_job

    typer.echo(json.dumps(train_autoencoder_job(load_config(config), out, latents, metrics, grid)))


@continuous_app.command("train")
def train_cmd(config: Optional[Path] = ConfigOpt, role: str = typer.Option(..., help="target or draft"),
              latents: Path = typer.Option(...), out: Path = typer.Option(...),
              metrics: Path = typer.Option(...)) -> None:
    """Train the continuous target or its draft model on the latent cache."""
    from cascade_sd.config import load_config
    from cascade_sd.continuous.jobs import train_continuous_job

    typer.echo(json.dumps(train_continuous_job(load_config(config), role, latents, out, metrics)))


@continuous_app.command("cell", short_help="Decode one CSpD-grid cell for every seed and evaluate it.")
def cell_cmd(config: Optional[Path] = ConfigOpt, bundle: Path = typer.Option(...), cell: str = typer.Option(...),
             judge: Path = typer.Option(...), reference: Path = typer.Option(...),
             out_dir: Path = typer.Option(...)) -> None:
    """Decode one CSpD-grid cell for every seed, time it against vanilla at batch 1, evaluate it."""
    from cascade_sd.config import load_config
    from cascade_sd.continuous.jobs import cell_job

    result = cell_job(load_config(config), bundle, cell, judge, reference, out_dir)
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "accept_histogram"}))


@continuous_app.command("figures")
def figures_cmd(evals: list[Path] = typer.Argument(...), config: Optional[Path] = ConfigOpt,
                out_dir: Path = typer.Option(...)) -> None:
    """CSpD table and figure (speedup and FID vs γ per pre-fill)."""
    from cascade_sd.config import load_config
    from cascade_sd.continuous.jobs import figures_job

    figures_job(load_config(config), evals, out_dir)


@continuous_app.command("bench", short_help="Vanilla vs CSpD at batch 1 (warm, medians).")
def bench_cmd(bundle: Path = typer.Option(..., help="continuous bundle folder (results/continuous)"),
              gammas: str = typer.Option("2,4,8"), prefill: float = typer.Option(0.15),
              ratio_temperatures: str = typer.Option("1", help="comma-separated; 1 is exact"),
              images: int = typer.Option(5, min=1, help="batch-1 images per setting (median time)"),
              seed: int = typer.Option(0, min=0),
              cfg_scale: float = typer.Option(defaults.CONTINUOUS_CFG_SCALE, help="CFG on the head's ε (continuous.decode's)"),
              temperature: float = typer.Option(1.0), threads: int = typer.Option(2, min=1),
              device: str = typer.Option("cpu")) -> None:
    """Vanilla vs CSpD at batch 1 in one process (warm, medians): τ, acceptance, tries, speedup, cost split."""
    import torch

    from cascade_sd import api
    from cascade_sd.continuous.bench import bench_continuous, format_rows

    try:
        gamma_list = [int(g) for g in gammas.split(",")]
        temps = [float(t) for t in ratio_temperatures.split(",")]
    except ValueError:
        raise CascadeError("--gammas and --ratio-temperatures take comma-separated numbers") from None
    torch.set_num_threads(threads)
    b = api.load_bundle(bundle, device=device, model="continuous")
    rows = bench_continuous(b, gammas=gamma_list, prefill=prefill, ratio_temperatures=temps, images=images,
                            seed=seed, cfg_scale=cfg_scale, temperature=temperature)
    typer.echo(format_rows(rows))


def cspd_flags(args: list[str]) -> dict[str, Any]:
    """``--gamma 4 --prefill 0.15 --ratio-temperature 1 --max-tries N`` from extra arguments, typed."""
    out: dict[str, Any] = {}
    it = iter(args)
    for arg in it:
        name, sep, value = arg.removeprefix("--").partition("=")
        key = name.replace("-", "_")
        if not arg.startswith("--") or key not in CSPD_FLAGS:
            allowed = ", ".join("--" + k.replace("_", "-") for k in CSPD_FLAGS)
            raise CascadeError(f"{arg!r} is not an option of --model continuous; its options: {allowed}")
        value = value if sep else next(it, None)
        if value is None:
            raise CascadeError(f"--{name} needs a value")
        try:
            out[key] = CSPD_FLAGS[key](value)
        except ValueError:
            raise CascadeError(f"--{name}={value!r} is not a valid {CSPD_FLAGS[key].__name__}") from None
    return out


def decode_continuous_cmd(args: list[str], *, bundle: str, out_dir: Path, method: str, labels: Optional[str],
                          per_class: Optional[int], seed: int, temperature: float, cfg_scale: float,
                          device: str, dtype: Optional[str]) -> None:
    """``cascade-sd decode --model continuous``: latents, images grid and stats of vanilla or CSpD."""
    import numpy as np

    from cascade_sd import api
    from cascade_sd.continuous.train import decode_latents
    from cascade_sd.cli import _parse_labels
    from cascade_sd.imaging import save_grid
    from cascade_sd.io import atomic_folder, atomic_savez, atomic_write_json, check_output_dir

    flags = cspd_flags(args)
    b = api.load_bundle(bundle, device=device, dtype=dtype, model="continuous")
    labels = _parse_labels(labels, per_class, b.target.config.num_classes)
    check_output_dir("out_dir", out_dir)
    res = api.decode(b, labels, method=method, seed=seed, temperature=temperature, cfg_scale=cfg_scale, **flags)
    res.stats["seed"] = seed
    with atomic_folder(out_dir) as folder:  # all or nothing, as the discrete decode folder
        atomic_savez(folder / "latents.npz", latents=res.tokens.cpu().numpy(), labels=np.asarray(labels))
        save_grid(decode_latents(b.autoencoder, res.tokens.cpu()), folder / "grid.png", nrow=min(len(labels), 10))
        atomic_write_json(folder / "stats.json", res.stats)
    typer.echo(json.dumps({k: v for k, v in res.stats.items() if k != "accept_histogram"}))
