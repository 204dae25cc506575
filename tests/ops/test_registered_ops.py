"""The ops are registered torch ops: torch.compile(fullgraph=True) traces through them,
meta and fake tensors get shapes, torch.library.opcheck passes, and the argument checks
still run (before any kernel) in eager and compiled code."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import semlens_fast.ops as ops
from semlens_fast.errors import ArgumentError, ShapeError
from semlens_fast.ops import TopKState


def _state(C, k, x, ids):
    s = TopKState.empty(C, k)
    ops.topk_update(s, x, ids)
    return s


def test_fullgraph_compile_of_every_op():
    def track(state, acts, fmap, ids):
        ops.topk_update(state, acts, ids)
        ops.pool_topk_update(state, fmap, ids + 100, "mean")
        return state.values.sum()

    def merge(a, b):
        return ops.merge_topk(a, b).ids

    def search(q, db):
        s, i = ops.cosine_topk(q, db, 3, exclude=torch.zeros(q.shape[0], dtype=torch.int64))
        s2, i2 = ops.pairwise_topk(q, db, 2)
        m, j = ops.pairwise_max(db, db, exclude_diagonal=True)
        return s + s2[:, :1], i, i2, m, j

    g = torch.Generator().manual_seed(0)
    acts, fmap, ids = torch.randn(4, 5, generator=g), torch.randn(4, 5, 2, 2, generator=g), torch.arange(4)
    got, want = TopKState.empty(5, 3), TopKState.empty(5, 3)
    out = torch.compile(track, fullgraph=True, backend="aot_eager")(got, acts, fmap, ids)
    assert torch.equal(out, track(want, acts, fmap, ids)) and got.equal(want)

    a = _state(4, 2, torch.randn(3, 4, generator=g), torch.arange(3))
    b = _state(4, 2, torch.randn(3, 4, generator=g), torch.arange(3, 6))
    assert torch.equal(torch.compile(merge, fullgraph=True, backend="aot_eager")(a, b), merge(a, b))

    q, db = torch.randn(3, 8, generator=g), torch.randn(20, 8, generator=g)
    for x, y in zip(torch.compile(search, fullgraph=True, backend="aot_eager")(q, db), search(q, db)):
        assert torch.equal(x, y)


def test_inductor_compile_of_a_tracking_step():
    def step(state, acts, ids):
        ops.topk_update(state, torch.relu(acts) * 2, ids)
        return state.values[:, 0] + 1

    g = torch.Generator().manual_seed(1)
    acts = torch.randn(6, 7, generator=g)
    got, want = TopKState.empty(7, 2), TopKState.empty(7, 2)
    out = torch.compile(step, fullgraph=True)(got, acts, torch.arange(6))
    assert torch.equal(out, step(want, acts, torch.arange(6))) and got.equal(want)


def test_compiled_code_still_checks_the_data():
    def track(state, acts, ids):
        ops.topk_update(state, acts, ids)
        return state.ids

    fn = torch.compile(track, fullgraph=True, backend="aot_eager")
    state = TopKState.empty(3, 2)
    with pytest.raises(ArgumentError, match="sample_ids must be >= 0"):
        fn(state, torch.randn(2, 3), torch.tensor([0, -4]))
    assert state.equal(TopKState.empty(3, 2))  # untouched
    with pytest.raises(ArgumentError, match="NaN or infinite"):
        torch.compile(lambda q, d: ops.cosine_topk(q, d, 2), fullgraph=True, backend="aot_eager")(
            torch.tensor([[float("nan"), 1.0]]), torch.randn(4, 2))


@pytest.mark.parametrize("device", ["meta", "fake"])
def test_meta_and_fake_tensors_give_shapes(device):
    def run():
        dev = "meta" if device == "meta" else "cpu"
        state = TopKState.empty(5, 3, device=dev)
        ops.pool_topk_update(state, torch.empty(4, 5, 3, 3, device=dev), torch.arange(4, device=dev), "max")
        ops.topk_update(state, torch.empty(4, 5, device=dev), torch.arange(4, device=dev))
        merged = ops.merge_topk(state, state)
        s, i = ops.cosine_topk(torch.empty(2, 8, device=dev), torch.empty(30, 8, device=dev, dtype=torch.bfloat16), 4)
        s2, i2 = ops.pairwise_topk(torch.empty(6, 8, device=dev), torch.empty(9, 8, device=dev), 2)
        return merged, s, i, s2, i2

    if device == "fake":
        with FakeTensorMode():
            merged, s, i, s2, i2 = run()
    else:
        merged, s, i, s2, i2 = run()
    assert merged.values.shape == (5, 3) and merged.ids.dtype == torch.int64
    assert s.shape == (2, 4) and s.dtype == torch.float32 and i.dtype == torch.int64
    assert s2.shape == (6, 2) and i2.shape == (6, 2)
    with pytest.raises(ShapeError):  # metadata checks run on meta tensors too
        ops.cosine_topk(torch.empty(2, 8, device="meta"), torch.empty(3, 7, device="meta"), 1)


def test_opcheck_every_op():
    g = torch.Generator().manual_seed(2)
    fmap = torch.randn(3, 6, 2, 2, generator=g)
    for view, pool, track in ((fmap.flatten(2), "max", True), (fmap.flatten(2), "sum", False),
                              (torch.randn(4, 6, generator=g).unsqueeze(2), "max", False)):
        s = TopKState.empty(6, 2)
        torch.library.opcheck(torch.ops.semlens.pool_topk_update_,
                              (s.values, s.ids, s.positions, s.nan_counts, view, torch.arange(view.shape[0]), pool, track))
    a = _state(4, 2, torch.randn(3, 4, generator=g), torch.arange(3))
    b = _state(4, 2, torch.randn(3, 4, generator=g), torch.arange(3, 6))
    torch.library.opcheck(torch.ops.semlens.merge_topk_, (a.values.clone(), a.ids.clone(), a.positions.clone(),
                                                          a.nan_counts.clone(), b.values, b.ids, b.positions, b.nan_counts))
    q, db = torch.randn(3, 8, generator=g), torch.randn(20, 8, generator=g)
    torch.library.opcheck(torch.ops.semlens.cosine_topk, (q, db, 3, None))
    torch.library.opcheck(torch.ops.semlens.cosine_topk, (q, db.half(), 2, torch.tensor([[1], [2], [-1]])))


def _sae(g, d=8, L=6):
    return torch.randn(d, L, generator=g), torch.randn(L, generator=g) * 0.1


def test_sae_op_compiles_fullgraph_checks_data_and_passes_opcheck():
    g = torch.Generator().manual_seed(3)
    W, b = _sae(g)
    x, mask = torch.randn(4, 5, 8, generator=g), torch.rand(4, 5, generator=g) > 0.3

    def step(state, x, ids):
        ops.sae_topk_update(state, x, W, b, ids, pool="mean", mask=mask)
        ops.sae_topk_update(state, x[:, 0], W, b, ids + 10, activation="jumprelu", threshold=b.abs())
        return state.values.sum()

    got, want = TopKState.empty(6, 3), TopKState.empty(6, 3)
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(got, x, torch.arange(4))
    assert torch.equal(out, step(want, x, torch.arange(4))) and got.equal(want)

    state = TopKState.empty(6, 3)
    with pytest.raises(ArgumentError, match="sample_ids must be >= 0"):
        torch.compile(step, fullgraph=True, backend="aot_eager")(state, x, torch.tensor([0, 1, -2, 3]))
    assert state.equal(TopKState.empty(6, 3))
    bad = W.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ArgumentError, match="W_enc"):
        torch.compile(lambda s: ops.sae_topk_update(s, x, bad, b, torch.arange(4)), fullgraph=True,
                      backend="aot_eager")(state)
    assert state.equal(TopKState.empty(6, 3))

    s = TopKState.empty(6, 3)
    torch.library.opcheck(torch.ops.semlens.sae_topk_update_,
                          (s.values, s.ids, s.positions, s.nan_counts, x, W, b, torch.arange(4), "max", "relu",
                           None, None, mask))
    with FakeTensorMode():
        st = TopKState.empty(6, 3)
        ops.sae_topk_update(st, torch.empty(2, 3, 8), torch.empty(8, 6), torch.empty(6), torch.arange(2))
        assert st.values.shape == (6, 3)
