"""Fuzz test of the Lens and validate APIs (issue 20, "Done when"): hypothesis draws arguments for
``Lens.search``, ``label``, ``compare``, ``describe``, ``audit`` and ``validate`` -- valid ones and
broken ones (wrong types, empty or whitespace texts, NaN / infinite / zero / misshaped vectors and
relevance, unknown layers, bad k, thresholds, rates, targets, devices, axioms, batch sizes). Every
call must either return a result that keeps the API's promises (sorted scores, at most k results,
known layers and labels; validate's bounds in [0, 1]) or raise an error from
:mod:`semlens_fast.errors`; any other exception fails."""
from __future__ import annotations

import math
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from semlens_fast.errors import SemlensError
from semlens_fast.lens import UNLABELLED, Lens
from semlens_fast.validate import validate
from tests.fuzz_helpers import choose
from tests.test_lens import D, TEMPLATES, WORDS, BagFM, make_db
from tests.test_validate import X, Toy, toy_stages

FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                   HealthCheck.function_scoped_fixture])


FM = BagFM()
DB = make_db(FM, {"l1": ["cat", "dog", None, "car", ("cat", "car"), "tree"],
                  "l2": ["water", "cat", "stripes", "watermark", "grass", "dog", "cat"]})
LAYERS = {"l1": 6, "l2": 7}


def call(fn, *args, **kw):
    try:
        out = fn(*args, **kw)
    except SemlensError as exc:
        event(f"{fn.__name__}: {type(exc).__name__}")
        return None
    event(f"{fn.__name__}: result")
    return out


@st.composite
def texts(draw):
    return choose(draw, [(6, draw(st.sampled_from(WORDS))), (1, ""), (1, "   "), (1, "unknown words here"),
                         (1, draw(st.text(max_size=12))), (0.5, 3), (0.5, None), (0.5, ["cat", ""])])


@st.composite
def vectors(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    v = torch.randn(draw(st.sampled_from([1, 2])), D, generator=g)
    kind = choose(draw, [(5, "ok"), (1, "nan"), (1, "inf"), (1, "zero"), (1, "shape"), (0.5, "list"), (0.5, "int")])
    if kind == "nan":
        v[0, 0] = float("nan")
    elif kind == "inf":
        v[-1, 1] = float("inf")
    elif kind == "zero":
        v[0] = 0
    elif kind == "shape":
        v = v[:, :5]
    elif kind == "list":
        return v.tolist()
    elif kind == "int":
        return v.long()
    return v


@st.composite
def layer_args(draw):
    return choose(draw, [(4, None), (2, draw(st.sampled_from(list(LAYERS)))), (1, ["l1", "l2"]), (1, "nope"),
                         (0.5, []), (0.5, 7), (0.5, ["l1", "l1"])])


def numbers(draw, good):
    return choose(draw, [(5, draw(st.sampled_from(good))), (1, float("nan")), (1, -1), (1, 0), (0.5, "x"),
                         (0.5, True), (0.5, 10**12), (0.5, float("inf"))])


@settings(max_examples=120, **FUZZ)
@given(st.data())
def test_fuzz_search(data):
    lens = Lens(DB, FM, templates=TEMPLATES)
    query = data.draw(st.one_of(texts(), vectors()))
    k = numbers(data.draw, [1, 3, 10, 100])
    layers = data.draw(layer_args())
    modality = choose(data.draw, [(4, None), (1, "embedding"), (1, "text"), (0.5, "image"), (0.5, "sound")])
    per_layer = data.draw(st.booleans())
    res = call(lens.search, query, k=k, layers=layers, modality=modality, per_layer=per_layer)
    if res is None:
        return
    groups: dict = {}
    for r in res.to_records():
        assert r["layer"] in LAYERS and 0 <= r["component"] < LAYERS[r["layer"]] and math.isfinite(r["score"])
        groups.setdefault((r["query"], r["layer"] if per_layer else None), []).append(r)
    for g in groups.values():
        g.sort(key=lambda r: r["rank"])
        scores = [r["score"] for r in g]
        assert scores == sorted(scores, reverse=True) and len(g) <= k
        assert [r["rank"] for r in g] == list(range(len(g)))


@settings(max_examples=80, **FUZZ)
@given(st.data())
def test_fuzz_label_compare_describe(data):
    lens = Lens(DB, FM, templates=TEMPLATES)
    vocab = choose(data.draw, [(5, data.draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=5, unique=True))),
                               (1, []), (1, ["cat", ""]), (1, "cat"), (0.5, {"cat": "cat", "dog": ["dog", "a dog"]}),
                               (0.5, [3, 4]), (0.5, ["cat", "cat"])])
    threshold = choose(data.draw, [(4, None), (2, 0.1), (1, float("nan")), (1, 2.0), (0.5, "x")])
    layers = data.draw(layer_args())
    lab = call(lens.label, vocab, threshold=threshold, layers=layers)
    if lab is not None:
        for r in lab.to_records():
            assert r["layer"] in LAYERS and 0 <= r["component"] < LAYERS[r["layer"]]
            assert r["label"] in ([vocab] if isinstance(vocab, str) else list(vocab)) + [UNLABELLED]
    other = choose(data.draw, [(3, DB), (1, lens), (1, {"x": torch.randn(3, D)}), (1, {"x": torch.randn(3, 5)}),
                               (0.5, None), (0.5, "db")])
    cmp = call(lens.compare, other, layers=layers, threshold=choose(data.draw, [(4, 0.8), (1, 1.5), (1, float("nan"))]))
    if cmp is not None:
        assert 0.0 <= cmp.coverage_a <= 1.0 and 0.0 <= cmp.coverage_b <= 1.0
    layer = choose(data.draw, [(4, data.draw(st.sampled_from(list(LAYERS)))), (1, "nope"), (0.5, None), (0.5, 3)])
    C = LAYERS.get(layer, 6) if isinstance(layer, str) else 6
    rel = choose(data.draw, [(3, None), (2, torch.rand(C)), (1, torch.full((C,), float("nan"))), (1, torch.rand(C + 1)),
                             (0.5, [1.0] * C), (0.5, "x")])
    top = numbers(data.draw, [1, 3, 10])
    call(lens.describe, layer, vocabulary=vocab if isinstance(vocab, list) else None,
         relevance=rel if not isinstance(rel, torch.Tensor) else {layer: rel}, top=top)


