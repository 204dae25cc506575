"""Per-component relevance: concept relevance per channel, streamed over datasets, and
CRP-style conditional heatmaps for relevance-guided crops.

* :func:`channel_relevance` — ``r[b, c] = sum_{spatial} R_layer[b, c, ...]`` for a target
  class (the concept relevance used by audits).
* :class:`ChannelRelevanceStats` / :func:`dataset_channel_relevance` — streaming
  aggregation over a dataset: sums, means, per-class sums and the top-k most relevant
  samples per channel (kept by the ``semlens_fast.ops`` top-k kernels: values float32,
  ids int64, missing entries id -1 / value -inf, ties: lower sample id wins).
* :func:`conditional_relevance` — CRP: the input heatmap of the relevance flowing through
  one channel of a layer (all other channels' relevance zeroed at that layer).
* :func:`relevance_crop_box` — the bounding box holding a given share of a heatmap's
  positive relevance (relevance-guided crops).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..errors import ArgumentError, ShapeError
from ..ops import TopKState, topk_update
from .composite import Composite
from .engine import RelevanceEngine

__all__ = ["channel_relevance", "ChannelRelevanceStats", "dataset_channel_relevance", "conditional_relevance",
           "relevance_crop_box"]


def _engine(model_or_engine: nn.Module | RelevanceEngine, composite: Composite | None,
            x: Tensor) -> RelevanceEngine:
    if isinstance(model_or_engine, RelevanceEngine):
        if composite is not None and composite is not model_or_engine.composite:
            raise ArgumentError("composite: an engine already has its rule set; pass composite=None")
        return model_or_engine
    return RelevanceEngine(model_or_engine, composite, example=x)


def _per_channel(r: Tensor, layer: str) -> Tensor:
    if r.dim() < 2:
        raise ShapeError(f"layer {layer!r}: relevance has shape {tuple(r.shape)}, expected [B, C, ...]")
    return r.reshape(r.shape[0], r.shape[1], -1).sum(-1)


def channel_relevance(
    model: nn.Module | RelevanceEngine,
    x: Tensor,
    layer: str,
    target: int | Sequence[int] | Tensor | None = None,
    composite: Composite | None = None,
    **kwargs: Any,
) -> Tensor:
    """Relevance of each channel of ``layer`` for ``target``: ``[B, C]``,
    ``r[b, c] = sum over positions of R[b, c, ...]`` at the layer's output."""
    eng = _engine(model, composite, x)
    res = eng(x, target, record=[layer], **kwargs)
    return _per_channel(res.layers[layer], layer)


