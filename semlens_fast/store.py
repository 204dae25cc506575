"""Durable storage of per-layer top-k states: :class:`TopKStore`.

A store is a folder::

    <path>/manifest.json          what the store holds and where it comes from (JSON)
    <path>/topk-<seq>.safetensors the tensors: "<layer>/values|ids|positions|nan_counts"
    <path>/order.safetensors      (collect runs only) the batches in the order they are run

The manifest records the fingerprints of the run that produced the store (model weights,
dataset, layers, pools, k, library version, ...), whether the run is ``complete``, and,
for an interrupted run, the progress (how many of the recorded batches are done).

Writes are crash safe: a checkpoint first writes a *new* tensor file (temporary name,
fsync, ``os.replace``), then atomically replaces the manifest that points to it, and only
then deletes the previous tensor file. Whatever moment the process dies at, the manifest
names a complete tensor file whose SHA-256 it records, and a reader that meets a checkpoint
half-way re-reads the manifest (it sees the old or the new state, never neither). Writers hold
the folder's advisory lock (:func:`semlens_fast._io.locked`): a second writer is refused with
:class:`~semlens_fast.errors.ConcurrentWriteError`, never mixed in.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from . import __version__
from ._io import MissingFileError, clean_temp, ensure_dir, file_sha256, locked, read_consistent, read_json, read_tensors, write_json, write_tensors
from .errors import ArgumentError, StoreError
from .ops import TopKState

FORMAT = "semlens_fast.topk_store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ORDER_FILE = "order.safetensors"
_FIELDS = ("values", "ids", "positions", "nan_counts")


def _file_sha256(path: Path) -> str:
    return file_sha256(path)


@dataclass
class TopKStore:
    """Per-layer top-k of a collect run.

    Attributes:
        layers: layer name -> :class:`~semlens_fast.ops.TopKState` (``values [C, k]`` f32,
            ``ids [C, k]`` i64 dataset indices, ``positions [C, k]`` i32 flattened
            ``h * W + w`` or token index of the maximum (``-1`` where not tracked),
            ``nan_counts [C]`` i64 non-finite pooled activations met and excluded).
        meta: JSON-able description: ``k``, ``pools``, ``fingerprints``, ``complete``,
            ``progress``, per-layer ``shapes`` (activation shape of one sample), ...
        path: the folder the store lives in, if it was saved or loaded.
    """

    layers: dict[str, TopKState]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    # ------------------------------------------------------------------ access
    def __getitem__(self, layer: str) -> TopKState:
        try:
            return self.layers[layer]
        except KeyError:
            raise ArgumentError(f"layer {layer!r} is not in this store; it holds {sorted(self.layers)}") from None

    def __contains__(self, layer: object) -> bool:
        return layer in self.layers

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def keys(self):
        return self.layers.keys()

    def items(self):
        return self.layers.items()

    @property
    def k(self) -> int:
        return int(self.meta.get("k", next(iter(self.layers.values())).k if self.layers else 0))

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete", True))

    @property
    def pools(self) -> dict[str, str]:
        return dict(self.meta.get("pools", {}))

    @property
    def fingerprints(self) -> dict[str, Any]:
        return dict(self.meta.get("fingerprints", {}))

    def equal(self, other: "TopKStore") -> bool:
        """Exact equality of every layer's state (values compared bitwise)."""
        return list(self.layers) == list(other.layers) and all(
            self.layers[n].equal(other.layers[n]) for n in self.layers
        )

    def to(self, device: torch.device | str) -> "TopKStore":
        return TopKStore({n: s.to(device) for n, s in self.layers.items()}, dict(self.meta), self.path)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: C={s.channels}" for n, s in self.layers.items())
        return f"TopKStore(k={self.k}, complete={self.complete}, layers={{{parts}}}, path={self.path})"

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the store to folder ``path`` (crash safe; replaces a previous store there).

        A regular file or an unwritable place raises :class:`ArgumentError`; another process
        writing the same folder raises :class:`~semlens_fast.errors.ConcurrentWriteError`.
        """
        path = ensure_dir(path, "store")
        _write_store(path, self.layers, self.meta)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "TopKStore":
        """Read a store written by :meth:`save` or by ``collect(..., store=path)``.

        Raises :class:`StoreError` when the folder, the manifest or the tensor file is
        missing, truncated, corrupted (SHA-256 mismatch) or of an unknown format.
        """
        path = Path(path)
        manifest, layers = read_consistent(lambda: read_manifest(path),
                                           lambda man: (man, _read_states(path, man, device)))
        return cls(layers, manifest.get("meta", {}), path)


# ---------------------------------------------------------------------- low level


def read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise StoreError(f"store folder {path} does not exist")
    manifest = read_json(path / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{path / MANIFEST} is not a semlens_fast top-k store manifest (format {FORMAT!r} expected)")
    if int(manifest.get("format_version", -1)) > FORMAT_VERSION:
        raise StoreError(
            f"store {path} has format_version {manifest.get('format_version')}, this library "
            f"({__version__}) reads up to {FORMAT_VERSION}; upgrade semlens_fast"
        )
    return manifest


def _read_states(path: Path, manifest: Mapping[str, Any], device: torch.device | str) -> dict[str, TopKState]:
    fname = manifest.get("tensors")
    if not fname:
        return {}
    fpath = path / str(fname)
    if Path(str(fname)).name != fname:
        raise StoreError(f"store {path}: the manifest names tensor file {fname!r} outside the store folder")
    if not fpath.exists():
        raise MissingFileError(f"store {path}: the manifest names tensor file {fname} which is missing")
    want = manifest.get("tensors_sha256")
    try:
        tensors = read_tensors(fpath, device=device, sha256=want or None)
    except StoreError as exc:
        if "SHA-256" in str(exc):
            raise StoreError(f"store {path}: tensor file {fname} does not match the SHA-256 in the manifest (corrupted)") from None
        raise
    layers: dict[str, TopKState] = {}
    for name in manifest.get("layers", []):
        try:
            parts = [tensors[f"{name}/{f}"] for f in _FIELDS]
        except KeyError as exc:
            raise StoreError(f"store {path}: tensor {exc.args[0]!r} is missing from {fname}") from None
        layers[name] = TopKState(*[p.contiguous() for p in parts])
    return layers


def _write_store(
    path: Path, layers: Mapping[str, TopKState], meta: Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> None:
    """Write a new tensor file, then the manifest naming it, then drop older tensor files
    (holding the folder's lock)."""
    path.mkdir(parents=True, exist_ok=True)
    with locked(path, f"top-k store {path}"):
        _write_store_locked(path, layers, meta, extra)


def _write_store_locked(
    path: Path, layers: Mapping[str, TopKState], meta: Mapping[str, Any], extra: Mapping[str, Any] | None
) -> None:
    seq = 0
    old = None
    with contextlib.suppress(StoreError, OSError):
        if (path / MANIFEST).exists():
            prev = read_json(path / MANIFEST)
            seq = int(prev.get("seq", 0)) + 1
            old = prev.get("tensors")
    fname = f"topk-{seq:08d}.safetensors"
    tensors: dict[str, torch.Tensor] = {}
    for name, st in layers.items():
        for f in _FIELDS:
            tensors[f"{name}/{f}"] = getattr(st, f)
    sha = write_tensors(path / fname, tensors, metadata={"format": FORMAT})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "seq": seq,
        "tensors": fname,
        "tensors_sha256": sha,
        "layers": list(layers),
        "meta": dict(meta),
    }
    if extra:
        manifest.update(extra)
    write_json(path / MANIFEST, manifest)
    # Remove every other tensor file (the previous checkpoint and leftovers of a crash).
    for p in path.glob("topk-*.safetensors"):
        if p.name != fname:
            with contextlib.suppress(OSError):
                p.unlink()
    clean_temp(path)
    del old


