"""RecurrentVarNet: DIRECT's state-dict layout, the step formula against numpy, the Conv-GRU."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from kscan.errors import ConfigError, ShapeError
from kscan.models.recurrentvarnet import (
    ConvGRU,
    NormConvGRU,
    RecurrentVarNet,
    RecurrentVarNetBlock,
    RecurrentVarNetConfig,
)

KEYS_FILE = Path(__file__).parent / "data" / "direct_recurrentvarnet_keys.txt"
C128 = torch.complex128
AXES = (-2, -1)


def small_config(**changes) -> RecurrentVarNetConfig:
    base = dict(
        num_steps=2,
        recurrent_hidden_channels=6,
        recurrent_num_layers=2,
        learned_initializer=True,
        initializer_channels=(4, 4, 6),
        initializer_dilations=(1, 2, 1),
        initializer_multiscale=2,
    )
    return RecurrentVarNetConfig(**{**base, **changes})


def small_model(seed: int = 0, **changes) -> RecurrentVarNet:
    torch.manual_seed(seed)
    return RecurrentVarNet(small_config(**changes)).double()


def crandn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, dtype=C128, generator=torch.Generator().manual_seed(seed))


def problem(batch: int = 1, coil: int = 3, h: int = 9, w: int = 7, seed: int = 0):
    """Masked k-space y, a (W,) line mask with some lines missing, coil maps."""
    mask = torch.zeros(w, dtype=torch.float64)
    mask[::2] = 1
    kspace = crandn(batch, coil, h, w, seed=seed) * mask
    return kspace, mask, crandn(batch, coil, h, w, seed=seed + 1)


def np_fft(x: np.ndarray, centered: bool) -> np.ndarray:
    if not centered:
        return np.fft.fft2(x, axes=AXES, norm="ortho")
    return np.fft.fftshift(
        np.fft.fft2(np.fft.ifftshift(x, axes=AXES), axes=AXES, norm="ortho"), axes=AXES
    )


def np_ifft(k: np.ndarray, centered: bool) -> np.ndarray:
    if not centered:
        return np.fft.ifft2(k, axes=AXES, norm="ortho")
    return np.fft.fftshift(
        np.fft.ifft2(np.fft.ifftshift(k, axes=AXES), axes=AXES, norm="ortho"), axes=AXES
    )


# ---------------------------------------------------------------- DIRECT layout and counts


def documented_layouts() -> dict[str, tuple[RecurrentVarNetConfig, int, list[tuple[str, tuple]]]]:
    """The RecurrentVarNet sections of the documented DIRECT key list: config, params, keys."""
    sections: dict[str, tuple[RecurrentVarNetConfig, int, list[tuple[str, tuple]]]] = {}
    current: list[tuple[str, tuple]] | None = None
    for line in KEYS_FILE.read_text().splitlines():
        header = re.match(r"### RecurrentVarNet (.*): (\d+) tensors, ([\d,]+) params", line)
        if header:
            title, params = header[1], int(header[3].replace(",", ""))
            current = []
            sections[title] = (config_from_title(title), params, current)
        elif line.startswith("###"):
            current = None
        elif line.strip() and current is not None:
            key, shape = line.split("\t")
            current.append((key, tuple(int(n) for n in re.findall(r"\d+", shape))))
    return sections


def config_from_title(title: str) -> RecurrentVarNetConfig:
    """``... (T=12,hid=128,nl=4,ms=3)`` -> a config with DIRECT's initializer; class defaults else."""
    fields = dict(re.findall(r"(T|hid|nl|ms)=(\d+)", title))
    if not fields:
        assert "learned_initializer=False" in title, title
        return RecurrentVarNetConfig()
    return RecurrentVarNetConfig(
        num_steps=int(fields["T"]),
        recurrent_hidden_channels=int(fields["hid"]),
        recurrent_num_layers=int(fields["nl"]),
        learned_initializer=True,
        initializer_multiscale=int(fields["ms"]),
    )


LAYOUTS = documented_layouts()


def test_documented_sections_are_all_found() -> None:
    assert len(LAYOUTS) == 5
    for _, _, keys in LAYOUTS.values():
        assert len(keys) > 200


