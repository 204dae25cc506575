"""Issue 21.7: memory of the similarity search is bounded by a stated constant, and the
EmbeddingIndex sizes its search chunks from the memory available.

* ``cosine_topk`` / ``pairwise_topk`` on the C++ backend process the queries in blocks
  (``ops/cpu/similarity.py``, ``query_block``) whose working memory stays within
  ``WORK_BYTES``: before, all ``Q`` queries were converted and searched at once (the
  pairwise 50k x 50k x 512 case peaked at ~8x one input).
* ``EmbeddingIndex.search`` scans chunks of a quarter of the available memory, between
  ``CHUNK_MIN_BYTES`` and ``CHUNK_MAX_BYTES`` (before: always 2^20 rows, so a 2 GB index
  was one chunk even under a 1 GB memory cap).

Peak memory itself is measured by ``benchmarks/figures_harden.py`` (not in a test: RSS
of a shared test process is no stable quantity); these tests check the decisions that
bound it, and that results do not depend on them.
"""
from __future__ import annotations

import pytest
import torch

import semlens_fast.index as index_mod
from semlens_fast.index import EmbeddingIndex
from semlens_fast.ops import _backend, cosine_topk, pairwise_topk
from semlens_fast.ops import similarity as sim
from semlens_fast.ops.reference import similarity as ref

ext = _backend.extension()
needs_ext = pytest.mark.skipif(ext is None, reason="C++ extension not built")


@pytest.mark.parametrize("Q,d,k,nt", [(1, 512, 1, 2), (50_000, 512, 1, 2), (50_000, 512, 100, 8), (10, 64, 10_000, 2),
                                      (3, 384, 200_000, 2)])
