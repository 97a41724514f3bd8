"""The workflow's decode grid (DESIGN 9): which (tree, drafter, method, setting) cells run for
which seeds, and the job that fills one cell.

A *setting* is a rule's parameter overrides as a path-safe slug (``default``, ``delta=0.2``,
``k=5,lam=10``), parsed back through the rule's own ``Param`` checks. Vanilla runs once per seed
(tree and drafter ``none``); every group adds strict and its rules (each rule's paper defaults,
or its whole ``sweep``). A drafter-free group (``drafter: jacobi``) names its Jacobi setting, which
becomes the cells' tree (``sjd-L16``); rules whose breadth reads a trained drafter compare the
target's outputs there (``breadth_source=target`` in the setting). One job per cell decodes every
seed's quality samples, records exact drift on a few rows and times vanilla and the method at batch 1
in the same process (speedup, DESIGN 7).
"""

from __future__ import annotations

import json
import logging
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cascade_sd.acceptance import get_rule
from cascade_sd.errors import ConfigError, DataError
from cascade_sd.metrics.drift import paper_bound_stats

NONE = "none"
JACOBI = "jacobi"


def setting_slug(params: dict[str, Any]) -> str:
    """``default`` or sorted ``name=value`` pairs joined by commas (floats as ``%g``)."""
    if not params:
        return "default"
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))


def parse_setting(method: str, slug: str) -> dict[str, Any]:
    """Inverse of ``setting_slug`` for ``method``; values checked by the rule's parameters."""
    from cascade_sd.acceptance import RULES

    if slug == "default":
        return {}
    allowed = RULES[method].parameters if method in RULES else {}
    out: dict[str, Any] = {}
    for part in slug.split(","):
        key, sep, text = part.partition("=")
        if key not in allowed or not sep:
            raise ConfigError(f"setting={slug!r}: {key!r} is not a parameter of method={method!r}; "
                              f"allowed: {', '.join(allowed) or 'none'}")
        out[key] = allowed[key].check(key, allowed[key].parse(key, text))
    return out


def drafter_names(config: dict[str, Any]) -> list[str]:
    """Drafters the workflow trains: every arch plain, and each of ``redundancy_archs`` with each
    redundancy weight (``eagle-rw2``)."""
    dc = config["drafter"]
    extra = [a for a in dc["redundancy_archs"] if a not in dc["archs"]]
    if extra:
        raise ConfigError(f"config: drafter.redundancy_archs contains {extra[0]!r}, which is not in drafter.archs; "
                          f"choose from {', '.join(map(repr, dc['archs']))}")
    return [f"{arch}{'' if w is None else f'-rw{w:g}'}" for arch in dc["archs"]
            for w in [None, *(dc["redundancy_weights"] if arch in dc["redundancy_archs"] else [])]]


def _group_methods(group: dict[str, Any]) -> list[str]:
    from cascade_sd.acceptance import RULES

    return list(RULES) if group["methods"] == "all" else list(group["methods"])


JACOBI_KEYS = {"jacobi": "variant", "jacobi_window": "window", "pac_width": "width", "pac_depth": "depth",
               "jacobi_code": "code"}


def group_tree(group: dict[str, Any]) -> str:
    """A group's tree column: its tree, or for ``drafter: jacobi`` its Jacobi setting's slug (``sjd-L16``)."""
    from cascade_sd.decoding.jacobi import JacobiSpec

    if group["drafter"] != JACOBI:
        return group["tree"]
    return JacobiSpec(**{JACOBI_KEYS[k]: group[k] for k in JACOBI_KEYS if k in group}).slug()


