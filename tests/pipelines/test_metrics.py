"""Metrics against independent definitions: skimage's SSIM/PSNR, numpy formulas, hand-computed
Dice/IoU/HD95 and a brute-force HD95 over boundary voxels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from kscan.errors import ConfigError, InvalidDataError, KscanError, ShapeError
from kscan.pipelines import metrics

RNG_SEED = 20240501


def _phantom(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Smooth non-negative volume: a few Gaussian blobs per slice."""
    rng = np.random.default_rng(seed)
    slices, h, w = shape
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    vol = np.zeros(shape)
    for s in range(slices):
        for _ in range(4):
            cy, cx = rng.uniform(-0.6, 0.6, 2)
            width = rng.uniform(0.15, 0.5)
            vol[s] += rng.uniform(0.3, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / width**2)
    return vol


def _skimage_ssim(target: np.ndarray, pred: np.ndarray, data_range) -> np.ndarray:
    ranges = np.broadcast_to(data_range, target.shape[:1])
    return np.array(
        [
            structural_similarity(target[s], pred[s], data_range=float(ranges[s]))
            for s in range(target.shape[0])
        ]
    )


# --- SSIM / PSNR / NMSE ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 7, 7), (3, 37, 50), (2, 64, 63), (4, 29, 81)])
def test_ssim_matches_skimage_on_random_images(shape):
    rng = np.random.default_rng(RNG_SEED)
    target = rng.random(shape)
    pred = target + 0.2 * rng.standard_normal(shape)
    ours = metrics.ssim(torch.from_numpy(target), torch.from_numpy(pred))
    assert ours.shape == shape[:1] and ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), _skimage_ssim(target, pred, target.max()), atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 48, 41), (2, 33, 33)])
@pytest.mark.parametrize("noise", [0.01, 0.1])
def test_ssim_matches_skimage_on_noisy_phantom(shape, noise):
    target = _phantom(shape, seed=1)
    pred = target + noise * np.random.default_rng(2).standard_normal(shape)
    ours = metrics.ssim(target, pred).numpy()
    np.testing.assert_allclose(ours, _skimage_ssim(target, pred, target.max()), atol=1e-6)


def test_ssim_single_slice_float32_and_explicit_ranges():
    target = _phantom((2, 40, 36), seed=3)
    pred = target + 0.05 * np.random.default_rng(4).standard_normal(target.shape)
    t32, p32 = target.astype(np.float32), pred.astype(np.float32)
    one = metrics.ssim(torch.from_numpy(t32[0]), torch.from_numpy(p32[0]))
    assert one.shape == ()
    ref = structural_similarity(
        t32[0].astype(np.float64), p32[0].astype(np.float64), data_range=t32[0].max()
    )
    assert abs(one.item() - ref) < 1e-6
    ranges = np.array([1.7, 0.9])
    ours = metrics.ssim(target, pred, data_range=torch.from_numpy(ranges)).numpy()
    np.testing.assert_allclose(ours, _skimage_ssim(target, pred, ranges), atol=1e-6)


def test_ssim_is_one_for_identical_images_and_differentiable():
    target = torch.from_numpy(_phantom((2, 20, 17), seed=5))
    assert torch.allclose(
        metrics.ssim(target, target), torch.ones(2, dtype=torch.float64), atol=1e-12
    )

    pred = target + 0.1 * torch.randn(target.shape, generator=torch.Generator().manual_seed(6))
    pred = pred.float().requires_grad_()
    loss = 1 - metrics.ssim(target, pred).mean()
    loss.backward()
    assert pred.grad is not None and pred.grad.dtype == torch.float32
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    # a small step against the gradient raises SSIM
    with torch.no_grad():
        better = metrics.ssim(target, pred - 0.5 * pred.grad / pred.grad.abs().max()).mean()
    assert better.item() > 1 - loss.item()


def test_ssim_gradcheck_float64():
    gen = torch.Generator().manual_seed(7)
    target = torch.rand(2, 8, 9, generator=gen, dtype=torch.float64)
    pred = (
        target + 0.1 * torch.randn(2, 8, 9, generator=gen, dtype=torch.float64)
    ).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda p: metrics.ssim(target, p, data_range=1.0), (pred,), fast_mode=True
    )


def test_psnr_and_nmse_per_slice_match_numpy():
    rng = np.random.default_rng(8)
    target = _phantom((3, 30, 34), seed=8)
    pred = target + 0.03 * rng.standard_normal(target.shape)
    err = ((target - pred) ** 2).reshape(3, -1)
    expected_psnr = 10 * np.log10(target.max() ** 2 / err.mean(axis=1))
    expected_nmse = err.sum(axis=1) / (target.reshape(3, -1) ** 2).sum(axis=1)
    np.testing.assert_allclose(metrics.psnr(target, pred).numpy(), expected_psnr, rtol=1e-12)
    np.testing.assert_allclose(metrics.nmse(target, pred).numpy(), expected_nmse, rtol=1e-12)
    assert metrics.psnr(target, target).isinf().all()


