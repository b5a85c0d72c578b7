# emotion-neurons: find and steer emotion-sensitive neurons in audio-language models.
# Thin entry point: configuration and helpers live in workflow/rules/common.smk, one rule file per stage.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/filter.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/cache.smk"


rule all:
    default_target: True
    input:
        f"{RUN}/report.html",


onsuccess:
    # skipped audio and data warnings, said once at the end instead of only in bad_audio.tsv and the logs
    from emotion_neurons.stages.prepare import issue_message as _issue_message

    _msg = _issue_message({t: prepared_tables(t) for t in TASKS})
    if _msg:
        print(_msg, file=sys.stderr)
