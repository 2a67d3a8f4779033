"""The simulated phantom: normalised coil maps, consistent k-space, seeded noise."""

import pytest
import torch

from kscan.errors import ShapeError
from kscan.physics.coils import reduce
from kscan.physics.fft import ifft2c
from kscan.pipelines.synthetic import birdcage_maps, shepp_logan, simulate_multicoil


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
