"""Concept examples: what is shown to (and embedded by) the foundation model for each
(layer, component, rank) of a :class:`~semlens_fast.store.TopKStore`.

Modes (:func:`concept_examples`):

* ``"full"``: the whole sample. Needs nothing but the store.
* ``"activation"``: the region the component looks at. The component's activation map is
  recomputed (one batched forward pass per *unique* sample over all requested layers; the
  forward is cut after the last requested layer), then for each example:

  1. the peak is the recorded max position (``positions``; the argmax of the map when the
     store has none, e.g. mean pooling) and ``peak = map[peak position]``;
  2. the pixels of the map ``>= threshold * peak`` that are connected (8-neighbourhood, at
     the activation map's resolution) to the peak form the region;
  3. the map is upsampled (bilinear) to the input size, thresholded the same way and
     restricted to the (upsampled, one-cell dilated) region; the bounding box of what is
     left is the crop;
  4. the box is made square (its longer side, at least ``min_size`` pixels), centred on the
     box and shifted to stay inside the image; a box covering the whole image becomes the
     "full" box.

  With ``verify=True`` the recomputed maps are checked against the stored top-k values
  (max and mean pools): a TopKStore from another model or another dataset raises
  :class:`~semlens_fast.errors.StoreError` instead of producing silently wrong crops.
* ``"relevance"``: the same boxes from a relevance map. Pass ``relevance=fn`` with
  ``fn(model, inputs [E, ...], layer: str, components [E] int64) -> maps [E, h, w]``
  (any resolution; upsampled to the input size; the positive part is used). This is the
  hook for :mod:`semlens_fast.relevance`.
* ``"text"``: for transformer text models (``[B, T, C]`` layers, positions are token
  indices), the window of ``radius`` tokens on each side of the max token
  (:func:`token_windows` / :func:`window_texts`).

Boxes are ``int32 (y0, x0, y1, x1)`` half-open pixel boxes in the model input's
coordinates; ``(0, 0, 0, 0)`` means the full sample; ``-1`` marks empty slots. For text,
the box is ``(t0, 0, t1, 0)``: tokens ``t0 .. t1 - 1``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ArgumentError, ShapeError, StoreError
from ._batch import default_forward, first_tensor, to_device

log = logging.getLogger("semlens_fast")

MODES = ("full", "activation", "relevance", "text")
FULL_BOX = (0, 0, 0, 0)
RelevanceFn = Callable[[nn.Module, torch.Tensor, str, torch.Tensor], torch.Tensor]

__all__ = [
    "MODES", "FULL_BOX", "LayerExamples", "ConceptExamples", "concept_examples", "ImageSource",
    "crop", "boxes_from_maps", "token_windows", "window_texts",
]


# ---------------------------------------------------------------------- containers


@dataclass
class LayerExamples:
    """Examples of one layer: ``ids [C, k]`` int64 (``-1`` empty), ``boxes [C, k, 4]`` int32,
    ``values [C, k]`` float32 (the stored top-k values), ``valid [C, k]`` bool."""

    ids: torch.Tensor
    boxes: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor

    @property
    def channels(self) -> int:
        return int(self.ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])


@dataclass
class ConceptExamples:
    """Concept examples of several layers (see the module docstring)."""

    mode: str
    layers: dict[str, LayerExamples]
    params: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, layer: str) -> LayerExamples:
        try:
            return self.layers[layer]
        except KeyError:
            raise ArgumentError(f"layer {layer!r} has no examples here; layers: {sorted(self.layers)}") from None

    def unique_pairs(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The distinct (sample id, box) pairs of all layers.

        Returns ``keys [U, 5]`` int64 (``id, y0, x0, y1, x1``, sorted) and per layer
        ``index [C, k]`` int64 into ``keys`` (``-1`` for empty slots).
        """
        parts, spans = [], []
        for name, le in self.layers.items():
            flat = torch.cat([le.ids.reshape(-1, 1), le.boxes.reshape(-1, 4).to(torch.int64)], 1)
            parts.append(flat[le.valid.reshape(-1)])
            spans.append(name)
        allk = torch.cat(parts) if parts else torch.zeros(0, 5, dtype=torch.int64)
        keys, inv = torch.unique(allk, dim=0, return_inverse=True) if len(allk) else (allk, allk[:, 0])
        out: dict[str, torch.Tensor] = {}
        off = 0
        for name in spans:
            le = self.layers[name]
            idx = torch.full((le.ids.numel(),), -1, dtype=torch.int64)
            v = le.valid.reshape(-1)
            n = int(v.sum())
            idx[v] = inv[off : off + n]
            off += n
            out[name] = idx.view_as(le.ids)
        return keys, out

    def images(self, source: Any, layer: str, component: int) -> list[torch.Tensor]:
        """The (cropped) example images of one component, best first (for display)."""
        src = source if isinstance(source, ImageSource) else ImageSource(source)
        le = self[layer]
        ids = le.ids[component][le.valid[component]].tolist()
        boxes = le.boxes[component][le.valid[component]].tolist()
        return [crop(img, b, self.params.get("input_size")) for img, b in zip(src.get(ids), boxes)]


