# Stage 3: per-emotion activation statistics of the kept instances (CPU).


rule aggregate:
    input:
        kept=f"{RUN}/{{task}}/filter/{{ident}}/kept.tsv",
        shards=lambda wc: shard_dirs(wc.task),
    output:
        directory(f"{RUN}/{{task}}/aggregate/{{ident}}.zarr"),
    log:
        f"{RUN}/{{task}}/logs/aggregate-{{ident}}.log",
    benchmark:
        f"{RUN}/{{task}}/benchmarks/aggregate-{{ident}}.tsv"
    conda:
        "../../envs/core.yaml"
    resources:
        mem_mb=mem_mb(8000),
    params:
        p=lambda wc: dumps(
            {
                "task": utask(wc.task),
                "emotions": emotions(wc.task),
                "spans": task_spans(wc.task),
                "filter": ident_filter(wc.ident),
                "code": code_version("aggregate"),
            }
        ),
        stores=lambda wc, input: " ".join(f"{d}/stats.zarr" for d in input.shards),
    shell:
        "OMP_NUM_THREADS={threads} python -m emotion_neurons.stages.aggregate --params {params.p:q} --kept {input.kept} --stores {params.stores} "
        "--out {output} > {log} 2>&1"
