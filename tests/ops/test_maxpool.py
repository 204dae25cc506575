"""ops.maxpool_relevance: the C++ backend (every SIMD level this CPU has) and the Triton backend
(interpreter, tiny shapes) against the torch reference, bit for bit -- ties, NaN and +-inf in the
input and in the relevance, signed zeros, windows that do not tile the input, empty input -- and
the reference against a plain-Python reading of its definition."""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from semlens_fast.errors import ArgumentError, DTypeError, ShapeError
from semlens_fast.ops import _backend, maxpool_relevance
from semlens_fast.ops.reference.maxpool import maxpool_relevance as reference

ext = _backend.extension()
ISAS = ["scalar", "avx2", "avx512"][: ["scalar", "avx2", "avx512"].index(ext.best_isa()) + 1] if ext else []
VALUES = [-2.0, -1.0, -0.0, 0.0, 0.5, 1.0, 3.0]  # few values: ties in most windows
SPECIALS = [float("nan"), float("inf"), float("-inf")]
INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT[t.dtype])


def same_bits(got: torch.Tensor, want: torch.Tensor, nan_payload: bool = True) -> bool:
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    if nan_payload:
        return torch.equal(bits(got), bits(want))
    nan = want.isnan()
    return torch.equal(got.isnan(), nan) and torch.equal(bits(got)[~nan], bits(want)[~nan])


