"""Benchmark of collect(): ours vs semanticlens 0.2.1 vs a plain forward pass, side by side.

Same model (the 3-conv Fashion-MNIST CNN of :mod:`semlens_fast.models`, trained and
cached), same data (Fashion-MNIST train, 60 000 images, or the digits fallback), same
batch size, k = 20, all conv layers (``conv1``, ``conv2``, ``conv3``), max pooling:

* ``plain_forward``: ``model(x)`` over a DataLoader, no hooks (the floor);
* ``semlens_fast_fp32``: ``collect(...)`` (the forward stops after ``conv3``);
* ``semlens_fast_fp32_through_fc``: the same plus the last module ``fc`` (no early stop:
  the pure cost of tracking);
* ``semanticlens``: ``ActivationComponentVisualizer(...).run()`` (aggregate_conv_max,
  cache_dir=None so nothing is read from or written to disk);
* ``semlens_fast_bf16``: ``collect(..., autocast=torch.bfloat16)``.

A final check reports: tracking overhead of ours over the plain pass, speed ratios vs
semanticlens, whether our fp32 top-k is identical to an exact fp32 reference (plain torch
pooling + a stable lexicographic sort, computed with the same batches), and the id
agreement of semanticlens and of our bf16 mode with that reference.

Run::

    pytest benchmarks/bench_collect.py -s --benchmark-columns=min,mean,max,rounds
    SEMLENS_BENCH_N=10000 SEMLENS_BENCH_ROUNDS=1 pytest benchmarks/bench_collect.py -s   # quick

Environment: ``SEMLENS_BENCH_N`` (images, default 60000), ``SEMLENS_BENCH_BS`` (batch,
default 256), ``SEMLENS_BENCH_ROUNDS`` (default 3; min and median are reported, plus process CPU time),
``SEMLENS_BENCH_THREADS`` (torch intra-op threads; default torch's own; use 1 on a shared
machine, where OpenMP barriers make multi-threaded timings meaningless),
``SEMLENS_BENCH_BF16_ROUNDS`` (default 1: bf16 autocast is slow on CPUs without bf16 units),
``SEMLENS_BENCH_OUT`` (write the summary as JSON there), ``SEMLENS_CACHE`` (model cache).
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from semlens_fast.collect import collect
from semlens_fast.data import fashion_mnist
from semlens_fast.models import FashionCNN, trained_fashion_cnn

N = int(os.environ.get("SEMLENS_BENCH_N", "60000"))
BS = int(os.environ.get("SEMLENS_BENCH_BS", "256"))
ROUNDS = int(os.environ.get("SEMLENS_BENCH_ROUNDS", "3"))
THREADS = int(os.environ.get("SEMLENS_BENCH_THREADS", "0"))  # 0: torch's default
BF16_ROUNDS = int(os.environ.get("SEMLENS_BENCH_BF16_ROUNDS", "1"))
K = 20
LAYERS = list(FashionCNN.conv_layers)
RESULTS: dict = {}


@pytest.fixture(scope="module")
def setup():
    if THREADS:
        torch.set_num_threads(THREADS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = fashion_mnist("train")
    model = trained_fashion_cnn(steps=150)
    n = min(N, len(ds))
    x, y = ds.subset(n).tensors()
    data = TensorDataset(x, y)
    RESULTS.update(n=n, batch_size=BS, k=K, layers=LAYERS, source=ds.source, threads=torch.get_num_threads())
    with torch.inference_mode():  # warm up oneDNN's primitive caches for every method alike
        for xb, _ in DataLoader(TensorDataset(x[: 4 * BS], y[: 4 * BS]), batch_size=BS):
            model(xb)
    return model, data


def _plain(model, data):
    with torch.inference_mode():
        for xb, _ in DataLoader(data, batch_size=BS):
            model(xb)


def _ours(model, data, autocast=None):
    return collect(model, data, LAYERS, k=K, pool="max", batch_size=BS, autocast=autocast, progress=False)


def _semanticlens(model, data):
    from semanticlens.component_visualization import aggregators
    from semanticlens.component_visualization.activation_based import ActivationComponentVisualizer

    logging.getLogger("semanticlens").setLevel(logging.ERROR)
    data.name = "bench"
    model.name = "fashion_cnn"
    cv = ActivationComponentVisualizer(
        model, data, data, LAYERS, num_samples=K, aggregate_fn=aggregators.aggregate_conv_max, cache_dir=None
    )
    import tqdm as _tqdm  # silence its progress bar the same way ours is silenced

    orig = _tqdm.tqdm.__init__

    def quiet(self, *a, **kw):
        kw["disable"] = True
        orig(self, *a, **kw)

    _tqdm.tqdm.__init__ = quiet
    try:
        return cv.run(batch_size=BS)
    finally:
        _tqdm.tqdm.__init__ = orig


def _bench(benchmark, name, fn, rounds=None):
    out = {}
    cpu: list[float] = []

    def run():
        t = time.process_time()
        out["r"] = fn()
        cpu.append(time.process_time() - t)

    benchmark.extra_info.update({"label": name, "ours": name == "semlens_fast_fp32", "items": N, "unit": "images"})
    benchmark.pedantic(run, rounds=rounds or ROUNDS, iterations=1, warmup_rounds=0)
    RESULTS[name] = {
        "min_s": round(benchmark.stats.stats.min, 3),
        "median_s": round(benchmark.stats.stats.median, 3),
        "cpu_min_s": round(min(cpu), 3),  # process CPU time: less sensitive to other tenants
    }
    return out.get("r")


@pytest.mark.benchmark(group="collect")
def test_plain_forward(benchmark, setup):
    model, data = setup
    _bench(benchmark, "plain_forward", lambda: _plain(model, data))


@pytest.mark.benchmark(group="collect")
def test_semlens_fast_fp32(benchmark, setup):
    model, data = setup
    RESULTS["ours_store"] = _bench(benchmark, "semlens_fast_fp32", lambda: _ours(model, data))


@pytest.mark.benchmark(group="collect")
def test_semlens_fast_fp32_through_fc(benchmark, setup):
    """Also tracks ``fc`` (the last module), so the early stop saves nothing: pure tracking cost."""
    model, data = setup
    fn = lambda: collect(model, data, LAYERS + ["fc"], k=K, batch_size=BS, progress=False)  # noqa: E731
    _bench(benchmark, "semlens_fast_fp32_through_fc", fn)


@pytest.mark.benchmark(group="collect")
def test_semanticlens(benchmark, setup):
    model, data = setup
    RESULTS["sl_cache"] = _bench(benchmark, "semanticlens", lambda: _semanticlens(model, data))


@pytest.mark.benchmark(group="collect")
def test_semlens_fast_bf16(benchmark, setup):
    model, data = setup
    RESULTS["bf16_store"] = _bench(benchmark, "semlens_fast_bf16", lambda: _ours(model, data, torch.bfloat16), BF16_ROUNDS)


def _exact_reference(model, data):
    """Plain-torch max pooling per batch (same batches) + a stable lexicographic top-k."""
    mods = dict(model.named_modules())
    pooled = {n: [] for n in LAYERS}
    hs = [mods[n].register_forward_hook(lambda m, i, o, n=n: pooled[n].append(o.flatten(2).amax(2))) for n in LAYERS]
    try:
        with torch.inference_mode():
            for xb, _ in DataLoader(data, batch_size=BS):
                model(xb)
    finally:
        for h in hs:
            h.remove()
    out = {}
    for n in LAYERS:
        v = torch.cat(pooled[n]).t().contiguous()  # [C, N]
        ids = torch.arange(v.shape[1]).expand_as(v)
        order = torch.argsort(v, dim=1, descending=True, stable=True)[:, :K]  # ids ascending already
        out[n] = (v.gather(1, order), ids.gather(1, order))
    return out


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over channels of |set(a_c) & set(b_c)| / k."""
    tot = 0.0
    for ra, rb in zip(a.tolist(), b.tolist()):
        tot += len(set(ra) & set(rb)) / len(rb)
    return tot / a.shape[0]


