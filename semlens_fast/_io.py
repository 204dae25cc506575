"""Durable artifact I/O: atomic writes, safetensors tensors + a JSON manifest, locks, checksums.

Every artifact is a folder (or a file pair) written through :func:`atomic_write`: the
content goes to a temporary name in the same folder, is fsynced, and is renamed over
the final name with ``os.replace``; the folder is fsynced too. A crash therefore never
leaves a half-written file under the final name. Files are created with the permissions
the umask allows (``0o666 & ~umask``), like any other file the user creates.

Reads are bounded: :func:`read_json` refuses anything that is not a regular file, larger
than :data:`MAX_JSON_BYTES`, not UTF-8 or nested deeper than :data:`MAX_JSON_DEPTH`;
:func:`read_tensors` / :func:`open_safetensors` verify a SHA-256 recorded at write time
(:func:`write_tensors` returns it) and parse headers with the ``safetensors`` library.

Writers of one folder exclude each other with :func:`locked` (an advisory ``fcntl.flock``
on ``<folder>/.lock``, re-entrant within a process); a second writer gets
:class:`~semlens_fast.errors.ConcurrentWriteError` naming the holder.
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import socket
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import ArgumentError, ConcurrentWriteError, StoreError

MAX_JSON_BYTES = 64 << 20   # manifests and JSON artifacts are small; anything larger is refused
MAX_JSON_DEPTH = 64         # deepest nesting a manifest may have
LOCK_NAME = ".lock"
TEMP_PATTERNS = (".*.tmp", ".*.partial")


class MissingFileError(StoreError):
    """A file an artifact needs is not there (maybe deleted by a writer a moment ago)."""


# ---------------------------------------------------------------------- permissions

def umask() -> int:
    """The process umask (read from /proc where possible, so no other thread sees it change)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    """Mode of a new regular file (``0o666`` less the umask)."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """Mode of a new folder (``0o777`` less the umask)."""
    return 0o777 & ~umask()


# ---------------------------------------------------------------------- writing

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def ensure_dir(path: str | os.PathLike, what: str = "path") -> Path:
    """Create folder ``path`` (and parents); a regular file there or an unwritable place raises
    :class:`ArgumentError` naming ``what``."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise ArgumentError(f"{what} {str(path)!r} exists and is not a folder")
        path.mkdir(parents=True, exist_ok=True)
    except ArgumentError:
        raise
    except OSError as exc:
        raise ArgumentError(f"{what} {str(path)!r} cannot be created: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ArgumentError(f"{what} {str(path)!r} is not writable")
    return path


def check_writable(path: str | os.PathLike, what: str = "path") -> Path:
    """Raise :class:`ArgumentError` now (before any work) if folder ``path`` could not be made
    or written: a regular file there or on its way, or no write permission. Creates nothing."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise ArgumentError(f"{what} {str(path)!r} exists and is not a folder")
        p = path
        while not p.exists():
            if p.is_symlink():
                raise ArgumentError(f"{what} {str(path)!r}: {str(p)!r} is a dangling symlink")
            p = p.parent
        if not p.is_dir():
            raise ArgumentError(f"{what} {str(path)!r}: {str(p)!r} is not a folder")
    except OSError as exc:
        raise ArgumentError(f"{what} {str(path)!r} cannot be used: {exc.strerror or exc}") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise ArgumentError(f"{what} {str(path)!r} is not writable ({str(p)!r} is not)")
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success fsync and rename it to ``path``.

    The temporary name is unique (``.<name>.<random>.tmp``), so concurrent writers never
    share one; the file gets the umask's permissions, not ``mkstemp``'s private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def clean_temp(folder: str | os.PathLike, patterns: tuple[str, ...] = TEMP_PATTERNS) -> int:
    """Delete temporary files of interrupted writes in ``folder`` (call it holding :func:`locked`).
    Returns how many were removed."""
    n = 0
    with contextlib.suppress(OSError):
        for f in Path(folder).iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in patterns) and f.is_file() and not f.is_symlink():
                with contextlib.suppress(OSError):
                    f.unlink()
                    n += 1
    return n


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as pretty JSON."""
    with atomic_write(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Atomically write ``tensors`` as a safetensors file (tensors are moved to CPU and made
    contiguous); returns the SHA-256 of the file's bytes (what manifests record)."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------- reading

def _open_regular(path: Path, what: str) -> int:
    """An fd of ``path`` if it is a regular file (FIFOs and devices are never read)."""
    try:
        fd = os.open(str(path), os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise MissingFileError(f"missing {what} {path}") from None
    except OSError as exc:
        raise StoreError(f"{what} {path} cannot be opened: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise StoreError(f"{what} {path} is not a regular file (a folder, device or FIFO); refusing to read it")
    return fd


def read_bytes(path: str | os.PathLike, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of regular file ``path``, refusing files larger than ``max_bytes``."""
    path = Path(path)
    fd = _open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise StoreError(f"{what} {path} has {size} bytes, more than the {max_bytes} allowed; refusing to read it")
        chunks, total = [], 0
        while True:
            b = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not b:
                break
            chunks.append(b)
            total += len(b)
            if total > max_bytes:
                raise StoreError(f"{what} {path} is larger than the {max_bytes} bytes allowed; refusing to read it")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _depth_ok(obj: Any, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            if d > limit:
                return False
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return True


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Read a JSON manifest: a regular file of at most ``max_bytes``, UTF-8, nested at most
    :data:`MAX_JSON_DEPTH` deep; anything else raises :class:`StoreError`."""
    path = Path(path)
    data = read_bytes(path, max_bytes, "manifest")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StoreError(f"manifest {path} is not UTF-8 text (corrupted?): {exc}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreError(f"manifest {path} is not valid JSON (truncated or corrupted): {exc}") from None
    except RecursionError:
        raise StoreError(f"manifest {path} is nested too deeply to be a manifest (corrupted or hostile)") from None
    if not _depth_ok(obj, MAX_JSON_DEPTH):
        raise StoreError(f"manifest {path} is nested deeper than {MAX_JSON_DEPTH} levels (corrupted or hostile)")
    return obj


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (streamed: nothing stays resident)."""
    h = hashlib.sha256()
    fd = _open_regular(Path(path), "file")
    try:
        with os.fdopen(fd, "rb", closefd=False) as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def verify_file(path: str | os.PathLike, sha256: str | None, what: str = "file") -> None:
    """Raise :class:`StoreError` unless ``path``'s SHA-256 is ``sha256`` (``None``: no check)."""
    if sha256 is None:
        return
    got = file_sha256(path)
    if got != sha256:
        raise StoreError(f"{what} {path} does not match the SHA-256 recorded when it was written (damaged or replaced: "
                         f"{got[:12]}... instead of {str(sha256)[:12]}...)")


def _tensor_error(path: Path, exc: BaseException) -> StoreError:
    return StoreError(f"tensor file {path} cannot be read (truncated, corrupted or not safetensors): {exc}")


def read_tensors(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                 sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file into memory; with ``sha256`` the file must match it. A missing,
    truncated, corrupted or non-regular file raises :class:`StoreError`."""
    from safetensors.torch import load

    path = Path(path)
    fd = _open_regular(path, "tensor file")
    try:
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read()
    finally:
        os.close(fd)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise StoreError(f"tensor file {path} does not match the SHA-256 recorded when it was written (damaged or replaced)")
    try:
        out = load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise _tensor_error(path, exc) from None
    dev = torch.device(device)
    return out if dev.type == "cpu" else {k: v.to(dev) for k, v in out.items()}


def open_safetensors(path: str | os.PathLike, *, sha256: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors of a safetensors file as zero-copy, copy-on-write memory-mapped CPU tensors.

    The header is parsed and checked by the ``safetensors`` library (``safe_open``: dtypes,
    shapes, contiguous non-overlapping offsets, file size); pages are read lazily by the OS and
    the map lives as long as a tensor refers to it. With ``sha256`` the file is hashed first
    (one streamed read). Returns ``(tensors, metadata)``; any defect raises :class:`StoreError`.
    """
    from safetensors import safe_open

    path = Path(path)
    os.close(_open_regular(path, "tensor file"))
    verify_file(path, sha256, "tensor file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            out = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise _tensor_error(path, exc) from None
    return out, dict(meta)


SEAL_KEY = "content_sha256"


def json_digest(obj: Any) -> str:
    """SHA-256 of ``obj``'s canonical JSON (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_sealed_json(path: str | os.PathLike, obj: dict[str, Any]) -> None:
    """Write ``obj`` with its own content hash (key ``content_sha256``): the check travels with
    the file, so it is as atomic as the file itself."""
    body = {k: v for k, v in obj.items() if k != SEAL_KEY}
    write_json(path, {**body, SEAL_KEY: json_digest(body)})


def check_sealed_json(obj: Any, path: str | os.PathLike, *, required: bool = False) -> Any:
    """``obj`` (as read from ``path``) after checking its ``content_sha256``, which is removed.
    An object without one raises StoreError if ``required``, else passes unchanged."""
    if isinstance(obj, dict) and SEAL_KEY in obj:
        body = {k: v for k, v in obj.items() if k != SEAL_KEY}
        if json_digest(body) != obj[SEAL_KEY]:
            raise StoreError(f"{path} does not match the content hash it was written with (damaged or edited)")
        return body
    if required:
        raise StoreError(f"{path} carries no content hash (damaged, or written by other software)")
    return obj


IDENTITY_KEY = "semlens_identity"


def _tensor_seal(tensors: dict[str, torch.Tensor] | list[tuple[str, torch.Tensor]], identity: str | None) -> str:
    h = hash_tensors(tensors)
    return h if identity is None else json_digest({"identity": identity, "tensors": h})


def write_sealed_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], *,
                         identity: str | None = None) -> str:
    """:func:`write_tensors` with the tensors' own hash in the file's metadata (see
    :func:`read_sealed_tensors`). ``identity`` (e.g. ``"relevance:class6"``) is sealed with them, so
    the file cannot stand in for another one of the same layout."""
    meta = {SEAL_KEY: _tensor_seal(tensors, identity)}
    if identity is not None:
        meta[IDENTITY_KEY] = identity
    return write_tensors(path, tensors, metadata=meta)


def read_sealed_tensors(path: str | os.PathLike, *, required: bool = False,
                        identity: str | None = None) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`write_sealed_tensors` and check the tensors (and ``identity``,
    when given) against the hash in its metadata. A mismatch raises StoreError; so does a file
    without a hash if ``required`` or if an ``identity`` is expected."""
    from safetensors import safe_open

    path = Path(path)
    out = read_tensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # pragma: no cover - read_tensors already parsed it
        raise _tensor_error(path, exc) from None
    want = meta.get(SEAL_KEY)
    if want is None:
        if required or identity is not None:
            raise StoreError(f"tensor file {path} carries no content hash (damaged, or written by other software)")
        return out
    if identity is not None and meta.get(IDENTITY_KEY) != identity:
        raise StoreError(f"tensor file {path} is sealed as {meta.get(IDENTITY_KEY)!r}, not {identity!r} "
                         "(another file put in its place)")
    if _tensor_seal(out, meta.get(IDENTITY_KEY)) != want:
        raise StoreError(f"tensor file {path} does not match the content hash it was written with (damaged or replaced)")
    return out


def hash_tensors(tensors: dict[str, torch.Tensor] | list[tuple[str, torch.Tensor]], algo: str = "sha256") -> str:
    """Stable hex digest of named tensors (names, dtypes, shapes and bytes)."""
    h = hashlib.new(algo)
    items = sorted(tensors.items()) if isinstance(tensors, dict) else list(tensors)
    for name, t in items:
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()


def json_safe(obj: Any) -> Any:
    """A JSON-safe copy: NaN/inf -> None, tuples -> lists, tensors/arrays -> lists, keys -> str."""
    import math

    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist"):
        return json_safe(obj.tolist())
    return obj


def read_consistent(read_manifest: Any, read_files: Any, attempts: int = 20) -> Any:
    """``read_files(read_manifest())``, retried while a writer replaces the files under us.

    Writers replace the manifest atomically and delete the files the old manifest named only
    afterwards; a reader that read the old manifest and finds its file gone re-reads the
    manifest: a changed one means "a writer was in between, read the new state", an unchanged
    one means the file really is missing (the error is raised).
    """
    last = None
    for _ in range(attempts):
        man = read_manifest()
        try:
            return read_files(man)
        except (MissingFileError, FileNotFoundError) as exc:
            again = read_manifest()
            if again == man:
                raise
            last = exc
    raise StoreError(f"the files changed {attempts} times while being read (a writer is busy); try again: {last}")


# ---------------------------------------------------------------------- locks

_HELD: dict[str, list[Any]] = {}   # lock file (real path) -> [fd, depth]
_HELD_GUARD = threading.Lock()


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        if info:
            return (f" (pid {info.get('pid')} on {info.get('host')}, `{info.get('command')}`, since "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.get('since', 0)))})")
    return ""


@contextlib.contextmanager
def locked(folder: str | os.PathLike, what: str | None = None, timeout: float = 0.0) -> Iterator[None]:
    """Hold the advisory write lock of ``folder`` (``<folder>/.lock``, ``fcntl.flock``).

    Re-entrant within a process. If another process holds it for longer than ``timeout``
    seconds (default: do not wait), :class:`ConcurrentWriteError` names the holder. The lock
    is released when the block ends or the process dies (the kernel drops it), so a killed
    writer never leaves a stale lock; the lock file itself stays.
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lf = folder / LOCK_NAME
    key = os.path.realpath(lf)
    with _HELD_GUARD:
        if key in _HELD:
            _HELD[key][1] += 1
            held = True
        else:
            held = False
    if held:
        try:
            yield
        finally:
            with _HELD_GUARD:
                _HELD[key][1] -= 1
        return
    try:
        fd = os.open(str(lf), os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as exc:
        raise ArgumentError(f"{what or folder}: cannot create the lock file {lf}: {exc.strerror or exc}") from None
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            if time.monotonic() >= deadline:
                who = _holder(fd)
                os.close(fd)
                raise ConcurrentWriteError(
                    f"{what or folder} is being written by another process{who}; wait until it has finished "
                    "(two writers would mix their files)") from None
            time.sleep(0.05)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:200], "since": time.time()}
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    with _HELD_GUARD:
        _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        with _HELD_GUARD:
            _HELD[key][1] -= 1
            last = _HELD[key][1] == 0
            if last:
                del _HELD[key]
        if last:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
