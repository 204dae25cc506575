"""Similarity ops: every backend equals the torch reference exactly (scores bitwise,
ids), the reference equals a plain-Python oracle of the documented definition, and
bad input fails loudly."""
from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semlens_fast.errors import ArgumentError, DeviceError, DTypeError, ShapeError
from semlens_fast.ops import _backend, cosine_topk, pairwise_max, pairwise_topk
from semlens_fast.ops.reference import similarity as ref

ext = _backend.extension()
CPU_ISAS = []
if ext is not None:
    order = ["scalar", "avx2", "avx512"]
    CPU_ISAS = order[: order.index(ext.best_isa()) + 1]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SETTINGS = dict(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
# dyadic values: many exact ties, exact in every dtype
VALUES = [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 3.0]


# the C++ candidate pass runs on float32 or int16 (from INT16_MIN_QUERIES queries on):
# both are tested at every SIMD level
@pytest.fixture(params=["reference"] + [f"cpu-{i}-{m}" for i in CPU_ISAS for m in ("f32", "i16")])
def backend(request, monkeypatch):
    name = request.param
    if name.startswith("cpu"):
        from semlens_fast.ops.cpu import similarity as cpu

        monkeypatch.setenv("SEMLENS_BACKEND", "cpu")
        monkeypatch.setattr(cpu, "INT16_MIN_QUERIES", 1 if name.endswith("i16") else 1 << 30)
        monkeypatch.setenv("SEMLENS_SIM_INT8", "1")  # int8 pre-filter (AVX2, >= 4 queries) at any N
        ext.set_isa(name.split("-")[1])
        yield name
        ext.set_isa(ext.best_isa())
    else:
        monkeypatch.setenv("SEMLENS_BACKEND", "reference")
        yield name


def with_backend(name, fn, *args, **kw):
    import os

    old = os.environ.get("SEMLENS_BACKEND")
    os.environ["SEMLENS_BACKEND"] = name
    try:
        return fn(*args, **kw)
    finally:
        if old is None:
            del os.environ["SEMLENS_BACKEND"]
        else:
            os.environ["SEMLENS_BACKEND"] = old


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def oracle(q: torch.Tensor, x: torch.Tensor, k: int, exclude=None):
    """Plain Python: the documented definition, sequential float64, ties by lower id."""
    qs, xs = q.float().tolist(), x.float().tolist()
    out = []
    for a, qa in enumerate(qs):
        nq = math.sqrt(sum_seq(v * v for v in qa))
        ent = []
        for j, xr in enumerate(xs):
            if exclude is not None and j in exclude[a]:
                continue
            nx = math.sqrt(sum_seq(v * v for v in xr))
            dot = sum_seq(u * v for u, v in zip(qa, xr))
            s = 0.0 if (nq == 0 or nx == 0) else f32(dot / (nq * nx)) + 0.0
            ent.append((-s, j))
        ent.sort()
        row = [(-s, j) for s, j in ent[:k]]
        row += [(-math.inf, -1)] * (k - len(row))
        out.append(row)
    return out


def sum_seq(it):
    acc = 0.0
    for v in it:
        acc += v
    return acc


def as_lists(s, i):
    return [[(float(a), int(b)) for a, b in zip(rs, ri)] for rs, ri in zip(s.tolist(), i.tolist())]


@st.composite
def cases(draw, max_n=40):
    d = draw(st.integers(1, 19))
    Q = draw(st.integers(1, 9))
    N = draw(st.integers(1, max_n))
    k = draw(st.integers(1, 12))
    dtype = draw(st.sampled_from(DTYPES))
    q = torch.tensor(draw(st.lists(st.sampled_from(VALUES), min_size=Q * d, max_size=Q * d))).reshape(Q, d)
    # few distinct rows -> many exact duplicates (ties across the k-th place)
    distinct = draw(st.integers(1, 6))
    base = torch.tensor(draw(st.lists(st.sampled_from(VALUES), min_size=distinct * d, max_size=distinct * d))).reshape(distinct, d)
    pick = torch.tensor(draw(st.lists(st.integers(0, distinct - 1), min_size=N, max_size=N)))
    x = base[pick].to(dtype)
    exclude = None
    if draw(st.booleans()):
        m = draw(st.integers(1, 3))
        exclude = torch.tensor(draw(st.lists(st.integers(-1, N - 1), min_size=Q * m, max_size=Q * m))).reshape(Q, m)
    return q.to(dtype), x, k, exclude


@settings(**SETTINGS)
@given(cases(max_n=25))
def test_reference_matches_python_oracle(case):
    q, x, k, exclude = case
    s, i = with_backend("reference", cosine_topk, q, x, k, exclude=exclude)
    want = oracle(q, x, k, None if exclude is None else exclude.tolist())
    assert as_lists(s, i) == want


@settings(**SETTINGS)
@given(cases())
def test_backend_equals_reference_on_ties(backend, case):
    q, x, k, exclude = case
    s, i = cosine_topk(q, x, k, exclude=exclude)
    rs, ri = with_backend("reference", cosine_topk, q, x, k, exclude=exclude)
    assert torch.equal(i, ri)
    assert torch.equal(s.view(torch.int32), rs.view(torch.int32))
    assert s.dtype == torch.float32 and i.dtype == torch.int64 and s.shape == (q.shape[0], k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 1000, 64, 10), (33, 3001, 100, 25), (2, 513, 8, 1)])
