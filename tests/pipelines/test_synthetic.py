"""The simulated phantom and volumes: coil maps, consistent k-space, seeded noise, targets."""

import os

import numpy as np
import pytest
import torch

from kscan.errors import ConfigError, InvalidDataError, KscanError, ShapeError
from kscan.physics.coils import reduce
from kscan.physics.fft import ifft2c
from kscan.pipelines.anatomy import DEFAULT_INTENSITIES
from kscan.pipelines.synthetic import (
    SimulatedVolume,
    birdcage_maps,
    from_magnitude,
    random_birdcage_maps,
    rss_target,
    shepp_logan,
    simulate_multicoil,
    simulate_volume,
)


def test_maps_are_normalised_and_distinct():
    maps = birdcage_maps(8, (40, 36))
    assert maps.shape == (8, 40, 36) and maps.dtype == torch.complex64
    torch.testing.assert_close(maps.abs().square().sum(0), torch.ones(40, 36))
    # Coils see different regions: the brightest pixel moves with the coil.
    peaks = {int(m.abs().argmax()) for m in maps}
    assert len(peaks) == 8


def test_phantom_range_and_phase():
    x = shepp_logan((64, 48))
    assert x.shape == (64, 48)
    assert 0.9 < float(x.abs().max()) <= 1.0 + 1e-6
    assert float(x.angle().abs().max()) > 0.1
    assert float(shepp_logan((64, 48), phase=0.0).imag.abs().max()) == 0.0


def test_noiseless_kspace_is_consistent():
    p = simulate_multicoil((32, 32), 4, noise=0.0)
    torch.testing.assert_close(reduce(ifft2c(p.kspace), p.maps), p.image, atol=1e-5, rtol=1e-5)


def test_noise_is_seeded_and_scaled():
    a, b, c = (simulate_multicoil((32, 32), 4, noise=0.05, seed=s) for s in (1, 1, 2))
    torch.testing.assert_close(a.kspace, b.kspace)
    assert not torch.equal(a.kspace, c.kspace)
    clean = simulate_multicoil((32, 32), 4, noise=0.0).kspace
    rel = (a.kspace - clean).abs().square().mean().sqrt() / clean.abs().square().mean().sqrt()
    assert 0.04 < float(rel) < 0.06


def test_bad_shape():
    with pytest.raises(ShapeError, match=r"\(H, W\)"):
        shepp_logan((4, 64))


# --- Rotated, scaled and random birdcages -----------------------------------------------------


def test_birdcage_rotation_scale_extent():
    plain = birdcage_maps(8, (33, 40))
    # Rotating the ring by one coil spacing renumbers the coils.
    rotated = birdcage_maps(8, (33, 40), rotation=2 * np.pi / 8)
    torch.testing.assert_close(rotated, torch.roll(plain, -1, dims=0))
    torch.testing.assert_close(
        birdcage_maps(8, (33, 40), scale=(2.0, 2.0)), birdcage_maps(8, (33, 40), radius=3.0)
    )
    # A grid twice as tall with extent 2 holds the unit grid in its central half.
    tall = birdcage_maps(8, (65, 40), extent=(2.0, 1.0))
    torch.testing.assert_close(tall[:, 16:49], plain)


def test_random_birdcage_maps():
    for coils in (4, 32):
        maps = random_birdcage_maps(coils, (48, 40), seed=3)
        assert maps.shape == (coils, 48, 40)
        torch.testing.assert_close(maps.abs().square().sum(0), torch.ones(48, 40))
    torch.testing.assert_close(
        random_birdcage_maps(8, (48, 40), 3), random_birdcage_maps(8, (48, 40), 3)
    )
    assert not torch.allclose(
        random_birdcage_maps(8, (48, 40), 3), random_birdcage_maps(8, (48, 40), 4)
    )
    # The random ring is a rotated, scaled birdcage, not the plain one.
    assert not torch.allclose(random_birdcage_maps(8, (48, 40), 3), birdcage_maps(8, (48, 40)))


# --- Simulated volumes ------------------------------------------------------------------------

KSPACE, RECON = (128, 96), (64, 64)
TOP, LEFT = (KSPACE[0] - RECON[0]) // 2, (KSPACE[1] - RECON[1]) // 2


def _np_ifft2c(k: np.ndarray) -> np.ndarray:
    """Independent centered orthonormal inverse FFT over the last two axes."""
    axes = (-2, -1)
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=axes), norm="ortho"), axes=axes)


def _simulate(**kwargs) -> SimulatedVolume:
    options = {
        "shape_kspace": KSPACE,
        "recon_size": RECON,
        "slices": 4,
        "coils": 6,
        "snr_db": 20.0,
        "seed": 1,
        "num_lesions": 2,
    }
    return simulate_volume(**{**options, **kwargs})


