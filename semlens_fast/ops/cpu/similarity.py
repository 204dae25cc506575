"""C++ CPU backend of the similarity ops (extension ``semlens_fast._C``).

Pipeline per call (inputs validated by :mod:`semlens_fast.ops.similarity`):

1. candidate pass (C++, SIMD + OpenMP): approximate float32 cosine of the unit-scaled
   queries with every database row, fused with a top-``K'`` selection per query; the
   database is read once, in its storage dtype (fp32/fp16/bf16), never copied when its
   rows are unit-stride; non-finite rows are detected on the way;
2. exact rescoring (C++): float64 sequential scores of the ``K'`` candidates;
3. certification (torch, ``[Q, K']``-sized): queries whose ``K'``-th approximate score
   plus the error bound is below their ``k``-th exact score are final; the others are
   rerun with a 4x larger ``K'``, ending, if needed, in an exact scan.
"""
from __future__ import annotations

import torch

from .. import _backend
from ...errors import ArgumentError
from ..similarity import approx_error_bound, certified_topk, int16_error_bound, nonfinite_rows, raise_nonfinite

_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# From this many queries on, the candidate pass runs on int16 (madd). Up to 8 queries the
# fused one-pass float32 kernel is bandwidth-bound and faster (N = 10^6, d = 512, 2 cores:
# 8 queries 106 ms fp32 / 77 ms bf16 storage vs 145 / 107 ms on int16).
INT16_MIN_QUERIES = 9
MAX_CANDIDATES = 1 << 14  # beyond this, a query is resolved by an exact scan
# From this many candidates per query on, the candidate pass buffers each query's
# candidates and merges them into its sorted list in one pass (one insertion moves up to
# K entries): see docs/similarity.md ("Large K")
MERGE_MIN_K = 256
SCAN_CHUNK = 1 << 16


def _unit_queries(q32: torch.Tensor) -> torch.Tensor:
    """Unit-normalised queries (float64 norm and division, one rounding; zero rows stay 0).

    One float64 temporary (8 bytes per element), divided in place."""
    q64 = q32.double()
    n = q64.norm(dim=1, keepdim=True)
    q64.div_(torch.where(n > 0, n, torch.ones_like(n)))
    return q64.float().contiguous()


def _db_view(db: torch.Tensor) -> torch.Tensor:
    if db.shape[1] > 0 and db.stride(1) != 1:
        db = db.contiguous()
    return db


def quantise_queries(qhat: torch.Tensor) -> torch.Tensor:
    """int16 ``round(q_hat * 2**15)`` clamped to +-32767 (the C++ int16 candidate pass).

    ``|q_hat| <= 1``, so the product is exact in float32 and rounds as in float64."""
    return (qhat * 32768.0).round_().clamp_(-32767, 32767).to(torch.int16).contiguous()


def candidates(qhat: torch.Tensor, db: torch.Tensor, K: int, exclude: torch.Tensor | None):
    """Approximate top-``K`` (scores, ids, error bound) per query; raises on non-finite db rows.

    With at least ``INT16_MIN_QUERIES`` queries the pass runs on int16 (``vpmaddwd``:
    twice the multiply-adds per instruction of float32 FMA on AVX2), else on float32.
    """
    ext = _backend.extension()
    Q, d = qhat.shape
    q16 = quantise_queries(qhat) if Q >= INT16_MIN_QUERIES else None
    N = db.shape[0]
    vals = torch.empty((Q, K), dtype=torch.float32)
    ids = torch.empty((Q, K), dtype=torch.int64)
    bad = torch.empty(64, dtype=torch.int64)
    xs = db.stride(0) if N > 1 else d
    n_bad = ext.sim_candidates(
        qhat.data_ptr(), Q, d, db.data_ptr(), _DTYPE[db.dtype], N, xs, K,
        vals.data_ptr(), ids.data_ptr(),
        exclude.data_ptr() if exclude is not None else 0, exclude.shape[1] if exclude is not None else 0,
        bad.data_ptr(), bad.numel(), _backend.num_threads(), q16.data_ptr() if q16 is not None else 0,
        MERGE_MIN_K,
    )
    if n_bad:  # rows holding NaN/inf (any finite magnitude is handled by the kernel)
        raise_nonfinite(db, "db", nonfinite_rows(db))
        rows = torch.unique(bad[: min(n_bad, bad.numel())]).tolist()
        raise ArgumentError(f"db rows {rows[:10]} hold NaN or infinite values")
    return vals, ids, (int16_error_bound(d) if q16 is not None else approx_error_bound(d))


def rescore(q32: torch.Tensor, db: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Exact float32 scores ``[Q, C]`` of candidate ids ``cand [Q, C]`` (-1 -> -inf)."""
    ext = _backend.extension()
    Q, C = cand.shape
    out = torch.empty((Q, C), dtype=torch.float32)
    cand = cand.contiguous()
    xs = db.stride(0) if db.shape[0] > 1 else db.shape[1]
    ext.sim_rescore(q32.data_ptr(), Q, q32.shape[1], db.data_ptr(), _DTYPE[db.dtype], xs,
                    cand.data_ptr(), C, out.data_ptr(), _backend.num_threads())
    return out


def query_block(Q: int, d: int, k: int, nthreads: int, work_bytes: int) -> int:
    """Queries per call of the certified search so that its working memory stays within
    ``work_bytes`` (at least one query): per query at most 12 d bytes at once (the
    float64 copy of the unit query with its float32 rounding; later the float32, int16 and
    padded int16 forms) and ``(96 + 14 nthreads)`` bytes per candidate (the
    per-thread candidate lists and, at large K, pending buffers of at most K / 8 entries of
    16 bytes; the rescored scores and the sorts of the selection)."""
    extra = max(16, k // 4)
    per_query = 12 * d + (96 + 14 * nthreads) * (k + extra)
    return max(1, min(Q, work_bytes // per_query))


def cosine_topk(queries: torch.Tensor, db: torch.Tensor, k: int, exclude: torch.Tensor | None,
                extra: int | None = None):
    """Certified search in blocks of queries (:func:`query_block`): memory beyond the
    inputs and the ``[Q, k]`` result stays within ``WORK_BYTES`` (see
    :data:`semlens_fast.ops.similarity.WORK_BYTES`) plus the kernel's per-thread row blocks,
    whatever Q. Each block reads the database once; the blocks are large enough (thousands
    of queries at small k) for that to cost little next to their dot products."""
    from .. import similarity as _sim

    db = _db_view(db)
    Q, d = queries.shape
    qb = query_block(Q, d, k, _backend.num_threads(), _sim.WORK_BYTES)
    if qb >= Q:
        return certified_topk(queries, db, k, exclude, candidates, rescore, _unit_queries,
                              extra=extra, max_candidates=MAX_CANDIDATES, scan_chunk=SCAN_CHUNK)
    out_s = torch.empty((Q, k), dtype=torch.float32)
    out_i = torch.empty((Q, k), dtype=torch.int64)
    for q0 in range(0, Q, qb):
        q1 = min(Q, q0 + qb)
        ex = exclude[q0:q1] if exclude is not None else None
        out_s[q0:q1], out_i[q0:q1] = certified_topk(
            queries[q0:q1], db, k, ex, candidates, rescore, _unit_queries,
            extra=extra, max_candidates=MAX_CANDIDATES, scan_chunk=SCAN_CHUNK)
    return out_s, out_i
