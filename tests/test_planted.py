"""A reduced planted-artifact case (benchmarks/planted.py runs the family): one small CNN trained here on a
Fashion-MNIST subset with a planted square. The calibrated audit, knowing only the mark's transform and a
picture of it, must rank the mark channels high, flag true ones under its FDR, name the marked class and
list training images that carry the mark; the FM-free causal check must confirm the true channels.
The thresholds are the issue's targets where one case can be held to them, and looser where the benchmark
shows the family varies (see benchmarks/PLANTED.md): this test guards against regressions, the benchmark
measures."""
from __future__ import annotations

import pytest
import torch

from semlens_fast.data import fashion_mnist_available

pytestmark = pytest.mark.skipif(not fashion_mnist_available(), reason="needs dataset-fashion-mnist")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from semlens_fast.audit import class_relevance
    from semlens_fast.planted import build_case, ground_truth

    c = build_case("cnn", "square", 0, 0, n_train=4000, steps=300, cache_dir=tmp_path_factory.mktemp("planted"))
    truth = ground_truth(c, n=500, n_ablation=128)
    rel = class_relevance(c.model, c.data, c.layers, n_per_class=48)[0]
    return c, truth, rel


def test_the_model_relies_on_the_mark(case):
    c, truth, _ = case
    m = c.metrics
    assert m["others_to_target_marked"] > m["others_to_target_clean"] + 0.1, m
    assert truth["logit_gain"] > 1.0
    assert sum(int(v["act"].sum()) for v in truth["layers"].values()) >= 3


def test_initial_weights_depend_on_the_seed_only():
    """A case's untrained network is the same whatever the global RNG held (cases were not reproducible)."""
    from semlens_fast.planted import ARCHITECTURES, make_model

    for arch in ARCHITECTURES:
        torch.manual_seed(12345)
        a = make_model(arch, 0)
        torch.manual_seed(999)
        b, c = make_model(arch, 0), make_model(arch, 1)
        sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), arch
        assert not all(torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point()), arch


def test_audit_with_transform_and_picture(case):
    from semlens_fast.lens import Lens
    from semlens_fast.planted import score_audit

    c, truth, rel = case
    pic, _ = c.mark.picture()
    rep = Lens(c.db, c.fm).audit(spurious={"mark": c.mark, "mark (picture)": pic}, model=c.model, data=c.data,
                                 relevance=rel, n_causal=128, reference_pool=256)
    s = score_audit(c, rep, truth)
    # the decision: causal (BH over the causal p-values, effect >= min_effect) and leaning towards the mark
    from semlens_fast.audit import ALIGNED_Z

    assert {(r["layer"], r["component"]) for r in rep.flagged} == \
        {(r["layer"], r["component"]) for r in rep.components if r["causal"] and r["z"] > ALIGNED_Z}
    assert all(r["rank"] < min(q["rank"] for q in rep.components if not q["flagged"]) for r in rep.flagged)
    assert rep.method["flagged"].startswith("causal and aligned")
    assert s["auc"] >= 0.8 and s["first_true_rank"] <= 3, s
    # precision: the benchmark's plain-CNN mean is about 0.5 (worst 0.2-0.3); this is a regression guard
    assert s["n_flagged"] >= 1 and s["precision"] >= 0.3, s
    assert s["class_correct"], (s, rep.classes[:3])
    assert s["listed_marked_share"] >= 0.7, s
    # the FM-free check confirms (nearly) every true channel
    assert s["causal_recall"] >= 0.8, s
    assert rep.agreement["fm_and_causal"] >= 1


def test_transform_and_picture_routes_rank_the_mark_channels(case):
    from semlens_fast.lens import Lens
    from semlens_fast.planted import score_audit

    c, truth, rel = case
    pic, _ = c.mark.picture()
    lens = Lens(c.db, c.fm)
    for sp in ({"mark": c.mark}, {"mark": pic}):
        rep = lens.audit(spurious=sp, data=c.data, relevance=rel, causal=False)
        s = score_audit(c, rep, truth)
        assert s["auc"] >= 0.75 and s["first_true_rank"] <= 5, (list(rep.probe_kinds.values()), s)


def test_score_audit_and_auc():
    from semlens_fast.planted import MARKS, auc

    assert auc(torch.tensor([3.0, 2, 1, 0]), torch.tensor([True, True, False, False])) == 1.0
    assert auc(torch.tensor([1.0, 1, 1, 1]), torch.tensor([True, False, True, False])) == 0.5
    m = MARKS["cross"]
    img = torch.zeros(2, 28, 28, dtype=torch.uint8)
    out = m(img)
    assert torch.equal(m(out), out) and int((out > 0).sum()) == 2 * len(m.pixels)  # idempotent
    pic, mask = m.picture()
    assert pic.shape == (7 + 4, 7 + 4) and int(mask.sum()) == len(m.pixels)
    assert len(MARKS) >= 6 and len({mk.value for mk in MARKS.values()}) >= 2
