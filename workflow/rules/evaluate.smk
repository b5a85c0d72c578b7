# Stage 4: select masks, generate held-out outputs under each condition, judge, metrics and report.


rule select:
    input:
        f"{RUN}/{{task}}/aggregate/{{ident}}.zarr",
    output:
        mask=f"{RUN}/{{task}}/masks/{{ident}}/{{mask}}.safetensors",
        meta=f"{RUN}/{{task}}/masks/{{ident}}/{{mask}}.json",
        export=f"{RUN}/{{task}}/masks/{{ident}}/{{mask}}.neurons.json",
    log:
        f"{RUN}/{{task}}/logs/select-{{ident}}-{{mask}}.log",
    benchmark:
        f"{RUN}/{{task}}/benchmarks/select-{{ident}}-{{mask}}.tsv"
    conda:
        "../../envs/core.yaml"
    params:
        p=lambda wc: dumps({**select_params(wc.mask), "code": code_version("select")}),
    shell:
        "OMP_NUM_THREADS={threads} python -m emotion_neurons.stages.select --params {params.p:q} --aggregate {input} --out {output.mask} > {log} 2>&1"


# the random control of a selector's mask: same realised size per emotion (and per layer, by default)
rule random_control:
    input:
        f"{RUN}/{{task}}/masks/{{ident}}/{{source}}.safetensors",
    output:
        mask=f"{RUN}/{{task}}/masks/{{ident}}/random-{{source}}-s{{rseed}}.safetensors",
        meta=f"{RUN}/{{task}}/masks/{{ident}}/random-{{source}}-s{{rseed}}.json",
        export=f"{RUN}/{{task}}/masks/{{ident}}/random-{{source}}-s{{rseed}}.neurons.json",
    log:
        f"{RUN}/{{task}}/logs/select-{{ident}}-random-{{source}}-s{{rseed}}.log",
    benchmark:
        f"{RUN}/{{task}}/benchmarks/select-{{ident}}-random-{{source}}-s{{rseed}}.tsv"
    wildcard_constraints:
        source=SELECTOR_MASK,
        rseed=r"\d+",
    conda:
        "../../envs/core.yaml"
    params:
        p=lambda wc: dumps(
            {
                **mask_spec(f"random-{wc.source}-s{wc.rseed}"),
                "match": (config["select"].get("random") or {}).get("match", "layers"),
                "code": code_version("select"),
            }
        ),
    shell:
        "OMP_NUM_THREADS={threads} python -m emotion_neurons.stages.select --params {params.p:q} --control-of {input} --out {output.mask} > {log} 2>&1"


# one job per (task, evaluation group, shard): one model load for every condition of the group
rule evaluate:
    input:
        unpack(eval_inputs),
    output:
        directory(f"{RUN}/{{task}}/eval/group-{{group}}/shard-{{shard}}"),
    log:
        f"{RUN}/{{task}}/logs/evaluate-group{{group}}-{{shard}}.log",
    benchmark:
        f"{RUN}/{{task}}/benchmarks/evaluate-group{{group}}-{{shard}}.tsv"
    retries: 1
    conda:
        MODEL_ENV
    resources:
        mem_mb=mem_mb(32000),
        runtime=lambda wc: 240 * len(group_conditions(wc.task, wc.group)),
        gpu_job=1,
        attempt=attempt,
        batch_size=config["model"].get("batch_size", 1),
    params:
        p=eval_params,
        n=n_eval_shards(),
        # the run folder the conditions' mask and aggregate paths are relative to
        run=lambda wc: RUN,
        cache=EVAL_CACHE,
    shell:
        guarded(
            "OMP_NUM_THREADS={threads} python -m emotion_neurons.stages.evaluate group --params {params.p:q} --manifest {input.manifest} "
            "--run-dir {params.run} --shard {wildcards.shard} --n-shards {params.n} --batch-size {resources.batch_size} "
            "--cache {params.cache} --out {output} > {log} 2>&1"
        )


