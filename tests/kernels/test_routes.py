"""2D scan routes: permutations, hand-checked orders, step rules, mirrors, cross-scan/merge adjointness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kscan.errors import ConfigError, KscanError, ShapeError
from kscan.kernels import (
    MHSVM_HEAD_ROUTES,
    ROUTES,
    VMAMBA_ROUTES,
    cross_merge,
    cross_scan,
    inverse,
    route,
)

BASE = tuple(name for name in ROUTES if not name.endswith("_reversed"))
SHAPES = [
    (1, 1),
    (1, 7),
    (7, 1),
    (2, 2),
    (2, 5),
    (5, 2),
    (3, 4),
    (4, 3),
    (5, 5),
    (6, 9),
    (9, 6),
    (8, 8),
]


def coords(perm: torch.Tensor, width: int) -> np.ndarray:
    """``(L, 2)`` array of the visited ``(i, j)``."""
    i, j = np.divmod(perm.numpy(), width)
    return np.stack([i, j], axis=1)


def spiral_walk(height: int, width: int) -> list[int]:
    """Independent definition: walk right, turning clockwise whenever the next cell is outside the
    grid or already visited."""
    seen = np.zeros((height, width), dtype=bool)
    moves = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    i = j = d = 0
    order = []
    for _ in range(height * width):
        order.append(i * width + j)
        seen[i, j] = True
        for turn in range(4):
            di, dj = moves[(d + turn) % 4]
            if 0 <= i + di < height and 0 <= j + dj < width and not seen[i + di, j + dj]:
                d = (d + turn) % 4
                i, j = i + di, j + dj
                break
    return order


def zigzag_diagonals(height: int, width: int) -> list[int]:
    """Independent definition: anti-diagonal ``k``, cells listed by increasing row, reversed for even ``k``."""
    order = []
    for k in range(height + width - 1):
        cells = [i * width + (k - i) for i in range(max(0, k - width + 1), min(height - 1, k) + 1)]
        order += cells[::-1] if k % 2 == 0 else cells
    return order


# The JPEG zig-zag order of an 8x8 block (ITU T.81, figure 5), as row-major indices.
JPEG_ZIGZAG_8X8 = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5,
    12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21, 28,
    35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51,
    58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
]  # fmt: skip


@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_every_route_is_a_permutation_and_reverse_is_the_flip(height, width):
    for name in ROUTES:
        perm = route(name, height, width)
        assert perm.dtype == torch.int64 and perm.shape == (height * width,)
        assert sorted(perm.tolist()) == list(range(height * width)), name
    for name in BASE:
        assert torch.equal(
            route(f"{name}_reversed", height, width), route(name, height, width).flip(0)
        )


@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_raster_routes_match_numpy_orders(height, width):
    grid = np.arange(height * width).reshape(height, width)
    assert route("rows", height, width).tolist() == grid.ravel(order="C").tolist()
    assert route("cols", height, width).tolist() == grid.ravel(order="F").tolist()


@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_snake_and_spiral_steps_are_4_neighbours(height, width):
    for name in ("snake_rows", "snake_cols", "spiral", "spiral_mirror"):
        steps = np.abs(np.diff(coords(route(name, height, width), width), axis=0)).sum(axis=1)
        assert (steps == 1).all(), name


@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_snake_rows_alternate_direction(height, width):
    ij = coords(route("snake_rows", height, width), width).reshape(height, width, 2)
    assert (ij[:, :, 0] == np.arange(height)[:, None]).all()
    for i in range(height):
        expected = np.arange(width) if i % 2 == 0 else np.arange(width)[::-1]
        assert ij[i, :, 1].tolist() == expected.tolist()


@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_snake_cols_is_snake_rows_of_the_transpose(height, width):
    ij = coords(route("snake_rows", width, height), height)[:, ::-1]  # (j, i) -> (i, j)
    assert route("snake_cols", height, width).tolist() == (ij[:, 0] * width + ij[:, 1]).tolist()


@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_zigzag_step_rule(height, width):
    """Along an anti-diagonal, steps go (-1, +1) or (+1, -1) alternately by diagonal; between
    diagonals, one step right or down; the diagonal index never decreases."""
    ij = coords(route("zigzag", height, width), width)
    k = ij.sum(axis=1)
    assert (np.diff(k) >= 0).all() and (np.diff(k) <= 1).all()
    for a, b, ka, kb in zip(ij[:-1], ij[1:], k[:-1], k[1:], strict=True):
        step = tuple(b - a)
        if ka == kb:
            assert step == ((-1, 1) if ka % 2 == 0 else (1, -1))
        else:
            assert step in {(0, 1), (1, 0)}


@pytest.mark.parametrize(("height", "width"), SHAPES + [(3, 11), (11, 3)])
def test_zigzag_and_spiral_match_independent_definitions(height, width):
    assert route("zigzag", height, width).tolist() == zigzag_diagonals(height, width)
    assert route("spiral", height, width).tolist() == spiral_walk(height, width)


def test_zigzag_is_the_jpeg_order():
    assert route("zigzag", 8, 8).tolist() == JPEG_ZIGZAG_8X8


def test_hand_checked_small_examples():
    # 3x4 grid:   0  1  2  3 /  4  5  6  7 /  8  9 10 11
    assert route("spiral", 3, 4).tolist() == [0, 1, 2, 3, 7, 11, 10, 9, 8, 4, 5, 6]
    assert route("spiral_mirror", 3, 4).tolist() == [8, 9, 10, 11, 7, 3, 2, 1, 0, 4, 5, 6]
    assert route("snake_rows", 3, 4).tolist() == [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11]
    assert route("snake_cols", 3, 4).tolist() == [0, 4, 8, 9, 5, 1, 2, 6, 10, 11, 7, 3]
    assert route("cols", 3, 4).tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
    assert route("zigzag", 3, 4).tolist() == [0, 1, 4, 8, 5, 2, 3, 6, 9, 10, 7, 11]
    assert route("zigzag_mirror", 3, 4).tolist() == [3, 2, 7, 11, 6, 1, 0, 5, 10, 9, 4, 8]
    # 4x3 grid:   0  1  2 /  3  4  5 /  6  7  8 /  9 10 11
    assert route("spiral", 4, 3).tolist() == [0, 1, 2, 5, 8, 11, 10, 9, 6, 3, 4, 7]
    assert route("spiral", 1, 1).tolist() == [0]
    assert route("spiral", 1, 4).tolist() == [0, 1, 2, 3]
    assert route("spiral", 4, 1).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_mirror_relations(height, width):
    grid = torch.arange(height * width).reshape(height, width)
    zigzag_on_flipped_cols = grid.flip(1).flatten()[route("zigzag", height, width)]
    assert torch.equal(route("zigzag_mirror", height, width), zigzag_on_flipped_cols)
    spiral_on_flipped_rows = grid.flip(0).flatten()[route("spiral", height, width)]
    assert torch.equal(route("spiral_mirror", height, width), spiral_on_flipped_rows)


@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_inverse_undoes_the_route(height, width):
    for name in ROUTES:
        perm = route(name, height, width)
        inv = inverse(perm)
        assert torch.equal(perm[inv], torch.arange(height * width))
        assert torch.equal(inv[perm], torch.arange(height * width))


def test_route_is_cached_per_name_size_and_device():
    assert route("spiral", 5, 7) is route("spiral", 5, 7, device="cpu")
    assert route("spiral", 5, 7) is route("spiral", np.int64(5), torch.tensor(7).item())
    assert route("spiral", 5, 7) is not route("spiral", 7, 5)
    assert route("spiral", 5, 7) is not route("spiral_mirror", 5, 7)


def test_route_constants():
    assert VMAMBA_ROUTES == ("rows", "cols", "rows_reversed", "cols_reversed")
    assert list(MHSVM_HEAD_ROUTES) == ["C", "X", "S", "Z"]
    assert MHSVM_HEAD_ROUTES["X"] == (
        "zigzag",
        "zigzag_reversed",
        "zigzag_mirror",
        "zigzag_mirror_reversed",
    )
    assert all(name in ROUTES for names in MHSVM_HEAD_ROUTES.values() for name in names)
    assert len(set(ROUTES)) == 16


@pytest.mark.parametrize(("height", "width"), [(1, 5), (4, 1), (3, 4), (6, 5)])
def test_cross_scan_reads_each_route(height, width):
    x = torch.randn(2, 3, height, width, dtype=torch.float64)
    names = ROUTES
    xs = cross_scan(x, names)
    assert xs.shape == (2, len(names), 3, height * width) and xs.is_contiguous()
    for k, name in enumerate(names):
        assert torch.equal(xs[:, k], x.flatten(2)[..., route(name, height, width)])


@pytest.mark.parametrize("names", [VMAMBA_ROUTES, MHSVM_HEAD_ROUTES["S"], ROUTES, ("spiral",)])
@pytest.mark.parametrize(("height", "width"), [(1, 6), (5, 1), (3, 4), (7, 5)])
def test_cross_merge_is_the_adjoint_of_cross_scan(names, height, width):
    gen = torch.Generator().manual_seed(height * 10 + width)
    x = torch.randn(2, 3, height, width, dtype=torch.float64, generator=gen)
    y = torch.randn(2, len(names), 3, height * width, dtype=torch.float64, generator=gen)
    lhs = (cross_scan(x, names) * y).sum()
    rhs = (x * cross_merge(y, names, height, width)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
    merged = cross_merge(cross_scan(x, names), names, height, width)
    torch.testing.assert_close(merged, len(names) * x, rtol=1e-14, atol=0)


def test_cross_merge_matches_an_explicit_unpermute_and_sum():
    names = MHSVM_HEAD_ROUTES["C"]
    y = torch.randn(2, 4, 3, 20, dtype=torch.float64)
    expected = torch.zeros(2, 3, 20, dtype=torch.float64)
    for k, name in enumerate(names):
        expected[..., route(name, 4, 5)] += y[:, k]
    torch.testing.assert_close(cross_merge(y, names, 4, 5), expected.reshape(2, 3, 4, 5))


def test_gradients_gradcheck_float64():
    names = ("spiral", "zigzag_mirror_reversed", "cols")
    x = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, 2, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: cross_scan(t, names), (x,))
    assert torch.autograd.gradcheck(lambda t: cross_merge(t, names, 3, 4), (y,))
    assert torch.autograd.gradgradcheck(lambda t: cross_scan(t, names), (x,))
    assert torch.autograd.gradgradcheck(lambda t: cross_merge(t, names, 3, 4), (y,))


def test_backward_of_scan_is_merge_and_vice_versa():
    names = VMAMBA_ROUTES
    x = torch.randn(1, 2, 3, 5, requires_grad=True)
    y = torch.randn(1, 4, 2, 15)
    (gx,) = torch.autograd.grad(cross_scan(x, names), x, y)
    assert torch.equal(gx, cross_merge(y, names, 3, 5))
    y.requires_grad_(True)
    g = torch.randn(1, 2, 3, 5)
    (gy,) = torch.autograd.grad(cross_merge(y, names, 3, 5), y, g)
    assert torch.equal(gy, cross_scan(g, names))


@pytest.mark.parametrize(
    ("call", "error", "text"),
    [
        (lambda: route("helix", 3, 3), ConfigError, "expected one of rows, cols, snake_rows"),
        (lambda: route("rows", 0, 3), ShapeError, "height: expected a positive integer, got 0"),
        (lambda: route("rows", 3, -2), ShapeError, "width: expected a positive integer, got -2"),
        (lambda: route("rows", 3, 2.0), ShapeError, "width"),
        (lambda: cross_scan(torch.zeros(2, 3, 4), ["rows"]), ShapeError, "(batch, C, H, W)"),
        (lambda: cross_scan(torch.zeros(1, 1, 0, 3), ["rows"]), ShapeError, "height"),
        (lambda: cross_scan(torch.zeros(1, 1, 2, 2), "rows"), ConfigError, "sequence of route"),
        (lambda: cross_scan(torch.zeros(1, 1, 2, 2), []), ConfigError, "non-empty"),
        (lambda: cross_scan(torch.zeros(1, 1, 2, 2), ["rows", "x"]), ConfigError, "'x'"),
        (lambda: cross_merge(torch.zeros(1, 2, 1, 4), ["rows"], 2, 2), ShapeError, "K=1"),
        (lambda: cross_merge(torch.zeros(1, 1, 1, 5), ["rows"], 2, 2), ShapeError, "L=4"),
        (lambda: cross_merge(torch.zeros(1, 1, 4), ["rows"], 2, 2), ShapeError, "(batch, K, C, L)"),
        (lambda: inverse(torch.tensor([0, 2, 2])), KscanError, "permutation of 0..2"),
        (lambda: inverse(torch.zeros(2, 2, dtype=torch.long)), ShapeError, "1-D"),
    ],
)
def test_bad_input_raises_one_line_kscan_errors(call, error, text):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert text in message and "\n" not in message
