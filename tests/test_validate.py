"""semlens_fast.validate: the Clopper-Pearson bound, equivalences, the axioms A1-A4 on a model
whose mechanism is exact by construction, activation patching, ids, and bad input."""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hst
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from semlens_fast.errors import ArgumentError, ShapeError
from semlens_fast.validate import (
    AXIOMS,
    Stage,
    allclose,
    argmax,
    as_equivalence,
    clopper_pearson_lower,
    downstream,
    epsilon_bound,
    exact,
    hamming,
    rounded,
    unordered,
    validate,
)

# ---------------------------------------------------------------------- the bound


@pytest.mark.parametrize("n", [1, 2, 10, 59, 100, 1000, 12345])
@pytest.mark.parametrize("conf", [0.9, 0.95, 0.99])
def test_zero_failures_closed_form(n, conf):
    assert epsilon_bound(n, n, conf) == pytest.approx(1 - (1 - conf) ** (1 / n), rel=1e-12, abs=1e-15)
    # and the same from the beta quantile
    assert clopper_pearson_lower(n, n, conf) == pytest.approx(stats.beta.ppf(1 - conf, n, 1), rel=1e-9)


def test_rule_of_three_scale():
    # 0 failures out of 2000 at 95%: about 3/2000
    assert epsilon_bound(2000, 2000, 0.95) == pytest.approx(0.0014967, abs=1e-7)


@pytest.mark.parametrize("n,k", [(10, 3), (10, 9), (50, 25), (200, 137), (1000, 990), (7, 1), (2000, 1518)])
@pytest.mark.parametrize("conf", [0.9, 0.95, 0.99])
def test_matches_scipy_two_sided_exact(n, k, conf):
    # the one-sided bound at `conf` is the lower end of the two-sided exact interval at 2*conf-1
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=2 * conf - 1, method="exact")
    assert clopper_pearson_lower(k, n, conf) == pytest.approx(ci.low, rel=1e-9, abs=1e-12)
    # its defining property: Pr[Binom(n, p_lo) >= k] = 1 - conf
    p = clopper_pearson_lower(k, n, conf)
    assert stats.binom.sf(k - 1, n, p) == pytest.approx(1 - conf, rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(n=hst.integers(1, 5000), frac=hst.floats(0, 1), conf=hst.floats(0.55, 0.999))
def test_matches_scipy_property(n, frac, conf):
    k = int(round(frac * n))
    low = stats.binomtest(k, n).proportion_ci(confidence_level=2 * conf - 1, method="exact").low
    assert clopper_pearson_lower(k, n, conf) == pytest.approx(low, rel=1e-7, abs=1e-10)
    assert 0.0 <= epsilon_bound(k, n, conf) <= 1.0
    assert epsilon_bound(k, n, conf) >= (n - k) / n - 1e-12


def test_bound_edges_and_bad_args():
    assert epsilon_bound(0, 10) == 1.0
    assert epsilon_bound(0, 0) == 1.0
    assert epsilon_bound(5, 10, 0.99) > epsilon_bound(5, 10, 0.9)
    assert epsilon_bound(90, 100) > epsilon_bound(99, 100)
    for bad in [dict(successes=11, n=10), dict(successes=-1, n=10), dict(successes=1.5, n=10)]:
        with pytest.raises(ArgumentError, match="successes|n"):
            epsilon_bound(**bad)
    for c in [0, 1, 1.5, True]:
        with pytest.raises(ArgumentError, match="confidence"):
            epsilon_bound(5, 10, c)


# ---------------------------------------------------------------------- equivalences


def test_exact_rounded_hamming():
    a = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    b = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.04, 3.0], [0.0, 2.5, 3.0]])
    eq, d = exact().compare(a, b)
    assert eq.tolist() == [True, False, False] and d.tolist() == [0, 1, 2] and d.dtype == torch.int64
    assert rounded(1).compare(a, b)[0].tolist() == [True, True, False]
    assert rounded(2).compare(a, b)[0].tolist() == [True, False, False]
    eq, d = hamming(1).compare(a, b)
    assert eq.tolist() == [True, True, False] and d.tolist() == [0, 1, 2]
    assert hamming(1, decimals=1).compare(a, b)[1].tolist() == [0, 0, 2]
    assert hamming(2).compare(a, b)[0].tolist() == [True, True, True]
    with pytest.raises(ShapeError, match=r"same shape.*\(3, 3\).*\(3, 2\)"):
        exact().compare(a, b[:, :2])
    with pytest.raises(ArgumentError, match="m "):
        hamming(-1)