def check_decode(config: dict[str, Any]) -> None:
    """Fill group defaults and check methods, drafters and tree/rule pairs (one-line errors)."""
    from cascade_sd.acceptance import RULES
    from cascade_sd.decoding.jacobi import JacobiSpec

    drafters = drafter_names(config)
    for i, group in enumerate(config["decode"]["groups"]):
        group.setdefault("drafter", "eagle")
        group.setdefault("methods", "all")
        group.setdefault("sweep", False)
        options = set(group) & set(JACOBI_KEYS)
        if group["drafter"] == JACOBI:
            if "tree" in group:
                raise ConfigError(f"config: decode.groups.{i}: drafter 'jacobi' verifies its own window; "
                                  f"leave out tree (set jacobi, jacobi_window, pac_width, pac_depth, jacobi_code)")
            spec = JacobiSpec.from_slug(group_tree(group))  # the Jacobi options' one-line errors
            if spec.verifies_itself:
                raise ConfigError(f"config: decode.groups.{i}: jacobi 'sjd-pac' with jacobi_code 'reference-code' has "
                                  f"no per-node law the recorder can compute, and every grid cell records drift; "
                                  f"time it with `cascade-sd bench --jacobi sjd-pac --jacobi-code reference-code` "
                                  f"(allowed here: jacobi_code 'exact')")
            if spec.code == "reference-code" and set(_group_methods(group)) != {"strict"}:
                raise ConfigError(f"config: decode.groups.{i}: jacobi_code 'reference-code' records drift for the "
                                  f"reference code's strict test only; allowed methods: [strict]")
        elif options:
            raise ConfigError(f"config: decode.groups.{i}: {sorted(options)[0]} needs drafter: jacobi")
        elif "tree" not in group:
            raise ConfigError(f"config: decode.groups.{i} needs a tree (chain-N, tree-25, tree-57, dynamic) "
                              f"or drafter: jacobi")
        elif group["drafter"] not in drafters:
            raise ConfigError(f"config: decode.groups.{i}.drafter={group['drafter']!r} is not trained by this "
                              f"config; choose one of {', '.join(map(repr, drafters))}")
        for method in _group_methods(group):
            if method not in RULES:
                raise ConfigError(f"config: decode.groups.{i}.methods contains {method!r}; choose from "
                                  f"{', '.join(map(repr, RULES))} (vanilla runs in every grid)")
            if RULES[method].static_tree_only and group.get("tree") == "dynamic":
                raise ConfigError(f"config: decode.groups.{i}: method {method!r} needs a static tree, "
                                  f"got tree='dynamic'")


def grid_rows(config: dict[str, Any]) -> list[dict[str, str]]:
    """Unique grid cells (tree, drafter, method, setting) in a stable order; vanilla first."""
    from cascade_sd.acceptance import RULES

    rows = [{"tree": NONE, "drafter": NONE, "method": "vanilla", "setting": "default"}]
    for group in config["decode"]["groups"]:
        methods = _group_methods(group)
        for method in ["strict", *[m for m in methods if m != "strict"]]:
            sweep = RULES[method].sweep if group["sweep"] else RULES[method].sweep[:1]
            for params in sweep or ({},):
                params = dict(params)
                if group["drafter"] == JACOBI and RULES[method](**params).reads_drafter:
                    params["breadth_source"] = "target"
                row = {"tree": group_tree(group), "drafter": group["drafter"], "method": method,
                       "setting": setting_slug(dict(params))}
                if row not in rows:
                    rows.append(row)
    return rows


def cell_name(cell: dict[str, str]) -> str:
    """One readable label per cell (figures, MLflow run names)."""
    if cell["method"] == "vanilla":
        return "vanilla"
    tail = "" if cell["setting"] == "default" else f" {cell['setting']}"
    return f"{cell['method']}{tail} [{cell['tree']}, {cell['drafter']}]"


def cell_path(cell: dict[str, str]) -> str:
    """The cell's relative folder, as the workflow's Paramspace names it (``tree~T/drafter~D/method~M/setting~S``)."""
    return "/".join(f"{key}~{cell[key]}" for key in ("tree", "drafter", "method", "setting"))


