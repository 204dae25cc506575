"""Figures quoted by the hardening issues 20 and 21, measured outside pytest-benchmark. Each
subcommand prints one line per measurement:

    python benchmarks/figures_harden.py repro [cpu|triton]
                                                      # 20.1: cosine_topk(q, db * s, k) vs the reference, s = 1e-30..1e30
    python benchmarks/figures_harden.py topk [k] [batches] [skip] [merge_min_k]
                                                      # 20.7: topk_update, C = 2048, B = 256
    python benchmarks/figures_harden.py pairwise [N] [d] [k] [dtype]
                                                      # 21.7: peak memory of pairwise_topk(a, b) in this process
    python benchmarks/figures_harden.py index [Q] [k] [chunk_rows|default] [path]
                                                      # 21.7: search of a 2 GB memory-mapped index
    python benchmarks/figures_harden.py readers [reads] [path]
                                                      # 20.4: TopKStore loads while another process checkpoints
    python benchmarks/figures_harden.py devzero
                                                      # 21.3: `semlens search` on a run.json linked to /dev/zero

Run each in a fresh process (peak RSS is per process). ``PYTHONPATH`` selects the tree
measured (e.g. a build of main for the "before" figures).
"""
from __future__ import annotations

import os
import resource
import sys
import time

import torch


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def repro(backend: str = "cpu") -> None:
    """cosine_topk(q, db * s, 5) on ``backend`` vs the reference, s = 1e-30 .. 1e30 (every
    five decades, the overflow edge 1e19) and rows at mixed scales; C++: every SIMD level
    this CPU has; triton: set TRITON_INTERPRET=1 without a GPU (small shapes, slow)."""
    from semlens_fast.ops import _backend, cosine_topk

    ext = _backend.extension() if backend == "cpu" else None
    isas = [None]
    if ext is not None and hasattr(ext, "set_isa"):
        levels = ["scalar", "avx2", "avx512"]
        isas = levels[: levels.index(ext.best_isa()) + 1]
    g = torch.Generator().manual_seed(0)
    q_all, base = torch.randn(16, 64, generator=g), torch.randn(300, 64, generator=g)
    mixed = base.clone()
    mixed[::3] *= 1e-30
    mixed[1::3] *= 1e25
    mixed[5] = 0
    mixed[7, :32] *= 1e-35
    cases = [(f"db*{s:g}", base * s) for s in (1e-30, 1e-25, 1e-20, 1e-15, 1e-10, 1e-5, 1.0, 1e5, 1e10, 1e15, 1e19, 1e20, 1e25, 1e30)]
    cases.append(("mixed scales", mixed))
    worst = 0
    for Q in (1, 4, 16):
        for name, db in cases:
            q = q_all[:Q]
            os.environ["SEMLENS_BACKEND"] = "reference"
            r = cosine_topk(q, db, 5)
            os.environ["SEMLENS_BACKEND"] = backend
            outs = []
            for isa in isas:
                if isa is not None:
                    ext.set_isa(isa)
                try:
                    c = cosine_topk(q, db, 5)
                    bad = int((c[1] != r[1]).sum())
                    worst = max(worst, bad)
                    outs.append("equal" if bad == 0 and torch.equal(c[0].view(torch.int32), r[0].view(torch.int32))
                                else f"WRONG ids {bad}/{r[1].numel()}")
                except Exception as exc:  # noqa: BLE001 - reported
                    outs.append(f"{type(exc).__name__}: {str(exc)[:70]}")
            if ext is not None and hasattr(ext, "set_isa"):
                ext.set_isa(ext.best_isa())
            label = "/".join(i for i in isas if i) or backend
            print(f"{backend} Q={Q:2d} {name}: {label}: {', '.join(outs)}")
    print(f"{backend}: worst case {worst} ids differ from the reference")


def topk(k: int = 10_000, batches: int = 4, skip: int = 0, merge_min_k: int | None = None) -> None:
    from semlens_fast.ops import TopKState, topk_update

    if merge_min_k is not None:
        from semlens_fast.ops.cpu import topk as cpu

        cpu.MERGE_MIN_K = merge_min_k
    C, B = 2048, 256
    g = torch.Generator().manual_seed(0)
    state = TopKState.empty(C, k)
    topk_update(TopKState.empty(4, 3), torch.randn(2, 4), torch.arange(2))  # one-time start-up (thread pool, op dispatch)
    walls, cpus = [], []
    for i in range(skip + batches):
        acts = torch.randn(B, C, generator=g)  # fresh values every batch (a repeated batch brings no candidates)
        t, c = time.perf_counter(), time.process_time()
        topk_update(state, acts, torch.arange(i * B, (i + 1) * B))
        if i >= skip:
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
    print(f"topk_update k={k} C={C} B={B}, batches {skip}..{skip + batches - 1}: wall {min(walls):.3f}-{max(walls):.3f} s, "
          f"cpu {min(cpus):.3f}-{max(cpus):.3f} s per batch; total wall {sum(walls):.2f} s, cpu {sum(cpus):.2f} s"
          + (f" (MERGE_MIN_K={merge_min_k})" if merge_min_k is not None else ""))


