"""Planted artifacts: a family of cases where the truth is known, to measure audits on.

A *case* is (architecture, mark, class, seed): a mark (:data:`MARKS`: shape, size, place and
contrast vary) is painted on ``fraction`` of the training images of one class of a seeded
Fashion-MNIST subset, a small network (:data:`ARCHITECTURES`) is trained on it, the top-k
most-activating training images of every component of its audit layers are collected and
embedded (activation crops, the offline MobileNetV2) into a ConceptDB.

**Ground truth** (:func:`ground_truth`), measured on held-out clean test images of all classes:

* *activation statistics*: a component encodes the mark when the mark raises its pooled
  activation by at least ``min_effect`` standard deviations of its clean distribution *and* at
  least half of its top-k training images carry the mark (the first condition alone counts
  generic detectors whose top images are not the mark; the second alone counts components of
  the marked class, whose top images carry the mark only because most images of the class do);
* *ablation*: the share of the mark's effect on the class's logit that flows through the
  component: the logit gain of marked over clean images, and the gain when that component's
  activation on the marked image is patched back to its clean value; ``importance = 1 -
  patched / unpatched``. A component is causally used when ``importance >= min_importance``.

:func:`score_audit` turns an :class:`~semlens_fast.audit.AuditReport` into the benchmark's
figures. ``benchmarks/planted.py`` runs the grid; ``tests/test_planted.py`` a reduced version.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ArgumentError

__all__ = ["Mark", "MARKS", "ARCHITECTURES", "PlantedCase", "build_case", "ground_truth", "score_audit", "auc",
           "aligned_untold"]


# ---------------------------------------------------------------------- marks


@dataclass(frozen=True)
class Mark:
    """A mark painted at fixed pixels of 28x28 images (a transform: ``mark(images) -> images``,
    idempotent). ``text``: how a user would describe it (for text probes)."""

    name: str
    text: str
    pixels: tuple[tuple[int, int], ...]
    value: int = 255

    def mask(self, H: int = 28, W: int = 28) -> torch.Tensor:
        m = torch.zeros(H, W, dtype=torch.bool)
        ys, xs = zip(*self.pixels)
        m[list(ys), list(xs)] = True
        return m

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = images.clone()
        m = self.mask(images.shape[-2], images.shape[-1])
        v = self.value if images.dtype == torch.uint8 else self.value / 255.0
        out[..., m] = v
        return out

    @property
    def box(self) -> tuple[int, int, int, int]:
        ys, xs = zip(*self.pixels)
        return min(ys), min(xs), max(ys) + 1, max(xs) + 1

    def picture(self, margin: int = 2, background: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The mark alone, as a user would draw it: ``(uint8 [h, w] picture, bool [h, w] mask of the mark's pixels)``,
        its bounding box plus ``margin`` pixels of ``background`` on every side."""
        y0, x0, y1, x1 = self.box
        m = torch.zeros(y1 - y0 + 2 * margin, x1 - x0 + 2 * margin, dtype=torch.bool)
        m[margin:margin + y1 - y0, margin:margin + x1 - x0] = self.mask()[y0:y1, x0:x1]
        pic = torch.full(m.shape, background, dtype=torch.uint8)
        pic[m] = self.value
        return pic, m


def _rect(y0: int, x0: int, h: int, w: int) -> tuple[tuple[int, int], ...]:
    return tuple((y, x) for y in range(y0, y0 + h) for x in range(x0, x0 + w))


def _cross(y0: int, x0: int, s: int) -> tuple[tuple[int, int], ...]:
    return tuple(sorted({(y0 + i, x0 + i) for i in range(s)} | {(y0 + i, x0 + s - 1 - i) for i in range(s)}))


MARKS: dict[str, Mark] = {m.name: m for m in (
    Mark("square", "a white square", _rect(1, 1, 5, 5)),                      # solid, top-left
    Mark("line", "a thin white line", _rect(25, 8, 1, 12)),                   # 1 px, bottom edge
    Mark("cross", "a white letter X", _cross(1, 20, 7)),                      # thin strokes, top-right
    Mark("dots", "a grid of white dots", tuple((21 + 2 * i, 1 + 2 * j) for i in range(3) for j in range(3))),  # bottom-left
    Mark("glyph", "the letter T", _rect(10, 20, 1, 6) + _rect(11, 22, 6, 2)),  # right middle (often on the object)
    Mark("faint", "a faint grey square", _rect(1, 11, 6, 6), value=80),       # low contrast, top-middle
)}

