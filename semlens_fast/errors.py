"""Exception types of semlens_fast.

Every error names the offending argument, what it got (value, shape or dtype) and
what was expected. They subclass the builtin ``ValueError``/``TypeError`` so that
callers can catch them generically.
"""
from __future__ import annotations


class SemlensError(Exception):
    """Base class of all semlens_fast errors."""


class ArgumentError(SemlensError, ValueError):
    """An argument has a wrong value (out of range, unknown option, ...)."""


class ShapeError(ArgumentError):
    """A tensor argument has the wrong number of dimensions or the wrong sizes."""


class DeviceError(ArgumentError):
    """Tensor arguments live on different or unsupported devices."""


class DTypeError(SemlensError, TypeError):
    """A tensor argument has an unsupported dtype."""


class StoreError(SemlensError, ValueError):
    """A stored artifact is missing, truncated, from another version, or does not match."""


class ConcurrentWriteError(SemlensError, RuntimeError):
    """Another process holds the write lock of a run folder, store or index (try again when it is done)."""


class BackendUnavailableError(SemlensError, RuntimeError):
    """A backend was requested explicitly but cannot be used here."""
