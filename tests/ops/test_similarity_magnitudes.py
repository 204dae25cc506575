"""Exactness over magnitudes (issue 20.1): cosine is scale-invariant and the reference
computes it in float64, where every float32 square and product is representable; the
fast backends' float32 / int16 / int8 passes must not lose rows whose squares underflow
(|x| ~ 1e-30, denormals) or overflow (|x| ~ 1e20 .. 3e38), nor rows whose components
span many decades, nor mixed scales across rows. Every C++ path (fused few-query pass,
blocked float32 pass, int16 pass, int8 pre-filter, batched large-K merge) at every SIMD
level is compared with the reference: ids equal, scores bit for bit."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semlens_fast.errors import ArgumentError
from semlens_fast.ops import _backend, cosine_topk, pairwise_max, pairwise_topk

from .test_similarity import CPU_ISAS, with_backend

ext = _backend.extension()
pytestmark = pytest.mark.skipif(ext is None, reason="C++ extension not built")

MODES = ["f32", "i16", "i16-batched"]
SETTINGS = dict(max_examples=25, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])


@pytest.fixture(params=[f"{i}-{m}" for i in CPU_ISAS for m in MODES])
def path(request, monkeypatch):
    """An ISA level and a candidate pass: f32 (fused up to 8 queries, blocked above), i16
    (int16 for every Q, the int8 pre-filter from 4 queries on AVX2), i16 with the
    batched large-K merge forced on."""
    from semlens_fast.ops.cpu import similarity as cpu

    isa, mode = request.param.split("-", 1)
    monkeypatch.setenv("SEMLENS_BACKEND", "cpu")
    monkeypatch.setenv("SEMLENS_SIM_INT8", "1")
    monkeypatch.setattr(cpu, "INT16_MIN_QUERIES", 1 << 30 if mode == "f32" else 1)
    if mode == "i16-batched":
        monkeypatch.setattr(cpu, "MERGE_MIN_K", 1)
    ext.set_isa(isa)
    yield request.param
    ext.set_isa(ext.best_isa())


def same_as_reference(fn, *args, **kw):
    """``fn`` gives the reference's result, or both raise ArgumentError."""
    try:
        want = with_backend("reference", fn, *args, **kw)
    except ArgumentError:
        with pytest.raises(ArgumentError):
            fn(*args, **kw)
        return None
    got = fn(*args, **kw)
    assert torch.equal(got[1], want[1]), "ids differ"
    assert torch.equal(got[0].view(torch.int32), want[0].view(torch.int32)), "scores differ"
    return got


# decimal exponents of the scale factors: the issue's range and beyond (denormals,
# values close to the float32 maximum)
EXPONENTS = st.one_of(st.integers(-30, 30), st.sampled_from([-45, -42, -40, -38, -37, -36, 35, 36, 37, 38]))


@st.composite
def scaled_cases(draw):
    d = draw(st.sampled_from([1, 2, 3, 7, 15, 16, 17, 31, 33, 48, 65]))
    Q = draw(st.sampled_from([1, 2, 3, 5, 8, 9, 13]))
    N = draw(st.integers(1, 50))
    k = draw(st.integers(1, N + 2))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(N, d, generator=g, dtype=torch.float64)
    if draw(st.booleans()):  # near-duplicates: ties and close calls across the k-th place
        x[1::3] = x[0] * (1 + 1e-7 * torch.randn(len(range(1, N, 3)), 1, generator=g, dtype=torch.float64))
    q = torch.randn(Q, d, generator=g, dtype=torch.float64)
    if draw(st.booleans()):
        q[0] = x[0]
    how = draw(st.sampled_from(["global", "rows", "within"]))
    if how == "global":  # the whole database at one scale (the issue's db * 1e-30)
        x = x * 10.0 ** draw(EXPONENTS)
    elif how == "rows":  # every row at its own scale
        e = torch.tensor(draw(st.lists(EXPONENTS, min_size=N, max_size=N)), dtype=torch.float64)
        x = x * (10.0 ** e).unsqueeze(1)
    else:  # components spanning many decades within rows
        e = torch.randint(-20, 21, (N, d), generator=g).double()
        x = x * 10.0 ** e
    x = torch.clamp(x, -3.0e38, 3.0e38)
    q = (q * 10.0 ** draw(EXPONENTS)).clamp(-3.0e38, 3.0e38)
    return q.float().to(dtype), x.float().to(dtype), k


