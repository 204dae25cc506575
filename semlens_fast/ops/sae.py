"""Fused SAE encode + token pooling + streaming top-k: :func:`sae_topk_update`.

For a sparse autoencoder with encoder ``W_enc [d, L]``, ``b_enc [L]`` (optional ``b_dec [d]``,
ReLU or JumpReLU), the op merges, for every latent ``l``, the pooled activation of each sample
of ``x [B, T, d]`` (or ``[B, d]``) into a :class:`~semlens_fast.ops.TopKState` with ``L``
channels, working through the latents in tiles: the ``[B, T, L]`` latent activations are never
materialised (the fast backends keep a ``[rows, tile]`` block; memory ``O(B T d + threads (d + T)
tile)`` plus the state).

**The result, defined exactly** (every backend returns it bit for bit):

1. ``xf = float32(x)``; with ``b_dec``, ``xf = xf - float32(b_dec)`` (IEEE float32 subtraction).
2. ``pre[b, t, l] = float32(s)`` with ``s`` accumulated in **float64, sequentially**:
   ``s = 0; for i in 0 .. d-1: s += float64(xf[b, t, i]) * float64(W_enc[i, l])``, then
   ``s += float64(b_enc[l])``, rounded once to float32 (every product is exact in float64).
3. ``relu``: ``a = pre if pre > 0 else +0.0``; ``jumprelu``: ``a = pre if pre > threshold[l]
   and pre > 0 else +0.0`` (the Gemma-Scope / SAELens JumpReLU); NaN ``pre`` gives NaN ``a``.
4. Pooling over the sample's **valid** tokens (``mask [B, T]`` True; all tokens without a mask):
   ``max``: the largest ``a`` (NaN if any is NaN), position = first token index reaching it
   (``0`` for ``[B, d]`` inputs); ``sum``: float64 sum over t ascending, rounded once;
   ``mean``: that float64 sum / the number of valid tokens, rounded once (positions ``-1``). A
   sample without valid tokens pools to NaN.
5. Merge into the state as :func:`~semlens_fast.ops.pool_topk_update` does (value desc, lower
   id first; NaN counted in ``nan_counts``, never entered).

**How the fast backends reach it** (C++ and Triton): a float32 pass (SIMD FMA micro-kernel on
the CPU, ``tl.dot`` in IEEE fp32 on CUDA) computes approximate pre-activations ``p~`` tile by
tile, with the proven bound ``|pre - p~| <= eps = c2 |p~| + c1 (|x_row| |W_l| + |b_l|) + c0``
(``c1 = (2 (d + 2) + 8) 2^-24``, ``c2 = 2^-22``, ``c0 = (d + 2) 2^-125``: float32 summation in
any order, Cauchy-Schwarz, the float64 reference and its rounding, with a factor 2 to spare).
Since ReLU/JumpReLU are monotone, ``act(p~ + eps)`` bounds each activation from above and
``act(p~ - eps)`` from below. A (sample, latent) pair whose pooled upper bound is below the
latent's current k-th value cannot enter and is skipped; the others (all of them while a list
is not full, rarely afterwards) are recomputed by the definition above (float64, in order),
only for the tokens that can still be the maximum. Non-finite approximations send the pair to
the exact path. The float32 pass therefore only decides *what to recompute*, never the result.
"""
from __future__ import annotations

from typing import Literal

import torch

from ..errors import ArgumentError, DeviceError, DTypeError, ShapeError
from . import _backend
from .topk import ACT_DTYPES, TopKState, _check_ids, check_batch_ids, check_state

SAE_POOLS = ("max", "mean", "sum")
ACTIVATIONS = ("relu", "jumprelu")
U = 2.0**-24


def eps_constants(d: int) -> tuple[float, float, float]:
    """``(c0, c1, c2)`` of the float32 error bound (see the module docstring)."""
    return (d + 2) * 2.0**-125, (2.0 * (d + 2) + 8.0) * U, 4.0 * U


def sum_bound_factor(T: int) -> float:
    """Relative slack that turns a float32 sum of ``T`` non-negative upper bounds into a bound of
    the float64 sum of their exact values, rounded (``(2T + 8) 2^-24``)."""
    return 1.0 + (2.0 * T + 8.0) * U


