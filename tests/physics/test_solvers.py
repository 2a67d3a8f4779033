"""Classical reconstructions: identities, dense references, phantom quality, batching, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import pywt
import torch

from kscan.errors import ConfigError, InvalidDataError, MaskError, ShapeError
from kscan.physics import finite_difference, solvers, wavelets
from kscan.physics.sense import SenseOperator
from kscan.pipelines.synthetic import simulate_multicoil

C128 = torch.complex128


def crandn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, dtype=C128, generator=torch.Generator().manual_seed(seed))


def center_lines(width: int, fraction: float) -> slice:
    """fastMRI's centre: ``round(W * fraction)`` lines from ``(W - n + 1) // 2``."""
    n = round(width * fraction)
    start = (width - n + 1) // 2
    return slice(start, start + n)


def equispaced_mask(width: int, acceleration: int, fraction: float) -> torch.Tensor:
    mask = torch.zeros(width)
    mask[::acceleration] = 1
    mask[center_lines(width, fraction)] = 1
    return mask


def random_mask(width: int, acceleration: int, fraction: float, seed: int) -> torch.Tensor:
    n = round(width * fraction)
    keep = np.random.default_rng(seed).uniform(size=width) < (width / acceleration - n) / (
        width - n
    )
    mask = torch.from_numpy(keep).float()
    mask[center_lines(width, fraction)] = 1
    return mask


def nrmse(image: torch.Tensor, target: torch.Tensor) -> float:
    """Of the magnitude of a (1, H, W) reconstruction against a magnitude (H, W)."""
    return float(torch.linalg.norm(image[0].abs() - target) / torch.linalg.norm(target))


@pytest.fixture(scope="module")
def phantom():
    """96x96, 8 coils, noise 0.01: (k-space (1, 8, H, W), maps (1, 8, H, W), |image| (H, W))."""
    p = simulate_multicoil((96, 96), 8, noise=0.01, seed=0)
    return p.kspace.unsqueeze(0), p.maps.unsqueeze(0), p.image.abs()


@pytest.fixture(scope="module")
def phantom_8x(phantom):
    kspace, maps, target = phantom
    mask = random_mask(96, 8, 0.04, seed=0)
    masked = kspace * mask
    zf = solvers.zero_filled(masked, mask, maps)
    sense = solvers.cg_sense(masked, mask, maps)
    return masked, mask, maps, target, nrmse(zf.image, target), nrmse(sense.image, target)


def small_problem(batch: int = 1, size: int = 16, seed: int = 0):
    """Complex128 k-space, a 4x mask and normalised random maps, 4 coils."""
    maps = crandn(batch, 4, size, size, seed=seed)
    maps = maps / maps.abs().square().sum(1, keepdim=True).sqrt()
    mask = equispaced_mask(size, 4, 0.125).double()
    kspace = SenseOperator(maps, mask).forward(crandn(batch, size, size, seed=seed + 1))
    return kspace + 0.01 * crandn(batch, 4, size, size, seed=seed + 2) * mask, mask, maps


# --- zero-filled ---------------------------------------------------------------------------------


def test_zero_filled_matches_numpy_definitions() -> None:
    kspace, mask, maps = small_problem(batch=2)
    k = kspace.numpy() * mask.numpy()
    coil_images = np.fft.fftshift(
        np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"), axes=(-2, -1)
    )
    rss = solvers.zero_filled(kspace, mask)
    assert not rss.image.is_complex() and rss.iterations == 0 and rss.converged
    np.testing.assert_allclose(
        rss.image.numpy(), np.sqrt((np.abs(coil_images) ** 2).sum(1)), rtol=1e-12
    )
    sense = solvers.zero_filled(kspace, mask, maps)
    expected = (np.conj(maps.numpy()) * coil_images).sum(1)
    np.testing.assert_allclose(sense.image.numpy(), expected, rtol=1e-10, atol=1e-12)
    assert sense.history.shape == (0, 2)


# --- CG-SENSE ------------------------------------------------------------------------------------


