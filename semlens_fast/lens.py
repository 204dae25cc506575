"""The Lens: search, label, describe, compare and audit a model's concepts.

``Lens(db, foundation_model)`` composes a :class:`~semlens_fast.concepts.ConceptDB` (or any
object with the same small contract, below) with the foundation model the DB was built
with. Every similarity goes through the tiled top-k kernels of :mod:`semlens_fast.ops`
(``cosine_topk`` / ``pairwise_topk`` / ``pairwise_max``): no components x queries matrix
is ever built, so vocabularies of thousands of concepts over millions of components, and
50k x 50k comparisons, run in bounded memory on any device the embeddings live on.

**The DB contract** (met by :class:`~semlens_fast.concepts.ConceptDB`): ``db.layers`` is a
mapping (or iterable) of layer names and ``db[layer]`` returns an object with
``embeddings [C, d]`` (unit component embeddings; zero rows = components without
examples) and optionally ``examples [C, k, d]`` (per-example embeddings), ``valid [C, k]``
(bool) and ``ids [C, k]`` (sample ids, -1 = none). A plain ``{layer: Tensor[C, d]}`` dict
works too (search, label, compare, redundancy). ``db.check_foundation(fm)``, when present,
is called to refuse a foundation model other than the DB's.

**Text probes** (the paper's null-subtracted probes): for query ``q`` and templates
``t_1..t_T``::

    probe(q) = 1/T sum_j ( embed(t_j.format(q)) - embed(t_j.format("")) )

computed per query; semanticlens 0.2.1 built its prompts template-major and reshaped them
query-major, averaging prompts of *different* queries when there were several queries and
several templates; here each probe only ever sees its own query (tested).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from . import scores as _scores
from .audit import AuditReport
from .audit import run_audit as _run_audit
from .errors import ArgumentError, SemlensError, ShapeError
from .ops import cosine_topk, pairwise_max

__all__ = ["Lens", "SearchResult", "LabelResult", "CompareResult", "AuditReport", "LayerSummary", "DEFAULT_TEMPLATES",
           "UNLABELLED"]

DEFAULT_TEMPLATES: tuple[str, ...] = ("{}",)
UNLABELLED = "unlabelled"


# ---------------------------------------------------------------------- small helpers


def _pandas():
    try:
        import pandas as pd
    except ImportError as exc:  # pragma: no cover - pandas is optional
        raise ImportError("to_pandas() needs pandas; use to_records() for plain dicts") from exc
    return pd


def _table(rows: list[dict[str, Any]], columns: Sequence[str], max_rows: int = 30) -> str:
    """A plain fixed-width text table."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.3f}"
        if isinstance(v, (list, tuple)):
            return ",".join(str(x) for x in v[:5]) + (",..." if len(v) > 5 else "")
        return str(v)

    shown = rows[:max_rows]
    cells = [[fmt(r.get(c, "")) for c in columns] for r in shown]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    if len(rows) > max_rows:
        lines.append(f"... ({len(rows) - max_rows} more rows)")
    return "\n".join(lines)


class _Records:
    """Mixin: ``to_records()`` -> list of dicts; ``to_pandas()`` -> DataFrame."""

    def to_records(self) -> list[dict[str, Any]]:  # pragma: no cover - overridden
        raise NotImplementedError

    def to_pandas(self):
        return _pandas().DataFrame.from_records(self.to_records())

    def __len__(self) -> int:
        return len(self.to_records())


@dataclass
class _Layer:
    embeddings: torch.Tensor
    examples: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    boxes: torch.Tensor | None = None


def _check_vectors(q: torch.Tensor, what: str, texts: Sequence[str] | None = None) -> None:
    """Refuse probe vectors that are zero or not finite (they would score 0.0 / NaN against everything)."""
    bad = ~torch.isfinite(q).all(1)
    zero = q.abs().amax(1) == 0 if q.numel() else torch.zeros(0, dtype=torch.bool)
    for i in (bad | zero).nonzero().flatten().tolist():
        name = f" {texts[i]!r}" if texts is not None and i < len(texts) else ""
        raise ArgumentError(f"{what}{name} (row {i}) is {'not finite' if bool(bad[i]) else 'a zero vector'}: it "
                            "cannot be compared by cosine; give a non-empty query")


def _number(v: Any, what: str, allow_none: bool = True) -> float | None:
    """A finite number (not a bool, not a string), or None when allowed."""
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise ArgumentError(f"{what} must be a finite number{' or None' if allow_none else ''}, got {v!r}")
    return float(v)


def _is_texts(q: Any) -> bool:
    return isinstance(q, str) or (isinstance(q, (list, tuple)) and len(q) > 0 and all(isinstance(x, str) for x in q))


# ---------------------------------------------------------------------- results


