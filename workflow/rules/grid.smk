# The decode grid (DESIGN 9): every cell of `grid_rows` (vanilla, and per group strict plus each
# rule at its defaults or over its sweep) for every seed, then the evaluation of every cell, the drift
# audit, figures, the results table and CASCADE's redundancy heat-maps.
import pandas as pd
from snakemake.utils import Paramspace

from cascade_sd.grid import drafter_names, grid_rows

GRID = Paramspace(pd.DataFrame(grid_rows(config)), param_sep="~")
CELL = f"{R}/decode/{GRID.wildcard_pattern}"
DECODE = f"{CELL}/seed{{seed}}"
BUNDLE = {
    "tokenizer": TOKENIZER,
    "target": TARGET,
    **({"judge": f"{R}/models/judge.pt"} if BUILTIN else {}),
    "drafters": expand(f"{R}/models/drafter-{{name}}.pt", name=drafter_names(config)),
}
# In-domain quality needs the built-in judge; with real checkpoints the grid reports speed and drift.
QUALITY = {"judge": BUNDLE["judge"], "reference": f"{R}/eval/reference_features.npz"} if BUILTIN else {}
SEEDS = config["decode"]["seeds"]


rule grid_decode:
    """One cell, every seed (one process: the bundle loads and the timing warms up once): quality
    samples, exact drift on a few rows, batch-1 speedup vs vanilla."""
    input:
        **BUNDLE,
    output:
        stats=expand(f"{DECODE}/stats.json", seed=SEEDS, allow_missing=True),
        tokens=expand(f"{DECODE}/tokens.npz", seed=SEEDS, allow_missing=True),
        images=expand(f"{DECODE}/images.npz", seed=SEEDS, allow_missing=True),
        grid=expand(f"{DECODE}/grid.png", seed=SEEDS, allow_missing=True),
    params:
        cfg=CFG,
        bundle=lambda wc, input: Path(input.target).parent,
        out_dir=lambda wc, output: Path(output.stats[0]).parent.parent,
        seeds=" ".join(f"--seed {s}" for s in SEEDS),
    threads: config["threads"]
    log:
        f"{R}/logs/decode/{GRID.wildcard_pattern}.log",
    benchmark:
        f"{R}/benchmarks/decode/{GRID.wildcard_pattern}.tsv"
    conda:
        "../../environment.yml"
    shell:
        "cascade-sd grid decode -c {params.cfg} --bundle {params.bundle} --tree {wildcards.tree}"
        " --drafter {wildcards.drafter} --method {wildcards.method} --setting '{wildcards.setting}'"
        " {params.seeds} --out-dir '{params.out_dir}' > '{log}' 2>&1"


rule grid_reference:
    """Judge features of the test split, the FID/KID reference of every cell."""
    input:
        judge=f"{R}/models/judge.pt",
    output:
        f"{R}/eval/reference_features.npz",
    params:
        cfg=CFG,
    threads: config["threads"]
    log:
        f"{R}/logs/grid_reference.log",
    conda:
        "../../environment.yml"
    shell:
        "cascade-sd grid reference -c {params.cfg} --judge {input.judge} --out {output} > {log} 2>&1"


rule grid_evaluate:
    """Every cell over its seeds, in one process (start-up would dominate a job per cell): judge
    accuracy, FID, KID (bootstrap CIs; built-in models), τ, speedup, drift."""
    input:
        stats=expand(f"{R}/decode/{{cell}}/seed{{seed}}/stats.json", cell=GRID.instance_patterns, seed=SEEDS),
        **QUALITY,
    output:
        expand(f"{R}/eval/grid/{{cell}}.json", cell=GRID.instance_patterns),
    params:
        cfg=CFG,
        # Cell folders are four levels deep (tree~/drafter~/method~/setting~).
        decode_dir=lambda wc, input: Path(input.stats[0]).parents[5],
        out_dir=lambda wc, output: Path(output[0]).parents[3],
        quality=lambda wc, input: (
            f"--judge {input.judge} --reference {input.reference}" if BUILTIN else "--no-quality"
        ),
    threads: config["threads"]
    log:
        f"{R}/logs/grid_evaluate.log",
    benchmark:
        f"{R}/benchmarks/grid_evaluate.tsv"
    conda:
        "../../environment.yml"
    shell:
        "cascade-sd grid evaluate -c {params.cfg} --decode-dir '{params.decode_dir}' {params.quality}"
        " --out-dir '{params.out_dir}' > {log} 2>&1"


