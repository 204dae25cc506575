"""Lens and scores benchmarks, side by side with semanticlens==0.2.1 (CPU).

    pytest benchmarks/bench_lens.py --benchmark-only -o python_files='bench_*.py'
    SEMLENS_BENCH_SCALE=0.25 ...   # smaller sizes (see conftest.py)

* **polysemanticity**, C = 2,048 components, k = 20 examples, d = 512 (half two-concept
  mixtures, half single concepts, unit vectors): ours (batched torch k-means, n_init=10)
  vs ``semanticlens.scores.polysemanticity_score`` (one sklearn KMeans(n_init=10) per
  component). Target: >= 50x. sklearn's KMeans threads oversubscribe a loaded machine
  badly (191 s vs 23 s single-threaded on 2 busy cores); publish the figures of a run with
  ``OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1`` (both sides 1 thread).
* **redundancy** at N = 50,000 components, d = 512: ours (tiled ``pairwise_max``) vs
  ``semanticlens.scores.redundancy_score`` (N x N float32 similarity matrix, an N x N
  identity and their difference: 3 x 10 GB at 50k). Peak memory is measured in a child
  process (``ru_maxrss`` minus the inputs); semanticlens runs only at the size
  ``SEMLENS_BENCH_SL_RED_N`` (default 10,000) when its estimated matrices do not fit in
  ``SEMLENS_BENCH_MEM_GB`` (default: 70% of RAM); it is then reported as "cannot run".
* **text probing**, 1,000 queries x 3 templates over 50,000 components (top-10 per query):
  ``Lens.search`` vs ``semanticlens.lens.text_probing`` (+ ``topk`` on its dense score
  matrix); both with the same cheap deterministic text encoder so the probing dominates.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import scaled

D = 512
POLY_C = scaled(2048, 16)
POLY_K = 20
RED_N = scaled(50_000, 1000)
SL_RED_N = int(os.environ.get("SEMLENS_BENCH_SL_RED_N", str(scaled(10_000, 1000))))
PROBE_Q = scaled(1000, 10)
PROBE_N = scaled(50_000, 1000)
TEMPLATES = ["a photo of {}", "a picture of {}", "an image of {}"]


def _mem_budget() -> float:
    env = os.environ.get("SEMLENS_BENCH_MEM_GB")
    if env:
        return float(env) * 2**30
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal"):
                return 0.7 * int(line.split()[1]) * 1024
    return 8 * 2**30


def mixtures(C: int, k: int = POLY_K, d: int = D, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(C, 1, d, generator=g), dim=-1)
    b = F.normalize(torch.randn(C, 1, d, generator=g), dim=-1)
    half = (torch.arange(k) >= k // 2)[None, :, None] & (torch.arange(C) % 2 == 0)[:, None, None]
    V = torch.where(half, b, a) + 0.3 * torch.randn(C, k, d, generator=g) / d**0.5
    return F.normalize(V, dim=-1)


def unit(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, D, generator=g), dim=-1)


def peak_rss_mb(which: str, n: int) -> float:
    """Peak resident memory (MB) of one redundancy computation in a fresh process, minus its inputs.

    Uses VmHWM of /proc/self/status (``ru_maxrss`` survives fork+exec: it would report the parent's peak).
    """
    code = textwrap.dedent(f"""
        import torch, torch.nn.functional as F
        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM"):
                    return int(line.split()[1])
        torch.manual_seed(0)
        E = F.normalize(torch.randn({n}, {D}), dim=-1)
        base = hwm()
        if {which!r} == "ours":
            from semlens_fast.scores import redundancy
            redundancy(E)
        else:
            from semanticlens.scores import redundancy_score
            redundancy_score(E)
        print((hwm() - base) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        return float("nan")
    return float(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- polysemanticity


@pytest.fixture(scope="module")
def poly_data():
    return mixtures(POLY_C)


def test_poly_semanticlens(benchmark, poly_data):
    sl = pytest.importorskip("semanticlens.scores")
    benchmark.group = f"polysemanticity, C={POLY_C}, k={POLY_K}, d={D}"
    benchmark.pedantic(lambda: sl.polysemanticity_score(poly_data), rounds=1, iterations=1)
    benchmark.extra_info.update(label="semanticlens polysemanticity_score (sklearn KMeans per component)",
                                items=POLY_C, unit="components")


def test_poly_ours(benchmark, poly_data):
    from semlens_fast.scores import polysemanticity

    benchmark.group = f"polysemanticity, C={POLY_C}, k={POLY_K}, d={D}"
    res = benchmark.pedantic(lambda: polysemanticity(poly_data), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(label="ours scores.polysemanticity (batched torch k-means, n_init=10)", ours=True,
                                items=POLY_C, unit="components")
    sl = pytest.importorskip("semanticlens.scores")
    # agreement on the clearly bimodal components (a subset, to keep the check short)
    idx = torch.arange(0, min(POLY_C, 64), 2)
    ref = sl.polysemanticity_score(poly_data[idx]).float()
    benchmark.extra_info["max_abs_diff_vs_semanticlens_on_mixtures"] = float((res[idx] - ref).abs().max())


# ---------------------------------------------------------------------- redundancy


def test_redundancy_ours(benchmark):
    from semlens_fast.scores import redundancy

    E = unit(RED_N, 1)
    benchmark.group = f"redundancy, N={RED_N}, d={D}"
    benchmark.pedantic(lambda: redundancy(E), rounds=1, iterations=1)
    mb = peak_rss_mb("ours", RED_N)
    benchmark.extra_info.update(label="ours scores.redundancy (tiled pairwise_max)", ours=True,
                                note=f"peak extra memory {mb:,.0f} MB", peak_mb=mb, items=RED_N, unit="components")


def test_redundancy_semanticlens(benchmark):
    sl = pytest.importorskip("semanticlens.scores")
    need = 3 * 4 * RED_N**2
    if need <= _mem_budget():
        E = unit(RED_N, 1)
        benchmark.group = f"redundancy, N={RED_N}, d={D}"
        benchmark.pedantic(lambda: sl.redundancy_score(E), rounds=1, iterations=1)
        mb = peak_rss_mb("semanticlens", RED_N)
        benchmark.extra_info.update(label="semanticlens redundancy_score (N x N matrix)", note=f"peak extra memory {mb:,.0f} MB",
                                    peak_mb=mb, items=RED_N, unit="components")
    else:
        # cannot run at RED_N here: measure it (and ours) at SL_RED_N instead
        E = unit(SL_RED_N, 1)
        benchmark.group = f"redundancy, N={SL_RED_N}, d={D} (semanticlens cannot run at N={RED_N}: needs ~{need / 2**30:.0f} GB)"
        benchmark.pedantic(lambda: sl.redundancy_score(E), rounds=1, iterations=1)
        mb = peak_rss_mb("semanticlens", SL_RED_N)
        benchmark.extra_info.update(label="semanticlens redundancy_score (N x N matrix)", note=f"peak extra memory {mb:,.0f} MB",
                                    peak_mb=mb, items=SL_RED_N, unit="components", cannot_run_at=RED_N)


def test_redundancy_ours_small(benchmark):
    from semlens_fast.scores import redundancy

    if 3 * 4 * RED_N**2 <= _mem_budget():
        pytest.skip("semanticlens ran at full size")
    E = unit(SL_RED_N, 1)
    benchmark.group = f"redundancy, N={SL_RED_N}, d={D} (semanticlens cannot run at N={RED_N}: needs ~{3 * 4 * RED_N**2 / 2**30:.0f} GB)"
    benchmark.pedantic(lambda: redundancy(E), rounds=1, iterations=1)
    mb = peak_rss_mb("ours", SL_RED_N)
    benchmark.extra_info.update(label="ours scores.redundancy (tiled pairwise_max)", ours=True,
                                note=f"peak extra memory {mb:,.0f} MB", peak_mb=mb, items=SL_RED_N, unit="components")


# ---------------------------------------------------------------------- text probing


class HashText:
    """A cheap deterministic text 'encoder' (seeded by the string), with both libraries' interfaces."""

    name = "hash"
    modalities = frozenset({"text"})
    dim = D
    device = "cpu"

    def _one(self, t: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash(t) & 0x7FFFFFFF)
        return torch.randn(D, generator=g)

    def encode_texts(self, texts):  # semlens_fast
        texts = [texts] if isinstance(texts, str) else list(texts)
        return F.normalize(torch.stack([self._one(t) for t in texts]), dim=-1)

    class _Tok(list):
        def to(self, *_):
            return self

    def tokenize(self, texts):  # semanticlens
        return HashText._Tok(texts)

    def encode_text(self, tokens):
        return self.encode_texts(list(tokens))


@pytest.fixture(scope="module")
def probe_env():
    return HashText(), {"layer": unit(PROBE_N, 2)}, [f"concept {i}" for i in range(PROBE_Q)]


def test_probe_semanticlens(benchmark, probe_env):
    sl = pytest.importorskip("semanticlens.lens")
    fm, db, queries = probe_env
    benchmark.group = f"text probing, {PROBE_Q} queries x 3 templates, {PROBE_N} components, top-10"

    def run():
        s = sl.text_probing(fm, queries, db, TEMPLATES)
        return s["layer"].topk(10, dim=1)

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(label="semanticlens text_probing + topk (dense scores; mixes queries)", items=PROBE_Q,
                                unit="queries")


def test_probe_ours(benchmark, probe_env):
    from semlens_fast.lens import Lens

    fm, db, queries = probe_env
    lens = Lens(db, fm, templates=TEMPLATES)
    benchmark.group = f"text probing, {PROBE_Q} queries x 3 templates, {PROBE_N} components, top-10"
    benchmark.pedantic(lambda: lens.search(queries, k=10), rounds=1, iterations=1)
    benchmark.extra_info.update(label="ours Lens.search (per-query null-subtracted probes, cosine_topk)", ours=True,
                                items=PROBE_Q, unit="queries")
