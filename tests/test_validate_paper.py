"""The axiomatic-validation paper's case studies: the transformer, the 2-SAT data, the pieces of
both interpretations, and the comparison table. (The runs on the packaged models and the
reduced trainings are in tests/test_validate_paper_runs.py.)"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from semlens_fast.validate import epsilon_bound
from semlens_fast.validate.paper import two_sat as ts
from semlens_fast.validate.paper.compare import Row, paper_failures
from semlens_fast.validate.paper.modular_addition import _affine_lstsq, dataset, fourier_norms, key_frequencies, make_model
from semlens_fast.validate.paper.transformer import Transformer
from semlens_fast.validate.paper.two_sat_data import (
    SEQ_LEN,
    TOK,
    assignment_names,
    balanced_formulas,
    encode,
    random_literals,
    truth_tables,
)


def test_last_position_readout_is_the_full_transformer():
    torch.manual_seed(0)
    for heads in ([4], [1, 4], [2, 2, 4]):
        m = Transformer(16, 41, 32, heads, 64).eval()
        x = torch.randint(0, 16, (7, 41))
        with torch.no_grad():
            full = m.forward_all(x)[:, -1]
            assert torch.allclose(m(x), full, atol=1e-5)
            assert torch.allclose(m.from_embed(m.embed(x)), full, atol=1e-5)
            # the state after block 0, and the packed state of the final block, reproduce the output
            got = {}
            hs = [m.blocks[0].register_forward_hook(lambda mod, a, o: got.setdefault("b0", o)),
                  m.blocks[-1].mid.register_forward_hook(lambda mod, a, o: got.setdefault("mid", o))]
            m(x)
            for h in hs:
                h.remove()
            assert got["mid"].shape == (7, 1, 32 + 64)
            assert torch.allclose(m.tail(got["mid"]), full, atol=1e-5)
            if len(heads) > 1:
                assert got["b0"].shape == (7, 41, 32)
                assert torch.allclose(m.from_block(got["b0"], 1), full, atol=1e-5)


def _sat_by_hand(clauses, n_vars=5):
    rows = []
    for a in range(2**n_vars):
        val = [(a >> (n_vars - 1 - v)) & 1 for v in range(n_vars)]
        ok = all(any((val[lit % n_vars] == 1) != (lit >= n_vars) for lit in cl) for cl in clauses)
        rows.append(ok)
    return rows


def test_truth_tables_match_brute_force_in_numpy_and_torch():
    rng = np.random.default_rng(0)
    lits = random_literals(300, rng)
    assert ((lits[..., 0] % 5) < (lits[..., 1] % 5)).all()  # two distinct variables, lower first
    tt = truth_tables(lits)
    for i in range(0, 300, 7):
        assert tt[i].tolist() == _sat_by_hand(lits[i].tolist())
    assert np.array_equal(ts.truth_tables_torch(torch.as_tensor(lits)).numpy(), tt)
    # the truth table is symmetric in the order of a clause's literals
    assert np.array_equal(truth_tables(lits[..., ::-1]), tt)
    assert assignment_names()[0b10000] == "phi[TFFFF]" and assignment_names()[0] == "phi[FFFFF]"
    # an unsatisfiable one: (x0 v x1)(x0 v ~x1)(~x0 v x1)(~x0 v ~x1) and six copies of the first
    unsat = np.array([[[0, 1], [0, 6], [5, 1], [5, 6]] + [[0, 1]] * 6])
    assert not truth_tables(unsat).any()


def test_balanced_formulas_format_balance_duplicates_and_exclusion():
    toks, lits = balanced_formulas(501, seed=3)
    assert toks.shape == (501, SEQ_LEN + 1) and lits.shape == (501, 10, 2)
    assert (toks[:, -1] == TOK["s"]).sum() == 251 and (toks[:, -1] == TOK["u"]).sum() == 250
    assert (toks[:, 0:40:4] == TOK["("]).all() and (toks[:, 3:40:4] == TOK[")"]).all() and (toks[:, 40] == TOK[":"]).all()
    assert np.array_equal(toks, encode(lits, truth_tables(lits).any(1)))
    assert len({r.tobytes() for r in toks}) == 501
    again, _ = balanced_formulas(501, seed=3)
    assert np.array_equal(again, toks)  # deterministic in the seed
    other, _ = balanced_formulas(300, seed=4, exclude=toks[:, :-1])
    assert not ({r[:-1].tobytes() for r in other} & {r[:-1].tobytes() for r in toks})


def test_unordered_clause_equivalence():
    a = torch.tensor([[[0, 1], [2, 7]], [[3, 4], [5, 6]]])
    b = torch.tensor([[[1, 0], [2, 7]], [[3, 4], [6, 9]]])
    eq, d = ts.SortedPairs().compare(a, b)
    assert eq.tolist() == [True, False] and d.tolist() == [0, 1]
    eq, d = ts.SortedPairs().compare(a, a.flip(-1))
    assert eq.all() and (d == 0).all()


def test_decision_trees_in_torch_match_sklearn():
    from sklearn.tree import DecisionTreeClassifier

    rng = np.random.default_rng(1)
    tt = truth_tables(random_literals(3000, rng))
    targets = [tt[:, 3] & ~tt[:, 7], tt[:, 0] | tt[:, 9] | tt[:, 20], np.zeros(3000, bool), tt[:, 5] ^ tt[:, 6]]
    trees = [DecisionTreeClassifier(max_leaf_nodes=k, random_state=0).fit(tt, y) for k, y in zip([4, 4, 2, 16], targets)]
    got = ts._Trees(trees, torch.device("cpu"))(torch.as_tensor(tt))
    for j, t in enumerate(trees):
        assert np.array_equal(got[:, j].numpy(), t.predict(tt).astype(bool))


def test_paper_failures_inverts_the_bound():
    for n, k in [(80_001, 0), (80_001, 1234), (8939, 0), (8939, 8939), (100, 37)]:
        assert paper_failures(epsilon_bound(n - k, n), n) == k
    assert paper_failures(0.849527334310142, 80_001) is not None
    assert paper_failures(3.744548424300387e-05, 80_001) == 0
    r = Row("c", "A1", "exact", 100, 0, epsilon_bound(100, 100), epsilon_bound(8939, 8939), 8939, 0)
    assert r.agrees  # no failure in either: the same outcome, even though n differs
    r = Row("c", "A1", "exact", 1000, 300, 0.33, epsilon_bound(8939 - 10, 8939), 8939, 10)
    assert r.agrees is False


def test_affine_least_squares_is_the_minimum_norm_solution():
    torch.manual_seed(0)
    for n, d in [(113, 128), (400, 30)]:
        x = torch.randn(n, d, dtype=torch.float64)
        x[:, :3] = 0  # rank deficient (dead units)
        y = torch.randn(n, 4, dtype=torch.float64)
        w, b = _affine_lstsq(x, y)
        a = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
        assert torch.allclose(torch.cat([w, b[None]]), torch.linalg.pinv(a) @ y, atol=1e-9)
    x = torch.randn(113, 128, dtype=torch.float64)
    w, b = _affine_lstsq(x, y[:113])
    assert torch.allclose(x @ w + b, y[:113], atol=1e-9)  # under-determined: interpolates


def test_modular_addition_split_and_key_frequencies_of_a_planted_embedding():
    d = dataset(113, 0.3, 0)
    assert len(d.train) == 3830 and len(d.test) == 8939  # the paper's test set size
    assert not set(d.train.tolist()) & set(d.test.tolist())
    assert torch.equal(d.y, (d.x[:, 0] + d.x[:, 1]) % 113) and (d.x[:, 2] == 113).all()
    m = make_model(113, d_model=32, d_mlp=64)
    with torch.no_grad():  # an embedding that lives on frequencies 14, 35 and 41 (+ small noise)
        a = torch.arange(113, dtype=torch.float64)[:, None]
        feats = torch.cat([torch.cos(2 * np.pi * k * a / 113) for k in (14, 35, 41)]
                          + [torch.sin(2 * np.pi * k * a / 113) for k in (14, 35, 41)], 1)
        w = torch.randn(6, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        m.embed.weight[:113] = (feats @ w + 1e-3 * torch.randn(113, 32, dtype=torch.float64)).float()
    assert key_frequencies(m, 113) == [14, 35, 41]
    assert fourier_norms(m, 113).shape == (56,)