# ---------------------------------------------------------------------- image sources


class ImageSource:
    """Uniform access to the raw images the foundation model sees (values in ``[0, 1]`` or uint8).

    Accepts: an object with an ``images`` tensor attribute (e.g. :class:`semlens_fast.data.ImageDataset`,
    uint8 ``[N, H, W]`` / ``[N, C, H, W]`` / ``[N, H, W, 3]``), a tensor ``[N, ...]``, a map-style
    dataset (``ds[i]`` or ``ds[i][0]`` is the image), or a callable ``fn(i) -> image``.
    """

    def __init__(self, source: Any, length: int | None = None):
        self.source = source
        self._tensor: torch.Tensor | None = None
        if isinstance(source, torch.Tensor):
            self._tensor = source
        elif isinstance(getattr(source, "images", None), torch.Tensor):
            self._tensor = source.images
        if self._tensor is not None:
            self.length = int(self._tensor.shape[0])
        elif hasattr(source, "__len__") and hasattr(source, "__getitem__"):
            self.length = len(source)
        elif callable(source):
            self.length = length if length is not None else -1
        else:
            raise ArgumentError(
                f"images must be an ImageDataset-like object, a tensor [N, ...], a dataset or a callable fn(i); got {type(source).__name__}"
            )

    def check_ids(self, ids: torch.Tensor, what: str = "the TopKStore") -> None:
        if self.length < 0 or ids.numel() == 0:
            return
        hi, lo = int(ids.max()), int(ids.min())
        if lo < 0 or hi >= self.length:
            bad = ids[(ids < 0) | (ids >= self.length)][:5].tolist()
            raise ArgumentError(
                f"{what} refers to sample ids {bad} but images has only {self.length} samples (ids 0..{self.length - 1}); "
                "pass the same dataset the store was collected on"
            )

    def get(self, ids: Sequence[int]) -> list[Any]:
        ids = [int(i) for i in ids]
        if self._tensor is not None:
            t = self._tensor[torch.as_tensor(ids, dtype=torch.int64)] if ids else self._tensor[:0]
            if t.dim() == 4 and t.shape[-1] in (3, 4) and t.shape[1] not in (1, 3):
                t = t.permute(0, 3, 1, 2)
            return list(t.unbind(0))
        out = []
        for i in ids:
            try:
                item = self.source(i) if callable(self.source) and not hasattr(self.source, "__getitem__") else self.source[i]
            except (IndexError, KeyError) as exc:
                raise ArgumentError(f"images has no sample {i}: {exc}") from exc
            if isinstance(item, (tuple, list)) and not isinstance(item, str):
                item = item[0]
            out.append(item)
        return out


