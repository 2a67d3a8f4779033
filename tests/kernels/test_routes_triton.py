"""Fused Triton cross-scan/merge against the torch path, under TRITON_INTERPRET=1 at small sizes
(and at the same sizes on a GPU when one is present)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kscan.errors import ConfigError  # noqa: E402
from kscan.kernels.routes import VMAMBA_ROUTES, cross_merge, cross_scan  # noqa: E402
from kscan.kernels.routes_triton import FUSED_ROUTES, fused_unavailable_reason  # noqa: E402

ROUTE_SETS = [VMAMBA_ROUTES, ("cols_reversed", "rows"), ("cols",), FUSED_ROUTES[::-1] * 2]


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    """Run the kernels under Triton's interpreter on CPU tensors."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(
    params=[
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
            ],
        ),
    ]
)
def device(request, monkeypatch):
    """``cpu`` (interpreted) or ``cuda`` (compiled)."""
    if request.param == "cuda":
        monkeypatch.delenv("TRITON_INTERPRET")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
@pytest.mark.parametrize(("height", "width"), [(1, 1), (1, 9), (9, 1), (5, 7)])
def test_fused_matches_the_torch_path(height, width, dtype, device):
    gen = torch.Generator().manual_seed(height * 10 + width)
    backends = ["triton"] + ([None] if device == "cuda" else [])  # None picks triton on CUDA
    for names in ROUTE_SETS:
        x = torch.randn(2, 3, height, width, dtype=dtype, generator=gen)
        y = torch.randn(2, len(names), 3, height * width, dtype=dtype, generator=gen)
        expected_scan = cross_scan(x, names, backend="torch")
        expected_merge = cross_merge(y, names, height, width, backend="torch")
        for backend in backends:
            scanned = cross_scan(x.to(device), names, backend=backend)
            merged = cross_merge(y.to(device), names, height, width, backend=backend)
            assert torch.equal(scanned.cpu(), expected_scan)
            assert torch.equal(merged.cpu(), expected_merge)


def test_fused_backward_is_the_other_operation():
    names = VMAMBA_ROUTES
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    y = torch.randn(2, 4, 3, 30, requires_grad=True)
    (gx,) = torch.autograd.grad(cross_scan(x, names, backend="triton"), x, y)
    assert torch.equal(gx, cross_merge(y.detach(), names, 5, 6, backend="torch"))
    (gy,) = torch.autograd.grad(cross_merge(y, names, 5, 6, backend="triton"), y, x)
    assert torch.equal(gy, cross_scan(x.detach(), names, backend="torch"))


def test_fused_gradcheck_float64():
    names = ("rows_reversed", "cols")
    x = torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(1, 2, 2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: cross_scan(t, names, backend="triton"), (x,))
    assert torch.autograd.gradcheck(lambda t: cross_merge(t, names, 2, 3, backend="triton"), (y,))


def test_triton_backend_only_where_it_can_run(monkeypatch):
    x = torch.zeros(1, 1, 2, 2)
    assert fused_unavailable_reason(x, VMAMBA_ROUTES) is None
    with pytest.raises(ConfigError, match=r"routes \['spiral'\] are not among rows, cols"):
        cross_scan(x, ("rows", "spiral"), backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match="tensors on cpu need CUDA"):
        cross_merge(torch.zeros(1, 4, 1, 4), VMAMBA_ROUTES, 2, 2, backend="triton")
    with pytest.raises(ConfigError, match="expected None, 'torch' or 'triton', got 'cuda'"):
        cross_scan(x, VMAMBA_ROUTES, backend="cuda")
