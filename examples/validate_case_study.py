"""Validate a mechanistic interpretation of a network trained on (a XOR b) AND c.

Run from the repository root (a few seconds on a CPU):
    PYTHONPATH=. python examples/validate_case_study.py    (or python ... after pip install -e .)

The network (semlens_fast.validate.case_study.XorAndNet) sees 6 bits (a, b, c, d1, d2, d3);
a and b reach the linear head only through `xor`, a 1-unit bottleneck, and the module `route`
concatenates [s, c, d1, d2, d3]. See docs/validate.md.
"""
import torch
from torch import nn

from semlens_fast.validate import Stage, validate, validate_concepts
from semlens_fast.validate.case_study import circuit_inputs, train_xor_and

model = train_xor_and(seed=0)  # reaches 100% accuracy on all 64 inputs
x = circuit_inputs(2000, seed=1)  # 2000 iid test inputs

# Fit alpha_1 / gamma_1 of the bottleneck on the four (a, b) patterns:
# the threshold between the xor = 0 and xor = 1 groups, and each group's mean value.
with torch.no_grad():
    s = model.xor(torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]]))[:, 0]
s0, s1 = s[:2], s[2:]
sign = 1.0 if s1.mean() > s0.mean() else -1.0
lo, hi = (s0, s1) if sign > 0 else (s1, s0)
theta = float(lo.max() + hi.min()) / 2
canon = torch.stack([s0.mean(), s1.mean()])


def interpretation(first_gate):
    """Stage 1 claims route = [first_gate(a, b), c, d1, d2, d3]; stage 2 claims y = z0 AND z1."""
    return [
        Stage(
            "xor", None, "route",
            h=lambda a: torch.cat([first_gate(a[:, 0], a[:, 1])[:, None], a[:, 2:]], 1),
            alpha=lambda z: torch.cat([(sign * z[:, :1] > sign * theta).long(), z[:, 1:].round().long()], 1),
            gamma=lambda a: torch.cat([canon[a[:, 0]][:, None], a[:, 1:].float()], 1),
        ),
        Stage(
            "and", "route", None,
            h=lambda a: a[:, 0] & a[:, 1],
            alpha=lambda logits: logits.argmax(1),
            gamma=lambda y: nn.functional.one_hot(y, 2).float(),
        ),
    ]


alpha0 = lambda x: x.round().long()  # noqa: E731  (the input bits)

print("correct interpretation: route[0] = a XOR b")
print(validate(model, interpretation(torch.bitwise_xor), x, alpha0=alpha0, progress=False))
print()
print("wrong interpretation: route[0] = a OR b")
wrong = validate(model, interpretation(torch.bitwise_or), x, alpha0=alpha0, progress=False)
print(wrong)
print("counterexamples of (xor, A1):", wrong["xor", "A1"].counterexamples[:8], "...")
print("inputs:", x[wrong["xor", "A1"].counterexamples[:3]].long().tolist())
print()

labels = [(0, "a xor b"), (1, "c"), (2, "distractor"), (3, "distractor"), (4, "distractor")]
print("concept claim: the decision uses only 'a xor b' and 'c' at route")
print(validate_concepts(model, "route", x, ["a xor b", "c"], labels=labels, progress=False))
print()
print("concept claim: the decision uses only 'c' and the distractors at route")
print(validate_concepts(model, "route", x, ["c", "distractor"], labels=labels, progress=False))
