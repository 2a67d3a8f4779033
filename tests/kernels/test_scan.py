"""The public ``selective_scan`` and its ``torch`` and ``numba`` backends against the sequential
reference."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from kscan.errors import ConfigError, ShapeError
from kscan.kernels import scan_mamba_ssm, selective_scan
from kscan.kernels.scan import ENV_VAR, resolve_backend
from kscan.kernels.scan_reference import selective_scan_reference
from kscan.kernels.scan_torch import selective_scan_torch

FLOAT32_TOL = dict(rtol=6e-4, atol=2e-3)  # mamba-ssm's published tolerances
BF16_TOL = dict(rtol=3e-2, atol=5e-2)
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(
    batch: int,
    channels: int,
    n: int,
    length: int,
    groups: int | None,
    extras: bool,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Leaf tensors; ``groups=None`` gives the 3D ``(batch, N, L)`` B/C form; ``extras`` adds
    ``D, z, delta_bias, initial_state``."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)

    bc = (batch, n, length) if groups is None else (batch, groups, n, length)
    x = {
        "u": randn(batch, channels, length),
        "delta": randn(batch, channels, length, scale=0.5),
        "A": -torch.rand(channels, n, generator=gen, dtype=torch.float64).add(0.2).to(dtype),
        "B": randn(*bc),
        "C": randn(*bc),
    }
    if extras:
        x.update(
            D=randn(channels),
            z=randn(batch, channels, length),
            delta_bias=randn(channels, scale=0.5),
            initial_state=randn(batch, channels, n),
        )
    else:  # delta is used without softplus: keep it positive
        x["delta"] = x["delta"].abs()
    return {k: v.requires_grad_() for k, v in x.items()}


def run_with_grads(fn, x: dict[str, torch.Tensor], seed: int = 1, **kw):
    """``y``, last state and the gradients of a random linear function of both."""
    y, last = fn(**x, delta_softplus="delta_bias" in x, return_last_state=True, **kw)
    gen = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=gen).to(y.dtype)
    gl = torch.randn(last.shape, generator=gen).to(last.dtype)
    grads = torch.autograd.grad(
        (y * gy).float().sum() + (last * gl).float().sum(), list(x.values())
    )
    return y, last, dict(zip(x, grads, strict=True))


def assert_match(x, fn, tol, **kw) -> None:
    y_ref, last_ref, g_ref = run_with_grads(selective_scan_reference, x)
    y, last, g = run_with_grads(fn, x, **kw)
    assert y.dtype == x["u"].dtype
    torch.testing.assert_close(y.float(), y_ref.float(), **tol)
    torch.testing.assert_close(last.float(), last_ref.float(), **tol)
    for name in x:
        assert g[name].shape == x[name].shape and g[name].dtype == x[name].dtype, name
        torch.testing.assert_close(g[name].float(), g_ref[name].float(), **tol, msg=name)


CASES = [  # batch, D, N, L, groups, extras, chunk
    (2, 4, 4, 1, None, False, 64),
    (2, 4, 4, 1, 2, True, 8),
    (1, 6, 1, 37, None, True, 8),
    (2, 8, 16, 100, 2, True, 64),
    (1, 8, 4, 50, 4, False, 16),
    (2, 4, 16, 24, None, False, 8),
    (1, 4, 4, 130, 1, True, 64),
]


@pytest.mark.parametrize("batch, channels, n, length, groups, extras, chunk", CASES)
def test_torch_backend_matches_reference_float32(batch, channels, n, length, groups, extras, chunk):
    x = make_inputs(batch, channels, n, length, groups, extras)
    assert_match(x, selective_scan_torch, FLOAT32_TOL, chunk=chunk)


def test_public_function_matches_reference_with_default_chunk():
    x = make_inputs(2, 8, 16, 200, 4, True, seed=3)
    assert_match(x, selective_scan, FLOAT32_TOL)


@pytest.mark.slow
def test_long_sequence_matches_reference():
    x = make_inputs(1, 4, 16, 4096, None, True, seed=4)
    assert_match(x, selective_scan_torch, FLOAT32_TOL)


def test_bfloat16_inputs_match_reference():
    x = make_inputs(2, 4, 4, 40, 2, True, dtype=torch.bfloat16, seed=5)
    assert_match(x, selective_scan_torch, BF16_TOL, chunk=16)


@pytest.mark.parametrize("groups, extras", [(None, True), (2, True), (None, False)])
def test_gradcheck_float64(groups, extras):
    x = make_inputs(1, 4, 2, 7, groups, extras, dtype=torch.float64, seed=6)
    names = list(x)

    def fn(*tensors):
        kw = dict(zip(names, tensors, strict=True))
        return selective_scan_torch(**kw, delta_softplus=extras, return_last_state=True, chunk=3)

    assert torch.autograd.gradcheck(fn, tuple(x.values()))


def test_float64_agrees_to_rounding_error():
    x = make_inputs(2, 4, 3, 45, 2, True, dtype=torch.float64, seed=7)
    assert_match(x, selective_scan_torch, dict(rtol=1e-10, atol=1e-10), chunk=8)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_stable_when_decays_underflow(backend):
    """The decays underflow: torch's exp(A * cumsum(delta)) reaches 0 over a chunk and nothing is
    divided by it; numba's clamped exponent gives 2^-1022 instead of 0."""
    if backend == "numba" and importlib.util.find_spec("numba") is None:
        pytest.skip("numba is not installed")
    scan = resolve_backend(torch.device("cpu"), backend)[1]
    x = make_inputs(1, 4, 4, 300, None, False, dtype=torch.float64, seed=8)
    with torch.no_grad():
        x["A"].mul_(40.0)
        x["delta"].mul_(20.0)
    y, last = scan(**x, return_last_state=True)
    y_ref, last_ref = selective_scan_reference(**x, return_last_state=True)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(last, last_ref)


