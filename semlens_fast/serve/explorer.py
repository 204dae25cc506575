"""The explorer's state and operations, without any web framework: what the pages and the JSON API call.

An :class:`Explorer` opens a run folder once (:meth:`Explorer.open`): the manifest, the
ConceptDB (memory-mapped, checked against its top-k store), the foundation model, the data
set, ``labels.json`` and ``audit.json``. Everything that can be wrong with the run is found
there, before a server binds a port, and raised as the errors the CLI maps to its exit codes.
Every operation returns plain JSON-able dicts.

**Read-only by default.** Without ``writable=True`` nothing is written to the run folder:
relevance is read from ``RUN/relevance/`` when an earlier command computed it, audits are
computed but not saved. With ``writable=True`` relevance for a new class is computed (and
cached, as ``semlens describe --target`` does) and an audit can be saved to ``audit.json``.

**The audit** goes through two small functions, :func:`compute_audit` and
:func:`audit_view`: the first runs the library's audit, the second turns its result into
what the pages and the API show (a summary, the flagged rows, all rows). The pages render
the rows generically (every column the records have; lists of sample ids as images), so a
richer audit result only needs these two functions changed.
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .._io import read_json
from ..errors import ArgumentError, SemlensError
from .images import png_bytes

# --------------------------------------------------------------------------- errors


class NotFound(ArgumentError):
    """A layer, component, sample or page that does not exist (HTTP 404)."""


class NotAvailable(SemlensError):
    """The operation needs something this server does not have, e.g. relevance in read-only mode (HTTP 409)."""


# --------------------------------------------------------------------------- JSON


def jsonable(obj: Any) -> Any:
    """A JSON-safe copy: NaN/inf -> None, tuples -> lists, tensors/numpy -> lists or numbers."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if hasattr(obj, "tolist"):
        return jsonable(obj.tolist())
    return str(obj)


# --------------------------------------------------------------------------- the audit adapter


def compute_audit(lens: Any, valid: Any, spurious: Any, *, relevance: Any, target: int | None,
                  layers: list[str] | None, threshold: float | None, margin: float, top: int,
                  images: Any = None) -> Any:
    """Run the library's calibrated audit (:meth:`semlens_fast.lens.Lens.audit`); ``images``: the run's raw
    images, which embedding (``class:``) probes need for their null of random images."""
    return lens.audit(valid, spurious, relevance=relevance, target=target, layers=layers, threshold=threshold,
                      margin=margin, top=top, images=images)


def audit_view(result: Any) -> dict[str, Any]:
    """What the pages and the API show of an audit result: ``summary`` (scalars and small dicts),
    ``flagged`` (the flagged rows) and ``rows`` (every audited component, ``result.to_records()``).

    Rows are rendered generically: every key they have becomes a column; a list of sample ids
    under a key containing ``"sample"`` is shown as the training images behind the row.
    """
    rows = [dict(r) for r in result.to_records()]
    flagged = [dict(r) for r in getattr(result, "flagged", [])]
    summary: dict[str, Any] = {"valid": list(result.valid), "spurious": list(result.spurious),
                               "target": result.target, "n_components": len(rows), "n_flagged": len(flagged)}
    if getattr(result, "relevance_share", None) is not None:
        summary["relevance_share"] = dict(result.relevance_share)
    return {"summary": summary, "flagged": flagged, "rows": rows}


