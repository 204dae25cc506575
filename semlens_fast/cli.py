"""The ``semlens`` command: every stage of the pipeline on a run folder.

Run ``semlens COMMAND --help`` for each command. All commands take ``--run DIR`` (default
``$SEMLENS_RUN`` or ``semlens-demo``, the folder ``semlens demo`` fills) and ``--json``
(machine-readable output on stdout).

Exit codes: 0 success; 1 unexpected error (``--debug`` shows the traceback); 2 bad
arguments or input; 3 a needed artifact or data set is missing (the message says what to
run); 4 artifacts that do not belong together or are damaged; 5 ``audit --fail-on-flagged``
flagged components; 6 another semlens process is writing the run folder.

A run folder that names ``package.module:function`` factories is code: commands call them
only with ``--trust`` or when they are listed in ``$XDG_CONFIG_HOME/semlens/trusted-factories``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

from ._version import __version__

EXIT_OK, EXIT_ERROR, EXIT_ARGS, EXIT_MISSING, EXIT_MISMATCH, EXIT_FLAGGED, EXIT_BUSY = 0, 1, 2, 3, 4, 5, 6
DEFAULT_RUN = "semlens-demo"
MAX_IMAGE_PIXELS = 50_000_000   # probe images larger than this are refused (decompression bombs)
MAX_IMAGE_BYTES = 256 << 20
MAX_VOCAB_BYTES = 16 << 20


class CommandError(Exception):
    def __init__(self, message: str, code: int = EXIT_ARGS):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------- output helpers
def _clean(obj: Any) -> Any:
    """JSON-safe copy (NaN -> null, tuples -> lists, tensors -> lists)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "tolist"):
        return _clean(obj.tolist())
    return obj


def _emit(args: argparse.Namespace, data: Any, text: str | Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(_clean(data), indent=1))
    else:
        print(text() if callable(text) else text)


def _list(values: list[str] | None) -> list[str]:
    """Repeated and/or comma-separated option values -> one list."""
    out: list[str] = []
    for v in values or []:
        out += [p.strip() for p in v.split(",") if p.strip()]
    return out


def _open(args: argparse.Namespace):
    from .workspace import Run

    return Run.open(args.run, trust=getattr(args, "trust", False))


