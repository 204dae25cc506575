"""The ConceptDB: every component of a model as foundation-model embeddings of its examples.

For each layer the DB holds

* ``embeddings [C, d]``: the component embedding, the mean of the unit-normalised example
  embeddings, re-normalised (``weighting="activation"``: weighted by the examples' top-k
  values, clamped at 0); storage dtype ``dtype`` (float32 default, float16/bfloat16 allowed);
* ``examples [C, k, d]`` (optional, ``keep_examples``; float16 by default): the per-example
  unit embeddings, zero in empty slots;
* ``ids [C, k]``, ``boxes [C, k, 4]``, ``values [C, k]``, ``valid [C, k]``: which sample and
  which crop each example is (see :mod:`semlens_fast.examples`);
* ``n_valid [C]`` / ``complete [C]``: components with fewer than ``k`` valid examples are
  *marked* (``complete`` false), never filled with another sample's embedding; a component
  with no example has a zero embedding (similarity 0 with everything).

**Only the unique (sample, crop) pairs** that the requested layers need are embedded, never
the whole dataset, and each embedding is cached in an :class:`EmbeddingCache` keyed by
(foundation fingerprint, sample id, crop box): changing ``k``, the layers, the crop mode
(crops differ, full images are shared) or adding a layer re-embeds only what is new.

Files: a DB folder holds ``manifest.json`` (fingerprints of the TopKStore and of the
foundation model, parameters, the SHA-256 of the tensor file) and one safetensors file,
written crash-safely (new tensor file, then the manifest naming it) under the folder's write
lock. :meth:`ConceptDB.load` verifies the SHA-256 (one streamed read), lets the
``safetensors`` library check the header, and memory-maps the tensors; a damaged file raises
:class:`~semlens_fast.errors.StoreError`. Cache shards carry their SHA-256 in the cache
manifest too; a damaged shard is dropped (with a warning) and its embeddings recomputed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from . import __version__
from ._io import (
    MissingFileError, check_writable, clean_temp, ensure_dir, hash_tensors, locked, open_safetensors, read_consistent, read_json,
    write_json, write_tensors,
)
from .errors import ArgumentError, DTypeError, ShapeError, StoreError
from .examples import ConceptExamples, ImageSource, concept_examples, crop, token_windows, window_texts

log = logging.getLogger("semlens_fast")

FORMAT = "semlens_fast.concept_db"
FORMAT_VERSION = 1
CACHE_FORMAT = "semlens_fast.embedding_cache"
MANIFEST = "manifest.json"
_FIELDS = ("embeddings", "ids", "boxes", "values", "valid")

__all__ = ["ConceptDB", "LayerConcepts", "EmbeddingCache", "build_concept_db", "store_fingerprint",
           "aggregate"]


# ---------------------------------------------------------------------- safetensors, memory-mapped


def mmap_safetensors(path: str | os.PathLike, sha256: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors of a safetensors file as zero-copy views of a (copy-on-write) memory map.

    The header is parsed and validated by the ``safetensors`` library (``safe_open``);
    pages are read lazily by the OS and the map stays alive as long as a tensor refers to it.
    With ``sha256`` the file must match it. Returns ``(tensors, metadata)``. A missing,
    truncated or malformed file raises :class:`StoreError`.
    """
    return open_safetensors(path, sha256=sha256)


# ---------------------------------------------------------------------- the embedding cache