def stored_audit_view(data: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`audit_view` of an ``audit.json`` written by :func:`semlens_fast.workspace.save_audit`."""
    rows = [dict(r) for r in data.get("components", [])]
    flagged = [dict(r) for r in data.get("flagged", [])]
    summary = {"valid": data.get("valid"), "spurious": data.get("spurious"), "target": data.get("target"),
               "n_components": len(rows), "n_flagged": len(flagged), "source": data.get("source")}
    if data.get("relevance_share") is not None:
        summary["relevance_share"] = data["relevance_share"]
    return {"summary": summary, "flagged": flagged, "rows": rows}


# --------------------------------------------------------------------------- helpers


@dataclass
class Limits:
    """Bounds on what one request may ask for."""

    max_upload_bytes: int = 8 * 2**20
    max_upload_pixels: int = 16_000_000
    max_k: int = 1000
    max_query_chars: int = 1000
    max_concepts: int = 64
    max_map_points: int = 5000
    text_cache: int = 512


def _check_int(value: Any, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise ArgumentError(f"{name} must be in {lo}..{hi if hi is not None else 'inf'}, got {value}")
    return value


def _layer_order(layers: Sequence[str]) -> dict[str, int]:
    return {n: i for i, n in enumerate(layers)}


class Explorer:
    """One run folder, opened once, and the questions the pages and the API ask about it.

    Build with :meth:`open`. All public methods are thread-safe (one lock around the model and
    the Lens; the work is CPU-bound and torch already uses every core).
    """

    def __init__(self, run: Any, *, writable: bool = False, others: Mapping[str, Any] | None = None,
                 limits: Limits | None = None):
        self.run = run
        self.writable = bool(writable)
        self.limits = limits or Limits()
        self._lock = threading.RLock()
        # cheap checks first (manifests, JSON files, relevance), then the data set, then the models
        self.db = run.concept_db()  # MissingArtifactError (3) / RunMismatchError, StoreError (4)
        self.layers: list[str] = list(self.db.layers)
        self._order = _layer_order(self.layers)
        self.input_size = self.db.meta.get("input_size")
        self.classes: list[str] | None = list(run.classes) if run.classes else None
        self._labels = self._read_labels()
        self._audit = self._read_audit()
        self._findings = self._read_run_json("findings.json")
        self._relevance: dict[int, dict[str, torch.Tensor]] = {}
        for key in run.manifest.get("stages", {}):
            if key.startswith("relevance:") and key.split(":", 1)[1].isdigit():
                t = int(key.split(":", 1)[1])
                r = run.relevance(t)  # StoreError (exit 4) when damaged; None: computed for other weights
                if r is None:
                    continue
                for n, v in r.items():
                    if n in self._order and tuple(v.shape) != (self.db[n].channels,):
                        from ..workspace import RunMismatchError

                        raise RunMismatchError(f"{run.path / 'relevance' / f'class{t}.safetensors'}: layer {n!r} has "
                                               f"shape {tuple(v.shape)}, the ConceptDB has {self.db[n].channels} components")
                self._relevance[t] = r
        self.data = run.data()
        from ..examples import ImageSource

        self._images = ImageSource(self.data)
        for n in self.layers:  # ids the DB names must exist in the data set (else: another data set)
            ids = self.db[n].ids
            self._images.check_ids(ids[ids >= 0], f"the ConceptDB of {run.path} (layer {n!r})")
        self.n_samples = self._images.length
        self.lens = run.lens()
        self.fm = self.lens.fm
        self.others: dict[str, Any] = {}
        for name, other in (others or {}).items():
            self.others[str(name)] = other
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._null: torch.Tensor | None = None
        self._class_probe_cache: dict[str, torch.Tensor] = {}
        self._map: dict[str, Any] | None = None
        self._other_lens: dict[str, Any] = {}
        self._png = lru_cache(maxsize=4096)(self._png_uncached)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path, *, writable: bool = False, compare_with: Sequence[str | Path] = (),
             limits: Limits | None = None, trust: bool = False) -> "Explorer":
        """Open ``path`` and check everything the explorer will read.

        Raises what the CLI maps to exit codes: :class:`~semlens_fast.workspace.MissingArtifactError`
        (3) for a folder that is not a run or lacks the ConceptDB, :class:`~semlens_fast.errors.StoreError`
        / :class:`~semlens_fast.workspace.RunMismatchError` (4) for damaged artifacts or artifacts of
        another run, :class:`~semlens_fast.errors.ArgumentError` (2) for bad arguments.
        ``trust=True`` lets the runs call the ``package.module:function`` factories their manifests
        name (``--trust``; otherwise only the user's allow-list, see the README).
        """
        from ..workspace import Run

        run = Run.open(path, trust=trust)
        others = {}
        for p in compare_with:
            o = Run.open(p, trust=trust)
            odb, db = o.concept_db(), run.concept_db()  # checked against their stores
            if odb.foundation.get("fingerprint") != db.foundation.get("fingerprint"):
                raise ArgumentError(f"--compare-with {o.path}: its ConceptDB was embedded by "
                                    f"{odb.foundation.get('name')!r}, this run's by {db.foundation.get('name')!r}; "
                                    "runs can only be compared in one embedding space")
            name = Path(p).resolve().name
            base, i = name, 2
            while name in others:
                name, i = f"{base}-{i}", i + 1
            others[name] = o  # its foundation model is never loaded (not needed to compare)
        return cls(run, writable=writable, others=others, limits=limits)

    def _read_run_json(self, name: str, strict: bool = False) -> Any:
        from ..workspace import RunMismatchError

        f = self.run.file(name)
        if not f.exists():
            return None
        data = read_json(f)  # StoreError (exit 4) when truncated / not JSON
        if not isinstance(data, dict):
            raise RunMismatchError(f"{f} is not a semlens {name} (expected a JSON object)")
        if data.get("run_id", self.run.id) != self.run.id:
            if strict:
                raise RunMismatchError(f"{f} belongs to another run; run `semlens {name.split('.')[0]} --run "
                                       f"{self.run.path} ...` again or delete it")
            return None
        return data

    def _read_labels(self) -> dict[str, Any] | None:
        from ..workspace import RunMismatchError

        data = self._read_run_json("labels.json", strict=True)
        if data is None:
            return None
        by: dict[tuple[str, int], dict[str, Any]] = {}
        try:
            for r in data["records"]:
                by[(str(r["layer"]), int(r["component"]))] = dict(r)
            vocab = [str(v) for v in data.get("vocabulary", [])]
        except (KeyError, TypeError, ValueError) as exc:
            raise RunMismatchError(f"{self.run.file('labels.json')} is damaged ({type(exc).__name__}: {exc}); "
                                   f"run `semlens label --run {self.run.path} ...` again") from None
        return {"vocabulary": vocab, "by": by}

    def _read_audit(self) -> dict[str, Any] | None:
        from ..workspace import RunMismatchError

        data = self._read_run_json("audit.json", strict=True)
        if data is None:
            return None
        if not isinstance(data.get("components", []), list) or not isinstance(data.get("flagged", []), list):
            raise RunMismatchError(f"{self.run.file('audit.json')} is damaged; run `semlens audit --run "
                                   f"{self.run.path} ...` again")
        return data

    # ------------------------------------------------------------------ small lookups
    def label_of(self, layer: str, component: int) -> dict[str, Any] | None:
        if self._labels is None:
            return None
        return self._labels["by"].get((layer, int(component)))

    def _label_name(self, layer: str, component: int) -> str | None:
        r = self.label_of(layer, component)
        return None if r is None else r.get("label")

    def check_layer(self, layer: str) -> str:
        if layer not in self._order:
            raise NotFound(f"layer {layer!r} is not in this run; it has {self.layers}")
        return layer

    def check_component(self, layer: str, component: int) -> int:
        self.check_layer(layer)
        C = self.db[layer].channels
        if isinstance(component, bool) or not isinstance(component, int) or not 0 <= component < C:
            raise NotFound(f"layer {layer!r} has components 0..{C - 1}, got {component!r}")
        return component

    def check_layers(self, layers: Sequence[str] | None, arg: str = "layers") -> list[str] | None:
        if not layers:
            return None
        out = []
        for n in layers:
            if n not in self._order:
                raise ArgumentError(f"{arg}: layer {n!r} is not in this run; it has {self.layers}")
            out.append(n)
        return out

    def check_target(self, target: Any) -> int | None:
        if target is None:
            return None
        n = len(self.classes) if self.classes else None
        if isinstance(target, bool) or not isinstance(target, int) or target < 0 or (n is not None and target >= n):
            raise ArgumentError(f"target must be a class index 0..{(n or 1) - 1}, got {target!r}")
        return target

    def class_name(self, target: int | None) -> str | None:
        if target is None or not self.classes or not 0 <= target < len(self.classes):
            return None
        return self.classes[target]

    def _examples(self, layer: str, component: int, n: int | None = None) -> list[dict[str, Any]]:
        lc = self.db[layer]
        ids, valid, vals = lc.ids[component], lc.valid[component], lc.values[component]
        out = []
        for r in range(lc.k):
            if not bool(valid[r]) or int(ids[r]) < 0:
                continue
            sid = int(ids[r])
            out.append({"rank": r, "sample": sid, "value": float(vals[r]), "class": self._sample_class(sid),
                        "box": [int(b) for b in lc.boxes[component, r].tolist()],
                        "image_url": f"/img/samples/{sid}.png",
                        "crop_url": f"/img/crops/{_q(layer)}/{component}/{r}.png"})
            if n is not None and len(out) >= n:
                break
        return out

    def _sample_class(self, sid: int) -> str | None:
        labels = getattr(self.data, "labels", None)
        if self.classes and isinstance(labels, torch.Tensor) and 0 <= sid < labels.shape[0]:
            c = int(labels[sid])
            return self.classes[c] if 0 <= c < len(self.classes) else str(c)
        return None

    # ------------------------------------------------------------------ info
    def info(self) -> dict[str, Any]:
        m = self.run.manifest
        layers = []
        for n in self.layers:
            lc = self.db[n]
            layers.append({"name": n, "components": lc.channels, "with_examples": int((lc.n_valid > 0).sum()), "k": lc.k,
                           "per_example_embeddings": lc.examples is not None})
        out = {"run": str(self.run.path), "run_id": self.run.id, "library_version": m.get("library_version"),
               "model": m.get("model"), "data": m.get("data"), "classes": self.classes, "n_samples": self.n_samples,
               "foundation": {"name": self.db.foundation.get("name"), "dim": self.db.dim,
                              "modalities": sorted(getattr(self.fm, "modalities", []) or [])},
               "mode": self.db.meta.get("mode"), "layers": layers, "n_components": sum(x["components"] for x in layers),
               "writable": self.writable, "labels": None, "audit": None, "relevance_targets": self.relevance_targets(),
               "compare_with": sorted(self.others), "findings": None}
        if self._labels is not None:
            out["labels"] = {"vocabulary": self._labels["vocabulary"], "n": len(self._labels["by"])}
        if self._audit is not None:
            out["audit"] = stored_audit_view(self._audit)["summary"]
        if self._findings is not None:
            f = self._findings
            out["findings"] = {k: f.get(k) for k in ("target_class", "data_source", "model_metrics", "mark_channels")}
            for key in ("audit", "search_image_probe", "search_text"):
                if isinstance(f.get(key), dict):
                    out["findings"][key] = {k: f[key].get(k) for k in ("found", "true", "precision", "recall")}
        return jsonable(out)

    # ------------------------------------------------------------------ probes
    def text_probe(self, text: str) -> torch.Tensor:
        """The Lens's probe embedding of one text ``[1, d]`` (cached: repeated queries skip the text encoder)."""
        if not isinstance(text, str) or not text.strip():
            raise ArgumentError("the text query is empty; type a concept, e.g. 'stripes'")
        if len(text) > self.limits.max_query_chars:
            raise ArgumentError(f"the text query has {len(text)} characters; at most {self.limits.max_query_chars}")
        with self._lock:
            hit = self._text_cache.get(text)
            if hit is not None:
                self._text_cache.move_to_end(text)
                return hit
            emb = self._embed_text(text)
            self._text_cache[text] = emb
            while len(self._text_cache) > self.limits.text_cache:
                self._text_cache.popitem(last=False)
            return emb

    def _embed_text(self, text: str) -> torch.Tensor:
        """``lens.embed_texts([text])`` with the null prompts' embedding computed once: the Lens's
        probe is ``mean_j (e(t_j(q)) - e(t_j("")))`` = ``mean_j e(t_j(q)) - mean_j e(t_j(""))``, so
        the second term is cached and a new query costs one encoder pass instead of two (equal to
        the Lens's probe up to float rounding)."""
        if not self.lens.templates:  # raw texts, no null subtraction
            return self.lens.embed_texts([text]).float().cpu()
        if self._null is None:
            self._null = self.lens.embed_texts([""], null_subtract=False).float().cpu()
        return self.lens.embed_texts([text], null_subtract=False).float().cpu() - self._null

    def image_probe(self, image: Any) -> torch.Tensor:
        with self._lock:
            return self.lens.embed([image], modality="image").float().cpu()

    def embedding_probe(self, emb: Any) -> torch.Tensor:
        try:
            q = torch.as_tensor(emb, dtype=torch.float32)
        except (TypeError, ValueError) as exc:
            raise ArgumentError(f"embedding must be a list of {self.db.dim} numbers (or a list of such lists): {exc}") from None
        if q.dim() == 1:
            q = q[None]
        if q.dim() != 2 or q.shape[1] != self.db.dim or q.shape[0] == 0:
            raise ArgumentError(f"embedding must have {self.db.dim} numbers per query, got shape {list(q.shape)}")
        if not torch.isfinite(q).all():
            raise ArgumentError("embedding contains NaN or infinite values")
        if q.shape[0] > 64:
            raise ArgumentError(f"at most 64 embeddings per request, got {q.shape[0]}")
        return q

    def class_probe(self, name: str, n: int = 32) -> torch.Tensor:
        """Image probe of a class: the mean embedding of up to ``n`` training images labelled ``name``."""
        labels = getattr(self.data, "labels", None)
        if not self.classes or not isinstance(labels, torch.Tensor):
            raise ArgumentError("class: probes need a data set with classes and labels; this run has none")
        if name not in self.classes:
            raise ArgumentError(f"class:{name}: not a class of this run; classes: {self.classes}")
        with self._lock:
            if name not in self._class_probe_cache:
                ids = (labels == self.classes.index(name)).nonzero().flatten()[:n].tolist()
                if not ids:
                    raise ArgumentError(f"class:{name}: the data set has no image of that class")
                emb = self.fm.encode_images(self._images.get(ids)).float()
                self._class_probe_cache[name] = emb.mean(0)
            return self._class_probe_cache[name]

    # ------------------------------------------------------------------ search
    def search(self, *, text: str | None = None, image: Any = None, embedding: Any = None, k: int = 10,
               layers: Sequence[str] | None = None, per_layer: bool = False, examples: int = 8) -> dict[str, Any]:
        """Components closest to one text, one image or embedding(s); with labels and example crops.

        ``took_ms`` is the time from the query to the ranked list (probe embedding + search).
        """
        given = [x is not None for x in (text, image, embedding)]
        if sum(given) != 1:
            raise ArgumentError("give exactly one of a text query, an image or an embedding")
        k = _check_int(k, "k", 1, self.limits.max_k)
        examples = _check_int(examples, "examples", 0, 100)
        names = self.check_layers(layers)
        t0 = time.perf_counter()
        if text is not None:
            q, kind, shown = self.text_probe(text), "text", [text]
        elif image is not None:
            q, kind, shown = self.image_probe(image), "image", ["uploaded image"]
        else:
            q, kind = self.embedding_probe(embedding), "embedding"
            shown = [f"embedding {i}" for i in range(q.shape[0])]
        with self._lock:
            res = self.lens.search(q, k=k, layers=names, modality="embedding", per_layer=per_layer)
        took = (time.perf_counter() - t0) * 1e3
        queries = [{"query": i, "kind": kind, "text": shown[i], "results": []} for i in range(q.shape[0])]
        for r in res.to_records():
            row = {"rank": r["rank"], "layer": r["layer"], "component": r["component"], "score": r["score"],
                   "label": self._label_name(r["layer"], r["component"]),
                   "url": f"/neuron/{_q(r['layer'])}/{r['component']}"}
            if examples:
                row["examples"] = self._examples(r["layer"], r["component"], examples)
            queries[r["query"]]["results"].append(row)
        return jsonable({"took_ms": took, "k": k, "layers": names or self.layers, "per_layer": per_layer,
                         "queries": queries})

    # ------------------------------------------------------------------ neuron
    def _scores_of(self, layer: str) -> dict[str, Any]:
        lc = self.db[layer]
        with self._lock:
            out: dict[str, Any] = {"redundancy": self.lens.redundancy(layer)}
            if lc.examples is not None:
                out["clarity"] = self.lens.clarity(layer)
                out["polysemanticity"] = self.lens.polysemanticity(layer)
        return out

    def relevance_targets(self) -> list[int]:
        """Classes whose relevance the run folder holds for the model that made the store."""
        return sorted(self._relevance)

    def relevance(self, target: int | None, layers: Sequence[str] | None = None) -> dict[str, torch.Tensor] | None:
        """Mean channel relevance per layer for class ``target`` (None for None).

        Read from the run folder; computed (and cached there) only when the explorer is writable.
        """
        target = self.check_target(target)
        if target is None:
            return None
        names = list(layers) if layers else self.layers
        with self._lock:
            cached = self._relevance.get(target)
            if cached is not None and all(n in cached for n in names):
                return {n: cached[n] for n in names}
            if not self.writable:
                raise NotAvailable(
                    f"relevance for class {target} ({self.class_name(target) or target}) is not in "
                    f"{self.run.path / 'relevance'} for layers {names}; this server is read-only: run `semlens describe "
                    f"--run {self.run.path} --target {target}` (or restart with `semlens serve --writable`)")
            from ..workspace import compute_relevance

            compute_relevance(self.run, target, names, progress=False)
            self._relevance[target] = self.run.relevance(target) or {}
            return {n: self._relevance[target][n] for n in names}

    def neuron(self, layer: str, component: int, *, nearest: int = 10) -> dict[str, Any]:
        """Everything about one component: examples and crops, label (with margin), scores,
        relevance for every class cached in the run, and its nearest components in all layers."""
        component = self.check_component(layer, component)
        nearest = _check_int(nearest, "nearest", 0, 100)
        lc = self.db[layer]
        sc = self._scores_of(layer)
        red = sc["redundancy"]
        partner = int(red.partner[component])
        scores = {"n_examples": int(lc.n_valid[component]), "complete": bool(lc.complete[component]),
                  "redundancy": float(red.per_component[component]),
                  "redundancy_partner": partner if partner >= 0 else None,
                  "clarity": float(sc["clarity"][component]) if "clarity" in sc else None,
                  "polysemanticity": float(sc["polysemanticity"][component]) if "polysemanticity" in sc else None}
        rel = []
        for t in self.relevance_targets():
            r = self._relevance[t]
            if layer not in r:
                continue
            v = r[layer].float()
            rank = int((v > v[component]).sum()) + 1
            rel.append({"target": t, "class": self.class_name(t), "relevance": float(v[component]), "rank": rank,
                        "of": int(v.numel())})
        near = []
        emb = lc.embeddings[component].float()
        if nearest and bool((emb != 0).any()):
            with self._lock:
                res = self.lens.search(emb[None], k=nearest + 1, modality="embedding")
            for r in res.to_records():
                if (r["layer"], r["component"]) == (layer, component):
                    continue
                near.append({"layer": r["layer"], "component": r["component"], "score": r["score"],
                             "label": self._label_name(r["layer"], r["component"]),
                             "url": f"/neuron/{_q(r['layer'])}/{r['component']}"})
            near = near[:nearest]
        flagged = None
        if self._audit is not None:
            flagged = any((f.get("layer"), f.get("component")) == (layer, component) for f in self._audit.get("flagged", []))
        return jsonable({"layer": layer, "component": component, "components_in_layer": lc.channels,
                         "label": self.label_of(layer, component), "scores": scores, "examples": self._examples(layer, component),
                         "relevance": rel, "nearest": near, "flagged_in_last_audit": flagged})

    # ------------------------------------------------------------------ describe
    def describe(self, layer: str, *, target: int | None = None, offset: int = 0, limit: int = 200,
                 top: int = 10) -> dict[str, Any]:
        """A layer at a glance: the Lens's summary (stats, label counts, most relevant components)
        and one row per component (paged by ``offset`` / ``limit``)."""
        layer = self.check_layer(layer)
        offset = _check_int(offset, "offset", 0)
        limit = _check_int(limit, "limit", 1, 5000)
        top = _check_int(top, "top", 1, 1000)
        rel = self.relevance(target, [layer]) if target is not None else None
        with self._lock:
            s = self.lens.describe(layer, relevance=rel, target=None, top=top)
        sc = self._scores_of(layer)
        counts: dict[str, int] = {}
        if self._labels is not None:
            for (ln, _c), r in self._labels["by"].items():
                if ln == layer:
                    counts[r["label"]] = counts.get(r["label"], 0) + 1
        counts = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        top_rel = []
        for row in s.top_relevant or []:
            top_rel.append(dict(row, label=self._label_name(layer, row["component"]),
                                url=f"/neuron/{_q(layer)}/{row['component']}"))
        lc = self.db[layer]
        rows = []
        for c in range(offset, min(lc.channels, offset + limit)):
            lab = self.label_of(layer, c) or {}
            rows.append({"component": c, "label": lab.get("label"), "label_score": lab.get("score"),
                         "margin": lab.get("margin"), "n_examples": int(lc.n_valid[c]),
                         "clarity": float(sc["clarity"][c]) if "clarity" in sc else None,
                         "polysemanticity": float(sc["polysemanticity"][c]) if "polysemanticity" in sc else None,
                         "redundancy": float(sc["redundancy"].per_component[c]),
                         "relevance": float(rel[layer][c]) if rel is not None else None,
                         "url": f"/neuron/{_q(layer)}/{c}"})
        return jsonable({"layer": layer, "components": s.n_components, "without_examples": s.n_empty, "stats": s.stats,
                         "label_counts": counts or None, "target": target, "target_class": self.class_name(target),
                         "top_relevant": top_rel or None, "offset": offset, "limit": limit, "rows": rows})

    # ------------------------------------------------------------------ compare
    def compare(self, *, layers: Sequence[str] | None = None, other_layers: Sequence[str] | None = None,
                other: str | None = None, threshold: float = 0.8, vocabulary: bool = False,
                limit: int = 50) -> dict[str, Any]:
        """Concepts shared and unique between layer sets of this run, or this run and another
        (one of ``--compare-with``). The least covered components of each side come first."""
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not -1 <= threshold <= 1:
            raise ArgumentError(f"threshold must be a number in [-1, 1], got {threshold!r}")
        limit = _check_int(limit, "limit", 1, 5000)
        names = self.check_layers(layers)
        if other is None:
            if not other_layers:
                raise ArgumentError("compare: choose the other layers (this run) or another run")
            olens = self.lens
            onames = self.check_layers(other_layers, "other_layers")
            other_labels = self
        else:
            if other not in self.others:
                raise NotFound(f"run {other!r} is not available for comparison; start the server with "
                               f"--compare-with RUN (available: {sorted(self.others) or 'none'})")
            with self._lock:
                if other not in self._other_lens:
                    from ..lens import Lens

                    # same embedding space (checked at open); the other run's model is never loaded
                    self._other_lens[other] = Lens(self.others[other].concept_db(), self.fm, check_foundation=False)
                olens = self._other_lens[other]
            onames = list(other_layers) if other_layers else None
            for n in onames or []:
                if n not in olens.layers:
                    raise ArgumentError(f"other_layers: layer {n!r} is not in run {other!r}; it has {olens.layers}")
            other_labels = None
        vocab = None
        if vocabulary:
            if self._labels is None or not self._labels["vocabulary"]:
                raise NotAvailable(f"compare with labels needs labels.json; run `semlens label --run {self.run.path} "
                                   "--vocab ...` first")
            vocab = self._labels["vocabulary"]
        with self._lock:
            res = self.lens.compare(olens, layers=names, other_layers=onames, threshold=float(threshold),
                                    vocabulary=vocab)

        def side(rows: list[dict[str, Any]], mine: bool) -> list[dict[str, Any]]:
            out = sorted(rows, key=lambda r: (-math.inf if r["score"] is None or math.isnan(r["score"]) else r["score"]))
            res_rows = []
            for r in out[:limit]:
                row = dict(r)
                if mine:
                    row["label"] = self._label_name(r["layer"], r["component"])
                    row["url"] = f"/neuron/{_q(r['layer'])}/{r['component']}"
                    if other is None and r.get("match_layer") is not None:
                        row["match_url"] = f"/neuron/{_q(r['match_layer'])}/{r['match_component']}"
                        row["match_label"] = self._label_name(r["match_layer"], r["match_component"])
                else:
                    if other_labels is not None:
                        row["label"] = self._label_name(r["layer"], r["component"])
                        row["url"] = f"/neuron/{_q(r['layer'])}/{r['component']}"
                    if r.get("match_layer") is not None:
                        row["match_url"] = f"/neuron/{_q(r['match_layer'])}/{r['match_component']}"
                        row["match_label"] = self._label_name(r["match_layer"], r["match_component"])
                res_rows.append(row)
            return res_rows

        return jsonable({"a": {"run": self.run.id, "layers": names or self.layers},
                         "b": {"run": other or self.run.id, "layers": onames or list(olens.layers)},
                         "threshold": res.threshold, "coverage_a": res.coverage_a, "coverage_b": res.coverage_b,
                         "n_a": len(res.a_match), "n_b": len(res.b_match),
                         "a_match": side(res.a_match, True), "b_match": side(res.b_match, False),
                         "concepts": res.concepts})

    # ------------------------------------------------------------------ audit
    def _probes(self, items: Sequence[str], what: str) -> Any:
        if isinstance(items, str) or not isinstance(items, (list, tuple)):
            raise ArgumentError(f"{what} must be a list of concepts")
        items = [str(i).strip() for i in items if str(i).strip()]
        if not items:
            raise ArgumentError(f"{what}: give at least one concept (a text, or class:NAME for an image probe)")
        if len(items) > self.limits.max_concepts:
            raise ArgumentError(f"{what}: at most {self.limits.max_concepts} concepts, got {len(items)}")
        for i in items:
            if len(i) > self.limits.max_query_chars:
                raise ArgumentError(f"{what}: a concept has {len(i)} characters; at most {self.limits.max_query_chars}")
        if len(set(items)) != len(items):
            raise ArgumentError(f"{what}: duplicate concepts")
        if not any(i.startswith("class:") for i in items):
            return items
        return {i: self.class_probe(i[len("class:"):]) if i.startswith("class:") else self.text_probe(i)[0] for i in items}

    def audit(self, *, valid: Sequence[str], spurious: Sequence[str], target: int | None = None,
              layers: Sequence[str] | None = None, threshold: float | None = 0.0, margin: float = 0.0, top: int = 8,
              save: bool = False) -> dict[str, Any]:
        """Components aligned with ``spurious`` rather than ``valid`` concepts (texts, or
        ``class:NAME`` image probes: the mean embedding of 32 training images of the class; the
        two kinds cannot be mixed), with relevance for ``target`` when it is available."""
        kinds = {str(i).startswith("class:") for i in list(valid) + list(spurious) if str(i).strip()}
        if len(kinds) > 1:
            raise ArgumentError("audit: valid and spurious concepts mix texts and class: image probes; text and image "
                                "embeddings are not on a comparable scale (modality gap), so use one kind on both sides")
        for name, v in (("threshold", threshold), ("margin", margin)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ArgumentError(f"{name} must be a finite number, got {v!r}")
        if margin is None:
            raise ArgumentError("margin must be a number, got None")
        top = _check_int(top, "top", 1, 100)
        if save and not self.writable:
            raise NotAvailable("this server is read-only; restart it with `semlens serve --writable` to save audits")
        names = self.check_layers(layers)
        V, S = self._probes(valid, "valid"), self._probes(spurious, "spurious")
        rel = self.relevance(target, names) if target is not None else None
        t0 = time.perf_counter()
        with self._lock:
            raw = getattr(self.data, "images", None) if isinstance(S, dict) or isinstance(V, dict) else None
            result = compute_audit(self.lens, V, S, relevance=rel, target=target, layers=names,
                                   threshold=None if threshold is None else float(threshold), margin=float(margin), top=top,
                                   images=raw if isinstance(raw, torch.Tensor) else None)
        view = audit_view(result)
        view["summary"]["took_ms"] = (time.perf_counter() - t0) * 1e3
        view["summary"]["target_class"] = self.class_name(target)
        if save:
            from ..workspace import save_audit

            with self._lock:
                self._audit = save_audit(self.run, result, source="semlens serve")
            view["summary"]["saved"] = str(self.run.file("audit.json"))
        self._decorate(view)
        return jsonable(view)

    def last_audit(self) -> dict[str, Any] | None:
        """The audit stored in ``audit.json`` (None when there is none)."""
        if self._audit is None:
            return None
        view = stored_audit_view(self._audit)
        view["summary"]["target_class"] = self.class_name(view["summary"].get("target"))
        self._decorate(view)
        return jsonable(view)

    def _decorate(self, view: dict[str, Any]) -> None:
        for rows in (view["flagged"], view["rows"]):
            for r in rows:
                if "layer" in r and "component" in r:
                    r.setdefault("label", self._label_name(r["layer"], int(r["component"])))
                    r["url"] = f"/neuron/{_q(str(r['layer']))}/{int(r['component'])}"

    # ------------------------------------------------------------------ concept map
    def concept_map(self, max_points: int | None = None) -> dict[str, Any]:
        """2-D PCA of every component embedding (computed once); at most ``max_points`` points are
        returned (evenly spaced over the components; flagged ones of the last audit always)."""
        max_points = _check_int(self.limits.max_map_points if max_points is None else max_points, "max_points", 1,
                                self.limits.max_map_points)
        from ..report import pca_2d

        with self._lock:
            if self._map is None:
                mats, where = [], []
                for n in self.layers:
                    e = self.db[n].embeddings
                    keep = (e != 0).any(1).nonzero().flatten()
                    mats.append(e[keep].float())
                    where += [(n, int(c)) for c in keep.tolist()]
                X = torch.cat(mats) if mats else torch.zeros(0, self.db.dim)
                xy = pca_2d(X) if len(X) else torch.zeros(0, 2).numpy()
                self._map = {"xy": xy, "where": where}
            xy, where = self._map["xy"], self._map["where"]
        flagged = {(f.get("layer"), f.get("component")) for f in (self._audit or {}).get("flagged", [])}
        N = len(where)
        if N <= max_points:
            pick = list(range(N))
        else:
            step = N / max_points
            pick = sorted({int(i * step) for i in range(max_points)} |
                          {i for i, w in enumerate(where) if w in flagged})
        pts = [{"layer": where[i][0], "component": where[i][1], "x": float(xy[i, 0]), "y": float(xy[i, 1]),
                "label": self._label_name(*where[i]), "flagged": where[i] in flagged,
                "url": f"/neuron/{_q(where[i][0])}/{where[i][1]}"} for i in pick]
        return jsonable({"n_components": N, "n_shown": len(pts), "layers": self.layers, "points": pts})

    # ------------------------------------------------------------------ images
    def sample_png(self, sample: int) -> bytes:
        if isinstance(sample, bool) or not isinstance(sample, int) or not 0 <= sample < max(self.n_samples, 0):
            raise NotFound(f"sample {sample!r} is not in the data set (ids 0..{self.n_samples - 1})")
        return self._png(sample, None)

    def crop_png(self, layer: str, component: int, rank: int) -> bytes:
        component = self.check_component(layer, component)
        lc = self.db[layer]
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < lc.k:
            raise NotFound(f"rank must be 0..{lc.k - 1}, got {rank!r}")
        if not bool(lc.valid[component, rank]) or int(lc.ids[component, rank]) < 0:
            raise NotFound(f"{layer}:{component} has no example at rank {rank}")
        box = tuple(int(b) for b in lc.boxes[component, rank].tolist())
        return self._png(int(lc.ids[component, rank]), box)

    def _png_uncached(self, sample: int, box: tuple[int, ...] | None) -> bytes:
        from ..examples import crop

        img = self._images.get([sample])[0]
        if box is not None:
            img = crop(img, box, self.input_size)
        return png_bytes(img)


def _q(s: str) -> str:
    from urllib.parse import quote

    return quote(str(s), safe="")
