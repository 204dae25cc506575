"""Scores: against plain reimplementations, against semanticlens==0.2.1 where the formula is the same,
and known answers on synthetic data (planted single concepts, two-concept mixtures, duplicates)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semlens_fast import scores
from semlens_fast.errors import ArgumentError, DTypeError, ShapeError

sl_scores = pytest.importorskip("semanticlens.scores")


def unit(x):
    return F.normalize(x, dim=-1)


def mixtures(C=24, k=20, d=32, noise=0.05, seed=0):
    """Even components: two concepts 10/10; odd: one concept. Returns unit examples [C, k, d]."""
    g = torch.Generator().manual_seed(seed)
    a, b = unit(torch.randn(C, d, generator=g)), unit(torch.randn(C, d, generator=g))
    V = torch.empty(C, k, d)
    for c in range(C):
        n1 = k // 2 if c % 2 == 0 else k
        V[c, :n1] = a[c] + noise * torch.randn(n1, d, generator=g)
        V[c, n1:] = b[c] + noise * torch.randn(k - n1, d, generator=g)
    return unit(V)


# ---------------------------------------------------------------------- clarity


def plain_clarity(V, valid):
    out = []
    for v, w in zip(V, valid):
        u = unit(v[w].double())
        n = len(u)
        if n < 2:
            out.append(float("nan"))
            continue
        out.append(sum(float(u[i] @ u[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1)))
    return torch.tensor(out, dtype=torch.float64)


def test_clarity_matches_plain_and_semanticlens():
    g = torch.Generator().manual_seed(1)
    V = torch.randn(9, 7, 5, generator=g)
    valid = torch.ones(9, 7, dtype=torch.bool)
    ours = scores.clarity(V, chunk=4)
    torch.testing.assert_close(ours.double(), plain_clarity(V, valid), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours, sl_scores.clarity_score(V).float(), atol=1e-5, rtol=0)


def test_clarity_masks_empty_slots_and_known_answers():
    g = torch.Generator().manual_seed(2)
    V = torch.randn(4, 6, 8, generator=g)
    V[0, 4:] = 0  # empty slots (default mask: non-zero)
    V[1, 1:] = 0  # a single example -> NaN
    V[2] = V[2, :1]  # identical examples -> clarity 1
    valid = (V != 0).any(-1)
    ours = scores.clarity(V)
    ref = plain_clarity(V, valid)
    assert math.isnan(float(ours[1])) and math.isnan(float(ref[1]))
    torch.testing.assert_close(ours[[0, 3]].double(), ref[[0, 3]], atol=1e-6, rtol=0)
    assert abs(float(ours[2]) - 1) < 1e-6
    # explicit mask equals the implicit one
    torch.testing.assert_close(scores.clarity(V, valid), ours, equal_nan=True)
    # fp16 storage (as in the ConceptDB) is accepted
    torch.testing.assert_close(scores.clarity(V.half()), ours, atol=2e-3, rtol=0, equal_nan=True)


# ---------------------------------------------------------------------- k-means / polysemanticity


def test_kmeans_matches_sklearn_inertia_and_mixtures_separate():
    from sklearn.cluster import KMeans

    V = mixtures(C=12)
    res = scores.kmeans(V, n_init=10, seed=0)
    for c in range(12):
        sk = KMeans(2, n_init=10, random_state=0).fit(V[c].double().numpy())
        # both are local optima of the same objective; ours never much worse
        assert float(res.inertia[c]) <= sk.inertia_ * 1.05 + 1e-9
        if c % 2 == 0:  # two planted concepts: exactly the planted split
            lab = res.labels[c].numpy()
            assert len(set(lab[:10])) == 1 and len(set(lab[10:])) == 1 and lab[0] != lab[10]
            assert abs(float(res.inertia[c]) - sk.inertia_) < 1e-6 * max(1.0, sk.inertia_)
    # centres from the weights are the cluster means
    cen = res.centers(V)
    lab0 = res.labels[0]
    torch.testing.assert_close(cen[0, lab0[0]], V[0, lab0 == lab0[0]].double().mean(0))


def test_polysemanticity_matches_semanticlens_on_clear_clusterings():
    V = mixtures(C=16)
    ours = scores.polysemanticity(V)
    ref = sl_scores.polysemanticity_score(V).float()
    even = torch.arange(0, 16, 2)
    torch.testing.assert_close(ours[even], ref[even], atol=1e-4, rtol=0)
    # known answers: mixtures of two random concepts score ~1 (random directions), single concepts ~0
    assert float(ours[even].min()) > 0.6
    assert float(ours[1::2].max()) < 0.1


def test_polysemanticity_plain_formula_and_fallback():
    """1 - cos(c1, c2) from the k-means labels; the fallback when a cluster has < 2 members."""
    V = mixtures(C=6)
    V[5, 1:] = V[5, 1:2]  # one outlier + 19 identical -> clusters of 1 and 19: fallback
    res = scores.kmeans(V)
    ours = scores.polysemanticity(V)
    for c in range(6):
        u = V[c].double()
        lab = res.labels[c]
        sizes = torch.bincount(lab, minlength=2)
        if int(sizes.min()) >= 2:
            c1, c2 = u[lab == 0].mean(0), u[lab == 1].mean(0)
            want = 1 - float(F.cosine_similarity(c1, c2, dim=0))
        else:
            m = u.mean(0)
            want = 1 - float(np.mean([float(F.cosine_similarity(m, u[i], dim=0)) for i in range(10)]))
        assert abs(float(ours[c]) - want) < 1e-5, c
    assert int(torch.bincount(res.labels[5]).min()) < 2
    # semanticlens' fallback gives the same number on this component
    ref = sl_scores.polysemanticity_score(V[5:6]).float()
    assert abs(float(ours[5]) - float(ref[0])) < 1e-4


def test_polysemanticity_deterministic_chunk_independent_and_seeded():
    V = mixtures(C=20, noise=0.3, seed=3)
    p = scores.polysemanticity(V, seed=7)
    assert torch.equal(p, scores.polysemanticity(V, seed=7))
    assert torch.equal(p, scores.polysemanticity(V, seed=7, chunk=3))
    # component order / batching does not change a component's result
    assert torch.equal(p[4:9], scores.polysemanticity(torch.cat([V[:4], V[4:9]]), seed=7)[4:9])


def test_polysemanticity_masks_and_nan():
    V = mixtures(C=4)
    V[0, 15:] = 0  # 15 valid examples
    V[1, 1:] = 0  # one valid example -> NaN
    p = scores.polysemanticity(V)
    assert math.isnan(float(p[1]))
    # masked component equals the same component without the empty slots
    q = scores.polysemanticity(V[0:1, :15])
    assert abs(float(p[0]) - float(q[0])) < 1e-6


def test_polysemanticity_more_clusters():
    V = mixtures(C=4)
    p3 = scores.polysemanticity(V, n_clusters=3)
    assert p3.shape == (4,) and torch.isfinite(p3).all()


# ---------------------------------------------------------------------- redundancy


def test_redundancy_matches_plain_and_semanticlens_and_duplicates():
    g = torch.Generator().manual_seed(4)
    E = torch.randn(50, 16, generator=g)
    E[7] = E[3] * 2.0  # duplicated component (any norm)
    r = scores.redundancy(E)
    sims = unit(E.double()) @ unit(E.double()).T
    sims.fill_diagonal_(-math.inf)
    torch.testing.assert_close(r.per_component.double(), sims.max(1).values, atol=1e-6, rtol=0)
    assert r.partner[7] == 3 and r.partner[3] == 7
    assert abs(float(r.per_component[7]) - 1) < 1e-6
    assert abs(r.layer - float(sl_scores.redundancy_score(E))) < 1e-5


def test_redundancy_excludes_empty_components():
    g = torch.Generator().manual_seed(5)
    E = torch.randn(10, 8, generator=g)
    E[2] = 0
    r = scores.redundancy(E)
    assert math.isnan(float(r.per_component[2])) and int(r.partner[2]) == -1
    assert int((r.partner == 2).sum()) == 0
    keep = torch.arange(10) != 2
    r2 = scores.redundancy(E[keep])
    torch.testing.assert_close(r.per_component[keep], r2.per_component)
    assert abs(r.layer - r2.layer) < 1e-7
    assert math.isnan(scores.redundancy(E[:1]).layer)


# ---------------------------------------------------------------------- similarity


def test_similarity_fixes_semanticlens_shape_bugs():
    g = torch.Generator().manual_seed(6)
    d = 8
    q = torch.randn(3, d, generator=g)
    db = torch.randn(d, d, generator=g)  # as many components as embedding dimensions
    want = unit(q) @ unit(db).T
    torch.testing.assert_close(scores.similarity(q, db), want)
    buggy = sl_scores.similarity_score(q, db)  # contracts the component axis with the embedding axis
    assert not torch.allclose(buggy, want, atol=1e-3)
    same = torch.randn(3, d, generator=g)  # same shape: semanticlens returns 3 paired cosines, not 3x3
    assert scores.similarity(q, same).shape == (3, 3)
    assert sl_scores.similarity_score(q, same).shape == (3,)
    torch.testing.assert_close(scores.similarity(q, same, rowwise=True), sl_scores.similarity_score(q, same))
    assert scores.similarity(q[0], db).shape == (d,)
    # where semanticlens is right, both agree
    db2 = torch.randn(5, d, generator=g)
    torch.testing.assert_close(scores.similarity(q, db2), sl_scores.similarity_score(q, db2))


def test_bad_inputs():
    with pytest.raises(ShapeError, match="examples must be"):
        scores.clarity(torch.zeros(3, 4))
    with pytest.raises(DTypeError, match="examples"):
        scores.polysemanticity(torch.zeros(3, 4, 5, dtype=torch.int64))
    with pytest.raises(ArgumentError, match="n_clusters"):
        scores.polysemanticity(torch.randn(3, 4, 5), n_clusters=1)
    with pytest.raises(ShapeError, match="valid"):
        scores.clarity(torch.randn(3, 4, 5), torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ShapeError, match="last axis"):
        scores.similarity(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ArgumentError, match="pairwise_topk"):
        scores.similarity(torch.randn(100, 4), torch.randn(100, 4), max_elements=1000)
    with pytest.raises(ShapeError, match="embeddings"):
        scores.redundancy(torch.randn(3, 4, 5))