def test_saves_chunk_states_not_every_state():
    batch, channels, n, length = 1, 32, 16, 1024
    x = make_inputs(batch, channels, n, length, None, True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.numel()) or t, lambda t: t
    ):
        selective_scan_torch(**x, delta_softplus=True)
    assert max(saved) <= batch * channels * length * n // 16


def test_initial_state_continues_a_split_sequence():
    x = make_inputs(1, 4, 4, 60, None, False, dtype=torch.float64, seed=9)
    x = {k: v.detach() for k, v in x.items()}
    first = {k: v[..., :25] if k != "A" else v for k, v in x.items()}
    second = {k: v[..., 25:] if k != "A" else v for k, v in x.items()}
    y1, h1 = selective_scan_torch(**first, return_last_state=True, chunk=8)
    y2, h2 = selective_scan_torch(**second, initial_state=h1, return_last_state=True, chunk=8)
    y, h = selective_scan_torch(**x, return_last_state=True, chunk=8)
    torch.testing.assert_close(torch.cat([y1, y2], -1), y)
    torch.testing.assert_close(h2, h)


def test_cpu_default_and_backend_argument_wins(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend(torch.device("cpu"))[0] == ("numba" if HAS_NUMBA else "torch")
    monkeypatch.setenv(ENV_VAR, "reference")
    assert resolve_backend(torch.device("cpu"))[0] == "reference"
    assert resolve_backend(torch.device("cpu"), "torch")[0] == "torch"


def test_env_var_forces_the_reference(monkeypatch):
    x = {k: v.detach() for k, v in make_inputs(1, 4, 4, 20, None, True, seed=10).items()}
    monkeypatch.setenv(ENV_VAR, "reference")
    y = selective_scan(**x, delta_softplus=True)
    assert torch.equal(y, selective_scan_reference(**x, delta_softplus=True))


def test_unknown_backend_names_its_source(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(ConfigError, match=ENV_VAR):
        resolve_backend(torch.device("cpu"))
    with pytest.raises(ConfigError, match="backend is 'fast'"):
        resolve_backend(torch.device("cpu"), "fast")


def test_forcing_triton_without_its_module_says_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "kscan.kernels.scan_triton", None)
    with pytest.raises(ConfigError, match="triton backend needs .*TRITON_INTERPRET=1"):
        resolve_backend(torch.device("cpu"), "triton")


@pytest.mark.skipif(scan_mamba_ssm.mamba_ssm_available(), reason="mamba-ssm is installed")
def test_forcing_mamba_ssm_without_it_says_what_is_missing():
    x = {k: v.detach() for k, v in make_inputs(1, 4, 4, 20, None, False).items()}
    with pytest.raises(
        ConfigError, match=r"mamba-ssm's compiled extension \(pip install 'kscan\[cuda\]'\)"
    ):
        selective_scan(**x, backend="mamba_ssm")


def _replace(x: dict[str, torch.Tensor], **changes) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in {**x, **changes}.items()}


