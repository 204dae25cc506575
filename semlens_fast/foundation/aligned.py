"""``Aligned(vision, text)``: a vision-only model mapped into a text model's space.

The offline stand-in for CLIP ("text-to-concept", Moayeri et al., 2023): a linear map
``z = (v(x) - mu) @ W + b`` is fitted (ridge regression, closed form) so that the mapped
unit image embeddings of labelled images land on the text embedding of their class
caption (the mean of the caption templates, e.g. ``"a photo of a {}"``). Images are then
embedded as ``normalize(z)``; texts with the text model. Both live in the text model's
space, so text queries, labels and descriptions work.

**Limits (read before trusting a label).** The map only knows the concepts its fit saw: an
image of something outside the fitted classes is mapped to a mixture of the fitted classes'
captions, and a text query for an unseen concept is matched by the text model's notion of
similarity to those captions, not by what is in the image. Quality depends on the vision
features separating the classes and on the number of labelled images. It is not CLIP.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .._io import hash_tensors, read_tensors, write_tensors
from ..errors import ArgumentError, ShapeError, StoreError
from .base import IMAGE, TEXT, FoundationModel

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
)


def class_text_embeddings(text: FoundationModel, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
    """``[n_classes, d]``: per class the normalised mean of its templated captions' embeddings."""
    if not templates:
        raise ArgumentError("templates must hold at least one caption template such as 'a photo of a {}.'")
    caps = [t.format(c) for c in class_names for t in templates]
    e = text.encode_texts(caps).view(len(class_names), len(templates), -1).mean(1)
    return F.normalize(e, dim=-1)