@settings(max_examples=40, **FUZZ)
@given(st.data())
def test_fuzz_audit(data):
    lens = Lens(DB, FM, templates=TEMPLATES)
    good = choose(data.draw, [(2, True), (3, False)])  # all arguments valid: the result's promises are checked
    spurious = ["watermark"] if good else choose(data.draw, [
        (5, ["watermark"]), (1, []), (1, [""]), (1, {"mark": "watermark", "x": "stripes"}), (0.5, "watermark"),
        (0.5, [3]), (0.5, {"": "watermark"})])
    valid = choose(data.draw, [(4, ["cat", "dog"]), (2, None)] + ([] if good else [(1, [""]), (0.5, "cat")]))
    layers = None if good else data.draw(layer_args())
    rel = choose(data.draw, [(3, None), (2, {n: torch.rand(c) for n, c in LAYERS.items()})] + ([] if good else [
        (1, {"l1": torch.full((6,), float("nan"))}), (1, {"l1": torch.rand(3)}), (0.5, "x")]))
    res = call(lens.audit, valid, spurious, relevance=rel,
               target=None if good else choose(data.draw, [(3, None), (1, 0), (1, -3), (0.5, "a")]), layers=layers,
               fdr=0.1 if good else choose(data.draw, [(4, 0.1), (1, 0.0), (1, 1.5), (1, float("nan"))]),
               n_null=20 if good else choose(data.draw, [(4, 20), (1, 5), (1, 0), (0.5, 2.5)]),
               top=3 if good else numbers(data.draw, [1, 5]))
    assert res is not None or not good
    if res is None:
        return
    ranked = res.ranked
    assert sorted(r["rank"] for r in ranked) == list(range(1, len(ranked) + 1))
    ps = [r["p_value"] for r in ranked if not math.isnan(r["p_value"])]
    assert all(0.0 <= p <= 1.0 for p in ps)
    assert all(r["q_value"] <= res.method["fdr"] + 1e-12 for r in ranked if r["flagged"])


@settings(max_examples=40, **FUZZ)
@given(st.data())
def test_fuzz_validate(data):
    good = choose(data.draw, [(2, True), (3, False)])
    x = X if good else choose(data.draw, [(5, X), (1, X[:0]), (1, X.double()), (1, X[:, :2]), (0.5, X.tolist()),
                                          (0.5, "x")])
    axioms = choose(data.draw, [(5, ("A1", "A2", "A3", "A4")), (1, ("A1",))] + ([] if good else [
        (1, ()), (1, ("A5",)), (0.5, "A1")]))
    kw = dict(batch_size=numbers(data.draw, [7, 32, 200]) if not good else data.draw(st.sampled_from([7, 32, 200])),
              confidence=0.95 if good else choose(data.draw, [(4, 0.95), (1, 1.0), (1, 0.0), (1, float("nan"))]),
              device=choose(data.draw, [(5, None), (1, "cpu")] + ([] if good else [
                  (1, "gpu"), (1, "meta"), (0.5, "cuda:7"), (0.5, 1.5)])),
              max_counterexamples=data.draw(st.sampled_from([0, 5, 100])) if good else numbers(data.draw, [0, 5, 100]))
    stages = toy_stages() if good else choose(data.draw, [(5, toy_stages()), (1, []), (1, "stages"), (0.5, [None])])
    res = call(validate, Toy(), stages, x, axioms, progress=False, **kw)
    assert res is not None or not good
    if res is None:
        return
    for r in res.results:
        assert 0.0 <= r.epsilon <= 1.0 and 0 <= r.failures <= r.n and len(r.counterexamples) <= kw["max_counterexamples"]