def test_reconstruction_metrics_fastmri_volume():
    rng = np.random.default_rng(9)
    target = _phantom((4, 32, 27), seed=9)
    pred = target + 0.05 * rng.standard_normal(target.shape)
    got = metrics.reconstruction_metrics(torch.from_numpy(target), torch.from_numpy(pred))
    assert set(got) == {"ssim", "psnr", "nmse"}
    assert got["ssim"] == pytest.approx(_skimage_ssim(target, pred, target.max()).mean(), abs=1e-6)
    assert got["psnr"] == pytest.approx(
        peak_signal_noise_ratio(target, pred, data_range=target.max()), abs=1e-9
    )
    nmse = np.linalg.norm(target - pred) ** 2 / np.linalg.norm(target) ** 2
    assert got["nmse"] == pytest.approx(nmse, rel=1e-12)


def test_calgary_convention_matches_per_slice_normalised_reference():
    rng = np.random.default_rng(10)
    target = _phantom((3, 36, 30), seed=10) * np.array([1.0, 40.0, 0.02])[:, None, None]
    pred = target * (1 + 0.1 * rng.standard_normal(target.shape))
    # Calgary-Campinas reference: normalise both by the target slice max, range over both images
    scale = target.max(axis=(1, 2), keepdims=True)
    t, p = target / scale, pred / scale
    ranges = np.maximum(t.max(axis=(1, 2)), p.max(axis=(1, 2))) - np.minimum(
        t.min(axis=(1, 2)), p.min(axis=(1, 2))
    )
    ref_ssim = _skimage_ssim(t, p, ranges)
    ref_psnr = np.array(
        [peak_signal_noise_ratio(t[s], p[s], data_range=ranges[s]) for s in range(3)]
    )

    ssim = metrics.ssim(target, pred, convention="calgary").numpy()
    psnr = metrics.psnr(target, pred, convention="calgary").numpy()
    np.testing.assert_allclose(ssim, ref_ssim, atol=1e-6)
    np.testing.assert_allclose(psnr, ref_psnr, atol=1e-9)
    got = metrics.reconstruction_metrics(target, pred, convention="calgary")
    assert got["ssim"] == pytest.approx(ref_ssim.mean(), abs=1e-6)
    assert got["psnr"] == pytest.approx(ref_psnr.mean(), abs=1e-9)
    # the conventions really differ on this volume (slices on very different scales)
    assert abs(metrics.reconstruction_metrics(target, pred)["ssim"] - got["ssim"]) > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ssim_cuda_matches_cpu():
    target = torch.from_numpy(_phantom((3, 64, 48), seed=11))
    pred = target + 0.05 * torch.randn(target.shape, generator=torch.Generator().manual_seed(11))
    cpu = metrics.ssim(target, pred)
    gpu = metrics.ssim(target.cuda().float(), pred.cuda().float())
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-6)


# --- segmentation ---------------------------------------------------------------------------


