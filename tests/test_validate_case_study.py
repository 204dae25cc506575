"""The worked case study: (a XOR b) AND c with a bottleneck; a correct interpretation gets a
small epsilon, deliberately wrong ones a large epsilon (and exactly where theory says)."""
from __future__ import annotations

import pytest
import torch
from scipy import stats

from semlens_fast.validate import AXIOMS, validate, validate_concepts
from semlens_fast.validate.case_study import (
    ROUTE_LABELS,
    all_inputs,
    circuit_inputs,
    circuit_labels,
    train_xor_and,
    xor_and_interpretation,
)

N = 2000
EPS0 = 1 - 0.05 ** (1 / N)  # zero failures out of N at 95%


@pytest.fixture(scope="module")
def trained():
    model = train_xor_and(seed=0)
    return model, circuit_inputs(N, seed=1)


def run(model, x, wrong=None, **kw):
    stages, alpha0 = xor_and_interpretation(model, wrong)
    return validate(model, stages, x, alpha0=alpha0, batch_size=256, progress=False, max_counterexamples=N, **kw)


def test_model_is_exact(trained):
    model, x = trained
    with torch.no_grad():
        assert bool((model(all_inputs()).argmax(1) == circuit_labels(all_inputs())).all())
    # the data exercises every input pattern
    assert len(torch.unique(x, dim=0)) == 64


def test_correct_interpretation_small_epsilon(trained):
    model, x = trained
    res = run(model, x)
    assert len(res.results) == 8
    for r in res.results:
        assert r.n == N and r.failures == 0 and r.histogram == {0: N}
        assert r.epsilon == pytest.approx(EPS0, rel=1e-12)
    assert res.max_epsilon < 0.002
    # at 99% the bound is wider, still tiny
    res99 = run(model, x, confidence=0.99)
    assert res99.max_epsilon == pytest.approx(1 - 0.01 ** (1 / N), rel=1e-12)


def test_wrong_or_interpretation_large_epsilon_where_expected(trained):
    model, x = trained
    res = run(model, x, "or")
    b = x.long()
    ab11 = torch.nonzero((b[:, 0] == 1) & (b[:, 1] == 1)).flatten().tolist()
    ab11c = torch.nonzero((b[:, 0] == 1) & (b[:, 1] == 1) & (b[:, 2] == 1)).flatten().tolist()
    # stage 1 (the bottleneck) claimed OR: wrong exactly on a = b = 1, one abstract position
    for ax in ("A1", "A2"):
        r = res["xor", ax]
        assert r.counterexamples == ab11 and r.histogram == {0: N - len(ab11), 1: len(ab11)}
    # replacing the bottleneck by gamma(OR) flips the decision exactly when also c = 1
    for stage, ax in [("xor", "A3"), ("xor", "A4"), ("and", "A1"), ("and", "A3")]:
        assert res[stage, ax].counterexamples == ab11c
    assert res["xor", "A3"].confusion == {(0, 1): len(ab11c)}  # true 0 (a = b), patched says 1
    # the AND stage itself is right: component axioms hold
    assert res["and", "A2"].failures == 0 and res["and", "A4"].failures == 0
    assert res["xor", "A1"].epsilon > 0.2 and res["xor", "A3"].epsilon > 0.1
    # epsilon = 1 - the one-sided 95% Clopper-Pearson bound (= lower end of the two-sided 90% one)
    for r in res.results:
        low = stats.binomtest(r.successes, r.n).proportion_ci(confidence_level=0.90, method="exact").low
        assert r.epsilon == pytest.approx(1 - low, rel=1e-9)
        assert r.epsilon > r.failures / r.n  # an upper bound on the failure rate


def test_wrong_output_stage_large_epsilon(trained):
    model, x = trained
    res = run(model, x, "c-only")
    b = x.long()
    wrong = torch.nonzero((b[:, 2] == 1) & (b[:, 0] == b[:, 1])).flatten().tolist()
    for ax in AXIOMS:
        assert res["xor", ax].failures == 0
        assert res["and", ax].counterexamples == wrong
        assert res["and", ax].epsilon > 0.2


def test_concept_claims_on_route(trained):
    model, x = trained
    right = validate_concepts(model, "route", x, ["a xor b", "c"], labels=ROUTE_LABELS, progress=False)
    assert right.kept == [0, 1] and right.ablated == [2, 3, 4]
    assert right.replaceability.failures == 0
    assert right.replaceability.epsilon == pytest.approx(EPS0, rel=1e-12)
    wrong = validate_concepts(model, "route", x, ["c", "distractor"], labels=ROUTE_LABELS, progress=False, max_counterexamples=N)
    assert wrong.kept == [1, 2, 3, 4]
    assert wrong.replaceability.epsilon > 0.2
    # with the xor unit at its mean, the decision for c = 1 is constant: half of those are wrong
    b = x.long()
    assert set(wrong.replaceability.counterexamples) <= set(torch.nonzero(b[:, 2] == 1).flatten().tolist())
