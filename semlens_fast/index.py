"""EmbeddingIndex: unit-normalised vectors, exact cosine top-k search, durable storage.

Rows are stored unit-normalised (float64 normalisation, then one rounding to the
storage dtype: float32, float16 or bfloat16); zero vectors are kept as zeros
(similarity 0 with everything). Each row maps back to ``(layer, neuron)``.

Search is :func:`semlens_fast.ops.cosine_topk` over the storage, chunk by chunk,
merging the chunks' exact top-k lists; so an index memory-mapped from disk can be
larger than RAM: only the chunk being scanned (and rescored) has to be resident, and
its pages are clean and can be dropped by the OS afterwards. By default a chunk holds
a quarter of the memory available when the search starts (``MemAvailable``, and the
cgroup memory limit when there is one), between 64 MiB and 4 GiB; ``chunk_rows`` fixes
the number of rows instead.
Scores are the exact cosines of the *stored* vectors (see
:mod:`semlens_fast.ops.similarity`); with float16/bfloat16 storage, the recall@k of
the stored index against float32 exact search is >= 0.99 on random unit vectors and
real text embeddings (tested).

On disk (a folder)::

    manifest.json                      format, version, dim, dtype, rows, layers, file
                                       names, SHA-256 of both files, library version
    vectors-<sha16>.safetensors        one tensor "vectors" [rows, dim] (storage dtype)
    rows-<sha16>.safetensors           "layer" int32 [rows] (index into layers, -1 none),
                                       "neuron" int64 [rows]

Every file is written to a unique temporary name, fsynced and renamed; data files carry
their content hash in the name and the manifest is replaced last, so a crash leaves
either the old or the new index, never a mixture (temporary files of an interrupted save
are removed by the next one). A save holds the folder's advisory lock: a second process
saving to the same folder at the same time gets
:class:`~semlens_fast.errors.ConcurrentWriteError` instead of mixing its files in.
:meth:`EmbeddingIndex.load` checks format, version, dtype, shape, file sizes and (by
default) the SHA-256 of both files, and raises :class:`~semlens_fast.errors.StoreError`
on any mismatch; it never writes, and a load that meets a save half-way reads the old or
the new index.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ._io import (
    MissingFileError, _fsync_dir, clean_temp, ensure_dir, file_mode, hash_tensors, locked, read_consistent, read_json,
    read_tensors, write_json, write_tensors,
)
from ._version import __version__
from .errors import ArgumentError, DTypeError, ShapeError, StoreError
from .ops.reference.similarity import select
from .ops._validate import available_memory, check_result_size, check_tensor_device
from .ops.similarity import _check_exclude, cosine_topk, raise_nonfinite

FORMAT = "semlens_fast.EmbeddingIndex"
VERSION = 1
STORAGE_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def normalise(vectors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Unit-normalise rows in float64 and round once to ``dtype`` (zero rows stay zero)."""
    x64 = vectors.double()
    n = x64.norm(dim=1, keepdim=True)
    x64 = torch.where(n > 0, x64 / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(x64))
    return x64.to(dtype).contiguous()


