"""The Triton scan backend against the sequential reference.

Without CUDA the kernels run on CPU in Triton's interpreter at small sizes (it walks an associative
scan one element at a time). Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, so it is
set here before the backend is imported, and the backend is reloaded if something imported it
earlier. With CUDA the same tests run compiled, and the ``gpu`` tests add full sizes.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from kscan.kernels import scan_triton  # noqa: E402
from kscan.kernels.scan_reference import selective_scan_reference  # noqa: E402

if not scan_triton.triton_available():  # imported (without CUDA) before the variable was set
    importlib.reload(scan_triton)

pytestmark = pytest.mark.skipif(
    not scan_triton.triton_available(), reason="no CUDA and TRITON_INTERPRET is off"
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOAT32_TOL = dict(rtol=6e-4, atol=2e-3)  # mamba-ssm's published tolerances
BF16_TOL = dict(rtol=3e-2, atol=5e-2)


def make_inputs(
    batch: int,
    channels: int,
    n_state: int,
    length: int,
    groups: int | None = None,
    *,
    with_d: bool = False,
    with_z: bool = False,
    with_bias: bool = False,
    with_h0: bool = False,
    seed: int = 0,
    device: str = DEVICE,
) -> dict[str, torch.Tensor]:
    """Random scan inputs (float32); ``groups=None`` gives the 3D ``(batch, N, L)`` B and C."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=gen)).to(device)

    bc_shape = (batch, n_state, length) if groups is None else (batch, groups, n_state, length)
    inputs = {
        "u": randn(batch, channels, length),
        "delta": randn(batch, channels, length, scale=0.5),
        "A": -(0.5 + torch.rand(channels, n_state, generator=gen)).to(device),
        "B": randn(*bc_shape),
        "C": randn(*bc_shape),
    }
    if with_d:
        inputs["D"] = randn(channels)
    if with_z:
        inputs["z"] = randn(batch, channels, length)
    if with_bias:
        inputs["delta_bias"] = randn(channels, scale=0.5)
    if with_h0:
        inputs["initial_state"] = randn(batch, channels, n_state)
    return inputs


def run_scan(
    fn, inputs: dict[str, torch.Tensor], delta_softplus: bool, seed: int = 1
) -> dict[str, torch.Tensor]:
    """``y``, the last state and the gradients of a random linear function of both."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y, h_last = fn(**leaves, delta_softplus=delta_softplus, return_last_state=True)
    gen = torch.Generator().manual_seed(seed)  # bfloat16-exact weights: the same for every dtype
    gy = torch.randn(y.shape, generator=gen).bfloat16().float().to(y.device)
    gh = torch.randn(h_last.shape, generator=gen).bfloat16().float().to(y.device)
    ((y.float() * gy.float()).sum() + (h_last * gh).sum()).backward()
    out = {"y": y.detach(), "last_state": h_last.detach()}
    out.update({f"d{k}": v.grad for k, v in leaves.items()})
    return out


def assert_matches_reference(
    inputs: dict[str, torch.Tensor], delta_softplus: bool, tol: dict = FLOAT32_TOL
) -> None:
    got = run_scan(scan_triton.selective_scan_triton, inputs, delta_softplus)
    ref_inputs = {k: v.float() for k, v in inputs.items()}
    want = run_scan(selective_scan_reference, ref_inputs, delta_softplus)
    assert got.keys() == want.keys()
    for name, value in got.items():
        assert value.dtype == expected_dtype(name, inputs), name
        torch.testing.assert_close(
            value.float(), want[name], **tol, msg=lambda m, n=name: f"{n}: {m}"
        )


def expected_dtype(name: str, inputs: dict[str, torch.Tensor]) -> torch.dtype:
    """y in u's dtype, the last state in float32, each gradient in its input's dtype."""
    if name == "last_state":
        return torch.float32
    return inputs["u" if name == "y" else name[1:]].dtype


def test_every_option_matches_reference():
    """Grouped 4D B/C, z, D, delta_bias + softplus, initial state; L = 37 spans three chunks and
    does not fill the last."""
    inputs = make_inputs(
        2, 4, 4, 37, groups=2, with_d=True, with_z=True, with_bias=True, with_h0=True
    )
    assert_matches_reference(inputs, delta_softplus=True)


def test_chunk_parallel_forward_matches_reference(monkeypatch):
    """The batch-1 inference forward (chunk maps, state passing, rescan), forced on; its saved
    chunk-start states feed the same backward."""
    monkeypatch.setattr(scan_triton, "_use_chunk_parallel", lambda *args: True)
    inputs = make_inputs(
        1, 4, 4, 45, groups=2, with_d=True, with_z=True, with_bias=True, with_h0=True
    )
    assert_matches_reference(inputs, delta_softplus=True)


@pytest.mark.parametrize(
    "shape, options, softplus",
    [
        ((1, 2, 1, 1, None), {}, False),  # L = 1, N = 1, 3D B/C, nothing optional
        ((1, 4, 4, 16, 4), dict(with_z=True), True),  # L = one chunk, one channel per group
        ((2, 2, 3, 23, None), dict(with_d=True, with_bias=True), False),  # N not a power of 2
        ((1, 2, 16, 40, None), dict(with_d=True, with_h0=True), True),  # N = 16
        ((1, 2, 4, 64, 1), dict(with_z=True, with_bias=True), True),  # L = 64, 4D with G = 1
    ],
)
def test_cases_match_reference(shape, options, softplus):
    """(batch, D, N, L, G) with G = None for 3D B/C."""
    assert_matches_reference(make_inputs(*shape, **options), delta_softplus=softplus)


def test_large_delta_stays_finite():
    """delta + bias > 20, softplus's linear branch: y and the delta gradient stay exact."""
    inputs = make_inputs(1, 2, 2, 5, with_bias=True)
    inputs["delta"] = inputs["delta"] + 25.0 * torch.tensor([1.0, 0.0], device=DEVICE)[:, None]
    inputs["A"] = inputs["A"] * 0.05
    assert_matches_reference(inputs, delta_softplus=True)