def test_cg_sense_matches_dense_tikhonov_solve() -> None:
    kspace, mask, maps = small_problem(size=12)
    op = SenseOperator(maps, mask)
    n = 144
    basis = torch.eye(n, dtype=C128).reshape(n, 12, 12)
    a = torch.stack([op.forward(e.unsqueeze(0)).flatten() for e in basis], dim=1)
    lam = 0.01
    expected = torch.linalg.solve(
        a.mH @ a + lam * torch.eye(n, dtype=C128), a.mH @ kspace.flatten()
    )
    result = solvers.cg_sense(kspace, mask, maps, lam=lam, max_iter=500, tol=1e-12)
    assert result.converged
    torch.testing.assert_close(result.image.flatten(), expected, rtol=1e-9, atol=1e-10)
    # The history is the regularised least-squares residual of the final image.
    misfit = (
        a @ expected - (kspace * mask).flatten()
    ).norm().square() + lam * expected.norm().square()
    torch.testing.assert_close(
        result.history[-1, 0], misfit.sqrt() / (kspace * mask).norm(), rtol=1e-8, atol=0
    )


def test_cg_sense_beats_zero_filled_at_4x_with_a_non_increasing_history(phantom) -> None:
    kspace, maps, target = phantom
    mask = equispaced_mask(96, 4, 0.08)
    masked = kspace * mask
    result = solvers.cg_sense(masked, mask, maps)
    zf = solvers.zero_filled(masked, mask, maps)
    assert result.converged and 5 < result.iterations <= 100
    history = result.history[:, 0]
    assert bool((history[1:] <= history[:-1] * (1 + 1e-5)).all())
    assert nrmse(result.image, target) < 0.1 < 0.3 < nrmse(zf.image, target)


# --- wavelets and L1-wavelet CS -------------------------------------------------------------------


def test_wavelet_transform_is_orthogonal_and_reconstructs() -> None:
    transform = wavelets.Wavelet2d((16, 16), "db4", levels=2)
    basis = torch.eye(256, dtype=C128).reshape(256, 16, 16)
    matrix = transform.forward(basis)  # row i: W e_i, so this is W^T
    torch.testing.assert_close(matrix @ matrix.mH, torch.eye(256, dtype=C128), rtol=0, atol=1e-12)
    torch.testing.assert_close(matrix.mH @ matrix, torch.eye(256, dtype=C128), rtol=0, atol=1e-12)
    x = crandn(3, 16, 16, seed=3)
    torch.testing.assert_close(transform.adjoint(transform.forward(x)), x, rtol=0, atol=1e-12)


