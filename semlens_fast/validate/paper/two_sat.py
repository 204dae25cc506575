"""Case study 2 of Palumbo et al.: a 2-layer transformer that decides 2-SAT, and the paper's
interpretation of it (parsing block, "evaluating" MLP neurons, output OR), tested with A1-A4.

Model: 2 blocks, 1 head in the first and 4 in the second, ``d_model = 128``, MLP 512, no
LayerNorm, vocabulary of 16 tokens (:mod:`.two_sat_data`), the SAT/UNSAT answer read at the
``:`` position (the 41st token).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.nn import functional as F

from ...errors import StoreError
from .transformer import Transformer
from .two_sat_data import D_VOCAB, SEQ_LEN, TOK, balanced_formulas

__all__ = ["make_model", "train_two_sat", "save_model", "load_model", "WEIGHTS", "LABELS"]

WEIGHTS = Path(__file__).parent / "weights" / "two_sat.safetensors"
LABELS = [TOK["u"], TOK["s"]]  # the two answer tokens, class 0 = UNSAT, 1 = SAT


def make_model(d_model: int = 128, n_heads: tuple[int, ...] = (1, 4), d_mlp: int = 512) -> Transformer:
    return Transformer(d_vocab=D_VOCAB, n_ctx=SEQ_LEN, d_model=d_model, n_heads=list(n_heads), d_mlp=d_mlp)


def _split(tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.as_tensor(tokens)
    return t[:, :-1].contiguous(), (t[:, -1] == TOK["s"]).long()


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, LABELS], y)


def train_two_sat(
    seed: int = 0,
    *,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    max_steps: int = 60_000,
    target_acc: float = 0.995,
    n_val: int = 4000,
    eval_every: int = 250,
    d_model: int = 128,
    n_heads: tuple[int, ...] = (1, 4),
    d_mlp: int = 512,
    threads: Optional[int] = 1,
    checkpoint: Optional[os.PathLike] = None,
    progress: bool = True,
) -> tuple[Transformer, dict[str, Any]]:
    """Train on fresh balanced random formulas (batch ``step`` is drawn with seed
    ``(seed, step)``, so every step sees new formulas and a resumed run the same ones) until the
    accuracy on ``n_val`` held-out formulas (seed ``(seed, -1)``) reaches ``target_acc`` or
    ``max_steps``. The answer loss is the cross-entropy over the two answer tokens."""
    from ._train import train_loop

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model(d_model, n_heads, d_mlp)
    val_tokens, _ = balanced_formulas(n_val, seed=_seed(seed, -1))
    xv, yv = _split(val_tokens)

    def batch(step: int):
        toks, _ = balanced_formulas(batch_size, seed=_seed(seed, step))
        return _split(toks)

    def evaluate(m):
        out = torch.cat([m(xv[i : i + 1000]) for i in range(0, len(xv), 1000)])
        return {"val_acc": float((out[:, LABELS].argmax(1) == yv).float().mean()), "val_loss": float(_loss(out, yv))}

    info = train_loop(model, batch, max_steps=max_steps, lr=lr, weight_decay=weight_decay, warmup=100,
                      evaluate=evaluate, eval_every=eval_every, loss_fn=_loss, checkpoint=checkpoint,
                      done=lambda m: m["val_acc"] >= target_acc, threads=threads, progress=progress)
    info.update(seed=seed, batch_size=batch_size, lr=lr, weight_decay=weight_decay, config=model.config,
                formulas_seen=info["steps"] * batch_size)
    return model, info


def _seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, step + 1, 2]).generate_state(1)[0])


def save_model(model: Transformer, path: os.PathLike, info: dict[str, Any]) -> None:
    from .modular_addition import save_model as _save

    _save(model, path, info)


def load_model(path: Optional[os.PathLike] = None) -> tuple[Transformer, dict[str, Any]]:
    from .modular_addition import load_model as _load

    path = Path(path) if path is not None else WEIGHTS
    if not path.exists():
        raise StoreError(f"2-SAT weights not found at {path}; make them with "
                         f"`python scripts/train_paper_case_studies.py 2sat`")
    return _load(path)
