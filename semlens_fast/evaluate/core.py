"""Evaluate explanation methods on a task, and the benchmark table over tasks and seeds."""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Iterable, Mapping

import torch

from ..errors import ArgumentError
from .explainers import Explainer, make_explainers
from .metrics import curve_auc, faithfulness_correlation, max_sensitivity, perturbation_curve
from .tasks import Task, fashion_task, tabular_task, text_task

__all__ = ["evaluate", "run_benchmark", "markdown_table", "save_results", "METRICS", "TASKS"]

log = logging.getLogger("semlens_fast")

#: metric key -> (column title, better: "low" or "high")
METRICS: dict[str, tuple[str, str]] = {
    "morf_auc": ("Deletion MoRF AUC ↓", "low"),
    "lerf_auc": ("Deletion LeRF AUC ↑", "high"),
    "abpc": ("ABPC (LeRF − MoRF) ↑", "high"),
    "faithfulness": ("Faithfulness corr. ↑", "high"),
    "max_sensitivity": ("Max-sensitivity ↓", "low"),
    "ms_per_explanation": ("ms / explanation ↓", "low"),
}


def evaluate(
    task: Task,
    explainers: Mapping[str, Explainer] | None = None,
    *,
    steps: int = 20,
    subsets: int = 64,
    fraction: float = 0.1,
    sensitivity_n: int = 16,
    sensitivity_samples: int = 8,
    chunk: int = 256,
    batch: int = 64,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, float | None]]:
    """Every metric of :data:`METRICS` for every explainer on ``task``.

    Attributions are computed ``batch`` samples per call; time per explanation = wall time /
    samples, after one warm-up call on the first batch (graph capture, caches). Curves use
    ``steps`` steps; faithfulness ``subsets`` random subsets of ``fraction`` of the features;
    max-sensitivity the first ``sensitivity_n`` samples (a quarter of them, at least 4, for
    methods that explain one sample at a time: KernelSHAP, LIME) with ``sensitivity_samples``
    noise draws (``None`` where the task's input is discrete).

    Insertion (start from the baseline, restore the most relevant features first) needs no
    column of its own: with the same baseline its curve is the LeRF deletion curve read
    backwards, so the two areas are equal (:func:`~.metrics.perturbation_curve` computes both)."""
    exps = dict(explainers) if explainers is not None else make_explainers(task)
    model = task.model
    fwd = model
    x, t = task.x, task.target
    out: dict[str, dict[str, float | None]] = {}
    for name, e in exps.items():
        if progress:
            progress(f"{task.name} seed {task.seed}: {name}")
        w = min(batch, x.shape[0]) if e.batched else 1
        e(x[:w], t[:w])  # warm-up on the first batch's shapes: graph capture (torch.export), caches
        t0 = time.perf_counter()
        attr = torch.cat([e(x[i:i + batch], t[i:i + batch]) for i in range(0, x.shape[0], batch)])
        secs = time.perf_counter() - t0
        attr = attr.detach().float()
        if not torch.isfinite(attr).all():
            log.warning("evaluate: %s gave non-finite attributions on %s; replaced by 0", name, task.name)
            attr = torch.nan_to_num(attr, nan=0.0, posinf=0.0, neginf=0.0)
        kw = dict(valid=task.valid, chunk=chunk)
        morf = perturbation_curve(fwd, x, attr, t, task.feature_mask, task.baseline, order="morf", steps=steps, **kw)
        lerf = perturbation_curve(fwd, x, attr, t, task.feature_mask, task.baseline, order="lerf", steps=steps, **kw)
        faith = faithfulness_correlation(fwd, x, attr, t, task.feature_mask, task.baseline, subsets=subsets,
                                         fraction=fraction, seed=task.seed, **kw)
        res: dict[str, float | None] = {
            "morf_auc": float(curve_auc(morf).mean()), "lerf_auc": float(curve_auc(lerf).mean()),
            "abpc": float((curve_auc(lerf) - curve_auc(morf)).mean()), "faithfulness": float(faith.mean()),
            "ms_per_explanation": 1e3 * secs / x.shape[0], "max_sensitivity": None, "avg_sensitivity": None,
        }
        if task.radius is not None and sensitivity_n > 0:
            ns = sensitivity_n if e.batched else max(4, sensitivity_n // 4)
            xs, ts = x[:ns], t[:ns]
            mx, av = max_sensitivity(e, xs, ts, radius=task.radius, samples=sensitivity_samples, seed=task.seed,
                                     chunk=batch)
            res["max_sensitivity"], res["avg_sensitivity"] = float(mx.mean()), float(av.mean())
        out[name] = res
    return out


TASKS: dict[str, Callable[..., Task]] = {
    "fashion-cnn": lambda seed, n: fashion_task(seed=seed, n=n),
    "minilm-text": lambda seed, n: text_task(seed=seed, n=max(8, n // 2)),
    "tabular-breast-cancer": lambda seed, n: tabular_task(seed=seed, dataset="breast_cancer", n=n),
    "tabular-wine": lambda seed, n: tabular_task(seed=seed, dataset="wine", n=min(n, 50)),
}


def run_benchmark(
    tasks: Iterable[str] = tuple(TASKS),
    seeds: Iterable[int] = (0, 1, 2),
    n: int = 64,
    samples: int = 256,
    progress: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Evaluate every method on every task for every seed (a model trained per seed, a new
    draw of samples). Returns ``{"tasks": {task: {"seeds": {seed: {"accuracy", "n", "methods":
    {method: metrics}}}}}, "settings": {...}}`` (JSON-serialisable)."""
    tasks, seeds = list(tasks), list(seeds)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ArgumentError(f"tasks: unknown {unknown}; expected some of {list(TASKS)}")
    res: dict[str, Any] = {"tasks": {}, "settings": dict(seeds=seeds, n=n, samples=samples, **kwargs)}
    for name in tasks:
        per: dict[str, Any] = {}
        for s in seeds:
            task = TASKS[name](s, n)
            exps = make_explainers(task, samples=samples)
            per[str(s)] = {"accuracy": task.accuracy, "n": int(task.x.shape[0]), "features": task.num_features,
                           "methods": evaluate(task, exps, progress=progress, **kwargs)}
        res["tasks"][name] = {"title": task.name, "kind": task.kind, "seeds": per}
    return res


def _fmt(v: float | None, key: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if key == "ms_per_explanation":
        return f"{v:.3g}" if v < 100 else f"{v:.0f}"
    return f"{v:.3f}"


def markdown_table(results: Mapping[str, Any]) -> str:
    """The benchmark as Markdown: one table per task, methods as rows, metrics as columns; each
    cell is the mean over seeds and, in parentheses, the worst seed (highest for ↓ metrics,
    lowest for ↑)."""
    lines: list[str] = []
    for name, tk in results["tasks"].items():
        seeds = tk["seeds"]
        accs = ", ".join(f"{float(v['accuracy']):.3f}" for v in seeds.values())
        first = next(iter(seeds.values()))
        lines += [f"#### {tk['title']}", "",
                  f"{len(seeds)} seeds (model trained per seed; accuracy {accs}), {first['n']} samples each, "
                  f"{first['features']} features. Cell: mean over seeds (worst seed).", ""]
        cols = list(METRICS)
        lines.append("| method | " + " | ".join(METRICS[c][0] for c in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        methods = list(first["methods"])
        for m in methods:
            cells = []
            for c in cols:
                vals = [v["methods"][m][c] for v in seeds.values() if v["methods"][m].get(c) is not None]
                if not vals:
                    cells.append("n/a")
                    continue
                mean = sum(vals) / len(vals)
                worst = max(vals) if METRICS[c][1] == "low" else min(vals)
                cells.append(f"{_fmt(mean, c)} ({_fmt(worst, c)})")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def save_results(results: Mapping[str, Any], path: str) -> None:
    """Write the results as JSON (atomically)."""
    from .._io import write_json

    write_json(path, results)
