"""Torch reference of :func:`semlens_fast.ops.sae_topk_update`: the definition, literally.

Latents are worked through in tiles (``[rows, tile]`` float64 blocks, ``d`` sequential passes
each), so memory stays bounded, but it is slow: it is the specification, not a backend to use.
"""
from __future__ import annotations

import torch

from ..topk import TopKState
from .topk import _merge

CHUNK_ELEMENTS = 1 << 21


def prepare_x(x: torch.Tensor, b_dec: torch.Tensor | None) -> torch.Tensor:
    """``float32(x) - float32(b_dec)`` as ``[B, T, d]`` (a ``[B, d]`` input becomes ``T = 1``)."""
    xf = x.float()
    if b_dec is not None:
        xf = xf - b_dec.float()
    return xf if xf.dim() == 3 else xf.unsqueeze(1)


def exact_pre(rows: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``pre [n, m]`` float32 of ``rows [n, d]`` (float32) and ``W [d, m]``, ``b [m]``: float64
    sequential accumulation over d, then the bias, one rounding."""
    x64 = rows.double()
    W64 = W.double()
    acc = torch.zeros(rows.shape[0], W.shape[1], dtype=torch.float64, device=rows.device)
    for i in range(rows.shape[1]):
        acc += x64[:, i : i + 1] * W64[i].unsqueeze(0)
    acc += b.double().unsqueeze(0)
    return acc.float()


def activate(pre: torch.Tensor, activation: str, threshold: torch.Tensor | None) -> torch.Tensor:
    zero = torch.zeros((), dtype=pre.dtype, device=pre.device)
    keep = pre > 0
    if activation == "jumprelu":
        keep = keep & (pre > threshold.float())
    a = torch.where(keep, pre, zero)
    return torch.where(torch.isnan(pre), pre, a)


def pool_latents(a: torch.Tensor, valid: torch.Tensor, pool: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool ``a [B, T, m]`` over valid tokens (``valid [B, T]``): ``(values [B, m], positions [B, m])``."""
    B, T, m = a.shape
    v3 = valid.unsqueeze(2)
    n = valid.sum(1)
    empty = (n == 0).unsqueeze(1)
    if pool == "max":
        nan = (torch.isnan(a) & v3).any(1)
        am = a.masked_fill(~v3 | torch.isnan(a), float("-inf"))
        pos = torch.argmax(am, dim=1)  # first maximum
        val = am.gather(1, pos.unsqueeze(1)).squeeze(1)
        val = torch.where(nan | empty, torch.full_like(val, float("nan")), val)
        return val, pos.to(torch.int32)
    s = torch.zeros(B, m, dtype=torch.float64, device=a.device)
    for t in range(T):  # sequential over tokens
        s = torch.where(valid[:, t : t + 1], s + a[:, t].double(), s)
    if pool == "mean":
        s = s / n.clamp(min=1).unsqueeze(1).double()
    val = s.float()
    val = torch.where(empty, torch.full_like(val, float("nan")), val)
    return val, torch.full((B, m), -1, dtype=torch.int32, device=a.device)


def sae_topk_update(state: TopKState, x, W_enc, b_enc, sample_ids, pool, activation, threshold, b_dec, mask) -> None:
    xf = prepare_x(x, b_dec)
    B, T, d = xf.shape
    valid = mask if mask is not None else torch.ones(B, T, dtype=torch.bool, device=xf.device)
    rows = xf.reshape(B * T, d)
    L = W_enc.shape[1]
    tile = max(1, CHUNK_ELEMENTS // max(1, B * T))
    vals, poss = [], []
    for l0 in range(0, L, tile):
        l1 = min(L, l0 + tile)
        pre = exact_pre(rows, W_enc[:, l0:l1], b_enc[l0:l1]).reshape(B, T, l1 - l0)
        thr = threshold[l0:l1] if threshold is not None else None
        v, p = pool_latents(activate(pre, activation, thr), valid, pool)
        vals.append(v)
        poss.append(p)
    val, pos = torch.cat(vals, 1), torch.cat(poss, 1)
    _merge(state, val.t(), sample_ids.unsqueeze(0).expand(L, B), pos.t())
