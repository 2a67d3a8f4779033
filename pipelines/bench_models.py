"""``kscan bench models``: CPU inference time, peak memory and parameter count of kscan's networks.

``--task reconstruction`` rows (one slice, batch 1, float32, equispaced 4x mask with 8% centre
lines, under ``torch.inference_mode``):

- ``rvn``: RecurrentVarNet with 8 steps, 64 hidden channels, 4 layers, with its ACS maps and
  sensitivity U-Net, on 8 coils at 256 x 256; and its network alone (maps given) beside DIRECT's
  ``RecurrentVarNet`` of the same configuration and weights when the ``direct`` package imports
  (target: kscan as fast or faster);
- ``varnet``: fastMRI's leaderboard configuration (12 cascades, 18 channels, 4 pools, sensitivity
  U-Net 8 channels / 4 pools) on the same input, when the model is registered.

``--task segmentation`` rows (one 256 x 256 one-channel image, batch 1, 6 classes, logits):
VM-UNet and MHS-VM (4 heads) at the reference dims ``[96, 192, 384, 768]`` (27.4 M and 17.3 M
parameters) and at the small dims ``[32, 64, 128, 256]`` of the shipped recipes
(``configs/train_vmunet_synthetic.yaml``, ``configs/train_mhsvm_synthetic.yaml``), on the torch
scan; as peers MONAI's ``UNet`` (2D, channels 64 .. 1024, 2 residual units: 26.0 M) and
``SwinUNETR`` (2D, feature size 48: 25.1 M), of the reference VM-UNet's size.

``--task multitask`` rows: the multitask recipes (``configs/train_*_synthetic.yaml``:
joint RecurrentVarNet + VM-UNet or MHS-VM, sequential, IDSLR, SegNet) on one 4-coil 160 x 128 slice
with the reconstruction task's mask.

Each candidate runs in a fresh process (``spawn``): build, warm up, time ``--repeats`` calls
(median), and record the memory as the **process RSS delta**: the peak resident set size during
the calls (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` just before; elsewhere
``ru_maxrss``) minus the resident set size before them (the model and its input are already
there). ``--quick`` uses tiny sizes (for tests). A task is one ``<task>_candidates(quick)``
function in :data:`TASKS`.
"""

from __future__ import annotations

import argparse
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

from kscan.models import registry
from kscan.physics.coilmaps import acs_maps
from kscan.physics.masks import apply_mask, make_mask
from kscan.pipelines.atomic import write_json
from kscan.pipelines.machine import machine_info
from kscan.pipelines.memory import peak_rss
from kscan.pipelines.synthetic import simulate_multicoil
from kscan.pipelines.timing import compare_times

Built = tuple[nn.Module, tuple[Any, ...]]
"""A model and the positional inputs of one call."""

MEMORY_METHOD = (
    "process RSS delta: peak resident set size during the timed calls (VmHWM reset via "
    "/proc/self/clear_refs, else ru_maxrss) minus the resident set size before them"
)


@dataclass(frozen=True)
class Candidate:
    """One row: ``build(config, shape)`` gives a model and its inputs, called as ``model(*inputs)``.

    ``build`` is a module-level function so that it reaches the worker process by name;
    ``peer_of`` names the candidate of the same model this one is the peer of (that candidate's
    speed-up is ``this time / its time``); ``requires`` a module that must import.
    """

    model: str
    label: str
    build: Callable[[dict[str, Any], dict[str, int]], Built]
    config: dict[str, Any]
    shape: dict[str, int]
    peer_of: str | None = None
    requires: str | None = None


# --- reconstruction ------------------------------------------------------------------------------


def reconstruction_inputs(shape: dict[str, int], centered: bool = True) -> tuple[torch.Tensor, ...]:
    """Masked k-space ``(1, coils, H, W)`` of a phantom and its equispaced 4x mask ``(1, 1, 1, W)``."""
    size = (shape["height"], shape["width"])
    kspace = simulate_multicoil(size, shape["coils"], seed=0).kspace.unsqueeze(0)
    mask = make_mask(
        "equispaced_fraction", size, center_fraction=0.08, acceleration=4, seed=0
    ).mask.reshape(1, 1, 1, -1)
    if not centered:
        kspace, mask = (torch.fft.ifftshift(x, dim=(-2, -1)) for x in (kspace, mask))
    return apply_mask(kspace, mask), mask