ARCHITECTURES = ("cnn", "bncnn", "resnet")


def make_model(arch: str, seed: int) -> nn.Module:
    """The untrained network of a case: its initial weights depend on ``seed`` only (not on the global RNG)."""
    from .models import BatchNormCNN, FashionCNN, SmallResNet

    kinds = {"cnn": FashionCNN, "bncnn": BatchNormCNN, "resnet": SmallResNet}
    if arch not in kinds:
        raise ArgumentError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return kinds[arch]()
    finally:
        torch.random.set_rng_state(state)


# ---------------------------------------------------------------------- a case


@dataclass
class PlantedCase:
    arch: str
    mark: Mark
    target: int
    seed: int
    model: nn.Module
    data: Any              # ImageDataset of the marked training subset; data.marked = bool [N]
    test: Any              # clean held-out ImageDataset
    layers: list[str]
    store: Any
    db: Any                # vision ConceptDB (activation crops)
    fm: Any
    cache: Path
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.arch}-{self.mark.name}-c{self.target}-s{self.seed}"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int, batch: int = 64,
           lr: float = 2e-3) -> None:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def build_case(arch: str, mark: str | Mark, target: int, seed: int, *, n_train: int = 10000, steps: int = 500,
               fraction: float = 0.9, k: int = 20, n_test: int = 2000, cache_dir: str | os.PathLike | None = None,
               fm: Any = None, progress: bool = False) -> PlantedCase:
    """Build (or load from ``cache_dir``) one case; see the module docstring."""
    from ._io import read_tensors, write_json, write_tensors
    from .collect import collect
    from .concepts import build_concept_db
    from .data import ImageDataset, fashion_mnist
    from .foundation import PackagedVision
    from .models import default_cache_dir

    mk = MARKS[mark] if isinstance(mark, str) else mark
    base, test_all = fashion_mnist("train"), fashion_mnist("test")
    if base.source != "fashion-mnist":
        raise ArgumentError("the planted-artifact cases need Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    spec = {"arch": arch, "mark": [mk.name, list(map(list, mk.pixels)), mk.value], "target": int(target),
            "seed": int(seed), "n_train": n_train, "steps": steps, "fraction": fraction, "k": k, "v": 2}
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "planted"
    folder = root / f"{arch}-{mk.name}-c{target}-s{seed}-{_digest(spec)}"
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(base), generator=g)[:n_train]
    imgs, labels = base.images[perm].clone(), base.labels[perm].clone()
    marked = (labels == target) & (torch.rand(n_train, generator=g) < fraction)
    imgs[marked] = mk(imgs[marked])
    data = ImageDataset(imgs, labels, f"fashion-mnist+{mk.name}", base.classes, base.mean, base.std)
    data.marked = marked  # type: ignore[attr-defined]
    test = ImageDataset(test_all.images[:n_test].clone(), test_all.labels[:n_test].clone(), "fashion-mnist-test",
                        base.classes, base.mean, base.std)
    model = make_model(arch, seed)  # the initial weights are part of the case
    wfile = folder / "model.safetensors"
    if wfile.exists():
        model.load_state_dict(read_tensors(wfile))
        model.eval()
    else:
        x, y = data.tensors()
        _train(model, x, y, steps, seed)
        write_tensors(wfile, {kk: v.detach().clone() for kk, v in model.state_dict().items()})
    layers = list(model.audit_layers)  # type: ignore[attr-defined]
    mfile = folder / "metrics.json"
    if mfile.exists():
        from ._io import read_json

        metrics = read_json(mfile)
    else:
        metrics = _shortcut_metrics(model, test, mk, target)
        write_json(mfile, metrics)
    store = collect(model, data, layers, k=k, pool="max", store=folder / "topk", progress=progress)
    fm = fm if fm is not None else PackagedVision(image_size=64)
    db = build_concept_db(store, fm, imgs.unsqueeze(1), layers, mode="activation", model=model, data=data,
                          cache=folder / "cache", path=folder / "db-vision", progress=progress)
    return PlantedCase(arch, mk, int(target), int(seed), model, data, test, layers, store, db, fm, folder, metrics)