BAD = {
    "u": torch.zeros(2, 4),
    "delta": torch.zeros(2, 4, 9),
    "A": torch.zeros(3, 4),
    "B": torch.zeros(2, 3, 10),  # N=3, but A has N=4
    "C": torch.zeros(2, 3, 4, 10),  # 3 groups do not divide D=4
    "D": torch.zeros(5),
    "z": torch.zeros(2, 4, 11),
    "delta_bias": torch.zeros(4, 1),
    "initial_state": torch.zeros(2, 4, 5),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_shape_names_the_argument(name):
    x = make_inputs(2, 4, 4, 10, None, True)
    with pytest.raises(ShapeError, match=rf"^selective_scan: {name} has shape"):
        selective_scan(**_replace(x, **{name: BAD[name]}))


def test_integer_and_complex_inputs_are_rejected():
    x = make_inputs(1, 4, 4, 10, None, False)
    with pytest.raises(ShapeError, match="u is torch.int64"):
        selective_scan(**_replace(x, u=torch.zeros(1, 4, 10, dtype=torch.long)))
    with pytest.raises(ShapeError, match="A is torch.complex64"):
        selective_scan(**_replace(x, A=torch.zeros(4, 4, dtype=torch.complex64)))


# ---- the numba backend (fused CPU kernels) ----

HAS_NUMBA = importlib.util.find_spec("numba") is not None
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")
if HAS_NUMBA:
    from kscan.kernels import scan_numba
    from kscan.kernels.scan_numba import selective_scan_numba

FLOAT64_TOL = dict(rtol=1e-10, atol=1e-10)

NUMBA_CASES = [  # batch, D, N, L, groups, extras
    (2, 4, 4, 1, None, False),  # L = 1
    (2, 4, 4, 1, 2, True),
    (1, 6, 1, 37, None, True),  # N = 1, L not a multiple of the chunk
    (2, 8, 16, 100, 2, True),  # N = 16, grouped
    (1, 8, 4, 64, 4, False),  # whole chunks only
    (1, 80, 4, 33, None, True),  # a block of 64 channels and a short one
    (1, 160, 2, 40, None, True),  # three blocks per group: three parts in the backward
    (2, 72, 3, 20, 2, False),  # 36 channels per group
]


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_block_transpose_matches_numpy(dtype):
    """The kernels' transposition (64- and 32-byte blocks of vector shuffles, then single
    elements) against numpy's, for sizes that use every path, inside a larger strided buffer."""
    import numba

    @numba.njit
    def transpose(src, s_base, s_major, dst, d_base, d_major, rows, cols):
        scan_numba._transpose(src, s_base, s_major, dst, d_base, d_major, rows, cols)

    rng = np.random.default_rng(0)
    for rows, cols in [(16, 16), (24, 16), (16, 24), (37, 21), (3, 5), (64, 33), (8, 8)]:
        s_major, d_major = cols + 7, rows + 3
        src = rng.standard_normal(5 + rows * s_major).astype(dtype)
        dst = np.full(2 + cols * d_major, np.nan, dtype)
        transpose(src, 5, s_major, dst, 2, d_major, rows, cols)
        block = src[5:].reshape(rows, s_major)[:, :cols]
        got = dst[2:].reshape(cols, d_major)
        np.testing.assert_array_equal(got[:, :rows], block.T)
        assert np.isnan(got[:, rows:]).all() and np.isnan(dst[:2]).all()  # nothing else written


@needs_numba
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-7), (torch.float64, 1e-15)])
def test_numba_exp2_is_accurate_and_clamped(dtype, tol):
    """The kernels' vectorisable ``2^e`` against numpy's, across and beyond the clamped range."""
    import numba

    @numba.njit
    def exp2_all(e, c, out):
        k = scan_numba._exp2_constants(c)
        for i in range(e.shape[0]):
            out[i] = scan_numba._exp2(e[i], k)

    c = scan_numba._constants(dtype)
    lo, hi = float(c[0]), float(c[1])
    e = np.linspace(lo - 8.0, hi + 8.0, 200_001).astype(c.dtype)
    out = np.empty_like(e)
    exp2_all(e, c, out)
    expected = np.exp2(np.clip(e.astype(np.float64), lo, hi))
    assert np.all(np.abs(out / expected - 1.0) < tol)
    assert out[0] == 2.0**lo and out[-1] == 2.0**hi  # clamped, never subnormal or infinite


