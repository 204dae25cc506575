"""Stages, the cached concrete pass, activation patching and the axioms A1-A4."""
from __future__ import annotations

import difflib
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from ..errors import ArgumentError, SemlensError, ShapeError
from .._batch import default_forward, first_tensor, to_device
from .equivalence import Argmax, Downstream, Equivalence, as_equivalence
from .stats import clopper_pearson_lower

log = logging.getLogger("semlens_fast")

INPUT = "<input>"
"""Boundary name of the model input (the state ``x`` fed to the model)."""
OUTPUT = "<output>"
"""Boundary name of the model output (after ``output=`` selection)."""

AXIOMS = ("A1", "A2", "A3", "A4")
AXIOM_NAMES = {
    "A1": "prefix equivalence",
    "A2": "component equivalence",
    "A3": "prefix replaceability",
    "A4": "component replaceability",
}

StateFn = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["Stage", "Interpretation", "AxiomResult", "ValidationResult", "validate", "validate_many", "INPUT", "OUTPUT",
           "AXIOMS"]


# ---------------------------------------------------------------------- the interpretation


@dataclass
class Stage:
    """One stage ``i`` of an interpretation: the concrete part ``t_i`` of the model between two
    hook points and its abstract description.

    Attributes:
        name: a name for reports and error messages.
        start: boundary where ``t_i`` begins: a module name (as in ``model.named_modules()``;
            the state is that module's output) or ``None``/``"<input>"`` for the model input.
            Must equal the previous stage's ``end``.
        end: boundary where ``t_i`` ends: a module name or ``None``/``"<output>"`` for the model
            output.
        h: the abstract function ``h_i``: batched abstract states ``[B, ...]`` in, ``[B, ...]``
            out. ``None`` makes the stage *opaque*: the interpretation makes no claim on how
            the state is computed, its abstract output is read off the model
            (``alpha_i(t_<=i(x))``), A1/A2 are skipped for it, and A3/A4 test only its
            ``alpha``/``gamma`` (what information the state carries).
        alpha: abstraction ``alpha_i``: the concrete state at ``end`` ``[B, ...]`` -> abstract
            state ``[B, ...]``.
        gamma: concretisation ``gamma_i``: abstract state -> a concrete state of exactly the
            shape of the state at ``end`` (needed for A3/A4; stages without it skip them).
        equiv: equivalence on this stage's abstract states (used by A1/A2): an
            :class:`~semlens_fast.validate.Equivalence`, a name (``"exact"``, ``"unordered"``,
            ``"downstream"``) or a callable ``fn(a, b) -> [B] bool tensor``.
        rest: optional shortcut for replaceability: ``fn(state at end) -> model output`` (after
            ``output=``), the rest of the model ``t_>i`` computed directly instead of running the
            whole model with the state patched in (use it when the prefix is expensive and the
            rest is cheap). It is checked on the first batch: on the recorded state it must
            reproduce the recorded output (to ``rtol=1e-4``), else ArgumentError.
    """

    name: str
    start: Optional[str]
    end: Optional[str]
    h: Optional[StateFn]
    alpha: StateFn
    gamma: Optional[StateFn] = None
    equiv: Any = "exact"
    rest: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


# ---------------------------------------------------------------------- results


@dataclass
class AxiomResult:
    """Outcome of one axiom at one stage.

    ``epsilon`` is ``1 -`` the lower one-sided exact Clopper-Pearson bound, at ``confidence``,
    on the success probability: with probability >= ``confidence`` the axiom fails on at most
    a fraction ``epsilon`` of inputs drawn like ``data``. ``histogram`` maps a mismatch distance
    (the equivalence's distance: e.g. number of differing abstract positions, or of differing
    output decisions; 0 = success; -1 = a NaN in the input, output or compared states, a
    failure) to its count. ``counterexamples`` are sample ids of failures
    (dataset indices; at most ``max_counterexamples``). ``confusion`` (replaceability with an
    argmax output equivalence on ``[B, C]`` outputs) maps ``(model class, patched class)`` of the
    failures to counts.
    """

    stage: str
    stage_index: int
    axiom: str
    n: int
    successes: int
    confidence: float
    epsilon: float
    histogram: dict[int, int] = field(default_factory=dict)
    counterexamples: list[int] = field(default_factory=list)
    confusion: Optional[dict[tuple[int, int], int]] = None

    @property
    def failures(self) -> int:
        return self.n - self.successes

    @property
    def rate(self) -> float:
        """Observed success rate (``nan`` without samples)."""
        return self.successes / self.n if self.n else math.nan

    @property
    def lower(self) -> float:
        """The lower confidence bound on the success probability (``1 - epsilon``)."""
        return 1.0 - self.epsilon


