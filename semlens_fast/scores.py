"""Interpretability scores of a ConceptDB: clarity, polysemanticity, redundancy, similarity.

All scores work on the cosine geometry of the foundation model's embedding space: example
embeddings are unit-normalised first (the ConceptDB already stores unit vectors), empty
example slots are masked out (``valid``; by default every non-zero example is valid), and
every function is batched over all components in torch (any device).

Relation to ``semanticlens==0.2.1`` (``semanticlens.scores``):

* :func:`clarity` is its ``clarity_score`` (same formula) plus masking of empty slots.
* :func:`polysemanticity` is its ``polysemanticity_score`` (2-cluster k-means, ``1 -``
  clarity of the cluster centres, the same fallback for degenerate clusterings), but the
  k-means runs batched over all components in torch instead of one sklearn ``KMeans`` per
  component (``n_init`` restarts, greedy k-means++ seeding as in sklearn). Its random
  draws come from a counter-based hash of ``(seed, component, restart, draw)``, so the
  result is deterministic given the seed and independent of the chunk size and device.
  It cannot reproduce sklearn's random stream: on data with one clear best 2-clustering
  both agree (tested); on ambiguous data they may pick different local optima.
* :func:`redundancy` is its ``redundancy_score`` (mean over components of the max cosine
  with another component) computed tiled by :func:`semlens_fast.ops.pairwise_max`: memory
  ``O(C)`` instead of its ``C x C`` matrix (plus a ``C x C`` identity).
* :func:`similarity` fixes two bugs of its ``similarity_score``: it contracted the wrong
  axis when the number of rows of ``y`` equalled the embedding dimension
  (``x.shape[1] == y.shape[0]``), and returned row-wise paired cosines instead of the
  similarity matrix when both inputs happened to have the same shape. Here the last axis is
  always the embedding axis and the row-wise form is an explicit option.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .errors import ArgumentError, DTypeError, ShapeError

__all__ = ["clarity", "polysemanticity", "kmeans", "KMeansResult", "redundancy", "Redundancy", "similarity"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------- input checks


def _examples(examples: object, valid: object, name: str = "examples", lazy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(examples, torch.Tensor):
        try:
            examples = torch.as_tensor(examples)
        except Exception as exc:
            raise DTypeError(f"{name} must be a float tensor [C, k, d], got {type(examples).__name__}") from exc
    if examples.dtype not in _FLOATS:
        raise DTypeError(f"{name} must be a float tensor [C, k, d], got dtype {examples.dtype}")
    if examples.dim() != 3:
        raise ShapeError(f"{name} must be [C, k, d] (components, examples, embedding dim), got shape {tuple(examples.shape)}")
    if valid is None:
        valid = None if lazy else (examples != 0).any(-1)
    else:
        valid = torch.as_tensor(valid, device=examples.device)
        if valid.dtype != torch.bool:
            raise DTypeError(f"valid must be a bool tensor [C, k], got dtype {valid.dtype}")
        if tuple(valid.shape) != tuple(examples.shape[:2]):
            raise ShapeError(f"valid must have shape {tuple(examples.shape[:2])} like {name}[:, :, 0], got {tuple(valid.shape)}")
    return examples, valid


def _chunk(chunk: int) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ArgumentError(f"chunk must be an int >= 1 (components per batch), got {chunk!r}")
    return chunk


def _unit(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """float32 unit rows with invalid rows zeroed."""
    return F.normalize(x.float(), dim=-1) * w.unsqueeze(-1).to(torch.float32)


# ---------------------------------------------------------------------- clarity


@torch.no_grad()
def clarity(examples: torch.Tensor, valid: torch.Tensor | None = None, *, chunk: int = 4096) -> torch.Tensor:
    """Clarity of each component: the mean pairwise cosine similarity of its examples.

    With ``u_1..u_n`` the unit-normalised valid examples of a component::

        clarity = 1 / (n (n - 1)) * sum_{i != j} <u_i, u_j>
                = (|sum_i u_i|^2 - n) / (n (n - 1))

    in ``[-1/(n-1), 1]``; 1 means all examples embed identically. Components with fewer
    than two valid examples get NaN. ``examples [C, k, d]`` (any float dtype), ``valid
    [C, k]`` bool (default: the non-zero examples). Returns float32 ``[C]``. Same formula
    as ``semanticlens.scores.clarity_score`` (which has no masking).
    """
    examples, valid = _examples(examples, valid)
    chunk = _chunk(chunk)
    C = examples.shape[0]
    out = torch.empty(C, dtype=torch.float32, device=examples.device)
    for c0 in range(0, C, chunk):
        x, w = examples[c0 : c0 + chunk], valid[c0 : c0 + chunk]
        u = _unit(x, w).double()
        n = w.sum(1).double()
        s = u.sum(1).pow(2).sum(-1)
        res = (s - n) / (n * (n - 1))
        out[c0 : c0 + chunk] = torch.where(n >= 2, res, torch.full_like(res, float("nan"))).float()
    return out


# ---------------------------------------------------------------------- batched k-means

_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing function on int64 tensors holding values < 2**32 (no overflow)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def _uniform(seed: int, comp: torch.Tensor, R: int, n: int, salt: int) -> torch.Tensor:
    """Counter-based uniforms in [0, 1): ``[B, R, n]`` from (seed, component, restart, draw, salt)."""
    dev = comp.device
    h = _hash32(torch.full((), (seed & _M32) ^ 0x9E3779B9, dtype=torch.int64, device=dev))
    h = _hash32(h ^ (comp.to(torch.int64) & _M32))[:, None, None]
    r = torch.arange(R, device=dev, dtype=torch.int64)[None, :, None]
    j = torch.arange(n, device=dev, dtype=torch.int64)[None, None, :] + (salt << 8)
    h = _hash32(h ^ _hash32(r * 0x10001 + 0x51ED27))
    h = _hash32(h ^ _hash32(j + 0x2545F49))
    return (h >> 8).to(torch.float64) / float(1 << 24)


def _sample(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: ``p [..., n] >= 0`` (rows summing > 0), ``u [..., m]`` -> indices ``[..., m]``."""
    cum = p.cumsum(-1)
    t = u * cum[..., -1:]
    idx = torch.searchsorted(cum.contiguous(), t.contiguous(), right=True)
    idx = idx.clamp(max=p.shape[-1] - 1)
    # never land on a zero-probability slot (possible only through rounding): step back to the last positive one
    pos = p > 0
    last_pos = torch.where(pos, torch.arange(p.shape[-1], device=p.device).expand_as(p), torch.full_like(p, -1, dtype=torch.int64))
    last_pos = last_pos.cummax(-1).values
    return torch.gather(last_pos, -1, idx).clamp(min=0)


