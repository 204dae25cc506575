"""collect(): exactness against an fp32 reference, ids, layer resolution, outputs, pools, bad input."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

from tests.helpers_collect import RandomImages, TinyCNN, assert_state_equals, exact_topk, full_activations, pool_ref
from semlens_fast.collect import LayerNotCalledError, collect, first_tensor, resolve_layers
from semlens_fast.errors import ArgumentError, ShapeError


@pytest.fixture(scope="module")
def tiny():
    return TinyCNN(0), RandomImages(150)


@pytest.mark.parametrize("pool", ["max", "mean", "absmax", "sum"])
def test_matches_exact_fp32_reference(tiny, pool):
    model, ds = tiny
    store = collect(model, ds, ["conv1", "block.0", "head"], k=7, pool=pool, batch_size=32, progress=False)
    ids = torch.arange(len(ds))
    for layer in ["conv1", "block.0"]:
        a = full_activations(model, ds.x, layer, 32)
        pooled, pos = pool_ref(a, pool)
        assert_state_equals(store[layer], exact_topk(pooled, ids, 7, pos))
        assert store.meta["shapes"][layer] == list(a.shape[1:])
    lin = full_activations(model, ds.x, "head", 32)
    ref = exact_topk(lin, ids, 7, torch.zeros_like(lin, dtype=torch.int32) if pool in ("max", "absmax") else None)
    if pool == "absmax":
        ref = exact_topk(lin.abs(), ids, 7, torch.zeros_like(lin, dtype=torch.int32))
    assert_state_equals(store["head"], ref)
    assert store.pools == {"conv1": pool, "block.0": pool, "head": pool}


def test_per_layer_pools_and_channels_last(tiny):
    model, ds = tiny
    model_cl = TinyCNN(0).to(memory_format=torch.channels_last)
    x_cl = ds.x.contiguous(memory_format=torch.channels_last)
    a = collect(model, ds, ["conv1", "block.0"], k=5, pool={"conv1": "mean"}, batch_size=50, progress=False)
    b = collect(model_cl, TensorDataset(x_cl), ["conv1", "block.0"], k=5, pool={"conv1": "mean"}, batch_size=50, progress=False)
    assert a.pools == {"conv1": "mean", "block.0": "max"}
    for n in a:
        assert torch.equal(a[n].ids, b[n].ids)
        assert torch.allclose(a[n].values, b[n].values, atol=1e-5)


def test_ids_are_dataset_indices_with_shuffle_and_sampler(tiny):
    model, ds = tiny
    ref = collect(model, ds, ["block.0"], k=6, batch_size=16, progress=False)
    g = torch.Generator().manual_seed(3)
    shuf = collect(model, DataLoader(ds, batch_size=16, shuffle=True, generator=g), ["block.0"], k=6, progress=False)
    assert shuf["block.0"].equal(ref["block.0"])
    subset = list(range(10, 150, 3))
    sub = collect(model, DataLoader(ds, batch_size=8, sampler=SubsetRandomSampler(subset)), ["block.0"], k=6, progress=False)
    a = full_activations(model, ds.x, "block.0")[subset]
    pooled, pos = pool_ref(a, "max")
    assert_state_equals(sub["block.0"], exact_topk(pooled, torch.tensor(subset), 6, pos))
    assert set(sub["block.0"].ids.flatten().tolist()) <= set(subset)


def test_unknown_layer_lists_closest_names(tiny):
    model, ds = tiny
    with pytest.raises(ArgumentError) as e:
        collect(model, ds, ["conv_1"], k=3, progress=False)
    assert "'conv_1'" in str(e.value) and "'conv1'" in str(e.value)
    with pytest.raises(ArgumentError, match="block.0"):
        resolve_layers(model, "block.O")
    with pytest.raises(ArgumentError, match="twice"):
        resolve_layers(model, ["conv1", "conv1"])


def test_forward_stops_after_last_requested_layer(tiny):
    model, ds = tiny
    model.calls.update(head=0, forward=0)
    collect(model, ds, ["block.0", "conv1"], k=3, batch_size=50, progress=False)
    assert model.calls["forward"] == 3 and model.calls["head"] == 0
    collect(model, ds, ["head"], k=3, batch_size=50, progress=False)
    assert model.calls["head"] == 3


def test_runs_in_inference_mode_and_eval_and_restores_modes(tiny):
    model, ds = tiny
    seen = {}

    def probe(m, i, o):
        seen["inference"] = torch.is_inference_mode_enabled()
        seen["training"] = m.training

    model.train()
    h = model.conv1.register_forward_hook(probe)
    try:
        collect(model, ds, ["conv1"], k=3, batch_size=50, progress=False)
    finally:
        h.remove()
    assert seen == {"inference": True, "training": False}
    assert model.training and model.conv1.training
    model.eval()


class Pair(nn.Module):
    def forward(self, x):
        return (x * 2, {"aux": -x})


class PairModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.pair = Pair()

    def forward(self, x):
        return self.pair(x)[0]


def test_tuple_outputs_first_tensor_rule_and_callable():
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(1))
    ds = TensorDataset(x)
    s1 = collect(PairModel(), ds, "pair", k=4, progress=False)
    assert_state_equals(s1["pair"], exact_topk(x * 2, torch.arange(30), 4, torch.zeros(30, 4, dtype=torch.int32)))
    s2 = collect(PairModel(), ds, "pair", k=4, output=lambda out: out[1]["aux"], progress=False)
    assert_state_equals(s2["pair"], exact_topk(-x, torch.arange(30), 4, torch.zeros(30, 4, dtype=torch.int32)))
    assert first_tensor(((1, [None, x]), x)) is x
    with pytest.raises(TypeError, match="output"):
        collect(PairModel(), ds, "pair", k=4, output=lambda out: "nope", progress=False)


class TokenModel(nn.Module):
    """[B, T, C] activations where padded tokens carry huge values (they must never win)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 6)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(50, 6, generator=torch.Generator().manual_seed(0)))
            self.emb.weight[0] = 1e6  # the pad token

    def forward(self, input_ids, attention_mask):
        return self.emb(input_ids).sum()


