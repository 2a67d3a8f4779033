"""Recurrent Variational Network (Yiasemis et al., CVPR 2022), laid out as DIRECT lays it out.

With the measured, masked k-space ``y`` ``(batch, coil, H, W)``, the sampling mask ``M`` and the
coil maps ``S``, reduce ``R(x) = sum_c conj(S_c) x_c`` and expand ``E(x)_c = S_c x``, the
network iterates on k-space from ``k_0 = y``::

    for t in 0 .. T-1:
        x_t         = R(F^-1 k_t)                               image (batch, H, W)
        w_t, h_t+1  = ConvGRU_t(x_t, h_t)                       on 2 real channels (real, imag)
        k_t+1       = k_t - alpha_t M (k_t - y) + F(E(w_t))

``alpha_t`` is one learned scalar per step, initialised to 1. The regulariser term is *added*.
The output is the k-space ``k_T``; the image is the root sum of squares of ``F^-1 k_T``.

The hidden state ``h_t`` holds one ``(batch, hidden, H, W)`` map per GRU layer. It starts at zero,
or, with ``learned_initializer``, at the output of :class:`RecurrentStateInitializer` applied to a
2-channel k-space map: ``F(R(F^-1 y))`` ("sense"), ``sum_c y_c`` ("zero_filled") or ``F(x_0)`` for a
given image ``x_0`` ("input_image"), as DIRECT feeds it.

Module and parameter names (``initializer.conv_blocks.0.1.weight``,
``block_list.3.regularizer.reset_gates.1.0.bias``, ...) and their registration order are DIRECT's,
so a DIRECT ``model`` state dict loads with ``strict=True``. Complex tensors are native; the
2-channel real layout exists only at the convolutions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from kscan.config import from_mapping
from kscan.errors import ConfigError, ShapeError
from kscan.physics import coils
from kscan.physics.checks import require_complex, require_ndim
from kscan.physics.consistency import soft_dc
from kscan.physics.fft import complex_to_real, fft2c, ifft2c, real_to_complex

INITIALIZATIONS = ("sense", "zero_filled", "input_image")
State = list[torch.Tensor]


@dataclass
class RecurrentVarNetConfig:
    """Hyper-parameters of :class:`RecurrentVarNet`; the defaults are DIRECT's class defaults.

    Attributes:
        num_steps: number of iterations ``T``.
        recurrent_hidden_channels: channels of each Conv-GRU layer.
        recurrent_num_layers: Conv-GRU layers ``n_l``.
        no_parameter_sharing: one Conv-GRU and ``alpha_t`` per step (True) or one for all steps.
        learned_initializer: start the hidden state from :class:`RecurrentStateInitializer`.
        initializer_initialization: the initializer's input: "sense", "zero_filled" or "input_image".
        initializer_channels: output channels of the initializer's 3x3 convolutions.
        initializer_dilations: their dilations (same length as ``initializer_channels``).
        initializer_multiscale: how many of the last feature maps are concatenated (1 = last only).
        normalized: group-normalise the Conv-GRU input (2 groups) and de-normalise its output.
        centered: centered orthonormal FFT (fastMRI) or uncentered (Calgary-Campinas).
    """

    num_steps: int = 15
    recurrent_hidden_channels: int = 64
    recurrent_num_layers: int = 4
    no_parameter_sharing: bool = True
    learned_initializer: bool = False
    initializer_initialization: str = "sense"
    initializer_channels: tuple[int, ...] = (32, 32, 64, 64)
    initializer_dilations: tuple[int, ...] = (1, 1, 2, 4)
    initializer_multiscale: int = 1
    normalized: bool = False
    centered: bool = True

    def __post_init__(self) -> None:
        self.initializer_channels = tuple(self.initializer_channels)
        self.initializer_dilations = tuple(self.initializer_dilations)
        for name in ("num_steps", "recurrent_hidden_channels", "recurrent_num_layers"):
            _require_positive(name, getattr(self, name))
        for name in ("no_parameter_sharing", "learned_initializer", "normalized", "centered"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        if self.initializer_initialization not in INITIALIZATIONS:
            raise ConfigError(
                f"initializer_initialization: expected one of {', '.join(INITIALIZATIONS)}, "
                f"got {self.initializer_initialization!r}"
            )
        for value in self.initializer_channels + self.initializer_dilations:
            _require_positive("initializer_channels/initializer_dilations", value)
        depth = len(self.initializer_channels)
        if depth == 0 or len(self.initializer_dilations) != depth:
            raise ConfigError(
                f"initializer_dilations: expected {depth} values, one per initializer channel "
                f"count (at least one), got {len(self.initializer_dilations)}"
            )
        if not 1 <= self.initializer_multiscale <= depth:
            raise ConfigError(
                f"initializer_multiscale: expected an integer in [1, {depth}], "
                f"got {self.initializer_multiscale!r}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RecurrentVarNetConfig:
        """Build a config from a mapping (parsed YAML); unknown keys raise :class:`ConfigError`."""
        return from_mapping(cls, values)


def _require_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: expected a positive integer, got {value!r}")


def _padded_conv(in_channels: int, out_channels: int, kernel: int, dilation: int) -> nn.Sequential:
    """``kernel x kernel`` convolution after replication padding that keeps the size (keys .0, .1)."""
    pad = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.ReplicationPad2d(pad),
        nn.Conv2d(in_channels, out_channels, kernel, dilation=dilation),
    )


def _to_channels(image: torch.Tensor) -> torch.Tensor:
    """Complex ``(batch, H, W)`` -> real ``(batch, 2, H, W)`` with channels (real, imaginary)."""
    return complex_to_real(image).permute(0, 3, 1, 2)


def _from_channels(x: torch.Tensor) -> torch.Tensor:
    """Real ``(batch, 2, H, W)`` -> complex ``(batch, H, W)``; the inverse of :func:`_to_channels`."""
    return real_to_complex(x.permute(0, 2, 3, 1))


class ConvGRU(nn.Module):
    """Multi-layer 2D convolutional GRU with a convolutional read-out (DIRECT's ``Conv2dGRU``).

    Input convolutions (replication padding, size-preserving): layer 0 is 5x5, layer 1 is 3x3 with
    dilation 2, further layers 3x3; the read-out is 3x3 ``hidden -> in_channels`` (dilation 2 when
    it is the second convolution, i.e. with one layer, as in DIRECT). For each layer ``l``, with
    ``x = relu(conv_l(input))`` and state ``h_l``::

        u = sigmoid(W_u [x, h_l]),  r = sigmoid(W_r [x, h_l])
        d = tanh(W_o [x, r * h_l])
        h_l' = (1 - u) h_l + u d,   next input = relu(h_l')

    The gates are 1x1 convolutions ``2 hidden -> hidden`` with orthogonal weights, reset bias -1
    and update/output bias 0.
    """

    def __init__(self, in_channels: int, hidden_channels: int, num_layers: int) -> None:
        super().__init__()
        self.hidden_channels = hidden_channels
        self.num_layers = num_layers
        self.reset_gates = nn.ModuleList()
        self.update_gates = nn.ModuleList()
        self.out_gates = nn.ModuleList()
        for gates, bias in (
            (self.reset_gates, -1.0),
            (self.update_gates, 0.0),
            (self.out_gates, 0.0),
        ):
            for _ in range(num_layers):
                conv = nn.Conv2d(2 * hidden_channels, hidden_channels, 1)
                nn.init.orthogonal_(conv.weight)
                nn.init.constant_(conv.bias, bias)
                gates.append(nn.Sequential(conv))
        channels = [in_channels] + [hidden_channels] * num_layers + [in_channels]
        self.conv_blocks = nn.ModuleList(
            _padded_conv(channels[i], channels[i + 1], 5 if i == 0 else 3, 2 if i == 1 else 1)
            for i in range(num_layers + 1)
        )

    def forward(self, x: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """``(batch, in, H, W)`` and per-layer states ``(batch, hidden, H, W)`` (None: zeros)."""
        if state is None:
            zero = x.new_zeros(x.shape[0], self.hidden_channels, *x.shape[2:])
            state = [zero] * self.num_layers
        new_state = []
        for layer, h in enumerate(state):
            x = F.relu(self.conv_blocks[layer](x))
            stacked = torch.cat([x, h], dim=1)
            update = torch.sigmoid(self.update_gates[layer](stacked))
            reset = torch.sigmoid(self.reset_gates[layer](stacked))
            candidate = torch.tanh(self.out_gates[layer](torch.cat([x, h * reset], dim=1)))
            h = h * (1 - update) + candidate * update
            new_state.append(h)
            x = F.relu(h)
        return self.conv_blocks[-1](x), new_state


class NormConvGRU(nn.Module):
    """:class:`ConvGRU` on group-normalised input (DIRECT's ``NormConv2dGRU``; keys ``convgru.*``).

    With ``groups`` groups of channels, each group ``g`` of the input is standardised,
    ``(x_g - mean_g) / std_g`` (unbiased std over the group's channels and pixels), and the
    output's group ``g`` is mapped back, ``out_g std_g + mean_g``. The result is equivariant to a
    positive scale and a shift of each group.
    """

    def __init__(
        self, in_channels: int, hidden_channels: int, num_layers: int, groups: int = 2
    ) -> None:
        super().__init__()
        self.convgru = ConvGRU(in_channels, hidden_channels, num_layers)
        self.groups = groups

    def forward(self, x: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """Same signature as :meth:`ConvGRU.forward`."""
        grouped = x.reshape(x.shape[0], self.groups, -1)
        mean = grouped.mean(dim=-1, keepdim=True)
        std = grouped.std(dim=-1, keepdim=True)
        out, state = self.convgru(((grouped - mean) / std).reshape(x.shape), state)
        out = out.reshape(out.shape[0], self.groups, -1) * std + mean
        return out.reshape(x.shape), state


class RecurrentStateInitializer(nn.Module):
    """Learned initial hidden state (DIRECT's ``RecurrentInit``).

    3x3 convolutions with replication padding, ``channels[i]`` outputs and ``dilations[i]``
    dilation, each followed by relu; the last ``multiscale`` feature maps are concatenated; then
    one 1x1 convolution + relu per GRU layer gives that layer's state ``(batch, hidden, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        num_layers: int,
        channels: Sequence[int],
        dilations: Sequence[int],
        multiscale: int,
    ) -> None:
        super().__init__()
        widths = [in_channels, *channels]
        self.conv_blocks = nn.ModuleList(
            _padded_conv(widths[i], widths[i + 1], 3, dilation)
            for i, dilation in enumerate(dilations)
        )
        self.out_blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(sum(channels[-multiscale:]), hidden_channels, 1))
            for _ in range(num_layers)
        )
        self.multiscale = multiscale

    def forward(self, x: torch.Tensor) -> State:
        """``(batch, in, H, W)`` -> one ``(batch, hidden, H, W)`` state per GRU layer."""
        features = []
        for block in self.conv_blocks:
            x = F.relu(block(x))
            features.append(x)
        x = torch.cat(features[-self.multiscale :], dim=1)
        return [F.relu(block(x)) for block in self.out_blocks]


