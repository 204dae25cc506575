"""Vectorised equivalences on batched states.

An equivalence compares two batches ``a``, ``b`` (first dimension = the batch) sample by sample
and returns ``(equal, distance)``: ``equal`` a ``[B]`` bool tensor, ``distance`` a ``[B]`` int64
tensor (``0`` where equal; otherwise a measure of how far apart the two states are, e.g. the
number of differing positions). ``distance`` feeds the mismatch histogram of the report.

A plain callable ``fn(a, b) -> [B] bool tensor`` is accepted wherever an equivalence is; its
distance is ``0``/``1``. Anything else it returns (a Python bool, a 0-d tensor, a ``[B, k]``
tensor, ...) is refused with an error naming the stage: equivalences must be vectorised.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

from ..errors import ArgumentError, ShapeError

__all__ = [
    "Equivalence",
    "Exact",
    "Rounded",
    "Hamming",
    "Unordered",
    "Downstream",
    "Argmax",
    "AllClose",
    "exact",
    "rounded",
    "hamming",
    "unordered",
    "downstream",
    "argmax",
    "allclose",
    "as_equivalence",
]


def _as_tensor(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    raise ArgumentError(f"{what} must be a torch.Tensor with the batch as first dimension, got {type(x).__name__}")


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1) if x.dim() > 0 else x.reshape(1, 1)


def _same_shape(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    if a.shape != b.shape:
        raise ShapeError(
            f"the {name} equivalence compares states of the same shape, got {tuple(a.shape)} (left) "
            f"and {tuple(b.shape)} (right)"
        )


class Equivalence:
    """Base class. Subclasses implement :meth:`compare`."""

    name = "equivalence"

    def compare(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(equal [B] bool, distance [B] int64)`` of two batches of states."""
        raise NotImplementedError

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.compare(a, b)[0]

    def bind(self, downstream: Callable[[torch.Tensor], torch.Tensor]) -> "Equivalence":
        """Equivalence to use at a stage whose abstract continuation is ``downstream``
        (``h_n o ... o h_{i+1}``). Only :class:`Downstream` uses it."""
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Exact(Equivalence):
    """Equal iff every position is equal. Distance: number of differing positions."""

    name = "exact"

    def compare(self, a, b):
        _same_shape(a, b, self.name)
        d = (_flat(a) != _flat(b)).sum(1)
        return d == 0, d.to(torch.int64)


class Rounded(Exact):
    """Exact equality after rounding floating states to ``decimals`` decimals."""

    name = "rounded"

    def __init__(self, decimals: int = 0):
        if isinstance(decimals, bool) or not isinstance(decimals, int):
            raise ArgumentError(f"decimals must be an int, got {decimals!r}")
        self.decimals = decimals

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x, decimals=self.decimals) if x.is_floating_point() else x

    def compare(self, a, b):
        return super().compare(self._round(a), self._round(b))

    def __repr__(self) -> str:
        return f"Rounded(decimals={self.decimals})"


class Hamming(Rounded):
    """Equal iff at most ``m`` positions differ (after rounding to ``decimals`` if given).
    Distance: number of differing positions."""

    name = "hamming"

    def __init__(self, m: int, decimals: Optional[int] = None):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ArgumentError(f"m (the Hamming tolerance) must be an int >= 0, got {m!r}")
        self.m = m
        self.decimals = decimals  # type: ignore[assignment]
        if decimals is not None and (isinstance(decimals, bool) or not isinstance(decimals, int)):
            raise ArgumentError(f"decimals must be an int or None, got {decimals!r}")

    def _round(self, x):
        return x if self.decimals is None else super()._round(x)

    def compare(self, a, b):
        a, b = self._round(a), self._round(b)
        _same_shape(a, b, self.name)
        d = (_flat(a) != _flat(b)).sum(1).to(torch.int64)
        return d <= self.m, d

    def __repr__(self) -> str:
        return f"Hamming(m={self.m}, decimals={self.decimals})"


