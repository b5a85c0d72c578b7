# Stage 2: judge identification outputs, then keep c successes per emotion.


rule judge_ident:
    input:
        lambda wc: f"{stage1_dir(wc.task)}/shard-{wc.shard}-of-{n_shards(wc.task)}",
    output:
        f"{RUN}/{{task}}/ident_judged/shard-{{shard}}.tsv",
    log:
        f"{RUN}/{{task}}/logs/judge_ident-{{shard}}.log",
    benchmark:
        f"{RUN}/{{task}}/benchmarks/judge_ident-{{shard}}.tsv"
    retries: 1
    conda:
        "../../envs/judges.yaml"
    resources:
        mem_mb=mem_mb(16000),
        runtime=120,
        gpu_job=1,
        attempt=attempt,
    params:
        p=lambda wc: judge_params(wc.task),
    shell:
        guarded(
            "OMP_NUM_THREADS={threads} python -m emotion_neurons.stages.judge --params {params.p:q} --outputs {input}/outputs.tsv --out {output} > {log} 2>&1"
        )


rule filter:
    input:
        lambda wc: expand(
            f"{RUN}/{wc.task}/ident_judged/shard-{{i}}.tsv", i=range(n_shards(wc.task))
        ),
    output:
        kept=f"{RUN}/{{task}}/filter/{{ident}}/kept.tsv",
        summary=f"{RUN}/{{task}}/filter/{{ident}}/summary.tsv",
    log:
        f"{RUN}/{{task}}/logs/filter-{{ident}}.log",
    benchmark:
        f"{RUN}/{{task}}/benchmarks/filter-{{ident}}.tsv"
    conda:
        "../../envs/core.yaml"
    params:
        p=lambda wc: dumps(
            {
                "task": utask(wc.task),
                "filter": ident_filter(wc.ident),
                "emotions": emotions(wc.task),
                "code": code_version("filter"),
            }
        ),
    shell:
        "OMP_NUM_THREADS={threads} python -m emotion_neurons.stages.filter --params {params.p:q} --judged {input} --kept {output.kept} "
        "--summary {output.summary} > {log} 2>&1"
