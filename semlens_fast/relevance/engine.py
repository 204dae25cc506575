"""The propagation engine: trace once, then one batched forward and one backward-style pass.

The model is traced with ``torch.fx`` (modules that have a rule are kept as leaves). When
tracing fails, module forward hooks record the calls of the leaf modules; if they form a
plain chain (each module consumes exactly the previous one's output) that chain is used,
otherwise a clear error says why. The forward pass keeps every node's value; the backward
pass visits nodes in reverse topological order, applies each node's rule and adds the
input relevance of nodes used more than once.
"""
from __future__ import annotations

import copy
import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ArgumentError, DeviceError, ShapeError
from . import rules as R
from .composite import AFFINE_TYPES, Composite, dlbacktrace, module_matches

__all__ = ["RelevanceEngine", "RelevanceResult", "UnsupportedOpError", "relevance"]

log = logging.getLogger("semlens_fast")

Relevance = Any  # Tensor, or tuple of Tensors for tuple-valued nodes


class UnsupportedOpError(ArgumentError):
    """An op of the model has no rule in the chosen rule set (composite)."""


@dataclass
class RelevanceResult:
    """Result of one propagation.

    Attributes:
        input: relevance at the (first) model input, shape of the input. In contrast mode
            ``positive - negative``.
        layers: relevance at the *output* of each recorded layer (module path, or fx node
            name for functional ops), i.e. the relevance of that layer's units.
        output: the model output (logits).
        target: the class index per sample used for the seed (``-1`` if an explicit seed).
        streams: contrast mode only: ``{"input": (pos, neg), layer: (pos, neg), ...}``.
    """

    input: Tensor
    layers: dict[str, Tensor]
    output: Tensor
    target: Tensor
    streams: dict[str, tuple[Tensor, ...]] = field(default_factory=dict)

    @property
    def input_positive(self) -> Tensor:
        """Contrast mode: positive stream at the input."""
        return self._stream("input", 0)

    @property
    def input_negative(self) -> Tensor:
        """Contrast mode: negative stream at the input."""
        return self._stream("input", 1)

    def _stream(self, key: str, i: int) -> Tensor:
        if key not in self.streams:
            raise ArgumentError(f"stream {key!r} is only recorded in contrast mode (got a single-stream result)")
        return self.streams[key][i]


_A = torch.ops.aten
_BOUNDED: dict[Any, str] = {
    nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Softmax: "softmax", nn.SiLU: "swish",
    torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.silu: "swish",
    F.softmax: "softmax", torch.softmax: "softmax", "tanh": "tanh", "sigmoid": "sigmoid", "softmax": "softmax",
    _A.tanh: "tanh", _A.sigmoid: "sigmoid", _A.silu: "swish", _A.silu_: "swish", _A.softmax: "softmax",
    _A._softmax: "softmax",
}
_INPLACE_FREE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                 operator.itruediv: operator.truediv}
_INPLACE_METHODS = {"add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div", "relu_": "relu"}
_ADD = {operator.add: 1, operator.iadd: 1, torch.add: 1, "add": 1, "add_": 1,
        operator.sub: -1, operator.isub: -1, torch.sub: -1, "sub": -1, "sub_": -1,
        _A.add: 1, _A.add_: 1, _A.sub: -1, _A.sub_: -1}
_MAXPOOL = {F.max_pool1d, F.max_pool2d, _A.max_pool1d, _A.max_pool2d}
_MAXPOOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_TCONV_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
#: functional affine ops with constant weights are handled like the matching module:
#: function or aten packet -> (module class, argument names)
_FUNC_AFFINE: dict[Any, tuple[type, tuple[str, ...]]] = {
    F.linear: (nn.Linear, ("input", "weight", "bias")), _A.linear: (nn.Linear, ("input", "weight", "bias")),
    F.conv1d: (nn.Conv1d, _CONV_ARGS), F.conv2d: (nn.Conv2d, _CONV_ARGS), F.conv3d: (nn.Conv3d, _CONV_ARGS),
    _A.conv1d: (nn.Conv1d, _CONV_ARGS), _A.conv2d: (nn.Conv2d, _CONV_ARGS), _A.conv3d: (nn.Conv3d, _CONV_ARGS),
    F.conv_transpose1d: (nn.ConvTranspose1d, _TCONV_ARGS), F.conv_transpose2d: (nn.ConvTranspose2d, _TCONV_ARGS),
    F.conv_transpose3d: (nn.ConvTranspose3d, _TCONV_ARGS), _A.conv_transpose1d: (nn.ConvTranspose1d, _TCONV_ARGS),
    _A.conv_transpose2d: (nn.ConvTranspose2d, _TCONV_ARGS), _A.conv_transpose3d: (nn.ConvTranspose3d, _TCONV_ARGS),
    _A.addmm: (nn.Linear, ("bias", "input", "weight_t", "beta", "alpha")),  # GPT-2's Conv1D: b + x @ W
}
_CALLS = ("call_module", "call_function", "call_method")


def _key(target: Any) -> Any:
    """An fx target as a table key: aten overloads (``aten.add.Tensor``) by their packet."""
    return getattr(target, "overloadpacket", target)


def _lookup(table: Mapping[Any, Any], target: Any) -> Any:
    try:
        if target in table:
            return table[target]
        k = _key(target)
        return table.get(k)
    except TypeError:  # unhashable target
        return None


_FUNCTIONAL_CACHE: dict[Any, Any] = {}


def _functional_op(target: Any) -> Any:
    """The out-of-place twin of an in-place aten op (``aten.add_.Tensor`` -> ``aten.add.Tensor``):
    the interpreter must not overwrite the stored values that rules read."""
    if target in _FUNCTIONAL_CACHE:
        return _FUNCTIONAL_CACHE[target]
    out = target
    schema = getattr(target, "_schema", None)
    if schema is not None and schema.is_mutable:
        name = target.overloadpacket.__name__
        if name.endswith("_") and not name.startswith("_"):
            pk = getattr(_A, name[:-1], None)
            ov = getattr(pk, target._overloadname, None) if pk is not None else None
            if ov is not None:
                out = ov
    _FUNCTIONAL_CACHE[target] = out
    return out


#: ops whose result depends on the shape/dtype of their input but not on its values
_SHAPE_ONLY = set(getattr(_A, n) for n in ("new_zeros", "new_ones", "new_full", "new_empty", "zeros_like",
                                          "ones_like", "full_like", "empty_like", "sym_size", "sym_numel",
                                          "sym_stride", "scalar_tensor") if hasattr(_A, n)) | \
    {torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, "new_zeros", "new_ones", "new_full",
     "new_empty", "size", "dim", "numel", getattr, len}
