"""Sorted top-k lists in Triton: the order, and merges in linear time per entry.

An entry is a float32 value, an int64 id and an int32 payload (a position). Lists are
kept best first in the library's total order: value descending, then id ascending.
Inside the kernels an empty slot's id -1 is *mapped* to ``ID_LAST`` so that it sorts
after every real entry (a real ``-inf`` value included); it is mapped back on store.

Merging is done by *ranks*, the merge step of a merge sort done for all entries at
once (as in GPU "merge path" merges): in the union of sorted lists, an entry's final
slot is its rank in its own list plus the number of entries of the other lists that
come before it. Only real entries are written, each straight to its final slot;
slots past the union's last entry were empty and stay so. Lists are processed in
chunks of ``KPC`` slots with run-time loop bounds: registers and code do not depend on
k, so one binary serves every k.

* :func:`insert_entry`: one candidate into each list of a block, in place: compared
  once with each list entry, the entries behind it move one slot down: ``O(k)`` per
  candidate. The stream kernels call it only for the samples of a chunk that beat
  some channel's k-th entry, which after warm-up is rare. The list is walked from its last chunk to its first, so an
  entry only ever moves into slots that were already read.
* :func:`merge_into`: ``Q`` sorted lists into an output: every entry's rank in each
  other list by binary search, ``O(Q k log k)`` per list.

Ties (only possible between exact duplicates, as ids are unique): the earlier list
first, candidates after list entries and in batch order, which is the reference's
stable-sort rule.
"""
from __future__ import annotations

import triton
import triton.language as tl

ID_LAST = tl.constexpr(9223372036854775807)  # int64 max: the mapped id of an empty slot


@triton.jit
def better(va, ia, vb, ib):
    """Entry a comes strictly before entry b: larger value, or equal value and lower id."""
    return (va > vb) | ((va == vb) & (ia < ib))


@triton.jit
def load_entries(v_ptr, i_ptr, p_ptr, off, ok):
    """Entries at ``off`` (masked slots are empty); ids mapped (-1 -> ID_LAST)."""
    v = tl.load(v_ptr + off, mask=ok, other=float("-inf"))
    i = tl.load(i_ptr + off, mask=ok, other=-1)
    p = tl.load(p_ptr + off, mask=ok, other=-1)
    return v, tl.where(i < 0, ID_LAST, i), p


@triton.jit
def store_entries(v_ptr, i_ptr, p_ptr, off, ok, v, i, p):
    """Store real entries (ids are real wherever ``ok`` holds)."""
    tl.store(v_ptr + off, v, mask=ok)
    tl.store(i_ptr + off, i, mask=ok)
    tl.store(p_ptr + off, p, mask=ok)


@triton.jit
def column(x, t):
    """Column ``t`` of ``x [M, N]`` (bits preserved)."""
    sel = tl.arange(0, x.shape[1]) == t
    if x.dtype == tl.float32:
        bits = tl.sum(tl.where(sel[None, :], x.to(tl.int32, bitcast=True), 0), axis=1)
        return bits.to(tl.float32, bitcast=True)
    else:
        return tl.sum(tl.where(sel[None, :], x, 0), axis=1).to(x.dtype)


@triton.jit
def insert_entry(v_ptr, i_ptr, p_ptr, base, c_ok, K, cv, ci, cp, KPC: tl.constexpr):
    """Insert one candidate per list, ``c* [M]`` (none: ID_LAST), into the sorted lists
    whose slot 0 is at ``base [M]``, in place (``K`` slots each)."""
    cand = (ci != ID_LAST) & c_ok
    n_before = tl.zeros(cv.shape, dtype=tl.int32)  # list entries before the candidate
    n_chunks = (K + KPC - 1) // KPC
    for jj in range(0, n_chunks):
        j0 = (n_chunks - 1 - jj) * KPC  # last chunk first: entries move only into read slots
        kk = j0 + tl.arange(0, KPC)
        ok = c_ok[:, None] & (kk < K)[None, :]
        sv, si, sp = load_entries(v_ptr, i_ptr, p_ptr, base[:, None] + kk[None, :], ok)
        real = si != ID_LAST
        ahead = better(cv[:, None], ci[:, None], sv, si) & cand[:, None]  # ties: the list first
        n_before += tl.sum((real & ~ahead).to(tl.int32), axis=1)
        tl.debug_barrier()  # the chunk is read by every thread before any of it is rewritten
        move = ok & real & ahead & (kk < K - 1)[None, :]
        store_entries(v_ptr, i_ptr, p_ptr, base[:, None] + kk[None, :] + 1, move, sv, si, sp)
    tl.debug_barrier()
    store_entries(v_ptr, i_ptr, p_ptr, base + n_before, cand & (n_before < K), cv, ci, cp)


@triton.jit
def _rank(v, i, lv_ptr, li_ptr, base, K, steps, or_equal):
    """How many entries of the sorted lists at ``base [M]`` (``K`` slots) come before each
    entry ``(v, i) [M, N]`` (``or_equal``: equal entries too): a binary search of
    ``steps = bit_length(K)`` steps."""
    lo = tl.zeros(v.shape, dtype=tl.int32)
    hi = tl.zeros(v.shape, dtype=tl.int32) + K
    for _ in range(0, steps):
        active = lo < hi
        mid = (lo + hi) // 2
        mv = tl.load(lv_ptr + base[:, None] + mid, mask=active, other=float("-inf"))
        mi = tl.load(li_ptr + base[:, None] + mid, mask=active, other=-1)
        mi = tl.where(mi < 0, ID_LAST, mi)
        before = better(mv, mi, v, i) | ((mv == v) & (mi == i) & or_equal)
        lo = tl.where(active & before, mid + 1, lo)
        hi = tl.where(active & (~before), mid, hi)
    return lo


@triton.jit
def merge_into(lv_ptr, li_ptr, lp_ptr, ov_ptr, oi_ptr, op_ptr, c, c_ok, K, steps, Q, QSTRIDE,
               KPC: tl.constexpr):
    """Write the best K of the ``Q`` sorted lists ``l[q] [C, K]`` (at ``q * QSTRIDE``) of
    channels ``c [M]`` into ``o [C, K]``. ``o`` must not be one of the lists; its slots
    past the union's last entry are left as they are (callers pass an ``o`` whose extra
    slots are empty)."""
    for q in range(0, Q):
        for j0 in range(0, K, KPC):
            kk = j0 + tl.arange(0, KPC)
            ok = c_ok[:, None] & (kk < K)[None, :]
            v, i, p = load_entries(lv_ptr, li_ptr, lp_ptr, q * QSTRIDE + c[:, None] * K + kk[None, :], ok)
            slot = tl.zeros(v.shape, dtype=tl.int32) + kk[None, :]
            for r in range(0, Q):
                if r != q:
                    slot += _rank(v, i, lv_ptr, li_ptr, r * QSTRIDE + c * K, K, steps, r < q)
            keep = ok & (i != ID_LAST) & (slot < K)
            store_entries(ov_ptr, oi_ptr, op_ptr, c[:, None] * K + slot, keep, v, i, p)
