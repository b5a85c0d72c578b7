# Cache hygiene (emotion_neurons.cache): `snakemake cache_gc --cores 1 --configfile ...` removes the per-condition
# results (results/cache/eval, results/cache/judged) that no output folder of this config links, and the params
# files this config's jobs do not use; stage-1 stores this config does not use are listed in the log, not removed.
# A local `run:` rule: it runs inside Snakemake (which holds the working-directory lock), never as a cluster job.


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
    run:
        import logging as _logging

        from emotion_neurons.cache import gc as _gc

        _h = _logging.FileHandler(log[0])
        _logging.getLogger("emotion_neurons.cache").addHandler(_h)
        _logging.getLogger("emotion_neurons.cache").setLevel(_logging.INFO)
        try:
            _summary = _gc(**_gc_spec())
        finally:
            _logging.getLogger("emotion_neurons.cache").removeHandler(_h)
        print(
            f"cache_gc: removed {_summary['removed']} entries ({_summary['bytes'] / 1e6:.1f} MB); "
            f"{len(_summary.get('stage1_unused', []))} stage-1 store(s) not used by this config "
            f"({_summary.get('stage1_unused_bytes', 0) / 1e9:.2f} GB, kept; see {log[0]})",
            file=sys.stderr,
        )
