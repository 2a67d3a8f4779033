"""End-to-end VarNet: fastMRI's key layout, the cascade formula, NormUnet, centre lines, import."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kscan.errors import ConfigError, FileFormatError, MaskError, ShapeError
from kscan.models.checkpoints import import_fastmri_varnet, infer_varnet_config
from kscan.models.registry import build_model
from kscan.models.varnet import (
    NormUnet,
    VarNet,
    VarNetBlock,
    VarNetConfig,
    VarNetSensitivityModel,
    low_frequency_window,
)
from kscan.physics.fft import ifft2c

KEYS_FILE = Path(__file__).parent / "data" / "fastmri_varnet_keys.txt"
AXES = (-2, -1)
SMALL = VarNetConfig(num_cascades=2, chans=4, pools=2, sens_chans=4, sens_pools=2)


def small_model(seed: int = 0, **changes) -> VarNet:
    torch.manual_seed(seed)
    config = VarNetConfig(**{**SMALL.to_dict(), **changes})
    return VarNet(config).eval()


def crandn(*shape: int, seed: int, dtype=torch.complex64) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def line_mask(batch: int, width: int, seed: int, half: tuple[int, ...] = (3, 4)) -> torch.Tensor:
    """Bool ``(batch, 1, 1, W)``: random lines plus a centre block of ``half[b]`` lines each side."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, 1, 1, width, dtype=torch.bool)
    for b in range(batch):
        mask[b, ..., torch.randperm(width, generator=generator)[: width // 4]] = True
        mask[b, ..., width // 2 - half[b] : width // 2 + half[b]] = True
    return mask


def problem(batch: int = 2, coil: int = 4, h: int = 32, w: int = 32, seed: int = 0):
    mask = line_mask(batch, w, seed)
    return crandn(batch, coil, h, w, seed=seed) * mask, mask


def np_fft(x: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(
        np.fft.fft2(np.fft.ifftshift(x, axes=AXES), axes=AXES, norm="ortho"), axes=AXES
    )


def np_ifft(k: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(
        np.fft.ifft2(np.fft.ifftshift(k, axes=AXES), axes=AXES, norm="ortho"), axes=AXES
    )


# ---------------------------------------------------------------- fastMRI layout and counts


def documented_layout() -> tuple[int, list[tuple[str, tuple[int, ...]]]]:
    """Parameter count and ``(key, shape)`` list of the committed fastMRI leaderboard layout."""
    params, keys = None, []
    for line in KEYS_FILE.read_text().splitlines():
        header = re.match(r"### fastMRI VarNet .*: (\d+) tensors, ([\d,]+) params", line)
        if header:
            params, count = int(header[2].replace(",", "")), int(header[1])
        elif line.strip() and not line.startswith("#"):
            key, shape = line.split("\t")
            keys.append((key, tuple(int(n) for n in re.findall(r"\d+", shape))))
    assert params is not None and len(keys) == count
    return params, keys


def test_leaderboard_keys_shapes_order_and_parameter_count_match_fastmri() -> None:
    params, keys = documented_layout()
    with torch.device("meta"):
        model = VarNet()
    assert model.config == VarNetConfig(12, 18, 4, 8, 4)
    assert [(key, tuple(value.shape)) for key, value in model.state_dict().items()] == keys
    assert sum(p.numel() for p in model.parameters()) == params == 29_936_966
    assert infer_varnet_config(model.state_dict()) == VarNetConfig()


def test_small_model_loads_a_state_dict_with_fastmri_names_strictly() -> None:
    model = small_model()
    names = list(model.state_dict())
    assert names[:2] == [
        "sens_net.norm_unet.unet.down_sample_layers.0.layers.0.weight",
        "sens_net.norm_unet.unet.down_sample_layers.0.layers.4.weight",
    ]
    assert "cascades.1.dc_weight" in names and "cascades.1.model.unet.up_conv.1.1.bias" in names
    state = {key: torch.randn_like(value) for key, value in model.state_dict().items()}
    small_model(seed=1).load_state_dict(state, strict=True)


def test_registry_builds_varnet_from_a_mapping() -> None:
    model = build_model("varnet", SMALL.to_dict())
    assert isinstance(model, VarNet) and model.config == SMALL and model.centered


# ---------------------------------------------------------------- config


def test_config_round_trips_and_rejects_unknown_keys_by_name() -> None:
    config = VarNetConfig(num_cascades=3, chans=5, mask_center=False, centered=False)
    assert VarNetConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="'?cascade'?"):
        VarNetConfig.from_dict({"cascade": 3})


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"num_cascades": 0}, "num_cascades"),
        ({"chans": 2.5}, "chans"),
        ({"pools": True}, "pools"),
        ({"sens_pools": -1}, "sens_pools"),
        ({"mask_center": 1}, "mask_center"),
        ({"centered": "yes"}, "centered"),
    ],
)
def test_config_rejects_bad_values_by_name(changes: dict, name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        VarNetConfig(**changes)


# ---------------------------------------------------------------- one cascade


class Scale(nn.Module):
    """A stand-in regulariser ``x -> c x`` (``c = 0``: no regulariser)."""

    def __init__(self, factor: complex) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.factor * image


def test_block_with_zero_regulariser_is_the_soft_dc_step() -> None:
    k, y = crandn(2, 3, 8, 10, seed=1), crandn(2, 3, 8, 10, seed=2)
    mask = (torch.arange(10) % 3 == 0).float()
    block = VarNetBlock(Scale(0.0))
    assert block.dc_weight.shape == (1,) and block.dc_weight.item() == 1.0
    with torch.no_grad():
        block.dc_weight.fill_(0.3)
    out = block(k, y, mask, crandn(2, 3, 8, 10, seed=3))
    torch.testing.assert_close(out, k - 0.3 * mask * (k - y))
    assert torch.equal(out[..., 1], k[..., 1])  # unsampled lines untouched


def test_block_matches_the_cascade_formula_in_numpy() -> None:
    c128 = torch.complex128
    k, y = crandn(2, 3, 9, 7, seed=1, dtype=c128), crandn(2, 3, 9, 7, seed=2, dtype=c128)
    maps = crandn(2, 3, 9, 7, seed=3, dtype=c128)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.float64)
    block = VarNetBlock(Scale(0.5 - 0.25j)).double()
    with torch.no_grad():
        block.dc_weight.fill_(0.7)
    out = block(k, y, mask, maps).detach().numpy()
    kn, yn, sn, mn = k.numpy(), y.numpy(), maps.numpy(), mask.numpy()
    reduced = (np.conj(sn) * np_ifft(kn)).sum(axis=1, keepdims=True)
    expected = kn - 0.7 * mn * (kn - yn) - np_fft(sn * (0.5 - 0.25j) * reduced)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- NormUnet