@pytest.mark.parametrize("title", sorted(LAYOUTS))
def test_state_dict_keys_shapes_and_order_match_direct(title: str) -> None:
    config, params, keys = LAYOUTS[title]
    model = RecurrentVarNet(config)
    ours = [(key, tuple(value.shape)) for key, value in model.state_dict().items()]
    assert ours == keys
    assert sum(p.numel() for p in model.parameters()) == params
    model.load_state_dict({key: torch.zeros(shape) for key, shape in keys}, strict=True)


@pytest.mark.parametrize(
    ("config", "published"),
    [
        (RecurrentVarNetConfig(), "3.21"),
        (
            RecurrentVarNetConfig(
                num_steps=12,
                recurrent_hidden_channels=128,
                recurrent_num_layers=4,
                learned_initializer=True,
                initializer_multiscale=3,
            ),
            "10.30",
        ),
    ],
)
def test_parameter_counts_match_published(config: RecurrentVarNetConfig, published: str) -> None:
    count = sum(p.numel() for p in RecurrentVarNet(config).parameters())
    assert f"{count / 1e6:.2f}" == published


def test_normalized_variant_gains_convgru_infix_and_sharing_keeps_one_block() -> None:
    model = RecurrentVarNet(small_config(normalized=True, no_parameter_sharing=False, num_steps=3))
    keys = list(model.state_dict())
    assert len(model.block_list) == 1
    assert "block_list.0.regularizer.convgru.reset_gates.0.0.weight" in keys
    assert "block_list.0.regularizer.convgru.conv_blocks.2.1.bias" in keys
    assert not any(k.startswith("block_list.1.") for k in keys)


# ---------------------------------------------------------------- config


def test_config_rejects_unknown_key_by_name() -> None:
    with pytest.raises(ConfigError, match="num_stepz"):
        RecurrentVarNetConfig.from_dict({"num_steps": 3, "num_stepz": 4})


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"initializer_initialization": "zeros"}, "initializer_initialization"),
        ({"num_steps": 0}, "num_steps"),
        ({"recurrent_hidden_channels": 2.5}, "recurrent_hidden_channels"),
        ({"initializer_dilations": [1, 2]}, "initializer_dilations"),
        ({"initializer_multiscale": 5}, "initializer_multiscale"),
        ({"centered": "yes"}, "centered"),
    ],
)
def test_config_rejects_bad_values_by_name(changes: dict, name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        RecurrentVarNetConfig.from_dict(changes)


def test_config_round_trips_through_a_dict_with_lists() -> None:
    config = small_config(centered=False)
    values = {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }
    assert RecurrentVarNetConfig.from_dict(values) == config


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("centered", [True, False])
def test_block_matches_the_step_formula_in_numpy(centered: bool) -> None:
    """k' = k - alpha M (k - y) + F(S w), w = GRU(sum_c conj(S_c) F^-1 k_c), all outside the model."""
    torch.manual_seed(0)
    block = RecurrentVarNetBlock(hidden_channels=5, num_layers=2, normalized=False).double()
    with torch.no_grad():
        block.learning_rate.fill_(0.37)
    y, mask, maps = problem(batch=2, seed=3)
    k = crandn(*y.shape, seed=9)
    out, state = block(k, y, mask, maps, None, centered)

    kn, yn, mn, sn = k.numpy(), y.numpy(), mask.numpy(), maps.numpy()
    image = (np.conj(sn) * np_ifft(kn, centered)).sum(axis=1)
    channels = torch.from_numpy(np.stack([image.real, image.imag], axis=1))
    w, _ = block.regularizer(channels, None)
    w = w.detach().numpy()
    expected = kn - 0.37 * mn * (kn - yn) + np_fft(sn * (w[:, 0] + 1j * w[:, 1])[:, None], centered)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=0, atol=1e-12)
    assert len(state) == 2 and state[0].shape == (2, 5, 9, 7)


