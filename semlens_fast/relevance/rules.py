"""Relevance rules: one small class per way of redistributing relevance through one op.

A rule receives the :class:`NodeContext` of one node of the traced model (its module or
function, its evaluated inputs and output) and the relevance ``R`` at the node's output,
and returns the relevance of each *variable* tensor input (inputs that depend on the
model input; parameters and constants never receive relevance). All rules are batched
(the first dimension is the batch) and device-agnostic.

Notation: ``x`` input, ``y`` output, ``W``/``b`` weight and bias of an affine op
(``Linear``/``Conv{1,2,3}d``), ``z_ij = w_ij x_i`` the contribution of input ``i`` to
output unit ``j``, ``P_j = sum_i max(z_ij, 0)``, ``N_j = sum_i max(-z_ij, 0)``,
``R_j`` the relevance of output unit ``j``.

Rule families
-------------
* DLBacktrace default mode: :class:`DLBAffine`, :class:`DLBProportional` (average
  pooling, sums, means, residual additions), :class:`MaxPoolWinnerTakesAll`.
* DLBacktrace contrast mode: :class:`DLBContrastAffine` (two coupled streams).
* LRP: :class:`Epsilon`, :class:`ZPlus`, :class:`AlphaBeta`, :class:`Flat`,
  :class:`Norm` (zennit's names and formulas).
* Structural, exact: :class:`PassThrough` (elementwise activations), :class:`IndexMap`
  (reshape/flatten/permute/cat/slicing/expand: the vector-Jacobian product of an op whose
  Jacobian is a 0/1 index map), :class:`AddSplit`, :class:`MulHalf`, :class:`Product`
  (attention's bilinear ``matmul``).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ArgumentError, ShapeError
from ..ops.maxpool import maxpool_relevance
from ..ops.reference.maxpool import block_max

__all__ = [
    "NodeContext", "Rule", "PassThrough", "IndexMap", "DLBAffine", "DLBContrastAffine",
    "DLBProportional", "MaxPoolWinnerTakesAll", "UniformUpsample", "AddSplit", "MulHalf", "Product",
    "Epsilon", "ZPlus", "AlphaBeta", "Flat", "Norm", "ACTIVATION_RANGES", "stabilize",
]


def _float_dtype(g: Any) -> torch.dtype:
    """The floating dtype of a (possibly nested) gradient, float32 when it has none."""
    if isinstance(g, Tensor):
        return g.dtype if g.is_floating_point() else torch.float32
    if isinstance(g, (tuple, list)):
        for t in g:
            d = _float_dtype(t)
            if d is not torch.float32:
                return d
    return torch.float32


def stabilize(z: Tensor, eps: float = 1e-6) -> Tensor:
    """zennit's stabiliser: ``z + eps * sign(z)`` with ``sign(0) = +1`` (also for ``-0.0``)."""
    return torch.where(z >= 0, z + eps, z - eps)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with ``den == 0`` replaced by 1.

    Used only where ``den`` is a sum of non-negative terms (``|z|``, counts, ``|x|``) and the
    result is multiplied back by those terms: where ``den == 0`` every term is 0, so the
    unit passes nothing, exactly (no ``0/0``)."""
    return num / den.masked_fill(den == 0, 1)


def _sum_to_shape(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast result back to ``shape`` (the exact index map of broadcasting)."""
    if t.shape == shape:
        return t
    while t.dim() > len(shape):
        t = t.sum(0)
    dims = [i for i, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1]
    if dims:
        t = t.sum(dims, keepdim=True)
    return t.reshape(shape)


@dataclass
class NodeContext:
    """Everything a rule may need about one node of the traced model.

    Attributes:
        name: layer name (module path for modules, fx node name otherwise).
        kind: ``"call_module"``, ``"call_function"`` or ``"call_method"``.
        target: the module, the function, or the method name.
        module: the ``nn.Module`` for ``call_module`` nodes, else ``None``.
        inputs: the values of the node's variable tensor inputs, one per occurrence.
        output: the node's output value.
        call: ``call(*new_inputs)`` re-runs the node with its variable inputs replaced.
        activation: name of the bounded activation applied right after this node
            (``"tanh"``, ``"sigmoid"``, ``"softmax"``, ``"swish"``) or ``None``.
        activation_fn: that activation as a callable (for the non-monotone test).
        is_first: this is the first affine layer seen from the input.
        args, kwargs: the node's evaluated arguments (all of them, constants included).
        slots: for each entry of ``inputs``, where it sits among the arguments: the
            position in ``args`` (int) or the keyword (str).
    """

    name: str
    kind: str
    target: Any
    module: nn.Module | None
    inputs: list[Tensor]
    output: Any
    call: Callable[..., Any]
    activation: str | None = None
    activation_fn: Callable[[Tensor], Tensor] | None = None
    is_first: bool = False
    extra: dict = field(default_factory=dict)
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    slots: list = field(default_factory=list)

    def arg(self, name: str, pos: int, default: Any = None) -> Any:
        """The argument ``name`` (keyword) or at position ``pos``, else ``default``."""
        if name in self.kwargs:
            return self.kwargs[name]
        if 0 <= pos < len(self.args):
            return self.args[pos]
        return default

    def input_at(self, slot: int | str) -> int | None:
        """Index into ``inputs`` of the variable input at argument position/keyword ``slot``."""
        for i, s in enumerate(self.slots):
            if s == slot:
                return i
        return None

    def vjp(self, grad_out: Any, inputs: Sequence[Tensor] | None = None) -> list[Tensor]:
        """Vector-Jacobian product of the node at ``inputs`` (default: its own inputs).

        Integer inputs (token ids flowing through reshapes) are differentiated as float
        copies: only index ops are ever applied to them."""
        src = self.inputs if inputs is None else inputs
        fdt = _float_dtype(grad_out)
        xs = [(t if t.is_floating_point() else t.to(fdt)).detach().requires_grad_(True) for t in src]
        with torch.enable_grad():
            out = self.call(*xs)
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            gos = list(grad_out) if isinstance(grad_out, (tuple, list)) else [grad_out]
            pairs = [(o, g) for o, g in zip(outs, gos) if g is not None and isinstance(o, Tensor) and o.requires_grad]
            if not pairs:
                return [torch.zeros_like(x) for x in xs]
            grads = torch.autograd.grad([p[0] for p in pairs], xs, [p[1] for p in pairs], allow_unused=True)
        return [torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads)]


