"""ConceptDB construction: ours vs ``semanticlens==0.2.1`` ``compute_concept_db``.

Same TopKStores (the Fashion-MNIST CNN of :mod:`semlens_fast.models`, layers conv1..conv3,
k = 20, one store for max and one for mean pooling, collected once with
:func:`semlens_fast.collect.collect`), same foundation model, same images:

* **semanticlens**: one ``ActivationComponentVisualizer`` per pooling mode whose top-k
  cache is filled with our store's ids (its own ``run()`` is skipped so only the
  concept-DB step is timed), then ``semanticlens.lens.compute_concept_db(cv, fm)``. It
  embeds its whole ``dataset_fm`` on every call, i.e. 2 x N images for max + mean.
* **ours**: :func:`semlens_fast.concepts.build_concept_db` for max, then for mean, with
  one fresh embedding cache (full images, like semanticlens): only the distinct images of
  the top-20 sets are embedded, and the mean run reuses what the max run embedded.
* **ours, activation crops** (extra row): the same with ``mode="activation"`` (crops
  recomputed with one batched forward per unique sample; more distinct (sample, crop) pairs).

The foundation model is :class:`~semlens_fast.foundation.PackagedVision` (ImageNet
MobileNetV2, images resized to ``SEMLENS_BENCH_FM_SIZE`` = 64 px by default) wrapped for
semanticlens by a thin adapter; both count images through the same counter.

Sizes: N = 60,000 x ``SEMLENS_BENCH_SCALE`` Fashion-MNIST training images. The forward-pass
ratio grows with N (semanticlens: 2N; ours: the distinct images of the top-k sets, which
saturate). ``python benchmarks/bench_concepts.py`` runs the same measurement without
pytest-benchmark and prints JSON (wall and CPU seconds, images embedded, and a check that
both produce the same example embeddings); ``--full-ours PREVIOUS.json`` runs ours at
N = 60,000 and extrapolates semanticlens linearly from the images/s of PREVIOUS.json.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import scaled  # noqa: E402

K = 20
LAYERS = ["conv1", "conv2", "conv3"]
N = scaled(60_000, 500)
FM_SIZE = int(os.environ.get("SEMLENS_BENCH_FM_SIZE", "64"))
BATCH = 64


def setup(n: int = N):
    from semlens_fast.collect import collect
    from semlens_fast.data import fashion_mnist
    from semlens_fast.foundation import PackagedVision
    from semlens_fast.models import trained_fashion_cnn

    full = fashion_mnist("train")
    ds = full.subset(n)
    model = trained_fashion_cnn()
    stores = {p: collect(model, ds, LAYERS, k=K, pool=p, progress=False) for p in ("max", "mean")}
    fm = PackagedVision(image_size=FM_SIZE)
    return ds, model, stores, fm


class SemanticLensAdapter:
    """Our foundation model behind semanticlens's AbstractVLM duck type (preprocess / encode_image)."""

    def __init__(self, fm):
        self.fm = fm
        self.name = fm.name

    def to(self, device):
        return self

    def preprocess(self, images):
        return self.fm.preprocess(list(images))

    def encode_image(self, x):
        return self.fm.encode_images(x, preprocessed=True, batch_size=len(x))

    def encode_text(self, *a, **k):  # pragma: no cover
        raise NotImplementedError

    def tokenize(self, *a, **k):  # pragma: no cover
        raise NotImplementedError


class _ImagesOnly(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].unsqueeze(0)  # uint8 [1, 28, 28]; grey is repeated to RGB by preprocess


def run_semanticlens(ds, model, stores, fm):
    import logging

    from semanticlens.component_visualization import ActivationComponentVisualizer, aggregators
    from semanticlens.lens import compute_concept_db

    logging.getLogger("semanticlens").setLevel(logging.ERROR)
    adapter = SemanticLensAdapter(fm)
    out = {}
    for pool, agg in (("max", aggregators.aggregate_conv_max), ("mean", aggregators.aggregate_conv_mean)):
        cv = ActivationComponentVisualizer(model, ds, _ImagesOnly(ds.images), LAYERS, num_samples=K,
                                           aggregate_fn=agg, cache_dir=None)
        for n in LAYERS:
            am = cv.actmax_cache.cache[n]
            am.n_latents = stores[pool][n].channels
            am.sample_ids = stores[pool][n].ids.clone()
            am.activations = stores[pool][n].values.to(torch.bfloat16)
            am.is_setup = True
        cv.run = lambda *a, **k: cv.actmax_cache.cache  # the top-k are given: time only the concept DB
        out[pool] = compute_concept_db(cv, adapter)
    return out


def run_ours(ds, model, stores, fm, mode="full", cache_dir=None):
    from semlens_fast.concepts import build_concept_db

    own = cache_dir is None
    tmp = tempfile.mkdtemp(prefix="semlens-bench-") if own else cache_dir
    out = {}
    for pool in ("max", "mean"):
        out[pool] = build_concept_db(stores[pool], fm, ds, LAYERS, mode=mode, model=model, data=ds,
                                     cache=Path(tmp) / "cache", batch_size=BATCH, progress=False)
    if own:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------- pytest-benchmark suite

