"""VM-UNet: the reference's key layout and parameter counts, SS2D against a per-route definition,
shapes and size rules, scan backends, gradients, the config, and the VMamba pretrained loader."""

from __future__ import annotations

import math
import re
from pathlib import Path

import einops
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kscan.errors import ConfigError, InvalidDataError, ShapeError
from kscan.kernels.scan_reference import selective_scan_reference
from kscan.models.vmunet import (
    SS2D,
    DropPath,
    PatchExpand,
    PatchMerging,
    VMUNet,
    VMUNetConfig,
    load_vmamba_pretrained,
)

KEYS_FILE = Path(__file__).parent / "data" / "vmunet_keys.txt"
TINY = dict(dims=(8, 16, 32, 64), d_state=4)


def reference_keys() -> tuple[dict[str, tuple[int, ...]], dict[str, float]]:
    """The reference's state-dict shapes (3 input channels, 1 class) and its header's counts (M)."""
    lines = KEYS_FILE.read_text().splitlines()
    counts = {}
    for line in lines[:3]:
        name, value = line.split(" params: ")
        counts[name] = float(value.split("M")[0])
    shapes = {}
    for line in lines[3:]:
        key, shape = line.split(" ", 1)
        shapes[key] = tuple(int(n) for n in re.findall(r"\d+", shape))
    return shapes, counts


def meta_model(**changes) -> VMUNet:
    with torch.device("meta"):
        return VMUNet(VMUNetConfig(**changes))


def tiny_model(seed: int = 0, **changes) -> VMUNet:
    torch.manual_seed(seed)
    return VMUNet(VMUNetConfig(**{**TINY, **changes}))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_keys_and_shapes_equal_the_reference():
    shapes, _ = reference_keys()
    model = meta_model(in_channels=3)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes


def test_parameter_counts_equal_the_reference():
    shapes, counts = reference_keys()
    expected = sum(math.prod(shape) for shape in shapes.values())
    model = meta_model(in_channels=3)
    assert n_params(model) == expected == 27_427_561
    assert round(expected / 1e6, 4) == counts["VM-UNet nc=1"]
    assert (
        round(n_params(meta_model(in_channels=3, num_classes=9)) / 1e6, 4) == counts["VM-UNet nc=9"]
    )
    deep = meta_model(in_channels=3, depths=(2, 2, 9, 2), depths_decoder=(2, 9, 2, 2))
    assert round(n_params(deep) / 1e6, 4) == counts["VM-UNet [2,2,9,2]/[2,9,2,2]"]


def test_one_input_channel_changes_only_the_patch_embedding():
    shapes, _ = reference_keys()
    ours = {k: tuple(v.shape) for k, v in meta_model().state_dict().items()}
    assert ours.pop("vmunet.patch_embed.proj.weight") == (96, 1, 4, 4)
    shapes.pop("vmunet.patch_embed.proj.weight")
    assert ours == shapes


def route_maps(height: int, width: int) -> list[torch.Tensor]:
    """VMamba's four sequences as index maps into the row-major pixels, built directly."""
    grid = torch.arange(height * width).view(height, width)
    rows, cols = grid.flatten(), grid.t().flatten()
    return [rows, cols, rows.flip(0), cols.flip(0)]


def ss2d_by_route(module: SS2D, x: torch.Tensor) -> torch.Tensor:
    """SS2D written out one route at a time with ungrouped B, C and the sequential scan."""
    batch, height, width, _ = x.shape
    xz = x @ module.in_proj.weight.t()
    inner = xz.shape[-1] // 2
    u, z = xz[..., :inner], xz[..., inner:]
    u = F.silu(module.conv2d(u.permute(0, 3, 1, 2))).flatten(2)  # (B, D, L)
    n, rank = module.d_state, module.dt_rank
    y = torch.zeros_like(u)
    for k, perm in enumerate(route_maps(height, width)):
        seq = u[..., perm]
        proj = module.x_proj_weight[k] @ seq  # (B, R + 2N, L)
        dt, b, c = proj[:, :rank], proj[:, rank : rank + n], proj[:, rank + n :]
        delta = module.dt_projs_weight[k] @ dt
        rows = slice(k * inner, (k + 1) * inner)
        out = selective_scan_reference(
            seq,
            delta,
            -torch.exp(module.A_logs[rows]),
            b,
            c,
            D=module.Ds[rows],
            delta_bias=module.dt_projs_bias[k],
            delta_softplus=True,
        )
        y[..., perm] += out
    y = y.transpose(1, 2).reshape(batch, height, width, inner)
    y = F.layer_norm(y, (inner,), module.out_norm.weight, module.out_norm.bias) * F.silu(z)
    return y @ module.out_proj.weight.t()


