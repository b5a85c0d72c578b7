# Stage 0 (prepare instances) and stage 1 (generate with activation capture), cached by stage-1 identity.


rule prepare:
    output:
        manifest=f"{CACHE}/{{key}}/instances.jsonl",
        bad=f"{CACHE}/{{key}}/bad_audio.tsv",
        warnings=f"{CACHE}/{{key}}/warnings.tsv",
    log:
        f"{CACHE}/{{key}}/logs/prepare.log",
    benchmark:
        f"{CACHE}/{{key}}/benchmarks/prepare.tsv"
    conda:
        "../../envs/core.yaml"
    params:
        p=lambda wc: dumps(
            {
                "task": utask(KEY2TASK[wc.key]),
                "task_cfg": stage1_task_cfg(ucfg(KEY2TASK[wc.key]), utask(KEY2TASK[wc.key])),
                "dataset": task_dataset(ucfg(KEY2TASK[wc.key]), utask(KEY2TASK[wc.key])),
                "data": config["data"],
                "max_audio_seconds": adapter_input_window(config["model"]["adapter"]),
                "code": code_version("prepare"),
            }
        ),
    shell:
        "OMP_NUM_THREADS={threads} python -m emotion_neurons.stages.prepare --params {params.p:q} --out {output.manifest} --bad {output.bad} "
        "--warnings {output.warnings} > {log} 2>&1"


rule generate:
    input:
        manifest=f"{CACHE}/{{key}}/instances.jsonl",
    output:
        directory(f"{CACHE}/{{key}}/shard-{{shard}}-of-{{n}}"),
    log:
        f"{CACHE}/{{key}}/logs/generate-{{shard}}-of-{{n}}.log",
    benchmark:
        f"{CACHE}/{{key}}/benchmarks/generate-{{shard}}-of-{{n}}.tsv"
    retries: 1
    conda:
        MODEL_ENV
    resources:
        mem_mb=mem_mb(32000),
        runtime=240,
        gpu_job=1,
        attempt=attempt,
        batch_size=config["model"].get("batch_size", 1),
    params:
        p=lambda wc: stage1_params(KEY2TASK[wc.key]),
    shell:
        guarded(
            "OMP_NUM_THREADS={threads} python -m emotion_neurons.stages.generate --params {params.p:q} --manifest {input.manifest} --shard {wildcards.shard} "
            "--n-shards {wildcards.n} --batch-size {resources.batch_size} --out {output} > {log} 2>&1"
        )
