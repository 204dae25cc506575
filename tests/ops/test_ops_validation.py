"""Bad input to the ops API (issue 20.6, ops part): devices, merge of overlapping or
malformed states, exclusions beyond the rows, duplicate sample ids, absurd k. Each gets
an error from semlens_fast.errors naming the argument and what was expected; nothing
is accepted silently and a failed call leaves the state untouched."""
from __future__ import annotations

import pytest
import torch

from semlens_fast.errors import ArgumentError, DeviceError, SemlensError
from semlens_fast.index import EmbeddingIndex
from semlens_fast.ops import (
    TopKState, cosine_topk, merge_topk, pairwise_max, pairwise_topk, pool_topk_update, topk_update,
)
from semlens_fast.ops import _backend

BACKENDS = ["reference"] + (["cpu"] if _backend.extension() is not None else [])


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("SEMLENS_BACKEND", request.param)
    return request.param


# --------------------------------------------------------------------------- devices

BAD_DEVICES = [("gpu", "is not a device"), ("", "is not a device"), ("mps", "the ops run on 'cpu' or 'cuda'"),
               ("xla", "the ops run on 'cpu' or 'cuda'"), (3.5, "must be a torch.device or a string")]
if not torch.cuda.is_available():
    BAD_DEVICES += [("cuda", "CUDA is not available"), ("cuda:0", "CUDA is not available"),
                    (torch.device("cuda"), "CUDA is not available")]


@pytest.mark.parametrize("device,match", BAD_DEVICES)
def test_state_empty_and_to_refuse_bad_devices(device, match):
    with pytest.raises(DeviceError, match=match) as info:
        TopKState.empty(4, 2, device=device)
    assert "device" in str(info.value)
    with pytest.raises(DeviceError, match=match):
        TopKState.empty(4, 2).to(device)


def test_meta_tensors_get_shapes_but_never_meet_real_data():
    """Meta is a shape-only device for the ops (their registered fake implementations, see
    tests/ops/test_registered_ops.py); mixing meta with real tensors, and searching stored
    data with meta queries, are errors that say so."""
    meta = lambda *s: torch.zeros(*s, device="meta")  # noqa: E731
    ms = TopKState(meta(3, 2), torch.zeros(3, 2, dtype=torch.int64, device="meta"),
                   torch.zeros(3, 2, dtype=torch.int32, device="meta"), torch.zeros(3, dtype=torch.int64, device="meta"))
    assert topk_update(ms, meta(2, 3), torch.arange(2, device="meta")).values.device.type == "meta"
    s = TopKState.empty(3, 2)
    with pytest.raises(DeviceError, match="acts is on meta"):
        topk_update(s, meta(2, 3), torch.arange(2))
    with pytest.raises(DeviceError, match="fmap is on meta"):
        pool_topk_update(s, meta(2, 3, 2, 2), torch.arange(2))
    with pytest.raises(DeviceError, match="queries are on meta but db is on cpu"):
        cosine_topk(meta(2, 4), torch.zeros(5, 4), 2)
    with pytest.raises(DeviceError, match="queries are on cpu but db is on meta"):
        cosine_topk(torch.zeros(2, 4), meta(5, 4), 2)
    with pytest.raises(DeviceError, match="meta tensors hold no data"):
        EmbeddingIndex.from_tensors(torch.randn(5, 4)).search(meta(2, 4), 2)
    assert s.equal(TopKState.empty(3, 2))


# --------------------------------------------------------------------------- merge_topk

def _state(C, k, entries):
    """entries: {channel: [(value, id, pos), ...]} sorted as given (not re-sorted)."""
    s = TopKState.empty(C, k)
    for c, row in entries.items():
        for j, (v, i, p) in enumerate(row):
            s.values[c, j], s.ids[c, j], s.positions[c, j] = v, i, p
    return s


def test_merge_refuses_overlapping_shards(backend):
    a = _state(3, 2, {0: [(2.0, 5, -1)], 2: [(1.0, 7, -1)]})
    b = _state(3, 2, {0: [(3.0, 6, -1)], 2: [(0.5, 7, -1)]})  # sample 7 in both, channel 2
    with pytest.raises(ArgumentError, match=r"a and b both hold sample id 7 in channel 2.*disjoint"):
        merge_topk(a, b)
    # disjoint: fine and exact
    c = _state(3, 2, {0: [(3.0, 6, -1)], 2: [(0.5, 8, -1)]})
    m = merge_topk(a, c)
    assert m.ids.tolist() == [[6, 5], [-1, -1], [7, 8]]


