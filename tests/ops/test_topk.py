"""Property tests of the streaming top-k ops: every backend equals the torch reference
exactly (values bitwise, ids, positions, NaN counts), and the reference equals a
plain-Python oracle."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import semlens_fast.ops as ops
from semlens_fast.ops import TopKState, merge_topk, pool_topk_update, topk_update
from semlens_fast.ops import _backend
from semlens_fast.ops import reference as ref_backend
from semlens_fast.ops.topk import _as_bcs

from .topk_strategies import DTYPES, oracle, same_entries, state_as_lists, tensors

ext = _backend.extension()
CPU_ISAS = []
if ext is not None:
    order = ["scalar", "avx2", "avx512"]
    CPU_ISAS = order[: order.index(ext.best_isa()) + 1]

LAYOUTS = ["nchw", "channels_last", "tokens", "plain"]
SETTINGS = dict(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])


@pytest.fixture(params=["reference"] + [f"cpu-{i}" for i in CPU_ISAS])
def backend(request, monkeypatch):
    name = request.param
    if name.startswith("cpu"):
        monkeypatch.setenv("SEMLENS_BACKEND", "cpu")
        ext.set_isa(name.split("-")[1])
        yield name
        ext.set_isa(ext.best_isa())
    else:
        monkeypatch.setenv("SEMLENS_BACKEND", "reference")
        yield name


def make_input(x32: torch.Tensor, layout: str, dtype: torch.dtype, H: int, W: int) -> torch.Tensor:
    """x32 is [B, C, S] (S = H*W); returns the tensor in the requested memory layout."""
    B, C, S = x32.shape
    x = x32.to(dtype)
    if layout == "nchw":
        return x.reshape(B, C, H, W)
    if layout == "channels_last":
        return x.reshape(B, C, H, W).contiguous(memory_format=torch.channels_last)
    if layout == "tokens":
        return x.transpose(1, 2).contiguous()  # [B, T, C]
    return x[:, :, 0].contiguous()  # [B, C]


@st.composite
def streams(draw):
    C = draw(st.integers(1, 40))
    k = draw(st.integers(1, 9))
    layout = draw(st.sampled_from(LAYOUTS))
    H, W = (1, 1) if layout == "plain" else (draw(st.integers(1, 4)), draw(st.integers(1, 5)))
    if layout == "tokens":
        H, W = 1, draw(st.integers(1, 7))
    dtype = draw(st.sampled_from(DTYPES))
    pool = draw(st.sampled_from(["max", "absmax", "mean", "sum"]))
    nb = draw(st.integers(1, 3))
    sizes = [draw(st.integers(0, 12)) for _ in range(nb)]
    total = sum(sizes)
    ids = draw(st.permutations(list(range(total + 5))))[:total]
    batches, start = [], 0
    for B in sizes:
        x32 = draw(tensors((B, C, H * W)))
        batches.append((x32, torch.tensor(ids[start : start + B], dtype=torch.int64)))
        start += B
    return C, k, layout, H, W, dtype, pool, batches


def run_stream(C, k, layout, H, W, dtype, pool, batches):
    state = TopKState.empty(C, k)
    for x32, ids in batches:
        x = make_input(x32, layout, dtype, H, W)
        if layout == "plain" and pool == "max":
            topk_update(state, x, ids)
        else:
            pool_topk_update(state, x, ids, pool)
    return state


def exact_inputs(batches, dtype):
    """The float32 values the kernels see (after the dtype round trip)."""
    return [(x.to(dtype).float(), ids) for x, ids in batches]


@settings(**SETTINGS)
@given(streams())
def test_stream_matches_oracle(backend, case):
    C, k, layout, H, W, dtype, pool, batches = case
    state = run_stream(*case)
    layout_tag = "plain" if (layout == "plain" and pool == "max") else "pooled"  # topk_update keeps no positions
    want, nans = oracle(exact_inputs(batches, dtype), k, pool, layout_tag)
    assert same_entries(state_as_lists(state), want), (backend, layout, pool, dtype)
    assert state.nan_counts.tolist() == nans


@settings(**SETTINGS)
@given(streams())
def test_backend_equals_reference(backend, case):
    """Every backend produces exactly the reference state (bitwise)."""
    state = run_stream(*case)
    import os

    old = os.environ["SEMLENS_BACKEND"]
    os.environ["SEMLENS_BACKEND"] = "reference"
    try:
        want = run_stream(*case)
    finally:
        os.environ["SEMLENS_BACKEND"] = old
    assert state.equal(want)


@settings(**SETTINGS)
@given(streams(), st.integers(0, 100))
def test_merge_of_shards_equals_one_pass(backend, case, cut_seed):
    C, k, layout, H, W, dtype, pool, batches = case
    one = run_stream(*case)
    # split every batch's samples between two shards
    shard_a, shard_b = [], []
    g = torch.Generator().manual_seed(cut_seed)
    for x32, ids in batches:
        mask = torch.rand(x32.shape[0], generator=g) < 0.5
        shard_a.append((x32[mask], ids[mask]))
        shard_b.append((x32[~mask], ids[~mask]))
    a = run_stream(C, k, layout, H, W, dtype, pool, shard_a)
    b = run_stream(C, k, layout, H, W, dtype, pool, shard_b)
    merged = merge_topk(a, b)
    assert merged.equal(one)
    assert merge_topk(b, a).equal(one)


def test_k_larger_than_samples_and_negative_values(backend):
    state = TopKState.empty(3, 5)
    acts = torch.tensor([[-5.0, -1.0, float("-inf")], [-7.0, -1.0, float("nan")]])
    topk_update(state, acts, torch.tensor([10, 3]))
    assert state.ids.tolist() == [[10, 3, -1, -1, -1], [3, 10, -1, -1, -1], [10, -1, -1, -1, -1]]
    assert state.values[0, :2].tolist() == [-5.0, -7.0]
    assert state.values[1, :2].tolist() == [-1.0, -1.0]  # tie: lower id first
    assert state.values[2, 0].item() == float("-inf") and state.ids[2, 0].item() == 10
    assert state.nan_counts.tolist() == [0, 0, 1]


def test_empty_batch_is_a_noop(backend):
    state = TopKState.empty(4, 2)
    before = state.clone()
    topk_update(state, torch.empty(0, 4), torch.empty(0, dtype=torch.int64))
    pool_topk_update(state, torch.empty(0, 4, 3, 3), torch.empty(0, dtype=torch.int64), "mean")
    assert state.equal(before)


def test_positions_on_large_maps(backend):
    """Positions and values on maps large enough to use the SIMD loops and threads."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 70, 9, 11, generator=g)
    ids = torch.randperm(1000, generator=g)[:16]
    for fmt in (torch.contiguous_format, torch.channels_last):
        for pool in ("max", "absmax"):
            state = pool_topk_update(TopKState.empty(70, 4), x.contiguous(memory_format=fmt), ids, pool)
            xx = x.abs() if pool == "absmax" else x
            flat = xx.flatten(2)
            pooled, pos = flat.max(dim=2)
            top = torch.topk(pooled.t(), 4, dim=1)
            assert torch.equal(state.values, top.values)
            assert torch.equal(state.ids, ids[top.indices])
            assert torch.equal(state.positions.long(), pos.t().gather(1, top.indices))


