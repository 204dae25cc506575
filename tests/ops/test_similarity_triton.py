"""The Triton similarity kernels equal the torch reference exactly (scores bitwise, ids).

Without a GPU they run under TRITON_INTERPRET=1 (set by tests/conftest.py) on tiny
shapes: the interpreter executes every program in numpy and is slow.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semlens_fast.errors import ArgumentError
from semlens_fast.ops.reference import similarity as ref

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

tr = pytest.importorskip("semlens_fast.ops.triton.similarity")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VALUES = [-1.0, -0.5, 0.0, 0.5, 1.0, 2.0]


@st.composite
def cases(draw):
    d = draw(st.integers(1, 6))
    Q = draw(st.integers(1, 3))
    N = draw(st.integers(1, 40))
    k = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    q = torch.tensor(draw(st.lists(st.sampled_from(VALUES), min_size=Q * d, max_size=Q * d))).reshape(Q, d)
    x = torch.tensor(draw(st.lists(st.sampled_from(VALUES), min_size=N * d, max_size=N * d))).reshape(N, d)
    exclude = None
    if draw(st.booleans()):
        exclude = torch.tensor(draw(st.lists(st.integers(-1, N), min_size=Q, max_size=Q))).reshape(Q, 1)
    return q.to(dtype), x.to(dtype), k, exclude


def run(q, x, k, exclude):
    q, x = q.to(DEVICE), x.to(DEVICE)
    ex = exclude.to(DEVICE) if exclude is not None else None
    s, i = tr.cosine_topk(q, x, k, ex)
    return s.cpu(), i.cpu()


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_triton_equals_reference_on_ties(case):
    q, x, k, exclude = case
    s, i = run(q, x, k, exclude)
    rs, ri = ref.cosine_topk(q, x, k, exclude)
    assert torch.equal(i, ri)
    assert torch.equal(s.view(torch.int32), rs.view(torch.int32))


@pytest.mark.parametrize("d", [20, 48])  # padded to 32 / used in place (d divisible by 16)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_random_data_and_multiple_tiles(dtype, d):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, d, generator=g).to(dtype)
    x = torch.randn(70, d, generator=g).to(dtype)  # 2 row tiles of 64; 1 or 2 feature blocks of 32
    x[4] = 0
    s, i = run(q, x, 4, None)
    rs, ri = ref.cosine_topk(q, x, 4, None)
    assert torch.equal(i, ri) and torch.equal(s, rs)


def test_triton_nonfinite_rows_named():
    x = torch.randn(9, 4)
    x[6, 1] = float("nan")
    with pytest.raises(ArgumentError, match=r"\[6\]"):
        run(torch.randn(2, 4), x, 2, None)


def test_triton_packed_keys_order_negative_scores_and_ties():
    # all scores negative or zero, with duplicates: exercises the float -> key mapping
    q = torch.tensor([[1.0, 0.0]])
    x = torch.tensor([[-1.0, 0.0], [-1.0, 1.0], [0.0, 1.0], [-1.0, 1.0], [-2.0, 0.0]])
    s, i = run(q, x, 5, None)
    rs, ri = ref.cosine_topk(q, x, 5, None)
    assert torch.equal(i, ri) and torch.equal(s, rs)
    assert i[0].tolist() == [2, 1, 3, 0, 4]


def test_triton_exact_scan_path_with_massive_ties():
    """k beyond the kernel's candidate lists (MAX_CANDIDATES): every query is an exact scan."""
    k = tr.MAX_CANDIDATES  # K' = k + k // 4 > MAX_CANDIDATES
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).repeat(100, 1)  # 300 rows, 3 distinct
    q = torch.tensor([[1.0, 0.5], [0.0, 0.0]])
    s, i = run(q, x, k, None)
    rs, ri = ref.cosine_topk(q, x, k, None)
    assert torch.equal(i, ri) and torch.equal(s.view(torch.int32), rs.view(torch.int32))


def test_triton_tiny_rows_are_exact():
    """A row of tiny norm (below the bound's underflow limit) among ordinary rows."""
    x = torch.randn(20, 6)
    x[3] = torch.tensor([1e-20, -2e-20, 0.0, 0.0, 3e-20, 0.0])
    q = x[3:4] * 1e20
    rs, ri = ref.cosine_topk(q, x, 3, None)
    s, i = run(q, x, 3, None)
    assert i[0, 0] == 3 and torch.equal(i, ri) and torch.equal(s, rs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30, "mixed"])
