"""The sensitivity U-Net (DIRECT's key layout, a functional re-derivation) and the map refinement."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from kscan.errors import ShapeError
from kscan.models.sensitivity import SensitivityModel
from kscan.models.unet import UNet2d, UNetDecoder2d
from kscan.physics.coilmaps import acs_maps

KEYS_FILE = Path(__file__).parent / "data" / "direct_recurrentvarnet_keys.txt"


def documented_unet() -> tuple[int, list[tuple[str, tuple[int, ...]]]]:
    """Parameter count and (key, shape) rows of the documented sensitivity_model section."""
    rows: list[tuple[str, tuple[int, ...]]] = []
    params, inside = None, False
    for line in KEYS_FILE.read_text().splitlines():
        header = re.match(r"### sensitivity_model .*: (\d+) tensors, ([\d,]+) params", line)
        if header:
            params, inside = int(header[2].replace(",", "")), True
        elif line.startswith("###"):
            inside = False
        elif inside and line.strip():
            key, shape = line.split("\t")
            rows.append((key, tuple(int(n) for n in re.findall(r"\d+", shape))))
    assert params is not None
    return params, rows


def test_keys_shapes_and_parameter_count_match_direct() -> None:
    params, rows = documented_unet()
    assert params == 484_898 and len(rows) == 24
    unet = UNet2d(2, 2, 8, 4)
    assert {(k, tuple(v.shape)) for k, v in unet.state_dict().items()} == set(rows)
    assert sum(p.numel() for p in unet.parameters()) == params


def reference_unet(unet: UNet2d, x: torch.Tensor) -> torch.Tensor:
    """The U-Net written out with functional ops from the state dict (eval mode: no dropout)."""
    w = unet.state_dict()

    def block(prefix: str, x: torch.Tensor) -> torch.Tensor:
        for conv in ("0", "4"):
            x = F.conv2d(x, w[f"{prefix}.layers.{conv}.weight"], padding=1)
            x = F.leaky_relu(F.instance_norm(x), 0.2)
        return x

    skips = []
    for level in range(4):
        x = block(f"down_sample_layers.{level}", x)
        skips.append(x)
        x = F.avg_pool2d(x, 2)
    x = block("conv", x)
    for level in range(4):
        skip = skips.pop()
        x = F.conv_transpose2d(x, w[f"up_transpose_conv.{level}.layers.0.weight"], stride=2)
        x = F.leaky_relu(F.instance_norm(x), 0.2)
        if x.shape[-1] < skip.shape[-1]:
            x = torch.cat([x, x[..., -2:-1]], dim=-1)  # reflect by one column
        if x.shape[-2] < skip.shape[-2]:
            x = torch.cat([x, x[..., -2:-1, :]], dim=-2)
        x = torch.cat([x, skip], dim=1)
        x = block(f"up_conv.{level}" + (".0" if level == 3 else ""), x)
    return F.conv2d(x, w["up_conv.3.1.weight"], w["up_conv.3.1.bias"])


@pytest.mark.parametrize("size", [(32, 32), (37, 23), (16, 35)])
def test_forward_matches_functional_definition_including_odd_sizes(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    unet = UNet2d(2, 2, 8, 4).double().eval()
    x = torch.randn(2, 2, *size, dtype=torch.float64)
    out = unet(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, reference_unet(unet, x), rtol=1e-10, atol=1e-12)


def test_dropout_acts_only_in_training() -> None:
    torch.manual_seed(0)
    unet = UNet2d(2, 2, 4, 2, dropout_probability=0.5).double()
    x = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    assert not torch.allclose(unet(x), unet(x))
    unet.eval()
    torch.testing.assert_close(unet(x), unet(x))


def test_too_small_input_is_rejected() -> None:
    unet = UNet2d(2, 2, 8, 4)
    for size in [(15, 32), (16, 31)]:
        with pytest.raises(ShapeError, match=r"x: expected H and W >= 2\^num_pool_layers = 16"):
            unet(torch.zeros(1, 2, *size))


def crandn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.complex128, generator=torch.Generator().manual_seed(seed))


def test_refinement_is_direct_per_coil_loop_then_rss_normalised() -> None:
    torch.manual_seed(1)
    model = SensitivityModel(num_filters=4, num_pool_layers=2).double().eval()
    maps = crandn(2, 3, 12, 9, seed=0)
    out = model(maps)
    # DIRECT: the U-Net on each coil's (real, imag) channels, stacked, then divided by the RSS.
    per_coil = torch.stack(
        [
            torch.view_as_complex(
                model.unet(torch.view_as_real(maps[:, c]).permute(0, 3, 1, 2))
                .permute(0, 2, 3, 1)
                .contiguous()
            )
            for c in range(maps.shape[1])
        ],
        dim=1,
    )
    expected = per_coil / per_coil.abs().square().sum(1, keepdim=True).sqrt()
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.abs().square().sum(1), torch.ones(2, 12, 9, dtype=torch.float64))


def test_single_coil_is_only_normalised_and_zero_stays_zero() -> None:
    model = SensitivityModel(num_filters=4, num_pool_layers=2).double().eval()
    maps = crandn(1, 1, 8, 8, seed=2)
    maps[..., :2, :] = 0
    out = model(maps)
    torch.testing.assert_close(out[..., 2:, :], maps[..., 2:, :] / maps[..., 2:, :].abs())
    assert torch.equal(out[..., :2, :], torch.zeros_like(out[..., :2, :]))


def test_refines_acs_maps_of_uncentered_odd_kspace() -> None:
    kspace = crandn(1, 4, 33, 17, seed=3)
    maps = acs_maps(kspace, num_low_frequencies=5, centered=False)
    out = SensitivityModel().double().eval()(maps)
    assert out.shape == maps.shape and bool(torch.isfinite(torch.view_as_real(out)).all())


def test_real_maps_are_rejected() -> None:
    with pytest.raises(ShapeError, match="sensitivity_map"):
        SensitivityModel()(torch.zeros(1, 2, 16, 16))


def test_second_decoder_on_the_shared_encoder_matches_the_unet_decoder() -> None:
    torch.manual_seed(0)
    unet = UNet2d(3, 2, 4, 2).double()
    decoder = UNetDecoder2d(2, 4, 2).double()
    decoder.load_state_dict(
        {k: v for k, v in unet.state_dict().items() if k.startswith("up_")}, strict=True
    )
    x = torch.randn(2, 3, 19, 12, dtype=torch.float64)
    features = unet.encode(x)
    assert [f.shape[1:] for f in features] == [(4, 19, 12), (8, 9, 6), (16, 4, 3)]
    torch.testing.assert_close(decoder(features), unet(x), rtol=0, atol=0)
    assert len(features) == 3  # decoding leaves the feature list intact