rule grid_audit:
    """Measured drift vs each rule's declared bound over every recorded run; fails on a violation."""
    input:
        expand(f"{R}/decode/{{cell}}/seed{{seed}}/stats.json", cell=GRID.instance_patterns, seed=SEEDS),
    output:
        table=report(f"{R}/decode/audit.md", caption="../report/audit.rst", category="Drift"),
        summary=f"{R}/decode/audit.json",
    params:
        cfg=CFG,
        folder=lambda wc, output: Path(output.table).parent,
    log:
        f"{R}/logs/grid_audit.log",
    conda:
        "../../environment.yml"
    shell:
        "cascade-sd audit {params.folder} -c {params.cfg} > {log} 2>&1"


FIGURES = ["pareto"] * BUILTIN + ["strength", "drift_vs_bound", "accept_hist", "speed", "samples", "measured_tv",
                                   "tv_vs_bound"]


rule grid_figures:
    """Results table (CSV + Markdown) and the grid figures, each with the CSV behind it."""
    input:
        evals=expand(f"{R}/eval/grid/{{cell}}.json", cell=GRID.instance_patterns),
        grids=expand(f"{R}/decode/{{cell}}/seed{SEEDS[0]}/grid.png", cell=GRID.instance_patterns),
    output:
        table=report(f"{R}/figures/results_table.md", caption="../report/results_table.rst", category="Results"),
        csv=f"{R}/figures/results_table.csv",
        figures=[report(f"{R}/figures/{name}.png", caption=f"../report/{name}.rst", category="Figures")
                 for name in FIGURES],
        data=[f"{R}/figures/{name}.csv" for name in FIGURES],
    params:
        cfg=CFG,
        evals=lambda wc, input: " ".join(f"'{e}'" for e in input.evals),
        grids=lambda wc, input: " ".join(f"--grid '{g}'" for g in input.grids),
        out_dir=lambda wc, output: Path(output.table).parent,
    log:
        f"{R}/logs/grid_figures.log",
    conda:
        "../../environment.yml"
    shell:
        "cascade-sd grid figures {params.evals} -c {params.cfg} {params.grids} --out-dir {params.out_dir}"
        " > {log} 2>&1"


rule redundancy_heatmaps:
    """CASCADE's breadth (within tree levels) and depth (along accepted paths) similarity maps."""
    input:
        **BUNDLE,
    output:
        breadth=report(f"{R}/figures/redundancy_breadth.png", caption="../report/redundancy.rst", category="Figures"),
        depth=report(f"{R}/figures/redundancy_depth.png", caption="../report/redundancy.rst", category="Figures"),
        data=[f"{R}/figures/redundancy_breadth.csv", f"{R}/figures/redundancy_depth.csv"],
    params:
        cfg=CFG,
        bundle=lambda wc, input: Path(input.target).parent,
        out_dir=lambda wc, output: Path(output.breadth).parent,
        label=(config["models"]["labels"] or [0])[0],
    threads: config["threads"]
    log:
        f"{R}/logs/redundancy_heatmaps.log",
    conda:
        "../../environment.yml"
    shell:
        "cascade-sd grid heatmaps -c {params.cfg} --bundle {params.bundle} --label {params.label}"
        " --out-dir {params.out_dir} > {log} 2>&1"