@dataclass
class SearchResult(_Records):
    """Top matches of :meth:`Lens.search`: one row per (query, match), tidy.

    Columns: ``query`` (index), ``text`` (the query text, if any), ``layer``, ``component``,
    ``score`` (cosine), ``rank`` (0 = best; across the searched layers, or within each layer
    with ``per_layer=True``).
    """

    query: list[int]
    text: list[str | None]
    layer: list[str]
    component: list[int]
    score: list[float]
    rank: list[int]

    def to_records(self) -> list[dict[str, Any]]:
        return [dict(query=q, text=t, layer=l, component=c, score=s, rank=r)
                for q, t, l, c, s, r in zip(self.query, self.text, self.layer, self.component, self.score, self.rank)]

    def __str__(self) -> str:
        return _table(self.to_records(), ["query", "text", "layer", "component", "score", "rank"])


@dataclass
class LabelResult(_Records):
    """Labels of :meth:`Lens.label`, per layer.

    For each layer: ``best [C]`` int64 index into ``vocabulary`` (-1 = unlabelled: score
    below the threshold, or a component without examples), ``score [C]`` (cosine with the
    best label's probe; NaN for components without examples), ``runner_up [C]`` and
    ``margin [C]`` (best minus runner-up score; NaN with a 1-word vocabulary).
    ``labels_for(layer)`` gives ``{component: label}`` of the labelled components (the form
    :func:`semlens_fast.validate.validate_concepts` accepts).
    """

    vocabulary: list[str]
    threshold: float | None
    best: dict[str, torch.Tensor]
    score: dict[str, torch.Tensor]
    runner_up: dict[str, torch.Tensor]
    margin: dict[str, torch.Tensor]

    @property
    def layers(self) -> list[str]:
        return list(self.best)

    def names(self, layer: str) -> list[str]:
        """The label of every component of ``layer`` (``"unlabelled"`` where none)."""
        return [self.vocabulary[i] if i >= 0 else UNLABELLED for i in self._get(self.best, layer).tolist()]

    def labels_for(self, layer: str) -> dict[int, str]:
        b = self._get(self.best, layer)
        return {int(c): self.vocabulary[int(b[c])] for c in (b >= 0).nonzero().flatten().tolist()}

    def counts(self, layer: str) -> dict[str, int]:
        """How many components carry each label (``"unlabelled"`` included), most frequent first."""
        out: dict[str, int] = {}
        for n in self.names(layer):
            out[n] = out.get(n, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))

    def _get(self, d: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
        if layer not in d:
            raise ArgumentError(f"layer {layer!r} was not labelled; labelled layers: {list(d)}")
        return d[layer]

    def to_records(self) -> list[dict[str, Any]]:
        rows = []
        for layer in self.best:
            names = self.names(layer)
            ru = self.runner_up[layer].tolist()
            for c, (s, m) in enumerate(zip(self.score[layer].tolist(), self.margin[layer].tolist())):
                rows.append(dict(layer=layer, component=c, label=names[c], score=s, margin=m,
                                 runner_up=self.vocabulary[ru[c]] if ru[c] >= 0 else None))
        return rows

    def __str__(self) -> str:
        return _table(self.to_records(), ["layer", "component", "label", "score", "margin", "runner_up"])


@dataclass
class CompareResult(_Records):
    """Output of :meth:`Lens.compare` between component sets A (this lens) and B (the other).

    ``a_match`` / ``b_match``: per component of A (of B) its best match in the other set:
    records ``(layer, component, match_layer, match_component, score)``. ``coverage_a``:
    the share of A's components whose best match in B scores at least ``threshold`` (how
    much of A is also in B); ``coverage_b`` the other way. ``concepts``: with a vocabulary,
    one row per label: how many components of A and B carry it and whether it is shared.
    """

    threshold: float
    a_match: list[dict[str, Any]]
    b_match: list[dict[str, Any]]
    coverage_a: float
    coverage_b: float
    concepts: list[dict[str, Any]] | None = None

    def to_records(self) -> list[dict[str, Any]]:
        return [dict(side="A", **r) for r in self.a_match] + [dict(side="B", **r) for r in self.b_match]

    def concepts_pandas(self):
        return _pandas().DataFrame.from_records(self.concepts or [])

    def __str__(self) -> str:
        s = (f"compare: {len(self.a_match)} components (A) vs {len(self.b_match)} (B); threshold {self.threshold}\n"
             f"coverage of A by B: {self.coverage_a:.3f}   coverage of B by A: {self.coverage_b:.3f}")
        if self.concepts:
            s += "\n" + _table(self.concepts, ["label", "n_a", "n_b", "status"])
        return s


@dataclass
class LayerSummary:
    """Output of :meth:`Lens.describe`: a summary of one layer."""

    layer: str
    n_components: int
    n_empty: int
    clarity: torch.Tensor | None
    polysemanticity: torch.Tensor | None
    redundancy: _scores.Redundancy
    label_counts: dict[str, int] | None = None
    top_relevant: list[dict[str, Any]] | None = None
    stats: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"layer {self.layer!r}: {self.n_components} components ({self.n_empty} without examples)"]
        lines += [f"  {k}: {v:.3f}" for k, v in self.stats.items()]
        if self.label_counts:
            lines.append(_table([{"label": k, "count": v} for k, v in self.label_counts.items()], ["label", "count"], 15))
        if self.top_relevant:
            lines.append(_table(self.top_relevant, ["component", "relevance", "label", "clarity"], 15))
        return "\n".join(lines)