@pytest.mark.parametrize("field,value,match", [
    ("values", float("nan"), "a.values holds NaN in channel"),
    ("ids", -3, "a.ids holds negative ids other than -1"),
    ("positions", -2, "a.positions holds values below -1"),
])
def test_merge_refuses_malformed_entries(backend, field, value, match):
    a = _state(2, 3, {1: [(2.0, 1, 0), (1.0, 2, 0)]})
    getattr(a, field)[1, 0] = value
    with pytest.raises(ArgumentError, match=match):
        merge_topk(a, TopKState.empty(2, 3))
    with pytest.raises(ArgumentError, match=match.replace("a.", "b.")):
        merge_topk(TopKState.empty(2, 3), a)


def test_merge_refuses_broken_conventions(backend):
    # an empty slot with a value
    a = TopKState.empty(1, 2)
    a.values[0, 1] = 1.0
    with pytest.raises(ArgumentError, match="empty slots .id -1. whose value is not -inf"):
        merge_topk(a, TopKState.empty(1, 2))
    # equal values, higher id first (ties must go to the lower id)
    a = _state(1, 2, {0: [(1.0, 9, -1), (1.0, 3, -1)]})
    with pytest.raises(ArgumentError, match="not sorted best first"):
        merge_topk(a, TopKState.empty(1, 2))
    # the same sample twice in one channel
    a = _state(1, 3, {0: [(2.0, 4, -1), (1.0, 4, -1)]})
    with pytest.raises(ArgumentError, match="holds the same sample id twice in channel"):
        merge_topk(a, TopKState.empty(1, 3))
    # a real entry after an empty slot
    a = _state(1, 2, {0: [(float("-inf"), -1, -1), (1.0, 2, -1)]})
    with pytest.raises(ArgumentError, match="not sorted best first"):
        merge_topk(a, TopKState.empty(1, 2))
    a = TopKState.empty(1, 2)
    a.nan_counts[0] = -1
    with pytest.raises(ArgumentError, match="nan_counts holds a negative count at channel 0"):
        merge_topk(a, TopKState.empty(1, 2))


def _damaged_pairs():
    """(a, b) pairs with one defect each, and a clean pair."""
    out = []
    for damage in ("none", "nan", "id", "empty", "pos", "nan_count", "order", "dup", "overlap", "b_nan", "two"):
        a = _state(4, 3, {1: [(2.0, 1, 0), (1.0, 2, 3)], 3: [(5.0, 9, -1)]})
        b = _state(4, 3, {1: [(4.0, 5, 1)], 2: [(0.5, 6, -1), (0.25, 7, -1)]})
        if damage == "nan":
            a.values[3, 0] = float("nan")
        elif damage == "id":
            a.ids[1, 1] = -4
        elif damage == "empty":
            a.positions[0, 2] = 5
        elif damage == "pos":
            a.positions[1, 0] = -3
        elif damage == "nan_count":
            a.nan_counts[2] = -2
        elif damage == "order":
            a.values[1, 1] = 3.0
        elif damage == "dup":
            b.ids[2, 1] = 6
        elif damage == "overlap":
            b.ids[2, 0] = 9  # a holds 9 in channel 3, b in channel 2: no overlap ...
            b.ids[1, 0] = 2  # ... but 2 is in channel 1 of both
        elif damage == "b_nan":
            b.values[2, 1] = float("nan")
        elif damage == "two":  # NaN in a's channel 3 and a bad id in a's channel 1: NaN is reported
            a.values[3, 0] = float("nan")
            a.ids[1, 1] = -4
        out.append((damage, a, b))
    return out


