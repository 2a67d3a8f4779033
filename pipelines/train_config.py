"""The configuration of ``kscan train``: one YAML file, loaded into :class:`TrainConfig`.

Every key has a default except ``model`` and ``data.train``; an unknown key anywhere fails with
its dotted name (``optim.lr_max: unknown key in OptimConfig; expected one of ...``) before any
work starts. ``docs/training.md`` lists every key. Example::

    task: reconstruction
    model: rvn
    model_config: {network: {num_steps: 4, recurrent_hidden_channels: 16}}
    data: {train: data/sim/h5, val: data/sim_val/h5, mask_kinds: [random], accelerations: [4]}
    optim: {lr: 5.0e-4, warmup_steps: 20, epochs: 10}
    loss: {l1: 1.0, ssim: 1.0, iterate_weighting: logspace}
    output_dir: runs/rvn

Relative paths are taken from the current directory. The learning-rate schedule, with ``W``
warm-up steps and ``S`` steps in all, sets the rate of update ``s = 0, 1, ...`` to::

    lr_s = lr (s + 1) / W                                              s < W
    lr_s = min_lr + (lr - min_lr) (1 + cos(pi (s - W) / max(1, S - W))) / 2    s >= W
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kscan.config import from_mapping, to_mapping
from kscan.errors import ConfigError, FileFormatError
from kscan.models import registry
from kscan.physics.masks import MASK_KINDS
from kscan.pipelines.io.fastmri import CHALLENGES
from kscan.pipelines.kspace_scaling import KspaceScaling

TASKS = ("reconstruction", "segmentation", "multitask")
"""Tasks ``kscan train`` runs (their task classes: ``train.TASKS``)."""

PRECISIONS = ("fp32", "bf16")
ITERATE_WEIGHTINGS = ("none", "logspace")
MASKS_2D = ("gaussian_2d", "poisson_2d")
RUNTIME_KEYS = ("device", "data.num_workers")
"""Keys that may change between a run and its resumption (they do not change the result on CPU)."""


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}: expected an integer >= {minimum}, got {value!r}")


def _number(name: str, value: Any, minimum: float = 0.0, strict: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise ConfigError(f"{name}: expected a number {relation} {minimum:g}, got {value!r}")


def _rate(name: str, value: Any) -> None:
    if value is not None:
        _number(name, value, 0.0, strict=True)
        if value > 1:
            raise ConfigError(f"{name}: expected a fraction in (0, 1], got {value!r}")


@dataclass
class DataConfig:
    """Where the slices come from and how they are undersampled and batched.

    Attributes:
        train: folder (its ``*.h5``) or file of fully sampled fastMRI-layout volumes with targets.
        val: the same for validation (``None``: no validation, no ``best.safetensors``).
        challenge: "multicoil" or "singlecoil".
        mask_kinds: mask kinds (``kscan.physics.masks.MASK_KINDS``); one is drawn per slice. 1D and
            2D kinds cannot be mixed (their masks do not batch together).
        accelerations: accelerations, paired with ``center_fractions``; one pair drawn per slice.
        center_fractions: fully sampled centre fractions.
        batch_size: slices per optimiser step and process. Above 1 every volume must have the same
            k-space and target size; with volumes of different sizes use 1.
        num_workers: DataLoader worker processes.
        sample_rate: train on this fraction of the slices (drawn once with ``seed``).
        volume_sample_rate: or on this fraction of the volumes (not both).
        val_volume_sample_rate: validate on this fraction of the validation volumes.
        scale_percentile: reconstruction and multitask tasks: divide each slice's masked k-space
            and target by its ``scale_percentile`` k-space modulus, as DIRECT does (0.99 there),
            so the model learns at one intensity scale whatever the data's; recorded in the
            checkpoints and applied by ``kscan reconstruct`` (:mod:`kscan.pipelines.kspace_scaling`).
            ``None``: the k-space as stored.
    """

    train: str = ""
    val: str | None = None
    challenge: str = "multicoil"
    mask_kinds: tuple[str, ...] = ("random",)
    accelerations: tuple[float, ...] = (4.0,)
    center_fractions: tuple[float, ...] = (0.08,)
    batch_size: int = 1
    num_workers: int = 0
    sample_rate: float | None = None
    volume_sample_rate: float | None = None
    val_volume_sample_rate: float | None = None
    scale_percentile: float | None = None

    def __post_init__(self) -> None:
        if self.scale_percentile is not None:
            try:
                KspaceScaling(self.scale_percentile)
            except ConfigError:
                raise ConfigError(
                    f"scale_percentile: expected a number in (0, 1] or null, "
                    f"got {self.scale_percentile!r}"
                ) from None
        if not isinstance(self.train, str | os.PathLike) or not str(self.train):
            raise ConfigError("train: expected the folder or file of training volumes, got none")
        if self.challenge not in CHALLENGES:
            raise ConfigError(f"challenge: expected one of {CHALLENGES}, got {self.challenge!r}")
        self.mask_kinds = tuple(self.mask_kinds)
        self.accelerations = tuple(self.accelerations)
        self.center_fractions = tuple(self.center_fractions)
        unknown = [kind for kind in self.mask_kinds if kind not in MASK_KINDS]
        if unknown or not self.mask_kinds:
            raise ConfigError(
                f"mask_kinds: expected some of {', '.join(MASK_KINDS)}, got {list(self.mask_kinds)}"
            )
        if 0 < sum(kind in MASKS_2D for kind in self.mask_kinds) < len(self.mask_kinds):
            raise ConfigError(
                f"mask_kinds: expected only 1D or only 2D kinds (2D: {', '.join(MASKS_2D)}), "
                f"got {list(self.mask_kinds)}"
            )
        if not self.accelerations or len(self.accelerations) != len(self.center_fractions):
            raise ConfigError(
                f"center_fractions: expected one per acceleration ({len(self.accelerations)}), "
                f"got {len(self.center_fractions)}"
            )
        for value in self.accelerations:
            _number("accelerations", value, 1.0)
        for value in self.center_fractions:
            _number("center_fractions", value, 0.0)
        _positive_int("batch_size", self.batch_size)
        _positive_int("num_workers", self.num_workers, 0)
        for name in ("sample_rate", "volume_sample_rate", "val_volume_sample_rate"):
            _rate(name, getattr(self, name))
        if self.sample_rate is not None and self.volume_sample_rate is not None:
            raise ConfigError("sample_rate, volume_sample_rate: set one of them, not both")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay (formula in the module docstring).

    Attributes:
        lr: peak learning rate.
        min_lr: the rate at the last step.
        weight_decay: AdamW's decoupled weight decay.
        betas: AdamW's moment coefficients.
        eps: AdamW's epsilon.
        warmup_steps: steps of linear warm-up ``W``.
        epochs: train this many epochs (set this or ``total_steps``; 1 when neither is set).
        total_steps: or this many optimiser steps.
        grad_clip: clip the global gradient norm to this value (``None``: no clipping).
    """

    lr: float = 5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    epochs: int | None = None
    total_steps: int | None = None
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        _number("lr", self.lr, 0.0, strict=True)
        _number("min_lr", self.min_lr, 0.0)
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr: expected at most lr = {self.lr}, got {self.min_lr}")
        _number("weight_decay", self.weight_decay, 0.0)
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(
            isinstance(b, int | float) and 0 <= b < 1 for b in self.betas
        ):
            raise ConfigError(f"betas: expected two numbers in [0, 1), got {list(self.betas)}")
        _number("eps", self.eps, 0.0, strict=True)
        _positive_int("warmup_steps", self.warmup_steps, 0)
        if self.epochs is not None and self.total_steps is not None:
            raise ConfigError(
                f"epochs, total_steps: set one of them, not both (got {self.epochs!r} and "
                f"{self.total_steps!r})"
            )
        if self.epochs is None and self.total_steps is None:
            self.epochs = 1
        for name in ("epochs", "total_steps"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.grad_clip is not None:
            _number("grad_clip", self.grad_clip, 0.0, strict=True)


@dataclass
class LossConfig:
    """Weights of the loss terms, each applied exactly once (``docs/training.md``).

    ``loss = sum_t a_t (l1 * L1(x_t) + ssim * (1 - SSIM(x_t)))`` over the model's iterates ``x_t``,
    ``t = 0 .. T-1``, with ``a = (0, ..., 0, 1)`` for ``iterate_weighting: none`` (last output
    only) and ``a_t = 10^(-1 + t / (T - 1)) / sum_u 10^(-1 + u / (T - 1))`` for ``logspace``
    (``torch.logspace(-1, 0, T)`` normalised to sum 1; ``a = (1,)`` when ``T = 1``).

    Attributes:
        l1: weight of the mean absolute error.
        ssim: weight of ``1 - SSIM`` (fastMRI's 7x7 SSIM, data range = the volume's max).
        iterate_weighting: "none" or "logspace".
    """

    l1: float = 1.0
    ssim: float = 0.0
    iterate_weighting: str = "none"

    def __post_init__(self) -> None:
        _number("l1", self.l1)
        _number("ssim", self.ssim)
        if self.l1 == 0 and self.ssim == 0:
            raise ConfigError("l1, ssim: expected at least one positive loss weight, got 0 and 0")
        if self.iterate_weighting not in ITERATE_WEIGHTINGS:
            raise ConfigError(
                f"iterate_weighting: expected one of {', '.join(ITERATE_WEIGHTINGS)}, "
                f"got {self.iterate_weighting!r}"
            )


@dataclass
class SegmentationConfig:
    """The segmentation task's inputs, labels, augmentation and loss weights.

    ``loss = dice * DiceLoss + ce * CrossEntropy`` on the logits (MONAI's ``DiceCELoss``; each
    weight applied once): softmax and cross-entropy over ``num_classes`` channels, Dice over the
    foreground classes; or, for a one-channel model, sigmoid, binary cross-entropy and the
    foreground's Dice (:mod:`kscan.pipelines.train_segmentation`).

    Attributes:
        image_key: the HDF5 dataset ``(slices, h, w)`` (real) the network sees; "target" is the
            challenge's target (``reconstruction_rss`` / ``reconstruction_esc``).
        num_classes: label classes of the data, background included; ``None``: 6 for kscan
            synthetic data (``kscan.pipelines.anatomy.TISSUE_CLASSES``), else the largest label
            + 1 found in the data. A multi-class model's ``num_classes`` must equal it.
        foreground: one-channel (binary) models only: the label ids that count as foreground
            (``None``: every id > 0).
        augment: random flips, rot90, a small affine and intensity scale/shift while training.
        dice: weight of the Dice loss.
        ce: weight of the (binary) cross-entropy.
    """

    image_key: str = "target"
    num_classes: int | None = None
    foreground: tuple[int, ...] | None = None
    augment: bool = True
    dice: float = 1.0
    ce: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.image_key, str) or not self.image_key:
            raise ConfigError(f"image_key: expected an HDF5 dataset name, got {self.image_key!r}")
        if self.num_classes is not None:
            _positive_int("num_classes", self.num_classes, 2)
        if self.foreground is not None:
            if isinstance(self.foreground, str) or not isinstance(self.foreground, list | tuple):
                raise ConfigError(
                    f"foreground: expected a list of label ids, got {self.foreground!r}"
                )
            self.foreground = tuple(self.foreground)
            for label in self.foreground:
                _positive_int("foreground", label)
            top = 255 if self.num_classes is None else self.num_classes - 1
            if not self.foreground or max(self.foreground) > top:
                raise ConfigError(
                    f"foreground: expected label ids in 1..{top}, got {list(self.foreground)}"
                )
        if not isinstance(self.augment, bool):
            raise ConfigError(f"augment: expected true or false, got {self.augment!r}")
        _number("dice", self.dice)
        _number("ce", self.ce)
        if self.dice == 0 and self.ce == 0:
            raise ConfigError("dice, ce: expected at least one positive loss weight, got 0 and 0")

    def check_model(self, model_config: Mapping[str, Any]) -> None:
        """Refuse a segmentation model that does not fit this section (``model_config`` a full
        mapping of a segmentation config: ``in_channels``, ``num_classes``)."""
        if model_config["in_channels"] != 1:
            raise ConfigError(
                f"model_config.in_channels: expected 1 (one MR image), "
                f"got {model_config['in_channels']}"
            )
        classes = model_config["num_classes"]
        if classes > 1 and self.foreground is not None:
            raise ConfigError(
                f"segmentation.foreground: applies to one-channel (binary) models; "
                f"model_config.num_classes is {classes}"
            )
        if classes > 1 and self.num_classes is not None and classes != self.num_classes:
            raise ConfigError(
                f"model_config.num_classes: {classes} disagrees with segmentation.num_classes "
                f"{self.num_classes}; expected equal (or 1 for a binary model)"
            )


