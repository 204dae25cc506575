"""A reduced planted-artifact benchmark (benchmarks/planted.py is the full one): two cases, two
architectures, two marks, trained here on small Fashion-MNIST subsets; the calibrated audit, knowing
only the mark's transform (or a picture of it), must find the mark channels, name the marked class and
list training images that carry the mark."""
from __future__ import annotations

import pytest
import torch

from semlens_fast.data import fashion_mnist_available

pytestmark = pytest.mark.skipif(not fashion_mnist_available(), reason="needs dataset-fashion-mnist")

CASES = [("cnn", "square", 2, 0), ("bncnn", "cross", 4, 0)]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    from semlens_fast.audit import class_relevance
    from semlens_fast.planted import build_case, ground_truth

    cache = tmp_path_factory.mktemp("planted")
    out = []
    for arch, mark, target, seed in CASES:
        case = build_case(arch, mark, target, seed, n_train=6000, steps=400, cache_dir=cache)
        truth = ground_truth(case, n=500, n_ablation=128)
        rel = class_relevance(case.model, case.data, case.layers, n_per_class=48)[0]
        out.append((case, truth, rel))
    return out


def test_models_rely_on_the_mark(cases):
    for case, truth, _ in cases:
        m = case.metrics
        assert m["others_to_target_marked"] > m["others_to_target_clean"] + 0.1, case.key
        assert truth["logit_gain"] > 1.0
        assert sum(int(v["act"].sum()) for v in truth["layers"].values()) >= 3, case.key


def test_transform_audit_finds_the_mark(cases):
    from semlens_fast.lens import Lens
    from semlens_fast.planted import score_audit

    for case, truth, rel in cases:
        rep = Lens(case.db, case.fm).audit(spurious={"mark": case.mark}, model=case.model, data=case.data,
                                           relevance=rel, n_causal=128, reference_pool=256)
        s = score_audit(case, rep, truth)
        assert s["auc"] >= 0.8, (case.key, s)
        assert s["n_flagged"] >= 2 and s["precision"] >= 0.5 and s["recall"] >= 0.3, (case.key, s)
        assert s["first_true_rank"] <= 3, (case.key, s)
        assert s["class_correct"], (case.key, s, rep.classes[:3])
        assert s["listed_marked_share"] >= 0.7, (case.key, s)
        assert s["causal_recall"] >= 0.8  # the FM-free check confirms (nearly) every true channel
        assert s["agreement"]["flagged_and_causal"] >= s["true_positives"] * 0.8


def test_picture_audit_ranks_the_mark_channels_high(cases):
    from semlens_fast.lens import Lens
    from semlens_fast.planted import score_audit

    case, truth, rel = cases[0]
    pic, _ = case.mark.picture()
    rep = Lens(case.db, case.fm).audit(spurious={"mark": pic}, model=case.model, data=case.data, relevance=rel,
                                       causal=False, reference_pool=256)
    s = score_audit(case, rep, truth)
    assert s["auc"] >= 0.75 and s["first_true_rank"] <= 5, s


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
