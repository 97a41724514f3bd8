rule train_tokenizer:
    """Train the VQ tokenizer (LlamaGen VQModel maths, tiny config)."""
    input:
        rules.data.output,
    output:
        model=f"{R}/models/tokenizer.pt",
        metrics=f"{R}/metrics/tokenizer.json",
    params:
        tokenizer=config["tokenizer"],
        seed=config["seed"],
    threads: config["threads"]
    log:
        f"{R}/logs/train_tokenizer.log",
    benchmark:
        f"{R}/benchmarks/train_tokenizer.tsv"
    shell:
        "cascade-sd train tokenizer -c {CFG} --out {output.model} --metrics {output.metrics} > {log} 2>&1"


rule tokenize:
    """Tokenise the whole dataset once; later jobs read the cached codes."""
    input:
        tokenizer=rules.train_tokenizer.output.model,
    output:
        f"{R}/data/tokens.npz",
    threads: config["threads"]
    log:
        f"{R}/logs/tokenize.log",
    benchmark:
        f"{R}/benchmarks/tokenize.tsv"
    shell:
        "cascade-sd tokenize -c {CFG} --tokenizer {input.tokenizer} --out {output} > {log} 2>&1"
