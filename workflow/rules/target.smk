rule train_target:
    """Train the target GPT on the token cache (class dropout 0.1 so CFG works)."""
    input:
        tokens=rules.tokenize.output,
        tokenizer=rules.train_tokenizer.output.model,
    output:
        model=f"{R}/models/target.pt",
        metrics=f"{R}/metrics/target.json",
    params:
        cfg=CFG,
        target=config["target"],
        seed=config["seed"],
    threads: config["threads"]
    log:
        f"{R}/logs/train_target.log",
    benchmark:
        f"{R}/benchmarks/train_target.tsv"
    conda:
        "../../environment.yml"
    shell:
        "cascade-sd train target -c {params.cfg} --tokens {input.tokens} --tokenizer {input.tokenizer}"
        " --out {output.model} --metrics {output.metrics} > {log} 2>&1"
