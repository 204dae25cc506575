"""Fused SAE top-k (ours) vs encode-then-topk in torch (the SAELens / dashboard way), side by side.

One stream of ``NB`` (64) batches of ``B`` samples x ``T = 128`` tokens of width ``d = 768`` (GPT-2
small's residual width; random activations), an SAE with ``L`` latents (random ReLU encoder,
biases negative so that latents are sparse), k = 20, max pooling over tokens, for L = 16,384 and
65,536:

* ``ours``: ``ops.sae_topk_update`` per batch (C++ kernel: fp32 FMA micro-kernel + certified skip,
  exact float64 rescoring of the candidates; never materialises ``[B, T, L]``);
* ``torch encode-then-topk``: ``acts = relu((x - b_dec) @ W_enc + b_enc)`` (``[B, T, L]``, as
  SAELens' ``SAE.encode``), ``acts.amax(1)``, then a ``torch.topk`` merge with the running state.

Peak memory: each method also runs once in a fresh subprocess, which reports the growth of its
resident set (``ru_maxrss``) over the inputs alone; stored as ``extra_info["peak_rss_mb"]``.
Both give the same top-k ids (checked: fp32 torch vs our exact definition may differ only at
float32 near-ties; the agreement is stored).

    python benchmarks/run.py bench_sae.py
    SEMLENS_BENCH_SCALE=0.25 pytest benchmarks/bench_sae.py --benchmark-only -o python_files=bench_*.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import scaled

D, T, B, K = 768, 128, 8, 20
NB = scaled(64, 2)
LS = [16384, 65536]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make(L: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, L, generator=g) / D**0.5
    b = torch.randn(L, generator=g) * 0.2 - 1.0
    b_dec = torch.randn(D, generator=g) * 0.1
    xs = [torch.randn(B, T, D, generator=g) for _ in range(4)]
    return W, b, b_dec, xs


def run_ours(W, b, b_dec, xs, nb=NB):
    from semlens_fast.ops import TopKState, sae_topk_update

    st = TopKState.empty(W.shape[1], K)
    for i in range(nb):
        sae_topk_update(st, xs[i % len(xs)] * (1 + 0.01 * i), W, b, torch.arange(i * B, (i + 1) * B), b_dec=b_dec)
    return st.values, st.ids


def run_torch(W, b, b_dec, xs, nb=NB):
    L = W.shape[1]
    vals = torch.full((L, K), float("-inf"))
    ids = torch.full((L, K), -1, dtype=torch.int64)
    for i in range(nb):
        x = xs[i % len(xs)] * (1 + 0.01 * i)
        acts = torch.relu((x - b_dec) @ W + b)          # [B, T, L], as SAELens SAE.encode
        pooled = acts.amax(1)                           # [B, L]
        allv = torch.cat([vals, pooled.t()], 1)
        alli = torch.cat([ids, torch.arange(i * B, (i + 1) * B).expand(L, B)], 1)
        vals, j = torch.topk(allv, K, dim=1)
        ids = alli.gather(1, j)
    return vals, ids


IMPLS = {"ours": run_ours, "torch encode-then-topk": run_torch}

_MEM = r"""
import json, resource, sys, torch
sys.path[:0] = [{root!r}, {here!r}]
import bench_sae as bs
W, b, b_dec, xs = bs.make({L})
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
bs.IMPLS[{name!r}](W, b, b_dec, xs, nb=2)
print(json.dumps({{"peak_rss_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}}))
"""


def peak_rss(name: str, L: int) -> float:
    code = _MEM.format(root=ROOT, here=os.path.dirname(os.path.abspath(__file__)), L=L, name=name)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode:
        raise RuntimeError(r.stderr)
    return float(json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_mb"])


@pytest.fixture(scope="module", params=LS, ids=[f"L={L}" for L in LS])
def data(request):
    return request.param, make(request.param)


@pytest.mark.parametrize("name", list(IMPLS))
def test_sae_topk(benchmark, data, name):
    L, (W, b, b_dec, xs) = data
    benchmark.group = f"SAE top-k, d = {D}, L = {L}, T = {T}, {NB} batches of {B}, k = {K}"
    benchmark.extra_info.update(ours=name == "ours", label=name, items=NB * B, unit="samples",
                                peak_rss_mb=round(peak_rss(name, L), 1))
    out = benchmark.pedantic(IMPLS[name], args=(W, b, b_dec, xs), rounds=1, iterations=1, warmup_rounds=0)
    if name != "ours":
        mine = run_ours(W, b, b_dec, xs)
        benchmark.extra_info["id_agreement_with_ours"] = round(float((mine[1] == out[1]).float().mean()), 5)
    benchmark.extra_info["note"] = f"peak RSS +{benchmark.extra_info['peak_rss_mb']} MB"