@pytest.mark.parametrize("splits", [1, 2])
def test_gradients_for_dB_dC_are_deterministic_across_channel_blocks(monkeypatch, splits):
    """32 channels in one group span two channel blocks, summed by one backward program per
    (batch, group, chunk), or (``splits = 2``, forced) one per block, whose partial sums torch
    adds up; L = 20 spans two chunks."""
    monkeypatch.setattr(scan_triton, "_grad_splits", lambda *args: splits)
    inputs = make_inputs(1, 32, 2, 20, groups=1, with_z=True, with_h0=True)
    first = run_scan(scan_triton.selective_scan_triton, inputs, delta_softplus=True)
    second = run_scan(scan_triton.selective_scan_triton, inputs, delta_softplus=True)
    for name in first:
        assert torch.equal(first[name], second[name]), name
    want = run_scan(selective_scan_reference, inputs, delta_softplus=True)
    for name in first:
        torch.testing.assert_close(first[name], want[name], **FLOAT32_TOL)


@pytest.mark.parametrize(
    "dtype, tol",
    [(torch.bfloat16, BF16_TOL), (torch.float16, BF16_TOL), (torch.float64, FLOAT32_TOL)],
)
def test_other_dtypes_compute_in_float32_and_keep_their_dtype(dtype, tol):
    inputs = make_inputs(1, 2, 4, 19, groups=1, with_d=True, with_z=True, with_h0=True)
    assert_matches_reference({k: v.to(dtype) for k, v in inputs.items()}, True, tol=tol)


def test_without_last_state_returns_y_and_its_gradients():
    inputs = make_inputs(1, 2, 2, 21, with_h0=True)
    grads = {}
    for fn in (scan_triton.selective_scan_triton, selective_scan_reference):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        y = fn(**leaves)
        assert isinstance(y, torch.Tensor)
        y.sum().backward()
        grads[fn] = (y.detach(),) + tuple(leaf.grad for leaf in leaves.values())
    for got, want in zip(*grads.values(), strict=True):
        torch.testing.assert_close(got, want, **FLOAT32_TOL)


def test_import_without_triton_succeeds_and_calls_say_what_is_missing():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from kscan.kernels import scan_triton as s\n"
        "assert not s.triton_available()\n"
        "x = torch.zeros(1, 1, 1)\n"
        "try:\n"
        "    s.selective_scan_triton(x, x, torch.zeros(1, 1), x, x)\n"
        "except RuntimeError as e:\n"
        "    assert 'triton package' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("length", [1, 1000, 4096])
def test_full_size_on_gpu(length):
    inputs = make_inputs(
        2,
        64,
        16,
        length,
        groups=4,
        with_d=True,
        with_z=True,
        with_bias=True,
        with_h0=True,
        device="cuda",
    )
    assert_matches_reference(inputs, delta_softplus=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_full_size_bfloat16_on_gpu():
    inputs = {
        k: v.to(torch.bfloat16)
        for k, v in make_inputs(2, 64, 16, 2048, with_d=True, with_z=True, device="cuda").items()
    }
    assert_matches_reference(inputs, delta_softplus=True, tol=BF16_TOL)