def test_query_block_stays_within_the_work_budget(Q, d, k, nt):
    from semlens_fast.ops.cpu.similarity import query_block

    qb = query_block(Q, d, k, nt, sim.WORK_BYTES)
    assert 1 <= qb <= Q
    per_query = 12 * d + (96 + 14 * nt) * (k + max(16, k // 4))
    # one block fits in WORK_BYTES, unless a single query alone needs more (it still runs)
    assert qb * per_query <= sim.WORK_BYTES or qb == 1
    if qb < Q:  # and blocks are not needlessly small
        assert (qb + 1) * per_query > sim.WORK_BYTES


@needs_ext
def test_queries_are_searched_in_blocks_with_unchanged_results(monkeypatch):
    from semlens_fast.ops.cpu import similarity as cpu_sim

    monkeypatch.setenv("SEMLENS_BACKEND", "cpu")
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(300, 24, generator=g), torch.randn(500, 24, generator=g)
    b[7] = a[5]  # an exact tie and a duplicate
    b[8] = a[5]
    want = ref.cosine_topk(a, b, 6, torch.arange(300).unsqueeze(1).clamp(max=499))
    sizes = []
    real = cpu_sim.certified_topk

    def spy(queries, *args, **kw):
        sizes.append(queries.shape[0])
        return real(queries, *args, **kw)

    monkeypatch.setattr(cpu_sim, "certified_topk", spy)
    per_query = 12 * 24 + (96 + 14 * _backend.num_threads()) * (6 + 16)
    monkeypatch.setattr(sim, "WORK_BYTES", 37 * per_query)  # 37 queries a block
    s, i = pairwise_topk(a, b, 6, exclude_diagonal=True)
    assert sizes and max(sizes) == 37 and sum(sizes) == 300
    assert torch.equal(i, want[1]) and torch.equal(s.view(torch.int32), want[0].view(torch.int32))


def test_index_chunks_are_sized_from_the_available_memory(monkeypatch):
    idx = EmbeddingIndex(512)
    cases = [(1 << 30, (256 << 20) // 2048),  # the 1 GB cap: 131,072 rows of 512 float32
             (64 << 30, (4 << 30) // 2048),  # plenty: capped at CHUNK_MAX_BYTES
             (100 << 20, (64 << 20) // 2048)]  # almost nothing: CHUNK_MIN_BYTES
    for avail, rows in cases:
        monkeypatch.setattr(index_mod, "available_memory", lambda avail=avail: avail)
        assert idx.search_chunk_rows() == rows
    assert EmbeddingIndex(512, chunk_rows=1000).search_chunk_rows() == 1000  # an explicit size wins
    half = EmbeddingIndex(512, torch.bfloat16)
    monkeypatch.setattr(index_mod, "available_memory", lambda: 1 << 30)
    assert half.search_chunk_rows() == (256 << 20) // 1024


def test_index_search_uses_the_sized_chunks_with_unchanged_results(monkeypatch):
    g = torch.Generator().manual_seed(4)
    vecs = torch.randn(1000, 16, generator=g)
    vecs[900] = vecs[3]  # a tie across chunks
    q = torch.randn(5, 16, generator=g)
    idx = EmbeddingIndex.from_tensors(vecs)
    want = idx.search(q, 7, exclude=torch.tensor([3, -1, 999, 0, 5]))
    monkeypatch.setattr(index_mod, "CHUNK_MIN_BYTES", 64 * 16 * 4)  # 64 rows at the minimum
    monkeypatch.setattr(index_mod, "available_memory", lambda: 4 * 150 * 16 * 4)  # a quarter: 150 rows
    assert idx.search_chunk_rows() == 150
    calls = []
    real = index_mod.cosine_topk

    def spy(queries, db, k, **kw):
        calls.append(db.shape[0])
        return real(queries, db, k, **kw)

    monkeypatch.setattr(index_mod, "cosine_topk", spy)
    got = idx.search(q, 7, exclude=torch.tensor([3, -1, 999, 0, 5]))
    assert calls == [150] * 6 + [100]
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_available_memory_is_positive_and_bounded():
    from semlens_fast.ops._validate import available_memory

    m = available_memory()
    assert 0 < m < (1 << 50)


def test_cosine_topk_large_k_single_query_still_runs():
    """A single query whose need exceeds WORK_BYTES (huge k) is processed, not refused."""
    g = torch.Generator().manual_seed(5)
    db = torch.randn(3000, 8, generator=g)
    q = torch.randn(1, 8, generator=g)
    s, i = cosine_topk(q, db, 2999)
    rs, ri = ref.cosine_topk(q, db, 2999, None)
    assert torch.equal(i, ri) and torch.equal(s, rs)


def test_cgroup_limit_of_the_process_own_cgroup_and_its_ancestors(tmp_path):
    """The limit is found where the process lives (not only at the hierarchy's root, which is
    unlimited on a host or in a container without a cgroup namespace): before, a search
    under a 1 GB cap of a nested cgroup sized its chunks from MemAvailable."""
    from semlens_fast.ops._validate import cgroup_memory_limit

    root = tmp_path / "cg"
    v1 = root / "memory" / "jobs" / "job7"
    v1.mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1 "no limit"
    (root / "memory" / "jobs" / "memory.limit_in_bytes").write_text(f"{3 << 30}\n")
    (v1 / "memory.limit_in_bytes").write_text(f"{1 << 30}\n")
    proc = tmp_path / "cgroup"
    proc.write_text("9:name=systemd:/\n4:memory:/jobs/job7\n1:cpu:/\n0::/\n")
    assert cgroup_memory_limit(str(proc), str(root)) == 1 << 30
    (v1 / "memory.limit_in_bytes").write_text(f"{8 << 30}\n")  # the parent is tighter
    assert cgroup_memory_limit(str(proc), str(root)) == 3 << 30
    v2 = root / "user.slice" / "run"
    v2.mkdir(parents=True)
    (v2 / "memory.max").write_text(f"{512 << 20}\n")
    (root / "user.slice" / "memory.max").write_text("max\n")
    proc.write_text("0::/user.slice/run\n")
    assert cgroup_memory_limit(str(proc), str(root)) == 512 << 20
    proc.write_text("0::/\n")  # a namespaced container: its own root file
    (root / "memory.max").write_text(f"{2 << 30}\n")
    assert cgroup_memory_limit(str(proc), str(root)) == 2 << 30
    assert cgroup_memory_limit(str(tmp_path / "missing"), str(tmp_path / "none")) is None