@pytest.fixture(scope="module")
def noisy() -> SimulatedVolume:
    return _simulate()


@pytest.fixture(scope="module")
def clean() -> SimulatedVolume:
    return _simulate(snr_db=None)


def test_volume_layout(noisy):
    assert noisy.kspace.shape == (4, 6, *KSPACE) and noisy.kspace.dtype == np.complex64
    assert noisy.target.shape == (4, *RECON) and noisy.target.dtype == np.float32
    assert noisy.labels.shape == (4, *RECON) and noisy.labels.dtype == np.uint8
    assert noisy.maps.shape == (4, 6, *KSPACE) and noisy.maps.dtype == np.complex64
    assert noisy.image.shape == (4, *KSPACE) and noisy.image.dtype == np.complex64
    assert set(np.unique(noisy.labels)) == set(range(6))
    np.testing.assert_allclose((np.abs(noisy.maps) ** 2).sum(1), 1.0, rtol=1e-5)


def test_volume_is_seeded(noisy, clean):
    again = _simulate()
    for name in ("kspace", "target", "labels", "maps", "image"):
        np.testing.assert_array_equal(getattr(noisy, name), getattr(again, name))
    other = _simulate(seed=2)
    for name in ("kspace", "target", "labels", "maps", "image"):
        assert not np.array_equal(getattr(noisy, name), getattr(other, name)), name
    # Noise draws from its own stream: the noiseless volume of the seed has the same anatomy.
    np.testing.assert_array_equal(noisy.image, clean.image)
    np.testing.assert_array_equal(noisy.labels, clean.labels)


def test_target_is_the_rss_crop(noisy):
    coil_images = _np_ifft2c(noisy.kspace.astype(np.complex128))
    crop = coil_images[..., TOP : TOP + RECON[0], LEFT : LEFT + RECON[1]]
    expected = np.sqrt((np.abs(crop) ** 2).sum(axis=1))
    np.testing.assert_allclose(noisy.target, expected, rtol=1e-5, atol=1e-6 * expected.max())
    np.testing.assert_array_equal(rss_target(noisy.kspace, RECON), noisy.target)


def test_odd_sizes_follow_fastmri_crop():
    rng = np.random.default_rng(0)
    kspace = (
        rng.standard_normal((2, 3, 37, 30)) + 1j * rng.standard_normal((2, 3, 37, 30))
    ).astype(np.complex64)
    crop = _np_ifft2c(kspace.astype(np.complex128))[
        ..., 8:28, 4:25
    ]  # starts (37-20)//2, (30-21)//2
    expected = np.sqrt((np.abs(crop) ** 2).sum(axis=1))
    np.testing.assert_allclose(rss_target(kspace, (20, 21)), expected, rtol=1e-5)
    odd = simulate_volume((97, 75), (64, 65), slices=1, coils=4, snr_db=None)
    np.testing.assert_allclose(odd.target, np.abs(odd.image[:, 16:80, 5:70]), atol=1e-5)
    _check_forward_model(odd)


def _check_forward_model(sim: SimulatedVolume) -> None:
    """Noiseless k-space is the centered FFT (numpy) of each coil's view of the image."""
    axes = (-2, -1)
    coil_images = np.fft.ifftshift(sim.maps * sim.image[:, None], axes=axes)
    expected = np.fft.fftshift(np.fft.fft2(coil_images, norm="ortho"), axes=axes)
    np.testing.assert_allclose(sim.kspace, expected, atol=1e-5 * np.abs(expected).max())


def test_kspace_sees_image_through_coils(clean):
    _check_forward_model(clean)


def test_object_in_central_crop_and_labels_aligned(clean):
    outside = np.ones(KSPACE, dtype=bool)
    outside[TOP : TOP + RECON[0], LEFT : LEFT + RECON[1]] = False
    assert np.all(clean.image[:, outside] == 0)
    # Noiseless with sum |S|^2 = 1: the RSS target is the phantom's magnitude, voxel by voxel.
    np.testing.assert_allclose(
        clean.target, np.abs(clean.image[:, ~outside].reshape(4, *RECON)), atol=1e-5
    )
    assert np.all(clean.target[clean.labels == 0] < 1e-5)
    for k, value in DEFAULT_INTENSITIES.items():
        assert abs(clean.target[clean.labels == k].mean() / value - 1) < 0.1, k


def test_snr(noisy, clean):
    noise = noisy.kspace.astype(np.complex128) - clean.kspace
    signal_power = np.mean(np.abs(clean.kspace.astype(np.complex128)) ** 2)
    ratio = signal_power / np.mean(np.abs(noise) ** 2)
    assert abs(ratio / 10 ** (20.0 / 10) - 1) < 0.1
    assert abs(np.mean(np.abs(noise) ** 2) / noisy.noise_std**2 - 1) < 0.1
    assert abs(np.mean(noise.real**2) / np.mean(noise.imag**2) - 1) < 0.1
    assert clean.noise_std == 0.0


