# The report: one self-contained HTML page of every case's metrics, images, overlays, rule
# timings (benchmarks/) and provenance. Its inputs are every result the config asks for.


rule report:
    input:
        all_results,
    output:
        "results/report.html",
    params:
        title=config["report"]["title"],
    conda:
        "../envs/kscan.yaml"
    log:
        "logs/report.log",
    benchmark:
        "benchmarks/report/all.tsv"
    threads: rule_resources("report")["threads"]
    resources:
        mem_mb=rule_resources("report")["mem_mb"],
        runtime=rule_resources("report")["runtime"],
        gpu=rule_resources("report")["gpu"],
    shell:
        "kscan report results --benchmarks benchmarks --output {output:q} --title {params.title:q}"
        " > {log:q} 2>&1"
