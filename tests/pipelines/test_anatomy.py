"""Anatomy-like phantoms: seeding, classes, intensities, phase, 3D coherence, bad input."""

import numpy as np
import pytest

from kscan.errors import ConfigError, KscanError, ShapeError
from kscan.pipelines.anatomy import (
    DEFAULT_INTENSITIES,
    TISSUE_CLASSES,
    anatomy_phantom,
    smooth_phase,
)

TABLE = np.array([0.0] + [DEFAULT_INTENSITIES[k] for k in range(1, 6)], dtype=np.float32)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Multi-class Dice over the tissue classes 1..5 (voxels with the same non-zero label)."""
    agree = np.sum((a == b) & (a > 0))
    return float(2 * agree / (np.sum(a > 0) + np.sum(b > 0)))


def test_seeded():
    a, b = anatomy_phantom((64, 80), 3), anatomy_phantom((64, 80), 3)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    c = anatomy_phantom((64, 80), 4)
    assert not np.array_equal(a.labels, c.labels) and not np.array_equal(a.image, c.image)
    # A numpy Generator is a seed too: a fresh one from 3 gives the int seed's phantom.
    g = anatomy_phantom((64, 80), np.random.default_rng(3))
    np.testing.assert_array_equal(a.image, g.image)


@pytest.mark.parametrize("shape", [(64, 64), (71, 65), (320, 320), (3, 96, 64)])
def test_every_class_present(shape):
    p = anatomy_phantom(shape, 11, num_lesions=2)
    assert p.image.shape == p.labels.shape == shape
    assert p.image.dtype == np.complex64 and p.labels.dtype == np.uint8
    assert set(np.unique(p.labels)) == set(TISSUE_CLASSES) == set(range(6))


def test_lesions_optional():
    with_lesions = anatomy_phantom((96, 96), 5, num_lesions=3)
    without = anatomy_phantom((96, 96), 5, num_lesions=0)
    assert 5 in with_lesions.labels and 5 not in without.labels
    # Lesions are painted over tissue only; the rest of the anatomy is the same.
    lesion = with_lesions.labels == 5
    np.testing.assert_array_equal(with_lesions.labels[~lesion], without.labels[~lesion])
    assert set(np.unique(without.labels[lesion])) <= {2, 3}
    np.testing.assert_array_equal(with_lesions.image[~lesion], without.image[~lesion])
    # By default the count comes from the seed: some phantoms have none, some have lesions.
    counts = [len(np.unique(anatomy_phantom((64, 64), s).labels)) for s in range(24)]
    assert {5, 6} <= set(counts)


def test_intensities_follow_labels():
    flat = anatomy_phantom((128, 96), 2, texture=0.0, num_lesions=2)
    np.testing.assert_allclose(np.abs(flat.image), TABLE[flat.labels], rtol=1e-6)
    textured = anatomy_phantom((128, 96), 2, texture=0.1, num_lesions=2)
    np.testing.assert_array_equal(textured.labels, flat.labels)
    magnitude = np.abs(textured.image)
    for k, value in DEFAULT_INTENSITIES.items():
        ratio = magnitude[flat.labels == k] / value
        assert ratio.min() >= 0.9 - 1e-6 and ratio.max() <= 1.1 + 1e-6, TISSUE_CLASSES[k]
        assert abs(ratio.mean() - 1) < 0.1, TISSUE_CLASSES[k]
    tissue = magnitude[flat.labels == 2] / DEFAULT_INTENSITIES[2]
    assert tissue.std() > 0.01  # the texture is there
    assert np.all(magnitude[flat.labels == 0] == 0)
    custom = anatomy_phantom((128, 96), 2, texture=0.0, intensities={4: 0.3})
    assert np.allclose(np.abs(custom.image[custom.labels == 4]), 0.3)


def test_phase_is_smooth_and_bounded():
    p = anatomy_phantom((128, 128), 6, phase=2.0, texture=0.0)
    assert np.iscomplexobj(p.image) and np.abs(np.angle(p.image)).max() < 2.0
    inside = p.labels > 0
    step = np.abs(np.angle(p.image[1:] * np.conj(p.image[:-1])))[inside[1:] & inside[:-1]]
    assert 0 < step.max() < 0.1  # varies, but slowly: well under 0.1 rad per pixel
    assert np.all(anatomy_phantom((64, 64), 6, phase=0.0).image.imag == 0)
    field = smooth_phase((2, 64, 48), 1, amplitude=1.5)
    assert field.shape == (2, 64, 48) and field.dtype == np.float32
    assert np.abs(field).max() < 1.5 and field.std() > 0.01
    np.testing.assert_array_equal(field, smooth_phase((2, 64, 48), 1, amplitude=1.5))


def test_volume_is_coherent_across_slices():
    volume = anatomy_phantom((12, 96, 96), 8, num_lesions=3).labels
    dice = [_dice(volume[s], volume[s + 1]) for s in range(11)]
    assert min(dice) > 0.8
    assert 5 in volume  # lesions sit on slices of the volume
    # Independent 2D phantoms of different seeds overlap much less.
    independent = [
        _dice(anatomy_phantom((96, 96), s).labels, anatomy_phantom((96, 96), s + 50).labels)
        for s in range(6)
    ]
    assert np.mean(independent) < 0.8


@pytest.mark.parametrize("seed", range(5))
def test_object_fits_the_centred_square(seed):
    labels = anatomy_phantom((64, 128), seed).labels
    assert not labels[:, :32].any() and not labels[:, 96:].any()
    assert not labels[0].any() and not labels[-1].any()


@pytest.mark.parametrize(
    "kwargs, error, text",
    [
        ({"shape": (32, 64)}, ShapeError, "H, W >= 64"),
        ({"shape": (64,)}, ShapeError, "got (64,)"),
        ({"shape": (0, 64, 64)}, ShapeError, "slices >= 1"),
        ({"num_lesions": -1}, ConfigError, "num_lesions"),
        ({"num_lesions": 1.5}, ConfigError, "num_lesions"),
        ({"texture": 1.5}, ConfigError, "texture"),
        ({"deformation": -0.1}, ConfigError, "deformation"),
        ({"slab": 0}, ConfigError, "slab"),
        ({"intensities": {7: 1.0}}, ConfigError, "intensities"),
        ({"intensities": {2: -1.0}}, ConfigError, "intensities"),
    ],
)
def test_bad_input(kwargs, error, text):
    kwargs = {"shape": (64, 64), **kwargs}
    with pytest.raises(error) as info:
        anatomy_phantom(**kwargs)
    message = str(info.value)
    assert isinstance(info.value, KscanError) and text in message and "\n" not in message
