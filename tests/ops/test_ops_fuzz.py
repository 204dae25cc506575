"""Fuzz test of the public ops API (issue 20, "Done when"): hypothesis draws arguments
for ``TopKState.empty``/``TopKState``, ``topk_update``, ``pool_topk_update``,
``merge_topk``, ``cosine_topk``, ``pairwise_topk``, ``pairwise_max`` and
``EmbeddingIndex.search`` -- valid ones and broken ones (wrong dtypes, shapes,
devices, layouts, NaN/inf, magnitudes from denormals to 3e38, duplicate / negative
ids, bad k, exclusions out of range, malformed and overlapping states) -- and runs each
call on the C++ backend (at a drawn SIMD level) and on the torch reference. Every call
must either return exactly the reference's result (values bit for bit, ids, positions,
NaN counts) or raise an error from :mod:`semlens_fast.errors`, of the same type as the
reference's; any other exception, or a result that differs, fails."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from semlens_fast.errors import SemlensError
from semlens_fast.index import EmbeddingIndex
from semlens_fast.ops import (
    TopKState, _backend, cosine_topk, merge_topk, pairwise_max, pairwise_topk, pool_topk_update, topk_update,
)
from tests.fuzz_helpers import chance, choose

ext = _backend.extension()
CPU_ISAS = ["scalar", "avx2", "avx512"][: ["scalar", "avx2", "avx512"].index(ext.best_isa()) + 1] if ext else []
pytestmark = pytest.mark.skipif(ext is None, reason="C++ extension not built")
FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

VALUES = [-2.5, -1.0, -0.5, -0.0, 0.0, 0.25, 0.5, 1.0, 1.5, 3.0]
SPECIAL = [float("nan"), float("inf"), float("-inf"), 1e-40, 1e-30, 1e30, 3e38, -3e38]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BAD_DTYPES = [torch.float64, torch.int64, torch.int32, torch.bool, torch.uint8]


class Raised:
    def __init__(self, exc: BaseException):
        self.type = type(exc)
        self.exc = exc

    def __repr__(self) -> str:
        return f"Raised({self.type.__name__}: {self.exc})"


def on(backend: str, isa: str | None, fn, *args, **kw):
    """Call ``fn`` with SEMLENS_BACKEND=backend (and the SIMD level); an exception is
    returned as Raised. Anything but a SemlensError fails the test at once."""
    old = os.environ.get("SEMLENS_BACKEND")
    os.environ["SEMLENS_BACKEND"] = backend
    if isa is not None:
        ext.set_isa(isa)
    try:
        return fn(*args, **kw)
    except SemlensError as exc:
        return Raised(exc)
    except Exception as exc:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{backend}/{isa}: {fn.__name__} raised {type(exc).__name__}: {exc}")
    finally:
        ext.set_isa(ext.best_isa())
        if old is None:
            os.environ.pop("SEMLENS_BACKEND", None)
        else:
            os.environ["SEMLENS_BACKEND"] = old


def same(got, want) -> bool:
    if isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor) and "meta" in (got.device.type, want.device.type):
        return got.device == want.device and got.dtype == want.dtype and got.shape == want.shape  # shapes only
    if isinstance(got, Raised) or isinstance(want, Raised):
        return isinstance(got, Raised) and isinstance(want, Raised) and got.type is want.type
    if isinstance(got, TopKState):
        return isinstance(want, TopKState) and got.equal(want)
    if isinstance(got, tuple):
        return isinstance(want, tuple) and len(got) == len(want) and all(same(a, b) for a, b in zip(got, want))
    if isinstance(got, torch.Tensor):
        if not isinstance(want, torch.Tensor) or got.dtype != want.dtype or got.shape != want.shape:
            return False
        if got.dtype == torch.float32:
            return torch.equal(got.view(torch.int32), want.view(torch.int32))
        return torch.equal(got, want)
    return got == want


def check(isa, fn, *args, **kw):
    """C++ at ``isa`` and the reference agree (results or error types); returns the result."""
    got = on("cpu", isa, fn, *args, **kw)
    want = on("reference", None, fn, *args, **kw)
    event(f"{fn.__name__}: {want.type.__name__ if isinstance(want, Raised) else 'result'}")
    assert same(got, want), f"{fn.__name__}: cpu/{isa} gave {got!r}, reference {want!r}"
    return got


# --------------------------------------------------------------------------- strategies
# valid-or-broken decisions: tests/fuzz_helpers.py (choose, chance)


@st.composite
def float_tensor(draw, shape, bad_rate=8):
    """A tensor of ``shape`` (sometimes broken: other dtype, meta device, a numpy array,
    a list) in a random memory layout, values with ties, specials and extreme magnitudes."""
    n = int(np.prod(shape)) if len(shape) else 1
    pool = VALUES + (SPECIAL if chance(draw, 0.15) else [])
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    idx = torch.randint(0, len(pool), (n,), generator=g)
    x = torch.tensor(pool, dtype=torch.float32)[idx].reshape(shape)
    if chance(draw, 0.3):
        x = x * 10.0 ** draw(st.integers(-40, 38))
    roll = choose(draw, [(1, r) for r in range(100)])  # bad_rate percent are broken or not tensors
    if roll < bad_rate / 4:
        return x.to(draw(st.sampled_from(BAD_DTYPES)))
    if roll < bad_rate / 2:
        return torch.zeros(shape, device="meta")
    if roll < 3 * bad_rate / 4:
        return x.numpy()
    if roll < bad_rate:
        return x.tolist()
    x = x.to(draw(st.sampled_from(FLOAT_DTYPES)))
    layout = choose(draw, [(2, "contiguous"), (1, "transposed"), (1, "strided"), (1, "channels_last")])
    if layout == "transposed" and x.dim() >= 2:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "strided" and x.dim() >= 1 and x.shape[-1] > 0:
        x = torch.repeat_interleave(x, 2, dim=-1)[..., ::2]
    elif layout == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@st.composite
def sample_ids(draw, B):
    kind = choose(draw, [(10, "arange"), (5, "perm"), (1, "dup"), (1, "neg"), (1, "short"), (1, "float"), (1, "list"), (1, "int32")])
    base = draw(st.integers(0, 1000))
    if kind == "arange":
        return torch.arange(base, base + B)
    if kind == "perm":
        return torch.tensor(draw(st.permutations(list(range(base, base + B))))) if B else torch.arange(0)
    if kind == "dup":
        return torch.tensor([base + draw(st.integers(0, max(0, B // 2))) for _ in range(B)], dtype=torch.int64)
    if kind == "neg":
        return torch.arange(B) - draw(st.integers(1, 3))
    if kind == "short":
        return torch.arange(max(0, B - 1))
    if kind == "float":
        return torch.arange(B).float()
    if kind == "list":
        return list(range(base, base + B))
    return torch.arange(base, base + B, dtype=torch.int32)


BAD_K = [0, -1, True, 2.0, "3", None, 10**13, np.int64(3)]


@st.composite
def k_values(draw):
    return draw(st.integers(1, 9)) if chance(draw, 0.9) else choose(draw, [(1, v) for v in BAD_K])


@st.composite
def state_args(draw):
    C = draw(st.integers(1, 6)) if chance(draw, 0.9) else choose(draw, [(1, v) for v in (0, -1, 2.5, True)])
    k = draw(k_values())
    bad = ["gpu", "", "mps", "cuda", "cuda:1", 0]  # (meta is a shape-only device: test_registered_ops.py)
    device = choose(draw, [(6, None), (2, "cpu"), (1, torch.device("cpu"))] + [(0.15, b) for b in bad])
    return C, k, device


@st.composite
def update_calls(draw, C):
    """A short stream of topk_update / pool_topk_update calls for a C-channel state."""
    calls = []
    used = 0
    for _ in range(draw(st.integers(1, 3))):
        B = draw(st.integers(0, 7))
        op = choose(draw, [(1, "topk"), (1, "pool")])
        Cx = C if chance(draw, 0.93) else C + 1
        if op == "topk":
            shape = (B, Cx) if chance(draw, 0.95) else (B, Cx, 2)
            pool = "max"
        else:
            shape = choose(draw, [(4, (B, Cx, 2, 3)), (1, (B, Cx, 1, 1)), (3, (B, 4, Cx)), (1, (B, Cx)),
                                  (0.3, (B, Cx, 0, 2)), (0.3, (B, Cx, 2, 2, 2))])
            pool = choose(draw, [(3, "max"), (3, "mean"), (3, "absmax"), (3, "sum"), (0.5, "median"), (0.5, "MAX")])
        x = draw(float_tensor(shape))
        ids = draw(sample_ids(B))
        if isinstance(ids, torch.Tensor) and ids.dtype == torch.int64 and chance(draw, 0.8):
            ids = ids + used  # mostly distinct over the stream
        used += B + 1000
        calls.append((op, x, ids, pool))
    return calls


def run_stream(C, k, device, calls):
    """TopKState.empty + the calls; returns the list of outcomes (states or Raised)."""
    out = []
    state = TopKState.empty(C, k, device=device)
    for op, x, ids, pool in calls:
        before = state.clone()
        try:
            if op == "topk":
                topk_update(state, x, ids)
            else:
                pool_topk_update(state, x, ids, pool)
            out.append(state.clone())
        except SemlensError as exc:
            assert state.equal(before), "a failed call changed the state"
            out.append(Raised(exc))
    return out


# --------------------------------------------------------------------------- the fuzz tests

@settings(max_examples=120, **FUZZ)
@given(st.sampled_from(CPU_ISAS or ["scalar"]), state_args(), st.data())
def test_fuzz_topk_updates(isa, args, data):
    C, k, device = args
    calls = data.draw(update_calls(C if isinstance(C, int) and not isinstance(C, bool) and C >= 0 else 3))
    got = on("cpu", isa, run_stream, C, k, device, calls)
    want = on("reference", None, run_stream, C, k, device, calls)
    for w in (want if isinstance(want, list) else [want]):
        event(f"update: {w.type.__name__ if isinstance(w, Raised) else 'result'}")
    assert same(tuple(got) if isinstance(got, list) else got, tuple(want) if isinstance(want, list) else want), (got, want)


@st.composite
def merge_cases(draw):
    C, k = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    ids = draw(st.permutations(list(range(40))))
    overlap = chance(draw, 0.15)
    ia = torch.tensor(ids[:12])
    ib = torch.tensor(ids[12:24] if not overlap else ids[6:18])
    xa = draw(float_tensor((12, C), bad_rate=0))
    xb = draw(float_tensor((12, C), bad_rate=0))
    damage = choose(draw, [(8, None)] + [(0.5, d) for d in ("nan", "neg", "swap", "pos", "empty_value", "nan_count", "shape", "notstate")])
    return C, k, xa, ia, xb, ib, damage


def build_states(C, k, xa, ia, xb, ib, damage):
    """Two states of the two shards, then the drawn damage."""
    a, b = TopKState.empty(C, k), TopKState.empty(C, k)
    topk_update(a, xa, ia)
    topk_update(b, xb, ib)
    if damage == "nan":
        b.values[0, 0] = float("nan")
    elif damage == "neg":
        b.ids[0, 0] = -7
    elif damage == "swap" and k > 1:
        a.values[0, [0, 1]] = a.values[0, [1, 0]].clone()
        a.ids[0, [0, 1]] = a.ids[0, [1, 0]].clone()
    elif damage == "pos":
        a.positions[0, 0] = -9
    elif damage == "empty_value":
        b.values[0, -1], b.ids[0, -1] = 5.0, -1
    elif damage == "nan_count":
        a.nan_counts[0] = -1
    elif damage == "shape":
        b = TopKState.empty(C, k + 1)
    elif damage == "notstate":
        b = (b.values, b.ids)
    return a, b


def build_and_merge(*case):
    return merge_topk(*build_states(*case))


def merge_checks_agree(*case):
    """The C++ and the torch versions of merge_topk's state checks say the same."""
    from semlens_fast.ops._validate import check_merge_states

    try:
        a, b = build_states(*case)
    except SemlensError:
        return
    if not isinstance(b, TopKState) or a.values.shape != b.values.shape:
        return
    msgs = []
    for use_ext in (True, False):
        try:
            check_merge_states(a, b, use_extension=use_ext)
            msgs.append(None)
        except SemlensError as exc:
            msgs.append(str(exc))
    assert msgs[0] == msgs[1], msgs


