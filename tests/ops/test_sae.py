"""Property tests of ops.sae_topk_update: the reference equals a plain-Python oracle of the
definition, and every CPU SIMD level equals the reference bit for bit (ties, NaN/inf inputs,
k larger than the data, empty batches, masks, JumpReLU, b_dec, fp16/bf16 inputs)."""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semlens_fast.errors import ArgumentError, DTypeError, ShapeError
from semlens_fast.ops import TopKState, _backend, sae_topk_update

ext = _backend.extension()
CPU_ISAS = []
if ext is not None:
    order = ["scalar", "avx2", "avx512"]
    CPU_ISAS = order[: order.index(ext.best_isa()) + 1]
SETTINGS = dict(max_examples=50, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
# dyadic values: exact products and sums, so many ties between latents, tokens and samples
VALUES = [-2.0, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 1.5]


@st.composite
def cases(draw, specials=True):
    d = draw(st.integers(1, 9))
    L = draw(st.integers(1, 40))
    k = draw(st.integers(1, 6))
    tokens = draw(st.booleans())
    T = draw(st.integers(1, 8)) if tokens else 1
    pool = draw(st.sampled_from(["max", "mean", "sum"]))
    act = draw(st.sampled_from(["relu", "jumprelu"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    wdtype = draw(st.sampled_from([torch.float32, torch.float16]))
    dyadic = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)

    def vals(shape):
        if dyadic:
            return torch.tensor(VALUES)[torch.randint(0, len(VALUES), shape, generator=g)]
        return torch.randn(shape, generator=g)

    W = vals((d, L)).to(wdtype)
    if draw(st.booleans()):  # a transposed (column-major) W_enc
        W = W.t().contiguous().t()
    b = vals((L,))
    b_dec = vals((d,)) if draw(st.booleans()) else None
    thr = vals((L,)).abs() if act == "jumprelu" else None
    nb = draw(st.integers(1, 3))
    sizes = [draw(st.integers(0, 6)) for _ in range(nb)]
    ids = draw(st.permutations(list(range(sum(sizes) + 4))))[: sum(sizes)]
    batches, s = [], 0
    for B in sizes:
        x = vals((B, T, d) if tokens else (B, d))
        if specials and B and draw(st.booleans()):
            flat = x.view(-1)
            for _ in range(draw(st.integers(1, 3))):
                flat[int(torch.randint(0, flat.numel(), (1,), generator=g))] = draw(
                    st.sampled_from([float("nan"), float("inf"), float("-inf")]))
        m = None
        if tokens and draw(st.booleans()):
            m = torch.rand(B, T, generator=g) > 0.35
        batches.append((x.to(dtype), torch.tensor(ids[s : s + B], dtype=torch.int64), m))
        s += B
    return dict(L=L, k=k, pool=pool, act=act, W=W, b=b, b_dec=b_dec, thr=thr, batches=batches)


def run(case, backend):
    old = os.environ.get("SEMLENS_BACKEND")
    os.environ["SEMLENS_BACKEND"] = backend
    try:
        state = TopKState.empty(case["L"], case["k"])
        for x, ids, m in case["batches"]:
            sae_topk_update(state, x, case["W"], case["b"], ids, pool=case["pool"], activation=case["act"],
                            threshold=case["thr"], b_dec=case["b_dec"], mask=m)
        return state
    finally:
        if old is None:
            os.environ.pop("SEMLENS_BACKEND", None)
        else:
            os.environ["SEMLENS_BACKEND"] = old


def oracle(case):
    """Plain Python, straight from the definition in semlens_fast/ops/sae.py."""
    import numpy as np

    W = case["W"].float().double().tolist()
    b = case["b"].float().tolist()
    bd = case["b_dec"].float() if case["b_dec"] is not None else None
    thr = case["thr"].float().tolist() if case["thr"] is not None else None
    L = case["L"]
    entries = [[] for _ in range(L)]
    nans = [0] * L
    for x, ids, m in case["batches"]:
        xf = x.float()
        if bd is not None:
            xf = xf - bd
        if xf.dim() == 2:
            xf = xf.unsqueeze(1)
        for bi in range(xf.shape[0]):
            toks = [t for t in range(xf.shape[1]) if m is None or bool(m[bi, t])]
            for l in range(L):
                acts = []
                for t in toks:
                    s = 0.0
                    for i in range(xf.shape[2]):
                        s += float(xf[bi, t, i]) * W[i][l]
                    s += b[l]
                    pre = float(np.float32(s)) if not math.isnan(s) else s
                    if math.isnan(pre):
                        a = pre
                    elif pre > 0 and (thr is None or pre > thr[l]):
                        a = pre
                    else:
                        a = 0.0
                    acts.append((a, t))
                if not acts:
                    nans[l] += 1
                    continue
                if case["pool"] == "max":
                    if any(math.isnan(a) for a, _ in acts):
                        nans[l] += 1
                        continue
                    best = max(a for a, _ in acts)
                    pos = next(t for a, t in acts if a == best)
                    v = best
                else:
                    s = 0.0
                    for a, _ in acts:
                        s += a
                    if case["pool"] == "mean":
                        s = s / len(acts)
                    if math.isnan(s):
                        nans[l] += 1
                        continue
                    v, pos = float(np.float32(s)), -1
                entries[l].append((v, int(ids[bi]), pos))
    out = []
    for l in range(L):
        srt = sorted(entries[l], key=lambda e: (-e[0], e[1]))[: case["k"]]
        out.append(srt + [(float("-inf"), -1, -1)] * (case["k"] - len(srt)))
    return out, nans


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@settings(**dict(SETTINGS, max_examples=30))
@given(cases())
def test_reference_matches_oracle(case):
    state = run(case, "reference")
    want, nans = oracle(case)
    got = [[(float(v), int(i), int(p)) for v, i, p in zip(state.values[l], state.ids[l], state.positions[l])]
           for l in range(case["L"])]
    assert got == want
    assert state.nan_counts.tolist() == nans


@pytest.mark.skipif(not CPU_ISAS, reason="C++ extension not built")
@pytest.mark.parametrize("isa", CPU_ISAS)
@settings(**SETTINGS)
@given(case=cases())
def test_cpu_equals_reference(isa, case):
    want = run(case, "reference")
    ext.set_isa(isa)
    try:
        got = run(case, "cpu")
    finally:
        ext.set_isa(ext.best_isa())
    assert got.equal(want), (isa, case["pool"], case["act"])


@pytest.mark.skipif(not CPU_ISAS, reason="C++ extension not built")
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_cpu_equals_reference_on_a_long_realistic_stream(isa):
    """Many latents, many batches (lists fill, then the certified skip does the work), every pool."""
    g = torch.Generator().manual_seed(3)
    d, L, T = 48, 300, 11
    W = torch.randn(d, L, generator=g) / d**0.5
    b = torch.randn(L, generator=g) * 0.3 - 0.2
    b_dec = torch.randn(d, generator=g) * 0.1
    thr = torch.rand(L, generator=g) * 0.5
    for pool, act in (("max", "relu"), ("mean", "jumprelu"), ("sum", "relu")):
        case = dict(L=L, k=5, pool=pool, act=act, W=W, b=b, b_dec=b_dec, thr=thr if act == "jumprelu" else None,
                    batches=[(torch.randn(16, T, d, generator=g), torch.arange(16 * i, 16 * i + 16),
                              torch.rand(16, T, generator=g) > 0.2) for i in range(12)])
        want = run(case, "reference")
        ext.set_isa(isa)
        try:
            got = run(case, "cpu")
        finally:
            ext.set_isa(ext.best_isa())
        assert got.equal(want), (isa, pool)
        assert int(got.valid_counts().min()) == 5


def test_bad_input_names_the_argument():
    st_ = TopKState.empty(4, 2)
    x = torch.randn(2, 3, 5)
    W, b = torch.randn(5, 4), torch.zeros(4)
    ids = torch.arange(2)
    with pytest.raises(ShapeError, match=r"W_enc must be \[d, L\] = \[5, 4\].*\(6, 4\)"):
        sae_topk_update(st_, x, torch.randn(6, 4), b, ids)
    with pytest.raises(ShapeError, match="L = 3 latents"):
        sae_topk_update(st_, x, torch.randn(5, 3), torch.zeros(3), ids)
    bad = W.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ArgumentError, match=r"W_enc .*non-finite.*\[2, 1\]"):
        sae_topk_update(st_, x, bad, b, ids)
    with pytest.raises(ArgumentError, match="threshold"):
        sae_topk_update(st_, x, W, b, ids, activation="jumprelu")
    with pytest.raises(ArgumentError, match="pool"):
        sae_topk_update(st_, x, W, b, ids, pool="absmax")
    with pytest.raises(ShapeError, match="mask"):
        sae_topk_update(st_, x, W, b, ids, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(DTypeError):
        sae_topk_update(st_, x.long(), W, b, ids)
    with pytest.raises(ArgumentError, match="negative"):
        sae_topk_update(st_, x, W, b, torch.tensor([0, -3]))
    assert st_.equal(TopKState.empty(4, 2))  # nothing was touched by the refused calls
