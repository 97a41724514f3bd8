rule generate_vanilla:
    """Vanilla AR samples of every class (the baseline of every later speedup)."""
    input:
        tokenizer=rules.train_tokenizer.output.model,
        target=rules.train_target.output.model,
    output:
        grid=report(
            f"{R}/samples/vanilla/seed{{seed}}/grid.png",
            caption="../report/vanilla_grid.rst",
            category="Samples",
        ),
        tokens=f"{R}/samples/vanilla/seed{{seed}}/tokens.npz",
        images=f"{R}/samples/vanilla/seed{{seed}}/images.npz",
        stats=f"{R}/samples/vanilla/seed{{seed}}/stats.json",
    params:
        cfg=CFG,
        sample=config["sample"],
        out_dir=lambda wc: f"{R}/samples/vanilla/seed{wc.seed}",
    threads: config["threads"]
    log:
        f"{R}/logs/generate_vanilla_seed{{seed}}.log",
    benchmark:
        f"{R}/benchmarks/generate_vanilla_seed{{seed}}.tsv"
    conda:
        "../../environment.yml"
    shell:
        "cascade-sd generate -c {params.cfg} --tokenizer {input.tokenizer} --target {input.target}"
        " --out-dir {params.out_dir} --seed {wildcards.seed} > {log} 2>&1"


rule evaluate_vanilla:
    """In-domain quality of the vanilla samples: judge accuracy, FID, KID."""
    input:
        images=rules.generate_vanilla.output.images,
        stats=rules.generate_vanilla.output.stats,
        judge=rules.train_judge.output.model,
    output:
        f"{R}/eval/vanilla_seed{{seed}}.json",
    params:
        cfg=CFG,
        samples=lambda wc: f"{R}/samples/vanilla/seed{wc.seed}",
    threads: config["threads"]
    log:
        f"{R}/logs/evaluate_vanilla_seed{{seed}}.log",
    conda:
        "../../environment.yml"
    shell:
        "cascade-sd evaluate -c {params.cfg} --samples {params.samples} --judge {input.judge} --out {output} > {log} 2>&1"


rule summary:
    """One Markdown table of the built-in models' metrics and the vanilla samples' quality."""
    input:
        tokenizer=rules.train_tokenizer.output.metrics,
        target=rules.train_target.output.metrics,
        judge=rules.train_judge.output.metrics,
        evals=expand(f"{R}/eval/vanilla_seed{{seed}}.json", seed=config["sample"]["seeds"]),
    output:
        report(f"{R}/summary.md", caption="../report/summary.rst", category="Summary"),
    log:
        f"{R}/logs/summary.log",
    conda:
        "../../environment.yml"
    shell:
        "cascade-sd summarize --tokenizer {input.tokenizer} --target {input.target} --judge {input.judge}"
        " --out {output} {input.evals} > {log} 2>&1"