def test_unordered_multisets():
    a = torch.tensor([[1, 2, 3], [1, 1, 2], [5, 5, 5], [1, 2, 3]])
    b = torch.tensor([[3, 1, 2], [1, 2, 2], [5, 4, 3], [4, 5, 6]])
    eq, d = unordered().compare(a, b)
    assert eq.tolist() == [True, False, False, False]
    assert d.tolist() == [0, 1, 2, 3]
    # different sizes per sample; bools; NaN never matches
    eq, d = unordered().compare(torch.tensor([[1, 2]]), torch.tensor([[2, 1, 1]]))
    assert eq.tolist() == [False] and d.tolist() == [1]
    assert unordered().compare(torch.tensor([[True, False]]), torch.tensor([[False, True]]))[0].tolist() == [True]
    nan = float("nan")
    assert unordered().compare(torch.tensor([[nan, 1.0]]), torch.tensor([[1.0, nan]]))[0].tolist() == [False]
    assert unordered(decimals=1).compare(torch.tensor([[0.51, 1.0]]), torch.tensor([[1.0, 0.49]]))[0].tolist() == [True]


def test_unordered_matches_counter_on_random():
    from collections import Counter

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (200, 6), generator=g)
    b = torch.randint(0, 4, (200, 6), generator=g)
    eq, d = unordered().compare(a, b)
    for i in range(200):
        ca, cb = Counter(a[i].tolist()), Counter(b[i].tolist())
        inter = sum((ca & cb).values())
        assert d[i].item() == 6 - inter
        assert eq[i].item() == (ca == cb)


def test_downstream_argmax_allclose_and_names():
    a = torch.tensor([[1, 2], [3, 0], [1, 1]])
    b = torch.tensor([[2, 1], [1, 1], [0, 2]])
    eq, d = downstream(lambda s: s.sum(1, keepdim=True)).compare(a, b)
    assert eq.tolist() == [True, False, True] and d.tolist() == [0, 1, 0]
    with pytest.raises(ArgumentError, match="no downstream function"):
        downstream().compare(a, b)
    y = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    assert argmax().compare(y, torch.tensor([[0.0, 5.0], [0.0, 5.0]]))[0].tolist() == [True, False]
    with pytest.raises(ShapeError, match="argmax"):
        argmax().compare(torch.zeros(3), torch.zeros(3))
    eq, d = allclose(atol=1e-3).compare(y, y + torch.tensor([[1e-4, 0.0], [0.0, 1e-2]]))
    assert eq.tolist() == [True, False] and d.tolist() == [0, 1]
    assert type(as_equivalence("unordered")).__name__ == "Unordered"
    with pytest.raises(ArgumentError, match="exact"):
        as_equivalence("fuzzy")
    f = as_equivalence(lambda p, q: (p == q).all(1))
    assert f.compare(a, a)[0].tolist() == [True] * 3


# ---------------------------------------------------------------------- a model with an exact mechanism


class Scale(nn.Module):
    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, x):
        return x * self.k


class Shift(nn.Module):
    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x):
        return x + self.c


class Head(nn.Module):
    """logits [s - 14.5, 0] with s = row sum: class 0 iff s > 14.5."""

    def forward(self, x):
        s = x.sum(1, keepdim=True) - 14.5
        return torch.cat([s, torch.zeros_like(s)], 1)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.f1 = Scale(2.0)
        self.f2 = Shift(1.0)
        self.head = Head()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.head(self.f2(self.f1(x)))


