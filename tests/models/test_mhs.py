import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kscan.errors import ConfigError, InvalidDataError, ShapeError
from kscan.kernels.routes import MHSVM_HEAD_ROUTES, route
from kscan.kernels.scan_reference import selective_scan_reference
from kscan.models.mhs import (
    MHSVM,
    MHSMixer,
    MHSVMConfig,
    MultiHeadScan,
    RouteScanHead,
    RouteSSM,
    mhs_state_dict_from_reference,
    mhs_state_dict_to_reference,
    route_attention,
)
from kscan.models.vmunet import VMUNetConfig

KEYS_FILE = Path(__file__).parent / "data" / "mhsvm_keys.txt"
BLOCK = "vmunet.layers.0.blocks.0.self_attention."


def reference_keys() -> tuple[list[tuple[str, tuple[int, ...]]], int]:
    """The reference model's ``(key, shape)`` list and unique parameter count."""
    lines = KEYS_FILE.read_text().splitlines()
    header = re.match(
        r"### MHS-VM reference .*: (\d+) tensors with aliases, ([\d,]+) params", lines[0]
    )
    assert header is not None
    keys = []
    for line in lines[1:]:
        key, shape = line.split("\t")
        keys.append((key, tuple(int(n) for n in re.findall(r"\d+", shape))))
    assert len(keys) == int(header[1])
    return keys, int(header[2].replace(",", ""))