class EmbeddingCache:
    """Persistent cache of foundation-model embeddings keyed by (fingerprint, sample id, crop box).

    Folder layout: ``<root>/<kind>-<fingerprint[:32]>/manifest.json`` + shards
    ``emb-<seq>.safetensors`` (``keys [n, 5]`` int64 ``id, y0, x0, y1, x1``; ``emb [n, d]``).
    A shard is written atomically before the manifest that lists it (with its SHA-256), so an
    interrupted run keeps every shard it finished; writers take the folder's lock and merge
    with shards another process listed meanwhile. A shard that fails its checksum (or cannot
    be read) is skipped with a warning, so its embeddings are computed again, never served
    damaged. ``kind`` separates images from text windows.
    """

    def __init__(self, root: str | os.PathLike, fingerprint: str, dim: int, kind: str = "image",
                 dtype: torch.dtype = torch.float32):
        if not isinstance(fingerprint, str) or len(fingerprint) < 16:
            raise ArgumentError(f"fingerprint must be a hex digest string, got {fingerprint!r}")
        if dtype not in (torch.float32, torch.float16):
            raise DTypeError(f"dtype of the embedding cache must be float32 or float16, got {dtype}")
        self.root = Path(root)
        self.fingerprint, self.dim, self.kind, self.dtype = fingerprint, int(dim), kind, dtype
        self.path = self.root / f"{kind}-{fingerprint[:32]}"
        self._keys: dict[tuple[int, ...], int] = {}
        self._emb: list[torch.Tensor] = []
        self._count = 0
        self._shards: list[dict[str, Any]] = []
        self._load()

    def _load(self) -> None:
        mpath = self.path / MANIFEST
        if not mpath.exists():
            return
        man = read_json(mpath)
        if man.get("format") != CACHE_FORMAT or man.get("fingerprint") != self.fingerprint:
            raise StoreError(f"{mpath} is not an embedding cache of the foundation model {self.fingerprint[:12]}...")
        if int(man.get("dim", -1)) != self.dim:
            raise ShapeError(f"embedding cache {self.path} holds {man.get('dim')}-d embeddings; the foundation model has dim {self.dim}")
        for sh in man.get("shards", []):
            if self._load_shard(sh):
                self._shards.append(sh)

    def _load_shard(self, sh: Any) -> bool:
        try:
            if not isinstance(sh, dict) or not isinstance(sh.get("file"), str) or Path(sh["file"]).name != sh["file"]:
                raise StoreError(f"bad shard entry {str(sh)[:80]}")
            t, _ = mmap_safetensors(self.path / sh["file"], sha256=sh.get("sha256"))
            keys, emb = t["keys"], t["emb"]
            if keys.dtype != torch.int64 or keys.dim() != 2 or keys.shape[1] != 5 or emb.shape != (len(keys), self.dim):
                raise StoreError(f"keys {tuple(keys.shape)} / emb {tuple(emb.shape)} do not fit a {self.dim}-d cache")
            if not emb.is_floating_point() or not bool(torch.isfinite(emb).all()):
                raise StoreError("non-finite or non-float embeddings")
        except (StoreError, KeyError) as exc:
            log.warning("embedding cache %s: skipping damaged shard %s, its embeddings will be recomputed (%s)",
                        self.path, sh.get("file") if isinstance(sh, dict) else sh, exc)
            return False
        self._add_mem(keys, emb)
        return True

    def _write_manifest(self) -> None:
        write_json(self.path / MANIFEST, {
            "format": CACHE_FORMAT, "fingerprint": self.fingerprint, "dim": self.dim, "kind": self.kind,
            "dtype": str(self.dtype).replace("torch.", ""), "shards": self._shards, "library_version": __version__,
        })

    def _merge_from_disk(self) -> None:
        """Take in shards another process listed since we read the manifest (holding the lock)."""
        mpath = self.path / MANIFEST
        if not mpath.exists():
            return
        try:
            man = read_json(mpath)
        except StoreError:
            return
        self._shards = [s for s in self._shards if (self.path / s["file"]).exists()]  # compacted away elsewhere
        mine = {s["file"] for s in self._shards}
        for sh in man.get("shards", []) if isinstance(man, dict) else []:
            if isinstance(sh, dict) and sh.get("file") not in mine and self._load_shard(sh):
                self._shards.append(sh)

    def _add_mem(self, keys: torch.Tensor, emb: torch.Tensor) -> None:
        base = self._count
        for j, key in enumerate(map(tuple, keys.tolist())):
            self._keys[key] = base + j
        self._emb.append(emb)
        self._count += len(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def _all(self) -> torch.Tensor:
        if len(self._emb) > 1:
            self._emb = [torch.cat([e.to(self.dtype) for e in self._emb])]
        return self._emb[0] if self._emb else torch.zeros(0, self.dim, dtype=self.dtype)

    def lookup(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(found [U] bool, emb [U, d] float32)`` for ``keys [U, 5]`` (zeros where not found)."""
        rows = torch.tensor([self._keys.get(k, -1) for k in map(tuple, keys.tolist())], dtype=torch.int64)
        found = rows >= 0
        emb = torch.zeros(len(keys), self.dim, dtype=torch.float32)
        if found.any():
            emb[found] = self._all()[rows[found]].float()
        return found, emb

    def add(self, keys: torch.Tensor, emb: torch.Tensor) -> None:
        """Persist ``emb [n, d]`` for ``keys [n, 5]`` (a new shard, then the manifest)."""
        if len(keys) == 0:
            return
        if emb.shape != (len(keys), self.dim):
            raise ShapeError(f"emb must be [{len(keys)}, {self.dim}], got {tuple(emb.shape)}")
        keys = keys.to(torch.int64).contiguous()
        emb = emb.to(self.dtype).contiguous()
        with locked(self.path, f"embedding cache {self.path}", timeout=60.0):
            self._merge_from_disk()
            used = {s["file"] for s in self._shards} | {p.name for p in self.path.glob("emb-*.safetensors")}
            seq = max([_shard_seq(f) for f in used], default=-1) + 1
            fname = f"emb-{seq:08d}.safetensors"
            sha = write_tensors(self.path / fname, {"keys": keys, "emb": emb})
            self._shards.append({"file": fname, "n": int(len(keys)), "sha256": sha})
            self._write_manifest()
        self._add_mem(keys, emb)

    def compact(self) -> None:
        """Merge all shards into one (atomic)."""
        if len(self._shards) <= 1:
            return
        with locked(self.path, f"embedding cache {self.path}", timeout=60.0):
            self._merge_from_disk()
            items = sorted(self._keys.items(), key=lambda kv: kv[1])  # one row per key (the latest)
            keys = torch.tensor([k for k, _ in items], dtype=torch.int64).view(-1, 5)
            emb = self._all()[torch.tensor([r for _, r in items], dtype=torch.int64)].clone()
            old = [s["file"] for s in self._shards]
            self._shards, self._keys, self._emb, self._count = [], {}, [], 0
            seq = max(_shard_seq(f) for f in old) + 1
            fname = f"emb-{seq:08d}.safetensors"
            sha = write_tensors(self.path / fname, {"keys": keys, "emb": emb})
            self._shards = [{"file": fname, "n": int(len(keys)), "sha256": sha}]
            self._write_manifest()
            self._add_mem(keys, emb)
            for f in old:
                with contextlib.suppress(OSError):
                    (self.path / f).unlink()
            clean_temp(self.path)


def _shard_seq(name: str) -> int:
    try:
        return int(name[4:-12])
    except ValueError:
        return -1


# ---------------------------------------------------------------------- aggregation


def aggregate(examples: torch.Tensor, valid: torch.Tensor, values: torch.Tensor | None = None,
              weighting: str = "mean") -> torch.Tensor:
    """Component embeddings ``[C, d]`` float32 from unit example embeddings ``[C, k, d]``.

    ``weighting="mean"``: the mean of the valid examples; ``"activation"``: weighted by
    ``values`` clamped at 0 (falls back to the mean where all weights are 0). The result is
    re-normalised; components without a valid example get a zero vector.
    """
    if weighting not in ("mean", "activation"):
        raise ArgumentError(f"weighting must be 'mean' or 'activation', got {weighting!r}")
    w = valid.to(torch.float32)
    if weighting == "activation":
        if values is None:
            raise ArgumentError("weighting='activation' needs the examples' values")
        wa = values.float().nan_to_num(0.0, 0.0, 0.0).clamp(min=0) * w
        zero = wa.sum(1, keepdim=True) <= 0
        w = torch.where(zero, w, wa)
    e = torch.einsum("ck,ckd->cd", w, F.normalize(examples.float(), dim=-1))
    return F.normalize(e, dim=-1)


def store_fingerprint(store: Any, layers: Sequence[str], k: int | None = None) -> dict[str, Any]:
    """What the DB manifest records about the TopKStore: its run fingerprints and a hash of the used lists."""
    items = []
    for n in layers:
        st = store[n]
        kk = st.k if k is None else k
        items += [(f"{n}/ids", st.ids[:, :kk]), (f"{n}/values", st.values[:, :kk]), (f"{n}/positions", st.positions[:, :kk])]
    fps = dict(getattr(store, "fingerprints", {}) or {})
    return {"model": fps.get("model"), "dataset": fps.get("dataset"), "pools": dict(getattr(store, "pools", {}) or {}),
            "lists_sha256": hash_tensors(items)}


def cache_fingerprint(fm: Any, store: Any) -> str:
    """Key of the :class:`EmbeddingCache` that :func:`build_concept_db` uses for ``store``: the
    foundation model and the data set the store's ids index (the same id in another data set is
    another image, so it must not hit the cache)."""
    data_fp = json.dumps(dict(getattr(store, "fingerprints", {}) or {}).get("dataset"), sort_keys=True, default=str)
    return hashlib.sha256(f"{fm.fingerprint}|{data_fp}".encode()).hexdigest()


# ---------------------------------------------------------------------- the DB


@dataclass
class LayerConcepts:
    """One layer of a :class:`ConceptDB` (see the module docstring)."""

    embeddings: torch.Tensor
    ids: torch.Tensor
    boxes: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    examples: torch.Tensor | None = None

    @property
    def channels(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    @property
    def n_valid(self) -> torch.Tensor:
        return self.valid.sum(1)

    @property
    def complete(self) -> torch.Tensor:
        """``[C]`` bool: the component has ``k`` valid examples."""
        return self.valid.all(1)


class ConceptDB:
    """Per-layer concept embeddings (see the module docstring). Build with :meth:`build`."""

    def __init__(self, layers: dict[str, LayerConcepts], meta: dict[str, Any], path: Path | None = None):
        self.layers = layers
        self.meta = meta
        self.path = path

    # ------------------------------------------------------------------ access
    def __getitem__(self, layer: str) -> LayerConcepts:
        try:
            return self.layers[layer]
        except KeyError:
            raise ArgumentError(f"layer {layer!r} is not in this ConceptDB; it holds {sorted(self.layers)}") from None

    def __contains__(self, layer: object) -> bool:
        return layer in self.layers

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def keys(self):
        return self.layers.keys()

    @property
    def dim(self) -> int:
        return int(self.meta["foundation"]["dim"])

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    @property
    def foundation(self) -> dict[str, Any]:
        return dict(self.meta["foundation"])

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: C={lc.channels}" for n, lc in self.layers.items())
        return f"ConceptDB(mode={self.meta.get('mode')!r}, k={self.k}, dim={self.dim}, foundation={self.foundation.get('name')!r}, layers={{{parts}}})"

    # ------------------------------------------------------------------ checks
    def check_foundation(self, fm: Any, strict: bool = True) -> None:
        """Raise if ``fm`` is not the foundation model the DB was built with.

        A different ``dim`` raises :class:`ShapeError`; the same dim but another fingerprint
        raises :class:`StoreError` (``strict=False``: only the dim is checked).
        """
        if int(fm.dim) != self.dim:
            raise ShapeError(
                f"the foundation model {getattr(fm, 'name', fm)!r} embeds into {fm.dim} dimensions but this ConceptDB "
                f"holds {self.dim}-d embeddings of {self.foundation.get('name')!r}; use that model or rebuild the DB"
            )
        if strict and getattr(fm, "fingerprint", None) != self.foundation.get("fingerprint"):
            raise StoreError(
                f"the foundation model {getattr(fm, 'name', fm)!r} (fingerprint {str(getattr(fm, 'fingerprint', '?'))[:12]}...) "
                f"is not the one this ConceptDB was built with ({self.foundation.get('name')!r}, "
                f"{str(self.foundation.get('fingerprint'))[:12]}...); embeddings of different models are not comparable"
            )

    def check_store(self, store: Any) -> None:
        """Raise :class:`StoreError` if ``store`` is not the TopKStore this DB was built from."""
        want = self.meta["topk_store"]
        got = store_fingerprint(store, list(self.layers), self.k)
        diff = [key for key in ("model", "dataset", "lists_sha256") if want.get(key) != got.get(key)]
        if diff:
            raise StoreError(f"this ConceptDB was built from another TopKStore (differs in: {', '.join(diff)})")
        for n, lc in self.layers.items():  # the tensors themselves, not only the manifest's word for them
            ids = store[n].ids[:, : self.k].to(lc.ids.device)
            if lc.ids.shape != ids.shape or not torch.equal(torch.where(lc.valid, lc.ids, -1), torch.where(lc.valid, ids, -1)):
                raise StoreError(f"this ConceptDB's layer {n!r} does not hold the examples of the TopKStore's layer {n!r} "
                                 "(layers swapped or the DB damaged)")

    # ------------------------------------------------------------------ search
    def as_index(self, layers: str | Sequence[str] | None = None, dtype: torch.dtype = torch.float32,
                 complete_only: bool = False) -> Any:
        """An :class:`~semlens_fast.index.EmbeddingIndex` over the component embeddings of ``layers``.

        Rows map to ``(layer, component)`` (``index.lookup(ids)``). Components without any
        valid example are left out (so are incomplete ones with ``complete_only=True``).
        """
        from .index import EmbeddingIndex

        names = list(self.layers) if layers is None else ([layers] if isinstance(layers, str) else list(layers))
        index = EmbeddingIndex(self.dim, dtype)
        for n in names:
            lc = self[n]
            keep = lc.complete if complete_only else lc.n_valid > 0
            idx = keep.nonzero().flatten()
            index.add(lc.embeddings[idx].float(), layer=n, neurons=idx)
        return index

    def search(self, queries: Any, k: int = 10, fm: Any = None, layers: str | Sequence[str] | None = None) -> list[list[tuple[str, int, float]]]:
        """Top-``k`` components per query: ``[[(layer, component, score), ...], ...]``.

        ``queries``: embeddings ``[Q, d]`` or ``[d]``, or text(s) embedded with ``fm`` (which
        must be the DB's foundation model and have a text encoder).
        """
        if isinstance(queries, str) or (isinstance(queries, (list, tuple)) and queries and isinstance(queries[0], str)):
            if fm is None:
                raise ArgumentError("text queries need fm= the ConceptDB's foundation model (with a text encoder)")
            self.check_foundation(fm)
            q = fm.encode_texts(queries)
        else:
            q = torch.as_tensor(queries).float()
            if q.dim() == 1:
                q = q[None]
            if fm is not None:
                self.check_foundation(fm)
        if q.dim() != 2 or q.shape[-1] != self.dim:
            raise ShapeError(f"queries have shape {tuple(q.shape)}; this ConceptDB holds {self.dim}-d embeddings ([Q, {self.dim}] expected)")
        index = self.as_index(layers)
        scores, rows = index.search(q, k)
        where = index.lookup(rows)
        out = []
        for qi in range(len(q)):
            out.append([(lc[0], lc[1], float(s)) for s, lc in zip(scores[qi].tolist(), where[qi]) if lc is not None])
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the DB to folder ``path`` (crash safe: new tensor file, then the manifest; holding
        the folder's write lock). A regular file or an unwritable place raises :class:`ArgumentError`."""
        path = ensure_dir(path, "ConceptDB path")
        with locked(path, f"ConceptDB {path}"):
            self._save_locked(path)
        self.path = path
        return path

    def _save_locked(self, path: Path) -> None:
        seq = 0
        with contextlib.suppress(StoreError, OSError, ValueError):
            if (path / MANIFEST).exists():
                seq = int(read_json(path / MANIFEST).get("seq", 0)) + 1
        fname = f"concepts-{seq:08d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for n, lc in self.layers.items():
            for f in _FIELDS:
                tensors[f"{n}/{f}"] = getattr(lc, f)
            if lc.examples is not None:
                tensors[f"{n}/examples"] = lc.examples
        sha = write_tensors(path / fname, tensors, metadata={"format": FORMAT})
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__, "seq": seq,
                    "tensors": fname, "tensors_bytes": (path / fname).stat().st_size, "tensors_sha256": sha,
                    "layers": list(self.layers), "meta": self.meta}
        write_json(path / MANIFEST, manifest)
        for p in path.glob("concepts-*.safetensors"):
            if p.name != fname:
                with contextlib.suppress(OSError):
                    p.unlink()
        clean_temp(path)

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True, device: torch.device | str = "cpu",
             verify: bool = True) -> "ConceptDB":
        """Read a DB written by :meth:`save`; tensors are memory-mapped (``mmap=True``, CPU).

        ``verify`` (default) checks the tensor file against the SHA-256 in the manifest first
        (one streamed read; nothing stays resident). Shapes, dtypes and the layers' agreement
        with each other are checked too; any defect raises :class:`StoreError`.
        """
        path = Path(path)
        if not path.is_dir():
            raise StoreError(f"ConceptDB folder {path} does not exist")
        return read_consistent(lambda: read_json(path / MANIFEST), lambda man: cls._load(path, man, mmap, device, verify))

    @classmethod
    def _load(cls, path: Path, man: Any, mmap: bool, device: torch.device | str, verify: bool) -> "ConceptDB":
        if not isinstance(man, dict) or man.get("format") != FORMAT:
            raise StoreError(f"{path / MANIFEST} is not a ConceptDB manifest (format {FORMAT!r} expected)")
        try:
            version = int(man.get("format_version", -1))
            fname, layer_names, meta = man["tensors"], list(man["layers"]), man["meta"]
            if not isinstance(fname, str) or Path(fname).name != fname or not isinstance(meta, dict):
                raise ValueError(f"tensors {fname!r}")
            dim, k = int(meta["foundation"]["dim"]), int(meta["k"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"ConceptDB manifest {path / MANIFEST} is incomplete or invalid: {exc!r}") from None
        if version > FORMAT_VERSION:
            raise StoreError(f"ConceptDB {path} has format_version {man.get('format_version')}; this library reads up to {FORMAT_VERSION}")
        fpath = path / fname
        if not fpath.exists():
            raise MissingFileError(f"ConceptDB {path}: the manifest names {fname} which is missing")
        if int(man.get("tensors_bytes", fpath.stat().st_size)) != fpath.stat().st_size:
            raise StoreError(f"ConceptDB {path}: {fname} has {fpath.stat().st_size} bytes, the manifest says "
                             f"{man.get('tensors_bytes')} (truncated or replaced)")
        sha = man.get("tensors_sha256") if verify else None
        if mmap and torch.device(device).type == "cpu":
            t, _ = mmap_safetensors(fpath, sha256=sha)
        else:
            from ._io import read_tensors

            t = read_tensors(fpath, device=device, sha256=sha)
        layers: dict[str, LayerConcepts] = {}
        for n in layer_names:
            try:
                parts = {f: t[f"{n}/{f}"] for f in _FIELDS}
            except KeyError as exc:
                raise StoreError(f"ConceptDB {path}: tensor {exc.args[0]!r} is missing") from None
            lc = LayerConcepts(**parts, examples=t.get(f"{n}/examples"))
            _check_layer(path, n, lc, dim, k)
            layers[n] = lc
        return cls(layers, meta, path)

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, store: Any, fm: Any, images: Any = None, layers: str | Sequence[str] | None = None, **kwargs: Any) -> "ConceptDB":
        """See :func:`build_concept_db`."""
        return build_concept_db(store, fm, images, layers, **kwargs)