def test_triton_rows_outside_the_safe_range_are_rescaled_not_sent_to_the_reference(scale, dtype, monkeypatch):
    """Issue 20.1 on the GPU path: ``cosine_topk(q, db * 1e-30)`` (float32 squares underflow to a
    norm of 0) and rows beyond ~1e19 (squares overflow) equal the reference; the candidate
    pass runs on a power-of-two rescaled copy of those rows (the whole search is no longer
    handed to the reference)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 20, generator=g)
    x = torch.randn(70, 20, generator=g)
    if scale == "mixed":  # rows at very different scales, a zero row, a row with components at 1e-35
        x[::3] *= 1e-30
        x[1::3] *= 1e25
        x[5] = 0
        x[7, :10] *= 1e-35
    else:
        x = x * scale
    x = x.to(dtype)
    rs, ri = ref.cosine_topk(q, x, 6, None)

    def no_reference(*args, **kwargs):
        raise AssertionError("the Triton backend handed the search to the reference")

    monkeypatch.setattr(tr.reference.similarity, "cosine_topk", no_reference)
    s, i = run(q, x, 6, None)
    assert torch.equal(i, ri) and torch.equal(s.view(torch.int32), rs.view(torch.int32))


def test_rescale_rows_puts_the_largest_component_in_1_2():
    x = torch.tensor([[1e-30, -3e-30, 0.0], [1.0, 2.0, 3.0], [-5e30, 1e30, 1e-10]])
    out = tr.rescale_rows(x, torch.tensor([0, 2]))
    assert torch.equal(out[1], x[1])
    m = out.abs().amax(dim=1)
    assert bool(((m[[0, 2]] >= 1) & (m[[0, 2]] < 2)).all())
    ratio = out[0].double() / x[0].double()  # one power of two per row, exact
    assert torch.equal(ratio[[0, 1]], torch.full((2,), ratio[0].item(), dtype=torch.float64))


def test_grid_sized_from_rows_and_sm_count():
    for Q, N, sms in ((1, 10**6, 132), (1024, 10**6, 132), (3, 50, 132), (64, 10**5, 8)):
        splits, rps = tr.grid_splits(Q, N, sms)
        assert rps % 128 == 0 and (splits - 1) * rps < N <= splits * rps
    assert tr.grid_splits(1, 10**6, 132)[0] > tr.grid_splits(1024, 10**6, 132)[0]  # few queries: more splits
    assert tr.grid_splits(1, 10**6, 132)[0] > tr.grid_splits(1, 10**6, 8)[0]  # more SMs: more splits


def _emulated_pass(q, x, dot, trunc_acc):
    """The candidate pass's arithmetic emulated in torch (inputs rounded like the kernel's dot)."""
    qhat = tr._unit_queries(q.float())
    if dot == 1:
        qd, xd = qhat.half().float(), x.float()
    elif dot == 2:
        qd, xd = qhat.bfloat16().float(), x.float()
    else:  # TF32 by truncation of the low 13 mantissa bits
        qd = (qhat.view(torch.int32) & ~0x1FFF).view(torch.float32)
        xd = (x.float().contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)
    acc = torch.zeros(q.shape[0], x.shape[0], dtype=torch.float32)
    for i in range(q.shape[1]):  # float32 accumulation, optionally truncating every partial sum
        exact = acc.double() + qd[:, i : i + 1].double() * xd[:, i].double()
        acc = exact.float()
        if trunc_acc:
            over = acc.double().abs() > exact.abs()
            acc = torch.where(over, torch.nextafter(acc, torch.zeros_like(acc)), acc)
    xf = x.float()
    inv = 1.0 / torch.sqrt((xf * xf).sum(dim=1))
    return acc * inv, tr.query_rounding_error(qhat, dot)


@pytest.mark.parametrize("dot, dtype", [(0, torch.float32), (1, torch.float16), (2, torch.bfloat16)])
def test_tensor_core_error_bound_holds_on_emulated_rounding(dot, dtype):
    """|approximate - exact| <= bound, with inputs rounded to TF32/fp16/bf16 and a truncating
    float32 accumulator (the worst the hardware does), on random and on wide-range data."""
    from semlens_fast.ops.similarity import tensor_core_error_bound

    g = torch.Generator().manual_seed(dot)
    d = 256
    x = torch.randn(64, d, generator=g) * torch.logspace(-3, 3, d)[torch.randperm(d, generator=g)]
    x = torch.cat([x, torch.randn(64, d, generator=g)]).to(dtype)
    q = torch.cat([x[:8].float() + 0.01 * torch.randn(8, d, generator=g), torch.randn(8, d, generator=g)])
    exact = ref.exact_scores(q, x).double()
    for trunc in (False, True):
        approx, qerr = _emulated_pass(q, x, dot, trunc)
        eps = tensor_core_error_bound(d, qerr, 2.0**-10 if dtype == torch.float32 else 0.0)
        gap = (approx.double() - exact).abs().amax(dim=1)
        assert bool((gap <= eps).all()), (gap / eps).max()
        assert bool((eps < 0.02).all())  # and the bound stays useful


def test_query_rounding_error_is_exact():
    # seeded: with an fp16-subnormal component (about 4 % of unseeded draws) the flushed
    # alternative is larger than plain rounding and the equality below does not hold
    q = tr._unit_queries(torch.randn(5, 33, generator=torch.Generator().manual_seed(0)))
    assert not bool((q.abs() < 2.0**-14).any())
    assert torch.allclose(tr.query_rounding_error(q, 1), (q.half().double() - q.double()).norm(dim=1), rtol=0, atol=0)
    assert bool((tr.query_rounding_error(q, 0) >= (q.bfloat16().double() - q.double()).norm(dim=1) / 16).all())
    assert tr.dot_mode(torch.float16) == 1 and tr.dot_mode(torch.float32) == 0