def test_ss2d_equals_a_per_route_definition():
    torch.manual_seed(0)
    module = SS2D(8, d_state=4).double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(module(x), ss2d_by_route(module, x), rtol=1e-10, atol=1e-10)


def test_logits_equal_the_reference_run():
    """Numbers from the reference ``VSSM`` (VM-UNet's ``vmamba.py``, its selective scan replaced by
    kscan's sequential reference scan) at this config, with every tensor drawn in sorted-key order
    from one seeded generator; the same recipe here must give the same logits."""
    config = VMUNetConfig(
        num_classes=2,
        dims=(8, 16, 32, 64),
        depths=(1, 2, 1, 1),
        depths_decoder=(1, 1, 2, 1),
        d_state=4,
    )
    model = VMUNet(config).eval()
    gen = torch.Generator().manual_seed(1234)
    state = sorted(model.vmunet.state_dict().items())
    model.vmunet.load_state_dict({k: 0.3 * torch.randn(v.shape, generator=gen) for k, v in state})
    x = torch.randn(1, 1, 32, 64, generator=gen)
    with torch.no_grad():
        y = model(x)[0]
    points = [(0, 0, 0), (1, 5, 7), (0, 17, 33), (1, 31, 63), (0, 12, 50)]
    expected = [-0.0089246957, 0.28688151, 0.24556892, 0.10603382, 0.24560103]
    torch.testing.assert_close(
        torch.stack([y[p] for p in points]), torch.tensor(expected), rtol=0, atol=1e-5
    )
    assert y.sum().item() == pytest.approx(676.29187, abs=1e-3)


def test_ss2d_initialisation():
    torch.manual_seed(0)
    module = SS2D(32, d_state=6, dt_min=0.002, dt_max=0.05)
    rank, inner = math.ceil(32 / 16), 64
    assert module.x_proj_weight.shape == (4, rank + 12, inner)
    torch.testing.assert_close(
        module.A_logs, torch.log(torch.arange(1.0, 7.0)).expand(4 * inner, 6), rtol=0, atol=0
    )
    assert torch.equal(module.Ds, torch.ones(4 * inner))
    dt = F.softplus(module.dt_projs_bias)
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    assert module.dt_projs_weight.abs().max() <= rank**-0.5
    assert module.x_proj_weight.abs().max() <= inner**-0.5


