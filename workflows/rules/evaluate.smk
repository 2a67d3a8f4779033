# Metrics: every reconstruction against its case's fully sampled target (SSIM, PSNR, NMSE) and,
# per segmentation model, its labels against the target's (Dice, IoU, HD95); image inputs with
# labels beside them (for DICOM series: a DICOM SEG of the series, converted by ingest_dicom) get
# the label scores of their segmentations. `kscan evaluate` finds the
# prediction's labels in <stem>_labels.nii.gz beside it, so each job links the reconstruction and
# its labels into a temporary folder under one stem. Segmentation model "none": no labels.


rule evaluate_recon:
    input:
        image="results/{case}/recon/{mask}_{acc}x/{method}.h5",
        labels=labels_input("results/{case}/segment/{mask}_{acc}x/{method}"),
        target=lambda wc: str(KSPACE[wc.case]),
    output:
        "results/{case}/metrics/{mask}_{acc}x/{method}/{model}.csv",
    params:
        suffix=".h5",
        link_labels=link_labels,
        options=evaluate_options,
    conda:
        "../envs/kscan.yaml"
    log:
        "logs/evaluate_recon/{case}/{mask}_{acc}x/{method}/{model}.log",
    benchmark:
        "benchmarks/evaluate_recon/{case}/{mask}_{acc}x/{method}/{model}.tsv"
    threads: rule_resources("evaluate")["threads"]
    resources:
        mem_mb=rule_resources("evaluate")["mem_mb"],
        runtime=rule_resources("evaluate")["runtime"],
        gpu=rule_resources("evaluate")["gpu"],
    shell:
        EVALUATE_SHELL


rule evaluate_image:
    input:
        image=lambda wc: image_path(wc.case),
        labels="results/{case}/segment/image/{model}.nii.gz",
        target=lambda wc: image_path(wc.case),
    output:
        "results/{case}/metrics/image/{model}.csv",
    params:
        suffix=".nii.gz",
        link_labels=link_labels,
        options=lambda wc: evaluate_options(wc, labels_only=True),
    conda:
        "../envs/kscan.yaml"
    log:
        "logs/evaluate_image/{case}/{model}.log",
    benchmark:
        "benchmarks/evaluate_image/{case}/{model}.tsv"
    threads: rule_resources("evaluate")["threads"]
    resources:
        mem_mb=rule_resources("evaluate")["mem_mb"],
        runtime=rule_resources("evaluate")["runtime"],
        gpu=rule_resources("evaluate")["gpu"],
    shell:
        EVALUATE_SHELL
