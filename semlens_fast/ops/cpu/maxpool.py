"""C++ CPU backend of :func:`semlens_fast.ops.maxpool_relevance` (extension ``semlens_fast._C``).

The public wrapper has validated dtypes, shapes and devices. float32 and float64 run in C++ on
contiguous copies; float16 and bfloat16 run on the torch reference."""
from __future__ import annotations

import torch

from .. import _backend
from ..reference import maxpool as _reference

_DTYPE = {torch.float32: 0, torch.float64: 1}


def maxpool_relevance(x: torch.Tensor, R: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    code = _DTYPE.get(x.dtype)
    if code is None:
        return _reference.maxpool_relevance(x, R, kernel)
    x, R = x.contiguous(), R.contiguous()
    B, C, H, W = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _backend.extension().maxpool_relevance(x.data_ptr(), R.data_ptr(), out.data_ptr(), code, B * C, H, W,
                                           kernel[0], kernel[1], _backend.num_threads())
    return out
