"""Training losses: each weight applied once, SSIM = skimage's, log-spaced iterate weights."""

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from kscan.errors import ConfigError
from kscan.pipelines.losses import ReconstructionLoss, iterate_weights, l1_loss, ssim_loss
from kscan.pipelines.train_config import LossConfig


class Identity(torch.nn.Module):
    """A stand-in model whose "k-space" is already the magnitude image."""

    def image(self, kspace):
        return kspace


@pytest.fixture
def images():
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(2, 12, 12, generator=gen, dtype=torch.float64).float()
    preds = [target + 0.1 * (t + 1) * torch.rand(2, 12, 12, generator=gen) for t in range(3)]
    max_value = torch.tensor([1.5, 2.0], dtype=torch.float64)
    return target, preds, max_value


def independent_terms(pred, target, max_value):
    """L1 and 1 - SSIM from numpy and skimage."""
    p, t = pred.double().numpy(), target.double().numpy()
    l1 = np.abs(p - t).mean()
    ssims = [
        structural_similarity(t[b], p[b], data_range=float(max_value[b])) for b in range(len(p))
    ]
    return l1, 1 - np.mean(ssims)


def test_terms_match_independent_definitions(images):
    target, preds, max_value = images
    l1, dssim = independent_terms(preds[0], target, max_value)
    assert l1_loss(preds[0], target).item() == pytest.approx(l1, rel=1e-6)
    assert ssim_loss(preds[0], target, max_value).item() == pytest.approx(dssim, rel=1e-5)


@pytest.mark.parametrize(("w_l1", "w_ssim"), [(1.0, 0.0), (0.3, 0.0), (0.0, 2.5), (0.7, 1.9)])
def test_each_weight_is_applied_once(images, w_l1, w_ssim):
    target, preds, max_value = images
    loss = ReconstructionLoss(LossConfig(l1=w_l1, ssim=w_ssim))
    value = loss(Identity(), preds[0], target, max_value)
    l1, dssim = independent_terms(preds[0], target, max_value)
    assert value.item() == pytest.approx(w_l1 * l1 + w_ssim * dssim, rel=1e-5)


def test_iterate_weights():
    assert iterate_weights(4, "none").tolist() == [0, 0, 0, 1]
    expected = np.array([10 ** (-1 + t / 4) for t in range(5)])
    np.testing.assert_allclose(iterate_weights(5, "logspace"), expected / expected.sum())
    assert iterate_weights(1, "logspace").tolist() == [1.0]
    with pytest.raises(ConfigError, match="iterate_weighting"):
        iterate_weights(3, "linear")


@pytest.mark.parametrize("weighting", ["none", "logspace"])
def test_iterate_weighted_loss_is_the_weighted_sum_of_terms(images, weighting):
    target, preds, max_value = images
    config = LossConfig(l1=0.5, ssim=2.0, iterate_weighting=weighting)
    value = ReconstructionLoss(config)(Identity(), preds, target, max_value)
    weights = iterate_weights(len(preds), weighting).tolist()
    expected = 0.0
    for weight, pred in zip(weights, preds, strict=True):
        l1, dssim = independent_terms(pred, target, max_value)
        expected += weight * (0.5 * l1 + 2.0 * dssim)
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_images_are_centre_cropped_to_the_target_and_give_gradients(images):
    target, preds, max_value = images
    big = torch.nn.functional.pad(preds[0], (2, 2, 2, 2)).requires_grad_()  # (2, 16, 16)
    value = ReconstructionLoss(LossConfig(l1=1.0, ssim=1.0))(Identity(), big, target, max_value)
    cropped = ReconstructionLoss(LossConfig(l1=1.0, ssim=1.0))(
        Identity(), preds[0], target, max_value
    )
    assert value.item() == pytest.approx(cropped.item(), rel=1e-6)
    value.backward()
    assert torch.isfinite(big.grad).all() and big.grad[:, 2:14, 2:14].abs().sum() > 0
    assert big.grad[:, :2].abs().sum() == 0  # outside the crop
