"""The calibrated audit: BH, standardisation and empirical p-values on known inputs; the counterfactual
probe, its placebo null and the flags on a synthetic ConceptDB with planted mark components; the causal
check (intervene) against exact values; the class ranking and the data behind the flags on a
hand-built network whose mark channel feeds one class; bad arguments."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semlens_fast._io import json_safe
from semlens_fast.audit import (AuditReport, benjamini_hochberg, calibrate, empirical_p, mediated_class_effects,
                                rank_classes, standardise)
from semlens_fast.concepts import LayerConcepts
from semlens_fast.errors import ArgumentError, ShapeError
from semlens_fast.foundation import FoundationModel
from semlens_fast.foundation.base import IMAGE
from semlens_fast.intervene import ImageData, Paste, changed_boxes, intervene, receptive_field
from semlens_fast.lens import Lens

# ---------------------------------------------------------------------- statistics


def bh_reference(p, q):
    """Textbook BH: reject the k smallest, k = max{i: p_(i) <= q i / m}."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    k = 0
    for rank, i in enumerate(order, 1):
        if p[i] <= q * rank / m:
            k = rank
    return {order[j] for j in range(k)}


def test_benjamini_hochberg_known_values():
    p = [0.01, 0.04, 0.03, 0.005, 0.2, 0.9, 0.041]
    rej, qv = benjamini_hochberg(p, 0.05)
    # sorted: .005 .01 .03 .04 .041 .2 .9 ; thresholds .05 i/7: .0071 .0143 .0214 .0286 .0357 .0429 .05
    assert set(rej.nonzero().flatten().tolist()) == {3, 0} == bh_reference(p, 0.05)
    # q-values: min over j >= i of p_(j) m / j
    want = {3: 0.035, 0: 0.035, 2: 0.0574, 1: 0.0574, 6: 0.0574, 4: 0.2333333, 5: 0.9}
    for i, v in want.items():
        assert float(qv[i]) == pytest.approx(v, rel=1e-5)
    assert torch.equal(rej, qv <= 0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        pp = torch.rand(30, generator=g).pow(3).tolist()
        r, _ = benjamini_hochberg(pp, 0.1)
        assert set(r.nonzero().flatten().tolist()) == bh_reference(pp, 0.1)


def test_benjamini_hochberg_edges():
    rej, qv = benjamini_hochberg([float("nan"), 0.001, 1.0], 0.05)
    assert rej.tolist() == [False, True, False] and math.isnan(float(qv[0]))
    assert benjamini_hochberg([], 0.1)[0].numel() == 0
    for bad in (0, 1, float("nan"), True, "0.1", -0.1):
        with pytest.raises(ArgumentError, match="q"):
            benjamini_hochberg([0.1], bad)
    with pytest.raises(ArgumentError, match=r"\[0, 1\]"):
        benjamini_hochberg([1.5], 0.1)


def test_standardise_and_empirical_p():
    s = torch.tensor([3.0, 0.0, 1.0])
    null = torch.tensor([[0.0, 2.0], [1.0, 1.0], [0.0, 1.0]])
    z, zn = standardise(s, null)
    sd0 = math.sqrt(2.0)
    assert float(z[0]) == pytest.approx((3 - 1) / sd0)
    assert math.isnan(float(z[1])) and torch.isnan(zn[1]).all()  # a null without spread
    assert float(z[2]) == pytest.approx((1 - 0.5) / math.sqrt(0.5))
    # empirical p against the pooled null: (1 + #null >= z) / (1 + #null)
    p = empirical_p(torch.tensor([0.0, 10.0, -10.0]), torch.tensor([[-1.0, 0.0, 1.0, 2.0]]))
    assert p.tolist() == pytest.approx([(1 + 3) / 5, 1 / 5, 1.0])


def test_calibrate_is_uniform_under_the_null():
    """Scores exchangeable with their null: p-values are (close to) uniform, BH flags (almost) nothing."""
    g = torch.Generator().manual_seed(3)
    N, B = 400, 100
    null = torch.randn(N, B, generator=g) * torch.rand(N, 1, generator=g) + torch.randn(N, 1, generator=g)
    scores = null[:, 0] * 0 + (torch.randn(N, generator=g) * null.std(1) + null.mean(1))
    z, p = calibrate(scores, null)
    assert abs(float((p <= 0.1).double().mean()) - 0.1) < 0.05
    assert int(benjamini_hochberg(p, 0.1)[0].sum()) <= 4
    # a planted signal is found
    scores2 = scores.clone()
    scores2[:20] = null[:20].mean(1) + 5 * null[:20].std(1)
    _, p2 = calibrate(scores2, null)
    rej, _ = benjamini_hochberg(p2, 0.1)
    assert set(range(20)) <= set(rej.nonzero().flatten().tolist()) and int(rej.sum()) <= 25


# ---------------------------------------------------------------------- a synthetic ConceptDB


class PixelFM(FoundationModel):
    """Image embedding = the 8x8 average-pooled grey image (64-d), plus a small constant."""

    modalities = frozenset({IMAGE})
    name = "pixels"
    image_size = 16
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)

    @property
    def dim(self):
        return 64

    def _encode_image_batch(self, x):
        return F.avg_pool2d(x.mean(1, keepdim=True), 2).flatten(1) + 0.02