def _load_image(path: str | Path, what: str, alpha: bool = False) -> Any:
    """An RGB PIL image from ``path`` (RGBA when ``alpha`` and the file has transparency); missing files
    exit 3, anything that is not a readable image of at most MAX_IMAGE_PIXELS pixels exits 2."""
    import warnings

    from PIL import Image

    p = Path(path)
    try:
        ok = p.is_file()
        size = p.stat().st_size if ok else 0
    except OSError as exc:
        raise CommandError(f"{what} {str(path)[:100]!r} cannot be used: {exc.strerror or exc}") from None
    if not ok:
        raise CommandError(f"{what} {p} does not exist (or is not a file)", EXIT_MISSING)
    if size == 0 or size > MAX_IMAGE_BYTES:
        raise CommandError(f"{what} {p} is {'empty' if size == 0 else f'{size} bytes, too large'}; expected an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(p)
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS or w < 1 or h < 1:
                raise CommandError(f"{what} {p} is {w}x{h} pixels; at most {MAX_IMAGE_PIXELS:,} pixels are accepted")
            return im.convert("RGBA") if alpha and im.mode in ("RGBA", "LA", "P") else im.convert("RGB")
    except CommandError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise CommandError(f"{what} {p} is not a readable image ({type(exc).__name__}: {str(exc)[:120]})") from None


# ---------------------------------------------------------------------- commands
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(steps=args.steps)
    say = (lambda s: None) if args.json else print
    findings = run_demo(args.run, fresh=args.fresh, report=not args.no_report, progress=not args.no_progress,
                        say=say, cfg=cfg)
    if args.json:
        print(json.dumps(_clean(findings), indent=1))
    return EXIT_OK


def _spec(value: str, what: str) -> dict[str, Any]:
    builtin = {"fashion-mnist": {"kind": "fashion-mnist", "split": "train"},
               "fashion-mnist-test": {"kind": "fashion-mnist", "split": "test"},
               "digits": {"kind": "digits", "split": "train"}}
    if what == "--data" and value in builtin:
        return builtin[value]
    from .workspace import _TARGET

    if ":" not in value or not _TARGET.match(value):
        choices = ", ".join(builtin) + " or " if what == "--data" else ""
        raise CommandError(f"{what} must be {choices}package.module:function (called with no arguments), got {value[:100]!r}")
    return {"kind": "factory", "target": value}


def cmd_collect(args: argparse.Namespace) -> int:
    from .collect import collect
    from .workspace import Run, store_digest

    layers = _list(args.layers)
    if not layers:
        raise CommandError("--layers: name at least one layer (model.named_modules() names, comma-separated)")
    # the specs on the command line are the user's own: trusted for this call; run.json is
    # written only once they resolved (a mistyped --model leaves nothing behind)
    run = Run.create(args.run, _spec(args.model, "--model"), _spec(args.data, "--data"), trust=True, write=False)
    try:
        with run.writing():
            _collect_locked(args, run, layers, collect, store_digest)
    except BaseException:
        run.discard()
        raise
    return EXIT_OK


def _collect_locked(args: argparse.Namespace, run: Any, layers: list[str], collect: Callable, store_digest: Callable) -> None:
    model, ds = run.model(), run.data()
    if args.k > len(ds):
        raise CommandError(f"--k {args.k} is larger than the data set ({len(ds)} samples); give at most {len(ds)}")
    if run.classes is None and getattr(ds, "classes", None):
        run.manifest["classes"] = [str(c) for c in ds.classes]
    run.commit()
    from .errors import StoreError

    try:
        store = collect(model, ds, layers, k=args.k, pool=args.pool, batch_size=args.batch_size, store=run.topk_path,
                        checkpoint_every=args.checkpoint_every, progress=not args.no_progress, overwrite=args.overwrite)
    except StoreError as exc:
        msg = str(exc).replace("collect(..., overwrite=True)", "--overwrite")
        raise CommandError(msg, EXIT_MISMATCH) from None
    run.update(stages={"collect": dict(layers=layers, k=args.k, pool=args.pool, lists_sha256=store_digest(store))},
               classes=run.manifest.get("classes"))
    rows = [{"layer": n, "components": store[n].channels, "k": store[n].k,
             "filled": int((store[n].ids >= 0).sum()), "nan_excluded": int(store[n].nan_counts.sum())} for n in layers]
    from .lens import _table

    _emit(args, {"run": str(run.path), "layers": rows},
          lambda: f"collected into {run.topk_path}\n" + _table(rows, ["layer", "components", "k", "filled", "nan_excluded"]))


def cmd_embed(args: argparse.Namespace) -> int:
    from .concepts import build_concept_db
    from .workspace import concepts_digest, parse_fm

    spec = parse_fm(args.fm)
    run = _open(args)
    store = run.store()
    if spec["kind"] == "aligned":
        prev = run.stage("foundation") or {}
        spec = prev.get("fm", {"kind": "aligned"})
    fm = run.foundation(spec)
    layers = _list(args.layers) or None
    kw = {"model": run.model(), "data": run.data()} if args.mode != "full" else {}
    import torch

    db = build_concept_db(store, fm, run.data(), layers, mode=args.mode, path=run.concepts_path,
                          cache=run.file("cache"), overwrite=True, progress=not args.no_progress,
                          dtype=getattr(torch, args.dtype), **kw)
    run.record("embed", fm=spec, mode=args.mode, layers=list(db.layers), concepts_sha256=concepts_digest(db))
    if getattr(fm, "image_base", None) is not None and args.mode != "text":
        # audits with image probes use the vision model's space: the same crops, from the shared cache
        from .workspace import build_vision_db

        build_vision_db(run, spec, args.mode, list(db.layers), dtype=getattr(torch, args.dtype),
                        progress=not args.no_progress, **kw)
    rows = [{"layer": n, "components": db[n].channels, "with_examples": int((db[n].n_valid > 0).sum()), "dim": db.dim}
            for n in db.layers]
    from .lens import _table

    _emit(args, {"run": str(run.path), "foundation": fm.name, "layers": rows},
          lambda: f"ConceptDB in {run.concepts_path} ({fm.name})\n" + _table(rows, ["layer", "components", "with_examples", "dim"]))
    return EXIT_OK


def cmd_search(args: argparse.Namespace) -> int:
    from .workspace import RunMismatchError, read_artifact

    run = _open(args)
    if not args.query and not args.image:
        raise CommandError("search: give a text QUERY and/or --image PATH")
    queries: list[tuple[str, Any]] = [(f"text: {q}", q) for q in args.query]
    for p in args.image or []:
        queries.append((f"image: {p}", _load_image(p, "--image")))
    lens = run.lens()
    layers = _list(args.layers) or None
    results = []
    for name, q in queries:
        res = lens.search(q if isinstance(q, str) else [q], k=args.k, layers=layers, per_layer=args.per_layer)
        rows = [dict(rank=r["rank"], layer=r["layer"], component=r["component"], score=r["score"]) for r in res.to_records()]
        results.append({"query": name, "rows": rows})
    try:
        prev = read_artifact(run, "searches.json") or {}
    except RunMismatchError as exc:  # a damaged search history is replaced, not trusted
        print(f"semlens search: note: {exc}; starting a new search history", file=sys.stderr)
        prev = {}
    keep = prev.get("searches", []) if isinstance(prev, dict) and isinstance(prev.get("searches"), list) else []
    run.write_json("searches.json", {"run_id": run.id, "searches": (keep + results)[-20:]})
    from .lens import _table

    _emit(args, results, lambda: "\n\n".join(r["query"] + "\n" + _table(r["rows"], ["rank", "layer", "component", "score"])
                                             for r in results))
    return EXIT_OK


def _vocab(args: argparse.Namespace) -> list[str]:
    vocab = _list(args.vocab)
    if args.vocab_file:
        p = Path(args.vocab_file)
        try:
            if not p.is_file():
                raise CommandError(f"--vocab-file {p} does not exist", EXIT_MISSING)
            if p.stat().st_size > MAX_VOCAB_BYTES:
                raise CommandError(f"--vocab-file {p} is larger than {MAX_VOCAB_BYTES >> 20} MB; expected one label per line")
            raw = p.read_bytes()
        except OSError as exc:
            raise CommandError(f"--vocab-file {str(p)[:100]!r} cannot be read: {exc.strerror or exc}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CommandError(f"--vocab-file {p} is not UTF-8 text; expected one label per line") from None
        if "\x00" in text:
            raise CommandError(f"--vocab-file {p} is a binary file; expected one label per line")
        vocab += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return vocab


def cmd_label(args: argparse.Namespace) -> int:
    from .workspace import save_labels

    run = _open(args)
    vocab = _vocab(args)
    if not vocab:
        raise CommandError("label: give --vocab 'a,b,c' or --vocab-file FILE (one label per line)")
    lens = run.lens()
    labels = lens.label(vocab, threshold=args.threshold, layers=_list(args.layers) or None)
    records = labels.to_records()
    prev = _labels(run, strict=False)
    if prev is not None:  # keep the labels of the layers not relabelled now
        records = [r for r in prev["records"] if r["layer"] not in labels.layers] + records
    save_labels(run, vocab, records)
    _emit(args, {"records": labels.to_records(), "counts": {n: labels.counts(n) for n in labels.layers}}, lambda: str(labels))
    return EXIT_OK


def _labels(run: Any, strict: bool = True) -> Any:
    """labels.json of this run (None if absent; another run's: an error, or None with strict=False;
    a damaged one: an error)."""
    from .workspace import load_labels

    return load_labels(run, other_run_ok=not strict)


class _StoredLabels:
    """labels.json as an object with ``.labels_for(layer)`` (what validate_concepts accepts)."""

    def __init__(self, data: dict[str, Any]):
        self.by_layer: dict[str, dict[int, str]] = {}
        for r in data["records"]:
            if r["label"] != "unlabelled":
                self.by_layer.setdefault(r["layer"], {})[int(r["component"])] = r["label"]

    def labels_for(self, layer: str) -> dict[int, str]:
        return self.by_layer.get(layer, {})


def cmd_describe(args: argparse.Namespace) -> int:
    from .workspace import compute_relevance

    run = _open(args)
    lens = run.lens()
    layers = _list(args.layer) or lens.layers
    rel = compute_relevance(run, args.target, layers, progress=not args.no_progress) if args.target is not None else None
    stored = _labels(run)
    out, texts = [], []
    for n in layers:
        s = lens.describe(n, relevance=rel, target=None, vocabulary=None)
        if stored is not None:
            counts: dict[str, int] = {}
            for r in stored["records"]:
                if r["layer"] == n:
                    counts[r["label"]] = counts.get(r["label"], 0) + 1
            s.label_counts = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
            if s.top_relevant:
                names = {int(r["component"]): r["label"] for r in stored["records"] if r["layer"] == n}
                for row in s.top_relevant:
                    row["label"] = names.get(row["component"], "")
        out.append({"layer": n, "components": s.n_components, "without_examples": s.n_empty, "stats": s.stats,
                    "label_counts": s.label_counts, "top_relevant": s.top_relevant})
        texts.append(str(s))
    _emit(args, out, lambda: "\n\n".join(texts))
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from .workspace import Run

    run = _open(args)
    lens = run.lens()
    other = Run.open(args.other, trust=args.trust).lens() if args.other else lens
    if args.other is None and not args.other_layers:
        raise CommandError("compare: give --other RUN (another run folder) and/or --other-layers (compare layers of this run)")
    vocab = _vocab(args) or None
    res = lens.compare(other, layers=_list(args.layers) or None, other_layers=_list(args.other_layers) or None,
                       threshold=args.threshold, vocabulary=vocab)
    _emit(args, {"coverage_a": res.coverage_a, "coverage_b": res.coverage_b, "threshold": res.threshold,
                 "a_match": res.a_match, "b_match": res.b_match, "concepts": res.concepts}, lambda: str(res))
    return EXIT_OK


def _audit_probe(item: str, what: str) -> tuple[str, str, Any]:
    """One --valid/--spurious entry, checked before any model is loaded -> (name, kind, spec).

    ``TEXT``; ``image:PATH[+PATH...]`` (a picture, several averaged into one concept; globs allowed);
    ``paste:PATH[@YxX]`` (the counterfactual probe: the picture pasted at row Y, column X, or at random places)."""
    import glob

    def paths(spec: str) -> list[Path]:
        out: list[Path] = []
        for part in [p for p in spec.split("+") if p]:
            hits = sorted(glob.glob(part)) if any(ch in part for ch in "*?[") else [part]
            if not hits:
                raise CommandError(f"{what}: no image matches {part!r}", EXIT_MISSING)
            for h in hits:
                if not Path(h).is_file():
                    raise CommandError(f"{what}: image {h} does not exist", EXIT_MISSING)
                out.append(Path(h))
        if not out:
            raise CommandError(f"{what}: {item!r} names no image")
        return out

    def load(p: Path) -> Any:
        return _load_image(p, f"{what}: image", alpha=True)

    if item.startswith("image:"):
        ps = paths(item[6:])
        return (f"image {'+'.join(p.name for p in ps)}", "picture", [load(p).convert("RGB") for p in ps])
    if item.startswith("paste:"):
        spec, _, at = item[6:].partition("@")
        ps = paths(spec)
        if len(ps) != 1:
            raise CommandError(f"{what}: paste: takes one picture, got {len(ps)}")
        pos = None
        if at:
            try:
                y, x = (int(v) for v in at.lower().split("x"))
            except ValueError:
                raise CommandError(f"{what}: paste:PATH@YxX needs two ints (row x column), got {at!r}") from None
            if y < 0 or x < 0:
                raise CommandError(f"{what}: paste position must be >= 0, got {at!r}")
            pos = (y, x)
        return (f"paste {ps[0].name}" + (f"@{pos[0]}x{pos[1]}" if pos else ""), "transform", (load(ps[0]), pos))
    return (item, "text", item)


def cmd_audit(args: argparse.Namespace) -> int:
    from .workspace import RELEVANCE_SAMPLES, class_relevance, save_audit

    run = _open(args)
    valid, spurious = _list(args.valid), _list(args.spurious)
    if not spurious:
        raise CommandError("audit: give --spurious: a text, image:PATH[+PATH...] (a picture of the artifact; several "
                           "are averaged) or paste:PATH[@YxX] (the picture pasted into the data: a counterfactual probe)")
    if not 0 < args.fdr < 1:
        raise CommandError(f"--fdr must be in (0, 1), got {args.fdr}")
    if args.top < 1:
        raise CommandError(f"--top must be >= 1, got {args.top}")
    for opt in ("threshold", "margin"):
        v = getattr(args, opt)
        if v is not None and not math.isfinite(v):
            raise CommandError(f"--{opt} must be a finite number, got {v}")
    classes = run.classes
    if args.target is not None and (args.target < 0 or (classes and args.target >= len(classes))):
        rng = f"0..{len(classes) - 1}" if classes else ">= 0"
        raise CommandError(f"--target must be a class index in {rng}, got {args.target}")
    vp = [_audit_probe(v, "--valid") for v in valid]
    sp = [_audit_probe(v, "--spurious") for v in spurious]
    kinds = {k == "text" for _, k, _ in vp + sp}
    if len(kinds) > 1:
        raise CommandError("audit: --valid and --spurious mix texts and image probes; text and image embeddings "
                           "are not on a comparable scale (modality gap), so use the same kind on both sides")
    text = kinds == {True}
    run.require("embed", f"semlens embed --run {run.path} --fm ...")
    # ---- arguments are valid: load the models
    lens = run.lens() if text else run.vision_lens()
    layers = _list(args.layers) or lens.layers
    for n in layers:
        if n not in lens.layers:
            raise CommandError(f"--layers: {n!r} is not in the ConceptDB; it holds {lens.layers}")
    from .intervene import Paste

    def probes(items):
        out = {}
        for name, kind, spec in items:
            out[name] = Paste(spec[0], at=spec[1]) if kind == "transform" else spec
        return out

    data = run.data()
    raw = hasattr(data, "images")  # raw images: transforms, the causal check and the data behind the flags
    model = run.model() if raw else None
    rel = class_relevance(run, layers, progress=not args.no_progress)
    report = lens.audit(probes(vp) or None, probes(sp), relevance=rel, target=args.target, layers=layers,
                        model=model, data=data if raw else None, fdr=args.fdr, top=args.top,
                        threshold=args.threshold, margin=args.margin, causal=not args.no_causal,
                        relevance_samples=RELEVANCE_SAMPLES, progress=not args.no_progress)
    save_audit(run, report)
    out = report.to_dict()
    out["n_components"] = len(report.components)
    if text:
        fm = getattr(lens, "fm", None)
        if fm is not None and type(fm).__name__ == "Aligned":
            out["caveat"] = ("text probes through Aligned: the map knows only the concepts it was fitted on "
                             f"({', '.join(getattr(fm, 'classes', ())[:12])}); without a trained CLIP the text route "
                             "cannot be judged")
    _emit(args, out, lambda: str(report) + (f"\nnote: {out['caveat']}" if "caveat" in out else ""))
    return EXIT_FLAGGED if (args.fail_on_flagged and report.flagged) else EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    if args.case_study:
        return _validate_case_study(args)
    import torch

    from .validate import validate_concepts

    if not args.layer:
        raise CommandError("validate: give --layer LAYER --keep LABEL[,LABEL] (or --case-study modular-addition|2sat)")
    run = _open(args)
    stored = _labels(run)
    keep = _list(args.keep)
    if not keep:
        raise CommandError("validate: give --keep LABEL[,LABEL] (the concepts the decision should rely on)")
    if stored is None:
        raise CommandError(f"validate needs labels; run `semlens label --run {run.path} --vocab ...` first", EXIT_MISSING)
    ds = run.data()
    n = min(len(ds), 2000 if args.samples is None else args.samples)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(ds), generator=g)[:n].sort().values.tolist()
    sub = torch.utils.data.Subset(ds, idx)
    res = validate_concepts(run.model(), args.layer, sub, keep, labels=_StoredLabels(stored),
                            confidence=args.confidence, progress=not args.no_progress)
    a3 = res.replaceability
    _emit(args, {"layer": res.layer, "kept": res.kept, "ablated": res.ablated, "concepts": res.concepts,
                 "n": a3.n, "successes": a3.successes, "epsilon": a3.epsilon, "confidence": a3.confidence,
                 "counterexamples": [idx[i] for i in a3.counterexamples]}, lambda: str(res))
    return EXIT_OK


def _validate_case_study(args: argparse.Namespace) -> int:
    """The axiomatic-validation paper's own case studies, our table beside the paper's."""
    import torch

    from .validate.paper import modular_addition, two_sat

    if args.layer or args.keep:
        raise CommandError("validate: --case-study runs a packaged model; it takes no --layer/--keep")
    if args.samples is not None and args.samples < 1:
        raise CommandError(f"validate: --samples must be >= 1, got {args.samples}")
    if args.device is not None:
        try:
            dev = torch.device(args.device)
        except (RuntimeError, ValueError):
            raise CommandError(f"validate: --device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise CommandError(f"validate: --device {args.device!r}: no CUDA device is available here; use cpu")
    mod = modular_addition if args.case_study == "modular-addition" else two_sat
    if not mod.WEIGHTS.exists():
        raise CommandError(f"validate: the {args.case_study} weights are missing ({mod.WEIGHTS}); make them with "
                           f"`python scripts/train_paper_case_studies.py {args.case_study}` from a source checkout",
                           EXIT_MISSING)
    kw = dict(confidence=args.confidence, progress=not args.no_progress, device=args.device)
    if args.case_study == "modular-addition":
        model, info = modular_addition.load_model()
        data = modular_addition.dataset(model.config["d_vocab"] - 1, info.get("frac_train", modular_addition.FRAC_TRAIN),
                                        info.get("seed", 0))
        if args.samples is not None and args.samples < len(data.test):  # a random subset of the test pairs
            pick = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(0))[: args.samples]
            data.test = data.test[pick].sort().values
        report = modular_addition.run_modular_addition(model, data=data, info=info, **kw)
    else:
        model, info = two_sat.load_model()
        report = two_sat.run_two_sat(model, n_test=args.samples or two_sat.PAPER_N, info=info, **kw)
    _emit(args, report.to_records(), lambda: str(report))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from .report.from_run import build_report

    run = _open(args)
    path = build_report(run, args.out, progress=not args.no_progress)
    _emit(args, {"report": str(path)}, f"report: {path}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.explorer import Limits
    from .serve.server import serve

    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_upload_pixels=int(args.max_upload_mpx * 1e6))
    if limits.max_upload_bytes < 1 or limits.max_upload_pixels < 1:
        raise CommandError("--max-upload-mb and --max-upload-mpx must be positive")
    ready = (lambda url: print(json.dumps({"url": url, "run": str(args.run), "writable": args.writable}))) if args.json else None
    return serve(args.run, host=args.host, port=args.port, writable=args.writable, compare_with=args.compare_with or [],
                 limits=limits, access_log=args.access_log, say=(lambda s: None) if args.json else print, on_ready=ready,
                 trust=args.trust)


def cmd_bench(args: argparse.Namespace) -> int:
    import subprocess

    root = Path(__file__).resolve().parent.parent
    script = root / "benchmarks" / "run.py"
    if not script.is_file():
        raise CommandError(f"benchmarks not found at {script}: `semlens bench` runs from a source checkout "
                           "(git clone, then pip install -e .)", EXIT_MISSING)
    env = dict(os.environ)
    if args.scale is not None:
        env["SEMLENS_BENCH_SCALE"] = str(args.scale)
    r = subprocess.run([sys.executable, str(script), *args.suites], cwd=root, env=env)
    if r.returncode == 0:
        _emit(args, {"benchmarks": str(root / "BENCHMARKS.md")}, f"wrote {root / 'BENCHMARKS.md'}")
    return EXIT_OK if r.returncode == 0 else EXIT_ERROR


# ---------------------------------------------------------------------- parser
MAX_INT_ARG = 1 << 31


def _positive_int(text: str) -> int:
    """argparse type: an int in 1 .. 2**31 (argparse turns the ValueError into exit 2)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text[:40]!r}") from None
    if not 1 <= v <= MAX_INT_ARG:
        raise argparse.ArgumentTypeError(f"expected a whole number in 1..{MAX_INT_ARG}, got {text[:40]}")
    return v


def _finite_float(text: str) -> float:
    """argparse type: a finite float."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text[:40]!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text[:40]}")
    return v