def _hw(img: Any) -> tuple[int, int]:
    if isinstance(img, torch.Tensor):
        return int(img.shape[-2]), int(img.shape[-1])
    if hasattr(img, "size") and hasattr(img, "mode"):  # PIL
        w, h = img.size
        return int(h), int(w)
    import numpy as np

    a = np.asarray(img)
    if a.ndim == 3 and a.shape[-1] in (1, 3, 4) and a.shape[0] not in (1, 3):
        return int(a.shape[0]), int(a.shape[1])
    return int(a.shape[-2]), int(a.shape[-1])


def crop(img: Any, box: Sequence[int], input_size: Sequence[int] | None = None) -> Any:
    """Crop ``img`` to ``box`` (``(0, 0, 0, 0)`` = whole image).

    ``input_size`` is the ``(H, W)`` the box was computed at (the model input); when the image
    has another size, the box is scaled proportionally.
    """
    y0, x0, y1, x1 = (int(b) for b in box)
    if (y0, x0, y1, x1) == FULL_BOX:
        return img
    if min(y0, x0) < 0 or y1 <= y0 or x1 <= x0:
        raise ArgumentError(f"box {tuple(box)} is not a valid (y0, x0, y1, x1) box")
    H, W = _hw(img)
    if input_size is not None and (int(input_size[0]), int(input_size[1])) != (H, W):
        sy, sx = H / float(input_size[0]), W / float(input_size[1])
        y0, y1 = int(math.floor(y0 * sy)), max(int(math.ceil(y1 * sy)), int(math.floor(y0 * sy)) + 1)
        x0, x1 = int(math.floor(x0 * sx)), max(int(math.ceil(x1 * sx)), int(math.floor(x0 * sx)) + 1)
    if y1 > H or x1 > W:
        raise ShapeError(
            f"box {(y0, x0, y1, x1)} does not fit an image of {H}x{W} pixels; the images given to the foundation "
            f"model must have the model input's size {tuple(input_size) if input_size else '?'} (or its aspect ratio)"
        )
    if isinstance(img, torch.Tensor):
        return img[..., y0:y1, x0:x1]
    if hasattr(img, "crop") and hasattr(img, "mode"):
        return img.crop((x0, y0, x1, y1))
    import numpy as np

    a = np.asarray(img)
    if a.ndim == 3 and a.shape[-1] in (1, 3, 4) and a.shape[0] not in (1, 3):
        return a[y0:y1, x0:x1]
    return a[..., y0:y1, x0:x1]


# ---------------------------------------------------------------------- boxes


def _flood(mask: torch.Tensor, seed: torch.Tensor, max_iter: int | None = None) -> torch.Tensor:
    """Connected (8-neighbourhood) part of ``mask [E, h, w]`` containing ``seed [E, h, w]``."""
    cur = seed & mask
    it = max_iter or (mask.shape[-1] + mask.shape[-2])
    for _ in range(it):
        nxt = F.max_pool2d(cur.unsqueeze(1).float(), 3, stride=1, padding=1).squeeze(1).bool() & mask
        if torch.equal(nxt, cur):
            break
        cur = nxt
    return cur


