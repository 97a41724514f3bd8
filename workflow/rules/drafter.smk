rule distill:
    """Self-distilled drafter training data: target samples (CFG as configured) and features."""
    input:
        target=rules.train_target.output.model,
    output:
        f"{R}/data/distill.pt",
    params:
        cfg=CFG,
        drafter=config["drafter"],
        sample=config["sample"],
    threads: config["threads"]
    log:
        f"{R}/logs/distill.log",
    benchmark:
        f"{R}/benchmarks/distill.tsv"
    conda:
        "../../environment.yml"
    shell:
        "cascade-sd distill -c {params.cfg} --target {input.target} --out {output} > {log} 2>&1"


rule train_drafter:
    """Train an EAGLE (eagle) or EAGLE-3 (eagle3) drafter for the target."""
    input:
        target=rules.train_target.output.model,
        distill=rules.distill.output,
    output:
        model=f"{R}/models/drafter-{{arch}}.pt",
        metrics=f"{R}/metrics/drafter-{{arch}}.json",
    wildcard_constraints:
        arch="eagle|eagle3",
    params:
        cfg=CFG,
        drafter=config["drafter"],
    threads: config["threads"]
    log:
        f"{R}/logs/train_drafter_{{arch}}.log",
    benchmark:
        f"{R}/benchmarks/train_drafter_{{arch}}.tsv"
    conda:
        "../../environment.yml"
    shell:
        "cascade-sd train drafter -c {params.cfg} --arch {wildcards.arch} --target {input.target}"
        " --distill {input.distill} --out {output.model} --metrics {output.metrics} > {log} 2>&1"
