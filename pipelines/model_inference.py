"""Learned reconstruction of k-space batches with a registry model loaded once from a checkpoint.

:func:`load_reconstructor` reads a kscan checkpoint (``--checkpoint``, or the weights shipped for
the model), checks that it holds the asked-for model, and returns a :class:`Reconstructor`, the
per-batch solve of ``kscan reconstruct``: for masked k-space ``y`` ``(batch, coil, H, W)`` in the
centered layout of fastMRI files and the volume's mask ``m`` (``(W,)``, ``(1, W)`` or ``(H, W)``)::

    M     = m as (1, 1, 1, W) or (1, 1, H, W)
    k_T   = model(y, M)                    the model's k-space, centre lines found from M
    image = model.image(k_T)               RSS (batch, H, W)

A multitask model (:mod:`kscan.models.registry`'s ``multitask`` interface) gives its last image
``image_iterates[-1]`` (the same ``model.image(k_T)``) and, when asked to segment, the labels
``argmax`` over classes of its last segmentation logits ``seg_logits[-1]`` ``(batch, H, W)``, on
the k-space grid like the image.

A model with the uncentered FFT convention (``model.centered`` False, Calgary-Campinas) gets
``ifftshift(y)`` and ``ifftshift(M)`` over (H, W), and its image (and labels) are ``fftshift``-ed
back, so that the image is in the file's layout: with ``y = fftshift(F ifftshift(x))``,
``F^-1 ifftshift(y) = ifftshift(x)``. A checkpoint that records a k-space scaling rule (an
imported DIRECT model: :mod:`kscan.pipelines.kspace_scaling`) gets ``y / s`` per sample and its
image multiplied by ``s``; any other gets the k-space as stored. Batches run
under ``torch.inference_mode`` on the model's device, so no autograd graph is kept: memory is the
weights plus one batch's activations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from kscan.errors import ConfigError, FileFormatError, ShapeError
from kscan.models import registry
from kscan.pipelines.checkpoint import Checkpoint, load_model, resolve_checkpoint
from kscan.pipelines.kspace_scaling import KspaceScaling

_DIMS = (-2, -1)


@dataclass
class Reconstructor:
    """A loaded reconstruction model as a per-batch solve (see the module docstring).

    Attributes:
        name: the registry name of the model.
        model: the network, in evaluation mode, on its device.
        checkpoint: the checkpoint it was loaded from (path, config, metadata).
        segment: return the labels of a multitask model too.
        scaling: the checkpoint's k-space scaling rule, or None (k-space as stored).
    """

    name: str
    model: nn.Module
    checkpoint: Checkpoint
    segment: bool = False
    scaling: KspaceScaling | None = None

    @property
    def multitask(self) -> bool:
        """Whether the model reconstructs and segments (registry task ``multitask``)."""
        return registry.spec(self.name).task == "multitask"

    def __call__(
        self, kspace: torch.Tensor, mask: torch.Tensor, maps: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """RSS image ``(batch, H, W)`` of masked k-space ``(batch, coil, H, W)`` and its mask; with
        :attr:`segment`, the pair (image, labels ``(batch, H, W)`` int64).

        ``mask`` is ``(W,)``, ``(1, W)`` or ``(H, W)``, the same for every slice of the batch; ``maps`` (a
        file's stored coil maps) are not used: the model estimates its own.
        """
        model_mask = model_layout_mask(mask, kspace)
        centered = self.model.centered
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            kspace, model_mask = kspace.to(device), model_mask.to(device)
            scale = None
            if self.scaling is not None:
                scale = self.scaling.factors(kspace).reshape(-1, 1, 1)
                kspace = kspace / scale[..., None]
            if not centered:
                kspace = torch.fft.ifftshift(kspace, dim=_DIMS)
                model_mask = torch.fft.ifftshift(model_mask, dim=_DIMS)
            output = self.model(kspace, model_mask)
            if self.multitask:
                image, labels = output.image_iterates[-1], output.seg_logits[-1].argmax(dim=1)
            else:
                image, labels = self.model.image(output), None
            if scale is not None:
                image = image * scale
            if not centered:
                image = torch.fft.fftshift(image, dim=_DIMS)
                labels = None if labels is None else torch.fft.fftshift(labels, dim=_DIMS)
            return (image, labels) if self.segment else image


def model_layout_mask(mask: torch.Tensor, kspace: torch.Tensor) -> torch.Tensor:
    """A mask ``(W,)``, ``(1, W)`` or ``(H, W)`` as ``(1, 1, 1, W)`` or ``(1, 1, H, W)`` for ``kspace``.

    Raises:
        ShapeError: the mask's width (or height) differs from the k-space's ``(H, W)``.
    """
    height, width = kspace.shape[-2:]
    if (
        mask.ndim not in (1, 2)
        or mask.shape[-1] != width
        or mask.shape[:-1]
        not in (
            (),
            (1,),
            (height,),
        )
    ):
        raise ShapeError(
            f"mask: shape {tuple(mask.shape)} does not fit k-space {tuple(kspace.shape)}; "
            f"expected ({width},), (1, {width}) or ({height}, {width})"
        )
    return mask.reshape(1, 1, -1, width)


def load_reconstructor(
    method: str,
    checkpoint: str | os.PathLike[str] | None,
    device: torch.device | str = "cpu",
    segment: bool = False,
) -> Reconstructor:
    """The reconstruction or multitask model ``method`` from ``checkpoint`` (a path, or None,
    ``shipped`` or ``shipped:<name>``: :func:`kscan.pipelines.checkpoint.resolve_checkpoint`);
    ``segment``: it returns labels too (multitask models only).

    Raises:
        ConfigError: no weights are shipped for ``method`` and no checkpoint is given, the
            checkpoint holds another model or a model of another task, or ``segment`` is asked of
            a reconstruction-only model.
        FileFormatError: not a kscan checkpoint (a DIRECT or fastMRI ``.pt`` file: the message
            points at ``kscan import-checkpoint``), or its tensors do not fit its config (the
            missing and unexpected keys are named).
    """
    task = registry.spec(method).task
    if segment and task != "multitask":
        raise ConfigError(
            f"--segment: {method!r} is a {task} model; segmenting needs a multitask model "
            f"({', '.join(registry.names('multitask'))})"
        )
    path = resolve_checkpoint(checkpoint, method)
    model, loaded = load_model(path, device, task=task if task == "multitask" else "reconstruction")
    if loaded.model != method:
        raise ConfigError(
            f"--checkpoint: {path} holds a {loaded.model!r} model; expected {method!r} "
            f"for --method {method}"
        )
    try:
        scaling = KspaceScaling.from_meta(loaded.meta)
    except ConfigError as err:
        raise FileFormatError(f"{path}: {err}") from None
    return Reconstructor(method, model, loaded, segment, scaling)
