"""Evaluation of explanation methods: deletion / insertion curves (MoRF, LeRF) and their AUC,
faithfulness correlation, max-sensitivity and time per explanation, for our DLBacktrace and
LRP presets against Captum's Integrated Gradients, SmoothGrad, GradCAM, KernelSHAP and LIME,
attention rollout and a random baseline, on offline tasks trained here (Fashion-MNIST CNN,
MiniLM text classifier, tabular MLPs).

Quick start::

    from semlens_fast.evaluate import fashion_task, make_explainers, evaluate
    task = fashion_task(seed=0, n=32)
    scores = evaluate(task, make_explainers(task))      # {method: {metric: value}}

The benchmark over tasks and seeds: :func:`run_benchmark` and :func:`markdown_table`
(``semlens bench relevance`` runs ``benchmarks/bench_relevance_eval.py``). See
``docs/relevance.md``.
"""
from __future__ import annotations

from .core import METRICS, TASKS, evaluate, markdown_table, run_benchmark, save_results
from .explainers import BASELINES, OURS, Explainer, make_explainers
from .metrics import (curve_auc, faithfulness_correlation, feature_scores, max_sensitivity, perturbation_curve,
                      target_probability)
from .tasks import FORTUNE_CATEGORIES, Task, TextClassifier, fashion_task, tabular_task, text_task

__all__ = [
    "evaluate", "run_benchmark", "markdown_table", "save_results", "METRICS", "TASKS", "Explainer",
    "make_explainers", "OURS", "BASELINES", "perturbation_curve", "curve_auc", "faithfulness_correlation",
    "max_sensitivity", "feature_scores", "target_probability", "Task", "TextClassifier", "fashion_task", "text_task",
    "tabular_task", "FORTUNE_CATEGORIES",
]