X = torch.tensor(list(itertools.product(range(5), repeat=3)), dtype=torch.float32)  # 125 inputs


def wrong_h1(a):
    """2a, but 3 too much at position 0 where a0 == 3."""
    return a * 2 + 3.0 * (a[:, :1] == 3).float() * torch.tensor([[1.0, 0.0, 0.0]], device=a.device)


def toy_stages(h1=lambda a: a * 2, **kw):
    ident = lambda s: s  # noqa: E731
    return [
        Stage("double", None, "f1", h1, ident, ident, **kw),
        Stage("plus one", "f1", "f2", lambda a: a + 1, ident, ident),
        Stage("threshold", "f2", None, lambda a: (a.sum(1) < 14.5).long(), lambda y: y.argmax(1),
              lambda c: nn.functional.one_hot(c, 2).float()),
    ]


def test_correct_interpretation_all_axioms_hold():
    res = validate(Toy(), toy_stages(), X, batch_size=32, progress=False)
    assert [(r.stage_index, r.axiom) for r in res.results] == [(i, a) for i in range(3) for a in AXIOMS]
    eps0 = 1 - 0.05 ** (1 / 125)
    for r in res.results:
        assert (r.n, r.successes, r.counterexamples, r.histogram) == (125, 125, [], {0: 125})
        assert r.epsilon == pytest.approx(eps0, rel=1e-12)
    assert res.n == 125 and res.skipped == [] and res.max_epsilon == pytest.approx(eps0)
    assert res["double", "A3"].confusion == {}


def test_wrong_stage_counts_ids_and_patching_match_reference():
    model = Toy()
    res = validate(model, toy_stages(wrong_h1), X, batch_size=16, progress=False, max_counterexamples=1000)
    bad = torch.nonzero(X[:, 0] == 3).flatten().tolist()
    # A1/A2 at the wrong stage fail exactly where a0 == 3, one abstract position off
    for ax in ("A1", "A2"):
        r = res["double", ax]
        assert r.counterexamples == bad and r.histogram == {0: 125 - len(bad), 1: len(bad)}
    # the error propagates along the prefix (A1) but stage 2 itself is right (A2)
    assert res["plus one", "A1"].counterexamples == bad
    assert res["plus one", "A2"].failures == 0
    # replaceability: reference = the rest of the model run by hand on the patched state
    with torch.no_grad():
        y = model(X).argmax(1)
        y_patched = model.head(model.f2(wrong_h1(X))).argmax(1)
    flips = torch.nonzero(y != y_patched).flatten().tolist()
    assert 0 < len(flips) < len(bad)
    for stage in ("double", "plus one", "threshold"):
        assert res[stage, "A3"].counterexamples == flips
    assert res["double", "A4"].counterexamples == flips  # stage 0: A4 == A3
    assert res["plus one", "A4"].failures == 0 and res["threshold", "A4"].failures == 0
    conf = res["double", "A3"].confusion
    assert sum(conf.values()) == len(flips) and set(conf) <= {(0, 1), (1, 0)}
    # epsilons against scipy (two-sided exact at 90% = one-sided 95%)
    for r in res.results:
        low = stats.binomtest(r.successes, r.n).proportion_ci(0.90, method="exact").low
        assert r.epsilon == pytest.approx(1 - low, rel=1e-9)


def test_one_concrete_pass_plus_patched_runs():
    model = Toy()
    validate(model, toy_stages(), X, batch_size=125, progress=False)
    # 1 cached pass + stage 0 (A3 == A4 share a run) + stage 1 (A3, A4) + stage 2 (ends at output: none)
    assert model.calls == 1 + 1 + 2
    model.calls = 0
    validate(model, toy_stages(), X, axioms=("A1", "A2"), batch_size=50, progress=False)
    assert model.calls == 3  # one pass per batch, nothing patched