def grid_decode_job(config: dict[str, Any], bundle_dir: Path, cell: dict[str, str], seeds: list[int],
                    cell_dir: Path) -> list[dict[str, Any]]:
    """Fill one grid cell for each seed (``cell_dir/seed<s>``): quality samples (tokens, images, grid),
    drift on the first ``drift_rows`` images, and a warm batch-1 timing of vanilla and the method
    (same process). One process per cell: the bundle is loaded and the timing warmed up once."""
    from cascade_sd import api
    from cascade_sd.bench import time_images
    from cascade_sd.jobs import setup_runtime

    device = setup_runtime(config)
    dc, sc = config["decode"], config["sample"]
    method = cell["method"]
    params = parse_setting(method, cell["setting"])
    sampling = {k: sc[k] for k in ("temperature", "top_k", "top_p", "cfg_scale")}
    opts: dict[str, Any] = {}
    if method != "vanilla" and cell["drafter"] == JACOBI:
        from cascade_sd.decoding.jacobi import JacobiSpec

        opts = {"tree": api.WINDOW, "drafter": JACOBI, "jacobi": JacobiSpec.from_slug(cell["tree"]), **params}
    elif method != "vanilla":
        opts = {"tree": cell["tree"], "drafter": cell["drafter"], "tree_top_k": dc["tree_top_k"],
                "depth": dc["depth"], "total_tokens": dc["total_tokens"], **params}
    bundle = api.load_bundle(bundle_dir, device=device)
    for name, o in (("vanilla", {}), (method, opts)):  # warm-up both before timing either
        time_images(bundle, name, o, 1, seed=10_000, sampling=sampling)
    return [_decode_seed(config, bundle, cell, params, opts, sampling, seed, cell_dir / f"seed{seed}") for seed in seeds]