def test_2d_slices_are_independent():
    def mean_dice(labels: np.ndarray) -> float:
        same = [
            np.sum((a == b) & (a > 0)) * 2 / (np.sum(a > 0) + np.sum(b > 0))
            for a, b in zip(labels[:-1], labels[1:], strict=True)
        ]
        return float(np.mean(same))

    volume = _simulate(dims=3, slices=6, snr_db=None)
    slices = _simulate(dims=2, slices=6, snr_db=None)
    assert mean_dice(volume.labels) > 0.8 > mean_dice(slices.labels)


# --- Retrospective simulation of a real volume ------------------------------------------------


@pytest.fixture(scope="module")
def anatomical() -> np.ndarray:
    nib = pytest.importorskip("nibabel")
    from nibabel.testing import data_path

    return np.asarray(nib.load(os.path.join(data_path, "anatomical.nii")).dataobj)


def test_from_magnitude_round_trip(anatomical):
    x, y, z = anatomical.shape
    sim = from_magnitude(anatomical, coils=8, seed=0, slice_axis=-1)
    assert sim.kspace.shape == (z, 8, x, y) and sim.target.shape == (z, x, y) and sim.labels is None
    expected = np.clip(np.moveaxis(anatomical, -1, 0), 0, None).astype(np.float64)
    combined = (np.conj(sim.maps) * _np_ifft2c(sim.kspace.astype(np.complex128))).sum(axis=1)
    scale = expected.max()
    np.testing.assert_allclose(np.abs(combined), expected, atol=1e-5 * scale)
    np.testing.assert_allclose(sim.target, expected, atol=1e-5 * scale)
    # The synthetic phase is really there, and the coils see different parts of the image.
    inside = expected > 0.2 * scale
    assert np.ptp(np.angle(combined[inside])) > 0.5
    assert np.all(np.abs(sim.kspace).max(axis=(2, 3)) > 0)


def test_from_magnitude_padding_and_noise(anatomical):
    sim = from_magnitude(
        anatomical, coils=4, seed=1, slice_axis=2, shape_kspace=(66, 48), snr_db=25.0
    )
    assert sim.kspace.shape == (25, 4, 66, 48) and sim.target.shape == (25, 33, 41)
    assert sim.noise_std > 0
    twin = from_magnitude(
        anatomical, coils=4, seed=1, slice_axis=2, shape_kspace=(66, 48), snr_db=25.0
    )
    np.testing.assert_array_equal(sim.kspace, twin.kspace)
    one_slice = from_magnitude(anatomical[:, :, 12], coils=4)
    assert one_slice.kspace.shape == (1, 4, 33, 41)


@pytest.mark.parametrize(
    "kwargs, error, text",
    [
        ({"shape_kspace": (128, 60), "recon_size": (64, 64)}, ShapeError, "shape_kspace"),
        ({"shape_kspace": (64, 64), "recon_size": (64, 48)}, ShapeError, "recon_size"),
        ({"recon_size": (32, 32)}, ShapeError, "recon_size"),
        ({"coils": 3}, ConfigError, "coils"),
        ({"coils": 33}, ConfigError, "coils"),
        ({"dims": 4}, ConfigError, "dims"),
        ({"slices": 0}, ConfigError, "slices"),
        ({"snr_db": float("nan")}, ConfigError, "snr_db"),
    ],
)
def test_simulate_volume_bad_input(kwargs, error, text):
    with pytest.raises(error) as info:
        _simulate(**kwargs)
    assert (
        isinstance(info.value, KscanError)
        and text in str(info.value)
        and "\n" not in str(info.value)
    )


@pytest.mark.parametrize(
    "volume, kwargs, error, text",
    [
        (np.ones((4, 32, 32, 2)), {}, ShapeError, "volume"),
        (np.ones((4, 32, 32), dtype=np.complex64), {}, ShapeError, "volume"),
        (np.ones((4, 8, 32)), {}, ShapeError, "16x16"),
        (np.zeros((4, 32, 32)), {}, InvalidDataError, "<= 0"),
        (np.full((4, 32, 32), np.nan), {}, InvalidDataError, "NaN"),
        (np.ones((4, 32, 32)), {"slice_axis": 3}, ConfigError, "slice_axis"),
        (np.ones((4, 32, 32)), {"coils": 64}, ConfigError, "coils"),
        (np.ones((4, 32, 32)), {"shape_kspace": (16, 64)}, ShapeError, "shape_kspace"),
    ],
)
def test_from_magnitude_bad_input(volume, kwargs, error, text):
    with pytest.raises(error) as info:
        from_magnitude(volume, **kwargs)
    assert text in str(info.value) and "\n" not in str(info.value)