def test_backend_equals_reference_random(backend, dtype, shape):
    """Random (non-dyadic) data: still bit-identical, because the score is defined exactly."""
    Q, N, d, k = shape
    g = torch.Generator().manual_seed(Q * N + d)
    q = torch.randn(Q, d, generator=g).to(dtype)
    x = torch.randn(N, d, generator=g).to(dtype)
    x[5] = 0  # zero row
    x[17] = x[3]  # duplicate row
    s, i = cosine_topk(q, x, k)
    rs, ri = with_backend("reference", cosine_topk, q, x, k)
    assert torch.equal(i, ri)
    assert torch.equal(s.view(torch.int32), rs.view(torch.int32))
    # sorted best first, ties by id
    assert bool((s[:, :-1] >= s[:, 1:]).all())


# Query counts that exercise each C++ tile path: in float32 mode the fused one-row kernel
# (1..8 queries; two accumulator sets up to 3) and the 4 x 3 float32 kernel (13); in int16
# mode the generic int16 kernels (1, 3) and the AVX2 6 x 2 kernel with its remainder groups
# (6, 8 = 6 + 2, 13 = 6 + 6 + 1). N is odd (last row pair incomplete), d is a multiple of
# 16 or not (zero padding of the int16 rows and queries).
@pytest.mark.parametrize("Q", [1, 3, 6, 8, 13])
@pytest.mark.parametrize("d", [37, 48])
def test_tile_paths_equal_reference(backend, Q, d):
    g = torch.Generator().manual_seed(100 * Q + d)
    # dyadic values: exact ties between rows, between queries and across the k-th place
    vals = torch.tensor(VALUES)
    x = vals[torch.randint(0, len(VALUES), (1001, d), generator=g)]
    x[::7] = x[3]  # many duplicates of one row
    x[10] = 0  # zero row
    q = vals[torch.randint(0, len(VALUES), (Q, d), generator=g)]
    q[-1] = x[3]  # a query equal to the duplicated row: >= 143 ties at the top
    exclude = torch.randint(-1, 1001, (Q, 2), generator=g)
    exclude[0, 0] = 3
    for dtype in DTYPES:
        for k in (1, 20):
            for ex in (None, exclude):
                s, i = cosine_topk(q.to(dtype), x.to(dtype), k, exclude=ex)
                rs, ri = with_backend("reference", cosine_topk, q.to(dtype), x.to(dtype), k, exclude=ex)
                assert torch.equal(i, ri)
                assert torch.equal(s.view(torch.int32), rs.view(torch.int32))
    # k > N and an empty db
    s, i = cosine_topk(q, x[:5], 9)
    rs, ri = with_backend("reference", cosine_topk, q, x[:5], 9)
    assert torch.equal(i, ri) and torch.equal(s.view(torch.int32), rs.view(torch.int32))
    assert i[:, 5:].eq(-1).all() and torch.isneginf(s[:, 5:]).all()
    s, i = cosine_topk(q, x[:0], 3)
    assert i.eq(-1).all() and torch.isneginf(s).all()


@pytest.mark.parametrize("Q", [1, 3, 6, 13])
def test_nonfinite_db_rows_every_tile_path(backend, Q):
    x = torch.randn(2501, 40)
    x[7, 2] = float("nan")
    x[2500, 39] = float("-inf")
    q = torch.randn(Q, 40)
    with pytest.raises(ArgumentError, match=r"\[7, 2500\]"):
        cosine_topk(q, x, 3)