def _token_batches():
    g = torch.Generator().manual_seed(2)
    n, T = 40, 9
    ids = torch.randint(1, 50, (n, T), generator=g)
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    ids = ids.masked_fill(~mask, 0)
    return ids, mask.long(), lengths


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, ids, mask):
        self.ids, self.mask = ids, mask

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}


def test_tokens_masked_pools_and_positions():
    ids, mask, lengths = _token_batches()
    model = TokenModel()
    ds = DictDataset(ids, mask)
    st = collect(model, ds, ["emb"], k=5, pool={"emb": "max"}, batch_size=7, progress=False)
    emb = model.emb(ids).detach()  # [N, T, C]
    m = mask.bool().unsqueeze(2)
    mx = emb.masked_fill(~m, float("-inf"))
    ref = exact_topk(mx.amax(1), torch.arange(len(ids)), 5, mx.argmax(1).to(torch.int32))
    assert_state_equals(st["emb"], ref)
    assert bool((st["emb"].positions < lengths[st["emb"].ids]).all())  # pads never win
    # mean over real tokens only
    sm = collect(model, ds, ["emb"], k=5, pool="mean", batch_size=7, progress=False)
    mean = (emb.masked_fill(~m, 0).double().sum(1) / mask.sum(1, keepdim=True)).float()
    assert_state_equals(sm["emb"], exact_topk(mean, torch.arange(len(ids)), 5))
    # CLS (first token) and last real token
    sc = collect(model, ds, ["emb"], k=5, pool="cls", batch_size=7, progress=False)
    assert_state_equals(sc["emb"], exact_topk(emb[:, 0], torch.arange(len(ids)), 5, torch.zeros(len(ids), 6, dtype=torch.int32)))
    sl = collect(model, ds, ["emb"], k=5, pool=-1, batch_size=7, progress=False)
    last = lengths - 1
    ref = exact_topk(emb[torch.arange(len(ids)), last], torch.arange(len(ids)), 5, last.unsqueeze(1).expand(-1, 6).to(torch.int32))
    assert_state_equals(sl["emb"], ref)
    assert sc.pools == {"emb": "token[0]"} and sl.pools == {"emb": "token[-1]"}
    # absmax with a mask: value is max |x| over real tokens
    sa = collect(model, ds, ["emb"], k=5, pool="absmax", batch_size=7, progress=False)
    ab = emb.abs().masked_fill(~m, float("-inf"))
    assert_state_equals(sa["emb"], exact_topk(ab.amax(1), torch.arange(len(ids)), 5, ab.argmax(1).to(torch.int32)))
    # without a mask the pad tokens do win (the mask is what protects them)
    nm = collect(model, ds, ["emb"], k=5, attention_mask=None, batch_size=7, progress=False)
    assert float(nm["emb"].values.max()) >= 1e6