@settings(max_examples=80, **FUZZ)
@given(st.sampled_from(CPU_ISAS or ["scalar"]), merge_cases())
def test_fuzz_merge(isa, case):
    check(isa, build_and_merge, *case)
    merge_checks_agree(*case)


@st.composite
def similarity_cases(draw):
    d = draw(st.integers(0, 20))
    Q, N = draw(st.integers(0, 11)), draw(st.integers(0, 30))
    dq = d if chance(draw, 0.95) else d + 1
    q = draw(float_tensor(choose(draw, [(18, (Q, dq)), (1, (dq,)), (1, (Q, dq, 1))])))
    x = draw(float_tensor((N, d)))
    k = draw(k_values())
    exclude = choose(draw, [(5, None), (2, "ids"), (2, "wide"), (0.3, "bad_shape"), (0.3, "float"), (0.4, "beyond")])
    if exclude == "ids":
        exclude = torch.randint(-1, max(1, N), (Q,))
    elif exclude == "wide":
        exclude = torch.randint(-1, max(1, N), (Q, 3))
    elif exclude == "bad_shape":
        exclude = torch.zeros(Q + 1, dtype=torch.int64)
    elif exclude == "float":
        exclude = torch.zeros(Q)
    elif exclude == "beyond":
        exclude = torch.full((Q,), N + draw(st.integers(0, 3)))
    op = choose(draw, [(2, "cosine_topk"), (1, "pairwise_topk"), (1, "pairwise_max")])
    diag = choose(draw, [(1, False), (1, True), (0.1, 1), (0.1, "yes")])
    return op, q, x, k, exclude, diag