# commands that write into the run folder they read: main() holds the folder's write lock for them
# (collect and demo take it themselves, once the folder is known to be theirs)
_WRITERS = {"embed", "search", "label", "audit", "report"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="semlens",
        description="semlens_fast: explain neural networks by mapping their components into a foundation model's "
                    "space. Start with `semlens demo`; then every command works on the demo's run folder.",
        epilog="Exit codes: 0 ok, 1 unexpected error, 2 bad arguments/input, 3 missing artifact or data, "
               "4 artifacts that do not belong together or are damaged, 5 audit --fail-on-flagged found components, "
               "6 another semlens process is writing the run folder.",
    )
    p.add_argument("--version", action="version", version=f"semlens_fast {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help: str, fn: Callable, run: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        if run:
            sp.add_argument("--run", default=os.environ.get("SEMLENS_RUN", DEFAULT_RUN),
                            help=f"run folder (default $SEMLENS_RUN or {DEFAULT_RUN})")
            sp.add_argument("--trust", action="store_true",
                            help="call the package.module:function factories the run folder names (they are code: "
                                 "use it only for run folders you trust; or list them in "
                                 "$XDG_CONFIG_HOME/semlens/trusted-factories)")
        sp.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
        sp.add_argument("--no-progress", action="store_true", help="hide progress bars")
        sp.add_argument("--debug", action="store_true", help="show tracebacks of errors")
        sp.set_defaults(fn=fn)
        return sp

    d = add("demo", "the offline demo: plant a stamp on one Fashion-MNIST class, train a CNN, find the channels "
                    "that encode the stamp (collect, embed, label, search, audit with relevance) and write a report",
            cmd_demo)
    d.add_argument("--fresh", action="store_true", help="delete the run folder first (recompute everything)")
    d.add_argument("--no-report", action="store_true", help="skip the HTML report")
    d.add_argument("--steps", type=_positive_int, default=800, help="training steps of the CNN (default 800)")

    c = add("collect", "track the top-k most-activating samples of every component of some layers", cmd_collect)
    c.add_argument("--model", required=True, help="package.module:function returning the nn.Module")
    c.add_argument("--data", required=True, help="fashion-mnist, fashion-mnist-test, digits, or package.module:function "
                                                  "returning a dataset (ds[i] is an input or (input, label))")
    c.add_argument("--layers", action="append", required=True, help="layer names (model.named_modules()), comma-separated")
    c.add_argument("--k", type=_positive_int, default=20, help="examples per component (default 20)")
    c.add_argument("--pool", default="max", choices=["max", "mean", "absmax", "sum"], help="spatial/token pooling")
    c.add_argument("--batch-size", type=_positive_int, default=256)
    c.add_argument("--checkpoint-every", type=_positive_int, default=100, help="batches between checkpoints (a killed run resumes)")
    c.add_argument("--overwrite", action="store_true", help="replace a top-k store of another model/data/k")

    e = add("embed", "embed each component's top examples with a foundation model (the ConceptDB)", cmd_embed)
    e.add_argument("--fm", default="aligned", help="vision[:SIZE] (MobileNetV2, image probes only), aligned (the demo's "
                                                  "vision->text map), text (MiniLM, for text data), openclip:ARCH[:PRETRAINED|CHECKPOINT] "
                                                  "(default aligned)")
    e.add_argument("--mode", default="activation", choices=["full", "activation"], help="whole images or activation crops")
    e.add_argument("--layers", action="append", help="layers (default: all collected)")
    e.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="storage dtype")

    s = add("search", "find the components closest to a text or an image", cmd_search)
    s.add_argument("query", nargs="*", help="text queries")
    s.add_argument("--image", action="append", help="image file(s) as probes")
    s.add_argument("--k", type=_positive_int, default=10)
    s.add_argument("--layers", action="append")
    s.add_argument("--per-layer", action="store_true", help="rank within each layer")

    lb = add("label", "label every component with the closest concept of a vocabulary", cmd_label)
    lb.add_argument("--vocab", action="append", help="labels, comma-separated")
    lb.add_argument("--vocab-file", help="file with one label per line")
    lb.add_argument("--threshold", type=_finite_float, default=None, help="leave components below this score unlabelled")
    lb.add_argument("--layers", action="append")

    ds = add("describe", "summarise layers: labels, clarity, polysemanticity, redundancy, most relevant components",
             cmd_describe)
    ds.add_argument("--layer", action="append", help="layers (default all)")
    ds.add_argument("--target", type=int, help="class index: list the components most relevant for it")

    cp = add("compare", "concepts shared and unique between two runs (or two layers of one run)", cmd_compare)
    cp.add_argument("--other", help="the other run folder (same foundation model)")
    cp.add_argument("--layers", action="append")
    cp.add_argument("--other-layers", action="append")
    cp.add_argument("--threshold", type=_finite_float, default=0.8, help="match score that counts as shared (default 0.8)")
    cp.add_argument("--vocab", action="append", help="also compare label counts over this vocabulary")
    cp.add_argument("--vocab-file")

    au = add("audit", "calibrated audit: the components that encode a suspected artifact (flags under an FDR), the "
                      "classes that rely on it, and the training data behind it", cmd_audit)
    au.add_argument("--spurious", action="append",
                    help="the suspected artifact: paste:PATH[@YxX] (its picture pasted into the data: counterfactual "
                         "probe and causal check), image:PATH[+PATH...] (a picture; several are averaged) or a text")
    au.add_argument("--valid", action="append", help="optional concepts the model should use (same forms), reported "
                                                     "beside the spurious scores")
    au.add_argument("--target", type=int, help="class index to report relevance shares for (default: every class is "
                                               "audited and ranked)")
    au.add_argument("--layers", action="append")
    au.add_argument("--fdr", type=float, default=0.1, help="false-discovery rate of the flags (default 0.1)")
    au.add_argument("--top", type=int, default=20, help="samples listed per flagged component (default 20)")
    au.add_argument("--threshold", type=float, default=None, help="also require this (centred) cosine score")
    au.add_argument("--margin", type=float, default=None, help="also require the score to beat the best --valid "
                                                              "concept's by this much")
    au.add_argument("--no-causal", action="store_true", help="skip the foundation-model-free causal check")
    au.add_argument("--fail-on-flagged", action="store_true", help="exit 5 when components are flagged")

    v = add("validate", "test 'the decision at LAYER relies only on components labelled KEEP' (axiom A3 bound), "
                        "or run the axiomatic-validation paper's case studies beside its table (--case-study)",
            cmd_validate)
    v.add_argument("--layer", help="layer whose components are kept or mean-ablated")
    v.add_argument("--keep", action="append", help="labels to keep (the rest is mean-ablated)")
    v.add_argument("--case-study", choices=["modular-addition", "2sat"],
                   help="the paper's case study on the packaged model: every axiom at every component, our epsilon "
                        "beside the paper's (no run folder needed)")
    v.add_argument("--samples", type=_positive_int, default=None,
                   help="samples tested (default 2000; case studies: the paper's test set size, 8,939 pairs / "
                        "80,001 formulas)")
    v.add_argument("--device", default=None, help="case studies: torch device (default: cpu)")
    v.add_argument("--confidence", type=float, default=0.95)

    r = add("report", "write the HTML report of a run (grids, labels, audit, search results, concept map)", cmd_report)
    r.add_argument("--out", help="output folder (default RUN/report)")

    sv = add("serve", "an interactive explorer of the run in the browser (search, neurons, describe, compare, audit, "
                      "concept map) with a JSON API; read-only unless --writable", cmd_serve)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    sv.add_argument("--writable", action="store_true", help="allow writes to the run folder: relevance for new "
                                                            "classes (cached in RUN/relevance/), saving audits")
    sv.add_argument("--compare-with", action="append", help="another run folder the Compare page may use (repeatable)")
    sv.add_argument("--max-upload-mb", type=float, default=8.0, help="largest uploaded image file (default 8 MiB)")
    sv.add_argument("--max-upload-mpx", type=float, default=16.0, help="largest uploaded image in megapixels (default 16)")
    sv.add_argument("--access-log", action="store_true", help="log every request")

    b = add("bench", "run the benchmark suites side by side with the peers and rewrite BENCHMARKS.md", cmd_bench,
            run=False)
    b.add_argument("suites", nargs="*", help="suite files, e.g. bench_topk.py, or short names: `relevance` runs "
                                             "every bench_relevance*.py (speed and the evaluation table) (default all)")
    b.add_argument("--scale", type=float, help="SEMLENS_BENCH_SCALE: shrink the problem sizes (e.g. 0.1)")
    return p