@settings(**SETTINGS)
@given(scaled_cases())
def test_scaled_inputs_equal_reference(path, case):
    q, x, k = case
    same_as_reference(cosine_topk, q, x, k)


@pytest.mark.parametrize("scale", [1e-45, 1e-40, 1e-30, 1e-20, 1e-15, 1.0, 1e15, 1e19, 1e20, 1e30, 1e38])
def test_issue_repro_database_times_scale(path, scale):
    """The issue's case, cosine_topk(q, db * s, k): the ids of db itself at any scale whose
    values stay normal (or exactly representable after the scaling)."""
    g = torch.Generator().manual_seed(0)
    q, db = torch.randn(13, 33, generator=g), torch.randn(300, 33, generator=g)
    got = same_as_reference(cosine_topk, q[:5], db * scale, 7)
    got13 = same_as_reference(cosine_topk, q, db * scale, 7)
    if 1e-30 <= scale <= 1e30:  # components stay normal floats: scores as for db itself
        want = with_backend("reference", cosine_topk, q, db, 7)
        assert torch.equal(got13[1], want[1])
        assert torch.equal(got[1], want[1][:5])


def test_multithreaded_mixed_scales(path):
    """Enough work for every thread (and several row chunks), rows at scales 1e-38..1e38,
    some rows outside float32's safe range in every block, zero rows, duplicates."""
    g = torch.Generator().manual_seed(4)
    N, d = 5003, 70
    x = torch.randn(N, d, generator=g, dtype=torch.float64)
    e = torch.randint(-38, 38, (N, 1), generator=g).double()
    x = (x * 10.0 ** e).clamp(-3e38, 3e38).float()
    x[100] = 0
    x[200:260] = x[7]
    q = torch.randn(12, d, generator=g)
    q[0] = x[7] * 1e-25
    for k in (1, 40):
        same_as_reference(cosine_topk, q, x, k)
        same_as_reference(cosine_topk, q[:3], x, k)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_pairwise_scaled(path, scale):
    g = torch.Generator().manual_seed(9)
    a = torch.randn(40, 17, generator=g)
    b = torch.randn(55, 17, generator=g)
    same_as_reference(pairwise_topk, a * scale, b, 3)
    same_as_reference(pairwise_topk, a, b * scale, 3, exclude_diagonal=True)
    s, i = same_as_reference(pairwise_max, a * scale, a * (1 / scale), exclude_diagonal=True)
    want = with_backend("reference", pairwise_max, a, a, exclude_diagonal=True)
    assert torch.equal(i, want[1])


def test_nonfinite_still_refused(path):
    """Rescaling handles finite magnitudes only: NaN/inf rows are still named."""
    x = torch.randn(30, 9) * 1e30
    x[4, 2] = float("inf")
    x[11, 0] = float("nan")
    for Q in (2, 11):
        with pytest.raises(ArgumentError, match=r"db has NaN or infinite values in 2 row\(s\): \[4, 11\]"):
            cosine_topk(torch.randn(Q, 9), x, 3)


def test_half_precision_extremes(path):
    """fp16 subnormals / maximum and bf16 subnormals / maximum as storage."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(64, 24, generator=g)
    cases = [
        (base * 2.0**-20).to(torch.float16),   # fp16 subnormal range
        (base / base.abs().max() * 65504).to(torch.float16),  # up to the fp16 maximum
        (base * 1e-39).to(torch.bfloat16),      # bf16 subnormals
        (base / base.abs().max() * 3.3e38).to(torch.bfloat16),  # up to the bf16 maximum
    ]
    q = torch.randn(10, 24, generator=g)
    for x in cases:
        assert bool(torch.isfinite(x.float()).all()) and not math.isinf(float(x.float().abs().max()))
        same_as_reference(cosine_topk, q[:2], x, 5)
        same_as_reference(cosine_topk, q, x, 5)