@dataclass
class ChannelRelevanceStats:
    """Streaming statistics of channel relevance over a dataset.

    Attributes:
        sum: ``[C]`` sum over samples of ``r[b, c]`` (float64).
        abs_sum: ``[C]`` sum of ``|r[b, c]|``.
        count: number of samples seen.
        class_sum: ``[num_classes, C]`` sums per explained (target) class.
        class_count: ``[num_classes]`` samples per explained class.
        topk: the ``k`` most relevant samples per channel, a :class:`semlens_fast.ops.TopKState`
            (``None`` when ``k = 0``); also as :attr:`topk_values` / :attr:`topk_ids`.
    """

    sum: Tensor
    abs_sum: Tensor
    count: int
    class_sum: Tensor
    class_count: Tensor
    topk: TopKState | None

    @classmethod
    def empty(cls, channels: int, num_classes: int, k: int,
              device: torch.device | str = "cpu") -> "ChannelRelevanceStats":
        if k < 0:
            raise ArgumentError(f"k: expected >= 0, got {k}")
        return cls(torch.zeros(channels, dtype=torch.float64, device=device),
                   torch.zeros(channels, dtype=torch.float64, device=device), 0,
                   torch.zeros(num_classes, channels, dtype=torch.float64, device=device),
                   torch.zeros(num_classes, dtype=torch.long, device=device),
                   TopKState.empty(channels, k, device=device) if k > 0 else None)

    @property
    def topk_values(self) -> Tensor:
        """``[C, k]`` largest ``r[b, c]`` (float32, best first, ``-inf`` where missing)."""
        return self.topk.values if self.topk is not None else torch.empty(self.sum.shape[0], 0)

    @property
    def topk_ids(self) -> Tensor:
        """``[C, k]`` their sample ids (int64, ``-1`` where missing; ties: lower id first)."""
        return self.topk.ids if self.topk is not None else torch.empty(self.sum.shape[0], 0, dtype=torch.long)

    @property
    def mean(self) -> Tensor:
        """``[C]`` mean relevance per sample."""
        return self.sum / max(self.count, 1)

    @property
    def class_mean(self) -> Tensor:
        """``[num_classes, C]`` mean relevance per sample of each class (0 for unseen classes)."""
        return self.class_sum / self.class_count.clamp(min=1).unsqueeze(1)

    def update(self, r: Tensor, target: Tensor, ids: Tensor) -> None:
        """Add a batch: ``r`` ``[B, C]``, ``target`` ``[B]`` class per sample, ``ids`` ``[B]``
        dataset ids (unique, >= 0). The top-k merge is :func:`semlens_fast.ops.topk_update`."""
        if r.dim() != 2 or r.shape[1] != self.sum.shape[0]:
            raise ShapeError(f"r: expected [B, {self.sum.shape[0]}], got {tuple(r.shape)}")
        if target.shape != (r.shape[0],) or ids.shape != (r.shape[0],):
            raise ShapeError(f"target/ids: expected [{r.shape[0]}], got {tuple(target.shape)} and {tuple(ids.shape)}")
        r64 = r.to(self.sum.device, torch.float64)
        self.sum += r64.sum(0)
        self.abs_sum += r64.abs().sum(0)
        self.count += r.shape[0]
        t = target.to(self.class_sum.device)
        self.class_sum.index_add_(0, t, r64)
        self.class_count.index_add_(0, t, torch.ones_like(t))
        if self.topk is not None:
            topk_update(self.topk, r.to(self.topk.values.device, torch.float32),
                        ids.to(self.topk.values.device, torch.long))


def dataset_channel_relevance(
    model: nn.Module | RelevanceEngine,
    data: Iterable[Any],
    layer: str,
    target: int | None = None,
    composite: Composite | None = None,
    k: int = 0,
    progress: bool = True,
    **kwargs: Any,
) -> ChannelRelevanceStats:
    """Stream ``data`` (an iterable of input batches, or ``(inputs, ...)`` tuples such as a
    DataLoader yields) and aggregate :func:`channel_relevance` of ``layer``.

    ``target=None`` explains each sample's predicted class; an int explains that class for
    all samples. Sample ids are positions in the stream (0, 1, 2, ...)."""
    from tqdm.auto import tqdm

    if k < 0:
        raise ArgumentError(f"k: expected >= 0, got {k}")
    stats: ChannelRelevanceStats | None = None
    eng: RelevanceEngine | None = model if isinstance(model, RelevanceEngine) else None
    offset = 0
    for batch in tqdm(data, disable=not progress, desc=f"relevance {layer}"):
        xb = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(xb, Tensor):
            raise ArgumentError(f"data: batches must be tensors or tuples starting with a tensor, got "
                                f"{type(xb).__name__}")
        if eng is None:
            eng = _engine(model, composite, xb)
        res = eng(xb, target, record=[layer], **kwargs)
        r = _per_channel(res.layers[layer], layer)
        if stats is None:
            stats = ChannelRelevanceStats.empty(r.shape[1], res.output.shape[1], k, device=r.device)
        ids = torch.arange(offset, offset + r.shape[0], device=r.device)
        stats.update(r, res.target, ids)
        offset += r.shape[0]
    if stats is None:
        raise ArgumentError("data: the dataset yielded no batch")
    return stats


