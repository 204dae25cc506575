"""Triton (CUDA) backend of the top-k ops.

One program per channel keeps that channel's top-k in registers and streams the
batch through in chunks of ``BB`` samples. Each chunk is pooled over S in tiles of
``BS`` positions (max/absmax with first-position argmax, or a float64 sum), then
merged by *ranking*: every candidate's rank is the number of candidates that beat it
in the library's total order (value desc, id asc, empty last; exact duplicates by
slot), which is a permutation, so slot r of the new state is the candidate of rank r.
The rank matrices are ``[KP, KP + BB]``, so k is limited to ``MAX_K`` here; larger k
runs on the torch reference on the same device.

Tested on the CPU under ``TRITON_INTERPRET=1`` (fp32/fp16/bf16 loads; no ``tl.dot``).
Performance note: channel-per-program reads ``[B, C]`` activations with a stride of C
(uncoalesced); a channel-blocked variant is the obvious next step on real GPUs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..topk import TopKState
from .. import reference

MAX_K = 256
_POOL = {"max": 0, "mean": 1, "absmax": 2, "sum": 3}
_ID_LAST = 9223372036854775807


@triton.jit
def _beats(va, ia, vb, ib):
    """Strict total-order comparison: (va, ia) better than (vb, ib); ids are pre-mapped (empty -> max)."""
    return (va > vb) | ((va == vb) & (ia < ib))


@triton.jit
def _merge(sv, si, sp, s_ok, bv, bi, bp, b_ok, KP: tl.constexpr, BB: tl.constexpr):
    """Merge candidates (bv, bi, bp)[BB] into the sorted list (sv, si, sp)[KP]; returns the new list."""
    sk = tl.where(si < 0, _ID_LAST, si)
    bk = tl.where(bi < 0, _ID_LAST, bi)
    js = tl.arange(0, KP)
    jb = tl.arange(0, BB)
    # rank of every state entry
    ss_beat = _beats(sv[:, None], sk[:, None], sv[None, :], sk[None, :]) | (
        (sv[:, None] == sv[None, :]) & (sk[:, None] == sk[None, :]) & (js[:, None] < js[None, :])
    )
    rank_s = tl.sum((ss_beat & s_ok[:, None]).to(tl.int32), axis=0)
    bs_beat = _beats(bv[:, None], bk[:, None], sv[None, :], sk[None, :])
    rank_s += tl.sum((bs_beat & b_ok[:, None]).to(tl.int32), axis=0)
    # rank of every candidate (state entries come first among exact duplicates)
    sb_beat = _beats(sv[:, None], sk[:, None], bv[None, :], bk[None, :]) | (
        (sv[:, None] == bv[None, :]) & (sk[:, None] == bk[None, :])
    )
    rank_b = tl.sum((sb_beat & s_ok[:, None]).to(tl.int32), axis=0)
    bb_beat = _beats(bv[:, None], bk[:, None], bv[None, :], bk[None, :]) | (
        (bv[:, None] == bv[None, :]) & (bk[:, None] == bk[None, :]) & (jb[:, None] < jb[None, :])
    )
    rank_b += tl.sum((bb_beat & b_ok[:, None]).to(tl.int32), axis=0)
    # slot r takes the entry of rank r
    r = tl.arange(0, KP)
    hit_s = (rank_s[None, :] == r[:, None]) & s_ok[None, :]
    hit_b = (rank_b[None, :] == r[:, None]) & b_ok[None, :]
    ninf = float("-inf")
    nv = tl.maximum(tl.max(tl.where(hit_s, sv[None, :], ninf), axis=1), tl.max(tl.where(hit_b, bv[None, :], ninf), axis=1))
    ni = tl.maximum(tl.max(tl.where(hit_s, si[None, :], -1), axis=1), tl.max(tl.where(hit_b, bi[None, :], -1), axis=1))
    npos = tl.maximum(tl.max(tl.where(hit_s, sp[None, :], -1), axis=1), tl.max(tl.where(hit_b, bp[None, :], -1), axis=1))
    return nv, ni, npos


@triton.jit
def _pool_topk_kernel(
    vals_ptr, ids_ptr, pos_ptr, nan_ptr, x_ptr, sid_ptr,
    B, S, K, sb, sc, ss,
    POOL: tl.constexpr, TRACK: tl.constexpr, KP: tl.constexpr, BB: tl.constexpr, BS: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    kk = tl.arange(0, KP)
    s_ok = kk < K
    sv = tl.load(vals_ptr + c * K + kk, mask=s_ok, other=float("-inf"))
    si = tl.load(ids_ptr + c * K + kk, mask=s_ok, other=-1)
    sp = tl.load(pos_ptr + c * K + kk, mask=s_ok, other=-1)
    nan_count = tl.zeros([BB], dtype=tl.int64)
    for b0 in range(0, B, BB):
        bb = (b0 + tl.arange(0, BB)).to(tl.int64)
        b_in = bb < B
        base = x_ptr + bb * sb + c * sc
        if POOL == 0 or POOL == 2:
            best = tl.full([BB], float("-inf"), tl.float32)
            best_pos = tl.zeros([BB], dtype=tl.int64)
            has_nan = tl.zeros([BB], dtype=tl.int1)
            for s0 in range(0, S, BS):
                so = (s0 + tl.arange(0, BS)).to(tl.int64)
                m2 = b_in[:, None] & (so < S)[None, :]
                xv = tl.load(base[:, None] + so[None, :] * ss, mask=m2, other=float("-inf")).to(tl.float32)
                if POOL == 2:
                    xv = tl.where(m2, tl.abs(xv), float("-inf"))
                isn = xv != xv
                has_nan = has_nan | (tl.max(isn.to(tl.int32), axis=1) > 0)
                xc = tl.where(isn, float("-inf"), xv)
                cmax = tl.max(xc, axis=1)
                cpos = tl.min(tl.where((xc == cmax[:, None]) & m2, so[None, :], S), axis=1)
                upd = cmax > best
                best_pos = tl.where(upd, cpos, best_pos)
                best = tl.where(upd, cmax, best)
            # the stored value is the element itself (keeps the sign of a zero maximum)
            val = tl.load(base + best_pos * ss, mask=b_in, other=0.0).to(tl.float32)
            if POOL == 2:
                val = tl.abs(val)
            val = tl.where(has_nan, float("nan"), val)
            if TRACK:
                cp = best_pos.to(tl.int32)
            else:
                cp = tl.full([BB], -1, tl.int32)
        else:
            acc = tl.zeros([BB], dtype=tl.float64)
            for s0 in range(0, S, BS):
                so = (s0 + tl.arange(0, BS)).to(tl.int64)
                m2 = b_in[:, None] & (so < S)[None, :]
                xv = tl.load(base[:, None] + so[None, :] * ss, mask=m2, other=0.0).to(tl.float64)
                acc += tl.sum(xv, axis=1)
            if POOL == 1:
                acc = acc / S
            val = acc.to(tl.float32)
            val = tl.where(val == 0.0, 0.0, val)
            cp = tl.full([BB], -1, tl.int32)
        isn = val != val
        nan_count += (isn & b_in).to(tl.int64)
        ok = b_in & (~isn)
        bid = tl.load(sid_ptr + bb, mask=b_in, other=-1)
        sv, si, sp = _merge(sv, si, sp, s_ok, val, bid, cp, ok, KP, BB)
    tl.store(vals_ptr + c * K + kk, sv, mask=s_ok)
    tl.store(ids_ptr + c * K + kk, si, mask=s_ok)
    tl.store(pos_ptr + c * K + kk, sp, mask=s_ok)
    tl.store(nan_ptr + c, tl.load(nan_ptr + c) + tl.sum(nan_count, axis=0))


@triton.jit
def _merge_kernel(va_ptr, ia_ptr, pa_ptr, vb_ptr, ib_ptr, pb_ptr, K, KP: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    kk = tl.arange(0, KP)
    ok = kk < K
    sv = tl.load(va_ptr + c * K + kk, mask=ok, other=float("-inf"))
    si = tl.load(ia_ptr + c * K + kk, mask=ok, other=-1)
    sp = tl.load(pa_ptr + c * K + kk, mask=ok, other=-1)
    bv = tl.load(vb_ptr + c * K + kk, mask=ok, other=float("-inf"))
    bi = tl.load(ib_ptr + c * K + kk, mask=ok, other=-1)
    bp = tl.load(pb_ptr + c * K + kk, mask=ok, other=-1)
    sv, si, sp = _merge(sv, si, sp, ok, bv, bi, bp, ok, KP, KP)
    tl.store(va_ptr + c * K + kk, sv, mask=ok)
    tl.store(ia_ptr + c * K + kk, si, mask=ok)
    tl.store(pa_ptr + c * K + kk, sp, mask=ok)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def pool_topk_update(state: TopKState, x: torch.Tensor, sample_ids: torch.Tensor, pool: str, track_positions: bool) -> None:
    """``x`` is a ``[B, C, S]`` view with arbitrary strides."""
    if state.k > MAX_K:
        reference.pool_topk_update(state, x, sample_ids, pool, track_positions)
        return
    B, C, S = x.shape
    if C == 0:
        return
    KP = _pow2(state.k)
    BB = 16 if KP <= 64 else 8
    BS = min(_pow2(S), 64)
    sb, sc, ss = x.stride()
    _pool_topk_kernel[(C,)](
        state.values, state.ids, state.positions, state.nan_counts, x, sample_ids,
        B, S, state.k, sb, sc, ss,
        POOL=_POOL[pool], TRACK=bool(track_positions), KP=KP, BB=BB, BS=BS,
    )


def merge_topk(out: TopKState, b: TopKState) -> None:
    if out.k > MAX_K:
        reference.merge_topk(out, b)
        return
    out.nan_counts.add_(b.nan_counts)
    if out.channels == 0:
        return
    _merge_kernel[(out.channels,)](out.values, out.ids, out.positions, b.values, b.ids, b.positions, out.k, KP=_pow2(out.k))
