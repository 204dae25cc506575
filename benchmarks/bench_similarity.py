"""Similarity engine benchmarks, side by side with peers, in one run (CPU).

    pytest benchmarks/bench_similarity.py --benchmark-only --benchmark-json=sim.json

Cosine top-k over N database rows of d = 512 (unit-normalised random vectors), Q in
{1, 16, 256, 1024}, k in {20, 100}. Peers:

* ``faiss``       faiss-cpu IndexFlatIP (float32, exact inner product);
* ``torch-fp32``  chunked torch.mm + torch.topk (float32);
* ``torch-bf16``  the same in bfloat16 (only Q <= 256 by default: without AVX512-BF16/AMX
                  the bf16 GEMM runs at a few GFLOP/s; SEMLENS_BENCH_TORCH_BF16_ALL=1 runs all);
* ``ours-fp32``   semlens_fast.ops.cosine_topk on float32 storage (exact);
* ``ours-bf16``   the same on bfloat16 storage (exact cosines of the stored vectors).

recall@k against exact float32 search is recorded in ``extra_info`` for every peer.
Pairwise: ``pairwise_max`` of two 50k x 512 sets (k = 1) against a plain float32 GEMM
of the same size (torch.mm in row blocks, no selection).

Environment: SEMLENS_BENCH_N (default 1_000_000), SEMLENS_BENCH_PAIR_N (default 50_000),
SEMLENS_BENCH_Q (comma list, default 1,16,256,1024), SEMLENS_BENCH_K (default 20,100).
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from semlens_fast.ops import cosine_topk, pairwise_max

N = int(os.environ.get("SEMLENS_BENCH_N", "1000000"))
PAIR_N = int(os.environ.get("SEMLENS_BENCH_PAIR_N", "50000"))
D = 512
QS = [int(v) for v in os.environ.get("SEMLENS_BENCH_Q", "1,16,256,1024").split(",")]
KS = [int(v) for v in os.environ.get("SEMLENS_BENCH_K", "20,100").split(",")]
TORCH_BF16_ALL = os.environ.get("SEMLENS_BENCH_TORCH_BF16_ALL", "") == "1"
CHUNK = 1 << 16


def _unit(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, D)
    for r0 in range(0, n, 1 << 18):  # bounded temporaries
        blk = torch.randn(min(n, r0 + (1 << 18)) - r0, D, generator=g)
        out[r0 : r0 + blk.shape[0]] = torch.nn.functional.normalize(blk, dim=1)
    return out


@pytest.fixture(scope="module")
def data():
    db = _unit(N, 0)
    return {"db": db, "db_bf16": db.to(torch.bfloat16), "queries": _unit(max(QS), 1), "truth": {}}


@pytest.fixture(scope="module")
def faiss_index(data):
    faiss = pytest.importorskip("faiss")
    index = faiss.IndexFlatIP(D)
    index.add(data["db"].numpy())
    return index


def torch_topk(q: torch.Tensor, db: torch.Tensor, k: int):
    best_s = torch.full((q.shape[0], 0), float("-inf"))
    best_i = torch.full((q.shape[0], 0), -1, dtype=torch.int64)
    qq = q.to(db.dtype)
    for r0 in range(0, db.shape[0], CHUNK):
        s = (qq @ db[r0 : r0 + CHUNK].T).float()
        v, i = torch.topk(s, min(k, s.shape[1]), dim=1)
        best_s, o = torch.topk(torch.cat([best_s, v], 1), min(k, best_s.shape[1] + v.shape[1]), dim=1)
        best_i = torch.cat([best_i, i + r0], 1).gather(1, o)
    return best_s, best_i


def truth(data, Q: int, k: int) -> torch.Tensor:
    key = (Q, k)
    if key not in data["truth"]:
        data["truth"][key] = cosine_topk(data["queries"][:Q], data["db"], k)[1]
    return data["truth"][key]


def recall(got, want) -> float:
    got, want = np.asarray(got), np.asarray(want)
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(got.tolist(), want.tolist())]))


def rounds(Q: int) -> int:
    return 5 if Q <= 16 else 3


def warmup(Q: int) -> int:
    # the sub-second cases get one untimed call first (every peer alike): the mean of
    # 5 timed calls is then not dominated by a first call's page or thread-pool effects
    return 1 if Q <= 16 else 0


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("Q", QS)
@pytest.mark.parametrize("peer", ["faiss", "torch-fp32", "torch-bf16", "ours-fp32", "ours-bf16"])
def test_cosine_topk(benchmark, data, faiss_index, peer, Q, k):
    if peer == "torch-bf16" and Q > 256 and not TORCH_BF16_ALL:
        pytest.skip("torch bf16 GEMM without AVX512-BF16/AMX: minutes per run (SEMLENS_BENCH_TORCH_BF16_ALL=1)")
    q = data["queries"][:Q].contiguous()
    want = truth(data, Q, k)
    benchmark.group = f"cosine_topk N={N} d={D} Q={Q} k={k}"
    if peer == "faiss":
        qn = q.numpy()
        fn = lambda: faiss_index.search(qn, k)[1]  # noqa: E731
    elif peer == "torch-fp32":
        fn = lambda: torch_topk(q, data["db"], k)[1]  # noqa: E731
    elif peer == "torch-bf16":
        fn = lambda: torch_topk(q, data["db_bf16"], k)[1]  # noqa: E731
    elif peer == "ours-fp32":
        fn = lambda: cosine_topk(q, data["db"], k)[1]  # noqa: E731
    else:
        fn = lambda: cosine_topk(q, data["db_bf16"], k)[1]  # noqa: E731
    ids = benchmark.pedantic(fn, rounds=rounds(Q), iterations=1, warmup_rounds=warmup(Q))
    rec = recall(ids, want)
    # ours-fp32 (exact) is the reference of the "x ours" column of BENCHMARKS.md
    benchmark.extra_info.update(peer=peer, Q=Q, k=k, N=N, d=D, recall=rec,
                                queries_per_s=Q / benchmark.stats.stats.min,
                                ours=peer == "ours-fp32", note=f"recall@k {rec:.4f}")


@pytest.fixture(scope="module")
def pair_data():
    return _unit(PAIR_N, 2), _unit(PAIR_N, 3)


@pytest.mark.parametrize("peer", ["gemm-fp32", "ours-fp32", "ours-bf16"])
def test_pairwise_max(benchmark, pair_data, peer):
    a, b = pair_data
    benchmark.group = f"pairwise {PAIR_N}x{PAIR_N} d={D} k=1"
    if peer == "gemm-fp32":
        bt = b.T.contiguous()

        def fn():  # plain GEMM of the same size in row blocks (bounded memory, no selection)
            for r0 in range(0, a.shape[0], 4096):
                torch.mm(a[r0 : r0 + 4096], bt)
    elif peer == "ours-fp32":
        fn = lambda: pairwise_max(a, b)  # noqa: E731
    else:
        a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
        fn = lambda: pairwise_max(a16, b16)  # noqa: E731
    t0 = time.process_time()
    benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(peer=peer, N=PAIR_N, d=D, ours=peer == "ours-fp32", gflops=2.0 * PAIR_N * PAIR_N * D / benchmark.stats.stats.min / 1e9,
                                cpu_seconds=time.process_time() - t0)