def pairwise(N: int = 50_000, d: int = 512, k: int = 1, dtype: str = "float32") -> None:
    from semlens_fast.ops import pairwise_topk

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(N, d, generator=g), dim=1).to(dt)
    b = torch.nn.functional.normalize(torch.randn(N, d, generator=g), dim=1).to(dt)
    pairwise_topk(a[:64], b[:64], k)  # thread pool, allocator
    before = _rss_mib()
    t, c = time.perf_counter(), time.process_time()
    pairwise_topk(a, b, k, exclude_diagonal=True)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    one = a.numel() * a.element_size() / 2**20
    print(f"pairwise_topk {N}x{N} d={d} k={k} {dtype}: {wall:.1f} s wall, {cpu:.1f} s cpu; inputs 2 x {one:.0f} MiB; "
          f"peak RSS +{peak - before:.0f} MiB over the inputs ({(peak - before) / one:.2f}x one input)")


def index(Q: int = 16, k: int = 10_000, chunk: str = "default", path: str = "/tmp/semlens_idx2g") -> None:
    from semlens_fast.index import EmbeddingIndex

    if not os.path.exists(os.path.join(path, "manifest.json")):
        g = torch.Generator().manual_seed(0)
        idx = EmbeddingIndex(512)
        for _ in range(8):
            idx.add(torch.randn(131072, 512, generator=g))
        idx.save(path)
        print(f"built {path}; rerun to measure (a fresh process, index not in this one's memory)")
        return
    kw = {} if chunk == "default" else {"chunk_rows": int(chunk)}
    idx = EmbeddingIndex.load(path, **kw)
    rows = idx.search_chunk_rows() if hasattr(idx, "search_chunk_rows") else idx.chunk_rows
    q = torch.randn(Q, 512, generator=torch.Generator().manual_seed(1))
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t, c = time.perf_counter(), time.process_time()
    idx.search(q, k)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(f"index search N={len(idx)} d=512 Q={Q} k={k} chunk_rows={rows}: {wall:.2f} s wall, {cpu:.2f} s cpu, "
          f"peak RSS {ru.ru_maxrss / 1024:.0f} MiB, major faults {ru.ru_majflt - ru0.ru_majflt}")


def _checkpoint_forever(path: str, stop_file: str) -> None:
    """The writer of ``readers``: saves stores of alternating shapes into ``path`` until ``stop_file`` exists."""
    from semlens_fast.ops import TopKState
    from semlens_fast.store import TopKStore

    i = 0
    while not os.path.exists(stop_file):
        C = 64 + (i % 2) * 32
        TopKStore({"l": TopKState.empty(C, 16)}, {"k": 16, "i": i}).save(path)
        i += 1


def readers(reads: int = 6000, path: str = "/tmp/semlens_readers") -> None:
    """``reads`` loads of a TopKStore while a second process checkpoints it as fast as it can; every
    load must return the old or the new state (64 or 96 channels), never fail."""
    import multiprocessing as mp
    import shutil

    from semlens_fast.ops import TopKState
    from semlens_fast.store import TopKStore

    shutil.rmtree(path, ignore_errors=True)
    stop = path + ".stop"
    if os.path.exists(stop):
        os.unlink(stop)
    TopKStore({"l": TopKState.empty(64, 16)}, {"k": 16, "i": -1}).save(path)
    w = mp.get_context("spawn").Process(target=_checkpoint_forever, args=(path, stop))
    w.start()
    time.sleep(1.0)  # the writer is importing torch
    fails: dict[str, int] = {}
    shapes: dict[int, int] = {}
    seen = set()
    t = time.perf_counter()
    try:
        for _ in range(reads):
            try:
                st = TopKStore.load(path)
            except Exception as exc:  # noqa: BLE001 - counted
                fails[type(exc).__name__] = fails.get(type(exc).__name__, 0) + 1
                continue
            c = st["l"].channels
            shapes[c] = shapes.get(c, 0) + 1
            seen.add(st.meta.get("i") if hasattr(st, "meta") else None)
    finally:
        open(stop, "w").close()
        w.join(30)
        os.unlink(stop)
    wall = time.perf_counter() - t
    bad = sum(v for c, v in shapes.items() if c not in (64, 96))
    print(f"readers: {reads} loads during checkpoints in {wall:.1f} s ({len(seen)} distinct checkpoints seen): "
          f"{sum(fails.values())} failed {fails or ''}, {bad} of a wrong shape; channels seen {shapes}")


def devzero() -> None:
    """`semlens search` on a run whose run.json is a symlink to /dev/zero: exit code, seconds, peak RSS of the child."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        os.symlink("/dev/zero", os.path.join(d, "run.json"))
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "semlens_fast.cli", "search", "--run", d, "a query"],
                           capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - t
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    last = (r.stderr.strip().splitlines() or [""])[-1]
    print(f"devzero: exit {r.returncode} in {wall:.1f} s, peak RSS of the child {ru.ru_maxrss / 1024:.0f} MiB; "
          f"stderr: {last[:160]}")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "repro":
        repro(*args[:1])
    elif cmd == "topk":
        topk(*[int(a) for a in args])
    elif cmd == "pairwise":
        pairwise(*[int(a) for a in args[:3]], *args[3:4])
    elif cmd == "index":
        index(*[int(a) for a in args[:2]], *args[2:4])
    elif cmd == "readers":
        readers(*[int(a) for a in args[:1]], *args[1:2])
    elif cmd == "devzero":
        devzero()
    else:
        raise SystemExit(__doc__)