_VIEW_OPS = set(getattr(_A, n) for n in ("slice", "select", "view", "_unsafe_view", "as_strided", "diagonal",
                                        "transpose", "permute", "unsqueeze", "squeeze", "expand", "narrow", "alias",
                                        "t", "unflatten", "split", "chunk", "unbind", "split_with_sizes",
                                        "reshape", "flatten", "view_as", "expand_as", "movedim"))


def _dependents(nodes: Sequence[fx.Node]) -> set[fx.Node]:
    """Nodes whose value depends on the values of an input (the others are constants: weights,
    masks built from buffers or from an input's shape only)."""
    dep: set[fx.Node] = {n for n in nodes if n.op == "placeholder"}
    for n in nodes:
        if n.op in _CALLS and any(a in dep for a in n.all_input_nodes):
            if (n.op != "call_module" and _lookup_set(_SHAPE_ONLY, n.target)):
                continue
            dep.add(n)
    return dep


def _lookup_set(table: set, target: Any) -> bool:
    try:
        return target in table or _key(target) in table
    except TypeError:
        return False


def _functionalize(ep: Any) -> fx.GraphModule:
    """The graph of an ``ExportedProgram`` without in-place ops on input-dependent values.

    Training-IR graphs keep in-place ops (``relu_``, ``add_``; ``fill_`` on a slice of a mask).
    The interpreter keeps every node's value for the rules, so an in-place op on an
    input-dependent tensor becomes its out-of-place twin and later uses of the mutated
    tensor read the op's result. In-place ops on constants (masks built from shapes) run as
    they are. Mutation through a view of an input-dependent tensor needs full
    functionalisation (``run_decompositions({})``, slower)."""
    gm = ep.module()
    g = gm.graph
    nodes = list(g.nodes)
    dep = _dependents(nodes)
    order = {n: i for i, n in enumerate(nodes)}
    hard = False
    for n in nodes:
        schema = getattr(n.target, "_schema", None) if n.op == "call_function" else None
        if schema is None or not schema.is_mutable or not n.args or not isinstance(n.args[0], fx.Node):
            continue
        a = n.args[0]
        if a not in dep:
            continue
        twin = _functional_op(n.target)
        if twin is n.target or (a.op == "call_function" and _lookup_set(_VIEW_OPS, a.target)):
            hard = True
            break
        n.target = twin
        for u in list(a.users):
            if u is not n and order.get(u, -1) > order[n]:
                u.replace_input_with(a, n)
    if hard:
        log.info("relevance: the exported graph mutates a view of an input-dependent tensor; functionalising it")
        return ep.run_decompositions({}).module()
    g.lint()
    gm.recompile()
    return gm


def _functional_module(cls: type, vals: dict[str, Any]) -> nn.Module:
    """A stand-in module (class ``cls``, no ``__init__``) carrying a functional call's parameters."""
    m = cls.__new__(cls)
    nd = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2,
          nn.ConvTranspose3d: 3}.get(cls)
    weight = vals["weight_t"].t() if "weight_t" in vals else vals["weight"]
    attrs: dict[str, Any] = {"weight": weight, "bias": vals.get("bias")}
    if nd is not None:
        def tup(v: Any) -> Any:
            return v if isinstance(v, str) else (tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * nd)
        attrs.update(stride=tup(vals.get("stride", 1)), padding=tup(vals.get("padding", 0)),
                     dilation=tup(vals.get("dilation", 1)), groups=int(vals.get("groups", 1)), padding_mode="zeros")
        if cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
            attrs["output_padding"] = tup(vals.get("output_padding", 0))
    for k, v in attrs.items():
        object.__setattr__(m, k, v)
    return m


def _unwrap_output(a: Any) -> Any:
    """The single output of a graph (``torch.export`` wraps it in 1-tuples)."""
    while isinstance(a, (tuple, list)) and len(a) == 1:
        a = a[0]
    return a


def _zeros_like_tree(v: Any) -> Any:
    if isinstance(v, Tensor):
        return torch.zeros_like(v, dtype=v.dtype if v.is_floating_point() else torch.float32)
    if isinstance(v, (tuple, list)):
        return tuple(_zeros_like_tree(t) for t in v)
    return None


class _Tracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if module_matches(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, qualname)


def _leaf_types(c: Composite) -> tuple[type, ...]:
    out: list[type] = []
    for types, _ in tuple(c.module_rules) + tuple(c.first_rules):
        out.extend(types if isinstance(types, tuple) else (types,))
    out.extend(p for p in c.passthrough if isinstance(p, type))
    return tuple(out)


def _hook_chain(model: nn.Module, example: Tensor, fx_error: Exception | None,
                export_error: Exception | None = None) -> fx.GraphModule:
    """Fallback when fx tracing fails: record leaf-module calls with forward hooks and build a
    graph if they form a plain chain."""
    calls: list[tuple[str, tuple, Any]] = []
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def hook(mod: nn.Module, inp: tuple, out: Any) -> None:
        calls.append((names[mod], inp, out))

    for n, m in model.named_modules():
        if n and not list(m.children()):
            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        for h in handles:
            h.remove()
    why = None
    prev: Any = example
    for i, (n, inp, o) in enumerate(calls):
        if len(inp) != 1 or inp[0] is not prev:
            src = "the model input" if i == 0 else f"the output of {calls[i - 1][0]!r}"
            why = f"module {n!r} does not consume {src} (an operation outside modules sits in between)"
            break
        prev = o
    if why is None and out is not prev:
        why = "the model output is not the output of its last module"
    if why is None and not calls:
        why = "the model calls no modules"
    if why is not None:
        fx_msg = (f"torch.fx cannot trace {type(model).__name__} ({type(fx_error).__name__}: {fx_error})"
                  if fx_error is not None else f"{type(model).__name__} was not traced with torch.fx")
        ex_msg = "" if export_error is None else \
            f", torch.export failed too ({type(export_error).__name__}: {str(export_error).splitlines()[0][:300]})"
        raise ArgumentError(
            f"model: {fx_msg}{ex_msg}, and the module-hook fallback needs a plain chain of modules, but {why}. "
            f"Make forward traceable (no data-dependent control flow) or wrap the extra operations in modules")
    g = fx.Graph()
    cur = g.placeholder("x")
    for n, _, _ in calls:
        cur = g.call_module(n, (cur,))
    g.output(cur)
    log.info("relevance: fx tracing failed (%s); using the module chain recorded by hooks", fx_error)
    return fx.GraphModule(model, g)


