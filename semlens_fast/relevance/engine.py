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
from .composite import AFFINE_TYPES, Composite, dlbacktrace

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


_BOUNDED: dict[Any, str] = {
    nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Softmax: "softmax", nn.SiLU: "swish",
    torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.silu: "swish",
    F.softmax: "softmax", torch.softmax: "softmax", "tanh": "tanh", "sigmoid": "sigmoid", "softmax": "softmax",
}
_INPLACE_FREE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                 operator.itruediv: operator.truediv}
_INPLACE_METHODS = {"add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div", "relu_": "relu"}
_ADD = {operator.add: 1, operator.iadd: 1, torch.add: 1, "add": 1, "add_": 1,
        operator.sub: -1, operator.isub: -1, torch.sub: -1, "sub": -1, "sub_": -1}
_MAXPOOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
#: functional affine ops with constant weights are handled like the matching module
_FUNC_AFFINE: dict[Any, type] = {F.linear: nn.Linear, F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d,
                                 F.conv3d: nn.Conv3d}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _functional_module(cls: type, vals: dict[str, Any]) -> nn.Module:
    """A stand-in module (class ``cls``, no ``__init__``) carrying a functional call's parameters."""
    m = cls.__new__(cls)
    nd = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}.get(cls)
    attrs: dict[str, Any] = {"weight": vals["weight"], "bias": vals.get("bias")}
    if nd is not None:
        def tup(v: Any) -> Any:
            return v if isinstance(v, str) else (tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * nd)
        attrs.update(stride=tup(vals.get("stride", 1)), padding=tup(vals.get("padding", 0)),
                     dilation=tup(vals.get("dilation", 1)), groups=int(vals.get("groups", 1)), padding_mode="zeros")
    for k, v in attrs.items():
        object.__setattr__(m, k, v)
    return m


class _Tracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, qualname)


def _leaf_types(c: Composite) -> tuple[type, ...]:
    out: list[type] = []
    for types, _ in tuple(c.module_rules) + tuple(c.first_rules):
        out.extend(types if isinstance(types, tuple) else (types,))
    out.extend(p for p in c.passthrough if isinstance(p, type))
    return tuple(out)


