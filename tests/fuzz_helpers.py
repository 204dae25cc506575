"""Shared pieces of the fuzz tests.

Hypothesis favours the simplest choice of a sampled_from or a small integer, so the fuzz tests'
"valid or broken" decisions go through a seeded random.Random: the stated rates hold."""
from __future__ import annotations

import random

from hypothesis import strategies as st


def choose(draw, weighted):
    """One item of ``[(weight, item), ...]`` with those probabilities."""
    r = random.Random(draw(st.integers(0, 2**32 - 1))).random() * sum(w for w, _ in weighted)
    for w, item in weighted:
        r -= w
        if r < 0:
            return item
    return weighted[-1][1]


def chance(draw, p):
    return choose(draw, [(p, True), (1 - p, False)])
