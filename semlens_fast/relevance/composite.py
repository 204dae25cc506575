"""Rule sets ("composites"): which rule each module type or op gets.

A :class:`Composite` maps module types, functions (``torch.flatten``, ``operator.add``,
``F.relu``) and tensor-method names (``"view"``, ``"relu"``) to :class:`~.rules.Rule`
instances, zennit-style. Presets:

* :func:`dlbacktrace` — DLBacktrace default mode.
* :func:`dlbacktrace_contrast` — DLBacktrace contrast mode (positive and negative streams).
* :func:`dlbacktrace_compat` — reproduces dl-backtrace 0.1.24's CPU engine, defects
  included (uniform pooling, equal residual split, ``0 -> 1`` fill in linear layers); for
  agreement checks only.
* :func:`lrp_epsilon`, :func:`lrp_zplus`, :func:`lrp_alpha_beta`, :func:`epsilon_plus_flat`.

An op without a rule is an error naming the op and the composite; ``passthrough=(...)``
lets the user declare shape-preserving ops whose relevance passes unchanged.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import rules as R
from . import rules_nn as NN

__all__ = [
    "Composite", "dlbacktrace", "dlbacktrace_contrast", "dlbacktrace_compat", "lrp_epsilon",
    "lrp_zplus", "lrp_alpha_beta", "epsilon_plus_flat", "AFFINE_TYPES", "module_matches",
]

AFFINE_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                                  nn.ConvTranspose2d, nn.ConvTranspose3d)
_A = torch.ops.aten


def _aten(*names: str) -> tuple[Any, ...]:
    """aten op packets by name (those this torch build has)."""
    return tuple(getattr(_A, n) for n in names if hasattr(_A, n))


ACTIVATION_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus,
    nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Hardsigmoid, nn.PReLU, nn.SELU, nn.CELU,
)
IDENTITY_MODULES: tuple[type, ...] = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                                      nn.AlphaDropout)
ACTIVATION_FUNCS: tuple[Any, ...] = (
    F.relu, torch.relu, F.leaky_relu, F.elu, F.gelu, F.silu, torch.tanh, torch.sigmoid, F.tanh, F.sigmoid,
    F.softplus, F.relu6, F.hardtanh, F.mish, F.hardswish, F.dropout, torch.nn.functional.selu, torch.neg,
    operator.neg,
) + _aten("relu", "relu_", "gelu", "gelu_", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardtanh",
          "hardtanh_", "hardswish", "hardswish_", "leaky_relu", "leaky_relu_", "elu", "elu_", "softplus", "mish",
          "mish_", "selu", "celu", "relu6", "neg", "clone", "contiguous", "alias", "_to_copy", "to", "type_as",
          "detach", "lift_fresh_copy", "dropout", "dropout_", "feature_dropout", "alpha_dropout")
ACTIVATION_METHODS: tuple[str, ...] = ("relu", "tanh", "sigmoid", "contiguous", "clone", "detach", "float",
                                       "to", "type_as", "neg", "half", "bfloat16", "double")
INDEX_FUNCS: tuple[Any, ...] = (
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.cat,
    torch.concat, torch.stack, torch.split, torch.chunk, torch.narrow, torch.select, torch.movedim,
    torch.swapaxes, operator.getitem, torch.t, torch.unbind, torch.roll, torch.flip, torch.gather,
    torch.index_select, torch.take_along_dim, F.pad, torch.masked_fill, torch.where, torch.repeat_interleave,
    torch.tile,
) + _aten("view", "_unsafe_view", "reshape", "permute", "transpose", "t", "unsqueeze", "squeeze", "expand",
          "cat", "concat", "stack", "slice", "select", "split", "split_with_sizes", "chunk", "unbind", "narrow",
          "flatten", "unflatten", "roll", "flip", "gather", "index_select", "index", "repeat", "movedim",
          "swapaxes", "pad", "constant_pad_nd", "masked_fill", "where", "expand_as", "repeat_interleave", "tile")
INDEX_METHODS: tuple[str, ...] = (
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "squeeze", "unsqueeze", "expand",
    "expand_as", "view_as", "reshape_as", "split", "chunk", "narrow", "select", "movedim", "t",
    "repeat", "unbind", "flip", "roll", "gather", "index_select", "masked_fill", "repeat_interleave", "tile",
)
INDEX_MODULES: tuple[type, ...] = (nn.Flatten, nn.Unflatten)
AVG_MODULES: tuple[type, ...] = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                                 nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
AVG_FUNCS: tuple[Any, ...] = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                              F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.mean, torch.sum) + \
    _aten("avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
          "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "mean", "sum")
AVG_METHODS: tuple[str, ...] = ("mean", "sum")
MAX_MODULES: tuple[type, ...] = (nn.MaxPool1d, nn.MaxPool2d)
MAX_FUNCS: tuple[Any, ...] = (F.max_pool1d, F.max_pool2d) + _aten("max_pool1d", "max_pool2d")
ADD_FUNCS: tuple[Any, ...] = (operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub) + \
    _aten("add", "add_", "sub", "sub_")
ADD_METHODS: tuple[str, ...] = ("add", "add_", "sub", "sub_")
MUL_FUNCS: tuple[Any, ...] = (operator.mul, operator.imul, torch.mul, operator.truediv, torch.div) + \
    _aten("mul", "mul_", "div", "div_")
MUL_METHODS: tuple[str, ...] = ("mul", "mul_", "div")
MATMUL_FUNCS: tuple[Any, ...] = (operator.matmul, torch.matmul, torch.bmm, torch.einsum) + \
    _aten("matmul", "bmm", "mm", "einsum")
MATMUL_METHODS: tuple[str, ...] = ("matmul", "bmm")
SOFTMAX: tuple[Any, ...] = (F.softmax, torch.softmax, nn.Softmax, "softmax")
SOFTMAX_FUNCS: tuple[Any, ...] = (F.softmax, torch.softmax, "softmax") + _aten("softmax", "_softmax")
LAYERNORM_MODULES: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm)
LAYERNORM_FUNCS: tuple[Any, ...] = (F.layer_norm, F.group_norm) + _aten("layer_norm", "group_norm")
RMSNORM_MODULES: tuple[type, ...] = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
RMSNORM_FUNCS: tuple[Any, ...] = ((F.rms_norm,) if hasattr(F, "rms_norm") else ()) + _aten("rms_norm") + \
    (F.normalize,)
BATCHNORM_MODULES: tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
BATCHNORM_FUNCS: tuple[Any, ...] = (F.batch_norm,) + _aten("batch_norm")
NORM_MODULES: tuple[type, ...] = LAYERNORM_MODULES + BATCHNORM_MODULES
EMBEDDING_FUNCS: tuple[Any, ...] = (F.embedding,) + _aten("embedding")
SDPA_FUNCS: tuple[Any, ...] = (F.scaled_dot_product_attention,) + _aten("scaled_dot_product_attention")
RNN_MODULES: tuple[type, ...] = (nn.LSTM, nn.GRU)
RNN_FUNCS: tuple[Any, ...] = _aten("lstm", "gru")
#: ops whose result is a normalisation statistic: treated as constants by every rule set
#: (identity rule on ``1/std``, AttnLRP Prop. 3.4; DLBacktrace passes norms through), so
#: ``x * rsqrt(mean(x^2) + eps)`` gives all relevance to ``x``.
STATISTIC_FUNCS: tuple[Any, ...] = (torch.rsqrt, torch.sqrt, torch.reciprocal, torch.var, torch.std,
                                    torch.var_mean, torch.std_mean, torch.norm, torch.linalg.vector_norm,
                                    torch.linalg.norm) + \
    _aten("rsqrt", "sqrt", "reciprocal", "var", "std", "var_mean", "std_mean", "norm", "linalg_vector_norm")
STATISTIC_METHODS: tuple[str, ...] = ("rsqrt", "sqrt", "reciprocal", "var", "std", "norm")


def _stochastic_depth_funcs() -> tuple[Any, ...]:
    try:
        from torchvision.ops import stochastic_depth
    except Exception:  # pragma: no cover - torchvision is optional
        return ()
    return (stochastic_depth,)


def module_matches(module: Any, types: Any) -> bool:
    """``module`` is an instance of one of ``types`` that computes what that type computes: a
    subclass that overrides ``forward`` (torchvision's ``LayerNorm2d``, weight-standardised
    convolutions) is a different op and does not match (it is traced through instead)."""
    ts = types if isinstance(types, tuple) else (types,)
    for t in ts:
        if isinstance(module, t) and getattr(type(module), "forward", None) is getattr(t, "forward", None):
            return True
    return False


@dataclass(frozen=True)
class Composite:
    """A named rule set.

    Args:
        name: shown in errors.
        module_rules: ``(module type(s), rule)`` pairs, first match wins.
        function_rules: ``{function or method name: rule}``.
        first_rules: ``(module type(s), rule)`` pairs applied instead for the first affine
            layer seen from the input (e.g. LRP-flat there).
        streams: 1, or 2 for contrast mode (positive, negative).
        canonize_batchnorm: fold each BatchNorm into the Linear/Conv right before it.
        passthrough: module types / functions / method names the user declared as
            shape-preserving pass-through (relevance passes unchanged). In graphs captured
            with ``torch.export`` a declared module type also matches the module's ops
            (found through the graph's module stack) and collapses them into one pass-through.
        statistics: ops whose outputs are normalisation statistics, treated as constants
            (``rsqrt``, ``sqrt``, ``var``, ``std``, ``norm``, ...).
    """

    name: str
    module_rules: tuple[tuple[Any, R.Rule], ...]
    function_rules: dict[Any, R.Rule]
    first_rules: tuple[tuple[Any, R.Rule], ...] = ()
    streams: int = 1
    canonize_batchnorm: bool = False
    passthrough: tuple[Any, ...] = ()
    activation_saturation: bool = True
    description: str = ""
    statistics: frozenset = frozenset(STATISTIC_FUNCS + STATISTIC_METHODS)

    def with_passthrough(self, *ops: Any) -> "Composite":
        """A copy that passes relevance unchanged through ``ops`` (module types, functions or
        method names), which must keep the shape of their first input."""
        return replace(self, passthrough=tuple(self.passthrough) + tuple(ops))

    def with_rules(self, module_rules: Sequence[tuple[Any, R.Rule]] = (),
                   function_rules: dict[Any, R.Rule] | None = None) -> "Composite":
        """A copy with extra rules taking precedence over the existing ones."""
        fr = dict(self.function_rules)
        fr.update(function_rules or {})
        return replace(self, module_rules=tuple(module_rules) + self.module_rules, function_rules=fr)

    def rule_for(self, kind: str, target: Any, module: nn.Module | None, is_first: bool = False) -> R.Rule | None:
        """The rule for a node, or ``None`` when the composite has none."""
        if kind == "call_module":
            if is_first:
                for types, rule in self.first_rules:
                    if module_matches(module, types):
                        return rule
            for types, rule in self.module_rules:
                if module_matches(module, types):
                    return rule
            if any(isinstance(p, type) and isinstance(module, p) for p in self.passthrough):
                return R.PassThrough()
            return None
        key = target
        packet = getattr(target, "overloadpacket", None)  # aten.add.Tensor -> aten.add
        try:
            if key in self.function_rules:
                return self.function_rules[key]
            if packet is not None and packet in self.function_rules:
                return self.function_rules[packet]
        except TypeError:  # unhashable target
            pass
        if any(p is target or p is packet or (isinstance(p, str) and p == target) for p in self.passthrough):
            return R.PassThrough()
        return None

    def is_statistic(self, kind: str, target: Any) -> bool:
        """The node computes a normalisation statistic (treated as a constant)."""
        if kind == "call_method":
            return target in self.statistics
        packet = getattr(target, "overloadpacket", None)
        try:
            return target in self.statistics or (packet is not None and packet in self.statistics)
        except TypeError:
            return False


def _structural(add_rule: R.Rule, avg_rule: R.Rule, ties: str = "split", *, softmax: R.Rule,
                layernorm: R.Rule, batchnorm: R.Rule | None, sdpa: R.Rule, recurrent: R.Rule
                ) -> tuple[list[tuple[Any, R.Rule]], dict[Any, R.Rule]]:
    passthrough, index = R.PassThrough(), R.IndexMap()
    maxpool = R.MaxPoolWinnerTakesAll(ties)
    emb = NN.Embedding()
    mods: list[tuple[Any, R.Rule]] = [
        (ACTIVATION_MODULES + (nn.Identity,), passthrough),
        (IDENTITY_MODULES[1:], NN.EvalIdentity()),  # dropout: the identity in eval mode only
        (INDEX_MODULES, index),
        (AVG_MODULES, avg_rule),
        (MAX_MODULES, maxpool),
        (nn.Softmax, softmax),
        (LAYERNORM_MODULES, layernorm),
        (nn.Embedding, emb),
        (RNN_MODULES, recurrent),
    ]
    if RMSNORM_MODULES:
        mods.append((RMSNORM_MODULES, passthrough))
    if batchnorm is not None:
        mods.append((BATCHNORM_MODULES, batchnorm))
    funcs: dict[Any, R.Rule] = {}
    for f in ACTIVATION_FUNCS + ACTIVATION_METHODS:
        funcs[f] = passthrough
    for f in INDEX_FUNCS + INDEX_METHODS:
        funcs[f] = index
    for f in AVG_FUNCS + AVG_METHODS:
        funcs[f] = avg_rule
    for f in MAX_FUNCS:
        funcs[f] = maxpool
    for f in ADD_FUNCS + ADD_METHODS:
        funcs[f] = add_rule
    mul, prod = R.MulHalf(), R.Product()
    for f in MUL_FUNCS + MUL_METHODS:
        funcs[f] = mul
    for f in MATMUL_FUNCS + MATMUL_METHODS:
        funcs[f] = prod
    for f in SOFTMAX_FUNCS:
        funcs[f] = softmax
    for f in LAYERNORM_FUNCS:
        funcs[f] = layernorm
    for f in RMSNORM_FUNCS:
        funcs[f] = passthrough
    if batchnorm is not None:
        for f in BATCHNORM_FUNCS:
            funcs[f] = batchnorm
    for f in EMBEDDING_FUNCS:
        funcs[f] = emb
    for f in SDPA_FUNCS:
        funcs[f] = sdpa
    for f in RNN_FUNCS:
        funcs[f] = recurrent
    for f in _stochastic_depth_funcs():
        funcs[f] = NN.EvalIdentity(pos=3)
    for f in _aten("dropout", "dropout_", "feature_dropout", "alpha_dropout"):
        funcs[f] = NN.EvalIdentity(pos=2)
    funcs[F.dropout] = NN.EvalIdentity(pos=2)
    return mods, funcs


def _dlb_structural(add: R.Rule, avg: R.Rule) -> tuple[list[tuple[Any, R.Rule]], dict[Any, R.Rule]]:
    return _structural(add, avg, softmax=R.PassThrough(), layernorm=R.PassThrough(), batchnorm=R.PassThrough(),
                       sdpa=NN.ScaledDotProductAttention("pass", "abs"), recurrent=NN.Recurrent("dlb"))


def dlbacktrace(saturation: bool = True) -> Composite:
    """DLBacktrace default mode: :class:`~.rules.DLBAffine` for Linear/Conv, relevance
    ``∝ |x|`` for average pooling / means / residual additions, winner-takes-all max pooling
    with ties split, pass-through for activations, softmax and normalisation layers,
    exact index maps for reshapes and concatenation, the product rule for ``matmul``."""
    mods, funcs = _dlb_structural(R.AddSplit("abs"), R.DLBProportional())
    return Composite("dlbacktrace", tuple([(AFFINE_TYPES, R.DLBAffine(saturation=saturation))] + mods), funcs,
                     activation_saturation=saturation,
                     description="DLBacktrace default mode")


def dlbacktrace_contrast() -> Composite:
    """DLBacktrace contrast mode: :class:`~.rules.DLBContrastAffine` for Linear/Conv; all other
    ops as in :func:`dlbacktrace`, applied to each stream separately."""
    mods, funcs = _dlb_structural(R.AddSplit("abs"), R.DLBProportional())
    return Composite("dlbacktrace_contrast", tuple([(AFFINE_TYPES, R.DLBContrastAffine())] + mods), funcs,
                     streams=2, description="DLBacktrace contrast mode (positive/negative streams)")


def dlbacktrace_compat() -> Composite:
    """dl-backtrace 0.1.24's CPU engine, reproduced for agreement checks on the layers it
    handles by a rule — Linear (with the ``0 -> 1`` fill), Conv, activations (no saturation),
    pooling by uniform upsampling (:class:`~.rules.UniformUpsample`), reshapes, residual
    additions split equally, elementwise products ``R/2, R/2``, norms and softmax passed
    through — defects included. Matrix products and attention, embeddings, recurrent and
    transposed-convolution layers raise :class:`~.engine.UnsupportedOpError`: dl-backtrace's
    engine sends a product's relevance to its first operand through a generic shape aligner,
    which this preset does not reproduce. Not meant for explanations."""
    mods, funcs = _dlb_structural(R.AddSplit("equal"), R.UniformUpsample())
    mods = [(t, (R.UniformUpsample() if t in (AVG_MODULES, MAX_MODULES) else r)) for t, r in mods]
    for f in MAX_FUNCS:
        funcs[f] = R.UniformUpsample()
    product = NN.Refuse(
        "dlbacktrace_compat does not reproduce dl-backtrace 0.1.24 here: for a product of tensors (matmul, bmm, "
        "attention) it passes the whole output relevance to the first operand through its generic shape aligner "
        "(align_relevance: sums, repeats, tiles and rescales it to the operand's shape) and none to the second; "
        "use dlbacktrace() (the product rule)")
    for f in MATMUL_FUNCS + MATMUL_METHODS + SDPA_FUNCS + RNN_FUNCS + EMBEDDING_FUNCS:
        funcs[f] = product
    other = NN.Refuse("dlbacktrace_compat reproduces dl-backtrace 0.1.24 only for Linear, Conv1d/2d/3d, activations, "
                      "norms and softmax (passed through), pooling, reshapes, additions and elementwise products; use "
                      "dlbacktrace()")
    rules = [(nn.Linear, R.DLBAffine(saturation=False, zero_fill=1.0)),
             ((nn.Conv1d, nn.Conv2d, nn.Conv3d), R.DLBAffine(saturation=False)),
             (RNN_MODULES + (nn.Embedding, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), other)]
    return Composite("dlbacktrace_compat", tuple(rules + mods), funcs, activation_saturation=False,
                     description="dl-backtrace 0.1.24 CPU engine (defects included)")


def _lrp(name: str, conv_rule: R.Rule, linear_rule: R.Rule, first: Sequence[tuple[Any, R.Rule]] = (),
         canonize_batchnorm: bool = True) -> Composite:
    mods, funcs = _structural(R.AddSplit("z"), R.Norm(), ties="first", softmax=NN.SoftmaxLRP(),
                              layernorm=NN.LayerNormLRP(), batchnorm=R.BatchNormEpsilon(),
                              sdpa=NN.ScaledDotProductAttention("lrp", "z"), recurrent=NN.Recurrent("lrp"))
    rules = [((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
              conv_rule), (nn.Linear, linear_rule)]
    return Composite(name, tuple(rules + mods), funcs, first_rules=tuple(first),
                     canonize_batchnorm=canonize_batchnorm, description=name)


def lrp_epsilon(epsilon: float = 1e-6, canonize_batchnorm: bool = True) -> Composite:
    """LRP-epsilon for every Linear/Conv; zennit's ``Norm`` for average pooling and sums,
    pass-through for activations, max pooling by its gradient (one winner per window, as in
    zennit), BatchNorm folded into the preceding layer (other BatchNorms: epsilon on the
    elementwise affine map)."""
    return _lrp("lrp_epsilon", R.Epsilon(epsilon), R.Epsilon(epsilon), canonize_batchnorm=canonize_batchnorm)


def lrp_zplus(epsilon: float = 1e-6, canonize_batchnorm: bool = True) -> Composite:
    """LRP-z+ for every Linear/Conv (zennit ``ZPlus``)."""
    return _lrp("lrp_zplus", R.ZPlus(epsilon), R.ZPlus(epsilon), canonize_batchnorm=canonize_batchnorm)


def lrp_alpha_beta(alpha: float = 2.0, beta: float = 1.0, canonize_batchnorm: bool = True) -> Composite:
    """LRP-alpha-beta for every Linear/Conv (zennit ``AlphaBeta``)."""
    rule = R.AlphaBeta(alpha, beta)
    return _lrp("lrp_alpha_beta", rule, rule, canonize_batchnorm=canonize_batchnorm)


def epsilon_plus_flat(epsilon: float = 1e-6, canonize_batchnorm: bool = True) -> Composite:
    """zennit's ``EpsilonPlusFlat``: flat for the first Linear/Conv, z+ for other convolutions,
    epsilon for other Linear layers."""
    return _lrp("epsilon_plus_flat", R.ZPlus(epsilon), R.Epsilon(epsilon),
                first=[(AFFINE_TYPES, R.Flat(epsilon))], canonize_batchnorm=canonize_batchnorm)