def _hook_chain(model: nn.Module, example: Tensor, fx_error: Exception) -> fx.GraphModule:
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
        raise ArgumentError(
            f"model: torch.fx cannot trace {type(model).__name__} ({type(fx_error).__name__}: {fx_error}) and the "
            f"module-hook fallback needs a plain chain of modules, but {why}. Make forward traceable "
            f"(no data-dependent control flow) or wrap the extra operations in modules")
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
        example: an input, needed only when fx tracing fails (module-hook fallback).

    Example::

        eng = RelevanceEngine(model, lrp_epsilon())
        res = eng(x, target=3, record=["features.3"])
        res.input, res.layers["features.3"]
    """

    def __init__(self, model: nn.Module, composite: Composite | None = None, example: Tensor | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ArgumentError(f"model: expected an nn.Module, got {type(model).__name__}")
        self.model = model
        self.composite = composite if composite is not None else dlbacktrace()
        if not isinstance(self.composite, Composite):
            raise ArgumentError(f"composite: expected a Composite, got {type(self.composite).__name__}")
        try:
            tracer = _Tracer(_leaf_types(self.composite))
            graph = tracer.trace(model)
            self.gm = fx.GraphModule(tracer.root, graph)
            self.traced_with = "fx"
        except Exception as e:  # noqa: BLE001 - any tracing failure triggers the fallback
            if example is None:
                raise ArgumentError(
                    f"model: torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e}); pass "
                    f"example=<an input> to try the module-hook fallback") from e
            self.gm = _hook_chain(model, example, e)
            self.traced_with = "hooks"
        self._aliases: dict[str, str] = {}
        self._folds: list[tuple[nn.Module, nn.Module, nn.Module]] = []
        if self.composite.canonize_batchnorm:
            self._fold_batchnorm()
        self._prepare()

    # ------------------------------------------------------------------ setup
    def _fold_batchnorm(self) -> None:
        """Canonizer: fold ``BatchNorm`` into the Linear/Conv right before it.

        ``W' = W * g / sqrt(var + eps)``, ``b' = (b - mean) * g / sqrt(var + eps) + beta``; the
        pair becomes one affine node named after the conv (the BatchNorm's name is an alias of
        it). The user's modules are not modified; folded copies are refreshed at every call."""
        g = self.gm.graph
        k = 0
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
            if not isinstance(lin, AFFINE_TYPES):
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
        # first affine layer (for first-layer rules)
        self.first_affine = None
        self.func_affine: dict[fx.Node, type] = {}
        for n in nodes:
            if n.op == "call_function" and n.target in _FUNC_AFFINE:
                w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
                if isinstance(w, fx.Node) and w.op == "get_attr":  # constant weight: an affine layer
                    self.func_affine[n] = _FUNC_AFFINE[n.target]
        for n in nodes:
            if (n.op == "call_module" and isinstance(self.gm.get_submodule(n.target), AFFINE_TYPES)) or \
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
                key, fn = u.target, u.target
            elif u.op == "call_method":
                key, fn = u.target, (lambda t, _m=u.target: getattr(t, _m)())
            try:
                act = _BOUNDED.get(key)
            except TypeError:
                act = None
            if act is not None:
                self.next_act[n] = (act, fn)  # type: ignore[assignment]
        # rule lookup, once: unsupported ops fail here, before any computation
        self.rules: dict[fx.Node, R.Rule] = {}
        problems = []
        for n in nodes:
            if n.op not in ("call_module", "call_function", "call_method"):
                continue
            mod = self.gm.get_submodule(n.target) if n.op == "call_module" else None
            if n in self.func_affine:
                proto = self.func_affine[n].__new__(self.func_affine[n])
                rule = self.composite.rule_for("call_module", n.target, proto, is_first=(n is self.first_affine))
            else:
                rule = self.composite.rule_for(n.op, n.target, mod, is_first=(n is self.first_affine))
            if rule is None and n.op == "call_function" and n.target is operator.getitem:
                rule = R.IndexMap()
            if rule is not None:
                self.rules[n] = rule
            else:
                problems.append(n)
        self._unsupported = problems

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

        def val(a: fx.Node) -> Any:
            v = env[a]
            if subst is not None and isinstance(v, Tensor) and a in self._var and v.is_floating_point():
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
        var: set[fx.Node] = set()
        for n in self.nodes:
            if n.op == "placeholder":
                var.add(n)
            elif n.op in ("call_module", "call_function", "call_method"):
                if any(a in var for a in n.all_input_nodes):
                    var.add(n)
        return var

    # ------------------------------------------------------------------ backward
    def _occurrences(self, n: fx.Node, env: Mapping[fx.Node, Any]) -> list[fx.Node]:
        occ: list[fx.Node] = []

        def visit(a: fx.Node) -> fx.Node:
            v = env[a]
            # integer/bool tensors (indices, masks) carry no relevance
            if a in self._var and isinstance(v, Tensor) and v.is_floating_point():
                occ.append(a)
            return a

        fx.graph.map_arg(n.args, visit)
        fx.graph.map_arg(n.kwargs, visit)
        return occ

    def _context(self, n: fx.Node, env: Mapping[fx.Node, Any], occ: list[fx.Node]) -> R.NodeContext:
        inputs = [env[a] for a in occ]

        def call(*new: Tensor) -> Any:
            return self._run(n, env, dict(enumerate(new)))

        mod = self.gm.get_submodule(n.target) if n.op == "call_module" else None
        if n in self.func_affine:
            vals = dict(zip(_CONV_ARGS, fx.graph.map_arg(n.args, lambda a: env[a])))
            vals.update(fx.graph.map_arg(n.kwargs, lambda a: env[a]))
            mod = _functional_module(self.func_affine[n], vals)
        act = self.next_act.get(n) if self.composite.activation_saturation else None
        ctx = R.NodeContext(name=self.label[n], kind=n.op, target=mod if mod is not None else n.target,
                            module=mod, inputs=inputs, output=env[n], call=call,
                            activation=act[0] if act else None, activation_fn=act[1] if act else None,
                            is_first=n is self.first_affine)
        key = n.target
        if n.op in ("call_function", "call_method") and key in _ADD:
            sign = _ADD[key]
            vals = list(n.args[:2])
            if len(vals) == 2 and not n.kwargs.get("alpha"):
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
        if n.op == "call_function" and n.target in (F.max_pool1d, F.max_pool2d):
            vals = fx.graph.map_arg(n.args, lambda a: env[a])
            b = dict(zip(_MAXPOOL_ARGS, vals))
            b.update(fx.graph.map_arg(n.kwargs, lambda a: env[a]))
            ctx.extra["pool_args"] = (b["kernel_size"], b.get("stride"), b.get("padding", 0), b.get("dilation", 1))
        return ctx

    def _raise_unsupported(self, nodes: list[fx.Node]) -> None:
        descr = []
        for n in nodes:
            if n.op == "call_module":
                descr.append(f"module {type(self.gm.get_submodule(n.target)).__name__} at {n.target!r}")
            elif n.op == "call_method":
                descr.append(f"method Tensor.{n.target} at node {n.name!r}")
            else:
                t = n.target
                descr.append(f"function {getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', t)} "
                             f"at node {n.name!r}")
        raise UnsupportedOpError(
            f"rule set {self.composite.name!r} has no rule for: {'; '.join(descr)}. Add a rule with "
            f"composite.with_rules(...) or, for shape-preserving ops only, declare an explicit pass-through with "
            f"composite.with_passthrough(...)")

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
    ) -> RelevanceResult:
        """Propagate relevance for a batch.

        Args:
            x: the model input (a tensor, or a sequence of tensors for several inputs).
            target: class per sample (``[B]``), one class for all, or ``None`` for each
                sample's argmax (dl-backtrace's "binary-classification" seed).
            seed: explicit output relevance (shape of the output), instead of ``target``.
            multiplier: the seed is ``multiplier * one_hot(target)`` (dl-backtrace uses 100).
            record: layer names whose output relevance to return, ``"all"`` for every node.
            modifiers: ``{layer: f}``; ``f`` maps the relevance at that layer's output before
                it propagates further (used for CRP-style conditioning).
            negative_seed: contrast mode: seed of the negative stream (default: zeros at the
                target, ``multiplier * softmax(output)`` at the other classes).
        """
        xs = [x] if isinstance(x, Tensor) else list(x)
        if not xs or not all(isinstance(t, Tensor) for t in xs):
            raise ArgumentError(f"x: expected a tensor or a sequence of tensors, got {type(x).__name__}")
        dev = next((p.device for p in self.model.parameters()), xs[0].device)
        for t in xs:
            if t.device != dev:
                raise DeviceError(f"x: input on {t.device} but the model's parameters are on {dev}")
        known = set(self.label.values()) | set(self._aliases) | {"input"}
        mods = dict(modifiers or {})
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
                raise ArgumentError(f"record: unknown layer(s) {sorted(unknown)}; known layers: {sorted(known)}")
        rec_nodes = {self._aliases.get(r, r) for r in rec}
        mod_nodes = {self._aliases.get(k, k): f for k, f in mods.items()}

        self._refresh_folds()
        with torch.no_grad():
            env = self._forward(xs)
            self._var = self._variables(env)
            bad = [n for n in self._unsupported if n in self._var and _is_tensorish(env[n])]
            if bad:
                self._raise_unsupported(bad)
            out_node = next(n for n in self.nodes if n.op == "output")
            out_arg = out_node.args[0]
            if not isinstance(out_arg, fx.Node) or not isinstance(env[out_arg], Tensor):
                raise ArgumentError("model: the output must be a single tensor (got a "
                                    f"{type(env[out_node]).__name__}); wrap the model to return one tensor")
            y = env[out_arg]
            seed_t, tgt = self._seed(y, target, seed, multiplier)
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
                # getitem on a tuple-valued node (split, chunk, ...): scatter into that tuple
                if (n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node)
                        and isinstance(env[n.args[0]], (tuple, list))):
                    src = n.args[0]
                    tup = env[src]
                    idx = n.args[1]
                    contrib = tuple(tuple(r if i == idx else torch.zeros_like(t) for i, t in enumerate(tup))
                                    for r in Rn)
                    self._accumulate(rel, src, contrib)
                    continue
                occ = self._occurrences(n, env)
                if not occ:
                    continue
                rule = self.rules[n]
                ctx = self._context(n, env, occ)
                if rule.coupled:
                    outs = rule.backward(ctx, Rn)  # list per input of stream tuples
                    per_input = [o if o is None else tuple(o) for o in outs]
                else:
                    per_stream = [rule.backward(ctx, r) for r in Rn]
                    per_input = []
                    for i in range(len(occ)):
                        vals = [ps[i] if i < len(ps) else None for ps in per_stream]
                        per_input.append(None if all(v is None for v in vals) else
                                         tuple(v if v is not None else torch.zeros_like(env[occ[i]]) for v in vals))
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
            Rin = rel.get(inp_node, tuple(torch.zeros_like(xs[0]) for _ in range(S)))
            if self.placeholders[0].name in rec_nodes or "input" in rec:
                recorded.setdefault("input", Rin)
        # aliases (folded BatchNorm): same relevance as the fused layer's output
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
    def _seed(y: Tensor, target: Any, seed: Tensor | None, multiplier: float) -> tuple[Tensor, Tensor]:
        if seed is not None:
            if target is not None:
                raise ArgumentError("target and seed: give one of them, not both")
            if not isinstance(seed, Tensor) or seed.shape != y.shape:
                raise ShapeError(f"seed: expected a tensor of the output shape {tuple(y.shape)}, got "
                                 f"{tuple(seed.shape) if isinstance(seed, Tensor) else type(seed).__name__}")
            return seed.to(y) * multiplier, torch.full((y.shape[0],), -1, dtype=torch.long, device=y.device)
        if y.dim() != 2:
            raise ShapeError(f"model output: class targets need an output of shape [B, classes], got "
                             f"{tuple(y.shape)}; pass seed= instead")
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