def test_summary(setup):
    model, data = setup
    if "semlens_fast_fp32" not in RESULTS:
        pytest.skip("run the whole file")
    t0 = time.perf_counter()
    ref = _exact_reference(model, data)
    ours, sl, bf = RESULTS.pop("ours_store"), RESULTS.pop("sl_cache", None), RESULTS.pop("bf16_store", None)
    summary = dict(RESULTS)
    per_layer = {}
    for n in LAYERS:
        rv, ri = ref[n]
        row = {
            "ours_fp32_identical": bool(torch.equal(ours[n].ids, ri) and torch.equal(ours[n].values, rv)),
        }
        if sl is not None:
            sl_ids = sl[n].sample_ids
            row["semanticlens_id_overlap"] = round(_overlap(sl_ids, ri), 4)
            row["semanticlens_ids_exact_order"] = round(float((sl_ids == ri).float().mean()), 4)
            row["semanticlens_minus1_ids"] = int((sl_ids < 0).sum())
        if bf is not None:
            row["bf16_id_overlap"] = round(_overlap(bf[n].ids, ri), 4)
        per_layer[n] = row
    summary["per_layer"] = per_layer
    ratios = {}
    for key in ("min_s", "median_s", "cpu_min_s"):
        t = {n: summary[n][key] for n in summary if isinstance(summary.get(n), dict) and key in summary[n]}
        plain = t["plain_forward"]
        r = {"ours_overhead_vs_plain_pct": round(100 * (t["semlens_fast_fp32"] / plain - 1), 2)}
        if "semlens_fast_fp32_through_fc" in t:
            r["ours_through_fc_overhead_vs_plain_pct"] = round(100 * (t["semlens_fast_fp32_through_fc"] / plain - 1), 2)
        if "semanticlens" in t:
            r["semanticlens_overhead_vs_plain_pct"] = round(100 * (t["semanticlens"] / plain - 1), 2)
            r["speedup_fp32_vs_semanticlens"] = round(t["semanticlens"] / t["semlens_fast_fp32"], 3)
            if "semlens_fast_bf16" in t:
                r["speedup_bf16_vs_semanticlens"] = round(t["semanticlens"] / t["semlens_fast_bf16"], 3)
        ratios[key] = r
    summary["ratios"] = ratios
    from semlens_fast.ops import cpu_isa

    summary["cpu_isa"] = cpu_isa()
    summary["reference_s"] = round(time.perf_counter() - t0, 2)
    print("\n" + json.dumps(summary, indent=2))
    out = os.environ.get("SEMLENS_BENCH_OUT")
    if out:
        with open(out, "w") as fh:
            json.dump(summary, fh, indent=2)
    assert all(r["ours_fp32_identical"] for r in per_layer.values()), per_layer


