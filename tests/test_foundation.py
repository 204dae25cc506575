"""Foundation models: the interface, input validation, the offline implementations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from semlens_fast.errors import ArgumentError, DTypeError, ShapeError, StoreError
from semlens_fast.foundation import FoundationModel, ModalityError
from tests.test_concepts_shared import (
    HELDOUT, TinyImageFM, TinyTextFM, aligned, cached_embeddings, fashion, minilm, mobilenet,
)


# ---------------------------------------------------------------------- the interface (fast, synthetic)


def test_preprocess_accepts_grey_uint8_lists_pil_numpy():
    fm = TinyImageFM()
    g = torch.rand(2, 1, 5, 7)
    x = fm.preprocess(g)
    assert x.shape == (2, 3, 8, 8)
    # grey repeated to RGB: every channel equal before normalisation
    assert torch.allclose(x[:, 0], x[:, 1]) and torch.allclose(x[:, 1], x[:, 2])
    u8 = (g * 255).round().to(torch.uint8)
    assert torch.allclose(fm.preprocess(u8), fm.preprocess(u8.float() / 255), atol=1e-6)
    # a list of crops of different sizes
    crops = [torch.rand(3, 4, 4), torch.rand(1, 10, 6), torch.rand(3, 8, 8)]
    y = fm.preprocess(crops)
    assert y.shape == (3, 3, 8, 8)
    assert torch.allclose(y[1], fm.preprocess(crops[1])[0])
    from PIL import Image

    arr = (np.random.default_rng(0).random((9, 9, 3)) * 255).astype(np.uint8)
    assert torch.allclose(fm.preprocess(Image.fromarray(arr)), fm.preprocess(arr), atol=1e-6)
    assert torch.allclose(fm.preprocess(arr), fm.preprocess([torch.from_numpy(arr).permute(2, 0, 1)]), atol=1e-6)


@pytest.mark.parametrize(
    "img, err, words",
    [
        (torch.rand(4, 8, 8), ShapeError, "4 channels"),
        (torch.rand(2, 8, 8), ShapeError, "2 channels"),
        (torch.randn(1, 3, 8, 8) * 3, ArgumentError, "not model-normalised"),
        (torch.randint(0, 255, (3, 8, 8), dtype=torch.uint8), ShapeError, "ambiguous"),
        (torch.rand(3, 1, 8), ShapeError, "1x8 pixels"),
        (torch.ones(3, 8, 8, dtype=torch.int64), DTypeError, "uint8"),
        (torch.rand(2, 2, 3, 8, 8), ShapeError, "[B, C, H, W]"),
    ],
)
def test_preprocess_rejects_bad_images(img, err, words):
    with pytest.raises(err, match=None) as ei:
        TinyImageFM().encode_images(img)
    assert words in str(ei.value)


def test_pil_rgba_rejected():
    from PIL import Image

    with pytest.raises(ShapeError, match="RGBA"):
        TinyImageFM().preprocess(Image.new("RGBA", (8, 8)))


def test_encode_images_batched_normalised_counted():
    fm = TinyImageFM()
    x = torch.rand(10, 3, 8, 8)
    a = fm.encode_images(x, batch_size=3)
    b = fm.encode_images(x, batch_size=100)
    assert a.shape == (10, 16) and a.dtype == torch.float32
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(a.norm(dim=1), torch.ones(10), atol=1e-5)
    assert fm.images_encoded == 20
    pre = fm.preprocess(x)
    assert torch.allclose(fm.encode_images(pre, preprocessed=True), a, atol=1e-6)
    assert fm.encode_images([]).shape == (0, 16)


def test_fingerprint_stable_and_sensitive():
    a, b, c = TinyImageFM(seed=0), TinyImageFM(seed=0), TinyImageFM(seed=1)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    assert a.fingerprint != c.fingerprint
    d = TinyImageFM(seed=0)
    d.image_size = 16  # config change
    assert d.fingerprint != a.fingerprint


def test_modality_errors_name_the_model_to_use():
    with pytest.raises(ModalityError) as ei:
        TinyImageFM().encode_texts(["a dog"])
    msg = str(ei.value)
    assert "vision-only" in msg and "Aligned" in msg and "OpenCLIP" in msg
    with pytest.raises(ModalityError, match="text-only"):
        TinyTextFM().encode_images(torch.rand(1, 3, 8, 8))
    assert isinstance(ModalityError("x"), ValueError)


def test_autocast_validation():
    with pytest.raises(ArgumentError, match="autocast"):
        FoundationModel(autocast="fp8")
    fm = TinyImageFM()
    assert fm._autocast_ctx() is not None  # CPU: no autocast, a null context
    from semlens_fast.foundation.base import _autocast_dtype

    assert _autocast_dtype("auto", torch.device("cpu")) is None
    assert _autocast_dtype(torch.float16, torch.device("cuda")) is torch.float16


def test_base_class_is_abstract_for_dim():
    with pytest.raises(NotImplementedError):
        FoundationModel().dim  # noqa: B018


# ---------------------------------------------------------------------- OpenCLIP (random small config: code path only)

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_openclip_small_random_config_and_local_checkpoint(tmp_path):
    from semlens_fast.foundation import OpenCLIP

    torch.manual_seed(0)
    m = OpenCLIP("semlens-test-tiny", model_cfg=TINY_CLIP)
    assert m.random_weights and m.dim == 32 and m.image_size == 32 and m.modalities == {"image", "text"}
    e = m.encode_images(torch.rand(3, 1, 28, 28))
    t = m.encode_texts(["a photo of a bag", "a sandal"])
    assert e.shape == (3, 32) and t.shape == (2, 32)
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    ck = tmp_path / "tiny.pt"
    torch.save(m.model.state_dict(), ck)
    m2 = OpenCLIP("semlens-test-tiny", checkpoint=ck, model_cfg=TINY_CLIP)
    assert m2.fingerprint == m.fingerprint  # same weights, same config
    assert torch.allclose(m2.encode_texts(["a sandal"]), t[1:], atol=1e-5)
    with pytest.raises(ArgumentError, match="not a file"):
        OpenCLIP("semlens-test-tiny", checkpoint=tmp_path / "missing.pt", model_cfg=TINY_CLIP)


# ---------------------------------------------------------------------- offline real models


def test_packaged_vision_real_weights():
    v = mobilenet()
    assert v.dim == 1280 and v.modalities == {"image"}
    ds = fashion()
    x = ds.images[:6].unsqueeze(1)
    a = v.encode_images(x, batch_size=4)
    assert a.shape == (6, 1280)
    assert torch.allclose(a, v.encode_images(x), atol=1e-4)
    with pytest.raises(ModalityError, match="vision-only"):
        v.encode_texts("a trouser")
    with pytest.raises(ArgumentError, match="multiple of 32"):
        type(v)(image_size=30)


def test_sentence_transformer_minilm_offline():
    t = minilm()
    assert t.dim == 384 and t.modalities == {"text"}
    e = t.encode_texts(["a photo of a sneaker", "a picture of a running shoe", "a tax form"])
    assert e.shape == (3, 384)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2])
    assert len(t.fingerprint) == 64
    with pytest.raises(ModalityError, match="text-only"):
        t.encode_images(torch.rand(1, 3, 8, 8))


def test_aligned_maps_images_near_their_class_caption(tmp_path):
    al = aligned()
    ds = fashion()
    assert al.dim == 384 and al.modalities == {"image", "text"}
    assert al.fit_info["train_accuracy"] > 0.6
    E = cached_embeddings(al, ds.images, HELDOUT[:200])
    T = al.class_embeddings()
    acc = float(((E @ T.T).argmax(1) == ds.labels[HELDOUT[:200]]).float().mean())
    assert acc > 0.45, acc  # chance: 0.1 (32-px MobileNetV2 features, 1000 fit images)
    # save / load round trip; loading for another text model is refused
    p = al.save(tmp_path / "map.safetensors")
    al2 = type(al).load(p, al.vision, al.text)
    assert al2.fingerprint == al.fingerprint and al2.classes == al.classes
    with pytest.raises(StoreError, match="text model"):
        type(al).load(p, al.vision, TinyTextFM(384))
    with pytest.raises(ShapeError):
        type(al)(al.vision, al.text, al.W[:10], al.b, al.mu)


def test_aligned_fit_bad_labels():
    from semlens_fast.foundation import Aligned

    v, t = TinyImageFM(), TinyTextFM()
    with pytest.raises(ArgumentError, match="labels must index"):
        Aligned.fit(v, t, torch.rand(4, 3, 8, 8), [0, 1, 2, 5], ["a", "b", "c"])
    with pytest.raises(ShapeError, match="one label per image"):
        Aligned.fit(v, t, torch.rand(4, 3, 8, 8), [0, 1, 1], ["a", "b"])
    al = Aligned.fit(v, t, torch.rand(6, 3, 8, 8), [0, 1, 0, 1, 0, 1], ["cat", "dog"])
    assert al.encode_images(torch.rand(2, 3, 8, 8)).shape == (2, 16)