def test_fallback_with_massive_ties(backend):
    """Far more exact ties than the candidate margin: the certification must rerun them."""
    d = 16
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, d, generator=g)
    x = base[torch.randint(0, 3, (400,), generator=g)]
    q = torch.cat([base[:2] + 0.01 * torch.randn(2, d, generator=g), torch.zeros(1, d)])
    s, i = cosine_topk(q, x, 50)
    rs, ri = with_backend("reference", cosine_topk, q, x, 50)
    assert torch.equal(i, ri) and torch.equal(s, rs)
    assert torch.equal(i[2], torch.arange(50)) and bool((s[2] == 0).all())  # zero query


def test_cpu_exact_scan_path(monkeypatch):
    if ext is None:
        pytest.skip("extension not built")
    from semlens_fast.ops.cpu import similarity as cpu

    monkeypatch.setattr(cpu, "MAX_CANDIDATES", 4)
    monkeypatch.setattr(cpu, "SCAN_CHUNK", 7)
    x = torch.ones(60, 4)
    x[10:] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    q = torch.ones(2, 4)
    exclude = torch.tensor([[0, 3], [-1, -1]])
    s, i = cpu.cosine_topk(q, x, 5, exclude.contiguous(), extra=0)
    rs, ri = ref.cosine_topk(q, x, 5, exclude)
    assert torch.equal(i, ri) and torch.equal(s, rs)
    assert i[0].tolist() == [1, 2, 4, 5, 6]


def test_padding_and_empty(backend):
    q = torch.randn(3, 8)
    x = torch.randn(2, 8)
    s, i = cosine_topk(q, x, 4)
    assert i[:, 2:].eq(-1).all() and torch.isneginf(s[:, 2:]).all() and i[:, :2].ge(0).all()
    s, i = cosine_topk(q, torch.empty(0, 8), 3)
    assert i.eq(-1).all() and torch.isneginf(s).all() and s.shape == (3, 3)
    s, i = cosine_topk(torch.empty(0, 8), x, 3)
    assert s.shape == (0, 3) and i.shape == (0, 3)
    # every row excluded
    s, i = cosine_topk(q, x, 2, exclude=torch.tensor([[0, 1]] * 3))
    assert i.eq(-1).all()


def test_zero_vectors_score_zero(backend):
    q = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    x = torch.tensor([[0.0, 0.0], [-1.0, 0.0], [2.0, 0.0]])
    s, i = cosine_topk(q, x, 3)
    assert s[0].tolist() == [1.0, 0.0, -1.0] and i[0].tolist() == [2, 0, 1]
    assert s[1].tolist() == [0.0, 0.0, 0.0] and i[1].tolist() == [0, 1, 2]


def test_not_normalised_inputs(backend):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 6, generator=g)
    scale = torch.rand(50, 1, generator=g) * 100 + 1e-3
    s1, i1 = cosine_topk(x[:5], x, 5)
    s2, i2 = cosine_topk(x[:5] * 7, x * scale, 5)
    assert torch.equal(i1[:, 0], torch.arange(5)) and torch.equal(i2[:, 0], torch.arange(5))
    assert torch.allclose(s1, s2, atol=1e-6)


def test_pairwise(backend):
    g = torch.Generator().manual_seed(4)
    a = torch.randn(40, 12, generator=g)
    b = torch.randn(30, 12, generator=g)
    s, i = pairwise_topk(a, b, 3)
    rs, ri = ref.cosine_topk(a, b, 3, None)
    assert torch.equal(i, ri) and torch.equal(s, rs)
    m, j = pairwise_max(a, b)
    assert torch.equal(m, s[:, 0]) and torch.equal(j, i[:, 0])
    # redundancy within one set: the diagonal (self-similarity 1) is excluded
    s, i = pairwise_topk(a, a, 2, exclude_diagonal=True)
    assert not bool((i == torch.arange(40).unsqueeze(1)).any())
    full = ref.exact_scores(a, a)
    full.fill_diagonal_(float("-inf"))
    assert torch.equal(s[:, 0], full.max(dim=1).values)
    m, j = pairwise_max(a, a, exclude_diagonal=True)
    assert torch.equal(j, i[:, 0])


