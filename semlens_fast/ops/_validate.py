"""Argument checks shared by the ops (devices, result sizes, top-k state contents).

Every check raises an error from :mod:`semlens_fast.errors` that names the argument,
what it got and what was expected. Kept apart from the ops' dispatch code.
"""
from __future__ import annotations

import os

import torch

from ..errors import ArgumentError, DeviceError

SUPPORTED_DEVICES = ("cpu", "cuda", "meta")


def parse_device(device: object, name: str = "device", *, meta: bool = True) -> torch.device:
    """``device`` (None -> cpu, a ``torch.device`` or a string) as a usable torch.device.

    Refuses strings torch cannot parse (``'gpu'``, ``''``), device types the ops do not
    run on (``'mps'``, ...) and CUDA devices that are not there. ``'meta'`` is accepted
    unless ``meta=False``: the registered ops give meta (and fake) tensors their result
    shapes without computing anything (see "registered torch ops" in ops/topk.py)."""
    if device is None:
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)) or isinstance(device, bool):
        raise DeviceError(f"{name} must be a torch.device or a string like 'cpu' or 'cuda:0', got {type(device).__name__} {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise DeviceError(f"{name}={device!r} is not a device; expected 'cpu', 'cuda' or 'cuda:<index>'") from exc
    check_device_type(dev, name, meta=meta)
    return dev


def check_device_type(dev: torch.device, name: str, *, meta: bool = True) -> None:
    """``dev`` is a CPU device, a CUDA device that exists, or (``meta=True``) meta."""
    if dev.type == "meta" and not meta:
        raise DeviceError(f"{name} is on device 'meta' (meta tensors hold no data); this needs 'cpu' or 'cuda' data")
    if dev.type not in SUPPORTED_DEVICES:
        raise DeviceError(f"{name} is on device {str(dev)!r}; the ops run on 'cpu' or 'cuda' ('meta' for shapes only)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{name} asks for device {str(dev)!r} but CUDA is not available here (no GPU or no CUDA driver)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"{name} asks for device {str(dev)!r} but there are {torch.cuda.device_count()} CUDA device(s)")


def check_tensor_device(t: torch.Tensor, name: str, *, meta: bool = True) -> None:
    """A tensor argument lives on a device the ops run on (not mps, ...; meta only if ``meta``)."""
    if t.device.type != "cpu":  # the common case costs one comparison
        check_device_type(t.device, name, meta=meta)


def available_memory() -> int:
    """Bytes of memory this process may still use: ``MemAvailable`` of /proc/meminfo, or
    less when a cgroup memory limit leaves less room (the tightest limit of this process's
    own cgroup and its ancestors, found through /proc/self/cgroup: v2 ``memory.max``, v1
    ``memory.limit_in_bytes``; the limit less this process's anonymous memory: page cache,
    mapped files included, is reclaimable); 4 GiB if none of them can be read (not Linux)."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        avail = None
    limit = cgroup_memory_limit()
    if limit is not None:
        room = limit - _anonymous_bytes()
        avail = room if avail is None else min(avail, room)
    return max(0, avail) if avail is not None else 4 << 30


def cgroup_memory_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """The tightest memory limit (bytes) of this process's cgroup and its ancestors, or
    None when there is none. Reads ``proc_cgroup`` (``id:controllers:path`` lines) for the
    v2 path (``0::/...``: ``<root>/<path>/memory.max``) and the v1 memory controller
    (``N:memory:/...``: ``<root>/memory/<path>/memory.limit_in_bytes``); the hierarchy's
    root file is read too (a container's own cgroup appears as ``/`` in its namespace)."""
    try:
        with open(proc_cgroup) as fh:
            lines = fh.read(1 << 16).splitlines()
    except OSError:
        lines = []
    files = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        if ctrls == "":
            base, name = root, "memory.max"
        elif "memory" in ctrls.split(","):
            base, name = os.path.join(root, "memory"), "memory.limit_in_bytes"
        else:
            continue
        rel = path.strip("/")
        while True:
            files.append(os.path.join(base, rel, name) if rel else os.path.join(base, name))
            if not rel:
                break
            rel = os.path.dirname(rel)
    if not files:  # no /proc/self/cgroup: the root files of both versions
        files = [os.path.join(root, "memory.max"), os.path.join(root, "memory", "memory.limit_in_bytes")]
    best = None
    for f in files:
        v = _read_int(f)
        if v is not None and v < (1 << 60):  # absent, "max", or the v1 "no limit" value
            best = v if best is None else min(best, v)
    return best


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
# merge_topk's checks of its two states: the C++ extension checks CPU states in one
# parallel pass (csrc/topk.cpp, check_states); the torch version below serves other
# devices (and builds without the extension). Both report the lowest failing channel of
# the first failing check, in this order, state a before state b, then the overlap.

_STATE_CHECKS = (
    "{name}.values holds NaN in channel {c}; NaN never enters a state (it is counted in nan_counts)",
    "{name}.ids holds negative ids other than -1 (the empty-slot mark) in channel {c}",
    "{name} has empty slots (id -1) whose value is not -inf or whose position is not -1 in channel {c}",
    "{name}.positions holds values below -1 in channel {c}",
    "{name}.nan_counts holds a negative count at channel {c}",
    "{name} is not sorted best first (larger value, then lower id, empty slots last) in channel {c}: "
    "build states with TopKState.empty and these ops",
    "{name} holds the same sample id twice in channel {c}",
)
_OVERLAP = ("{a} and {b} both hold sample id {sid} in channel {c} ({n} channel(s) share ids): merge_topk needs "
            "states of disjoint sets of samples (shards of a data set, or a run and its resumption)")


def _first_failures_torch(values, ids, positions, nan_counts) -> list[int]:
    """Lowest failing channel of each of _STATE_CHECKS (-1: none)."""
    C, k = values.shape
    empty = ids == -1
    flags = [
        torch.isnan(values).any(dim=1),
        (ids < -1).any(dim=1),
        (empty & ((values != float("-inf")) | (positions != -1))).any(dim=1),
        (positions < -1).any(dim=1),
        nan_counts < 0,
    ]
    if k > 1:
        v0, v1, i0, i1 = values[:, :-1], values[:, 1:], ids[:, :-1], ids[:, 1:]
        big = torch.iinfo(torch.int64).max  # ids compared as unsigned: -1 (empty) last
        u0 = torch.where(i0 < 0, torch.full_like(i0, big), i0)
        u1 = torch.where(i1 < 0, torch.full_like(i1, big), i1)
        ordered = (v0 > v1) | ((v0 == v1) & (u0 < u1)) | ((i0 == -1) & (i1 == -1))
        flags.append(~ordered.all(dim=1))
        srt = torch.sort(ids, dim=1).values
        flags.append(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(dim=1))
    else:
        flags += [torch.zeros(C, dtype=torch.bool, device=values.device)] * 2
    out = []
    for f in flags:
        nz = torch.nonzero(f).flatten()
        out.append(int(nz[0]) if nz.numel() else -1)
    return out


def _overlap_torch(a_ids, b_ids) -> tuple[int, int, int]:
    """(lowest channel holding an id of both, its smallest such id, channels affected); -1 if none."""
    both = torch.sort(torch.cat([a_ids, b_ids], dim=1), dim=1).values
    dup = (both[:, 1:] == both[:, :-1]) & (both[:, 1:] >= 0)
    rows = dup.any(dim=1)
    if not bool(rows.any()):
        return -1, -1, 0
    c = int(torch.nonzero(rows).flatten()[0])
    return c, int(both[c, 1:][dup[c]][0]), int(rows.sum())


def check_merge_states(a, b, a_name: str = "a", b_name: str = "b", *, use_extension: bool = True) -> None:
    """Both states follow the library's conventions and hold disjoint samples: no NaN
    values; ids >= 0, or -1 for an empty slot (value -inf, position -1); positions >= -1;
    NaN counts >= 0; sorted best first in the total order (larger value, then lower id,
    empty slots last); no sample id twice in a channel; no channel holding the same
    sample id in both states. Raises ArgumentError naming the state, the check and the
    lowest channel that fails it. O(C k log k)."""
    from . import _backend

    ext = _backend.extension() if use_extension else None
    C, k = a.values.shape
    if C == 0 or k == 0:
        return  # empty states: nothing to check
    if ext is not None and a.values.device.type == "cpu":
        first, sid, n = ext.check_merge_states(
            a.values.data_ptr(), a.ids.data_ptr(), a.positions.data_ptr(), a.nan_counts.data_ptr(),
            b.values.data_ptr(), b.ids.data_ptr(), b.positions.data_ptr(), b.nan_counts.data_ptr(),
            C, k, _backend.num_threads())
        first = [c if c < C else -1 for c in first]
        fa, fb, (oc, osid, on) = first[: len(_STATE_CHECKS)], first[len(_STATE_CHECKS) : 2 * len(_STATE_CHECKS)], (first[-1], sid, n)
    else:
        fa = _first_failures_torch(a.values, a.ids, a.positions, a.nan_counts)
        fb = _first_failures_torch(b.values, b.ids, b.positions, b.nan_counts)
        oc, osid, on = -1, -1, 0
    for name, fails in ((a_name, fa), (b_name, fb)):
        for msg, c in zip(_STATE_CHECKS, fails):
            if c >= 0:
                raise ArgumentError(msg.format(name=name, c=c))
    if ext is None or a.values.device.type != "cpu":
        oc, osid, on = _overlap_torch(a.ids, b.ids)
    if oc >= 0:
        raise ArgumentError(_OVERLAP.format(a=a_name, b=b_name, sid=osid, c=oc, n=on))
