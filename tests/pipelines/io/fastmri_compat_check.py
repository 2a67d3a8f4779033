"""Side-by-side check: files written by kscan are read unchanged by the ``fastmri`` package.

Not a pytest module (kscan's test suite never imports fastmri). Run it with kscan's environment
and point it at a separate environment that has ``fastmri`` installed::

    python3 -m venv /tmp/fmvenv && /tmp/fmvenv/bin/pip install fastmri==0.3.0 h5py
    .venv/bin/python tests/pipelines/io/fastmri_compat_check.py --fastmri-python /tmp/fmvenv/bin/python

Phase 1 (kscan's Python) writes multi-coil, test-style and single-coil volumes with
``write_fastmri`` into a temporary folder and records what kscan's ``SliceDataset`` reads from them.
Phase 2 (the fastmri Python, started by phase 1 with ``--check``) reads the same files with
``fastmri.data.SliceDataset`` (raw and through ``UnetDataTransform`` / ``VarNetDataTransform`` with
a ``RandomMaskFunc``), runs a small ``fastmri.models.VarNet`` on one sample, and compares every
array and metadata value with kscan's. It prints one line per check and exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

FOLDERS = {"multicoil": "multicoil", "multicoil_test": "multicoil", "singlecoil": "singlecoil"}


def _write(workdir: Path) -> None:
    """Phase 1: write the volumes with kscan and record kscan's reading of every slice."""
    from kscan.pipelines.io.fastmri import write_fastmri
    from kscan.pipelines.io.ismrmrd_header import EncodingGeometry
    from kscan.pipelines.io.slice_dataset import SliceDataset

    rng = np.random.default_rng(0)

    def cplx(*shape: int) -> np.ndarray:
        return rng.normal(size=shape) + 1j * rng.normal(size=shape)

    mc, test, sc = (workdir / name for name in FOLDERS)
    write_fastmri(
        mc / "file_mc1.h5", cplx(3, 4, 64, 36), rng.random((3, 32, 32)), acquisition="CORPD_FBK"
    )
    padded = cplx(2, 4, 64, 40)
    padded[..., :2] = 0
    padded[..., 38:] = 0
    geometry = EncodingGeometry(
        encoding_size=(64, 40, 1),
        recon_size=(32, 32, 1),
        phase_limits=(0, 35, 18),
        encoding_fov_mm=(256.0, 160.0, 3.0),
        recon_fov_mm=(128.0, 128.0, 3.0),
    )
    write_fastmri(
        mc / "file_mc2.h5",
        padded,
        rng.random((2, 32, 32)),
        header=geometry,
        acquisition="AXT2",
        segmentation=rng.integers(0, 4, size=(2, 32, 32)),
        sensitivity_map=cplx(2, 4, 64, 40),
    )
    mask = np.zeros(36, bool)
    mask[[0, 5, 9, 15, 16, 17, 18, 19, 20, 27, 31]] = True
    write_fastmri(
        test / "file_test.h5",
        cplx(2, 4, 64, 36) * mask,
        header=EncodingGeometry((64, 36, 1), (32, 32, 1), (0, 35, 18)),
        mask=mask,
        acceleration=4,
        num_low_frequency=5,
        acquisition="CORPD_FBK",
    )
    write_fastmri(
        sc / "file_sc.h5", cplx(3, 64, 36), rng.random((3, 32, 32)), acquisition="CORPD_FBK"
    )

    arrays, metadata = {}, {}
    for folder, challenge in FOLDERS.items():
        for item in SliceDataset(workdir / folder, challenge=challenge):
            key = f"{folder}/{item['fname']}/{item['slice_num']}"
            for name in ("kspace", "target", "mask"):
                if name in item:
                    arrays[f"{key}/{name}"] = item[name].numpy()
            metadata[key] = item["metadata"]
    np.savez(workdir / "kscan_read.npz", **arrays)
    (workdir / "kscan_metadata.json").write_text(json.dumps(metadata))


def kspace_as_real(kspace: np.ndarray) -> np.ndarray:
    """fastMRI's (..., 2) real layout of complex k-space."""
    return np.stack([kspace.real, kspace.imag], axis=-1)


class Checks:
    """Collects named pass/fail results and prints them."""

    def __init__(self) -> None:
        self.failed = 0

    def __call__(self, name: str, ok: bool, detail: str = "") -> None:
        self.failed += not ok
        print(f"{'OK  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")


