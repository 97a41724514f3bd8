# cascade-sd: the only workflow entry. `snakemake` (profiles/default) reproduces every default
# figure on 2 CPU cores; `snakemake --configfile .test/config.yaml` is the CI-sized run.
from pathlib import Path

import yaml

from cascade_sd.config import validate_config


configfile: "config/config.yaml"


# Validate before any job starts (one-line errors naming the field); fills defaults.
config.update(validate_config(config))


include: "workflow/rules/common.smk"
include: "workflow/rules/tracking.smk"


# The MLflow parent and stage runs (created by `mlflow_init`) follow the workflow: reopened when a
# later call resumes it, FINISHED or FAILED when it ends (a SIGKILL alone leaves them RUNNING).
# An unreachable tracking server warns here instead of failing a workflow whose files are complete.
TRACK_WARNING = "echo 'warning: the MLflow workflow run could not be updated (see above)' >&2"


onstart:
    shell(f"cascade-sd track reopen -c {CFG} || {TRACK_WARNING}")


onsuccess:
    shell(f"cascade-sd track finish -c {CFG} --status FINISHED || {TRACK_WARNING}")


onerror:
    shell(f"cascade-sd track finish -c {CFG} --status FAILED || {TRACK_WARNING}")


# Built-in models are trained here from the built-in data; real checkpoints are imported instead
# (config/gpu.yaml), and then there is no in-domain judge: the grid reports speed and drift.
if BUILTIN:

    include: "workflow/rules/data.smk"
    include: "workflow/rules/tokenizer.smk"
    include: "workflow/rules/target.smk"
    include: "workflow/rules/judge.smk"
    include: "workflow/rules/sample.smk"

else:

    include: "workflow/rules/import.smk"


include: "workflow/rules/drafter.smk"
include: "workflow/rules/grid.smk"


# Continuous-token models and CSpD (DESIGN 5) are built-in only: they need the built-in data and judge.
CONTINUOUS = BUILTIN and config["continuous"]["enabled"]
if CONTINUOUS:

    include: "workflow/rules/continuous.smk"


rule all:
    input:
        (
            expand(f"{R}/samples/vanilla/seed{{seed}}/grid.png", seed=config["sample"]["seeds"])
            + expand(f"{R}/eval/vanilla_seed{{seed}}.json", seed=config["sample"]["seeds"])
            + [f"{R}/summary.md"]
            if BUILTIN
            else []
        ),
        BUNDLE["drafters"],
        rules.grid_figures.output,
        rules.grid_audit.output,
        rules.redundancy_heatmaps.output,
        rules.cspd_figures.output if CONTINUOUS else [],
    default_target: True