@needs_numba
@pytest.mark.parametrize("batch, channels, n, length, groups, extras", NUMBA_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_numba_matches_reference(batch, channels, n, length, groups, extras, dtype):
    x = make_inputs(batch, channels, n, length, groups, extras, dtype=dtype, seed=length)
    tol = FLOAT64_TOL if dtype == torch.float64 else FLOAT32_TOL
    assert_match(x, selective_scan_numba, tol)


@needs_numba
@pytest.mark.slow
def test_numba_long_sequence_matches_reference():
    x = make_inputs(1, 4, 16, 4096, None, True, seed=4)
    assert_match(x, selective_scan_numba, FLOAT32_TOL)


@needs_numba
def test_numba_bfloat16_inputs_match_reference():
    x = make_inputs(2, 4, 4, 40, 2, True, dtype=torch.bfloat16, seed=5)
    assert_match(x, selective_scan_numba, BF16_TOL)


@needs_numba
@pytest.mark.parametrize("groups, extras", [(None, True), (2, True), (None, False)])
def test_numba_gradcheck_float64(groups, extras):
    x = make_inputs(1, 4, 2, 7, groups, extras, dtype=torch.float64, seed=6)
    names = list(x)

    def fn(*tensors):
        kw = dict(zip(names, tensors, strict=True))
        return selective_scan_numba(**kw, delta_softplus=extras, return_last_state=True)

    assert torch.autograd.gradcheck(fn, tuple(x.values()))


@needs_numba
def test_numba_backward_is_bitwise_reproducible():
    x = make_inputs(2, 160, 4, 70, 2, True, seed=11)
    first = run_with_grads(selective_scan_numba, x)[2]
    second = run_with_grads(selective_scan_numba, x)[2]
    for name in x:
        assert torch.equal(first[name], second[name]), name


@needs_numba
def test_numba_gradients_do_not_depend_on_the_thread_count():
    x = make_inputs(2, 160, 4, 70, 2, True, seed=12)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_with_grads(selective_scan_numba, x)[2]
        torch.set_num_threads(2)
        two = run_with_grads(selective_scan_numba, x)[2]
    finally:
        torch.set_num_threads(threads)
    for name in x:
        assert torch.equal(one[name], two[name]), name


@needs_numba
def test_numba_saves_chunk_states_only_when_gradients_are_needed():
    batch, channels, n, length = 1, 32, 16, 1024
    x = make_inputs(batch, channels, n, length, None, True)
    inputs = {v.data_ptr() for v in x.values()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        selective_scan_numba(**x, delta_softplus=True)
        extra = [t.numel() for t in saved if t.data_ptr() not in inputs]
        assert extra == [batch * channels * length * n // scan_numba.CHUNK]
        saved.clear()
        with torch.no_grad():
            selective_scan_numba(**x, delta_softplus=True)
    assert not saved


@needs_numba
def test_numba_initial_state_continues_a_split_sequence():
    x = make_inputs(1, 4, 4, 60, None, False, dtype=torch.float64, seed=9)
    x = {k: v.detach() for k, v in x.items()}
    first = {k: v[..., :25] if k != "A" else v for k, v in x.items()}
    second = {k: v[..., 25:] if k != "A" else v for k, v in x.items()}
    y1, h1 = selective_scan_numba(**first, return_last_state=True)
    y2, h2 = selective_scan_numba(**second, initial_state=h1, return_last_state=True)
    y, h = selective_scan_numba(**x, return_last_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], -1), y)
    torch.testing.assert_close(h2, h)


@needs_numba
def test_numba_parts_divide_the_blocks_within_the_memory_budget():
    for blocks, channels, groups in [(1, 64, 1), (12, 768, 1), (3, 160, 1), (4, 512, 2)]:
        parts = scan_numba._parts(blocks, channels, groups)
        assert blocks % parts == 0
        assert 2 * (parts - 1) * groups / channels <= scan_numba.PARTS_BUDGET
    assert scan_numba._parts(12, 768, 1) == 12
    assert scan_numba._parts(3, 160, 1) == 3


@needs_numba
def test_cpu_default_is_numba_and_matches_reference(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend(torch.device("cpu"))[0] == "numba"
    x = make_inputs(2, 8, 16, 50, 4, True, seed=3)
    assert_match(x, selective_scan, FLOAT32_TOL)


@needs_numba
def test_forcing_numba_for_cuda_tensors_is_refused():
    with pytest.raises(ConfigError, match="numba backend needs CPU tensors, got tensors on cuda"):
        resolve_backend(torch.device("cuda"), "numba")


def test_without_numba_cpu_falls_back_to_torch(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setitem(sys.modules, "numba", None)
    monkeypatch.delitem(sys.modules, "kscan.kernels.scan_numba", raising=False)
    with pytest.raises(ImportError):
        importlib.import_module("kscan.kernels.scan_numba")
    assert resolve_backend(torch.device("cpu"))[0] == "torch"
    with pytest.raises(ConfigError, match=r"numba backend needs numba \(pip install numba\)"):
        resolve_backend(torch.device("cpu"), "numba")
