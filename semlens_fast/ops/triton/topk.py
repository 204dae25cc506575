"""Triton (CUDA) backend of the top-k ops.

Design (docs/ARCHITECTURE.md, "The GPU top-k"):

* ``_stream_kernel``: grid ``(channel blocks, batch splits)``. A program owns ``MC``
  consecutive channels and a range of samples. It loads ``[MC, BB, BS]`` tiles of
  (channel, sample, position) with the unit-stride axis fastest across threads, so the
  reads of ``[B, C]``, ``[B, T, C]``, channels_last (channel stride 1) and NCHW
  (position stride 1) activations are coalesced, and pools over S (max / absmax with
  the first position of the maximum, or a float64 sum). Each pooled value is compared
  with its channel's current k-th entry (the threshold): only a sample that beats it
  is a candidate, and after warm-up a chunk rarely has one, so the cost approaches one
  read of the activations. Candidates are inserted by rank (:mod:`._lists`): ``O(k)``
  per candidate, no rank matrix, no sorting network.
* With several batch splits (too few channel blocks to fill the GPU), every split
  collects its candidates -- which must beat the state's k-th entry *and* the
  split's own list -- in a partial list, and ``_merge_kernel`` merges the state and
  the partial lists (binary searches); ``merge_topk`` is the same kernel on two lists.

Registers and code do not depend on k (lists are walked in chunks with run-time
bounds) nor on the storage dtype, pooling or flags (run-time arguments: the
activations are passed as bytes), so there are five binaries in all, listed by
:func:`compile_cases` and compiled ahead of time for sm_80 / sm_90 by the tests.

Order: value descending, then sample id ascending, empty slots (id -1, value -inf)
last; NaN never enters (counted). Identical to the reference, bit for bit.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..topk import TopKState
from .. import reference
from . import _launch
from ._lists import ID_LAST, better, column, insert_entry, merge_into

# Larger k run on the torch reference (on the device): warm-up inserts k entries one
# at a time into lists of up to k, O(k^2 / 16) chunk steps per channel block.
MAX_K = 1024
# the int arguments are never specialised (no value-1 constants, no divisibility
# variants) and the pointers not on alignment: exactly one binary per configuration
_INT_ARGS = ["B", "C", "S", "K", "per", "sb", "sx", "LSTRIDE", "DT", "POOL", "ABS", "MEAN", "TRACK", "PLUSZERO"]
_PTR_ARGS = ["lv_ptr", "li_ptr", "lp_ptr", "gv_ptr", "gi_ptr", "nan_ptr", "x_ptr", "sid_ptr"]


@triton.jit
def _load_tile(x_ptr, off, m, DT):
    """Load the activations at element offsets ``off`` as float32 (DT: 0 fp32, 1 fp16, 2 bf16).

    ``x_ptr`` is a byte pointer: one binary serves the three storage dtypes.
    """
    if DT == 0:
        xt = tl.load(x_ptr.to(tl.pointer_type(tl.float32), bitcast=True) + off, mask=m, other=0.0)
    elif DT == 1:
        xt = tl.load(x_ptr.to(tl.pointer_type(tl.float16), bitcast=True) + off, mask=m, other=0.0).to(tl.float32)
    else:
        xt = tl.load(x_ptr.to(tl.pointer_type(tl.bfloat16), bitcast=True) + off, mask=m, other=0.0).to(tl.float32)
    return xt


@triton.jit
def _pool_tile(x_ptr, bb, b_ok, c, c_ok, s0, S, sb, sx, best, best_pos, has_nan, acc,
               DT, POOL, ABS, CMINOR: tl.constexpr, BS: tl.constexpr):
    """Fold positions ``[s0, s0 + BS)`` of (channels c [MC], samples bb [BB]) into the pools."""
    so = s0 + tl.arange(0, BS)
    s_ok = so < S
    m = c_ok[:, None, None] & b_ok[None, :, None] & s_ok[None, None, :]
    if CMINOR:  # channel stride 1: tile [BB, BS, MC], channels fastest
        off_c = bb[:, None, None] * sb + so[None, :, None].to(tl.int64) * sx + c[None, None, :]
        m_c = b_ok[:, None, None] & s_ok[None, :, None] & c_ok[None, None, :]
        xt = tl.permute(_load_tile(x_ptr, off_c, m_c, DT), (2, 0, 1))
    else:  # position stride 1: tile [MC, BB, BS], positions fastest
        off_s = bb[None, :, None] * sb + c[:, None, None] * sx + so[None, None, :]
        xt = _load_tile(x_ptr, off_s, m, DT)
    if POOL == 0:
        if ABS != 0:
            xt = tl.abs(xt)
        isn = xt != xt
        has_nan = has_nan | (tl.max(isn.to(tl.int32), axis=2) > 0)
        xc = tl.where(isn | (~m), float("-inf"), xt)
        cmax = tl.max(xc, axis=2)
        cpos = tl.min(tl.where((xc == cmax[:, :, None]) & m, so[None, None, :], 2147483647), axis=2)
        upd = cmax > best
        best_pos = tl.where(upd, cpos, best_pos)
        best = tl.where(upd, cmax, best)
    else:
        acc += tl.sum(tl.where(m, xt, 0.0).to(tl.float64), axis=2)
    return best, best_pos, has_nan, acc


@triton.jit
def _threshold(lv_ptr, li_ptr, kth, c_ok, gv, gi):
    """Each list's k-th entry, or the state's (gv, gi) while the list is not full."""
    tv = tl.load(lv_ptr + kth, mask=c_ok, other=float("-inf"))
    ti = tl.load(li_ptr + kth, mask=c_ok, other=-1)
    full = ti >= 0
    return tl.where(full, tv, gv), tl.where(full, ti, gi)


@triton.jit(do_not_specialize=_INT_ARGS, do_not_specialize_on_alignment=_PTR_ARGS)
def _stream_kernel(
    lv_ptr, li_ptr, lp_ptr, gv_ptr, gi_ptr, nan_ptr, x_ptr, sid_ptr,
    B, C, S, K, per, sb, sx, LSTRIDE, DT, POOL, ABS, MEAN, TRACK, PLUSZERO,
    CMINOR: tl.constexpr, KPC: tl.constexpr, MC: tl.constexpr, BB: tl.constexpr, BS: tl.constexpr,
):
    """Pool + threshold + merge of samples ``[split * per, (split + 1) * per)`` into the lists.

    ``x`` (a byte pointer, storage dtype DT) is ``[B, C, S]`` with channel stride 1
    (CMINOR; ``sx`` = position stride) or position stride 1 (``sx`` = channel stride).
    POOL: 0 max-like (ABS: absmax), 1 sum-like (MEAN: mean). Lists ``l*`` are ``[C, K]``
    at ``split * LSTRIDE`` (the state itself when LSTRIDE = 0); ``g*`` is the state, whose
    k-th entry is every split's first threshold. DT, POOL and the flags are run-time
    values (uniform branches).
    """
    cb = tl.program_id(0)
    split = tl.program_id(1)
    c = cb.to(tl.int64) * MC + tl.arange(0, MC)
    c_ok = c < C
    b_start = split.to(tl.int64) * per
    b_end = tl.minimum(b_start + per, B)
    lbase = split.to(tl.int64) * LSTRIDE
    kth = c * K + (K - 1)
    gv = tl.load(gv_ptr + kth, mask=c_ok, other=float("-inf"))
    gi = tl.load(gi_ptr + kth, mask=c_ok, other=-1)
    gi = tl.where(gi < 0, ID_LAST, gi)
    nan_acc = tl.zeros([MC], dtype=tl.int64)
    for b0 in range(b_start, b_end, BB):
        bb = b0 + tl.arange(0, BB).to(tl.int64)
        b_ok = bb < b_end
        ok = c_ok[:, None] & b_ok[None, :]
        if BS == 1:  # one position: the value is the element (a sum of one: +0.0 for -0.0)
            if CMINOR:
                val = _load_tile(x_ptr, bb[None, :] * sb + c[:, None], ok, DT)
            else:
                val = _load_tile(x_ptr, bb[None, :] * sb + c[:, None] * sx, ok, DT)
            if ABS != 0:
                val = tl.abs(val)
            if PLUSZERO != 0:
                val = tl.where(val == 0.0, 0.0, val)
            pos = tl.zeros([MC, BB], dtype=tl.int32) - (TRACK == 0).to(tl.int32)
        else:
            best = tl.full([MC, BB], float("-inf"), tl.float32)
            best_pos = tl.zeros([MC, BB], dtype=tl.int32)
            has_nan = tl.zeros([MC, BB], dtype=tl.int1)
            acc = tl.zeros([MC, BB], dtype=tl.float64)
            for s0 in range(0, S, BS):
                best, best_pos, has_nan, acc = _pool_tile(
                    x_ptr, bb, b_ok, c, c_ok, s0, S, sb, sx, best, best_pos, has_nan, acc, DT, POOL, ABS, CMINOR, BS)
            if POOL == 0:
                # the stored value is the element itself (keeps the sign of a zero maximum)
                if CMINOR:
                    off = bb[None, :] * sb + best_pos.to(tl.int64) * sx + c[:, None]
                else:
                    off = bb[None, :] * sb + c[:, None] * sx + best_pos
                val = _load_tile(x_ptr, off, ok, DT)
                if ABS != 0:
                    val = tl.abs(val)
                val = tl.where(has_nan, float("nan"), val)
                if TRACK != 0:
                    pos = best_pos
                else:
                    pos = tl.full([MC, BB], -1, tl.int32)
            else:
                if MEAN != 0:
                    acc = acc / S
                val = acc.to(tl.float32)
                val = tl.where(val == 0.0, 0.0, val)  # -0.0 -> +0.0
                pos = tl.full([MC, BB], -1, tl.int32)
        isn = val != val
        nan_acc += tl.sum((isn & ok).to(tl.int64), axis=1)
        ok = ok & (~isn)
        sid = tl.load(sid_ptr + bb, mask=b_ok, other=0)
        tv, ti = _threshold(lv_ptr, li_ptr, lbase + kth, c_ok, gv, gi)
        beat = ok & better(val, sid[None, :], tv[:, None], ti[:, None])
        if tl.max(tl.max(beat.to(tl.int32), axis=1), axis=0) > 0:  # rare after warm-up
            # the chunk's samples, one by one: each enters the lists it beats the k-th entry of
            for t in range(0, tl.minimum(BB, b_end - b0)):
                b = b0 + t
                if BS == 1:  # reload the sample rather than keep the [MC, BB] tile alive
                    if CMINOR:
                        vt = _load_tile(x_ptr, b * sb + c, c_ok, DT)
                    else:
                        vt = _load_tile(x_ptr, b * sb + c * sx, c_ok, DT)
                    if ABS != 0:
                        vt = tl.abs(vt)
                    if PLUSZERO != 0:
                        vt = tl.where(vt == 0.0, 0.0, vt)
                    pt = tl.zeros([MC], dtype=tl.int32) - (TRACK == 0).to(tl.int32)
                else:
                    vt = column(val, t)
                    pt = column(pos, t)
                st = tl.load(sid_ptr + b)
                tv, ti = _threshold(lv_ptr, li_ptr, lbase + kth, c_ok, gv, gi)
                enter = c_ok & (vt == vt) & better(vt, st, tv, ti)
                if tl.max(enter.to(tl.int32), axis=0) > 0:
                    insert_entry(lv_ptr, li_ptr, lp_ptr, lbase + c * K, c_ok, K,
                                 vt, tl.where(enter, st, ID_LAST), pt, KPC)
                    tl.debug_barrier()  # read back by other threads (next threshold, insertion)
    tl.atomic_add(nan_ptr + c, nan_acc, mask=c_ok)


@triton.jit(do_not_specialize=["C", "K", "steps", "Q", "QSTRIDE"],
            do_not_specialize_on_alignment=["lv_ptr", "li_ptr", "lp_ptr", "ov_ptr", "oi_ptr", "op_ptr"])
def _merge_kernel(lv_ptr, li_ptr, lp_ptr, ov_ptr, oi_ptr, op_ptr, C, K, steps, Q, QSTRIDE,
                  KPC: tl.constexpr, MC: tl.constexpr):
    """The best K of ``Q`` sorted lists ``l[q] [C, K]`` (at ``q * QSTRIDE``) into ``o [C, K]``."""
    c = tl.program_id(0).to(tl.int64) * MC + tl.arange(0, MC)
    merge_into(lv_ptr, li_ptr, lp_ptr, ov_ptr, oi_ptr, op_ptr, c, c < C, K, steps, Q, QSTRIDE, KPC)


# --------------------------------------------------------------------------- dispatch

def stream_config(cminor: bool, single: bool, interpret: bool | None = None) -> dict:
    """Constexprs and warps of ``_stream_kernel``: the only place they are chosen.

    ``cminor``: channel stride 1 (else position stride 1); ``single``: one position per
    (sample, channel) (S == 1: ``[B, C]`` inputs). Under the interpreter (tests) the
    chunks are longer, which only changes how often the same code runs.
    """
    MC = 32  # channels per program: 64 / 128 contiguous bytes of fp16 / fp32 per sample
    if single:
        BB, BS = 32, 1  # load tile [MC, 32] (1024 elements)
    else:
        BB, BS = 1, 32  # load tile [MC, 1, 32]
    if _interpreting() if interpret is None else interpret:
        MC, BB = 16, (32 if single else 4)
    return dict(CMINOR=bool(cminor), KPC=16, MC=MC, BB=BB, BS=BS, num_warps=4)


def merge_config() -> dict:
    return dict(KPC=16, MC=16, num_warps=4)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


# a split (a program's range of samples) holds at least this many chunks of BB samples;
# at most MAX_SPLITS splits (their lists are merged with O(splits^2) binary searches)
MIN_CHUNKS_PER_SPLIT = 4
MAX_SPLITS = 16
_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter


def _kernel_view(x: torch.Tensor):
    """(x, cminor, sb, sx): a unit channel stride (cminor) or position stride; copies only if neither."""
    B, C, S = x.shape
    sb, sc, ss = x.stride()
    if sc == 1 or C == 1:
        return x, True, sb, (ss if S > 1 else 0)
    if ss == 1 or S == 1:
        return x, False, sb, sc
    x = x.contiguous()
    return x, False, x.stride(0), x.stride(1)


def _bytes(x: torch.Tensor) -> torch.Tensor:
    """A uint8 tensor over ``x``'s storage from ``x``'s first element (what the kernels address)."""
    start = x.storage_offset() * x.element_size()
    storage = x.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=x.device).set_(storage, start, (storage.nbytes() - start,), (1,))


def pool_topk_update(state: TopKState, x: torch.Tensor, sample_ids: torch.Tensor, pool: str, track_positions: bool) -> None:
    """``x`` is a validated ``[B, C, S]`` view; ``sample_ids`` int64 ``[B]``, all >= 0."""
    if state.k > MAX_K:
        reference.pool_topk_update(state, x, sample_ids, pool, track_positions)
        return
    B, C, S = x.shape
    if C == 0 or B == 0:
        return
    x, cminor, sb, sx = _kernel_view(x)
    K = state.k
    cfg = stream_config(cminor, S == 1)
    n_blocks = triton.cdiv(C, cfg["MC"])
    # batch splits: enough programs to fill the GPU, each split at least a few chunks long
    want = max(1, (4 * _sm_count(x.device)) // n_blocks)
    splits = max(1, min(want, MAX_SPLITS, B // (MIN_CHUNKS_PER_SPLIT * cfg["BB"])))
    per = triton.cdiv(B, splits)
    splits = triton.cdiv(B, per)
    flags = dict(DT=_DT[x.dtype], POOL=0 if (S == 1 or pool in ("max", "absmax")) else 1,
                 ABS=int(pool == "absmax"), MEAN=int(pool == "mean"), TRACK=int(bool(track_positions)),
                 PLUSZERO=int(pool in ("sum", "mean")))
    v, i, p, n = state.values, state.ids, state.positions, state.nan_counts
    xb = _bytes(x)

    def fallback():
        reference.pool_topk_update(state, x, sample_ids, pool, track_positions)

    def launch():
        if splits == 1:  # in place: the state is the only list (untouched if the launch fails)
            _stream_kernel[(n_blocks, 1)](v, i, p, v, i, n, xb, sample_ids, B, C, S, K, per, sb, sx, 0,
                                          **flags, **cfg)
            return
        # lists[0] = the state, lists[1 + s] = split s's candidates; merged back into the state
        lv = torch.full((splits + 1, C, K), float("-inf"), dtype=torch.float32, device=x.device)
        li = torch.full((splits + 1, C, K), -1, dtype=torch.int64, device=x.device)
        lp = torch.full((splits + 1, C, K), -1, dtype=torch.int32, device=x.device)
        nan = torch.zeros_like(n)
        _stream_kernel[(n_blocks, splits)](lv[1:], li[1:], lp[1:], v, i, nan, xb, sample_ids, B, C, S, K, per,
                                           sb, sx, C * K, **flags, **cfg)
        lv[0].copy_(v)
        li[0].copy_(i)
        lp[0].copy_(p)
        _merge(lv, li, lp, state)
        n.add_(nan)

    _launch.run_fn("topk._stream_kernel", ("stream", cminor, S == 1, splits > 1), fallback, launch)


def _merge(lv: torch.Tensor, li: torch.Tensor, lp: torch.Tensor, out: TopKState) -> None:
    """The best k of the sorted lists ``l* [Q, C, k]`` into ``out`` (not one of them).

    ``out``'s slots past the union's last entry must be empty or hold entries of the
    union's lists (true when ``l*[0]`` is a copy of ``out``)."""
    Q, C, K = lv.shape
    cfg = merge_config()
    _merge_kernel[(triton.cdiv(C, cfg["MC"]),)](lv, li, lp, out.values, out.ids, out.positions, C, K,
                                                K.bit_length(), Q, C * K, **cfg)


