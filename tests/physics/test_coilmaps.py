"""Coil maps: ESPIRiT against sigpy, the ACS estimate against numpy, SENSE recombination, errors."""

import numpy as np
import pytest
import torch

from kscan.errors import ConfigError, InvalidDataError, MaskError, ShapeError
from kscan.physics.coilmaps import acs_maps, center_lines, espirit_maps
from kscan.physics.coils import reduce
from kscan.physics.fft import ifft2c
from kscan.pipelines.synthetic import simulate_multicoil

N, COILS, ACS = 128, 8, 24


@pytest.fixture(scope="module")
def phantom():
    return simulate_multicoil((N, N), COILS, seed=0, dtype=torch.complex128)


@pytest.fixture(scope="module")
def support(phantom):
    magnitude = phantom.image.abs()
    return magnitude > 0.05 * magnitude.max()


def _acs_only(kspace: torch.Tensor, lines: int) -> torch.Tensor:
    """Zero every W line outside the ``lines`` centre lines."""
    start = kspace.shape[-1] // 2 - lines // 2
    out = torch.zeros_like(kspace)
    out[..., start : start + lines] = kspace[..., start : start + lines]
    return out


def _abs_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|<a, b>| / (|a| |b|)`` over coils ``(coil, H, W) -> (H, W)``; 0 where either is 0."""
    inner = (a.conj() * b).sum(0).abs()
    norms = torch.linalg.vector_norm(a, dim=0) * torch.linalg.vector_norm(b, dim=0)
    return torch.where(norms > 0, inner / norms.clamp_min(1e-300), 0)


@pytest.mark.parametrize("acs_only", [False, True], ids=["fully_sampled", "acs_only"])
def test_espirit_agrees_with_sigpy(phantom, support, acs_only):
    from sigpy.mri.app import EspiritCalib

    kspace = _acs_only(phantom.kspace, ACS) if acs_only else phantom.kspace
    theirs = EspiritCalib(
        kspace.numpy(), calib_width=24, thresh=0.02, kernel_width=6, crop=0.95, show_pbar=False
    ).run()
    ours = espirit_maps(kspace[None])[0]
    cosine = _abs_cosine(ours, torch.from_numpy(np.asarray(theirs)))[support]
    assert cosine.mean() >= 0.99
    assert cosine.min() >= 0.9


def test_espirit_maps_are_unit_norm_or_cropped(phantom, support):
    maps = espirit_maps(phantom.kspace[None])[0]
    power = maps.abs().square().sum(0)
    assert torch.allclose(power[support], torch.ones(()).to(power), atol=1e-10)
    cropped = power < 0.5
    assert cropped.any()  # the crop removes part of the background
    assert (maps[:, cropped] == 0).all()
    assert torch.allclose(power[~cropped], torch.ones(()).to(power), atol=1e-10)
    assert (maps[0][~cropped].imag.abs() < 1e-12).all()  # phase referred to coil 0


@pytest.mark.parametrize("estimate", ["espirit", "acs"])
def test_sense_combination_recovers_phantom(phantom, support, estimate):
    kspace = phantom.kspace[None]
    maps = espirit_maps(kspace) if estimate == "espirit" else acs_maps(kspace, ACS)
    combined = reduce(ifft2c(kspace), maps)[0].abs()
    truth = phantom.image.abs()
    error = torch.linalg.vector_norm((combined - truth)[support]) / torch.linalg.vector_norm(
        truth[support]
    )
    assert error < 0.01


def test_espirit_matches_true_maps(phantom, support):
    maps = espirit_maps(_acs_only(phantom.kspace, ACS)[None])[0]
    assert _abs_cosine(maps, phantom.maps)[support].mean() >= 0.999


def test_espirit_acs_detection_and_clipping(phantom, support):
    kspace = _acs_only(phantom.kspace, 20)[None]
    mask = (kspace[0, 0].abs() > 0).any(dim=0)
    detected = espirit_maps(kspace)  # calibration 24 x 20: clipped to the 20 ACS lines
    assert _abs_cosine(detected[0], phantom.maps)[support].mean() >= 0.999
    assert torch.equal(detected, espirit_maps(kspace, mask=mask))
    assert torch.equal(detected, espirit_maps(kspace, mask=mask[None, None, None]))


def test_espirit_batch_equals_single_runs():
    first = simulate_multicoil((48, 48), 4, seed=1).kspace
    second = simulate_multicoil((48, 48), 4, noise=0.05, seed=2).kspace
    batch = espirit_maps(torch.stack([first, second]), calib_width=16, kernel_width=4)
    assert batch.shape == (2, 4, 48, 48) and batch.dtype == torch.complex64
    for i, single in enumerate((first, second)):
        expected = espirit_maps(single[None], calib_width=16, kernel_width=4)[0]
        torch.testing.assert_close(batch[i], expected)


@pytest.mark.parametrize("estimate", ["espirit", "acs"])
def test_uncentered_convention(phantom, estimate):
    """Uncentered k-space of the same image gives the same maps."""
    coil_images = ifft2c(phantom.kspace)
    centered = phantom.kspace[None]
    uncentered = torch.fft.fft2(coil_images, norm="ortho")[None]
    if estimate == "espirit":
        ours, reference = espirit_maps(uncentered, centered=False), espirit_maps(centered)
    else:
        mask = torch.zeros(N)
        mask[N // 2 - ACS // 2 : N // 2 + ACS // 2] = 1
        ours = acs_maps(uncentered, mask=torch.fft.ifftshift(mask), centered=False)
        reference = acs_maps(centered, ACS)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-9)


def _numpy_acs_maps(kspace: np.ndarray, lines: int, sigma: float) -> np.ndarray:
    """DIRECT's estimate written with numpy: window the centre lines, centred iFFT, divide by RSS."""
    width = kspace.shape[-1]
    start = width // 2 - lines // 2
    window = np.zeros(width)
    window[start : start + lines] = np.exp(-((np.linspace(-1, 1, width) / sigma) ** 2))[
        start : start + lines
    ]
    shifted = np.fft.ifftshift(kspace * window, axes=(-2, -1))
    images = np.fft.fftshift(np.fft.ifft2(shifted, norm="ortho"), axes=(-2, -1))
    return images / np.sqrt((np.abs(images) ** 2).sum(axis=-3, keepdims=True))