def test_callable_pool_with_positions_and_mask():
    ids, mask, lengths = _token_batches()
    model = TokenModel()

    def second_token(act, mask=None):
        return act[:, 1, :] * mask[:, 1:2], torch.ones(act.shape[0], dtype=torch.long)

    st = collect(model, DictDataset(ids, mask), ["emb"], k=4, pool=second_token, batch_size=8, progress=False)
    emb = model.emb(ids).detach()
    vals = emb[:, 1, :] * mask[:, 1:2]
    assert_state_equals(st["emb"], exact_topk(vals, torch.arange(len(ids)), 4, torch.ones(len(ids), 6, dtype=torch.int32)))
    assert st.pools["emb"].startswith("callable:")
    with pytest.raises(ShapeError, match="pool callable"):
        collect(model, DictDataset(ids, mask), ["emb"], k=4, pool=lambda a: a.sum(), progress=False)


class NaNModel(nn.Module):
    """Linear 'features' (identity) with NaN / +Inf / -Inf planted in some samples."""

    def __init__(self):
        super().__init__()
        self.feat = nn.Identity()

    def forward(self, x):
        return self.feat(x)


def test_nan_and_inf_excluded_counted_warned_once():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(60, 3, 2, 2, generator=g)
    x[3, 0, 0, 0] = float("nan")  # pooled NaN (max)
    x[10, 1] = float("inf")  # pooled +inf
    x[20, 2] = float("-inf")  # pooled -inf (whole map)
    x[40, 2, 0, 1] = float("inf")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        st = collect(NaNModel(), TensorDataset(x), ["feat"], k=70, batch_size=16, progress=False)["feat"]
    msgs = [str(m.message) for m in w if issubclass(m.category, RuntimeWarning)]
    assert len(msgs) == 1 and "non-finite" in msgs[0]
    assert st.nan_counts.tolist() == [1, 1, 2]
    assert bool(torch.isfinite(st.values[st.ids >= 0]).all())
    for c, bad in [(0, {3}), (1, {10}), (2, {20, 40})]:
        got = set(st.ids[c][st.ids[c] >= 0].tolist())
        assert got == set(range(60)) - bad
    # the finite entries are exactly the reference
    pooled = x.flatten(2).amax(2)
    pooled[~torch.isfinite(pooled)] = float("nan")
    ref = exact_topk(pooled, torch.arange(60), 70, x.flatten(2).nan_to_num(float("-inf")).argmax(2).to(torch.int32))
    assert torch.equal(st.ids, ref[1]) and torch.equal(st.values, ref[0])
    # mean pool: +inf is counted; a -inf mean that cannot reach a full top-k is only
    # counted with strict_finite=True (it is excluded either way)
    sm = collect(NaNModel(), TensorDataset(x), ["feat"], k=5, pool="mean", batch_size=16, progress=False)["feat"]
    assert sm.nan_counts.tolist() == [1, 1, 1] and 20 not in sm.ids.tolist()
    ss = collect(NaNModel(), TensorDataset(x), ["feat"], k=5, pool="mean", batch_size=16, strict_finite=True, progress=False)
    assert ss["feat"].nan_counts.tolist() == [1, 1, 2] and torch.equal(ss["feat"].ids, sm.ids)


