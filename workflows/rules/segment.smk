# Segmentation with each configured model: of every reconstruction and of every image input
# (NIfTI volumes and converted DICOM series). Runs on a GPU when the job is given one.


rule segment_recon:
    input:
        image="results/{case}/recon/{mask}_{acc}x/{method}.h5",
        checkpoint=lambda wc: checkpoint_inputs("segment", wc.model),
    output:
        **segment_outputs("results/{case}/segment/{mask}_{acc}x/{method}/{model}"),
    params:
        checkpoint=lambda wc: checkpoint_option("segment", wc.model),
        batch_size=config["segment"]["batch_size"],
        overlay=overlay_option(),
        device=device,
    conda:
        "../envs/kscan.yaml"
    log:
        "logs/segment_recon/{case}/{mask}_{acc}x/{method}/{model}.log",
    benchmark:
        "benchmarks/segment_recon/{case}/{mask}_{acc}x/{method}/{model}.tsv"
    threads: rule_resources("segment")["threads"]
    resources:
        mem_mb=rule_resources("segment")["mem_mb"],
        runtime=rule_resources("segment")["runtime"],
        gpu=rule_resources("segment")["gpu"],
    shell:
        SEGMENT_SHELL


rule segment_image:
    input:
        image=lambda wc: image_path(wc.case),
        checkpoint=lambda wc: checkpoint_inputs("segment", wc.model),
    output:
        **segment_outputs("results/{case}/segment/image/{model}"),
    params:
        checkpoint=lambda wc: checkpoint_option("segment", wc.model),
        batch_size=config["segment"]["batch_size"],
        overlay=overlay_option(),
        device=device,
    conda:
        "../envs/kscan.yaml"
    log:
        "logs/segment_image/{case}/{model}.log",
    benchmark:
        "benchmarks/segment_image/{case}/{model}.tsv"
    threads: rule_resources("segment")["threads"]
    resources:
        mem_mb=rule_resources("segment")["mem_mb"],
        runtime=rule_resources("segment")["runtime"],
        gpu=rule_resources("segment")["gpu"],
    shell:
        SEGMENT_SHELL