def _exit_code(exc: BaseException) -> int | None:
    """The exit code of a known error, None for an unexpected one."""
    import errno

    from .errors import ArgumentError, ConcurrentWriteError, DTypeError, SemlensError, StoreError

    if isinstance(exc, CommandError):
        return exc.code
    if isinstance(exc, ConcurrentWriteError):
        return EXIT_BUSY
    if isinstance(exc, OSError) and exc.errno in (errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR, errno.EISDIR,
                                                  errno.EACCES, errno.EPERM, errno.EROFS):
        return EXIT_ARGS  # a path the user gave that the OS cannot use
    from .workspace import MissingArtifactError

    if isinstance(exc, MissingArtifactError):
        return EXIT_MISSING
    if isinstance(exc, StoreError):
        return EXIT_MISMATCH
    if isinstance(exc, (ArgumentError, DTypeError)):
        return EXIT_ARGS
    if isinstance(exc, SemlensError):
        return EXIT_ERROR
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # model-loading bars of transformers
    if args.command is None:
        parser.print_help()
        return EXIT_OK
    try:
        writes = args.command in _WRITERS or (args.command == "describe" and args.target is not None)
        if writes and getattr(args, "run", None) is not None:
            from .workspace import Run, check_path

            p = check_path(args.run)
            if (p / "run.json").is_file():
                with Run(p, {}).writing():
                    return int(args.fn(args))
        return int(args.fn(args))
    except KeyboardInterrupt:
        print("semlens: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line unless --debug
        if args.debug:
            raise
        code = _exit_code(exc)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if code is None:
            print(f"semlens {args.command}: unexpected error: {type(exc).__name__}: {msg} "
                  "(rerun with --debug for the traceback)", file=sys.stderr)
            return EXIT_ERROR
        print(f"semlens {args.command}: error: {msg}", file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