def test_strict_finite_counts_unreachable_minus_inf():
    x = torch.ones(20, 2, 1, 1)
    x[15, 0] = float("-inf")
    lax = collect(NaNModel(), TensorDataset(x), ["feat"], k=3, batch_size=4, progress=False)["feat"]
    strict = collect(NaNModel(), TensorDataset(x), ["feat"], k=3, batch_size=4, strict_finite=True, progress=False)["feat"]
    assert lax.ids.equal(strict.ids) and strict.nan_counts.tolist() == [1, 0]


def test_empty_dataset_and_k_larger_than_data(tiny):
    model, _ = tiny
    with pytest.raises(ArgumentError, match="no samples"):
        collect(model, RandomImages(0), ["conv1"], k=3, progress=False)
    with pytest.warns(UserWarning, match="larger than the dataset"):
        st = collect(model, RandomImages(4), ["block.0"], k=6, progress=False)["block.0"]
    assert (st.ids[:, :4] >= 0).all() and (st.ids[:, 4:] == -1).all()
    assert torch.isinf(st.values[:, 4:]).all() and (st.positions[:, 4:] == -1).all()
    with pytest.raises(ArgumentError, match="k must be"):
        collect(model, RandomImages(4), ["conv1"], k=0, progress=False)


def test_layer_never_called(tiny):
    model, ds = tiny
    model.unused = nn.Linear(2, 2)
    try:
        with pytest.raises(LayerNotCalledError, match="unused"):
            collect(model, ds, ["conv1", "unused"], k=3, progress=False)
    finally:
        del model.unused


def test_bad_pool_and_shapes(tiny):
    model, ds = tiny
    with pytest.raises(ArgumentError, match="pool for layer 'conv1'"):
        collect(model, ds, ["conv1"], k=3, pool="median", progress=False)
    with pytest.raises(ShapeError, match="token-position"):
        collect(model, ds, ["conv1"], k=3, pool=0, progress=False)
    with pytest.raises(ArgumentError, match="not in layers"):
        collect(model, ds, ["conv1"], k=3, pool={"conv2": "max"}, progress=False)


def test_conv1d_and_5d_layouts():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(2, 3, 3)
            self.c3 = nn.Conv3d(1, 2, 1)

        def forward(self, x):
            y = self.c1(x.flatten(2)[:, :2])
            return self.c3(x[:, :1].unsqueeze(2).expand(-1, -1, 2, -1, -1)), y

    torch.manual_seed(0)
    m = M()
    x = torch.randn(25, 3, 4, 4)
    st = collect(m, TensorDataset(x), ["c1", "c3"], k=4, batch_size=10, progress=False)
    with torch.no_grad():
        a1 = m.c1(x.flatten(2)[:, :2])
        a3 = m.c3(x[:, :1].unsqueeze(2).expand(-1, -1, 2, -1, -1))
    assert_state_equals(st["c1"], exact_topk(a1.amax(2), torch.arange(25), 4, a1.argmax(2).to(torch.int32)))
    f3 = a3.flatten(2)
    assert_state_equals(st["c3"], exact_topk(f3.amax(2), torch.arange(25), 4, f3.argmax(2).to(torch.int32)))
    assert st.meta["layouts"] == {"c1": "BCL", "c3": "BCSSS"}


def test_bf16_autocast_mode_runs(tiny):
    model, ds = tiny
    fp32 = collect(model, ds, ["block.0"], k=5, batch_size=50, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "slower than float32 here" on CPUs without bf16 units
        bf = collect(model, ds, ["block.0"], k=5, batch_size=50, autocast=torch.bfloat16, progress=False)
    assert bf["block.0"].values.dtype == torch.float32
    assert torch.allclose(bf["block.0"].values, fp32["block.0"].values, rtol=0.05, atol=0.05)
    assert bf.fingerprints["autocast"] == "torch.bfloat16"