def build_registered(config: dict[str, Any], shape: dict[str, int]) -> Built:
    """A registry model (``config["model"]`` with ``config["config"]``) on masked k-space."""
    model = registry.build_model(config["model"], config["config"]).eval()
    return model, reconstruction_inputs(shape, model.centered)


def build_rvn_network(config: dict[str, Any], shape: dict[str, int]) -> Built:
    """kscan's RecurrentVarNet alone, with ACS maps given: ``(kspace, mask, maps)``."""
    torch.manual_seed(0)
    model = registry.build_model("rvn", config).model.eval()
    kspace, mask = reconstruction_inputs(shape, model.config.centered)
    maps = acs_maps(kspace, mask=mask, centered=model.config.centered)
    return model, (kspace, mask, maps)


def build_direct_network(config: dict[str, Any], shape: dict[str, int]) -> Built:
    """DIRECT's RecurrentVarNet with the weights of :func:`build_rvn_network`'s, on the same
    inputs in its real ``(..., 2)`` layout (boolean mask ``(1, 1, 1, W, 1)``)."""
    from functools import partial

    from direct.data.transforms import fft2, ifft2
    from direct.nn.recurrentvarnet.recurrentvarnet import RecurrentVarNet

    ours, (kspace, mask, maps) = build_rvn_network(config, shape)
    c = ours.config
    model = RecurrentVarNet(
        forward_operator=partial(fft2, centered=c.centered),
        backward_operator=partial(ifft2, centered=c.centered),
        num_steps=c.num_steps,
        recurrent_hidden_channels=c.recurrent_hidden_channels,
        recurrent_num_layers=c.recurrent_num_layers,
        no_parameter_sharing=c.no_parameter_sharing,
        learned_initializer=c.learned_initializer,
        initializer_initialization=c.initializer_initialization,
        initializer_channels=c.initializer_channels,
        initializer_dilations=c.initializer_dilations,
        initializer_multiscale=c.initializer_multiscale,
        normalized=c.normalized,
    )
    model.load_state_dict(ours.state_dict())
    inputs = (
        torch.view_as_real(kspace).contiguous(),
        mask.bool().unsqueeze(-1),
        torch.view_as_real(maps).contiguous(),
    )
    return model.eval(), inputs


def reconstruction_candidates(quick: bool) -> list[Candidate]:
    """RecurrentVarNet (and its network beside DIRECT's) and, when registered, VarNet."""
    shape = (
        {"coils": 4, "height": 32, "width": 32}
        if quick
        else {"coils": 8, "height": 256, "width": 256}
    )
    network = (
        {"num_steps": 2, "recurrent_hidden_channels": 8, "recurrent_num_layers": 2}
        if quick
        else {"num_steps": 8, "recurrent_hidden_channels": 64, "recurrent_num_layers": 4}
    )
    rvn = {"network": network} | (
        {"sensitivity_filters": 4, "sensitivity_pools": 2} if quick else {}
    )
    rows = [
        Candidate("rvn", "kscan", build_registered, {"model": "rvn", "config": rvn}, shape),
        Candidate("rvn network (maps given)", "kscan", build_rvn_network, rvn, shape),
        Candidate(
            "rvn network (maps given)",
            "DIRECT",
            build_direct_network,
            rvn,
            shape,
            peer_of="kscan",
            requires="direct",
        ),
    ]
    if "varnet" in registry.names("reconstruction"):
        varnet = (
            {"num_cascades": 2, "chans": 4, "pools": 2, "sens_chans": 4, "sens_pools": 2}
            if quick
            else {}
        )
        rows.append(
            Candidate(
                "varnet", "kscan", build_registered, {"model": "varnet", "config": varnet}, shape
            )
        )
    return rows


# --- segmentation --------------------------------------------------------------------------------

SEG_CLASSES = 6


