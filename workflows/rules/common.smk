# Inputs, cases, settings and helpers of the rules (the rules themselves only call `kscan`).

import csv
import re

import h5py
from snakemake.exceptions import WorkflowError

INPUT_DIR = Path(config["input_dir"])
if not INPUT_DIR.is_dir():
    raise WorkflowError(f"config input_dir: {INPUT_DIR} is not a folder (working directory {Path.cwd()})")

KSPACE_SUFFIXES = (".h5", ".hdf5")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
LABELS = "_labels"
LEARNED_METHODS = ("rvn", "varnet")
TARGET_KEYS = ("reconstruction_rss", "reconstruction_esc")
CASE_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]*"


wildcard_constraints:
    case=CASE_PATTERN,
    mask=r"[a-z0-9_]+",
    acc=r"[0-9]+",
    method=r"[a-z0-9-]+",
    model=r"[a-z0-9-]+",


def file_stem(path):
    """`vol.nii.gz` -> `vol`, `file1.h5` -> `file1`."""
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem


def input_kind(path):
    """'kspace', 'nifti', 'dicom' (a folder) or None."""
    if path.is_dir():
        return "dicom"
    if path.name.endswith(KSPACE_SUFFIXES):
        return "kspace"
    if path.name.endswith(NIFTI_SUFFIXES) and not file_stem(path).endswith(LABELS):
        return "nifti"
    return None


