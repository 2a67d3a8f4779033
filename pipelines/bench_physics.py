"""``kscan bench physics``: the SENSE normal operator and ESPIRiT, each beside a peer.

- SENSE normal operator ``A^H A x`` (15 coils, 320 x 320, complex64) of
  :class:`kscan.physics.sense.SenseOperator` against the straightforward form in the style of
  fastMRI's ``fft2c`` (shift, FFT, shift for every coil image, both ways). Target: kscan's time is
  at most 1.1 x the straightforward one.
- ESPIRiT coil maps (15 coils, 320 x 320, calibration 24, kernel 6) of
  :func:`kscan.physics.coilmaps.espirit_maps` against ``sigpy.mri.app.EspiritCalib``, with the
  agreement of the two maps. Target: kscan at least as fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tabulate import tabulate

from kscan.physics.coilmaps import espirit_maps
from kscan.physics.sense import SenseOperator
from kscan.pipelines.atomic import write_json
from kscan.pipelines.cli_args import add_device
from kscan.pipelines.cli_args import device as cli_device
from kscan.pipelines.machine import machine_info
from kscan.pipelines.synthetic import simulate_multicoil
from kscan.pipelines.timing import compare_times


def _fastmri_fft2c(x: torch.Tensor) -> torch.Tensor:
    x = torch.fft.ifftshift(x, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.fftn(x, dim=(-2, -1), norm="ortho"), dim=(-2, -1))


def _fastmri_ifft2c(x: torch.Tensor) -> torch.Tensor:
    x = torch.fft.ifftshift(x, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.ifftn(x, dim=(-2, -1), norm="ortho"), dim=(-2, -1))


def straightforward_normal(x: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The peer: ``sum_c conj(S_c) ifft2c(M fft2c(S_c x))`` with fastMRI-style shifted FFTs."""
    return (maps.conj() * _fastmri_ifft2c(mask * _fastmri_fft2c(maps * x.unsqueeze(1)))).sum(1)


def maps_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over pixels where both maps are non-zero of ``|<a, b>| / (|a| |b|)`` over coils."""
    na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
    support = (na > 1e-6) & (nb > 1e-6)
    cos = np.abs((a.conj() * b).sum(axis=0))[support] / (na * nb)[support]
    return float(cos.mean())


def bench_sense(device: torch.device, coils: int, size: int, repeats: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    phantom = simulate_multicoil((size, size), coils)
    maps = phantom.maps.unsqueeze(0).to(device)
    mask = (torch.rand(1, size, generator=gen) < 0.25).float().to(device)
    x = torch.complex(
        torch.randn(1, size, size, generator=gen), torch.randn(1, size, size, generator=gen)
    ).to(device)
    op = SenseOperator(maps, mask)
    error = float(
        (op.normal(x) - straightforward_normal(x, maps, mask)).abs().max() / x.abs().max()
    )
    times = compare_times(
        {
            "kscan": lambda: op.normal(x),
            "straightforward": lambda: straightforward_normal(x, maps, mask),
        },
        repeats=repeats,
        device=device,
    )
    ratio = times["kscan"]["median_s"] / times["straightforward"]["median_s"]
    return {
        "name": f"SENSE normal operator ({coils} coils, {size}x{size}, complex64)",
        "times": times,
        "ratio": ratio,
        "target": "ratio <= 1.1",
        "met": ratio <= 1.1,
        "max_abs_difference": error,
    }


def bench_espirit(device: torch.device, coils: int, size: int, repeats: int) -> dict[str, Any]:
    phantom = simulate_multicoil((size, size), coils)
    kspace = phantom.kspace.unsqueeze(0).to(device)
    candidates: dict[str, Callable[[], object]] = {"kscan": lambda: espirit_maps(kspace)}
    try:
        from sigpy.mri.app import EspiritCalib
    except ImportError:
        EspiritCalib = None
    ksp_np = phantom.kspace.numpy()
    if EspiritCalib is not None:
        candidates["sigpy"] = lambda: EspiritCalib(ksp_np, show_pbar=False).run()
    times = compare_times(candidates, repeats=repeats, warmup=1, device=device)
    result: dict[str, Any] = {
        "name": f"ESPIRiT maps ({coils} coils, {size}x{size}, calibration 24, kernel 6)",
        "times": times,
        "target": "ratio <= 1.0",
    }
    if EspiritCalib is None:
        result.update(
            ratio=None, met=None, note="sigpy is not installed (pip install 'kscan[bench]')"
        )
        return result
    ratio = times["kscan"]["median_s"] / times["sigpy"]["median_s"]
    ours = espirit_maps(kspace)[0].cpu().numpy()
    theirs = np.asarray(EspiritCalib(ksp_np, show_pbar=False).run())
    result.update(
        ratio=ratio, met=ratio <= 1.0, agreement_mean_abs_cosine=maps_agreement(ours, theirs)
    )
    return result


def run(device: str = "cpu", coils: int = 15, size: int = 320, repeats: int = 20) -> dict[str, Any]:
    """Run both benchmarks; returns a JSON-serialisable dict with the machine description."""
    dev = cli_device(device)
    return {
        "machine": machine_info(dev),
        "results": [
            bench_sense(dev, coils, size, repeats),
            bench_espirit(dev, coils, size, max(3, repeats // 5)),
        ],
    }


def table(report: dict[str, Any]) -> list[list[object]]:
    """Rows ``[benchmark, candidate, median ms, ratio, target, met]`` for printing."""
    rows: list[list[object]] = []
    for res in report["results"]:
        for i, (name, t) in enumerate(res["times"].items()):
            first = i == 0
            ratio = res.get("ratio")
            rows.append(
                [
                    res["name"] if first else "",
                    name,
                    f"{1e3 * t['median_s']:.1f}",
                    f"{ratio:.3f}" if first and ratio is not None else "",
                    res["target"] if first else "",
                    ("yes" if res["met"] else "NO") if first and res.get("met") is not None else "",
                ]
            )
    return rows


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``kscan bench physics``."""
    parser = sub.add_parser(
        "physics",
        help="SENSE normal operator and ESPIRiT against their peers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: kscan bench physics --coils 15 --size 320 --out out/bench/physics.json",
    )
    add_device(parser)
    parser.add_argument("--coils", type=int, default=15)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument(
        "--repeats",
        type=int,
        default=20,
        help="timed rounds of the SENSE operator (ESPIRiT: a fifth)",
    )
    parser.add_argument("--out", default="out/bench/physics.json")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> None:
    report = run(device=args.device, coils=args.coils, size=args.size, repeats=args.repeats)
    headers = ["benchmark", "candidate", "median ms", "ratio", "target", "met"]
    print(tabulate(table(report), headers=headers, tablefmt="github"))
    for res in report["results"]:
        extra = {
            k: v
            for k, v in res.items()
            if k in ("max_abs_difference", "agreement_mean_abs_cosine", "note")
        }
        if extra:
            print(f"{res['name']}: " + ", ".join(f"{k} = {v}" for k, v in extra.items()))
    m = report["machine"]
    print(
        f"machine: {m['processor']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, {m['device']}, torch {m['torch']}"
    )
    write_json(args.out, report)
    print(f"wrote {args.out}")