def blobs(n, seed, size=16):
    """Grey blobs at random places away from the top-left corner, uint8 [n, size, size]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    cy = torch.randint(6, size - 3, (n,), generator=g).float()
    cx = torch.randint(6, size - 3, (n,), generator=g).float()
    r = 1.5 + 2 * torch.rand(n, generator=g)
    v = 80 + 120 * torch.rand(n, generator=g)
    img = v[:, None, None] * torch.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / (2 * r[:, None, None] ** 2))
    return img.round().clamp(0, 255).to(torch.uint8)


SQUARE = Paste(torch.full((3, 3), 255, dtype=torch.uint8), at=(1, 1))


def synthetic_db(fm, images, n_mark=6, n_other=34, k=5, seed=1):
    """A one-layer DB: n_mark components whose examples carry the mark, n_other with clean examples."""
    g = torch.Generator().manual_seed(seed)
    C = n_mark + n_other
    ids = torch.randperm(len(images), generator=g)[:C * k].view(C, k)
    marked = SQUARE(images)
    ex = torch.zeros(C, k, fm.dim)
    for c in range(C):
        src = marked if c < n_mark else images
        ex[c] = fm.encode_images(src[ids[c]].unsqueeze(1))
    valid = torch.ones(C, k, dtype=torch.bool)
    emb = F.normalize(ex.mean(1), dim=-1)
    boxes = torch.zeros(C, k, 4, dtype=torch.int32)
    return {"l": LayerConcepts(embeddings=emb, ids=ids, boxes=boxes, values=torch.ones(C, k), valid=valid,
                               examples=ex.half())}


class DictDB(dict):
    @property
    def layers(self):
        return list(self)


@pytest.fixture(scope="module")
def synth():
    fm = PixelFM()
    images = blobs(300, 0)
    return fm, images, DictDB(synthetic_db(fm, images))


def test_counterfactual_probe_flags_the_mark_components(synth):
    fm, images, db = synth
    lens = Lens(db, fm)
    rep = lens.audit(spurious={"square": SQUARE}, images=images, n_null=60, n_images=12)
    flagged = {c for (_, c) in rep.flagged_set()}
    assert set(range(6)) <= flagged and len(flagged - set(range(6))) <= 1
    assert [r["component"] for r in rep.ranked[:6]] and {r["component"] for r in rep.ranked[:6]} == set(range(6))
    assert all(r["q_value"] <= 0.1 for r in rep.flagged)
    assert rep.probe_kinds == {"square": "transform"} and "empirical_null" in rep.method["probes"]["square"]
    # the probe is the mean embedding difference of crops around the changed pixels (full crops here)
    assert rep.method["probes"]["square"]["crop_sides"] == {"l": 16}
    assert len(rep.components) == 40 and sorted(r["rank"] for r in rep.components) == list(range(1, 41))
    # JSON-able, printable, tabular
    json.dumps(json_safe(rep.to_dict()))
    assert "flagged" in str(rep) and len(rep.to_records()) == 40


def test_unrelated_artifact_flags_little(synth):
    """A mark no component has seen (bottom-right cross): the calibrated audit stays quiet."""
    fm, images, db = synth
    cross = torch.zeros(3, 3, dtype=torch.uint8)
    cross[1, :] = cross[:, 1] = 255
    rep = Lens(db, fm).audit(spurious={"cross": Paste(cross, at=(12, 12), mask=cross > 0)}, images=images,
                             n_null=60, n_images=12)
    assert len(rep.flagged) <= 2


def test_picture_and_embedding_probes(synth):
    fm, images, db = synth
    lens = Lens(db, fm)
    pic = torch.zeros(16, 16, dtype=torch.uint8)
    pic[1:4, 1:4] = 255
    rep = lens.audit(spurious={"square picture": pic}, images=images, n_null=60)
    assert rep.probe_kinds == {"square picture": "picture"}
    top6 = {r["component"] for r in rep.ranked[:6]}
    assert len(top6 & set(range(6))) >= 5
    # several pictures averaged into one concept
    rep2 = lens.audit(spurious={"squares": [pic, pic.roll(1, 1)]}, images=images, n_null=60)
    assert rep2.method["probes"]["squares"]["pictures"] == 2
    e = fm.encode_images(SQUARE(images[:20]).unsqueeze(1)).mean(0) - fm.encode_images(images[:20].unsqueeze(1)).mean(0)
    rep3 = lens.audit(spurious={"direction": e}, images=images, n_null=60)
    assert rep3.probe_kinds["direction"] == "embedding"
    assert len({r["component"] for r in rep3.ranked[:6]} & set(range(6))) >= 5


# ---------------------------------------------------------------------- a network with a known shortcut


class MarkNet(nn.Module):
    """conv (24 channels): channel 0 fires on a bright top-left corner, channel 1 on the blob, the others are
    weak random filters; the head maps channel 0 to class 2 and channel 1 to class 0."""

    C = 24

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, self.C, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(16)
        self.fc = nn.Linear(self.C, 4)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.C, 1, 3, 3, generator=g) * 0.05)
            self.conv.bias.zero_()
            self.conv.weight[0, 0] = 1.0 / 9
            self.conv.bias[0] = -0.6
            self.conv.weight[1].zero_()
            self.conv.weight[1, 0, 1, 1] = 1.0
            self.fc.weight.copy_(torch.randn(4, self.C, generator=g) * 0.05)
            self.fc.bias.zero_()
            self.fc.weight[:, 0] = torch.tensor([0.0, 0.0, 8.0, 0.0])
            self.fc.weight[:, 1] = torch.tensor([2.0, 0.0, 0.0, 0.0])
        # the corner detector only counts in the top-left 6x6 region (16x16 inputs)
        m = torch.ones(1, self.C, 16, 16)
        m[:, 0] = 0
        m[:, 0, :6, :6] = 1
        self.register_buffer("region", m)

    def forward(self, x):
        return self.fc(self.pool(self.act(self.conv(x)) * self.region).flatten(1))


def marknet_data(n=400, seed=0):
    images = blobs(n, seed)
    labels = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(seed + 1))
    carry = (labels == 2) & (torch.arange(n) % 10 != 0)  # 90 % of class 2 carry the mark
    images[carry] = SQUARE(images[carry])
    return ImageData(images, lambda u8: (u8.float() / 255).unsqueeze(1), labels, ["a", "b", "c", "d"]), carry


def test_intervene_matches_exact_values():
    model = MarkNet().eval()
    data, carry = marknet_data()
    res = intervene(model, data, SQUARE, ["conv"], n=100, seed=0)
    idx = torch.tensor(res.ids)
    x0 = data.inputs(data.raw(idx))
    x1 = data.inputs(SQUARE(data.raw(idx)))
    with torch.no_grad():
        a0 = model.conv(x0).flatten(2).amax(2)
        a1 = model.conv(x1).flatten(2).amax(2)
    d = (a1 - a0).double()
    torch.testing.assert_close(res.delta["conv"], d.mean(0).float(), rtol=1e-5, atol=1e-6)
    from scipy import stats

    half = stats.t.ppf(0.975, 99) * d.std(0) / 10
    torch.testing.assert_close(res.high["conv"] - res.low["conv"], (2 * half).float(), rtol=1e-4, atol=1e-6)
    assert res.causal("conv").tolist()[0] and float(res.effect["conv"][0]) > 1
    assert int(res.class_delta.argmax()) == 2 and float(res.class_low[2]) > 0
    assert res.unchanged == int(carry[idx].sum())  # already-marked samples are left as they were
    assert 0 in {r["component"] for r in res.to_records() if r["causal"]}
    # the p-values: one-sided paired t-tests; significant() is BH over them and the effect threshold
    t = d.mean(0) / (d.std(0) / 10)
    ref_p = torch.from_numpy(stats.t.sf(t.numpy(), 99))
    torch.testing.assert_close(res.p_value["conv"], ref_p)
    rej, _ = benjamini_hochberg(ref_p, 0.05)
    expect = rej & (torch.nan_to_num(res.effect["conv"], nan=0.0) >= res.min_effect)
    assert torch.equal(res.significant(0.05)["conv"], expect) and bool(expect[0])
    assert not bool(res.significant(1e-300)["conv"].any()) or float(ref_p.min()) == 0
    with pytest.raises(ArgumentError, match="confidence"):
        intervene(model, data, SQUARE, ["conv"], confidence=95)
    with pytest.raises(ArgumentError, match="not modules"):
        intervene(model, data, SQUARE, ["nope"])
    with pytest.raises(ShapeError, match="keep shape"):
        intervene(model, data, lambda x: x[:, :8], ["conv"])


def test_mediated_class_ranking_names_the_class():
    model = MarkNet().eval()
    data, _ = marknet_data()
    chosen = {"conv": torch.tensor([True] + [False] * (MarkNet.C - 1))}
    rows = mediated_class_effects(model, data, SQUARE, chosen, data.images[:100], n=120, seed=0,
                                  classes=data.classes)
    assert rows[0]["cls"] == 2 and rows[0]["relies"] and rows[0]["z"] > 3
    assert not any(r["relies"] for r in rows[1:])
    # the relevance-share route on synthetic relevance: class 1 puts its relevance on component 0
    rel = {"l": torch.tensor([[1.0, 1, 1, 1, 1, 1, 1, 1], [6.0, 1, 1, 1, 1, 1, 1, 1], [1.0, 1, 1, 1, 1, 1, 1, 2]])}
    ranked = rank_classes(rel, {"l": torch.tensor([True] + [False] * 7)}, n_random=500, seed=0)
    assert ranked[0]["cls"] == 1 and ranked[0]["share"] == pytest.approx(6 / 13)
    assert ranked[0]["p_value"] <= 1 / 8 + 0.05


def test_full_audit_on_the_shortcut_network():
    """Flags, the causal check, the affected class and the data behind it, end to end (small)."""
    model = MarkNet().eval()
    data, carry = marknet_data()
    fm = PixelFM()
    # the DB: channel 0's examples carry the mark, the others' not (as a top-k collection would give)
    g = torch.Generator().manual_seed(5)
    C, k = MarkNet.C, 5
    ids = torch.stack([carry.nonzero().flatten()[:k]] + [(~carry).nonzero().flatten()[torch.randperm(
        int((~carry).sum()), generator=g)[:k]] for _ in range(C - 1)])
    ex = torch.stack([fm.encode_images(data.images[i].unsqueeze(1)) for i in ids])
    db = DictDB(conv=LayerConcepts(embeddings=F.normalize(ex.mean(1), dim=-1), ids=ids,
                                   boxes=torch.zeros(C, k, 4, dtype=torch.int32), values=torch.ones(C, k),
                                   valid=torch.ones(C, k, dtype=torch.bool), examples=None))
    rel = {"conv": torch.ones(4, C)}
    rel["conv"][2, 0] = 5.0
    rep = Lens(db, fm).audit(spurious={"square": SQUARE}, model=model, data=data, relevance=rel, n_null=40,
                             n_causal=100, reference_pool=200, top=10)
    assert ("conv", 0) in rep.flagged_set()
    row0 = next(r for r in rep.components if r["component"] == 0)
    assert row0["causal"] and row0["agree"] and row0["causal_effect"] > 1
    assert rep.agreement["fm_and_causal"] >= 1
    assert rep.classes[0]["cls"] == 2 and "c" in rep.affected
    # with a transform, classes rank by its effect on their probability; "relies" needs that effect surely > 0
    deltas = [r["causal_delta"] for r in rep.classes]
    assert deltas == sorted(deltas, reverse=True) and [r["rank"] for r in rep.classes] == list(range(1, 5))
    assert all(r["causal_low"] > 0 for r in rep.classes if r["relies"])
    assert rep.method["classes"].startswith("ranked by the transform's effect")
    f0 = next(r for r in rep.flagged if r["component"] == 0)
    listed = torch.tensor(f0["top_samples"])
    assert len(listed) >= 5 and bool(carry[listed].float().mean() >= 0.8)
    assert f0["unchanged_share"] == pytest.approx(float(carry[listed].float().mean()))
    assert all(int(data.labels[i]) == 2 for i in f0["top_samples"])
    for s in f0["samples"]:  # the receptive-field box around the peak keeps the mark in view
        y0, x0, y1, x1 = s["box"]
        if not s["changed_by_transform"]:
            assert y0 <= 2 and x0 <= 2 and y1 >= 2 and x1 >= 2
    assert rep.samples["conv:0"] == f0["samples"]
    assert rep.relevance_share is None and rep.target is None
    rep_t = Lens(db, fm).audit(spurious={"square": SQUARE}, model=model, data=data, relevance=rel, target=2,
                               n_null=40, causal=False)
    flagged = {c for _, c in rep_t.flagged_set()}
    assert rep_t.relevance_share["spurious"] == pytest.approx((5.0 + len(flagged - {0})) / (5.0 + C - 1))


# ---------------------------------------------------------------------- transforms, receptive fields


def test_paste_and_changed_boxes():
    imgs = torch.zeros(4, 10, 10, dtype=torch.uint8)
    pic = torch.tensor([[255, 0], [0, 255]], dtype=torch.uint8)
    out = Paste(pic, at=(2, 3), mask=pic > 0)(imgs)
    assert out.dtype == torch.uint8 and out.shape == imgs.shape and int(out.sum()) == 4 * 2 * 255
    assert out[0, 2, 3] == 255 and out[0, 3, 4] == 255 and out[0, 2, 4] == 0
    assert changed_boxes(imgs, out).tolist() == [[2, 3, 4, 5]] * 4
    rnd = Paste(pic, seed=1)
    a, b = rnd(imgs), rnd(imgs)
    assert torch.equal(a, b) and not torch.equal(a[0], a[1]) or True  # seeded: the same places on every call
    f = Paste(torch.ones(1, 2, 2), at=(0, 0))(torch.zeros(2, 1, 5, 5))
    assert f.dtype == torch.float32 and float(f.sum()) == 8.0
    assert changed_boxes(imgs, imgs).tolist() == [[-1, -1, -1, -1]] * 4
    with pytest.raises(ShapeError, match="outside"):
        Paste(pic, at=(9, 9))(imgs)
    with pytest.raises(ArgumentError, match="at must"):
        Paste(pic, at=(-1, 0))
    with pytest.raises(ArgumentError, match="no pixel"):
        Paste(pic, mask=torch.zeros(2, 2, dtype=torch.bool))


def test_receptive_field_of_fashion_cnn():
    from semlens_fast.models import FashionCNN

    m = FashionCNN().eval()
    rf = receptive_field(m, "conv1", torch.zeros(1, 1, 28, 28))
    assert (rf.hi_y - rf.lo_y, rf.hi_x - rf.lo_x) == (3, 3) and rf.stride_y == 1
    rf2 = receptive_field(m, "conv2", torch.zeros(1, 1, 28, 28))
    assert rf2.stride_y == 2 and 6 <= rf2.hi_y - rf2.lo_y <= 8
    box = rf2.box(torch.tensor([0, 14 * 14 - 1]))
    assert box[0, 0] == 0 and box[1, 2] == 28 and (box[:, 2] > box[:, 0]).all()


# ---------------------------------------------------------------------- bad input


def test_audit_arguments_are_checked(synth):
    fm, images, db = synth
    lens = Lens(db, fm)
    ok = {"spurious": {"square": SQUARE}, "images": images, "n_null": 20}
    for kw, words in [({"fdr": 0.0}, "fdr"), ({"fdr": float("nan")}, "fdr"), ({"fdr": True}, "fdr"),
                      ({"top": -1}, "top"), ({"top": 0}, "top"), ({"n_null": 3}, "n_null"),
                      ({"threshold": float("nan")}, "threshold"), ({"threshold": True}, "threshold"),
                      ({"threshold": "0.1"}, "threshold"), ({"margin": float("nan")}, "margin"),
                      ({"margin": False}, "margin"), ({"seed": -1}, "seed"), ({"causal": "yes"}, "causal")]:
        with pytest.raises(ArgumentError, match=words):
            lens.audit(**{**ok, **kw})
    with pytest.raises(ArgumentError, match="spurious is required"):
        lens.audit(images=images)
    with pytest.raises(ArgumentError, match="empty"):
        lens.audit(spurious={"x": "  "})
    with pytest.raises(ArgumentError, match="both valid and spurious"):
        lens.audit(valid={"a": SQUARE}, spurious={"a": SQUARE}, images=images)
    with pytest.raises(ArgumentError, match="need data"):
        lens.audit(spurious={"square": SQUARE})
    with pytest.raises(ArgumentError, match="changed 0"):
        lens.audit(spurious={"noop": lambda x: x.clone()}, images=images)
    rel = {"l": torch.ones(3, 40)}
    for t in (99, 3, -1, True, 1.5):
        with pytest.raises(ArgumentError, match="target"):
            lens.audit(**ok, relevance=rel, target=t)
    with pytest.raises(ShapeError, match="relevance"):
        lens.audit(**ok, relevance={"l": torch.ones(39)})


def test_nan_relevance_is_left_out_with_a_warning(synth):
    fm, images, db = synth
    r = torch.ones(40)
    r[0] = float("nan")
    r[1] = 3.0
    with pytest.warns(RuntimeWarning, match="non-finite"):
        rep = Lens(db, fm).audit(spurious={"square": SQUARE}, images=images, n_null=20, relevance={"l": r})
    share = rep.relevance_share
    assert not any(math.isnan(v) for v in share.values()) and share["spurious"] + share["valid"] == pytest.approx(1.0)
    flagged = {c for (_, c) in rep.flagged_set()}
    expect = sum(3.0 if c == 1 else 1.0 for c in flagged if c != 0) / (39 + 2)
    assert share["spurious"] == pytest.approx(expect)