# ---------------------------------------------------------------------- the Lens


class Lens:
    """Search, label, describe, compare and audit the concepts of a ConceptDB (see the module docstring).

    Args:
        db: a :class:`~semlens_fast.concepts.ConceptDB`, an object with the same contract,
            or a ``{layer: Tensor[C, d]}`` dict.
        foundation_model: the DB's foundation model (needed for text and image queries;
            embeddings can be searched without it).
        templates: default prompt templates of text probes (``"{}"`` placeholder).
        check_foundation: call ``db.check_foundation(fm)`` (fingerprint match) if available.
    """

    def __init__(self, db: Any, foundation_model: Any = None, *, templates: Sequence[str] = DEFAULT_TEMPLATES,
                 check_foundation: bool = True):
        self.db = db
        self.fm = foundation_model
        self.templates = self._check_templates(templates)
        if isinstance(db, Mapping) and all(isinstance(v, torch.Tensor) for v in db.values()):
            self._layers = {str(n): _Layer(v) for n, v in db.items()}
        else:
            if not hasattr(db, "layers"):
                raise ArgumentError(f"db must be a ConceptDB (with .layers and db[layer].embeddings) or a {{layer: Tensor[C, d]}} "
                                    f"dict, got {type(db).__name__}")
            names = list(db.layers)
            self._layers = {}
            for n in names:
                lc = db[n]
                self._layers[n] = _Layer(lc.embeddings, getattr(lc, "examples", None), getattr(lc, "valid", None),
                                         getattr(lc, "ids", None), getattr(lc, "boxes", None))
        if not self._layers:
            raise ArgumentError("db holds no layers")
        dims = {int(lay.embeddings.shape[-1]) for lay in self._layers.values()}
        for n, lay in self._layers.items():
            if lay.embeddings.dim() != 2:
                raise ShapeError(f"db[{n!r}].embeddings must be [C, d], got shape {tuple(lay.embeddings.shape)}")
        if len(dims) != 1:
            raise ShapeError(f"all layers of db must have the same embedding dimension, got {sorted(dims)}")
        self.dim = dims.pop()
        if foundation_model is not None:
            if check_foundation and hasattr(db, "check_foundation"):
                db.check_foundation(foundation_model)
            elif int(getattr(foundation_model, "dim", self.dim)) != self.dim:
                raise ShapeError(f"the foundation model embeds into {foundation_model.dim} dimensions but the db holds "
                                 f"{self.dim}-d embeddings; use the DB's foundation model")
        self._score_cache: dict[tuple[str, str], Any] = {}

    # ------------------------------------------------------------------ basics
    @property
    def layers(self) -> list[str]:
        return list(self._layers)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: C={lay.embeddings.shape[0]}" for n, lay in self._layers.items())
        return f"Lens(dim={self.dim}, fm={getattr(self.fm, 'name', None)!r}, layers={{{parts}}})"

    def _resolve_layers(self, layers: str | Sequence[str] | None, arg: str = "layers") -> list[str]:
        if layers is None:
            return self.layers
        if not isinstance(layers, (str, Sequence)) or any(not isinstance(n, str) for n in
                                                            ([layers] if isinstance(layers, str) else layers)):
            raise ArgumentError(f"{arg} must be a layer name, a list of layer names or None, got {layers!r}")
        names = [layers] if isinstance(layers, str) else list(layers)
        if not names:
            raise ArgumentError(f"{arg} is empty; give layer names from {self.layers} or None for all")
        for n in names:
            if n not in self._layers:
                raise ArgumentError(f"{arg}: layer {n!r} is not in the ConceptDB; it holds {self.layers}")
        if len(set(names)) != len(names):
            raise ArgumentError(f"{arg} names a layer twice: {names}")
        return names

    def _layer(self, layer: str) -> _Layer:
        return self._layers[self._resolve_layers(layer, "layer")[0]]

    @staticmethod
    def _check_templates(templates: Sequence[str] | None) -> tuple[str, ...]:
        if templates is None:
            return ()
        if isinstance(templates, str):
            templates = [templates]
        templates = tuple(templates)
        import string

        for t in templates:
            if not isinstance(t, str) or "{}" not in t:
                raise ArgumentError(f"templates must be strings with a '{{}}' placeholder (e.g. 'a photo of {{}}'), got {t!r}")
            try:
                fields = [f for _, f, _, _ in string.Formatter().parse(t) if f is not None]
            except ValueError as exc:
                raise ArgumentError(f"templates: {t!r} is not a valid format string ({exc}); use exactly one '{{}}' "
                                    "placeholder and write literal braces as '{{{{' and '}}}}'") from None
            if fields != [""]:
                raise ArgumentError(f"templates: {t!r} must have exactly one '{{}}' placeholder (no names, no indices, "
                                    f"no second placeholder); it has {len(fields)}: {fields}")
        return templates

    def _need_fm(self, modality: str):
        if self.fm is None:
            raise ArgumentError(f"{modality} queries need a foundation model: Lens(db, foundation_model=<the DB's model>)")
        mods = getattr(self.fm, "modalities", None)
        if mods is not None and modality not in mods:
            msg = getattr(self.fm, "_no_modality_msg", None)
            from .foundation.base import ModalityError

            raise ModalityError(msg(modality) if callable(msg) else
                                f"the foundation model {getattr(self.fm, 'name', self.fm)!r} has no {modality} encoder")
        return self.fm

    # ------------------------------------------------------------------ embedding queries
    def embed_texts(self, texts: str | Sequence[str], templates: Sequence[str] | None = None,
                    null_subtract: bool = True) -> torch.Tensor:
        """Text probes ``[Q, d]`` (see the module docstring); ``templates=()`` embeds the raw texts."""
        if not isinstance(texts, (str, Sequence)):
            raise ArgumentError(f"a text query / vocabulary must be a str or a list of str, got {type(texts).__name__}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ArgumentError("the text query / vocabulary is empty; give at least one string")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ArgumentError(f"texts[{i}] must be a str, got {type(t).__name__}")
            if not t.strip() and null_subtract:  # without null subtraction an empty text is the null prompt itself
                raise ArgumentError(f"texts[{i}] is empty or whitespace ({t!r}): a text probe needs words (its "
                                    "null-subtracted probe would be a zero vector)")
        fm = self._need_fm("text")
        tpl = self.templates if templates is None else self._check_templates(templates)
        if not tpl:
            return fm.encode_texts(texts).float()
        T = len(tpl)
        prompts = [t.format(q) for q in texts for t in tpl]  # query-major: row q*T + j
        emb = fm.encode_texts(prompts).float().reshape(len(texts), T, -1)
        if null_subtract:
            empty = fm.encode_texts([t.format("") for t in tpl]).float()
            emb = emb - empty.unsqueeze(0)
        out = emb.mean(1)
        if null_subtract:
            _check_vectors(out, "the text probe", texts)
        return out

    def embed(self, query: Any, modality: str | None = None, templates: Sequence[str] | None = None) -> torch.Tensor:
        """Any query -> probe embeddings ``[Q, d]``.

        ``modality``: ``"text"`` (str or list of str), ``"image"`` (anything
        ``fm.encode_images`` takes) or ``"embedding"`` (``[Q, d]`` / ``[d]``); ``None``
        guesses: strings are text, a float tensor whose last axis is ``d`` with 1-2 axes is
        an embedding, anything else an image.
        """
        if modality not in (None, "text", "image", "embedding"):
            raise ArgumentError(f"modality must be 'text', 'image', 'embedding' or None, got {modality!r}")
        if isinstance(query, (list, tuple)) and len(query) == 0:
            raise ArgumentError("the query is empty; give at least one text, image or embedding")
        if modality is None:
            if _is_texts(query):
                modality = "text"
            elif isinstance(query, torch.Tensor) and query.dim() in (1, 2) and query.shape[-1] == self.dim \
                    and query.is_floating_point():
                modality = "embedding"
            else:
                modality = "image"
        if modality == "text":
            return self.embed_texts(query, templates)
        if modality == "embedding":
            try:
                q = torch.as_tensor(query)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ArgumentError(f"embedding queries must be numbers, [Q, {self.dim}] or [{self.dim}]; got "
                                    f"{type(query).__name__} ({str(exc).splitlines()[0][:80]})") from None
            if not (q.is_floating_point() or q.dtype in (torch.int32, torch.int64)):
                raise ArgumentError(f"embedding queries must be numbers, [Q, {self.dim}] or [{self.dim}]; got dtype {q.dtype}")
            if q.dim() == 1:
                q = q[None]
            if q.dim() != 2 or q.shape[1] != self.dim:
                raise ShapeError(f"embedding queries must be [Q, {self.dim}] or [{self.dim}], got shape {tuple(q.shape)}")
            if q.shape[0] == 0:
                raise ArgumentError("the query is empty (0 embeddings)")
            q = q.float()
            _check_vectors(q, "the embedding query")
            return q
        fm = self._need_fm("image")
        if query is None or isinstance(query, (bool, int, float)):
            raise ArgumentError(f"the query must be a text, an image or an embedding, got {query!r}")
        try:
            q = fm.encode_images(query).float()
        except (SemlensError, torch.cuda.OutOfMemoryError):
            raise
        except (TypeError, ValueError, RuntimeError) as exc:  # what the encoder could not take: name the argument
            raise ArgumentError(f"the image query could not be encoded by {getattr(fm, 'name', fm)!r} "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); give images (a PIL image, "
                                f"a [3, H, W] / [B, 3, H, W] tensor), texts or [Q, {self.dim}] embeddings") from None
        if q.shape[0] == 0:
            raise ArgumentError("the query is empty (0 images)")
        _check_vectors(q, "the image query")
        return q

    # ------------------------------------------------------------------ search
    def search(self, query: Any, k: int = 10, layers: str | Sequence[str] | None = None, *,
               modality: str | None = None, templates: Sequence[str] | None = None,
               per_layer: bool = False) -> SearchResult:
        """The ``k`` components most similar to each query (text(s), image(s) or embedding(s)).

        Score = cosine(probe, component embedding) (:func:`semlens_fast.ops.cosine_topk`).
        Ranks run across all searched ``layers`` (ties: layer order, then lower component),
        or within each layer with ``per_layer=True``. Components without examples (zero
        embedding) are never returned.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ArgumentError(f"k must be an int >= 1, got {k!r}")
        names = self._resolve_layers(layers)
        q = self.embed(query, modality, templates)
        texts = ([query] if isinstance(query, str) else list(query)) if _is_texts(query) else [None] * q.shape[0]
        per: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        for n in names:
            e = self._layers[n].embeddings
            idx, sub = self._nonempty(n)
            if idx.numel() == 0:
                continue
            s, i = cosine_topk(q.to(e.device, torch.float32), sub, min(k, idx.numel()))
            i = torch.where(i >= 0, idx[i.clamp(min=0)], i)
            per.append((n, s.cpu(), i.cpu()))
        rows: dict[str, list] = {c: [] for c in ("query", "text", "layer", "component", "score", "rank")}

        def add(qi: int, lay: str, c: int, s: float, r: int) -> None:
            rows["query"].append(qi); rows["text"].append(texts[qi]); rows["layer"].append(lay)
            rows["component"].append(c); rows["score"].append(s); rows["rank"].append(r)

        if per_layer:
            for qi in range(q.shape[0]):
                for n, s, i in per:
                    for r, (sc, c) in enumerate(zip(s[qi].tolist(), i[qi].tolist())):
                        if c >= 0:
                            add(qi, n, c, sc, r)
        elif per:
            S = torch.cat([s for _, s, _ in per], 1)
            lay_of = [n for n, s, _ in per for _ in range(s.shape[1])]
            I = torch.cat([i for _, _, i in per], 1)
            order = torch.sort(S, dim=1, descending=True, stable=True).indices[:, :k]
            for qi in range(q.shape[0]):
                r = 0
                for j in order[qi].tolist():
                    c = int(I[qi, j])
                    if c >= 0:
                        add(qi, lay_of[j], c, float(S[qi, j]), r)
                        r += 1
        return SearchResult(**rows)

    # ------------------------------------------------------------------ label
    def label(self, vocabulary: Sequence[str] | Mapping[str, Any], templates: Sequence[str] | None = None,
              threshold: float | None = None, layers: str | Sequence[str] | None = None) -> LabelResult:
        """Every component's best label from ``vocabulary``.

        ``vocabulary``: label texts (embedded as null-subtracted text probes), or a mapping
        ``{label: embedding [d]}`` / ``{label: image}``... (embedded with :meth:`embed`). For each
        component ``c`` with embedding ``e_c`` and label probes ``p_l``::

            best_c   = argmax_l cos(e_c, p_l)      score_c = cos(e_c, p_best)
            margin_c = score_c - max_{l != best} cos(e_c, p_l)

        and ``"unlabelled"`` (index -1) where ``score_c < threshold`` or the component has
        no examples. Uses the top-2 kernel (:func:`~semlens_fast.ops.cosine_topk` with the
        components as queries): the components x vocabulary matrix is never built.
        """
        names = self._resolve_layers(layers)
        vocab, P = self._vocab(vocabulary, templates)
        threshold = _number(threshold, "threshold")
        best, score, ru, margin = {}, {}, {}, {}
        for n in names:
            e = self._layers[n].embeddings
            s, i = cosine_topk(e, P.to(e.device, torch.float32), min(2, P.shape[0]))
            s, i = s.cpu(), i.cpu()
            empty = ~(e != 0).any(1).cpu()
            b = i[:, 0].clone()
            sc = s[:, 0].clone()
            if s.shape[1] > 1:
                r2, m = i[:, 1].clone(), s[:, 0] - s[:, 1]
            else:
                r2, m = torch.full_like(b, -1), torch.full_like(sc, float("nan"))
            sc[empty] = float("nan")
            m[empty] = float("nan")
            drop = empty if threshold is None else (empty | (sc < threshold))
            b[drop] = -1
            r2[empty] = -1
            best[n], score[n], ru[n], margin[n] = b, sc, r2, m
        return LabelResult(vocab, None if threshold is None else float(threshold), best, score, ru, margin)

    def _vocab(self, vocabulary: Any, templates: Sequence[str] | None,
               arg: str = "vocabulary") -> tuple[list[str], torch.Tensor]:
        if isinstance(vocabulary, str):
            vocabulary = [vocabulary]
        if isinstance(vocabulary, Mapping):
            if not vocabulary:
                raise ArgumentError(f"{arg} is empty; give at least one concept label")
            vocab = [str(x) for x in vocabulary]
            P = torch.cat([self.embed(v, templates=templates) for v in vocabulary.values()])
            if P.shape[0] != len(vocab):
                raise ShapeError(f"each vocabulary entry must embed to one vector; {len(vocab)} labels gave {P.shape[0]}")
            return vocab, P
        vocab = list(vocabulary) if vocabulary is not None else []
        if not vocab:
            raise ArgumentError(f"{arg} is empty; give at least one concept label")
        if not all(isinstance(v, str) for v in vocab):
            raise ArgumentError(f"{arg} must be a list of label strings or a {{label: embedding/image}} mapping")
        if len(set(vocab)) != len(vocab):
            raise ArgumentError(f"{arg} has duplicate labels")
        return vocab, self.embed_texts(vocab, templates)

    # ------------------------------------------------------------------ compare
    def compare(self, other: Any, layers: str | Sequence[str] | None = None,
                other_layers: str | Sequence[str] | None = None, *, threshold: float = 0.8,
                vocabulary: Sequence[str] | None = None, templates: Sequence[str] | None = None,
                label_threshold: float | None = None) -> CompareResult:
        """Concepts shared and unique between this lens (A) and ``other`` (B).

        ``other``: another :class:`Lens`, a ConceptDB, or a ``{layer: Tensor}`` dict embedded
        by the *same* foundation model (pass ``self`` with different ``layers`` /
        ``other_layers`` to compare two layers). For each component of A its best match in B
        (``max_b cos(e_a, e_b)``) and the other way, via tiled
        :func:`~semlens_fast.ops.pairwise_max` (50k x 50k in bounded memory). Coverage of A by
        B = share of A's components (with examples) whose best match scores ``>= threshold``.
        With ``vocabulary``: both sides are labelled (:meth:`label`) and ``concepts`` lists
        per label ``n_a``, ``n_b`` and ``status`` (``shared`` / ``only A`` / ``only B``).
        """
        threshold = _number(threshold, "threshold", allow_none=False)
        label_threshold = _number(label_threshold, "label_threshold")
        if not isinstance(other, Lens):
            other = Lens(other, self.fm, templates=self.templates, check_foundation=False)
        if other.dim != self.dim:
            raise ShapeError(f"cannot compare: this lens holds {self.dim}-d embeddings, the other {other.dim}-d; "
                             "both must be embedded by the same foundation model")
        fa = getattr(getattr(self.db, "foundation", None), "get", None)
        fb = getattr(getattr(other.db, "foundation", None), "get", None)
        if callable(fa) and callable(fb) and fa("fingerprint") and fb("fingerprint") and fa("fingerprint") != fb("fingerprint"):
            raise ArgumentError(f"cannot compare: the two ConceptDBs were embedded by different foundation models "
                                f"({fa('name')!r} vs {fb('name')!r}); rebuild one with the other's model")
        A, a_where = self._stack(self._resolve_layers(layers))
        B, b_where = other._stack(other._resolve_layers(other_layers, "other_layers"))
        res = []
        for X, xw, Y, yw in ((A, a_where, B, b_where), (B, b_where, A, a_where)):
            rows = []
            if X.shape[0] and Y.shape[0]:
                s, i = pairwise_max(X, Y.to(X.device))
                for (lay, c), sc, j in zip(xw, s.tolist(), i.tolist()):
                    ml, mc = yw[j] if j >= 0 else (None, -1)
                    rows.append(dict(layer=lay, component=c, match_layer=ml, match_component=mc, score=sc))
            else:
                rows = [dict(layer=lay, component=c, match_layer=None, match_component=-1, score=float("nan"))
                        for lay, c in xw]
            res.append(rows)

        def cov(rows: list[dict[str, Any]]) -> float:
            return sum(r["score"] >= threshold for r in rows) / len(rows) if rows else float("nan")

        concepts = None
        if vocabulary is not None:
            la = self.label(vocabulary, templates, label_threshold, layers)
            lb = other.label(vocabulary, templates, label_threshold, other_layers)
            ca: dict[str, int] = {}
            cb: dict[str, int] = {}
            for lr, cnt in ((la, ca), (lb, cb)):
                for n in lr.layers:
                    for lab in lr.names(n):
                        if lab != UNLABELLED:
                            cnt[lab] = cnt.get(lab, 0) + 1
            concepts = []
            for lab in la.vocabulary:
                na, nb = ca.get(lab, 0), cb.get(lab, 0)
                if na or nb:
                    concepts.append(dict(label=lab, n_a=na, n_b=nb,
                                         status="shared" if na and nb else ("only A" if na else "only B")))
        return CompareResult(float(threshold), res[0], res[1], cov(res[0]), cov(res[1]), concepts)

    def _stack(self, names: list[str]) -> tuple[torch.Tensor, list[tuple[str, int]]]:
        """Embeddings with examples of ``names`` stacked ``[N, d]`` and their (layer, component)."""
        mats, where = [], []
        for n in names:
            e = self._layers[n].embeddings
            idx = (e != 0).any(1).nonzero().flatten()
            mats.append(e[idx].float() if idx.numel() != e.shape[0] else e.float())
            where += [(n, c) for c in idx.tolist()]
        return torch.cat([m.to(mats[0].device) for m in mats]), where

    # ------------------------------------------------------------------ scores
    def clarity(self, layer: str) -> torch.Tensor:
        """:func:`semlens_fast.scores.clarity` of ``layer`` (needs per-example embeddings)."""
        lay = self._examples_of(layer, "clarity")
        return self._cached(("clarity", layer), lambda: _scores.clarity(lay.examples, lay.valid))

    def polysemanticity(self, layer: str, seed: int = 123) -> torch.Tensor:
        """:func:`semlens_fast.scores.polysemanticity` of ``layer`` (needs per-example embeddings)."""
        lay = self._examples_of(layer, "polysemanticity")
        return self._cached(("poly", f"{layer}/{seed}"), lambda: _scores.polysemanticity(lay.examples, lay.valid, seed=seed))

    def redundancy(self, layer: str) -> _scores.Redundancy:
        """:func:`semlens_fast.scores.redundancy` of ``layer``."""
        lay = self._layer(layer)
        return self._cached(("redundancy", layer), lambda: _scores.redundancy(lay.embeddings))

    def _examples_of(self, layer: str, what: str) -> _Layer:
        lay = self._layer(layer)
        if lay.examples is None:
            raise ArgumentError(f"{what} needs per-example embeddings, but layer {layer!r} of the ConceptDB has none; "
                                "build the DB with keep_examples=True")
        return lay

    def _nonempty(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(idx, embeddings[idx])`` of the components with examples (cached; no copy when all have)."""
        def make():
            e = self._layers[layer].embeddings
            idx = (e != 0).any(1).nonzero().flatten()
            return idx, (e if idx.numel() == e.shape[0] else e[idx])

        return self._cached(("nonempty", layer), make)

    def _cached(self, key: tuple[str, str], fn):
        if key not in self._score_cache:
            self._score_cache[key] = fn()
        return self._score_cache[key]

    # ------------------------------------------------------------------ describe
    def describe(self, layer: str, *, labels: LabelResult | None = None, vocabulary: Sequence[str] | None = None,
                 relevance: Any = None, target: Any = None, top: int = 10) -> LayerSummary:
        """Summary of ``layer``: label counts (from ``labels`` or ``vocabulary``), clarity and
        polysemanticity (when the DB keeps per-example embeddings), redundancy, and with
        ``relevance`` the ``top`` components most relevant for the class (see :meth:`audit`
        for the accepted relevance forms)."""
        layer = self._resolve_layers(layer, "layer")[0]
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise ArgumentError(f"top must be an int >= 1, got {top!r}")
        lay = self._layers[layer]
        C = int(lay.embeddings.shape[0])
        n_empty = int((~(lay.embeddings != 0).any(1)).sum())
        if labels is None and vocabulary is not None:
            labels = self.label(vocabulary, layers=layer)
        clar = self.clarity(layer) if lay.examples is not None else None
        poly = self.polysemanticity(layer) if lay.examples is not None else None
        red = self.redundancy(layer)
        stats: dict[str, float] = {"redundancy (layer)": red.layer}
        if clar is not None:
            stats["clarity (mean)"] = float(clar.nanmean())
            stats["polysemanticity (mean)"] = float(poly.nanmean())
        top_rel = None
        if relevance is not None:
            r = self._relevance(relevance, layer, target, C)
            names = labels.names(layer) if labels is not None else None
            order = torch.sort(torch.nan_to_num(r, nan=-float("inf")), descending=True, stable=True).indices[:top].tolist()
            top_rel = [dict(component=c, relevance=float(r[c]), label=names[c] if names else "",
                            clarity=float(clar[c]) if clar is not None else float("nan")) for c in order]
        return LayerSummary(layer, C, n_empty, clar, poly, red, labels.counts(layer) if labels is not None else None,
                            top_rel, stats)

    @staticmethod
    def _relevance(relevance: Any, layer: str, target: Any, C: int) -> torch.Tensor:
        r = relevance
        if isinstance(r, Mapping):
            if layer not in r:
                raise ArgumentError(f"relevance has no entry for layer {layer!r}; it has {list(r)}")
            r = r[layer]
        try:
            r = torch.as_tensor(r).detach().float().cpu()
        except (TypeError, ValueError, RuntimeError):
            raise ArgumentError(f"relevance of layer {layer!r} must be numbers ([C={C}] or [n_classes, {C}]), got "
                                f"{type(r).__name__}") from None
        if r.dim() == 2:
            if target is None:
                raise ArgumentError(f"relevance of layer {layer!r} is [n_classes, C] = {tuple(r.shape)}; give target= the class index")
            if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < r.shape[0]:
                raise ArgumentError(f"target must be a class index in 0..{r.shape[0] - 1} (relevance of layer {layer!r} "
                                    f"has {r.shape[0]} classes), got {target!r}")
            r = r[target]
        if r.dim() != 1 or r.shape[0] != C:
            raise ShapeError(f"relevance of layer {layer!r} must be [C={C}] (or [n_classes, {C}] with target), got {tuple(r.shape)}")
        bad = ~torch.isfinite(r)
        if bool(bad.any()):
            import warnings

            warnings.warn(f"relevance of layer {layer!r}: {int(bad.sum())} non-finite values (NaN/inf) are left out",
                          RuntimeWarning, stacklevel=3)
            r = torch.where(bad, torch.full_like(r, float("nan")), r)
        return r

    # ------------------------------------------------------------------ audit
    def audit(self, valid: Any = None, spurious: Any = None, relevance: Any = None, target: Any = None, *,
              layers: str | Sequence[str] | None = None, templates: Sequence[str] | None = None,
              model: Any = None, data: Any = None, images: Any = None, to_input: Any = None,
              fdr: float = 0.1, n_null: int = 100, n_images: int = 16, causal: bool = True, n_causal: int = 256,
              relevance_samples: int = 256, reference_pool: int = 512, top: int = 20, pool: str = "max",
              threshold: float | None = None, margin: float | None = None, seed: int = 0,
              progress: bool = False) -> AuditReport:
        """Which components encode a suspected artifact, which classes rely on it, and the data behind it.

        Calibrated (see :mod:`semlens_fast.audit` for every formula): each component's alignment with
        each ``spurious`` probe is turned into a z-score and an empirical p-value against a null bank of
        probes of the same kind; components are flagged by Benjamini-Hochberg at ``fdr``, and the
        ranked list of all components is always returned.

        Args:
            valid: optional concepts the model *should* use (same forms as ``spurious``); calibrated the
                same way and reported beside the spurious scores (``valid_z``, ``rather_than_valid``);
                they do not change the flags unless ``margin`` is given.
            spurious: the suspected artifact: ``{name: probe}`` (or one probe, or a list of texts), where a
                probe is a **transform** ``fn(raw images) -> raw images`` adding the artifact (the
                counterfactual probe; e.g. :class:`~semlens_fast.intervene.Paste`), a **picture** of it
                (an image, or a list of images averaged into one concept), a **text** (needs a text-capable
                foundation model) or an **embedding** ``[d]``.
            relevance: per-component relevance, ``{layer: [C]}`` for the target class or
                ``{layer: [n_classes, C]}``; by default computed from ``model`` and ``data`` for every
                class (``relevance_samples`` samples each). Non-finite values are left out of the
                shares with a warning.
            target: the class to report relevance shares for (an index); ``None`` audits every class.
            model, data: the network and its data (an :class:`~semlens_fast.intervene.ImageData`, or an
                :class:`~semlens_fast.data.ImageDataset`): needed for transform probes' causal check
                (``causal``: :func:`~semlens_fast.intervene.intervene` on ``n_causal`` samples), per-class
                relevance and the samples behind each flagged component (``top`` per component, chosen
                from ``reference_pool`` samples of the affected class by the component's relevance).
            images: raw images to build probes and nulls from (default: ``data``'s images).
            fdr: the false-discovery rate of the flags; ``n_null``: null probes per probe; ``n_images``:
                images per counterfactual probe; ``seed``: all sampling.
            threshold, margin: optional extra conditions on the (centred) cosine ``score``: at least
                ``threshold``, and more than ``margin`` above the best valid concept's.
        """
        return _run_audit(self, valid, spurious, relevance, target, layers=layers, templates=templates, model=model,
                          data=data, images=images, to_input=to_input, fdr=fdr, n_null=n_null, n_images=n_images,
                          causal=causal, n_causal=n_causal, relevance_samples=relevance_samples,
                          reference_pool=reference_pool, top=top, pool=pool, threshold=threshold, margin=margin,
                          seed=seed, progress=progress)
