"""2D U-Net laid out as DIRECT's ``UnetModel2d`` (Ronneberger et al., MICCAI 2015; fastMRI style).

With ``f = num_filters`` and ``P = num_pool_layers``::

    encoder   level i = 0 .. P-1:  ConvBlock(f 2^(i-1) -> f 2^i)  (input channels at i = 0),
                                   kept for the skip connection, then 2x2 average pooling
    bottom:                        ConvBlock(f 2^(P-1) -> f 2^P)
    decoder   level i = P-1 .. 0:  TransposeConvBlock(f 2^(i+1) -> f 2^i), concatenated with the
                                   skip (upsampled first, skip second), ConvBlock(f 2^(i+1) -> f 2^i);
                                   the last level ends with a 1x1 convolution f -> out_channels.

``ConvBlock``: conv3x3 (no bias) -> InstanceNorm -> LeakyReLU(0.2) -> Dropout2d, twice.
``TransposeConvBlock``: 2x2 transposed convolution with stride 2 (no bias) -> InstanceNorm ->
LeakyReLU(0.2). Instance norms have no affine parameters. Average pooling floors odd sizes; where
the upsampled map is then one pixel short of the skip, it is reflect-padded by one pixel at the
bottom/right, as DIRECT does. Any ``H, W >= 2^P`` works as long as the bottom level keeps two
pixels (``H`` or ``W >= 2^(P+1)``) for its instance norms.

Module names (``down_sample_layers.0.layers.0.weight``, ``up_conv.3.1.bias``, ...) are DIRECT's, so
a DIRECT ``sensitivity_model`` state dict loads with ``strict=True``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kscan.errors import ShapeError
from kscan.physics.checks import require_ndim


class _Block(nn.Module):
    """A ``layers`` Sequential, DIRECT's naming for its U-Net blocks."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, in, H, W)`` -> ``(batch, out, H', W')``."""
        return self.layers(x)


def conv_block(in_channels: int, out_channels: int, dropout: float) -> _Block:
    """Two ``conv3x3 -> InstanceNorm -> LeakyReLU(0.2) -> Dropout2d`` (keys ``layers.0``, ``layers.4``)."""
    return _Block(
        *(
            module
            for channels in (in_channels, out_channels)
            for module in (
                nn.Conv2d(channels, out_channels, 3, padding=1, bias=False),
                nn.InstanceNorm2d(out_channels),
                nn.LeakyReLU(0.2),
                nn.Dropout2d(dropout),
            )
        )
    )


def transpose_conv_block(in_channels: int, out_channels: int) -> _Block:
    """2x upsampling: ``ConvTranspose2d(2, stride 2) -> InstanceNorm -> LeakyReLU(0.2)``."""
    return _Block(
        nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, bias=False),
        nn.InstanceNorm2d(out_channels),
        nn.LeakyReLU(0.2),
    )


def _decoder_layers(
    out_channels: int, num_filters: int, num_pool_layers: int, dropout_probability: float
) -> tuple[nn.ModuleList, nn.ModuleList]:
    """The decoder's ``up_conv`` and ``up_transpose_conv`` lists, deepest level first."""
    widths = [num_filters * 2**i for i in range(num_pool_layers + 1)]
    levels = range(num_pool_layers - 1, -1, -1)
    up_conv: list[nn.Module] = [
        conv_block(widths[i + 1], widths[i], dropout_probability) for i in levels
    ]
    up_conv[-1] = nn.Sequential(up_conv[-1], nn.Conv2d(num_filters, out_channels, 1))
    up_transpose_conv = [transpose_conv_block(widths[i + 1], widths[i]) for i in levels]
    return nn.ModuleList(up_conv), nn.ModuleList(up_transpose_conv)


def _decode(
    features: list[torch.Tensor], up_transpose_conv: nn.ModuleList, up_conv: nn.ModuleList
) -> torch.Tensor:
    """The decoder on :meth:`UNet2d.encode`'s features (skips of levels 0 .. P-1, then the bottom)."""
    *skips, x = features
    for upsample, block in zip(up_transpose_conv, up_conv, strict=True):
        skip = skips.pop()
        x = upsample(x)
        short_h, short_w = (s - u for s, u in zip(skip.shape[-2:], x.shape[-2:], strict=True))
        if short_h or short_w:
            x = F.pad(x, (0, short_w, 0, short_h), mode="reflect")
        x = block(torch.cat([x, skip], dim=1))
    return x


class UNet2d(nn.Module):
    """DIRECT's ``UnetModel2d`` (see the module docstring): ``(batch, in, H, W) -> (batch, out, H, W)``.

    ``forward(x) = decode(encode(x))``; the two halves are public so that another decoder
    (:class:`UNetDecoder2d`) can share the encoder's features.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_filters: int,
        num_pool_layers: int,
        dropout_probability: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_pool_layers = num_pool_layers
        widths = [num_filters * 2**i for i in range(num_pool_layers + 1)]
        self.down_sample_layers = nn.ModuleList(
            conv_block(in_channels if i == 0 else widths[i - 1], widths[i], dropout_probability)
            for i in range(num_pool_layers)
        )
        self.conv = conv_block(widths[-2], widths[-1], dropout_probability)
        self.up_conv, self.up_transpose_conv = _decoder_layers(
            out_channels, num_filters, num_pool_layers, dropout_probability
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, in, H, W)`` real -> ``(batch, out, H, W)`` (sizes: see the module docstring)."""
        return self.decode(self.encode(x))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's features: level ``i``'s output ``(batch, f 2^i, H/2^i, W/2^i)`` for
        ``i = 0 .. P-1`` (the skips), then the bottom ``(batch, f 2^P, H/2^P, W/2^P)``."""
        require_ndim(x, "x", 4, "(batch, channel, H, W)")
        scale = 2**self.num_pool_layers
        bottom_h, bottom_w = (n // scale for n in x.shape[-2:])
        if bottom_h * bottom_w < 2:
            raise ShapeError(
                f"x: expected H and W >= 2^num_pool_layers = {scale} and one of them >= {2 * scale} "
                f"(instance norm needs 2 pixels at the bottom level), got {tuple(x.shape[-2:])}"
            )
        features = []
        for block in self.down_sample_layers:
            x = block(x)
            features.append(x)
            x = F.avg_pool2d(x, kernel_size=2, stride=2)
        features.append(self.conv(x))
        return features

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`encode`'s features -> ``(batch, out, H, W)``."""
        return _decode(features, self.up_transpose_conv, self.up_conv)


class UNetDecoder2d(nn.Module):
    """A second decoder for a :class:`UNet2d`'s encoder: the same layers as its decoder, with
    ``out_channels`` outputs. ``forward(unet.encode(x))`` -> ``(batch, out_channels, H, W)``."""

    def __init__(
        self,
        out_channels: int,
        num_filters: int,
        num_pool_layers: int,
        dropout_probability: float = 0.0,
    ) -> None:
        super().__init__()
        self.up_conv, self.up_transpose_conv = _decoder_layers(
            out_channels, num_filters, num_pool_layers, dropout_probability
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Features of :meth:`UNet2d.encode` (same ``num_filters``, ``num_pool_layers``) -> output."""
        return _decode(features, self.up_transpose_conv, self.up_conv)
