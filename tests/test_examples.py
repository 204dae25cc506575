"""Concept examples: crop boxes, crops, activation/relevance examples, token windows."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from semlens_fast.errors import ArgumentError, ShapeError, StoreError
from semlens_fast.examples import (
    FULL_BOX, ImageSource, boxes_from_maps, concept_examples, crop, token_windows, window_texts,
)
from tests.test_concepts_shared import cnn, fashion, make_store


def test_boxes_single_blob_square_and_min_size():
    m = torch.zeros(1, 7, 7)
    m[0, 2, 3] = 1.0
    b = boxes_from_maps(m, (28, 28), threshold=0.5, min_size=4)[0].tolist()
    y0, x0, y1, x1 = b
    assert y1 - y0 == x1 - x0  # square
    # the peak cell (rows 8..12, cols 12..16 of the 28x28 input) lies inside the box
    assert y0 <= 8 and y1 >= 12 and x0 <= 12 and x1 >= 16
    assert (y1 - y0) <= 14  # a small region, not the whole image
    big = boxes_from_maps(m, (28, 28), threshold=0.5, min_size=20)[0].tolist()
    assert big[2] - big[0] == 20 and big[3] - big[1] == 20


def test_boxes_only_the_region_connected_to_the_recorded_peak():
    m = torch.zeros(1, 8, 8)
    m[0, 1, 1] = 1.0  # recorded peak
    m[0, 6, 6] = 1.0  # an equally strong, disconnected blob
    b = boxes_from_maps(m, (32, 32), positions=torch.tensor([1 * 8 + 1]), min_size=1)[0].tolist()
    assert b[2] <= 16 and b[3] <= 16  # the box stays near (1, 1)
    b2 = boxes_from_maps(m, (32, 32), positions=torch.tensor([6 * 8 + 6]), min_size=1)[0].tolist()
    assert b2[0] >= 16 and b2[1] >= 16


def test_boxes_shift_inside_border_full_and_nonpositive():
    m = torch.zeros(3, 4, 4)
    m[0, 0, 0] = 1.0  # corner: the square box is shifted inside the image
    m[1] = 1.0  # everywhere: the full box
    # m[2] all zero: nothing positive -> full box
    b = boxes_from_maps(m, (16, 16), min_size=6)
    assert b[0].tolist()[:2] == [0, 0] and min(b[0].tolist()[2:]) >= 6
    assert b[1].tolist() == list(FULL_BOX) and b[2].tolist() == list(FULL_BOX)
    with pytest.raises(ShapeError):
        boxes_from_maps(torch.zeros(4, 4), (8, 8))
    with pytest.raises(ArgumentError, match="threshold"):
        boxes_from_maps(m, (8, 8), threshold=0)


def test_crop_tensor_numpy_pil_and_scaling():
    img = torch.arange(28 * 28, dtype=torch.uint8).view(1, 28, 28)
    assert crop(img, FULL_BOX) is img
    c = crop(img, (2, 3, 12, 13))
    assert c.shape == (1, 10, 10) and int(c[0, 0, 0]) == int(img[0, 2, 3])
    arr = np.zeros((28, 28, 3), dtype=np.uint8)
    assert crop(arr, (0, 0, 5, 7)).shape == (5, 7, 3)
    from PIL import Image

    assert crop(Image.fromarray(arr), (0, 0, 5, 7)).size == (7, 5)
    # a box computed at 28x28 applied to a 56x56 image is scaled
    big = torch.zeros(3, 56, 56)
    assert crop(big, (2, 3, 12, 13), input_size=(28, 28)).shape == (3, 20, 20)
    with pytest.raises(ShapeError, match="does not fit"):
        crop(torch.zeros(1, 10, 10), (0, 0, 12, 12))
    with pytest.raises(ArgumentError):
        crop(img, (5, 5, 2, 2))


def test_image_source_kinds_and_missing_ids():
    ds = fashion().subset(20)
    src = ImageSource(ds)
    imgs = src.get([3, 1])
    assert imgs[0].shape == (28, 28) and torch.equal(imgs[1], ds.images[1])
    assert ImageSource(lambda i: torch.zeros(3, 4, 4)).get([7])[0].shape == (3, 4, 4)
    assert ImageSource([(torch.ones(1, 2, 2), 0)]).get([0])[0].shape == (1, 2, 2)
    with pytest.raises(ArgumentError, match="only 20 samples"):
        src.check_ids(torch.tensor([0, 25]))
    with pytest.raises(ArgumentError):
        ImageSource(42)


def test_full_examples_and_unique_pairs():
    st = make_store([[0, 1, 2], [2, 1, -1]])
    ex = concept_examples(st, mode="full", progress=False)
    le = ex["l"]
    assert le.valid.tolist() == [[True, True, True], [True, True, False]]
    assert le.boxes[1, 2].tolist() == [-1, -1, -1, -1]
    keys, index = ex.unique_pairs()
    assert keys[:, 0].tolist() == [0, 1, 2]
    assert index["l"].tolist() == [[0, 1, 2], [2, 1, -1]]
    shown = ex.images(torch.rand(5, 3, 8, 8), "l", 1)
    assert len(shown) == 2 and shown[0].shape == (3, 8, 8)
    ex2 = concept_examples(st, mode="full", k=2, progress=False)
    assert ex2["l"].k == 2
    with pytest.raises(ArgumentError, match="k must be"):
        concept_examples(st, k=5, progress=False)
    with pytest.raises(ArgumentError, match="needs model="):
        concept_examples(st, mode="activation", progress=False)
    with pytest.raises(ArgumentError, match="mode must be"):
        concept_examples(st, mode="blob", progress=False)


def _cnn_store(n=300, k=4, layers=("conv1", "conv3")):
    from semlens_fast.collect import collect

    ds = fashion().subset(n)
    return ds, collect(cnn(), ds, list(layers), k=k, pool="max", progress=False)


def test_activation_crops_on_the_fashion_cnn():
    ds, st = _cnn_store()
    ex = concept_examples(st, mode="activation", model=cnn(), data=ds, progress=False)
    assert ex.params["input_size"] == [28, 28]
    for name in ("conv1", "conv3"):
        b = ex[name].boxes[ex[name].valid]
        full = (b == 0).all(1)
        bb = b[~full]
        assert (bb[:, 2] > bb[:, 0]).all() and (bb[:, 3] > bb[:, 1]).all()
        assert (bb[:, :2] >= 0).all() and (bb[:, 2:] <= 28).all()
        assert ((bb[:, 2] - bb[:, 0]) == (bb[:, 3] - bb[:, 1])).all()  # square
    # conv1 (3x3 receptive field) crops are smaller than conv3 crops on average
    def mean_side(name):
        b = ex[name].boxes[ex[name].valid].float()
        side = torch.where((b == 0).all(1), torch.tensor(28.0), b[:, 2] - b[:, 0])
        return float(side.mean())

    assert mean_side("conv1") < mean_side("conv3")
    keys, index = ex.unique_pairs()
    le = ex["conv3"]
    got = keys[index["conv3"][le.valid]]
    assert torch.equal(got[:, 0], le.ids[le.valid]) and torch.equal(got[:, 1:], le.boxes[le.valid].long())


def test_activation_crops_refuse_a_store_from_another_model():
    ds, st = _cnn_store(n=120, k=3, layers=("conv2",))
    other = type(cnn())()
    other.load_state_dict(cnn().state_dict())
    with torch.no_grad():
        other.conv1.weight.mul_(1.5)
    with pytest.raises(StoreError, match="another model"):
        concept_examples(st, mode="activation", model=other, data=ds, progress=False)
    # without the fingerprint check, recomputing the activations catches it
    with pytest.raises(StoreError, match="do not match"):
        concept_examples(st, mode="activation", model=other, data=ds, check_model=False, progress=False)
    with pytest.raises(ArgumentError, match="data has 50 samples"):
        concept_examples(st, mode="activation", model=cnn(), data=ds.subset(50), progress=False)


def test_relevance_hook_boxes_follow_the_relevance_map():
    ds, st = _cnn_store(n=60, k=2, layers=("conv3",))
    seen = {}

    def relevance(model, x, layer, comps):
        seen["args"] = (x.shape, layer, comps.shape)
        r = torch.zeros(x.shape[0], 28, 28)
        r[:, 20:24, 2:6] = 1.0  # relevance in the lower-left corner
        return r

    ex = concept_examples(st, mode="relevance", model=cnn(), data=ds, relevance=relevance, min_size=4, progress=False)
    assert seen["args"][1] == "conv3" and seen["args"][0][1:] == (1, 28, 28)
    b = ex["conv3"].boxes[ex["conv3"].valid]
    assert (b[:, 0] >= 18).all() and (b[:, 3] <= 8).all()
    with pytest.raises(ArgumentError, match="relevance="):
        concept_examples(st, mode="relevance", model=cnn(), data=ds, progress=False)


class WordTokenizer:
    def __init__(self, vocab):
        self.vocab = vocab

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(self.vocab[i] for i in ids if not (skip_special_tokens and i == 0))


def test_token_windows_and_texts():
    vocab = ["[PAD]", "the", "cat", "sat", "on", "a", "mat", "dog", "ran"]
    input_ids = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 7, 8, 0, 0, 0]])
    mask = (input_ids != 0).long()
    st = make_store([[0, 1]], positions=[[2, 2]])
    le = token_windows(st, "l", attention_mask=mask, radius=1)
    assert le.boxes[0, 0].tolist() == [1, 0, 4, 0] and le.boxes[0, 1].tolist() == [1, 0, 3, 0]
    keys = torch.cat([le.ids.reshape(-1, 1), le.boxes.reshape(-1, 4).long()], 1)
    assert window_texts(input_ids, WordTokenizer(vocab), keys) == ["cat sat on", "dog ran"]
    with pytest.raises(ArgumentError):
        token_windows(st, "l", radius=-1)