class Aligned(FoundationModel):
    """See the module docstring. Build with :meth:`fit` (or :meth:`load` a saved map)."""

    def __init__(self, vision: FoundationModel, text: FoundationModel, W: torch.Tensor, b: torch.Tensor,
                 mu: torch.Tensor, classes: Sequence[str] = (), templates: Sequence[str] = DEFAULT_TEMPLATES,
                 fit_info: dict[str, Any] | None = None):
        super().__init__(device=vision.device, autocast=vision.autocast)
        if IMAGE not in vision.modalities:
            raise ArgumentError(f"vision must embed images; {vision.name} has modalities {sorted(vision.modalities)}")
        if TEXT not in text.modalities:
            raise ArgumentError(f"text must embed texts; {text.name} has modalities {sorted(text.modalities)}")
        if W.shape != (vision.dim, text.dim):
            raise ShapeError(f"W must be [vision.dim, text.dim] = [{vision.dim}, {text.dim}], got {tuple(W.shape)}")
        if b.shape != (text.dim,) or mu.shape != (vision.dim,):
            raise ShapeError(f"b must be [{text.dim}] and mu [{vision.dim}], got {tuple(b.shape)} and {tuple(mu.shape)}")
        self.vision, self.text = vision, text
        self.W, self.b, self.mu = W.float().contiguous(), b.float().contiguous(), mu.float().contiguous()
        self._Wd = self.W.to(vision.device)
        self._bd = self.b.to(vision.device)
        self._mud = self.mu.to(vision.device)
        self.classes = tuple(classes)
        self.templates = tuple(templates)
        self.fit_info = dict(fit_info or {})
        self.image_size, self.mean, self.std = vision.image_size, vision.mean, vision.std
        self.min_image_size = vision.min_image_size
        self.default_batch_size = vision.default_batch_size
        self.name = f"aligned({vision.name} -> {text.name})"
        self.modalities = frozenset({IMAGE, TEXT})

    @property
    def dim(self) -> int:
        return self.text.dim

    def config(self) -> dict[str, Any]:
        c = super().config()
        c.update(vision=self.vision.fingerprint, text=self.text.fingerprint,
                 map=hash_tensors({"W": self.W, "b": self.b, "mu": self.mu}), classes=list(self.classes))
        return c

    def to(self, device):
        self.vision.to(device)
        self.text.to(device)
        self._device = torch.device(device)
        self._Wd, self._bd, self._mud = self.W.to(device), self.b.to(device), self.mu.to(device)
        return self

    def preprocess(self, images: Any) -> torch.Tensor:
        return self.vision.preprocess(images)

    def _encode_image_batch(self, x: torch.Tensor) -> torch.Tensor:
        v = F.normalize(self.vision._encode_image_batch(x).float(), dim=-1)
        return (v - self._mud) @ self._Wd + self._bd

    def _encode_text_batch(self, texts: list[str]) -> torch.Tensor:
        return self.text._encode_text_batch(texts)

    @property
    def image_base(self) -> FoundationModel:
        """The model whose unit image embeddings :meth:`from_base` maps: the vision model. A ConceptDB
        of this model reuses the vision model's embedding cache (the same crops are embedded once)."""
        return self.vision

    def from_base(self, v: torch.Tensor) -> torch.Tensor:
        """Unit embeddings of this model from the vision model's unit image embeddings ``v [N, vision.dim]``."""
        v = F.normalize(torch.as_tensor(v).float(), dim=-1)
        return F.normalize((v.to(self._Wd.device) - self._mud) @ self._Wd + self._bd, dim=-1).cpu()

    def class_embeddings(self, class_names: Sequence[str] | None = None, templates: Sequence[str] | None = None) -> torch.Tensor:
        """Caption embeddings of ``class_names`` (default: the fitted classes) in this model's space."""
        return class_text_embeddings(self.text, list(class_names if class_names is not None else self.classes),
                                     list(templates if templates is not None else self.templates))

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        vision: FoundationModel,
        text: FoundationModel,
        images: Any,
        labels: Any,
        class_names: Sequence[str],
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        ridge: float = 1e-3,
        batch_size: int | None = None,
        progress: bool = False,
        image_embeddings: torch.Tensor | None = None,
    ) -> "Aligned":
        """Fit the map on labelled ``images`` (anything :meth:`FoundationModel.preprocess` takes).

        ``labels[i]`` indexes ``class_names``. ``image_embeddings`` (the vision model's unit
        embeddings of ``images``) skips re-embedding them. ``ridge`` is the L2 penalty per sample.
        """
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if len(class_names) < 2:
            raise ArgumentError(f"class_names must hold at least 2 classes, got {list(class_names)}")
        if labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) >= len(class_names):
            raise ArgumentError(
                f"labels must index class_names (0..{len(class_names) - 1}); got {labels.numel()} labels in "
                f"[{int(labels.min()) if labels.numel() else '-'}, {int(labels.max()) if labels.numel() else '-'}]"
            )
        if image_embeddings is None:
            X = vision.encode_images(images, batch_size=batch_size, progress=progress)
        else:
            X = F.normalize(torch.as_tensor(image_embeddings).float(), dim=-1)
        if X.shape[0] != labels.numel():
            raise ShapeError(f"got {X.shape[0]} images but {labels.numel()} labels; expected one label per image")
        T = class_text_embeddings(text, class_names, templates)
        Y = T[labels]
        Xd, Yd = X.double(), Y.double()
        mu, ybar = Xd.mean(0), Yd.mean(0)
        Xc, Yc = Xd - mu, Yd - ybar
        n, dv = Xc.shape
        lam = float(ridge) * n
        if n < dv:  # dual form: W = Xc^T (Xc Xc^T + lam I)^-1 Yc
            A = Xc @ Xc.T + lam * torch.eye(n, dtype=torch.float64)
            W = Xc.T @ torch.linalg.solve(A, Yc)
        else:
            A = Xc.T @ Xc + lam * torch.eye(dv, dtype=torch.float64)
            W = torch.linalg.solve(A, Xc.T @ Yc)
        Z = F.normalize((Xc @ W + ybar).float(), dim=-1)
        acc = float(((Z @ T.T).argmax(1) == labels).float().mean())
        info = {"n_images": int(n), "ridge": float(ridge), "train_accuracy": acc}
        return cls(vision, text, W.float(), ybar.float(), mu.float(), class_names, templates, info)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted map (safetensors, atomic) with the fingerprints of both models."""
        import json

        path = Path(path)
        meta = {"vision": self.vision.fingerprint, "text": self.text.fingerprint,
                "classes": json.dumps(list(self.classes)), "templates": json.dumps(list(self.templates)),
                "fit_info": json.dumps(self.fit_info), "format": "semlens_fast.aligned_map"}
        write_tensors(path, {"W": self.W, "b": self.b, "mu": self.mu}, metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, vision: FoundationModel, text: FoundationModel) -> "Aligned":
        """Read a map written by :meth:`save`; raises :class:`StoreError` if it was fitted for other models."""
        import json

        from safetensors import safe_open

        path = Path(path)
        t = read_tensors(path)
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("format") != "semlens_fast.aligned_map":
            raise StoreError(f"{path} is not an Aligned map written by Aligned.save")
        for key, m in (("vision", vision), ("text", text)):
            if meta.get(key) != m.fingerprint:
                raise StoreError(
                    f"the map in {path} was fitted for a {key} model with fingerprint {meta.get(key, '?')[:12]}..., "
                    f"but {m.name} has {m.fingerprint[:12]}...; refit with Aligned.fit"
                )
        return cls(vision, text, t["W"], t["b"], t["mu"], json.loads(meta.get("classes", "[]")),
                   json.loads(meta.get("templates", "[]")) or DEFAULT_TEMPLATES, json.loads(meta.get("fit_info", "{}")))
