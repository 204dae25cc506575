"""Triton (CUDA) backend of the similarity ops.

Same pipeline as the C++ backend (:func:`semlens_fast.ops.similarity.certified_topk`):
an approximate candidate pass, exact float64 rescoring of the candidates, and the
certification that makes the result exactly the reference's.

* ``_candidates_kernel``: grid ``(query blocks, row splits)``, sized from Q, N and the
  GPU's SM count. Each program walks its rows in tiles of ``BN``: ``tl.dot`` of the
  ``[BQ, BD]`` unit queries with the ``[BD, BN]`` rows **on tensor cores** (float32
  storage: TF32; float16: fp16 inputs; bfloat16: bf16 inputs; float32 accumulation),
  the rows' inverse norms from the same loads (float32), and per query an *unsorted*
  list of its best ``KP`` candidates as packed int64 keys (orderable float bits << 32 |
  (2^32 - 1 - id): one integer comparison orders by score, then lower id). The tile's
  float scores are compared with each query's current worst entry (the threshold); only
  where one beats it do the lists change: each such query moves its best entering row
  into the slot of its worst entry, one row per query per round, until no row beats a
  threshold -- after warm-up, zero rounds for almost every tile. The lists of the
  splits are combined by one ``torch.topk``.
* ``_rescore_kernel``: one program per query: float64 sums over the ``d`` components
  taken sequentially, for a block of candidates at a time (the definition of a score).

Every approximate score is within :func:`tensor_core_error_bound` of the exact one
(the rounding of the inputs to the dot's precision, the accumulation, the float32
norms), which the certification uses; so results stay bit-identical to the reference
whatever the dot precision. ``@triton.autotune`` picks the tile shape among a few per
list length (:func:`tile_configs`); :func:`compile_cases` lists every configuration
for the ahead-of-time compile test.

Ids must fit in 32 bits (N < 2**32 - 1); larger databases use the torch reference.
Under ``TRITON_INTERPRET=1`` (tests) bfloat16 rows use the TF32 path (the
interpreter's bf16 ``tl.dot`` is wrong) and the first tile shape (no autotuning).
"""
from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

from .. import reference
from ..similarity import certified_topk, raise_nonfinite, tensor_core_error_bound
from . import _launch

MAX_ROWS = 2**32 - 2
# rows outside the float32-safe range: a non-zero row whose float32 squared norm is below
# 2**-60 (it underflows: a row of 1e-30s has a float32 norm of 0) or overflows (values
# beyond ~1.8e19) is outside the error bound's model; the kernel flags such rows and the
# search reruns the candidate pass on a copy in which they are scaled by a power of two
# (see rescale_rows; the exact rescoring still reads the original rows)
TINY_NORM2 = 2.0**-60
KPS = (32, 64, 128, 256)  # candidate list lengths compiled (K' rounded up)
MAX_CANDIDATES = KPS[-1]  # beyond this, a query is resolved by an exact scan (rescoring)
SCAN_CHUNK = 1 << 14
KEY_MIN = tl.constexpr(-(2**63))
_DOT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # tf32 / fp16 / bf16 tensor-core inputs
# sizes that only bound loops are never specialised; D, XS and the data pointers are
# always divisible by 16 (see _aligned), so each configuration has one binary
_INT_ARGS = ["Q", "N", "M", "RPS", "QB"]
_PTR_ARGS = ["ex_ptr", "keys_ptr", "bad_ptr"]


def tile_configs(KP: int, dot: int) -> list[triton.Config]:
    """Tile shapes autotuned for list length KP and dot mode (0: TF32 on float32 tiles).

    The per-query lists [BQ, KP] (int64) live in registers, hence fewer queries per
    program for longer lists; float32 tiles take half the depth BD of 16-bit ones (and
    so does the 4-warp shape of the short lists: deeper, it spills on sm_90).
    """
    bd = 32 if dot == 0 else 64
    if KP <= 64:
        shapes = [(32, 64, 32, 4, 3), (64, 64, bd, 8, 3)]
    else:
        shapes = [(16, 64, bd, 4, 3), (32, 64, bd, 8, 3)]
    return [triton.Config(dict(BQ=bq, BN=bn, BD=bd), num_warps=w, num_stages=s) for bq, bn, bd, w, s in shapes]


