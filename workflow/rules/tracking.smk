rule mlflow_init:
    """Create the MLflow schema, experiment and parent run before parallel jobs log to it."""
    output:
        f"{R}/mlflow/parent.json",
    params:
        experiment=config["mlflow"]["experiment"],
    log:
        f"{R}/logs/mlflow_init.log",
    shell:
        "cascade-sd track init -c {CFG} > {log} 2>&1"
