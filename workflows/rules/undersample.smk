# Retrospective undersampling of every k-space case with each configured mask and acceleration.


rule undersample:
    input:
        lambda wc: str(KSPACE[wc.case]),
    output:
        undersampled("results/{case}/undersampled/{mask}_{acc}x.h5"),
    params:
        center_fraction=config["undersample"]["center_fraction"],
        seed=seed_option(),
    conda:
        "../envs/kscan.yaml"
    log:
        "logs/undersample/{case}/{mask}_{acc}x.log",
    benchmark:
        "benchmarks/undersample/{case}/{mask}_{acc}x.tsv"
    threads: rule_resources("undersample")["threads"]
    resources:
        mem_mb=rule_resources("undersample")["mem_mb"],
        runtime=rule_resources("undersample")["runtime"],
        gpu=rule_resources("undersample")["gpu"],
    shell:
        "kscan undersample {input:q} {output:q} --mask {wildcards.mask} --acceleration {wildcards.acc}"
        " --center-fraction {params.center_fraction} {params.seed} --quiet > {log:q} 2>&1"
