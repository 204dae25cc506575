"""Per-component relevance: channel relevance, streaming aggregation, CRP conditioning, crops."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from semlens_fast.errors import ArgumentError, ShapeError
from semlens_fast.relevance import (ChannelRelevanceStats, RelevanceEngine, channel_relevance, conditional_relevance,
                                    dataset_channel_relevance, dlbacktrace, dlbacktrace_contrast, lrp_epsilon,
                                    relevance_crop_box)

from .helpers import rel_err, seq_cnn


def test_channel_relevance_is_spatial_sum(cnn, x_img):
    eng = RelevanceEngine(cnn)
    r = channel_relevance(eng, x_img, "3", target=2)
    full = eng(x_img, 2, record=["3"]).layers["3"]
    assert r.shape == (3, 6)
    assert torch.allclose(r, full.sum((2, 3)))
    # bias-free net: channel relevances of a layer add up to the seed
    nb = seq_cnn(bias=False)
    rn = channel_relevance(nb, x_img, "4", target=1, composite=dlbacktrace())
    assert torch.allclose(rn.sum(1), torch.ones(3), rtol=1e-5)


def test_dataset_aggregation_streams_like_one_batch(cnn):
    torch.manual_seed(0)
    xs = torch.randn(10, 1, 14, 14)
    loader = [(xs[i:i + 4], torch.zeros(4)) for i in range(0, 10, 4)]  # uneven last batch
    eng = RelevanceEngine(cnn)
    stats = dataset_channel_relevance(eng, loader, "3", k=3, progress=False)
    full = channel_relevance(eng, xs, "3")
    assert stats.count == 10
    assert torch.allclose(stats.sum, full.sum(0).double(), rtol=1e-5)
    assert torch.allclose(stats.mean, full.mean(0).double(), rtol=1e-5)
    tv, ti = torch.sort(full.T, dim=1, descending=True)
    assert torch.equal(stats.topk_ids, ti[:, :3])
    assert torch.allclose(stats.topk_values, tv[:, :3])
    pred = cnn(xs).argmax(1)
    for c in pred.unique():
        assert torch.allclose(stats.class_sum[c], full[pred == c].sum(0).double(), rtol=1e-5)
    assert int(stats.class_count.sum()) == 10


def test_topk_ties_lower_id_wins_and_missing_entries():
    s = ChannelRelevanceStats.empty(channels=2, num_classes=2, k=3)
    s.update(torch.tensor([[1.0, 5.0], [1.0, 2.0]]), torch.tensor([0, 1]), torch.tensor([7, 3]))
    assert s.topk_ids[0].tolist() == [3, 7, -1] and s.topk_values[0, 2] == float("-inf")
    s.update(torch.tensor([[1.0, 9.0]]), torch.tensor([0]), torch.tensor([1]))
    assert s.topk_ids[0].tolist() == [1, 3, 7] and s.topk_ids[1].tolist() == [1, 7, 3]
    with pytest.raises(ShapeError):
        s.update(torch.ones(1, 3), torch.tensor([0]), torch.tensor([0]))


@pytest.mark.parametrize("composite", [dlbacktrace, lrp_epsilon])
def test_conditional_maps_add_up_to_the_full_map(cnn, x_img, composite):
    eng = RelevanceEngine(cnn, composite())
    heat = conditional_relevance(eng, x_img, "3", channels=list(range(6)), target=4)
    assert heat.shape == (3, 6, 1, 14, 14)
    full = eng(x_img, 4).input
    assert rel_err(heat.sum(1), full) < 1e-5
    # one channel's map carries exactly that channel's relevance
    per_ch = channel_relevance(eng, x_img, "3", target=4)
    if composite is dlbacktrace:  # conv1 of dlbacktrace loses only the bias share; compare shapes of mass
        assert (heat.flatten(2).sum(2) <= per_ch.abs() + 1e-5).all()
    with pytest.raises(ArgumentError, match="channels"):
        conditional_relevance(eng, x_img, "3", channels=[6], target=4)


def test_contrast_mode_layers_and_streams(cnn, x_img):
    res = RelevanceEngine(cnn, dlbacktrace_contrast())(x_img, record=["3"])
    pos, neg = res.streams["3"]
    assert torch.allclose(res.layers["3"], pos - neg)
    assert res.input_positive.abs().sum() > 0 and res.input_negative.abs().sum() > 0
    with pytest.raises(ArgumentError):
        RelevanceEngine(cnn)(x_img).input_positive


def test_relevance_crop_box():
    h = torch.zeros(2, 8, 8)
    h[0, 2:4, 5:7] = 1.0
    h[0, 0, 0] = -5.0  # negative relevance is ignored
    boxes = relevance_crop_box(h, mass=1.0)
    assert boxes[0].tolist() == [2, 5, 4, 7]
    assert boxes[1].tolist() == [0, 0, 8, 8]  # no positive relevance: whole image
    h2 = torch.zeros(1, 8, 8)
    h2[0, 1, 1], h2[0, 6, 6] = 10.0, 1.0
    assert relevance_crop_box(h2, mass=0.9)[0].tolist() == [1, 1, 2, 2]
    assert relevance_crop_box(h2, mass=1.0)[0].tolist() == [1, 1, 7, 7]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_devices_and_dtypes(device, dtype, x_img):
    m = seq_cnn().to(device=device, dtype=dtype)
    x = x_img.to(device=device, dtype=dtype)
    r = RelevanceEngine(m)(x).input
    assert r.device.type == device and r.dtype == dtype
    ref = RelevanceEngine(seq_cnn().double())(x_img.double()).input
    assert rel_err(r.cpu().double(), ref) < (1e-5 if dtype == torch.float32 else 1e-12)