def conditional_relevance(
    model: nn.Module | RelevanceEngine,
    x: Tensor,
    layer: str,
    channels: Sequence[int] | Tensor,
    target: int | Sequence[int] | Tensor | None = None,
    composite: Composite | None = None,
    **kwargs: Any,
) -> Tensor:
    """CRP-style conditional heatmaps: ``[B, K, *x.shape[1:]]``, entry ``[b, i]`` the input
    relevance of sample ``b`` when only channel ``channels[i]`` of ``layer`` keeps its relevance
    (Achtibat et al., CRP). All ``K`` conditions run as one batch of ``B*K``; the heatmaps of
    all channels of a layer add up to the unconditional heatmap for rules that are linear in
    the relevance (all rules except contrast mode's stream assignment)."""
    eng = _engine(model, composite, x)
    ch = torch.as_tensor(channels, dtype=torch.long).reshape(-1)
    if ch.numel() == 0:
        raise ArgumentError("channels: expected at least one channel index")
    B, K = x.shape[0], ch.numel()
    xr = x.repeat_interleave(K, dim=0)
    if target is None:  # explain each sample's own prediction
        with torch.no_grad():
            tgt = eng.model(x).argmax(dim=1).repeat_interleave(K)
    elif isinstance(target, int):
        tgt = torch.full((B * K,), target, dtype=torch.long)
    else:
        tgt = torch.as_tensor(target).long().reshape(-1)
        if tgt.numel() != B:
            raise ShapeError(f"target: {tgt.numel()} classes given for a batch of {B}")
        tgt = tgt.repeat_interleave(K)
    chan_rep = ch.repeat(B).to(x.device)

    def mask(r: Tensor) -> Tensor:
        if r.dim() < 2:
            raise ShapeError(f"layer {layer!r}: relevance of shape {tuple(r.shape)} has no channel dimension")
        if int(ch.max()) >= r.shape[1] or int(ch.min()) < 0:
            raise ArgumentError(f"channels: indices must be in [0, {r.shape[1]}) for layer {layer!r}, got "
                                f"{ch.tolist()[:8]}")
        m = torch.zeros(r.shape[0], r.shape[1], device=r.device, dtype=r.dtype)
        m[torch.arange(r.shape[0], device=r.device), chan_rep] = 1
        return r * m.view(*m.shape, *([1] * (r.dim() - 2)))

    res = eng(xr, tgt.to(x.device), modifiers={layer: mask}, **kwargs)
    return res.input.reshape(B, K, *x.shape[1:])


def relevance_crop_box(heatmap: Tensor, mass: float = 0.9) -> Tensor:
    """Bounding boxes ``[N, 4]`` (``y0, x0, y1, x1``, end exclusive, int64) of the smallest set
    of highest-relevance pixels holding ``mass`` of each heatmap's positive relevance.

    ``heatmap``: ``[N, H, W]`` (or ``[N, C, H, W]``, summed over channels). A heatmap without
    positive relevance gets the full image."""
    if not 0 < mass <= 1:
        raise ArgumentError(f"mass: expected in (0, 1], got {mass}")
    h = heatmap
    if h.dim() == 4:
        h = h.sum(1)
    if h.dim() != 3:
        raise ShapeError(f"heatmap: expected [N, H, W] or [N, C, H, W], got {tuple(heatmap.shape)}")
    N, H, W = h.shape
    p = h.clamp(min=0).reshape(N, -1)
    vals, order = torch.sort(p, dim=1, descending=True)
    cum = vals.cumsum(1)
    tot = cum[:, -1:]
    need = (cum < mass * tot).sum(1) + 1  # number of pixels needed
    boxes = torch.empty(N, 4, dtype=torch.long)
    for i in range(N):
        if tot[i, 0] <= 0:
            boxes[i] = torch.tensor([0, 0, H, W])
            continue
        sel = order[i, : int(need[i])]
        ys, xs = sel // W, sel % W
        boxes[i] = torch.stack([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]).cpu()
    return boxes
