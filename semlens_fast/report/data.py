"""The report's input model (plain dataclasses), its validation, and :func:`pca_2d`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import ArgumentError, ShapeError


@dataclass
class ComponentCard:
    """One component (channel) of a layer: label, scores, flags and its top-k examples."""

    component: int
    label: str
    label_score: float | None
    relevance: float | None
    flags: list[str]
    images: list[Any]
    image_ids: list[int]
    image_captions: list[str] | None = None
    scores: dict[str, float] = field(default_factory=dict)
    #: the data behind a flagged component: ``(image, sample id, caption)``, each image cropped to the
    #: receptive field of the component's activation peak
    evidence: list[tuple[Any, int, str]] = field(default_factory=list)


@dataclass
class LayerSection:
    """A layer: a name, a one-line note and one card per component."""

    name: str
    note: str
    components: list[ComponentCard]


@dataclass
class SearchSection:
    """The result of one search: the query, a table and optional probe images."""

    query: str
    columns: list[str]
    rows: list[dict]
    images: list[Any] = field(default_factory=list)


@dataclass
class ReportData:
    """Everything :func:`write_report` renders.

    ``concept_map`` is ``None`` or ``{"xy": [N, 2], "labels": [N] str, "groups": [N] str,
    "highlight": [N] bool}`` ("groups" and "highlight" may be omitted).
    """

    title: str
    summary: list[str]
    meta: dict[str, str]
    layers: list[LayerSection]
    searches: list[SearchSection]
    audit_columns: list[str]
    audit_rows: list[dict]
    concept_map: dict | None
    notes: list[str] = field(default_factory=list)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _check_list(value: Any, name: str) -> None:
    if not isinstance(value, (list, tuple)):
        raise ArgumentError(f"{name} must be a list, got {type(value).__name__}")


def _check_optional_number(value: Any, name: str) -> None:
    if value is not None and not _is_number(value):
        raise ArgumentError(f"{name} must be a number or None, got {value!r}")


def validate(data: ReportData) -> None:
    """Check the structure of ``data``; raise an :class:`ArgumentError` naming the bad field.

    Images are checked later, when they are converted (see ``html._to_pil``).
    """
    if not isinstance(data, ReportData):
        raise ArgumentError(f"data must be a ReportData, got {type(data).__name__}")
    if not isinstance(data.title, str):
        raise ArgumentError(f"title must be a str, got {type(data.title).__name__}")
    for name in ("summary", "layers", "searches", "audit_columns", "audit_rows", "notes"):
        _check_list(getattr(data, name), name)
    if not isinstance(data.meta, dict):
        raise ArgumentError(f"meta must be a dict, got {type(data.meta).__name__}")
    for i, row in enumerate(data.audit_rows):
        if not isinstance(row, dict):
            raise ArgumentError(f"audit_rows[{i}] must be a dict, got {type(row).__name__}")
    for li, layer in enumerate(data.layers):
        where = f"layers[{li}]"
        if not isinstance(layer, LayerSection):
            raise ArgumentError(f"{where} must be a LayerSection, got {type(layer).__name__}")
        _check_list(layer.components, f"{where}.components")
        for ci, card in enumerate(layer.components):
            _validate_card(card, f"{where}.components[{ci}]")
    for si, search in enumerate(data.searches):
        where = f"searches[{si}]"
        if not isinstance(search, SearchSection):
            raise ArgumentError(f"{where} must be a SearchSection, got {type(search).__name__}")
        for name in ("columns", "rows", "images"):
            _check_list(getattr(search, name), f"{where}.{name}")
        for ri, row in enumerate(search.rows):
            if not isinstance(row, dict):
                raise ArgumentError(f"{where}.rows[{ri}] must be a dict, got {type(row).__name__}")
    if data.concept_map is not None:
        concept_map_arrays(data.concept_map)


def _validate_card(card: Any, where: str) -> None:
    if not isinstance(card, ComponentCard):
        raise ArgumentError(f"{where} must be a ComponentCard, got {type(card).__name__}")
    if not isinstance(card.component, (int, np.integer)) or isinstance(card.component, bool):
        raise ArgumentError(f"{where}.component must be an int, got {card.component!r}")
    _check_optional_number(card.label_score, f"{where}.label_score")
    _check_optional_number(card.relevance, f"{where}.relevance")
    for name in ("flags", "images", "image_ids"):
        _check_list(getattr(card, name), f"{where}.{name}")
    if len(card.image_ids) != len(card.images):
        raise ArgumentError(
            f"{where}.image_ids has {len(card.image_ids)} entries but {where}.images has {len(card.images)}"
        )
    if card.image_captions is not None:
        _check_list(card.image_captions, f"{where}.image_captions")
        if len(card.image_captions) != len(card.images):
            raise ArgumentError(
                f"{where}.image_captions has {len(card.image_captions)} entries but "
                f"{where}.images has {len(card.images)}"
            )
    if not isinstance(card.scores, dict):
        raise ArgumentError(f"{where}.scores must be a dict, got {type(card.scores).__name__}")
    for key, value in card.scores.items():
        _check_optional_number(value, f"{where}.scores[{key!r}]")


def concept_map_arrays(cmap: dict) -> tuple[np.ndarray, list[str], list[str], list[bool]]:
    """Validate a concept map; return ``(xy [N, 2] float64, labels, groups, highlight)``."""
    if not isinstance(cmap, dict) or "xy" not in cmap:
        raise ArgumentError("concept_map must be a dict with at least the key 'xy'")
    xy_in = cmap["xy"]
    xy = xy_in.detach().cpu().double().numpy() if isinstance(xy_in, torch.Tensor) else np.asarray(xy_in, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ShapeError(f"concept_map['xy'] must have shape [N, 2], got {list(xy.shape)}")
    if not np.isfinite(xy).all():
        raise ArgumentError("concept_map['xy'] contains NaN or infinite values")
    n = xy.shape[0]
    labels = [str(s) for s in cmap.get("labels", [""] * n)]
    groups = [str(s) for s in cmap.get("groups", [""] * n)]
    highlight = [bool(h) for h in cmap.get("highlight", [False] * n)]
    for key, values in (("labels", labels), ("groups", groups), ("highlight", highlight)):
        if len(values) != n:
            raise ShapeError(f"concept_map[{key!r}] has {len(values)} entries but concept_map['xy'] has {n} rows")
    return xy, labels, groups, highlight


def pca_2d(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Project ``x`` [N, d] on its first two principal components; returns float64 [N, 2].

    Centred, via SVD; each component's sign is chosen so that its largest-|loading| entry is
    positive (ties: the first). Components with a (numerically) zero singular value, and all
    of them when N < 2 or the data are constant, give zeros.
    """
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ShapeError(f"x must have shape [N, d], got {list(a.shape)}")
    if not np.isfinite(a).all():
        raise ArgumentError("x contains NaN or infinite values")
    n, d = a.shape
    out = np.zeros((n, 2), dtype=np.float64)
    if n < 2 or d == 0:
        return out
    centred = a - a.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    tol = (s[0] if s.size else 0.0) * max(n, d) * np.finfo(np.float64).eps
    for k in range(min(2, s.size)):
        if s[k] <= tol or s[k] == 0.0:
            continue
        v = vt[k]
        if v[int(np.argmax(np.abs(v)))] < 0:
            v = -v
        out[:, k] = centred @ v
    return out


def fmt(value: Any) -> str:
    """Format a table value: floats with 3 significant digits, None as "–", bools as yes/no."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    elif isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "nan"
        return f"{v:.3g}"
    return str(value)