@pytest.mark.parametrize(("h", "w"), [(32, 32), (17, 36), (33, 5)])
def test_norm_unet_pads_to_multiples_of_16_and_standardises_each_channel(h: int, w: int) -> None:
    seen = []

    class Record(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x)
            return x

    net = NormUnet(4, 2).double()
    net.unet = Record()
    image = crandn(3, h, w, seed=4, dtype=torch.complex128) * 5 + (2 - 1j)
    out = net(image)
    torch.testing.assert_close(out, image)  # identity U-Net: pad/crop and norm/unnorm invert
    (x,) = seen
    ph, pw = -h % 16, -w % 16
    assert x.shape == (3, 2, h + ph, w + pw)
    inner = x[..., ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w]
    assert x.abs().sum() == pytest.approx(inner.abs().sum())  # zeros outside
    parts = np.stack([image.real.numpy(), image.imag.numpy()], axis=1).reshape(3, 2, -1)
    expected = (parts - parts.mean(-1, keepdims=True)) / parts.std(-1, ddof=1, keepdims=True)
    np.testing.assert_allclose(inner.reshape(3, 2, -1).numpy(), expected, atol=1e-12)


def test_norm_unet_is_equivariant_to_scale_and_shift_of_real_and_imaginary_parts() -> None:
    torch.manual_seed(0)
    net = NormUnet(4, 2).double().eval()
    image = crandn(2, 20, 24, seed=5, dtype=torch.complex128)
    shifted = 3.0 * image + (1.5 - 4j)
    with torch.no_grad():
        torch.testing.assert_close(net(shifted), 3.0 * net(image) + (1.5 - 4j))


def test_norm_unet_keeps_a_constant_image_finite() -> None:
    torch.manual_seed(0)
    out = NormUnet(4, 2).eval()(torch.full((1, 16, 16), 2.0 + 0j))
    assert torch.isfinite(torch.view_as_real(out)).all()


# ---------------------------------------------------------------- centre lines and coil maps