def _check_layer(path: Path, n: str, lc: LayerConcepts, dim: int, k: int) -> None:
    """Shapes and dtypes of one stored layer agree with each other and the manifest."""
    C = lc.embeddings.shape[0] if lc.embeddings.dim() == 2 else -1
    want = {"embeddings": (C, dim), "ids": (C, k), "boxes": (C, k, 4), "values": (C, k), "valid": (C, k)}
    for f, shape in want.items():
        t = getattr(lc, f)
        if C < 0 or tuple(t.shape) != shape:
            raise StoreError(f"ConceptDB {path}: {n}/{f} has shape {tuple(t.shape)}, expected {shape} (damaged)")
    if lc.examples is not None and tuple(lc.examples.shape) != (C, k, dim):
        raise StoreError(f"ConceptDB {path}: {n}/examples has shape {tuple(lc.examples.shape)}, expected {(C, k, dim)} (damaged)")
    if lc.ids.dtype != torch.int64 or lc.valid.dtype != torch.bool or not lc.embeddings.is_floating_point():
        raise StoreError(f"ConceptDB {path}: layer {n!r} has tensors of unexpected dtypes (damaged)")


def _params_match(man: Mapping[str, Any], want: Mapping[str, Any]) -> list[str]:
    meta = man.get("meta", {})
    diff = []
    for key, val in want.items():
        if meta.get(key) != val:
            diff.append(f"{key}: DB has {str(meta.get(key))[:80]}, requested {str(val)[:80]}")
    return diff