def _check(workdir: Path) -> int:
    """Phase 2 (fastmri's Python): read with fastmri and compare with kscan's reading."""
    import fastmri
    import torch
    from fastmri.data import SliceDataset
    from fastmri.data.subsample import RandomMaskFunc
    from fastmri.data.transforms import UnetDataTransform, VarNetDataTransform
    from fastmri.models import VarNet

    print(f"fastmri {getattr(fastmri, '__version__', '?')}, torch {torch.__version__}")
    expected = np.load(workdir / "kscan_read.npz")
    kscan_meta = json.loads((workdir / "kscan_metadata.json").read_text())
    check = Checks()
    cache = workdir / "fastmri_cache.pkl"
    mask_func = RandomMaskFunc(center_fractions=[0.08], accelerations=[4], seed=0)

    for folder, challenge in FOLDERS.items():
        root = workdir / folder
        raw = SliceDataset(root, challenge, transform=None, dataset_cache_file=cache)
        keys = [f"{folder}/{fname.name}/{i}" for fname, i, _ in raw.raw_samples]
        ours_keys = sorted(k for k in kscan_meta if k.startswith(f"{folder}/"))
        check(f"{folder}: same slices listed", sorted(keys) == ours_keys, f"{len(keys)} slices")
        for key, raw_item in zip(keys, raw, strict=True):
            kspace, mask, target, attrs, _, _ = raw_item
            ours = kscan_meta[key]
            kspace_ours = expected[f"{key}/kspace"]
            if challenge == "singlecoil":
                kspace_ours = kspace_ours[0]  # kscan adds the coil axis
            check(
                f"{key}: kspace",
                kspace.dtype == np.complex64 and np.array_equal(kspace, kspace_ours),
                f"{kspace.dtype} {kspace.shape}",
            )
            if target is not None or f"{key}/target" in expected:
                check(
                    f"{key}: target",
                    np.array_equal(target, expected[f"{key}/target"]),
                    str(target.shape),
                )
            if mask is not None or f"{key}/mask" in expected:
                check(
                    f"{key}: mask",
                    np.array_equal(mask, expected[f"{key}/mask"]),
                    f"{mask.dtype} {mask.shape}",
                )
            derived = {
                k: list(attrs[k]) if isinstance(attrs[k], tuple) else attrs[k]
                for k in ("encoding_size", "recon_size", "padding_left", "padding_right")
            }
            theirs_attrs = {
                k: attrs[k]
                for k in ("acquisition", "max", "norm", "acceleration", "num_low_frequency")
                if k in attrs
            }
            same = all(ours[k] == v for k, v in derived.items()) and all(
                float(ours[k]) == float(v) if k != "acquisition" else ours[k] == v
                for k, v in theirs_attrs.items()
            )
            check(f"{key}: metadata", same, f"{derived} {sorted(theirs_attrs)}")

        unet = SliceDataset(
            root,
            challenge,
            transform=UnetDataTransform(challenge, mask_func),
            dataset_cache_file=cache,
        )
        for raw_item, sample in zip(raw, unet, strict=True):
            _, _, target, attrs, fname, slice_num = raw_item
            crop = target.shape if target is not None else tuple(attrs["recon_size"][:2])
            ok = tuple(sample.image.shape) == tuple(crop) and bool(
                torch.isfinite(sample.image).all()
            )
            if target is not None:  # undo the normalisation (unless the clamp at 6 was hit)
                restored = sample.target * sample.std + sample.mean
                clamped = bool((sample.target.abs() >= 6).any())
                ok = ok and (clamped or np.allclose(restored.numpy(), target, rtol=1e-4, atol=1e-5))
            check(
                f"{folder}/{fname}/{slice_num}: UnetDataTransform",
                ok,
                f"image {tuple(sample.image.shape)}",
            )

        if challenge != "multicoil":
            continue
        varnet = SliceDataset(
            root, challenge, transform=VarNetDataTransform(mask_func), dataset_cache_file=cache
        )
        for raw_item, sample in zip(raw, varnet, strict=True):
            kspace, _, _, attrs, fname, slice_num = raw_item
            m = sample.mask[0, 0, :, 0]
            left, right = attrs["padding_left"], attrs["padding_right"]
            ok = (
                tuple(sample.masked_kspace.shape) == (*kspace.shape, 2)
                and sample.crop_size == tuple(attrs["recon_size"][:2])
                and not m[:left].any()
                and not m[right:].any()
                and m[left:right].any()
            )
            check(
                f"{folder}/{fname}/{slice_num}: VarNetDataTransform(mask_func)",
                ok,
                f"padding [{left}, {right}), {int(m.sum())}/{m.numel()} lines",
            )
        if raw[0][1] is not None:  # test-style files: fastMRI uses the stored mask and padding
            stored = SliceDataset(
                root, challenge, transform=VarNetDataTransform(), dataset_cache_file=cache
            )
            for raw_item, sample in zip(raw, stored, strict=True):
                kspace, mask, _, _, fname, slice_num = raw_item
                m = sample.mask[0, 0, :, 0].numpy()
                ok = np.array_equal(m, mask) and np.array_equal(
                    sample.masked_kspace.numpy(), kspace_as_real(kspace)
                )
                check(
                    f"{folder}/{fname}/{slice_num}: VarNetDataTransform(stored mask)",
                    ok,
                    f"{int(m.sum())} lines",
                )

        torch.manual_seed(0)
        model = VarNet(num_cascades=2, sens_chans=4, sens_pools=2, chans=4, pools=2).eval()
        sample = varnet[0]
        with torch.no_grad():
            out = model(sample.masked_kspace[None], sample.mask[None], sample.num_low_frequencies)
        ok = tuple(out.shape) == (1, *sample.masked_kspace.shape[1:3]) and bool(
            torch.isfinite(out).all()
        )
        check(f"{folder}: fastmri VarNet forward on a kscan file", ok, f"output {tuple(out.shape)}")

    print(f"{check.failed} failed")
    return 1 if check.failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fastmri-python", help="a Python with fastmri installed (phase 2)")
    parser.add_argument("--check", metavar="DIR", help="run phase 2 on DIR (used internally)")
    args = parser.parse_args()
    if args.check:
        return _check(Path(args.check))
    if not args.fastmri_python:
        parser.error("--fastmri-python is required")
    with tempfile.TemporaryDirectory(prefix="kscan_fastmri_compat_") as tmp:
        workdir = Path(tmp)
        _write(workdir)
        return subprocess.run(
            [args.fastmri_python, __file__, "--check", str(workdir)], check=False
        ).returncode


if __name__ == "__main__":
    sys.exit(main())