def expected_window(lines: list[int], width: int, n: int | None = None) -> list[int]:
    """fastMRI's rule: symmetric sampled run around W // 2, ``pad = (W - n + 1) // 2``."""
    if n is None:
        c = width // 2
        left = next(i for i in range(c + 1) if i == c or not lines[c - 1 - i])
        right = next(i for i in range(width - c + 1) if i == width - c or not lines[c + i])
        n = max(2 * min(left, right), 1)
    pad = (width - n + 1) // 2
    return [int(pad <= i < pad + n) for i in range(width)]


@pytest.mark.parametrize("width", [16, 17])
def test_low_frequency_window_follows_fastmri_per_sample(width: int) -> None:
    mask = torch.zeros(3, 1, 1, width)
    c = width // 2
    mask[0, ..., c - 3 : c + 2] = 1  # 3 below, 2 from the centre up: n = 4
    mask[1, ..., c - 1 : c + 5] = 1  # 1 below: n = 2
    mask[2, ..., c : c + 1] = 1  # centre only: n = 1
    mask[..., 0] = 1  # outer lines are not part of the centre run
    window = low_frequency_window(mask, 3, width)
    assert window.shape == (3, 1, 1, width) and window.dtype == torch.bool
    for b in range(3):
        expected = expected_window(mask[b, 0, 0].int().tolist(), width)
        assert window[b, 0, 0].int().tolist() == expected
    assert [int(row.sum()) for row in window[:, 0, 0]] == [4, 2, 1]
    given = low_frequency_window(mask, 3, width, num_low_frequencies=5)
    for b in range(3):
        assert given[b, 0, 0].int().tolist() == expected_window([], width, 5)


def test_low_frequency_window_uncentered_broadcast_and_errors() -> None:
    mask = torch.zeros(20)
    mask[6:14] = 1
    centered = low_frequency_window(mask, 2, 20)
    assert centered.shape == (2, 1, 1, 20) and int(centered[0].sum()) == 8
    uncentered = low_frequency_window(torch.fft.ifftshift(mask), 2, 20, centered=False)
    assert torch.equal(uncentered, torch.fft.ifftshift(centered, dim=-1))
    full = low_frequency_window(torch.ones(20), 1, 20)
    assert int(full.sum()) == 20  # a run reaching the edges is counted (fastMRI: 1 line)
    mask[10] = 0
    with pytest.raises(MaskError, match="centre line 10"):
        low_frequency_window(mask, 1, 20)
    with pytest.raises(ShapeError, match="num_low_frequencies"):
        low_frequency_window(mask, 1, 20, num_low_frequencies=21)


def test_sensitivity_maps_use_only_the_centre_lines_and_have_unit_rss() -> None:
    torch.manual_seed(0)
    net = VarNetSensitivityModel(4, 2).eval()
    kspace, mask = problem(batch=2, coil=3, h=24, w=20, seed=7)
    window = low_frequency_window(mask, 2, 20)
    with torch.no_grad():
        maps = net(kspace, mask)
        outside = kspace + crandn(*kspace.shape, seed=8) * mask * ~window
        assert torch.equal(net(outside, mask), maps)
        net.mask_center = False
        assert not torch.allclose(net(outside, mask), maps)
    power = maps.abs().square().sum(dim=1)
    torch.testing.assert_close(power, torch.ones_like(power))


# ---------------------------------------------------------------- the network


@pytest.mark.parametrize(("h", "w"), [(32, 32), (32, 36)])
def test_output_shape_dtype_iterates_and_image(h: int, w: int) -> None:
    model = small_model()
    kspace, mask = problem(h=h, w=w)
    with torch.no_grad():
        out = model(kspace, mask)
        iterates = model(kspace, mask, return_iterates=True)
        image = model.image(out)
    assert out.shape == kspace.shape and out.dtype == torch.complex64
    assert torch.isfinite(torch.view_as_real(out)).all()
    assert len(iterates) == 2 and torch.equal(iterates[-1], out)
    assert not torch.allclose(iterates[0], iterates[1])
    assert image.shape == (2, h, w) and image.dtype == torch.float32
    torch.testing.assert_close(image, ifft2c(out).abs().square().sum(dim=1).sqrt())


def test_num_low_frequencies_and_real_mask_are_accepted() -> None:
    model = small_model()
    kspace, mask = problem()
    with torch.no_grad():
        found = model(kspace, mask)
        torch.testing.assert_close(model(kspace, mask.float()), found)
        assert torch.equal(model(kspace, mask, num_low_frequencies=0), found)
        assert not torch.allclose(model(kspace, mask, num_low_frequencies=2), found)


