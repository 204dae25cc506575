"""SparseAutoencoder: SAELens-format files, validation, training, and SAE latents as components of
collect() on a transformer (equal to the fused op on the captured activations)."""
from __future__ import annotations

import json

import pytest
import torch

from semlens_fast.collect import collect
from semlens_fast.errors import ArgumentError, ShapeError, StoreError
from semlens_fast.ops import TopKState, sae_topk_update
from semlens_fast.sae import SparseAutoencoder, train_sae
from tests.test_transformers import TokenBatches, tiny_bert


def random_sae(d=32, L=70, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return SparseAutoencoder(torch.randn(d, L, generator=g) / d**0.5, torch.randn(L, generator=g) * 0.1 - 0.2,
                             torch.randn(d, generator=g) * 0.05, torch.randn(L, d, generator=g), name="rand", **kw)


def test_saelens_layout_round_trip(tmp_path):
    sae = random_sae(activation="jumprelu", threshold=torch.rand(70) * 0.3)
    sae.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["d_in"] == 32 and cfg["d_sae"] == 70 and cfg["architecture"] == "jumprelu"
    back = SparseAutoencoder.load(tmp_path / "s")
    assert back.fingerprint == sae.fingerprint and back.activation == "jumprelu"
    x = torch.randn(5, 32)
    assert torch.equal(back.encode(x), sae.encode(x))
    # a SAELens JumpReLU folder written with log_threshold instead of threshold
    from safetensors.torch import save_file

    (tmp_path / "j").mkdir()
    save_file({"W_enc": sae.W_enc.contiguous(), "b_enc": sae.b_enc, "b_dec": sae.b_dec, "W_dec": sae.W_dec,
               "log_threshold": sae.threshold.log()}, str(tmp_path / "j" / "sae_weights.safetensors"))
    (tmp_path / "j" / "cfg.json").write_text(json.dumps({"d_in": 32, "d_sae": 70, "architecture": "jumprelu"}))
    j = SparseAutoencoder.load(tmp_path / "j")
    assert torch.allclose(j.threshold, sae.threshold)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "cfg.json").write_text(json.dumps({"architecture": "topk"}))
    save_file({"W_enc": sae.W_enc.contiguous()}, str(tmp_path / "t" / "sae_weights.safetensors"))
    with pytest.raises(ArgumentError, match="not supported"):
        SparseAutoencoder.load(tmp_path / "t")
    with pytest.raises(StoreError, match="cfg.json"):
        SparseAutoencoder.load(tmp_path / "missing")


def test_bad_weights_are_refused_with_names_and_shapes():
    W = torch.randn(8, 5)
    W[3, 2] = float("nan")
    with pytest.raises(ArgumentError, match=r"W_enc \(shape \(8, 5\)\).*NaN.*\[3, 2\]"):
        SparseAutoencoder(W)
    with pytest.raises(ShapeError, match=r"b_enc must be \[L\] = \[5\]"):
        SparseAutoencoder(torch.randn(8, 5), torch.zeros(4))
    with pytest.raises(ArgumentError, match="threshold"):
        SparseAutoencoder(torch.randn(8, 5), activation="jumprelu")


def _captured(model, ds, layer, bs):
    mods = dict(model.named_modules())
    acts, masks = [], []
    cur = {}
    h = mods[layer].register_forward_hook(lambda m, i, o: cur.__setitem__("a", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.inference_mode():
            for s in range(0, len(ds), bs):
                b = ds.collate([ds[i] for i in range(s, min(len(ds), s + bs))])
                model(**b)
                acts.append(cur["a"].clone())
                masks.append(b["attention_mask"].bool())
    finally:
        h.remove()
    return acts, masks


@pytest.mark.parametrize("pool", ["max", "mean"])
def test_collect_with_sae_equals_the_fused_op_on_the_layer(pool):
    model = tiny_bert()
    ds = TokenBatches(30, seed=3)
    sae = random_sae()
    layer = "encoder.layer.1"
    st = collect(model, ds, ["encoder.layer.*.intermediate"], k=5, pool={layer: pool}, sae={layer: sae},
                 batch_size=8, collate_fn=ds.collate, progress=False)
    assert list(st.keys())[-1] == layer and st[layer].channels == 70
    assert st["encoder.layer.0.intermediate"].channels == 64  # neurons beside latents in one run
    assert st.meta["fingerprints"]["sae"][layer]["fingerprint"] == sae.fingerprint
    want = TopKState.empty(70, 5)
    off = 0
    for a, m in zip(*_captured(model, ds, layer, 8)):
        sae_topk_update(want, a, sae.W_enc, sae.b_enc, torch.arange(off, off + len(a)), pool=pool, b_dec=sae.b_dec, mask=m)
        off += len(a)
    assert st[layer].equal(want)
    if pool == "max":  # positions are token indices of real tokens
        lengths = torch.tensor([len(s) for s in ds.seqs])
        ok = st[layer].ids >= 0
        assert bool((st[layer].positions[ok].long() < lengths[st[layer].ids[ok]]).all())
    if pool == "max":
        # activation/relevance examples would hook the module's d-wide output, not the latents: refused
        from semlens_fast.examples import concept_examples

        with pytest.raises(ArgumentError, match=r"not available for SAE-latent layers \['encoder\.layer\.1'\]"):
            concept_examples(st, mode="activation", model=model, data=ds)
        assert concept_examples(st, layers=layer, mode="full").layers[layer].ids.shape == (70, 5)


def test_collect_refuses_an_sae_of_the_wrong_width():
    model = tiny_bert()
    ds = TokenBatches(8, seed=0)
    with pytest.raises(ShapeError, match=r"encoder\.layer\.0.*d = 16.*\(16, 70\).*\(8, \d+, 32\)"):
        collect(model, ds, [], k=2, sae={"encoder.layer.0": random_sae(d=16)}, batch_size=8,
                collate_fn=ds.collate, progress=False)
    with pytest.raises(ArgumentError, match="pool for SAE layer"):
        collect(model, ds, [], k=2, pool="absmax", sae={"encoder.layer.0": random_sae()},
                collate_fn=ds.collate, progress=False)
    with pytest.raises(ArgumentError, match="matches no module"):
        collect(model, ds, [], k=2, sae={"decoder.*": random_sae()}, collate_fn=ds.collate, progress=False)


def test_train_sae_reconstructs_and_is_sparse():
    g = torch.Generator().manual_seed(0)
    # data = sparse combinations of 24 directions in 16 dimensions
    D = torch.randn(24, 16, generator=g)
    codes = (torch.rand(4000, 24, generator=g) < 0.08) * torch.rand(4000, 24, generator=g) * 3
    x = codes @ D
    sae = train_sae(x, 48, l1=1.0, steps=1500, lr=3e-3, seed=0)
    z = sae.encode(x)
    rec = sae.decode(z)
    fvu = (rec - x).square().sum() / (x - x.mean(0)).square().sum()
    assert float(fvu) < 0.15
    assert float((z > 0).float().sum(1).mean()) < 12  # far fewer active latents than 48
