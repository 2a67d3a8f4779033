"""Snakemake script of the ingest_dicom checkpoint: find DICOM MR series, convert each to NIfTI.

Runs ``kscan info --json`` to list the series of a folder and ``kscan convert`` to convert one.
A DICOM SEG under the input folder that segments a converted series becomes that case's reference
labels, ``<case>_labels.nii.gz`` beside its volume, in the volume's voxel layout (``kscan convert
SEG --reference SERIES --like VOLUME``); the evaluate rules score segmentations against them.
Inputs come from ``snakemake.params``: ``sources`` ({case: folder} from the sample sheet, or None
to search ``root``), ``known`` (case names already taken) and ``case_pattern``. The NIfTI files
go to a ``.partial`` folder that is renamed to the output folder when all are written, so an
interrupted run leaves no half-filled output.
"""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom

SKIPPED_SUFFIXES = (".h5", ".hdf5", ".nii", ".nii.gz", ".json", ".tsv", ".csv")


def is_dicom_file(path):
    """A file with the DICOM preamble ('DICM' at byte 128)."""
    with open(path, "rb") as f:
        return f.read(132)[128:132] == b"DICM"


def dicom_folders(root):
    """Folders under root (root included) that directly hold DICOM files, deepest first."""
    folders = {
        p.parent
        for p in root.rglob("*")
        if p.is_file() and not p.name.endswith(SKIPPED_SUFFIXES) and is_dicom_file(p)
    }
    return sorted(folders, key=lambda p: (-len(p.parts), str(p)))


def segmentations(root):
    """{SeriesInstanceUID: DICOM SEG file segmenting it} of the SEG files under root (the first by
    path when a series has several; the others are reported on stderr)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name.endswith(SKIPPED_SUFFIXES) or not is_dicom_file(path):
            continue
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["Modality", "ReferencedSeriesSequence"]
        )
        if ds.get("Modality") != "SEG" or not ds.get("ReferencedSeriesSequence"):
            continue
        uid = str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
        if uid in found:
            print(
                f"{path}: a second DICOM SEG of series {uid}; using {found[uid]}", file=sys.stderr
            )
            continue
        found[uid] = path
    return found


def mr_series(folder, log):
    """The MR series under folder (its subfolders included), from `kscan info --json`."""
    with open(log, "a") as err:
        text = subprocess.run(
            ["kscan", "info", str(folder), "--json"],
            check=True,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        ).stdout
    return [s for s in json.loads(text)["series"] if s["modality"] == "MR"]


def convert_dicom(sources, root, known, case_pattern, out_dir, log):
    """Convert each DICOM MR series to out_dir/<case>.nii.gz with `kscan convert`.

    sources: {case: folder} from the sample sheet (one MR series each), or None to find every
    series under root: a folder's case is its name (<name>_<k> when it holds several series); a
    series seen in a deeper folder is not converted again for its parents.
    """
    out_dir = Path(out_dir)
    jobs = []  # (case, folder, series uid)
    if sources is not None:
        for case, folder in sources.items():
            series = mr_series(folder, log)
            if len(series) != 1:
                raise ValueError(
                    f"sample_sheet: {folder} holds {len(series)} MR series; expected one"
                )
            jobs.append((case, Path(folder), series[0]["uid"]))
    else:
        seen = set()
        for folder in dicom_folders(Path(root)):
            new = [s for s in mr_series(folder, log) if s["uid"] not in seen]
            seen.update(s["uid"] for s in new)
            for k, s in enumerate(new):
                case = folder.name if len(new) == 1 else f"{folder.name}_{k}"
                if (
                    case in known
                    or any(case == j[0] for j in jobs)
                    or not re.fullmatch(case_pattern, case)
                ):
                    raise ValueError(
                        f"input_dir: DICOM series in {folder} would be case {case!r}, which is taken "
                        "or not a valid name; name the cases with a sample_sheet"
                    )
                jobs.append((case, folder, s["uid"]))
    tmp = out_dir.with_name(f"{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    labels = segmentations(Path(root))
    for case, folder, uid in jobs:
        target = tmp / f"{case}.nii.gz"
        commands = [["kscan", "convert", str(folder), str(target), "--series", uid]]
        if uid in labels:
            seg_nifti = tmp / f"{case}_labels.nii.gz"
            commands.append(
                ["kscan", "convert", str(labels[uid]), str(seg_nifti), "--reference", str(folder)]
                + ["--series", uid, "--like", str(target)]
            )
        with open(log, "a") as err:
            for cmd in commands:
                print("$", shlex.join(cmd), file=err, flush=True)
                subprocess.run(cmd, check=True, stdout=err, stderr=err)
    tmp.rename(out_dir)


if __name__ == "__main__":
    job = snakemake  # noqa: F821 (the job's inputs, outputs and params, set by Snakemake)
    Path(job.log[0]).write_text("")
    params = job.params
    convert_dicom(
        params.sources,
        params.root,
        set(params.known),
        params.case_pattern,
        job.output[0],
        job.log[0],
    )
