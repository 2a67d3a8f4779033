"""``kscan bench scan``: the selective scan on CPU, the default CPU backend beside its peers.

Candidates, on the same float32 inputs (``u, delta (batch, D, L)``, ``A (D, N)``, variable
``B, C (batch, N, L)``; no ``D``, ``z`` or bias), each computing ``y_t = sum_n C_t h_t`` with
``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``:

- ``numba``: :func:`kscan.kernels.scan_numba.selective_scan_numba`, the fused CPU kernels (the
  default CPU backend when numba is installed);
- ``torch``: :func:`kscan.kernels.scan_torch.selective_scan_torch`, the chunked scan (the default
  CPU backend without numba);
- ``reference``: :func:`kscan.kernels.scan_reference.selective_scan_reference`, the sequential
  loop (its backward is plain autograd through that loop);
- ``mambapy``: ``mambapy.pscan.pscan`` (the parallel scan of the ``mambapy`` package, a
  benchmark-only dependency) inside the discretisation of mambapy's ``MambaBlock.selective_scan``:
  ``exp(delta A)`` and ``delta B u`` as ``(batch, L, D, N)`` tensors, the scan, then ``h @ C``.
  Its inputs are given in its own ``(batch, L, D)`` layout, prepared outside the timing.

Rows: forward (under ``torch.no_grad``) and forward+backward (the gradients of every input
for an upstream gradient of ones made outside the timing, by ``torch.autograd.grad``) at batch 2,
D 64, N 16, L 4096; the forward at the VM-UNet stage-1 inference shape (batch 1, 4 directions x
192 channels = D 768, L 4096, N 16). Candidates are timed in interleaved rounds, each timed call
isolated from the candidate before it (:func:`kscan.pipelines.timing.compare_times` with
``ISOLATE_S``): a pause, in which the OpenMP workers that torch leaves spinning after a parallel
operation go to sleep, then an untimed call, then the timed call. One more forward+backward row
is timed with the candidates following one another directly, as the scan runs inside a model right
after torch layers: the numba kernels then share the CPUs with the workers left spinning by the
candidate before (no target). Speed-ups are those of the default CPU backend. Targets: forward
>= 10x faster than ``reference``, forward+backward >= 50x, faster than ``mambapy`` in both; extra
memory of
each kscan backend <= 1/8 of the ``(batch, D, L, N)`` float32 state tensor, measured by tracking
every storage that torch allocates during the call (a ``TorchDispatchMode``): the peak of the
inference forward beyond ``y``, what a forward keeps for the backward beyond ``y``, and the peak of
the backward beyond the gradients it returns. The ``numba`` kernels' own per-thread scratch
buffers are not torch storages; their size is reported beside (``scratch_bytes``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from tabulate import tabulate

from kscan.kernels.scan import resolve_backend
from kscan.kernels.scan_reference import selective_scan_reference
from kscan.kernels.scan_torch import selective_scan_torch
from kscan.pipelines.atomic import write_json
from kscan.pipelines.machine import machine_info
from kscan.pipelines.memory import peak_tensor_bytes
from kscan.pipelines.timing import compare_times

Inputs = dict[str, torch.Tensor]

ISOLATE_S = 0.03
"""The pause before each timed call's untimed twin: three times the ~10 ms that torch's idle
OpenMP workers were seen spinning after a parallel operation on the 2-CPU benchmark machine."""

Candidate = tuple[Callable[[], torch.Tensor], list[torch.Tensor]]
"""A zero-argument forward call and the leaf tensors its output depends on."""


def make_inputs(batch: int, channels: int, n: int, length: int, seed: int = 0) -> Inputs:
    """Random float32 leaves ``u, delta, A, B, C`` that require gradients; ``delta`` in
    ``[0.001, 0.1]`` and ``A`` in ``[-1, -0.1]`` (mamba-ssm's initialisation ranges)."""
    gen = torch.Generator().manual_seed(seed)
    x = {
        "u": torch.randn(batch, channels, length, generator=gen),
        "delta": torch.empty(batch, channels, length).uniform_(0.001, 0.1, generator=gen),
        "A": torch.empty(channels, n).uniform_(-1.0, -0.1, generator=gen),
        "B": torch.randn(batch, n, length, generator=gen),
        "C": torch.randn(batch, n, length, generator=gen),
    }
    return {k: v.requires_grad_() for k, v in x.items()}


def _mambapy_candidate(x: Inputs) -> Candidate | None:
    """mambapy's discretisation + ``pscan`` + read-out on ``x`` in its layout, or None."""
    try:
        from mambapy.pscan import pscan
    except ImportError:
        return None
    u, delta, B, C = (
        x[k].detach().transpose(1, 2).contiguous().requires_grad_()
        for k in ("u", "delta", "B", "C")
    )
    A = x["A"]

    def run() -> torch.Tensor:
        delta_a = torch.exp(delta.unsqueeze(-1) * A)
        bx = delta.unsqueeze(-1) * B.unsqueeze(2) * u.unsqueeze(-1)
        return (pscan(delta_a, bx) @ C.unsqueeze(-1)).squeeze(3)

    return run, [u, delta, A, B, C]


def _forward_only(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.no_grad():
            return fn()

    return run


def _with_backward(candidate: Candidate) -> Callable[[], None]:
    """The candidate's forward and the gradients of its leaves for an upstream gradient of ones
    made here, untimed (``autograd.grad``: nothing is accumulated into ``.grad``)."""
    fn, leaves = candidate
    with torch.no_grad():
        grad = torch.ones_like(fn())

    def run() -> None:
        torch.autograd.grad(fn(), leaves, grad)

    return run


def default_backend() -> tuple[str, Callable[..., torch.Tensor]]:
    """The CPU backend ``selective_scan`` uses without a ``backend`` argument."""
    return resolve_backend(torch.device("cpu"), None)


def candidates(x: Inputs) -> dict[str, Candidate]:
    """The default CPU backend first, then ``torch`` (if not the default), ``reference`` and (when
    installed) ``mambapy``."""
    name, fn = default_backend()
    leaves = list(x.values())
    found: dict[str, Candidate] = {name: (lambda: fn(**x), leaves)}
    if name != "torch":
        found["torch"] = (lambda: selective_scan_torch(**x), leaves)
    found["reference"] = (lambda: selective_scan_reference(**x), leaves)
    mambapy = _mambapy_candidate(x)
    if mambapy is not None:
        found["mambapy"] = mambapy
    return found


def _speed_row(
    name: str, times: dict[str, dict[str, float]], targets: dict[str, float]
) -> dict[str, Any]:
    backend = default_backend()[0]
    ours = times[backend]["median_s"]
    speedups = {peer: t["median_s"] / ours for peer, t in times.items() if peer != backend}
    met = {peer: speedups[peer] >= targets[peer] for peer in targets if peer in speedups}
    notes = [
        f"{peer} is not installed (pip install 'kscan[bench]')"
        for peer in targets
        if peer not in times
    ]
    return {
        "name": name,
        "backend": backend,
        "times": times,
        "speedup_over": speedups,
        "target_speedup": targets,
        "met": met,
        "note": "; ".join(notes) or None,
    }


def bench_speed(
    batch: int, channels: int, n: int, length: int, repeats: int, reference_repeats: int
) -> list[dict[str, Any]]:
    """Forward and forward+backward rows at one shape."""
    x = make_inputs(batch, channels, n, length)
    fns = candidates(x)
    shape = f"batch {batch}, D {channels}, N {n}, L {length}"
    forward = {k: _forward_only(fn) for k, (fn, _) in fns.items()}
    fwd = compare_times(forward, repeats=repeats, warmup=1, isolate_s=ISOLATE_S)
    train = {k: _with_backward(c) for k, c in fns.items()}
    reference = {"reference": train.pop("reference")}
    fwd_bwd, busy = (
        compare_times(train, repeats=repeats, warmup=1, isolate_s=isolate)
        | compare_times(reference, repeats=reference_repeats, warmup=0, isolate_s=isolate)
        for isolate in (ISOLATE_S, None)
    )
    targets = {"reference": 50.0, "mambapy": 1.0}
    return [
        _speed_row(f"forward ({shape})", fwd, {"reference": 10.0, "mambapy": 1.0}),
        _speed_row(f"forward+backward ({shape})", fwd_bwd, targets),
        _speed_row(f"forward+backward, calls back to back ({shape})", busy, {}),
    ]


def bench_memory(
    batch: int, channels: int, n: int, length: int, backend: str, fn: Callable[..., torch.Tensor]
) -> dict[str, Any]:
    """Memory of one backend beside the ``(batch, D, L, N)`` float32 state tensor.

    ``forward``: peak bytes during an inference call beyond the returned ``y``;
    ``saved for backward``: what a call with gradients keeps beyond ``y``;
    ``backward``: peak bytes during the backward pass beyond the input gradients it returns
    (``y`` and its incoming gradient exist before it and are not counted).
    """
    x = make_inputs(batch, channels, n, length)
    leaves = list(x.values())
    state_bytes = batch * channels * length * n * 4
    y_bytes = batch * channels * length * 4
    peak, kept = peak_tensor_bytes(_forward_only(lambda: fn(**x)), leaves)
    rows = {"forward": {"peak_bytes": peak, "returned_bytes": kept, "extra_bytes": peak - kept}}
    _, kept = peak_tensor_bytes(lambda: fn(**x), leaves)
    rows["saved for backward"] = {"returned_bytes": y_bytes, "extra_bytes": kept - y_bytes}
    y = fn(**x)
    dy = torch.ones_like(y)
    peak, kept = peak_tensor_bytes(lambda: torch.autograd.grad(y, leaves, dy), [*leaves, y, dy])
    rows["backward"] = {"peak_bytes": peak, "returned_bytes": kept, "extra_bytes": peak - kept}
    for r in rows.values():
        r["extra_fraction_of_state"] = r["extra_bytes"] / state_bytes
        r["met"] = r["extra_fraction_of_state"] <= 1 / 8
    report = {
        "name": f"{backend} backend extra memory (batch {batch}, D {channels}, N {n}, L {length})",
        "backend": backend,
        "state_tensor_bytes": state_bytes,
        "target": "extra_fraction_of_state <= 0.125",
        "results": rows,
    }
    if backend == "numba":
        from kscan.kernels.scan_numba import scratch_bytes

        forward, backward = scratch_bytes(n, torch.float32)
        report["scratch_bytes_per_thread"] = {"forward": forward, "backward": backward}
    return report


def bench_inference(batch: int, channels: int, n: int, length: int, repeats: int) -> dict[str, Any]:
    """Forward at the VM-UNet stage-1 inference shape."""
    x = make_inputs(batch, channels, n, length, seed=1)
    fns = candidates(x)
    forward = {k: _forward_only(fn) for k, (fn, _) in fns.items()}
    times = compare_times(forward, repeats=repeats, warmup=1, isolate_s=ISOLATE_S)
    shape = f"batch {batch}, D {channels}, N {n}, L {length}"
    return _speed_row(
        f"VM-UNet stage-1 inference forward ({shape})", times, {"reference": 10.0, "mambapy": 1.0}
    )


def run(
    batch: int = 2,
    channels: int = 64,
    n: int = 16,
    length: int = 4096,
    vmunet_channels: int = 768,
    repeats: int = 3,
    reference_repeats: int = 1,
) -> dict[str, Any]:
    """All rows; returns a JSON-serialisable dict with the machine description."""
    return {
        "machine": machine_info(torch.device("cpu")),
        "speed": bench_speed(batch, channels, n, length, repeats, reference_repeats)
        + [bench_inference(1, vmunet_channels, n, length, repeats)],
        "memory": [
            bench_memory(batch, channels, n, length, name, fn)
            for name, fn in dict([default_backend(), ("torch", selective_scan_torch)]).items()
        ],
    }


def table(report: dict[str, Any]) -> list[list[object]]:
    """Rows ``[benchmark, candidate, median ms, speed-up of the default backend, target, met]``."""
    rows: list[list[object]] = []
    for res in report["speed"]:
        for i, (name, t) in enumerate(res["times"].items()):
            speedup = res["speedup_over"].get(name)
            rows.append(
                [
                    res["name"] if i == 0 else "",
                    name,
                    f"{1e3 * t['median_s']:.1f}",
                    f"{speedup:.1f}x" if speedup is not None else "",
                    f">= {res['target_speedup'][name]:g}x" if name in res["target_speedup"] else "",
                    ("yes" if res["met"][name] else "NO") if name in res["met"] else "",
                ]
            )
    for mem in report["memory"]:
        for name, r in mem["results"].items():
            rows.append(
                [
                    f"extra memory, {name}",
                    mem["backend"],
                    "",
                    f"{r['extra_fraction_of_state']:.3f} of state",
                    "<= 0.125",
                    "yes" if r["met"] else "NO",
                ]
            )
    return rows


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``kscan bench scan``."""
    parser = sub.add_parser(
        "scan",
        help="the selective scan's CPU backends against the reference and mambapy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: kscan bench scan --out out/bench/scan.json",
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=64, help="D")
    parser.add_argument("--state", type=int, default=16, help="N")
    parser.add_argument("--length", type=int, default=4096, help="L")
    parser.add_argument("--vmunet-channels", type=int, default=768, help="D of the inference row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--reference-repeats",
        type=int,
        default=1,
        help="timed rounds of the reference's forward+backward (minutes at L 4096), no warm-up",
    )
    parser.add_argument("--out", default="out/bench/scan.json")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> None:
    report = run(
        batch=args.batch,
        channels=args.channels,
        n=args.state,
        length=args.length,
        vmunet_channels=args.vmunet_channels,
        repeats=args.repeats,
        reference_repeats=args.reference_repeats,
    )
    backend = default_backend()[0]
    headers = ["benchmark", "candidate", "median ms", f"{backend} speed-up", "target", "met"]
    print(tabulate(table(report), headers=headers, tablefmt="github"))
    for res in report["speed"]:
        if res["note"]:
            print(f"{res['name']}: {res['note']}")
    m = report["machine"]
    print(
        f"machine: {m['processor']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, torch {m['torch']}"
    )
    write_json(args.out, report)
    print(f"wrote {args.out}")
