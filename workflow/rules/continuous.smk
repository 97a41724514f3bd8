# The CSpD branch (DESIGN 5): continuous autoencoder → latent cache → continuous target and draft
# → one job per cell (vanilla, CSpD over γ / pre-fill / ratio temperature; all seeds, evaluation
# included) → the CSpD table and figure.
from cascade_sd.continuous.jobs import cell_slug, cells

C = f"{R}/continuous"
CSPD_CELLS = [cell_slug(c) for c in cells(config)]


rule train_autoencoder:
    """Train the continuous autoencoder and cache the latents of both splits."""
    input:
        rules.data.output,
    output:
        model=f"{C}/autoencoder.pt",
        latents=f"{C}/latents.pt",
        metrics=f"{R}/metrics/autoencoder.json",
        grid=f"{R}/figures/autoencoder_reconstructions.png",
    params:
        cfg=CFG,
        settings=config["continuous"]["autoencoder"],
        seed=config["seed"],
    threads: config["threads"]
    log:
        f"{R}/logs/train_autoencoder.log",
    benchmark:
        f"{R}/benchmarks/train_autoencoder.tsv"
    conda:
        "../../environment.yml"
    shell:
        "cascade-sd continuous train-autoencoder -c {params.cfg} --out {output.model} --latents {output.latents}"
        " --metrics {output.metrics} --grid {output.grid} > {log} 2>&1"


rule train_continuous:
    """Train the continuous target or its (smaller) draft model on the latent cache."""
    input:
        latents=rules.train_autoencoder.output.latents,
    output:
        model=f"{C}/{{role}}.pt",
        metrics=f"{R}/metrics/continuous_{{role}}.json",
    wildcard_constraints:
        role="target|draft",
    params:
        cfg=CFG,
        settings=lambda wc: config["continuous"][wc.role],
        head=(config["continuous"]["head"], config["continuous"]["sample_steps"]),
        seed=config["seed"],
    threads: config["threads"]
    log:
        f"{R}/logs/train_continuous_{{role}}.log",
    benchmark:
        f"{R}/benchmarks/train_continuous_{{role}}.tsv"
    conda:
        "../../environment.yml"
    shell:
        "cascade-sd continuous train -c {params.cfg} --role {wildcards.role} --latents {input.latents}"
        " --out {output.model} --metrics {output.metrics} > {log} 2>&1"


rule cspd_cell:
    """One cell for every seed: quality images, warm batch-1 speedup vs vanilla, FID/KID/judge accuracy."""
    input:
        autoencoder=rules.train_autoencoder.output.model,
        target=f"{C}/target.pt",
        draft=f"{C}/draft.pt",
        judge=f"{R}/models/judge.pt",
        reference=f"{R}/eval/reference_features.npz",
    output:
        stats=expand(f"{C}/decode/{{cell}}/seed{{seed}}/stats.json", seed=config["continuous"]["decode"]["seeds"],
                     allow_missing=True),
        grids=expand(f"{C}/decode/{{cell}}/seed{{seed}}/grid.png", seed=config["continuous"]["decode"]["seeds"],
                     allow_missing=True),
        evaluation=f"{C}/decode/{{cell}}/eval.json",
    wildcard_constraints:
        cell="|".join(CSPD_CELLS).replace(".", r"\."),
    params:
        cfg=CFG,
        decode=config["continuous"]["decode"],
        bundle=lambda wc, input: Path(input.target).parent,
        out_dir=lambda wc, output: Path(output.evaluation).parent,
    threads: config["threads"]
    log:
        f"{R}/logs/cspd/{{cell}}.log",
    benchmark:
        f"{R}/benchmarks/cspd/{{cell}}.tsv"
    conda:
        "../../environment.yml"
    shell:
        "cascade-sd continuous cell -c {params.cfg} --bundle {params.bundle} --cell {wildcards.cell}"
        " --judge {input.judge} --reference {input.reference} --out-dir {params.out_dir} > {log} 2>&1"


rule cspd_figures:
    """CSpD results table and the speedup/FID vs γ figure."""
    input:
        expand(f"{C}/decode/{{cell}}/eval.json", cell=CSPD_CELLS),
    output:
        table=report(f"{R}/figures/cspd_table.md", caption="../report/cspd.rst", category="Results"),
        csv=f"{R}/figures/cspd_table.csv",
        figure=report(f"{R}/figures/cspd.png", caption="../report/cspd.rst", category="Figures"),
        data=f"{R}/figures/cspd.csv",
    params:
        cfg=CFG,
        out_dir=lambda wc, output: Path(output.table).parent,
    log:
        f"{R}/logs/cspd_figures.log",
    conda:
        "../../environment.yml"
    shell:
        "cascade-sd continuous figures {input} -c {params.cfg} --out-dir {params.out_dir} > {log} 2>&1"