class Rule:
    """Base class. Subclasses implement :meth:`backward`.

    ``coupled = True`` marks a rule that needs all relevance streams at once (contrast
    mode); other rules are linear in ``R`` and are applied to each stream separately.
    """

    coupled: bool = False
    #: the rule can give relevance to integer inputs (token ids); other rules see only
    #: floating-point inputs
    integer_inputs: bool = False

    def backward(self, ctx: NodeContext, R: Any) -> list[Tensor | None]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


# ----------------------------------------------------------------------------------
# structural rules
# ----------------------------------------------------------------------------------
class PassThrough(Rule):
    """Identity: ``R_in = R_out`` for ops that keep the shape (elementwise activations,
    dropout, normalisations in DLBacktrace). A shape change is an error, never a silent fix."""

    def backward(self, ctx: NodeContext, R: Tensor) -> list[Tensor | None]:
        x = ctx.inputs[0]
        if R.shape != x.shape:
            raise ShapeError(
                f"pass-through at {ctx.name!r} ({_op_name(ctx)}): output relevance has shape {tuple(R.shape)} "
                f"but the input has shape {tuple(x.shape)}; pass-through is only valid for shape-preserving ops")
        return [R] + [None] * (len(ctx.inputs) - 1)


class IndexMap(Rule):
    """Exact index map for ops whose Jacobian is a 0/1 matrix (reshape, view, flatten,
    permute, transpose, squeeze, cat, stack, slicing, select, expand, split, chunk):
    ``R_in = J^T R_out`` (each input position gets the relevance of every output position it
    was copied to; broadcast copies are summed). Conserves relevance exactly. Also carries
    relevance along integer tensors (token ids reshaped before an embedding)."""

    integer_inputs = True

    def backward(self, ctx: NodeContext, R: Any) -> list[Tensor | None]:
        fast = _index_fast(ctx, R)
        if fast is not None:
            return fast
        return list(ctx.vjp(R))


_RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
             "_unsafe_view", "contiguous", "clone"}
_TRANSPOSES = {"transpose", "swapaxes", "t"}
_FUNC_NAMES = {torch.flatten: "flatten", torch.reshape: "reshape", torch.squeeze: "squeeze",
               torch.unsqueeze: "unsqueeze", torch.transpose: "transpose", torch.permute: "permute",
               torch.swapaxes: "swapaxes", torch.t: "t"}


def _index_fast(ctx: NodeContext, R: Any) -> list[Tensor | None] | None:
    """The vector-Jacobian product of pure reshapes and dimension permutations without autograd
    (transformer graphs have hundreds of them): the relevance reshaped back, or permuted by the
    inverse permutation. ``None`` for every other op."""
    if not isinstance(R, Tensor) or len(ctx.inputs) != 1 or not ctx.slots or ctx.slots[0] != 0:
        return None
    x = ctx.inputs[0]
    t = ctx.target
    if isinstance(t, nn.Module):
        name = "flatten" if isinstance(t, (nn.Flatten, nn.Unflatten)) else None
    elif isinstance(t, str):
        name = t
    elif getattr(t, "overloadpacket", None) is not None:
        name = t.overloadpacket.__name__
    else:
        name = _FUNC_NAMES.get(t)
    if name is None:
        return None
    if name in _RESHAPES:
        if R.numel() != x.numel():
            return None
        return [R.reshape(x.shape)]
    if name in _TRANSPOSES:
        if name == "t":
            return [R.t()] if x.dim() == 2 else [R]
        d0, d1 = ctx.args[1], ctx.args[2]
        return [R.transpose(d0, d1)]
    if name == "permute":
        dims = ctx.args[1] if len(ctx.args) == 2 and isinstance(ctx.args[1], (tuple, list)) else ctx.args[1:]
        dims = [int(d) % x.dim() for d in dims]
        inv = [0] * len(dims)
        for i, d in enumerate(dims):
            inv[d] = i
        return [R.permute(inv)]
    return None


