"""Argument checks shared by the ops (devices, result sizes, top-k state contents).

Every check raises an error from :mod:`semlens_fast.errors` that names the argument,
what it got and what was expected. Kept apart from the ops' dispatch code.
"""
from __future__ import annotations

import os

import torch

from ..errors import ArgumentError, DeviceError

SUPPORTED_DEVICES = ("cpu", "cuda")


def parse_device(device: object, name: str = "device") -> torch.device:
    """``device`` (None -> cpu, a ``torch.device`` or a string) as a usable torch.device.

    Refuses strings torch cannot parse (``'gpu'``, ``''``), device types the ops do not
    run on (``'mps'``, ``'meta'``, ...) and CUDA devices that are not there."""
    if device is None:
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)) or isinstance(device, bool):
        raise DeviceError(f"{name} must be a torch.device or a string like 'cpu' or 'cuda:0', got {type(device).__name__} {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise DeviceError(f"{name}={device!r} is not a device; expected 'cpu', 'cuda' or 'cuda:<index>'") from exc
    check_device_type(dev, name)
    return dev


def check_device_type(dev: torch.device, name: str) -> None:
    """``dev`` is a CPU device, or a CUDA device that exists."""
    if dev.type not in SUPPORTED_DEVICES:
        extra = " (meta tensors hold no data)" if dev.type == "meta" else ""
        raise DeviceError(f"{name} is on device {str(dev)!r}{extra}; the ops run on 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{name} asks for device {str(dev)!r} but CUDA is not available here (no GPU or no CUDA driver)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"{name} asks for device {str(dev)!r} but there are {torch.cuda.device_count()} CUDA device(s)")


def check_tensor_device(t: torch.Tensor, name: str) -> None:
    """A tensor argument lives on a device the ops run on (not meta, mps, ...)."""
    if t.device.type != "cpu":  # the common case costs one comparison
        check_device_type(t.device, name)


def available_memory() -> int:
    """Bytes of memory this process may still use: ``MemAvailable`` of /proc/meminfo, or
    less when a cgroup memory limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``)
    leaves less room (the limit less this process's anonymous memory: page cache, mapped
    files included, is reclaimable); 4 GiB if none of them can be read (not Linux)."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        avail = None
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        limit = _read_int(limit_file)
        if limit is None or limit >= 1 << 60:  # absent, "max", or the v1 "no limit" value
            continue
        room = limit - _anonymous_bytes()
        avail = room if avail is None else min(avail, room)
        break
    return max(0, avail) if avail is not None else 4 << 30


def _read_int(path: str) -> int | None:
    try:
        with open(path) as fh:
            text = fh.read(64).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _anonymous_bytes() -> int:
    """Resident memory of this process not backed by files (statm: resident - shared)."""
    try:
        with open("/proc/self/statm") as fh:
            f = fh.read().split()
        return max(0, int(f[1]) - int(f[2])) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def check_result_size(rows: int, k: int, bytes_per_entry: int, what: str) -> None:
    """A ``[rows, k]`` result of ``bytes_per_entry`` bytes an entry fits in the memory
    available now (a k far beyond the data would otherwise fail inside torch's allocator)."""
    need = int(rows) * int(k) * int(bytes_per_entry)
    if need > (1 << 30):  # cheap for everything below a GiB
        avail = available_memory()
        if need > avail:
            raise ArgumentError(
                f"k={k} asks for {what} of [{rows}, {k}] entries ({need / 2**30:.1f} GiB), more than the "
                f"{avail / 2**30:.1f} GiB of memory available; use a smaller k"
            )


# --------------------------------------------------------------------------- top-k states

def _channels(mask: torch.Tensor) -> str:
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    shown = rows[:5].tolist()
    more = f" (and {rows.numel() - 5} more)" if rows.numel() > 5 else ""
    return f"channel(s) {shown}{more}"


def check_state_entries(values: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
                        nan_counts: torch.Tensor, name: str) -> None:
    """The entries of a top-k state follow the library's conventions: no NaN values, ids
    >= 0 or -1 (empty slot, then value -inf and position -1), positions >= -1, NaN counts
    >= 0, sorted best first in the total order (larger value, then lower id; empty slots
    last) and no sample id twice in one channel. O(C k log k)."""
    if bool(torch.isnan(values).any()):
        raise ArgumentError(f"{name}.values holds NaN in {_channels(torch.isnan(values))}; NaN never enters a state "
                            "(it is counted in nan_counts)")
    if bool((ids < -1).any()):
        raise ArgumentError(f"{name}.ids holds negative ids other than -1 (the empty-slot mark) in {_channels(ids < -1)}; "
                            f"minimum {int(ids.min())}")
    empty = ids == -1
    bad = empty & ((values != float("-inf")) | (positions != -1))
    if bool(bad.any()):
        raise ArgumentError(f"{name} has empty slots (id -1) whose value is not -inf or whose position is not -1 in {_channels(bad)}")
    if bool((positions < -1).any()):
        raise ArgumentError(f"{name}.positions holds values below -1 in {_channels(positions < -1)}")
    if bool((nan_counts < 0).any()):
        raise ArgumentError(f"{name}.nan_counts holds negative counts at channels {torch.nonzero(nan_counts < 0).flatten()[:5].tolist()}")
    if values.shape[1] > 1:
        v0, v1, i0, i1 = values[:, :-1], values[:, 1:], ids[:, :-1], ids[:, 1:]
        # ids compared as unsigned (empty slots, -1, last): via an offset that keeps the order
        u0 = torch.where(i0 < 0, torch.full_like(i0, torch.iinfo(torch.int64).max), i0)
        u1 = torch.where(i1 < 0, torch.full_like(i1, torch.iinfo(torch.int64).max), i1)
        ordered = (v0 > v1) | ((v0 == v1) & (u0 < u1)) | ((i0 == -1) & (i1 == -1))
        if not bool(ordered.all()):
            raise ArgumentError(f"{name} is not sorted best first (larger value, then lower id, empty slots last) in "
                                f"{_channels(~ordered)}: build states with TopKState.empty and these ops")
        s = torch.sort(ids, dim=1).values
        dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
        if bool(dup.any()):
            raise ArgumentError(f"{name} holds the same sample id twice in {_channels(dup)}")


def check_disjoint(a_ids: torch.Tensor, b_ids: torch.Tensor, a_name: str, b_name: str) -> None:
    """No channel holds the same sample id in both states (their samples must be disjoint:
    merging overlapping shards would count a sample twice)."""
    both = torch.sort(torch.cat([a_ids, b_ids], dim=1), dim=1).values
    dup = (both[:, 1:] == both[:, :-1]) & (both[:, 1:] >= 0)
    if bool(dup.any()):
        c = int(torch.nonzero(dup.any(dim=1)).flatten()[0])
        sid = int(both[c, 1:][dup[c]][0])
        n = int(dup.any(dim=1).sum())
        raise ArgumentError(
            f"{a_name} and {b_name} both hold sample id {sid} in channel {c} ({n} channel(s) share ids): merge_topk "
            "needs states of disjoint sets of samples (shards of a data set, or a run and its resumption)"
        )
