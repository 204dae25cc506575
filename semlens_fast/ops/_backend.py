"""Backend selection for the ops.

Each op dispatches on the device of its tensors:

* CPU tensors  -> the C++ extension ``semlens_fast._C`` (``cpu``), or the torch
  reference when the extension is not built (one warning is issued).
* CUDA tensors -> the Triton kernels (``triton``).

``SEMLENS_BACKEND=reference|cpu|triton`` forces one backend for every call (the
tests use it). Forcing ``triton`` for CPU tensors only works under
``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch

from ..errors import BackendUnavailableError

BACKENDS = ("reference", "cpu", "triton")
_ENV = "SEMLENS_BACKEND"

_ext: ModuleType | None = None
_ext_error: str | None = None
_ext_loaded = False
_warned = False


def extension() -> ModuleType | None:
    """The compiled extension ``semlens_fast._C``, or None if it is not built."""
    global _ext, _ext_error, _ext_loaded
    if not _ext_loaded:
        _ext_loaded = True
        try:
            _ext = importlib.import_module("semlens_fast._C")
        except ImportError as exc:  # pragma: no cover - depends on the build
            _ext, _ext_error = None, str(exc)
    return _ext


def cpu_isa() -> str:
    """The SIMD level the C++ kernels use on this CPU (``avx512``, ``avx2`` or ``scalar``)."""
    ext = extension()
    return ext.isa() if ext is not None else "none"


def forced_backend() -> str | None:
    value = os.environ.get(_ENV)
    if not value:
        return None
    value = value.strip().lower()
    if value not in BACKENDS:
        raise BackendUnavailableError(
            f"{_ENV}={value!r} is not a backend; expected one of {', '.join(BACKENDS)}"
        )
    return value


def triton_usable(device: torch.device) -> bool:
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def choose(device: torch.device) -> str:
    """Name of the backend that serves tensors on ``device``."""
    global _warned
    forced = forced_backend()
    if forced is None and device.type == "cpu" and _ext is not None:
        return "cpu"  # the common case, decided without further look-ups
    if forced == "cpu":
        if device.type != "cpu":
            raise BackendUnavailableError(f"{_ENV}=cpu but the tensors are on {device}")
        if extension() is None:
            raise BackendUnavailableError(
                f"{_ENV}=cpu but the C++ extension semlens_fast._C is not built ({_ext_error})"
            )
        return "cpu"
    if forced == "triton":
        if not triton_usable(device):
            raise BackendUnavailableError(
                f"{_ENV}=triton needs CUDA tensors (got {device}) or TRITON_INTERPRET=1"
            )
        return "triton"
    if forced == "reference":
        return "reference"
    if device.type == "cpu":
        if extension() is not None:
            return "cpu"
        if not _warned:
            _warned = True
            warnings.warn(
                "semlens_fast._C (the C++ CPU kernels) is not built; falling back to the "
                f"slower torch reference ({_ext_error}). Reinstall with a C++ compiler to build it.",
                RuntimeWarning,
                stacklevel=3,
            )
        return "reference"
    if device.type == "cuda" and triton_usable(device):
        return "triton"
    return "reference"


_modules: dict[str, ModuleType] = {}


def module(name: str) -> ModuleType:
    """The backend package ``semlens_fast.ops.<name>`` (imported once)."""
    mod = _modules.get(name)
    if mod is None:
        mod = _modules[name] = importlib.import_module(f"semlens_fast.ops.{name}")
    return mod


def num_threads() -> int:
    """Threads the C++ kernels use: torch's setting, so ``torch.set_num_threads`` governs both."""
    return max(1, torch.get_num_threads())