def merge_topk(out: TopKState, b: TopKState) -> None:
    """Merge ``b`` into ``out`` in place."""
    if out.k > MAX_K:
        reference.merge_topk(out, b)
        return
    if out.channels == 0:
        out.nan_counts.add_(b.nan_counts)
        return

    def fallback():
        reference.merge_topk(out, b)

    def launch():
        lv = torch.stack([out.values, b.values])
        li = torch.stack([out.ids, b.ids])
        lp = torch.stack([out.positions, b.positions])
        _merge(lv, li, lp, out)
        out.nan_counts.add_(b.nan_counts)

    _launch.run_fn("topk._merge_kernel", "merge", fallback, launch)


# --------------------------------------------------------------------------- AOT compile cases

def compile_cases():
    """Every configuration the dispatcher can choose: ``(label, kernel, args, kwargs)``.

    ``args`` are example arguments (CPU tensors stand in for device pointers: only
    their dtypes matter), bound exactly as a launch binds them. k, the storage dtype,
    the pooling and the flags are run-time arguments.
    """
    f32, i64, i32, u8 = torch.float32, torch.int64, torch.int32, torch.uint8

    def t(dt):
        return torch.empty(1, dtype=dt)

    # B C S K per sb sx LSTRIDE DT POOL ABS MEAN TRACK PLUSZERO
    ints = (256, 2048, 49, 100, 256, 2048 * 49, 2048, 0, 1, 0, 0, 0, 1, 0)
    for cminor in (True, False):
        for single in (True, False):
            args = (t(f32), t(i64), t(i32), t(f32), t(i64), t(i64), t(u8), t(i64), *ints)
            label = f"{'channel' if cminor else 'position'} stride 1{', S = 1' if single else ''}"
            yield label, _stream_kernel, args, stream_config(cminor, single, interpret=False)
    args = (t(f32), t(i64), t(i32), t(f32), t(i64), t(i32), 2048, 100, 7, 5, 2048 * 100)
    yield "merge", _merge_kernel, args, merge_config()