@st.composite
def cases(draw, dtypes, max_side=9):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    B, C = draw(st.integers(0, 2)), draw(st.integers(1, 3))
    H, W = draw(st.integers(0, max_side)), draw(st.integers(0, max_side))
    dt = draw(st.sampled_from(dtypes))
    specials = draw(st.booleans())
    pool = VALUES + (SPECIALS if specials else [])
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.tensor(pool)[torch.randint(0, len(pool), (B, C, H, W), generator=g)].to(dt)
    R = torch.randn(B, C, H // kh, W // kw, generator=g)
    if specials and R.numel():
        R.view(-1)[torch.randint(0, R.numel(), (2,), generator=g)] = torch.tensor([float("nan"), -float("inf")])
    R = R.to(dt)
    layout = draw(st.sampled_from(["contiguous", "channels_last", "strided"]))
    if layout == "channels_last" and x.numel():
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.cat([x, x], -1)[..., ::2] if W else x
    return x, R, (kh, kw)


def run(backend: str, *args):
    old = os.environ.get("SEMLENS_BACKEND")
    os.environ["SEMLENS_BACKEND"] = backend
    try:
        return maxpool_relevance(*args)
    finally:
        if old is None:
            os.environ.pop("SEMLENS_BACKEND", None)
        else:
            os.environ["SEMLENS_BACKEND"] = old


def python_oracle(x: torch.Tensor, R: torch.Tensor, k: tuple[int, int]) -> torch.Tensor:
    """The definition, one window at a time, in float64 (the inputs here are float32)."""
    kh, kw = k
    B, C, H, W = x.shape
    out = torch.zeros(B, C, H, W, dtype=torch.float64)
    for b in range(B):
        for c in range(C):
            for ho in range(H // kh):
                for wo in range(W // kw):
                    win = [float(x[b, c, ho * kh + i, wo * kw + j]) for i in range(kh) for j in range(kw)]
                    y = math.nan if any(math.isnan(v) for v in win) else max(win)
                    cnt = sum(v == y for v in win) or 1
                    r = float(R[b, c, ho, wo]) / cnt
                    for i in range(kh):
                        for j in range(kw):
                            out[b, c, ho * kh + i, wo * kw + j] = (1.0 if win[i * kw + j] == y else 0.0) * r
    return out


@settings(max_examples=60, deadline=None)
@given(cases([torch.float32]))
def test_reference_follows_its_definition(case):
    x, R, k = case
    got = reference(x, R, k).double()
    want = python_oracle(x, R, k)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    # float32 division vs float64: equal up to float32 rounding of the share
    assert torch.allclose(got[~nan], want[~nan], rtol=1e-6, atol=0)
    assert torch.equal(torch.signbit(got[~nan]), torch.signbit(want[~nan]))


@pytest.mark.skipif(ext is None, reason="C++ extension not built")
@settings(max_examples=150, deadline=None)
@given(st.sampled_from(ISAS or ["scalar"]), cases([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
def test_cpu_equals_reference_at_every_simd_level(isa, case):
    x, R, k = case
    ext.set_isa(isa)
    try:
        got = run("cpu", x, R, k)
    finally:
        ext.set_isa(ext.best_isa())
    want = run("reference", x, R, k)
    assert same_bits(got, want), (isa, k, x, R, got, want)
    assert got.is_contiguous() and got.shape == x.shape


@pytest.mark.skipif(ext is None, reason="C++ extension not built")
def test_cpu_threads_and_large_rows():
    """A shape large enough for the OpenMP split (several threads), with ties and NaN."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (4, 8, 57, 61), generator=g).float()
    x[1, 2, 5, 7] = float("nan")
    R = torch.randn(4, 8, 28, 30, generator=g)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            assert same_bits(run("cpu", x, R, (2, 2)), run("reference", x, R, (2, 2)))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="needs CUDA or TRITON_INTERPRET=1")
@settings(max_examples=40, deadline=None)
@given(cases([torch.float32, torch.float16, torch.bfloat16, torch.float64], max_side=7))
def test_triton_equals_reference(case):
    x, R, k = case
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, R = x.to(dev), R.to(dev)
    got = run("triton", x, R, k)
    want = run("reference", x, R, k)
    # NaN payloads of 16-bit divisions differ between torch's CPU kernels and the GPU's; values
    # and signs are equal bit for bit
    assert same_bits(got.cpu(), want.cpu(), nan_payload=x.dtype in (torch.float32, torch.float64)), (k, x, R)


def test_a_tied_window_splits_and_a_nan_window_drops():
    x = torch.tensor([[[[1.0, 3.0, 0.0, float("nan")], [3.0, -1.0, 2.0, 5.0]]]])
    R = torch.tensor([[[[6.0, -4.0]]]])
    for backend in ["reference"] + (["cpu"] if ext else []):
        out = run(backend, x, R, 2)
        # two inputs tie at 3: 6 / 2 each; the second window holds NaN: nothing passes, and its
        # non-winners get 0 * (-4) = -0.0
        assert out[0, 0].tolist() == [[0.0, 3.0, -0.0, -0.0], [3.0, 0.0, -0.0, -0.0]]
        assert torch.signbit(out[0, 0, 0, 2]) and not torch.signbit(out[0, 0, 0, 0])
        assert float(out.sum()) == 6.0


def test_bad_arguments_are_named():
    x, R = torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 2, 2)
    with pytest.raises(ArgumentError, match="kernel_size"):
        maxpool_relevance(x, R, 0)
    with pytest.raises(ArgumentError, match="kernel_size"):
        maxpool_relevance(x, R, (2, 2, 2))
    with pytest.raises(ArgumentError, match="x must be a torch.Tensor"):
        maxpool_relevance(x.tolist(), R, 2)
    with pytest.raises(DTypeError, match="R has dtype torch.float64 but x has torch.float32"):
        maxpool_relevance(x, R.double(), 2)
    with pytest.raises(DTypeError, match="x has dtype torch.int64"):
        maxpool_relevance(x.long(), R, 2)
    with pytest.raises(ShapeError, match=r"R must have shape .*\[1, 2, 2, 2\]"):
        maxpool_relevance(x, torch.zeros(1, 2, 3, 2), 2)
    with pytest.raises(ShapeError, match=r"x must be \[B, C, H, W\]"):
        maxpool_relevance(x[0], R, 2)


def test_meta_tensors_get_shapes_and_compile_traces_it():
    out = maxpool_relevance(torch.empty(2, 3, 8, 6, device="meta"), torch.empty(2, 3, 4, 3, device="meta"), 2)
    assert out.device.type == "meta" and out.shape == (2, 3, 8, 6)
    f = torch.compile(lambda a, b: maxpool_relevance(a, b, 2) * 2, fullgraph=True, backend="eager")
    x, R = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2)
    assert torch.equal(f(x, R), maxpool_relevance(x, R, 2) * 2)


def test_opcheck_and_inductor():
    x = torch.randint(-2, 3, (2, 3, 6, 7)).float()
    R = torch.randn(2, 3, 3, 3)
    torch.library.opcheck(torch.ops.semlens.maxpool_relevance, (x, R, 2, 2))
    torch.library.opcheck(torch.ops.semlens.maxpool_relevance, (x.double(), torch.randn(2, 3, 2, 7).double(), 3, 1))
    with pytest.raises(ShapeError, match="do not fit"):  # the registered op checks shapes itself
        torch.ops.semlens.maxpool_relevance(x, torch.randn(2, 3, 1, 1), 2, 2)
    f = torch.compile(lambda a, b: maxpool_relevance(a, b, 2).sum(1), fullgraph=True)
    assert torch.equal(f(x, R), maxpool_relevance(x, R, 2).sum(1))
