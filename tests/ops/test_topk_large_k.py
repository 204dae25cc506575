"""Large k (issue 20.7): from ``MERGE_MIN_K`` on, the C++ kernel collects each channel's
candidates over runs of samples and merges them in one pass instead of one insertion
per candidate. Both modes must give exactly the reference state, on both sides of the
switch-over, at every SIMD level, for streams that fill, overflow and churn the lists."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from semlens_fast.ops import TopKState, merge_topk, pool_topk_update, topk_update
from semlens_fast.ops import _backend
from semlens_fast.ops.cpu import topk as cpu_topk

from .test_topk import CPU_ISAS, SETTINGS, make_input, run_stream, streams

pytestmark = pytest.mark.skipif(_backend.extension() is None, reason="C++ extension not built")
ext = _backend.extension()


@pytest.fixture(params=CPU_ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("SEMLENS_BACKEND", "cpu")
    ext.set_isa(request.param)
    yield request.param
    ext.set_isa(ext.best_isa())


def reference(fn, *args):
    old = os.environ.get("SEMLENS_BACKEND")
    os.environ["SEMLENS_BACKEND"] = "reference"
    try:
        return fn(*args)
    finally:
        os.environ["SEMLENS_BACKEND"] = old if old is not None else ""


@settings(**{**SETTINGS, "max_examples": 40})
@given(streams(), st.sampled_from(["batched", "at_k", "above_k"]))
def test_batched_merge_equals_reference(isa, monkeypatch, case, mode):
    """The small-k property streams (ties, NaN, +-inf, every layout and pool) with the
    switch-over at 1 (always batched), at k (batched) and at k + 1 (per-candidate)."""
    k = case[1]
    monkeypatch.setattr(cpu_topk, "MERGE_MIN_K", {"batched": 1, "at_k": k, "above_k": k + 1}[mode])
    got = run_stream(*case)
    want = reference(run_stream, *case)
    assert got.equal(want), (isa, mode)


def _coarse(shape, g, specials=True):
    """Values on a coarse grid (many ties), with NaN / +-inf sprinkled in."""
    x = (torch.randint(-30, 30, shape, generator=g) / 4.0).float()
    if specials:
        for val in (float("nan"), float("inf"), float("-inf")):
            x.view(-1)[torch.randint(0, x.numel(), (max(1, x.numel() // 500),), generator=g)] = val
    return x


@pytest.mark.parametrize("side", [-1, 0])
@pytest.mark.parametrize("layout", ["plain", "nchw", "channels_last", "tokens"])
def test_default_switch_over_both_sides(isa, layout, side):
    """k = MERGE_MIN_K - 1 (per-candidate) and k = MERGE_MIN_K (batched), with the default
    threshold: batches larger than k fill, overflow and then churn the lists; ids are
    shuffled (not increasing) and ties cross the k-th place."""
    k = cpu_topk.MERGE_MIN_K + side
    g = torch.Generator().manual_seed(11 + side)
    C, H, W = 37, 2, 3
    ids = torch.randperm(5000, generator=g)
    sizes = [k + 50, 7, 3 * k, 1]
    batches, start = [], 0
    for B in sizes:
        batches.append((_coarse((B, C, H * W), g), ids[start : start + B].clone()))
        start += B
    for pool in (["max"] if layout == "plain" else ["max", "absmax", "mean"]):
        case = (C, k, layout, H, W, torch.float32, pool, batches)
        got = run_stream(*case)
        want = reference(run_stream, *case)
        assert got.equal(want), (layout, pool, k)
        assert int(got.valid_counts().min()) == k


def test_runs_within_one_batch(isa, monkeypatch):
    """Many channels make the pending buffers short (runs of 16..26 samples), so one batch
    is merged in several runs; the lists (k = 16, batched) fill in the first run and churn
    in the next ones."""
    k = 16
    monkeypatch.setattr(cpu_topk, "MERGE_MIN_K", k)
    g = torch.Generator().manual_seed(5)
    C, B = 40_000, 60
    state = TopKState.empty(C, k)
    want = TopKState.empty(C, k)
    acts = _coarse((B, C), g)
    ids = torch.randperm(B, generator=g) + 7
    topk_update(state, acts, ids)
    reference(topk_update, want, acts, ids)
    assert state.equal(want)


def test_large_k_stream_and_merge(isa):
    """k = 2000 over 6 batches of 512 (lists fill, then churn), then a merge of two such
    shards: equal to one pass and to the reference."""
    k, C, B = 2000, 24, 512
    g = torch.Generator().manual_seed(3)
    data = [(_coarse((B, C), g, specials=False), torch.arange(i * B, (i + 1) * B)) for i in range(6)]
    one, ref = TopKState.empty(C, k), TopKState.empty(C, k)
    a, b = TopKState.empty(C, k), TopKState.empty(C, k)
    for i, (x, ids) in enumerate(data):
        topk_update(one, x, ids)
        reference(topk_update, ref, x, ids)
        topk_update(a if i % 2 else b, x, ids)
    assert one.equal(ref)
    assert merge_topk(a, b).equal(one)
    assert reference(merge_topk, a, b).equal(one)


def test_pool_large_k_nchw_positions(isa):
    """Channel-major maps at large k: positions of the max are those of the reference."""
    k = 600
    g = torch.Generator().manual_seed(8)
    x = _coarse((700, 5, 3 * 4), g)
    ids = torch.randperm(700, generator=g)
    got = pool_topk_update(TopKState.empty(5, k), make_input(x, "nchw", torch.float32, 3, 4), ids, "max")
    want = reference(pool_topk_update, TopKState.empty(5, k), make_input(x, "nchw", torch.float32, 3, 4), ids, "max")
    assert got.equal(want)
