"""collect() on Hugging Face transformers by module-name globs: random-config BERT, GPT-2 and
LLaMA (no download), every MLP layer at once, token pooling with attention masks, against an
exact reference computed from hooks on the same batches."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import Dataset

from semlens_fast.collect import collect, resolve_layers
from semlens_fast.errors import ArgumentError, ShapeError
from semlens_fast.layers import glob_to_regex
from tests.helpers_collect import exact_topk

tf = pytest.importorskip("transformers")


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tf.logging.set_verbosity_error()
        return fn()


def tiny_bert():
    cfg = tf.BertConfig(vocab_size=90, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return _quiet(lambda: tf.BertModel(cfg)).eval()


def tiny_gpt2():
    cfg = tf.GPT2Config(vocab_size=90, n_embd=32, n_layer=3, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(1)
    return _quiet(lambda: tf.GPT2Model(cfg)).eval()


def tiny_llama():
    cfg = tf.LlamaConfig(vocab_size=90, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=48, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(2)
    return _quiet(lambda: tf.LlamaModel(cfg)).eval()


class TokenBatches(Dataset):
    """Random token sequences of random length; ``collate`` pads right (or left) and makes the mask."""

    def __init__(self, n: int, seed: int, max_len: int = 12, left: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.seqs = [torch.randint(1, 90, (int(torch.randint(1, max_len + 1, (1,), generator=g)),), generator=g) for _ in range(n)]
        self.left = left

    def __len__(self):
        return len(self.seqs)

    def __getitem__(self, i):
        return self.seqs[i]

    def collate(self, seqs):
        T = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), T, dtype=torch.int64)
        mask = torch.zeros(len(seqs), T, dtype=torch.int64)
        for r, s in enumerate(seqs):
            sl = slice(T - len(s), T) if self.left else slice(0, len(s))
            ids[r, sl], mask[r, sl] = s, 1
        return {"input_ids": ids, "attention_mask": mask}


MODELS = {
    "bert": (tiny_bert, "encoder.layer.*.intermediate", 64),
    "gpt2": (tiny_gpt2, "h.*.mlp.act", 128),
    "llama": (tiny_llama, "layers.*.mlp.down_proj@input", 48),
}


def _reference(model, ds, names, batch_size):
    """Per layer: the masked max over real tokens of every sample, its first token index."""
    mods = dict(model.named_modules())
    vals = {n: [] for n in names}
    pos = {n: [] for n in names}
    cur = {}
    hooks = []
    for n in names:
        base = n.split("@")[0]
        hooks.append(mods[base].register_forward_hook(
            lambda m, i, o, n=n: cur.__setitem__(n, (i[0] if n.endswith("@input") else o))))
    try:
        with torch.inference_mode():
            for s in range(0, len(ds), batch_size):
                b = ds.collate([ds[i] for i in range(s, min(len(ds), s + batch_size))])
                model(**b)
                m = b["attention_mask"].bool().unsqueeze(2)
                for n in names:
                    a = cur[n].float().masked_fill(~m, float("-inf"))
                    vals[n].append(a.amax(1))
                    pos[n].append(a.argmax(1).to(torch.int32))
    finally:
        for h in hooks:
            h.remove()
    return {n: (torch.cat(vals[n]), torch.cat(pos[n])) for n in names}


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("left", [False, True])
def test_mlp_neurons_of_every_layer_by_glob(family, left):
    make, glob, width = MODELS[family]
    model = make()
    names = list(resolve_layers(model, glob))
    assert len(names) == 3 and names[0].startswith(glob.split("*")[0])
    ds = TokenBatches(40, seed=len(family) + left, left=left)
    st = collect(model, ds, glob, k=6, pool="max", batch_size=16, collate_fn=ds.collate, progress=False)
    assert list(st.keys()) == names
    ref = _reference(model, ds, names, 16)
    ids = torch.arange(len(ds))
    lengths = torch.tensor([len(s) for s in ds.seqs])
    for n in names:
        v, p = ref[n]
        want = exact_topk(v, ids, 6, p)
        s = st[n]
        assert s.values.shape == (width, 6)
        assert torch.equal(s.ids, want[1]) and torch.equal(s.values, want[0]) and torch.equal(s.positions, want[2])
        # the max token is a real token: within the sample's span of the padded sequence
        T = torch.tensor([max(len(ds.seqs[i]) for i in range(b, min(len(ds), b + 16))) for b in range(0, len(ds), 16)])
        Tb = T[s.ids // 16]
        lo = (Tb - lengths[s.ids]) if left else torch.zeros_like(Tb)
        assert bool(((s.positions.long() >= lo) & (s.positions.long() < lo + lengths[s.ids])).all())
        assert st.meta["layouts"][n] == "BTC"


def test_glob_pool_mapping_and_mean_pool():
    model = tiny_bert()
    ds = TokenBatches(24, seed=5)
    glob = "encoder.layer.*.intermediate"
    st = collect(model, ds, [glob, "encoder.layer.2.output.dense"], k=4,
                 pool={glob: "mean", "encoder.layer.2.intermediate": "max"}, batch_size=8,
                 collate_fn=ds.collate, progress=False)
    assert st.pools["encoder.layer.0.intermediate"] == "mean"
    assert st.pools["encoder.layer.2.intermediate"] == "max"  # the exact name wins over the glob
    assert st.pools["encoder.layer.2.output.dense"] == "max"
    assert len(st) == 4


def test_glob_semantics():
    rx = glob_to_regex("encoder.layer.*.intermediate")
    assert rx.match("encoder.layer.11.intermediate")
    assert not rx.match("encoder.layer.1.attention.intermediate")
    assert glob_to_regex("**.act").match("h.0.mlp.act") and glob_to_regex("**.act").match("act")
    assert glob_to_regex("h.[0-1].mlp").match("h.1.mlp") and not glob_to_regex("h.[0-1].mlp").match("h.2.mlp")
    model = tiny_gpt2()
    assert list(resolve_layers(model, "h.*")) == ["h.0", "h.1", "h.2"]
    # overlapping globs keep each module once, in model order
    assert list(resolve_layers(model, ["h.1", "h.*"])) == ["h.1", "h.0", "h.2"]


def test_bad_layer_specs_name_close_modules():
    model = tiny_bert()
    with pytest.raises(ArgumentError, match=r"matches no module.*encoder\.layer\.0\.intermediate"):
        resolve_layers(model, "encoder.layers.*.intermediate")
    with pytest.raises(ArgumentError, match="is not a module"):
        resolve_layers(model, "encoder.layer.9")
    with pytest.raises(ArgumentError, match="unclosed"):
        resolve_layers(model, "encoder.layer.[0.intermediate")
    ds = TokenBatches(8, seed=0)
    with pytest.raises(ArgumentError, match="not in layers"):
        collect(model, ds, "encoder.layer.*.intermediate", k=2, pool={"decoder.*": "mean"},
                collate_fn=ds.collate, progress=False)


def _t(out):
    return out[0] if isinstance(out, tuple) else out


def test_output_of_unexpected_rank_names_the_layer():
    model = tiny_bert()
    ds = TokenBatches(8, seed=0)
    # the attention mask is not an activation: [B, T] int64 -> clear error naming the layer
    with pytest.raises((ShapeError, TypeError), match="encoder.layer.0"):
        collect(model, ds, "encoder.layer.0", k=2, output=lambda out: _t(out).sum(-1).long(),
                collate_fn=ds.collate, progress=False)
    with pytest.raises(ShapeError, match=r"encoder\.layer\.0.*shape \(8,\)"):
        collect(model, ds, "encoder.layer.0", k=2, output=lambda out: _t(out)[:, 0, 0],
                collate_fn=ds.collate, batch_size=8, progress=False)


@pytest.mark.parametrize("pool", ["max", "absmax"])
@pytest.mark.parametrize("sort", [False, True])
def test_right_padding_is_read_in_place_with_the_same_results(pool, sort, monkeypatch):
    """Right-padded batches: the kernel reads each run of samples' valid tokens in place (no
    masked copy of [B, T, C]); values, ids, positions and NaN counts equal the masked path's, also
    when a NaN sends a batch to the exact slow path and when equal lengths form runs."""
    import semlens_fast.collect as col

    model = tiny_bert()
    ds = TokenBatches(40, seed=7)
    if sort:  # sorted lengths: consecutive samples of equal length go in one kernel call
        ds.seqs.sort(key=len)
    poison = {"n": 0}

    def hook(m, i, o):  # one NaN in a real token of the first sample of the second batch
        poison["n"] += 1
        if poison["n"] == 2:
            o = o.clone()
            o[0, 0, 3] = float("nan")
            return o

    layer = "encoder.layer.1.intermediate"
    h = dict(model.named_modules())[layer].register_forward_hook(hook)
    calls = {"runs": 0}
    real = col._prefix_runs

    def spy(mask, act):
        r = real(mask, act)
        calls["runs"] += r is not None
        return r

    try:
        monkeypatch.setattr(col, "PREFIX_MIN_ELEMENTS", 1 << 40)
        want = collect(model, ds, "encoder.layer.*.intermediate", k=6, pool=pool, batch_size=16,
                       collate_fn=ds.collate, progress=False)
        poison["n"] = 0
        monkeypatch.setattr(col, "PREFIX_MIN_ELEMENTS", 0)
        monkeypatch.setattr(col, "_prefix_runs", spy)
        got = collect(model, ds, "encoder.layer.*.intermediate", k=6, pool=pool, batch_size=16,
                      collate_fn=ds.collate, progress=False)
    finally:
        h.remove()
    assert calls["runs"] == 3 * 3  # 3 layers x 3 batches, every one read in place
    assert int(want[layer].nan_counts.sum()) == 1
    for n in want.keys():
        assert got[n].equal(want[n]), n