@torch.no_grad()
def _shortcut_metrics(model: nn.Module, test: Any, mk: Mark, target: int) -> dict[str, float]:
    from .data import ImageDataset

    x, y = test.tensors()
    xm, _ = ImageDataset(mk(test.images), test.labels, "", test.classes, test.mean, test.std).tensors()
    p, pm = model(x).argmax(1), model(xm).argmax(1)
    other = y != target
    return {"accuracy_clean": float((p == y).float().mean()), "accuracy_marked": float((pm == y).float().mean()),
            "others_to_target_clean": float((p[other] == target).float().mean()),
            "others_to_target_marked": float((pm[other] == target).float().mean())}


def aligned_untold(vision: Any, cache_dir: str | os.PathLike | None = None, per_class: int = 200) -> Any:
    """``Aligned(MobileNetV2 -> MiniLM)`` fitted on clean labelled test images of the 10 classes only:
    it was told nothing about any mark (cached under ``cache_dir``)."""
    from .data import fashion_mnist
    from .foundation import Aligned, SentenceTransformerText
    from .models import default_cache_dir

    text = SentenceTransformerText()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "planted"
    f = root / f"aligned-untold-{per_class}.safetensors"
    if f.exists():
        try:
            return Aligned.load(f, vision, text)
        except Exception:  # noqa: BLE001 - refit
            pass
    test = fashion_mnist("test")
    idx = torch.cat([(test.labels == c).nonzero().flatten()[-per_class:] for c in range(10)])
    al = Aligned.fit(vision, text, test.images[idx].unsqueeze(1), test.labels[idx], list(test.classes))
    root.mkdir(parents=True, exist_ok=True)
    al.save(f)
    return al


# ---------------------------------------------------------------------- ground truth


def _norm(raw: torch.Tensor, ds: Any) -> torch.Tensor:
    return (raw.float().unsqueeze(1) / 255.0 - ds.mean) / ds.std


@torch.no_grad()
def ground_truth(case: PlantedCase, *, n: int = 1000, n_ablation: int = 256, min_effect: float = 1.0,
                 min_share: float = 0.5, min_importance: float = 0.05) -> dict[str, Any]:
    """Per layer ``[C]``: ``share`` (marked share of the top-k training images), ``effect`` (standardised
    change of the pooled activation under the mark), ``importance`` (share of the mark's logit effect
    flowing through the component), and the truths ``act`` and ``abl`` (see the module docstring)."""
    from .intervene import pooled_activations

    model, mk, T = case.model, case.mark, case.target
    test = case.test
    ids = torch.arange(min(n, len(test)))
    x0 = _norm(test.images[ids], test)
    x1 = _norm(mk(test.images[ids]), test)
    a0, _ = pooled_activations(model, x0, case.layers)
    a1, _ = pooled_activations(model, x1, case.layers)
    out: dict[str, Any] = {"layers": {}}
    # ablation: patch one component back to its clean map on non-target images
    other = (test.labels[ids] != T).nonzero().flatten()[:n_ablation]
    xc, xm = x0[other], x1[other]
    mods = dict(model.named_modules())
    clean_maps: dict[str, torch.Tensor] = {}
    hs = [mods[nm].register_forward_hook(lambda m, i, o, nm=nm: clean_maps.__setitem__(nm, o.detach()))
          for nm in case.layers]
    zc = model(xc)[:, T]
    for h in hs:
        h.remove()
    zm = model(xm)[:, T]
    gain = float((zm - zc).mean())
    out["logit_gain"] = gain
    for nm in case.layers:
        d = a1[nm] - a0[nm]
        sd = a0[nm].std(0)
        eff = torch.where(sd > 0, d.mean(0) / sd.clamp(min=1e-12), torch.zeros_like(sd))
        st = case.store[nm]
        valid = st.ids >= 0
        share = (case.data.marked[st.ids.clamp(min=0)] & valid).float().sum(1) / valid.sum(1).clamp(min=1)
        C = a0[nm].shape[1]
        imp = torch.zeros(C)
        for c in range(C):
            def patch(m, i, o, c=c, nm=nm):
                o = o.clone()
                o[:, c] = clean_maps[nm][:, c]
                return o

            h = mods[nm].register_forward_hook(patch)
            zp = model(xm)[:, T]
            h.remove()
            imp[c] = (1 - float((zp - zc).mean()) / gain) if abs(gain) > 1e-6 else 0.0
        act = (eff >= min_effect) & (share >= min_share)
        out["layers"][nm] = {"share": share, "effect": eff, "importance": imp, "act": act,
                             "abl": imp >= min_importance}
    out["params"] = {"n": int(ids.numel()), "n_ablation": int(other.numel()), "min_effect": min_effect,
                     "min_share": min_share, "min_importance": min_importance}
    return out