def test_acs_maps_match_numpy_and_are_normalised(phantom):
    kspace = phantom.kspace[None]
    maps = acs_maps(kspace, ACS)
    np.testing.assert_allclose(maps.numpy(), _numpy_acs_maps(kspace.numpy(), ACS, 0.7), atol=1e-12)
    power = maps.abs().square().sum(1)
    torch.testing.assert_close(power, torch.ones_like(power), rtol=0, atol=1e-12)


def test_acs_maps_line_sources_agree(phantom):
    """A count, a mask with outer lines, and detection from the k-space give the same maps."""
    mask = torch.zeros(N)
    mask[N // 2 - ACS // 2 : N // 2 + ACS // 2] = 1
    mask[2::4] = 1  # outer lines 50 and 78 leave gaps at 51 and 76
    masked = phantom.kspace[None] * mask
    expected = acs_maps(masked, ACS)
    torch.testing.assert_close(acs_maps(masked, mask=mask[None]), expected, rtol=0, atol=0)
    torch.testing.assert_close(acs_maps(_acs_only(phantom.kspace, ACS)[None]), expected)


def test_acs_maps_zero_where_rss_is_zero():
    kspace = torch.zeros(2, 3, 16, 16, dtype=torch.complex64)
    kspace[0, :, 8, 8] = torch.tensor([1, 1j, -1])
    maps = acs_maps(kspace, 4)
    assert (maps[1] == 0).all()
    torch.testing.assert_close(maps[0].abs().square().sum(0), torch.ones(16, 16))


def test_center_lines():
    mask = torch.zeros(320)
    mask[148:172] = 1
    mask[::8] = 1
    assert center_lines(mask) == (148, 24)  # the outer lines 144 and 176 are not adjacent
    batch = torch.zeros(2, 1, 1, 21, dtype=torch.bool)
    batch[0, ..., 7:14] = True
    batch[1, ..., 9:16] = True
    assert center_lines(batch) == (9, 5)
    with pytest.raises(MaskError, match="centre line 160"):
        center_lines(torch.ones(320).index_fill(0, torch.tensor([160]), 0))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda k: espirit_maps(k.real), ShapeError, "complex"),
        (lambda k: acs_maps(k[0], 8), ShapeError, r"\(batch, coil, H, W\)"),
        (
            lambda k: espirit_maps(k.index_fill(-1, torch.tensor([3]), float("nan"))),
            InvalidDataError,
            "NaN",
        ),
        (lambda k: espirit_maps(k, calib_width=40), ShapeError, "calib_width"),
        (lambda k: espirit_maps(k, kernel_width=30), ShapeError, "kernel_width"),
        (lambda k: espirit_maps(_acs_only(k, 4), kernel_width=6), ShapeError, r"24 x 4"),
        (lambda k: espirit_maps(k, thresh=1.5), ConfigError, "thresh"),
        (lambda k: espirit_maps(k.index_fill(-1, torch.tensor([16]), 0)), MaskError, "centre line"),
        (lambda k: acs_maps(k, 40), ShapeError, "num_low_frequencies"),
        (lambda k: acs_maps(k, mask=torch.ones(31)), ShapeError, "W=32"),
        (lambda k: acs_maps(k, mask=torch.zeros(32)), MaskError, "centre line"),
    ],
)
def test_bad_input(call, error, match):
    kspace = simulate_multicoil((32, 32), 2, seed=3).kspace[None]
    with pytest.raises(error, match=match):
        call(kspace)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(support):
    kspace = simulate_multicoil((N, N), COILS, seed=0).kspace[None]
    for estimate in (espirit_maps, acs_maps):
        cpu, cuda = estimate(kspace), estimate(kspace.cuda())
        assert cuda.is_cuda
        assert _abs_cosine(cuda[0].cpu(), cpu[0])[support].mean() > 0.999