def _argmin_small(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, argmin)`` over a short axis by a running comparison (ties: lower index); much
    faster than ``torch.argmin`` over a non-innermost axis of size 2-3."""
    xs = x.unbind(dim)
    best = xs[0]
    idx = torch.zeros_like(best, dtype=torch.int64)
    for c in range(1, len(xs)):
        better = xs[c] < best
        best = torch.where(better, xs[c], best)
        idx = torch.where(better, torch.full_like(idx, c), idx)
    return best, idx


class KMeansResult(NamedTuple):
    """Output of :func:`kmeans` for ``C`` components, ``k`` examples, ``K`` clusters.

    ``labels [C, k]`` int64 (-1 for invalid examples), ``weights [C, K, k]`` float64: the
    cluster centres as weights over the examples (``centre_c = sum_i weights[c, K, i] u_i``,
    i.e. the mean of the cluster's unit examples), ``counts [C, K]``, ``inertia [C]`` (sum of
    squared distances of the valid examples to their centre), ``gram [C, k, k]`` float64.
    """

    labels: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor
    inertia: torch.Tensor
    gram: torch.Tensor

    def centers(self, examples: torch.Tensor) -> torch.Tensor:
        """The centres ``[C, K, d]`` as vectors (``examples``: the same ``[C, k, d]`` tensor)."""
        u = F.normalize(examples.double(), dim=-1)
        return torch.einsum("cKk,ckd->cKd", self.weights, u)


def _kmeans_gram(G: torch.Tensor, w: torch.Tensor, comp: torch.Tensor, K: int, n_init: int, max_iter: int,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """k-means in the span of the examples, everything through the Gram matrix ``G [B, k, k]``."""
    B, k, _ = G.shape
    R = n_init
    dev = G.device
    diag = G.diagonal(dim1=-2, dim2=-1)  # [B, k]
    wf = w.to(G.dtype)  # [B, k]
    big = torch.finfo(G.dtype).max

    def d2_points(j: torch.Tensor) -> torch.Tensor:
        # squared distances of every example to example j: j [B, R, m] -> [B, R, m, k]
        gj = torch.gather(G.unsqueeze(1).expand(B, R, k, k), 2, j.unsqueeze(-1).expand(B, R, j.shape[-1], k))
        dj = torch.gather(diag.unsqueeze(1).expand(B, R, k), 2, j)
        return (diag[:, None, None, :] - 2 * gj + dj.unsqueeze(-1)).clamp(min=0)

    # --- greedy k-means++ seeding (as sklearn: 2 + floor(ln K) candidates per new centre)
    trials = 2 + int(torch.log(torch.tensor(float(K))).item())
    wR = wf.unsqueeze(1).expand(B, R, k)
    first = _sample(wR, _uniform(seed, comp, R, 1, salt=0))  # [B, R, 1]
    centres = [first[..., 0]]
    closest = d2_points(first)[:, :, 0, :]  # [B, R, k]
    for c in range(1, K):
        p = closest * wR
        p = torch.where(p.sum(-1, keepdim=True) > 0, p, wR)  # all points coincide: uniform
        cand = _sample(p, _uniform(seed, comp, R, trials, salt=c))  # [B, R, trials]
        dc = torch.minimum(closest.unsqueeze(2), d2_points(cand))  # [B, R, trials, k]
        pot = (dc * wR.unsqueeze(2)).sum(-1)  # [B, R, trials]
        best = pot.argmin(-1, keepdim=True)  # first minimum
        centres.append(torch.gather(cand, 2, best)[..., 0])
        closest = torch.gather(dc, 2, best.unsqueeze(-1).expand(B, R, 1, k))[:, :, 0, :]
    idx = torch.stack(centres, -1)  # [B, R, K]
    A = F.one_hot(idx, k).to(G.dtype)  # [B, R, K, k] centre weights

    # --- Lloyd iterations in Gram space
    labels = None
    for _ in range(max_iter):
        GA = torch.einsum("bij,brKj->brKi", G, A)  # <u_i, c_K>  [B, R, K, k]
        cc = (GA * A).sum(-1)  # |c_K|^2  [B, R, K]
        dist = diag[:, None, None, :] - 2 * GA + cc.unsqueeze(-1)  # [B, R, K, k]
        new = _argmin_small(dist, 2)[1]  # [B, R, k], ties -> lower cluster
        onehot = F.one_hot(new, K).to(G.dtype).transpose(-1, -2) * wf[:, None, None, :]  # [B, R, K, k]
        cnt = onehot.sum(-1, keepdim=True)
        A = torch.where(cnt > 0, onehot / cnt.clamp(min=1), A)  # empty cluster: keep its centre
        if labels is not None and bool((new == labels).all()):
            break
        labels = new
    GA = torch.einsum("bij,brKj->brKi", G, A)
    cc = (GA * A).sum(-1)
    dist = (diag[:, None, None, :] - 2 * GA + cc.unsqueeze(-1)).clamp(min=0)
    dmin, labels = _argmin_small(dist, 2)
    inertia = torch.where(w.unsqueeze(1), dmin, torch.zeros_like(dmin)).sum(-1)  # [B, R]
    inertia = torch.where(torch.isfinite(inertia), inertia, torch.full_like(inertia, big))
    best = inertia.argmin(1)  # first minimum: lowest restart
    ar = torch.arange(B, device=dev)
    labels = labels[ar, best]
    onehot = F.one_hot(labels, K).to(G.dtype).transpose(-1, -2) * wf[:, None, :]
    counts = onehot.sum(-1)
    weights = torch.where(counts.unsqueeze(-1) > 0, onehot / counts.clamp(min=1).unsqueeze(-1), A[ar, best])
    labels = torch.where(w, labels, torch.full_like(labels, -1))
    return labels, weights, counts, inertia[ar, best]


def _check_kmeans_args(n_clusters: object, n_init: object, max_iter: object, seed: object) -> None:
    for name, v, lo in (("n_clusters", n_clusters, 2), ("n_init", n_init, 1), ("max_iter", max_iter, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ArgumentError(f"{name} must be an int >= {lo}, got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ArgumentError(f"seed must be an int, got {seed!r}")


@torch.no_grad()
def kmeans(examples: torch.Tensor, valid: torch.Tensor | None = None, *, n_clusters: int = 2, n_init: int = 10,
           max_iter: int = 100, seed: int = 123, chunk: int = 2048) -> KMeansResult:
    """Batched k-means of every component's unit-normalised valid examples (Euclidean, like sklearn).

    Per component, ``n_init`` restarts each seeded by greedy k-means++ and refined by Lloyd
    iterations until the assignment no longer changes (or ``max_iter``); the restart with
    the lowest inertia wins (ties: the first). Runs entirely through the Gram matrices
    ``[C, k, k]`` in float32 (as sklearn on float32 data); ``gram`` / ``weights`` are returned
    in float64 (cost independent of ``d`` after the Gram product). Deterministic
    given ``seed`` (random draws hash ``(seed, component, restart, draw)``). An empty cluster
    keeps its previous centre.
    """
    lazy_valid = valid is None
    examples, valid = _examples(examples, valid, lazy=True)
    _check_kmeans_args(n_clusters, n_init, max_iter, seed)
    chunk = _chunk(chunk)
    C, k, _ = examples.shape
    if lazy_valid:
        valid = torch.empty(C, k, dtype=torch.bool, device=examples.device)
    dev = examples.device
    labels = torch.empty(C, k, dtype=torch.int64, device=dev)
    weights = torch.empty(C, n_clusters, k, dtype=torch.float64, device=dev)
    counts = torch.empty(C, n_clusters, dtype=torch.float64, device=dev)
    inertia = torch.empty(C, dtype=torch.float64, device=dev)
    gram = torch.empty(C, k, k, dtype=torch.float64, device=dev)
    for c0 in range(0, C, chunk):
        x = examples[c0 : c0 + chunk]
        xf = x if x.dtype == torch.float32 else x.float()
        R = (xf @ xf.transpose(1, 2)).double()  # raw Gram in float32 (fast), then float64
        nrm = R.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
        if lazy_valid:
            valid[c0 : c0 + chunk] = nrm > 0
        w = valid[c0 : c0 + chunk]
        inv = torch.where(w, 1.0 / nrm.clamp(min=1e-300), torch.zeros_like(nrm))
        G = R * inv.unsqueeze(-1) * inv.unsqueeze(-2)  # cosines of the unit examples, 0 for invalid ones
        comp = torch.arange(c0, c0 + x.shape[0], device=dev)
        lab, wt, cnt, ine = _kmeans_gram(G.float(), w, comp, n_clusters, n_init, max_iter, seed)
        sl = slice(c0, c0 + x.shape[0])
        labels[sl], weights[sl], counts[sl], inertia[sl], gram[sl] = lab, wt, cnt, ine, G
    return KMeansResult(labels, weights, counts, inertia, gram)


@torch.no_grad()
def polysemanticity(examples: torch.Tensor, valid: torch.Tensor | None = None, *, n_clusters: int = 2,
                    n_init: int = 10, max_iter: int = 100, seed: int = 123, replace_empty_clusters: bool = True,
                    chunk: int = 2048) -> torch.Tensor:
    """Polysemanticity of each component: how far apart the two (``n_clusters``) groups of its examples are.

    The valid unit examples ``u_i`` of a component are clustered by :func:`kmeans` into
    ``K = n_clusters`` clusters with centres ``c_1..c_K`` (means of the members); then::

        polysemanticity = 1 - clarity(c_1..c_K) = 1 - 1/(K (K-1)) sum_{a != b} cos(c_a, c_b)

    (for ``K = 2``: ``1 - cos(c_1, c_2)``), in ``[0, 2]``, 0 = both clusters point the same
    way. **Degenerate clusterings** (``replace_empty_clusters``, as semanticlens): when the
    smallest cluster has fewer than 2 members, the score is instead
    ``1 - mean_{i < min(10, n)} cos(m, u_i)`` with ``m`` the mean of all valid examples and
    ``u_i`` the first ``min(10, n)`` valid examples. Components with fewer than
    ``n_clusters`` valid examples get NaN. Returns float32 ``[C]``.

    Same formula as ``semanticlens.scores.polysemanticity_score``; its k-means is one
    sklearn ``KMeans(n_init=10, random_state=seed)`` per component, ours is batched (see the
    module docstring for when the two can differ).
    """
    if not isinstance(replace_empty_clusters, bool):
        raise ArgumentError(f"replace_empty_clusters must be a bool, got {replace_empty_clusters!r}")
    res = kmeans(examples, valid, n_clusters=n_clusters, n_init=n_init, max_iter=max_iter, seed=seed, chunk=chunk)
    valid = res.labels >= 0
    G, A = res.gram, res.weights  # [C, k, k], [C, K, k]
    K = n_clusters
    GA = torch.einsum("cij,cKj->cKi", G, A)
    dots = torch.einsum("cKi,cLi->cKL", GA, A)  # <c_a, c_b>
    nrm = dots.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
    cos = dots / (nrm.unsqueeze(-1) * nrm.unsqueeze(-2)).clamp(min=1e-300)
    off = ~torch.eye(K, dtype=torch.bool, device=G.device)
    clar = (cos * off).sum((-1, -2)) / (K * (K - 1))
    poly = 1 - clar
    n = valid.sum(1)
    if replace_empty_clusters:
        bad = res.counts.amin(-1) < 2
        if bool(bad.any()):
            wf = valid.to(G.dtype)
            Gw = torch.einsum("cij,cj->ci", G, wf)  # n <u_i, m>
            mm = (Gw * wf).sum(-1).clamp(min=0).sqrt()  # n |m|
            cosm = Gw / mm.clamp(min=1e-300).unsqueeze(-1)  # cos(m, u_i)
            first = (valid.cumsum(1) <= 10) & valid
            nf = first.sum(1).clamp(min=1)
            alt = 1 - (cosm * first).sum(1) / nf
            poly = torch.where(bad, alt, poly)
    poly = torch.where(n >= K, poly, torch.full_like(poly, float("nan")))
    return poly.float()


# ---------------------------------------------------------------------- redundancy


class Redundancy(NamedTuple):
    """Output of :func:`redundancy`.

    ``per_component [C]`` float32: the max cosine with another component (NaN for
    components left out); ``partner [C]`` int64: which one (-1 if none); ``layer``: the
    mean of ``per_component`` over the included components (semanticlens' score).
    """

    per_component: torch.Tensor
    partner: torch.Tensor
    layer: float


@torch.no_grad()
def redundancy(embeddings: torch.Tensor, include: torch.Tensor | None = None) -> Redundancy:
    """Redundancy of a layer's components: how well another component of the layer replaces each one.

    With ``e_c`` the component embeddings (any norm)::

        redundancy_c = max_{c' != c} cos(e_c, e_c')          (per component)
        redundancy   = mean_c redundancy_c                   (per layer)

    ``include [C]`` bool selects the components that take part (default: the non-zero
    embeddings; components without any example have a zero embedding); excluded ones get
    NaN and partner -1. Computed tiled by :func:`semlens_fast.ops.pairwise_max`, never
    building the ``C x C`` matrix: memory ``O(C)`` beyond the inputs. Same formula as
    ``semanticlens.scores.redundancy_score`` (which builds the full matrix).
    """
    from .ops import pairwise_max

    if not isinstance(embeddings, torch.Tensor):
        embeddings = torch.as_tensor(embeddings)
    if embeddings.dim() != 2:
        raise ShapeError(f"embeddings must be [C, d], got shape {tuple(embeddings.shape)}")
    if embeddings.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        if embeddings.dtype == torch.float64:
            embeddings = embeddings.float()
        else:
            raise DTypeError(f"embeddings must be a float tensor [C, d], got dtype {embeddings.dtype}")
    C = embeddings.shape[0]
    if include is None:
        include = (embeddings != 0).any(-1)
    else:
        include = torch.as_tensor(include, device=embeddings.device)
        if include.dtype != torch.bool or tuple(include.shape) != (C,):
            raise ShapeError(f"include must be a bool tensor [{C}], got {include.dtype} {tuple(include.shape)}")
    per = torch.full((C,), float("nan"), dtype=torch.float32, device=embeddings.device)
    partner = torch.full((C,), -1, dtype=torch.int64, device=embeddings.device)
    idx = include.nonzero().flatten()
    if idx.numel() >= 2:
        sub = embeddings if idx.numel() == C else embeddings[idx]
        s, i = pairwise_max(sub, sub, exclude_diagonal=True)
        per[idx] = s
        partner[idx] = idx[i]
    layer = float(per[idx].double().mean()) if idx.numel() >= 2 else float("nan")
    return Redundancy(per, partner, layer)


# ---------------------------------------------------------------------- similarity


@torch.no_grad()
def similarity(a: torch.Tensor, b: torch.Tensor, *, rowwise: bool = False, max_elements: int = 1 << 28) -> torch.Tensor:
    """Cosine similarity, always over the last (embedding) axis::

        similarity(a, b)[i, j] = <a_i, b_j> / (|a_i| |b_j|)     (0 where a norm is 0)

    ``a [N, d]`` or ``[d]``, ``b [M, d]`` or ``[d]`` -> ``[N, M]`` (1-D inputs drop their
    axis). ``rowwise=True``: paired rows ``a [N, d]``, ``b [N, d]`` -> ``[N]``. The full
    matrix is built, so it refuses more than ``max_elements`` entries: for large sets use
    :func:`semlens_fast.ops.pairwise_topk` / ``cosine_topk`` (tiled top-k). Returns float32.
    Fixes semanticlens' ``similarity_score`` (see the module docstring).
    """
    a = torch.as_tensor(a)
    b = torch.as_tensor(b)
    for name, t in (("a", a), ("b", b)):
        if not t.is_floating_point():
            raise DTypeError(f"{name} must be a float tensor, got dtype {t.dtype}")
        if t.dim() not in (1, 2):
            raise ShapeError(f"{name} must be [n, d] or [d], got shape {tuple(t.shape)}")
    if a.shape[-1] != b.shape[-1]:
        raise ShapeError(f"a has embedding dimension {a.shape[-1]} (shape {tuple(a.shape)}) but b has {b.shape[-1]} "
                         f"(shape {tuple(b.shape)}); the last axis must match")
    an = F.normalize(a.float(), dim=-1)
    bn = F.normalize(b.to(an.device).float(), dim=-1)
    if rowwise:
        if a.shape != b.shape:
            raise ShapeError(f"rowwise=True needs a and b of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        return (an * bn).sum(-1)
    n = (an.shape[0] if an.dim() == 2 else 1) * (bn.shape[0] if bn.dim() == 2 else 1)
    if n > max_elements:
        raise ArgumentError(f"similarity would build a {n}-element matrix (> max_elements={max_elements}); "
                            "use semlens_fast.ops.pairwise_topk / cosine_topk for large sets")
    return an @ bn.transpose(-1, -2) if bn.dim() == 2 else an @ bn
