"""Kernel launches that never crash a user's run.

If a Triton kernel cannot be compiled or launched on the user's GPU (an older
architecture, a Triton/ptxas/driver mismatch, too little shared memory, ...), the op
falls back to the torch reference on the same device -- same results, slower -- and
warns once per kernel, naming the kernel and the error. A configuration that failed
once is not retried in the process. Argument errors of the library, out-of-memory
and keyboard interrupts are never swallowed.

Every launcher hands over a ``fallback`` that recomputes the op from its untouched
inputs, so a launcher must not modify the caller's tensors before its last launch
that can fail (the top-k kernels work on partial lists until the final merge).

``SEMLENS_TRITON_STRICT=1`` re-raises instead (the tests set it, so a kernel bug
cannot hide behind the fallback).
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Hashable

import torch

from ...errors import SemlensError

_failed: dict[tuple[str, Hashable], str] = {}
_warned: set[str] = set()


def strict() -> bool:
    return os.environ.get("SEMLENS_TRITON_STRICT", "") == "1"


def failures() -> dict[tuple[str, Hashable], str]:
    """The (kernel, configuration) pairs that fell back in this process, with their errors."""
    return dict(_failed)


def reset() -> None:
    """Forget past failures (tests)."""
    _failed.clear()
    _warned.clear()


def run_fn(name: str, key: Hashable, fallback: Callable[[], object], fn: Callable[[], object]):
    """``fn()`` (which launches kernel ``name`` in configuration ``key``), or ``fallback()``."""
    if (name, key) in _failed:
        return fallback()
    try:
        return fn()
    except (SemlensError, torch.cuda.OutOfMemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # compile / launch failures of every kind
        if strict():
            raise
        msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        _failed[(name, key)] = msg
        if name not in _warned:
            _warned.add(name)
            warnings.warn(
                f"semlens_fast: the Triton kernel {name} failed to compile or launch on this device ({msg}); "
                "using the torch reference on the same device instead (same results, slower)",
                RuntimeWarning,
                stacklevel=4,
            )
        return fallback()


def run(name: str, key: Hashable, fallback: Callable[[], object], kernel, grid, *args, **kwargs):
    """Launch ``kernel[grid](*args, **kwargs)`` through :func:`run_fn`."""
    return run_fn(name, key, fallback, lambda: kernel[grid](*args, **kwargs))
