"""A small resumable AdamW training loop shared by the case studies' training functions."""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..._io import atomic_write

log = logging.getLogger("semlens_fast")

Batch = tuple[torch.Tensor, torch.Tensor]


def train_loop(
    model: nn.Module,
    batch: Callable[[int], Batch],
    *,
    max_steps: int,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.98),
    warmup: int = 10,
    evaluate: Callable[[nn.Module], dict[str, float]],
    eval_every: int,
    done: Callable[[dict[str, float]], bool],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    checkpoint: Optional[os.PathLike] = None,
    threads: Optional[int] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``model`` with AdamW (linear warm-up over ``warmup`` steps, then constant rate) on
    ``batch(step)`` (a deterministic function of the step, so a resumed run sees the same
    batches) until ``done(evaluate(model))`` at an evaluation (every ``eval_every`` steps) or
    ``max_steps``. With ``checkpoint``, the state is saved there (atomically) at every
    evaluation and a run resumes from it. Returns ``{"steps", "seconds", "history", "metrics"}``
    (seconds: wall time of this and earlier resumed runs)."""
    from tqdm.auto import tqdm

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    step, elapsed, history = 0, 0.0, []
    ck = Path(checkpoint) if checkpoint is not None else None
    if ck is not None and ck.exists():
        state = torch.load(ck, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
        log.info("resumed training from %s at step %d", ck, step)
    t0 = time.perf_counter()
    metrics: dict[str, float] = history[-1] if history else {}
    try:
        model.train()
        bar = tqdm(total=max_steps, initial=step, desc="train", disable=not progress)
        while step < max_steps and not (history and done(history[-1])):
            x, y = batch(step)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            if step % eval_every == 0 or step == max_steps:
                model.eval()
                with torch.no_grad():
                    metrics = {"step": step, "train_loss": float(loss), **evaluate(model)}
                model.train()
                history.append(metrics)
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k != "step"})
                if ck is not None:
                    with atomic_write(ck, "wb") as fh:
                        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                                    "step": step, "elapsed": elapsed + time.perf_counter() - t0,
                                    "history": history}, fh)
        bar.close()
    finally:
        torch.set_num_threads(old_threads)
        model.eval()
    return {"steps": step, "seconds": elapsed + time.perf_counter() - t0, "history": history, "metrics": metrics}
