"""Torch reference of the max-pool relevance op (the specification; see :mod:`semlens_fast.ops.maxpool`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def block_max(x: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    """Max over non-overlapping ``kernel`` windows of ``x [B, C, H, W]`` (floor mode): the values of
    ``F.max_pool2d(x, kernel)``, NaN propagating, as elementwise maxima of strided views."""
    kh, kw = kernel
    Ho, Wo = x.shape[-2] // kh, x.shape[-1] // kw
    out = None
    for i in range(kh):
        for j in range(kw):
            v = x[..., i: i + Ho * kh: kh, j: j + Wo * kw: kw]
            out = v if out is None else torch.maximum(out, v)
    return out.contiguous()


def maxpool_relevance(x: torch.Tensor, R: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    """``x [B, C, H, W]``, ``R [B, C, H // kh, W // kw]`` (same dtype) -> ``[B, C, H, W]``.

    Each window's relevance is split equally between the inputs equal to the window maximum
    ``y`` (``r = R / #{x == y}``, a count of 0 -- a window holding NaN -- counts as 1) and
    every input gets ``float(x == y) * r`` (so non-winners get ``0 * r``: -0.0 for negative
    ``r``, NaN for non-finite ``r``); the rows and columns past the last full window get +0.0.
    """
    kh, kw = kernel
    B, C, H, W = x.shape
    Ho, Wo = H // kh, W // kw
    size = (Ho * kh, Wo * kw)
    y = block_max(x, kernel)
    xc = x if size == (H, W) else x[..., : size[0], : size[1]]
    # the input as [B, C, Ho, kh, Wo*kw] row blocks against the maxima repeated along the width
    y_w = y.repeat_interleave(kw, -1) if kw > 1 else y
    eq = xc.reshape(B, C, Ho, kh, size[1]) == y_w.view(B, C, Ho, 1, size[1])
    cnt = eq.view(B, C, Ho, kh, Wo, kw).sum((3, 5)).to(R.dtype)
    r = R / cnt.masked_fill_(cnt == 0, 1)
    r_w = r.repeat_interleave(kw, -1) if kw > 1 else r
    full = (eq.to(R.dtype) * r_w.view(B, C, Ho, 1, size[1])).view(B, C, *size)
    if size != (H, W):
        full = F.pad(full, (0, W - size[1], 0, H - size[0]))
    return full.contiguous()
