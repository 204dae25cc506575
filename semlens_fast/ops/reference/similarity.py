"""Torch reference of the similarity ops: the specification every backend is tested against.

Scores follow the definition in :mod:`semlens_fast.ops.similarity` literally: float64
products, sums accumulated one component at a time (i = 0 .. d-1), one rounding to
float32. Selection: stable sorts (row id ascending, then score descending). Plain and
slow (``d`` passes over a ``Q x chunk`` float64 tile), but memory stays bounded by
working through the database in chunks.
"""
from __future__ import annotations

import torch

from ..similarity import raise_nonfinite

CHUNK_ELEMENTS = 1 << 22


def sequential_norms(x64: torch.Tensor) -> torch.Tensor:
    """``sqrt(sum_i x_i * x_i)`` of every row, summed sequentially over i in float64."""
    acc = torch.zeros(x64.shape[0], dtype=torch.float64, device=x64.device)
    for i in range(x64.shape[1]):
        col = x64[:, i]
        acc = acc + col * col
    return torch.sqrt(acc)


def exact_scores(queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The exact score matrix ``[Q, n]`` (float32) of ``queries [Q, d]`` and ``rows [n, d]``."""
    q64 = queries.double()
    x64 = rows.double()
    dot = torch.zeros(q64.shape[0], x64.shape[0], dtype=torch.float64, device=q64.device)
    for i in range(q64.shape[1]):
        dot = dot + q64[:, i : i + 1] * x64[:, i].unsqueeze(0)
    nq = sequential_norms(q64).unsqueeze(1)
    nx = sequential_norms(x64).unsqueeze(0)
    zero = (nq == 0) | (nx == 0)
    s = torch.where(zero, torch.zeros_like(dot), dot / (nq * nx))
    return s.float() + 0.0


def select(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` of every row of ``(scores, ids) [Q, n]`` in the library's order.

    Invalid entries carry id -1 (their score is ignored); rows are padded with
    ``(-inf, -1)`` when fewer than ``k`` entries are valid.
    """
    Q, n = scores.shape
    if n < k:
        scores = torch.cat([scores, torch.full((Q, k - n), float("-inf"), device=scores.device)], 1)
        ids = torch.cat([ids, torch.full((Q, k - n), -1, dtype=torch.int64, device=ids.device)], 1)
    valid = ids >= 0
    key_ids = torch.where(valid, ids, torch.full_like(ids, torch.iinfo(torch.int64).max))
    order = torch.argsort(key_ids, dim=1, stable=True)
    scores, ids, valid = scores.gather(1, order), ids.gather(1, order), valid.gather(1, order)
    # valid scores are finite (cosines), so -inf puts invalid entries after all of them
    scores = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
    rank = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    s, i = scores.gather(1, rank), ids.gather(1, rank)
    i = torch.where(s == float("-inf"), torch.full_like(i, -1), i)
    return s, i


def cosine_topk(queries: torch.Tensor, db: torch.Tensor, k: int, exclude: torch.Tensor | None):
    """Validated inputs (see :func:`semlens_fast.ops.similarity.cosine_topk`)."""
    raise_nonfinite(db, "db")
    Q, N = queries.shape[0], db.shape[0]
    dev = queries.device
    best_s = torch.full((Q, 0), float("-inf"), dtype=torch.float32, device=dev)
    best_i = torch.full((Q, 0), -1, dtype=torch.int64, device=dev)
    chunk = max(1, CHUNK_ELEMENTS // max(1, Q))
    for n0 in range(0, N, chunk):
        rows = db[n0 : n0 + chunk]
        s = exact_scores(queries, rows)
        ids = torch.arange(n0, n0 + rows.shape[0], device=dev).unsqueeze(0).expand(Q, -1)
        if exclude is not None:
            hit = (ids.unsqueeze(2) == exclude.unsqueeze(1)).any(dim=2)
            ids = torch.where(hit, torch.full_like(ids, -1), ids)
        best_s, best_i = select(torch.cat([best_s, s], 1), torch.cat([best_i, ids], 1), k)
    if best_s.shape[1] < k:
        best_s, best_i = select(best_s, best_i, k)
    return best_s, best_i