class Unordered(Equivalence):
    """Equal iff the two samples hold the same multiset of values (all positions of a sample,
    flattened; the two sides may have different sizes). Distance: ``max(|a|, |b|) - |a ∩ b|``
    (multiset intersection), the number of values to change to make them equal."""

    name = "unordered"

    def __init__(self, decimals: Optional[int] = None):
        self.decimals = decimals

    def compare(self, a, b):
        if a.shape[:1] != b.shape[:1]:
            raise ShapeError(f"the unordered equivalence needs the same batch size, got {a.shape[0]} and {b.shape[0]}")
        fa, fb = _flat(a), _flat(b)
        dt = torch.promote_types(fa.dtype, fb.dtype)
        if dt == torch.bool:
            dt = torch.int64
        fa, fb = fa.to(dt), fb.to(dt)
        if self.decimals is not None and dt.is_floating_point:
            fa, fb = torch.round(fa, decimals=self.decimals), torch.round(fb, decimals=self.decimals)
        n, m = fa.shape[1], fb.shape[1]
        if n == 0 or m == 0:
            d = torch.full((fa.shape[0],), max(n, m), dtype=torch.int64, device=fa.device)
            return d == 0, d
        sa = fa.sort(dim=1).values.contiguous()
        sb = fb.sort(dim=1).values.contiguous()
        first = torch.searchsorted(sa, sa, right=False)  # first index of each value of a in a
        rank = torch.arange(n, device=sa.device).expand_as(first) - first  # occurrence number
        cnt_b = torch.searchsorted(sb, sa, right=True) - torch.searchsorted(sb, sa, right=False)
        inter = ((rank < cnt_b) & (sa == sa)).sum(1)  # NaN never matches
        d = (max(n, m) - inter).to(torch.int64)
        return d == 0, d

    def __repr__(self) -> str:
        return f"Unordered(decimals={self.decimals})"


class Downstream(Equivalence):
    """Two abstract states are equivalent iff they give the same downstream result:
    ``then(fn(a), fn(b))``. With ``fn=None`` the validator binds ``fn`` to the rest of the
    abstract model, ``h_n o ... o h_{i+1}`` (identity at the last stage)."""

    name = "downstream"

    def __init__(self, fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, then: Any = "exact"):
        if fn is not None and not callable(fn):
            raise ArgumentError(f"fn of the downstream equivalence must be callable or None, got {fn!r}")
        self.fn = fn
        self.then = as_equivalence(then, "then")
        if isinstance(self.then, Downstream):
            raise ArgumentError("then of the downstream equivalence cannot itself be a downstream equivalence")

    def bind(self, downstream):
        return self if self.fn is not None else Downstream(downstream, self.then)

    def compare(self, a, b):
        if self.fn is None:
            raise ArgumentError("the downstream equivalence has no downstream function: give fn= or use it inside validate()")
        fa = _as_tensor(self.fn(a), "the downstream function's output")
        fb = _as_tensor(self.fn(b), "the downstream function's output")
        return self.then.compare(fa, fb)

    def __repr__(self) -> str:
        return f"Downstream(fn={getattr(self.fn, '__name__', self.fn)!r}, then={self.then!r})"


class Argmax(Equivalence):
    """Equal iff ``argmax`` over ``dim`` agrees at every remaining position (classifier
    decisions). Distance: number of positions whose argmax differs (0/1 for ``[B, C]``)."""

    name = "argmax"

    def __init__(self, dim: int = -1):
        self.dim = dim

    def compare(self, a, b):
        _same_shape(a, b, self.name)
        if a.dim() < 2:
            raise ShapeError(
                f"the argmax equivalence needs states [B, ..., C] with at least 2 dimensions, got "
                f"shape {tuple(a.shape)}; use 'exact' or 'allclose' for other outputs"
            )
        d = (_flat(a.argmax(self.dim)) != _flat(b.argmax(self.dim))).sum(1).to(torch.int64)
        return d == 0, d

    def __repr__(self) -> str:
        return f"Argmax(dim={self.dim})"