class RecurrentVarNetBlock(nn.Module):
    """One step ``k' = k - alpha M (k - y) + F(E(w))``, ``w, h' = GRU(R(F^-1 k), h)``."""

    def __init__(self, hidden_channels: int, num_layers: int, normalized: bool) -> None:
        super().__init__()
        self.learning_rate = nn.Parameter(torch.ones(1))
        gru = NormConvGRU if normalized else ConvGRU
        self.regularizer = gru(2, hidden_channels, num_layers)

    def forward(
        self,
        kspace: torch.Tensor,
        masked_kspace: torch.Tensor,
        mask: torch.Tensor,
        sensitivity_map: torch.Tensor,
        state: State | None,
        centered: bool,
    ) -> tuple[torch.Tensor, State]:
        """k-space ``(batch, coil, H, W)`` and state -> next k-space and state."""
        image = coils.reduce(ifft2c(kspace, centered), sensitivity_map)
        update, state = self.regularizer(_to_channels(image), state)
        regularizer_term = fft2c(coils.expand(_from_channels(update), sensitivity_map), centered)
        return soft_dc(kspace, masked_kspace, mask, self.learning_rate) + regularizer_term, state


class RecurrentVarNet(nn.Module):
    """Recurrent Variational Network on native complex k-space (see the module docstring)."""

    def __init__(self, config: RecurrentVarNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else RecurrentVarNetConfig()
        self.initializer: RecurrentStateInitializer | None = None
        if config.learned_initializer:
            self.initializer = RecurrentStateInitializer(
                2,
                config.recurrent_hidden_channels,
                config.recurrent_num_layers,
                config.initializer_channels,
                config.initializer_dilations,
                config.initializer_multiscale,
            )
        blocks = config.num_steps if config.no_parameter_sharing else 1
        self.block_list = nn.ModuleList(
            RecurrentVarNetBlock(
                config.recurrent_hidden_channels, config.recurrent_num_layers, config.normalized
            )
            for _ in range(blocks)
        )

    def forward(
        self,
        masked_kspace: torch.Tensor,
        mask: torch.Tensor,
        sensitivity_map: torch.Tensor,
        initial_image: torch.Tensor | None = None,
        return_iterates: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Reconstructed k-space ``k_T`` (or every iterate ``[k_1, ..., k_T]``).

        Args:
            masked_kspace: measured k-space ``y`` ``(batch, coil, H, W)``, complex, zero off the mask.
            mask: 0/1 (or boolean) sampling mask broadcastable to ``(batch, coil, H, W)``; it
                multiplies ``k - y`` (DIRECT zeroes ``k - y`` where the mask is 0 instead: the
                same for 0/1 masks).
            sensitivity_map: coil maps ``S`` ``(batch, coil, H, W)``, complex.
            initial_image: ``(batch, H, W)`` complex, only for ``initializer_initialization="input_image"``.
            return_iterates: return the list of the k-spaces after each step (for losses over
                iterates) instead of the last one.

        Returns:
            k-space ``(batch, coil, H, W)``, complex, or a list of ``num_steps`` of them.
        """
        check_inputs(masked_kspace, mask, sensitivity_map)
        state = self.initial_state(masked_kspace, sensitivity_map, initial_image)
        iterates, _ = self.iterate(
            masked_kspace, masked_kspace, mask, sensitivity_map, state, range(self.config.num_steps)
        )
        return iterates if return_iterates else iterates[-1]

    def initial_state(
        self,
        masked_kspace: torch.Tensor,
        sensitivity_map: torch.Tensor,
        initial_image: torch.Tensor | None = None,
    ) -> State | None:
        """The hidden state before step 0: the initializer's output, or None (zeros)."""
        if self.initializer is None:
            return None
        return self.initializer(
            _to_channels(self._initializer_input(masked_kspace, sensitivity_map, initial_image))
        )

    def iterate(
        self,
        kspace: torch.Tensor,
        masked_kspace: torch.Tensor,
        mask: torch.Tensor,
        sensitivity_map: torch.Tensor,
        state: State | None,
        steps: range,
    ) -> tuple[list[torch.Tensor], State | None]:
        """Run ``steps`` (indices into ``0 .. num_steps - 1``) from ``kspace`` and ``state``.

        The hook for models that act between steps (the multitask models add to the state):
        :meth:`forward` is ``iterate(y, y, mask, S, initial_state(y, S), range(num_steps))``.
        Returns the k-space after each step and the state after the last (``state`` when
        ``steps`` is empty).
        """
        iterates = []
        for step in steps:
            block = self.block_list[step if self.config.no_parameter_sharing else 0]
            kspace, state = block(
                kspace, masked_kspace, mask, sensitivity_map, state, self.config.centered
            )
            iterates.append(kspace)
        return iterates, state

    def rss_image(self, kspace: torch.Tensor) -> torch.Tensor:
        """Root sum of squares over coils of ``F^-1 kspace``: ``(batch, coil, H, W)`` -> ``(batch, H, W)``."""
        return coils.rss(ifft2c(kspace, self.config.centered))

    def _initializer_input(
        self, masked_kspace: torch.Tensor, maps: torch.Tensor, initial_image: torch.Tensor | None
    ) -> torch.Tensor:
        """The initializer's complex k-space map ``(batch, H, W)``, as DIRECT computes it."""
        mode, centered = self.config.initializer_initialization, self.config.centered
        if mode == "sense":
            return fft2c(coils.reduce(ifft2c(masked_kspace, centered), maps), centered)
        if mode == "zero_filled":
            return masked_kspace.sum(dim=-3)  # = sum_c F(F^-1 y_c)
        if initial_image is None:
            raise ConfigError(
                "initial_image: required when initializer_initialization is 'input_image', got None"
            )
        require_complex(initial_image, "initial_image")
        if initial_image.shape != masked_kspace.shape[:1] + masked_kspace.shape[2:]:
            raise ShapeError(
                f"initial_image: expected shape (batch, H, W) = "
                f"{tuple(masked_kspace.shape[:1] + masked_kspace.shape[2:])}, "
                f"got {tuple(initial_image.shape)}"
            )
        return fft2c(initial_image, centered)


def check_inputs(
    kspace: torch.Tensor, mask: torch.Tensor, maps: torch.Tensor | None = None
) -> None:
    """Shapes and dtypes of the forward arguments (maps when given), with messages naming them."""
    require_complex(kspace, "masked_kspace")
    require_ndim(kspace, "masked_kspace", 4, "(batch, coil, H, W)")
    if maps is not None:
        require_complex(maps, "sensitivity_map")
        if maps.shape != kspace.shape:
            raise ShapeError(
                f"sensitivity_map: expected the shape of masked_kspace (batch, coil, H, W) = "
                f"{tuple(kspace.shape)}, got {tuple(maps.shape)}"
            )
    if mask.is_complex():
        raise ShapeError(f"mask: expected a real or boolean tensor, got {mask.dtype}")
    try:
        broadcast = torch.broadcast_shapes(mask.shape, kspace.shape)
    except RuntimeError:
        broadcast = None
    if broadcast != kspace.shape:
        raise ShapeError(
            f"mask: expected a shape broadcastable to masked_kspace {tuple(kspace.shape)}, "
            f"got {tuple(mask.shape)}"
        )
