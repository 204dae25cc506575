"""C++ CPU backend of the top-k ops (extension ``semlens_fast._C``).

The public wrappers in :mod:`semlens_fast.ops.topk` have validated shapes, dtypes and
devices; this module only arranges strides and passes raw pointers.
"""
from __future__ import annotations

import torch

from .. import _backend
from ..topk import TopKState

_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_POOL = {"max": 0, "mean": 1, "absmax": 2, "sum": 3}
# From this k on, the kernel collects each channel's candidates over runs of samples and
# merges them into the sorted list in one pass instead of one insertion (memmove of up to
# k entries) per candidate; see docs/ARCHITECTURE.md ("Large k") and benchmarks/figures_harden.py (topk).
MERGE_MIN_K = 256


def pool_topk_update(state: TopKState, x: torch.Tensor, sample_ids: torch.Tensor, pool: str, track_positions: bool) -> int:
    """``x`` is a ``[B, C, S]`` view; copied only when neither channels nor positions are unit-stride.

    Returns 0, or (leaving the state untouched) 1 if a sample id is negative, 2 if an id
    occurs twice in the batch.
    """
    ext = _backend.extension()
    B, C, S = x.shape
    sb, sc, ss = x.stride()
    if not (sc == 1 or ss == 1 or S == 1 or C == 1):
        x = x.contiguous()
        sb, sc, ss = x.stride()
    if S == 1:
        ss = 0
    if C == 1 and sc != 1:
        sc = 1 if ss != 1 else 0
    return ext.pool_topk_update(
        state.values.data_ptr(), state.ids.data_ptr(), state.positions.data_ptr(), state.nan_counts.data_ptr(),
        C, state.k, x.data_ptr(), _DTYPE[x.dtype], B, S, sb, sc, ss,
        sample_ids.data_ptr(), _POOL[pool], bool(track_positions), _backend.num_threads(), MERGE_MIN_K,
    )


def merge_topk(out: TopKState, b: TopKState) -> None:
    _backend.extension().merge_topk(
        out.values.data_ptr(), out.ids.data_ptr(), out.positions.data_ptr(), out.nan_counts.data_ptr(),
        b.values.data_ptr(), b.ids.data_ptr(), b.positions.data_ptr(), b.nan_counts.data_ptr(),
        out.channels, out.k, _backend.num_threads(),
    )
