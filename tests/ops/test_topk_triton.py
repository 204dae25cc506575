"""The Triton top-k kernels equal the torch reference exactly.

Without a GPU they run under TRITON_INTERPRET=1 (set by tests/conftest.py), on tiny
shapes: the interpreter executes every program in numpy and is slow.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semlens_fast.ops import TopKState
from semlens_fast.ops import reference
from semlens_fast.ops.topk import _as_bcs

from .topk_strategies import DTYPES, tensors

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

tr = pytest.importorskip("semlens_fast.ops.triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@st.composite
def cases(draw):
    C = draw(st.integers(1, 4))
    k = draw(st.integers(1, 5))
    layout = draw(st.sampled_from(["nchw", "channels_last", "tokens", "plain"]))
    H, W = (draw(st.integers(1, 3)), draw(st.integers(1, 3))) if layout != "plain" else (1, 1)
    if layout == "tokens":
        H = 1
    dtype = draw(st.sampled_from(DTYPES))
    pool = draw(st.sampled_from(["max", "absmax", "mean", "sum"]))
    B1, B2 = draw(st.integers(0, 20)), draw(st.integers(0, 6))
    ids = draw(st.permutations(list(range(B1 + B2 + 3))))[: B1 + B2]
    x1 = draw(tensors((B1, C, H * W)))
    x2 = draw(tensors((B2, C, H * W)))
    return C, k, layout, H, W, dtype, pool, [(x1, torch.tensor(ids[:B1])), (x2, torch.tensor(ids[B1:]))]


def to_layout(x32, layout, dtype, H, W):
    B, C, S = x32.shape
    x = x32.to(dtype)
    if layout == "nchw":
        return x.reshape(B, C, H, W)
    if layout == "channels_last":
        return x.reshape(B, C, H, W).contiguous(memory_format=torch.channels_last)
    if layout == "tokens":
        return x.transpose(1, 2).contiguous()
    return x[:, :, 0].contiguous()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_triton_equals_reference(case):
    C, k, layout, H, W, dtype, pool, batches = case
    got, want = TopKState.empty(C, k, DEVICE), TopKState.empty(C, k, DEVICE)
    track = pool in ("max", "absmax") and layout != "plain"
    for x32, ids in batches:
        x = to_layout(x32, layout, dtype, H, W).to(DEVICE)
        view, _ = _as_bcs(x, got)
        ids = ids.to(torch.int64).to(DEVICE)
        tr.pool_topk_update(got, view, ids, pool, track)
        reference.pool_topk_update(want, view, ids, pool, track)
    assert got.equal(want), (layout, pool, dtype)
    # merge: the Triton merge of the state with itself shifted to new ids
    other = want.clone()
    other = TopKState(other.values, torch.where(other.ids >= 0, other.ids + 1000, other.ids), other.positions, other.nan_counts)
    m1, m2 = got.clone(), want.clone()
    tr.merge_topk(m1, other)
    reference.merge_topk(m2, other)
    assert m1.equal(m2)


def test_triton_large_k_falls_back_to_reference():
    state = TopKState.empty(2, tr.topk.MAX_K + 1, DEVICE)
    x = torch.randn(3, 2, 1, device=DEVICE)
    tr.pool_topk_update(state, x, torch.arange(3, device=DEVICE), "max", False)
    assert state.valid_counts().tolist() == [3, 3]
