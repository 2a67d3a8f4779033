"""The model registry: every kscan network by name, with its task and configuration class.

A name (``rvn``, ``varnet``, ``vmunet``, ``mhs-vm``, ...) selects a :class:`ModelSpec`: the
config dataclass (built from YAML with :func:`kscan.config.from_mapping`, unknown keys rejected)
and the ``nn.Module`` class built from it. Training, inference, checkpoints and benchmarks look
models up here, so a network is added to every command by adding one entry.

Interfaces by task:

- ``reconstruction``: ``model(masked_kspace, mask, num_low_frequencies=None,
  return_iterates=False)`` with complex k-space ``(batch, coil, H, W)`` and a mask broadcastable
  to it returns the reconstructed k-space ``(batch, coil, H, W)`` (or the list of every
  iterate's); ``model.image(kspace)`` is the RSS image ``(batch, H, W)``; ``model.centered`` is
  its FFT convention.
- ``segmentation``: ``model(image)`` with ``(batch, in_channels, H, W)`` returns
  ``(batch, num_classes, H, W)``: sigmoid probabilities for one class, logits otherwise;
  ``model.forward_logits(image)`` always the logits; H and W multiples of ``config.size_multiple``.
- ``multitask``: ``model(masked_kspace, mask, num_low_frequencies=None)`` with the
  reconstruction inputs returns a :class:`kscan.models.multitask.MultitaskOutput`:
  ``kspace_iterates`` (every reconstruction step's k-space ``(batch, coil, H, W)``),
  ``image_iterates`` (their ``model.image`` ``(batch, H, W)``) and ``seg_logits`` (the logits
  ``(batch, num_classes, H, W)`` of each segmentation the model makes, in order; the last is its
  answer); ``model.image(kspace)`` is the RSS image, ``model.centered`` its FFT convention and
  ``model.num_classes`` its classes (softmax, background included). Any ``H, W`` (heads pad
  internally).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from kscan.config import from_mapping
from kscan.errors import ConfigError

TASKS = ("reconstruction", "segmentation", "multitask")


@dataclass(frozen=True)
class ModelSpec:
    """A registered network: ``module.model_class(module.config_class(...))``.

    The classes are named rather than imported, so that looking up one model does not import
    every other model's code.
    """

    name: str
    task: str
    module: str
    model_class: str
    config_class: str
    description: str

    def config_type(self) -> type:
        return getattr(importlib.import_module(self.module), self.config_class)

    def model_type(self) -> type[nn.Module]:
        return getattr(importlib.import_module(self.module), self.model_class)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "rvn",
            "reconstruction",
            "kscan.models.rvn",
            "RVN",
            "RVNConfig",
            "RecurrentVarNet (Yiasemis et al. 2022) with DIRECT's learned coil-map refinement",
        ),
        ModelSpec(
            "varnet",
            "reconstruction",
            "kscan.models.varnet",
            "VarNet",
            "VarNetConfig",
            "End-to-end VarNet (Sriram et al. 2020), fastMRI's layout and learned coil maps",
        ),
        ModelSpec(
            "vmunet",
            "segmentation",
            "kscan.models.vmunet",
            "VMUNet",
            "VMUNetConfig",
            "VM-UNet (Ruan et al. 2024): VSS blocks with 4-direction SS2D scans",
        ),
        ModelSpec(
            "mhs-vm",
            "segmentation",
            "kscan.models.mhs",
            "MHSVM",
            "MHSVMConfig",
            "MHS-VM (Ji 2024): VM-UNet with multi-head scans over snake, zig-zag, spiral and raster routes",
        ),
        ModelSpec(
            "joint-rvn-seg",
            "multitask",
            "kscan.models.multitask",
            "JointRecSeg",
            "JointConfig",
            "RecurrentVarNet cascades with a segmentation head each, segmentation fed back into "
            "the hidden state (ATOMMIC's MTLRS)",
        ),
        ModelSpec(
            "sequential-rvn-seg",
            "multitask",
            "kscan.models.multitask",
            "SequentialRecSeg",
            "SequentialConfig",
            "RecurrentVarNet, then a segmentation head on its image (no feedback)",
        ),
        ModelSpec(
            "idslr",
            "multitask",
            "kscan.models.idslr",
            "IDSLR",
            "IDSLRConfig",
            "Unrolled coil-wise U-Net with proximal data consistency and a segmentation decoder "
            "sharing its encoder (ATOMMIC's IDSLR)",
        ),
        ModelSpec(
            "segnet",
            "multitask",
            "kscan.models.segnet",
            "SegNet",
            "SegNetConfig",
            "Cascades of coil-wise U-Nets with data consistency, each with a segmentation "
            "decoder on its encoder, the segmentations fused (ATOMMIC's SegNet)",
        ),
    )
}


def spec(name: str) -> ModelSpec:
    """The registered model ``name``; an unknown name raises :class:`ConfigError` listing them."""
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(
            f"model: unknown model {name!r}; expected one of {', '.join(sorted(MODELS))}"
        ) from None


def build_config(name: str, values: Mapping[str, Any] | None = None) -> Any:
    """The config of model ``name`` from a mapping (defaults for missing keys)."""
    return from_mapping(spec(name).config_type(), values, "model_config")


def build_model(name: str, config: Mapping[str, Any] | Any | None = None) -> nn.Module:
    """A new model ``name`` from its config (a config object, a mapping, or None for defaults)."""
    entry = spec(name)
    if config is None or isinstance(config, Mapping):
        config = build_config(name, config)
    elif not isinstance(config, entry.config_type()):
        raise ConfigError(
            f"model_config: expected a {entry.config_class} for model {name!r}, "
            f"got {type(config).__name__}"
        )
    return entry.model_type()(config)


def names(task: str | None = None) -> list[str]:
    """Registered model names, of one task when given."""
    return sorted(name for name, entry in MODELS.items() if task is None or entry.task == task)
