"""A worked case study with a mechanism known by construction: ``y = (a XOR b) AND c``.

The network sees 6 bits ``(a, b, c, d1, d2, d3)`` (``d*`` are distractors). By its architecture,
``a`` and ``b`` reach the decision only through ``xor``, a small MLP with a single output unit
(a bottleneck), and ``c``/``d*`` are routed around it:

    x ──> xor(a, b) = s ──┐
    x[:, 2:] = (c, d1, d2, d3) ──> route: z = [s, c, d1, d2, d3] ──> head (linear) ──> logits

Because the head is linear and AND is linearly separable, a network that classifies every input
correctly must make ``s`` a threshold-separable code of ``a XOR b``. So the interpretation

* stage ``"xor"`` (input -> ``route``): ``h1(x) = [a ^ b, c, d1, d2, d3]``,
  ``alpha1(z) = [s > theta, c, d1, d2, d3]``, ``gamma1`` puts back the mean ``s`` of the class;
* stage ``"and"`` (``route`` -> output): ``h2(z) = z0 & z1``, ``alpha2 = argmax``,
  ``gamma2`` = one-hot logits

is correct by construction (``theta`` and the class means are fitted on the data), and
"the bottleneck computes ``a OR b``" is wrong on a quarter of the inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import ArgumentError
from .concepts import ConceptValidation, validate_concepts
from .core import Stage, ValidationResult, validate

__all__ = [
    "XorAndNet",
    "circuit_inputs",
    "circuit_labels",
    "train_xor_and",
    "xor_and_interpretation",
    "ROUTE_LABELS",
    "CaseStudy",
    "run_case_study",
]

ROUTE_LABELS = [(0, "a xor b"), (1, "c"), (2, "distractor"), (3, "distractor"), (4, "distractor")]
"""Concept labels of the 5 components of the ``route`` layer, as (component, label) pairs."""


class Concat(nn.Module):
    """``[s, rest]`` -> their concatenation along dim 1 (a named hook point)."""

    def forward(self, s: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        return torch.cat([s, rest], dim=1)


class XorAndNet(nn.Module):
    """6 bits in, 2 logits out; ``a, b`` pass through the 1-unit ``xor`` bottleneck."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.xor = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.route = Concat()
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.route(self.xor(x[:, :2]), x[:, 2:]))


