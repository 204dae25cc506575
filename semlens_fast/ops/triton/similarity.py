"""Triton (CUDA) backend of the similarity ops.

Same pipeline as the C++ backend (see :func:`semlens_fast.ops.similarity.certified_topk`):

* ``_candidates_kernel``: grid (query blocks, database splits). Each program walks its
  split in tiles of ``BN`` rows: ``tl.dot`` of the ``[BQ, BD]`` unit queries with the
  ``[BD, BN]`` rows (float32, IEEE precision -- no TF32, the error bound needs float32
  products), the rows' inverse norms from the same loads, and a fused top-``KP``
  selection per query on *packed keys*: an int64 whose high 32 bits order the float32
  score and whose low 32 bits hold ``2**32 - 1 - id``, so one integer max picks the best
  score and, among ties, the lower id. The splits' lists are merged with one sort.
* ``_rescore_kernel``: one program per query; float64 sequential sums over the ``d``
  components for a block of candidates at a time (the exact definition of a score).

Tested on the CPU under ``TRITON_INTERPRET=1`` with tiny shapes (fp32/fp16/bf16
storage; everything is converted to float32 before ``tl.dot``). Ids must fit in 32
bits (N < 2**32 - 1); larger databases fall back to the torch reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ..similarity import certified_topk, raise_nonfinite

MAX_ROWS = 2**32 - 2
_KEY_MIN = -(2**63)


@triton.jit
def _candidates_kernel(
    q_ptr, x_ptr, ex_ptr, keys_ptr, bad_ptr,
    Q, N, D, XS, M, TILES_PER_SPLIT,
    BQ: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, KP: tl.constexpr,
):
    pid_q = tl.program_id(0)
    split = tl.program_id(1)
    qo = (pid_q * BQ + tl.arange(0, BQ)).to(tl.int64)
    q_ok = qo < Q
    kcol = tl.arange(0, KP)
    state = tl.full([BQ, KP], _KEY_MIN, tl.int64)
    t0 = split * TILES_PER_SPLIT
    for t in range(t0, t0 + TILES_PER_SPLIT):
        no = (t * BN + tl.arange(0, BN)).to(tl.int64)
        n_ok = no < N
        acc = tl.zeros([BQ, BN], dtype=tl.float32)
        nx2 = tl.zeros([BN], dtype=tl.float32)
        for d0 in range(0, D, BD):
            do = d0 + tl.arange(0, BD)
            d_ok = do < D
            qv = tl.load(q_ptr + qo[:, None] * D + do[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
            xv = tl.load(x_ptr + no[None, :] * XS + do[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0).to(tl.float32)
            acc += tl.dot(qv, xv, input_precision="ieee")
            nx2 += tl.sum(xv * xv, axis=0)
        finite = (nx2 == nx2) & (nx2 < float("inf"))
        tl.store(bad_ptr + no, (~finite).to(tl.int8), mask=n_ok & (~finite))
        inv = tl.where(nx2 > 0, 1.0 / tl.sqrt_rn(tl.where(nx2 > 0, nx2, 1.0)), 0.0)
        s = acc * inv[None, :]
        ok = q_ok[:, None] & n_ok[None, :] & finite[None, :]
        for j in range(0, M):
            exj = tl.load(ex_ptr + qo * M + j, mask=q_ok, other=-1)
            ok = ok & (no[None, :] != exj[:, None])
        bits = s.to(tl.int32, bitcast=True)
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
        key = (ordered << 32) | (4294967295 - no[None, :])
        key = tl.where(ok, key, _KEY_MIN)
        # merge: the KP best of (state, tile) by repeated max (keys are unique)
        new = tl.full([BQ, KP], _KEY_MIN, tl.int64)
        for r in range(0, KP):
            m = tl.maximum(tl.max(state, axis=1), tl.max(key, axis=1))
            new = tl.where(kcol[None, :] == r, m[:, None], new)
            state = tl.where(state == m[:, None], _KEY_MIN, state)
            key = tl.where(key == m[:, None], _KEY_MIN, key)
        state = new
    nsplit = tl.num_programs(1)
    out = keys_ptr + (qo[:, None] * nsplit + split) * KP + kcol[None, :]
    tl.store(out, state, mask=q_ok[:, None])


@triton.jit
def _rescore_kernel(q_ptr, x_ptr, cand_ptr, out_ptr, D, XS, C, BC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    nq2 = tl.zeros([1], dtype=tl.float64)
    for i in range(0, D):
        qi = tl.load(q_ptr + row * D + i + tl.zeros([1], dtype=tl.int64)).to(tl.float64)
        nq2 += qi * qi
    nq = tl.sqrt(nq2)  # float64 sqrt is correctly rounded
    for c0 in range(0, C, BC):
        co = c0 + tl.arange(0, BC)
        c_ok = co < C
        ids = tl.load(cand_ptr + row * C + co, mask=c_ok, other=-1)
        ok = c_ok & (ids >= 0)
        dot = tl.zeros([BC], dtype=tl.float64)
        nx2 = tl.zeros([BC], dtype=tl.float64)
        for i in range(0, D):
            qi = tl.load(q_ptr + row * D + i + tl.zeros([BC], dtype=tl.int64)).to(tl.float64)
            xi = tl.load(x_ptr + ids * XS + i, mask=ok, other=0.0).to(tl.float32).to(tl.float64)
            dot += qi * xi
            nx2 += xi * xi
        nx = tl.sqrt(nx2)
        den = nq * nx
        s = tl.where(den == 0, 0.0, dot / tl.where(den == 0, 1.0, den)).to(tl.float32) + 0.0
        s = tl.where(ok, s, float("-inf"))
        tl.store(out_ptr + row * C + co, s, mask=c_ok)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _unit_queries(q32: torch.Tensor) -> torch.Tensor:
    q64 = q32.double()
    n = q64.norm(dim=1, keepdim=True)
    return torch.where(n > 0, q64 / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(q64)).float().contiguous()


def candidates(qhat: torch.Tensor, db: torch.Tensor, K: int, exclude: torch.Tensor | None):
    Q, D = qhat.shape
    N = db.shape[0]
    BQ, BN, BD = 16, 32, 32
    KP = max(16, _pow2(K))
    n_tiles = triton.cdiv(N, BN)
    splits = max(1, min(n_tiles, 64 if Q <= 64 else 16))
    per = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, per)
    keys = torch.empty((Q, splits, KP), dtype=torch.int64, device=db.device)
    bad = torch.zeros(N, dtype=torch.int8, device=db.device)
    ex = exclude if exclude is not None else torch.empty((Q, 0), dtype=torch.int64, device=db.device)
    xs = db.stride(0) if N > 1 else D
    grid = (triton.cdiv(Q, BQ), splits)
    _candidates_kernel[grid](qhat, db, ex, keys, bad, Q, N, D, xs, ex.shape[1], per, BQ=BQ, BN=BN, BD=BD, KP=KP)
    if bool(bad.any()):
        raise_nonfinite(db, "db")
    keys = keys.reshape(Q, splits * KP)
    keys = torch.sort(keys, dim=1, descending=True).values[:, :K]
    empty = keys == _KEY_MIN
    ids = 4294967295 - (keys & 0xFFFFFFFF)
    ordered = (keys >> 32).to(torch.int32)
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    vals = bits.view(torch.float32)
    ids = torch.where(empty, torch.full_like(ids, -1), ids)
    vals = torch.where(empty, torch.full_like(vals, float("-inf")), vals)
    return vals, ids


def rescore(q32: torch.Tensor, db: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    Q, C = cand.shape
    out = torch.empty((Q, C), dtype=torch.float32, device=db.device)
    if Q == 0 or C == 0:
        return out
    xs = db.stride(0) if db.shape[0] > 1 else db.shape[1]
    _rescore_kernel[(Q,)](q32, db, cand.contiguous(), out, q32.shape[1], xs, C, BC=min(64, max(16, _pow2(C))))
    return out


def cosine_topk(queries: torch.Tensor, db: torch.Tensor, k: int, exclude: torch.Tensor | None):
    if db.shape[0] > MAX_ROWS:
        return reference.similarity.cosine_topk(queries, db, k, exclude)
    if db.stride(1) != 1:
        db = db.contiguous()
    return certified_topk(queries, db, k, exclude, candidates, rescore, _unit_queries)