@dataclass
class ValidationResult:
    """All axiom results of a :func:`validate` run.

    ``result[stage, axiom]`` (stage by name or index) gives an :class:`AxiomResult`;
    ``result.epsilon(stage, axiom)`` its epsilon; ``result.table()`` plain dict rows;
    ``str(result)`` a printable table. ``skipped`` lists axioms not tested and why.
    """

    results: list[AxiomResult]
    confidence: float
    n: int
    skipped: list[str] = field(default_factory=list)

    def __getitem__(self, key: tuple[Union[str, int], str]) -> AxiomResult:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise ArgumentError(f"index a ValidationResult with (stage, axiom), e.g. result['xor', 'A1'], got {key!r}")
        stage, axiom = key
        for r in self.results:
            if (r.stage == stage or r.stage_index == stage) and r.axiom == axiom:
                return r
        have = sorted({(r.stage, r.axiom) for r in self.results})
        raise KeyError(f"no result for stage {stage!r}, axiom {axiom!r}; have {have}")

    def epsilon(self, stage: Union[str, int], axiom: str) -> float:
        return self[stage, axiom].epsilon

    @property
    def max_epsilon(self) -> float:
        """The largest epsilon over all tested (stage, axiom) pairs."""
        return max((r.epsilon for r in self.results), default=math.nan)

    def table(self) -> list[dict[str, Any]]:
        return [
            dict(
                stage=r.stage,
                stage_index=r.stage_index,
                axiom=r.axiom,
                n=r.n,
                failures=r.failures,
                rate=r.rate,
                epsilon=r.epsilon,
                histogram=dict(r.histogram),
                counterexamples=list(r.counterexamples),
            )
            for r in self.results
        ]

    def __str__(self) -> str:
        conf = f"{100 * self.confidence:g}%"
        w = max([len(r.stage) for r in self.results] + [5])
        lines = [f"{'stage':<{w}}  axiom  {'n':>7}  {'fail':>6}  {'rate':>7}  eps({conf})  mismatch histogram"]
        for r in self.results:
            hist = ", ".join(f"{k}:{v}" for k, v in sorted(r.histogram.items()))
            lines.append(
                f"{r.stage:<{w}}  {r.axiom:<5}  {r.n:>7}  {r.failures:>6}  {r.rate:>7.4f}  "
                f"{r.epsilon:>{len(conf) + 5}.4g}  {{{hist}}}"
            )
        for s in self.skipped:
            lines.append(f"skipped: {s}")
        return "\n".join(lines)


# ---------------------------------------------------------------------- running the model


def _default_inputs(batch: Any) -> Any:
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return batch[0]
    return batch