def build_segmentation(config: dict[str, Any], shape: dict[str, int]) -> Built:
    """A segmentation network (``config["model"]``: a registry name, ``monai-unet`` or
    ``monai-swinunetr`` with ``config["config"]``) on a uniform random image ``(1, 1, H, W)``."""
    from monai.networks.nets import SwinUNETR, UNet

    torch.manual_seed(0)
    name, values = config["model"], config["config"]
    if name == "monai-unet":
        model: nn.Module = UNet(2, 1, SEG_CLASSES, **values)
    elif name == "monai-swinunetr":
        model = SwinUNETR(in_channels=1, out_channels=SEG_CLASSES, spatial_dims=2, **values)
    else:
        model = registry.build_model(name, {"num_classes": SEG_CLASSES, **values})
    image = torch.rand(1, 1, shape["height"], shape["width"], generator=torch.Generator())
    return model.eval(), (image,)


def segmentation_candidates(quick: bool) -> list[Candidate]:
    """VM-UNet and MHS-VM at the reference and the shipped small dims, MONAI's UNet and
    SwinUNETR at the reference VM-UNet's size (module docstring)."""
    shape = {"height": 64, "width": 64} if quick else {"height": 256, "width": 256}
    if quick:
        reference = {
            "dims": [8, 16, 32, 64],
            "depths": [1, 1, 1, 1],
            "depths_decoder": [1, 1, 1, 1],
        }
        small = reference
        unet = {"channels": [4, 8, 16, 32, 64], "strides": [2, 2, 2, 2], "num_res_units": 1}
        swin = {"feature_size": 12}
    else:
        reference = {}
        small = {"dims": [32, 64, 128, 256]}
        unet = {"channels": [64, 128, 256, 512, 1024], "strides": [2, 2, 2, 2], "num_res_units": 2}
        swin = {"feature_size": 48}
    one_block = {"depths": [1, 1, 1, 1], "depths_decoder": [1, 1, 1, 1]}
    rows = [
        ("vmunet", "reference dims", {"model": "vmunet", "config": reference}),
        ("vmunet", "small (shipped recipe)", {"model": "vmunet", "config": small}),
        ("mhs-vm", "reference dims, 4 heads", {"model": "mhs-vm", "config": reference}),
        (
            "mhs-vm",
            "small (shipped recipe), 4 heads",
            {"model": "mhs-vm", "config": small | one_block},
        ),
        ("unet", "MONAI", {"model": "monai-unet", "config": unet}),
        ("swinunetr", "MONAI", {"model": "monai-swinunetr", "config": swin}),
    ]
    return [Candidate(m, label, build_segmentation, c, shape) for m, label, c in rows]


# --- multitask -----------------------------------------------------------------------------------


def multitask_candidates(quick: bool) -> list[Candidate]:
    """The multitask recipes' models on one slice of the recipes' data size (module docstring)."""
    shape = (
        {"coils": 2, "height": 32, "width": 32}
        if quick
        else {"coils": 4, "height": 160, "width": 128}
    )
    steps, hidden, layers = (2, 6, 1) if quick else (4, 16, 2)
    rvn = {
        "learned_sensitivity": False,
        "network": {
            "num_steps": steps,
            "recurrent_hidden_channels": hidden,
            "recurrent_num_layers": layers,
        },
    }
    dims = [8, 16, 32, 64] if quick else [16, 32, 64, 128]
    head = {"dims": dims, "depths": [1, 1, 1, 1], "depths_decoder": [1, 1, 1, 1]}
    common = {"rvn": rvn, "num_classes": SEG_CLASSES}
    joint = common | {"cascades": 2, "share_head": True}
    idslr = {
        "coils": shape["coils"],
        "num_classes": SEG_CLASSES,
        "num_filters": 4 if quick else 16,
        "num_pool_layers": 2 if quick else 3,
        "iterations": 2 if quick else 4,
    }
    segnet = {key: idslr[key] for key in ("coils", "num_classes", "num_pool_layers")}
    segnet |= {"num_filters": 2 if quick else 8, "cascades": 2 if quick else 5}
    rows = [
        ("joint-rvn-seg", "VM-UNet head", joint | {"head": "vmunet", "head_config": head}),
        (
            "joint-rvn-seg",
            "MHS-VM head",
            joint | {"head": "mhs-vm", "head_config": head | {"heads": 4}},
        ),
        ("sequential-rvn-seg", "VM-UNet head", common | {"head_config": head}),
        ("idslr", "kscan", idslr),
        ("segnet", "kscan", segnet),
    ]
    return [
        Candidate(m, label, build_registered, {"model": m, "config": c}, shape)
        for m, label, c in rows
    ]


