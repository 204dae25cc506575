"""C++ CPU backend of :func:`semlens_fast.ops.sae_topk_update` (extension ``semlens_fast._C``).

The public wrapper has validated shapes, dtypes and devices. Here the valid token rows are
gathered once into a float32 ``[R, d]`` block (``b_dec`` subtracted: a copy of the input's size,
never of ``[B, T, L]``) with their norms; ``W_enc`` is read in place (any dtype and strides).
"""
from __future__ import annotations

import torch

from .. import _backend
from ..reference.sae import prepare_x
from ..sae import eps_constants
from ..topk import TopKState

_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_POOL = {"max": 0, "mean": 1, "sum": 3}


def rows_of(x: torch.Tensor, b_dec, mask):
    """``(rows [R, d] f32, row_off [B+1] i64, row_tok [R] i32, tmax)`` of the valid tokens."""
    xf = prepare_x(x, b_dec)
    B, T, d = xf.shape
    if mask is None:
        rows = xf.reshape(B * T, d)
        counts = torch.full((B,), T, dtype=torch.int64, device=xf.device)
        tok = torch.arange(T, dtype=torch.int32, device=xf.device).repeat(B)
    else:
        rows = xf[mask]
        counts = mask.sum(1)
        tok = torch.nonzero(mask)[:, 1].to(torch.int32)
    off = torch.zeros(B + 1, dtype=torch.int64, device=xf.device)
    off[1:] = torch.cumsum(counts, 0)
    tmax = int(counts.max()) if B else 0
    return rows.contiguous(), off, tok.contiguous(), tmax, counts


NR = 16
_packed: dict[str, object] = {}


def packed(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(panels [ceil(L/16) * d * 16] f32, norms [L] f32)`` of ``W [d, L]``, cached for the last W."""
    key = (W.data_ptr(), tuple(W.shape), W.stride(), W.dtype, W._version, W.storage_offset())
    hit = _packed.get("key")
    if hit == key:
        return _packed["value"]  # type: ignore[return-value]
    d, L = W.shape
    out = torch.empty(((L + NR - 1) // NR) * d * NR, dtype=torch.float32)
    norms = torch.empty(L, dtype=torch.float32)
    swi, swl = W.stride()
    _backend.extension().sae_pack(W.data_ptr(), _DTYPE[W.dtype], swi, swl, d, L, out.data_ptr(), norms.data_ptr(),
                                  _backend.num_threads())
    _packed.clear()
    _packed.update(key=key, value=(out, norms), ref=W)
    return out, norms


def sae_topk_update(state: TopKState, x, W_enc, b_enc, sample_ids, pool, activation, threshold, b_dec, mask) -> None:
    ext = _backend.extension()
    rows, off, tok, tmax, counts = rows_of(x, b_dec, mask)
    empty = int((counts == 0).sum())
    if empty:  # samples without a valid token pool to NaN for every latent
        state.nan_counts.add_(empty)
    d = int(W_enc.shape[0])
    L = int(W_enc.shape[1])
    nx = rows.square().sum(1).sqrt().contiguous() if rows.shape[0] else rows.new_zeros(0)
    benc = b_enc.float().contiguous()
    thr = threshold.float().contiguous() if threshold is not None else None
    c0, c1, c2 = eps_constants(d)
    wp, wn = packed(W_enc)
    ext.sae_topk_update(
        state.values.data_ptr(), state.ids.data_ptr(), state.positions.data_ptr(), state.nan_counts.data_ptr(),
        L, state.k, rows.data_ptr(), nx.data_ptr(), int(rows.shape[0]), d, off.data_ptr(), tok.data_ptr(),
        int(off.shape[0] - 1), max(tmax, 1), wp.data_ptr(), wn.data_ptr(), benc.data_ptr(),
        thr.data_ptr() if thr is not None else 0, sample_ids.data_ptr(), _POOL[pool], pool == "max",
        c0, c1, c2, _backend.num_threads(),
    )