def test_zero_regulariser_output_leaves_the_gradient_step() -> None:
    """With the read-out convolution zeroed, w_t = 0: k' = k - alpha M (k - y); from k_0 = y, k_T = y."""
    model = small_model(num_steps=3)
    y, mask, maps = problem(seed=5)
    with torch.no_grad():
        for block in model.block_list:
            block.regularizer.conv_blocks[-1][1].weight.zero_()
            block.regularizer.conv_blocks[-1][1].bias.zero_()
    torch.testing.assert_close(model(y, mask, maps), y, rtol=0, atol=1e-13)

    block = model.block_list[1]
    with torch.no_grad():
        block.learning_rate.fill_(0.6)
    k = crandn(*y.shape, seed=8)
    out, _ = block(k, y, mask, maps, None, True)
    expected = k.numpy() - 0.6 * mask.numpy() * (k.numpy() - y.numpy())
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize(("h", "w"), [(9, 7), (11, 16)])
def test_output_shape_dtype_and_rss_image(h: int, w: int) -> None:
    model = small_model()
    y, mask, maps = problem(batch=2, h=h, w=w)
    out = model(y, mask, maps)
    assert out.shape == y.shape and out.dtype == C128
    assert torch.isfinite(torch.view_as_real(out)).all()
    image = model.rss_image(out).detach().numpy()
    expected = np.sqrt((np.abs(np_ifft(out.detach().numpy(), True)) ** 2).sum(axis=1))
    np.testing.assert_allclose(image, expected, rtol=1e-12, atol=0)


def test_float32_complex64_runs() -> None:
    torch.manual_seed(0)
    model = RecurrentVarNet(small_config())
    y, mask, maps = problem()
    out = model(y.to(torch.complex64), mask.float(), maps.to(torch.complex64))
    assert out.dtype == torch.complex64