def _squares(shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """10x10 squares of class 1, the prediction shifted by ``shift`` pixels along W."""
    target = torch.zeros(32, 32, dtype=torch.long)
    pred = torch.zeros_like(target)
    target[10:20, 10:20] = 1
    pred[10:20, 10 + shift : 20 + shift] = 1
    return target, pred


def test_shifted_squares_hand_computed():
    target, pred = _squares(3)
    got = metrics.segmentation_metrics(target, pred, num_classes=2)
    # overlap 10x7 = 70 pixels of 100 + 100
    assert got["dice"].tolist() == pytest.approx([140 / 200])
    assert got["iou"].tolist() == pytest.approx([70 / 130])
    # every boundary point is within 3 pixels of the other boundary; > 5% of them exactly 3 away
    assert got["hd95"].tolist() == pytest.approx([3.0])
    # a W spacing of 0.5 halves the W offsets; H distances (1 per row) stay at most 1.5 below
    assert metrics.hd95(target, pred, 2, spacing=(1.0, 0.5)).tolist() == pytest.approx([1.5])
    assert all(v.dtype == torch.float64 for v in got.values())


def test_hd95_single_voxels_with_anisotropic_spacing():
    target = torch.zeros(5, 10, 12, dtype=torch.int32)
    pred = torch.zeros_like(target)
    target[1, 2, 3] = 1
    pred[3, 5, 7] = 1  # offset (2, 3, 4) voxels
    assert metrics.hd95(target, pred, 2).item() == pytest.approx(math.sqrt(4 + 9 + 16), rel=1e-6)
    assert metrics.hd95(target, pred, 2, spacing=(2.0, 1.0, 1.0)).item() == pytest.approx(
        math.sqrt(41), rel=1e-6
    )
    assert metrics.hd95(target, pred, 2, spacing=0.5).item() == pytest.approx(
        0.5 * math.sqrt(29), rel=1e-6
    )


def _brute_force_hd95(target: np.ndarray, pred: np.ndarray, spacing) -> float:
    """Symmetric HD95 over boundary voxels (mask XOR its erosion), by all pairwise distances."""

    def boundary(mask):
        return np.argwhere(mask ^ ndimage.binary_erosion(mask)) * np.asarray(spacing)

    d = cdist(boundary(pred), boundary(target))
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


def test_dice_iou_hd95_on_random_blobs_match_numpy():
    rng = np.random.default_rng(12)

    def labels():
        noise = ndimage.gaussian_filter(rng.standard_normal((6, 24, 20)), 2.0)
        return np.digitize(noise, np.quantile(noise, [0.5, 0.75, 0.9])).astype(np.int64)

    target, pred = labels(), labels()
    spacing = (2.5, 0.8, 1.1)
    got = metrics.segmentation_metrics(target, pred, num_classes=4, spacing=spacing)
    for i, c in enumerate(range(1, 4)):
        t, p = target == c, pred == c
        inter = np.logical_and(t, p).sum()
        assert got["dice"][i].item() == pytest.approx(2 * inter / (t.sum() + p.sum()), rel=1e-6)
        assert got["iou"][i].item() == pytest.approx(inter / np.logical_or(t, p).sum(), rel=1e-6)
        assert got["hd95"][i].item() == pytest.approx(_brute_force_hd95(t, p, spacing), rel=1e-5)


def test_empty_classes():
    target = torch.zeros(16, 16, dtype=torch.long)
    pred = torch.zeros_like(target)
    target[2:6, 2:6] = 1
    pred[3:7, 2:6] = 1
    target[10:12, 10:12] = 2  # class 2 only in the target, class 3 only in the prediction
    pred[12:14, 1:3] = 3  # class 4 in neither
    got = metrics.segmentation_metrics(target, pred, num_classes=5)
    assert got["dice"].tolist() == pytest.approx([24 / 32, 0.0, 0.0, 1.0])
    assert got["iou"].tolist() == pytest.approx([12 / 20, 0.0, 0.0, 1.0])
    hd = got["hd95"]
    assert hd[0].item() == pytest.approx(1.0)
    assert math.isinf(hd[1].item()) and math.isinf(hd[2].item()) and hd[3].item() == 0.0

    both_empty = metrics.segmentation_metrics(torch.zeros_like(target), torch.zeros_like(target), 2)
    assert [v.item() for v in both_empty.values()] == [1.0, 1.0, 0.0]


def test_include_background():
    target, pred = _squares(3)
    dice = metrics.dice(target, pred, 2, include_background=True)
    background = (32 * 32 - 130) * 2 / (2 * (32 * 32 - 100))
    assert dice.tolist() == pytest.approx([background, 0.7])


# --- bad input ------------------------------------------------------------------------------

IMG = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: metrics.ssim(IMG, IMG[:1]), ShapeError),
        (lambda: metrics.ssim(IMG[None], IMG[None]), ShapeError),
        (lambda: metrics.ssim(IMG[:, :6], IMG[:, :6]), ShapeError),
        (lambda: metrics.psnr(IMG.to(torch.complex128), IMG), ShapeError),
        (lambda: metrics.nmse(IMG, torch.where(IMG > 0.5, math.nan, IMG)), InvalidDataError),
        (lambda: metrics.ssim(torch.zeros_like(IMG), IMG), InvalidDataError),
        (lambda: metrics.reconstruction_metrics(torch.zeros_like(IMG), IMG), InvalidDataError),
        (lambda: metrics.ssim(IMG, IMG, data_range=[1.0, 2.0, 3.0]), ShapeError),
        (lambda: metrics.ssim(IMG, IMG, data_range=0.0), InvalidDataError),
        (
            lambda: metrics.ssim(torch.ones_like(IMG), torch.ones_like(IMG), convention="calgary"),
            InvalidDataError,
        ),
        (lambda: metrics.ssim(IMG, IMG, convention="brain"), ConfigError),
        (lambda: metrics.dice(IMG, IMG, 2), ShapeError),
        (
            lambda: metrics.iou(
                torch.zeros(4, 4, dtype=torch.long), torch.zeros(4, 5, dtype=torch.long), 2
            ),
            ShapeError,
        ),
        (
            lambda: metrics.dice(torch.full((4, 4), 3), torch.zeros(4, 4, dtype=torch.long), 3),
            InvalidDataError,
        ),
        (
            lambda: metrics.dice(
                torch.zeros(4, 4, dtype=torch.long), torch.zeros(4, 4, dtype=torch.long), 1
            ),
            ConfigError,
        ),
        (
            lambda: metrics.hd95(
                torch.ones(4, 4, dtype=torch.long),
                torch.ones(4, 4, dtype=torch.long),
                2,
                spacing=(1.0, 1.0, 1.0),
            ),
            ShapeError,
        ),
        (
            lambda: metrics.hd95(
                torch.ones(4, 4, dtype=torch.long),
                torch.ones(4, 4, dtype=torch.long),
                2,
                spacing=-1.0,
            ),
            InvalidDataError,
        ),
    ],
)
def test_bad_input_raises_one_line_kscan_error(call, error):
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, KscanError)
    message = str(info.value)
    assert message and "\n" not in message
