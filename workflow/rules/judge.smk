rule train_judge:
    """Train the in-domain judge (fidelity score; features for in-domain FID/KID)."""
    input:
        rules.data.output,
    output:
        model=f"{R}/models/judge.pt",
        metrics=f"{R}/metrics/judge.json",
    params:
        cfg=CFG,
        judge=config["judge"],
        seed=config["seed"],
    threads: config["threads"]
    log:
        f"{R}/logs/train_judge.log",
    benchmark:
        f"{R}/benchmarks/train_judge.tsv"
    conda:
        "../../environment.yml"
    shell:
        "cascade-sd train judge -c {params.cfg} --out {output.model} --metrics {output.metrics} > {log} 2>&1"