class AllClose(Equivalence):
    """Equal iff ``|a - b| <= atol + rtol * |b|`` at every position. Distance: number of positions
    that are not close."""

    name = "allclose"

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-8):
        self.rtol, self.atol = float(rtol), float(atol)

    def compare(self, a, b):
        _same_shape(a, b, self.name)
        if not a.is_floating_point():
            a = a.double()
        if not b.is_floating_point():
            b = b.double()
        close = torch.isclose(_flat(a), _flat(b).to(a.dtype), rtol=self.rtol, atol=self.atol)
        d = (~close).sum(1).to(torch.int64)
        return d == 0, d

    def __repr__(self) -> str:
        return f"AllClose(rtol={self.rtol}, atol={self.atol})"


class _Fn(Equivalence):
    name = "custom"

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], Any]):
        self.fn = fn

    def compare(self, a, b):
        eq = self.fn(a, b)
        if not isinstance(eq, torch.Tensor) or eq.dim() != 1 or eq.shape[0] != a.shape[0]:
            got = f"a tensor of shape {tuple(eq.shape)}" if isinstance(eq, torch.Tensor) else f"{type(eq).__name__} {eq!r}"
            raise ShapeError(
                f"the equivalence {getattr(self.fn, '__name__', repr(self.fn))} is not vectorised: it must "
                f"return a [B] bool tensor (B = {a.shape[0]}, one entry per sample), got {got}"
            )
        if eq.dtype != torch.bool:
            if eq.is_floating_point() or eq.is_complex() or not bool(((eq == 0) | (eq == 1)).all()):
                raise ShapeError(
                    f"the equivalence {getattr(self.fn, '__name__', repr(self.fn))} must return a [B] bool "
                    f"tensor, got dtype {eq.dtype}"
                )
            eq = eq.bool()
        return eq, (~eq).to(torch.int64)

    def __repr__(self) -> str:
        return f"custom({getattr(self.fn, '__name__', self.fn)!r})"


def exact() -> Exact:
    """Exact equality of every position."""
    return Exact()


def rounded(decimals: int = 0) -> Rounded:
    """Exact equality after rounding to ``decimals`` decimals."""
    return Rounded(decimals)


def hamming(m: int, decimals: Optional[int] = None) -> Hamming:
    """At most ``m`` differing positions."""
    return Hamming(m, decimals)


def unordered(decimals: Optional[int] = None) -> Unordered:
    """Same multiset of values per sample."""
    return Unordered(decimals)


def downstream(fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, then: Any = "exact") -> Downstream:
    """Same downstream result (``fn`` default: the rest of the abstract model)."""
    return Downstream(fn, then)


def argmax(dim: int = -1) -> Argmax:
    """Same argmax over ``dim`` (classifier decision)."""
    return Argmax(dim)


def allclose(rtol: float = 1e-5, atol: float = 1e-8) -> AllClose:
    """``torch.isclose`` at every position."""
    return AllClose(rtol, atol)


_NAMES = {"exact": Exact, "unordered": Unordered, "downstream": Downstream, "argmax": Argmax, "allclose": AllClose}


def as_equivalence(spec: Any, what: str = "equiv") -> Equivalence:
    """An :class:`Equivalence` from an instance, a name (``"exact"``, ``"unordered"``,
    ``"downstream"``, ``"argmax"``, ``"allclose"``) or a callable ``fn(a, b) -> [B] bool``."""
    if isinstance(spec, Equivalence):
        return spec
    if isinstance(spec, str):
        if spec not in _NAMES:
            raise ArgumentError(
                f"{what} must be an Equivalence, a callable fn(a, b) -> [B] bool tensor, or one of "
                f"{sorted(_NAMES)} (use rounded(d) / hamming(m) for parametrised ones), got {spec!r}"
            )
        return _NAMES[spec]()
    if callable(spec):
        return _Fn(spec)
    raise ArgumentError(f"{what} must be an Equivalence, a name or a callable fn(a, b) -> [B] bool tensor, got {spec!r}")
