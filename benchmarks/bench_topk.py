"""Streaming top-k: ours vs the SemanticLens merge, side by side in one run.

* ``topk_update``: C = 2048 channels, batches of 256 fp32 activations, 200k samples,
  k in {20, 100}. Peers: ``semanticlens==0.2.1`` ``ActMax.update`` (bf16 cat + topk,
  initialised at 0), a plain fp32 cat + ``torch.topk`` + gather, and our torch
  reference. Activations cycle through a pool of 32 distinct random batches (64 MB,
  larger than the caches, so every batch is read from memory as a fresh one would be).
* ``topk_update`` at k = 10,000 (the first 32 batches of 256, lists filling), ours vs the
  same peers (the torch reference is left out: minutes per run).
* ``pool_topk_update`` on fp32 feature maps [256, 2048, 7, 7] and [64, 256, 56, 56]
  (contiguous and channels_last) with pool = max, vs ``torch.amax`` over the spatial
  dims of the same maps alone.
"""
from __future__ import annotations

import os

import pytest
import torch

from semlens_fast.ops import TopKState, pool_topk_update, topk_update

from conftest import scaled

C, B = 2048, 256
N = scaled(200_000, B)
NB = N // B
POOL_BATCHES = 32


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(0)
    acts = [torch.randn(B, C, generator=g) for _ in range(POOL_BATCHES)]
    ids = [torch.arange(i * B, (i + 1) * B) for i in range(NB)]
    return acts, ids


def _ours(acts, ids, k):
    state = TopKState.empty(C, k)
    for i in range(len(ids)):
        topk_update(state, acts[i % POOL_BATCHES], ids[i])
    return state


def _reference(acts, ids, k):
    os.environ["SEMLENS_BACKEND"] = "reference"
    try:
        return _ours(acts, ids, k)
    finally:
        del os.environ["SEMLENS_BACKEND"]


def _semanticlens(acts, ids, k):
    from semanticlens.component_visualization.activation_caching import ActMax

    am = ActMax(k, C)
    for i in range(len(ids)):
        am.update(acts[i % POOL_BATCHES], ids[i])
    return am


def _plain_fp32(acts, ids, k):
    vals = torch.full((C, k), float("-inf"))
    idx = torch.full((C, k), -1, dtype=torch.int64)
    for i in range(len(ids)):
        a = acts[i % POOL_BATCHES]
        allv = torch.cat([vals, a.t()], 1)
        alli = torch.cat([idx, ids[i].expand(C, B)], 1)
        vals, j = torch.topk(allv, k, dim=1)
        idx = alli.gather(1, j)
    return vals, idx


IMPLS = {
    "ours": _ours,
    "semanticlens ActMax.update": _semanticlens,
    "plain fp32 cat+topk": _plain_fp32,
    "ours torch reference": _reference,
}


@pytest.mark.parametrize("k", [20, 100])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_topk_update(benchmark, batches, impl, k):
    acts, ids = batches
    benchmark.group = f"topk_update C={C} B={B} N={N} k={k}"
    benchmark.extra_info.update({"items": N, "unit": "samples", "ours": impl == "ours", "label": impl})
    fn = IMPLS[impl]
    fn(acts, ids[: min(4, NB)], k)  # warm-up (threads, allocator)
    rounds = 1 if impl == "ours torch reference" else 3  # the spec is slow (two stable sorts per batch)
    benchmark.pedantic(fn, args=(acts, ids, k), rounds=rounds, iterations=1)


LARGE_K = 10_000
LARGE_K_BATCHES = scaled(32, 4)  # <= POOL_BATCHES: no batch repeats


@pytest.mark.parametrize("impl", ["ours", "plain fp32 cat+topk", "semanticlens ActMax.update"])
def test_topk_update_large_k(benchmark, impl):
    """k = 10,000 (issue 20.7): the first LARGE_K_BATCHES batches of 256 fresh samples, while
    the lists fill (every sample is a candidate, the worst case for sorted insertion)."""
    g = torch.Generator().manual_seed(5)
    acts = [torch.randn(B, C, generator=g) for _ in range(LARGE_K_BATCHES)]
    ids = [torch.arange(i * B, (i + 1) * B) for i in range(LARGE_K_BATCHES)]
    benchmark.group = f"topk_update C={C} B={B} k={LARGE_K} (first {LARGE_K_BATCHES} batches)"
    benchmark.extra_info.update({"items": LARGE_K_BATCHES * B, "unit": "samples", "ours": impl == "ours", "label": impl})
    fn = {"ours": _ours, "plain fp32 cat+topk": _plain_fp32, "semanticlens ActMax.update": _semanticlens}[impl]
    benchmark.pedantic(fn, args=(acts, ids, LARGE_K), rounds=1, iterations=1)


MAPS = {"[256,2048,7,7]": (256, 2048, 7, 7), "[64,256,56,56]": (64, 256, 56, 56)}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", list(MAPS))
@pytest.mark.parametrize("impl", ["ours pool_topk_update", "torch.amax alone"])
def test_pool_topk_update(benchmark, shape, layout, impl):
    """Steady state of a stream: the state already holds a batch; every round brings a
    fresh random map with new sample ids (drawn in the untimed set-up)."""
    dims = MAPS[shape]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(1)
    state = TopKState.empty(dims[1], 20)
    pool_topk_update(state, torch.randn(*dims, generator=g).contiguous(memory_format=fmt), torch.arange(dims[0]), "max")
    counter = iter(range(1, 1000))

    def setup():
        r = next(counter)
        fm = torch.randn(*dims, generator=g).contiguous(memory_format=fmt)
        return (fm, torch.arange(r * dims[0], (r + 1) * dims[0])), {}

    def ours(fm, ids):
        pool_topk_update(state, fm, ids, "max")

    def amax(fm, ids):
        torch.amax(fm, dim=(2, 3))

    benchmark.group = f"pool max {shape} fp32 {layout}"
    benchmark.extra_info.update({"items": dims[0], "unit": "samples", "ours": impl.startswith("ours"), "label": impl})
    benchmark.pedantic(ours if impl.startswith("ours") else amax, setup=setup, rounds=8, iterations=1)
