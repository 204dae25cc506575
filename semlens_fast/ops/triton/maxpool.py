"""Triton (CUDA) backend of :func:`semlens_fast.ops.maxpool_relevance`.

One kernel, one pass: each program takes ``BLOCK`` consecutive windows of the flattened
``[B*C*Ho, Wo]`` grid, loads their ``KH x KW`` inputs (compile-time window, unrolled), takes the
NaN-propagating maximum, counts the ties, divides (in float32 for 16-bit inputs, as torch does,
then rounds once) and stores ``float(x == y) * r`` for every input. The rows and columns past the
last full window are zeros of the output's allocation. float64 stays float64.

Compiles ahead of time for sm_80/sm_90 (:func:`compile_cases`). Tested on the CPU under
``TRITON_INTERPRET=1`` against the reference, bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import maxpool as _reference
from . import _launch

BLOCK = 128


@triton.jit
def _maxpool_relevance_kernel(x_ptr, r_ptr, out_ptr, n_windows, Ho, Wo, H, W,
                              KH: tl.constexpr, KW: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    n = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    live = n < n_windows
    row = n // Wo
    wo = n - row * Wo
    bc = row // Ho
    ho = row - bc * Ho
    base = (bc * H + ho * KH) * W + wo * KW
    # inputs are compared in float32 (float64 stays): exact upcasts, and the interpreter
    # miscomputes bf16 comparisons
    CT: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    y = tl.load(x_ptr + base, mask=live, other=0.0).to(CT)
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            v = tl.load(x_ptr + base + i * W + j, mask=live, other=0.0).to(CT)
            y = tl.where((v > y) | (v != v), v, y)  # NaN propagates: no input equals the window's NaN
    cnt = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            v = tl.load(x_ptr + base + i * W + j, mask=live, other=0.0).to(CT)
            cnt += (v == y).to(tl.float32)
    R = tl.load(r_ptr + n, mask=live, other=0.0)
    # the share in R's dtype (16-bit: divided in float32 and rounded once, as torch does), then
    # carried in the compute type, where 1 * r and 0 * r are exact (no bool -> bf16 cast: the
    # interpreter gets it wrong)
    if CT == tl.float64:
        r = R / tl.where(cnt == 0.0, 1.0, cnt).to(tl.float64)
    else:
        r = R.to(tl.float32) / tl.where(cnt == 0.0, 1.0, cnt)
        if R.dtype == tl.bfloat16:
            # round to nearest even on the bits (the interpreter's float32 -> bf16 cast truncates;
            # on a GPU this equals the cvt.rn cast)
            u = r.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
            r = tl.where(r != r, r, u.to(tl.float32, bitcast=True))
        elif R.dtype == tl.float16:
            r = r.to(tl.float16).to(tl.float32)
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            v = tl.load(x_ptr + base + i * W + j, mask=live, other=0.0).to(CT)
            w = (v == y).to(CT) * r
            tl.store(out_ptr + base + i * W + j, w.to(out_ptr.dtype.element_ty), mask=live)


def maxpool_relevance(x: torch.Tensor, R: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    kh, kw = kernel
    x, R = x.contiguous(), R.contiguous()
    B, C, H, W = x.shape
    Ho, Wo = H // kh, W // kw
    full = Ho * kh == H and Wo * kw == W
    out = torch.empty_like(x) if full else torch.zeros_like(x)
    n = B * C * Ho * Wo
    if n == 0:
        return out.zero_()

    def fallback():
        return _reference.maxpool_relevance(x, R, kernel)

    def launch():
        _maxpool_relevance_kernel[(triton.cdiv(n, BLOCK),)](x, R, out, n, Ho, Wo, H, W, KH=kh, KW=kw, BLOCK=BLOCK)
        return out

    return _launch.run_fn("maxpool_relevance", (x.dtype, kh, kw), fallback, launch)


#: window sizes compiled ahead of time (the usual 2-d poolings, and 1-d ones as (1, k))
AOT_KERNELS = ((2, 2), (3, 3), (4, 4), (1, 2), (1, 3))


def compile_cases():
    """Every dtype with the usual windows: ``(label, kernel, args, kwargs)`` (see
    :mod:`semlens_fast.ops.triton.aot`). Other windows compile on first use."""
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        t = torch.empty(1, dtype=dt)
        for kh, kw in AOT_KERNELS:
            args = (t, t, t, 1 << 20, 14, 14, 28, 28)
            yield f"{str(dt).split('.')[1]}, window {kh}x{kw}", _maxpool_relevance_kernel, args, \
                dict(KH=kh, KW=kw, BLOCK=BLOCK)