class _ListBatchSampler:
    def __init__(self, batches: list[list[int]]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Runner:
    """Runs a model on batches: recording boundary states, or patching one boundary."""

    def __init__(
        self,
        model: nn.Module,
        *,
        forward: Optional[Callable[[nn.Module, Any], Any]] = None,
        inputs: Optional[Callable[[Any], Any]] = None,
        output: Optional[Callable[[Any], torch.Tensor]] = None,
        device: Union[torch.device, str, None] = None,
    ):
        if not isinstance(model, nn.Module):
            raise ArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for nm, fn in (("forward", forward), ("inputs", inputs), ("output", output)):
            if fn is not None and not callable(fn):
                raise ArgumentError(f"{nm} must be callable or None, got {fn!r}")
        self.model = model
        self.forward = forward or default_forward
        self.inputs = inputs or _default_inputs
        self.output = output
        if device is None:
            p = next(iter(model.parameters()), None)
            device = p.device if p is not None else torch.device("cpu")
        from ..collect import check_device

        self.device = check_device(device, "device")  # a DeviceError naming what is wrong
        self.modules = dict(model.named_modules())

    # -- names
    def check_module(self, name: str, what: str) -> nn.Module:
        if name == "" or name not in self.modules:
            names = [n for n in self.modules if n]
            close = difflib.get_close_matches(name, names, n=5, cutoff=0.3) or names[:5]
            raise ArgumentError(
                f"{what}: {name!r} is not a module of the model ({type(self.model).__name__}); use a name "
                f"from model.named_modules() (closest: {', '.join(map(repr, close))}), '{INPUT}' or '{OUTPUT}'"
            )
        return self.modules[name]

    # -- data
    def batches(self, data: Any, batch_size: int) -> Iterator[tuple[torch.Tensor, Any]]:
        """Yields ``(ids [B] int64, batch)``; ids are dataset indices where known, else running positions."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ArgumentError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(data, torch.Tensor):
            if data.dim() == 0:
                raise ShapeError("data is a 0-d tensor; expected inputs with the batch as first dimension")
            for s in range(0, data.shape[0], batch_size):
                yield torch.arange(s, min(s + batch_size, data.shape[0])), data[s : s + batch_size]
            return
        if isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset) and data.batch_sampler is not None:
            lists = [list(map(int, b)) for b in data.batch_sampler]
            loader = DataLoader(
                data.dataset,
                batch_sampler=_ListBatchSampler(lists),  # type: ignore[arg-type]
                collate_fn=data.collate_fn,
                num_workers=data.num_workers,
            )
            for idx, batch in zip(lists, loader):
                yield torch.tensor(idx, dtype=torch.int64), batch
            return
        if not isinstance(data, (DataLoader, IterableDataset)) and hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (list, tuple)):
            loader = DataLoader(data, batch_size=batch_size, shuffle=False)
            pos = 0
            for batch in loader:
                b = self.batch_len(batch)
                yield torch.arange(pos, pos + b), batch
                pos += b
            return
        if isinstance(data, Iterable):  # any iterable of batches (a list of batches, a loader, ...)
            pos = 0
            for batch in data:
                b = self.batch_len(batch)
                yield torch.arange(pos, pos + b), batch
                pos += b
            return
        raise ArgumentError(
            f"data must be a tensor of inputs, a map-style Dataset, a DataLoader or an iterable of batches, "
            f"got {type(data).__name__}"
        )

    @staticmethod
    def batch_len(batch: Any) -> int:
        t = first_tensor(batch)
        if t is None or t.dim() == 0:
            raise ArgumentError(f"cannot find the batch size of a batch of type {type(batch).__name__}: no tensor with a batch dimension in it")
        return int(t.shape[0])

    def select(self, out: Any) -> torch.Tensor:
        t = self.output(out) if self.output is not None else first_tensor(out)
        if not isinstance(t, torch.Tensor):
            raise ArgumentError(
                f"the model output ({type(out).__name__}) holds no tensor; give output=fn(model_output) -> Tensor"
            )
        return t

    # -- passes
    def record(self, batch: Any, names: Sequence[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[str]]:
        """One forward pass recording (a copy of) the output of every module in ``names``.
        Returns ``(states, output, call order)``."""
        states: dict[str, torch.Tensor] = {}
        order: list[str] = []
        calls: dict[str, int] = {n: 0 for n in names}
        handles = []

        def make(name: str):
            def hook(module: nn.Module, args: Any, out: Any) -> None:
                calls[name] += 1
                if calls[name] == 1:
                    order.append(name)
                    if not isinstance(out, torch.Tensor):
                        raise ArgumentError(
                            f"boundary {name!r}: the module returns {type(out).__name__}, expected a tensor; "
                            f"hook a submodule that returns the tensor state (or wrap it)"
                        )
                    states[name] = out.detach().clone()  # a copy: later in-place ops must not change it

            return hook

        try:
            for n in names:
                handles.append(self.modules[n].register_forward_hook(make(n)))
            y = self.select(self.forward(self.model, batch))
        finally:
            for h in handles:
                h.remove()
        for n in names:
            if calls[n] != 1:
                raise ArgumentError(
                    f"boundary {n!r} was called {calls[n]} times in one forward pass; a boundary must be a "
                    f"module that runs exactly once per forward"
                )
        return states, y.detach(), order

    def patched(self, batch: Any, name: str, state: torch.Tensor) -> torch.Tensor:
        """Model output with the output of module ``name`` replaced by ``state``."""
        handle = self.modules[name].register_forward_hook(lambda m, a, o: state)
        try:
            return self.select(self.forward(self.model, batch)).detach()
        finally:
            handle.remove()


class _EvalMode:
    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        self.inf = torch.inference_mode()
        self.inf.__enter__()
        return self

    def __exit__(self, *exc):
        self.inf.__exit__(*exc)
        for m, t in self.modes:
            m.training = t
        return False


# ---------------------------------------------------------------------- accumulation


class _Acc:
    def __init__(self, max_cex: int):
        self.n = 0
        self.ok = 0
        self.hist: dict[int, int] = {}
        self.cex: list[int] = []
        self.conf: Optional[dict[tuple[int, int], int]] = None
        self.max_cex = max_cex

    def add(self, eq: torch.Tensor, dist: torch.Tensor, ids: torch.Tensor, nan: Optional[torch.Tensor] = None) -> None:
        if nan is not None:  # a NaN anywhere in the comparison: a failure, distance -1
            nan = nan.to(eq.device)
            eq, dist = eq & ~nan, torch.where(nan, torch.full_like(dist, -1), dist)
        self.n += int(eq.numel())
        self.ok += int(eq.sum())
        vals, counts = torch.unique(dist.cpu(), return_counts=True)
        for v, c in zip(vals.tolist(), counts.tolist()):
            self.hist[int(v)] = self.hist.get(int(v), 0) + int(c)
        if len(self.cex) < self.max_cex:
            bad = ids[~eq.cpu()].tolist()
            self.cex.extend(bad[: self.max_cex - len(self.cex)])

    def add_confusion(self, y: torch.Tensor, yp: torch.Tensor, eq: torch.Tensor) -> None:
        if self.conf is None:
            self.conf = {}
        bad = ~eq
        a = y.argmax(-1)[bad].cpu().tolist()
        b = yp.argmax(-1)[bad].cpu().tolist()
        for pair in zip(a, b):
            self.conf[pair] = self.conf.get(pair, 0) + 1


def _check_eq(res: Any, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    ok = isinstance(res, tuple) and len(res) == 2 and all(isinstance(t, torch.Tensor) for t in res)
    if ok:
        eq, dist = res
        ok = eq.shape == (b,) and dist.shape == (b,) and eq.dtype == torch.bool
    if not ok:
        raise ShapeError(
            f"the equivalence's compare() must return (equal [B] bool tensor, distance [B] int tensor) "
            f"with B = {b}, got {res!r:.200}"
        )
    return eq, dist.to(torch.int64)


def _shape(t: Any) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _batched(t: Any, b: int, where: str, fn: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != b:
        raise ShapeError(
            f"{where}: {fn} must return a tensor with the batch as first dimension (B = {b}), got {_shape(t)}"
        )
    return t


# ---------------------------------------------------------------------- validate


def _norm_start(s: Optional[str]) -> str:
    return INPUT if s is None else s


def _norm_end(s: Optional[str]) -> str:
    return OUTPUT if s is None else s


def _compose(fns: Sequence[StateFn]) -> StateFn:
    def f(a: torch.Tensor) -> torch.Tensor:
        for g in fns:
            a = g(a)
        return a

    return f


def _nan_rows(t: Any, b: int) -> Optional[torch.Tensor]:
    """``[B]`` bool: samples of a batched floating tensor with a NaN anywhere (None if not floating)."""
    if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()) or t.dim() == 0 or t.shape[0] != b:
        return None
    return torch.isnan(t.reshape(b, -1)).any(1)


@dataclass
class Interpretation:
    """A named interpretation for :func:`validate_many`: its stages and, optionally, its own
    ``alpha0`` and ``axioms`` (default: those given to :func:`validate_many`)."""

    stages: Sequence[Stage]
    alpha0: Optional[StateFn] = None
    axioms: Optional[Sequence[str]] = None


def _check_axioms(axioms: Any, what: str) -> tuple[str, ...]:
    if isinstance(axioms, str):
        axioms = (axioms,)
    try:
        axioms = tuple(axioms)
    except TypeError:
        raise ArgumentError(f"{what} must be a non-empty subset of {AXIOMS}, got {axioms!r}") from None
    bad = [a for a in axioms if a not in AXIOMS]
    if bad or not axioms:
        raise ArgumentError(f"{what} must be a non-empty subset of {AXIOMS}, got {axioms!r}")
    return axioms


class _Plan:
    """One interpretation's checked stages, what to compute, and its accumulators."""

    def __init__(self, name: str, interp: Interpretation, runner: _Runner, axioms: tuple[str, ...], max_cex: int):
        prefix = f"interpretation {name!r}, " if name else ""
        stages = interp.stages
        if isinstance(stages, Stage) or not isinstance(stages, Sequence) or len(stages) == 0:
            raise ArgumentError(f"{prefix}stages must be a non-empty list of Stage, got {stages!r:.200}")
        stages = list(stages)
        for i, st in enumerate(stages):
            if not isinstance(st, Stage):
                raise ArgumentError(f"{prefix}stages[{i}] must be a Stage, got {type(st).__name__}")
        if interp.alpha0 is not None and not callable(interp.alpha0):
            raise ArgumentError(f"{prefix}alpha0 must be callable or None, got {interp.alpha0!r}")
        self.name, self.stages, self.alpha0 = name, stages, interp.alpha0
        axioms = axioms if interp.axioms is None else _check_axioms(interp.axioms, f"{prefix}axioms")
        where = self.where = [f"{prefix}stage {i} {st.name!r}" for i, st in enumerate(stages)]
        starts = self.starts = [_norm_start(st.start) for st in stages]
        ends = self.ends = [_norm_end(st.end) for st in stages]
        for i, st in enumerate(stages):
            if not callable(st.alpha):
                raise ArgumentError(f"{where[i]}: alpha must be a callable (concrete state -> abstract state), got {st.alpha!r}")
            if st.h is not None and not callable(st.h):
                raise ArgumentError(f"{where[i]}: h must be a callable (abstract -> abstract state) or None, got {st.h!r}")
            if st.gamma is not None and not callable(st.gamma):
                raise ArgumentError(f"{where[i]}: gamma must be a callable (abstract -> concrete state) or None, got {st.gamma!r}")
            if st.rest is not None and not callable(st.rest):
                raise ArgumentError(f"{where[i]}: rest must be a callable (state at end -> model output) or None, got {st.rest!r}")
            if starts[i] == OUTPUT:
                raise ArgumentError(f"{where[i]}: start is '{OUTPUT}'; a stage cannot begin at the model output")
            if ends[i] == INPUT:
                raise ArgumentError(f"{where[i]}: end is '{INPUT}'; a stage cannot end at the model input")
            if starts[i] == ends[i]:
                raise ArgumentError(f"{where[i]}: start and end are the same boundary {starts[i]!r}")
            for what, bnd in (("start", starts[i]), ("end", ends[i])):
                if bnd not in (INPUT, OUTPUT):
                    runner.check_module(bnd, f"{where[i]}: {what}")
            if i > 0 and starts[i] != ends[i - 1]:
                raise ArgumentError(
                    f"stages do not chain: {where[i]} starts at {starts[i]!r} but {where[i - 1]} ends at "
                    f"{ends[i - 1]!r}; expected stages[{i}].start == stages[{i - 1}].end"
                )
        self.equivs: list[Equivalence] = []
        for i, st in enumerate(stages):
            eq = as_equivalence(st.equiv, f"{where[i]}: equiv")
            if isinstance(eq, Downstream) and eq.fn is None:
                later = stages[i + 1 :]
                opaque = [s.name for s in later if s.h is None]
                if opaque:
                    raise ArgumentError(
                        f"{where[i]}: the downstream equivalence needs the later abstract functions, but stage(s) "
                        f"{opaque} have h=None; give downstream(fn=...) explicitly"
                    )
                eq = eq.bind(_compose([s.h for s in later]))  # type: ignore[misc]
            self.equivs.append(eq)
        self.skipped: list[str] = []
        self.no_gamma: list[tuple[int, list[str]]] = []
        want: list[tuple[int, str]] = []
        for i, st in enumerate(stages):
            missing = []
            for ax in AXIOMS:
                if ax not in axioms:
                    continue
                if ax in ("A1", "A2") and st.h is None:
                    self.skipped.append(f"{where[i]} {ax}: h is None (opaque stage, no claim on how its state is computed)")
                    continue
                if ax in ("A3", "A4") and st.gamma is None:
                    self.skipped.append(f"{where[i]} {ax}: no gamma (concretisation) given")
                    missing.append(ax)
                    continue
                want.append((i, ax))
            if missing:
                self.no_gamma.append((i, missing))
        self.want = want
        self.need_prefix = any(ax in ("A1", "A3") for _, ax in want)
        self.need_comp = any(ax in ("A2", "A4") for _, ax in want)
        self.accs = {key: _Acc(max_cex) for key in want}
        self.rest_checked = [False] * len(stages)
        self.modules = {bnd for bnd in starts + ends if bnd not in (INPUT, OUTPUT)}
        self.needs_input = stages[0].h is not None and starts[0] == INPUT  # alpha0 is used only then

    def check_order(self, pos: dict[str, int]) -> None:
        for i in range(len(self.stages)):
            if pos[self.starts[i]] >= pos[self.ends[i]]:
                raise ArgumentError(
                    f"{self.where[i]}: boundary {self.ends[i]!r} (end) runs before {self.starts[i]!r} (start) in the "
                    f"forward pass; expected start to run first"
                )

    def _rest(self, i: int, s: torch.Tensor, y: torch.Tensor, states: dict[str, torch.Tensor],
              runner: _Runner, batch: Any) -> torch.Tensor:
        st, end = self.stages[i], self.ends[i]
        if end == OUTPUT:
            return s
        if st.rest is None:
            return runner.patched(batch, end, s)
        if not self.rest_checked[i]:  # the shortcut must reproduce the model on the recorded state
            ref = _as_output(st.rest(states[end]), y, self.where[i])
            scale = float(y.detach().abs().max()) if y.numel() and y.is_floating_point() else 1.0
            same = torch.allclose(ref.to(y.dtype), y, rtol=1e-4, atol=1e-5 * max(scale, 1.0), equal_nan=True) \
                if y.is_floating_point() else torch.equal(ref, y)
            if not same:
                raise ArgumentError(
                    f"{self.where[i]}: rest(state at {end!r}) does not reproduce the model output on the recorded "
                    f"state (max difference {float((ref.to(y.dtype) - y).abs().max()) if y.is_floating_point() else 'n/a'}); "
                    f"rest must compute the rest of the model t_>i exactly (or leave rest=None to run the model patched)"
                )
            self.rest_checked[i] = True
        return _as_output(st.rest(s), y, self.where[i])

    def run_batch(self, states: dict[str, torch.Tensor], y: torch.Tensor, batch: Any, ids: torch.Tensor,
                  runner: _Runner, out_eq: Equivalence, bad: torch.Tensor) -> None:
        b = len(ids)
        stages, where, ends = self.stages, self.where, self.ends
        prev_c = prev_p = None
        if stages[0].h is not None:
            a0 = states[self.starts[0]] if self.alpha0 is None else self.alpha0(states[self.starts[0]])
            prev_c = prev_p = _batched(a0, b, f"{where[0]} (alpha0)", "alpha0")
        for i, st in enumerate(stages):
            c = _batched(st.alpha(states[ends[i]]), b, where[i], "alpha")
            if st.h is None:
                pref = comp = c
            else:
                comp = _batched(st.h(prev_c), b, where[i], "h") if self.need_comp else None
                if i == 0 and comp is not None:
                    pref = comp
                elif self.need_prefix:
                    pref = _batched(st.h(prev_p), b, where[i], "h")
                else:
                    pref = None
            for ax, ab in (("A1", pref), ("A2", comp)):
                if (i, ax) in self.accs:
                    try:
                        eq, dist = _check_eq(self.equivs[i].compare(c, ab), b)
                    except SemlensError as e:
                        raise type(e)(f"{where[i]}, {ax}: {e}") from None
                    self.accs[i, ax].add(eq, dist, ids, _nan_mask(bad, c, ab))
            patches: dict[str, torch.Tensor] = {}
            for ax, ab in (("A3", pref), ("A4", comp)):
                if (i, ax) not in self.accs:
                    continue
                if ax == "A4" and "A3" in patches and comp is pref:
                    patches["A4"] = patches["A3"]
                    continue
                s = st.gamma(ab)  # type: ignore[misc]
                ref = states[ends[i]]
                if not isinstance(s, torch.Tensor) or s.shape != ref.shape:
                    raise ShapeError(
                        f"{where[i]}, {ax}: gamma returned {_shape(s)}, expected a concrete state of the "
                        f"shape of boundary {ends[i]!r}: {tuple(ref.shape)}"
                    )
                patches[ax] = s.to(device=ref.device, dtype=ref.dtype)
            outs: dict[int, torch.Tensor] = {}
            for ax, s in patches.items():
                if id(s) not in outs:
                    outs[id(s)] = self._rest(i, s, y, states, runner, batch)
                yp = outs[id(s)]
                try:
                    eq, dist = _check_eq(out_eq.compare(y, yp), b)
                except SemlensError as e:
                    raise type(e)(f"{where[i]}, {ax} (output_equiv): {e}") from None
                nan = _nan_mask(bad, yp)
                self.accs[i, ax].add(eq, dist, ids, nan)
                if isinstance(out_eq, Argmax) and y.dim() == 2:
                    self.accs[i, ax].add_confusion(y, yp, eq & ~nan)
            prev_c, prev_p = c, pref

    def result(self, confidence: float, n: int) -> ValidationResult:
        results = []
        for (i, ax), acc in self.accs.items():
            results.append(
                AxiomResult(
                    stage=self.stages[i].name,
                    stage_index=i,
                    axiom=ax,
                    n=acc.n,
                    successes=acc.ok,
                    confidence=float(confidence),
                    epsilon=1.0 - clopper_pearson_lower(acc.ok, acc.n, float(confidence)),
                    histogram=dict(sorted(acc.hist.items())),
                    counterexamples=acc.cex,
                    confusion=acc.conf,
                )
            )
        return ValidationResult(results=results, confidence=float(confidence), n=n, skipped=list(self.skipped))


def _nan_mask(bad: torch.Tensor, *ts: Any) -> torch.Tensor:
    """``bad`` or-ed with the samples that hold a NaN in any of ``ts``."""
    out = bad
    for t in ts:
        m = _nan_rows(t, len(bad))
        if m is not None:
            out = out | m.to(out.device)
    return out


def _as_output(t: Any, y: torch.Tensor, where: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.shape != y.shape:
        raise ShapeError(f"{where}: rest returned {_shape(t)}, expected the model output's shape {tuple(y.shape)}")
    return t


def validate(
    model: nn.Module,
    stages: Sequence[Stage],
    data: Any,
    axioms: Sequence[str] = AXIOMS,
    confidence: float = 0.95,
    *,
    batch_size: int = 64,
    alpha0: Optional[StateFn] = None,
    output_equiv: Any = "argmax",
    output: Optional[Callable[[Any], torch.Tensor]] = None,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    inputs: Optional[Callable[[Any], Any]] = None,
    device: Union[torch.device, str, None] = None,
    max_counterexamples: int = 100,
    progress: bool = True,
) -> ValidationResult:
    """Test an interpretation ``h = h_n o ... o h_1`` of ``model`` against the axioms A1-A4
    (Palumbo et al., "Validating Mechanistic Interpretations: An Axiomatic Approach").

    For every stage ``i`` (``t_<=i`` = the model up to stage ``i``'s end boundary,
    ``t_>i`` = the rest, ``alpha_0`` = ``alpha0``):

    * A1 prefix equivalence: ``alpha_i(t_<=i(x)) ~ h_<=i(alpha_0(x))``
    * A2 component equivalence: ``alpha_i(t_i(t_<i(x))) ~ h_i(alpha_{i-1}(t_<i(x)))``
    * A3 prefix replaceability: ``t(x) = t_>i(gamma_i(h_<=i(alpha_0(x))))``
    * A4 component replaceability: ``t(x) = t_>i(gamma_i(h_i(alpha_{i-1}(t_<i(x)))))``

    ``~`` is the stage's equivalence, ``=`` is ``output_equiv``. Each probability is estimated on
    ``data`` and reported as ``epsilon = 1 -`` the lower one-sided exact Clopper-Pearson bound at
    ``confidence``. ``t_>i(s)`` is computed by activation patching: the model is run on ``x``
    with a forward hook on stage ``i``'s end module returning ``s`` (or by the stage's ``rest``
    function when it has one). Per batch, the model runs once with hooks recording every
    boundary state (the cached concrete pass), then once per stage and replaceability axiom
    (A3 and A4 share the run when their patches coincide; nothing runs for a stage that ends at
    the model output or has ``rest``).

    A sample whose input, model output or compared state holds a NaN is a failure of that axiom
    (histogram distance ``-1``), never a success; a warning says how many there were.

    Args:
        model: any ``nn.Module``; put into ``eval()`` (modes restored) under ``inference_mode``.
        stages: the :class:`Stage` list, chained: ``stages[i].end == stages[i+1].start``.
        data: a non-empty tensor of inputs, a map-style ``Dataset`` (items ``x`` or
            ``(x, y, ...)``), a ``DataLoader`` or an iterable of batches. Counterexample ids are
            dataset indices (for a ``DataLoader``, the indices its sampler drew), else running
            positions.
        axioms: subset of ``("A1", "A2", "A3", "A4")``.
        confidence: confidence level of the one-sided bound, in (0, 1).
        batch_size: batch size for tensors and datasets.
        alpha0: abstraction of the state at ``stages[0].start`` (the input by default); identity
            if None.
        output_equiv: equality ``t(x) = ...`` of model outputs for A3/A4: ``"argmax"``
            (classifier decision, default), ``"exact"``, ``"allclose"`` /
            :func:`~semlens_fast.validate.allclose` ``(rtol, atol)``, any Equivalence or a
            callable ``fn(y, y_patched) -> [B] bool``.
        output: ``fn(model_output) -> Tensor`` picking the output tensor (default: the first
            tensor of tuple/dict outputs, depth-first).
        forward: ``fn(model, batch)`` running the model (default: ``model(**batch)`` for
            mappings, ``model(batch[0])`` for tuples/lists, else ``model(batch)``).
        inputs: ``fn(batch) -> input state`` (default: ``batch[0]`` for tuples/lists, else the
            batch); what ``alpha0`` sees when ``stages[0].start`` is the input.
        device: where batches go (default: the device of the model's first parameter).
        max_counterexamples: sample ids kept per (stage, axiom).
        progress: show a tqdm progress bar over batches.

    Returns:
        A :class:`ValidationResult`.

    Raises:
        ArgumentError / ShapeError naming the stage for: unknown or unordered boundaries,
        stages that do not chain, non-callable maps, a gamma returning a state of the wrong
        shape, maps that drop the batch dimension, non-vectorised equivalences, a ``rest`` that
        does not reproduce the model; ArgumentError for empty ``data``.
    """
    res = _validate({"": Interpretation(stages, alpha0=alpha0)}, model, data, axioms, confidence, batch_size=batch_size,
                    output_equiv=output_equiv, output=output, forward=forward, inputs=inputs, device=device,
                    max_counterexamples=max_counterexamples, progress=progress)
    return res[""]


def validate_many(
    model: nn.Module,
    interpretations: Mapping[str, Union[Interpretation, Sequence[Stage]]],
    data: Any,
    axioms: Sequence[str] = AXIOMS,
    confidence: float = 0.95,
    **kw: Any,
) -> dict[str, ValidationResult]:
    """:func:`validate` for several interpretations of one model on the same data, sharing the
    cached concrete pass: per batch the model runs once with hooks on every boundary of every
    interpretation; then each interpretation's abstract computations and patched runs follow.

    ``interpretations`` maps names to stage lists or :class:`Interpretation` (stages with their
    own ``alpha0`` / ``axioms``). Keyword arguments are those of :func:`validate` (``alpha0``
    is the default of interpretations without their own). Returns ``{name: ValidationResult}``;
    errors name the interpretation."""
    if not isinstance(interpretations, Mapping) or not interpretations:
        raise ArgumentError(f"interpretations must be a non-empty mapping {{name: stages}}, got {interpretations!r:.200}")
    alpha0 = kw.pop("alpha0", None)
    plans = {}
    for name, it in interpretations.items():
        if not isinstance(name, str) or not name:
            raise ArgumentError(f"interpretation names must be non-empty strings, got {name!r}")
        if not isinstance(it, Interpretation):
            it = Interpretation(it, alpha0=alpha0)
        elif it.alpha0 is None and alpha0 is not None:
            it = Interpretation(it.stages, alpha0=alpha0, axioms=it.axioms)
        plans[name] = it
    return _validate(plans, model, data, axioms, confidence, **kw)


def _validate(
    interpretations: dict[str, Interpretation],
    model: nn.Module,
    data: Any,
    axioms: Sequence[str],
    confidence: float,
    *,
    batch_size: int = 64,
    output_equiv: Any = "argmax",
    output: Optional[Callable[[Any], torch.Tensor]] = None,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    inputs: Optional[Callable[[Any], Any]] = None,
    device: Union[torch.device, str, None] = None,
    max_counterexamples: int = 100,
    progress: bool = True,
) -> dict[str, ValidationResult]:
    runner = _Runner(model, forward=forward, inputs=inputs, output=output, device=device)
    axioms = _check_axioms(axioms, "axioms")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ArgumentError(f"confidence must be a float in (0, 1), got {confidence!r}")
    if isinstance(max_counterexamples, bool) or not isinstance(max_counterexamples, int) or max_counterexamples < 0:
        raise ArgumentError(f"max_counterexamples must be an int >= 0, got {max_counterexamples!r}")
    out_eq = as_equivalence(output_equiv, "output_equiv")
    if isinstance(out_eq, Downstream) and out_eq.fn is None:
        raise ArgumentError("output_equiv cannot be an unbound downstream equivalence (there is nothing downstream of the output)")
    plans = [_Plan(name, it, runner, axioms, max_counterexamples) for name, it in interpretations.items()]
    for plan in plans:
        for i, missing in plan.no_gamma:
            warnings.warn(f"validate: {plan.where[i]}: no gamma (concretisation) given; {', '.join(missing)} not tested",
                          stacklevel=3)
    module_names = sorted(set().union(*(p.modules for p in plans)))
    needs_input = any(p.needs_input for p in plans)

    from tqdm.auto import tqdm

    n_total = n_nan = 0
    checked_order = False
    with _EvalMode(model):
        for ids, batch in tqdm(runner.batches(data, batch_size), desc="validate", disable=not progress):
            batch = to_device(batch, runner.device)
            try:
                states, y, order = runner.record(batch, module_names)
            except ArgumentError as e:
                users = [w for p in plans for i, w in enumerate(p.where)
                         if str(e).startswith(f"boundary {p.starts[i]!r}") or str(e).startswith(f"boundary {p.ends[i]!r}")]
                if not users:
                    raise
                raise type(e)(f"{' and '.join(users)}: {e}") from None
            b = int(y.shape[0]) if y.dim() > 0 else -1
            if b != len(ids):
                raise ShapeError(
                    f"the model output has shape {tuple(y.shape)} for a batch of {len(ids)} samples; expected the "
                    f"batch as first dimension (give output=fn(model_output) -> Tensor)"
                )
            if not checked_order:
                pos = {n: k for k, n in enumerate(order)}
                pos[INPUT], pos[OUTPUT] = -1, len(order)
                for p in plans:
                    p.check_order(pos)
                checked_order = True
            states[OUTPUT] = y
            x = runner.inputs(batch)
            if needs_input:
                if not isinstance(x, torch.Tensor):
                    raise ArgumentError(
                        f"the model input state is a {type(x).__name__}; give inputs=fn(batch) -> Tensor "
                        f"(the state alpha0 abstracts)"
                    )
                states[INPUT] = x
            bad = torch.zeros(b, dtype=torch.bool, device=y.device)
            for t in (x, y):
                m = _nan_rows(t, b)
                if m is not None:
                    bad |= m.to(bad.device)
            n_nan += int(bad.sum())
            n_total += len(ids)
            for p in plans:
                p.run_batch(states, y, batch, ids, runner, out_eq, bad)
    if n_total == 0:
        raise ArgumentError(
            f"data is empty ({type(data).__name__} with no samples): nothing to validate; an epsilon without samples "
            f"would be 1.0 and mean nothing"
        )
    if n_nan:
        warnings.warn(f"validate: {n_nan} of {n_total} samples have NaN in the model input or output; they count as "
                      f"failures of every axiom (histogram distance -1)", stacklevel=3)
    return {p.name: p.result(confidence, n_total) for p in plans}
