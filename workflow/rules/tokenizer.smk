rule train_tokenizer:
    """Train the VQ tokenizer (LlamaGen VQModel maths, tiny config)."""
    input:
        rules.data.output,
    output:
        model=f"{R}/models/tokenizer.pt",
        metrics=f"{R}/metrics/tokenizer.json",
    params:
        cfg=CFG,
        tokenizer=config["tokenizer"],
        seed=config["seed"],
    threads: config["threads"]
    log:
        f"{R}/logs/train_tokenizer.log",
    benchmark:
        f"{R}/benchmarks/train_tokenizer.tsv"
    conda:
        "../../environment.yml"
    shell:
        "cascade-sd train tokenizer -c {params.cfg} --out {output.model} --metrics {output.metrics} > {log} 2>&1"


rule tokenize:
    """Tokenise the whole dataset once; later jobs read the cached codes."""
    input:
        tokenizer=rules.train_tokenizer.output.model,
    output:
        f"{R}/data/tokens.npz",
    params:
        cfg=CFG,
    threads: config["threads"]
    log:
        f"{R}/logs/tokenize.log",
    benchmark:
        f"{R}/benchmarks/tokenize.tsv"
    conda:
        "../../environment.yml"
    shell:
        "cascade-sd tokenize -c {params.cfg} --tokenizer {input.tokenizer} --out {output} > {log} 2>&1"