def _check_float(t: object, name: str, shape: tuple[int, ...] | None, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in ACT_DTYPES:
        raise DTypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise ShapeError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise DeviceError(f"{name} is on {t.device}, expected {device} like the state")
    return t


def _check_finite(t: torch.Tensor, name: str) -> None:
    s = t.float().sum()
    if bool(torch.isfinite(s)):
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        where = torch.nonzero(bad)[:5].tolist()
        raise ArgumentError(
            f"{name} (shape {tuple(t.shape)}) holds {int(bad.sum())} non-finite value(s) (NaN/inf), e.g. at {where}; "
            "SAE weights must be finite"
        )


def sae_topk_update(
    state: TopKState,
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    sample_ids: torch.Tensor,
    *,
    pool: Literal["max", "mean", "sum"] = "max",
    activation: Literal["relu", "jumprelu"] = "relu",
    threshold: torch.Tensor | None = None,
    b_dec: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> TopKState:
    """Encode ``x`` with an SAE, pool each latent over tokens and merge into ``state`` in place.

    Args:
        state: a :class:`TopKState` with ``L`` channels (one per latent).
        x: ``[B, T, d]`` token activations or ``[B, d]`` (float32/float16/bfloat16).
        W_enc: ``[d, L]``; b_enc: ``[L]``; threshold: ``[L]`` (JumpReLU only); b_dec: ``[d]``
            subtracted from ``x`` first (SAELens ``apply_b_dec_to_input``).
        sample_ids: ``[B]`` ids (>= 0, unique over the stream; negative or repeated ids
            within the batch raise ArgumentError, the state untouched).
        pool: ``"max"`` (keeps the token position), ``"mean"`` or ``"sum"`` over valid tokens.
        mask: ``[B, T]`` bool (True = real token), for 3-D ``x`` only.

    Returns ``state``. The exact arithmetic is defined in the module docstring. Weights holding
    NaN/inf raise :class:`ArgumentError`; non-finite ``x`` is allowed (NaN pools are counted).
    """
    check_state(state)
    dev = state.device
    if pool not in SAE_POOLS:
        raise ArgumentError(f"pool must be one of {', '.join(SAE_POOLS)}, got {pool!r}")
    if activation not in ACTIVATIONS:
        raise ArgumentError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    x = _check_float(x, "x", None, dev)
    if x.dim() not in (2, 3):
        raise ShapeError(f"x must be [B, T, d] (tokens) or [B, d], got shape {tuple(x.shape)}")
    d = int(x.shape[-1])
    W_enc = _check_float(W_enc, "W_enc", None, dev)
    if W_enc.dim() != 2 or W_enc.shape[0] != d:
        raise ShapeError(f"W_enc must be [d, L] = [{d}, {state.channels}] (d from x of shape {tuple(x.shape)}), got {tuple(W_enc.shape)}")
    L = int(W_enc.shape[1])
    if L != state.channels:
        raise ShapeError(f"W_enc has L = {L} latents (shape {tuple(W_enc.shape)}) but the state has {state.channels} channels")
    b_enc = _check_float(b_enc, "b_enc", (L,), dev)
    if b_dec is not None:
        b_dec = _check_float(b_dec, "b_dec", (d,), dev)
    if activation == "jumprelu":
        if threshold is None:
            raise ArgumentError("activation='jumprelu' needs threshold= [L], one threshold per latent")
        threshold = _check_float(threshold, "threshold", (L,), dev)
    elif threshold is not None:
        raise ArgumentError("threshold= is only used with activation='jumprelu'")
    B = int(x.shape[0])
    if mask is not None:
        if x.dim() != 3:
            raise ShapeError(f"mask is for [B, T, d] inputs; x has shape {tuple(x.shape)}")
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(x.shape[:2]):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ShapeError(f"mask must be [B, T] = {tuple(x.shape[:2])}, got {got}")
        if mask.device != dev:
            raise DeviceError(f"mask is on {mask.device}, expected {dev}")
        mask = mask.to(torch.bool)
    ids = _check_ids(sample_ids, B, dev)
    if B == 0 or L == 0:
        for t, name in ((W_enc, "W_enc"), (b_enc, "b_enc"), (b_dec, "b_dec"), (threshold, "threshold")):
            if t is not None:
                _check_finite(t, name)
        return state
    if x.dim() == 3 and x.shape[1] == 0:
        raise ShapeError(f"x has 0 tokens (shape {tuple(x.shape)}); pooling needs at least one")
    torch.ops.semlens.sae_topk_update_(state.values, state.ids, state.positions, state.nan_counts,
                                       x, W_enc, b_enc, ids, pool, activation, threshold, b_dec, mask)
    return state


# The registered op (the pattern of :mod:`semlens_fast.ops.topk`, "registered torch ops"): the
# public function above checks metadata only, so it traces; the checks that read the data
# (finite weights, non-negative and distinct ids) run here, before any backend.

@torch.library.custom_op("semlens::sae_topk_update_", mutates_args=("values", "ids", "positions", "nan_counts"))
def _sae_topk_update_op(values: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, nan_counts: torch.Tensor,
                        x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, sample_ids: torch.Tensor,
                        pool: str, activation: str, threshold: torch.Tensor | None, b_dec: torch.Tensor | None,
                        mask: torch.Tensor | None) -> None:
    """Encode, pool and merge into the state in place (validated by :func:`sae_topk_update`)."""
    for t, name in ((W_enc, "W_enc"), (b_enc, "b_enc"), (b_dec, "b_dec"), (threshold, "threshold")):
        if t is not None:
            _check_finite(t, name)
    check_batch_ids(sample_ids)  # >= 0 and distinct within the batch
    state = TopKState(values, ids, positions, nan_counts)
    name = _backend.choose(state.device)
    _backend.module(name).sae.sae_topk_update(state, x, W_enc, b_enc, sample_ids, pool, activation, threshold, b_dec, mask)


@_sae_topk_update_op.register_fake
def _(values, ids, positions, nan_counts, x, W_enc, b_enc, sample_ids, pool, activation, threshold, b_dec, mask) -> None:
    return None
