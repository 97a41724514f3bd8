rule mlflow_init:
    """Create the MLflow schema, experiment and parent run before parallel jobs log to it."""
    output:
        f"{R}/mlflow/parent.json",
    params:
        cfg=CFG,
        experiment=config["mlflow"]["experiment"],
    log:
        f"{R}/logs/mlflow_init.log",
    conda:
        "../../environment.yml"
    shell:
        "cascade-sd track init -c {params.cfg} > {log} 2>&1"
