"""Exact cosine top-k search and tiled pairwise similarity.

:func:`cosine_topk` compares ``Q`` queries with ``N`` database rows and returns, per
query, the ``k`` most similar rows; :func:`pairwise_topk` / :func:`pairwise_max` do the
same for two sets of vectors (model comparison, redundancy). The ``Q x N`` score
matrix is never materialised. Memory beyond the inputs (which are not copied when
float32/fp16/bf16 with unit-stride rows) on the CPU backend: the ``[Q, k]`` result
(12 bytes an entry), at most :data:`WORK_BYTES` (64 MiB) of working memory (queries are
processed in blocks that fit, see ``ops/cpu/similarity.py``), and per thread a row block
of at most 128 KiB plus its candidate lists (12 bytes an entry, ``k + max(16, k/4)``
entries per query of a block); a single query whose need exceeds ``WORK_BYTES`` (huge k)
is still processed.

**The score** of a query ``q`` and a row ``x`` (both as float32 values; fp16/bf16
inputs convert exactly) is their cosine similarity, computed in float64 with every
product exact and the sums taken sequentially over the ``d`` components, then rounded
once to float32::

    dot = sum_i q_i x_i,   |q| = sqrt(sum_i q_i^2),   |x| = sqrt(sum_i x_i^2)
    score = float32(dot / (|q| * |x|))                (+0.0 instead of -0.0)

This definition is reproduced operation for operation by every backend (the torch
reference, the C++ CPU kernels, the Triton kernels), so all return bit-identical
scores and identical ids. Inputs need not be normalised.

**Zero vectors** have similarity exactly 0 with everything (a zero query gets the
``k`` lowest row ids, all with score 0).

**Order and padding:** results are sorted by score, descending; among equal scores
the lower row id comes first. When fewer than ``k`` rows are eligible (``k > N`` or
exclusions), the missing entries are ``id = -1`` with ``score = -inf``.

**Magnitudes:** any finite float32 values are exact, from denormals to ~3.4e38, with
rows (or components within a row) at very different scales: the reference's float64
arithmetic represents every float32 square and product, and the fast backends' float32
passes rescore a row whose float32 squared norm would underflow or overflow from a
power-of-two rescaled copy (cosines are scale-invariant; C++: inside the kernels, Triton:
a rescaled copy of the flagged rows for the candidate pass).

**Bad input:** NaN or infinite values in a query or a database row raise
:class:`~semlens_fast.errors.ArgumentError` naming the rows; so do mismatched
dimensions, ``k <= 0`` (or a k whose result would not fit in memory), exclusions
outside ``-1 .. N-1``, tensors on devices the ops do not run on (mps, a CUDA device
that is not there; meta tensors get result shapes only) and unsupported dtypes (float32, float16, bfloat16 are
accepted).

How the fast backends stay exact: a float32 candidate pass (a fused, blocked matrix
product with top-``K'`` selection per query, ``K' > k``) followed by the exact float64
rescoring of the candidates. Every approximate score is within a proven bound ``eps``
of the exact one; a query is *certified* when its ``K'``-th candidate's approximate
score plus ``eps`` (and one float32 ulp) is below its ``k``-th exact score, so no
other row can enter. Queries that are not certified (heavy ties) are rerun with a
larger ``K'``, up to a full exact scan.
"""
from __future__ import annotations

import torch

from ..errors import ArgumentError, DeviceError, DTypeError, ShapeError
from . import _backend
from ._validate import check_result_size, check_tensor_device

SIM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_ROWS = 2**62
# Working memory of one search (CPU backend) beyond its inputs and its [Q, k] result: the
# queries are processed in blocks that fit (see ops/cpu/similarity.py, query_block), and
# the exact-scan fallback of certified_topk in sub-blocks of queries that fit.
WORK_BYTES = 64 << 20


def approx_error_bound(d: int) -> float:
    """Bound on |approximate - exact| of the float32 candidate pass, plus two float32 ulps of 1.

    The candidate score is ``fl(fl(q_hat . x) * fl(1 / sqrt(fl(x . x))))`` with ``q_hat``
    the float32-rounded unit query; standard float error analysis bounds its distance
    to the exact cosine by about ``(1.5 d + 5) * 2**-24``; ``(2 d + 64) * 2**-24`` is used.
    """
    return (2.0 * d + 64.0) * 2.0**-24


def int16_error_bound(d: int) -> float:
    """Bound on |approximate - exact| of the int16 candidate pass (C++ backend).

    Unit query and unit-scaled rows are rounded to multiples of ``2**-15`` (error
    ``<= 2**-16`` per component, one component may clamp at ``+-32767 / 2**15``); by
    Cauchy-Schwarz the dot product moves by at most ``2**-15 * (sqrt(d) + 1) + d * 2**-30``,
    on top of the float32 bound for computing the norms.
    """
    return 2.0**-15 * (d**0.5 + 1.0) + d * 2.0**-30 + approx_error_bound(d)


