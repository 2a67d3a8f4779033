# Ingest: DICOM series -> NIfTI (a checkpoint: the series are found at run time) and a
# description of every input (`kscan info`), which the report shows as the input's provenance.


checkpoint ingest_dicom:
    output:
        directory("ingest/dicom"),
    params:
        sources={c: str(p) for c, p in DICOM_SOURCES.items()} if config["sample_sheet"] else None,
        known=sorted(KSPACE.keys() | NIFTI.keys()),
        root=str(INPUT_DIR),
        case_pattern=CASE_PATTERN,
    conda:
        "../envs/kscan.yaml"
    log:
        "logs/ingest_dicom.log",
    benchmark:
        "benchmarks/ingest_dicom/all.tsv"
    threads: rule_resources("ingest")["threads"]
    resources:
        mem_mb=rule_resources("ingest")["mem_mb"],
        runtime=rule_resources("ingest")["runtime"],
        gpu=rule_resources("ingest")["gpu"],
    script:
        "../scripts/ingest_dicom.py"


rule describe_input:
    input:
        input_file,
    output:
        "results/{case}/input.json",
    conda:
        "../envs/kscan.yaml"
    log:
        "logs/describe_input/{case}.log",
    benchmark:
        "benchmarks/describe_input/{case}.tsv"
    threads: rule_resources("ingest")["threads"]
    resources:
        mem_mb=rule_resources("ingest")["mem_mb"],
        runtime=rule_resources("ingest")["runtime"],
        gpu=rule_resources("ingest")["gpu"],
    shell:
        "kscan info $(realpath {input:q}) --json > {output:q}.tmp 2> {log:q} && mv {output:q}.tmp {output:q}"