def circuit_inputs(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` iid uniform samples of 6 bits, float32 ``[n, 6]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n, 6), generator=g).float()


def all_inputs() -> torch.Tensor:
    """The 64 possible inputs, float32 ``[64, 6]``."""
    idx = torch.arange(64)
    return ((idx[:, None] >> torch.arange(6)) & 1).float()


def circuit_labels(x: torch.Tensor) -> torch.Tensor:
    """``(a XOR b) AND c`` as int64 ``[n]``."""
    b = x.round().long()
    return (b[:, 0] ^ b[:, 1]) & b[:, 2]


def train_xor_and(seed: int = 0, steps: int = 300, hidden: int = 8) -> XorAndNet:
    """Train :class:`XorAndNet` full-batch on all 64 inputs with Adam (about a second on one CPU
    thread; torch runs single-threaded meanwhile, which is faster for such tiny tensors).

    Restarts with another seed (at most 5 times) if an initialisation does not reach 100%
    accuracy; raises RuntimeError if none does."""
    x, y = all_inputs(), circuit_labels(all_inputs())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG state alone
            for attempt in range(5):
                torch.manual_seed(seed + 1000 * attempt)
                model = XorAndNet(hidden)
                opt = torch.optim.Adam(model.parameters(), lr=0.05)
                for _ in range(steps):
                    opt.zero_grad()
                    nn.functional.cross_entropy(model(x), y).backward()
                    opt.step()
                with torch.no_grad():
                    if bool((model(x).argmax(1) == y).all()):
                        return model.eval()
    finally:
        torch.set_num_threads(threads)
    raise RuntimeError(f"XorAndNet did not reach 100% accuracy from seeds {seed} + 1000 * k, k < 5")


def xor_and_interpretation(model: XorAndNet, wrong: Optional[str] = None) -> tuple[list[Stage], object]:
    """``(stages, alpha0)`` of the interpretation of ``model``.

    ``wrong=None``: the correct one. ``wrong="or"``: stage 1 claims the bottleneck computes
    ``a OR b``. ``wrong="c-only"``: stage 2 claims the output is ``c`` alone.
    The threshold ``theta`` of ``alpha1`` and the values ``gamma1`` puts back are fitted on the
    four ``(a, b)`` combinations: the midpoint between the two groups and each group's mean.
    """
    if wrong not in (None, "or", "c-only"):
        raise ArgumentError(f"wrong must be None, 'or' or 'c-only', got {wrong!r}")
    with torch.no_grad():
        ab = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
        s = model.xor(ab)[:, 0]
    s0, s1 = s[:2], s[2:]  # xor = 0, xor = 1
    sign = 1.0 if float(s1.mean()) > float(s0.mean()) else -1.0
    lo, hi = (s0, s1) if sign > 0 else (s1, s0)
    theta = float(lo.max() + hi.min()) / 2
    canon = torch.stack([s0.mean(), s1.mean()])  # gamma1's value of s for xor = 0, 1

    def alpha0(x: torch.Tensor) -> torch.Tensor:
        return x.round().long()

    def h1(x: torch.Tensor) -> torch.Tensor:
        first = x[:, 0] | x[:, 1] if wrong == "or" else x[:, 0] ^ x[:, 1]
        return torch.cat([first[:, None], x[:, 2:]], dim=1)

    def alpha1(z: torch.Tensor) -> torch.Tensor:
        bit = (sign * z[:, 0] > sign * theta).long()
        return torch.cat([bit[:, None], z[:, 1:].round().long()], dim=1)

    def gamma1(a: torch.Tensor) -> torch.Tensor:
        return torch.cat([canon.to(a.device)[a[:, 0]][:, None], a[:, 1:].float()], dim=1)

    def h2(a: torch.Tensor) -> torch.Tensor:
        return a[:, 1] if wrong == "c-only" else a[:, 0] & a[:, 1]

    def alpha2(logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1)

    def gamma2(y: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(y, 2).float()

    stages = [
        Stage("xor", None, "route", h1, alpha1, gamma1),
        Stage("and", "route", None, h2, alpha2, gamma2),
    ]
    return stages, alpha0


@dataclass
class CaseStudy:
    correct: ValidationResult
    wrong_or: ValidationResult
    wrong_c_only: ValidationResult
    concepts_right: ConceptValidation
    concepts_wrong: ConceptValidation


def run_case_study(seed: int = 0, n: int = 2000, confidence: float = 0.95, progress: bool = False) -> CaseStudy:
    """Train the network, then validate the correct and two wrong interpretations and two
    concept-level claims about ``route`` on ``n`` iid inputs."""
    model = train_xor_and(seed)
    data = circuit_inputs(n, seed + 1)
    kw = dict(confidence=confidence, batch_size=256, progress=progress)
    res = {}
    for key, wrong in (("correct", None), ("wrong_or", "or"), ("wrong_c_only", "c-only")):
        stages, alpha0 = xor_and_interpretation(model, wrong)
        res[key] = validate(model, stages, data, alpha0=alpha0, **kw)  # type: ignore[arg-type]
    right = validate_concepts(model, "route", data, ["a xor b", "c"], labels=ROUTE_LABELS, **kw)  # type: ignore[arg-type]
    wrong_c = validate_concepts(model, "route", data, ["c", "distractor"], labels=ROUTE_LABELS, **kw)  # type: ignore[arg-type]
    return CaseStudy(res["correct"], res["wrong_or"], res["wrong_c_only"], right, wrong_c)


if __name__ == "__main__":  # python -m semlens_fast.validate.case_study
    cs = run_case_study()
    for title, res in [
        ("correct interpretation", cs.correct),
        ("wrong: the bottleneck computes a OR b", cs.wrong_or),
        ("wrong: the output is c", cs.wrong_c_only),
        ("concepts kept: 'a xor b', 'c'", cs.concepts_right),
        ("concepts kept: 'c', 'distractor'", cs.concepts_wrong),
    ]:
        print(f"== {title}\n{res}\n")