def write_order(path: Path, batches: list[torch.Tensor]) -> str:
    """Record the batch order of a run (flattened ids + offsets); returns its SHA-256."""
    flat = torch.cat(batches) if batches else torch.zeros(0, dtype=torch.int64)
    offsets = torch.tensor([0] + [len(b) for b in batches], dtype=torch.int64).cumsum(0)
    return write_tensors(path / ORDER_FILE, {"ids": flat.to(torch.int64), "offsets": offsets})


def read_order(path: Path, sha256: str | None) -> list[torch.Tensor]:
    fpath = path / ORDER_FILE
    try:
        t = read_tensors(fpath, sha256=sha256 or None)
    except StoreError as exc:
        if "SHA-256" in str(exc):
            raise StoreError(f"store {path}: {ORDER_FILE} does not match the SHA-256 in the manifest (corrupted)") from None
        raise
    flat, offsets = t["ids"], t["offsets"].tolist()
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def remove_store(path: Path) -> None:
    """Delete the files of a store (only files this module writes, then the folder if empty)."""
    if not path.exists():
        return
    for p in list(path.glob("topk-*.safetensors")) + [path / MANIFEST, path / ORDER_FILE]:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    shards = path / "_shards"
    if shards.is_dir():
        shutil.rmtree(shards, ignore_errors=True)
    clean_temp(path)
    with contextlib.suppress(OSError):
        path.rmdir()