@pytest.mark.parametrize("normalized", [False, True])
def test_batch_of_two_equals_two_single_runs(normalized: bool) -> None:
    model = small_model(normalized=normalized)
    y, mask, maps = problem(batch=2, seed=4)
    both = model(y, mask, maps)
    singles = torch.cat([model(y[i : i + 1], mask, maps[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(both, singles, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {
            "normalized": True,
            "no_parameter_sharing": False,
            "initializer_initialization": "zero_filled",
        },
    ],
)
def test_gradients_reach_every_parameter(changes: dict) -> None:
    """Every parameter gets a gradient, except alpha_0 without sharing: k_0 = y, so M (k_0 - y) = 0."""
    model = small_model(**changes)
    y, mask, maps = problem(seed=6)
    model.rss_image(model(y, mask, maps)).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        if name == "block_list.0.learning_rate" and model.config.no_parameter_sharing:
            assert param.grad.item() == 0.0
        else:
            assert param.grad.abs().sum() > 0, name


def test_parameter_sharing_reuses_one_block_for_every_step() -> None:
    shared = small_model(num_steps=3, no_parameter_sharing=False)
    one_step = small_model(num_steps=1)
    y, mask, maps = problem(seed=2)
    with torch.no_grad():
        one_step.load_state_dict(shared.state_dict())
        three = shared(y, mask, maps)
        shared.config = dataclasses.replace(shared.config, num_steps=1)
        torch.testing.assert_close(shared(y, mask, maps), one_step(y, mask, maps))
    assert (three - one_step(y, mask, maps)).abs().max() > 1e-6


def test_iterate_in_two_parts_with_the_state_passed_on_equals_forward() -> None:
    model = small_model(num_steps=3)
    y, mask, maps = problem(seed=4)
    with torch.no_grad():
        state = model.initial_state(y, maps)
        first, state = model.iterate(y, y, mask, maps, state, range(0, 1))
        rest, _ = model.iterate(first[-1], y, mask, maps, state, range(1, 3))
        whole = model(y, mask, maps, return_iterates=True)
        torch.testing.assert_close(first + rest, whole, rtol=0, atol=0)
        restarted, _ = model.iterate(first[-1], y, mask, maps, None, range(1, 3))
    assert (restarted[-1] - whole[-1]).abs().max() > 1e-6  # the state matters


@pytest.mark.parametrize("mode", ["sense", "zero_filled", "input_image"])
def test_initializer_is_fed_as_direct_feeds_it(mode: str) -> None:
    """sense: F(sum_c conj(S_c) F^-1 y_c); zero_filled: sum_c y_c; input_image: F(x_0); (real, imag)."""
    model = small_model(initializer_initialization=mode, centered=False)
    y, mask, maps = problem(batch=2, seed=7)
    x0 = crandn(2, 9, 7, seed=11)
    seen = []
    model.initializer.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    model(y, mask, maps, initial_image=x0 if mode == "input_image" else None)

    yn, sn = y.numpy(), maps.numpy()
    expected = {
        "sense": lambda: np_fft((np.conj(sn) * np_ifft(yn, False)).sum(axis=1), False),
        "zero_filled": lambda: yn.sum(axis=1),
        "input_image": lambda: np_fft(x0.numpy(), False),
    }[mode]()
    fed = seen[0].numpy()
    np.testing.assert_allclose(fed, np.stack([expected.real, expected.imag], axis=1), atol=1e-12)


def test_input_image_initialization_needs_the_image() -> None:
    model = small_model(initializer_initialization="input_image")
    with pytest.raises(ConfigError, match="initial_image"):
        model(*problem())


def test_bad_inputs_are_named() -> None:
    model = small_model()
    y, mask, maps = problem()
    with pytest.raises(ShapeError, match="sensitivity_map"):
        model(y, mask, maps[:, :2])
    with pytest.raises(ShapeError, match="mask"):
        model(y, torch.ones(8, dtype=torch.float64), maps)
    with pytest.raises(ShapeError, match="masked_kspace"):
        model(y.real, mask, maps)


# ---------------------------------------------------------------- Conv-GRU


def test_gru_gate_initialisation_and_step_size() -> None:
    gru = ConvGRU(2, hidden_channels=6, num_layers=3)
    for gates, bias in ((gru.reset_gates, -1.0), (gru.update_gates, 0.0), (gru.out_gates, 0.0)):
        for gate in gates:
            weight = gate[0].weight.detach().reshape(6, 12).double()
            torch.testing.assert_close(
                weight @ weight.T, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-6
            )
            assert (gate[0].bias == bias).all()
    assert RecurrentVarNetBlock(6, 3, False).learning_rate.item() == 1.0


def test_gru_replication_padding_keeps_constant_images_constant() -> None:
    """Zero padding would bend a constant input at the borders; replication padding does not."""
    torch.manual_seed(1)
    gru = ConvGRU(2, hidden_channels=4, num_layers=3).double()
    x = torch.tensor([0.7, -1.3], dtype=torch.float64).reshape(1, 2, 1, 1).expand(1, 2, 10, 9)
    out, state = gru(x, None)
    for tensor in (out, *state):
        flat = tensor.flatten(2)
        torch.testing.assert_close(flat, flat[..., :1].expand_as(flat), rtol=0, atol=1e-14)


def test_gru_layer_recurrence_against_the_gate_formulas() -> None:
    """One-layer GRU with a given state, recomputed from its own convolutions by the GRU equations."""
    torch.manual_seed(2)
    gru = ConvGRU(2, hidden_channels=3, num_layers=1).double()
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64)
    h = torch.randn(1, 3, 6, 5, dtype=torch.float64)
    out, (h_new,) = gru(x, [h])
    with torch.no_grad():
        a = torch.relu(gru.conv_blocks[0](x))
        u = torch.sigmoid(gru.update_gates[0](torch.cat([a, h], 1)))
        r = torch.sigmoid(gru.reset_gates[0](torch.cat([a, h], 1)))
        d = torch.tanh(gru.out_gates[0](torch.cat([a, r * h], 1)))
        expected_h = (1 - u) * h + u * d
        torch.testing.assert_close(h_new, expected_h)
        torch.testing.assert_close(out, gru.conv_blocks[1](torch.relu(expected_h)))
    assert gru.conv_blocks[1][1].dilation == (2, 2)  # DIRECT: the second convolution is dilated


def test_normalized_gru_is_equivariant_to_scale_and_shift_per_channel() -> None:
    torch.manual_seed(3)
    gru = NormConvGRU(2, hidden_channels=4, num_layers=2).double()
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64)
    scale = torch.tensor([3.0, 0.5], dtype=torch.float64).reshape(1, 2, 1, 1)
    shift = torch.tensor([-2.0, 5.0], dtype=torch.float64).reshape(1, 2, 1, 1)
    out, state = gru(x, None)
    out_affine, state_affine = gru(scale * x + shift, None)
    torch.testing.assert_close(out_affine, scale * out + shift)
    torch.testing.assert_close(state_affine[1], state[1])
    grouped = x.reshape(2, 2, -1)
    normalised = (grouped - grouped.mean(-1, keepdim=True)) / grouped.std(-1, keepdim=True)
    inner, _ = gru.convgru(normalised.reshape(x.shape), None)
    torch.testing.assert_close(
        out,
        (
            inner.reshape(2, 2, -1) * grouped.std(-1, keepdim=True) + grouped.mean(-1, keepdim=True)
        ).reshape(x.shape),
    )