def test_non_contiguous_inputs(backend):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(8, 40, 6, generator=g)
    ids = torch.arange(8)
    acts = base[:, :, 2]  # channel stride 6
    s1 = topk_update(TopKState.empty(40, 3), acts, ids)
    s2 = topk_update(TopKState.empty(40, 3), acts.contiguous(), ids)
    assert s1.equal(s2)
    fm = torch.randn(6, 5, 7, 40, generator=g).permute(0, 3, 2, 1)  # [B, C, H, W], odd strides
    s3 = pool_topk_update(TopKState.empty(40, 3), fm, torch.arange(6), "max")
    s4 = pool_topk_update(TopKState.empty(40, 3), fm.contiguous(), torch.arange(6), "max")
    assert s3.values.equal(s4.values) and s3.ids.equal(s4.ids)
    # positions index the [H, W] of the logical tensor, whatever its memory layout
    assert s3.positions.equal(s4.positions)


def test_sum_mean_of_zeros_and_inf(backend):
    # [B=3, T=1, C=2] token activations
    x = torch.tensor([[[-0.0, -0.0]], [[float("inf"), float("-inf")]], [[float("inf"), 1.0]]])
    state = pool_topk_update(TopKState.empty(2, 3), x, torch.tensor([0, 1, 2]), "sum")
    # channel 0: sums -0.0 (→ +0.0), inf, inf ; channel 1: -0.0→+0.0, -inf, 1.0
    assert state.ids[0].tolist() == [1, 2, 0]
    assert math.copysign(1.0, state.values[0, 2].item()) == 1.0
    assert state.ids[1].tolist() == [2, 0, 1]


# --------------------------------------------------------------------------- bad input