class UniformUpsample(Rule):
    """dl-backtrace 0.1.24 behaviour for pooling, reproduced for agreement checks only.

    That engine has no pooling rule: its shape aligner (``align_relevance``) maps the
    output relevance to the input size by ``np.repeat`` along every axis whose size divides
    the input's, then, if the last two axes are still smaller, by ``np.tile`` (periodic
    copies — spatially scrambled) cropped to size, and finally rescales the *whole batch* so
    that its total is unchanged. Relevance thus reaches positions that did not win the max
    (max pooling) and ignores ``|x|`` (average pooling)."""

    def backward(self, ctx: NodeContext, R: Tensor) -> list[Tensor | None]:
        x = ctx.inputs[0]
        r = R
        for ax in range(r.dim()):
            dr, dt = r.shape[ax], x.shape[ax]
            if dt > dr and dt % dr == 0:
                r = r.repeat_interleave(dt // dr, dim=ax)
        if r.shape != x.shape:
            if r.dim() >= 2 and all(r.shape[i] < x.shape[i] for i in (-2, -1)) and r.shape[:-2] == x.shape[:-2]:
                reps = [-(-x.shape[i] // r.shape[i]) for i in (-2, -1)]
                r = r.repeat(*([1] * (r.dim() - 2)), *reps)[..., : x.shape[-2], : x.shape[-1]]
            else:
                raise ShapeError(f"UniformUpsample at {ctx.name!r}: cannot align relevance of shape "
                                 f"{tuple(R.shape)} to the input shape {tuple(x.shape)}")
        tot, new = R.sum(), r.sum()
        if not torch.isclose(new, tot, rtol=1e-3) and new > 0:
            r = r * (tot / (new + 1e-8))
        return [r]


class AddSplit(Rule):
    """Sum ``y = sum_k a_k`` (``add``, ``sub``, ``+`` with broadcasting; constant addends such
    as scalars or buffers receive nothing but keep their share).

    * ``mode="abs"`` (DLBacktrace): ``R_k = |a_k| / sum_l |a_l| * R`` — conserving when there
      is no constant addend.
    * ``mode="z"`` (LRP/zennit ``Norm`` on a sum): ``R_k = a_k / stabilize(y) * R``.
    * ``mode="equal"`` (dl-backtrace 0.1.24's ``wt_add_equal``): ``R_k = R / n``.
    Broadcast addends get the sum over their broadcast copies (exact index map).
    """

    def __init__(self, mode: str = "abs", epsilon: float = 1e-6) -> None:
        if mode not in ("abs", "z", "equal"):
            raise ArgumentError(f"AddSplit: mode={mode!r}; expected 'abs', 'z' or 'equal'")
        self.mode, self.epsilon = mode, epsilon

    def backward(self, ctx: NodeContext, R: Tensor) -> list[Tensor | None]:
        terms = ctx.extra.get("addends")
        if terms is None:
            raise ArgumentError(f"AddSplit at {ctx.name!r}: not an addition ({_op_name(ctx)})")
        # terms: list of (value, sign, input_index or None)
        if self.mode == "equal":
            n = len(ctx.inputs)
            out: list[Tensor | None] = [None] * n
            for v, s, idx in terms:
                if idx is not None:
                    out[idx] = _sum_to_shape(R / n, ctx.inputs[idx].shape)
            return out
        if self.mode == "abs":
            den = sum(torch.as_tensor(v).abs() if not isinstance(v, Tensor) else v.abs() for v, _, _ in terms)
            s = _safe_div(R, den)
            return self._spread(ctx, terms, lambda v, sg: v.abs() * s)
        y = ctx.output
        s = R / stabilize(y, self.epsilon)
        return self._spread(ctx, terms, lambda v, sg: sg * v * s)

    @staticmethod
    def _spread(ctx: NodeContext, terms: list, f: Callable) -> list[Tensor | None]:
        out: list[Tensor | None] = [None] * len(ctx.inputs)
        for v, sg, idx in terms:
            if idx is not None:
                r = _sum_to_shape(f(v, sg), ctx.inputs[idx].shape)
                out[idx] = r if out[idx] is None else out[idx] + r
        return out


class MulHalf(Rule):
    """Elementwise product ``y = a * b``: with two variable factors each gets ``R / 2``
    (dl-backtrace's ``wt_mul``); with one variable factor (scaling by a constant) it gets all of
    ``R`` (the contribution ``c * a`` is the whole output). Broadcasts are summed back."""

    def backward(self, ctx: NodeContext, R: Tensor) -> list[Tensor | None]:
        n = len(ctx.inputs)
        return [_sum_to_shape(R / n, x.shape) for x in ctx.inputs]


class Product(Rule):
    """Product rule for multilinear ops of variable tensors (``matmul``/``bmm``/``@``/``einsum``,
    as in attention ``softmax(QK^T) V``): every product term ``c = a_ij b_jk`` gets its share
    ``c / y * R`` of its output unit, split equally between its ``n`` variable factors:
    ``R_a = a * ((R / 2y) @ b^T)``, ``R_b = b * (a^T @ (R / 2y))`` for two (``y`` stabilised).
    This is DLBacktrace's attention rule and AttnLRP's rule for matrix products (epsilon
    then uniform). Conserves relevance: ``sum R_a + sum R_b = sum R``. With one variable
    factor (a product with a constant) it is LRP-0: ``R_a = a * J^T (R / y)``."""

    def __init__(self, epsilon: float = 1e-9) -> None:
        self.epsilon = epsilon

    def backward(self, ctx: NodeContext, R: Tensor) -> list[Tensor | None]:
        if len(ctx.inputs) == 1:  # product with a constant: all relevance to the variable factor
            return [ctx.inputs[0] * ctx.vjp(_safe_div(R, ctx.output))[0]]
        s = R / (len(ctx.inputs) * stabilize(ctx.output, self.epsilon))
        grads = ctx.vjp(s)
        return [x * g for x, g in zip(ctx.inputs, grads)]


# ----------------------------------------------------------------------------------
# affine ops (Linear / Conv): helpers
# ----------------------------------------------------------------------------------
def _affine_parts(ctx: NodeContext) -> tuple[Tensor, Tensor | None, Callable, Callable]:
    """(weight, bias, fwd(x, w[, bias]), bwd(s, w)) for ``nn.Linear`` and ``nn.Conv{1,2,3}d`` modules."""
    m = ctx.module
    x = ctx.inputs[0]
    if isinstance(m, nn.Linear):
        w, b = m.weight, m.bias

        def fwd(inp: Tensor, wt: Tensor, bias: Tensor | None = None) -> Tensor:
            return F.linear(inp, wt, bias)

        def bwd(s: Tensor, wt: Tensor) -> Tensor:
            return s @ wt
        return w, b, fwd, bwd
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if m.padding_mode != "zeros":
            raise ArgumentError(f"layer {ctx.name!r}: Conv padding_mode={m.padding_mode!r} is not supported "
                                f"(expected 'zeros')")
        nd = x.dim() - 2
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
        grad_in = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}[nd]
        kw = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
        shape = x.shape

        thin = _thin_conv(m, x)

        def fwd(inp: Tensor, wt: Tensor, bias: Tensor | None = None) -> Tensor:
            if thin:  # few input taps: one matrix product over unfolded patches beats the conv kernel
                cols = F.unfold(inp, wt.shape[-2:], dilation=m.dilation, padding=m.padding, stride=m.stride)
                out = wt.reshape(wt.shape[0], -1) @ cols
                if bias is not None:
                    out += bias[:, None]
                return out.view(inp.shape[0], wt.shape[0], *_conv_out_size(m, inp.shape[-2:]))
            return conv(inp, wt, bias, **kw)

        flip_pad = _flip_padding(m, wt_shape=m.weight.shape) if not isinstance(m.padding, str) else None

        def bwd(s: Tensor, wt: Tensor) -> Tensor:
            if thin:  # the adjoint of fwd's thin path: the transposed product, folded back (col2im)
                cols = wt.reshape(wt.shape[0], -1).t() @ s.reshape(s.shape[0], s.shape[1], -1)
                return F.fold(cols, tuple(shape[-2:]), wt.shape[-2:], dilation=m.dilation, padding=m.padding,
                              stride=m.stride)
            if isinstance(m.padding, str):  # "same"/"valid": transpose via autograd (the map is linear)
                z = torch.zeros(shape, dtype=s.dtype, device=s.device, requires_grad=True)
                with torch.enable_grad():
                    return torch.autograd.grad(conv(z, wt, None, **kw), z, s)[0]
            if flip_pad is not None:  # stride 1: the adjoint is a convolution with the flipped kernel
                r = conv(s, _cached(wt, "flip", _flipped) if wt.is_leaf else _flipped(wt), None, padding=flip_pad,
                         dilation=m.dilation)
                if r.shape == shape:
                    return r
            return grad_in(shape, wt, s, **kw)
        return m.weight, m.bias, fwd, bwd
    if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        if m.padding_mode != "zeros":
            raise ArgumentError(f"layer {ctx.name!r}: ConvTranspose padding_mode={m.padding_mode!r} is not "
                                f"supported (expected 'zeros')")
        nd = x.dim() - 2
        tconv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
        tkw = dict(stride=m.stride, padding=m.padding, output_padding=m.output_padding, groups=m.groups,
                   dilation=m.dilation)
        shape = x.shape

        def fwd(inp: Tensor, wt: Tensor, bias: Tensor | None = None) -> Tensor:
            return tconv(inp, wt, bias, **tkw)

        def bwd(s: Tensor, wt: Tensor) -> Tensor:
            # the adjoint of a transposed convolution is the convolution with the same weight
            r = conv(s, wt, None, stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
            if r.shape != shape:  # pragma: no cover - output_padding always stays below the stride
                z = torch.zeros(shape, dtype=s.dtype, device=s.device, requires_grad=True)
                with torch.enable_grad():
                    r = torch.autograd.grad(tconv(z, wt, None, **tkw), z, s)[0]
            return r
        return m.weight, m.bias, fwd, bwd
    raise ArgumentError(f"rule for affine layers applied to {ctx.name!r} ({_op_name(ctx)}); "
                        f"expected nn.Linear, nn.Conv1d/2d/3d or nn.ConvTranspose1d/2d/3d")


#: ``Conv2d`` layers with at most this many weights per output (in channels x kernel taps, e.g. a
#: grey-scale input layer) run their rule's products as unfold + matrix product (and its adjoint,
#: fold). Measured on one CPU thread for the 1-channel 3x3 input layer of the benchmark CNN
#: (batch 64, 28x28): the adjoint 1.6 ms against 7.1 ms for oneDNN's 1-output-channel convolution,
#: the whole DLBacktrace pass about 20 % faster (benchmarks/bench_relevance.py)
THIN_CONV_TAPS = 16


def _thin_conv(m: nn.Module, x: Tensor) -> bool:
    return (isinstance(m, nn.Conv2d) and x.dim() == 4 and m.groups == 1 and not isinstance(m.padding, str)
            and m.weight[0].numel() <= THIN_CONV_TAPS)


def _conv_out_size(m: nn.Module, hw: Sequence[int]) -> tuple[int, int]:
    k = m.weight.shape[-2:]
    p, d, s = _pair(m.padding, 2), _pair(m.dilation, 2), _pair(m.stride, 2)
    return tuple((hw[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1
                 for i in range(2))  # type: ignore[return-value]


def _flip_padding(m: nn.Module, wt_shape: torch.Size) -> tuple[int, ...] | None:
    """Padding of the flipped-kernel convolution that computes the adjoint of ``m`` (stride 1,
    one group, numeric padding ``p <= d (k - 1)``), else ``None``."""
    if m.groups != 1 or any(st != 1 for st in m.stride):
        return None
    ks = wt_shape[2:]
    pads = tuple(d * (k - 1) - p for k, p, d in zip(ks, m.padding, m.dilation))
    return pads if all(p >= 0 for p in pads) else None


_CACHE: dict[tuple[int, str], tuple[Any, int, Tensor]] = {}


def _cached(w: Tensor, kind: str, make: Callable[[Tensor], Tensor]) -> Tensor:
    """``make(w)`` (``|W|``, the flipped kernel), kept while ``w`` lives and is not modified in
    place (its version counter): weights are reused across calls, so this is computed once."""
    import weakref

    key = (id(w), kind)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is w and hit[1] == w._version:
        return hit[2]
    out = make(w)
    try:
        # the callback holds the dict itself (module globals may be gone at interpreter exit) and drops
        # only its own entry (a new tensor may have been cached under the same id meanwhile)
        ref = weakref.ref(w, lambda r, k=key, c=_CACHE: c.pop(k) if c.get(k, (None,))[0] is r else None)
    except TypeError:  # pragma: no cover - tensors always support weak references
        return out
    _CACHE[key] = (ref, w._version, out)
    return out


def _nonzero(b: Tensor) -> bool:
    """All entries of a bias are non-zero (cached per bias tensor and version)."""
    return bool(_cached(b, "nonzero", lambda t: torch.tensor(bool((t != 0).all()))).item()) if \
        (isinstance(b, nn.Parameter) or b.is_leaf) else bool((b != 0).all())


def _abs(w: Tensor) -> Tensor:
    """``|w|`` of a weight (cached; other tensors are computed directly)."""
    if isinstance(w, nn.Parameter) or (not w.requires_grad and w.is_leaf and w.dim() >= 2):
        return _cached(w, "abs", torch.abs)
    return w.abs()


def _flipped(w: Tensor) -> Tensor:
    """The kernel of the adjoint convolution: spatially flipped, in/out channels swapped."""
    nd = w.dim() - 2
    return w.flip(tuple(range(2, 2 + nd))).transpose(0, 1)


def _bias_view(b: Tensor | None, y: Tensor, module: nn.Module | None) -> Tensor | None:
    if b is None:
        return None
    if isinstance(module, nn.Linear):
        return b
    return b.view(1, -1, *([1] * (y.dim() - 2)))


def _pos_neg(x: Tensor, w: Tensor, fwd: Callable) -> tuple[Tensor, Tensor]:
    """P = W+ x+ + W- x-, N = -(W+ x- + W- x+), computed directly (exact zeros stay zero)."""
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    P = fwd(xp, wp) + fwd(xn, wn)
    N = -(fwd(xn, wp) + fwd(xp, wn))
    return P, N


def _stream_back(x: Tensor, w: Tensor, bwd: Callable, u: Tensor, v: Tensor) -> Tensor:
    """``sum_j max(z_ij,0) u_j + max(-z_ij,0) v_j`` for every input ``i``.

    With ``a = (u+v)/2`` and ``d = (u-v)/2``: ``= |x_i| (|W|^T a)_i + x_i (W^T d)_i``.
    """
    a, d = (u + v) * 0.5, (u - v) * 0.5
    return x.abs() * bwd(a, _abs(w)) + x * bwd(d, w)


#: DLBacktrace's activation table: saturation range of the pre-activation ``t``.
#: ``type`` is "mono" (monotone) or "non_mono"; below ``l`` the positive stream is dropped,
#: above ``u`` the negative one (the unit is saturated, pushing further changes nothing).
ACTIVATION_RANGES: dict[str, dict[str, Any]] = {
    "tanh": {"type": "mono", "l": -2.0, "u": 2.0},
    "sigmoid": {"type": "mono", "l": -4.0, "u": 4.0},
    "softmax": {"type": "mono", "l": -1.0, "u": 2.0},
    "swish": {"type": "non_mono", "l": -6.0, "u": None},
}


class DLBAffine(Rule):
    """DLBacktrace default mode for ``Linear``/``Conv`` units.

    For output unit ``j``: ``z_ij = w_ij x_i``, ``P_j``, ``N_j`` as above, and
    ``R_i = sum_j |z_ij| / (P_j + N_j + |b_j|) * R_j``; the bias share
    ``|b_j| / (P_j + N_j + |b_j|) * R_j`` stays at the unit (is not propagated).

    Saturation (``saturation=True``): if the unit feeds a bounded activation (see
    :data:`ACTIVATION_RANGES`) with pre-activation ``t_j = P_j - N_j + b_j``:
    ``t_j < l`` drops the positive stream, ``t_j > u`` the negative stream; for the
    non-monotone swish additionally ``f(t) == f(P + b+)`` drops the negative stream and
    ``f(t) == f(-(N + b-))`` the positive one (|diff| <= 1e-5). Dropped streams leave the
    denominator: ``R_i = sum_j (m+_j max(z,0) + m-_j max(-z,0)) R_j / (m+_j P_j + m-_j N_j + |b_j|)``.

    ``zero_fill`` reproduces a defect of dl-backtrace 0.1.24's CPU linear kernel
    (``calculate_wt_fc``): a stream with ``P_j = 0`` (or ``N_j = 0``) is counted as ``1`` in the
    denominator, so a unit without negative contributions loses ``1 / (P + 1 + |b|)`` of its
    relevance. ``zero_fill=None`` (default) is the exact formula above.
    """

    def __init__(self, saturation: bool = True, zero_fill: float | None = None) -> None:
        self.saturation, self.zero_fill = saturation, zero_fill

    def backward(self, ctx: NodeContext, R: Tensor) -> list[Tensor | None]:
        x = ctx.inputs[0]
        w, b, fwd, bwd = _affine_parts(ctx)
        y = ctx.output
        bb = _bias_view(b, y, ctx.module)
        babs = 0.0 if bb is None else bb.abs()
        act = ACTIVATION_RANGES.get(ctx.activation) if (self.saturation and ctx.activation) else None
        if act is None and self.zero_fill is None:
            # fast path: P + N = |W| |x|
            xa, wa = x.abs(), _abs(w)
            den = fwd(xa, wa, None if b is None else b.abs())
            # with a non-zero bias everywhere the denominator is > 0: plain division. The
            # temporaries are reused in place (fewer fresh pages to fault in on large batches)
            if b is not None and _nonzero(b) and den.dtype == R.dtype:
                s = torch.div(R, den, out=den)
            else:
                s = _safe_div(R, den)
            g = bwd(s, wa)
            return [g.mul_(xa) if g.shape == xa.shape and g.dtype == xa.dtype else xa * g]
        P, N = _pos_neg(x, w, fwd)
        mp = torch.ones_like(P)
        mn = torch.ones_like(N)
        if act is not None:
            t = y
            if act["l"] is not None:
                mp = mp * (t >= act["l"]).to(P)
            if act["u"] is not None:
                mn = mn * (t <= act["u"]).to(P)
            if act["type"] == "non_mono" and ctx.activation_fn is not None:
                f = ctx.activation_fn
                bp = 0.0 if bb is None else bb.clamp(min=0)
                bn = 0.0 if bb is None else (-bb).clamp(min=0)
                ft = f(t)
                both = (P > 0) & (N > 0)
                mn = mn * ~(both & ((ft - f(P + bp)).abs() <= 1e-5))
                mp = mp * ~(both & ((ft - f(-(N + bn))).abs() <= 1e-5))
        Pd, Nd = P * mp, N * mn
        if self.zero_fill is not None:
            Pd = torch.where(P == 0, torch.full_like(P, self.zero_fill), Pd)
            Nd = torch.where(N == 0, torch.full_like(N, self.zero_fill), Nd)
        den = Pd + Nd + babs
        s = _safe_div(R, den)
        return [_stream_back(x, w, bwd, s * mp, s * mn)]


class DLBContrastAffine(Rule):
    """DLBacktrace contrast mode for ``Linear``/``Conv`` units (two streams ``R+``, ``R-``).

    Per output unit ``j`` with net pre-activation ``t_j = P_j - N_j + b_j``:

    * only positive contributions (``N_j = 0 < P_j``): both streams go to them, ``∝ z_ij / P_j``;
    * only negative contributions: both streams go to them, ``∝ |z_ij| / N_j``;
    * both: if ``(t_j > 0 and R+_j > R-_j)`` or ``(t_j < 0 and R+_j < R-_j)`` the positive
      contributions receive ``R+_j`` (into the + stream) and the negative ones ``R-_j`` (into
      the - stream); otherwise the positive contributions receive ``R-_j`` (into the - stream)
      and the negative ones ``R+_j`` (into the + stream); ``t_j = 0`` passes nothing.

    Streams keep their label; the bias takes no share. Each stream is conserved except at
    units with ``t_j = 0`` or no contributions. (The rule of dl-backtrace's original NumPy
    ``contrast`` module; 0.1.24's PyTorch engine has no contrast mode.)
    """

    coupled = True

    def backward(self, ctx: NodeContext, R: tuple[Tensor, Tensor]) -> list[Any]:
        Rp, Rn = R
        x = ctx.inputs[0]
        w, b, fwd, bwd = _affine_parts(ctx)
        P, N = _pos_neg(x, w, fwd)
        t = ctx.output
        only_p = (N == 0) & (P > 0)
        only_n = (P == 0) & (N > 0)
        mixed = (P > 0) & (N > 0) & (t != 0)
        straight = ((t > 0) & (Rp > Rn)) | ((t < 0) & (Rp < Rn))
        zero = torch.zeros_like(Rp)
        # coefficient on positive contributions (per unit, already divided by P) and negative ones
        # + stream
        pos_to_pos = torch.where(only_p, Rp, torch.where(mixed & straight, Rp, zero))
        neg_to_pos = torch.where(only_n, Rp, torch.where(mixed & ~straight, Rp, zero))
        # - stream
        pos_to_neg = torch.where(only_p, Rn, torch.where(mixed & ~straight, Rn, zero))
        neg_to_neg = torch.where(only_n, Rn, torch.where(mixed & straight, Rn, zero))
        r_plus = _stream_back(x, w, bwd, _safe_div(pos_to_pos, P), _safe_div(neg_to_pos, N))
        r_minus = _stream_back(x, w, bwd, _safe_div(pos_to_neg, P), _safe_div(neg_to_neg, N))
        return [(r_plus, r_minus)]


class DLBProportional(Rule):
    """DLBacktrace for positive linear maps without weights (average pooling, adaptive
    average pooling, ``mean``, ``sum``): each input gets relevance in proportion to ``|x|``
    within the output unit's window: ``R_i = sum_j |x_i| / (sum_{k in w(j)} |x_k|) * R_j``.
    Computed as ``|x| * J^T (R / op(|x|))`` (the op's window weights cancel). Conserving."""

    def backward(self, ctx: NodeContext, R: Tensor) -> list[Tensor | None]:
        xa = ctx.inputs[0].abs()
        den = ctx.call(xa, *ctx.inputs[1:])
        s = _safe_div(R, den)
        g = ctx.vjp(s)[0]
        return [xa * g] + [None] * (len(ctx.inputs) - 1)


class MaxPoolWinnerTakesAll(Rule):
    """Max pooling: each window's relevance goes to the input(s) equal to the window maximum,
    split equally between ties: ``R_i = sum_{j: i in w(j), x_i = y_j} R_j / #{k in w(j): x_k = y_j}``.
    ``ties="first"`` instead gives a tied window's relevance to the one index PyTorch's max-pool
    gradient picks (what zennit does; faster). Supports ``MaxPool1d``/``MaxPool2d`` modules and
    ``F.max_pool1d``/``F.max_pool2d``. Conserving."""

    def __init__(self, ties: str = "split") -> None:
        if ties not in ("split", "first"):
            raise ArgumentError(f"MaxPoolWinnerTakesAll: ties={ties!r}; expected 'split' or 'first'")
        self.ties = ties

    def backward(self, ctx: NodeContext, R: Tensor) -> list[Tensor | None]:
        if self.ties == "first":  # the max-pool gradient: one winner per window (zennit's behaviour)
            return [ctx.vjp(R)[0]]
        x = ctx.inputs[0]
        p = _maxpool_params(ctx)
        squeeze = x.dim() == 3
        if squeeze:
            x4, R4, y4 = x.unsqueeze(2), R.unsqueeze(2), ctx.output.unsqueeze(2)
            ks, st, pd, dl = (1, p["k"][0]), (1, p["s"][0]), (0, p["p"][0]), (1, p["d"][0])
        else:
            x4, R4, y4 = x, R, ctx.output
            ks, st, pd, dl = p["k"], p["s"], p["p"], p["d"]
        B, C, H, W = x4.shape
        Ho, Wo = y4.shape[-2:]
        if ks == st and dl == (1, 1) and pd == (0, 0) and Ho * ks[0] <= H and Wo * ks[1] <= W and x4.dtype == R4.dtype:
            # non-overlapping windows: one pass of the max-pool relevance kernel (C++ / Triton)
            full = maxpool_relevance(x4, R4, ks)
            return [full.squeeze(2) if squeeze else full]
        # general case (overlap, padding, dilation, ceil_mode): windows via unfold;
        # padding is -inf so it never wins
        need_h = (Ho - 1) * st[0] + dl[0] * (ks[0] - 1) + 1 - (H + 2 * pd[0])
        need_w = (Wo - 1) * st[1] + dl[1] * (ks[1] - 1) + 1 - (W + 2 * pd[1])
        eh, ew = max(need_h, 0), max(need_w, 0)
        xp = F.pad(x4, (pd[1], pd[1] + ew, pd[0], pd[0] + eh), value=float("-inf"))
        Hp, Wp = xp.shape[-2:]
        kk = ks[0] * ks[1]
        cols = F.unfold(xp, ks, dilation=dl, stride=st).reshape(B, C, kk, -1)  # [B, C, k, L]
        L = cols.shape[-1]
        if L != Ho * Wo:  # pragma: no cover - pooling shapes always match
            raise ShapeError(f"max-pool rule at {ctx.name!r}: cannot map windows back to the input")
        eq = (cols == y4.reshape(B, C, 1, L)).to(R.dtype)
        cnt = eq.sum(2, keepdim=True)
        share = (eq * _safe_div(R4.reshape(B, C, 1, L), cnt)).reshape(B, C * kk, L)
        full = F.fold(share, (Hp, Wp), ks, dilation=dl, stride=st)
        full = full[..., pd[0]: pd[0] + H, pd[1]: pd[1] + W]
        return [full.squeeze(2) if squeeze else full]


def max_pool2d_blocks(x: Tensor, k: tuple[int, int]) -> Tensor | None:
    """Max pooling with non-overlapping ``k`` windows (stride = kernel, no padding/dilation) as
    elementwise maxima of strided views: the same values as ``F.max_pool2d`` (NaN propagates),
    many times faster than its CPU kernel, which also computes indices. ``None`` when ``x`` is
    not a 3-d/4-d floating tensor."""
    if x.dim() not in (3, 4) or not x.is_floating_point():
        return None
    return block_max(x, k)


def _pair(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, (tuple, list)):
        return tuple(int(a) for a in v)
    return (int(v),) * n


def _maxpool_params(ctx: NodeContext) -> dict[str, tuple[int, ...]]:
    m = ctx.module
    x = ctx.inputs[0]
    n = x.dim() - 2
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)):
        k, s, p, d = m.kernel_size, m.stride, m.padding, m.dilation
    elif m is None and "pool_args" in ctx.extra:
        k, s, p, d = ctx.extra["pool_args"]
    else:
        raise ArgumentError(f"MaxPoolWinnerTakesAll applied to {ctx.name!r} ({_op_name(ctx)}); "
                            f"expected MaxPool1d/MaxPool2d or F.max_pool1d/F.max_pool2d")
    if n not in (1, 2):
        raise ArgumentError(f"max pooling at {ctx.name!r}: {n}-d pooling is not supported (expected 1-d or 2-d)")
    k = _pair(k, n)
    s = _pair(s if s not in (None, ()) else k, n)
    return {"k": k, "s": s, "p": _pair(p, n), "d": _pair(d, n)}


# ----------------------------------------------------------------------------------
# LRP rules (zennit formulas)
# ----------------------------------------------------------------------------------
class Epsilon(Rule):
    """LRP-epsilon: ``R_i = x_i * sum_j w_ij R_j / stabilize(y_j, eps)`` with ``y = Wx + b``
    (the bias absorbs its share). ``stabilize(z) = z + eps*sign(z)``, ``sign(0)=+1``."""

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = epsilon

    def backward(self, ctx: NodeContext, R: Tensor) -> list[Tensor | None]:
        x = ctx.inputs[0]
        w, b, fwd, bwd = _affine_parts(ctx)
        s = R / stabilize(ctx.output, self.epsilon)
        return [x * bwd(s, w)]


class ZPlus(Rule):
    """LRP-z+ (zennit ``ZPlus``, alpha=1 beta=0 allowing negative inputs):
    ``z+_j = (W+ x+ + W- x-)_j + max(b_j, 0)``,
    ``R_i = x+_i (W+^T s)_i + x-_i (W-^T s)_i`` with ``s = R / stabilize(z+)``."""

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = epsilon

    def backward(self, ctx: NodeContext, R: Tensor) -> list[Tensor | None]:
        x = ctx.inputs[0]
        w, b, fwd, bwd = _affine_parts(ctx)
        xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
        z = fwd(xp, wp) + fwd(xn, wn)
        bb = _bias_view(b, ctx.output, ctx.module)
        if bb is not None:
            z = z + bb.clamp(min=0)
        s = R / stabilize(z, self.epsilon)
        return [xp * bwd(s, wp) + xn * bwd(s, wn)]


class AlphaBeta(Rule):
    """LRP-alpha-beta (zennit ``AlphaBeta``; ``alpha - beta = 1``):
    ``z+ = W+ x+ + W- x- + b+``, ``z- = W- x+ + W+ x- + b-``,
    ``R_i = alpha (x+ W+^T s+ + x- W-^T s+)_i - beta (x+ W-^T s- + x- W+^T s-)_i``,
    ``s± = R / stabilize(z±)``."""

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, epsilon: float = 1e-6) -> None:
        if alpha < 0 or beta < 0 or not math.isclose(alpha - beta, 1.0):
            raise ArgumentError(f"AlphaBeta: alpha={alpha}, beta={beta}; expected alpha, beta >= 0 and "
                                f"alpha - beta = 1")
        self.alpha, self.beta, self.epsilon = alpha, beta, epsilon

    def backward(self, ctx: NodeContext, R: Tensor) -> list[Tensor | None]:
        x = ctx.inputs[0]
        w, b, fwd, bwd = _affine_parts(ctx)
        xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
        zp = fwd(xp, wp) + fwd(xn, wn)
        zn = fwd(xp, wn) + fwd(xn, wp)
        bb = _bias_view(b, ctx.output, ctx.module)
        if bb is not None:
            zp, zn = zp + bb.clamp(min=0), zn + bb.clamp(max=0)
        sp, sn = R / stabilize(zp, self.epsilon), R / stabilize(zn, self.epsilon)
        rp = xp * bwd(sp, wp) + xn * bwd(sp, wn)
        rn = xp * bwd(sn, wn) + xn * bwd(sn, wp)
        return [self.alpha * rp - self.beta * rn]


class Flat(Rule):
    """LRP-flat (zennit ``Flat``): all weights 1, inputs 1, no bias:
    ``R_i = sum_{j: i in w(j)} R_j / stabilize(#w(j))``."""

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = epsilon

    def backward(self, ctx: NodeContext, R: Tensor) -> list[Tensor | None]:
        x = ctx.inputs[0]
        w, b, fwd, bwd = _affine_parts(ctx)
        ones_w = torch.ones_like(w)
        z = fwd(torch.ones_like(x), ones_w)
        return [bwd(R / stabilize(z, self.epsilon), ones_w)]


class Norm(Rule):
    """zennit ``Norm`` (LRP-0 with a stabiliser, for ops without parameters such as average
    pooling and sums): ``R_i = x_i * (J^T (R / stabilize(y)))_i``."""

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = epsilon

    def backward(self, ctx: NodeContext, R: Tensor) -> list[Tensor | None]:
        s = R / stabilize(ctx.output, self.epsilon)
        g = ctx.vjp(s)
        return [x * gi for x, gi in zip(ctx.inputs, g)]


class BatchNormEpsilon(Rule):
    """A BatchNorm not folded into a preceding layer, as the elementwise affine map
    ``y = a x + c`` (``a = gamma / sqrt(var + eps_bn)``): ``R_x = a x / stabilize(y) * R``."""

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = epsilon

    def backward(self, ctx: NodeContext, R: Tensor) -> list[Tensor | None]:
        m = ctx.module
        x = ctx.inputs[0]
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
            var, weight, eps = m.running_var, m.weight, m.eps
        elif m is None and getattr(ctx.target, "overloadpacket", None) is torch.ops.aten.batch_norm:
            weight, var, eps = ctx.arg("weight", 1), ctx.arg("running_var", 4), ctx.arg("eps", 7, 1e-5)
        elif m is None and ctx.target is F.batch_norm:
            var, weight, eps = ctx.arg("running_var", 2), ctx.arg("weight", 3), ctx.arg("eps", 7, 1e-5)
        else:
            var = None
        if var is None:
            raise ArgumentError(f"BatchNormEpsilon applied to {ctx.name!r} ({_op_name(ctx)}); expected a BatchNorm "
                                f"with running statistics (eval mode)")
        a = torch.rsqrt(var + eps)
        if weight is not None:
            a = a * weight
        a = a.view(1, -1, *([1] * (x.dim() - 2)))
        return [a * x * R / stabilize(ctx.output, self.epsilon)] + [None] * (len(ctx.inputs) - 1)


def _op_name(ctx: NodeContext) -> str:
    t = ctx.target
    if isinstance(t, nn.Module):
        return type(t).__name__
    if isinstance(t, str):
        return f"Tensor.{t}"
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__name__", repr(t))
    if t in vars(operator).values():
        return f"operator.{name}"
    return f"{mod}.{name}" if mod else name
