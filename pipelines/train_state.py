"""What a training checkpoint holds besides the weights, as safetensors tensors and JSON metadata.

``kscan.pipelines.checkpoint`` files keep tensors and strings only (nothing executes on load), so
the optimiser and random-generator states are flattened:

==================================  ==========================================================
tensor (``extra``)                  content
==================================  ==========================================================
``optimizer.<i>.<name>``            per-parameter state of parameter ``i`` (AdamW: ``step``,
                                    ``exp_avg``, ``exp_avg_sq``)
``rng.torch``                       ``torch.get_rng_state()`` (uint8)
``rng.cuda.<d>``                    each CUDA device's generator state (uint8)
``rng.numpy``                       numpy's global MT19937 key (624 uint32 as uint8)
``rng.python``                      ``random``'s MT19937 state (625 uint32 as uint8)
==================================  ==========================================================

and ``meta["optimizer"]`` holds the parameter groups (hyper-parameters, parameter indices),
``meta["scheduler"]`` the LR scheduler's state and ``meta["rng"]`` the scalar parts of the numpy
and Python generator states. JSON keeps Python floats exactly (``repr`` round-trips), so a
restored run continues bit for bit.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from kscan.errors import FileFormatError

OPTIMIZER_PREFIX = "optimizer."
RNG_PREFIX = "rng."


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` of an optimiser's ``state_dict()``."""
    state = optimizer.state_dict()
    tensors = {
        f"{OPTIMIZER_PREFIX}{index}.{name}": torch.as_tensor(value)
        for index, entries in state["state"].items()
        for name, value in entries.items()
    }
    return tensors, {"param_groups": state["param_groups"]}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Restore :func:`optimizer_state`'s output into ``optimizer`` (same parameters)."""
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(OPTIMIZER_PREFIX):
            index, name = key[len(OPTIMIZER_PREFIX) :].split(".", 1)
            per_param.setdefault(int(index), {})[name] = value
    groups = [
        {**group, **({"betas": tuple(group["betas"])} if "betas" in group else {})}
        for group in meta["param_groups"]
    ]
    try:
        optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    except (ValueError, KeyError) as err:
        raise FileFormatError(
            f"optimizer state does not fit this model's parameters: {err}"
        ) from None


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of the torch, CUDA, numpy and Python global generators."""
    tensors = {f"{RNG_PREFIX}torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for device, value in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{RNG_PREFIX}cuda.{device}"] = value
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    tensors[f"{RNG_PREFIX}numpy"] = _bytes(np.asarray(key, dtype=np.uint32))
    version, words, gauss_next = random.getstate()
    tensors[f"{RNG_PREFIX}python"] = _bytes(np.asarray(words, dtype=np.uint32))
    meta = {
        "numpy": [kind, int(pos), int(has_gauss), float(gauss)],
        "python": [version, gauss_next],
    }
    return tensors, meta


def load_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s output (CUDA generators only where the devices exist)."""
    torch.set_rng_state(tensors[f"{RNG_PREFIX}torch"])
    if torch.cuda.is_available():
        for device in range(torch.cuda.device_count()):
            value = tensors.get(f"{RNG_PREFIX}cuda.{device}")
            if value is not None:
                torch.cuda.set_rng_state(value, device)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, _words(tensors[f"{RNG_PREFIX}numpy"]), pos, has_gauss, gauss))
    version, gauss_next = meta["python"]
    words = tuple(int(w) for w in _words(tensors[f"{RNG_PREFIX}python"]))
    random.setstate((version, words, gauss_next))


def _bytes(words: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(words.astype("<u4").view(np.uint8).copy())


def _words(value: torch.Tensor) -> np.ndarray:
    return value.numpy().view("<u4").astype(np.uint32)