def call_similarity(op, q, x, k, exclude, diag):
    if op == "cosine_topk":
        return cosine_topk(q, x, k, exclude=exclude)
    if op == "pairwise_topk":
        return pairwise_topk(q, x, k, exclude_diagonal=diag)
    return pairwise_max(q, x, exclude_diagonal=diag)


@settings(max_examples=150, **FUZZ)
@given(st.sampled_from(CPU_ISAS or ["scalar"]), similarity_cases())
def test_fuzz_similarity(isa, case):
    check(isa, call_similarity, *case)


@st.composite
def index_cases(draw):
    d, N = draw(st.integers(1, 12)), draw(st.integers(0, 40))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    vecs = torch.randn(N, d, generator=g) * 10.0 ** draw(st.integers(-30, 30))
    dtype = choose(draw, [(1, t) for t in FLOAT_DTYPES])
    chunk = choose(draw, [(1, c) for c in (None, 1, 3, 7, 1000)])
    Q = draw(st.integers(0, 10))
    q = draw(float_tensor((Q, d if chance(draw, 0.95) else d + 2)))
    k = draw(k_values())
    exclude = choose(draw, [(3, None), (2, "ids"), (0.3, "beyond")])
    if exclude == "ids":
        exclude = torch.randint(-1, max(1, N), (Q, 2))
    elif exclude == "beyond":
        exclude = torch.full((Q,), N)
    return vecs, dtype, chunk, q, k, exclude


def build_and_search(vecs, dtype, chunk, q, k, exclude):
    index = EmbeddingIndex.from_tensors(vecs, dtype, chunk_rows=chunk)
    return index.search(q, k, exclude=exclude)


@settings(max_examples=80, **FUZZ)
@given(st.sampled_from(CPU_ISAS or ["scalar"]), index_cases())
def test_fuzz_index_search(isa, case):
    check(isa, build_and_search, *case)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_zero_channels_with_huge_k(backend, monkeypatch):
    """Found by the fuzz test in CI: a 0-channel state with k = 1e13 made the reference's argsort size its
    work by k (an 80 TB allocation). No rows means nothing to order, on every backend."""
    monkeypatch.setenv("SEMLENS_BACKEND", backend)
    s = TopKState.empty(0, 10**13)
    topk_update(s, torch.empty(0, 0), torch.empty(0, dtype=torch.int64))
    pool_topk_update(s, torch.empty(1, 0), torch.tensor([0]), "sum")
    other = TopKState.empty(0, 10**13)
    merge_topk(s, other)
    assert s.values.shape == (0, 10**13) and s.nan_counts.shape == (0,)
