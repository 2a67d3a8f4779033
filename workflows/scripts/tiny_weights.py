"""Write tiny, randomly initialised kscan checkpoints for the demo and the workflow tests.

Until kscan ships trained weights (``kscan/pipelines/weights/<model>.safetensors``), the demo
runs its learned steps on these: small networks of the real architectures (the whole chain runs,
the numbers mean nothing). Usage: ``python workflows/scripts/tiny_weights.py OUT_DIR`` writes
``OUT_DIR/rvn.safetensors`` and ``OUT_DIR/vmunet.safetensors`` (6 classes, the phantom's tissues).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from kscan.models import registry
from kscan.pipelines.checkpoint import save_checkpoint

TINY = {
    "rvn": {
        "network": {"num_steps": 2, "recurrent_hidden_channels": 4, "recurrent_num_layers": 1},
        "sensitivity_filters": 4,
        "sensitivity_pools": 2,
    },
    "vmunet": {
        "dims": [8, 16, 32, 64],
        "depths": [1, 1, 1, 1],
        "depths_decoder": [1, 1, 1, 1],
        "num_classes": 6,
    },
}
"""Registry name -> model config of each tiny checkpoint."""


def write_tiny_weights(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write one tiny random checkpoint per entry of :data:`TINY`; returns their paths by name."""
    paths = {}
    for name, config in TINY.items():
        torch.manual_seed(seed)
        model = registry.build_model(name, config)
        meta = {"note": "randomly initialised placeholder for the demo and tests"}
        paths[name] = save_checkpoint(Path(out_dir) / f"{name}.safetensors", name, model, meta=meta)
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: tiny_weights.py OUT_DIR")
    for path in write_tiny_weights(sys.argv[1]).values():
        print(path)
