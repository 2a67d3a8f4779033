"""Sampling masks: fastMRI equivalence, accelerations, centre lines, seeding, Poisson-disc, loading."""

import os

import h5py
import numpy as np
import pytest
import torch

from kscan.errors import FileFormatError, KscanError, MaskError, ShapeError
from kscan.physics import masks
from kscan.pipelines.mask_files import read_mask

NAMES = ["file1000001.h5", "file_brain_AXT2_200_2000019.h5", "file1001877.h5"]


# --- fastMRI equivalence ------------------------------------------------------------------------


def _fastmri_lines(kind, width, center_fractions, accelerations, seed):
    """fastMRI's 1D masks restated from their documented formulas (SPECS.md section 1)."""
    rng = np.random.RandomState(seed)
    pick = rng.randint(len(accelerations))  # fastMRI draws the (fraction, acceleration) pair first
    fraction, accel = center_fractions[pick], accelerations[pick]
    n_low = round(width * fraction)
    lines = np.zeros(width)
    if kind == "random":
        lines = (rng.uniform(size=width) < (width / accel - n_low) / (width - n_low)).astype(float)
    elif kind == "equispaced":
        lines[rng.randint(0, accel) :: accel] = 1
    else:
        spacing = accel * (n_low - width) / (n_low * accel - width)
        start = rng.randint(0, round(spacing))
        lines[np.around(np.arange(start, width - 1, spacing)).astype(int)] = 1
    first = (width - n_low + 1) // 2
    lines[first : first + n_low] = 1
    return lines, n_low


@pytest.mark.parametrize("kind", ["random", "equispaced", "equispaced_fraction"])
@pytest.mark.parametrize("width", [368, 367, 320, 33])
@pytest.mark.parametrize(
    "fractions,accelerations", [((0.08,), (4,)), ((0.04,), (8,)), ((0.08, 0.04), (4, 8))]
)
def test_bit_identical_to_fastmri(kind, width, fractions, accelerations):
    for name in NAMES:
        ref, n_low = _fastmri_lines(kind, width, fractions, accelerations, tuple(map(ord, name)))
        got = masks.make_mask(
            kind,
            (640, width),
            center_fraction=fractions if len(fractions) > 1 else fractions[0],
            acceleration=accelerations if len(accelerations) > 1 else accelerations[0],
            seed=masks.seed_from_name(name),
        )
        assert got.mask.dtype == torch.float32 and got.mask.shape == (1, width)
        np.testing.assert_array_equal(got.mask[0].numpy(), ref)
        assert got.calibration == (640, n_low) and got.center_lines == n_low


def test_paired_settings_draw_both_pairs():
    centre = {
        masks.random_1d(
            (1, 368), center_fraction=(0.08, 0.04), acceleration=(4, 8), seed=(s,)
        ).center_lines
        for s in range(20)
    }
    assert centre == {round(368 * 0.08), round(368 * 0.04)}


# --- accelerations ------------------------------------------------------------------------------


@pytest.mark.parametrize("width,accel,fraction", [(368, 4, 0.08), (368, 8, 0.04), (129, 6, 0.05)])
def test_random_reaches_acceleration_on_average(width, accel, fraction):
    lines = [
        masks.random_1d((8, width), center_fraction=fraction, acceleration=accel, seed=s)
        .mask.sum()
        .item()
        for s in range(300)
    ]
    n_low = round(width * fraction)
    p = (width / accel - n_low) / (width - n_low)
    sd_of_mean = np.sqrt((width - n_low) * p * (1 - p) / len(lines))
    assert abs(np.mean(lines) - width / accel) < 4 * sd_of_mean
    assert len(set(lines)) > 5  # the masks really differ between seeds


