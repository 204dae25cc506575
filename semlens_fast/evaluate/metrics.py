"""Faithfulness and robustness metrics of attributions, batched and bounded in memory.

Every metric works on *features*: an attribution map (shape of the input, or one value per
token) is summed per feature with ``feature_mask`` (an integer id per input element, e.g.
2x2 pixel patches, tokens, table columns), and perturbing a feature sets all its elements
to ``baseline``. Perturbed inputs are built and evaluated ``chunk`` at a time, so memory
stays at ``chunk`` inputs whatever the number of steps or subsets.

* :func:`perturbation_curve` — deletion (MoRF / LeRF) and insertion curves: the probability
  of the explained class while features are removed (or inserted) in the order of their
  attribution; :func:`curve_auc` — their area (fraction of features on the x axis).
* :func:`faithfulness_correlation` — Bhatt et al. (2020): Pearson correlation, over random
  feature subsets, between the attribution mass of the subset and the drop in probability
  when it is removed.
* :func:`max_sensitivity` — Yeh et al. (2019): the largest relative change of the explanation
  under uniform input noise of radius ``r`` (and the mean, "average sensitivity").
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..errors import ArgumentError, ShapeError

__all__ = ["feature_scores", "perturbation_curve", "curve_auc", "faithfulness_correlation", "max_sensitivity",
           "target_probability"]

Forward = Callable[[Tensor], Tensor]


def _check(x: Tensor, target: Tensor, feature_mask: Tensor) -> tuple[Tensor, int]:
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ShapeError(f"x: expected a batch [B, ...], got {getattr(x, 'shape', type(x).__name__)}")
    B = x.shape[0]
    target = torch.as_tensor(target, device=x.device).long().reshape(-1)
    if target.numel() == 1 and B > 1:
        target = target.expand(B)
    if target.shape[0] != B:
        raise ShapeError(f"target: {target.shape[0]} classes for a batch of {B}")
    fm = torch.as_tensor(feature_mask, device=x.device).long()
    if fm.shape == x.shape[1:]:
        fm = fm.unsqueeze(0).expand(B, *fm.shape)
    if fm.shape != x.shape:
        raise ShapeError(f"feature_mask: expected shape {tuple(x.shape[1:])} or {tuple(x.shape)}, got {tuple(fm.shape)}")
    if fm.numel() and fm.min() < 0:
        raise ArgumentError("feature_mask: ids must be >= 0")
    return target, fm


def feature_scores(attr: Tensor, feature_mask: Tensor, num_features: int | None = None) -> Tensor:
    """``[B, F]``: the attribution summed over each feature's elements. ``attr`` may have
    fewer trailing dimensions than ``feature_mask`` broadcasts to (e.g. ``[B, 1, H, W]`` for a
    ``[B, C, H, W]`` input: the map is broadcast over channels and each element counts once)."""
    B = attr.shape[0]
    fm = feature_mask
    if fm.dim() == attr.dim() - 1:
        fm = fm.unsqueeze(0).expand(B, *fm.shape)
    if attr.shape != fm.shape:
        attr = attr.expand(fm.shape) if attr.dim() == fm.dim() else attr
    if attr.shape != fm.shape:
        raise ShapeError(f"attribution of shape {tuple(attr.shape)} does not match the features {tuple(fm.shape)}")
    F = int(fm.max()) + 1 if num_features is None else num_features
    out = torch.zeros(B, F, dtype=torch.float64, device=attr.device)
    out.scatter_add_(1, fm.reshape(B, -1), attr.reshape(B, -1).double())
    return out


def target_probability(forward: Forward, x: Tensor, target: Tensor) -> Tensor:
    """Softmax probability of ``target`` (``[B]``) under ``forward``."""
    with torch.no_grad():
        out = forward(x)
    if out.dim() != 2:
        raise ShapeError(f"model output: expected [B, classes] logits, got {tuple(out.shape)}")
    return torch.softmax(out.double(), -1).gather(1, target.view(-1, 1)).squeeze(1)


def _evaluate_masks(forward: Forward, x: Tensor, target: Tensor, fm: Tensor, baseline: Tensor | float,
                    drop: Tensor, chunk: int, start_from_baseline: bool = False) -> Tensor:
    """Probability of the target for each row of ``drop`` (``[B, K, F]`` bool: features set to
    the baseline; with ``start_from_baseline`` the selected features keep ``x`` instead)."""
    B, K, F = drop.shape
    base = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    base = base.expand_as(x) if base.shape != x.shape else base
    out = torch.empty(B, K, dtype=torch.float64, device=x.device)
    flat = [(b, k) for b in range(B) for k in range(K)]
    for s in range(0, len(flat), chunk):
        idx = flat[s:s + chunk]
        bs = torch.tensor([i for i, _ in idx], device=x.device)
        ks = torch.tensor([j for _, j in idx], device=x.device)
        sel = drop[bs, ks]                                              # [n, F]
        elem = torch.gather(sel, 1, fm[bs].reshape(len(idx), -1)).reshape(len(idx), *x.shape[1:])
        if start_from_baseline:
            xin = torch.where(elem, x[bs], base[bs])
        else:
            xin = torch.where(elem, base[bs], x[bs])
        out[bs, ks] = target_probability(forward, xin, target[bs])
    return out


def perturbation_curve(
    forward: Forward,
    x: Tensor,
    attr: Tensor,
    target: Tensor,
    feature_mask: Tensor,
    baseline: Tensor | float = 0.0,
    *,
    mode: str = "deletion",
    order: str = "morf",
    steps: int = 20,
    valid: Tensor | None = None,
    chunk: int = 256,
) -> Tensor:
    """``[B, steps + 1]``: probability of ``target`` after perturbing the first ``k/steps`` of the
    (valid) features, ``k = 0..steps``, ranked by their summed attribution.

    Args:
        mode: ``"deletion"`` (set the ranked features to ``baseline``, starting from ``x``) or
            ``"insertion"`` (start from ``baseline`` everywhere valid and restore them).
        order: ``"morf"`` (most relevant first) or ``"lerf"`` (least relevant first). Ties keep
            the feature order (stable sort).
        valid: ``[B, F]`` features that may be perturbed (e.g. real tokens, not padding); the
            others always keep ``x``.
    """
    if mode not in ("deletion", "insertion"):
        raise ArgumentError(f"mode: expected 'deletion' or 'insertion', got {mode!r}")
    if order not in ("morf", "lerf"):
        raise ArgumentError(f"order: expected 'morf' or 'lerf', got {order!r}")
    if steps < 1:
        raise ArgumentError(f"steps: expected >= 1, got {steps}")
    target, fm = _check(x, target, feature_mask)
    F = int(fm.max()) + 1
    sc = feature_scores(attr, fm, F)
    B = x.shape[0]
    ok = torch.ones(B, F, dtype=torch.bool, device=x.device) if valid is None else valid.to(x.device).bool()
    if ok.shape != (B, F):
        raise ShapeError(f"valid: expected [{B}, {F}], got {tuple(ok.shape)}")
    key = sc if order == "lerf" else -sc
    key = torch.where(ok, key, torch.full_like(key, float("inf")))  # invalid features rank last
    rank = torch.empty(B, F, dtype=torch.long, device=x.device)
    perm = torch.sort(key, dim=1, stable=True).indices
    rank.scatter_(1, perm, torch.arange(F, device=x.device).expand(B, F))
    n_ok = ok.sum(1)
    ks = torch.arange(steps + 1, device=x.device)
    n_k = torch.round(ks[None, :].double() / steps * n_ok[:, None].double()).long()   # [B, K]
    chosen = rank[:, None, :] < n_k[:, :, None]                                          # [B, K, F]
    if mode == "deletion":
        return _evaluate_masks(forward, x, target, fm, baseline, chosen, chunk)
    # insertion: the valid features not yet inserted sit at the baseline
    keep_x = chosen | ~ok[:, None, :]
    return _evaluate_masks(forward, x, target, fm, baseline, keep_x, chunk, start_from_baseline=True)


def curve_auc(curve: Tensor) -> Tensor:
    """``[B]``: area under each curve over the fraction of perturbed features in ``[0, 1]``
    (trapezoidal rule)."""
    K = curve.shape[1] - 1
    return (curve[:, 1:] + curve[:, :-1]).sum(1) / (2 * K)


def faithfulness_correlation(
    forward: Forward,
    x: Tensor,
    attr: Tensor,
    target: Tensor,
    feature_mask: Tensor,
    baseline: Tensor | float = 0.0,
    *,
    subsets: int = 64,
    fraction: float = 0.1,
    valid: Tensor | None = None,
    seed: int = 0,
    chunk: int = 256,
) -> Tensor:
    """``[B]``: Pearson correlation (Bhatt et al. 2020) over ``subsets`` random subsets of
    ``fraction`` of the valid features between the subset's summed attribution and
    ``p(x) - p(x with the subset at baseline)``. A sample whose attributions or drops are
    constant over the subsets gets 0."""
    if not 0 < fraction <= 1:
        raise ArgumentError(f"fraction: expected in (0, 1], got {fraction}")
    if subsets < 2:
        raise ArgumentError(f"subsets: expected >= 2, got {subsets}")
    target, fm = _check(x, target, feature_mask)
    F = int(fm.max()) + 1
    sc = feature_scores(attr, fm, F)
    B = x.shape[0]
    ok = torch.ones(B, F, dtype=torch.bool, device=x.device) if valid is None else valid.to(x.device).bool()
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.rand(B, subsets, F, generator=g).to(x.device)
    noise = torch.where(ok[:, None, :], noise, torch.full_like(noise, 2.0))
    n = torch.clamp(torch.round(fraction * ok.sum(1).double()).long(), min=1)             # [B]
    rank = noise.argsort(-1).argsort(-1)
    drop = rank < n[:, None, None]
    p0 = target_probability(forward, x, target)
    p = _evaluate_masks(forward, x, target, fm, baseline, drop, chunk)
    dp = p0[:, None] - p                                                                  # [B, S]
    a = (sc[:, None, :] * drop).sum(-1)                                                   # [B, S]
    a = a - a.mean(1, keepdim=True)
    dp = dp - dp.mean(1, keepdim=True)
    den = torch.sqrt((a * a).sum(1) * (dp * dp).sum(1))
    return torch.where(den > 0, (a * dp).sum(1) / den.clamp(min=1e-300), torch.zeros_like(den))


def max_sensitivity(
    explain: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    target: Tensor,
    *,
    radius: float,
    samples: int = 8,
    seed: int = 0,
    chunk: int = 64,
) -> tuple[Tensor, Tensor]:
    """``(max, mean)`` per sample (``[B]`` each) of ``||E(x + d) - E(x)|| / ||E(x)||`` over
    ``samples`` draws of ``d ~ U(-radius, radius)`` (Yeh et al. 2019), for the same target.
    The perturbed copies are explained ``chunk`` at a time."""
    if radius <= 0 or samples < 1:
        raise ArgumentError(f"radius/samples: expected > 0 and >= 1, got {radius}, {samples}")
    B = x.shape[0]
    target = torch.as_tensor(target, device=x.device).long().reshape(-1).expand(B)
    e0 = explain(x, target).detach().double().reshape(B, -1)
    g = torch.Generator(device="cpu").manual_seed(seed)
    d = (torch.rand(samples, *x.shape, generator=g, dtype=torch.float32) * 2 - 1).to(x) * radius
    xs = (x.unsqueeze(0) + d).reshape(samples * B, *x.shape[1:])
    ts = target.repeat(samples)
    outs = []
    for s in range(0, xs.shape[0], chunk):
        outs.append(explain(xs[s:s + chunk], ts[s:s + chunk]).detach().double().reshape(-1, e0.shape[1]))
    e = torch.cat(outs).reshape(samples, B, -1)
    num = (e - e0.unsqueeze(0)).norm(dim=-1)
    den = e0.norm(dim=-1).clamp(min=1e-12)
    rel = num / den
    return rel.max(0).values, rel.mean(0)
