"""Max-pool relevance: the winner-takes-all rule of relevance propagation through a max pooling
with non-overlapping windows, as one pass over the input (the hot path of the DLBacktrace and
LRP presets on CNNs).

``maxpool_relevance(x, R, kernel_size) -> Tensor [B, C, H, W]``: ``x [B, C, H, W]`` is the
pooling's input, ``R [B, C, H // kh, W // kw]`` the relevance of its output
(``F.max_pool2d(x, kernel_size)`` with stride = kernel, no padding or dilation, floor mode).
Each window's relevance is split equally between the inputs equal to the window maximum;
a window holding NaN has maximum NaN, so no input wins it (its relevance is dropped, as
``x == NaN`` is false); rows and columns past the last full window get +0.0. The exact
definition, down to the sign of zeros and NaN propagation, is
:func:`semlens_fast.ops.reference.maxpool.maxpool_relevance`, and every backend returns its
result bit for bit:

* CPU: C++ (one pass over ``x``: window maxima, tie counts and shares; OpenMP over rows of
  windows; compiled at every SIMD level, chosen at run time) for float32/float64; float16 and
  bfloat16 CPU tensors run on the reference.
* CUDA: a Triton kernel (float32, float16, bfloat16, float64).

Bad input (not tensors, other dtypes, mismatched shapes or devices, a kernel that is not two
positive ints) raises an error from :mod:`semlens_fast.errors` that names the argument.
"""
from __future__ import annotations

import torch

from ..errors import ArgumentError, DeviceError, DTypeError, ShapeError
from . import _backend
from ._validate import check_tensor_device

POOL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _kernel(kernel_size: object) -> tuple[int, int]:
    k = kernel_size if isinstance(kernel_size, (tuple, list)) else (kernel_size, kernel_size)
    if len(k) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in k):
        raise ArgumentError(f"kernel_size must be a positive int or a pair of positive ints, got {kernel_size!r}")
    return int(k[0]), int(k[1])


def maxpool_relevance(x: torch.Tensor, R: torch.Tensor, kernel_size: int | tuple[int, int]) -> torch.Tensor:
    """Relevance of the inputs of ``F.max_pool2d(x, kernel_size)`` (stride = kernel) given ``R``,
    the relevance of its output; see the module docstring. Returns a new contiguous tensor of
    ``x``'s shape in ``R``'s dtype."""
    kh, kw = _kernel(kernel_size)
    for t, name in ((x, "x"), (R, "R")):
        if not isinstance(t, torch.Tensor):
            raise ArgumentError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in POOL_DTYPES:
            raise DTypeError(f"{name} has dtype {t.dtype}; expected one of {', '.join(map(str, POOL_DTYPES))}")
        check_tensor_device(t, name)
    if x.dim() != 4:
        raise ShapeError(f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
    if R.dtype != x.dtype:
        raise DTypeError(f"R has dtype {R.dtype} but x has {x.dtype}; they must agree")
    B, C, H, W = x.shape
    want = (B, C, H // kh, W // kw)
    if tuple(R.shape) != want:
        raise ShapeError(f"R must have shape [B, C, H // kh, W // kw] = {list(want)} for x of shape {list(x.shape)} "
                         f"and kernel_size {(kh, kw)}, got {list(R.shape)}")
    if R.device != x.device:
        raise DeviceError(f"R is on {R.device} but x is on {x.device}")
    return torch.ops.semlens.maxpool_relevance(x, R, kh, kw)


# the registered op (see "registered torch ops" in ops/topk.py): metadata checks above, the
# kernel below; opaque to torch.compile, with shapes for fake and meta tensors
@torch.library.custom_op("semlens::maxpool_relevance", mutates_args=())
def _maxpool_relevance_op(x: torch.Tensor, R: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    # the kernels index R by x's shape: checked here too, so that a direct call of the registered op
    # can never read past R
    if x.dim() != 4 or kh < 1 or kw < 1 or tuple(R.shape) != (x.shape[0], x.shape[1], x.shape[2] // kh, x.shape[3] // kw) \
            or R.dtype != x.dtype or x.dtype not in POOL_DTYPES:
        raise ShapeError(f"semlens::maxpool_relevance: x {list(x.shape)} {x.dtype}, R {list(R.shape)} {R.dtype} and "
                         f"window ({kh}, {kw}) do not fit; use ops.maxpool_relevance")
    name = _backend.choose(x.device)
    if x.numel() == 0:
        return torch.zeros(x.shape, dtype=R.dtype, device=x.device)
    return _backend.module(name).maxpool.maxpool_relevance(x, R, (kh, kw))


@_maxpool_relevance_op.register_fake
def _(x, R, kh, kw):
    return torch.empty(x.shape, dtype=R.dtype, device=x.device)
