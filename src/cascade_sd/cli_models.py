"""``cascade-sd import ...``: bring real checkpoints behind the bundle interface (DESIGN 10)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cascade_sd.cli_app import new_app

import_app = new_app(help="Import real checkpoints (LlamaGen) as a bundle folder.")


@import_app.command("llamagen", short_help="Import a LlamaGen VQ + GPT pair as a bundle folder.")
def import_llamagen_cmd(
    vq: Path = typer.Option(..., help="LlamaGen tokenizer file, e.g. vq_ds16_c2i.pt"),
    gpt: Path = typer.Option(..., help="LlamaGen GPT file, e.g. c2i_B_256.pt or t2i_XL_stage1_256.pt"),
    out: Path = typer.Option(..., help="bundle folder to write (tokenizer.pt, target.pt, bundle.json)"),
    gpt_model: Optional[str] = typer.Option(None, help="GPT-B, GPT-L, GPT-XL, GPT-XXL or GPT-3B (default: from the file)"),
    image_size: Optional[int] = typer.Option(None, help="256, 384 or 512 (default: the file's args; required for bare state dicts)"),
    ema: bool = typer.Option(False, help="use the file's 'ema' weights instead of 'model'"),
    trusted_checkpoint: bool = typer.Option(False, help="allow pickled objects beyond tensors and argparse.Namespace"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="workflow config: log the import as an MLflow child run"),
) -> None:
    """Load a LlamaGen VQ + GPT pair into the package's models (strict key check) and write a bundle."""
    from cascade_sd.models.adapters.llamagen import import_llamagen

    def run() -> dict:
        return import_llamagen(vq, gpt, out, gpt_model=gpt_model, image_size=image_size, trusted=trusted_checkpoint,
                               ema=ema)

    if config is None:
        info = run()
    else:
        from cascade_sd.config import load_config
        from cascade_sd.tracking import child_run

        cfg = load_config(config)
        with child_run(cfg["results"], "import_llamagen", stage="models", params={"models": cfg["models"]}, seed=cfg["seed"]) as logged:
            info = run()
            logged.metrics({"target_parameters": info["target_parameters"], "vocab_size": info["vocab_size"]})
            logged.artifact(Path(out) / "bundle.json")
    typer.echo(json.dumps(info))