class EmbeddingIndex:
    """Exact cosine search over unit-normalised vectors (see the module docstring).

    Args:
        dim: vector dimension.
        dtype: storage dtype (``torch.float32`` default, ``torch.float16``, ``torch.bfloat16``).
        chunk_rows: rows scanned per search step (bounds resident memory of mapped indexes);
            ``None`` (default): sized from the available memory (see the module docstring).
    """

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32, *, chunk_rows: int | None = None):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ArgumentError(f"dim must be an int >= 1, got {dim!r}")
        if dtype not in STORAGE_DTYPES:
            raise DTypeError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
        if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
            raise ArgumentError(f"chunk_rows must be an int >= 1 or None (sized from the available memory), got {chunk_rows!r}")
        self.dim = dim
        self.dtype = dtype
        self.chunk_rows = chunk_rows
        self._parts: list[torch.Tensor] = []  # [n, dim] storage-dtype blocks (first may be memory-mapped)
        self._layer: list[torch.Tensor] = []  # int32 per part
        self._neuron: list[torch.Tensor] = []  # int64 per part
        self.layers: list[str] = []
        self.path: Path | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_tensors(
        cls, vectors: torch.Tensor, dtype: torch.dtype = torch.float32, *, layer: str | None = None,
        neurons: torch.Tensor | Sequence[int] | None = None, chunk_rows: int | None = None,
    ) -> "EmbeddingIndex":
        """An index over the rows of ``vectors [N, d]`` (copied, normalised)."""
        vectors = _as_matrix(vectors, "vectors")
        index = cls(vectors.shape[1], dtype, chunk_rows=chunk_rows)
        index.add(vectors, layer=layer, neurons=neurons)
        return index

    @classmethod
    def from_layers(cls, layers: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32, **kw) -> "EmbeddingIndex":
        """An index over per-layer neuron embeddings ``{layer: [C, d]}``; row -> (layer, channel)."""
        if not layers:
            raise ArgumentError("layers must be a non-empty dict {layer name: [C, d] tensor}")
        first = _as_matrix(next(iter(layers.values())), "layers[...]")
        index = cls(first.shape[1], dtype, **kw)
        for name, vec in layers.items():
            index.add(vec, layer=name)
        return index

    def add(self, vectors: torch.Tensor, *, layer: str | None = None,
            neurons: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Append rows (normalised, stored in the index dtype); returns their row ids.

        ``layer`` names the layer of all these rows and ``neurons`` their channel
        indices (default ``0 .. n-1``); without ``layer`` the rows map to ``(None, neuron)``.
        NaN/inf rows raise :class:`ArgumentError` naming them; nothing is added then.
        """
        vectors = _as_matrix(vectors, "vectors")
        if vectors.shape[1] != self.dim:
            raise ShapeError(f"vectors have dimension {vectors.shape[1]} (shape {tuple(vectors.shape)}), the index has {self.dim}")
        raise_nonfinite(vectors, "vectors")
        n = vectors.shape[0]
        if neurons is None:
            neurons_t = torch.arange(n, dtype=torch.int64)
        else:
            try:
                neurons_t = torch.as_tensor(neurons)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise DTypeError(f"neurons must be a sequence of ints, got {type(neurons).__name__}") from exc
            if neurons_t.is_floating_point() or neurons_t.is_complex() or neurons_t.dtype == torch.bool:
                raise DTypeError(f"neurons must be integers, got dtype {neurons_t.dtype}")
            neurons_t = neurons_t.to(torch.int64).flatten()
            if neurons_t.numel() != n:
                raise ShapeError(f"neurons must have one entry per row ({n}), got {neurons_t.numel()}")
            if n and int(neurons_t.min()) < 0:
                raise ArgumentError(f"neurons must be >= 0 (component indices), got {int(neurons_t.min())}")
        if layer is None:
            lid = -1
        else:
            if not isinstance(layer, str):
                raise ArgumentError(f"layer must be a str, got {type(layer).__name__}")
            if layer not in self.layers:
                self.layers.append(layer)
            lid = self.layers.index(layer)
        start = len(self)
        if n:
            self._parts.append(normalise(vectors.cpu(), self.dtype))
            self._layer.append(torch.full((n,), lid, dtype=torch.int32))
            self._neuron.append(neurons_t.cpu())
        return torch.arange(start, start + n, dtype=torch.int64)

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return sum(p.shape[0] for p in self._parts)

    @property
    def vectors(self) -> torch.Tensor:
        """All stored rows ``[N, d]`` (a view when there is one part, else a copy)."""
        if not self._parts:
            return torch.empty((0, self.dim), dtype=self.dtype)
        return self._parts[0] if len(self._parts) == 1 else torch.cat(self._parts)

    def search_chunk_rows(self) -> int:
        """Rows per search step: ``chunk_rows``, or (None) a quarter of the memory available
        now (:func:`available_memory`), between ``CHUNK_MIN_BYTES`` and ``CHUNK_MAX_BYTES``."""
        if self.chunk_rows is not None:
            return self.chunk_rows
        budget = min(CHUNK_MAX_BYTES, max(CHUNK_MIN_BYTES, available_memory() // 4))
        return max(1, budget // (self.dim * _itemsize(self.dtype)))

    def _chunks(self, rows: int | None = None) -> Iterable[tuple[int, torch.Tensor]]:
        rows = rows if rows is not None else (self.chunk_rows or 1 << 20)
        offset = 0
        for part in self._parts:
            for r0 in range(0, part.shape[0], rows):
                yield offset + r0, part[r0 : r0 + rows]
            offset += part.shape[0]

    def search(self, queries: torch.Tensor, k: int, *, exclude: torch.Tensor | None = None):
        """Exact cosine top-k of ``queries [Q, d]``: ``(scores [Q, k] float32, ids [Q, k] int64)``.

        Same semantics as :func:`semlens_fast.ops.cosine_topk` on the stored vectors
        (ties: lower row id; ``-1``/``-inf`` padding; ``exclude`` row ids per query).
        float64 queries are rounded to float32 first (the scores are defined on float32
        values).
        """
        queries = _as_matrix(queries, "queries")
        check_tensor_device(queries, "queries", meta=False)  # results come from stored data
        if queries.dtype == torch.float64:
            queries = queries.float()
        if queries.shape[1] != self.dim:
            raise ShapeError(f"queries have dimension {queries.shape[1]} (shape {tuple(queries.shape)}), the index has {self.dim}")
        Q = queries.shape[0]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ArgumentError(f"k must be an int >= 1, got {k!r}")
        exclude = _check_exclude(exclude, Q, len(self), queries.device)
        check_result_size(Q, k, 24, "a search result")  # k far beyond the rows: an error, not an allocator failure
        best_s = torch.full((Q, k), float("-inf"))
        best_i = torch.full((Q, k), -1, dtype=torch.int64)
        if Q == 0:
            cosine_topk(queries, torch.empty((0, self.dim)), k, exclude=exclude)  # validates the arguments
            return best_s, best_i
        for offset, chunk in self._chunks(self.search_chunk_rows()):
            ex = None
            if exclude is not None:
                local = exclude - offset
                ex = torch.where((exclude >= 0) & (local >= 0) & (local < chunk.shape[0]), local, torch.full_like(local, -1))
            try:
                s, i = cosine_topk(queries, chunk, k, exclude=ex)
            except ArgumentError as exc:
                raise type(exc)(f"{exc} (index rows {offset}..{offset + chunk.shape[0] - 1}, row numbers relative to that chunk)") from None
            i = torch.where(i >= 0, i + offset, i)
            best_s, best_i = select(torch.cat([best_s, s], 1), torch.cat([best_i, i], 1), k)
        if not self._parts:
            cosine_topk(queries, torch.empty((0, self.dim)), k, exclude=exclude)  # validates the arguments
        return best_s, best_i

    def lookup(self, ids: torch.Tensor | Sequence[int]) -> list:
        """``(layer, neuron)`` of each row id (``None`` for id -1); nested like ``ids``."""
        t = torch.as_tensor(ids, dtype=torch.int64)
        layer_idx, neuron = self.row_table()
        n = len(self)
        flat = t.flatten()
        if flat.numel() and (int(flat.max()) >= n or int(flat.min()) < -1):
            raise ArgumentError(f"row ids must be in [-1, {n - 1}], got range [{int(flat.min())}, {int(flat.max())}]")
        out = []
        for r in flat.tolist():
            if r < 0:
                out.append(None)
            else:
                li = int(layer_idx[r])
                out.append((self.layers[li] if li >= 0 else None, int(neuron[r])))
        if t.dim() == 2:
            w = t.shape[1]
            return [out[j * w : (j + 1) * w] for j in range(t.shape[0])]
        return out

    def row_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(layer index int32 [N], neuron int64 [N])`` of every row (layer names: ``self.layers``)."""
        if not self._parts:
            return torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.int64)
        return torch.cat(self._layer), torch.cat(self._neuron)

    # ------------------------------------------------------------------ storage
    def save(self, path: str | os.PathLike) -> None:
        """Write the index to folder ``path`` atomically (see the module docstring).

        A regular file or an unwritable place raises :class:`ArgumentError`; another process
        saving to ``path`` at the same time raises :class:`ConcurrentWriteError`.
        """
        path = ensure_dir(path, "index path")
        with locked(path, f"EmbeddingIndex {path}"):
            self._save_locked(path)
        self.path = path

    def _save_locked(self, path: Path) -> None:
        manifest_path = path / "manifest.json"
        if manifest_path.exists():
            try:
                old = read_json(manifest_path)
            except StoreError:
                old = None
            if not isinstance(old, dict) or old.get("format") != FORMAT:
                raise StoreError(f"{path} holds a manifest that is not an EmbeddingIndex; refusing to overwrite it")
        clean_temp(path)  # leftovers of an interrupted save (no other writer: we hold the lock)
        n = len(self)
        nbytes = n * self.dim * _itemsize(self.dtype)
        header = {"vectors": {"dtype": STORAGE_DTYPES[self.dtype], "shape": [n, self.dim], "data_offsets": [0, nbytes]},
                  "__metadata__": {"format": FORMAT, "version": str(VERSION)}}
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * ((8 - len(hb) % 8) % 8)
        h = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(prefix=".vectors.", suffix=".partial", dir=str(path))
        try:
            os.fchmod(fd, file_mode())
            with os.fdopen(fd, "wb") as fh:
                fh.write(struct.pack("<Q", len(hb)))
                fh.write(hb)
                for _, chunk in self._chunks():
                    arr = _np_view(chunk)
                    h.update(memoryview(arr).cast("B"))
                    fh.write(memoryview(arr).cast("B"))
                fh.flush()
                os.fsync(fh.fileno())
            digest = h.hexdigest()
            vec_name = f"vectors-{digest[:16]}.safetensors"
            os.replace(tmp, path / vec_name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(path)
        layer_idx, neuron = self.row_table()
        rows = {"layer": layer_idx, "neuron": neuron}
        rows_digest = hash_tensors(rows)
        rows_name = f"rows-{rows_digest[:16]}.safetensors"
        rows_file_sha = write_tensors(path / rows_name, rows)
        write_json(manifest_path, {
            "format": FORMAT, "version": VERSION, "library_version": __version__,
            "dim": self.dim, "dtype": _dtype_name(self.dtype), "rows": n, "layers": list(self.layers),
            "vectors_file": vec_name, "vectors_sha256": digest, "vectors_header_bytes": 8 + len(hb),
            "rows_file": rows_name, "rows_sha256": rows_digest, "rows_file_sha256": rows_file_sha,
        })
        for f in path.iterdir():  # drop files of earlier saves
            if (f.name.startswith("vectors-") or f.name.startswith("rows-")) and f.name not in (vec_name, rows_name):
                try:
                    f.unlink()
                except OSError:
                    pass

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = True, verify: bool = True,
             chunk_rows: int | None = None) -> "EmbeddingIndex":
        """Open an index saved by :meth:`save`.

        ``mmap=True`` maps the vectors (pages are read when searched; indexes larger than
        RAM work); ``verify=True`` (default) checks the SHA-256 of the vectors first (one
        streamed read that keeps nothing resident; ``verify=False`` skips it). Missing,
        truncated, damaged or foreign files and other versions raise StoreError.
        """
        path = Path(path)
        return read_consistent(lambda: read_json(path / "manifest.json"),
                               lambda man: cls._load(path, man, mmap, verify, chunk_rows))

    @classmethod
    def _load(cls, path: Path, man: object, mmap: bool, verify: bool, chunk_rows: int | None) -> "EmbeddingIndex":
        if not isinstance(man, dict) or man.get("format") != FORMAT:
            raise StoreError(f"{path} is not an EmbeddingIndex (manifest format {man.get('format') if isinstance(man, dict) else None!r})")
        if man.get("version") != VERSION:
            raise StoreError(f"{path} is an EmbeddingIndex of format version {man.get('version')!r}; this library reads version {VERSION}")
        try:
            dim, n, dtype = int(man["dim"]), int(man["rows"]), _NAMES[man["dtype"]]
            vec_file, rows_file, layers = path / _plain(man["vectors_file"]), path / _plain(man["rows_file"]), list(man["layers"])
            if dim < 1 or n < 0:
                raise ValueError(f"dim {dim}, rows {n}")
        except (KeyError, ValueError, TypeError) as exc:
            raise StoreError(f"manifest {path / 'manifest.json'} is incomplete or invalid: {exc!r}") from exc
        if not vec_file.is_file():
            raise MissingFileError(f"missing vectors file {vec_file}")
        try:
            fh = open(vec_file, "rb")  # one open: a save that deletes the file meanwhile cannot hurt
        except FileNotFoundError:
            raise MissingFileError(f"missing vectors file {vec_file}") from None
        with fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                raise StoreError(f"vectors file {vec_file} is truncated ({size} bytes)")
            hlen = struct.unpack("<Q", head)[0]
            if hlen > min(size, 1 << 20):
                raise StoreError(f"vectors file {vec_file} has a corrupted header (length {hlen}, file {size} bytes)")
            try:
                header = json.loads(fh.read(hlen))
                info = header["vectors"]
                if not isinstance(info, dict):
                    raise ValueError("'vectors' is not an object")
            except (ValueError, KeyError, TypeError) as exc:
                raise StoreError(f"vectors file {vec_file} has a corrupted header: {exc!r}") from exc
            nbytes = n * dim * _itemsize(dtype)
            if info.get("dtype") != STORAGE_DTYPES[dtype] or info.get("shape") != [n, dim] or info.get("data_offsets") != [0, nbytes]:
                raise StoreError(f"vectors file {vec_file} holds {info}, the manifest says {man['dtype']} [{n}, {dim}]")
            if size != 8 + hlen + nbytes:
                raise StoreError(f"vectors file {vec_file} has {size} bytes, expected {8 + hlen + nbytes} (truncated or corrupted)")
            if verify:
                h = hashlib.sha256()
                fh.seek(8 + hlen)
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
                if h.hexdigest() != man.get("vectors_sha256"):
                    raise StoreError(f"vectors file {vec_file} does not match its checksum (damaged or replaced)")
            rows = read_tensors(rows_file, sha256=man.get("rows_file_sha256"))
            layer_idx, neuron = rows.get("layer"), rows.get("neuron")
            if layer_idx is None or neuron is None or layer_idx.shape != (n,) or neuron.shape != (n,):
                raise StoreError(f"row table {rows_file} does not hold {n} rows")
            if man.get("rows_sha256") and hash_tensors({"layer": layer_idx, "neuron": neuron}) != man["rows_sha256"]:
                raise StoreError(f"row table {rows_file} does not match its checksum (damaged or replaced)")
            if n and (int(layer_idx.min()) < -1 or int(layer_idx.max()) >= len(layers) or int(neuron.min()) < 0):
                raise StoreError(f"row table {rows_file} refers to layers or neurons that do not exist (damaged)")
            index = cls(dim, dtype, chunk_rows=chunk_rows)
            index.layers = layers
            if n:
                if mmap:
                    arr = np.memmap(fh, dtype=_NP[dtype], mode="c", offset=8 + hlen, shape=(n, dim))
                else:
                    fh.seek(8 + hlen)
                    arr = np.fromfile(fh, dtype=_NP[dtype], count=n * dim).reshape(n, dim)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t = torch.from_numpy(arr)
                if dtype == torch.bfloat16:
                    t = t.view(torch.bfloat16)
                index._parts.append(t)
                index._layer.append(layer_idx.to(torch.int32))
                index._neuron.append(neuron.to(torch.int64))
        index.path = path
        return index

    def __repr__(self) -> str:
        return f"EmbeddingIndex(rows={len(self)}, dim={self.dim}, dtype={_dtype_name(self.dtype)}, layers={len(self.layers)})"


CHUNK_MIN_BYTES = 64 << 20
CHUNK_MAX_BYTES = 4 << 30


def _plain(name: object) -> str:
    """A file name from a manifest: a plain name inside the index folder, nothing else."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"file name {name!r} is not a plain file name inside the index folder")
    return name


def _itemsize(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()


def _np_view(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy()


def _as_matrix(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception as exc:
            raise DTypeError(f"{name} must be a 2-D float tensor, got {type(x).__name__}") from exc
    if x.dtype not in STORAGE_DTYPES and x.dtype != torch.float64:
        raise DTypeError(f"{name} must be a float tensor (float32/float16/bfloat16/float64), got {x.dtype}")
    if x.dim() != 2:
        raise ShapeError(f"{name} must be a 2-D tensor [rows, d], got shape {tuple(x.shape)}")
    return x