def test_batching_and_data_forms_agree_and_ids_are_dataset_indices():
    ref = validate(Toy(), toy_stages(wrong_h1), X, batch_size=125, progress=False, max_counterexamples=1000)
    key = lambda r: [(x.stage, x.axiom, x.successes, sorted(x.counterexamples), x.histogram) for x in r.results]  # noqa: E731
    ds = TensorDataset(X, torch.zeros(125))
    loader = DataLoader(ds, batch_size=9, shuffle=True, generator=torch.Generator().manual_seed(3))
    batches = [X[i : i + 40] for i in range(0, 125, 40)]
    for data, bs in [(X, 7), (ds, 11), (loader, 0), (batches, 0)]:
        res = validate(Toy(), toy_stages(wrong_h1), data, batch_size=bs or 64, progress=False, max_counterexamples=1000)
        assert key(res) == key(ref)
    res = validate(Toy(), toy_stages(wrong_h1), X, batch_size=7, progress=False, max_counterexamples=3)
    assert res["double", "A1"].counterexamples == ref["double", "A1"].counterexamples[:3]
    assert res["double", "A1"].failures == ref["double", "A1"].failures


def test_recorded_state_survives_inplace_ops_and_modes_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3), nn.Dropout(0.5))
    model.train()
    x = torch.randn(64, 4)
    lin = model[0]
    with torch.no_grad():
        ref = lin(x)
    assert (ref < 0).any()
    ident = lambda s: s  # noqa: E731
    stages = [
        Stage("lin", None, "0", lambda a: lin(a), ident, ident, equiv=allclose(atol=1e-6)),
        Stage("rest", "0", None, None, lambda y: y.argmax(1)),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = validate(model, stages, x, progress=False)
    assert res["lin", "A1"].failures == 0  # the pre-ReLU state was copied before the in-place ReLU
    assert res["lin", "A3"].failures == 0  # dropout off: eval mode during validation
    assert model.training and model[3].training  # modes restored
    assert any("h is None" in s for s in res.skipped) and any("no gamma" in s for s in res.skipped)
    assert not model[0]._forward_hooks  # hooks removed


def test_downstream_equivalence_binds_rest_of_abstract_model():
    # stage 1 claims a permutation of the state: wrong position-wise, right downstream (the head sums)
    perm = lambda a: (a * 2)[:, [2, 0, 1]]  # noqa: E731
    exact_res = validate(Toy(), toy_stages(perm), X, axioms=("A1",), progress=False)
    down_res = validate(Toy(), toy_stages(perm, equiv="downstream"), X, axioms=("A1",), progress=False)
    unord_res = validate(Toy(), toy_stages(perm, equiv=unordered()), X, axioms=("A1",), progress=False)
    assert exact_res["double", "A1"].failures > 0
    assert down_res["double", "A1"].failures == 0
    assert unord_res["double", "A1"].failures == 0
    assert down_res["double", "A1"].histogram == {0: 125}


def test_gamma_only_replaceability_with_opaque_stage():
    # an opaque first stage whose gamma zeroes position 2 of the state: replaceability fails exactly
    # where dropping 2*x2 changes the decision
    ident = lambda s: s  # noqa: E731
    stages = [Stage("drop x2", None, "f1", None, ident, lambda a: a * torch.tensor([1.0, 1.0, 0.0]))]
    model = Toy()
    res = validate(model, stages, X, progress=False, max_counterexamples=500)
    with torch.no_grad():
        ref = model(X).argmax(1) != model.head(model.f2(model.f1(X) * torch.tensor([1.0, 1.0, 0.0]))).argmax(1)
    assert res["drop x2", "A3"].counterexamples == torch.nonzero(ref).flatten().tolist()
    assert [r.axiom for r in res.results] == ["A3", "A4"]


def test_partial_interpretation_from_a_hidden_boundary():
    # the interpretation covers f1 -> output only; alpha0 abstracts the state at f1
    st = toy_stages()[1:]
    res = validate(Toy(), st, X, alpha0=lambda s: s, progress=False)
    assert [r.failures for r in res.results] == [0] * 8 and res.n == 125
    st[0].h = lambda a: a + 2  # wrong offset: every sample, every position is off
    res = validate(Toy(), st, X, axioms=("A2",), progress=False)
    assert res["plus one", "A2"].histogram == {3: 125}


class DictModel(nn.Module):
    """model(x=..., mask=...) -> (logits, extra): a mapping batch and a tuple output."""

    def __init__(self):
        super().__init__()
        self.toy = Toy()

    def forward(self, x, mask):
        return self.toy(x * mask), {"unused": x}


class DictData(torch.utils.data.Dataset):
    def __len__(self):
        return 125

    def __getitem__(self, i):
        return {"x": X[i], "mask": torch.ones(3)}


def test_mapping_batches_tuple_outputs_and_inputs_fn():
    st = toy_stages(wrong_h1)
    st[0].start = None
    st = [Stage(s.name, s.start.replace("f", "toy.f") if s.start else None,
                s.end.replace("f", "toy.f") if s.end else None, s.h, s.alpha, s.gamma) for s in st]
    res = validate(DictModel(), st, DictData(), inputs=lambda b: b["x"], batch_size=10, progress=False, max_counterexamples=500)
    ref = validate(Toy(), toy_stages(wrong_h1), X, progress=False, max_counterexamples=500)
    assert [(r.axiom, r.counterexamples) for r in res.results] == [(r.axiom, r.counterexamples) for r in ref.results]
    with pytest.raises(ArgumentError, match="give inputs=fn"):
        validate(DictModel(), st, DictData(), progress=False)


# ---------------------------------------------------------------------- bad input


def test_gamma_of_wrong_shape_names_stage():
    st = toy_stages()
    st[1].gamma = lambda a: a[:, :2]
    with pytest.raises(ShapeError, match=r"stage 1 'plus one', A3: gamma returned shape \(\d+, 2\).*'f2'.*\(\d+, 3\)"):
        validate(Toy(), st, X, progress=False)


def test_stages_that_do_not_chain():
    st = toy_stages()
    st[1].start = "f2"
    st[1].end = "head"
    with pytest.raises(ArgumentError, match=r"do not chain: stage 1 'plus one' starts at 'f2' but stage 0 'double' ends at 'f1'"):
        validate(Toy(), st, X, progress=False)
    st = toy_stages()
    st[0].end = None
    st[1].start = "<output>"
    with pytest.raises(ArgumentError, match="stage 1 'plus one': start is '<output>'; a stage cannot begin at the model output"):
        validate(Toy(), st, X, progress=False)


def test_equivalence_not_vectorised():
    st = toy_stages(equiv=lambda a, b: bool((a == b).all()))
    with pytest.raises(ShapeError, match=r"stage 0 'double', A1: .*not vectorised.*\[B\] bool.*B = 125.*bool True"):
        validate(Toy(), st, X, batch_size=125, progress=False)
    st = toy_stages(equiv=lambda a, b: a == b)  # [B, 3]: per position, not per sample
    with pytest.raises(ShapeError, match=r"stage 0 'double'.*shape \(125, 3\)"):
        validate(Toy(), st, X, batch_size=125, progress=False)
    class Bad(exact().__class__):
        def compare(self, a, b):
            return (a == b).all(1)  # not the (equal, distance) pair

    with pytest.raises(ShapeError, match=r"^stage 0 'double', A1: the equivalence's compare\(\) must return \(equal \[B\] bool"):
        validate(Toy(), toy_stages(equiv=Bad()), X, progress=False)
    st = toy_stages()
    with pytest.raises(ShapeError, match=r"stage 0 'double', A3 \(output_equiv\).*not vectorised"):
        validate(Toy(), st, X, output_equiv=lambda y, z: True, progress=False)


def test_other_bad_input():
    with pytest.raises(ArgumentError, match=r"stage 0 'double': end: 'f3' is not a module.*closest: 'f2', 'f1'"):
        st = toy_stages()
        st[0].end = "f3"
        validate(Toy(), st, X, progress=False)
    st = toy_stages()
    st[0].alpha = lambda s: s.sum()  # drops the batch dimension
    with pytest.raises(ShapeError, match=r"stage 0 'double': alpha must return a tensor with the batch"):
        validate(Toy(), st, X, progress=False)
    ident = lambda s: s  # noqa: E731
    backwards = [Stage("a", None, "f2", None, ident), Stage("b", "f2", "f1", None, ident), Stage("c", "f1", None, None, ident)]
    with pytest.raises(ArgumentError, match=r"stage 1 'b': boundary 'f1' \(end\) runs before 'f2'"):
        validate(Toy(), backwards, X, axioms=("A1",), progress=False)
    shared = nn.Linear(3, 3)
    twice = nn.Sequential(shared, nn.ReLU(), shared)
    with pytest.raises(ArgumentError, match="stage 0 's': boundary '0' was called 2 times"):
        validate(twice, [Stage("s", None, "0", lambda a: a, ident, ident)], X, progress=False)
    tup = nn.ModuleDict({"lstm": nn.LSTM(3, 2, batch_first=True)})
    tup.forward = lambda x: tup["lstm"](x[:, None])[0][:, 0]
    with pytest.raises(ArgumentError, match=r"stage 0 's': boundary 'lstm': the module returns tuple, expected a tensor"):
        validate(tup, [Stage("s", None, "lstm", lambda a: a, ident, ident)], X, progress=False)
    with pytest.raises(ArgumentError, match="axioms"):
        validate(Toy(), toy_stages(), X, axioms=("A5",), progress=False)
    with pytest.raises(ArgumentError, match="confidence"):
        validate(Toy(), toy_stages(), X, confidence=95, progress=False)
    with pytest.raises(ArgumentError, match=r"stages\[1\] must be a Stage"):
        validate(Toy(), [toy_stages()[0], "f2"], X, progress=False)
    with pytest.raises(ArgumentError, match="stage 0 'double': h must be a callable"):
        st = toy_stages()
        st[0].h = "2x"
        validate(Toy(), st, X, progress=False)


def test_missing_gamma_warns_and_skips():
    st = toy_stages()
    st[1].gamma = None
    with pytest.warns(UserWarning, match="stage 1 'plus one': no gamma .* A3, A4 not tested"):
        res = validate(Toy(), st, X, progress=False)
    assert {r.axiom for r in res.results if r.stage == "plus one"} == {"A1", "A2"}
    assert len(res.skipped) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    cpu = validate(Toy(), toy_stages(wrong_h1), X, progress=False)
    gpu = validate(Toy().cuda(), toy_stages(wrong_h1), X, device="cuda", progress=False)
    assert [r.successes for r in cpu.results] == [r.successes for r in gpu.results]


# ---------------------------------------------------------------------- empty data, NaN, rest=, validate_many


@pytest.mark.parametrize("data", [X[:0], TensorDataset(X[:0]), [], DataLoader(TensorDataset(X[:0]), batch_size=4)])
def test_empty_data_is_an_error_not_epsilon_one(data):
    with pytest.raises(ArgumentError, match=r"data is empty.*nothing to validate"):
        validate(Toy(), toy_stages(), data, progress=False)


def test_nan_inputs_and_outputs_are_failures_not_successes():
    x = X.clone()
    x[[3, 50, 77], 1] = float("nan")  # NaN inputs: the toy model's output is NaN there too
    with pytest.warns(UserWarning, match=r"3 of 125 samples have NaN"):
        res = validate(Toy(), toy_stages(), x, batch_size=32, progress=False)
    for r in res.results:
        assert r.failures == 3 and r.counterexamples == [3, 50, 77], (r.stage, r.axiom)
        assert r.histogram == {-1: 3, 0: 122}
    # NaN in an abstract state only (h claims NaN on some samples): those fail A1/A2, nothing else
    def h_nan(a):
        out = a * 2
        out[a[:, 0] == 4, 0] = float("nan")
        return out

    res = validate(Toy(), toy_stages(h_nan, equiv=allclose()), X, axioms=("A1", "A2"), progress=False,
                   max_counterexamples=1000)
    bad = torch.nonzero(X[:, 0] == 4).flatten().tolist()
    assert res["double", "A1"].counterexamples == bad and res["double", "A1"].histogram == {-1: 25, 0: 100}
    # a model that maps a NaN input to a finite decision still fails (the input is NaN)
    class Clean(nn.Module):
        def __init__(self):
            super().__init__()
            self.f1 = nn.Identity()

        def forward(self, x):
            return torch.nan_to_num(self.f1(x)) @ torch.eye(3)

    ident = lambda s: s  # noqa: E731
    with pytest.warns(UserWarning, match="1 of 125"):
        res = validate(Clean(), [Stage("id", None, "f1", ident, ident, ident)], x[:125].clone().index_fill_(0, torch.tensor([50, 77]), 0.0),
                       progress=False)
    assert all(r.counterexamples == [3] for r in res.results)


def test_rest_shortcut_matches_patched_run_and_skips_it():
    model = Toy()
    ref = validate(model, toy_stages(wrong_h1), X, batch_size=125, progress=False, max_counterexamples=1000)
    st = toy_stages(wrong_h1)
    st[0].rest = lambda s: model.head(model.f2(s))
    st[1].rest = lambda s: model.head(s)
    model.calls = 0
    res = validate(model, st, X, batch_size=125, progress=False, max_counterexamples=1000)
    assert model.calls == 1  # only the cached pass; both patched runs replaced by rest
    assert [(r.axiom, r.successes, r.counterexamples, r.histogram) for r in res.results] == \
        [(r.axiom, r.successes, r.counterexamples, r.histogram) for r in ref.results]
    st[1].rest = lambda s: model.head(s + 100.0)  # not the rest of the model
    with pytest.raises(ArgumentError, match=r"stage 1 'plus one': rest\(state at 'f2'\) does not reproduce the model"):
        validate(model, st, X, progress=False)
    st[1].rest = lambda s: model.head(s)[:, :1]
    with pytest.raises(ShapeError, match=r"stage 1 'plus one': rest returned shape \(64, 1\)"):
        validate(model, st, X, progress=False)


def test_validate_many_shares_the_cached_pass():
    from semlens_fast.validate import Interpretation, validate_many

    model = Toy()
    a = validate(model, toy_stages(), X, progress=False)
    b = validate(model, toy_stages(wrong_h1), X, axioms=("A1", "A2"), progress=False)
    model.calls = 0
    res = validate_many(model, {"right": toy_stages(), "wrong": Interpretation(toy_stages(wrong_h1), axioms=("A1", "A2"))},
                        X, batch_size=125, progress=False)
    assert model.calls == 1 + 3  # one shared pass + the right interpretation's patched runs
    key = lambda r: [(x.stage, x.axiom, x.successes, x.counterexamples, x.histogram) for x in r.results]  # noqa: E731
    assert key(res["right"]) == key(a) and key(res["wrong"]) == key(b)
    st = toy_stages()
    st[1].start, st[1].end = "f2", "head"
    with pytest.raises(ArgumentError, match=r"do not chain: interpretation 'bad', stage 1 'plus one' starts at 'f2'"):
        validate_many(model, {"ok": toy_stages(), "bad": st}, X, progress=False)
    with pytest.raises(ArgumentError, match="non-empty mapping"):
        validate_many(model, {}, X)


@pytest.mark.parametrize("device, words", [("gpu", "is not a device"), ("", "is not a device"),
                                           ("meta", "meta tensors hold no data"), (3.5, "device string"),
                                           pytest.param("cuda", "CUDA is not available", marks=pytest.mark.skipif(
                                               torch.cuda.is_available(), reason="this machine has CUDA"))])
def test_bad_devices_are_library_errors(device, words):
    from semlens_fast.errors import DeviceError

    with pytest.raises(DeviceError, match=words):
        validate(Toy(), toy_stages(), X, device=device, progress=False)