def test_interleaved_ratios(setup):
    """Shared machines drift: run the methods in rotating order, round after round, and report
    the median of the per-round ratios (``SEMLENS_BENCH_INTERLEAVED`` rounds, default 3; 0 skips)."""
    rounds = int(os.environ.get("SEMLENS_BENCH_INTERLEAVED", "3"))
    if rounds <= 0:
        pytest.skip("SEMLENS_BENCH_INTERLEAVED=0")
    import statistics

    model, data = setup
    methods = {
        "plain_forward": lambda: _plain(model, data),
        "semlens_fast_fp32": lambda: _ours(model, data),
        "semlens_fast_fp32_through_fc": lambda: collect(model, data, LAYERS + ["fc"], k=K, batch_size=BS, progress=False),
        "semanticlens": lambda: _semanticlens(model, data),
    }
    names = list(methods)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t, c = time.perf_counter(), time.process_time()
            methods[n]()
            wall[n].append(time.perf_counter() - t)
            cpu[n].append(time.process_time() - c)
    out = {"rounds": rounds, "wall_s": wall, "cpu_s": cpu}
    for kind, d in (("wall", wall), ("cpu", cpu)):
        med = lambda a, b: round(statistics.median(x / y for x, y in zip(d[a], d[b])), 4)  # noqa: E731
        out[f"{kind}_median_ratio"] = {
            "ours_vs_plain": med("semlens_fast_fp32", "plain_forward"),
            "ours_through_fc_vs_plain": med("semlens_fast_fp32_through_fc", "plain_forward"),
            "semanticlens_vs_plain": med("semanticlens", "plain_forward"),
            "semanticlens_vs_ours": med("semanticlens", "semlens_fast_fp32"),
        }
    print("\n" + json.dumps(out, indent=2))
    path = os.environ.get("SEMLENS_BENCH_OUT")
    if path:
        with open(path + ".interleaved.json", "w") as fh:
            json.dump(out, fh, indent=2)
