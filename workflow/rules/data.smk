rule data:
    """Check the dataset is present (one-line error with install hints otherwise)."""
    input:
        rules.mlflow_init.output,
    output:
        f"{R}/data/dataset.json",
    params:
        cfg=CFG,
        data=config["data"],
    log:
        f"{R}/logs/data.log",
    conda:
        "../../environment.yml"
    shell:
        "cascade-sd data prepare -c {params.cfg} --out {output} > {log} 2>&1"