def test_equispaced_fraction_hits_acceleration_within_two_lines():
    # fastMRI's spacing counts the spaced lines that fall in the centre in expectation only,
    # so the total is W / R up to rounding: within two lines for every width and offset.
    for width in range(40, 400, 9):
        for accel, fraction in [(4, 0.08), (8, 0.04), (3, 0.1)]:
            for seed in range(8):
                m = masks.equispaced_fraction_1d(
                    (4, width), center_fraction=fraction, acceleration=accel, seed=seed
                )
                assert abs(m.mask.sum().item() - width / accel) <= 2
                assert m.acceleration == pytest.approx(width / m.mask.sum().item())


@pytest.mark.parametrize("width", [368, 99])
def test_equispaced_lines_are_evenly_spaced(width):
    m = masks.equispaced_1d((4, width), center_fraction=0.08, acceleration=4, seed=3)
    lines = m.mask[0].numpy().astype(bool)
    centre = np.zeros(width, bool)
    centre[masks._centre_slice(width, m.center_lines)] = True
    outer = np.flatnonzero(lines & ~centre)
    offset = outer[0] % 4
    np.testing.assert_array_equal(outer, [i for i in range(offset, width, 4) if not centre[i]])
    assert m.acceleration < 4  # the centre comes on top of the W / 4 spaced lines


@pytest.mark.parametrize("kind", ["gaussian_1d", "gaussian_2d"])
@pytest.mark.parametrize("shape", [(64, 48), (33, 71)])
def test_gaussian_masks_hit_acceleration(kind, shape):
    for accel in (2, 4, 6.5):
        m = masks.make_mask(kind, shape, center_fraction=0.08, acceleration=accel, seed=0)
        grid = shape[1] if kind == "gaussian_1d" else shape[0] * shape[1]
        assert m.mask.sum().item() == round(grid / accel)


def test_gaussian_density_decreases_from_the_centre():
    total = sum(
        masks.gaussian_1d((1, 200), center_fraction=0.0, acceleration=4, seed=s).mask[0]
        for s in range(200)
    )
    distance = np.abs(np.arange(200) - 100)
    near, mid, far = (
        total[(distance >= a) & (distance < b)].mean() for a, b in [(0, 25), (25, 60), (60, 101)]
    )
    assert near > mid > far


# --- centre lines -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", masks.MASK_KINDS)
@pytest.mark.parametrize("shape", [(32, 32), (31, 31), (40, 37), (37, 40)])
def test_centre_is_contiguous_and_holds_dc(kind, shape):
    m = masks.make_mask(kind, shape, center_fraction=0.16, acceleration=3, seed=5)
    rows, cols = m.calibration
    grid = m.mask.expand(shape).numpy()
    # the zero frequency of the centered FFT sits where fftshift puts frequency 0
    dc = [int(np.argmin(np.abs(np.fft.fftshift(np.fft.fftfreq(n))))) for n in shape]
    first_row, first_col = (shape[0] - rows + 1) // 2, (shape[1] - cols + 1) // 2
    assert cols == round(shape[1] * 0.16) and rows == (
        shape[0] if m.mask.shape[0] == 1 else round(shape[0] * 0.16)
    )
    assert grid[first_row : first_row + rows, first_col : first_col + cols].all()
    assert first_col <= dc[1] < first_col + cols and first_row <= dc[0] < first_row + rows
    assert abs((dc[1] - first_col) - (first_col + cols - 1 - dc[1])) <= 1  # symmetric about DC


# --- seeding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", masks.MASK_KINDS)
def test_same_name_same_mask_other_name_other_mask(kind):
    def make(name, slice_index=None):
        seed = masks.seed_from_name(name, slice_index)
        return masks.make_mask(kind, (48, 64), center_fraction=0.08, acceleration=4, seed=seed).mask

    assert torch.equal(make(NAMES[0]), make(NAMES[0]))
    assert torch.equal(
        make(NAMES[0]), make("/data/knee/val/" + NAMES[0])
    )  # only the base name counts
    assert not torch.equal(make(NAMES[0]), make(NAMES[1]))
    # a mask per slice when the slice index is part of the seed (equispaced masks have only R offsets)
    per_slice = {tuple(make(NAMES[0], i).flatten().tolist()) for i in range(8)}
    assert len(per_slice) >= (3 if kind.startswith("equispaced") else 8)