TASKS: dict[str, Callable[[bool], list[Candidate]]] = {
    "reconstruction": reconstruction_candidates,
    "segmentation": segmentation_candidates,
    "multitask": multitask_candidates,
}
"""Each task's rows, at full (``quick=False``) or tiny sizes."""


# --- measurement ---------------------------------------------------------------------------------


def measure(candidate: Candidate, repeats: int, warmup: int, threads: int) -> dict[str, Any]:
    """Time and memory of one candidate in this process (run it in a fresh one)."""
    torch.set_num_threads(threads)
    model, inputs = candidate.build(candidate.config, candidate.shape)
    params = sum(p.numel() for p in model.parameters())
    with torch.inference_mode(), peak_rss() as rss:
        times = compare_times({"call": lambda: model(*inputs)}, repeats=repeats, warmup=warmup)
    return {
        "parameters": params,
        "time": times["call"],
        "rss_before_bytes": rss.before_bytes,
        "peak_rss_bytes": rss.peak_bytes,
        "peak_rss_delta_bytes": rss.growth_bytes,
        "peak_reset": rss.exact,
    }


def _available(module: str | None) -> bool:
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def run(
    task: str = "reconstruction", quick: bool = False, repeats: int = 5, warmup: int = 2
) -> dict[str, Any]:
    """Every candidate of ``task``, each in a fresh spawned process; a JSON-serialisable dict."""
    threads = torch.get_num_threads()
    results = []
    context = multiprocessing.get_context("spawn")
    for c in TASKS[task](quick):
        row: dict[str, Any] = {
            "model": c.model,
            "candidate": c.label,
            "config": c.config,
            "shape": c.shape,
            "peer_of": c.peer_of,
        }
        if not _available(c.requires):
            row["note"] = f"{c.requires} is not installed"
        else:
            with ProcessPoolExecutor(1, mp_context=context) as pool:
                row |= pool.submit(measure, c, repeats, warmup, threads).result()
        results.append(row)
    for row in results:
        peer = next(
            (r for r in results if r["model"] == row["model"] and r["candidate"] == row["peer_of"]),
            None,
        )
        if peer is not None and "time" in row and "time" in peer:
            row["kscan_speedup"] = row["time"]["median_s"] / peer["time"]["median_s"]
    return {
        "task": task,
        "quick": quick,
        "memory_method": MEMORY_METHOD,
        "machine": machine_info(torch.device("cpu")),
        "results": results,
    }


def table(report: dict[str, Any]) -> list[list[object]]:
    """Rows ``[model, candidate, parameters, median ms / slice (or image), peak RSS delta MiB, kscan speed-up,
    note]``; the speed-up (this peer's time over kscan's) is on the peer's row."""
    rows: list[list[object]] = []
    for r in report["results"]:
        measured = "time" in r
        speedup = r.get("kscan_speedup")
        rows.append(
            [
                r["model"],
                r["candidate"],
                f"{r['parameters']:,}" if measured else "",
                f"{1e3 * r['time']['median_s']:.1f}" if measured else "",
                f"{r['peak_rss_delta_bytes'] / 2**20:.0f}" if measured else "",
                f"{speedup:.2f}x" if speedup is not None else "",
                r.get("note", ""),
            ]
        )
    return rows


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``kscan bench models``."""
    parser = sub.add_parser(
        "models",
        help="CPU inference time, peak memory and parameters of kscan's networks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: kscan bench models --task reconstruction --out out/bench/models.json",
    )
    parser.add_argument("--task", default="reconstruction", choices=tuple(TASKS))
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for tests)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per candidate")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed calls first (a fresh process needs them)"
    )
    parser.add_argument("--out", default="out/bench/models.json")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> None:
    report = run(args.task, args.quick, args.repeats, args.warmup)
    headers = ["model", "candidate", "parameters", "median ms / slice", "peak RSS delta MiB"]
    headers += ["kscan speed-up", "note"]
    print(tabulate(table(report), headers=headers, tablefmt="github"))
    print(f"memory: {report['memory_method']}")
    m = report["machine"]
    print(
        f"machine: {m['processor']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, torch {m['torch']}"
    )
    write_json(args.out, report)
    print(f"wrote {args.out}")