def test_batch_of_two_equals_two_single_runs() -> None:
    model = small_model()
    kspace, mask = problem(w=36)
    with torch.no_grad():
        both = model(kspace, mask)
        for b in range(2):
            torch.testing.assert_close(model(kspace[b : b + 1], mask[b : b + 1]), both[b : b + 1])


def test_gradients_reach_every_parameter() -> None:
    model = small_model().train()
    kspace, mask = problem(w=36)
    model.image(model(kspace, mask)).sum().backward()
    for name, parameter in model.named_parameters():
        if name == "cascades.0.dc_weight":  # k_0 = y, so the first step has k - y = 0
            assert parameter.grad is not None and parameter.grad.item() == 0
            continue
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_bad_inputs_are_named() -> None:
    model = small_model()
    kspace, mask = problem()
    with pytest.raises(ShapeError, match="masked_kspace"):
        model(kspace.abs(), mask)
    with pytest.raises(ShapeError, match="masked_kspace"):
        model(kspace[0], mask)
    with pytest.raises(ShapeError, match="mask"):
        model(kspace, mask.to(torch.complex64))
    with pytest.raises(ShapeError, match="mask"):
        model(kspace, mask[..., :20])


# ---------------------------------------------------------------- checkpoint import


def reconstruct(model: VarNet) -> torch.Tensor:
    kspace, mask = problem(w=36, seed=3)
    with torch.no_grad():
        return model.image(model(kspace, mask))


@pytest.mark.parametrize("layout", ["state_dict", "module", "lightning", "lightning_state"])
def test_import_round_trip_reproduces_outputs(layout: str, tmp_path: Path) -> None:
    model = small_model(seed=2)
    state = model.state_dict()
    if layout == "module":
        state = {"module." + key: value for key, value in state.items()}
    elif layout == "lightning":
        state = {
            "epoch": 49,
            "global_step": 1000,
            "state_dict": {
                "loss.w": torch.ones(1, 1, 7, 7) / 49,
                **{"varnet." + key: value for key, value in state.items()},
            },
            "hyper_parameters": {"num_cascades": 2, "lr": 0.0003},
        }
    elif layout == "lightning_state":  # LightningModule.state_dict() saved on its own
        state = {"loss.w": torch.ones(1), **{"varnet." + key: v for key, v in state.items()}}
    path = tmp_path / "varnet.pt"
    torch.save(state, path)
    loaded, report = import_fastmri_varnet(path)
    assert report.config == SMALL and loaded.config == SMALL and not loaded.training
    assert report.sensitivity_filters == (4, 2)
    assert report.stripped_prefix == (layout != "state_dict")
    if layout == "lightning":
        assert report.ignored_entries == ("epoch", "global_step", "hyper_parameters", "loss.w")
    if layout == "lightning_state":
        assert report.ignored_entries == ("loss.w",)
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert torch.equal(reconstruct(loaded), reconstruct(model))


def test_import_names_keys_that_do_not_fit(tmp_path: Path) -> None:
    state = small_model().state_dict()
    state["cascades.1.model.unet.conv.layers.0.weight"] = torch.zeros(3, 3, 3, 3)
    del state["cascades.0.dc_weight"]
    state["cascades.0.extra"] = torch.zeros(1)
    path = tmp_path / "wrong.pt"
    torch.save(state, path)
    with pytest.raises(ConfigError) as info:
        import_fastmri_varnet(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for fragment in (
        "1 missing keys ['cascades.0.dc_weight']",
        "1 unexpected keys ['cascades.0.extra']",
        "cascades.1.model.unet.conv.layers.0.weight has shape (3, 3, 3, 3)",
    ):
        assert fragment in message
    del state["cascades.1.model.unet.conv.layers.0.weight"]
    torch.save(state, path)
    model, report = import_fastmri_varnet(path, strict=False)
    assert report.missing_keys == [
        "state_dict.cascades.0.dc_weight",
        "state_dict.cascades.1.model.unet.conv.layers.0.weight",
    ]
    assert report.unexpected_keys == ["state_dict.cascades.0.extra"]


def test_import_rejects_files_without_a_varnet(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"layer.weight": torch.zeros(2)}, path)
    with pytest.raises(FileFormatError, match="cascades"):
        import_fastmri_varnet(path)
    torch.save(torch.zeros(2), path)
    with pytest.raises(FileFormatError, match="Lightning"):
        import_fastmri_varnet(path)
    with pytest.raises(FileFormatError, match="no such checkpoint"):
        import_fastmri_varnet(tmp_path / "absent.pt")
