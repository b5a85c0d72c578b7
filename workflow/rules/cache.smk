# Cache hygiene (emotion_neurons.cache): `snakemake cache_gc --cores 1 --configfile ...` removes the per-condition
# results (results/cache/eval, results/cache/judged) that no output folder of this config links, and the params
# files this config's jobs do not use; stage-1 stores this config does not use are listed in the log, not removed.
# A local rule: it runs on the machine that runs Snakemake (which holds the working-directory lock), never as a
# cluster job; its log says what it removed.


def _gc_spec():
    live = [
        f"{RUN}/{t}/eval/group-{g}/{kind}-{i}"
        for t in TASKS
        for g in eval_groups(t)
        for i in range(n_eval_shards())
        for kind in ("shard", "judged")
    ]
    used = [
        big_params(text)
        for t in TASKS
        for g in eval_groups(t)
        for text in (_eval_params(t, g), _judge_group_params(t, g))
    ]
    return {
        "caches": [EVAL_CACHE, JUDGED_CACHE],
        "live": live,
        "params_dir": PARAMS_CACHE,
        "keep_params": [p[1:] for p in used if p.startswith("@")],
        "stage1_dir": CACHE,
        "keep_stage1": [stage1_dir(t) for t in TASKS],
    }


rule cache_gc:
    localrule: True
    log:
        f"{RUN}/logs/cache_gc.log",
    conda:
        "../../envs/core.yaml"
    params:
        spec=lambda wc: big_params(dumps(_gc_spec())),
    shell:
        "python -m emotion_neurons.stages.cache_gc --spec {params.spec:q} 2>&1 | tee {log}"