def _node_label(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


class RelevanceEngine:
    """Relevance propagation for one model and one rule set (trace once, call many times).

    Args:
        model: any ``nn.Module``; put in eval mode by the caller (BatchNorm folding uses the
            running statistics).
        composite: the rule set (default :func:`~.composite.dlbacktrace`).
        example: an input (tensor or sequence of tensors). Only needed when ``torch.fx``
            cannot trace the model; without it the fallback capture runs at the first call,
            on that call's input.
        capture: how the model becomes a graph:

            * ``"auto"`` (default): ``torch.fx`` with every module that has a rule as a leaf;
              if tracing fails, or the graph holds an op without a rule (e.g. an
              ``nn.MultiheadAttention`` or ``nn.TransformerEncoderLayer`` module, torchvision's
              ``shifted_window_attention``), the model is captured with ``torch.export``
              (ATen-level ops: linear, sdpa, layer_norm, ...) on the example or call input;
              if that fails too, module forward hooks (plain chains of modules only).
            * ``"fx"``, ``"export"``, ``"hooks"``: only that capture.

    Layer names are module paths (``"features.6"``) and fx node names of functional ops; in
    a ``torch.export`` graph every module path of the model is also a name (the relevance at
    that module's output), found through the graph's module stack.

    Example::

        eng = RelevanceEngine(model, lrp_epsilon())
        res = eng(x, target=3, record=["features.3"])
        res.input, res.layers["features.3"]
    """

    def __init__(self, model: nn.Module, composite: Composite | None = None, example: Any = None, *,
                 capture: str = "auto") -> None:
        if not isinstance(model, nn.Module):
            raise ArgumentError(f"model: expected an nn.Module, got {type(model).__name__}")
        if capture not in ("auto", "fx", "export", "hooks"):
            raise ArgumentError(f"capture: expected 'auto', 'fx', 'export' or 'hooks', got {capture!r}")
        self.model = model
        self.composite = composite if composite is not None else dlbacktrace()
        if not isinstance(self.composite, Composite):
            raise ArgumentError(f"composite: expected a Composite, got {type(self.composite).__name__}")
        self.capture = capture
        self.traced_with = "pending"
        self._fx_error: Exception | None = None
        self._static_sig: tuple | None = None
        self._export_cache: dict[tuple, dict[str, Any]] = {}
        if capture in ("auto", "fx"):
            try:
                tracer = _Tracer(_leaf_types(self.composite))
                graph = tracer.trace(model)
                self._setup(fx.GraphModule(tracer.root, graph), "fx")
            except Exception as e:  # noqa: BLE001 - any tracing failure triggers the fallback
                if capture == "fx":
                    raise ArgumentError(f"model: torch.fx cannot trace {type(model).__name__} "
                                        f"({type(e).__name__}: {e}); try capture='auto' or 'export'") from e
                self._fx_error = e
        if self.traced_with == "pending" and example is not None:
            self._capture_fallback(_as_inputs(example, "example"))
        elif self.traced_with == "pending" and capture == "hooks":
            raise ArgumentError("capture='hooks' needs example=<an input>")

    # ------------------------------------------------------------------ capture
    def _capture_fallback(self, xs: list[Tensor]) -> None:
        """torch.export, then module hooks (fx failed or was not asked for)."""
        ex_err: Exception | None = None
        if self.capture in ("auto", "export"):
            try:
                self._setup(*self._export(xs))
                return
            except Exception as e:  # noqa: BLE001
                if self.capture == "export":
                    raise ArgumentError(f"model: torch.export cannot capture {type(self.model).__name__} "
                                        f"({type(e).__name__}: {str(e)[:2000]})") from e
                ex_err = e
        self._setup(_hook_chain(self.model, xs[0], self._fx_error, ex_err), "hooks")

    def _export(self, xs: list[Tensor]) -> tuple[fx.GraphModule, str]:
        """Capture with ``torch.export`` for the shapes of ``xs`` (static shapes: capturing with a
        symbolic batch size takes ~10x longer; each new input signature is captured once and
        kept, see :meth:`_prepare_call`)."""
        from torch.export import export

        args = tuple(xs)
        with torch.enable_grad():  # keeps nn.MultiheadAttention / TransformerEncoderLayer off their fused paths
            ep = export(self.model, args, strict=False)
        self._static_sig = _signature(args)
        log.info("relevance: captured %s with torch.export for input shapes %s", type(self.model).__name__,
                 [tuple(x.shape) for x in args])
        return _functionalize(ep), "export"

    def _setup(self, gm: fx.GraphModule, how: str) -> None:
        self.gm = gm
        self.traced_with = how
        self._aliases: dict[str, str] = {}
        self._folds: list[tuple[nn.Module, nn.Module, nn.Module]] = []
        if self.composite.canonize_batchnorm and how != "export":
            self._fold_batchnorm()
        self._prepare()

    # ------------------------------------------------------------------ setup
    def _fold_batchnorm(self) -> None:
        """Canonizer: fold ``BatchNorm`` into the Linear/Conv right before it.

        ``W' = W * g / sqrt(var + eps)``, ``b' = (b - mean) * g / sqrt(var + eps) + beta``; the
        pair becomes one affine node named after the conv (the BatchNorm's name is an alias of
        it). The user's modules are not modified; folded copies are refreshed at every call.
        Transposed convolutions are not folded (their weight layout differs); their BatchNorm
        gets the epsilon rule on its elementwise affine map."""
        g = self.gm.graph
        k = 0
        foldable = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        for node in list(g.nodes):
            if node.op != "call_module":
                continue
            bn = self.gm.get_submodule(node.target)
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_var is None:
                continue
            src = node.args[0] if node.args else None
            if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
                continue
            lin = self.gm.get_submodule(src.target)
            if not module_matches(lin, foldable):
                continue
            fused = copy.deepcopy(lin)
            if fused.bias is None:
                fused.bias = nn.Parameter(torch.zeros(fused.out_channels if hasattr(fused, "out_channels")
                                                      else fused.out_features, device=lin.weight.device,
                                                      dtype=lin.weight.dtype))
            name = f"_semlens_bnfold_{k}"
            k += 1
            self.gm.add_submodule(name, fused)
            self._folds.append((lin, bn, fused))
            self._aliases[str(node.target)] = str(src.target)
            with g.inserting_after(src):
                new = g.call_module(name, src.args, src.kwargs)
            new.meta["label"] = str(src.target)
            node.replace_all_uses_with(new)
            g.erase_node(node)
            g.erase_node(src)
        g.lint()
        self.gm.recompile()

    @torch.no_grad()
    def _refresh_folds(self) -> None:
        for lin, bn, fused in self._folds:
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.weight is not None else \
                1.0 / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
            fused.weight.copy_(lin.weight * scale.view(-1, *([1] * (lin.weight.dim() - 1))))
            b0 = lin.bias if lin.bias is not None else torch.zeros_like(bn.running_mean)
            fused.bias.copy_((b0 - bn.running_mean) * scale + shift)

    def _prepare(self) -> None:
        nodes = list(self.gm.graph.nodes)
        self.nodes = nodes
        self.placeholders = [n for n in nodes if n.op == "placeholder"]
        if not self.placeholders:
            raise ArgumentError("model: its forward takes no input")
        self.label = {n: n.meta.get("label", _node_label(n)) for n in nodes}
        # nodes that depend on an input (the others are constants: weights, masks from buffers, ...)
        self._depends = dep = _dependents(nodes)
        self._skip = {n for n in nodes if n.op == "call_module" and
                      type(self.gm.get_submodule(n.target)).__name__ == "GuardsFn"}
        # functional affine ops with constant weights
        self.func_affine: dict[fx.Node, tuple[type, tuple[str, ...]]] = {}
        for n in nodes:
            spec = _lookup(_FUNC_AFFINE, n.target) if n.op == "call_function" else None
            if spec is None:
                continue
            names = spec[1]
            bound = dict(zip(names, n.args))
            bound.update(n.kwargs)
            if "weight_t" in names:  # addmm(bias, x, W): an affine map only for alpha = beta = 1
                w = bound.get("weight_t")
                if bound.get("alpha", 1) != 1 or bound.get("beta", 1) != 1:
                    continue
            else:
                w = bound.get("weight")
            b = bound.get("bias")
            b_const = not isinstance(b, fx.Node) or b not in dep
            if isinstance(w, fx.Node) and w not in dep and b_const and isinstance(bound.get("input"), fx.Node):
                self.func_affine[n] = spec
        self.first_affine = None
        for n in nodes:
            if (n.op == "call_module" and module_matches(self.gm.get_submodule(n.target), AFFINE_TYPES)) or \
                    n in self.func_affine:
                self.first_affine = n
                break
        # bounded activation following a node
        self.next_act: dict[fx.Node, tuple[str, Callable]] = {}
        for n in nodes:
            if len(n.users) != 1:
                continue
            u = next(iter(n.users))
            key: Any = None
            fn: Callable | None = None
            if u.op == "call_module":
                m = self.gm.get_submodule(u.target)
                key, fn = type(m), m
            elif u.op == "call_function":
                key, fn = u.target, (_functional_op(u.target) if hasattr(u.target, "_schema") else u.target)
            elif u.op == "call_method":
                key, fn = u.target, (lambda t, _m=u.target: getattr(t, _m)())
            act = _lookup(_BOUNDED, key)
            if act is not None:
                self.next_act[n] = (act, fn)  # type: ignore[assignment]
        # torch.export graphs: module paths as layer names, declared pass-through modules collapsed
        self.redirect: dict[fx.Node, fx.Node] = {}
        if self.traced_with == "export":
            self._module_aliases()
        # rule lookup, once
        self.rules: dict[fx.Node, R.Rule] = {}
        for n in nodes:
            if n.op not in _CALLS or n in self._skip:
                continue
            mod = self.gm.get_submodule(n.target) if n.op == "call_module" else None
            if n in self.func_affine:
                cls = self.func_affine[n][0]
                proto = cls.__new__(cls)
                rule = self.composite.rule_for("call_module", n.target, proto, is_first=(n is self.first_affine))
            else:
                rule = self.composite.rule_for(n.op, n.target, mod, is_first=(n is self.first_affine))
            if rule is None and n.op == "call_function" and n.target is operator.getitem:
                rule = R.IndexMap()
            if rule is not None:
                self.rules[n] = rule
        self._statistic = {n for n in nodes if n.op in ("call_function", "call_method") and
                           self.composite.is_statistic(n.op, n.target)}
        self._fast_pool = {n: k for n in nodes if (k := self._block_pool(n)) is not None}
        self._checked: dict[tuple, set[fx.Node]] = {}  # input dtypes -> variable nodes (graph checked)

    def _block_pool(self, n: fx.Node) -> tuple[int, int] | None:
        """Kernel of a 2-d max pooling with stride = kernel, no padding, dilation 1, no indices,
        floor mode (computed faster by :func:`~.rules.max_pool2d_blocks`), else ``None``."""
        if n.op == "call_module":
            m = self.gm.get_submodule(n.target)
            if type(m) is not nn.MaxPool2d or m.return_indices or m.ceil_mode:
                return None
            k, st, pd, dl = m.kernel_size, m.stride, m.padding, m.dilation
        elif n.op == "call_function" and (n.target in (F.max_pool2d,) or _key(n.target) is _A.max_pool2d):
            b = dict(zip(_MAXPOOL_ARGS, n.args))
            b.update(n.kwargs)
            if b.get("return_indices") or b.get("ceil_mode") or any(isinstance(v, fx.Node) for v in b.values()
                                                                   if v is not b.get("input")):
                return None
            k, st, pd, dl = b.get("kernel_size"), b.get("stride"), b.get("padding", 0), b.get("dilation", 1)
        else:
            return None
        k2 = R._pair(k, 2)
        st2 = k2 if st in (None, [], ()) else R._pair(st, 2)
        if st2 != k2 or R._pair(pd, 2) != (0, 0) or R._pair(dl, 2) != (1, 1):
            return None
        return k2

    def _module_aliases(self) -> None:
        """Export graphs: each module path names the relevance at that module's output (the
        last of its nodes used outside it); modules whose type the rule set passes through
        (declared ones, Hugging Face activations) collapse into one pass-through."""
        members: dict[str, list[fx.Node]] = {}
        types: dict[str, str] = {}
        for n in self.nodes:
            stack = n.meta.get("nn_module_stack") or {}
            for path, typ in stack.values():
                if path:
                    members.setdefault(path, []).append(n)
                    types[path] = typ if isinstance(typ, str) else f"{typ.__module__}.{typ.__qualname__}"
        declared = {f"{t.__module__}.{t.__qualname__}" for t in self.composite.passthrough if isinstance(t, type)}
        for path, mem in members.items():
            inside = set(mem)
            outs = [n for n in mem if any(u not in inside for u in n.users)]
            if not outs:
                continue
            last = outs[-1]
            self._aliases.setdefault(path, self.label[last])
            typ = types[path]
            if typ in declared or _is_hf_activation(typ):
                ins = {a for n in mem for a in n.all_input_nodes if a not in inside and a in self._depends}
                if len(outs) == 1 and len(ins) == 1:
                    self.redirect[last] = next(iter(ins))

    # ------------------------------------------------------------------ forward
    def _forward(self, inputs: Sequence[Tensor]) -> dict[fx.Node, Any]:
        env: dict[fx.Node, Any] = {}
        it = iter(inputs)
        restore = []
        for m in self.gm.modules():
            if getattr(m, "inplace", False) is True:
                m.inplace = False
                restore.append(m)
        try:
            for n in self.nodes:
                if n.op == "placeholder":
                    try:
                        env[n] = next(it)
                    except StopIteration:
                        if n.args:  # default value
                            env[n] = n.args[0]
                        else:
                            raise ArgumentError(f"x: the model takes {len(self.placeholders)} inputs, got "
                                                f"{len(inputs)}") from None
                    continue
                if n.op == "output":
                    env[n] = fx.graph.map_arg(n.args[0], lambda a: env[a])
                    continue
                env[n] = self._run(n, env, None)
        finally:
            for m in restore:
                m.inplace = True
        return env

    def _run(self, n: fx.Node, env: Mapping[fx.Node, Any], subst: dict[int, Tensor] | None) -> Any:
        """Run node ``n`` with values from ``env``; ``subst`` replaces the k-th variable-tensor
        occurrence among its arguments."""
        counter = [0]
        occ = self._occ_set.get(n) if subst is not None else None

        def val(a: fx.Node) -> Any:
            v = env[a]
            if subst is not None and isinstance(v, Tensor) and a in self._var and \
                    (v.is_floating_point() or (occ is not None and a in occ)):
                k = counter[0]
                counter[0] += 1
                return subst.get(k, v)
            return v

        args = fx.graph.map_arg(n.args, val)
        kwargs = fx.graph.map_arg(n.kwargs, val)
        if "inplace" in kwargs:
            kwargs = dict(kwargs, inplace=False)
        if n.op == "get_attr":
            obj: Any = self.gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            return obj
        if subst is None and n in self._fast_pool:  # forward only: re-runs for a VJP keep max-pool's gradient
            y = R.max_pool2d_blocks(args[0], self._fast_pool[n])
            if y is not None:
                return y
        if n.op == "call_module":
            return self.gm.get_submodule(n.target)(*args, **kwargs)
        if n.op == "call_function":
            fn = _INPLACE_FREE.get(n.target, n.target)
            return fn(*args, **kwargs)
        if n.op == "call_method":
            meth = _INPLACE_METHODS.get(n.target, n.target)
            return getattr(args[0], meth)(*args[1:], **kwargs)
        raise ArgumentError(f"internal: unknown fx op {n.op!r}")  # pragma: no cover

    def _variables(self, env: Mapping[fx.Node, Any]) -> set[fx.Node]:
        """Nodes whose value depends on the input and can carry relevance: floating tensors (or
        tuples holding one), and integer tensors reshaped from integer inputs (token ids).
        Normalisation statistics are constants."""
        var: set[fx.Node] = set()
        for n in self.nodes:
            if n.op == "placeholder":
                if isinstance(env[n], Tensor):
                    var.add(n)
            elif n.op in _CALLS and n in self._depends and n not in self._statistic and n not in self._skip:
                if not any(a in var for a in n.all_input_nodes):
                    continue
                v = env[n]
                if _is_tensorish(v):
                    var.add(n)
                elif isinstance(v, Tensor) and n.args and isinstance(n.args[0], fx.Node) and n.args[0] in var \
                        and not env[n.args[0]].is_floating_point() and getattr(self.rules.get(n), "integer_inputs",
                                                                                False):
                    var.add(n)
        return var

    # ------------------------------------------------------------------ backward
    def _occurrences(self, n: fx.Node, env: Mapping[fx.Node, Any]) -> tuple[list[fx.Node], list[Any]]:
        """The node's variable inputs that can receive relevance, and their argument slots."""
        occ: list[fx.Node] = []
        slots: list[Any] = []
        ints = getattr(self.rules.get(n), "integer_inputs", False)

        def visitor(slot: Any) -> Callable[[fx.Node], fx.Node]:
            def visit(a: fx.Node) -> fx.Node:
                v = env[a]
                # integer/bool tensors (indices, masks) carry no relevance, except token ids
                if a in self._var and isinstance(v, Tensor) and (v.is_floating_point() or ints):
                    occ.append(a)
                    slots.append(slot)
                return a
            return visit

        for i, a in enumerate(n.args):
            fx.graph.map_arg(a, visitor(i))
        for k, a in n.kwargs.items():
            fx.graph.map_arg(a, visitor(k))
        return occ, slots

    def _context(self, n: fx.Node, env: Mapping[fx.Node, Any], occ: list[fx.Node], slots: list[Any]
                 ) -> R.NodeContext:
        inputs = [env[a] for a in occ]
        self._occ_set[n] = set(occ)

        def call(*new: Tensor) -> Any:
            return self._run(n, env, dict(enumerate(new)))

        args = tuple(fx.graph.map_arg(n.args, lambda a: env[a]))
        kwargs = dict(fx.graph.map_arg(n.kwargs, lambda a: env[a]))
        mod = self.gm.get_submodule(n.target) if n.op == "call_module" else None
        if n in self.func_affine:
            cls, names = self.func_affine[n]
            vals = dict(zip(names, args))
            vals.update(kwargs)
            mod = _functional_module(cls, vals)
        act = self.next_act.get(n) if self.composite.activation_saturation else None
        ctx = R.NodeContext(name=self.label[n], kind=n.op, target=mod if mod is not None else n.target,
                            module=mod, inputs=inputs, output=env[n], call=call,
                            activation=act[0] if act else None, activation_fn=act[1] if act else None,
                            is_first=n is self.first_affine, args=args, kwargs=kwargs, slots=slots)
        key = n.target
        sign = _lookup(_ADD, key) if n.op in ("call_function", "call_method") else None
        if sign is not None:
            vals = list(n.args[:2])
            if len(vals) == 2 and n.kwargs.get("alpha", 1) in (1, None):
                terms = []
                k = 0
                for pos, a in enumerate(vals):
                    s = 1 if pos == 0 else sign
                    if isinstance(a, fx.Node) and a in self._var and isinstance(env[a], Tensor):
                        terms.append((env[a], s, k))
                        k += 1
                    else:
                        v = env[a] if isinstance(a, fx.Node) else a
                        if not isinstance(v, Tensor):
                            v = torch.as_tensor(v, dtype=ctx.output.dtype, device=ctx.output.device)
                        terms.append((v, s, None))
                ctx.extra["addends"] = terms
        if n.op == "call_function" and (n.target in _MAXPOOL or _key(n.target) in _MAXPOOL):
            b = dict(zip(_MAXPOOL_ARGS, args))
            b.update(kwargs)
            st = b.get("stride")
            ctx.extra["pool_args"] = (b["kernel_size"], st if st not in (None, [], ()) else None,
                                      b.get("padding", 0), b.get("dilation", 1))
        return ctx

    def _describe(self, nodes: Iterable[fx.Node]) -> list[str]:
        descr = []
        for n in nodes:
            if n.op == "call_module":
                descr.append(f"module {type(self.gm.get_submodule(n.target)).__name__} at {n.target!r}")
            elif n.op == "call_method":
                descr.append(f"method Tensor.{n.target} at node {n.name!r}")
            else:
                t = n.target
                if hasattr(t, "_schema"):
                    where = ""
                    stack = n.meta.get("nn_module_stack") or {}
                    if stack:
                        path, typ = list(stack.values())[-1]
                        where = f" in {path!r} ({typ if isinstance(typ, str) else typ.__name__})"
                    descr.append(f"op {t} at node {n.name!r}{where}")
                else:
                    descr.append(f"function {getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', t)} "
                                 f"at node {n.name!r}")
        return descr

    def _unsupported(self, env: Mapping[fx.Node, Any], out: fx.Node) -> list[fx.Node]:
        """Nodes on the relevance path (variable, reaching the output) without a rule."""
        needed = {out}
        bad = []
        for n in reversed(self.nodes):
            if n not in needed or n.op == "placeholder" or n not in self._var:
                continue
            if n in self.redirect:
                needed.add(self.redirect[n])
                continue
            if (n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node)
                    and isinstance(env[n.args[0]], (tuple, list))):
                needed.add(n.args[0])
                continue
            if n not in self.rules:
                bad.append(n)
                continue
            needed.update(self._occurrences(n, env)[0])
        return bad[::-1]

    def _raise_unsupported(self, nodes: list[fx.Node], note: str = "") -> None:
        raise UnsupportedOpError(
            f"rule set {self.composite.name!r} has no rule for: {'; '.join(self._describe(nodes))}. Add a rule with "
            f"composite.with_rules(...) or, for shape-preserving ops only, declare an explicit pass-through with "
            f"composite.with_passthrough(...){note}")

    def _prepare_call(self, xs: list[Tensor]) -> tuple[dict[fx.Node, Any], fx.Node]:
        """Capture if needed, run the forward pass, check that every op on the relevance path
        has a rule (``capture="auto"``: an fx graph lacking rules is re-captured with torch.export)."""
        if self.traced_with == "pending":
            self._capture_fallback(xs)
        elif self.traced_with == "export" and _signature(xs) != self._static_sig:
            sig = _signature(xs)
            self._export_cache[self._static_sig] = self._save_state()
            if sig in self._export_cache:
                self._restore_state(self._export_cache.pop(sig))
            else:
                self._setup(*self._export(xs))
            while len(self._export_cache) > 7:  # keep the graphs of the 8 latest input signatures
                self._export_cache.pop(next(iter(self._export_cache)))
        while True:
            self._refresh_folds()
            self._occ_set: dict[fx.Node, set] = {}
            env = self._forward(xs)
            out_node = next(n for n in self.nodes if n.op == "output")
            out_arg = _unwrap_output(out_node.args[0])
            if not isinstance(out_arg, fx.Node) or not isinstance(env[out_arg], Tensor):
                raise ArgumentError("model: the output must be a single tensor (got a "
                                    f"{type(env[out_node]).__name__}); wrap the model to return one tensor")
            # which nodes carry relevance depends on the graph and the input dtypes only: checked once
            sig = tuple(t.dtype for t in xs)
            if sig in self._checked:
                self._var = self._checked[sig]
                return env, out_arg
            self._var = self._variables(env)
            bad = self._unsupported(env, out_arg)
            if not bad:
                self._checked[sig] = self._var
                return env, out_arg
            if self.capture == "auto" and self.traced_with == "fx":
                fx_state = self._save_state()
                try:
                    self._setup(*self._export(xs))
                except Exception as e:  # noqa: BLE001
                    self._restore_state(fx_state)
                    self._raise_unsupported(bad, f" (capture with torch.export failed too: {type(e).__name__}: "
                                                 f"{str(e).splitlines()[0][:300]})")
                env2 = self._forward(xs)
                self._var = self._variables(env2)
                out2 = _unwrap_output(next(n for n in self.nodes if n.op == "output").args[0])
                if isinstance(out2, fx.Node) and not self._unsupported(env2, out2):
                    log.info("relevance: %s has ops without rules under torch.fx (%s); using its torch.export "
                             "graph", type(self.model).__name__, "; ".join(self._describe(bad[:3])))
                    continue
                self._restore_state(fx_state)
            self._raise_unsupported(bad)

    def _save_state(self) -> dict[str, Any]:
        keys = ("gm", "traced_with", "_aliases", "_folds", "nodes", "placeholders", "label", "_depends", "_skip",
                "func_affine", "first_affine", "next_act", "redirect", "rules", "_statistic", "_static_sig",
                "_fast_pool", "_checked")
        return {k: getattr(self, k) for k in keys}

    def _restore_state(self, st: dict[str, Any]) -> None:
        for k, v in st.items():
            setattr(self, k, v)

    def __call__(
        self,
        x: Tensor | Sequence[Tensor],
        target: int | Sequence[int] | Tensor | None = None,
        *,
        seed: Tensor | None = None,
        multiplier: float = 1.0,
        record: Iterable[str] | str | None = None,
        modifiers: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
        negative_seed: Tensor | None = None,
        task: str = "classification",
        threshold: float = 0.5,
    ) -> RelevanceResult:
        """Propagate relevance for a batch.

        Args:
            x: the model input (a tensor, or a sequence of tensors for several inputs). Integer
                inputs (token ids) get one relevance value per id.
            target: what to explain; its meaning depends on ``task`` (below).
            seed: explicit output relevance (shape of the output), instead of ``target``/``task``.
            multiplier: the seed is scaled by it (dl-backtrace uses 100).
            record: layer names whose output relevance to return, ``"all"`` for every node.
            modifiers: ``{layer: f}``; ``f`` maps the relevance at that layer's output before
                it propagates further (used for CRP-style conditioning).
            negative_seed: contrast mode: seed of the negative stream (default: zeros at the
                target, ``multiplier * softmax(output)`` at the other classes).
            task: DLBacktrace's task modes, i.e. how the seed is made from the output ``y``:

                * ``"classification"``: ``y`` is ``[B, classes]``; the seed is
                  ``multiplier * one_hot(target)``; ``target`` is a class per sample, one class
                  for all, or ``None`` for each sample's argmax.
                * ``"regression"``: any ``y``; the seed is ``multiplier * y`` on the outputs
                  selected by ``target`` (flat indices per sample, e.g. the 4 box coordinates;
                  ``None``: all outputs), so the input relevance decomposes the predicted values.
                * ``"segmentation"``: ``y`` is ``[B, C, *spatial]`` logits; the seed is
                  ``multiplier`` at the pixels of class ``target`` whose probability (sigmoid for
                  ``C = 1``, else softmax over ``C``) exceeds ``threshold``.
                * ``"generation"``: ``y`` is ``[B, T, vocab]`` (or ``[B, vocab]`` for the last
                  position); the seed is ``multiplier`` at the last position's ``target`` token
                  (``None``: the predicted next token).
            threshold: probability threshold of the segmentation task.
        """
        xs = _as_inputs(x, "x")
        dev = next((p.device for p in self.model.parameters()), xs[0].device)
        for t in xs:
            if t.device != dev:
                raise DeviceError(f"x: input on {t.device} but the model's parameters are on {dev}")
        mods = dict(modifiers or {})
        with torch.no_grad():
            env, out_arg = self._prepare_call(xs)
            known = set(self.label.values()) | set(self._aliases) | {"input"}
            for name in mods:
                if name not in known:
                    raise ArgumentError(f"modifiers: unknown layer {name!r}; known layers: {sorted(known)[:20]}...")
            if record is None:
                rec: set[str] = set()
            elif record == "all":
                rec = known
            else:
                rec = {record} if isinstance(record, str) else set(record)
                unknown = rec - known
                if unknown:
                    raise ArgumentError(f"record: unknown layer(s) {sorted(unknown)}; known layers: "
                                        f"{sorted(known)[:50]}")
            rec_nodes = {self._aliases.get(r, r) for r in rec}
            mod_nodes = {self._aliases.get(k, k): f for k, f in mods.items()}
            y = env[out_arg]
            seed_t, tgt = self._seed(y, target, seed, multiplier, task, threshold)
            S = self.composite.streams
            if S == 2:
                if negative_seed is None:
                    neg = multiplier * torch.softmax(y.float(), dim=-1).to(y.dtype) if y.dim() == 2 else \
                        torch.zeros_like(y)
                    neg = neg * (seed_t == 0)
                else:
                    if negative_seed.shape != y.shape:
                        raise ShapeError(f"negative_seed: shape {tuple(negative_seed.shape)}, expected the output "
                                         f"shape {tuple(y.shape)}")
                    neg = negative_seed
                init: tuple = (seed_t, neg)
            else:
                init = (seed_t,)
            rel: dict[fx.Node, tuple] = {out_arg: init}
            recorded: dict[str, tuple] = {}
            for n in reversed(self.nodes):
                if n not in rel:
                    continue
                Rn = rel[n]
                lab = self.label[n]
                if lab in mod_nodes:
                    Rn = tuple(mod_nodes[lab](r) for r in Rn)
                if lab in rec_nodes:
                    recorded[lab] = Rn
                if n.op == "placeholder" or n not in self._var:
                    continue
                del rel[n]
                if n in self.redirect:  # a collapsed pass-through module
                    src = self.redirect[n]
                    for r in Rn:
                        if isinstance(r, Tensor) and r.shape != env[src].shape:
                            raise ShapeError(f"pass-through module ending at {lab!r}: output relevance of shape "
                                             f"{tuple(r.shape)} for an input of shape {tuple(env[src].shape)}")
                    self._accumulate(rel, src, Rn)
                    continue
                # getitem on a tuple-valued node (split, chunk, LSTM outputs, ...): scatter into that tuple
                if (n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node)
                        and isinstance(env[n.args[0]], (tuple, list))):
                    src = n.args[0]
                    tup = env[src]
                    idx = n.args[1]
                    contrib = tuple(tuple(r if i == idx else _zeros_like_tree(t) for i, t in enumerate(tup))
                                    for r in Rn)
                    self._accumulate(rel, src, contrib)
                    continue
                occ, slots = self._occurrences(n, env)
                if not occ:
                    continue
                rule = self.rules[n]
                ctx = self._context(n, env, occ, slots)
                if rule.coupled:
                    outs = rule.backward(ctx, Rn)  # list per input of stream tuples
                    per_input = [o if o is None else tuple(o) for o in outs]
                else:
                    per_stream = [rule.backward(ctx, r) for r in Rn]
                    per_input = []
                    for i in range(len(occ)):
                        vals = [ps[i] if i < len(ps) else None for ps in per_stream]
                        per_input.append(None if all(v is None for v in vals) else
                                         tuple(v if v is not None else _zeros_like_tree(env[occ[i]]) for v in vals))
                for a, r in zip(occ, per_input):
                    if r is None:
                        continue
                    for t in r:
                        if isinstance(t, Tensor) and t.shape != env[a].shape:
                            raise ShapeError(
                                f"rule {rule!r} at {self.label[n]!r} returned relevance of shape "
                                f"{tuple(t.shape)} for an input of shape {tuple(env[a].shape)}")
                    self._accumulate(rel, a, r)
            inp_node = self.placeholders[0]
            Rin = rel.get(inp_node, tuple(_zeros_like_tree(xs[0]) for _ in range(S)))
            if self.placeholders[0].name in rec_nodes or "input" in rec:
                recorded.setdefault("input", Rin)
        # aliases (folded BatchNorm, module paths of export graphs): same relevance as their node
        for a, tgt_name in self._aliases.items():
            if a in rec and tgt_name in recorded:
                recorded[a] = recorded[tgt_name]
        layers = {k: (v[0] if S == 1 else _sub(v[0], v[1])) for k, v in recorded.items() if k in rec or k == "input"}
        streams: dict[str, tuple[Tensor, ...]] = {}
        if S == 2:
            streams = {k: tuple(v) for k, v in recorded.items()}
            streams["input"] = tuple(Rin)
        return RelevanceResult(input=Rin[0] if S == 1 else Rin[0] - Rin[1], layers=layers, output=y,
                               target=tgt, streams=streams)

    @staticmethod
    def _accumulate(rel: dict, node: fx.Node, r: tuple) -> None:
        if node in rel:
            old = rel[node]
            rel[node] = tuple(_add(a, b) for a, b in zip(old, r))
        else:
            rel[node] = r

    @staticmethod
    def _seed(y: Tensor, target: Any, seed: Tensor | None, multiplier: float, task: str = "classification",
              threshold: float = 0.5) -> tuple[Tensor, Tensor]:
        B = y.shape[0] if y.dim() else 1
        none = torch.full((B,), -1, dtype=torch.long, device=y.device)
        if seed is not None:
            if target is not None:
                raise ArgumentError("target and seed: give one of them, not both")
            if not isinstance(seed, Tensor) or seed.shape != y.shape:
                raise ShapeError(f"seed: expected a tensor of the output shape {tuple(y.shape)}, got "
                                 f"{tuple(seed.shape) if isinstance(seed, Tensor) else type(seed).__name__}")
            return seed.to(y) * multiplier, none
        if task == "regression":
            flat = y.reshape(B, -1)
            mask = torch.zeros_like(flat)
            if target is None:
                mask.fill_(1)
            else:
                idx = torch.as_tensor(target, device=y.device).long().reshape(-1)
                if (idx < 0).any() or (idx >= flat.shape[1]).any():
                    raise ArgumentError(f"target: output indices must be in [0, {flat.shape[1]}), got "
                                        f"{idx.tolist()[:8]}")
                mask[:, idx] = 1
            return (multiplier * flat * mask).reshape(y.shape), none
        if task == "segmentation":
            if y.dim() < 3:
                raise ShapeError(f"model output: segmentation needs [B, C, *spatial] logits, got {tuple(y.shape)}")
            if not 0 <= threshold <= 1:
                raise ArgumentError(f"threshold: expected a probability in [0, 1], got {threshold}")
            C = y.shape[1]
            c = 0 if target is None and C == 1 else target
            if c is None:
                raise ArgumentError("target: segmentation with several classes needs the class to explain")
            c = int(c)
            if not 0 <= c < C:
                raise ArgumentError(f"target: class must be in [0, {C}), got {c}")
            p = torch.sigmoid(y) if C == 1 else torch.softmax(y, 1)
            s = torch.zeros_like(y)
            s[:, c] = multiplier * (p[:, c] > threshold).to(y.dtype)
            return s, torch.full((B,), c, dtype=torch.long, device=y.device)
        if task == "generation":
            if y.dim() not in (2, 3):
                raise ShapeError(f"model output: generation needs [B, T, vocab] or [B, vocab] logits, got "
                                 f"{tuple(y.shape)}")
            last = y[:, -1] if y.dim() == 3 else y
            s_last, t = RelevanceEngine._seed(last, target, None, multiplier)
            s = torch.zeros_like(y)
            if y.dim() == 3:
                s[:, -1] = s_last
            else:
                s = s_last
            return s, t
        if task != "classification":
            raise ArgumentError(f"task: expected 'classification', 'regression', 'segmentation' or 'generation', "
                                f"got {task!r}")
        if y.dim() != 2:
            raise ShapeError(f"model output: class targets need an output of shape [B, classes], got "
                             f"{tuple(y.shape)}; pass seed= or another task=")
        B, C = y.shape
        if target is None:
            t = y.argmax(dim=1)
        elif isinstance(target, int):
            t = torch.full((B,), target, dtype=torch.long, device=y.device)
        else:
            t = torch.as_tensor(target, device=y.device).long().reshape(-1)
            if t.shape[0] != B:
                raise ShapeError(f"target: {t.shape[0]} classes given for a batch of {B}")
        if (t < 0).any() or (t >= C).any():
            raise ArgumentError(f"target: class indices must be in [0, {C}), got {t.tolist()[:8]}")
        s = torch.zeros_like(y)
        s[torch.arange(B, device=y.device), t] = multiplier
        return s, t


