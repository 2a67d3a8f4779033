"""Import of DIRECT RecurrentVarNet and fastMRI VarNet checkpoints.

Both are read with ``torch.load(weights_only=True)``, which never runs code from the file, and
the architecture is inferred from the keys and shapes of the state dicts.

**DIRECT RecurrentVarNet** (:func:`import_direct`).

A DIRECT checkpoint is a ``torch.save`` of a dict holding the state dict of the network under
``model`` and of the sensitivity U-Net under ``sensitivity_model`` (plus optimiser state and
counters, which are ignored); keys may carry the ``module.`` prefix of ``DataParallel``.

The architecture is inferred from the keys and shapes of ``model``:

- ``num_steps``: the number of ``block_list.<i>`` blocks (or the ``num_steps`` argument when the
  blocks share parameters, i.e. there is one block);
- ``recurrent_hidden_channels``: output channels of ``reset_gates.0``; ``recurrent_num_layers``:
  the number of reset gates;
- ``normalized``: the ``.regularizer.convgru.`` infix of :class:`NormConvGRU`;
- ``learned_initializer``, ``initializer_channels``: the ``initializer.conv_blocks.<i>`` convolutions;
  ``initializer_multiscale``: how many of the last channel counts sum to the input channels of
  ``initializer.out_blocks.0``.

What the state dict does not hold must be given: the FFT convention (``centered``), the
initializer's dilations and input. The U-Net's depth and width come from ``sensitivity_model``.

**fastMRI VarNet** (:func:`import_fastmri_varnet`). Either the state dict itself, as fastMRI
publishes its models, or a PyTorch Lightning checkpoint whose ``state_dict`` holds the network
under the ``varnet.`` prefix (the rest, e.g. the SSIM loss's ``loss.w``, the optimiser state and
the hyper-parameters, is ignored; a bare ``state_dict`` with that prefix is read the same way). ``num_cascades`` is the number of ``cascades.<i>`` blocks;
``chans``/``pools`` and ``sens_chans``/``sens_pools`` are the width and depth of the U-Nets of
cascade 0 and of ``sens_net``. ``mask_center`` and the FFT convention are not in the state dict
and must be given (fastMRI: both True).
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from kscan.errors import ConfigError, FileFormatError, KscanError
from kscan.models.recurrentvarnet import RecurrentVarNet, RecurrentVarNetConfig
from kscan.models.sensitivity import SensitivityModel
from kscan.models.varnet import VarNet, VarNetConfig

StateDict = dict[str, torch.Tensor]
_PREFIX = "module."
_LIGHTNING_PREFIX = "varnet."
_SHOWN = 5


@dataclass
class ImportReport:
    """What :func:`import_direct` or :func:`import_fastmri_varnet` found in a checkpoint.

    Attributes:
        config: the inferred configuration of the network.
        sensitivity_filters: ``(num_filters, num_pool_layers)`` of the sensitivity U-Net, None
            without one.
        stripped_prefix: whether the keys carried a prefix that was removed (``module.`` of
            ``DataParallel``, or ``varnet.`` of a Lightning checkpoint).
        ignored_entries: what holds no weights of the network: DIRECT's top-level entries other
            than ``model`` and ``sensitivity_model``; a Lightning checkpoint's entries other than
            ``state_dict`` and its ``state_dict`` keys outside ``varnet.``.
        missing_keys: keys the models expect and the file lacks (only with ``strict=False``).
        unexpected_keys: keys the file holds and the models do not (only with ``strict=False``).
    """

    config: RecurrentVarNetConfig | VarNetConfig
    sensitivity_filters: tuple[int, int] | None
    stripped_prefix: bool
    ignored_entries: tuple[str, ...]
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)


def import_direct(
    path: str | os.PathLike[str],
    centered: bool = True,
    num_steps: int | None = None,
    initializer_dilations: tuple[int, ...] = (1, 1, 2, 4),
    initializer_initialization: str = "sense",
    strict: bool = True,
) -> tuple[RecurrentVarNet, SensitivityModel | None, ImportReport]:
    """Load a DIRECT RecurrentVarNet checkpoint into kscan's models.

    Args:
        path: the checkpoint file (``torch.save`` of a dict with ``model`` and optionally
            ``sensitivity_model`` state dicts).
        centered: FFT convention the network was trained with (fastMRI: True, Calgary-Campinas:
            False); a state dict cannot tell.
        num_steps: iterations ``T``; needed only when the blocks share parameters (one block).
        initializer_dilations: dilations of the initializer's convolutions (DIRECT's default).
        initializer_initialization: the initializer's input, "sense", "zero_filled" or "input_image".
        strict: raise when keys are missing or unexpected; otherwise load what matches and list
            the rest in the report.

    Returns:
        ``(model, sensitivity_model or None, report)``, in evaluation mode, float32.

    Raises:
        FileFormatError: the file is missing, not a torch file, not a dict of state dicts, or its
            keys or shapes do not fit a RecurrentVarNet; the message names the file.
        ConfigError: an argument contradicts the checkpoint (e.g. ``num_steps``).
    """
    checkpoint = _load(path)
    states, stripped = {}, False
    for name in ("model", "sensitivity_model"):
        if name in checkpoint:
            states[name], had_prefix = _strip_prefix(_state_dict(checkpoint[name], path, name))
            stripped = stripped or had_prefix
    if "model" not in states:
        raise FileFormatError(
            f"{path}: expected a DIRECT checkpoint with a 'model' entry, "
            f"found entries {sorted(map(str, checkpoint))[:_SHOWN]}"
        )
    config = infer_config(
        states["model"],
        path,
        centered=centered,
        num_steps=num_steps,
        initializer_dilations=initializer_dilations,
        initializer_initialization=initializer_initialization,
    )
    model = RecurrentVarNet(config)
    report = ImportReport(
        config=config,
        sensitivity_filters=None,
        stripped_prefix=stripped,
        ignored_entries=tuple(sorted(str(k) for k in checkpoint if k not in states)),
    )
    _load_into(model, states["model"], path, "model", strict, report)
    sensitivity = None
    if "sensitivity_model" in states:
        report.sensitivity_filters = _infer_unet(
            states["sensitivity_model"], path, "sensitivity_model"
        )
        sensitivity = SensitivityModel(*report.sensitivity_filters)
        _load_into(
            sensitivity.unet, states["sensitivity_model"], path, "sensitivity_model", strict, report
        )
        sensitivity.eval()
    return model.eval(), sensitivity, report


def infer_config(
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str] = "state dict",
    *,
    centered: bool = True,
    num_steps: int | None = None,
    initializer_dilations: tuple[int, ...] = (1, 1, 2, 4),
    initializer_initialization: str = "sense",
) -> RecurrentVarNetConfig:
    """The :class:`RecurrentVarNetConfig` of a DIRECT ``model`` state dict (prefix stripped).

    See the module docstring for what is read from where; ``path`` names the source in errors.
    """
    blocks = _indices(state, r"block_list\.(\d+)\.")
    if not blocks:
        raise FileFormatError(
            f"{path}: expected RecurrentVarNet keys 'block_list.<i>.*' in 'model', "
            f"found {sorted(state)[:_SHOWN]}"
        )
    normalized = any(".regularizer.convgru." in key for key in state)
    gates = "block_list.0.regularizer." + ("convgru." if normalized else "") + "reset_gates"
    layers = _indices(state, re.escape(gates) + r"\.(\d+)\.")
    hidden_key = f"{gates}.0.0.weight"
    if not layers or hidden_key not in state:
        raise FileFormatError(f"{path}: expected the key {hidden_key!r} in 'model', it is missing")
    steps = _num_steps(len(blocks), num_steps, path)
    initializer: dict[str, object] = {"learned_initializer": False}
    conv_indices = _indices(state, r"initializer\.conv_blocks\.(\d+)\.")
    if conv_indices:
        channels = tuple(
            _shape(state, f"initializer.conv_blocks.{i}.1.weight", path)[0] for i in conv_indices
        )
        out_in = _shape(state, "initializer.out_blocks.0.0.weight", path)[1]
        multiscale = next(
            (m for m in range(1, len(channels) + 1) if sum(channels[-m:]) == out_in), None
        )
        if multiscale is None:
            raise FileFormatError(
                f"{path}: 'initializer.out_blocks.0.0.weight' has {out_in} input channels; "
                f"expected a sum of the last initializer channel counts {channels}"
            )
        initializer = {
            "learned_initializer": True,
            "initializer_channels": channels,
            "initializer_dilations": tuple(initializer_dilations),
            "initializer_multiscale": multiscale,
            "initializer_initialization": initializer_initialization,
        }
    return RecurrentVarNetConfig(
        num_steps=steps,
        recurrent_hidden_channels=_shape(state, hidden_key, path)[0],
        recurrent_num_layers=len(layers),
        no_parameter_sharing=len(blocks) > 1 or steps == 1,
        normalized=normalized,
        centered=centered,
        **initializer,
    )


def import_fastmri_varnet(
    path: str | os.PathLike[str],
    mask_center: bool = True,
    centered: bool = True,
    strict: bool = True,
) -> tuple[VarNet, ImportReport]:
    """Load a fastMRI VarNet checkpoint (a state dict, or a Lightning checkpoint) into :class:`VarNet`.

    Args:
        path: a ``torch.save`` of ``VarNet.state_dict()`` (fastMRI's published models), or a
            Lightning checkpoint with the network under ``state_dict`` / ``varnet.``.
        mask_center: whether the coil maps are estimated from the centre lines (fastMRI: True).
        centered: FFT convention the network was trained with (fastMRI: True).
        strict: raise when keys are missing or unexpected; otherwise load what matches and list
            the rest in the report.

    Returns:
        ``(model, report)``, the model in evaluation mode, float32.

    Raises:
        FileFormatError: the file is missing, not a torch file, or holds no VarNet keys.
        ConfigError: the state dict does not fit the VarNet inferred from it (keys missing or
            unexpected, or shapes that differ between cascades); the message names the keys.
    """
    checkpoint = _load(path, "a state dict or a Lightning checkpoint with 'state_dict'")
    ignored: list[str] = []
    if isinstance(checkpoint.get("state_dict"), Mapping):
        ignored = sorted(str(key) for key in checkpoint if key != "state_dict")
        checkpoint = checkpoint["state_dict"]
    state = _state_dict(checkpoint, path, "state_dict")
    stripped = any(key.startswith(_LIGHTNING_PREFIX) for key in state)
    if stripped:  # a LightningModule's state: the network is its ``varnet`` child
        ignored += sorted(key for key in state if not key.startswith(_LIGHTNING_PREFIX))
        state = {key: value for key, value in state.items() if key.startswith(_LIGHTNING_PREFIX)}
        state = _strip_prefix(state, _LIGHTNING_PREFIX)[0]
    else:
        state, stripped = _strip_prefix(state)
    config = infer_varnet_config(state, path, mask_center=mask_center, centered=centered)
    model = VarNet(config)
    report = ImportReport(
        config=config,
        sensitivity_filters=(config.sens_chans, config.sens_pools),
        stripped_prefix=stripped,
        ignored_entries=tuple(ignored),
    )
    _load_into(model, state, path, "state_dict", strict, report, error=ConfigError)
    return model.eval(), report


def infer_varnet_config(
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str] = "state dict",
    *,
    mask_center: bool = True,
    centered: bool = True,
) -> VarNetConfig:
    """The :class:`VarNetConfig` of a fastMRI ``VarNet`` state dict (prefix stripped).

    See the module docstring for what is read from where; ``path`` names the source in errors.
    """
    cascades = _indices(state, r"cascades\.(\d+)\.")
    if not cascades:
        raise FileFormatError(
            f"{path}: expected fastMRI VarNet keys 'cascades.<i>.*', found {sorted(state)[:_SHOWN]}"
        )
    chans, pools = _infer_unet(state, path, "state_dict", "cascades.0.model.unet.")
    sens_chans, sens_pools = _infer_unet(state, path, "state_dict", "sens_net.norm_unet.unet.")
    return VarNetConfig(
        num_cascades=cascades[-1] + 1,
        chans=chans,
        pools=pools,
        sens_chans=sens_chans,
        sens_pools=sens_pools,
        mask_center=mask_center,
        centered=centered,
    )


def _load(
    path: str | os.PathLike[str],
    expected: str = "a dict with 'model' and 'sensitivity_model' state dicts",
) -> Mapping[str, object]:
    """``torch.load(path, weights_only=True)`` with every failure as a one-line FileFormatError."""
    if not os.path.isfile(path):
        raise FileFormatError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        RuntimeError,
        EOFError,
        ValueError,
        OSError,
    ) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileFormatError(
            f"{path}: not a loadable torch checkpoint (weights only): {first_line}"
        ) from err
    if not isinstance(checkpoint, Mapping):
        raise FileFormatError(f"{path}: expected {expected}, found {type(checkpoint).__name__}")
    return checkpoint


def _state_dict(value: object, path: str | os.PathLike[str], name: str) -> StateDict:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    ):
        raise FileFormatError(
            f"{path}: entry {name!r} is not a state dict (names -> tensors), "
            f"found {type(value).__name__}"
        )
    return dict(value)


def _strip_prefix(state: StateDict, prefix: str = _PREFIX) -> tuple[StateDict, bool]:
    """Drop ``prefix`` from every key when all keys carry it."""
    if state and all(key.startswith(prefix) for key in state):
        return {key[len(prefix) :]: value for key, value in state.items()}, True
    return state, False


def _indices(state: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` at the start of the keys."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in state if (m := regex.match(key))})


def _shape(state: Mapping[str, torch.Tensor], key: str, path: str | os.PathLike[str]) -> torch.Size:
    if key not in state:
        raise FileFormatError(f"{path}: expected the key {key!r}, it is missing")
    return state[key].shape


def _num_steps(blocks: int, num_steps: int | None, path: str | os.PathLike[str]) -> int:
    if num_steps is None or num_steps == blocks:
        return blocks
    if blocks == 1:
        return num_steps
    raise ConfigError(
        f"num_steps: {path} holds {blocks} unshared blocks, so num_steps must be {blocks}, "
        f"got {num_steps}"
    )


def _infer_unet(
    state: Mapping[str, torch.Tensor], path: str | os.PathLike[str], name: str, prefix: str = ""
) -> tuple[int, int]:
    """``(num_filters, num_pool_layers)`` of the ``UNet2d`` whose keys in ``state`` start with ``prefix``."""
    levels = _indices(state, re.escape(prefix) + r"down_sample_layers\.(\d+)\.")
    if not levels:
        raise FileFormatError(
            f"{path}: expected U-Net keys '{prefix}down_sample_layers.<i>.*' in '{name}', "
            f"found {sorted(state)[:_SHOWN]}"
        )
    filters = _shape(state, f"{prefix}down_sample_layers.0.layers.0.weight", path)[0]
    return filters, len(levels)


def state_dict_mismatch(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> str | None:
    """What keeps ``state`` from loading strictly where ``expected`` is wanted, or None.

    Names the missing and unexpected keys (the first few of each, with their counts) and the
    first tensor whose shape differs, in one line.
    """
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    shapes = [
        f"{key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
        for key, value in state.items()
        if key in expected and value.shape != expected[key].shape
    ]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys {missing[:_SHOWN]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys {unexpected[:_SHOWN]}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches ({shapes[0]})")
    return ", ".join(parts)


def _load_into(
    module: nn.Module,
    state: StateDict,
    path: str | os.PathLike[str],
    name: str,
    strict: bool,
    report: ImportReport,
    error: type[KscanError] = FileFormatError,
) -> None:
    """Load ``state`` into ``module``; raise ``error`` naming missing/unexpected keys and shapes."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if strict:
        problem = state_dict_mismatch(expected, state)
    else:  # only the shapes of the keys both have
        shared = {key: value for key, value in state.items() if key in expected}
        problem = state_dict_mismatch({key: expected[key] for key in shared}, shared)
    if problem:
        raise error(f"{path}: '{name}' does not fit the inferred architecture: {problem}")
    module.load_state_dict(state, strict=False)
    report.missing_keys += [f"{name}.{key}" for key in missing]
    report.unexpected_keys += [f"{name}.{key}" for key in unexpected]
