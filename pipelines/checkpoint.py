"""kscan checkpoint files: safetensors with the model's name and config in the metadata.

A kscan checkpoint is one ``.safetensors`` file. Its tensors are the model's state dict under
``model.<key>`` and, for training checkpoints, anything else the trainer needs to resume exactly
(optimiser moments, random-generator states) under other prefixes. Its string metadata holds::

    kscan_format   "1"
    model          the registry name ("rvn", "varnet", "vmunet", ...)
    config         the model config as JSON (kscan.config.to_mapping)
    meta           any other JSON (training step, optimiser hyper-parameters, data, metrics)

Loading never runs code from the file (safetensors holds tensors and strings only), and a file
whose tensors do not fit the configured model fails with the missing and unexpected keys named.
Writes are atomic. Shipped weights live in ``kscan/pipelines/weights/<name>.safetensors``: a
``--checkpoint`` of ``shipped`` means the file named after the model, ``shipped:<name>`` any of
them (:func:`resolve_checkpoint`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from kscan.config import to_mapping
from kscan.errors import ConfigError, FileFormatError
from kscan.models import registry
from kscan.models.checkpoints import state_dict_mismatch
from kscan.pipelines.atomic import atomic_path
from kscan.pipelines.provenance import sha256_file

FORMAT_VERSION = "1"
MODEL_PREFIX = "model."
WEIGHTS_DIR = Path(__file__).parent / "weights"
PathLike = str | os.PathLike[str]


@dataclass
class Checkpoint:
    """The contents of a kscan checkpoint file.

    Attributes:
        path: the file.
        model: the registry name of the network.
        config: the model config as a plain mapping.
        state: the model's state dict (``model.`` prefix removed).
        extra: the other tensors, by their full names.
        meta: the other metadata (JSON values).
    """

    path: Path
    model: str
    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return registry.spec(self.model).task

    def sha256(self) -> str:
        return sha256_file(self.path)


def save_checkpoint(
    path: PathLike,
    model_name: str,
    model: nn.Module,
    extra: Mapping[str, torch.Tensor] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (registered as ``model_name``; its ``config`` attribute) atomically to ``path``.

    Tensors are copied to contiguous CPU memory; ``extra`` tensor names must not start with
    ``model.``. Returns the path written.
    """
    registry.spec(model_name)
    tensors = {MODEL_PREFIX + key: _plain_tensor(v) for key, v in model.state_dict().items()}
    for key, value in (extra or {}).items():
        if key.startswith(MODEL_PREFIX):
            raise ConfigError(
                f"extra: tensor names must not start with {MODEL_PREFIX!r}, got {key!r}"
            )
        tensors[key] = _plain_tensor(value)
    metadata = {
        "kscan_format": FORMAT_VERSION,
        "model": model_name,
        "config": json.dumps(to_mapping(model.config)),
        "meta": json.dumps(dict(meta or {})),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def _plain_tensor(value: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that owns its memory (safetensors refuses shared storage)."""
    return value.detach().to("cpu").contiguous().clone()


def read_checkpoint(path: PathLike) -> Checkpoint:
    """Read a kscan checkpoint (tensors on CPU); a file of another kind fails with one line."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as handle:  # one read: tensors and metadata
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise FileFormatError(
            f"{path}: not a safetensors file ({err}); DIRECT and fastMRI checkpoints (.pt) are "
            f"converted with 'kscan import-checkpoint'"
        ) from None
    if metadata.get("kscan_format") != FORMAT_VERSION:
        raise FileFormatError(
            f"{path}: not a kscan checkpoint (metadata 'kscan_format' is "
            f"{metadata.get('kscan_format')!r}, expected {FORMAT_VERSION!r}); DIRECT and fastMRI "
            f"checkpoints are imported with 'kscan import-checkpoint'"
        )
    try:
        config = json.loads(metadata["config"])
        meta = json.loads(metadata.get("meta", "{}"))
        name = metadata["model"]
    except (KeyError, json.JSONDecodeError) as err:
        raise FileFormatError(f"{path}: damaged kscan checkpoint metadata ({err})") from None
    state = {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    extra = {k: v for k, v in tensors.items() if not k.startswith(MODEL_PREFIX)}
    return Checkpoint(path, name, config, state, extra, meta)


def load_model(
    path: PathLike, device: torch.device | str = "cpu", task: str | None = None
) -> tuple[nn.Module, Checkpoint]:
    """Build the checkpoint's model from its config and load its weights (strict), in eval mode.

    Raises:
        FileFormatError: not a kscan checkpoint, or its tensors do not fit its config (the
            missing and unexpected keys are named).
        ConfigError: the model is unknown, or not of ``task`` when one is asked for.
    """
    checkpoint = read_checkpoint(path)
    try:
        spec = registry.spec(checkpoint.model)
    except ConfigError as err:
        raise ConfigError(f"{checkpoint.path}: {err}") from None
    if task is not None and spec.task != task:
        raise ConfigError(
            f"{checkpoint.path}: holds a {spec.task} model ({checkpoint.model!r}), expected a {task} model"
        )
    try:
        model = registry.build_model(checkpoint.model, checkpoint.config)
    except ConfigError as err:
        raise FileFormatError(f"{checkpoint.path}: its config does not build: {err}") from None
    load_state(model, checkpoint.state, checkpoint.path)
    return model.to(device).eval(), checkpoint


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], path: PathLike) -> None:
    """Load ``state`` strictly into ``model``; a mismatch names the keys and ``path``."""
    problem = state_dict_mismatch(model.state_dict(), state)
    if problem:
        raise FileFormatError(
            f"{path}: the weights do not fit the {type(model).__name__} of this config: {problem}"
        )
    model.load_state_dict(state)


SHIPPED = "shipped"


def shipped_weights(model_name: str) -> Path:
    """The weights shipped with kscan for ``model_name``; ConfigError when there are none."""
    registry.spec(model_name)
    path = WEIGHTS_DIR / f"{model_name}.safetensors"
    if not path.is_file():
        raise ConfigError(
            f"--checkpoint: no weights are shipped for model {model_name!r} (shipped: "
            f"{_shipped_names()}); give a checkpoint file"
        )
    return path


def _shipped_names() -> str:
    return ", ".join(sorted(p.stem for p in WEIGHTS_DIR.glob("*.safetensors"))) or "none"


def resolve_checkpoint(reference: PathLike | None, model_name: str | None) -> Path:
    """The file a ``--checkpoint`` value names: None or ``shipped``: the weights shipped for
    ``model_name``; ``shipped:<name>``: the shipped file ``<name>.safetensors`` (any of them,
    e.g. ``shipped:rvn-scaled``, wherever kscan is installed); anything else: a path."""
    if reference is None or str(reference) == SHIPPED:
        if model_name is None:
            raise ConfigError("--checkpoint: 'shipped' needs the model's name")
        return shipped_weights(model_name)
    text = str(reference)
    if text.startswith(f"{SHIPPED}:"):
        name = text[len(SHIPPED) + 1 :]
        path = WEIGHTS_DIR / f"{name}.safetensors"
        if not name or Path(name).name != name or not path.is_file():
            raise ConfigError(
                f"--checkpoint: {text!r}: no such shipped file (shipped: {_shipped_names()})"
            )
        return path
    return Path(reference)