def randomize(module: nn.Module, seed: int) -> None:
    """Perturb every parameter so that no test passes because of an initial value (LayerNorm 1/0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


# --- scan route attention -------------------------------------------------------------------


def numpy_route_attention(ys: np.ndarray, t: float) -> np.ndarray:
    """Direct per-element computation of ``sum * relu(std / (mean(y - min) + 1e-5) - t)``."""
    out = np.empty(ys.shape[:1] + ys.shape[2:])
    for index in np.ndindex(*out.shape):
        values = ys[(index[0], slice(None), *index[1:])]
        k = len(values)
        mean = sum(values) / k
        std = np.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1))
        cv = std / (sum(v - min(values) for v in values) / k + 1e-5)
        out[index] = sum(values) * max(0.0, cv - t)
    return out


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.9])
def test_route_attention_matches_direct_computation(threshold):
    ys = torch.randn(2, 4, 3, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ys[0, :, 0, 0, 0] = 0.25  # equal values: cv = 0, output 0
    out = route_attention(ys, threshold)
    expected = numpy_route_attention(ys.numpy(), threshold)
    assert out.shape == (2, 3, 5, 6)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert out[0, 0, 0, 0] == 0
    if threshold > 0:  # the threshold screens some positions out, not all
        assert 0 < (out == 0).float().mean() < 1


# --- one head: routes, scans, un-permutation --------------------------------------------------


@pytest.mark.parametrize("family", list(MHSVM_HEAD_ROUTES))
def test_head_unpermutes_each_sequence_to_row_major(family):
    """With an identity engine every sequence must land back on its own pixel."""
    head = RouteScanHead(family, d_inner=3)
    head.mambaeng = nn.Identity()
    x = torch.randn(2, 3, 5, 7)
    out = head(x)
    assert out.shape == (2, 4, 3, 5, 7)
    for k in range(4):
        assert torch.equal(out[:, k], x)


@pytest.mark.parametrize(
    ("family", "size"), [("C", (5, 4)), ("X", (4, 6)), ("S", (5, 6)), ("Z", (3, 5))]
)
def test_head_matches_direct_per_route_scan(family, size):
    """Each sequence: gather along its route, the sequential scan with its own projections, scatter back."""
    height, width = size
    d, n = 4, 3
    torch.manual_seed(2)
    head = RouteScanHead(family, d_inner=d, d_state=n).double()
    randomize(head, 3)
    engine = head.mambaeng
    r = engine.dt_rank
    x = torch.randn(2, d, height, width, dtype=torch.float64)
    out = head(x)
    for k, name in enumerate(MHSVM_HEAD_ROUTES[family]):
        perm = route(name, height, width)
        u = x.flatten(2)[..., perm]  # (batch, d, L)
        proj = torch.einsum("cd,bdl->bcl", engine.x_proj_weight[k], u)
        dt_low, b, c = proj[:, :r], proj[:, r : r + n], proj[:, r + n :]
        delta = torch.einsum("dr,brl->bdl", engine.dt_projs_weight[k], dt_low)
        channels = slice(k * d, (k + 1) * d)
        y = selective_scan_reference(
            u,
            delta,
            -torch.exp(engine.A_logs[channels]),
            b,
            c,
            D=engine.Ds[channels],
            delta_bias=engine.dt_projs_bias[k],
            delta_softplus=True,
        )
        image = torch.empty_like(y)
        image[..., perm] = y
        torch.testing.assert_close(out[:, k], image.unflatten(-1, (height, width)))


def test_route_ssm_initialisation():
    engine = RouteSSM(d_inner=40, d_state=5, dt_min=0.01, dt_max=0.05, dt_scale=0.5)
    assert engine.dt_rank == 3
    assert engine.x_proj_weight.shape == (4, 3 + 10, 40)
    assert engine.x_proj_weight.abs().max() <= 40**-0.5
    torch.testing.assert_close(engine.A_logs[7], torch.arange(1, 6).float().log())
    assert torch.equal(engine.Ds, torch.ones(160))
    dt = nn.functional.softplus(engine.dt_projs_bias)
    assert dt.min() >= 0.01 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    assert engine.dt_projs_weight.abs().max() <= 0.5 * 3**-0.5
    assert RouteSSM(d_inner=40, dt_rank=7).dt_projs_weight.shape == (4, 40, 7)


# --- the multi-head scan and the mixer --------------------------------------------------------


@pytest.mark.parametrize("heads", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_mixer_shapes(heads, size):
    torch.manual_seed(0)
    mixer = MHSMixer(12, heads=heads, threshold=0.0)
    x = torch.randn(1, *size, 12)
    with torch.no_grad():
        y = mixer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    families = [
        name.removeprefix("scanhead_")
        for name, _ in mixer.mhs.named_children()
        if name.startswith("scanhead_")
    ]
    assert families == list("CXSZ")[:heads]


def test_multi_head_scan_splits_channels_into_heads():
    """Head i sees channels i*d .. (i+1)*d-1 of x_ssproj(x), in family order C, X, S, Z."""
    torch.manual_seed(4)
    mhs = MultiHeadScan(8, heads=4, threshold=0.2, d_state=3).double()
    randomize(mhs, 5)
    x = torch.randn(1, 8, 4, 5, dtype=torch.float64)
    projected = torch.einsum("oc,bchw->bohw", mhs.x_ssproj.weight, x)
    parts = [
        route_attention(getattr(mhs, f"scanhead_{f}")(projected[:, 2 * i : 2 * i + 2]), 0.2)
        for i, f in enumerate("CXSZ")
    ]
    y = torch.cat(parts, dim=1).permute(0, 2, 3, 1)
    expected = nn.functional.linear(
        nn.functional.layer_norm(y, (8,), mhs.cat_norm.weight, mhs.cat_norm.bias), mhs.y_proj.weight
    )
    torch.testing.assert_close(mhs(x), expected)


def test_mixer_gating():
    """out_norm(mhs(silu(conv(x)))) * silu(z), with x, z the halves of in_proj."""
    torch.manual_seed(6)
    mixer = MHSMixer(6, heads=3, threshold=0.1, d_state=2).double()
    randomize(mixer, 7)
    inp = torch.randn(2, 5, 4, 6, dtype=torch.float64)
    xz = inp @ mixer.in_proj.weight.T
    x, z = xz[..., :6], xz[..., 6:]
    x = nn.functional.conv2d(
        x.permute(0, 3, 1, 2), mixer.conv2d.weight, mixer.conv2d.bias, padding=1, groups=6
    )
    y = mixer.mhs(nn.functional.silu(x))
    expected = mixer.out_norm(y) * nn.functional.silu(z)
    torch.testing.assert_close(mixer(inp), expected)


@pytest.mark.parametrize(
    "backends",
    [("reference", "torch"), pytest.param(("reference", "triton"), marks=pytest.mark.slow)],
    ids=["torch", "triton"],
)
def test_scan_backends_agree(monkeypatch, backends):
    """Same weights, same outputs on every scan backend (Triton interpreted on CPU, conftest)."""
    if "triton" in backends:
        pytest.importorskip("triton")
    torch.manual_seed(8)
    mixer = MHSMixer(8, heads=4, threshold=0.0, d_state=4)
    randomize(mixer, 9)
    x = torch.randn(1, 6, 10, 8)
    outputs = {}
    for backend in backends:
        monkeypatch.setenv("KSCAN_SCAN_BACKEND", backend)
        with torch.no_grad():
            outputs[backend] = mixer(x)
    torch.testing.assert_close(outputs[backends[1]], outputs["reference"], rtol=1e-4, atol=1e-5)


def test_gradients_reach_every_parameter():
    torch.manual_seed(10)
    mixer = MHSMixer(8, heads=4, threshold=0.0, d_state=2)
    mixer(torch.randn(1, 4, 6, 8)).square().sum().backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_arguments():
    with pytest.raises(ConfigError, match="heads"):
        MultiHeadScan(8, heads=5)
    with pytest.raises(ConfigError, match="heads"):
        MultiHeadScan(8, heads=0)
    with pytest.raises(ConfigError, match="dim"):
        MultiHeadScan(10, heads=4)
    with pytest.raises(ShapeError, match=r"x: expected shape \(batch, H, W, C=8\)"):
        MHSMixer(8, heads=2)(torch.randn(1, 8, 4, 4))


# --- reference key names and aliases ----------------------------------------------------------


def test_mixer_keys_match_reference_block():
    keys, _ = reference_keys()
    block = [(k.removeprefix(BLOCK), shape) for k, shape in keys if k.startswith(BLOCK)]
    exported = mhs_state_dict_to_reference(MHSMixer(96, heads=4).state_dict())
    assert [(k, tuple(v.shape)) for k, v in exported.items()] == block


def test_aliases_round_trip():
    mixer = MHSMixer(8, heads=2, d_state=2)
    randomize(mixer, 11)
    ours = {
        f"vmunet.layers.1.blocks.0.self_attention.{k}": v for k, v in mixer.state_dict().items()
    }
    ref = mhs_state_dict_to_reference(ours)
    prefix = "vmunet.layers.1.blocks.0.self_attention.mhs."
    assert ref[prefix + "x_ssproj_W"] is ref[prefix + "x_ssproj.weight"]
    for name in ("x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds"):
        for family in "CX":
            head = f"{prefix}scanhead_{family}."
            assert ref[f"{head}scanning.seq2seq_engine.{name}"] is ref[f"{head}mambaeng.{name}"]
    assert len(ref) == len(ours) + 1 + 2 * 5
    back = mhs_state_dict_from_reference(ref)
    assert list(back) == list(ours)
    assert all(back[k] is ours[k] for k in ours)


def test_alias_checks():
    mixer = MHSMixer(8, heads=1, d_state=2)
    ref = {k: v.clone() for k, v in mhs_state_dict_to_reference(mixer.state_dict()).items()}
    ref["mhs.scanhead_C.scanning.seq2seq_engine.Ds"][0] += 1
    with pytest.raises(InvalidDataError, match="seq2seq_engine.Ds"):
        mhs_state_dict_from_reference(ref)
    ref = mhs_state_dict_to_reference(mixer.state_dict())
    ref["mhs.x_ssproj_W"] = torch.zeros(8, 8)
    with pytest.raises(InvalidDataError, match="x_ssproj_W"):
        mhs_state_dict_from_reference(ref)
    # an alias without its canonical key is renamed to it
    ref = mhs_state_dict_to_reference(mixer.state_dict())
    weight = ref.pop("mhs.x_ssproj.weight")
    assert mhs_state_dict_from_reference(ref)["mhs.x_ssproj.weight"] is weight
    # keys outside an MHS block are never treated as aliases
    other = {"scanning.seq2seq_engine.Ds": torch.ones(2), "x_ssproj_W": torch.ones(2)}
    assert mhs_state_dict_from_reference(other) == other
    assert mhs_state_dict_to_reference(other) == other


# --- the whole model --------------------------------------------------------------------------


def tiny_config(**changes) -> MHSVMConfig:
    base = dict(dims=(8, 16), depths=(1, 1), depths_decoder=(1, 1), d_state=4, heads=4)
    return MHSVMConfig(**{**base, **changes})


def test_model_keys_and_parameter_count_match_reference():
    keys, params = reference_keys()
    model = MHSVM(MHSVMConfig(in_channels=3))
    assert sum(p.numel() for p in model.parameters()) == params == 17_257_129
    exported = mhs_state_dict_to_reference(model.state_dict())
    assert [(k, tuple(v.shape)) for k, v in exported.items()] == keys


def test_model_forward_and_threshold():
    torch.manual_seed(12)
    model = MHSVM(tiny_config(threshold=0.0)).eval()
    x = torch.rand(2, 1, 16, 24)
    with torch.no_grad():
        probs, logits = model(x), model.forward_logits(x)
        assert probs.shape == (2, 1, 16, 24)
        torch.testing.assert_close(probs, torch.sigmoid(logits))
        model.set_threshold(0.3)
        assert model.config.threshold == 0.3
        assert all(m.mhs.threshold == 0.3 for m in model.modules() if isinstance(m, MHSMixer))
        assert not torch.allclose(model.forward_logits(x), logits)
    assert all(
        isinstance(m.self_attention, MHSMixer)
        for m in model.modules()
        if hasattr(m, "self_attention")
    )


def test_model_loads_reference_layout():
    torch.manual_seed(13)
    source, target = MHSVM(tiny_config(heads=2)), MHSVM(tiny_config(heads=2))
    randomize(source, 14)
    target.load_state_dict(
        mhs_state_dict_from_reference(mhs_state_dict_to_reference(source.state_dict()))
    )
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_config_dict_round_trip_and_unknown_key():
    config = tiny_config(heads=2, threshold=0.4)
    values = config.to_dict()
    assert values["heads"] == 2 and values["threshold"] == 0.4 and values["dims"] == [8, 16]
    assert MHSVMConfig.from_dict(values) == config
    with pytest.raises(ConfigError, match="head_num: unknown key"):
        MHSVMConfig.from_dict({"head_num": 4})


def test_config_validation():
    with pytest.raises(ConfigError, match="heads"):
        tiny_config(heads=5)
    with pytest.raises(ConfigError, match="dim: expected a multiple of heads=3"):
        tiny_config(heads=3)
    with pytest.raises(ConfigError, match="ssm_ratio"):
        tiny_config(ssm_ratio=2.0)
    with pytest.raises(ConfigError, match="threshold"):
        tiny_config(threshold="high")
    with pytest.raises(ConfigError, match="MHSVMConfig"):
        MHSVM(VMUNetConfig())
