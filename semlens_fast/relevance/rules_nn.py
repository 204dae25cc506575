"""Rules for the layers of transformers, recurrent nets and token models.

* :class:`SoftmaxLRP` — AttnLRP's softmax rule (Achtibat et al. 2024, Prop. 3.1).
* :class:`LayerNormLRP` — AttnLRP/LXT's LayerNorm (and GroupNorm) rule: the standard
  deviation is a constant (identity rule on ``1/std``), the mean subtraction and the affine
  map get the epsilon rule.
* :class:`ScaledDotProductAttention` — ``F.scaled_dot_product_attention`` decomposed into
  its matrix products (:class:`~.rules.Product`), the softmax (a rule chosen by the rule
  set) and the mask.
* :class:`Embedding` — relevance of each token: the relevance of its embedding vector, summed.
* :class:`Recurrent` — ``nn.LSTM`` / ``nn.GRU`` (and ``aten.lstm`` / ``aten.gru``): gates are
  constants ("signal takes all", Arras et al. 2017); the cell sums and the affine maps get the
  rule set's proportional (DLBacktrace) or epsilon (LRP) rule.
* :class:`EvalIdentity` — stochastic depth and dropout: the identity in eval mode, an error
  in training mode.

All rules are batched and device-agnostic; formulas are in ``docs/relevance.md``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ArgumentError, ShapeError
from .rules import NodeContext, Rule, _op_name, _safe_div, stabilize

__all__ = ["SoftmaxLRP", "LayerNormLRP", "ScaledDotProductAttention", "Embedding", "Recurrent", "EvalIdentity",
           "Refuse", "split_sum"]

_aten = torch.ops.aten


def _packet(t: Any) -> Any:
    return getattr(t, "overloadpacket", None)


def split_sum(mode: str, a: Tensor, b: Tensor, R: Tensor, epsilon: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Split the relevance ``R`` of ``y = a + b`` between the two terms.

    ``"abs"`` (DLBacktrace): ``|a| / (|a| + |b|)``; ``"z"`` (LRP epsilon): ``a / stabilize(a + b)``;
    ``"equal"``: half each."""
    if mode == "abs":
        s = _safe_div(R, a.abs() + b.abs())
        return a.abs() * s, b.abs() * s
    if mode == "z":
        s = R / stabilize(a + b, epsilon)
        return a * s, b * s
    if mode == "equal":
        return R / 2, R / 2
    raise ArgumentError(f"split mode {mode!r}: expected 'abs', 'z' or 'equal'")


def _softmax_dim(ctx: NodeContext) -> int:
    m = ctx.module
    dim = m.dim if isinstance(m, nn.Softmax) else ctx.arg("dim", 1)
    if dim is None:
        raise ArgumentError(f"softmax at {ctx.name!r}: no dim given (implicit-dim softmax is not supported)")
    return int(dim)


def softmax_lrp(x: Tensor, s: Tensor, R: Tensor, dim: int) -> Tensor:
    """AttnLRP Prop. 3.1: ``R_in = x * (R - s * sum_dim R)`` (``-inf`` logits count as 0)."""
    xz = torch.where(torch.isinf(x), torch.zeros_like(x), x)
    return xz * (R - s * R.sum(dim, keepdim=True))


class SoftmaxLRP(Rule):
    """AttnLRP's softmax rule (deep Taylor decomposition at ``x`` with the bias term, Achtibat
    et al. 2024, Prop. 3.1; LXT ``softmax_fn``): ``R_i = x_i (R_i - s_i sum_j R_j)`` along the
    softmax dimension, with ``s = softmax(x)`` and masked ``-inf`` logits counted as 0. Not
    conserving (the bias term of the decomposition absorbs the rest)."""

    def backward(self, ctx: NodeContext, R: Tensor) -> list[Tensor | None]:
        x, s = ctx.inputs[0], ctx.output
        return [softmax_lrp(x, s, R, _softmax_dim(ctx))] + [None] * (len(ctx.inputs) - 1)