@dataclass
class MultitaskConfig:
    """The multitask task's loss weights (``kscan.pipelines.losses_multitask.MultitaskLoss``).

    ``loss = rec_weight L_rec + seg_weight L_seg``: ``L_rec`` is the reconstruction loss of the
    ``loss`` section (``l1``, ``ssim``, ``iterate_weighting``; the weighting also weights the
    segmentations), ``L_seg = dice DiceLoss + ce CrossEntropy`` on the segmentation logits.
    Each weight multiplies its term once.

    Attributes:
        rec_weight: weight of the reconstruction loss.
        seg_weight: weight of the segmentation loss.
        dice: weight of the Dice loss (foreground classes) in ``L_seg``.
        ce: weight of the cross-entropy in ``L_seg``.
    """

    rec_weight: float = 1.0
    seg_weight: float = 1.0
    dice: float = 1.0
    ce: float = 1.0

    def __post_init__(self) -> None:
        for name in ("rec_weight", "seg_weight", "dice", "ce"):
            _number(name, getattr(self, name))
        if self.rec_weight == 0 and self.seg_weight == 0:
            raise ConfigError(
                "rec_weight, seg_weight: expected at least one positive loss weight, got 0 and 0"
            )
        if self.dice == 0 and self.ce == 0:
            raise ConfigError("dice, ce: expected at least one positive loss weight, got 0 and 0")