def build_concept_db(
    store: Any,
    fm: Any,
    images: Any = None,
    layers: str | Sequence[str] | None = None,
    *,
    mode: str = "full",
    k: int | None = None,
    model: Any = None,
    data: Any = None,
    forward: Any = None,
    relevance: Any = None,
    threshold: float = 0.5,
    min_size: int = 8,
    weighting: str = "mean",
    dtype: torch.dtype = torch.float32,
    keep_examples: bool = True,
    example_dtype: torch.dtype = torch.float16,
    cache: str | os.PathLike | EmbeddingCache | None = None,
    path: str | os.PathLike | None = None,
    overwrite: bool = False,
    input_ids: Any = None,
    tokenizer: Any = None,
    attention_mask: Any = None,
    radius: int = 4,
    batch_size: int | None = None,
    chunk: int = 2048,
    check_model: bool = True,
    progress: bool = True,
) -> ConceptDB:
    """Build the ConceptDB of ``layers`` of a TopKStore with foundation model ``fm``.

    Args:
        store: the :class:`~semlens_fast.store.TopKStore`.
        fm: a :class:`~semlens_fast.foundation.FoundationModel` (images: any with ``"image"``;
            ``mode="text"``: one with ``"text"``).
        images: the raw images the store's ids index (see :class:`~semlens_fast.examples.ImageSource`);
            for ``mode="text"``, ``input_ids`` + ``tokenizer`` are used instead.
        mode: ``"full"``, ``"activation"``, ``"relevance"`` or ``"text"`` (see :mod:`semlens_fast.examples`).
        k: use the first ``k`` examples of each list (default: the store's k).
        model, data, forward, relevance, threshold, min_size: for crops (see :func:`concept_examples`).
        weighting: ``"mean"`` or ``"activation"`` (see :func:`aggregate`).
        dtype: storage dtype of the component embeddings; ``keep_examples``/``example_dtype``: the
            ``[C, k, d]`` per-example embeddings.
        cache: folder of the :class:`EmbeddingCache` (or an instance): embeddings are reused across
            calls, ``k``, layers and modes. ``None``: no persistence.
        path: save the DB there; if a DB with the same fingerprints and parameters is there, it is
            loaded instead (a different one raises :class:`StoreError` unless ``overwrite=True``).
        chunk: how many missing (sample, crop) pairs are loaded, embedded and cached at a time.
    """
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise DTypeError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype}")
    if example_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise DTypeError(f"example_dtype must be torch.float32, float16 or bfloat16, got {example_dtype}")
    if weighting not in ("mean", "activation"):
        raise ArgumentError(f"weighting must be 'mean' or 'activation', got {weighting!r}")
    names = list(store.keys()) if layers is None else ([layers] if isinstance(layers, str) else list(layers))
    for n in names:
        if n not in store:
            raise ArgumentError(f"layer {n!r} is not in the TopKStore; it holds {sorted(store.keys())}")
    kk = int(k) if k is not None else min(store[n].k for n in names)
    need = "text" if mode == "text" else "image"
    if need not in getattr(fm, "modalities", ()):
        from .foundation.base import ModalityError

        raise ModalityError(
            f"mode={mode!r} embeds {need}s but the foundation model {getattr(fm, 'name', fm)!r} has modalities "
            f"{sorted(getattr(fm, 'modalities', ()))}"
        )
    want = {
        "foundation": fm.describe(),
        "topk_store": store_fingerprint(store, names, kk),
        "mode": mode, "k": kk, "weighting": weighting, "layers": names,
        "dtype": str(dtype).replace("torch.", ""),
        "examples_dtype": str(example_dtype).replace("torch.", "") if keep_examples else None,
        "crop": {"threshold": float(threshold), "min_size": int(min_size)} if mode in ("activation", "relevance") else None,
        "radius": int(radius) if mode == "text" else None,
    }
    if path is not None:
        check_writable(path, "path")
    if path is not None and (Path(path) / MANIFEST).exists():
        try:
            man = read_json(Path(path) / MANIFEST)
            diff = _params_match(man, want)
        except StoreError:
            man, diff = None, ["unreadable manifest"]
        if not diff:
            log.info("ConceptDB at %s matches; loading it", path)
            try:
                return ConceptDB.load(path)
            except StoreError as exc:
                if not overwrite:
                    raise
                log.warning("ConceptDB at %s is damaged (%s); building it again", path, exc)
        if not overwrite:
            raise StoreError(
                f"{path} holds a different ConceptDB (" + "; ".join(diff) + "); use another folder or overwrite=True"
            )

    # ---- examples and the unique (sample, crop) pairs
    if mode == "text":
        if input_ids is None or tokenizer is None:
            raise ArgumentError("mode='text' needs input_ids= (token ids per sample) and tokenizer= (with .decode)")
        ex = ConceptExamples("text", {n: token_windows(store, n, attention_mask, radius, kk) for n in names},
                             {"radius": radius})
    else:
        if images is None:
            raise ArgumentError("images= is needed: the raw images (values in [0, 1] or uint8) that the store's ids index")
        ex = concept_examples(store, names, mode, k=kk, model=model, data=data, forward=forward, relevance=relevance,
                              threshold=threshold, min_size=min_size, check_model=check_model, progress=progress)
    keys, index = ex.unique_pairs()
    src = None
    if mode != "text":
        src = images if isinstance(images, ImageSource) else ImageSource(images)
        src.check_ids(keys[:, 0])
    else:
        n_in = len(input_ids)
        if len(keys) and int(keys[:, 0].max()) >= n_in:
            raise ArgumentError(f"the TopKStore refers to sample {int(keys[:, 0].max())} but input_ids has {n_in} samples")

    # ---- embeddings: cache lookup, then only the missing pairs. A model that maps another model's image
    # embeddings (Aligned: fm.image_base, fm.from_base) embeds and caches with that base model, so a
    # vision DB and an Aligned DB of the same crops share one cache.
    base = getattr(fm, "image_base", None) if mode != "text" else None
    enc = base if base is not None and callable(getattr(fm, "from_base", None)) else fm
    if isinstance(cache, EmbeddingCache):
        ec = cache
        if ec.fingerprint != enc.fingerprint or ec.dim != enc.dim:
            raise StoreError("the EmbeddingCache given belongs to another foundation model")
    elif cache is not None:
        ec = EmbeddingCache(cache, cache_fingerprint(enc, store), enc.dim, kind=need)
    else:
        ec = None
    if ec is not None:
        found, E = ec.lookup(keys)
    else:
        found, E = torch.zeros(len(keys), dtype=torch.bool), torch.zeros(len(keys), enc.dim)
    miss = (~found).nonzero().flatten()
    stats = {"unique_pairs": int(len(keys)), "cached": int(found.sum()), "embedded": int(len(miss)),
             "unique_samples": int(torch.unique(keys[:, 0]).numel()) if len(keys) else 0}
    log.info("ConceptDB: %d unique (sample, crop) pairs, %d cached, %d to embed", len(keys), int(found.sum()), len(miss))
    it = range(0, len(miss), chunk)
    if progress and len(miss):
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"embed {need}s ({fm.name})", total=(len(miss) + chunk - 1) // chunk)
    input_size = ex.params.get("input_size")
    for s in it:
        sel = miss[s : s + chunk]
        kk_ = keys[sel]
        if mode == "text":
            e = fm.encode_texts(window_texts(input_ids, tokenizer, kk_), batch_size=batch_size)
        else:
            imgs = src.get(kk_[:, 0].tolist())  # type: ignore[union-attr]
            crops = [crop(img, b, input_size) for img, b in zip(imgs, kk_[:, 1:].tolist())]
            e = enc.encode_images(crops, batch_size=batch_size)
        if e.shape[-1] != enc.dim:
            raise ShapeError(f"the foundation model returned {e.shape[-1]}-d embeddings, its dim says {enc.dim}")
        E[sel] = e
        if ec is not None:
            ec.add(kk_, e)
    E = F.normalize(E.float(), dim=-1)
    if enc is not fm:
        E = fm.from_base(E) if len(E) else torch.zeros(0, fm.dim)

    # ---- per layer: examples [C, k, d] and components [C, d]
    out: dict[str, LayerConcepts] = {}
    for n in names:
        le = ex.layers[n]
        idx = index[n]
        exm = E[idx.clamp(min=0)]
        exm[~le.valid] = 0
        comp = aggregate(exm, le.valid, le.values, weighting)
        out[n] = LayerConcepts(
            embeddings=comp.to(dtype), ids=le.ids.clone(), boxes=le.boxes.clone(), values=le.values.clone(),
            valid=le.valid.clone(), examples=exm.to(example_dtype) if keep_examples else None,
        )
    meta = dict(want)
    meta["input_size"] = input_size
    meta["stats"] = stats
    meta["incomplete"] = {n: int((~out[n].complete).sum()) for n in names}
    db = ConceptDB(out, meta)
    if path is not None:
        db.save(path)
    return db
