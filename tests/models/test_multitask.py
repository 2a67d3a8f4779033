"""Multitask models: joint and sequential RVN + segmentation heads, IDSLR, SegNet; their configs
and registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from kscan.errors import ConfigError, ShapeError
from kscan.models import registry
from kscan.models.idslr import IDSLR, IDSLRConfig
from kscan.models.multitask import (
    JointConfig,
    JointRecSeg,
    MultitaskOutput,
    SequentialConfig,
    SequentialRecSeg,
    normalized_magnitude,
)
from kscan.models.seg_heads import SegmentationHead
from kscan.models.segnet import SegNet, SegNetConfig
from kscan.physics.coils import rss
from kscan.physics.fft import fft2c, ifft2c

CLASSES = 3
NETWORK = {"num_steps": 4, "recurrent_hidden_channels": 4, "recurrent_num_layers": 2}
RVN = {"network": NETWORK, "sensitivity_filters": 4, "sensitivity_pools": 2}
VMUNET = {"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "depths_decoder": [1, 1, 1, 1]}
VMUNET = {**VMUNET, "d_state": 4, "drop_path_rate": 0.0}
UNET = {"channels": [4, 8, 16], "strides": [2, 2]}
HEAD_CONFIGS = {
    "vmunet": VMUNET,
    "mhs-vm": {**VMUNET, "heads": 4},
    "unet": UNET,
    "attention-unet": UNET,
}


def problem(batch: int = 2, coils: int = 4, size: int = 32, seed: int = 0):
    """Masked k-space of a smooth multi-coil image, a line mask with 8 centre lines."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    disc = ((yy**2 + xx**2) < 0.5).float()
    phases = torch.rand(batch, coils, 1, 1, generator=gen) * 6.28
    images = (
        disc * torch.exp(1j * phases) * (1 + 0.3 * torch.rand(batch, coils, 1, 1, generator=gen))
    )
    noise = torch.randn(batch, coils, size, size, dtype=torch.complex64, generator=gen)
    mask = torch.zeros(1, 1, 1, size)
    mask[..., ::3] = 1
    mask[..., size // 2 - 4 : size // 2 + 4] = 1
    return (fft2c(images.to(torch.complex64)) + 0.05 * noise) * mask, mask


def joint(head: str = "unet", seed: int = 0, **changes) -> JointRecSeg:
    torch.manual_seed(seed)
    values = dict(
        rvn=RVN, cascades=2, num_classes=CLASSES, head=head, head_config=HEAD_CONFIGS[head]
    )
    return JointRecSeg(JointConfig.from_dict({**values, **changes}))


def sequential(head: str = "unet", seed: int = 0, **changes) -> SequentialRecSeg:
    torch.manual_seed(seed)
    values = dict(rvn=RVN, num_classes=CLASSES, head=head, head_config=HEAD_CONFIGS[head])
    return SequentialRecSeg(SequentialConfig.from_dict({**values, **changes}))


def idslr(**changes) -> IDSLR:
    torch.manual_seed(0)
    values = dict(coils=4, num_classes=CLASSES, num_filters=4, num_pool_layers=2, iterations=2)
    return IDSLR(IDSLRConfig.from_dict({**values, **changes}))


def segnet(**changes) -> SegNet:
    torch.manual_seed(0)
    values = dict(coils=4, num_classes=CLASSES, num_filters=4, num_pool_layers=2, cascades=3)
    return SegNet(SegNetConfig.from_dict({**values, **changes}))


def check_output(model, out: MultitaskOutput, y: torch.Tensor, steps: int, segs: int) -> None:
    assert isinstance(out, MultitaskOutput)
    assert len(out.kspace_iterates) == len(out.image_iterates) == steps
    assert len(out.seg_logits) == segs
    for kspace, image in zip(out.kspace_iterates, out.image_iterates, strict=True):
        assert kspace.shape == y.shape and kspace.dtype == y.dtype
        torch.testing.assert_close(image, rss(ifft2c(kspace, model.centered)))
    for logits in out.seg_logits:
        assert logits.shape == (y.shape[0], model.num_classes, *y.shape[-2:])
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize("head", ["unet", "attention-unet"])
def test_joint_output_shapes_with_monai_heads(head: str) -> None:
    y, mask = problem()
    model = joint(head)
    check_output(model, model(y, mask), y, steps=4, segs=2)
    assert len(model.heads) == 2 and model.num_classes == CLASSES and model.centered


@pytest.mark.parametrize("head", ["vmunet", "mhs-vm"])
def test_joint_output_shapes_with_mamba_heads_padding_odd_sizes(head: str) -> None:
    y, mask = problem(batch=1, size=24)  # padded to 32 inside the heads
    model = joint(head, share_head=True)
    check_output(model, model(y, mask), y, steps=4, segs=2)
    assert len(model.heads) == 1


def test_sequential_and_idslr_output_shapes() -> None:
    y, mask = problem()
    model = sequential()
    check_output(model, model(y, mask), y, steps=4, segs=1)
    model = idslr()
    check_output(model, model(y, mask), y, steps=2, segs=1)
    model = segnet()
    check_output(model, model(y, mask), y, steps=3, segs=4)  # 3 cascades, then the fused logits


def test_head_pads_to_its_multiple_and_crops_back() -> None:
    torch.manual_seed(0)
    head = SegmentationHead("unet", UNET, CLASSES).eval()
    assert head.size_multiple == 4
    image = torch.rand(2, 10, 7)
    expected = head.net(F.pad(image[:, None], (0, 1, 1, 1)))[..., 1:11, 0:7]
    torch.testing.assert_close(head(image), expected)


def test_head_input_is_the_clipped_quantile_normalised_magnitude() -> None:
    image = torch.randn(2, 9, 11, dtype=torch.complex128, requires_grad=True)
    out = normalized_magnitude(image, 0.995)
    magnitude = image.detach().abs().numpy()
    for b in range(2):
        q = np.percentile(magnitude[b], 99.5)
        np.testing.assert_allclose(out[b].detach().numpy(), np.clip(magnitude[b] / q, 0, 4))
    out.sum().backward()
    assert torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0
    zeros = normalized_magnitude(torch.zeros(1, 4, 4), 0.995)
    assert torch.equal(zeros, torch.zeros(1, 4, 4))


def test_feedback_adds_the_tiled_weighted_image_to_every_layer_state() -> None:
    """ATOMMIC's coupling: hidden channel o of each layer gains x_n * softmax(z)_(o mod K)."""
    y, mask = problem(seed=1)
    model = joint().eval()
    network = model.rvn.model
    calls = []
    iterate = network.iterate

    def recording(kspace, masked, m, maps, state, steps):
        calls.append(state)
        iterates, new_state = iterate(kspace, masked, m, maps, state, steps)
        calls.append(new_state)
        return iterates, new_state

    network.iterate = recording
    with torch.no_grad():
        out = model(y, mask)
    _, after_first, before_second, _ = calls
    image = normalized_magnitude(out.image_iterates[1], 0.995)
    probabilities = torch.softmax(out.seg_logits[0], dim=1)
    hidden = NETWORK["recurrent_hidden_channels"]
    tiled = torch.stack(
        [
            image * probabilities[:, o % CLASSES]
            if o < CLASSES * (hidden // CLASSES)
            else 0 * image
            for o in range(hidden)
        ],
        dim=1,
    )
    for h_before, h_after in zip(after_first, before_second, strict=True):
        torch.testing.assert_close(h_after, h_before + tiled)


@pytest.mark.slow
def test_feedback_changes_the_second_cascade_and_zero_feedback_is_sequential() -> None:
    y, mask = problem(seed=2)
    base = sequential(seed=3).eval()
    model = joint(share_head=True).eval()
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert sorted(missing) == ["feedback.0.weight", "feedback.1.weight"] and not unexpected
    with torch.no_grad():
        reference = base(y, mask)
        coupled = model(y, mask)
        for first, second in zip(
            reference.kspace_iterates[:2], coupled.kspace_iterates[:2], strict=True
        ):
            torch.testing.assert_close(first, second)  # the first cascade has no feedback yet
        change = (coupled.kspace_iterates[2] - reference.kspace_iterates[2]).abs().max()
        assert change > 1e-4 * reference.kspace_iterates[2].abs().max()
        assert (coupled.seg_logits[-1] - reference.seg_logits[-1]).abs().max() > 1e-5
        for projection in model.feedback:
            projection.weight.zero_()
        decoupled = model(y, mask)
    for first, second in zip(reference.kspace_iterates, decoupled.kspace_iterates, strict=True):
        torch.testing.assert_close(first, second)
    torch.testing.assert_close(decoupled.seg_logits[-1], reference.seg_logits[-1])


def seg_loss(out: MultitaskOutput) -> torch.Tensor:
    labels = torch.arange(CLASSES).repeat_interleave(32 * 32 // CLASSES + 1)[: 32 * 32]
    labels = labels.reshape(1, 32, 32).expand(out.seg_logits[-1].shape[0], -1, -1)
    return F.cross_entropy(out.seg_logits[-1], labels)


def grad_norms(model, out: MultitaskOutput) -> dict[str, float]:
    model.zero_grad()
    seg_loss(out).backward()
    parts = {}
    for name, parameter in model.named_parameters():
        part = ".".join(name.split(".")[:3])
        norm = 0.0 if parameter.grad is None else parameter.grad.abs().sum().item()
        parts[part] = parts.get(part, 0.0) + norm
    return parts


@pytest.mark.slow
def test_segmentation_loss_alone_trains_reconstruction_and_heads_in_the_joint_model() -> None:
    y, mask = problem()
    model = joint()
    norms = grad_norms(model, model(y, mask))
    for part in [
        "rvn.model.block_list",
        "rvn.sensitivity_model.unet",
        "heads.0.net",  # through the feedback into the last cascade
        "heads.1.net",
        "feedback.0.weight",
        "feedback.1.weight",
    ]:
        assert norms[part] > 0, part


@pytest.mark.slow
def test_sequential_trains_end_to_end_unless_detached() -> None:
    y, mask = problem()
    model = sequential()
    norms = grad_norms(model, model(y, mask))
    assert norms["rvn.model.block_list"] > 0 and norms["rvn.sensitivity_model.unet"] > 0
    assert norms["heads.0.net"] > 0
    model = sequential(detach_reconstruction=True)
    norms = grad_norms(model, model(y, mask))
    assert norms["rvn.model.block_list"] == 0 and norms["rvn.sensitivity_model.unet"] == 0
    assert norms["heads.0.net"] > 0


def group_normalise(x: torch.Tensor):
    """ATOMMIC's 2-group standardisation of (batch, 2C, H, W): real channels, imaginary channels."""
    half = x.shape[1] // 2
    stats = [
        (x[:, g].mean(dim=(1, 2, 3)), x[:, g].flatten(1).std(dim=1))
        for g in (slice(0, half), slice(half, None))
    ]
    means = torch.stack([m for m, _ in stats], 1).repeat_interleave(half, 1)[..., None, None]
    stds = torch.stack([s for _, s in stats], 1).repeat_interleave(half, 1)[..., None, None]
    return (x - means) / stds, means, stds


def direct_step(unet, decoder, kspace, y, mask, lam: float, residual: bool):
    """One coil-wise U-Net step written out: z = F^-1 k, x = G^-1(U(G(z))) (+ z), the next
    k-space (y + lam F(x)) / (M + lam), and the logits D(|E(G(z))|); returns (k, x, logits)."""
    z = ifft2c(kspace)
    normalised, means, stds = group_normalise(torch.cat([z.real, z.imag], dim=1))
    restored = unet(normalised) * stds + means
    x = torch.complex(restored[:, :4], restored[:, 4:]) + (z if residual else 0)
    logits = decoder([f.abs() for f in unet.encode(normalised)])
    return (y + lam * fft2c(x)) / (mask + lam), x, logits


def test_idslr_iteration_against_a_direct_computation() -> None:
    """One iteration: k1 = (y + lam F(x)) / (M + lam), x = G^-1(U(G(z))) + z; logits D(|E(G(z))|)."""
    y, mask = problem(seed=5)
    model = idslr(iterations=1).eval()
    lam = 0.7
    with torch.no_grad():
        model.dc.lam.fill_(lam)
        out = model(y, mask)
        expected, x, logits = direct_step(
            model.unet, model.segmentation_decoder, y, y, mask, lam, residual=True
        )
    torch.testing.assert_close(out.kspace_iterates[0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.seg_logits[0], logits)
    sampled = mask.expand_as(y).bool()
    # on sampled lines a weighted mean of y and F(x); off them F(x) unchanged
    torch.testing.assert_close(expected[~sampled], fft2c(x)[~sampled])
    assert model.dc.lam.requires_grad


def test_idslr_segmentation_taps_the_last_iterations_encoder() -> None:
    y, mask = problem()
    for iterations, decoder_trained in ((1, False), (2, True)):
        model = idslr(iterations=iterations)
        norms = grad_norms(model, model(y, mask))
        assert (
            norms["unet.down_sample_layers.0"] > 0 and norms["segmentation_decoder.up_conv.0"] > 0
        )
        # the reconstruction decoder only feeds the segmentation through an earlier iteration
        assert (norms["unet.up_conv.0"] > 0) == decoder_trained


def test_idslr_coil_count_is_fixed() -> None:
    y, mask = problem(coils=3)
    with pytest.raises(
        ShapeError, match=r"masked_kspace: expected 4 coils \(config.coils\), got 3"
    ):
        idslr()(y, mask)
    with pytest.raises(ShapeError, match="masked_kspace"):
        idslr()(y.abs(), mask)


def test_segnet_cascades_against_a_direct_computation() -> None:
    """Cascade j: its own U-Net without residual, k_j+1 = (y + lam F(x_j)) / (M + lam) with one
    lam; its own decoder on |E_j(G(z_j))|; the fused logits relu(W * [s_0, .., s_J-1])."""
    y, mask = problem(seed=6)
    model = segnet(cascades=2).eval()
    lam = 0.6
    with torch.no_grad():
        model.dc.lam.fill_(lam)
        out = model(y, mask)
        kspace, logits = y, []
        for unet, decoder in zip(model.unets, model.segmentation_decoders, strict=True):
            kspace, _, cascade_logits = direct_step(
                unet, decoder, kspace, y, mask, lam, residual=False
            )
            logits.append(cascade_logits)
        fused = torch.relu(F.conv2d(torch.cat(logits, 1), model.fusion.weight, padding=1))
    torch.testing.assert_close(out.kspace_iterates[-1], kspace, rtol=1e-5, atol=1e-6)
    for got, want in zip(out.seg_logits, [*logits, fused], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert model.unets[0] is not model.unets[1] and model.fusion.bias is None


def test_segnet_without_normalisation_feeds_the_unets_the_raw_images() -> None:
    y, mask = problem(seed=7)
    model = segnet(cascades=1, normalize=False).eval()
    with torch.no_grad():
        out = model(y, mask)
        z = ifft2c(y)
        restored = model.unets[0](torch.cat([z.real, z.imag], dim=1))
        x = torch.complex(restored[:, :4], restored[:, 4:])
        expected = (y + fft2c(x)) / (mask + 1.0)
    torch.testing.assert_close(out.kspace_iterates[0], expected, rtol=1e-5, atol=1e-6)


def test_segnet_trains_every_cascade_from_the_segmentation_loss() -> None:
    """The fused logits reach every cascade's decoder and encoder; the last cascade's U-Net
    decoder only feeds the reconstruction."""
    y, mask = problem()
    model = segnet()
    out = model(y, mask)
    out.seg_logits[-1].sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for j in range(3):
        assert grads[f"segmentation_decoders.{j}.up_conv.0.layers.0.weight"].abs().sum() > 0
        assert grads[f"unets.{j}.down_sample_layers.0.layers.0.weight"].abs().sum() > 0
    assert grads["unets.2.up_conv.0.layers.0.weight"] is None


def test_registry_builds_the_multitask_models_by_name() -> None:
    assert registry.names("multitask") == [
        "idslr",
        "joint-rvn-seg",
        "segnet",
        "sequential-rvn-seg",
    ]
    model = registry.build_model("segnet", {"coils": 2, "num_filters": 2, "num_pool_layers": 1})
    assert isinstance(model, SegNet) and len(model.unets) == 5
    values = {"rvn": RVN, "num_classes": CLASSES, "head": "unet", "head_config": UNET}
    assert isinstance(registry.build_model("joint-rvn-seg", {**values, "cascades": 2}), JointRecSeg)
    assert isinstance(registry.build_model("sequential-rvn-seg", values), SequentialRecSeg)
    model = registry.build_model("idslr", {"coils": 2, "num_filters": 2, "num_pool_layers": 1})
    assert isinstance(model, IDSLR) and model.unet.down_sample_layers[0].layers[0].in_channels == 4


@pytest.mark.parametrize(
    ("name", "values", "message"),
    [
        ("joint-rvn-seg", {"cascade": 2}, r"model_config.cascade: unknown key in JointConfig"),
        (
            "joint-rvn-seg",
            {"rvn": {"network": {"steps": 2}}},
            r"model_config.rvn.network.steps: unknown key",
        ),
        (
            "joint-rvn-seg",
            {"head": "unet", "head_config": {"chans": 2}},
            r"head_config.chans: unknown key",
        ),
        (
            "joint-rvn-seg",
            {"head_config": {"num_classes": 2}},
            r"head_config.num_classes: set by the multitask model",
        ),
        (
            "joint-rvn-seg",
            {"head": "segformer"},
            r"head: expected one of vmunet, mhs-vm, unet, attention-unet, got 'segformer'",
        ),
        (
            "joint-rvn-seg",
            {"cascades": 4},
            r"cascades: expected a positive divisor of rvn.network.num_steps = 15, got 4",
        ),
        ("joint-rvn-seg", {"num_classes": 1}, r"num_classes: expected an integer >= 2, got 1"),
        (
            "joint-rvn-seg",
            {"rvn": RVN, "cascades": 2, "num_classes": 5},
            r"recurrent_hidden_channels: expected at least num_classes = 5",
        ),
        ("sequential-rvn-seg", {"cascades": 2}, r"cascades: unknown key in SequentialConfig"),
        (
            "sequential-rvn-seg",
            {"detach_reconstruction": "yes"},
            r"detach_reconstruction: expected true or false",
        ),
        ("idslr", {"coil": 4}, r"model_config.coil: unknown key in IDSLRConfig"),
        ("idslr", {"coils": 0}, r"coils: expected a positive integer, got 0"),
        ("segnet", {"iterations": 2}, r"model_config.iterations: unknown key in SegNetConfig"),
        ("segnet", {"cascades": 0}, r"cascades: expected a positive integer, got 0"),
        ("segnet", {"normalize": 1}, r"normalize: expected true or false, got 1"),
        ("segnet", {"dropout": 1.0}, r"dropout: expected a number in \[0, 1\), got 1.0"),
    ],
)
def test_configs_reject_unknown_keys_and_bad_values_by_name(name, values, message) -> None:
    with pytest.raises(ConfigError, match=message):
        registry.build_config(name, values)