def read_sample_sheet(sheet):
    """{case: path} from the TSV (columns case, path; path relative to input_dir)."""
    if not Path(sheet).is_file():
        raise WorkflowError(f"config sample_sheet: {sheet} is not a file")
    with open(sheet, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or not {"case", "path"} <= set(rows[0]):
        raise WorkflowError(f"config sample_sheet: {sheet} needs a header with columns case and path")
    cases = {}
    for n, row in enumerate(rows, start=2):
        case, path = row["case"].strip(), INPUT_DIR / row["path"].strip()
        if not re.fullmatch(CASE_PATTERN, case):
            raise WorkflowError(f"config sample_sheet: {sheet} line {n}: case {case!r} must match {CASE_PATTERN}")
        if case in cases:
            raise WorkflowError(f"config sample_sheet: {sheet} line {n}: case {case!r} appears twice")
        if not path.exists() or input_kind(path) is None:
            raise WorkflowError(
                f"config sample_sheet: {sheet} line {n}: {path} is not an .h5, NIfTI file or DICOM folder"
            )
        cases[case] = path
    return cases


def discover_inputs(root):
    """{case: path} of every k-space and NIfTI file under root, named by file stem."""
    cases = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.startswith(".") and input_kind(path) is not None:
            case = file_stem(path)
            if case in cases:
                raise WorkflowError(
                    f"config input_dir: {cases[case]} and {path} are both case {case!r}; "
                    "name the cases with a sample_sheet"
                )
            cases[case] = path
    return cases


if config["sample_sheet"]:
    _SELECTED = read_sample_sheet(config["sample_sheet"])
else:
    _SELECTED = discover_inputs(INPUT_DIR)
KSPACE = {c: p for c, p in _SELECTED.items() if input_kind(p) == "kspace"}
NIFTI = {c: p for c, p in _SELECTED.items() if input_kind(p) == "nifti"}
# DICOM series: from the sample sheet, or found under input_dir by the ingest_dicom checkpoint.
DICOM_SOURCES = {c: p for c, p in _SELECTED.items() if input_kind(p) == "dicom"}


def has_target(path):
    """Whether a k-space file holds a fully sampled target to score reconstructions against."""
    with h5py.File(path, "r") as f:
        return any(key in f for key in TARGET_KEYS)


KSPACE_WITH_TARGET = {c for c, p in KSPACE.items() if has_target(p)}
NIFTI_WITH_LABELS = {
    c for c, p in NIFTI.items() if any(p.with_name(file_stem(p) + LABELS + s).is_file() for s in NIFTI_SUFFIXES)
}

MASKS = config["undersample"]["masks"]
ACCELERATIONS = config["undersample"]["accelerations"]
METHODS = config["reconstruct"]["methods"]
SEG_MODELS = config["segment"]["models"]
SETTINGS = [f"{m}_{a}x" for m in MASKS for a in ACCELERATIONS]


def rule_resources(name):
    """The config's resources of a rule group (threads, mem_mb, runtime, gpu)."""
    return config["resources"][name]


def device(wildcards, resources):
    """cuda for a job given a GPU, cpu otherwise."""
    return "cuda" if resources.gpu > 0 else "cpu"


def checkpoint_option(kind, name):
    """`--checkpoint PATH` for a configured checkpoint, '' for the shipped weights."""
    path = config[kind]["checkpoints"].get(name)
    return f"--checkpoint {path}" if path else ""


def checkpoint_inputs(kind, name):
    """The configured checkpoint file as a job input (so a new checkpoint reruns the job)."""
    path = config[kind]["checkpoints"].get(name)
    return [path] if path else []


def dicom_cases():
    """Cases converted from DICOM (known once the ingest_dicom checkpoint has run)."""
    folder = Path(checkpoints.ingest_dicom.get().output[0])
    return sorted(s for s in map(file_stem, folder.glob("*.nii.gz")) if not s.endswith(LABELS))


def has_labels(case):
    """Whether an image case has reference labels: <stem>_labels.nii(.gz) beside a NIfTI input,
    or, for a DICOM case, its DICOM SEG converted beside its volume by ingest_dicom."""
    if case in NIFTI:
        return case in NIFTI_WITH_LABELS
    return Path(image_path(case)).with_name(f"{case}{LABELS}.nii.gz").is_file()


def image_path(case):
    """The image volume of an image case: the NIfTI input or the converted DICOM series."""
    if case in NIFTI:
        return str(NIFTI[case])
    checkpoints.ingest_dicom.get()
    return f"ingest/dicom/{case}.nii.gz"


# --- ingest ------------------------------------------------------------------------------------


def input_file(wildcards):
    """The file a case starts from: its k-space, NIfTI or converted DICOM volume."""
    if wildcards.case in KSPACE:
        return str(KSPACE[wildcards.case])
    if wildcards.case in NIFTI:
        return str(NIFTI[wildcards.case])
    if wildcards.case in dicom_cases():
        return image_path(wildcards.case)
    raise WorkflowError(f"unknown case {wildcards.case!r}")


# --- undersample -------------------------------------------------------------------------------


def undersampled(path):
    """Temporary unless undersample.keep is set."""
    return path if config["undersample"]["keep"] else temp(path)


def seed_option():
    seed = config["undersample"]["seed"]
    return "" if seed is None else f"--seed {seed}"


def solver_options(wildcards):
    """``--lam``, ``--max-iter`` (and ``--regularizer`` for cs) of a classical method, from
    ``reconstruct.options.<method>``; unset values keep the solver's defaults."""
    options = config["reconstruct"]["options"].get(wildcards.method, {})
    flags = [
        f"--{key.replace('_', '-')} {value}" for key, value in options.items() if value is not None
    ]
    return " ".join(flags)


# --- segment -----------------------------------------------------------------------------------


def overlay_option():
    return "--overlay" if config["segment"]["overlay"] else ""


def segment_outputs(stem):
    """The label NIfTI, its provenance sidecar and (when configured) the overlay PNG."""
    outputs = {"labels": f"{stem}.nii.gz", "sidecar": f"{stem}.json"}
    if config["segment"]["overlay"]:
        outputs["overlay"] = f"{stem}_overlay.png"
    return outputs


SEGMENT_SHELL = (
    "OMP_NUM_THREADS={threads} kscan segment {input.image:q} {output.labels:q} --model {wildcards.model}"
    " {params.checkpoint} --batch-size {params.batch_size} {params.overlay} --device {params.device}"
    " --quiet > {log:q} 2>&1"
)


# --- evaluate ----------------------------------------------------------------------------------


NO_MODEL = "none"


def metric_models():
    return SEG_MODELS or [NO_MODEL]


def labels_input(stem):
    """The labels of one segmentation model (none for "none")."""
    return lambda wc: [] if wc.model == NO_MODEL else [str(Path(stem.format(**dict(wc.items()))) / f"{wc.model}.nii.gz")]


def link_labels(wildcards, input):
    if not input.labels:
        return ""
    return f'ln -s "$(realpath {input.labels})" "$tmp/{wildcards.case}_labels.nii.gz" &&'


def evaluate_options(wildcards, labels_only=False):
    """`kscan evaluate`'s options; `labels_only` for image inputs, whose image is its own target."""
    options = [f"--convention {config['evaluate']['convention']}"]
    if labels_only:
        options.append("--labels-only")
    elif wildcards.model != NO_MODEL:
        options.append("--labels")
    if config["evaluate"]["num_classes"]:
        options.append(f"--num-classes {config['evaluate']['num_classes']}")
    return " ".join(options)


EVALUATE_SHELL = (
    'tmp=$(mktemp -d) && trap \'rm -rf "$tmp"\' EXIT &&'
    ' ln -s "$(realpath {input.image:q})" "$tmp/{wildcards.case}{params.suffix}" && {params.link_labels}'
    ' kscan evaluate "$tmp/{wildcards.case}{params.suffix}" {input.target:q} {params.options}'
    " --csv {output:q} --quiet > {log:q} 2>&1"
)


# --- report ------------------------------------------------------------------------------------


def case_results(case):
    """The files the report needs from one case."""
    files = [f"results/{case}/input.json"]
    if case in KSPACE:
        for setting in SETTINGS:
            for method in METHODS:
                files.append(f"results/{case}/recon/{setting}/{method}.h5")
                files += [f"results/{case}/segment/{setting}/{method}/{m}.nii.gz" for m in SEG_MODELS]
                if case in KSPACE_WITH_TARGET:
                    files += [f"results/{case}/metrics/{setting}/{method}/{m}.csv" for m in metric_models()]
    else:
        files += [f"results/{case}/segment/image/{m}.nii.gz" for m in SEG_MODELS]
        if has_labels(case):
            files += [f"results/{case}/metrics/image/{m}.csv" for m in SEG_MODELS]
    return files


def all_results(wildcards):
    cases = [*KSPACE, *NIFTI, *dicom_cases()]
    return [f for case in cases for f in case_results(case)]