@dataclass
class TrainConfig:
    """A training run (see the module docstring and ``docs/training.md``).

    Attributes:
        model: the registry name of the network (``kscan.models.registry.names()``).
        task: the model's task; "reconstruction", "segmentation" or "multitask".
        model_config: the network's config as a mapping (``registry.build_config`` checks it).
        data: the data section (required: at least ``data.train``).
        optim, loss: the sections above (``loss``: reconstruction and multitask).
        segmentation: the segmentation task's section (segmentation only).
        multitask: the multitask task's loss weights (multitask only).
        checkpoint_every: write ``step_NNNNNNN.safetensors`` and ``last.safetensors`` every this
            many steps (and always at the end).
        validate_every: validate after every this many epochs (and at the end).
        output_dir: checkpoints, ``log.csv`` and ``metrics.json`` go here.
        seed: seeds model initialisation, the slice order and the training masks.
        device: "cpu", "cuda", "cuda:N" (under torchrun, each process takes ``cuda:LOCAL_RANK``).
        precision: "fp32", or "bf16" for bf16 autocast on CUDA; on a CPU device bf16 is ignored
            with a warning (fp32 is used), so one config runs on both.
    """

    model: str = ""
    task: str = "reconstruction"
    model_config: dict[str, Any] = field(default_factory=dict)
    data: DataConfig | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    multitask: MultitaskConfig = field(default_factory=MultitaskConfig)
    checkpoint_every: int = 1000
    validate_every: int = 1
    output_dir: str = "runs/train"
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task: expected one of {', '.join(TASKS)}, got {self.task!r}")
        spec = registry.spec(self.model)
        if spec.task != self.task:
            raise ConfigError(
                f"model: {self.model!r} is a {spec.task} model, expected a {self.task} model "
                f"({', '.join(registry.names(self.task)) or 'none registered'})"
            )
        if self.data is None:
            raise ConfigError(
                "data.train: expected the folder or file of training volumes, got none"
            )
        if not isinstance(self.model_config, Mapping):
            raise ConfigError(f"model_config: expected a mapping, got {self.model_config!r}")
        # stored in full (defaults filled in), so that resuming compares models, not spellings
        self.model_config = to_mapping(registry.build_config(self.model, self.model_config))
        self._check_task_sections()
        _positive_int("checkpoint_every", self.checkpoint_every)
        _positive_int("validate_every", self.validate_every)
        _positive_int("seed", self.seed, 0)
        if self.seed >= 2**32:
            raise ConfigError(f"seed: expected an integer below 2**32, got {self.seed}")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ConfigError(f"output_dir: expected a folder name, got {self.output_dir!r}")

    def _check_task_sections(self) -> None:
        """Another task's section, set to anything but its defaults, is a mistake."""
        if self.task != "multitask" and self.multitask != MultitaskConfig():
            raise ConfigError(
                f"multitask: applies to task multitask, not {self.task}; remove the section"
            )
        if self.task == "segmentation":
            if self.loss != LossConfig():
                raise ConfigError(
                    "loss: the reconstruction loss; segmentation's weights are "
                    "segmentation.dice and segmentation.ce"
                )
            self.segmentation.check_model(self.model_config)
        elif self.segmentation != SegmentationConfig():
            raise ConfigError(
                f"segmentation: applies to task segmentation, not {self.task}; remove the section"
            )


NEWER_SECTIONS: dict[str, type] = {"segmentation": SegmentationConfig, "multitask": MultitaskConfig}
"""Sections added after checkpoints were written without them (:func:`config_differences`)."""


def load_train_config(path: str | os.PathLike[str]) -> TrainConfig:
    """Read a YAML file into a :class:`TrainConfig`; errors name the file and the dotted key."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such config file")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"{path}: not valid YAML{line}") from None
    try:
        return from_mapping(TrainConfig, values)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def config_differences(
    old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = ""
) -> list[str]:
    """Dotted keys whose values differ between two :func:`kscan.config.to_mapping` outputs,
    leaving out :data:`RUNTIME_KEYS`."""
    changed = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if name in RUNTIME_KEYS:
            continue
        if key not in old and name in NEWER_SECTIONS and b == to_mapping(NEWER_SECTIONS[name]()):
            continue  # a checkpoint older than the section: equal when it holds its defaults
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changed += config_differences(a, b, f"{name}.")
        elif a != b:
            changed.append(name)
    return changed
