"""Shared, cached helpers of the foundation / examples / concepts tests (no tests here).

Expensive objects (the trained Fashion-MNIST CNN, MobileNetV2, MiniLM, the Aligned map)
are built once per process (``functools.lru_cache``); foundation-model outputs of the
fixed Fashion-MNIST images used to fit ``Aligned`` are kept in a persistent
:class:`~semlens_fast.concepts.EmbeddingCache` under ``$SEMLENS_CACHE`` so reruns are fast.
"""
from __future__ import annotations

import functools
import os

import torch
from torch import nn

from semlens_fast.foundation import FoundationModel
from semlens_fast.foundation.base import IMAGE, TEXT
from semlens_fast.ops import TopKState
from semlens_fast.store import TopKStore
from tests.helpers_collect import CACHE

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VISION_SIZE = 32  # MobileNetV2 input side in tests (fast on 2 cores)
FIT_IDS = torch.arange(0, 1000)  # Fashion-MNIST train ids used to fit Aligned
HELDOUT = torch.arange(50000, 50400)  # disjoint ids for known-answer tests


class TinyImageFM(FoundationModel):
    """A fast deterministic image 'foundation model': a seeded linear map of 8x8 pixels."""

    modalities = frozenset({IMAGE})
    image_size = 8
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)

    def __init__(self, dim: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(3 * 64, dim)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(dim, 3 * 64, generator=g))
            self.lin.bias.copy_(torch.randn(dim, generator=g))
        self._dim = dim
        self.name = f"tiny{dim}-{seed}"

    @property
    def dim(self) -> int:
        return self._dim

    def modules(self):
        return [self.lin]

    def _encode_image_batch(self, x):
        return self.lin(x.flatten(1))


class TinyTextFM(FoundationModel):
    """Bag-of-characters text 'foundation model' (deterministic, instant)."""

    modalities = frozenset({TEXT})
    name = "tinytext"

    def __init__(self, dim: int = 16):
        super().__init__()
        self._dim = dim

    @property
    def dim(self) -> int:
        return self._dim

    def _encode_text_batch(self, texts):
        out = torch.zeros(len(texts), self._dim)
        for i, t in enumerate(texts):
            for ch in t:
                out[i, ord(ch) % self._dim] += 1
        return out + 1e-3


def make_store(ids, values=None, positions=None, layer="l", fingerprints=None, pools=None) -> TopKStore:
    """A TopKStore from explicit ``ids [C, k]`` (``-1`` = empty slot)."""
    ids = torch.as_tensor(ids, dtype=torch.int64)
    C, k = ids.shape
    if values is None:
        values = torch.arange(k, 0, -1, dtype=torch.float32).expand(C, k).clone()
    values = torch.as_tensor(values, dtype=torch.float32).clone()
    values[ids < 0] = float("-inf")
    if positions is None:
        positions = torch.full((C, k), -1, dtype=torch.int32)
    st = TopKState(values, ids, torch.as_tensor(positions, dtype=torch.int32), torch.zeros(C, dtype=torch.int64))
    meta = {"k": k, "pools": pools or {layer: "max"}, "fingerprints": fingerprints or {"model": "m0", "dataset": "d0"},
            "complete": True}
    return TopKStore({layer: st}, meta)


@functools.lru_cache(maxsize=None)
def fashion():
    from semlens_fast.data import fashion_mnist

    return fashion_mnist("train")


@functools.lru_cache(maxsize=None)
def cnn():
    from semlens_fast.models import trained_fashion_cnn

    return trained_fashion_cnn(steps=150, cache_dir=CACHE)


@functools.lru_cache(maxsize=None)
def mobilenet():
    from semlens_fast.foundation import PackagedVision

    return PackagedVision(image_size=VISION_SIZE)


@functools.lru_cache(maxsize=None)
def minilm():
    from semlens_fast.foundation import SentenceTransformerText

    return SentenceTransformerText()


def cached_embeddings(fm, images, ids):
    """Embeddings of ``images[ids]`` (full images) through a persistent EmbeddingCache."""
    from semlens_fast.concepts import EmbeddingCache

    cache = EmbeddingCache(os.path.join(CACHE, "test-embeddings"), fm.fingerprint, fm.dim)
    keys = torch.zeros(len(ids), 5, dtype=torch.int64)
    keys[:, 0] = ids
    found, E = cache.lookup(keys)
    miss = (~found).nonzero().flatten()
    if len(miss):
        e = fm.encode_images(images[ids[miss]].unsqueeze(1))
        cache.add(keys[miss], e)
        E[miss] = e
    return E


@functools.lru_cache(maxsize=None)
def aligned():
    from semlens_fast.foundation import Aligned

    ds = fashion()
    v, t = mobilenet(), minilm()
    X = cached_embeddings(v, ds.images, FIT_IDS)
    return Aligned.fit(v, t, None, ds.labels[FIT_IDS], ds.classes, image_embeddings=X)