def _decode_seed(config: dict[str, Any], bundle: Any, cell: dict[str, str], params: dict[str, Any],
                 opts: dict[str, Any], sampling: dict[str, Any], seed: int, out_dir: Path) -> dict[str, Any]:
    """One seed of a cell, as its own MLflow child run."""
    from cascade_sd import api
    from cascade_sd.bench import time_images
    from cascade_sd.imaging import save_grid
    from cascade_sd.io import atomic_savez, atomic_write_json
    from cascade_sd.jobs import decode_to_images
    from cascade_sd.tracking import child_run

    dc, method = config["decode"], cell["method"]
    classes = decode_classes(config, bundle.target.config.num_classes)
    labels = classes.repeat_interleave(dc["per_class"])
    drift_rows = dc["drift_rows"]
    if method != "vanilla" and cell["tree"] != "dynamic" and get_rule(method, **params).draw_dependent:
        drift_rows = dc["probed_drift_rows"]  # every node probes each hypothetical child: costly
    run_params = {**mlflow_params(cell, params, dc), "sampling": sampling, "decode": dc}
    with child_run(config["results"], f"decode {cell_name(cell)} seed{seed}", stage="grid", params=run_params, seed=seed) as run:
        tokens, drift, drift_stats, rounds, accepted, histogram, effective = [], None, {}, 0, 0.0, None, {}
        effective_tree_size = None
        for start in range(0, len(labels), dc["batch_size"]):
            batch = labels[start:start + dc["batch_size"]]
            record = method != "vanilla" and start == 0 and drift_rows > 0
            res = api.decode(bundle, batch, method=method, seed=seed * 100_003 + start, **sampling, **opts,
                             **({"record_drift": True, "drift_rows": min(drift_rows, len(batch)),
                                 "drift_draws": dc["drift_draws"]} if record else {}))
            tokens.append(res.tokens.cpu())
            if record:
                drift = res.arrays
                drift_stats = {k: v for k, v in res.stats.items() if k.startswith("drift_")}
            if method != "vanilla":
                s = res.stats
                effective, effective_tree_size = s["rule_params"], s["total_tokens"]
                rounds += s["rounds"]
                accepted += s["mean_accepted_length"] * s["rounds"]
                hist = np.asarray(s["accept_histogram"], dtype=np.int64)
                histogram = hist if histogram is None else _add_hist(histogram, hist)
        tokens_t = torch.cat(tokens)
        n_tokens = tokens_t.shape[1]
        images = decode_to_images(bundle.tokenizer, tokens_t)
        timing_seed = 10_000 + seed * dc["timing_images"]
        t_van, _ = time_images(bundle, "vanilla", {}, dc["timing_images"], seed=timing_seed, sampling=sampling)
        t_sd, _ = time_images(bundle, method, opts, dc["timing_images"], seed=timing_seed, sampling=sampling)
        stats: dict[str, Any] = {
            **cell, "seed": seed, "rule_params": effective, "images": len(labels), "sampling": sampling,
            **({"tree_top_k": dc["tree_top_k"], "depth": dc["depth"], "total_tokens": effective_tree_size}
               if cell["tree"] == "dynamic" else {}),
            "tau": accepted / rounds if rounds else 1.0, "rounds": rounds,
            # Tokens per target forward: vanilla spends one per token (the prefill gives the first).
            "step_compression": len(labels) * n_tokens / (len(labels) + rounds) if rounds else 1.0,
            "accept_histogram": [] if histogram is None else histogram.tolist(),
            "vanilla_seconds_per_image": t_van / dc["timing_images"],
            "seconds_per_image": t_sd / dc["timing_images"], "speedup": t_van / t_sd,
        }
        stats |= drift_stats
        out_dir.mkdir(parents=True, exist_ok=True)
        if method != "vanilla":
            stats |= _sequence_law(bundle, method, opts, sampling, labels, tokens_t, effective_tree_size,
                                   _sequence_rows(dc, method, params, cell), seed, out_dir)
            if (out_dir / "sequence.npz").is_file():
                run.artifact(out_dir / "sequence.npz")
        atomic_savez(out_dir / "tokens.npz", tokens=tokens_t.numpy().astype(np.int32), labels=labels.numpy())
        atomic_savez(out_dir / "images.npz", images=images.numpy(), labels=labels.numpy())
        show = min(dc["per_class"], 8)
        pick = torch.cat([torch.arange(c * dc["per_class"], c * dc["per_class"] + show) for c in range(len(classes))])
        save_grid(images[pick], out_dir / "grid.png", nrow=show)
        if drift is not None:
            atomic_savez(out_dir / "drift.npz", **drift)
            run.artifact(out_dir / "drift.npz")
        atomic_write_json(out_dir / "stats.json", stats)
        run.metrics({k: v for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        run.artifact(out_dir / "grid.png")
        run.artifact(out_dir / "stats.json")
    return stats


def mlflow_params(cell: dict[str, str], params: dict[str, Any], dc: dict[str, Any]) -> dict[str, Any]:
    """A cell's MLflow params: the cell, every parameter of its rule as the rule sees it (paper defaults
    filled in: ``rule.delta``, ``rule.tau_b``, ...; filterable in ``search_runs``) and, on dynamic trees,
    the tree's options."""
    out: dict[str, Any] = {"cell": cell}
    if cell["method"] != "vanilla":
        out["rule"] = {k: v for k, v in get_rule(cell["method"], **params).params.items() if v is not None}
    if cell["tree"] == "dynamic":
        out["dynamic_tree"] = {k: dc[k] for k in ("tree_top_k", "depth", "total_tokens")}
    if cell["drafter"] == JACOBI:
        from cascade_sd.decoding.jacobi import JacobiSpec

        out["jacobi"] = JacobiSpec.from_slug(cell["tree"]).to_dict()
    return out


def _sequence_rows(dc: dict[str, Any], method: str, params: dict[str, Any], cell: dict[str, str]) -> int:
    """Images per seed with exact log P_SD: fewer where every position probes each hypothetical child, none
    on a Jacobi window (its state between rounds is not a function of the prefix: ``api.sequence_log_prob``)."""
    if cell["drafter"] == JACOBI:
        return 0
    probed = cell["tree"] != "dynamic" and get_rule(method, **params).draw_dependent
    return dc["probed_sequence_rows"] if probed else dc["sequence_rows"]


def _sequence_law(bundle: Any, method: str, opts: dict[str, Any], sampling: dict[str, Any],
                  labels: torch.Tensor, tokens: torch.Tensor, tree_size: Any, rows: int, seed: int, out_dir: Path
                  ) -> dict[str, Any]:
    """Exact log P_SD and log P of ``rows`` of the cell's images (spread over the classes) and of as many
    target images of the same labels (``sequence.npz``; analysis/README.md "Sequence-level drift"):
    what the evaluation turns into measured sequence TV (both ways) and KL."""
    import time

    from cascade_sd import api
    from cascade_sd.io import atomic_savez

    rows = min(rows, len(labels))
    if rows <= 0:
        return {}
    pick = torch.arange(rows) * (len(labels) // rows)
    chosen = labels[pick]
    target = api.decode(bundle, chosen, method="vanilla", seed=seed * 100_003 + 99_991, **sampling).tokens.cpu()
    shape = dict(opts) | ({"total_tokens": tree_size} if opts["tree"] == "dynamic" else {})
    start = time.perf_counter()
    on_sd = api.sequence_log_prob(bundle, chosen, tokens[pick], method=method, **sampling, **shape)
    on_target = api.sequence_log_prob(bundle, chosen, target, method=method, **sampling, **shape)
    seconds = time.perf_counter() - start
    atomic_savez(out_dir / "sequence.npz", labels=chosen.numpy(), sampler_tokens=tokens[pick].numpy().astype(np.int32),
                 sampler_log_sd=on_sd.log_sd.numpy(), sampler_log_target=on_sd.log_target.numpy(),
                 target_tokens=target.numpy().astype(np.int32), target_log_sd=on_target.log_sd.numpy(),
                 target_log_target=on_target.log_target.numpy(),
                 exact=np.concatenate([on_sd.exact.numpy(), on_target.exact.numpy()]))
    return {"sequence_rows": rows, "sequence_seconds_per_image": seconds / (2 * rows),
            "sequence_exact": bool(on_sd.exact.all() and on_target.exact.all())}


def decode_classes(config: dict[str, Any], num_classes: int) -> torch.Tensor:
    """The classes the grid decodes: ``models.labels`` (real checkpoints) or every class of the target."""
    labels = config["models"]["labels"]
    if labels is None:
        return torch.arange(num_classes)
    bad = [c for c in labels if c >= num_classes]
    if bad:
        raise ConfigError(f"config: models.labels contains {bad[0]}; allowed 0..{num_classes - 1} (the target's classes)")
    return torch.tensor(labels)


def _add_hist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros(max(len(a), len(b)), dtype=np.int64)
    out[: len(a)] += a
    out[: len(b)] += b
    return out


#: What grid evaluate reads from every cell's stats.json.
CELL_STATS = ("tree", "drafter", "method", "setting", "seed", "rule_params", "images", "sampling", "tau", "rounds",
              "step_compression", "accept_histogram", "seconds_per_image", "speedup")


def load_cell_stats(folder: Path) -> dict[str, Any]:
    """stats.json of one finished grid job: written last, so a folder without it is unfinished."""
    path = folder / "stats.json"
    if not path.is_file():
        raise DataError(f"cell folder {str(folder)!r} has no stats.json: its decode did not finish; rerun it")
    stats = json.loads(path.read_text())
    missing = [k for k in CELL_STATS if k not in stats]
    if missing:
        raise DataError(f"cell folder {str(folder)!r}: stats.json has no {missing[0]!r} (written by an older "
                        f"version of grid decode); rerun its decode job")
    return stats


def reference_features_job(config: dict[str, Any], judge_path: Path, out: Path) -> dict[str, Any]:
    """Judge features of the test split, computed once for every cell's FID/KID (``features``, and
    a seeded 2000-image subset ``kid_features`` that bounds KID's O(n²) kernel)."""
    from cascade_sd.io import atomic_savez
    from cascade_sd.jobs import _images, setup_runtime
    from cascade_sd.metrics.quality import judge_features
    from cascade_sd.models.judge import load_judge

    from cascade_sd.tracking import child_run

    setup_runtime(config)
    judge, _ = load_judge(judge_path)
    with child_run(config["results"], "grid_reference", stage="grid", params={"data": config["data"]}, seed=config["seed"]) as run:
        feats = judge_features(judge, _images(config, "test").images)
        pick = np.random.default_rng(config["seed"]).permutation(len(feats))[:2000]
        atomic_savez(out, features=feats, kid_features=feats[np.sort(pick)])
        info = {"reference_images": len(feats), "kid_reference_images": len(pick)}
        run.metrics(info)
    return info


def grid_evaluate_job(config: dict[str, Any], judge_path: Path | None, reference: Path | None,
                      seed_dirs: list[Path], out: Path, vanilla_dirs: list[Path] | None = None) -> dict[str, Any]:
    """One cell over all its seeds: judge accuracy, in-domain FID and KID (bootstrap CIs over images;
    only with a judge, i.e. built-in models), τ and its histogram, speedup per seed, and drift (mean
    per node, declared bound, sequence bound Σ_t E[TV_t] with a CI over images), and the measured
    sequence TV and KL where the cell computed exact log P_SD (``analysis.sequence_tv``)."""
    from analysis import sequence_tv
    from analysis.estimators import sequence_bound
    from cascade_sd.io import atomic_write_json
    from cascade_sd.jobs import setup_runtime
    from cascade_sd.tracking import child_run

    if (judge_path is None) != (reference is None):
        raise ConfigError("grid evaluate: give both --judge and --reference (quality metrics) or neither")
    setup_runtime(config)
    n_boot, seed = config["decode"]["bootstrap"], config["seed"]
    stats = [load_cell_stats(d) for d in seed_dirs]
    cell = {k: stats[0][k] for k in ("tree", "drafter", "method", "setting")}
    run_params = {**mlflow_params(cell, parse_setting(cell["method"], cell["setting"]), config["decode"]),
                  "sampling": stats[0]["sampling"], "seeds": [s["seed"] for s in stats]}
    with child_run(config["results"], f"evaluate {cell_name(cell)}", stage="grid", params=run_params, seed=seed) as run:
        rounds = sum(s["rounds"] for s in stats)
        speedups = [s["speedup"] for s in stats]
        hist = [s["accept_histogram"] for s in stats if s["accept_histogram"]]
        result: dict[str, Any] = {
            **cell, "name": cell_name(cell), "rule_params": stats[0]["rule_params"], "seeds": [s["seed"] for s in stats],
            "images": int(sum(s["images"] for s in stats)),
            "tau": sum(s["tau"] * s["rounds"] for s in stats) / rounds if rounds else 1.0,
            "tau_range": [min(s["tau"] for s in stats), max(s["tau"] for s in stats)],
            "speedup": float(np.mean(speedups)), "speedup_range": [min(speedups), max(speedups)],
            "step_compression": float(np.mean([s["step_compression"] for s in stats])),
            "seconds_per_image": float(np.mean([s["seconds_per_image"] for s in stats])),
            "accept_histogram": reduce(_add_hist, [np.asarray(h) for h in hist]).tolist() if hist else [],
        }
        if judge_path is not None:
            result |= _quality(judge_path, reference, seed_dirs, n_boot, seed,
                               None if cell["method"] == "vanilla" else vanilla_dirs)
        drift = [np.load(d / "drift.npz") for d in seed_dirs if (d / "drift.npz").is_file()]
        seq = certified = None
        if drift:
            per_node = np.concatenate([z["drift"] for z in drift])
            bound = np.concatenate([z["drift_bound"] for z in drift])
            seq = sequence_bound(per_node, n_boot=n_boot, seed=seed)
            paper = np.concatenate([z["drift_paper_bound"] for z in drift])
            if np.isfinite(paper).any():
                visited = np.concatenate([z["drift_visited"] for z in drift])
                runs = [paper_bound_stats(z["drift"], z["drift_paper_bound"], z["drift_visited"]) for z in drift]
                stats_all = paper_bound_stats(per_node, paper, visited)
                result |= {"paper_bound_mean": stats_all["paper_bound_mean"],
                           "paper_bound_violated_fraction": stats_all["paper_bound_violated_fraction"],
                           "paper_bound_violated_runs": float(np.mean([r["paper_bound_violated"] for r in runs]))}
            result |= {"drift_mean": float(per_node.mean()),
                       "drift_bound_mean": float(np.nanmean(bound)) if np.isfinite(bound).any() else None,
                       "drift_exact_fraction": float(np.concatenate([z["drift_exact"] for z in drift]).mean()),
                       "drift_rows": int(per_node.shape[0]),
                       "sequence_bound": seq.value, "sequence_bound_ci": [seq.lower, seq.upper]}
            if np.isfinite(bound).any():
                certified = sequence_bound(np.nan_to_num(bound), n_boot=n_boot, seed=seed)
                result |= {"certified_sequence_bound": certified.value,
                           "certified_sequence_bound_ci": [certified.lower, certified.upper]}
        elif cell["method"] == "vanilla":
            result |= {"drift_mean": 0.0, "sequence_bound": 0.0, "sequence_tv": 0.0, "sequence_kl": 0.0}
        arrays = sequence_tv.load([d / "sequence.npz" for d in seed_dirs])
        if arrays is not None:
            measured = sequence_tv.measure(arrays)
            problems = sequence_tv.problems(measured, seq, certified)
            for problem in problems:
                logging.getLogger("cascade_sd").error("grid cell %s: %s", cell_name(cell), problem)
            result |= measured.as_dict() | {"sequence_problems": problems}
            seconds = [s["sequence_seconds_per_image"] for s in stats if "sequence_seconds_per_image" in s]
            if seconds:
                result["sequence_seconds_per_image"] = float(np.mean(seconds))
        atomic_write_json(out, result)
        run.metrics({k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        run.artifact(out)
    return result


def grid_evaluate_all_job(config: dict[str, Any], judge_path: Path | None, reference: Path | None,
                          decode_dir: Path, out_dir: Path) -> list[dict[str, Any]]:
    """Evaluate every cell of the config's grid (``decode_dir/<cell>/seed<s>`` for each configured seed
    into ``out_dir/<cell>.json``) in one process: a job per cell would spend more on start-up than on
    the evaluation itself. A missing decode folder is an error before any cell is evaluated."""
    folders = [cell_path(c) for c in grid_rows(config)]
    seed_dirs = {rel: [decode_dir / rel / f"seed{s}" for s in config["decode"]["seeds"]] for rel in folders}
    missing = [str(d) for dirs in seed_dirs.values() for d in dirs if not (d / "stats.json").is_file()]
    if missing:
        raise ConfigError(f"grid evaluate: no decoded cell (stats.json) in {missing[0]} and {len(missing) - 1} more; "
                          "run `cascade-sd grid decode` for every cell of decode.groups first")
    vanilla = next((dirs for rel, dirs in seed_dirs.items() if "method~vanilla" in rel), None)
    return [grid_evaluate_job(config, judge_path, reference, dirs, out_dir / f"{rel}.json", vanilla)
            for rel, dirs in seed_dirs.items()]


def _quality(judge_path: Path, reference: Path, seed_dirs: list[Path], n_boot: int, seed: int,
             vanilla_dirs: list[Path] | None = None) -> dict[str, Any]:
    """Judge accuracy, in-domain FID (raw and debiased) and KID of a cell's images, with bootstrap CIs; with
    the vanilla cell's folders, the classifier lower bound on TV to the target's images (``classifier_tv``)."""
    from cascade_sd.metrics.quality import bootstrap_ci, fid_bootstrap_ci, judge_correct, judge_features, kid_bootstrap_ci
    from cascade_sd.models.judge import load_judge

    images = [np.load(d / "images.npz") for d in seed_dirs]
    fake = torch.from_numpy(np.concatenate([z["images"] for z in images]))
    labels = torch.from_numpy(np.concatenate([z["labels"] for z in images]))
    judge, _ = load_judge(judge_path)
    ref = np.load(reference)
    feats = judge_features(judge, fake)
    acc = bootstrap_ci(judge_correct(judge, fake, labels).double().numpy(), n_boot=n_boot, seed=seed)
    fid = fid_bootstrap_ci(ref["features"], feats, n_boot=n_boot, seed=seed)
    kid = kid_bootstrap_ci(ref["kid_features"], feats, n_boot=n_boot, seed=seed)
    extra = {}
    if vanilla_dirs:
        from analysis.estimators import classifier_tv

        vanilla = torch.from_numpy(np.concatenate([np.load(d / "images.npz")["images"] for d in vanilla_dirs]))
        lower = classifier_tv(feats, judge_features(judge, vanilla), n_boot=n_boot, seed=seed)
        extra = {"classifier_tv": lower.value, "classifier_tv_ci": [lower.lower, lower.upper]}
    return {**extra, "judge_accuracy": acc[0], "judge_accuracy_ci": list(acc[1:]),
            "fid_in_domain": fid["fid"], "fid_in_domain_corrected": fid["fid_corrected"],
            "fid_in_domain_ci": [fid["lower"], fid["upper"]],
            "kid_in_domain": kid[0], "kid_in_domain_ci": list(kid[1:]),
            "label": "in-domain (judge features), comparable only at equal image counts"}