# ---------------------------------------------------------------------- scoring


def auc(score: torch.Tensor, truth: torch.Tensor) -> float:
    """Area under the ROC curve of ``score`` for ``truth`` (ties count half); NaN without both classes."""
    s = torch.nan_to_num(score.double(), nan=-1e300)
    pos, neg = s[truth], s[~truth]
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    gt = (pos[:, None] > neg[None]).double().mean()
    eq = (pos[:, None] == neg[None]).double().mean()
    return float(gt + 0.5 * eq)


def score_audit(case: PlantedCase, report: Any, truth: dict[str, Any], which: str = "act") -> dict[str, Any]:
    """The benchmark's figures of one audit against ``truth[...][which]``."""
    rows = report.components
    t = torch.tensor([bool(truth["layers"][r["layer"]][which][r["component"]]) for r in rows])
    flagged = torch.tensor([bool(r["flagged"]) for r in rows])
    z = torch.tensor([r["z"] for r in rows], dtype=torch.float64)
    p = torch.tensor([r["p_value"] for r in rows], dtype=torch.float64)
    rank = torch.tensor([r["rank"] for r in rows])
    tp = int((flagged & t).sum())
    nf, nt = int(flagged.sum()), int(t.sum())
    out: dict[str, Any] = {
        "n_components": len(rows), "n_true": nt, "n_flagged": nf, "true_positives": tp,
        "precision": tp / nf if nf else float("nan"), "recall": tp / nt if nt else float("nan"),
        "auc": auc(-torch.nan_to_num(p, nan=2.0) + 1e-9 * torch.nan_to_num(z, nan=-1e9), t),
        "first_true_rank": int(rank[t].min()) if nt else None,
    }
    if report.classes:
        out["class_rank1"] = report.classes[0]["cls"]
        out["class_correct"] = report.classes[0]["cls"] == case.target
        tr = next((r["rank"] for r in report.classes if r["cls"] == case.target), None)
        out["target_class_rank"] = tr
        out["affected"] = [r["cls"] for r in report.classes if r["relies"]]
    listed = [s["id"] for r in report.flagged for s in r.get("samples", [])]
    if listed:
        out["listed"] = len(listed)
        out["listed_marked_share"] = float(case.data.marked[torch.tensor(listed)].float().mean())
        un = [not s["changed_by_transform"] for r in report.flagged for s in r.get("samples", [])
              if "changed_by_transform" in s]
        if un:
            out["listed_unchanged_share"] = sum(un) / len(un)
        cls = (report.method.get("samples") or {}).get("class")
        if cls is not None and getattr(case.data, "labels", None) is not None:
            # the base rate: the share of the listed class's training images that carry the mark
            out["class_marked_rate"] = float(case.data.marked[case.data.labels == int(cls)].float().mean())
    if report.agreement:
        out["agreement"] = dict(report.agreement)
        causal = torch.tensor([bool(r.get("causal", False)) for r in rows])
        ctp, nc = int((causal & t).sum()), int(causal.sum())
        out["causal_precision"] = ctp / nc if nc else float("nan")
        out["causal_recall"] = ctp / nt if nt else float("nan")
    return out