def tensor_core_error_bound(d: int, query_error: torch.Tensor, row_error: float) -> torch.Tensor:
    """Bound on |approximate - exact| of a tensor-core candidate pass (Triton backend).

    The approximate score is ``fl(dot(q', x') * fl(1 / sqrt(fl(x . x))))`` where ``q'`` is
    the float32 unit query rounded to the dot's input format and ``x'`` the row in it
    (exact for fp16/bf16 rows; TF32 for float32 rows). With ``query_error [Q]`` =
    ``|q' - q_hat|`` (measured exactly per query) and ``row_error`` a bound on
    ``|x' - x| / |x|`` (``2**-10`` for TF32, 0 for 16-bit rows):

    * rounding of the inputs: ``|q' . x' - q_hat . x| <= |q' - q_hat| |x'| + |q_hat| |x' - x|``
      (Cauchy-Schwarz), i.e. ``dq (1 + dx) + dx`` in cosine units;
    * accumulation: products of two 11-bit significands are exact in float32; summing d of
      them, however the hardware orders, aligns and truncates, errs by at most
      ``(d + 16) 2**-22`` of ``sum |q'_i x'_i| <= |q'| |x'|``; ``(d + 16) 2**-21`` covers the
      norm factors;
    * the float32 norm, scaling and two ulps: :func:`approx_error_bound`.

    Rows whose float32 squared norm is below ``2**-60`` or overflows (where underflow or
    overflow would break these relative bounds) are not handled by the pass: the Triton
    backend reruns it on a copy in which they are scaled by a power of two (exact rescoring
    still reads the original rows)."""
    dq = query_error.double()
    return 1.01 * (dq + row_error + dq * row_error) + (d + 16.0) * 2.0**-21 + approx_error_bound(d)


