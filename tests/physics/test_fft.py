"""FFTs against numpy.fft, both conventions, even and odd sizes."""

import numpy as np
import pytest
import torch

from kscan.errors import ShapeError
from kscan.physics.fft import complex_to_real, fft2c, ifft2c, real_to_complex

SHAPES = [(2, 3, 16, 12), (1, 7, 9), (5, 8)]


def _random(shape, seed=0, dtype=np.complex128):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_centered_matches_numpy(shape):
    x = _random(shape)
    axes = (-2, -1)
    ref_f = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=axes), norm="ortho"), axes=axes)
    ref_i = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(x, axes=axes), norm="ortho"), axes=axes)
    np.testing.assert_allclose(fft2c(torch.from_numpy(x)).numpy(), ref_f, atol=1e-12)
    np.testing.assert_allclose(ifft2c(torch.from_numpy(x)).numpy(), ref_i, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_uncentered_matches_numpy(shape):
    x = _random(shape, seed=1)
    np.testing.assert_allclose(
        fft2c(torch.from_numpy(x), centered=False).numpy(), np.fft.fft2(x, norm="ortho"), atol=1e-12
    )
    np.testing.assert_allclose(
        ifft2c(torch.from_numpy(x), centered=False).numpy(),
        np.fft.ifft2(x, norm="ortho"),
        atol=1e-12,
    )


@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_inverse_and_unitary(shape, centered):
    x = torch.from_numpy(_random(shape, seed=2))
    k = fft2c(x, centered=centered)
    torch.testing.assert_close(ifft2c(k, centered=centered), x)
    # Parseval: the orthonormal transform keeps the energy.
    torch.testing.assert_close(k.abs().square().sum(), x.abs().square().sum())


def test_zero_frequency_is_centered():
    x = torch.ones(9, 8, dtype=torch.complex128)
    k = fft2c(x)
    peak = divmod(int(k.abs().argmax()), 8)
    assert peak == (9 // 2, 8 // 2)


def test_real_layout_round_trip():
    x = torch.from_numpy(_random((3, 4, 5)))
    r = complex_to_real(x)
    assert r.shape == (3, 4, 5, 2)
    torch.testing.assert_close(r[..., 0], x.real)
    torch.testing.assert_close(real_to_complex(r), x)
    # Non-contiguous inputs (e.g. a permuted fastMRI tensor) are accepted.
    torch.testing.assert_close(real_to_complex(r.transpose(0, 1)), x.transpose(0, 1))


def test_real_layout_rejects_bad_input():
    with pytest.raises(ShapeError, match=r"\(\.\.\., 2\)"):
        real_to_complex(torch.zeros(3, 4))
    with pytest.raises(ShapeError, match="complex"):
        complex_to_real(torch.zeros(3, 2))


def test_gradients_flow():
    x = torch.from_numpy(_random((4, 6), seed=3)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fft2c(t), (x,))
    assert torch.autograd.gradcheck(lambda t: ifft2c(t, centered=False), (x,))
