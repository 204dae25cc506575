"""Lens known answers on the Fashion-MNIST images with the Aligned (MobileNetV2 -> MiniLM) foundation model.

Components are planted from held-out images: component c <- k images of class c (pure),
plus two-class mixtures; the right labels and the ordering of the scores are known.
"""
from __future__ import annotations

import pytest
import torch

from semlens_fast.concepts import build_concept_db
from semlens_fast.lens import Lens
from tests.helpers_collect import CACHE
from tests.test_concepts_shared import HELDOUT, aligned, cached_embeddings, fashion, make_store

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def env():
    ds, al = fashion(), aligned()
    labels = ds.labels[HELDOUT]
    k = 6
    pure = torch.stack([HELDOUT[labels == c][:k] for c in range(10)])
    mix = torch.stack([torch.cat([HELDOUT[labels == a][k : k + 3], HELDOUT[labels == b][k : k + 3]])
                       for a, b in ((1, 8), (5, 9), (0, 3))])  # trouser+bag, sandal+boot, tshirt+dress
    ids = torch.cat([pure, mix])
    cached_embeddings(al, ds.images, ids.flatten())
    db = build_concept_db(make_store(ids), al, ds, cache=f"{CACHE}/test-embeddings", keep_examples=True, progress=False)
    return ds, al, db


def test_label_and_search_fashion(env):
    ds, al, db = env
    from semlens_fast.foundation import DEFAULT_TEMPLATES

    lens = Lens(db, al, templates=DEFAULT_TEMPLATES)
    lab = lens.label(list(ds.classes))
    names = lab.names("l")
    assert sum(names[c] == ds.classes[c] for c in range(10)) >= 8
    res = lens.search([f"{ds.classes[1]}", f"{ds.classes[8]}"], k=1).to_records()
    assert res[0]["component"] == 1 and res[1]["component"] == 8
    # a mixture is labelled with one of its two classes, with a smaller margin than the pure components
    assert names[10] in (ds.classes[1], ds.classes[8])
    assert float(lab.margin["l"][10]) < float(lab.margin["l"][:10].median())


def test_scores_fashion(env):
    ds, al, db = env
    lens = Lens(db, al)
    clar = lens.clarity("l")
    poly = lens.polysemanticity("l")
    # mixtures of two dissimilar classes are less clear and more polysemantic than the pure components
    assert float(clar[10]) < float(clar[:10].median())
    assert float(poly[10]) > float(poly[:10].median())
    s = lens.describe("l", vocabulary=list(ds.classes))
    assert s.n_components == 13 and "clarity" in str(s)


def test_audit_fashion(env):
    ds, al, db = env
    from semlens_fast.foundation import DEFAULT_TEMPLATES

    lens = Lens(db, al, templates=DEFAULT_TEMPLATES)
    rel = torch.zeros(13)
    rel[8] = 3.0  # the 'bag' component carries most relevance for the class
    rel[1] = 1.0
    rep = lens.audit(valid=[ds.classes[1]], spurious=[ds.classes[8]], relevance=rel)
    flagged = {r["component"] for r in rep.flagged}
    assert 8 in flagged and 1 not in flagged
    assert rep.relevance_share["spurious"] >= 0.75
    ids = db["l"].ids[8]
    assert rep.flagged[0]["top_samples"] == ids[ids >= 0][:20].tolist()  # top=20 by default (CLI and demo alike)


def test_fashion_cnn_components(tmp_path):
    """The trained Fashion-MNIST CNN: components whose top examples all share one class get that class's label
    more often than chance, and Lens scores run on a real ConceptDB."""
    from semlens_fast.collect import collect
    from semlens_fast.foundation import DEFAULT_TEMPLATES
    from tests.test_concepts_shared import cnn

    ds, model, al = fashion().subset(400), cnn(), aligned()
    st = collect(model, ds, ["conv3"], k=5, pool="max", progress=False)
    db = build_concept_db(st, al, ds, cache=f"{CACHE}/test-embeddings", progress=False)
    lens = Lens(db, al, templates=DEFAULT_TEMPLATES)
    lab = lens.label(list(ds.classes))
    cls = ds.labels[db["conv3"].ids.clamp(min=0)]
    pure = (cls == cls[:, :1]).all(1) & db["conv3"].valid.all(1)
    assert int(pure.sum()) >= 3
    names = lab.names("conv3")
    hits = sum(names[c] == ds.classes[int(cls[c, 0])] for c in pure.nonzero().flatten().tolist())
    assert hits / int(pure.sum()) >= 0.75  # chance is 0.1 (8 of 8 at the time of writing)
    red = lens.redundancy("conv3")
    assert red.per_component.shape == (32,) and 0 < red.layer <= 1
    poly = lens.polysemanticity("conv3")
    assert torch.isfinite(poly).all()