def _check_matrix(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception as exc:
            raise DTypeError(f"{name} must be a 2-D float tensor, got {type(x).__name__}") from exc
    if x.dtype not in SIM_DTYPES:
        raise DTypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2:
        raise ShapeError(f"{name} must be a 2-D tensor [rows, d], got shape {tuple(x.shape)}")
    check_tensor_device(x, name)
    return x


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ArgumentError(f"k must be an int >= 1, got {k!r}")
    return k


def nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """Indices of the rows of ``x [n, d]`` holding NaN or +-inf (ascending).

    Works in row blocks of about 2^20 elements (a 1-byte mask per element of a block)."""
    step = max(1, (1 << 20) // max(1, x.shape[1])) if x.dim() == 2 else max(1, x.shape[0])
    if x.shape[0] <= step:
        return torch.nonzero(~torch.isfinite(x).all(dim=1)).flatten().cpu()
    parts = [torch.nonzero(~torch.isfinite(x[r0 : r0 + step]).all(dim=1)).flatten().cpu() + r0
             for r0 in range(0, x.shape[0], step)]
    return torch.cat(parts)


def raise_nonfinite(x: torch.Tensor, name: str, rows: torch.Tensor | None = None) -> None:
    """Raise :class:`ArgumentError` naming the non-finite rows of ``x`` (if any)."""
    if rows is None:
        rows = nonfinite_rows(x)
    if rows.numel():
        shown = rows[:10].tolist()
        more = f" (and {rows.numel() - 10} more)" if rows.numel() > 10 else ""
        raise ArgumentError(
            f"{name} has NaN or infinite values in {rows.numel()} row(s): {shown}{more}; "
            "similarities are defined for finite vectors only"
        )


def _check_exclude(exclude: object, Q: int, N: int, device: torch.device) -> torch.Tensor | None:
    if exclude is None:
        return None
    if not isinstance(exclude, torch.Tensor):
        try:
            exclude = torch.as_tensor(exclude)
        except Exception as exc:
            raise DTypeError(f"exclude must be an integer tensor [Q] or [Q, m], got {type(exclude).__name__}") from exc
    if exclude.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise DTypeError(f"exclude must be an integer tensor (row ids, -1 = none), got dtype {exclude.dtype}")
    if exclude.dim() == 1:
        exclude = exclude.unsqueeze(1)
    if exclude.dim() != 2 or exclude.shape[0] != Q:
        raise ShapeError(f"exclude must have shape [{Q}] or [{Q}, m] (row ids per query), got {tuple(exclude.shape)}")
    if exclude.device != device:
        raise DeviceError(f"exclude is on {exclude.device}, expected {device} like the queries")
    exclude = exclude.to(torch.int64).contiguous()
    if exclude.numel() and int(exclude.min()) < -1:
        raise ArgumentError(f"exclude holds row ids >= 0 or -1 (no exclusion), got minimum {int(exclude.min())}")
    if exclude.numel() and int(exclude.max()) >= N:
        raise ArgumentError(
            f"exclude holds row id {int(exclude.max())} but there are {N} rows (ids 0..{N - 1}; -1 = no exclusion)"
        )
    if exclude.shape[1] == 0:
        return None
    return exclude


def certified_topk(queries, db, k, exclude, candidates, rescore, unit_queries, *,
                   extra=None, max_candidates=1 << 14, scan_chunk=1 << 16):
    """Exact top-k from an approximate candidate pass + exact rescoring (shared by the
    fast backends). ``candidates(qhat, db, K, exclude) -> (approx [Q, K], ids [Q, K])``
    keeps the best K rows by approximate score (ties: lower id; -1 = none);
    ``rescore(q32, db, ids) -> exact [Q, C]`` computes the defined scores. ``candidates``
    may also return a third item, the bound on |approximate - exact| it guarantees
    (default :func:`approx_error_bound`)."""
    from .reference.similarity import select

    dev = queries.device
    q32 = queries.float().contiguous()
    Q, d = q32.shape
    N = db.shape[0]
    qhat = unit_queries(q32)
    zero_q = (qhat == 0).all(dim=1)
    out_s = torch.empty((Q, k), dtype=torch.float32, device=dev)
    out_i = torch.empty((Q, k), dtype=torch.int64, device=dev)
    if extra is None:
        # measured on 1024 random queries, N = 10^6, d = 512 (C++ backend): 16 extra
        # certify every query at k = 20, k // 4 = 25 every one at k = 100 (16 left 6 for a
        # second round, 8 left 471); k // 2 = 50 cost 3 % more time at k = 100 (the longer
        # lists let more pairs through the int8 filter)
        extra = max(16, k // 4)
    K = min(N, k + extra)
    pending = torch.arange(Q, device=dev)
    while pending.numel():
        sub = pending.numel() < Q
        qh = qhat[pending].contiguous() if sub else qhat
        qr = q32[pending].contiguous() if sub else q32
        ex = exclude[pending].contiguous() if (sub and exclude is not None) else exclude
        if K > max_candidates and K < N:  # heavy ties: exact scan of these queries
            # in sub-blocks of queries whose [rows, k + scan_chunk] temporaries (scores,
            # ids, the sorts of select: ~64 bytes an entry, + m for the exclusions) fit
            # in WORK_BYTES
            step = max(1, WORK_BYTES // ((64 + (ex.shape[1] if ex is not None else 0)) * (k + scan_chunk)))
            for p0 in range(0, qr.shape[0], step):
                qs = qr[p0 : p0 + step]
                es = ex[p0 : p0 + step] if ex is not None else None
                best_s = torch.full((qs.shape[0], 0), float("-inf"), device=dev)
                best_i = torch.full((qs.shape[0], 0), -1, dtype=torch.int64, device=dev)
                for n0 in range(0, N, scan_chunk):
                    ids = torch.arange(n0, min(N, n0 + scan_chunk), device=dev).unsqueeze(0).expand(qs.shape[0], -1)
                    if es is not None:
                        hit = (ids.unsqueeze(2) == es.unsqueeze(1)).any(dim=2)
                        ids = torch.where(hit, torch.full_like(ids, -1), ids)
                    ids = ids.contiguous()
                    best_s, best_i = select(torch.cat([best_s, rescore(qs, db, ids)], 1), torch.cat([best_i, ids], 1), k)
                s, i = select(best_s, best_i, k)
                out_s[pending[p0 : p0 + step]], out_i[pending[p0 : p0 + step]] = s, i
            break
        res = candidates(qh, db, K, ex)
        approx, cand = res[0], res[1]
        eps = res[2] if len(res) > 2 else approx_error_bound(d)
        s, i = select(rescore(qr, db, cand), cand, k)
        n_valid = (cand >= 0).sum(dim=1)
        # certified: every eligible row was a candidate, or no row outside the candidates
        # can reach the k-th exact score (approximation bound + one float32 ulp)
        done = (n_valid < K) | (K >= N) | zero_q[pending] | (approx[:, -1].double() + eps < s[:, -1].double())
        out_s[pending[done]], out_i[pending[done]] = s[done], i[done]
        pending = pending[~done]
        K = min(N, 4 * K)
    return out_s, out_i


def _backend_module(device: torch.device):
    name = _backend.choose(device)
    if name == "cpu":
        from .cpu import similarity as mod
    elif name == "triton":
        from .triton import similarity as mod
    else:
        from .reference import similarity as mod
    return mod


def empty_result(Q: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.full((Q, k), float("-inf"), dtype=torch.float32, device=device),
        torch.full((Q, k), -1, dtype=torch.int64, device=device),
    )


def cosine_topk(
    queries: torch.Tensor, db: torch.Tensor, k: int, *, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` rows of ``db [N, d]`` most cosine-similar to each of ``queries [Q, d]``.

    Returns ``(scores [Q, k] float32, ids [Q, k] int64)``, best first (ties: lower id;
    missing entries ``-1`` / ``-inf``). ``exclude`` is an integer tensor ``[Q]`` or
    ``[Q, m]`` of row ids that query ``i`` must not return (``-1`` = no exclusion),
    e.g. the query's own row. Zero vectors have similarity 0. ``db`` may be float32,
    float16 or bfloat16 and is never copied when its rows are unit-stride; the
    ``Q x N`` score matrix is never built. See the module docstring for the exact
    definition of a score.
    """
    queries = _check_matrix(queries, "queries")
    db = _check_matrix(db, "db")
    k = _check_k(k)
    if queries.shape[1] != db.shape[1]:
        raise ShapeError(
            f"queries have dimension {queries.shape[1]} (shape {tuple(queries.shape)}) but db rows have "
            f"{db.shape[1]} (shape {tuple(db.shape)}); both must be [rows, d] with the same d"
        )
    if queries.device != db.device:
        raise DeviceError(f"queries are on {queries.device} but db is on {db.device}")
    if exclude is not None and not isinstance(exclude, torch.Tensor):
        exclude = _check_exclude(exclude, queries.shape[0], db.shape[0], queries.device)
    return torch.ops.semlens.cosine_topk(queries, db, k, exclude)


# --------------------------------------------------------------------------- registered torch op
# (the pattern of semlens_fast.ops.topk: metadata checks above, data checks and the
# backend choice in the op's implementation, shapes from register_fake)

@torch.library.custom_op("semlens::cosine_topk", mutates_args=())
def _cosine_topk_op(queries: torch.Tensor, db: torch.Tensor, k: int,
                    exclude: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated metadata (see :func:`cosine_topk`); checks the data, then dispatches."""
    Q, N = queries.shape[0], db.shape[0]
    exclude = _check_exclude(exclude, Q, N, queries.device)
    check_result_size(Q, k, 12, "a result")
    raise_nonfinite(queries, "queries")
    if Q == 0 or N == 0:
        return empty_result(Q, k, queries.device)
    s, i = _backend_module(db.device).cosine_topk(queries, db, k, exclude)
    return s, i


@_cosine_topk_op.register_fake
def _(queries, db, k, exclude):
    Q = queries.shape[0]
    return (queries.new_empty((Q, k), dtype=torch.float32), queries.new_empty((Q, k), dtype=torch.int64))


def pairwise_topk(
    a: torch.Tensor, b: torch.Tensor, k: int, *, exclude_diagonal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row of ``a [N, d]``, its ``k`` most cosine-similar rows of ``b [M, d]``.

    Returns ``(scores [N, k] float32, ids [N, k] int64)`` into ``b``; same semantics as
    :func:`cosine_topk`. ``exclude_diagonal=True`` drops the pair ``(i, i)`` (use it when
    ``a`` and ``b`` are the same set, e.g. redundancy within a layer; rows ``i >= M``
    of ``a`` then exclude nothing). The ``N x M`` similarity matrix is never
    materialised; memory as for :func:`cosine_topk` (the ``[N, k]`` result plus at most
    ``WORK_BYTES`` and the per-thread row blocks).
    """
    a = _check_matrix(a, "a")
    b = _check_matrix(b, "b")
    if not isinstance(exclude_diagonal, bool):
        raise ArgumentError(f"exclude_diagonal must be a bool, got {exclude_diagonal!r}")
    if a.shape[1] != b.shape[1]:
        raise ShapeError(f"a has dimension {a.shape[1]} (shape {tuple(a.shape)}) but b has {b.shape[1]} (shape {tuple(b.shape)})")
    exclude = None
    if exclude_diagonal:  # pair (i, i); rows i of a with no row i in b exclude nothing (-1)
        exclude = torch.arange(a.shape[0], dtype=torch.int64, device=a.device)
        exclude = torch.where(exclude < b.shape[0], exclude, torch.full_like(exclude, -1))
    try:
        return cosine_topk(a, b, k, exclude=exclude)
    except ArgumentError as exc:  # name the arguments of this function
        msg = str(exc).replace("queries", "a", 1) if str(exc).startswith("queries") else str(exc).replace("db", "b", 1)
        raise type(exc)(msg) from None


def pairwise_max(
    a: torch.Tensor, b: torch.Tensor, *, exclude_diagonal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-max special case of :func:`pairwise_topk`: ``(scores [N], ids [N])``.

    ``scores[i]`` is the largest cosine similarity of ``a[i]`` with any row of ``b``
    (``-inf`` with id ``-1`` when ``b`` has no eligible row).
    """
    s, i = pairwise_topk(a, b, 1, exclude_diagonal=exclude_diagonal)
    return s[:, 0], i[:, 0]
