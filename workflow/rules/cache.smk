# Cache hygiene (emotion_neurons.cache): `snakemake cache_gc --cores 1 --configfile ...` removes the per-condition
# results (results/cache/eval, results/cache/judged) that no output folder of this config links, and the params
# files this config's jobs do not use; stage-1 stores this config does not use are listed in the log, not removed.
# A local rule: it runs on the machine that runs Snakemake (which holds the working-directory lock), never as a
# cluster job; its log says what it removed.


rule cache_gc:
    log:
        f"{RUN}/logs/cache_gc.log",
    localrule: True
    conda:
        "../../envs/core.yaml"
    params:
        spec=lambda wc: big_params(dumps(_gc_spec())),
    shell:
        "python -m emotion_neurons.stages.cache_gc --spec {params.spec:q} 2>&1 | tee {log}"
