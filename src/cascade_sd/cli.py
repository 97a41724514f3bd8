"""The ``cascade-sd`` command line (typer): train, tokenize, generate, evaluate, doctor, track.

Every subcommand validates its config and arguments before compute and reports user errors as
one line on stderr (exit code 2); the workflow's rules call these commands.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from cascade_sd import defaults
from cascade_sd.cli_app import new_app
from cascade_sd.cli_continuous import continuous_app, decode_continuous_cmd
from cascade_sd.cli_drift import bench_sequence_cmd, drift_cmd
from cascade_sd.cli_grid import grid_app
from cascade_sd.cli_models import import_app
from cascade_sd.config import load_config, validate_config
from cascade_sd.errors import CascadeError

app = new_app(add_completion=False, pretty_exceptions_enable=False,
              help="Relaxed speculative decoding of AR image generators.")
train_app = new_app(help="Train the built-in tokenizer, target or judge.")
track_app = new_app(help="MLflow tracking set-up.")
data_app = new_app(help="Dataset checks.")
app.add_typer(train_app, name="train")
app.add_typer(track_app, name="track")
app.add_typer(data_app, name="data")
app.add_typer(grid_app, name="grid")
app.add_typer(import_app, name="import")
app.add_typer(continuous_app, name="continuous")

ConfigOpt = typer.Option(None, "--config", "-c", help="Experiment config YAML (defaults: workflow/schemas/config.schema.yaml).")
# Sampling flags share the workflow's defaults (cascade_sd.defaults: the config schema's sample.*).
TemperatureOpt = typer.Option(defaults.TEMPERATURE, help="softmax temperature")
TopKOpt = typer.Option(defaults.TOP_K, help="keep the k most likely tokens (0 = off)")
TopPOpt = typer.Option(defaults.TOP_P, help="nucleus mass (1 = off)")
CfgOpt = typer.Option(defaults.CFG_SCALE, help="classifier-free guidance scale (1 = off; 3 as LlamaGen and the workflow)")
TreeTopKOpt = typer.Option(defaults.TREE_TOP_K, help="dynamic tree: children per expanded node")
DepthOpt = typer.Option(defaults.DEPTH, help="dynamic tree: draft depth")
TotalTokensOpt = typer.Option(str(defaults.TOTAL_TOKENS), help="dynamic tree: nodes incl. root, or 'auto'")
JacobiOpt = typer.Option(None, help="--drafter jacobi: sjd, scd-mc, scd-gumbel or sjd-pac (default sjd)")
WindowOpt = typer.Option(None, "--jacobi-window", help="--drafter jacobi: window L, nodes per target forward incl. "
                         "the root (default 16 sjd, 32 scd, 64 sjd-pac)")
PacWidthOpt = typer.Option(None, help="--jacobi sjd-pac: candidates W per tree column (default 3)")
PacDepthOpt = typer.Option(None, help="--jacobi sjd-pac: tree depth D, columns 1..D-1 branch (default 3)")
JacobiCodeOpt = typer.Option(None, help="--drafter jacobi: exact (default) or reference-code (scd-mc, sjd-pac: "
                             "their published code, not exact)")


def _jacobi(drafter: str, variant: Optional[str], window: Optional[int], width: Optional[int], depth: Optional[int],
            code: Optional[str]) -> Optional[dict[str, Any]]:
    """The Jacobi options the flags set (``api.jacobi_spec`` checks them), or None for a trained drafter."""
    given = {"variant": variant, "window": window, "width": width, "depth": depth, "code": code}
    given = {k: v for k, v in given.items() if v is not None}
    if drafter != "jacobi":
        if given:
            raise CascadeError("--jacobi, --jacobi-window, --pac-width, --pac-depth and --jacobi-code need --drafter jacobi; "
                               f"got --drafter {drafter}")
        return None
    return given


def _config(path: Optional[Path], **sample_overrides: Any) -> dict[str, Any]:
    config = load_config(path)
    overrides = {k: v for k, v in sample_overrides.items() if v is not None}
    if overrides:
        config["sample"].update(overrides)
        config = validate_config(config)
    return config


@track_app.command("init", short_help="Create the experiment, parent run and stage runs (first job).")
def track_init(config: Optional[Path] = ConfigOpt) -> None:
    """Create the MLflow schema, experiment, parent run and stage runs before any parallel job starts."""
    from cascade_sd.tracking import init_tracking, workflow_stages

    cfg = _config(config)
    info = init_tracking(cfg["results"], cfg["mlflow"]["experiment"], cfg, workflow_stages(cfg))
    typer.echo(json.dumps(info))


@track_app.command("reopen")
def track_reopen(config: Optional[Path] = ConfigOpt) -> None:
    """Mark the workflow's parent and stage runs RUNNING again (the workflow's start hook)."""
    from cascade_sd.tracking import reopen_tracking

    if reopen_tracking(_config(config)["results"]):
        typer.echo("mlflow: workflow run reopened")


@track_app.command("finish", short_help="End the parent and stage runs (the workflow's end hooks).")
def track_finish(config: Optional[Path] = ConfigOpt,
                 status: str = typer.Option(..., help="FINISHED (workflow succeeded) or FAILED")) -> None:
    """End the workflow's parent run with --status and each stage run with its jobs' status (the
    workflow's success and error hooks)."""
    from cascade_sd.errors import check_choice
    from cascade_sd.tracking import finish_tracking

    check_choice("status", status, ("FINISHED", "FAILED"))
    ended = finish_tracking(_config(config)["results"], status)
    if ended:
        typer.echo("mlflow: " + ", ".join(f"{name} {state}" for name, state in ended.items()))


@data_app.command("prepare")
def data_prepare(config: Optional[Path] = ConfigOpt, out: Path = typer.Option(..., help="dataset.json to write")) -> None:
    """Check the configured dataset is present and record its fingerprint."""
    from cascade_sd.jobs import prepare_data

    info = prepare_data(_config(config), out)
    typer.echo(f"{info['source']}: {info['train_examples']} train / {info['test_examples']} test images")


@train_app.command("tokenizer")
def train_tokenizer(config: Optional[Path] = ConfigOpt, out: Path = typer.Option(...), metrics: Path = typer.Option(...)) -> None:
    """Train the VQ tokenizer; reports test PSNR and codebook usage."""
    from cascade_sd.jobs import train_tokenizer_job

    typer.echo(json.dumps(train_tokenizer_job(_config(config), out, metrics), indent=1))


@train_app.command("target")
def train_target(
    config: Optional[Path] = ConfigOpt,
    tokens: Path = typer.Option(..., help="token cache from `cascade-sd tokenize`"),
    tokenizer: Path = typer.Option(...),
    out: Path = typer.Option(...),
    metrics: Path = typer.Option(...),
) -> None:
    """Train the target GPT (class dropout for CFG); reports test NLL in bits per token."""
    from cascade_sd.jobs import train_target_job

    typer.echo(json.dumps(train_target_job(_config(config), tokens, tokenizer, out, metrics), indent=1))


@train_app.command("judge")
def train_judge(config: Optional[Path] = ConfigOpt, out: Path = typer.Option(...), metrics: Path = typer.Option(...)) -> None:
    """Train the in-domain judge classifier (fidelity score and FID/KID features)."""
    from cascade_sd.jobs import train_judge_job

    typer.echo(json.dumps(train_judge_job(_config(config), out, metrics), indent=1))


@train_app.command("drafter", short_help="Train a drafter (EAGLE or EAGLE-3); reports τ on held-out data.")
def train_drafter(
    config: Optional[Path] = ConfigOpt,
    arch: str = typer.Option(..., help="eagle (EAGLE-1/2) or eagle3 (EAGLE-3)"),
    target: Path = typer.Option(...),
    distill: Path = typer.Option(..., help="self-distill data from `cascade-sd distill`"),
    out: Path = typer.Option(...),
    metrics: Path = typer.Option(...),
    redundancy_weight: float = typer.Option(1.0, help="CASCADE's redundancy weight w (1 = off)"),
) -> None:
    """Train a drafter; reports top-1 agreement and mean accepted length on held-out target sequences."""
    from cascade_sd.errors import check_choice
    from cascade_sd.jobs import train_drafter_job

    check_choice("arch", arch, ("eagle", "eagle3"))
    typer.echo(json.dumps(train_drafter_job(_config(config), arch, target, distill, out, metrics,
                                            redundancy_weight=redundancy_weight), indent=1))


@app.command("distill", short_help="Self-distillation data (target samples and features) for drafters.")
def distill(
    config: Optional[Path] = ConfigOpt,
    target: Path = typer.Option(...),
    out: Path = typer.Option(...),
    labels: Optional[str] = typer.Option(None, help="comma-separated class labels to distil on (default: every class)"),
    captions: Optional[Path] = typer.Option(None, help="t2i targets: .npz/.pt with caption_embs (+ emb_masks)"),
) -> None:
    """Self-distillation data for drafter training (target samples and features), cached on disk."""
    from cascade_sd.jobs import distill_job
    from cascade_sd.models.adapters.llamagen import Captions

    if labels and captions:
        raise CascadeError("give either --labels or --captions, not both")
    conditions = Captions.load(captions) if captions else (_parse_labels(labels, None, 0) if labels else None)
    typer.echo(json.dumps(distill_job(_config(config), target, out, conditions=conditions)))


@app.command("tokenize")
def tokenize(config: Optional[Path] = ConfigOpt, tokenizer: Path = typer.Option(...), out: Path = typer.Option(...)) -> None:
    """Tokenise the whole dataset once and cache the codes."""
    from cascade_sd.jobs import tokenize_job

    typer.echo(json.dumps(tokenize_job(_config(config), tokenizer, out)))


@app.command("generate")
def generate(
    config: Optional[Path] = ConfigOpt,
    tokenizer: Path = typer.Option(...),
    target: Path = typer.Option(...),
    out_dir: Path = typer.Option(..., help="folder for tokens.npz, images.npz, grid.png, stats.json"),
    seed: int = typer.Option(0, min=0),
    per_class: Optional[int] = typer.Option(None, min=1, help="samples per class (default: config sample.per_class)"),
    batch_size: Optional[int] = typer.Option(None, help="override sample.batch_size"),
    temperature: Optional[float] = typer.Option(None, help="override sample.temperature (0 = greedy)"),
    top_k: Optional[int] = typer.Option(None, help="override sample.top_k (0 = off)"),
    top_p: Optional[float] = typer.Option(None, help="override sample.top_p (1 = off)"),
    cfg_scale: Optional[float] = typer.Option(None, help="override sample.cfg_scale (1 = no guidance)"),
) -> None:
    """Vanilla (plain AR) sampling of every class; writes a PNG grid."""
    from cascade_sd.jobs import generate_job

    cfg = _config(config, batch_size=batch_size, temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale)
    typer.echo(json.dumps(generate_job(cfg, tokenizer, target, out_dir, seed=seed, per_class=per_class)))


@app.command("evaluate")
def evaluate(
    config: Optional[Path] = ConfigOpt,
    samples: Path = typer.Option(..., help="folder written by `cascade-sd generate`"),
    judge: Path = typer.Option(...),
    out: Path = typer.Option(...),
) -> None:
    """In-domain quality of samples: judge accuracy, FID and KID vs the test split."""
    from cascade_sd.jobs import evaluate_job

    typer.echo(json.dumps(evaluate_job(_config(config), samples, judge, out)))


@app.command("summarize")
def summarize(
    evals: list[Path] = typer.Argument(..., help="quality JSON files from `cascade-sd evaluate`"),
    tokenizer: Path = typer.Option(..., help="tokenizer metrics JSON"),
    target: Path = typer.Option(..., help="target metrics JSON"),
    judge: Path = typer.Option(..., help="judge metrics JSON"),
    out: Path = typer.Option(..., help="Markdown file to write"),
) -> None:
    """Write a Markdown summary of model metrics and sample quality."""
    from cascade_sd.jobs import summarize as _summarize

    typer.echo(_summarize(tokenizer, target, judge, evals, out))


def _conditions(bundle: Any, labels: Optional[str], per_class: Optional[int], captions: Optional[Path]) -> tuple[Any, list[int]]:
    """What to condition on: caption features for t2i targets (``--captions``), class labels otherwise."""
    from cascade_sd.models.adapters.llamagen import Captions

    t2i = bundle.target.config.model_type == "t2i"
    if t2i != (captions is not None):
        raise CascadeError("--captions is required for a t2i target" if t2i else "--captions needs a t2i target; "
                           "this one is class-conditional (use --labels / --per-class)")
    if t2i:
        caps = Captions.load(captions)
        return caps, list(range(len(caps)))
    lab = _parse_labels(labels, per_class, bundle.target.config.num_classes)
    return lab, lab


def _parse_labels(labels: Optional[str], per_class: Optional[int], classes: int) -> list[int]:
    if labels and per_class:
        raise CascadeError("give either --labels or --per-class, not both")
    if labels:
        return _int_list("labels", labels)
    return [c for c in range(classes) for _ in range(per_class or 1)]


def _int_list(field: str, text: str) -> list[int]:
    """A comma-separated list of integers (``--batch-sizes 1,16``), or a one-line error naming ``field``."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise CascadeError(f"{field}={text!r} is not a comma-separated list of integers")
    return values


RULE_FLAGS = {"allow_extra_args": True, "ignore_unknown_options": True}
RULE_FLAGS_HELP = "Rule parameters are flags too: --NAME VALUE (e.g. --delta 0.2; list them with `cascade-sd rules`)."


def _rule_flags(args: list[str], method: str) -> dict[str, Any]:
    """Rule parameters from the extra ``--name value`` / ``--name=value`` flags, checked against ``method``."""
    from cascade_sd.acceptance import RULES

    out: dict[str, Any] = {}
    allowed = RULES[method].parameters if method in RULES else {}
    it = iter(args)
    for arg in it:
        if not arg.startswith("--"):
            raise CascadeError(f"unexpected argument {arg!r}; rule parameters are given as --name value")
        name, sep, value = arg[2:].partition("=")
        key = name.replace("-", "_")
        if key not in allowed:
            names = ", ".join("--" + k.replace("_", "-") for k in allowed) or "none"
            raise CascadeError(f"--{name} is not an option of method={method!r}; its rule parameters: {names}")
        if not sep:
            value = next(it, None)
            if value is None:
                raise CascadeError(f"--{name} needs a value")
        out[key] = value
    return out


@app.command("decode", context_settings=RULE_FLAGS, epilog=RULE_FLAGS_HELP,
             short_help="Decode images with any method, tree and drafter.")
def decode_cmd(
    ctx: typer.Context,
    bundle: str = typer.Option(..., help="bundle folder (results/models) or toy spec 'toy:vocab=5,len=3,seed=0'"),
    out_dir: Path = typer.Option(..., help="folder for tokens.npz, stats.json (and grid.png with a tokenizer)"),
    method: str = typer.Option("strict", help="'vanilla' or an acceptance rule (see `cascade-sd rules`); "
                               "'vanilla' or 'cspd' with --model continuous"),
    model: str = typer.Option("discrete", help="discrete (VQ tokens) or continuous (results/continuous: CSpD, "
                              "flags --gamma --prefill --ratio-temperature --max-tries)"),
    tree: str = typer.Option(defaults.TREE, help="chain-N, tree-25, tree-57 or dynamic"),
    drafter: str = typer.Option(defaults.DRAFTER, help="drafter name in the bundle (eagle, eagle3, ...) or "
                                "'jacobi' (drafter-free: the target drafts its own window)"),
    jacobi: Optional[str] = JacobiOpt,
    window: Optional[int] = WindowOpt,
    pac_width: Optional[int] = PacWidthOpt,
    pac_depth: Optional[int] = PacDepthOpt,
    jacobi_code: Optional[str] = JacobiCodeOpt,
    labels: Optional[str] = typer.Option(None, help="comma-separated class labels"),
    per_class: Optional[int] = typer.Option(None, min=1, help="images per class (default 1)"),
    captions: Optional[Path] = typer.Option(None, help="t2i targets: .npz/.pt with caption_embs [B, n, 2048] (+ emb_masks)"),
    seed: int = typer.Option(0, min=0),
    temperature: float = TemperatureOpt,
    top_k: int = TopKOpt,
    top_p: float = TopPOpt,
    cfg_scale: float = CfgOpt,
    tree_top_k: int = TreeTopKOpt,
    depth: int = DepthOpt,
    total_tokens: str = TotalTokensOpt,
    record_drift: bool = typer.Option(False, help="record exact per-node drift (drift.npz) for `cascade-sd audit`"),
    drift_draws: int = typer.Option(256, min=1, help="Monte-Carlo draws for nodes with several sampled children"),
    drift_rows: Optional[int] = typer.Option(None, min=1, help="record drift for the first N images only"),
    device: str = typer.Option("cpu"),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA)"),
) -> None:
    """Decode images with any method, tree and drafter; writes tokens, stats and a grid."""
    import numpy as np

    from cascade_sd import api
    from cascade_sd.errors import check_choice
    from cascade_sd.io import atomic_folder, atomic_savez, atomic_write_json, check_output_dir
    from cascade_sd.progress import Progress

    check_choice("model", model, ("discrete", "continuous"))
    if model == "continuous":
        if captions is not None or top_k != 0 or top_p != 1.0 or record_drift:
            raise CascadeError("--captions, --top-k, --top-p and --record-drift do not apply to --model continuous")
        return decode_continuous_cmd(ctx.args, bundle=bundle, out_dir=out_dir, method=method, seed=seed,
                                     labels=labels, per_class=per_class, temperature=temperature,
                                     cfg_scale=cfg_scale, device=device, dtype=dtype)
    total = api.parse_total_tokens(total_tokens)
    rule_params = _rule_flags(ctx.args, method)
    jacobi_options = _jacobi(drafter, jacobi, window, pac_width, pac_depth, jacobi_code)
    if jacobi_options is not None:
        api.jacobi_spec(drafter, jacobi_options)  # its errors before the bundle loads
    b = api.load_bundle(bundle, device=device, dtype=dtype)
    cond, lab = _conditions(b, labels, per_class, captions)
    check_output_dir("out_dir", out_dir)
    with Progress(f"decode {method}", len(lab), "images") as line:
        res = api.decode(b, cond, method=method, tree=tree, drafter=drafter, seed=seed, temperature=temperature,
                         top_k=top_k, top_p=top_p, cfg_scale=cfg_scale, tree_top_k=tree_top_k, depth=depth,
                         total_tokens=total, record_drift=record_drift, drift_draws=drift_draws, drift_rows=drift_rows,
                         progress=lambda done, all_: line.update(done * len(lab) // all_), jacobi=jacobi_options,
                         **rule_params)
    res.stats["seed"] = seed
    with atomic_folder(out_dir) as folder:  # all or nothing: a killed command leaves no partial folder
        atomic_savez(folder / "tokens.npz", tokens=res.tokens.cpu().numpy(), labels=np.asarray(lab, dtype=np.int64))
        if b.tokenizer is not None:
            from cascade_sd.imaging import save_grid
            from cascade_sd.jobs import decode_to_images

            save_grid(decode_to_images(b.tokenizer, res.tokens.cpu()), folder / "grid.png", nrow=min(len(lab), 10))
        if record_drift:
            atomic_savez(folder / "drift.npz", **res.arrays)
        atomic_write_json(folder / "stats.json", res.stats)
    typer.echo(json.dumps({k: v for k, v in res.stats.items() if k != "accept_histogram"}))


app.command("drift", short_help="Measured sequence TV and KL of a decode folder (exact log P_SD).")(drift_cmd)
app.command("bench-sequence", short_help="Cost of exact log P_SD against decoding, per rule.")(
    bench_sequence_cmd)


@app.command("audit", short_help="Measured drift against each rule's bound; exit 1 on a violation.")
def audit_cmd(
    run: str = typer.Argument(..., help="a results folder (searched for drift.npz) or an MLflow run id"),
    per_position: bool = typer.Option(False, help="also print the per-position table"),
    tolerance: float = typer.Option(1e-9, min=0.0, help="allowed excess of measured drift over the bound"),
    results: Path = typer.Option(Path("results"), help="results folder whose MLflow store holds the run"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="workflow config: log a folder's audit as a child run"),
) -> None:
    """Measured drift vs declared bound per run and position, with each paper's own bound and the
    share of nodes over it; exit 1 when a declared bound is violated."""
    from analysis.audit import audit_folder, format_audit
    from cascade_sd.io import atomic_write_json, atomic_write_text

    folder, run_id = Path(run), None
    if not folder.is_dir():
        import tempfile

        import mlflow

        from cascade_sd.tracking import default_tracking_uri

        mlflow.set_tracking_uri(default_tracking_uri(results))
        try:
            folder = Path(mlflow.artifacts.download_artifacts(run_id=run, dst_path=tempfile.mkdtemp()))
        except Exception as err:  # MLflow raises several types for an unknown run
            raise CascadeError(f"run={run!r} is neither a folder nor an MLflow run id in {results} "
                               f"({type(err).__name__})") from None
        run_id = run
    audits = audit_folder(folder, tolerance)
    table = format_audit(audits, per_position=per_position)
    typer.echo(table)
    summary = [{"run": a.name, "method": a.method, "params": a.params, "verdict": a.verdict,
                "violations": a.violations, "inconclusive": a.inconclusive, **a.sequence,
                "paper_bound": a.paper_bound, "paper_bound_violated_fraction": a.paper_violated_fraction,
                **({} if a.measured is None else a.measured.as_dict()),
                **({} if a.certified is None else a.certified.as_dict("certified_sequence_bound")),
                "sequence_problems": a.sequence_problems}
               for a in audits]
    if run_id is None:
        atomic_write_text(folder / "audit.md", table + "\n")
        atomic_write_json(folder / "audit.json", summary)
        if config is not None:
            from cascade_sd.tracking import child_run

            cfg = _config(config)
            with child_run(cfg["results"], "audit", stage="grid", params={"folder": str(folder), "tolerance": tolerance}) as run:
                run.metrics({"audit_runs": len(audits), "audit_violations": sum(a.violations for a in audits),
                             "audit_inconclusive": sum(a.inconclusive for a in audits)})
                run.artifact(folder / "audit.md")
                run.artifact(folder / "audit.json")
    else:
        from mlflow import MlflowClient

        client = MlflowClient()
        client.log_text(run_id, table + "\n", "audit.md")
        client.log_dict(run_id, summary, "audit.json")
        client.log_metric(run_id, "audit_violations", sum(a.violations for a in audits))
    if any(a.verdict == "violated" for a in audits):
        typer.echo("error: a declared drift bound is violated", err=True)
        raise typer.Exit(1)
    contradicted = [a for a in audits if a.sequence_problems]
    if contradicted:
        typer.echo(f"error: {contradicted[0].name}: {contradicted[0].sequence_problems[0]}", err=True)
        raise typer.Exit(1)


@app.command("bench", context_settings=RULE_FLAGS, epilog=RULE_FLAGS_HELP,
             short_help="Speed of trees and drafters against vanilla (warm, medians).")
def bench_cmd(
    ctx: typer.Context,
    bundle: str = typer.Option(..., help="bundle folder or toy spec"),
    batch_sizes: str = typer.Option("1,16", help="comma-separated batch sizes"),
    trees: str = typer.Option("chain-4,tree-25,tree-57,dynamic",
                              help="comma-separated tree families; all four by default because the bench compares "
                                   "them (decode's default is the workflow's chain-4)"),
    drafters: Optional[str] = typer.Option(None, help="comma-separated (default: all in the bundle)"),
    jacobi: Optional[str] = typer.Option(None, help="comma-separated Jacobi variants to add (drafter-free rows): "
                                         "sjd, scd-mc, scd-gumbel, sjd-pac"),
    window: Optional[int] = typer.Option(None, "--jacobi-window",
                                         help="--jacobi rows: window L for every variant (default: each one's)"),
    pac_width: Optional[int] = PacWidthOpt,
    pac_depth: Optional[int] = PacDepthOpt,
    jacobi_code: str = typer.Option("exact", help="--jacobi rows: comma-separated codes, a row per variant and code: "
                                    "exact, reference-code (scd-mc, sjd-pac)"),
    method: str = typer.Option("strict", help="the acceptance rule (see `cascade-sd rules`)"),
    repeats: int = typer.Option(3, min=1),
    waves: int = typer.Option(1, min=1, help="images per setting = batch size × waves (continuous batching)"),
    seed: int = typer.Option(0, min=0),
    temperature: float = TemperatureOpt,
    top_k: int = TopKOpt,
    top_p: float = TopPOpt,
    cfg_scale: float = CfgOpt,
    tree_top_k: int = TreeTopKOpt,
    depth: int = DepthOpt,
    total_tokens: str = TotalTokensOpt,
    threads: Optional[int] = typer.Option(None, min=1),
    device: str = typer.Option("cpu"),
    out: Optional[Path] = typer.Option(None, help="JSON file for the rows"),
) -> None:
    """Vanilla and speculative variants in one process (warm, medians): τ, tokens/s, speedup, cost model.

    One row per (batch size, drafter, tree), printed as it is measured. With --waves W each setting
    decodes W × batch images at most batch at a time: vanilla in W consecutive batches, speculative
    methods with continuous batching."""
    import torch

    from cascade_sd import api
    from cascade_sd.bench import TABLE_HEAD, format_table, run_bench
    from cascade_sd.io import atomic_write_json
    from cascade_sd.progress import Progress

    if threads:
        torch.set_num_threads(threads)
    b = api.load_bundle(bundle, device=device)
    measured: list[dict[str, Any]] = []

    def show(row: dict[str, Any]) -> None:
        measured.append(row)
        line.echo(format_table([row], head=False))
        if out:
            atomic_write_json(out, measured)

    rule_params = _rule_flags(ctx.args, method)
    jacobi_rows = [_jacobi("jacobi", v, window, pac_width if v == "sjd-pac" else None,
                           pac_depth if v == "sjd-pac" else None, code)
                   for v in (jacobi.split(",") if jacobi else []) for code in jacobi_code.split(",")]
    if not jacobi_rows and (window or pac_width or pac_depth):
        raise CascadeError("--jacobi-window, --pac-width and --pac-depth apply to --jacobi rows; give --jacobi")
    with Progress("bench", None, "settings") as line:
        line.echo(TABLE_HEAD)
        run_bench(
            b, batch_sizes=_int_list("batch_sizes", batch_sizes), trees=trees.split(","),
            drafters=drafters.split(",") if drafters else None, method=method, repeats=repeats, waves=waves, seed=seed,
            sampling={"temperature": temperature, "top_k": top_k, "top_p": top_p, "cfg_scale": cfg_scale},
            tree_options={"tree_top_k": tree_top_k, "depth": depth, "total_tokens": api.parse_total_tokens(total_tokens)},
            rule_params=rule_params, jacobi=jacobi_rows, on_row=show, progress=line,
        )


@app.command("bench-rules", short_help="Every rule's speed, drift and quality on one tree family.")
def bench_rules_cmd(
    bundle: str = typer.Option(..., help="bundle folder or toy spec"),
    tree: str = typer.Option(defaults.TREE, help="tree family: chain-N, tree-25, tree-57 or dynamic"),
    drafter: str = typer.Option(defaults.DRAFTER, help="drafter name in the bundle, or 'jacobi' (drafter-free)"),
    jacobi: Optional[str] = JacobiOpt,
    window: Optional[int] = WindowOpt,
    pac_width: Optional[int] = PacWidthOpt,
    pac_depth: Optional[int] = PacDepthOpt,
    jacobi_code: Optional[str] = JacobiCodeOpt,
    rules: Optional[str] = typer.Option(None, help="comma-separated rules (default: all, each with its sweep)"),
    defaults_only: bool = typer.Option(False, help="each rule at its paper defaults only, no sweep"),
    sweep_only: bool = typer.Option(False, help="each rule's strength sweep without its defaults"),
    timing_images: int = typer.Option(4, min=1, help="images decoded one at a time for the speed ratio"),
    drift_images: int = typer.Option(2, min=0, help="images with exact per-node drift recorded"),
    quality_images: int = typer.Option(0, min=0, help="images for judge accuracy / in-domain FID (0 = skip)"),
    quality_batch: int = typer.Option(50, min=1),
    seed: int = typer.Option(0, min=0),
    temperature: float = TemperatureOpt,
    top_k: int = TopKOpt,
    top_p: float = TopPOpt,
    cfg_scale: float = CfgOpt,
    tree_top_k: int = TreeTopKOpt,
    depth: int = DepthOpt,
    total_tokens: int = typer.Option(defaults.TOTAL_TOKENS, help="dynamic tree: nodes incl. root"),
    threads: Optional[int] = typer.Option(None, min=1),
    device: str = typer.Option("cpu"),
    config: Optional[Path] = ConfigOpt,
    out: Optional[Path] = typer.Option(None, help="JSON file for the rows (rewritten after every row)"),
) -> None:
    """Every rule at its paper defaults and its strength sweep on one tree family: τ, speedup vs
    vanilla, exact per-node drift, judge accuracy and in-domain FID."""
    import torch

    from cascade_sd import api
    from cascade_sd.bench import format_rule_table, run_rule_bench
    from cascade_sd.io import atomic_write_json

    if threads:
        torch.set_num_threads(threads)
    jacobi_options = _jacobi(drafter, jacobi, window, pac_width, pac_depth, jacobi_code)
    api.jacobi_spec(drafter, jacobi_options)  # its errors before the bundle loads
    b = api.load_bundle(bundle, device=device)
    reference = None
    if quality_images:
        from cascade_sd.data import load_images

        data = _config(config)["data"]
        reference = load_images(data["source"], "test", data.get("root")).images
    rows: list[dict[str, Any]] = []

    def save(row: dict[str, Any]) -> None:
        rows.append(row)
        typer.echo(format_rule_table([row]).splitlines()[-1])
        if out:
            atomic_write_json(out, rows)

    run_rule_bench(b, tree=tree, drafter=drafter, rules=rules.split(",") if rules else None,
                   timing_images=timing_images, drift_images=drift_images, quality_images=quality_images,
                   quality_batch=quality_batch, reference=reference, seed=seed, defaults_only=defaults_only,
                   sweep_only=sweep_only, jacobi=jacobi_options,
                   sampling={"temperature": temperature, "top_k": top_k, "top_p": top_p, "cfg_scale": cfg_scale},
                   tree_options={"tree_top_k": tree_top_k, "depth": depth, "total_tokens": total_tokens}, on_row=save)
    typer.echo(format_rule_table(rows))


@app.command("rules", short_help="List the acceptance rules, their parameters and bounds.")
def rules_cmd() -> None:
    """List the acceptance rules: parameters, defaults, allowed values and whether a TV bound is declared."""
    from cascade_sd.acceptance import RULES
    from cascade_sd.acceptance.cascade import VARIANTS

    filled = set(VARIANTS["llamagen"])  # parameters whose default is the chosen variant's (CASCADE)
    for name, cls in RULES.items():
        bound = "declares a per-node TV bound" if cls.declares_bound else "no declared bound"
        typer.echo(f"{name}: {(cls.__doc__ or '').strip().splitlines()[0]} [{bound}]")
        for key, spec in cls.parameters.items():
            allowed = "|".join(spec.choices) if spec.kind == "choice" else (
                "on|off" if spec.kind == "bool" else f"{spec.kind} in {'(' if spec.lo_open else '['}"
                f"{'-inf' if spec.lo is None else f'{spec.lo:g}'}, {'inf' if spec.hi is None else f'{spec.hi:g}'}]")
            default = {True: "on", False: "off"}.get(spec.default, spec.default) if spec.kind == "bool" else spec.default
            default = "variant" if default is None and key in filled else default
            typer.echo(f"  --{key.replace('_', '-'):<18} default {default!s:<10} {allowed:<28} {spec.doc}")


@app.command("doctor", short_help="Versions, device, dataset, MLflow URI; does the install match the lock?")
def doctor(config: Optional[Path] = ConfigOpt,
           lock_root: Optional[Path] = typer.Option(None, "--lock-root", help="Folder holding requirements.lock "
                                                    "and requirements-torch.txt (default: this checkout).")) -> None:
    """Print versions, threads, device, dataset, MLflow URI, and whether the installed environment
    matches the lock (each mismatch: name, locked, installed); exit 1 on a mismatch."""
    import platform

    import mlflow
    import torch

    import cascade_sd
    from cascade_sd import provenance
    from cascade_sd.data import load_images
    from cascade_sd.tracking import default_tracking_uri

    cfg = _config(config)
    commit, dirty = provenance.git_state()
    rows = {
        "cascade_sd": cascade_sd.__version__,
        "git": f"{commit}{' (dirty)' if dirty else ''}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mlflow": mlflow.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available",
        "config_device": cfg["device"],
        "mlflow_tracking_uri": default_tracking_uri(cfg["results"]),
    }
    try:
        data = load_images(cfg["data"]["source"], "test", root=cfg["data"]["root"], limit=10)
        rows["data"] = f"found ({data.source}, {cfg['data']['root'] or 'default location'})"
    except CascadeError as exc:
        rows["data"] = f"NOT FOUND: {exc}"
    root = lock_root or provenance.ROOT
    mismatches = []
    if not (root / provenance.LOCK).is_file():  # installed from outside a checkout
        rows["lock"] = f"not found in {root} (pass --lock-root FOLDER to compare with a checkout's lock)"
        rows["environment"] = "not compared"
    else:
        pins = provenance.locked(root)
        mismatches, extra = provenance.compare(pins, provenance.installed())
        rows["lock"] = f"{root / provenance.LOCK} (sha256 {provenance.lock_sha256(root)[:16]}…)"
        rows["environment"] = (f"matches the lock ({len(pins)} packages)" if not mismatches else
                               f"DOES NOT MATCH the lock: {len(mismatches)} of {len(pins)} packages differ")
        if extra:
            rows["not in the lock"] = ", ".join(extra)
    for key, value in rows.items():
        typer.echo(f"{key:>20}: {value}")
    if mismatches:
        width = max(len("package"), *(len(m.name) for m in mismatches))
        typer.echo(f"\n{'package':<{width}}  {'locked':<14}  installed")
        for m in mismatches:
            typer.echo(f"{m.name:<{width}}  {m.locked:<14}  {m.installed or 'missing'}")
        typer.echo("\nreinstall from the lock: pip install -r requirements.lock (README, Quickstart)")
        raise typer.Exit(1)


def usage_error_line(exc: Exception) -> str:
    """A usage error (bad value, missing or unknown option) as one line naming the option."""
    message = " ".join(exc.format_message().split())  # click wraps long messages
    command = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else "cascade-sd"
    return f"error: {command}: {message} (see {command} --help)"


def run(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` and return its exit code. User errors (the package's checks and
    the parser's usage errors alike) print one line on stderr and return 2, before any compute."""
    # typer vendors click: its usage errors live in typer._click (pinned by the lock).
    from typer._click import exceptions as parser

    try:
        code = app(args=argv, prog_name="cascade-sd", standalone_mode=False)
    except CascadeError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except parser.NoArgsIsHelpError as exc:  # a bare command group: its help, as click prints it
        exc.show()
        return exc.exit_code
    except parser.UsageError as exc:
        typer.echo(usage_error_line(exc), err=True)
        return 2
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        return 1
    except typer.Exit as exc:
        return exc.exit_code
    return code if isinstance(code, int) else 0


def main() -> None:
    """Entry point: ``run`` on the process's arguments."""
    sys.exit(run())


if __name__ == "__main__":
    main()
