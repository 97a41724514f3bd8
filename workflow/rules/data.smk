rule data:
    """Check the dataset is present (one-line error with install hints otherwise)."""
    input:
        rules.mlflow_init.output,
    output:
        f"{R}/data/dataset.json",
    params:
        data=config["data"],
    log:
        f"{R}/logs/data.log",
    shell:
        "cascade-sd data prepare -c {CFG} --out {output} > {log} 2>&1"