def test_wavelet_tight_frame_on_sizes_not_divisible_by_two_to_the_levels() -> None:
    transform = wavelets.Wavelet2d((30, 26), "db4", levels=2)
    x = crandn(2, 30, 26, seed=4)
    c = transform.forward(x)
    assert c.shape[1] >= 30 * 26
    torch.testing.assert_close(transform.adjoint(c), x, rtol=0, atol=1e-12)
    d = crandn(*c.shape, seed=5)
    lhs = (c.conj() * d).sum()
    rhs = (x.conj() * transform.adjoint(d)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


def test_haar_coefficients_match_pywavelets_periodization() -> None:
    x = crandn(1, 16, 16, seed=6)
    transform = wavelets.Wavelet2d((16, 16), "haar", levels=2)
    ours = transform.forward(x)[0].numpy()
    ref = pywt.wavedec2(x[0].numpy(), "haar", mode="periodization", level=2)
    # ptwt orders each level's detail bands (vertical, horizontal, diagonal) in pywt's terms.
    bands = [ref[0]] + [b for cH, cV, cD in ref[1:] for b in (cV, cH, cD)]
    np.testing.assert_allclose(ours, np.concatenate([b.ravel() for b in bands]), rtol=0, atol=1e-12)


def test_cs_wavelet_with_full_sampling_is_soft_thresholding() -> None:
    """With ``A^H A = I`` the minimiser is ``W^T soft(W A^H y, tau)`` on the detail bands."""
    maps = crandn(1, 4, 16, 16, seed=7)
    maps = maps / maps.abs().square().sum(1, keepdim=True).sqrt()
    mask = torch.ones(16, dtype=torch.float64)
    kspace = SenseOperator(maps, mask).forward(crandn(1, 16, 16, seed=8))
    lam = 0.05
    result = solvers.cs_wavelet(kspace, mask, maps, lam=lam, levels=2, max_iter=200, tol=1e-13)
    zf = solvers.zero_filled(kspace, mask, maps).image
    transform = wavelets.Wavelet2d((16, 16), "db4", levels=2)
    c = transform.forward(zf)[0]
    tau = lam * zf.abs().max()
    shrunk = c * torch.clamp(c.abs() - tau, min=0) / c.abs()
    shrunk[: transform.num_approx] = c[: transform.num_approx]
    assert 0 < int((shrunk == 0).sum()) < c.numel()
    torch.testing.assert_close(
        result.image[0], transform.adjoint(shrunk[None])[0], rtol=1e-9, atol=1e-10
    )


def test_power_iteration_finds_the_largest_eigenvalue() -> None:
    kspace, mask, maps = small_problem(size=12, seed=9)
    op = SenseOperator(maps, mask)
    basis = torch.eye(144, dtype=C128).reshape(144, 12, 12)
    normal = torch.stack([op.normal(e.unsqueeze(0)).flatten() for e in basis], dim=1)
    exact = torch.linalg.eigvalsh(normal).max()
    estimate = solvers.largest_eigenvalue(op.normal, kspace[:, 0], max_iter=500, tol=1e-10)
    assert float(estimate[0]) <= float(exact) * (1 + 1e-10)
    assert float(estimate[0]) >= float(exact) * (1 - 1e-3)


def test_cs_wavelet_reduces_the_error_at_8x(phantom_8x) -> None:
    masked, mask, maps, target, zf_error, sense_error = phantom_8x
    error = nrmse(solvers.cs_wavelet(masked, mask, maps).image, target)
    assert error < 0.7 * zf_error and error < sense_error


# --- total variation -----------------------------------------------------------------------------


def test_finite_differences_match_numpy_and_their_adjoint() -> None:
    x = crandn(2, 7, 5, seed=10)
    d = finite_difference.finite_difference(x)
    assert d.shape == (2, 2, 7, 5)
    xn = x.numpy()
    np.testing.assert_allclose(d[:, 0, :-1].numpy(), np.diff(xn, axis=1), rtol=0, atol=1e-14)
    np.testing.assert_allclose(d[:, 1, :, :-1].numpy(), np.diff(xn, axis=2), rtol=0, atol=1e-14)
    assert bool((d[:, 0, -1] == 0).all()) and bool((d[:, 1, :, -1] == 0).all())
    g = crandn(2, 2, 7, 5, seed=11)
    lhs = (d.conj() * g).sum()
    rhs = (x.conj() * finite_difference.finite_difference_adjoint(g)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-13, atol=1e-13)


def test_cs_tv_reduces_the_error_at_8x(phantom_8x) -> None:
    masked, mask, maps, target, zf_error, sense_error = phantom_8x
    error = nrmse(solvers.cs_tv(masked, mask, maps, max_iter=60).image, target)
    assert error < 0.5 * zf_error and error < 0.7 * sense_error


def test_cs_tv_history_and_convergence() -> None:
    kspace, mask, maps = small_problem(size=16, seed=12)
    result = solvers.cs_tv(kspace, mask, maps, lam=0.01, rho=0.01, max_iter=300, tol=1e-6)
    assert result.converged and result.iterations == result.history.shape[0] < 300
    assert float(result.history[-1, 0]) < 1e-6 <= float(result.history[-2, 0])


# --- batching, scale, devices ----------------------------------------------------------------------


SOLVERS = {
    "zero_filled": lambda k, m, s: solvers.zero_filled(k, m, s),
    "cg_sense": lambda k, m, s: solvers.cg_sense(k, m, s, lam=1e-3, tol=1e-8),
    "cs_wavelet": lambda k, m, s: solvers.cs_wavelet(
        k, m, s, lam=0.05, levels=2, max_iter=60, tol=1e-3
    ),
    "cs_tv": lambda k, m, s: solvers.cs_tv(k, m, s, lam=0.01, rho=0.01, max_iter=40, tol=1e-3),
}


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_a_batch_matches_single_runs(name: str) -> None:
    """Two items with different data and masks (so they stop at different iterations)."""
    first, second = small_problem(seed=20), small_problem(seed=30)
    kspace = torch.cat([first[0], second[0]])
    maps = torch.cat([first[2], second[2]])
    masks = torch.stack([first[1], random_mask(16, 3, 0.125, seed=1).double()]).view(2, 1, 1, 16)
    batch = SOLVERS[name](kspace, masks, maps)
    iterations = []
    for i in range(2):
        single = SOLVERS[name](kspace[i : i + 1], masks[i : i + 1], maps[i : i + 1])
        torch.testing.assert_close(batch.image[i : i + 1], single.image, rtol=1e-9, atol=1e-10)
        rows = single.history.shape[0]
        torch.testing.assert_close(
            batch.history[:rows, i], single.history[:, 0], rtol=1e-9, atol=1e-12
        )
        if rows:  # a converged item is frozen: its measure repeats
            assert bool((batch.history[rows - 1 :, i] == batch.history[rows - 1, i]).all())
        iterations.append(rows)
    assert batch.iterations == max(iterations) and batch.history.shape == (max(iterations), 2)
    assert name == "zero_filled" or iterations[0] != iterations[1]


@pytest.mark.parametrize("name", ["cg_sense", "cs_wavelet", "cs_tv"])
def test_solvers_are_scale_equivariant(name: str) -> None:
    kspace, mask, maps = small_problem(seed=40)
    base = SOLVERS[name](kspace, mask, maps)
    scaled = SOLVERS[name](1e3 * kspace, mask, maps)
    torch.testing.assert_close(scaled.image, 1e3 * base.image, rtol=1e-8, atol=1e-8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solvers_on_cuda_match_cpu(name: str) -> None:
    kspace, mask, maps = small_problem(batch=2, seed=50)
    cpu = SOLVERS[name](kspace, mask, maps)
    gpu = SOLVERS[name](kspace.cuda(), mask.cuda(), maps.cuda())
    assert gpu.image.is_cuda
    torch.testing.assert_close(gpu.image.cpu(), cpu.image, rtol=1e-7, atol=1e-8)


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_bad_inputs_raise_kscan_errors(name: str) -> None:
    solve = SOLVERS[name]
    kspace, mask, maps = small_problem()
    nan = kspace.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidDataError, match="kspace: contains 1 NaN"):
        solve(nan, mask, maps)
    with pytest.raises(ShapeError, match="kspace: expected a complex tensor"):
        solve(kspace.real, mask, maps)
    with pytest.raises(ShapeError, match=r"kspace: expected shape \(batch, coil, H, W\)"):
        solve(kspace[0], mask, maps)
    with pytest.raises(MaskError, match="samples no k-space point"):
        solve(kspace, torch.zeros_like(mask), maps)
    with pytest.raises(ShapeError, match="maps: expected the k-space shape"):
        solve(kspace, mask, maps[:, :2])
    with pytest.raises(ShapeError, match="mask"):
        solve(kspace, mask[:-1], maps)


def test_bad_settings_raise_config_errors() -> None:
    kspace, mask, maps = small_problem()
    with pytest.raises(ConfigError, match="lam"):
        solvers.cg_sense(kspace, mask, maps, lam=-1.0)
    with pytest.raises(ConfigError, match="max_iter"):
        solvers.cs_tv(kspace, mask, maps, max_iter=0)
    with pytest.raises(ConfigError, match="rho"):
        solvers.cs_tv(kspace, mask, maps, rho=0.0)
    with pytest.raises(ConfigError, match="not orthogonal"):
        solvers.cs_wavelet(kspace, mask, maps, wavelet="bior2.2")
    with pytest.raises(ConfigError, match="unknown wavelet"):
        solvers.cs_wavelet(kspace, mask, maps, wavelet="nope")
    with pytest.raises(ShapeError, match="levels: expected 1 to 2"):
        solvers.cs_wavelet(kspace, mask, maps, levels=3)