try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def env():
        return setup(N)

    GROUP = f"ConceptDB max+mean pooling, Fashion-MNIST N={N}, k={K}, 3 conv layers, MobileNetV2@{FM_SIZE}"

    def _bench(benchmark, fn, fm, label, ours=False):
        counts = []

        def target():
            fm.reset_counters()
            fn()
            counts.append(fm.images_encoded)

        benchmark.pedantic(target, rounds=1, iterations=1)
        benchmark.extra_info.update(label=label, ours=ours, note=f"{counts[-1]:,} images embedded", items=counts[-1],
                                    unit="images")

    def test_semanticlens_compute_concept_db(benchmark, env):
        ds, model, stores, fm = env
        benchmark.group = GROUP
        _bench(benchmark, lambda: run_semanticlens(ds, model, stores, fm), fm, "semanticlens compute_concept_db (max, mean)")

    def test_ours_full_images(benchmark, env):
        ds, model, stores, fm = env
        benchmark.group = GROUP
        _bench(benchmark, lambda: run_ours(ds, model, stores, fm), fm, "ours build_concept_db full images (max, mean)", ours=True)

    def test_ours_activation_crops(benchmark, env):
        ds, model, stores, fm = env
        benchmark.group = GROUP
        _bench(benchmark, lambda: run_ours(ds, model, stores, fm, mode="activation"), fm,
               "ours build_concept_db activation crops (max, mean)")


# ---------------------------------------------------------------------- standalone


def _measure(fn, fm):
    """(result, wall seconds, CPU seconds of this process, images embedded)."""
    fm.reset_counters()
    t0, c0 = time.perf_counter(), time.process_time()
    res = fn()
    return res, time.perf_counter() - t0, time.process_time() - c0, fm.images_encoded


def main(argv: list[str]) -> int:
    """``python benchmarks/bench_concepts.py`` (N from SEMLENS_BENCH_SCALE) prints JSON;
    ``--full-ours PREVIOUS.json`` runs ours only at N = 60,000 and extrapolates semanticlens
    from the images/s it reached in PREVIOUS.json (it embeds every image, so it is linear in N)."""
    if argv[:1] == ["--full-ours"]:
        prev = json.loads(Path(argv[1]).read_text())
        rate = prev["semanticlens"]["images_per_s"]
        ds6, model6, stores6, fm6 = setup(60_000)
        _, t6, c6, n6 = _measure(lambda: run_ours(ds6, model6, stores6, fm6), fm6)
        sl_s = 2 * 60_000 / rate
        res = {
            "N": 60_000, "k": K, "fm": fm6.name,
            "ours_images_embedded": n6, "ours_seconds": round(t6, 2), "ours_cpu_seconds": round(c6, 2),
            "unique_images_max_only": int(torch.unique(torch.cat([stores6["max"][n].ids.flatten() for n in LAYERS])).numel()),
            "semanticlens_images_embedded": 2 * 60_000,
            "semanticlens_seconds_extrapolated": round(sl_s, 1), "semanticlens_rate_used": rate,
            "forward_ratio": round(2 * 60_000 / max(n6, 1), 2), "time_ratio_extrapolated": round(sl_s / t6, 2),
        }
        if prev["semanticlens"].get("cpu_seconds"):
            sl_cpu = 2 * 60_000 * prev["semanticlens"]["cpu_seconds"] / prev["semanticlens"]["images_embedded"]
            res["semanticlens_cpu_seconds_extrapolated"] = round(sl_cpu, 1)
            res["cpu_time_ratio_extrapolated"] = round(sl_cpu / max(c6, 1e-9), 2)
        print(json.dumps(res, indent=2))
        return 0
    ds, model, stores, fm = setup(N)
    repeats = int(os.environ.get("SEMLENS_BENCH_REPEATS", "2"))
    runs_sl, runs_ours = [], []
    for _ in range(repeats):  # alternate, keep the fastest of each: the machine is shared and noisy
        runs_sl.append(_measure(lambda: run_semanticlens(ds, model, stores, fm), fm))
        runs_ours.append(_measure(lambda: run_ours(ds, model, stores, fm), fm))
    sl, t_sl, c_sl, n_sl = min(runs_sl, key=lambda r: r[1])
    ours, t_ours, c_ours, n_ours = min(runs_ours, key=lambda r: r[1])
    _, t_act, c_act, n_act = _measure(lambda: run_ours(ds, model, stores, fm, mode="activation"), fm)
    # same result: our per-example embeddings are semanticlens's (fp16 storage)
    err = max(float((ours[p][n].examples.float() - F_normalize(sl[p][n])).abs().max()) for p in ("max", "mean") for n in LAYERS)
    res = {
        "N": N, "k": K, "fm": fm.name,
        "semanticlens": {"images_embedded": n_sl, "seconds": round(t_sl, 2), "cpu_seconds": round(c_sl, 2),
                         "images_per_s": round(n_sl / t_sl, 1)},
        "ours_full": {"images_embedded": n_ours, "seconds": round(t_ours, 2), "cpu_seconds": round(c_ours, 2)},
        "ours_activation": {"images_embedded": n_act, "seconds": round(t_act, 2), "cpu_seconds": round(c_act, 2)},
        "forward_ratio": round(n_sl / max(n_ours, 1), 2), "time_ratio": round(t_sl / t_ours, 2),
        "cpu_time_ratio": round(c_sl / max(c_ours, 1e-9), 2),
        "max_abs_diff_example_embeddings": err,
        "all_wall_seconds": {"semanticlens": [round(r[1], 2) for r in runs_sl], "ours_full": [round(r[1], 2) for r in runs_ours]},
        "all_cpu_seconds": {"semanticlens": [round(r[2], 2) for r in runs_sl], "ours_full": [round(r[2], 2) for r in runs_ours]},
    }
    print(json.dumps(res, indent=2))
    return 0


def F_normalize(x):
    return torch.nn.functional.normalize(x.float(), dim=-1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