@pytest.mark.parametrize("damage,a,b", _damaged_pairs(), ids=[d for d, _, _ in _damaged_pairs()])
def test_merge_checks_torch_and_cpp_agree(damage, a, b):
    """The C++ check (CPU states) and the torch check (other devices) report the same
    check, state and channel."""
    from semlens_fast.ops._validate import check_merge_states

    msgs = []
    for use_ext in ([True, False] if _backend.extension() is not None else [False]):
        try:
            check_merge_states(a, b, use_extension=use_ext)
            msgs.append(None)
        except ArgumentError as exc:
            msgs.append(str(exc))
    assert len(set(msgs)) == 1, msgs
    assert (msgs[0] is None) == (damage == "none"), msgs
    if damage == "overlap":
        assert "both hold sample id 2 in channel 1 (1 channel(s) share ids)" in msgs[0]
    if damage == "two":
        assert "a.values holds NaN in channel 3" in msgs[0]


def test_merge_accepts_real_minus_inf_and_ties(backend):
    a = _state(1, 4, {0: [(1.0, 2, -1), (1.0, 5, -1), (float("-inf"), 0, -1)]})
    b = _state(1, 4, {0: [(1.0, 3, -1), (float("-inf"), 1, -1)]})
    assert merge_topk(a, b).ids.tolist() == [[2, 3, 5, 0]]


# --------------------------------------------------------------------------- duplicate / negative ids

@pytest.mark.parametrize("ids", [[0, 1, 2, 1], [5, 5], [9, 3, 7, 3, 2]])
def test_duplicate_ids_in_a_batch_are_refused(backend, ids):
    B = len(ids)
    s = TopKState.empty(3, 2)
    topk_update(s, torch.randn(4, 3), torch.arange(100, 104))
    before = s.clone()
    dup = max(set(ids), key=ids.count)
    with pytest.raises(ArgumentError, match=rf"sample_ids must be distinct.*e\.g\. {dup} at batch rows"):
        topk_update(s, torch.randn(B, 3), torch.tensor(ids))
    with pytest.raises(ArgumentError, match="sample_ids must be distinct"):
        pool_topk_update(s, torch.randn(B, 3, 2, 2), torch.tensor(ids), "mean")
    assert s.equal(before)


def test_unsorted_distinct_ids_are_fine(backend):
    s = TopKState.empty(2, 3)
    topk_update(s, torch.tensor([[1.0, 0.0], [3.0, 1.0], [2.0, 2.0]]), torch.tensor([7, 2, 9]))
    assert s.ids.tolist() == [[2, 9, 7], [9, 2, 7]]


# --------------------------------------------------------------------------- exclusions, k

def test_exclude_ids_beyond_the_rows_are_refused(backend):
    q, x = torch.randn(2, 4), torch.randn(5, 4)
    with pytest.raises(ArgumentError, match=r"exclude holds row id 5 but there are 5 rows \(ids 0\.\.4"):
        cosine_topk(q, x, 2, exclude=torch.tensor([0, 5]))
    with pytest.raises(ArgumentError, match="exclude holds row id 7 but there are 5 rows"):
        EmbeddingIndex.from_tensors(x, chunk_rows=2).search(q, 2, exclude=torch.tensor([[7], [1]]))
    s, i = cosine_topk(q, x, 2, exclude=torch.tensor([4, -1]))
    assert 4 not in i[0].tolist()


def test_pairwise_exclude_diagonal_with_fewer_rows_in_b(backend):
    a, b = torch.randn(6, 3), torch.randn(4, 3)
    s, i = pairwise_topk(a, b, 4, exclude_diagonal=True)
    for r in range(6):
        assert (r not in i[r].tolist()) or r >= 4
    assert (i[4:] >= 0).all()  # rows 4, 5 of a have no diagonal partner: nothing excluded


def test_absurd_k_is_an_argument_error(backend):
    with pytest.raises(ArgumentError, match=r"k=1000000000000 asks for .* GiB.*use a smaller k"):
        cosine_topk(torch.randn(2, 4), torch.randn(5, 4), 10**12)
    with pytest.raises(ArgumentError, match="k=1000000000000 asks for a state"):
        TopKState.empty(8, 10**12)


def test_every_error_is_a_semlens_error():
    """The error types used above are the library's (callers can catch them generically)."""
    for exc in (ArgumentError, DeviceError):
        assert issubclass(exc, SemlensError) and issubclass(exc, ValueError)
