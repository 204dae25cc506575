"""The Triton top-k kernels equal the torch reference exactly.

Without a GPU they run under TRITON_INTERPRET=1 (set by tests/conftest.py), on tiny
shapes: the interpreter executes every program in numpy and is slow. The kernels'
GPU configurations are compiled (not run) by tests/ops/test_triton_aot.py.
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
topk_mod = tr.topk
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                       HealthCheck.function_scoped_fixture])


def to_layout(x32, layout, dtype, H, W):
    B, C, S = x32.shape
    x = x32.to(dtype)
    if layout == "nchw":
        return x.reshape(B, C, H, W)
    if layout == "channels_last":
        return x.reshape(B, C, H, W).contiguous(memory_format=torch.channels_last)
    if layout == "tokens":
        return x.transpose(1, 2).contiguous()
    if layout == "plain_t":  # [B, C] with the sample stride 1 (a transposed [C, B] tensor)
        return x[:, :, 0].t().contiguous().t()
    return x[:, :, 0].contiguous()


@st.composite
def cases(draw):
    C = draw(st.integers(1, 20))  # up to two channel blocks under the interpreter
    k = draw(st.integers(1, 6))
    layout = draw(st.sampled_from(["nchw", "channels_last", "tokens", "plain", "plain_t"]))
    H, W = (draw(st.integers(1, 3)), draw(st.integers(1, 3))) if not layout.startswith("plain") else (1, 1)
    if layout == "tokens":
        H = 1
    dtype = draw(st.sampled_from(DTYPES))
    pool = draw(st.sampled_from(["max", "absmax", "mean", "sum"]))
    sizes = [draw(st.integers(0, 9)), draw(st.integers(0, 5))]  # k larger than the data, empty batches
    ids = draw(st.permutations(list(range(sum(sizes) + 3))))[: sum(sizes)]
    batches, start = [], 0
    for B in sizes:
        batches.append((draw(tensors((B, C, H * W))), torch.tensor(ids[start : start + B], dtype=torch.int64)))
        start += B
    return C, k, layout, H, W, dtype, pool, batches


def run_both(C, k, layout, H, W, dtype, pool, batches):
    got, want = TopKState.empty(C, k, DEVICE), TopKState.empty(C, k, DEVICE)
    track = pool in ("max", "absmax") and not layout.startswith("plain")
    for x32, ids in batches:
        x = to_layout(x32, layout, dtype, H, W).to(DEVICE)
        view, _ = _as_bcs(x, got)
        ids = ids.to(DEVICE)
        tr.pool_topk_update(got, view, ids, pool, track)
        reference.pool_topk_update(want, view, ids, pool, track)
    return got, want


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@settings(max_examples=20, **SETTINGS)
@given(cases())
def test_triton_equals_reference(case):
    """Ties (a few dyadic values), NaN / +-inf / signed zeros, k > data, empty batches."""
    got, want = run_both(*case)
    assert got.equal(want), case[2:7]
    # merge: the Triton merge of the state with itself shifted to new ids
    other = TopKState(want.values.clone(), torch.where(want.ids >= 0, want.ids + 1000, want.ids),
                      want.positions.clone(), want.nan_counts.clone())
    m1, m2 = got.clone(), want.clone()
    tr.merge_topk(m1, other)
    reference.merge_topk(m2, other)
    assert m1.equal(m2)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("layout", ["nchw", "tokens", "plain"])
def test_batch_splits_equal_reference(monkeypatch, layout):
    """Several batch splits per channel block: partial lists, then the merge kernel."""
    monkeypatch.setattr(topk_mod, "MIN_CHUNKS_PER_SPLIT", 1)
    monkeypatch.setattr(topk_mod, "MAX_SPLITS", 3)
    g = torch.Generator().manual_seed(1)
    B = 64 if layout == "plain" else 12  # chunks of 32 samples (S = 1) or 4 under the interpreter
    x32 = torch.randint(-2, 3, (B, 5, 3), generator=g).float()  # massive ties
    x32[3, 1, 0] = float("nan")
    x32[7, 2] = float("-inf")
    calls = []
    real = topk_mod._merge_kernel
    monkeypatch.setattr(topk_mod, "_merge_kernel", _Spy(real, calls))
    for pool in ("max", "sum"):
        got, want = run_both(5, 4, layout, 1, 3 if layout != "plain" else 1, torch.float32, pool,
                             [(x32 if layout != "plain" else x32[:, :, :1], torch.randperm(B, generator=g) * 3)])
        assert got.equal(want), (layout, pool)
    assert calls and all(q > 2 for q in calls)  # the state and at least two partial lists were merged


class _Spy:
    """Records the number of lists of each _merge_kernel launch."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.calls.append(args[9])
            return self.kernel[grid](*args, **kw)
        return launch


def test_gpu_block_sizes_equal_reference(monkeypatch):
    """The block sizes of the GPU configurations (the interpreter normally uses smaller ones)."""
    monkeypatch.setattr(topk_mod, "_interpreting", lambda: False)
    g = torch.Generator().manual_seed(2)
    for layout, S in (("nchw", 4), ("tokens", 3), ("plain", 1)):
        x32 = torch.randint(-3, 4, (5, 33, S), generator=g).float()  # 33 channels: two blocks of 32
        got, want = run_both(33, 3, layout, 1, S, torch.float16, "max", [(x32, torch.arange(5) * 7 % 5)])
        assert got.equal(want), layout


def test_k_larger_than_max_k_uses_the_reference():
    state = TopKState.empty(2, topk_mod.MAX_K + 1, DEVICE)
    x = torch.randn(3, 2, 1, device=DEVICE)
    tr.pool_topk_update(state, x, torch.arange(3, device=DEVICE), "max", False)
    assert state.valid_counts().tolist() == [3, 3]


def test_long_lists_equal_reference():
    """k above one list chunk (16 slots): insertions walk several chunks, merges several searches."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-4, 5, (30, 3, 1), generator=g).float()
    got, want = run_both(3, 37, "plain", 1, 1, torch.float32, "max", [(x, torch.randperm(30, generator=g))])
    assert got.equal(want)
    b = TopKState(want.values.clone(), torch.where(want.ids >= 0, want.ids + 100, -1), want.positions.clone(),
                  want.nan_counts.clone())
    tr.merge_topk(got, b)
    reference.merge_topk(want, b)
    assert got.equal(want)
