"""Torch reference of the top-k ops: the specification every backend is tested against.

Plain, obviously-correct torch: concatenate state and candidates, order them with two
stable sorts (by id ascending with empty slots last, then by value descending) and keep
the first k. See :mod:`semlens_fast.ops.topk` for the semantics.
"""
from __future__ import annotations

import torch

from ..topk import TopKState

_ID_LAST = torch.iinfo(torch.int64).max


def select_topk(values: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, k: int):
    """Best ``k`` of each row of ``values [C, n]`` (n >= k) in the library's total order.

    Rows must hold no NaN (callers turn NaN candidates into empty slots first).
    """
    if values.shape[0] == 0:  # no rows: nothing to order (argsort would still size its work by n)
        return values[:, :k], ids[:, :k], positions[:, :k]
    key = torch.where(ids < 0, torch.full_like(ids, _ID_LAST), ids)
    order = torch.argsort(key, dim=1, stable=True)
    values, ids, positions = values.gather(1, order), ids.gather(1, order), positions.gather(1, order)
    order = torch.argsort(values, dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, order), ids.gather(1, order), positions.gather(1, order)


def pool(x: torch.Tensor, pool: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool ``x [B, C, S]`` over S: returns (pooled ``[B, C]`` float32, position ``[B, C]`` int32)."""
    S = x.shape[2]
    if pool in ("max", "absmax"):
        xf = x.float()
        if pool == "absmax":
            xf = xf.abs()
        nan = torch.isnan(xf).any(dim=2)
        pos = torch.argmax(torch.nan_to_num(xf, nan=float("-inf")), dim=2, keepdim=True)
        val = xf.gather(2, pos).squeeze(2)
        val = torch.where(nan, torch.full_like(val, float("nan")), val)
        return val, pos.squeeze(2).to(torch.int32)
    total = x.double().sum(dim=2)
    if pool == "mean":
        total = total / S
    val = total.float() + 0.0  # -0.0 -> +0.0
    return val, torch.full(val.shape, -1, dtype=torch.int32, device=x.device)


def _merge(state: TopKState, cand_v: torch.Tensor, cand_i: torch.Tensor, cand_p: torch.Tensor) -> None:
    """Merge candidates ``[C, n]`` into ``state`` in place; NaN candidates are counted and dropped."""
    nan = torch.isnan(cand_v)
    state.nan_counts.add_(nan.sum(dim=1))
    cand_v = torch.where(nan, torch.full_like(cand_v, float("-inf")), cand_v)
    cand_i = torch.where(nan, torch.full_like(cand_i, -1), cand_i)
    cand_p = torch.where(nan, torch.full_like(cand_p, -1), cand_p)
    v, i, p = select_topk(
        torch.cat([state.values, cand_v], 1), torch.cat([state.ids, cand_i], 1), torch.cat([state.positions, cand_p], 1), state.k
    )
    state.values.copy_(v)
    state.ids.copy_(i)
    state.positions.copy_(p)


def pool_topk_update(state: TopKState, x: torch.Tensor, sample_ids: torch.Tensor, pool_name: str, track_positions: bool) -> None:
    """``x`` is a ``[B, C, S]`` view; ``sample_ids`` int64 ``[B]``."""
    val, pos = pool(x, pool_name)
    if not track_positions:
        pos = torch.full_like(pos, -1)
    C, B = state.channels, x.shape[0]
    _merge(state, val.t(), sample_ids.unsqueeze(0).expand(C, B), pos.t())


def merge_topk(out: TopKState, b: TopKState) -> None:
    """Merge state ``b`` into ``out`` in place."""
    out.nan_counts.add_(b.nan_counts)
    v, i, p = select_topk(
        torch.cat([out.values, b.values], 1), torch.cat([out.ids, b.ids], 1), torch.cat([out.positions, b.positions], 1), out.k
    )
    out.values.copy_(v)
    out.ids.copy_(i)
    out.positions.copy_(p)
