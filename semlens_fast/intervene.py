"""Counterfactual edits and the foundation-model-free causal check of an audit.

A *transform* is any callable ``transform(images) -> images`` that adds a suspected artifact
(a watermark, a ruler, a stamp) to raw images: the same tensor type, shape and dtype in and
out (``uint8 [N, H, W]`` / ``[N, C, H, W]``, or float in ``[0, 1]``). :class:`Paste` makes one
from a picture of the artifact.

:func:`intervene` measures, per component, how the transform changes its pooled activation
over a sample of the data (``delta = pool(a_c(T(x))) - pool(a_c(x))``, paired), with a
t-interval, a standardised effect (``delta / sd`` of the clean pooled activation) and, from
the same forward passes, how the transform moves the model's class probabilities. No
foundation model is involved: this is the causal check an audit's alignment scores are
compared with.

:class:`ImageData` is the small adapter between raw images (what transforms and
foundation models see) and the model's inputs; it is built from a
:class:`~semlens_fast.data.ImageDataset` (``images`` uint8 + ``mean``/``std``) automatically.

:func:`receptive_field` / :func:`peak_boxes` give the input box a component's activation peak
depends on, so crops of the data behind an audit keep the artifact in view.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .errors import ArgumentError, DTypeError, ShapeError

__all__ = ["ImageData", "Paste", "apply_transform", "pooled_activations", "intervene", "InterventionResult",
           "receptive_field", "peak_boxes", "changed_boxes"]


# ---------------------------------------------------------------------- data adapter


class ImageData:
    """Raw images ``[N, H, W]`` / ``[N, C, H, W]`` (uint8 or float in [0, 1]), the function that turns a
    batch of them into model inputs, and optional labels ``[N]``.

    ``ImageData.of(data)`` accepts an :class:`ImageData`, an object with ``images`` (raw, uint8) and
    ``mean``/``std`` (e.g. :class:`~semlens_fast.data.ImageDataset`: input = ``(x / 255 - mean) / std``),
    or any object with ``images`` plus an explicit ``to_input``.
    """

    def __init__(self, images: torch.Tensor, to_input: Callable[[torch.Tensor], torch.Tensor],
                 labels: torch.Tensor | None = None, classes: Sequence[str] | None = None):
        if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4):
            raise ShapeError(f"images must be a raw image tensor [N, H, W] or [N, C, H, W], got "
                             f"{getattr(images, 'shape', type(images).__name__)}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise DTypeError(f"images must be uint8 (0..255) or float (0..1), got {images.dtype}")
        if not callable(to_input):
            raise ArgumentError(f"to_input must be callable (raw images -> model inputs), got {type(to_input).__name__}")
        if labels is not None:
            labels = torch.as_tensor(labels).reshape(-1).to(torch.int64)
            if labels.numel() != images.shape[0]:
                raise ShapeError(f"labels has {labels.numel()} entries for {images.shape[0]} images")
        self.images, self.to_input, self.labels = images, to_input, labels
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def n_classes(self) -> int | None:
        if self.classes is not None:
            return len(self.classes)
        if self.labels is not None and self.labels.numel():
            return int(self.labels.max()) + 1
        return None

    def raw(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        return self.images[torch.as_tensor(ids, dtype=torch.int64)]

    def inputs(self, raw: torch.Tensor) -> torch.Tensor:
        x = self.to_input(raw)
        if not isinstance(x, torch.Tensor):
            raise ArgumentError(f"to_input returned {type(x).__name__}, expected a tensor of model inputs")
        return x

    @classmethod
    def of(cls, data: Any, to_input: Callable | None = None, what: str = "data") -> "ImageData":
        if isinstance(data, ImageData):
            return data if to_input is None else cls(data.images, to_input, data.labels, data.classes)
        images = getattr(data, "images", None)
        if not isinstance(images, torch.Tensor):
            raise ArgumentError(
                f"{what} must give raw images: an ImageData, or a dataset with .images (uint8 [N, H, W] or "
                f"[N, C, H, W]) such as semlens_fast.data.ImageDataset; got {type(data).__name__}")
        labels = getattr(data, "labels", None)
        classes = getattr(data, "classes", None)
        if to_input is None:
            mean, std = getattr(data, "mean", None), getattr(data, "std", None)
            if mean is None or std is None:
                raise ArgumentError(f"{what} has .images but no .mean/.std: pass to_input=fn(raw images) -> model inputs")
            to_input = _Normalise(float(mean), float(std))
        return cls(images, to_input, labels if isinstance(labels, torch.Tensor) else None, classes)


class _Normalise:
    """``(x / 255 - mean) / std`` for uint8 images (``x`` for float ones), with a channel axis added to ``[N, H, W]``."""

    def __init__(self, mean: float, std: float):
        self.mean, self.std = mean, std

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        x = raw.to(torch.float32)
        if raw.dtype == torch.uint8:
            x = x / 255.0
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return (x - self.mean) / self.std


# ---------------------------------------------------------------------- transforms


def apply_transform(transform: Callable, images: torch.Tensor, what: str = "transform") -> torch.Tensor:
    """``transform(images)``, checked: a tensor of the same shape and dtype, values in range."""
    out = transform(images)
    if not isinstance(out, torch.Tensor):
        raise ArgumentError(f"{what} returned {type(out).__name__}; a transform must return the images as a tensor")
    if out.shape != images.shape or out.dtype != images.dtype:
        raise ShapeError(f"{what} turned images of shape {tuple(images.shape)} ({images.dtype}) into "
                         f"{tuple(out.shape)} ({out.dtype}); a transform must keep shape and dtype")
    if out.is_floating_point() and out.numel() and not (float(out.min()) >= -1e-3 and float(out.max()) <= 1 + 1e-3):
        raise ArgumentError(f"{what} returned float images outside [0, 1]: raw images expected")
    return out


class Paste:
    """A transform that pastes ``picture`` into images.

    Args:
        picture: ``[h, w]`` or ``[C, h, w]`` tensor (uint8 0..255 or float 0..1; numpy / PIL accepted).
        at: ``(y, x)`` of its top-left corner, or ``None`` for a random place per image (from ``seed``;
            the same images get the same places on every call).
        mask: ``[h, w]`` bool, the pixels of the picture that are pasted (default: all; the alpha
            channel of an RGBA picture).
    """

    def __init__(self, picture: Any, at: tuple[int, int] | None = None, mask: Any = None, seed: int = 0):
        pic, alpha = _picture_tensor(picture)
        self.picture = pic  # float [C, h, w] in [0, 1]
        if mask is None:
            mask = alpha if alpha is not None else torch.ones(pic.shape[-2:], dtype=torch.bool)
        mask = torch.as_tensor(mask).to(torch.bool)
        if mask.shape != pic.shape[-2:]:
            raise ShapeError(f"mask must be [h, w] = {tuple(pic.shape[-2:])}, got {tuple(mask.shape)}")
        if not bool(mask.any()):
            raise ArgumentError("mask selects no pixel of the picture")
        self.mask = mask
        if at is not None:
            if not (isinstance(at, (tuple, list)) and len(at) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                           and v >= 0 for v in at)):
                raise ArgumentError(f"at must be (y, x) with ints >= 0 or None (random places), got {at!r}")
            at = (int(at[0]), int(at[1]))
        self.at = at
        self.seed = int(seed)

    def __repr__(self) -> str:
        return f"Paste(picture {tuple(self.picture.shape)}, at={self.at})"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4):
            raise ShapeError(f"Paste: images must be [N, H, W] or [N, C, H, W], got {getattr(images, 'shape', images)}")
        squeeze = images.dim() == 3
        x = images.unsqueeze(1) if squeeze else images
        N, C, H, W = x.shape
        h, w = self.picture.shape[-2:]
        if h > H or w > W:
            raise ShapeError(f"Paste: the picture ({h}x{w}) is larger than the images ({H}x{W})")
        pic = self.picture
        if pic.shape[0] != C:
            if pic.shape[0] == 3 and C == 1:
                pic = pic.mean(0, keepdim=True)
            elif pic.shape[0] == 1:
                pic = pic.expand(C, -1, -1)
            else:
                raise ShapeError(f"Paste: a {pic.shape[0]}-channel picture cannot go on {C}-channel images")
        pic = (pic * 255).round().to(torch.uint8) if x.dtype == torch.uint8 else pic.to(x.dtype)
        out = x.clone()
        if self.at is not None:
            y0, x0 = self.at
            if y0 + h > H or x0 + w > W:
                raise ShapeError(f"Paste: at={self.at} puts the {h}x{w} picture outside the {H}x{W} images")
            region = out[:, :, y0:y0 + h, x0:x0 + w]
            region[:, :, self.mask] = pic[:, self.mask].unsqueeze(0).to(region.dtype)
        else:
            g = torch.Generator().manual_seed(self.seed)
            ys = torch.randint(0, H - h + 1, (N,), generator=g).tolist()
            xs = torch.randint(0, W - w + 1, (N,), generator=g).tolist()
            for i, (y0, x0) in enumerate(zip(ys, xs)):
                region = out[i, :, y0:y0 + h, x0:x0 + w]
                region[:, self.mask] = pic[:, self.mask]
        return out.squeeze(1) if squeeze else out


def _picture_tensor(picture: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    alpha = None
    if hasattr(picture, "mode") and hasattr(picture, "convert"):  # PIL
        import numpy as np

        if picture.mode in ("RGBA", "LA"):
            a = np.asarray(picture.convert("RGBA"))
            alpha = torch.from_numpy(a[..., 3].copy()) > 127
            picture = picture.convert("RGB")
        elif picture.mode not in ("L", "RGB"):
            picture = picture.convert("RGB")
        arr = np.asarray(picture)
        t = torch.from_numpy(arr.copy())
        t = t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)
    else:
        t = torch.as_tensor(picture)
        if t.dim() == 3 and t.shape[-1] in (1, 3, 4) and t.shape[0] not in (1, 3, 4):
            t = t.permute(2, 0, 1)
        if t.dim() == 2:
            t = t.unsqueeze(0)
    if t.dim() != 3 or t.shape[0] not in (1, 3, 4):
        raise ShapeError(f"picture must be [h, w], [C, h, w] (C = 1 or 3) or a PIL image, got shape {tuple(t.shape)}")
    if t.shape[0] == 4:
        alpha = t[3] > (127 if t.dtype == torch.uint8 else 0.5)
        t = t[:3]
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    elif t.is_floating_point():
        if t.numel() and not (float(t.min()) >= 0 and float(t.max()) <= 1):
            raise ArgumentError("picture: float pictures must have values in [0, 1]")
        t = t.float()
    else:
        raise DTypeError(f"picture must be uint8 or float, got {t.dtype}")
    return t.contiguous(), alpha


def changed_boxes(before: torch.Tensor, after: torch.Tensor, tol: float = 0.0) -> torch.Tensor:
    """Per image the bounding box ``(y0, x0, y1, x1)`` (end exclusive, int64 ``[N, 4]``) of the pixels a
    transform changed by more than ``tol`` (in the images' units); ``-1`` rows where nothing changed."""
    d = (after.to(torch.float32) - before.to(torch.float32)).abs() > tol
    if d.dim() == 4:
        d = d.any(1)
    N, H, W = d.shape
    rows, cols = d.any(2), d.any(1)
    ar_h, ar_w = torch.arange(H), torch.arange(W)
    big = 1 << 30
    y0 = torch.where(rows, ar_h, big).amin(1)
    y1 = torch.where(rows, ar_h, -1).amax(1) + 1
    x0 = torch.where(cols, ar_w, big).amin(1)
    x1 = torch.where(cols, ar_w, -1).amax(1) + 1
    out = torch.stack([y0, x0, y1, x1], 1)
    out[~rows.any(1)] = -1
    return out


# ---------------------------------------------------------------------- activations


def _modules(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    mods = dict(model.named_modules())
    missing = [n for n in layers if n not in mods]
    if missing:
        raise ArgumentError(f"layers {missing} are not modules of the model; some of its modules: "
                            f"{[n for n in mods if n][:12]}")
    return {n: mods[n] for n in layers}


def _pool(a: torch.Tensor, pool: str) -> torch.Tensor:
    if a.dim() == 2:
        return a
    if a.dim() == 3:  # [B, T, C] tokens
        a = a.transpose(1, 2)
    f = a.reshape(a.shape[0], a.shape[1], -1)
    if pool == "max":
        return f.amax(2)
    if pool == "mean":
        return f.mean(2)
    if pool == "absmax":
        return f.abs().amax(2)
    if pool == "sum":
        return f.sum(2)
    raise ArgumentError(f"pool must be max, mean, absmax or sum, got {pool!r}")


@torch.no_grad()
def pooled_activations(model: nn.Module, x: torch.Tensor, layers: Sequence[str], pool: str = "max",
                       batch_size: int = 128, maps: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Pooled activations ``{layer: [N, C]}`` (float32, CPU) and the model outputs ``[N, ...]`` for inputs ``x``.
    ``maps=True`` returns the unpooled maps instead."""
    mods = _modules(model, layers)
    got: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    from ._batch import first_tensor

    def hook(name):
        def fn(module, inputs, out):
            t = first_tensor(out)
            if t is None:
                raise ArgumentError(f"layer {name!r} returned no tensor")
            got[name].append(t.detach().float().cpu() if maps else _pool(t.detach().float(), pool).cpu())
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    outs = []
    was = model.training
    model.eval()
    try:
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        for i in range(0, x.shape[0], batch_size):
            outs.append(first_tensor(model(x[i:i + batch_size].to(dev))).detach().float().cpu())
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    acts = {n: torch.cat(v) if v else torch.zeros(0) for n, v in got.items()}
    return acts, (torch.cat(outs) if outs else torch.zeros(0))


# ---------------------------------------------------------------------- the causal check


def _t_quantile(confidence: float, df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, max(df, 1)))


def _t_sf(t, df: int):
    from scipy import stats

    return stats.t.sf(t, max(df, 1))


@dataclass
class InterventionResult:
    """Output of :func:`intervene`.

    Per layer ``[C]`` tensors: ``delta`` (mean paired change of the pooled activation under the
    transform), ``low``/``high`` (its ``confidence`` t-interval), ``effect`` (``delta`` divided by the
    standard deviation of the clean pooled activation; NaN for a constant component) and
    ``baseline`` (mean clean pooled activation). ``causal(layer)``: the interval lies above 0 and
    ``effect >= min_effect``. ``class_delta`` / ``class_low`` / ``class_high`` ``[n_classes]``: the mean
    change of each class probability (softmax of the outputs) under the transform.
    """

    layers: list[str]
    delta: dict[str, torch.Tensor]
    low: dict[str, torch.Tensor]
    high: dict[str, torch.Tensor]
    effect: dict[str, torch.Tensor]
    baseline: dict[str, torch.Tensor]
    n: int
    confidence: float
    pool: str
    min_effect: float
    ids: list[int]
    class_delta: torch.Tensor | None = None
    class_low: torch.Tensor | None = None
    class_high: torch.Tensor | None = None
    unchanged: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    p_value: dict[str, torch.Tensor] = field(default_factory=dict)

    def causal(self, layer: str) -> torch.Tensor:
        if layer not in self.delta:
            raise ArgumentError(f"layer {layer!r} was not measured; measured: {self.layers}")
        e = torch.nan_to_num(self.effect[layer], nan=0.0)
        return (self.low[layer] > 0) & (e >= self.min_effect)

    def significant(self, fdr: float) -> dict[str, torch.Tensor]:
        """Per layer ``[C]`` bool: the transform raises the component, with the one-sided p-values of
        all measured components (every layer together) controlled by Benjamini-Hochberg at ``fdr``,
        and ``effect >= min_effect``."""
        from .audit import benjamini_hochberg

        if not self.p_value:
            raise ArgumentError("this result has no p-values (it was not made by intervene())")
        p = torch.cat([self.p_value[n].double() for n in self.layers])
        rej, _ = benjamini_hochberg(p, fdr)
        out, i = {}, 0
        for n in self.layers:
            C = self.p_value[n].numel()
            e = torch.nan_to_num(self.effect[n], nan=0.0)
            out[n] = rej[i:i + C] & (e >= self.min_effect)
            i += C
        return out

    def to_records(self) -> list[dict[str, Any]]:
        rows = []
        for n in self.layers:
            cz = self.causal(n).tolist()
            for c, (d, lo, hi, e) in enumerate(zip(self.delta[n].tolist(), self.low[n].tolist(), self.high[n].tolist(),
                                                  self.effect[n].tolist())):
                rows.append(dict(layer=n, component=c, delta=d, low=lo, high=hi, effect=e, causal=bool(cz[c])))
        return rows

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame.from_records(self.to_records())


def intervene(model: nn.Module, data: Any, transform: Callable, layers: str | Sequence[str], *, n: int = 256,
              ids: Sequence[int] | None = None, pool: str = "max", confidence: float = 0.95,
              min_effect: float = 0.5, batch_size: int = 128, seed: int = 0,
              to_input: Callable | None = None) -> InterventionResult:
    """How ``transform`` changes each component's pooled activation (see the module docstring).

    Args:
        model: the network (its mode is restored afterwards).
        data: raw images with their model-input function (:meth:`ImageData.of`).
        transform: ``transform(raw images) -> raw images`` adding the artifact.
        layers: module names (``model.named_modules()``).
        n: how many samples (a seeded random sample of ``data``) unless ``ids`` names them.
        pool: how a component's map is pooled (as in :func:`~semlens_fast.collect.collect`).
        confidence: of the t-intervals; ``min_effect``: standardised effect for ``causal``.
    """
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise ArgumentError("layers is empty; name at least one layer")
    if not isinstance(confidence, float) or not 0 < confidence < 1:
        raise ArgumentError(f"confidence must be a float in (0, 1), got {confidence!r}")
    if isinstance(min_effect, bool) or not isinstance(min_effect, (int, float)) or not math.isfinite(min_effect):
        raise ArgumentError(f"min_effect must be a finite number, got {min_effect!r}")
    if not callable(transform):
        raise ArgumentError(f"transform must be callable (raw images -> raw images), got {type(transform).__name__}")
    src = ImageData.of(data, to_input)
    if ids is None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ArgumentError(f"n must be an int >= 2, got {n!r}")
        g = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(len(src), generator=g)[:n]
    else:
        idx = torch.as_tensor(list(ids), dtype=torch.int64)
        if idx.numel() < 2 or int(idx.min()) < 0 or int(idx.max()) >= len(src):
            raise ArgumentError(f"ids must name >= 2 samples in 0..{len(src) - 1}")
    raw = src.raw(idx)
    raw_t = apply_transform(transform, raw)
    unchanged = int(((raw_t.to(torch.float32) - raw.to(torch.float32)).abs().flatten(1).amax(1) == 0).sum())
    a0, y0 = pooled_activations(model, src.inputs(raw), names, pool, batch_size)
    a1, y1 = pooled_activations(model, src.inputs(raw_t), names, pool, batch_size)
    N = int(idx.numel())
    tq = _t_quantile(confidence, N - 1)
    delta, low, high, effect, base, pv = {}, {}, {}, {}, {}, {}
    for nm in names:
        d = (a1[nm] - a0[nm]).double()
        m, s = d.mean(0), d.std(0)
        half = tq * s / math.sqrt(N)
        # one-sided paired t-test of "the transform raises the component" (a constant change: 0 or 1)
        t = torch.where(s > 0, m * math.sqrt(N) / s.clamp(min=1e-300),
                        torch.where(m > 0, torch.full_like(m, math.inf), torch.full_like(m, -math.inf)))
        pv[nm] = torch.from_numpy(_t_sf(t.numpy(), N - 1))
        sd0 = a0[nm].double().std(0)
        delta[nm], low[nm], high[nm] = m.float(), (m - half).float(), (m + half).float()
        effect[nm] = torch.where(sd0 > 0, m / sd0.clamp(min=1e-300), torch.full_like(m, float("nan"))).float()
        base[nm] = a0[nm].mean(0)
    cd = cl = ch = None
    if y0.dim() == 2 and y0.shape[1] >= 2:
        dp = (torch.softmax(y1.double(), 1) - torch.softmax(y0.double(), 1))
        m, s = dp.mean(0), dp.std(0)
        half = tq * s / math.sqrt(N)
        cd, cl, ch = m.float(), (m - half).float(), (m + half).float()
    return InterventionResult(names, delta, low, high, effect, base, N, float(confidence), pool, float(min_effect),
                              idx.tolist(), cd, cl, ch, unchanged, p_value=pv)


# ---------------------------------------------------------------------- receptive fields


@dataclass
class ReceptiveField:
    """Where a layer's position ``(i, j)`` looks: input rows ``i * stride_y + lo_y .. i * stride_y + hi_y``
    (end exclusive; same for columns), estimated from gradients; ``map_size`` / ``input_size``."""

    lo_y: int
    hi_y: int
    lo_x: int
    hi_x: int
    stride_y: float
    stride_x: float
    map_size: tuple[int, int]
    input_size: tuple[int, int]

    def box(self, pos: torch.Tensor) -> torch.Tensor:
        """Boxes ``[E, 4]`` (y0, x0, y1, x1; int64, clipped to the input) for flat map positions ``pos [E]``."""
        h, w = self.map_size
        H, W = self.input_size
        pos = torch.as_tensor(pos, dtype=torch.int64).reshape(-1)
        i, j = pos // w, pos % w
        y0 = (i.double() * self.stride_y).floor().long() + self.lo_y
        x0 = (j.double() * self.stride_x).floor().long() + self.lo_x
        y1 = (i.double() * self.stride_y).floor().long() + self.hi_y
        x1 = (j.double() * self.stride_x).floor().long() + self.hi_x
        return torch.stack([y0.clamp(0, H), x0.clamp(0, W), y1.clamp(0, H), x1.clamp(0, W)], 1)


def receptive_field(model: nn.Module, layer: str, example: torch.Tensor, trials: int = 8, seed: int = 0) -> ReceptiveField:
    """The receptive field of ``layer``'s centre position in the input, from the support of input
    gradients over ``trials`` random inputs shaped like ``example [1, C, H, W]`` (a union, so max pools
    and ReLUs that block some paths on one input do not shrink it)."""
    mod = _modules(model, [layer])[layer]
    if example.dim() != 4:
        raise ShapeError(f"example must be one model input [1, C, H, W], got {tuple(example.shape)}")
    store: dict[str, torch.Tensor] = {}

    def hook(m, i, o):
        from ._batch import first_tensor

        store["a"] = first_tensor(o)

    h = mod.register_forward_hook(hook)
    was = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    support = None
    try:
        for _ in range(trials):
            x = torch.randn(example.shape, generator=g).to(example.dtype).requires_grad_(True)
            model(x)
            a = store["a"]
            if a.dim() != 4:
                raise ShapeError(f"layer {layer!r}: receptive fields need [B, C, h, w] maps, got {tuple(a.shape)}")
            hh, ww = a.shape[-2:]
            a[0, :, hh // 2, ww // 2].sum().backward()
            s = x.grad.abs().sum((0, 1)) > 0
            support = s if support is None else (support | s)
    finally:
        h.remove()
        model.train(was)
    H, W = example.shape[-2:]
    assert support is not None
    ys, xs = support.any(1).nonzero().flatten(), support.any(0).nonzero().flatten()
    sy, sx = H / hh, W / ww
    cy, cx = int(math.floor((hh // 2) * sy)), int(math.floor((ww // 2) * sx))
    if ys.numel() == 0:  # no gradient reaches the input: the whole image
        return ReceptiveField(-cy, H - cy, -cx, W - cx, sy, sx, (hh, ww), (H, W))
    return ReceptiveField(int(ys.min()) - cy, int(ys.max()) + 1 - cy, int(xs.min()) - cx, int(xs.max()) + 1 - cx,
                          sy, sx, (hh, ww), (H, W))


def peak_boxes(maps: torch.Tensor, rf: ReceptiveField) -> tuple[torch.Tensor, torch.Tensor]:
    """For maps ``[E, h, w]``: the flat peak position ``[E]`` and the receptive-field box ``[E, 4]`` around it."""
    if maps.dim() != 3:
        raise ShapeError(f"maps must be [E, h, w], got {tuple(maps.shape)}")
    pos = maps.reshape(maps.shape[0], -1).argmax(1)
    return pos, rf.box(pos)
