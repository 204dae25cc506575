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
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from torch.nn import functional as F

from ...errors import ArgumentError, ShapeError, StoreError
from ..equivalence import Equivalence
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


BATCH_SCHEDULE = ((0, 128), (2250, 1024))
"""Formulas per step from a step on: small batches first; at step 2,250 the validation loss had
stopped falling (the noise floor of 128-formula batches: 0.53, 72.5% accuracy) and the batch
grew to 1,024 (the paper used 10,000)."""


def train_two_sat(
    seed: int = 0,
    *,
    batch_size: Union[int, Sequence[tuple[int, int]]] = BATCH_SCHEDULE,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    max_steps: int = 60_000,
    target_acc: float = 0.995,
    n_val: int = 4000,
    eval_every: int = 50,
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
    ``max_steps``. ``batch_size``: formulas per step, or a schedule ``((from_step, size), ...)``.
    The answer loss is the cross-entropy over the two answer tokens."""
    from ._train import train_loop

    schedule = [(0, batch_size)] if isinstance(batch_size, int) else sorted((int(a), int(b)) for a, b in batch_size)
    if not schedule or schedule[0][0] != 0 or any(b < 1 for _, b in schedule):
        raise ArgumentError(f"batch_size must be an int >= 1 or a schedule ((0, size), (step, size), ...), got {batch_size!r}")

    def size_at(step: int) -> int:
        return [b for a, b in schedule if a <= step][-1]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model(d_model, n_heads, d_mlp)
    val_tokens, _ = balanced_formulas(n_val, seed=_seed(seed, -1))
    xv, yv = _split(val_tokens)

    def batch(step: int):
        toks, _ = balanced_formulas(size_at(step), seed=_seed(seed, step))
        return _split(toks)

    def evaluate(m):
        out = torch.cat([m(xv[i : i + 1000]) for i in range(0, len(xv), 1000)])
        return {"val_acc": float((out[:, LABELS].argmax(1) == yv).float().mean()), "val_loss": float(_loss(out, yv))}

    info = train_loop(model, batch, max_steps=max_steps, lr=lr, weight_decay=weight_decay, warmup=100,
                      evaluate=evaluate, eval_every=eval_every, loss_fn=_loss, checkpoint=checkpoint,
                      done=lambda m: m["val_acc"] >= target_acc, threads=threads, progress=progress)
    info.update(seed=seed, batch_size=schedule, lr=lr, weight_decay=weight_decay, config=model.config,
                formulas_seen=sum(size_at(s) for s in range(info["steps"])))
    return model, info


def _seed(seed: int, step: int, stream: int = 2) -> int:
    """A 32-bit seed for (``seed``, ``step``) of a stream: 2 = training batches (``step = -1``:
    the validation set), 3 and 4 = the analysis fit and test sets."""
    return int(np.random.SeedSequence([seed, step + 1, stream]).generate_state(1)[0])


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


# ---------------------------------------------------------------------- analysis data


def analysis_data(n_fit: int = 20_000, n_test: int = 80_001, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(fit tokens, test tokens)``: balanced random formulas drawn apart from the training
    stream (seed ``seed``), the test set without any formula of the fit set. The fit set is
    used to find the evaluating neurons, fit their decision trees and take the means gamma
    puts back; the axioms are measured on the test set (the paper: 120,000 and 80,001)."""
    fit, _ = balanced_formulas(n_fit, seed=_seed(seed, 0, 3))
    test, _ = balanced_formulas(n_test, seed=_seed(seed, 0, 4), exclude=fit)
    return fit, test


def truth_tables_torch(lits: torch.Tensor, n_vars: int = 5) -> torch.Tensor:
    """:func:`two_sat_data.truth_tables` on a tensor of literals ``[B, C, 2]`` (any device):
    ``[B, 2 ** n_vars]`` bool."""
    var, neg = lits % n_vars, lits >= n_vars
    a = torch.arange(2**n_vars, device=lits.device)
    assign = ((a[:, None] >> (n_vars - 1 - torch.arange(n_vars, device=lits.device))) & 1).bool()  # [A, V]
    val = assign[:, var] != neg[None]  # [A, B, C, 2]
    return (val[..., 0] | val[..., 1]).all(-1).T.contiguous()


class _Trees:
    """Fitted scikit-learn decision trees (one per unit) evaluated in torch, batched over units."""

    def __init__(self, trees: list, device: torch.device):
        n_nodes = max(t.tree_.node_count for t in trees)
        u = len(trees)
        feat = torch.zeros(u, n_nodes, dtype=torch.long)
        thr = torch.zeros(u, n_nodes, dtype=torch.float32)
        left = torch.zeros(u, n_nodes, dtype=torch.long)
        right = torch.zeros(u, n_nodes, dtype=torch.long)
        leaf = torch.ones(u, n_nodes, dtype=torch.bool)
        cls = torch.zeros(u, n_nodes, dtype=torch.bool)
        depth = 0
        for i, t in enumerate(trees):
            tr = t.tree_
            k = tr.node_count
            internal = torch.as_tensor(tr.children_left != -1)
            feat[i, :k] = torch.as_tensor(np.where(tr.feature >= 0, tr.feature, 0))
            thr[i, :k] = torch.as_tensor(tr.threshold, dtype=torch.float32)
            left[i, :k] = torch.as_tensor(np.where(internal.numpy(), tr.children_left, np.arange(k)))
            right[i, :k] = torch.as_tensor(np.where(internal.numpy(), tr.children_right, np.arange(k)))
            leaf[i, :k] = ~internal
            cls[i, :k] = torch.as_tensor(t.classes_[tr.value[:, 0].argmax(1)].astype(bool))
            depth = max(depth, int(tr.max_depth))
        self.depth = depth
        self.feat, self.thr, self.left, self.right, self.leaf, self.cls = (
            x.to(device) for x in (feat, thr, left, right, leaf, cls))

    def __call__(self, tt: torch.Tensor) -> torch.Tensor:
        """``[B, F]`` bool features -> ``[B, U]`` bool predictions."""
        b, u = tt.shape[0], self.feat.shape[0]
        x = tt.float()
        node = torch.zeros(b, u, dtype=torch.long, device=tt.device)
        ar = torch.arange(u, device=tt.device).expand(b, u)
        for _ in range(self.depth):
            f = self.feat[ar, node]
            go_left = x.gather(1, f) <= self.thr[ar, node]
            nxt = torch.where(go_left, self.left[ar, node], self.right[ar, node])
            node = torch.where(self.leaf[ar, node], node, nxt)
        return self.cls[ar, node]


# ---------------------------------------------------------------------- the paper's interpretation

N_CLAUSES = 10
CLAUSE_POS = [4 * i + 2 for i in range(N_CLAUSES)]  # the second literal of each clause
COMPONENTS = ("parsing (block 1)", "evaluating neurons (block 2)", "output OR (MLP-out)")
DISJ = ", disjunction-only"
NOAMP = ", no amplification"
PAPER_N = 80_001
PAPER = {  # (component, axiom, equivalence) -> the paper's epsilon (95%), from its interpretation notebook
    (COMPONENTS[0], "A1", "unordered-clauses"): 3.744548424300387e-05,
    (COMPONENTS[0], "A2", "unordered-clauses"): 3.744548424300387e-05,  # the first stage: A2 is A1
    (COMPONENTS[0], "A1", "exact"): 0.849527334310142,
    (COMPONENTS[0], "A3", "argmax"): 0.04180386184648288,
    (COMPONENTS[0], "A4", "argmax"): 0.04180386184648288,
    (COMPONENTS[1], "A1", "exact"): 0.18215883436961855,
    (COMPONENTS[1], "A2", "exact"): 0.18215883436961855,
    (COMPONENTS[1], "A3", "argmax"): 0.012832116070376487,
    (COMPONENTS[1], "A4", "argmax"): 0.012832116070376487,
    (COMPONENTS[2], "A1", "exact"): 0.012832116070376487,
    (COMPONENTS[2], "A2", "exact"): 0.004334649183158956,
    (COMPONENTS[2], "A3", "argmax"): 0.012832116070376487,
    (COMPONENTS[2], "A4", "argmax"): 0.004334649183158956,
    (COMPONENTS[1] + DISJ, "A1", "exact"): 0.3093139963702074,
    (COMPONENTS[1] + DISJ, "A2", "exact"): 0.3093139963702074,
    (COMPONENTS[1] + DISJ, "A3", "argmax"): 0.0029029695601768823,
    (COMPONENTS[1] + DISJ, "A4", "argmax"): 0.0029029695601768823,
    (COMPONENTS[2] + DISJ, "A1", "exact"): 0.0029029695601768823,
    (COMPONENTS[2] + DISJ, "A2", "exact"): 0.004334649183158956,
    (COMPONENTS[2] + DISJ, "A3", "argmax"): 0.0029029695601768823,
    (COMPONENTS[2] + DISJ, "A4", "argmax"): 0.004334649183158956,
    (COMPONENTS[1] + NOAMP, "A3", "argmax"): 0.24900366565232157,
    (COMPONENTS[1] + NOAMP, "A4", "argmax"): 0.24900366565232157,
    (COMPONENTS[1] + NOAMP + DISJ, "A3", "argmax"): 0.13490112778454566,
    (COMPONENTS[1] + NOAMP + DISJ, "A4", "argmax"): 0.13490112778454566,
}


class SortedPairs(Equivalence):
    """Equivalence of ``[B, C, 2]`` clause lists up to the order of the two literals inside each
    clause (clause ``x v y`` is clause ``y v x``). Distance: the number of differing clauses."""

    name = "unordered-clauses"

    def compare(self, a, b):
        if a.shape != b.shape:
            raise ShapeError(f"the unordered-clauses equivalence compares [B, C, 2] clause lists of one shape, "
                             f"got {tuple(a.shape)} and {tuple(b.shape)}")
        d = (a.sort(-1).values != b.sort(-1).values).any(-1).sum(1).to(torch.int64)
        return d == 0, d


class TwoSatInterpretation:
    """The paper's interpretation of a trained 2-SAT model, fitted on ``fit_tokens``.

    * Stage 1, *parsing* (input -> ``blocks.0``): ``h_1`` reads the clauses ``[B, 10, 2]`` off the
      tokens; ``alpha_1`` maps the residual stream at each clause's second literal to the clause
      whose *template* is closest in cosine; a template is the first block's output for the two
      literals alone (the second attending to both), averaged over the 10 clause positions;
      ``gamma_1`` puts the templates at those positions and the fit set's mean elsewhere.
    * Stage 2, *evaluating neurons* (``blocks.0`` -> ``blocks.1.mid``): the units whose largest
      effect on the SAT-vs-UNSAT logit over the fit set exceeds 0.1 (activation x the unit's
      weight on ``(W_U[s] - W_U[u]) / 2``); ``alpha_2``: each unit's last-position activation is
      ``>= threshold``; ``h_2``: a decision tree (at most ``max_leaf_nodes`` leaves) per unit on
      the formula's truth table (which of the 32 assignments satisfy it), fitted on the fit set;
      the *disjunction-only* variant: a unit is on iff the formula is satisfied by one of the
      assignments whose formulas turn it on on average (mean activation > threshold);
      ``gamma_2``: the fit set's mean state with the units set to ``high`` (on) or 0 (off).
    * Stage 3, *output* (``blocks.1.mid`` -> output): ``h_3`` = OR of the units (SAT iff any
      is on), ``alpha_3`` = the model's decision, ``gamma_3`` = one-hot logits.
    """

    def __init__(self, model: Transformer, fit_tokens: np.ndarray, *, threshold: float = 0.5, high: float = 2.0,
                 min_effect: float = 0.1, max_leaf_nodes: int = 4, seed: int = 0, batch_size: int = 2048):
        from sklearn.tree import DecisionTreeClassifier

        from .two_sat_data import truth_tables

        self.model, self.threshold, self.high = model, float(threshold), float(high)
        dev = next(model.parameters()).device
        self.device = dev
        d = model.config["d_model"]
        self.d = d
        x, _ = _split(fit_tokens)
        with torch.no_grad():
            self.templates = self._templates()  # [100, d]
            resid0, mid = self._record(x.to(dev), batch_size)
            self.mean_resid0 = resid0.mean(0)  # [41, d]
            self.mean_mid = mid[:, 0].mean(0)  # [d + d_mlp]
            hidden = mid[:, 0, d:]
            w_u = model.unembed.weight  # [V, d]
            margin = (w_u[TOK["s"]] - w_u[TOK["u"]]) / 2
            self.coef = model.blocks[-1].mlp_out.weight.T @ margin  # [d_mlp]: SAT-margin effect per unit
            self.max_effect = (hidden * self.coef).max(0).values
            self.units = torch.nonzero(self.max_effect > min_effect).flatten()
        on = (hidden[:, self.units] >= self.threshold).cpu().numpy()
        lits = x.numpy()[:, [[p - 1, p] for p in CLAUSE_POS]]
        tt = truth_tables(lits)
        self.trees = [DecisionTreeClassifier(max_leaf_nodes=max_leaf_nodes, random_state=seed).fit(tt, on[:, j])
                      for j in range(on.shape[1])]
        self._trees = _Trees(self.trees, dev) if self.trees else None
        act = hidden[:, self.units].cpu().numpy()
        mean_if_sat = np.stack([act[tt[:, k]].mean(0) if tt[:, k].any() else np.zeros(act.shape[1])
                                for k in range(tt.shape[1])], 1)  # [U, 32]
        self.disjunctions = torch.as_tensor(mean_if_sat > self.threshold, device=dev)  # [U, 32]
        self.n_fit = len(x)

    def _templates(self) -> torch.Tensor:
        m = self.model
        lit = torch.arange(10, device=self.device)
        l, r = lit.repeat_interleave(10), lit.repeat(10)  # template index l * 10 + r
        out = 0
        for p in CLAUSE_POS:
            pair = torch.stack([m.embed(l) + m.pos[p - 1], m.embed(r) + m.pos[p]], 1)  # [100, 2, d]
            out = out + m.blocks[0](pair)[:, 1]
        return out / len(CLAUSE_POS)

    def _record(self, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        got: dict[str, list] = {"r": [], "m": []}
        hs = [self.model.blocks[0].register_forward_hook(lambda mod, a, o: got["r"].append(o.detach())),
              self.model.blocks[-1].mid.register_forward_hook(lambda mod, a, o: got["m"].append(o.detach()))]
        try:
            for i in range(0, len(x), batch_size):
                self.model(x[i : i + batch_size])
        finally:
            for h in hs:
                h.remove()
        return torch.cat(got["r"]), torch.cat(got["m"])

    # stage 1
    @staticmethod
    def h1(tokens: torch.Tensor) -> torch.Tensor:
        idx = torch.tensor([[p - 1, p] for p in CLAUSE_POS], device=tokens.device)
        return tokens[:, idx]

    def alpha1(self, resid: torch.Tensor) -> torch.Tensor:
        at = F.normalize(resid[:, CLAUSE_POS], dim=-1)  # [B, 10, d]
        best = (at @ F.normalize(self.templates, dim=-1).T).argmax(-1)  # [B, 10]
        return torch.stack([best // 10, best % 10], -1)

    def gamma1(self, clauses: torch.Tensor) -> torch.Tensor:
        out = self.mean_resid0.expand(len(clauses), -1, -1).clone()
        out[:, CLAUSE_POS] = self.templates[clauses[..., 0] * 10 + clauses[..., 1]]
        return out

    # stage 2
    def h2(self, clauses: torch.Tensor) -> torch.Tensor:
        if self._trees is None:  # no evaluating unit
            return torch.zeros(len(clauses), 0, dtype=torch.bool, device=clauses.device)
        return self._trees(truth_tables_torch(clauses))

    def h2_disjunction(self, clauses: torch.Tensor) -> torch.Tensor:
        tt = truth_tables_torch(clauses)  # [B, 32]
        return (tt[:, None, :] & self.disjunctions[None]).any(-1)

    def alpha2(self, mid: torch.Tensor) -> torch.Tensor:
        return mid[:, -1, self.d + self.units] >= self.threshold

    def gamma2(self, on: torch.Tensor, high: Optional[float] = None) -> torch.Tensor:
        out = self.mean_mid.expand(len(on), -1).clone()
        hi = self.high if high is None else high
        out[:, self.d + self.units] = torch.where(on, torch.full_like(on, hi, dtype=out.dtype),
                                                  torch.zeros((), dtype=out.dtype, device=out.device))
        return out[:, None]

    # stage 3
    @staticmethod
    def h3(on: torch.Tensor) -> torch.Tensor:
        return on.any(1).long()

    @staticmethod
    def alpha3(logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1)

    @staticmethod
    def gamma3(sat: torch.Tensor) -> torch.Tensor:
        return F.one_hot(sat, 2).float()

    def stages(self, *, ordered: bool = False, disjunction: bool = False, high: Optional[float] = None,
               parsing_gamma: bool = True) -> list:
        """The interpretation as three :class:`~semlens_fast.validate.Stage` s: ``ordered``
        requires the literal order inside clauses at the parsing stage; ``disjunction`` uses the
        disjunction-only units; ``high`` is the activation gamma_2 gives an active unit (default
        ``self.high``); ``parsing_gamma=False`` leaves the parsing stage without gamma (its A3/A4
        skipped, e.g. for a variant that shares it with another interpretation)."""
        from ..core import Stage

        m = self.model
        h2 = self.h2_disjunction if disjunction else self.h2
        suffix = (NOAMP if high is not None else "") + (DISJ if disjunction else "")
        return [
            Stage(COMPONENTS[0], None, "blocks.0", self.h1, self.alpha1, self.gamma1 if parsing_gamma else None,
                  "exact" if ordered else SortedPairs(), rest=lambda x: m.from_block(x, 1)[:, LABELS]),
            Stage(COMPONENTS[1] + suffix, "blocks.0", f"blocks.{len(m.blocks) - 1}.mid", h2, self.alpha2,
                  (lambda on: self.gamma2(on, high)), "exact", rest=lambda s: m.tail(s)[:, LABELS]),
            Stage(COMPONENTS[2] + (DISJ if disjunction else ""), f"blocks.{len(m.blocks) - 1}.mid", None, self.h3,
                  self.alpha3, self.gamma3, "exact"),
        ]


CONSTRUCTION = [
    "the model is trained here on fresh random formulas streamed batch by batch (see the model line for how many); "
    "the paper trained on 1.2M formulas for 1,000 epochs on a GPU",
    "satisfiability is decided by the truth table over all 32 assignments (the paper used Z3; same answers)",
    "the loss and the decision read only the two answer logits (s, u); the paper's model predicted over all 16 "
    "tokens (its s and u unembeddings are exact negatives, so the decision is the same in kind)",
    "a unit's effect on the decision is its weight on (W_U[s] - W_U[u]) / 2 (the paper: on W_U[s], equal when u = -s)",
    "clause templates: the first block applied to the two literal embeddings (+ positions) alone, averaged over the "
    "10 clause positions (the paper computes the same from the attention weights analytically)",
    "gamma_2 puts back the fit set's mean of the whole packed state (residual after attention and MLP "
    "activations); the paper's code puts back the mean attention output in place of the residual stream",
    "decision trees: scikit-learn, at most 4 leaves, random_state fixed, not pruned (pruning merges leaves with "
    "the same class and does not change predictions)",
    "the fit set (evaluating units, trees, means) has 20,000 formulas by default (the paper: 120,000)",
]


def run_two_sat(
    model: Optional[Transformer] = None,
    *,
    n_fit: int = 20_000,
    n_test: int = PAPER_N,
    data_seed: int = 1,
    confidence: float = 0.95,
    batch_size: int = 1024,
    device: Any = None,
    progress: bool = False,
    info: Optional[dict[str, Any]] = None,
) -> "CaseStudyReport":
    """Validate the paper's interpretation of ``model`` (default: the shipped model) on
    ``n_test`` fresh balanced formulas (default 80,001 like the paper): the parsing block (clause
    equivalence with and without the order of the literals), the evaluating neurons (decision
    trees; the disjunction-only variant; and both without the amplification of gamma_2, which
    then puts back the threshold 0.5 instead of 2), and the output OR. One cached pass per batch
    for all variants; replaceability runs only the rest of the model from the patched state."""
    import time
    import warnings

    from ..core import Interpretation, validate_many
    from .compare import CaseStudyReport, rows_from

    t0 = time.perf_counter()
    if model is None:
        model, info = load_model()
    if device is not None:
        model = model.to(device)
    model.eval()
    fit, test = analysis_data(n_fit, n_test, data_seed)
    interp = TwoSatInterpretation(model, fit)
    t_fit = time.perf_counter() - t0
    x, y = _split(test)
    r_main = ("A1", "A2", "A3", "A4")
    variant = dict(parsing_gamma=False)  # the parsing stage's replaceability is the main interpretation's
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"validate: .*no gamma", category=UserWarning)
        runs = validate_many(model, {
            "main": interp.stages(),
            "ordered": Interpretation(interp.stages(ordered=True)[:1], axioms=("A1",)),
            "disjunction": interp.stages(disjunction=True, **variant),
            "no-amp": Interpretation(interp.stages(high=interp.threshold, **variant), axioms=("A3", "A4")),
            "no-amp-disj": Interpretation(interp.stages(high=interp.threshold, disjunction=True, **variant),
                                          axioms=("A3", "A4")),
        }, x, axioms=r_main, confidence=confidence, batch_size=batch_size, device=device, progress=progress,
            output=lambda o: o[:, LABELS])
    t_val = time.perf_counter() - t0 - t_fit
    eq = {(i, a): ("unordered-clauses" if i == 0 else "exact") for i in range(3) for a in ("A1", "A2")}
    eq.update({(i, a): "argmax" for i in range(3) for a in ("A3", "A4")})
    rows = []
    for name, only in [("main", None), ("ordered", {(0, "A1")}), ("disjunction", {(i, a) for i in (1, 2) for a in r_main}),
                       ("no-amp", {(1, "A3"), (1, "A4")}), ("no-amp-disj", {(1, "A3"), (1, "A4")})]:
        res = runs[name]
        stage_names = {r.stage_index: r.stage for r in res.results}
        e = {(0, "A1"): "exact"} if name == "ordered" else eq
        rows += rows_from(res, stage_names, e, PAPER, PAPER_N, only=only)
    with torch.no_grad():
        dev = next(model.parameters()).device
        pred = torch.cat([model(x[i : i + batch_size].to(dev))[:, LABELS].argmax(1).cpu() for i in range(0, len(x), batch_size)])
    acc = float((pred == y).float().mean())
    trained = ""
    if info and "steps" in info:
        trained = (f", trained {info['steps']:,} steps of {info.get('batch_size', '?')} fresh formulas "
                   f"({info.get('formulas_seen', 0):,} formulas, {info.get('seconds', 0) / 3600:.1f} h wall time, 1 CPU thread)")
    details = {
        "model": f"{len(model.blocks)}-layer transformer, heads {tuple(model.config['n_heads'])}, d_model "
                 f"{model.config['d_model']}, MLP {model.config['d_mlp']}, no LayerNorm{trained}",
        "test accuracy": f"{acc:.4%} on {len(x):,} test formulas (the paper's test set: {PAPER_N:,})",
        "evaluating units": f"{len(interp.units)} (the paper's model: 34), fitted on {interp.n_fit:,} formulas",
        "time": f"fit {t_fit:.1f} s, validate (5 variants, one shared pass) {t_val:.1f} s",
    }
    if acc < 0.99:
        details["warning"] = (f"the model decides only {acc:.1%} of the test formulas right (the paper's: >= 99%); "
                              "an interpretation of an untrained model says little about the paper's")
    return CaseStudyReport("2sat", "2-SAT (the paper's 2-layer transformer and interpretation): "
                           f"epsilon at {confidence:.0%} confidence, ours beside the paper's", rows, details,
                           list(CONSTRUCTION), runs, confidence=confidence)