def _norm_params(ctx: NodeContext) -> tuple[str, Any, Tensor | None, Tensor | None, float]:
    """(kind, normalized_shape or groups, weight, bias, eps) of a LayerNorm/GroupNorm node."""
    m, t = ctx.module, ctx.target
    if isinstance(m, nn.LayerNorm):
        return "layer", tuple(m.normalized_shape), m.weight, m.bias, m.eps
    if isinstance(m, nn.GroupNorm):
        return "group", m.num_groups, m.weight, m.bias, m.eps
    if t is F.layer_norm or _packet(t) is _aten.layer_norm:
        shape = ctx.arg("normalized_shape", 1)
        return "layer", tuple(shape), ctx.arg("weight", 2), ctx.arg("bias", 3), float(ctx.arg("eps", 4, 1e-5))
    if t is F.group_norm or _packet(t) is _aten.group_norm:
        return "group", int(ctx.arg("num_groups", 1)), ctx.arg("weight", 2), ctx.arg("bias", 3), \
            float(ctx.arg("eps", 4, 1e-5))
    raise ArgumentError(f"LayerNormLRP applied to {ctx.name!r} ({_op_name(ctx)}); expected LayerNorm or GroupNorm")


class LayerNormLRP(Rule):
    """AttnLRP / LXT rule for ``LayerNorm`` and ``GroupNorm``: the standard deviation is held
    constant (identity rule on ``1/std``, AttnLRP Prop. 3.4) and the remaining linear map
    ``y = (x - mean(x)) w / std + b`` gets the epsilon rule:
    ``R_x = x * J^T (R / stabilize(y))`` with ``J = w/std (I - 1/N)``, i.e.
    ``R_x = x (u - mean(u))``, ``u = w R / (std stabilize(y))``. The bias absorbs its share."""

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = epsilon

    def backward(self, ctx: NodeContext, R: Tensor) -> list[Tensor | None]:
        x = ctx.inputs[0]
        kind, spec, w, _b, eps = _norm_params(ctx)
        g = R / stabilize(ctx.output, self.epsilon)
        if kind == "layer":
            dims = tuple(range(x.dim() - len(spec), x.dim()))
            var = x.var(dims, unbiased=False, keepdim=True)
            u = g / torch.sqrt(var + eps)
            if w is not None:
                u = u * w
            return [x * (u - u.mean(dims, keepdim=True))] + [None] * (len(ctx.inputs) - 1)
        G = spec
        B, C = x.shape[:2]
        xg = x.reshape(B, G, -1)
        std = torch.sqrt(xg.var(-1, unbiased=False, keepdim=True) + eps)
        wv = w.view(1, C, *([1] * (x.dim() - 2))) if w is not None else 1.0
        u = (g * wv).reshape(B, G, -1) / std
        r = x * (u - u.mean(-1, keepdim=True)).reshape(x.shape)
        return [r] + [None] * (len(ctx.inputs) - 1)