def boxes_from_maps(
    maps: torch.Tensor,
    input_size: Sequence[int],
    positions: torch.Tensor | None = None,
    threshold: float = 0.5,
    min_size: int = 8,
    square: bool = True,
) -> torch.Tensor:
    """Crop boxes ``[E, 4]`` int32 from maps ``[E, h, w]`` (see the module docstring).

    ``positions [E]``: flattened ``h * w`` index of each map's peak (``-1``: use the argmax).
    A map whose peak is ``<= 0`` (nothing positive) gets the full box.
    """
    if maps.dim() != 3:
        raise ShapeError(f"maps must be [E, h, w], got shape {tuple(maps.shape)}")
    if not 0.0 < float(threshold) <= 1.0:
        raise ArgumentError(f"threshold must be in (0, 1], got {threshold!r}")
    E, h, w = maps.shape
    H, W = int(input_size[0]), int(input_size[1])
    if E == 0:
        return torch.zeros(0, 4, dtype=torch.int32)
    maps = maps.float()
    flat = maps.reshape(E, -1)
    argmax = flat.argmax(1)
    if positions is None:
        pos = argmax
    else:
        pos = positions.to(torch.int64).to(maps.device)
        pos = torch.where((pos < 0) | (pos >= h * w), argmax, pos)
    peak = flat.gather(1, pos[:, None]).squeeze(1)
    ok = peak > 0
    thr = (threshold * peak).view(E, 1, 1)
    seed = torch.zeros(E, h * w, dtype=torch.bool, device=maps.device)
    seed.scatter_(1, pos[:, None], True)
    region = _flood(maps >= thr, seed.view(E, h, w))
    region = F.max_pool2d(region.unsqueeze(1).float(), 3, stride=1, padding=1)  # one-cell margin
    up = F.interpolate(maps.unsqueeze(1), size=(H, W), mode="bilinear", align_corners=False).squeeze(1)
    reg_up = F.interpolate(region, size=(H, W), mode="nearest").squeeze(1).bool()
    m = (up >= thr) & reg_up
    rows, cols = m.any(2), m.any(1)  # [E, H], [E, W]
    ar_h = torch.arange(H, device=maps.device)
    ar_w = torch.arange(W, device=maps.device)
    big = 1 << 30
    y0 = torch.where(rows, ar_h, big).amin(1)
    y1 = torch.where(rows, ar_h, -1).amax(1) + 1
    x0 = torch.where(cols, ar_w, big).amin(1)
    x1 = torch.where(cols, ar_w, -1).amax(1) + 1
    empty = ~rows.any(1)
    # fall back to the peak cell's footprint when the thresholded upsampled map is empty
    ph, pw = pos // w, pos % w
    fy0, fy1 = (ph * H) // h, ((ph + 1) * H + h - 1) // h
    fx0, fx1 = (pw * W) // w, ((pw + 1) * W + w - 1) // w
    y0, y1 = torch.where(empty, fy0, y0), torch.where(empty, fy1, y1)
    x0, x1 = torch.where(empty, fx0, x0), torch.where(empty, fx1, x1)
    bh, bw = y1 - y0, x1 - x0
    if square:
        s = torch.maximum(torch.maximum(bh, bw), torch.full_like(bh, int(min_size)))
        sh, sw = s.clamp(max=H), s.clamp(max=W)
    else:
        sh = torch.maximum(bh, torch.full_like(bh, int(min_size))).clamp(max=H)
        sw = torch.maximum(bw, torch.full_like(bw, int(min_size))).clamp(max=W)
    cy2, cx2 = y0 + y1, x0 + x1  # twice the centre
    ny0 = ((cy2 - sh) // 2).clamp(min=0)
    ny0 = torch.minimum(ny0, H - sh)
    nx0 = ((cx2 - sw) // 2).clamp(min=0)
    nx0 = torch.minimum(nx0, W - sw)
    boxes = torch.stack([ny0, nx0, ny0 + sh, nx0 + sw], 1)
    full = (~ok) | ((sh == H) & (sw == W))
    boxes[full] = 0
    return boxes.to(torch.int32).cpu()


# ---------------------------------------------------------------------- model forward


class _Stop(Exception):
    pass


def _input_of(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                return v
    raise ArgumentError(f"cannot find the input tensor in a batch of type {type(batch).__name__}")


class _Recorder:
    """Forward hooks recording the outputs of ``layers`` and cutting the forward after the last."""

    def __init__(self, model: nn.Module, layers: Sequence[str], output: Mapping[str, Callable] | None = None):
        mods = dict(model.named_modules())
        missing = [n for n in layers if n not in mods or n == ""]
        if missing:
            raise ArgumentError(f"layers {missing} are not modules of {type(model).__name__}")
        self.outs: dict[str, torch.Tensor] = {}
        self.layers = list(layers)
        self.handles = []
        for n in layers:
            self.handles.append(mods[n].register_forward_hook(self._hook(n, (output or {}).get(n))))

    def _hook(self, name: str, fn: Callable | None):
        def hook(module, inputs, out):
            t = fn(out) if fn is not None else first_tensor(out)
            self.outs[name] = t
            if len(self.outs) == len(self.layers):
                raise _Stop()

        return hook

    def run(self, model: nn.Module, batch: Any, forward: Callable) -> dict[str, torch.Tensor]:
        self.outs = {}
        try:
            forward(model, batch)
        except _Stop:
            pass
        missing = [n for n in self.layers if n not in self.outs]
        if missing:
            raise ArgumentError(f"layers {missing} were not called during the model's forward pass")
        return self.outs

    def close(self) -> None:
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------- main entry


def _layer_state(store: Any, layer: str, k: int | None):
    st = store[layer]
    kk = st.k if k is None else int(k)
    if kk < 1 or kk > st.k:
        raise ArgumentError(f"k must be in 1..{st.k} (the store's k), got {k!r}")
    return st.ids[:, :kk].cpu(), st.values[:, :kk].cpu(), st.positions[:, :kk].cpu()


def concept_examples(
    store: Any,
    layers: str | Sequence[str] | None = None,
    mode: str = "full",
    *,
    k: int | None = None,
    model: nn.Module | None = None,
    data: Any = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    output: Mapping[str, Callable] | None = None,
    relevance: RelevanceFn | None = None,
    threshold: float = 0.5,
    min_size: int = 8,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    verify: bool = True,
    check_model: bool = True,
    progress: bool = True,
) -> ConceptExamples:
    """Concept examples of ``layers`` (default: all layers of ``store``) in ``mode``.

    Args:
        store: a :class:`~semlens_fast.store.TopKStore`.
        k: use the first ``k`` entries (best first) of each list (default: all).
        model, data: the model and the dataset the store was collected on (``data[i]`` is a
            model input, or ``(input, label)``); needed for ``"activation"``/``"relevance"``.
        forward: ``fn(model, batch)`` (default ``model(batch[0])`` / ``model(batch)``).
        output: ``{layer: fn(module_output) -> Tensor}`` for layers returning tuples.
        relevance: the relevance hook (mode ``"relevance"``), see the module docstring.
        threshold: fraction of the peak that bounds the crop; ``min_size``: minimum side (px).
        verify: check recomputed activations against the stored values (max / mean pools).
        check_model: compare the store's model fingerprint with ``model``'s.
    """
    if mode not in MODES:
        raise ArgumentError(f"mode must be one of {MODES}, got {mode!r}")
    if layers is None:
        layers = list(store.keys())
    elif isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ArgumentError("layers is empty; name at least one layer of the store")
    for n in layers:
        if n not in store:
            raise ArgumentError(f"layer {n!r} is not in the TopKStore; it holds {sorted(store.keys())}")
    params: dict[str, Any] = {"k": k, "mode": mode}
    out: dict[str, LayerExamples] = {}
    states = {n: _layer_state(store, n, k) for n in layers}
    if mode == "full":
        for n, (ids, vals, _) in states.items():
            valid = ids >= 0
            boxes = torch.zeros(*ids.shape, 4, dtype=torch.int32)
            boxes[~valid] = -1
            out[n] = LayerExamples(ids, boxes, vals, valid)
        return ConceptExamples(mode, out, params)
    if mode == "text":
        raise ArgumentError("mode='text' examples are built with token_windows(store, layer, input_ids, ...)")
    sae_layers = sorted(set(layers) & set((getattr(store, "fingerprints", None) or {}).get("sae", {}) or {}))
    if sae_layers:
        # a hook on these layers would see the module's d-wide output, not the SAE's latents
        raise ArgumentError(
            f"mode={mode!r} is not available for SAE-latent layers {sae_layers}: their components are latents of "
            "an SAE, not outputs of the module; use mode='full' or token_windows(...) (mode 'text') for them"
        )
    if model is None or data is None:
        raise ArgumentError(f"mode={mode!r} needs model= and data= (the model and dataset the store was collected on)")
    if mode == "relevance" and relevance is None:
        raise ArgumentError(
            "mode='relevance' needs relevance=fn(model, inputs, layer, components) -> maps [E, h, w] "
            "(e.g. from semlens_fast.relevance)"
        )
    if check_model:
        fp = store.fingerprints.get("model") if hasattr(store, "fingerprints") else None
        if fp:
            from .collect import model_fingerprint

            mine = model_fingerprint(model)
            if mine != fp:
                raise StoreError(
                    f"the TopKStore was collected on a model with fingerprint {fp[:12]}..., but model= has "
                    f"{mine[:12]}...: a store from another model (or other weights); collect it again for this model "
                    "or pass check_model=False"
                )
    if hasattr(data, "__len__"):
        n_data = len(data)
        for n, (ids, _, _) in states.items():
            v = ids[ids >= 0]
            if v.numel() and int(v.max()) >= n_data:
                raise ArgumentError(
                    f"layer {n!r} refers to sample {int(v.max())} but data has {n_data} samples; pass the dataset the "
                    "store was collected on"
                )
    pools = dict(getattr(store, "pools", {}) or {})
    dev = torch.device(device) if device is not None else (next(iter(model.parameters())).device if any(True for _ in model.parameters()) else torch.device("cpu"))
    fwd = forward or default_forward
    from torch.utils.data import default_collate

    # entries per layer, sorted by sample id
    entries = {}
    for n, (ids, vals, pos) in states.items():
        valid = ids >= 0
        c, r = valid.nonzero(as_tuple=True)
        sid = ids[c, r]
        order = torch.argsort(sid, stable=True)
        entries[n] = (c[order], r[order], sid[order], vals[c[order], r[order]], pos[c[order], r[order]])
        out[n] = LayerExamples(ids, torch.full((*ids.shape, 4), -1, dtype=torch.int32), vals, valid)
    uniq = torch.unique(torch.cat([e[2] for e in entries.values()])) if entries else torch.zeros(0, dtype=torch.int64)
    input_size: tuple[int, int] | None = None
    was_training = model.training
    model.eval()
    rec = _Recorder(model, layers, output) if mode == "activation" else None
    it = range(0, len(uniq), batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"{mode} crops", total=(len(uniq) + batch_size - 1) // batch_size)
    mism: dict[str, float] = {}
    try:
        for s in it:
            bids = uniq[s : s + batch_size]
            batch = default_collate([data[int(i)] for i in bids.tolist()])
            batch = to_device(batch, dev)
            x = _input_of(batch)
            if x.dim() < 3:
                raise ShapeError(f"mode={mode!r} needs image-like inputs [B, C, H, W]; got input shape {tuple(x.shape)}")
            input_size = (int(x.shape[-2]), int(x.shape[-1]))
            acts = None
            if rec is not None:
                with torch.inference_mode():
                    acts = rec.run(model, batch, fwd)
            for n in layers:
                c, r, sid, vals, pos = entries[n]
                lo = int(torch.searchsorted(sid, bids[0]))
                hi = int(torch.searchsorted(sid, bids[-1], right=True))
                if hi <= lo:
                    continue
                ec, er, es, ev, ep = c[lo:hi], r[lo:hi], sid[lo:hi], vals[lo:hi], pos[lo:hi]
                row = torch.searchsorted(bids, es)
                if acts is not None:
                    a = acts[n]
                    if a.dim() != 4:
                        raise ShapeError(
                            f"layer {n!r}: activation crops need [B, C, H, W] outputs, got {tuple(a.shape)}; "
                            "use mode='full' (or mode='text' windows for token layers)"
                        )
                    maps = a[row.to(a.device), ec.to(a.device)].float()
                    if verify:
                        pool = pools.get(n, "max")
                        flat = maps.reshape(len(maps), -1)
                        got = flat.amax(1) if pool == "max" else flat.mean(1) if pool == "mean" else None
                        if got is not None:
                            err = ((got.cpu() - ev).abs() / (1.0 + ev.abs())).max().item()
                            mism[n] = max(mism.get(n, 0.0), err)
                    boxes = boxes_from_maps(maps, input_size, ep, threshold, min_size)
                else:
                    xs = x[row.to(x.device)]
                    maps = relevance(model, xs, n, ec.to(x.device))  # type: ignore[misc]
                    maps = torch.as_tensor(maps)
                    if maps.dim() == 4:
                        maps = maps.sum(1)
                    if maps.dim() != 3 or maps.shape[0] != len(xs):
                        raise ShapeError(f"relevance returned shape {tuple(maps.shape)}; expected [E={len(xs)}, h, w]")
                    boxes = boxes_from_maps(maps.float().clamp(min=0), input_size, None, threshold, min_size)
                out[n].boxes[ec, er] = boxes
    finally:
        if rec is not None:
            rec.close()
        model.train(was_training)
    bad = {n: e for n, e in mism.items() if e > 1e-2}
    if bad:
        raise StoreError(
            "the recomputed activations do not match the TopKStore's values (relative error "
            + ", ".join(f"{n}: {e:.3g}" for n, e in bad.items())
            + "): the store comes from another model, other weights or another dataset/order of samples"
        )
    params.update(threshold=float(threshold), min_size=int(min_size), input_size=list(input_size) if input_size else None)
    return ConceptExamples(mode, out, params)


# ---------------------------------------------------------------------- text windows


def token_windows(store: Any, layer: str, attention_mask: Any = None, radius: int = 4, k: int | None = None,
                  lengths: torch.Tensor | None = None) -> LayerExamples:
    """Token windows ``(t0, 0, t1, 0)`` of ``radius`` tokens around each example's max token.

    ``lengths [N]`` (number of real tokens per sample) or ``attention_mask [N, T]`` clip the
    windows to the real tokens; positions ``-1`` (no token recorded) give the full text box.
    """
    if radius < 0:
        raise ArgumentError(f"radius must be >= 0, got {radius!r}")
    ids, vals, pos = _layer_state(store, layer, k)
    valid = ids >= 0
    boxes = torch.zeros(*ids.shape, 4, dtype=torch.int32)
    p = pos.to(torch.int64)
    t0 = (p - radius).clamp(min=0)
    t1 = p + radius + 1
    if lengths is None and attention_mask is not None:
        lengths = torch.as_tensor(attention_mask).sum(-1)
    if lengths is not None:
        lengths = torch.as_tensor(lengths, dtype=torch.int64)
        L = lengths[ids.clamp(min=0)]
        t1 = torch.minimum(t1, L)
    boxes[..., 0] = t0.to(torch.int32)
    boxes[..., 2] = t1.to(torch.int32)
    boxes[p < 0] = 0
    boxes[~valid] = -1
    return LayerExamples(ids, boxes, vals, valid)


def window_texts(input_ids: Sequence[Sequence[int]] | torch.Tensor, tokenizer: Any, keys: torch.Tensor) -> list[str]:
    """Decode the windows ``keys [U, 5]`` (``id, t0, 0, t1, 0``) with ``tokenizer.decode``."""
    out = []
    for sid, t0, _, t1, _ in keys.tolist():
        toks = input_ids[sid]
        toks = toks.tolist() if isinstance(toks, torch.Tensor) else list(toks)
        if (t0, t1) != (0, 0):
            toks = toks[t0:t1]
        out.append(tokenizer.decode(toks, skip_special_tokens=True).strip())
    return out