def test_errors_name_the_argument():
    s = TopKState.empty(4, 3)
    with pytest.raises(ValueError, match=r"acts must have shape \[B, 4\]"):
        topk_update(s, torch.zeros(2, 5), torch.arange(2))
    with pytest.raises(TypeError, match="acts must be float32, float16 or bfloat16"):
        topk_update(s, torch.zeros(2, 4, dtype=torch.float64), torch.arange(2))
    with pytest.raises(ValueError, match=r"sample_ids must have shape \(2,\)"):
        topk_update(s, torch.zeros(2, 4), torch.arange(3))
    with pytest.raises(ValueError, match="sample_ids must be >= 0"):
        topk_update(s, torch.zeros(2, 4), torch.tensor([0, -1]))
    with pytest.raises(TypeError, match="sample_ids must be an integer tensor"):
        topk_update(s, torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="pool must be one of"):
        pool_topk_update(s, torch.zeros(2, 4, 3, 3), torch.arange(2), "median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fmap has 5 channels"):
        pool_topk_update(s, torch.zeros(2, 5, 3, 3), torch.arange(2))
    with pytest.raises(ValueError, match="empty spatial extent"):
        pool_topk_update(s, torch.zeros(2, 4, 0, 3), torch.arange(2))
    with pytest.raises(ValueError, match="fmap must be"):
        pool_topk_update(s, torch.zeros(2, 4, 3, 3, 1), torch.arange(2))
    with pytest.raises(ValueError, match="state must be a TopKState"):
        topk_update((s.values, s.ids), torch.zeros(2, 4), torch.arange(2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"states must agree in C and k"):
        merge_topk(s, TopKState.empty(4, 2))
    with pytest.raises(TypeError, match="state.ids must be a 2-D torch.int64"):
        TopKState(s.values, s.ids.int(), s.positions, s.nan_counts)
    with pytest.raises(ValueError, match=r"state.positions has shape \(4, 2\), expected \(4, 3\)"):
        TopKState(s.values, s.ids, s.positions[:, :2].contiguous(), s.nan_counts)
    with pytest.raises(ValueError, match=r"state.nan_counts must be int64 of shape \(4,\)"):
        TopKState(s.values, s.ids, s.positions, s.nan_counts[:2])
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        TopKState.empty(4, 0)
    unsorted = TopKState.empty(1, 2)
    unsorted.values[0] = torch.tensor([1.0, 2.0])
    unsorted.ids[0] = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="not sorted best first"):
        merge_topk(unsorted, TopKState.empty(1, 2))


def test_failed_call_leaves_state_untouched(backend):
    s = TopKState.empty(4, 3)
    topk_update(s, torch.randn(5, 4), torch.arange(5))
    before = s.clone()
    with pytest.raises(ValueError):
        topk_update(s, torch.randn(5, 4), torch.tensor([1, 2, 3, -4, 5]))
    assert s.equal(before)


def test_forced_backend_env(monkeypatch):
    monkeypatch.setenv("SEMLENS_BACKEND", "nonsense")
    with pytest.raises(RuntimeError, match="SEMLENS_BACKEND='nonsense' is not a backend"):
        topk_update(TopKState.empty(2, 1), torch.zeros(1, 2), torch.arange(1))


def test_public_namespace():
    assert ops.cpu_isa() in ("avx512", "avx2", "scalar", "none")
    assert ops.POOLS == ("max", "mean", "absmax", "sum")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "tokens"])
def test_large_maps_with_specials_equal_reference(backend, layout, dtype):
    """Shapes long enough for the unrolled SIMD loops and the thread split, with NaN/inf
    sprinkled in and many ties (values on a coarse grid)."""
    g = torch.Generator().manual_seed(7)
    B, C, H, W = 24, 67, 7, 23
    x32 = (torch.randint(-40, 40, (B, C, H * W), generator=g) / 8.0).float()
    for val in (float("nan"), float("inf"), float("-inf")):
        idx = torch.randint(0, x32.numel(), (30,), generator=g)
        x32.view(-1)[idx] = val
    ids = torch.randperm(10_000, generator=g)[:B]
    for pool in ("max", "absmax", "mean", "sum"):
        got = pool_topk_update(TopKState.empty(C, 6), make_input(x32, layout, dtype, H, W), ids, pool)
        import os

        old = os.environ["SEMLENS_BACKEND"]
        os.environ["SEMLENS_BACKEND"] = "reference"
        try:
            want = pool_topk_update(TopKState.empty(C, 6), make_input(x32, layout, dtype, H, W), ids, pool)
        finally:
            os.environ["SEMLENS_BACKEND"] = old
        assert got.equal(want), (pool, layout, dtype)
        assert int(got.nan_counts.sum()) > 0