class ScaledDotProductAttention(Rule):
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=0, is_causal, scale, enable_gqa)``
    decomposed: ``S0 = scale q k^T``, ``S = S0 + mask`` (boolean masks and ``is_causal`` set
    ``-inf``), ``A = softmax(S)``, ``y = A v``.

    * ``y = A v``: :class:`~.rules.Product` — half of each term's share to ``A``, half to ``v``;
    * ``A = softmax(S)``: ``softmax="pass"`` (DLBacktrace: relevance passes) or ``"lrp"``
      (:class:`SoftmaxLRP`);
    * ``S = S0 + mask`` (a float mask): split by ``add`` (``"abs"``/``"z"``/``"equal"``); the
      mask's share is dropped (it is a constant); a boolean mask passes everything to ``S0``;
    * ``S0 = scale q k^T``: Product, half to ``q``, half to ``k``.

    Grouped-query attention (``enable_gqa``): the repeated key/value heads' relevance is summed
    back to the shared head. Dropout must be off (eval)."""

    def __init__(self, softmax: str = "pass", add: str = "abs", epsilon: float = 1e-9) -> None:
        if softmax not in ("pass", "lrp"):
            raise ArgumentError(f"ScaledDotProductAttention: softmax={softmax!r}; expected 'pass' or 'lrp'")
        self.softmax, self.add, self.epsilon = softmax, add, epsilon

    def backward(self, ctx: NodeContext, R: Tensor) -> list[Tensor | None]:
        q, k, v = ctx.arg("query", 0), ctx.arg("key", 1), ctx.arg("value", 2)
        mask = ctx.arg("attn_mask", 3)
        if float(ctx.arg("dropout_p", 4, 0.0) or 0.0) != 0.0:
            raise ArgumentError(f"attention at {ctx.name!r}: dropout_p must be 0 (call model.eval() and pass "
                                f"dropout_p=0 outside training)")
        causal = bool(ctx.arg("is_causal", 5, False))
        scale = ctx.arg("scale", 6)
        gqa = bool(ctx.arg("enable_gqa", 7, False))
        E = q.shape[-1]
        sc = float(scale) if scale is not None else E ** -0.5
        rep = 1
        if q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
            if not gqa and k.shape[-3] != 1:
                raise ShapeError(f"attention at {ctx.name!r}: query has {q.shape[-3]} heads, key {k.shape[-3]}")
            rep = q.shape[-3] // k.shape[-3]
        kk = k.repeat_interleave(rep, -3) if rep > 1 else k
        vv = v.repeat_interleave(rep, -3) if rep > 1 else v
        S0 = (q @ kk.transpose(-2, -1)) * sc
        L, Sk = S0.shape[-2:]
        S = S0
        fmask = None
        if causal:
            keep = torch.ones(L, Sk, dtype=torch.bool, device=q.device).tril()
            S = S.masked_fill(~keep, float("-inf"))
        if mask is not None:
            if mask.dtype == torch.bool:
                S = S.masked_fill(~mask, float("-inf"))
            else:
                fmask = mask
                S = S + mask
        A = torch.softmax(S, -1)
        A = torch.nan_to_num(A, nan=0.0)
        y = A @ vv
        s = R / (2 * stabilize(y, self.epsilon))
        R_A = A * (s @ vv.transpose(-2, -1))
        R_v = vv * (A.transpose(-2, -1) @ s)
        R_S = R_A if self.softmax == "pass" else softmax_lrp(S, A, R_A, -1)
        if fmask is not None:
            fm = torch.broadcast_to(fmask, S0.shape)
            fin = torch.isfinite(fm)
            r0, _ = split_sum(self.add, S0, torch.where(fin, fm, torch.zeros_like(fm)), R_S)
            R_S0 = torch.where(fin, r0, torch.zeros_like(r0))
        else:
            R_S0 = R_S
        s2 = R_S0 / (2 * stabilize(S0, self.epsilon))
        R_q = q * (s2 @ kk) * sc
        R_k = kk * (s2.transpose(-2, -1) @ q) * sc
        if rep > 1:
            R_k = R_k.unflatten(-3, (k.shape[-3], rep)).sum(-3)
            R_v = R_v.unflatten(-3, (v.shape[-3], rep)).sum(-3)
        by_slot = {0: R_q, "query": R_q, 1: R_k, "key": R_k, 2: R_v, "value": R_v}
        out: list[Tensor | None] = []
        for x, slot in zip(ctx.inputs, ctx.slots):
            r = by_slot.get(slot)
            out.append(None if r is None else _sum_to(r, x.shape))
        return out


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    from .rules import _sum_to_shape

    return _sum_to_shape(t, shape)


class Embedding(Rule):
    """Token embedding lookup (``nn.Embedding``, ``F.embedding``, ``aten.embedding``): each
    token id gets the relevance of its embedding vector, summed over the embedding dimension
    (the id's relevance has the shape of the ids). Conserving."""

    integer_inputs = True

    def backward(self, ctx: NodeContext, R: Tensor) -> list[Tensor | None]:
        out: list[Tensor | None] = []
        for x in ctx.inputs:
            if x.is_floating_point():  # a floating input is the weight table, never variable in practice
                out.append(None)
            else:
                out.append(R.sum(-1).reshape(x.shape))
        return out


class EvalIdentity(Rule):
    """Stochastic depth (``torchvision.ops.stochastic_depth``) and dropout: the identity in
    eval mode (relevance passes unchanged); an error in training mode, where the op is random.

    ``training`` is read from the module (``.training``) or from the call's ``training``/``train``
    argument at position ``pos``."""

    def __init__(self, pos: int = 3) -> None:
        self.pos = pos

    def backward(self, ctx: NodeContext, R: Tensor) -> list[Tensor | None]:
        m = ctx.module
        if m is not None:
            training = bool(getattr(m, "training", False)) and float(getattr(m, "p", 1.0)) > 0
        else:
            training = bool(ctx.kwargs.get("training", ctx.kwargs.get("train", ctx.args[self.pos] if
                                                                      len(ctx.args) > self.pos else True)))
            p = ctx.arg("p", 1, 1.0)
            training = training and float(p) > 0
        if training:
            raise ArgumentError(f"{_op_name(ctx)} at {ctx.name!r} runs in training mode (random); call "
                                f"model.eval() before computing relevance")
        if R.shape != ctx.inputs[0].shape:
            raise ShapeError(f"{_op_name(ctx)} at {ctx.name!r}: relevance of shape {tuple(R.shape)} for an input "
                             f"of shape {tuple(ctx.inputs[0].shape)}")
        return [R] + [None] * (len(ctx.inputs) - 1)


class Refuse(Rule):
    """An op a rule set deliberately does not handle: an :class:`~.engine.UnsupportedOpError`
    with the reason, instead of a result that would silently differ from what the rule set
    promises (e.g. :func:`~.composite.dlbacktrace_compat` on a matrix product)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def backward(self, ctx: NodeContext, R: Tensor) -> list[Tensor | None]:
        from .engine import UnsupportedOpError

        raise UnsupportedOpError(f"{_op_name(ctx)} at {ctx.name!r}: {self.reason}")


# ----------------------------------------------------------------------------------
# recurrent layers
# ----------------------------------------------------------------------------------
def _rnn_config(ctx: NodeContext) -> dict[str, Any]:
    m, t = ctx.module, ctx.target
    if isinstance(m, (nn.LSTM, nn.GRU)):
        if getattr(m, "proj_size", 0):
            raise ArgumentError(f"LSTM at {ctx.name!r}: proj_size > 0 is not supported")
        kind = "lstm" if isinstance(m, nn.LSTM) else "gru"
        x = ctx.arg("input", 0)
        if not isinstance(x, Tensor):
            raise ArgumentError(f"{type(m).__name__} at {ctx.name!r}: packed sequences are not supported; pass a "
                                f"padded tensor")
        hx = ctx.arg("hx", 1)
        w = list(m._flat_weights)
        per = 4 if m.bias else 2
        params = [tuple(w[i * per:(i + 1) * per]) for i in range(len(w) // per)]
        if kind == "lstm":
            h0, c0 = (hx if hx is not None else (None, None))
        else:
            h0, c0 = hx, None
        return dict(kind=kind, x=x, h0=h0, c0=c0, params=params, layers=m.num_layers,
                    bidir=m.bidirectional, batch_first=m.batch_first, hidden=m.hidden_size, bias=m.bias)
    pk = _packet(t)
    if pk in (_aten.lstm, _aten.gru):
        kind = "lstm" if pk is _aten.lstm else "gru"
        x, hx, w = ctx.args[0], ctx.args[1], list(ctx.args[2])
        if not isinstance(x, Tensor) or not isinstance(w[0], Tensor) or len(ctx.args) < 9:
            raise ArgumentError(f"{_op_name(ctx)} at {ctx.name!r}: only the padded-input overload is supported")
        bias, layers, _drop, train, bidir, bf = ctx.args[3:9]
        if train:
            raise ArgumentError(f"{_op_name(ctx)} at {ctx.name!r} runs in training mode; call model.eval()")
        per = 4 if bias else 2
        params = [tuple(w[i * per:(i + 1) * per]) for i in range(len(w) // per)]
        h0, c0 = (hx[0], hx[1]) if kind == "lstm" else (hx, None)
        return dict(kind=kind, x=x, h0=h0, c0=c0, params=params, layers=int(layers), bidir=bool(bidir),
                    batch_first=bool(bf), hidden=params[0][1].shape[1], bias=bool(bias))
    raise ArgumentError(f"Recurrent rule applied to {ctx.name!r} ({_op_name(ctx)}); expected nn.LSTM or nn.GRU")


def _lin(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return F.linear(x, w, b)


class Recurrent(Rule):
    """``nn.LSTM`` / ``nn.GRU`` (any number of layers, bidirectional, ``batch_first`` or not,
    initial states) and ``aten.lstm`` / ``aten.gru`` from ``torch.export``.

    The layer is re-run step by step (same weights, same values), then relevance goes back in
    time. Gates (sigmoids ``i, f, o`` of the LSTM, ``r, z`` of the GRU) are constants: the
    signal they scale takes all of the product's relevance (Arras et al. 2017). For the LSTM:
    ``h_t = o tanh(c_t)`` gives all of ``R(h_t)`` to ``c_t``; ``c_t = f c_{t-1} + i g`` is split
    between ``c_{t-1}`` and ``g`` by ``split`` (``"abs"`` DLBacktrace, ``"z"`` LRP); ``g = tanh(W x_t
    + U h_{t-1} + b)`` passes through tanh and its affine map gives each input its share —
    ``|w x| / (sum |w x| + |b|)`` (``affine="dlb"``) or ``w x / stabilize(z)`` (``affine="lrp"``). For
    the GRU: ``h_t = (1 - z) n + z h_{t-1}`` is split the same way; ``n = tanh(W_n x + b_n + r (U_n
    h + c_n))`` is one affine map of ``x`` and ``h`` with rows of ``U_n`` scaled by ``r``. Biases and
    constant initial states keep their shares."""

    def __init__(self, mode: str = "dlb", epsilon: float = 1e-6) -> None:
        if mode not in ("dlb", "lrp"):
            raise ArgumentError(f"Recurrent: mode={mode!r}; expected 'dlb' or 'lrp'")
        self.mode, self.epsilon = mode, epsilon

    def _split(self, a: Tensor, b: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
        return split_sum("abs" if self.mode == "dlb" else "z", a, b, R, self.epsilon)

    def _affine(self, x: Tensor, W1: Tensor, h: Tensor, W2: Tensor, rs: Tensor | None, bias: Tensor | float,
                z: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
        """Relevance of ``x`` and ``h`` for ``z = W1 x + rs * (W2 h) + bias`` (``rs`` per-unit scale)."""
        if self.mode == "dlb":
            ha = h.abs() @ W2.abs().t()
            den = x.abs() @ W1.abs().t() + (ha * rs if rs is not None else ha) + \
                (bias.abs() if isinstance(bias, Tensor) else abs(bias))
            s = _safe_div(R, den)
            sh = s * rs if rs is not None else s
            return x.abs() * (s @ W1.abs()), h.abs() * (sh @ W2.abs())
        s = R / stabilize(z, self.epsilon)
        sh = s * rs if rs is not None else s
        return x * (s @ W1), h * (sh @ W2)

    def backward(self, ctx: NodeContext, R: Any) -> list[Tensor | None]:
        cfg = _rnn_config(ctx)
        kind, L, D, Hd = cfg["kind"], cfg["layers"], 2 if cfg["bidir"] else 1, cfg["hidden"]
        x = cfg["x"]
        unbatched = x.dim() == 2
        xb = x.unsqueeze(0) if unbatched else (x if cfg["batch_first"] else x.transpose(0, 1))
        B, T = xb.shape[:2]
        # output relevance: (out, (h_n, c_n)) / (out, h_n) for modules, flat tuples for aten ops
        parts = list(R) if isinstance(R, (tuple, list)) else [R]
        R_out = parts[0]
        rest = parts[1:]
        if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
            rest = list(rest[0])
        R_hn = rest[0] if rest else None
        R_cn = rest[1] if len(rest) > 1 else None

        def states(s: Tensor | None) -> Tensor:
            if s is None:
                return xb.new_zeros(L * D, B, Hd)
            return s.unsqueeze(1) if unbatched else s

        h0, c0 = states(cfg["h0"]), states(cfg["c0"])
        R_hn_b = states(R_hn) if R_hn is not None else None
        R_cn_b = states(R_cn) if R_cn is not None else None
        R_o = R_out.unsqueeze(0) if unbatched else (R_out if cfg["batch_first"] else R_out.transpose(0, 1))
        # ---- forward, recording each step
        inputs = [xb]
        caches: list[list[dict]] = []
        layer_in = xb
        for layer in range(L):
            outs = []
            for d in range(D):
                p = cfg["params"][layer * D + d]
                w_ih, w_hh = p[0], p[1]
                b_ih, b_hh = (p[2], p[3]) if cfg["bias"] else (None, None)
                h, c = h0[layer * D + d], c0[layer * D + d]
                order = range(T) if d == 0 else range(T - 1, -1, -1)
                steps: list[dict] = []
                hs: list[Tensor | None] = [None] * T
                for t in order:
                    xt = layer_in[:, t]
                    gi, gh = _lin(xt, w_ih, b_ih), _lin(h, w_hh, b_hh)
                    if kind == "lstm":
                        ii, ff, gg, oo = (gi + gh).chunk(4, 1)
                        i_, f_, g_ = torch.sigmoid(ii), torch.sigmoid(ff), torch.tanh(gg)
                        c_new = f_ * c + i_ * g_
                        h_new = torch.sigmoid(oo) * torch.tanh(c_new)
                        steps.append(dict(t=t, x=xt, h=h, c=c, f=f_, i=i_, g=g_, zg=gg))
                        c = c_new
                    else:
                        i_r, i_z, i_n = gi.chunk(3, 1)
                        h_r, h_z, h_n = gh.chunk(3, 1)
                        r_, z_ = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
                        zn = i_n + r_ * h_n
                        n_ = torch.tanh(zn)
                        h_new = (1 - z_) * n_ + z_ * h
                        steps.append(dict(t=t, x=xt, h=h, r=r_, z=z_, n=n_, zn=zn))
                    hs[t] = h_new
                    h = h_new
                outs.append(torch.stack(hs, 1))  # type: ignore[arg-type]
                caches.append(steps)
            layer_in = torch.cat(outs, -1)
            inputs.append(layer_in)
        # ---- backward in time
        R_h0 = torch.zeros_like(h0)
        R_c0 = torch.zeros_like(c0)
        R_next = R_o
        for layer in range(L - 1, -1, -1):
            R_in = torch.zeros_like(inputs[layer])
            for d in range(D):
                p = cfg["params"][layer * D + d]
                w_ih, w_hh = p[0], p[1]
                b_ih, b_hh = (p[2], p[3]) if cfg["bias"] else (None, None)
                Rh_seq = R_next[..., d * Hd:(d + 1) * Hd]
                carry_h = R_hn_b[layer * D + d] if R_hn_b is not None else torch.zeros_like(h0[0])
                carry_c = R_cn_b[layer * D + d] if R_cn_b is not None else torch.zeros_like(h0[0])
                for st in reversed(caches[layer * D + d]):
                    t = st["t"]
                    Rh = Rh_seq[:, t] + carry_h
                    if kind == "lstm":
                        Rc = Rh + carry_c
                        rc_prev, rg = self._split(st["f"] * st["c"], st["i"] * st["g"], Rc)
                        carry_c = rc_prev
                        sl = slice(2 * Hd, 3 * Hd)
                        bias = 0.0
                        if b_ih is not None:
                            bias = b_ih[sl] + b_hh[sl]
                        rx, rh = self._affine(st["x"], w_ih[sl], st["h"], w_hh[sl], None, bias, st["zg"], rg)
                    else:
                        rn, rh_direct = self._split((1 - st["z"]) * st["n"], st["z"] * st["h"], Rh)
                        sl = slice(2 * Hd, 3 * Hd)
                        bias = 0.0
                        if b_ih is not None:
                            bias = b_ih[sl] + st["r"] * b_hh[sl]
                        rx, rh = self._affine(st["x"], w_ih[sl], st["h"], w_hh[sl], st["r"], bias, st["zn"], rn)
                        rh = rh + rh_direct
                    R_in[:, t] += rx
                    carry_h = rh
                R_h0[layer * D + d] = carry_h
                if kind == "lstm":
                    R_c0[layer * D + d] = carry_c
            R_next = R_in
        R_x = R_next.squeeze(0) if unbatched else (R_next if cfg["batch_first"] else R_next.transpose(0, 1))
        R_h0o = R_h0.squeeze(1) if unbatched else R_h0
        R_c0o = R_c0.squeeze(1) if unbatched else R_c0
        out: list[Tensor | None] = []
        state_seen = 0
        for inp, slot in zip(ctx.inputs, ctx.slots):
            if slot in (0, "input"):
                out.append(R_x)
            elif slot in (1, "hx"):
                out.append(R_h0o if state_seen == 0 else R_c0o)
                state_seen += 1
            else:
                out.append(None)
        return out
