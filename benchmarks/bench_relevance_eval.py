"""The DLBacktrace-paper style evaluation of explanation methods (``semlens bench relevance``).

Our DLBacktrace default/contrast and LRP presets against Captum's Integrated Gradients,
SmoothGrad, GradCAM, KernelSHAP and LIME, attention rollout (transformers) and a random
baseline, on offline tasks trained here: the Fashion-MNIST CNN, a MiniLM text classifier on
Debian fortunes categories, and MLPs on scikit-learn's breast-cancer and wine tables. Metrics:
deletion MoRF / LeRF and insertion AUC, faithfulness correlation, max-sensitivity, time per
explanation; three seeds per task (a model trained per seed, a new draw of samples), each
cell the mean and the worst seed. The table is stored with the results
(``benchmarks/results/bench_relevance_eval.json``) and written into BENCHMARKS.md by
``benchmarks/run.py``.

    python benchmarks/run.py relevance                      # this suite and bench_relevance.py
    SEMLENS_BENCH_SCALE=0.25 python benchmarks/run.py bench_relevance_eval.py   # quick: fewer samples

Full scale takes about 30-60 minutes on two cores (KernelSHAP and LIME dominate).
"""
from __future__ import annotations

import os

import pytest
import torch

from conftest import SCALE, scaled

pytest.importorskip("captum")


@pytest.mark.benchmark(group="relevance-evaluation")
def test_relevance_evaluation(benchmark):
    from semlens_fast.evaluate import markdown_table, run_benchmark

    tasks = os.environ.get("SEMLENS_EVAL_TASKS")
    kw = dict(tasks=tasks.split(",")) if tasks else {}
    seeds = (0, 1, 2) if SCALE >= 0.5 else (0, 1)
    out: list = []

    def run() -> None:
        out.append(run_benchmark(seeds=seeds, n=scaled(64, 8), samples=scaled(256, 32),
                                 progress=lambda m: print(m, flush=True), **kw))

    benchmark.pedantic(run, rounds=1, iterations=1)
    res = out[-1]
    benchmark.extra_info["label"] = f"whole evaluation ({len(res['tasks'])} tasks x {len(seeds)} seeds)"
    benchmark.extra_info["ours"] = True
    benchmark.extra_info["results"] = res
    benchmark.extra_info["markdown"] = (
        "Evaluation of explanation methods (higher ↑ / lower ↓ is better; mean over seeds, worst seed in "
        f"parentheses; torch threads {torch.get_num_threads()}):\n\n" + markdown_table(res))
    print(benchmark.extra_info["markdown"])