rule judge_eval:
    input:
        f"{RUN}/{{task}}/eval/group-{{group}}/shard-{{shard}}",
    output:
        directory(f"{RUN}/{{task}}/eval/group-{{group}}/judged-{{shard}}"),
    log:
        f"{RUN}/{{task}}/logs/judge_eval-group{{group}}-{{shard}}.log",
    benchmark:
        f"{RUN}/{{task}}/benchmarks/judge_eval-group{{group}}-{{shard}}.tsv"
    retries: 1
    conda:
        "../../envs/judges.yaml"
    resources:
        mem_mb=mem_mb(16000),
        runtime=lambda wc: 120 * len(group_conditions(wc.task, wc.group)),
        gpu_job=1,
        attempt=attempt,
    params:
        p=lambda wc: big_params(_judge_group_params(wc.task, int(wc.group))),
        cache=JUDGED_CACHE,
    shell:
        guarded(
            "OMP_NUM_THREADS={threads} python -m emotion_neurons.stages.judge group --params {params.p:q} --evaluated {input} "
            "--cache {params.cache} --out {output} > {log} 2>&1"
        )


# metrics of one identification setting (its conditions and the shared baseline)
rule metrics_ident:
    input:
        lambda wc: ident_judged_dirs(wc.task, wc.ident),
    output:
        directory(f"{RUN}/{{task}}/metrics-by-ident/{{ident}}"),
    log:
        f"{RUN}/{{task}}/logs/metrics-{{ident}}.log",
    benchmark:
        f"{RUN}/{{task}}/benchmarks/metrics-{{ident}}.tsv"
    wildcard_constraints:
        ident=r"(from-[a-z]+-|data-[A-Za-z0-9_]+-)?c\d+-(un)?filtered",
    conda:
        "../../envs/core.yaml"
    params:
        p=lambda wc: dumps(
            {
                "task": utask(wc.task),
                "wer_max": config["filter"].get("wer_max"),
                "bootstrap": config["evaluate"].get("bootstrap", 1000),
                "seed": config["evaluate"].get("seed", 0),
                "ci": config["evaluate"].get("ci", 0.95),
                "code": code_version("metrics"),
            }
        ),
        judged=lambda wc: " ".join(judged_files(wc.task, wc.ident)),
    shell:
        "OMP_NUM_THREADS={threads} python -m emotion_neurons.stages.metrics --params {params.p:q} --judged {params.judged} --outdir {output} > {log} 2>&1"


# every setting's tables side by side (columns ident, c, filtered) plus the c sweep, the filtering ablation and
# the transfer tables
rule sweep:
    input:
        unpack(sweep_inputs),
    output:
        directory(f"{RUN}/{{task}}/metrics"),
    log:
        f"{RUN}/{{task}}/logs/sweep.log",
    conda:
        "../../envs/core.yaml"
    params:
        p=sweep_params,
    shell:
        "OMP_NUM_THREADS={threads} python -m emotion_neurons.stages.sweep --params {params.p:q} --inputs {input.idents} --outdir {output} > {log} 2>&1"


rule report:
    input:
        metrics=expand(f"{RUN}/{{task}}/metrics", task=TASKS),
        filters=[f"{RUN}/{t}/filter/{i}/summary.tsv" for t in TASKS for i in IDENTS],
        masks=[
            f"{RUN}/{t}/masks/{i}/{m['mask']}.safetensors"
            for t in TASKS
            for i in IDENTS
            for m in _cond.masks(config["select"])
        ],
        data=[f for u in UNITS for f in prepared_tables(u)],
        # per-utterance rows (baseline intervals, the EVC audio) and the stage-1 list of skipped audio
        judged=[d for t in TASKS for d in judged_dirs(t)],
        bad=[f"{stage1_dir(u)}/bad_audio.tsv" for u in UNITS],
    output:
        f"{RUN}/report.html",
    log:
        f"{RUN}/logs/report.log",
    benchmark:
        f"{RUN}/benchmarks/report.tsv"
    conda:
        "../../envs/core.yaml"
    params:
        p=lambda wc: dumps(
            {
                "tasks": TASKS,
                "run": RUN,
                "report": config.get("report", {}),
                "evaluate": {
                    k: config["evaluate"].get(k) for k in ("bootstrap", "seed", "ci")
                },
                "stage1": {u: stage1_dir(u) for u in UNITS},
                "filter": {"wer_max": config["filter"].get("wer_max")},
                "masks": [
                    f"{PRIMARY}/{m['mask']}" for m in _cond.masks(config["select"])
                ],
                "ident": PRIMARY,
                "model": config["model"]["id"],
                "data_tables": {u: prepared_tables(u) for u in UNITS},
                "config": config,
                "code": code_version("report"),
                # the code behind every number on the page (its provenance section)
                "codes": stage_codes(),
            }
        ),
    shell:
        "OMP_NUM_THREADS={threads} python -m emotion_neurons.stages.report --params {params.p:q} --out {output} > {log} 2>&1"
