# Reconstruction of every undersampled file with each configured method: classical methods on
# the CPU, learned ones (rvn, varnet) on a GPU when the job is given one (resources gpu >= 1).


rule reconstruct:
    input:
        "results/{case}/undersampled/{mask}_{acc}x.h5",
    output:
        "results/{case}/recon/{mask}_{acc}x/{method}.h5",
    wildcard_constraints:
        method="zf|sense|cs",
    params:
        maps=config["reconstruct"]["maps"],
        batch_size=config["reconstruct"]["batch_size"],
        options=solver_options,
    conda:
        "../envs/kscan.yaml"
    log:
        "logs/reconstruct/{case}/{mask}_{acc}x/{method}.log",
    benchmark:
        "benchmarks/reconstruct/{case}/{mask}_{acc}x/{method}.tsv"
    threads: rule_resources("reconstruct")["threads"]
    resources:
        mem_mb=rule_resources("reconstruct")["mem_mb"],
        runtime=rule_resources("reconstruct")["runtime"],
        gpu=rule_resources("reconstruct")["gpu"],
    shell:
        "OMP_NUM_THREADS={threads} kscan reconstruct {input:q} {output:q} --method {wildcards.method}"
        " --maps {params.maps} --batch-size {params.batch_size} {params.options} --quiet > {log:q} 2>&1"


rule reconstruct_learned:
    input:
        kspace="results/{case}/undersampled/{mask}_{acc}x.h5",
        checkpoint=lambda wc: checkpoint_inputs("reconstruct", wc.method),
    output:
        "results/{case}/recon/{mask}_{acc}x/{method}.h5",
    wildcard_constraints:
        method="rvn|varnet",
    params:
        checkpoint=lambda wc: checkpoint_option("reconstruct", wc.method),
        device=device,
    conda:
        "../envs/kscan.yaml"
    log:
        "logs/reconstruct_learned/{case}/{mask}_{acc}x/{method}.log",
    benchmark:
        "benchmarks/reconstruct_learned/{case}/{mask}_{acc}x/{method}.tsv"
    threads: rule_resources("reconstruct_learned")["threads"]
    resources:
        mem_mb=rule_resources("reconstruct_learned")["mem_mb"],
        runtime=rule_resources("reconstruct_learned")["runtime"],
        gpu=rule_resources("reconstruct_learned")["gpu"],
    shell:
        "OMP_NUM_THREADS={threads} kscan reconstruct {input.kspace:q} {output:q} --method {wildcards.method}"
        " {params.checkpoint} --device {params.device} --quiet > {log:q} 2>&1"
