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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_random_data_and_multiple_tiles(dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 20, generator=g).to(dtype)
    x = torch.randn(70, 20, generator=g).to(dtype)  # 3 row tiles, 2 feature blocks... (BD=32 > 20: masked)
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
