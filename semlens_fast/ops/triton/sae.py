"""Triton (CUDA) backend of :func:`semlens_fast.ops.sae_topk_update`.

Two kernels and a merge, the same scheme as the C++ backend (see :mod:`semlens_fast.ops.sae`):

1. ``_sae_bound_kernel`` (grid: latent tiles x samples): ``tl.dot`` in IEEE float32 over tiles
   of ``[BT tokens, BD dims] x [BD, BL latents]``, then per (token, latent) the upper bound
   ``act(p~ + eps)`` and its max (or sum) over the sample's valid tokens: ``[B, L]`` bounds
   (NaN where an approximation is not finite). The ``[B, T, L]`` activations never leave the
   registers of a tile.
2. The (sample, latent) pairs whose bound reaches the latent's current k-th value (all of them
   while a list is not full) go to ``_sae_exact_kernel`` (one program per pair), which computes
   the pooled value by the definition: float64 accumulation in order over d, the bias, one
   rounding, the activation, then max with the first position or a float64 sum in token order.
3. The exact values of the candidates are merged into the state with the reference merge on the
   same device (a stable sort of ``[L, k + B]``).

Compiles ahead of time for sm_80/sm_90 (no module globals; constants are arguments). Tested on
the CPU under ``TRITON_INTERPRET=1`` (fp32/fp16 inputs; bf16 ``tl.dot`` is wrong in the
interpreter, and the inputs are converted to float32 here anyway).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import sae as _reference
from ..reference.sae import prepare_x
from ..reference.topk import _merge
from . import _launch
from ..sae import U, eps_constants
from ..topk import TopKState

_POOL = {"max": 0, "mean": 1, "sum": 3}


@triton.jit
def _sae_bound_kernel(
    x_ptr, valid_ptr, nx_ptr, w_ptr, b_ptr, gate_ptr, epsa_ptr, out_ptr,
    T, D, L, c0, c1, c2,
    POOL: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr,
):
    pid_l = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_l = pid_l * BL + tl.arange(0, BL)
    l_ok = offs_l < L
    bias = tl.load(b_ptr + offs_l, mask=l_ok, other=0.0)
    gate = tl.load(gate_ptr + offs_l, mask=l_ok, other=0.0)
    epsa = tl.load(epsa_ptr + offs_l, mask=l_ok, other=0.0)
    epsb = c1 * tl.abs(bias) + c0
    pooled = tl.zeros([BL], dtype=tl.float32)
    bad = tl.zeros([BL], dtype=tl.int32)
    for t0 in range(0, T, BT):
        offs_t = t0 + tl.arange(0, BT)
        t_ok = offs_t < T
        valid = tl.load(valid_ptr + b * T + offs_t, mask=t_ok, other=0) != 0
        nx = tl.load(nx_ptr + b * T + offs_t, mask=t_ok, other=0.0)
        acc = tl.zeros([BT, BL], dtype=tl.float32)
        for d0 in range(0, D, BD):
            offs_d = d0 + tl.arange(0, BD)
            d_ok = offs_d < D
            xt = tl.load(x_ptr + (b * T + offs_t[:, None]) * D + offs_d[None, :],
                         mask=t_ok[:, None] & d_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + offs_d[:, None] * L + offs_l[None, :], mask=d_ok[:, None] & l_ok[None, :], other=0.0)
            acc = tl.dot(xt, wt, acc, input_precision="ieee")
        approx = acc + bias[None, :]
        eps = tl.abs(approx) * c2 + (nx[:, None] * epsa[None, :] + epsb[None, :])
        ub = approx + eps
        z = ub - ub
        nonfinite = (z != z) & valid[:, None]
        bad = tl.maximum(bad, tl.max(nonfinite.to(tl.int32), axis=0))
        au = tl.where((ub > gate[None, :]) & valid[:, None], ub, 0.0)
        if POOL == 0:
            pooled = tl.maximum(pooled, tl.max(au, axis=0))
        else:
            pooled += tl.sum(au, axis=0)
    pooled = tl.where(bad > 0, float("nan"), pooled)
    tl.store(out_ptr + b * L + offs_l, pooled, mask=l_ok)


@triton.jit
def _sae_exact_kernel(
    x_ptr, valid_ptr, w_ptr, b_ptr, gate_ptr, cb_ptr, cl_ptr, val_ptr, pos_ptr,
    T, D, L,
    POOL: tl.constexpr, BT: tl.constexpr,
):
    c = tl.program_id(0)
    b = tl.load(cb_ptr + c)
    l = tl.load(cl_ptr + c)
    bias = tl.load(b_ptr + l).to(tl.float64)
    gate = tl.load(gate_ptr + l)
    best = tl.max(tl.full([BT], float("-inf"), tl.float32), axis=0)
    best_pos = tl.min(tl.zeros([BT], dtype=tl.int32), axis=0)
    has_nan = tl.max(tl.zeros([BT], dtype=tl.int32), axis=0)
    n = tl.sum(tl.zeros([BT], dtype=tl.int32), axis=0)
    s = tl.zeros([1], dtype=tl.float64)
    for t0 in range(0, T, BT):
        offs_t = t0 + tl.arange(0, BT)
        t_ok = offs_t < T
        valid = (tl.load(valid_ptr + b * T + offs_t, mask=t_ok, other=0) != 0) & t_ok
        acc = tl.zeros([BT], dtype=tl.float64)
        for i in range(0, D):  # sequential over d, one lane per token
            xi = tl.load(x_ptr + (b * T + offs_t) * D + i, mask=t_ok, other=0.0).to(tl.float64)
            wi = tl.load(w_ptr + i * L + l).to(tl.float64)
            acc += xi * wi
        pre = (acc + bias).to(tl.float32)
        a = tl.where(pre > gate, pre, 0.0)
        a = tl.where(pre != pre, pre, a)
        isn = (a != a) & valid
        has_nan = tl.maximum(has_nan, tl.max(isn.to(tl.int32), axis=0))
        n += tl.sum(valid.to(tl.int32), axis=0)
        if POOL == 0:
            am = tl.where(valid & (a == a), a, float("-inf"))
            m = tl.max(am, axis=0)
            p = tl.min(tl.where((am == m) & valid, offs_t, T), axis=0).to(tl.int32)
            upd = m > best
            best_pos = tl.where(upd, p, best_pos)
            best = tl.where(upd, m, best)
        else:
            a64 = tl.where(valid, a.to(tl.float64), 0.0)
            for j in range(0, BT):  # float64 sum in token order
                s += tl.sum(tl.where(tl.arange(0, BT) == j, a64, 0.0), axis=0)
    if POOL == 0:
        val = tl.where(has_nan > 0, float("nan"), best)
        tl.store(val_ptr + c, val)
        tl.store(pos_ptr + c, best_pos.to(tl.int32))
    else:
        tot = tl.sum(s, axis=0)
        if POOL == 1:
            tot = tot / n.to(tl.float64)
        tl.store(val_ptr + c, tot.to(tl.float32))
        tl.store(pos_ptr + c, -1)


BT, BD, BL, BT_EXACT = 16, 16, 64, 16


def sae_topk_update(state: TopKState, x, W_enc, b_enc, sample_ids, pool, activation, threshold, b_dec, mask) -> None:
    """The op on CUDA; the torch reference on the same device if a kernel cannot compile or launch."""
    args = (state, x, W_enc, b_enc, sample_ids, pool, activation, threshold, b_dec, mask)
    _launch.run_fn("sae._sae_kernels", pool, lambda: _reference.sae_topk_update(*args), lambda: _update(*args))


def _update(state: TopKState, x, W_enc, b_enc, sample_ids, pool, activation, threshold, b_dec, mask) -> None:
    # the state is modified only after the last launch (the fallback recomputes from it)
    dev = state.device
    xf = prepare_x(x, b_dec).contiguous()
    B, T, d = xf.shape
    L = int(W_enc.shape[1])
    valid = (mask if mask is not None else torch.ones(B, T, dtype=torch.bool, device=dev)).to(torch.int8).contiguous()
    nx = xf.square().sum(2).sqrt().contiguous()
    W = W_enc.float().contiguous()
    bias = b_enc.float().contiguous()
    gate = threshold.float().clamp(min=0).contiguous() if threshold is not None else torch.zeros(L, device=dev)
    c0, c1, c2 = eps_constants(d)
    epsa = (W.square().sum(0).sqrt() * c1).contiguous()
    ub = torch.empty(B, L, dtype=torch.float32, device=dev)
    _sae_bound_kernel[(triton.cdiv(L, BL), B)](
        xf, valid, nx, W, bias, gate, epsa, ub, T, d, L, c0, c1, c2,
        POOL=_POOL[pool], BT=BT, BD=BD, BL=BL,
    )
    n = valid.sum(1)
    empty = n == 0
    n_empty = int(empty.sum())
    theta = state.values[:, -1]
    ub64 = ub.double()
    if pool != "max":
        ub64 = ub64 * (1.0 + (2.0 * n.double().unsqueeze(1) + 8.0) * U)
        if pool == "mean":
            ub64 = ub64 / n.clamp(min=1).double().unsqueeze(1) * (1.0 + 4 * U)
    cand = (torch.isnan(ub) | (ub64 >= theta.double().unsqueeze(0))) & ~empty.unsqueeze(1)
    cb, cl = torch.nonzero(cand, as_tuple=True)
    nc = int(cb.numel())
    if nc == 0:
        state.nan_counts.add_(n_empty)
        return
    vals = torch.empty(nc, dtype=torch.float32, device=dev)
    pos = torch.empty(nc, dtype=torch.int32, device=dev)
    _sae_exact_kernel[(nc,)](
        xf, valid, W, bias, gate, cb.contiguous(), cl.contiguous(), vals, pos, T, d, L,
        POOL=_POOL[pool], BT=BT_EXACT,
    )
    state.nan_counts.add_(n_empty)
    cv = torch.full((L, B), float("-inf"), dtype=torch.float32, device=dev)
    ci = torch.full((L, B), -1, dtype=torch.int64, device=dev)
    cp = torch.full((L, B), -1, dtype=torch.int32, device=dev)
    cv[cl, cb] = vals
    ci[cl, cb] = sample_ids[cb]
    cp[cl, cb] = pos
    _merge(state, cv, ci, cp)


def compile_cases():
    """Every configuration the dispatcher can choose: ``(label, kernel, args, kwargs)`` (see
    :mod:`semlens_fast.ops.triton.aot`). Inputs reach the kernels as float32; the pooling is the
    only compile-time choice."""
    f32, i64, i32, i8 = torch.float32, torch.int64, torch.int32, torch.int8

    def t(dt):
        return torch.empty(1, dtype=dt)

    for pool, code in _POOL.items():
        args = (t(f32), t(i8), t(f32), t(f32), t(f32), t(f32), t(f32), t(f32), 128, 768, 16384, 1e-7, 1e-7, 1e-7)
        yield f"bound, pool {pool}", _sae_bound_kernel, args, dict(POOL=code, BT=BT, BD=BD, BL=BL)
        args = (t(f32), t(i8), t(f32), t(f32), t(f32), t(i64), t(i64), t(f32), t(i32), 128, 768, 16384)
        yield f"exact, pool {pool}", _sae_exact_kernel, args, dict(POOL=code, BT=BT_EXACT)
