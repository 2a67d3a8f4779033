"""Distributed sliding-window inference against MONAI's single-device sliding_window_inference."""

import sys
from pathlib import Path

import pytest
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from kscan.errors import ConfigError, ShapeError
from kscan.pipelines.parallel import distributed_sliding_window_inference


def net(dims, channels, dtype, seed=0):
    """A small convolutional predictor (a module: picklable for the spawned ranks)."""
    torch.manual_seed(seed)
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    return nn.Sequential(conv(channels, 4, 3, padding=1), nn.Tanh(), conv(4, 2, 1)).to(dtype).eval()


def rand(*shape, dtype, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def monai(x, roi, sw_batch_size, predictor, overlap, mode):
    with torch.no_grad():
        return sliding_window_inference(x, roi, sw_batch_size, predictor, overlap, mode)


def cases():
    """(inputs, roi, sw_batch_size, predictor, overlap, mode), tolerance: 2D and 3D, both
    blending modes, a window larger than the image along one axis (padding and cropping), a
    batch of two images (windows of both images split across ranks), float32 and float64."""
    out = []
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        out += [
            (
                (rand(2, 1, 37, 29, dtype=dtype), (16, 12), 3, net(2, 1, dtype), 0.4, "gaussian"),
                tol,
            ),
            (
                (rand(1, 1, 10, 40, dtype=dtype), (16, 16), 2, net(2, 1, dtype), 0.25, "constant"),
                tol,
            ),
            (
                (
                    rand(1, 2, 13, 11, 9, dtype=dtype),
                    (8, 6, 5),
                    4,
                    net(3, 2, dtype),
                    0.5,
                    "gaussian",
                ),
                tol,
            ),
        ]
    return out


@pytest.fixture
def workers(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    import _spawn_workers

    yield _spawn_workers
    sys.modules.pop("_spawn_workers", None)


@pytest.mark.parametrize("index", range(6))
def test_one_rank_equals_monai_exactly(index):
    (x, roi, bs, predictor, overlap, mode), _ = cases()[index]
    with torch.no_grad():
        got = distributed_sliding_window_inference(x, roi, bs, predictor, overlap, mode)
    assert torch.equal(got, monai(x, roi, bs, predictor, overlap, mode))


def test_sigma_scale_and_window_size_fall_back():
    x, predictor = rand(1, 1, 20, 18, dtype=torch.float64), net(2, 1, torch.float64)
    with torch.no_grad():
        got = distributed_sliding_window_inference(x, (8, -1), 2, predictor, 0.5, sigma_scale=0.3)
        ref = sliding_window_inference(x, (8, -1), 2, predictor, 0.5, "gaussian", sigma_scale=0.3)
    assert torch.equal(got, ref)


def test_bad_arguments_are_named():
    x, predictor = rand(1, 1, 8, 8, dtype=torch.float32), net(2, 1, torch.float32)
    with pytest.raises(ConfigError, match="mode"):
        distributed_sliding_window_inference(x, 4, 1, predictor, 0.5, mode="linear")
    with pytest.raises(ConfigError, match="overlap"):
        distributed_sliding_window_inference(x, 4, 1, predictor, 1.0)
    with pytest.raises(ShapeError, match="predictor"):
        distributed_sliding_window_inference(x, 4, 1, lambda w: w[..., :2, :], 0.5)


@pytest.mark.slow
def test_two_ranks_equal_monai(workers):
    from kscan.pipelines.parallel import launch

    all_cases = cases()
    results = launch(workers.run_windows, 2, ([c for c, _ in all_cases],))
    for i, ((x, roi, bs, predictor, overlap, mode), tol) in enumerate(all_cases):
        expected = monai(x, roi, bs, predictor, overlap, mode)
        for rank in range(2):
            got, sent = results[rank][i]
            assert got.dtype == x.dtype and got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=0, atol=tol)
            # one all-reduce of the padded full-size output: 2 (P-1)/P of its bytes
            padded = [max(i, r) for i, r in zip(x.shape[2:], roi, strict=True)]
            nbytes = x.shape[0] * 2 * torch.Size(padded).numel() * x.element_size()
            assert sent == {"windows": nbytes}