def test_network_initialisation():
    model = tiny_model(dims=(32, 64, 128, 256))
    for module in model.modules():
        if isinstance(module, nn.Linear):
            w = module.weight
            assert abs(w.std().item() - 0.02) < 0.004 and w.mean().abs() < 0.004
        if isinstance(module, nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
    rates = [b.drop_path.p for layer in model.vmunet.layers for b in layer.blocks]
    rates_up = [b.drop_path.p for layer in model.vmunet.layers_up for b in layer.blocks]
    assert rates == pytest.approx([0.2 * i / 7 for i in range(8)], abs=1e-7)
    assert rates_up == pytest.approx([0.2 * (6 - i) / 6 for i in range(7)], abs=1e-7)


def test_patch_merging_order_and_patch_expand_layout():
    torch.manual_seed(0)
    merge = PatchMerging(3)
    x = torch.randn(2, 4, 6, 3)
    neighbours = einops.rearrange(x, "b (h p1) (w p2) c -> b h w (p2 p1 c)", p1=2, p2=2)
    expected = merge.reduction(merge.norm(neighbours))
    torch.testing.assert_close(merge(x), expected)
    expand = PatchExpand(8, 4)
    y = torch.randn(2, 3, 5, 8)
    expected = einops.rearrange(
        expand.expand(y), "b h w (p1 p2 c) -> b (h p1) (w p2) c", p1=4, p2=4
    )
    torch.testing.assert_close(expand(y), expand.norm(expected))


@pytest.mark.parametrize("classes", [1, 3])
@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_output_shapes(classes, size):
    model = tiny_model(num_classes=classes, depths=(1, 1, 1, 1), depths_decoder=(1, 1, 1, 1)).eval()
    x = torch.randn(2, 1, *size)
    with torch.no_grad():
        logits, out = model.forward_logits(x), model(x)
    assert logits.shape == out.shape == (2, classes, *size)
    expected = torch.sigmoid(logits) if classes == 1 else logits
    torch.testing.assert_close(out, expected)


def test_bad_inputs_raise_shape_errors():
    model = tiny_model(depths=(1, 1, 1, 1), depths_decoder=(1, 1, 1, 1))
    with pytest.raises(ShapeError, match="multiples of 32.*64x80"):
        model(torch.randn(1, 1, 64, 80))
    with pytest.raises(ShapeError, match=r"\(batch, 1, H, W\)"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ShapeError, match=r"\(batch, 1, H, W\)"):
        model(torch.randn(64, 64))
    with pytest.raises(ShapeError, match="floating"):
        model(torch.zeros(1, 1, 64, 64, dtype=torch.long))
    three_stages = VMUNet(VMUNetConfig(dims=(8, 16, 32), depths=(1,) * 3, depths_decoder=(1,) * 3))
    assert three_stages(torch.randn(1, 1, 16, 48)).shape == (1, 1, 16, 48)


@pytest.mark.parametrize(
    "backends",
    [("reference", "torch"), pytest.param(("reference", "triton"), marks=pytest.mark.slow)],
    ids=["torch", "triton"],
)
def test_scan_backends_agree(monkeypatch, backends):
    """Same weights, same outputs on every scan backend (Triton interpreted on CPU, conftest)."""
    if "triton" in backends:
        pytest.importorskip("triton")
    model = tiny_model(num_classes=2).eval()
    x = torch.randn(1, 1, 32, 64)
    outputs = {}
    for backend in backends:
        monkeypatch.setenv("KSCAN_SCAN_BACKEND", backend)
        with torch.no_grad():
            outputs[backend] = model(x)
    torch.testing.assert_close(outputs[backends[1]], outputs["reference"], rtol=1e-5, atol=1e-5)


def test_gradient_reaches_every_parameter():
    model = tiny_model(num_classes=2, drop_path_rate=0.0)  # no branch dropped by chance
    x = torch.randn(2, 1, 32, 64)
    weights = torch.randn(2, 2, 32, 64)
    (model.forward_logits(x) * weights).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_drop_path():
    drop = DropPath(0.5)
    x = torch.ones(400, 3)
    torch.manual_seed(0)
    y = drop(x)
    kept = y[:, 0] != 0
    assert torch.equal(y[kept], torch.full_like(y[kept], 2.0))
    assert 120 < int(kept.sum()) < 280
    assert torch.equal(drop.eval()(x), x)


def test_mixer_hook_builds_every_block():
    calls = []

    def mixer(dim: int) -> nn.Module:
        calls.append(dim)
        return nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim))

    torch.manual_seed(0)
    model = VMUNet(VMUNetConfig(dims=(8, 16, 32, 64)), mixer=mixer)
    assert calls == [8, 8, 16, 16, 32, 32, 64, 64, 64, 64, 32, 32, 16, 16, 8]
    keys = model.state_dict()
    assert "vmunet.layers_up.3.blocks.0.self_attention.0.weight" in keys
    assert not any("x_proj_weight" in key for key in keys)
    assert keys["vmunet.layers.0.blocks.0.self_attention.0.weight"].std() < 0.04  # re-initialised
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 1, 32, 32)


def test_config_from_dict_and_validation():
    values = {"num_classes": 4, "dims": [8, 16], "depths": [1, 2], "depths_decoder": [2, 1]}
    config = VMUNetConfig.from_dict({**values, "dt_rank": 3})
    assert config.dims == (8, 16) and config.size_multiple == 8
    assert VMUNetConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["dims"] == [8, 16]
    with pytest.raises(ConfigError, match="depth_decoder"):
        VMUNetConfig.from_dict({"depth_decoder": [1, 1, 1, 1]})
    bad = {
        "dims": {"dims": (8, 24, 48, 96)},
        "depths": {"depths": (2, 2, 2)},
        "drop_path_rate": {"drop_path_rate": 1.0},
        "dt_min": {"dt_min": 0.5},
        "dt_rank": {"dt_rank": "full"},
        "d_conv": {"d_conv": 4},
        "num_classes": {"num_classes": 0},
    }
    for name, values in bad.items():
        with pytest.raises(ConfigError, match=f"^{name}:"):
            VMUNetConfig(**values)


BLOCK_PARAMS = (
    "ln_1.weight", "ln_1.bias", "self_attention.in_proj.weight", "self_attention.conv2d.weight",
    "self_attention.conv2d.bias", "self_attention.x_proj_weight", "self_attention.dt_projs_weight",
    "self_attention.dt_projs_bias", "self_attention.A_logs", "self_attention.Ds",
    "self_attention.out_norm.weight", "self_attention.out_norm.bias",
    "self_attention.out_proj.weight",
)  # fmt: skip


