"""The multitask loss: each weight applied once, against an independent computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kscan.errors import ConfigError
from kscan.models.idslr import IDSLR, IDSLRConfig
from kscan.models.multitask import MultitaskOutput
from kscan.physics.coils import rss
from kscan.physics.fft import ifft2c
from kscan.pipelines.losses_multitask import MultitaskLoss

CLASSES = 3


class RSSModel(nn.Module):
    """The ``image`` of the multitask interface and nothing else."""

    def image(self, kspace: torch.Tensor) -> torch.Tensor:
        return rss(ifft2c(kspace))


def fake_output(steps: int = 3, segs: int = 2, seed: int = 0):
    """k-space iterates (2, 2, 12, 10), logits (2, 3, 12, 10), an 8x8 target and 8x8 labels."""
    gen = torch.Generator().manual_seed(seed)
    kspaces = [
        torch.randn(2, 2, 12, 10, dtype=torch.complex64, generator=gen) for _ in range(steps)
    ]
    logits = [torch.randn(2, CLASSES, 12, 10, generator=gen) for _ in range(segs)]
    images = [RSSModel().image(k) for k in kspaces]
    target = torch.rand(2, 8, 8, generator=gen) * 3
    labels = torch.randint(0, CLASSES, (2, 8, 8), generator=gen)
    return MultitaskOutput(kspaces, images, logits), target, target.amax(dim=(1, 2)), labels


def crop(x: torch.Tensor) -> torch.Tensor:
    return x[..., 2:10, 1:9]  # the centred 8x8 window of 12x10


def log_weights(n: int) -> list[float]:
    raw = [10 ** (-1 + t / (n - 1)) for t in range(n)] if n > 1 else [1.0]
    return [w / sum(raw) for w in raw]


def dice_ce(logits: torch.Tensor, labels: torch.Tensor, dice: float, ce: float) -> torch.Tensor:
    """``dice (1 - mean_{c>=1} Dice_c) + ce CE`` with Dice over the whole batch, smoothing 1e-5."""
    probabilities = torch.softmax(logits, dim=1)
    onehot = F.one_hot(labels, CLASSES).permute(0, 3, 1, 2).float()
    scores = [
        (2 * (probabilities[:, c] * onehot[:, c]).sum() + 1e-5)
        / (probabilities[:, c].sum() + onehot[:, c].sum() + 1e-5)
        for c in range(1, CLASSES)
    ]
    return dice * (1 - torch.stack(scores).mean()) + ce * F.cross_entropy(logits, labels)


def independent_terms(out, target, labels, weighting: str, dice: float, ce: float):
    if weighting == "logspace":
        a, b = log_weights(len(out.image_iterates)), log_weights(len(out.seg_logits))
    else:
        a = [0.0] * (len(out.image_iterates) - 1) + [1.0]
        b = [0.0] * (len(out.seg_logits) - 1) + [1.0]
    rec = sum(
        w * (crop(x) - target).abs().mean() for w, x in zip(a, out.image_iterates, strict=True)
    )
    seg = sum(
        w * dice_ce(crop(z), labels, dice, ce) for w, z in zip(b, out.seg_logits, strict=True)
    )
    return rec, seg


@pytest.mark.parametrize("weighting", ["logspace", "none"])
@pytest.mark.parametrize(("rec_weight", "seg_weight"), [(0.5, 0.5), (2.0, 0.25), (0.0, 3.0)])
def test_each_weight_is_applied_exactly_once(weighting, rec_weight, seg_weight) -> None:
    out, target, max_value, labels = fake_output()
    loss = MultitaskLoss(
        rec_weight=rec_weight,
        seg_weight=seg_weight,
        iterate_weighting=weighting,
        dice_weight=0.7,
        ce_weight=1.3,
    )
    rec, seg = independent_terms(out, target, labels, weighting, dice=0.7, ce=1.3)
    value = loss(RSSModel(), out, target, max_value, labels)
    torch.testing.assert_close(value, rec_weight * rec + seg_weight * seg, rtol=1e-5, atol=1e-6)
    terms = loss.terms(RSSModel(), out, target, max_value, labels)
    torch.testing.assert_close(terms.reconstruction, rec, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.segmentation, seg, rtol=1e-5, atol=1e-6)
    # ATOMMIC's double application would give seg_weight**2 on L_seg: not equal unless it is 0 or 1
    if seg_weight not in (0.0, 1.0):
        assert abs(value - (rec_weight * rec + seg_weight**2 * seg)) > 1e-3


def test_ssim_weight_adds_one_minus_ssim_once() -> None:
    out, target, max_value, labels = fake_output()
    plain = MultitaskLoss(seg_weight=0.0)
    with_ssim = MultitaskLoss(seg_weight=0.0, ssim_weight=0.4)
    only_ssim = MultitaskLoss(seg_weight=0.0, l1_weight=0.0, ssim_weight=1.0)
    args = (RSSModel(), out, target, max_value, labels)
    torch.testing.assert_close(with_ssim(*args), plain(*args) + 0.4 * only_ssim(*args))


def test_loss_trains_a_real_multitask_model() -> None:
    torch.manual_seed(0)
    model = IDSLR(IDSLRConfig(coils=2, num_classes=CLASSES, num_filters=4, num_pool_layers=2))
    mask = torch.zeros(1, 1, 1, 10)
    mask[..., 3:7] = 1
    kspace = torch.randn(2, 2, 12, 10, dtype=torch.complex64) * mask
    _, target, max_value, labels = fake_output()
    out = model(kspace, mask)
    MultitaskLoss(iterate_weighting="logspace")(model, out, target, max_value, labels).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rec_weight": -1}, r"rec_weight: expected a number >= 0, got -1"),
        ({"seg_weight": "1"}, r"seg_weight: expected a number >= 0, got '1'"),
        ({"iterate_weighting": "linear"}, r"iterate_weighting: expected one of none, logspace"),
        ({"l1_weight": 0.0}, r"l1, ssim: expected at least one positive loss weight"),
    ],
)
def test_bad_weights_are_named(changes, message) -> None:
    with pytest.raises(ConfigError, match=message):
        MultitaskLoss(**changes)