def test_share_across_volume():
    shared = [masks.seed_from_name(NAMES[2]) for _ in range(5)]
    assert masks.seed_from_name(NAMES[2]) == tuple(ord(c) for c in NAMES[2])
    assert len(set(shared)) == 1
    assert masks.seed_from_name(NAMES[2], 3) == (*shared[0], 3)


def test_explicit_seed_and_randomstate():
    a = masks.random_1d((8, 100), center_fraction=0.08, acceleration=4, seed=7)
    b = masks.random_1d((8, 100), center_fraction=0.08, acceleration=4, seed=7)
    assert torch.equal(a.mask, b.mask)
    rng = np.random.RandomState(7)
    first = masks.random_1d((8, 100), center_fraction=0.08, acceleration=4, seed=rng)
    second = masks.random_1d((8, 100), center_fraction=0.08, acceleration=4, seed=rng)
    assert torch.equal(first.mask, a.mask) and not torch.equal(
        second.mask, a.mask
    )  # the state advances


# --- 2D masks and Poisson-disc ------------------------------------------------------------------


def test_poisson_disc_minimum_distance_and_maximality():
    yy, xx = np.mgrid[:40, :56]
    radius = 1.2 + 3.5 * np.hypot(yy - 20, xx - 28) / 28
    sampled = masks.poisson_disc(radius, seed=2)
    points = np.argwhere(sampled)
    r = radius[sampled]
    dist = np.hypot(*(points[:, None, :] - points[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(dist, np.inf)
    assert (dist >= np.minimum(r[:, None], r[None, :]) - 1e-12).all()
    # maximal: every skipped point lies inside the exclusion disc of a sample
    skipped = np.argwhere(~sampled)
    to_samples = np.hypot(*(skipped[:, None, :] - points[None, :, :]).transpose(2, 0, 1))
    assert (to_samples < r[None, :]).any(axis=1).all()
    assert torch.equal(
        torch.from_numpy(sampled), torch.from_numpy(masks.poisson_disc(radius, seed=2))
    )


def test_poisson_disc_radius_one_samples_everything():
    assert masks.poisson_disc(np.ones((9, 11)), seed=0).all()


@pytest.mark.parametrize(
    "shape,accel", [((96, 80), 4), ((96, 80), 8), ((64, 64), 1.5), ((320, 320), 6)]
)
def test_poisson_2d_acceleration_and_calibration_box(shape, accel):
    m = masks.poisson_2d(shape, center_fraction=0.1, acceleration=accel, seed=1)
    assert m.mask.shape == shape
    assert abs(m.acceleration / accel - 1) <= 0.05
    rows, cols = m.calibration
    assert (rows, cols) == (round(shape[0] * 0.1), round(shape[1] * 0.1))
    r0, c0 = (shape[0] - rows + 1) // 2, (shape[1] - cols + 1) // 2
    assert m.mask[r0 : r0 + rows, c0 : c0 + cols].all()
    assert torch.equal(
        m.mask, masks.poisson_2d(shape, center_fraction=0.1, acceleration=accel, seed=1).mask
    )


@pytest.mark.slow  # sigpy compiles its sampler with numba on first use
def test_poisson_2d_density_like_sigpy():
    sigpy_mri = pytest.importorskip("sigpy.mri")
    size = 128
    ky, kx = np.mgrid[:size, :size] - size // 2
    inner = np.hypot(ky, kx) < size / 4

    def inner_outer_ratio(mask):
        return mask[inner].mean() / mask[~inner].mean()

    for accel in (4, 8):
        ours = masks.poisson_2d(
            (size, size), center_fraction=0.1, acceleration=accel, seed=0
        ).mask.numpy()
        ref = np.abs(
            sigpy_mri.poisson((size, size), accel, calib=(13, 13), seed=0, crop_corner=False)
        )
        assert abs(size * size / ref.sum() / accel - 1) < 0.05
        # both are variable density; their centre-to-edge density ratios agree within a factor 2
        assert inner_outer_ratio(ours) > 1.5 and inner_outer_ratio(ref) > 1.5
        assert 0.5 < inner_outer_ratio(ours) / inner_outer_ratio(ref) < 2


# --- loading and applying -----------------------------------------------------------------------


def _line_mask(width=40, centre=(16, 24)):
    lines = np.zeros(width, dtype=np.float32)
    lines[centre[0] : centre[1]] = 1
    lines[[2, 7, 30, 37]] = 1
    return lines


def test_load_mask_from_npy_h5_and_tensors(tmp_path):
    lines = _line_mask()
    np.save(tmp_path / "m.npy", lines)
    with h5py.File(tmp_path / "m.h5", "w") as f:
        f["mask"] = lines.astype(bool)
    for source in (
        tmp_path / "m.npy",
        str(tmp_path / "m.h5"),
        torch.from_numpy(lines),
        lines[None],
    ):
        load = read_mask if isinstance(source, (str, os.PathLike)) else masks.mask_from_array
        m = load(source, (12, 40))
        np.testing.assert_array_equal(m.mask.numpy(), lines[None])
        assert m.calibration == (12, 8) and m.acceleration == pytest.approx(40 / 12)
    box = np.zeros((20, 30), dtype=np.float32)
    box[7:13, 13:18] = 1  # a 6 x 5 box placed like fastMRI's centre lines, plus scattered points
    box[[0, 3, 18], [2, 25, 9]] = 1
    assert masks.mask_from_array(box, (20, 30)).calibration == (6, 5)


def test_load_mask_bad_input(tmp_path):
    np.save(tmp_path / "m.npy", _line_mask())
    with h5py.File(tmp_path / "nomask.h5", "w") as f:
        f["kspace"] = np.zeros(3)
    (tmp_path / "m.txt").write_text("1 0 1")
    cases = [
        (tmp_path / "missing.npy", (4, 40), FileFormatError),
        (tmp_path / "nomask.h5", (4, 40), FileFormatError),
        (tmp_path / "m.txt", (4, 40), FileFormatError),
        (tmp_path / "m.npy", (4, 41), ShapeError),
        (np.zeros((3, 40)), (4, 40), ShapeError),
        (np.full(40, 0.5), (4, 40), MaskError),
        (np.zeros(40), (4, 40), MaskError),
    ]
    for source, shape, error in cases:
        with pytest.raises(error) as info:
            load = read_mask if isinstance(source, os.PathLike) else masks.mask_from_array
            load(source, shape)
        assert "\n" not in str(info.value)


def test_apply_mask_matches_fastmri_convention():
    rng = np.random.default_rng(0)
    k = torch.from_numpy(
        rng.standard_normal((2, 3, 8, 10)) + 1j * rng.standard_normal((2, 3, 8, 10))
    )
    k[..., 0, 0] = complex(-0.0, -0.0)
    m = masks.random_1d((8, 10), center_fraction=0.2, acceleration=2, seed=4)
    out = masks.apply_mask(k, m)
    assert out.dtype == torch.complex128 and out.shape == k.shape
    expected = k.numpy() * m.mask.numpy()
    np.testing.assert_array_equal(out.numpy(), expected)
    zeros = out[out == 0]
    assert not torch.signbit(zeros.real).any() and not torch.signbit(zeros.imag).any()
    padded = masks.apply_mask(k, m, padding=(2, 7))
    np.testing.assert_array_equal(padded[..., :2].numpy(), 0)
    np.testing.assert_array_equal(padded[..., 7:].numpy(), 0)
    np.testing.assert_array_equal(padded[..., 2:7].numpy(), expected[..., 2:7])
    two_d = masks.gaussian_2d((8, 10), center_fraction=0.2, acceleration=2, seed=0)
    np.testing.assert_array_equal(
        masks.apply_mask(k.to(torch.complex64), two_d).numpy(),
        k.to(torch.complex64).numpy() * two_d.mask.numpy(),
    )


def test_restrict_keeps_or_recomputes_calibration():
    m = masks.mask_from_array(_line_mask(), (12, 40))
    kept = m.restrict(10, 40)
    assert kept.calibration == (12, 8) and kept.mask[0, :10].sum() == 0
    cut = m.restrict(0, 21)  # cuts into the centre lines 16..23
    assert cut.calibration[1] < 8 and cut.mask[0, 21:].sum() == 0


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,error",
    [
        (
            lambda: masks.random_1d((8, 64), center_fraction=0.08, acceleration=0.5, seed=0),
            MaskError,
        ),
        (
            lambda: masks.random_1d(
                (8, 64), center_fraction=0.08, acceleration=float("nan"), seed=0
            ),
            MaskError,
        ),
        (lambda: masks.random_1d((8, 64), center_fraction=1.0, acceleration=4, seed=0), MaskError),
        (lambda: masks.random_1d((8, 64), center_fraction=-0.1, acceleration=4, seed=0), MaskError),
        (
            lambda: masks.random_1d(
                (8, 64), center_fraction=(0.08, 0.04), acceleration=(4,), seed=0
            ),
            MaskError,
        ),
        (lambda: masks.random_1d((8, 64), center_fraction=0.5, acceleration=4, seed=0), MaskError),
        (
            lambda: masks.equispaced_1d((8, 64), center_fraction=0.08, acceleration=2.5, seed=0),
            MaskError,
        ),
        (
            lambda: masks.equispaced_fraction_1d(
                (8, 64), center_fraction=0.25, acceleration=4, seed=0
            ),
            MaskError,
        ),
        (
            lambda: masks.gaussian_2d((8, 64), center_fraction=0.6, acceleration=4, seed=0),
            MaskError,
        ),
        (
            lambda: masks.poisson_2d(
                (32, 32), center_fraction=0.1, acceleration=4, seed=0, falloff=-1
            ),
            MaskError,
        ),
        (
            lambda: masks.gaussian_1d((8, 64), center_fraction=0.1, acceleration=4, seed=0, std=0),
            MaskError,
        ),
        (
            lambda: masks.make_mask(
                "radial", (8, 64), center_fraction=0.08, acceleration=4, seed=0
            ),
            MaskError,
        ),
        (lambda: masks.random_1d((8,), center_fraction=0.08, acceleration=4, seed=0), ShapeError),
        (lambda: masks.random_1d((8, 0), center_fraction=0.08, acceleration=4, seed=0), ShapeError),
        (lambda: masks.random_1d((1, 3), center_fraction=0.0, acceleration=1e6, seed=0), MaskError),
        (lambda: masks.seed_from_name(""), MaskError),
        (lambda: masks.Mask(torch.zeros(1, 8), (1, 0)), MaskError),
        (lambda: masks.Mask(torch.ones(8), (1, 8)), ShapeError),
        (lambda: masks.poisson_disc(np.zeros((4, 4)), seed=0), MaskError),
        (lambda: masks.apply_mask(torch.ones(1, 2, 8, 10), torch.ones(1, 10)), ShapeError),
        (
            lambda: masks.apply_mask(
                torch.ones(1, 2, 8, 10, dtype=torch.complex64), torch.ones(1, 9)
            ),
            ShapeError,
        ),
        (
            lambda: masks.apply_mask(
                torch.ones(1, 8, 10, dtype=torch.complex64), torch.ones(2, 2, 8, 10)
            ),
            ShapeError,
        ),
        (
            lambda: masks.apply_mask(
                torch.ones(1, 8, 10, dtype=torch.complex64), torch.zeros(1, 10)
            ),
            MaskError,
        ),
        (
            lambda: masks.apply_mask(
                torch.ones(1, 8, 10, dtype=torch.complex64), torch.ones(1, 10), padding=(5, 5)
            ),
            MaskError,
        ),
    ],
)
def test_bad_input_raises_one_line(call, error):
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, KscanError) and "\n" not in str(info.value)