@triton.jit
def _pack(score, row):
    """int64 keys ordered like (score descending, row ascending): orderable float bits << 32 | ~row."""
    bits = score.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    return (ordered << 32) | (4294967295 - row)


@triton.jit
def _decode(key):
    """(score, row, real) of keys (KEY_MIN: an empty slot, real = False)."""
    ordered = (key >> 32).to(tl.int32)
    score = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(tl.float32, bitcast=True)
    return score, 4294967295 - (key & 4294967295), key != KEY_MIN


@triton.jit
def _beats(s, row, ts, trow, full):
    """(s, row) enters a list whose worst entry is (ts, trow) (any entry enters a list not full)."""
    return (~full) | (s > ts) | ((s == ts) & (row < trow))


@triton.jit(do_not_specialize=_INT_ARGS, do_not_specialize_on_alignment=_PTR_ARGS)
def _candidates_kernel(
    q_ptr, x_ptr, ex_ptr, keys_ptr, bad_ptr,
    Q, N, D, XS, M, RPS, QB,
    DOT: tl.constexpr, KP: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    """Rows ``[split * RPS, (split + 1) * RPS)`` against queries ``[pid * BQ, (pid + 1) * BQ)``.

    ``QB`` (a bucket of Q) only keys the autotuner. Writes each query's KP best keys of
    the split (unsorted) to ``keys [Q, splits, KP]`` and flags non-finite rows in ``bad``.
    """
    pid_q = tl.program_id(0)
    split = tl.program_id(1)
    qo = (pid_q * BQ + tl.arange(0, BQ)).to(tl.int64)
    q_ok = qo < Q
    kcol = tl.arange(0, KP)
    state = tl.full([BQ, KP], KEY_MIN, tl.int64)
    thr = tl.full([BQ], KEY_MIN, tl.int64)  # each query's worst kept key
    r0 = split.to(tl.int64) * RPS
    r1 = tl.minimum(r0 + RPS, N)
    qb = tl.make_block_ptr(q_ptr, (Q, D), (D, 1), (pid_q * BQ, 0), (BQ, BD), (1, 0))
    for n0 in range(r0, r1, BN):
        no = n0 + tl.arange(0, BN).to(tl.int64)
        n_ok = no < r1
        xb = tl.make_block_ptr(x_ptr, (r1, D), (XS, 1), (n0, 0), (BN, BD), (1, 0))
        qd = qb
        acc = tl.zeros([BQ, BN], dtype=tl.float32)
        nx2 = tl.zeros([BN], dtype=tl.float32)
        amax = tl.zeros([BN], dtype=tl.float32)  # largest |x_i|: tells a zero row from an underflowed one
        for d0 in range(0, D, BD):
            qv = tl.load(qd, boundary_check=(0, 1), padding_option="zero")
            xv = tl.load(xb, boundary_check=(0, 1), padding_option="zero")  # [BN, BD]
            xf = xv.to(tl.float32)
            nx2 += tl.sum(xf * xf, axis=1)
            amax = tl.maximum(amax, tl.max(tl.abs(xf), axis=1))
            if DOT == 0:
                acc = tl.dot(qv, tl.trans(xf), acc, input_precision="tf32")
            else:  # queries already in the rows' 16-bit format
                acc = tl.dot(qv, tl.trans(xv), acc)
            qd = tl.advance(qd, (0, BD))
            xb = tl.advance(xb, (0, BD))
        finite = (nx2 == nx2) & (nx2 < float("inf"))
        # a non-zero row whose squared norm is below 2**-60 (or underflowed to 0): see TINY_NORM2
        tiny = finite & (amax > 0) & (nx2 < 8.673617379884035e-19)
        tl.store(bad_ptr + no, tl.where(finite, 2, 1).to(tl.int8), mask=n_ok & (tiny | ~finite))
        inv = tl.where(nx2 > 0, 1.0 / tl.sqrt_rn(tl.where(nx2 > 0, nx2, 1.0)), 0.0)
        s = acc * inv[None, :] + 0.0  # -0.0 -> +0.0, as the keys order +0.0 first
        ok = q_ok[:, None] & n_ok[None, :] & finite[None, :]
        for j in range(0, M):
            exj = tl.load(ex_ptr + qo * M + j, mask=q_ok, other=-1)
            ok = ok & (no[None, :] != exj[:, None])
        # the tile touches the lists only where a score beats its query's worst kept entry
        ts, tid, full = _decode(thr)
        more = ok & _beats(s, no[None, :], ts[:, None], tid[:, None], full[:, None])
        while tl.max(tl.max(more.to(tl.int32), axis=1), axis=0) > 0:
            # each query moves its best entering (score, row) into the slot of its worst entry
            ms = tl.max(tl.where(more, s, float("-inf")), axis=1)
            mid = tl.min(tl.where(more & (s == ms[:, None]), no[None, :], 4294967295), axis=1)
            has = mid != 4294967295
            slot = tl.min(tl.where(state == thr[:, None], kcol[None, :], KP), axis=1)
            state = tl.where((kcol[None, :] == slot[:, None]) & has[:, None], _pack(ms, mid)[:, None], state)
            thr = tl.min(state, axis=1)
            ts, tid, full = _decode(thr)
            more = more & (no[None, :] != mid[:, None]) & _beats(s, no[None, :], ts[:, None], tid[:, None], full[:, None])
    nsplit = tl.num_programs(1)
    out = keys_ptr + (qo[:, None] * nsplit + split) * KP + kcol[None, :]
    tl.store(out, state, mask=q_ok[:, None])


@triton.jit(do_not_specialize=["D", "XS", "C"], do_not_specialize_on_alignment=["q_ptr", "x_ptr", "cand_ptr", "out_ptr"])
def _rescore_kernel(q_ptr, x_ptr, cand_ptr, out_ptr, D, XS, C, BC: tl.constexpr):
    """Exact scores of query ``pid``'s candidates ``cand [C]`` (-1: none -> -inf)."""
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


_RESCORE_BC = 64
_tuned: dict[tuple[int, int], triton.runtime.Autotuner] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _kernel_for(KP: int, dot: int):
    """The autotuned candidates kernel of list length KP and dot mode (one autotuner each)."""
    kern = _tuned.get((KP, dot))
    if kern is None:
        kern = _tuned[KP, dot] = triton.autotune(configs=tile_configs(KP, dot), key=["D", "QB"])(_candidates_kernel)
    return kern


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter


def _unit_queries(q32: torch.Tensor) -> torch.Tensor:
    q64 = q32.double()
    n = q64.norm(dim=1, keepdim=True)
    return torch.where(n > 0, q64 / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(q64)).float().contiguous()


def dot_mode(dtype: torch.dtype) -> int:
    """0: TF32 (float32 rows), 1: fp16, 2: bf16 -- the tensor-core input format for ``dtype`` rows."""
    if dtype == torch.bfloat16 and _interpreting():
        return 0  # the interpreter's bf16 tl.dot is wrong; bf16 values are exact in TF32
    return _DOT[dtype]


def grid_splits(Q: int, N: int, sm_count: int, bq: int = 64) -> tuple[int, int]:
    """(splits, rows per split): about four programs per SM, each over >= 16 tiles of 128 rows."""
    q_blocks = triton.cdiv(Q, bq)
    want = triton.cdiv(4 * sm_count, q_blocks)
    splits = max(1, min(want, triton.cdiv(N, 16 * 128)))
    rps = triton.cdiv(triton.cdiv(N, splits), 128) * 128
    return triton.cdiv(N, rps), rps


class _UnsafeRows(Exception):
    """The database has finite rows outside the float32-safe range (see TINY_NORM2)."""

    def __init__(self, rows: torch.Tensor):
        super().__init__(f"{rows.numel()} row(s) outside the float32-safe range")
        self.rows = rows


def rescale_rows(db: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A copy of ``db`` (its dtype, contiguous) in which each of ``rows`` is multiplied by the
    power of two that puts its largest ``|x_i|`` in ``[1, 2)``.

    Cosines are scale-invariant and power-of-two scaling is exact for every component that
    stays a normal number, so the copy's squared norms lie in ``[1, 4 d)`` and the candidate
    pass's error bound holds; a component far below its row's largest (scaled below the
    smallest normal) moves by at most ``2**-126`` absolutely, nothing next to the bound's
    ``(d + 16) 2**-21`` relative to ``|x| >= 1``. Only the candidate pass reads the copy:
    rescoring reads ``db``."""
    out = db.contiguous().clone()
    if rows.numel():
        sub = db[rows].double()
        e = torch.frexp(sub.abs().amax(dim=1)).exponent  # amax = m 2^e, m in [0.5, 1)
        out[rows] = torch.ldexp(sub, (1 - e).unsqueeze(1).double()).to(db.dtype)
    return out


def query_rounding_error(qhat: torch.Tensor, dot: int) -> torch.Tensor:
    """``|q' - q_hat|`` per query (float64, exact): q' is q_hat in the dot's input format.

    Covers every conversion the hardware may do: round to nearest (fp16/bf16: Triton's
    conversion), TF32 by truncation or by rounding, and subnormals flushed to zero.
    """
    q = qhat.double()
    if dot == 1:
        alts, tiny = [qhat.to(torch.float16).double()], 2.0**-14
    elif dot == 2:
        alts, tiny = [qhat.to(torch.bfloat16).double()], 2.0**-126
    else:
        bits = qhat.contiguous().view(torch.int32)
        alts = [(bits & ~0x1FFF).view(torch.float32).double(), ((bits + 0x1000) & ~0x1FFF).view(torch.float32).double()]
        tiny = 2.0**-126
    alts += [torch.where(a.abs() < tiny, torch.zeros_like(a), a) for a in alts]
    return torch.stack([(a - q).norm(dim=1) for a in alts]).amax(dim=0)


def _aligned(qhat: torch.Tensor, db: torch.Tensor):
    """(queries, rows, row stride) with d, the row stride and the row pointer divisible by 16.

    The candidates kernel is compiled for such inputs only (vectorised, asynchronous tile
    loads); other rows (an odd d, an odd stride or offset) are copied into zero-padded
    rows first -- zeros change neither dot products nor norms.
    """
    N, D = db.shape
    xs = db.stride(0) if N > 1 else D
    if D % 16 == 0 and xs % 16 == 0 and db.data_ptr() % 16 == 0:
        return qhat, db, xs
    D16 = triton.cdiv(D, 16) * 16
    x = db.new_zeros((N, D16))
    x[:, :D] = db
    q = qhat.new_zeros((qhat.shape[0], D16))
    q[:, :D] = qhat
    return q, x, D16


def candidates(qhat: torch.Tensor, db: torch.Tensor, K: int, exclude: torch.Tensor | None):
    """Approximate top-``K`` (scores, ids, error bound) per query; raises on non-finite rows."""
    N = db.shape[0]
    qhat, db, xs = _aligned(qhat, db)
    Q, D = qhat.shape
    KP = max(KPS[0], _pow2(K))
    dot = dot_mode(db.dtype)
    qdot = qhat if dot == 0 else qhat.to(db.dtype).contiguous()  # the dot's input format, rounded once
    splits, rps = grid_splits(Q, N, _sm_count(db.device))
    keys = torch.empty((Q, splits, KP), dtype=torch.int64, device=db.device)
    bad = torch.zeros(N, dtype=torch.int8, device=db.device)
    ex = exclude if exclude is not None else torch.empty((Q, 0), dtype=torch.int64, device=db.device)
    qb = min(_pow2(Q), 1024)
    args = (qdot, db, ex, keys, bad, Q, N, D, xs, ex.shape[1], rps, qb)
    with warnings.catch_warnings():
        # block pointers still compile to plain address arithmetic on sm_80 and sm_90;
        # Triton 3.8 prefers tensor descriptors (TMA, sm_90 only) and says so at each compile
        warnings.filterwarnings("ignore", message="tl.make_block_ptr is deprecated", category=UserWarning)
        if _interpreting():
            cfg = tile_configs(KP, dot)[0]
            grid = (triton.cdiv(Q, cfg.kwargs["BQ"]), splits)
            _candidates_kernel[grid](*args, DOT=dot, KP=KP, **cfg.kwargs, num_warps=cfg.num_warps)
        else:
            _kernel_for(KP, dot)[lambda meta: (triton.cdiv(Q, meta["BQ"]), splits)](*args, DOT=dot, KP=KP)
    if bool(bad.any()):
        raise_nonfinite(db, "db")
        raise _UnsafeRows(torch.nonzero(bad).flatten())
    keys = torch.topk(keys.reshape(Q, splits * KP), K, dim=1).values
    empty = keys == -(2**63)
    ids = 4294967295 - (keys & 0xFFFFFFFF)
    ordered = (keys >> 32).to(torch.int32)
    vals = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).view(torch.float32)
    ids = torch.where(empty, torch.full_like(ids, -1), ids)
    vals = torch.where(empty, torch.full_like(vals, float("-inf")), vals)
    row_error = 2.0**-10 if (dot == 0 and db.dtype == torch.float32) else 0.0
    return vals, ids, tensor_core_error_bound(D, query_rounding_error(qhat, dot), row_error)


def rescore(q32: torch.Tensor, db: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    Q, C = cand.shape
    out = torch.empty((Q, C), dtype=torch.float32, device=db.device)
    if Q == 0 or C == 0:
        return out
    xs = db.stride(0) if db.shape[0] > 1 else db.shape[1]
    _rescore_kernel[(Q,)](q32, db, cand.contiguous(), out, q32.shape[1], xs, C, BC=_RESCORE_BC)
    return out


def cosine_topk(queries: torch.Tensor, db: torch.Tensor, k: int, exclude: torch.Tensor | None):
    """Validated inputs (see :func:`semlens_fast.ops.similarity.cosine_topk`)."""
    if db.shape[0] > MAX_ROWS:
        return reference.similarity.cosine_topk(queries, db, k, exclude)
    if db.stride(1) != 1:
        db = db.contiguous()

    def fallback():
        return reference.similarity.cosine_topk(queries, db, k, exclude)

    def run():
        try:
            return certified_topk(queries, db, k, exclude, candidates, rescore, _unit_queries,
                                  max_candidates=MAX_CANDIDATES, scan_chunk=SCAN_CHUNK)
        except _UnsafeRows as unsafe:  # candidates from a rescaled copy, rescoring from db
            scaled = rescale_rows(db, unsafe.rows)

            def scaled_candidates(qhat, _db, K, ex):
                return candidates(qhat, scaled, K, ex)

            return certified_topk(queries, db, k, exclude, scaled_candidates, rescore, _unit_queries,
                                  max_candidates=MAX_CANDIDATES, scan_chunk=SCAN_CHUNK)

    return _launch.run_fn("similarity._candidates_kernel", ("cosine", db.dtype), fallback, run)


# --------------------------------------------------------------------------- AOT compile cases

def compile_cases():
    """Every configuration the dispatcher can choose: ``(label, kernel, args, kwargs)``:
    each storage dtype x list length x autotuned tile shape, and the rescoring kernel."""
    i64, i8, f32 = torch.int64, torch.int8, torch.float32

    def t(dt):
        return torch.empty(1, dtype=dt)

    for dt, name in ((torch.float32, "fp32/tf32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        for KP in KPS:
            for cfg in tile_configs(KP, _DOT[dt]):
                qt = f32 if dt == torch.float32 else dt
                args = (t(qt), t(dt), t(i64), t(i64), t(i8), 1024, 10**6, 512, 512, 0, 65536, 1024)
                bq, bn, bd = cfg.kwargs["BQ"], cfg.kwargs["BN"], cfg.kwargs["BD"]
                label = f"{name} KP={KP} tile {bq}x{bn}x{bd} w{cfg.num_warps}"
                yield label, _candidates_kernel, args, dict(DOT=_DOT[dt], KP=KP, **cfg.kwargs,
                                                            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        args = (t(f32), t(dt), t(i64), t(f32), 512, 512, 36)
        yield f"rescore {name}", _rescore_kernel, args, dict(BC=_RESCORE_BC, num_warps=4)