def vmamba_v0_state_dict(dims, depths, d_state, classes=1000, seed=0):
    """A synthetic ImageNet VMamba v0 state dict (random values).

    Layout of VMamba v0's classifier ``VSSM`` (MzeroMiko/VMamba, classification/models/vmamba/
    vmamba.py of January 2024, whose blocks and stages VM-UNet's ``vmamba.py`` copies):
    ``patch_embed.{proj,norm}``; ``layers.i.blocks.j.`` + :data:`BLOCK_PARAMS`;
    ``layers.i.downsample.{reduction.weight,norm.weight,norm.bias}`` for all but the last stage;
    the head ``norm.{weight,bias}`` and ``head.{weight,bias}``. VMamba-S v0 (VM-UNet's
    pretrained file) has depths (2, 2, 27, 2) and dims (96, 192, 384, 768).
    """
    gen = torch.Generator().manual_seed(seed)
    sd = {}

    def put(key, *shape):
        sd[key] = torch.randn(shape, generator=gen)

    put("patch_embed.proj.weight", dims[0], 3, 4, 4)
    put("patch_embed.proj.bias", dims[0])
    put("patch_embed.norm.weight", dims[0])
    put("patch_embed.norm.bias", dims[0])
    for i, (c, depth) in enumerate(zip(dims, depths, strict=True)):
        d, r = 2 * c, math.ceil(c / 16)
        shapes = {
            "ln_1.weight": (c,), "ln_1.bias": (c,), "self_attention.in_proj.weight": (2 * d, c),
            "self_attention.conv2d.weight": (d, 1, 3, 3), "self_attention.conv2d.bias": (d,),
            "self_attention.x_proj_weight": (4, r + 2 * d_state, d),
            "self_attention.dt_projs_weight": (4, d, r), "self_attention.dt_projs_bias": (4, d),
            "self_attention.A_logs": (4 * d, d_state), "self_attention.Ds": (4 * d,),
            "self_attention.out_norm.weight": (d,), "self_attention.out_norm.bias": (d,),
            "self_attention.out_proj.weight": (c, d),
        }  # fmt: skip
        assert tuple(shapes) == BLOCK_PARAMS
        for j in range(depth):
            for name, shape in shapes.items():
                put(f"layers.{i}.blocks.{j}.{name}", *shape)
        if i < len(dims) - 1:
            put(f"layers.{i}.downsample.reduction.weight", 2 * c, 4 * c)
            put(f"layers.{i}.downsample.norm.weight", 4 * c)
            put(f"layers.{i}.downsample.norm.bias", 4 * c)
    put("norm.weight", dims[-1])
    put("norm.bias", dims[-1])
    put("head.weight", classes, dims[-1])
    put("head.bias", classes)
    return sd


def test_pretrained_loader_mirrors_the_encoder():
    sd = vmamba_v0_state_dict(TINY["dims"], (2, 2, 27, 2), TINY["d_state"])
    model = tiny_model(in_channels=3)
    before = {k: v.clone() for k, v in model.vmunet.state_dict().items()}
    report = load_vmamba_pretrained(model, {"model": sd})
    after = model.vmunet.state_dict()
    expected = {}
    for key in sd:
        if key in after:
            expected[key] = key
    decoder_depths = (2, 2, 2, 1)
    for i in range(4):
        for j in range(decoder_depths[3 - i]):
            for name in BLOCK_PARAMS:
                expected[f"layers_up.{3 - i}.blocks.{j}.{name}"] = f"layers.{i}.blocks.{j}.{name}"
    assert report.loaded == expected
    assert len(expected) == 117 + 91  # the reference's "update" counts for its two passes
    for target, source in expected.items():
        assert torch.equal(after[target], sd[source]), target
    assert set(report.missing) == set(after) - set(expected)
    for key in report.missing:
        assert torch.equal(after[key], before[key]), key
    assert all(k.startswith(("layers_up.", "final_")) for k in report.missing)
    assert {"norm.weight", "head.bias", "layers.2.blocks.26.ln_1.weight"} <= set(report.skipped)
    assert "layers.0.blocks.1.ln_1.weight" not in report.skipped  # loaded into the encoder
    assert report.adapted == {}


def test_pretrained_loader_one_channel_and_mismatches():
    sd = vmamba_v0_state_dict((8, 16, 32, 64), (2, 2, 3, 2), 4)
    sd["layers.3.blocks.0.self_attention.Ds"] = torch.ones(7)
    model = tiny_model()
    report = load_vmamba_pretrained(model, sd)
    weight3 = sd["patch_embed.proj.weight"]
    weight1 = model.vmunet.patch_embed.proj.weight
    assert set(report.adapted) == {"patch_embed.proj.weight"}
    x = torch.randn(1, 1, 8, 8)
    torch.testing.assert_close(
        F.conv2d(x, weight1, stride=4), F.conv2d(x.repeat(1, 3, 1, 1), weight3, stride=4)
    )
    assert "shape (7,), expected (512,)" in report.skipped["layers.3.blocks.0.self_attention.Ds"]
    assert "layers.3.blocks.0.self_attention.Ds" in report.missing
    with pytest.raises(InvalidDataError, match="state_dict"):
        load_vmamba_pretrained(model, {"model": {"a": 1}})
