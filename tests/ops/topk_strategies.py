"""Shared hypothesis strategies and a plain-Python oracle for the top-k tests."""
from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from semlens_fast.ops import TopKState

# a small value set forces ties; specials cover NaN, +-inf and signed zeros. All are
# dyadic, so float64 sums are exact in any order (sum/mean compare bit for bit).
VALUES = [-2.5, -1.0, -0.5, -0.0, 0.0, 0.25, 0.5, 1.0, 1.5, 3.0]
SPECIALS = [float("nan"), float("inf"), float("-inf")]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def tensors(draw, shape, specials=True):
    n = int(math.prod(shape))
    pool = VALUES + (SPECIALS if specials and draw(st.booleans()) else [])
    if n <= 512:  # element by element, so hypothesis can shrink failures
        idx = draw(st.lists(st.integers(0, len(pool) - 1), min_size=n, max_size=n))
        idx = torch.tensor(idx, dtype=torch.int64)
    else:  # large tensors: drawn from a seed (hypothesis caps list sizes)
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        idx = torch.randint(0, len(pool), (n,), generator=g)
    return torch.tensor(pool, dtype=torch.float32)[idx].reshape(shape)


def oracle(batches, k, pool, layout):
    """Plain-Python top-k over every batch: list over channels of [(value, id, pos)]."""
    entries = None
    nans = None
    for x, ids in batches:  # x is float32 [B, C, S]
        B, C, S = x.shape
        if entries is None:
            entries, nans = [[] for _ in range(C)], [0] * C
        for b in range(B):
            for c in range(C):
                vals = [float(v) for v in x[b, c]]
                if pool in ("max", "absmax"):
                    vs = [abs(v) for v in vals] if pool == "absmax" else vals
                    if any(math.isnan(v) for v in vs):
                        nans[c] += 1
                        continue
                    m = max(vs)
                    p = vs.index(m)
                    entries[c].append((vs[p], int(ids[b]), p if layout != "plain" else -1))
                else:
                    s = math.fsum(vals) if not any(math.isinf(v) or math.isnan(v) for v in vals) else sum(vals)
                    if pool == "mean":
                        s = s / S
                    v = float(torch.tensor(s, dtype=torch.float64).float()) + 0.0
                    if math.isnan(v):
                        nans[c] += 1
                        continue
                    entries[c].append((v, int(ids[b]), -1))
    out = []
    for c in range(len(entries)):
        srt = sorted(entries[c], key=lambda e: (-e[0], e[1]))[:k]
        srt += [(float("-inf"), -1, -1)] * (k - len(srt))
        out.append(srt)
    return out, nans


def state_as_lists(state: TopKState):
    return [
        [(float(v), int(i), int(p)) for v, i, p in zip(state.values[c], state.ids[c], state.positions[c])]
        for c in range(state.channels)
    ]


def same_entries(got, want):
    """Entry lists equal, with values compared bitwise (signed zeros included)."""
    if len(got) != len(want):
        return False
    for gc, wc in zip(got, want):
        for (gv, gi, gp), (wv, wi, wp) in zip(gc, wc):
            if gi != wi or gp != wp:
                return False
            if math.copysign(1.0, gv) != math.copysign(1.0, wv) or not (gv == wv or (math.isnan(gv) and math.isnan(wv))):
                return False
    return True