def test_pairwise_contracts_the_right_axis(backend):
    """The reference library picks the axis by comparing shapes: 512 channels x 512 dims
    must not be transposed by mistake."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(16, 16, generator=g)
    b = torch.randn(16, 16, generator=g)
    s, i = pairwise_max(a, b)
    want = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    assert torch.equal(i, want.argmax(dim=1))


@pytest.mark.parametrize("where", ["queries", "db"])
def test_nonfinite_rows_are_named(backend, where):
    q = torch.randn(4, 8)
    x = torch.randn(300, 8)
    if where == "db":
        x[7, 2] = float("nan")
        x[250, 0] = float("inf")
    else:
        q[2, 1] = float("nan")
    with pytest.raises(ArgumentError, match=r"\[7, 250\]" if where == "db" else r"\[2\]") as info:
        cosine_topk(q, x, 3)
    assert where in str(info.value)


def test_bad_arguments(backend):
    q, x = torch.randn(3, 8), torch.randn(10, 8)
    with pytest.raises(ShapeError, match="dimension 8"):
        cosine_topk(q, torch.randn(10, 9), 2)
    with pytest.raises(ShapeError, match="2-D"):
        cosine_topk(q[0], x, 2)
    with pytest.raises(DTypeError, match="float64"):
        cosine_topk(q.double(), x, 2)
    with pytest.raises(DTypeError, match="int64"):
        cosine_topk(q, x.long(), 2)
    for k in (0, -1, 2.0, True):
        with pytest.raises(ArgumentError, match="k must be"):
            cosine_topk(q, x, k)
    with pytest.raises(ShapeError, match="exclude"):
        cosine_topk(q, x, 2, exclude=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ArgumentError, match="exclude"):
        cosine_topk(q, x, 2, exclude=torch.full((3,), -2))
    with pytest.raises(DTypeError, match="exclude"):
        cosine_topk(q, x, 2, exclude=torch.zeros(3))
    with pytest.raises(ShapeError, match="a has dimension"):
        pairwise_topk(q, torch.randn(3, 5), 1)


def test_strided_db_and_numpy_input(backend):
    x = torch.randn(64, 20)
    q = torch.randn(3, 10)
    s, i = cosine_topk(q, x[:, ::2], 4)  # non-unit column stride: copied
    rs, ri = ref.cosine_topk(q, x[:, ::2].contiguous(), 4, None)
    assert torch.equal(i, ri) and torch.equal(s, rs)
    s, i = cosine_topk(q, x[::3, :10], 4)  # row stride 60: no copy
    rs, ri = ref.cosine_topk(q, x[::3, :10].contiguous(), 4, None)
    assert torch.equal(i, ri) and torch.equal(s, rs)
    s2, i2 = cosine_topk(q.numpy(), x[::3, :10].contiguous().numpy(), 4)
    assert torch.equal(i2, ri)


def test_low_precision_recall_on_random_unit_vectors():
    """bf16/fp16 storage: recall@k >= 0.99 against float32 exact search."""
    g = torch.Generator().manual_seed(6)
    N, d, Q, k = 20000, 128, 64, 20
    x = torch.nn.functional.normalize(torch.randn(N, d, generator=g), dim=1)
    q = torch.nn.functional.normalize(torch.randn(Q, d, generator=g), dim=1)
    _, exact = cosine_topk(q, x, k)
    for dt in (torch.bfloat16, torch.float16):
        _, got = cosine_topk(q, x.to(dt), k)
        recall = sum(len(set(a) & set(b)) for a, b in zip(got.tolist(), exact.tolist())) / (Q * k)
        assert recall >= 0.99, (dt, recall)


# ---- int8 pre-filter of the int16 pass (AVX2, from 4 queries on) ---------------------------
# The filter only skips (query, row) pairs whose proven upper bound of the int16 score is
# below the query's current K-th score, so the candidate lists (scores' bits and ids) must be
# identical with the filter on (default) and off (SEMLENS_SIM_INT8=0), at every tile shape.

def _int8_data(kind, N, d, g):
    if kind == "random":
        return torch.randn(N, d, generator=g)
    if kind == "ties":
        vals = torch.tensor(VALUES)
        x = vals[torch.randint(0, len(VALUES), (N, d), generator=g)]
        x[::5] = x[2]
        x[11] = 0
        return x
    if kind == "clustered":
        c = torch.randn(8, d, generator=g)
        return c[torch.randint(0, 8, (N,), generator=g)] + 0.05 * torch.randn(N, d, generator=g)
    # "spiky": one dominant component per row (clamped int8 values), wildly different
    # row norms, zero rows
    x = torch.randn(N, d, generator=g) * torch.logspace(-2, 2, N).unsqueeze(1)
    x[torch.arange(N), torch.randint(0, d, (N,), generator=g)] *= 30.0
    x[::17] = 0
    return x


@pytest.mark.skipif("avx2" not in CPU_ISAS, reason="int8 filter is AVX2 only")
@pytest.mark.parametrize("kind", ["random", "ties", "clustered", "spiky"])
@pytest.mark.parametrize("Q,d", [(4, 37), (5, 64), (9, 100), (13, 16), (16, 513), (24, 128)])
def test_int8_filter_keeps_int16_candidates(monkeypatch, kind, Q, d):
    from semlens_fast.ops.cpu import similarity as cpu

    ext.set_isa("avx2")
    try:
        g = torch.Generator().manual_seed(Q * 1000 + d)
        N = 3001
        x = _int8_data(kind, N, d, g)
        q = _int8_data(kind, Q, d, g) if kind != "ties" else x[torch.randint(0, N, (Q,), generator=g)].clone()
        q[0] = 0  # zero query
        if Q > 4:
            q[1] = x[5]  # a query equal to a row
        qh = cpu._unit_queries(q.float())
        ex = torch.randint(-1, N, (Q, 2), generator=g)
        for dtype in DTYPES:
            xd = x.to(dtype)
            for K in (1, 7, 150):
                for e in (None, ex):
                    monkeypatch.setenv("SEMLENS_SIM_INT8", "0")
                    v0, i0, _ = cpu.candidates(qh, xd, K, e)
                    monkeypatch.setenv("SEMLENS_SIM_INT8", "1")
                    v1, i1, _ = cpu.candidates(qh, xd, K, e)
                    assert torch.equal(i0, i1), (dtype, K)
                    assert torch.equal(v0.view(torch.int32), v1.view(torch.int32)), (dtype, K)
    finally:
        ext.set_isa(ext.best_isa())


@pytest.mark.skipif("avx2" not in CPU_ISAS, reason="int8 filter is AVX2 only")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 20, 3001])
def test_int8_filter_end_to_end_equals_reference(monkeypatch, dtype, k):
    monkeypatch.setenv("SEMLENS_BACKEND", "cpu")
    monkeypatch.setenv("SEMLENS_SIM_INT8", "1")  # by default only from 400k rows on
    ext.set_isa("avx2")
    try:
        g = torch.Generator().manual_seed(k)
        x = _int8_data("clustered", 2999, 70, g).to(dtype)
        x[3] = 0
        x[100:110] = x[50]  # duplicates
        q = torch.cat([x[:8].float(), torch.randn(9, 70, generator=g)]).to(dtype)
        s, i = cosine_topk(q, x, k)
        rs, ri = with_backend("reference", cosine_topk, q, x, k)
        assert torch.equal(i, ri)
        assert torch.equal(s.view(torch.int32), rs.view(torch.int32))
    finally:
        ext.set_isa(ext.best_isa())


# ---- thresholds shared between threads ------------------------------------------------------
# Threads skip rows scoring below the highest K-th score any thread holds; that may only
# drop rows that cannot reach the merged top-K, so the candidate lists must not depend on
# the number of threads (fused, int16 and int8-filtered paths; ties included).

@pytest.mark.parametrize("kind", ["random", "ties", "clustered"])
@pytest.mark.parametrize("Q", [3, 12, 24])
def test_candidates_do_not_depend_on_thread_count(monkeypatch, kind, Q):
    from semlens_fast.ops.cpu import similarity as cpu

    g = torch.Generator().manual_seed(Q)
    N, d = 6007, 96
    x = _int8_data(kind, N, d, g)
    q = x[torch.randint(0, N, (Q,), generator=g)].clone() if kind == "ties" else _int8_data(kind, Q, d, g)
    qh = cpu._unit_queries(q.float())
    threads = torch.get_num_threads()
    try:
        for int8 in ("0", "1"):
            monkeypatch.setenv("SEMLENS_SIM_INT8", int8)
            for K in (1, 7, 150):
                got = []
                for nt in (1, 2, 3):
                    torch.set_num_threads(nt)
                    v, i, _ = cpu.candidates(qh, x, K, None)
                    got.append((v.view(torch.int32), i))
                for v, i in got[1:]:
                    assert torch.equal(i, got[0][1]), (int8, K)
                    assert torch.equal(v, got[0][0]), (int8, K)
    finally:
        torch.set_num_threads(threads)
