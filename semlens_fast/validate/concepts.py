"""SemanticLens adapter: validate a concept-level interpretation of one layer.

The claim tested: *"at layer L, the decision uses only the components labelled with these
concepts; the other components carry no information"*. It is an interpretation with one opaque
stage (input -> L) whose abstraction keeps the chosen components and whose concretisation puts
back the kept components and fills every other component with its mean over the data (mean
ablation). The claim holds to the extent that prediction is unchanged: A3 (= A4 here, one
stage from the input) replaceability, ``Pr[t(x) = t_>L(ablate(t_<=L(x)))]``, reported as an
epsilon bound.

Labels contract (what ``labels=`` accepts, so that a future ``Lens.label()`` result can be
passed directly):

* an object with a method ``labels_for(layer)`` returning one of the forms below;
* an object with ``to_dict(orient="records")`` (e.g. a pandas DataFrame) with columns
  ``layer``, ``component``, ``label`` (rows of other layers are ignored);
* an iterable of records (mappings) with keys ``component``, ``label`` and optionally ``layer``;
* an iterable of ``(component, label)`` pairs or ``(layer, component, label)`` triples;
* a mapping ``{component: label}`` or ``{layer: <any of the forms above>}``.

A label is a string or a collection of strings (a component may carry several concepts); a
component may be listed several times. Components are ints (indices along ``component_dim``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from ..errors import ArgumentError, ShapeError
from .core import INPUT, AxiomResult, Stage, ValidationResult, _EvalMode, _Runner, validate
from .._batch import to_device

__all__ = ["resolve_labels", "layer_means", "concept_stage", "validate_concepts", "ConceptValidation"]


def _as_component(c: Any, where: str) -> int:
    if isinstance(c, torch.Tensor) and c.numel() == 1 and not c.is_floating_point():
        return int(c.item())
    if isinstance(c, bool):
        raise ArgumentError(f"{where}: component must be an int index, got {c!r}")
    try:
        import operator

        return operator.index(c)
    except TypeError:
        raise ArgumentError(f"{where}: component must be an int index, got {c!r} ({type(c).__name__})") from None


def _as_labels(v: Any, where: str) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, Iterable):
        out = list(v)
        if all(isinstance(x, str) for x in out):
            return out
    raise ArgumentError(f"{where}: a label must be a string or a collection of strings, got {v!r}")


def resolve_labels(labels: Any, layer: str) -> dict[int, list[str]]:
    """``{component: [labels]}`` of ``layer`` from any of the accepted label forms (module doc)."""
    if hasattr(labels, "labels_for") and callable(labels.labels_for):
        labels = labels.labels_for(layer)
        if hasattr(labels, "labels_for"):
            raise ArgumentError("labels.labels_for(layer) must return pairs, records or a mapping, not another labelled object")
    elif hasattr(labels, "to_dict") and callable(labels.to_dict) and not isinstance(labels, Mapping):
        labels = labels.to_dict(orient="records")
    if isinstance(labels, Mapping):
        if layer in labels and not isinstance(labels[layer], str):
            return resolve_labels(labels[layer], layer)
        items: list[tuple[Any, Any]] = list(labels.items())
    elif isinstance(labels, Iterable) and not isinstance(labels, (str, bytes)):
        items = []
        for k, rec in enumerate(labels):
            if isinstance(rec, Mapping):
                if "component" not in rec or "label" not in rec:
                    raise ArgumentError(f"labels[{k}]: a record needs keys 'component' and 'label' (and optionally 'layer'), got keys {sorted(rec)}")
                if "layer" in rec and rec["layer"] != layer:
                    continue
                items.append((rec["component"], rec["label"]))
            elif isinstance(rec, (tuple, list)) and len(rec) == 2:
                items.append((rec[0], rec[1]))
            elif isinstance(rec, (tuple, list)) and len(rec) == 3:
                if rec[0] == layer:
                    items.append((rec[1], rec[2]))
            else:
                raise ArgumentError(
                    f"labels[{k}]: expected a (component, label) pair, a (layer, component, label) triple or a "
                    f"record with keys component/label, got {rec!r}"
                )
    else:
        raise ArgumentError(
            f"labels must be a mapping, an iterable of pairs/triples/records, a table with to_dict(orient='records') "
            f"or an object with labels_for(layer), got {type(labels).__name__}"
        )
    out: dict[int, list[str]] = {}
    for c, v in items:
        ci = _as_component(c, f"labels (layer {layer!r})")
        for lab in _as_labels(v, f"labels (layer {layer!r}, component {ci})"):
            if lab not in out.setdefault(ci, []):
                out[ci].append(lab)
    return out


def layer_means(
    model: nn.Module,
    layer: str,
    data: Any,
    *,
    batch_size: int = 64,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    inputs: Optional[Callable[[Any], Any]] = None,
    output: Optional[Callable[[Any], torch.Tensor]] = None,
    device: Union[torch.device, str, None] = None,
    progress: bool = True,
) -> torch.Tensor:
    """Mean over ``data`` of the output of module ``layer``: a tensor of one sample's shape
    (per-position means), accumulated in float64, returned in the layer's dtype. Samples whose
    state holds a NaN or an infinity are left out of the mean, with a warning that counts them
    (one such sample would otherwise make every ablated state NaN); all of them: ArgumentError."""
    import warnings

    from tqdm.auto import tqdm

    runner = _Runner(model, forward=forward, inputs=inputs, output=output, device=device)
    runner.check_module(layer, "layer")
    total: Optional[torch.Tensor] = None
    n = seen = 0
    dtype = None
    with _EvalMode(model):
        for _, batch in tqdm(runner.batches(data, batch_size), desc="layer means", disable=not progress):
            states, _, _ = runner.record(to_device(batch, runner.device), [layer])
            s = states[layer]
            dtype = s.dtype
            ok = s.reshape(s.shape[0], -1).isfinite().all(1)
            part = s[ok].double().sum(0)
            total = part if total is None else total + part
            n += int(ok.sum())
            seen += s.shape[0]
    if total is None or seen == 0:
        raise ArgumentError("data is empty: cannot compute the means of the layer")
    if n == 0:
        raise ArgumentError(f"layer {layer!r}: every one of the {seen} samples has a NaN or infinite state; "
                            "no mean to ablate with")
    if n < seen:
        warnings.warn(f"layer_means: {seen - n} of {seen} samples have a NaN or infinite state at layer {layer!r}; "
                      "they are left out of the mean", UserWarning, stacklevel=2)
    return (total / n).to(dtype)


def _norm_dim(dim: int, ndim: int, layer: str) -> int:
    """Component dim of a batched state of ``ndim`` dims (the batch is dim 0)."""
    d = dim + ndim if dim < 0 else dim
    if not 1 <= d < ndim:
        raise ArgumentError(
            f"component_dim={dim} is not a non-batch dimension of the state of layer {layer!r} "
            f"({ndim} dims including the batch; expected 1..{ndim - 1} or a negative index)"
        )
    return d


def concept_stage(
    layer: str,
    keep: Sequence[int],
    fill: torch.Tensor,
    *,
    component_dim: int = 1,
    name: Optional[str] = None,
) -> Stage:
    """The opaque stage ``input -> layer`` whose abstraction keeps components ``keep`` and whose
    concretisation fills the other components with ``fill`` (one sample's state, e.g. the means
    of :func:`layer_means`). Validate it with ``axioms=("A3",)``."""
    ndim = fill.dim() + 1
    d = _norm_dim(component_dim, ndim, layer)
    n_comp = fill.shape[d - 1]
    keep_l = sorted({_as_component(k, "keep") for k in keep})
    bad = [k for k in keep_l if not 0 <= k < n_comp]
    if bad:
        raise ArgumentError(f"keep: components {bad} are out of range for layer {layer!r}, which has {n_comp} components along dim {d}")
    idx_cpu = torch.tensor(keep_l, dtype=torch.int64)

    def alpha(s: torch.Tensor) -> torch.Tensor:
        return s.index_select(d, idx_cpu.to(s.device))

    def gamma(a: torch.Tensor) -> torch.Tensor:
        out = fill.to(a.device).unsqueeze(0).expand(a.shape[0], *fill.shape).clone()
        return out.index_copy(d, idx_cpu.to(a.device), a.to(out.dtype))

    return Stage(name or f"{layer}[keep {len(keep_l)}/{n_comp}]", INPUT, layer, None, alpha, gamma)


@dataclass
class ConceptValidation(ValidationResult):
    """:class:`ValidationResult` of :func:`validate_concepts` with what was kept and ablated."""

    layer: str = ""
    concepts: list[str] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    ablated: list[int] = field(default_factory=list)

    @property
    def replaceability(self) -> AxiomResult:
        """The A3 result: prediction unchanged when the non-kept components are ablated."""
        return self.results[0]

    def __str__(self) -> str:
        head = (
            f"layer {self.layer!r}: kept {len(self.kept)} components {self.kept}"
            + (f" (concepts {self.concepts})" if self.concepts else "")
            + f", ablated {len(self.ablated)}"
        )
        return head + "\n" + super().__str__()


def validate_concepts(
    model: nn.Module,
    layer: str,
    data: Any,
    concepts: Union[str, Sequence[str], Callable[[str], bool], None] = None,
    *,
    labels: Any = None,
    components: Optional[Sequence[int]] = None,
    ablation: Union[str, torch.Tensor] = "mean",
    component_dim: int = 1,
    confidence: float = 0.95,
    output_equiv: Any = "argmax",
    batch_size: int = 64,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    inputs: Optional[Callable[[Any], Any]] = None,
    output: Optional[Callable[[Any], torch.Tensor]] = None,
    device: Union[torch.device, str, None] = None,
    max_counterexamples: int = 100,
    progress: bool = True,
) -> ConceptValidation:
    """Test "at ``layer`` the decision uses only the components labelled ``concepts``".

    Components kept: those whose label (from ``labels``, see the module doc for the accepted
    forms, e.g. a future ``Lens.label()`` table) matches ``concepts`` (a label, a list of labels,
    or a predicate ``fn(label) -> bool``), plus any explicit ``components``. Every other
    component is replaced by its mean over ``data`` (``ablation="mean"``, computed in a first
    pass; per position for spatial/token layers), by zero (``"zero"``), or by a given tensor of
    one sample's state shape. The result's A3 epsilon bounds the probability that the
    prediction (``output_equiv``, argmax by default) changes.

    Raises ArgumentError if a concept matches no component (the message lists the labels
    present), if neither concepts nor components are given, or components are out of range.
    """
    if concepts is None and components is None:
        raise ArgumentError("give concepts= (with labels=) and/or components= to say which components are kept")
    chosen: set[int] = set()
    concept_list: list[str] = []
    if concepts is not None:
        if labels is None:
            raise ArgumentError("concepts= needs labels= (component -> label) to find the components")
        table = resolve_labels(labels, layer)
        present = sorted({lab for labs in table.values() for lab in labs})
        if callable(concepts) and not isinstance(concepts, str):
            pred = concepts
            concept_list = [lab for lab in present if pred(lab)]
            if not concept_list:
                raise ArgumentError(f"concepts: the predicate matches none of the labels of layer {layer!r}: {present}")
        else:
            concept_list = [concepts] if isinstance(concepts, str) else list(concepts)
            if not all(isinstance(c, str) for c in concept_list):
                raise ArgumentError(f"concepts must be a label, a list of labels or a predicate, got {concepts!r}")
            missing = [c for c in concept_list if c not in present]
            if missing:
                raise ArgumentError(f"concepts {missing} label no component of layer {layer!r}; labels present: {present}")
        wanted = set(concept_list)
        chosen |= {c for c, labs in table.items() if wanted.intersection(labs)}
    if components is not None:
        if isinstance(components, (int, str)) or not isinstance(components, Iterable):
            raise ArgumentError(f"components must be a list of component indices, got {components!r}")
        chosen |= {_as_component(c, "components") for c in components}

    common = dict(batch_size=batch_size, forward=forward, inputs=inputs, output=output, device=device, progress=progress)
    if isinstance(ablation, torch.Tensor):
        fill = ablation
    elif ablation == "mean":
        fill = layer_means(model, layer, data, **common)
    elif ablation == "zero":
        fill = _zero_state(model, layer, data, **common)
    else:
        raise ArgumentError(f"ablation must be 'mean', 'zero' or a tensor of one sample's state shape, got {ablation!r}")
    d = _norm_dim(component_dim, fill.dim() + 1, layer)
    n_comp = fill.shape[d - 1]
    bad = sorted(c for c in chosen if not 0 <= c < n_comp)
    if bad:
        raise ArgumentError(f"components {bad} are out of range for layer {layer!r}, which has {n_comp} components along dim {d}")
    kept = sorted(chosen)
    stage = concept_stage(layer, kept, fill, component_dim=component_dim)
    try:
        res = validate(
            model, [stage], data, axioms=("A3",), confidence=confidence, output_equiv=output_equiv,
            max_counterexamples=max_counterexamples, **common,
        )
    except ShapeError as e:
        if isinstance(ablation, torch.Tensor):
            raise ShapeError(f"ablation tensor of shape {tuple(ablation.shape)} does not fit layer {layer!r}: {e}") from None
        raise
    return ConceptValidation(
        results=res.results, confidence=res.confidence, n=res.n, skipped=[], layer=layer,
        concepts=concept_list, kept=kept, ablated=[c for c in range(n_comp) if c not in chosen],
    )



def _zero_state(model: nn.Module, layer: str, data: Any, *, batch_size: int, progress: bool, **kw: Any) -> torch.Tensor:
    """Zeros of one sample's state shape at ``layer`` (one batch is run to learn it)."""
    runner = _Runner(model, **kw)
    runner.check_module(layer, "layer")
    with _EvalMode(model):
        for _, batch in runner.batches(data, batch_size):
            s = runner.record(to_device(batch, runner.device), [layer])[0][layer]
            return torch.zeros_like(s[0])
    raise ArgumentError("data is empty: cannot learn the state shape of the layer")