def _as_inputs(x: Any, name: str) -> list[Tensor]:
    xs = [x] if isinstance(x, Tensor) else list(x) if isinstance(x, (tuple, list)) else None
    if not xs or not all(isinstance(t, Tensor) for t in xs):
        raise ArgumentError(f"{name}: expected a tensor or a sequence of tensors, got {type(x).__name__}")
    return xs


def _signature(xs: Sequence[Tensor]) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in xs)


def _is_hf_activation(typ: str) -> bool:
    """Hugging Face activation modules (``transformers.activations.*``: elementwise, e.g. GPT-2's
    tanh GELU written out in ops) pass relevance through like torch's activations."""
    return typ.startswith("transformers.activations.")


def _is_tensorish(v: Any) -> bool:
    """A floating tensor or a tuple holding one (integer outputs such as indices carry no relevance)."""
    if isinstance(v, Tensor):
        return v.is_floating_point()
    return isinstance(v, (tuple, list)) and any(isinstance(t, Tensor) and t.is_floating_point() for t in v)


def _sub(a: Any, b: Any) -> Any:
    if isinstance(a, tuple):
        return tuple(_sub(u, v) for u, v in zip(a, b))
    return a - b


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, tuple):
        return tuple(_add(u, v) for u, v in zip(a, b))
    return a + b


def relevance(
    model: nn.Module,
    x: Tensor,
    target: int | Sequence[int] | Tensor | None = None,
    composite: Composite | None = None,
    **kwargs: Any,
) -> RelevanceResult:
    """One-shot relevance propagation (builds a :class:`RelevanceEngine`; reuse an engine for
    many batches). ``kwargs`` are those of :meth:`RelevanceEngine.__call__`."""
    return RelevanceEngine(model, composite, example=x)(x, target, **kwargs)
