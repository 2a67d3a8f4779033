"""A description of the machine a benchmark ran on, recorded beside every benchmark result."""

from __future__ import annotations

import datetime as _dt
import os
import platform

import torch

import kscan


def machine_info(device: torch.device) -> dict[str, object]:
    """Date, kscan/torch/Python versions, CPU count, torch threads and the device name."""
    info: dict[str, object] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "kscan": kscan.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info
