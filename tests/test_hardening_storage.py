"""Issues 20/21, the storage layer: two writers, damaged artifacts, temp files, bad input of
collect / TopKStore / ConceptDB / EmbeddingIndex (each case failed before the fix)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from semlens_fast.collect import ModelInputError, collect
from semlens_fast.concepts import ConceptDB, EmbeddingCache, build_concept_db
from semlens_fast.errors import ArgumentError, ConcurrentWriteError, DeviceError, DTypeError, StoreError
from semlens_fast.index import EmbeddingIndex, normalise
from semlens_fast.store import TopKStore
from tests.helpers_collect import REPO, RandomImages, TinyCNN
from tests.test_concepts_shared import TinyImageFM, make_store


def images(n=50, seed=0):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def two_layer_store():
    a = make_store([[0, 1, 2], [3, 4, -1], [5, -1, -1]], layer="a")
    b = make_store([[2, 6, 7], [8, 9, 0], [1, 3, 5]], layer="b")
    a.layers.update(b.layers)
    a.meta["pools"].update(b.meta["pools"])
    return a


# ---------------------------------------------------------------------- 20.4 / 21.4 concurrent index saves

_SAVER = textwrap.dedent("""
    import os, sys, time, torch
    sys.path.insert(0, {repo!r})
    from semlens_fast.index import EmbeddingIndex
    seed, folder, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    ix = EmbeddingIndex.from_tensors(torch.randn(20000, 32, generator=torch.Generator().manual_seed(seed)))
    print("ready", flush=True)
    for r in range(rounds):
        while not os.path.exists(os.path.join(folder, f"go{{r}}")):
            time.sleep(0.0005)
        try:
            ix.save(os.path.join(folder, f"ix{{r}}"))
            print("saved", time.time(), flush=True)
        except Exception as e:
            print("refused", type(e).__name__, flush=True)
""")


def test_concurrent_index_saves_never_mix(tmp_path):
    """Two processes save different indexes to one folder at the same instant, 6 rounds: each
    round the index loads (verified) and holds exactly the vectors of the writer that saved
    last; a refused writer says so. Before: 12 of 20 rounds unloadable (issue figure: 20/20)."""
    rounds = int(os.environ.get("SEMLENS_HARDEN_ROUNDS", "6"))  # SEMLENS_HARDEN_ROUNDS=20: the figure
    script = tmp_path / "saver.py"
    script.write_text(_SAVER.format(repo=REPO))
    procs = [subprocess.Popen([sys.executable, str(script), str(s), str(tmp_path), str(rounds)], stdout=subprocess.PIPE,
                              text=True) for s in (1, 2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    vecs = {s: normalise(torch.randn(20000, 32, generator=torch.Generator().manual_seed(s)), torch.float32) for s in (1, 2)}
    try:
        for r in range(rounds):
            (tmp_path / f"go{r}").write_text("")
            outs = [p.stdout.readline().split() for p in procs]
            saved = [(float(o[1]), seed) for o, seed in zip(outs, (1, 2)) if o[0] == "saved"]
            refused = [o for o in outs if o[0] == "refused"]
            assert saved and all(o[1] == "ConcurrentWriteError" for o in refused), outs
            path = tmp_path / f"ix{r}"
            assert torch.equal(EmbeddingIndex.load(path).vectors, vecs[max(saved)[1]])
            assert [f.name for f in path.iterdir() if f.name.startswith(".")] == [".lock"]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_index_save_cleans_temp_files_of_an_interrupted_save(tmp_path):
    ix = EmbeddingIndex.from_tensors(torch.randn(10, 4))
    ix.save(tmp_path / "ix")
    (tmp_path / "ix" / ".vectors.partial").write_bytes(b"old writer")       # name of the old code
    (tmp_path / "ix" / ".vectors.abc123.partial").write_bytes(b"killed writer")
    (tmp_path / "ix" / ".manifest.json.x.tmp").write_bytes(b"{")
    ix.save(tmp_path / "ix")
    assert sorted(f.name for f in (tmp_path / "ix").iterdir() if f.name.startswith(".")) == [".lock"]
    assert len(EmbeddingIndex.load(tmp_path / "ix")) == 10


def test_index_save_to_a_file_or_unwritable_place(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    ix = EmbeddingIndex.from_tensors(torch.randn(3, 4))
    for bad in (f, f / "sub"):
        with pytest.raises(ArgumentError, match="index path"):
            ix.save(bad)
    assert f.read_text() == "x"


def test_index_add_refuses_negative_or_float_neuron_ids():
    ix = EmbeddingIndex(4)
    with pytest.raises(ArgumentError, match=">= 0"):
        ix.add(torch.randn(2, 4), layer="l", neurons=[0, -3])
    with pytest.raises(DTypeError, match="integers"):
        ix.add(torch.randn(2, 4), layer="l", neurons=[0.5, 1.5])
    assert len(ix) == 0


def test_index_rows_file_is_verified(tmp_path):
    ix = EmbeddingIndex.from_layers({"a": torch.randn(5, 4), "b": torch.randn(3, 4)})
    ix.save(tmp_path / "ix")
    man = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    rows = tmp_path / "ix" / man["rows_file"]
    from safetensors.torch import load_file, save_file

    t = load_file(str(rows))
    t["neuron"][0] = 4  # points row 0 at another component: same size, still valid safetensors
    save_file(t, str(rows))
    with pytest.raises(StoreError, match="checksum|SHA-256"):
        EmbeddingIndex.load(tmp_path / "ix")


def test_index_manifest_file_names_stay_in_the_folder(tmp_path):
    ix = EmbeddingIndex.from_tensors(torch.randn(3, 4))
    ix.save(tmp_path / "ix")
    man = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    (tmp_path / "ix" / "manifest.json").write_text(json.dumps(dict(man, vectors_file="../elsewhere.safetensors")))
    with pytest.raises(StoreError, match="plain file name"):
        EmbeddingIndex.load(tmp_path / "ix")


# ---------------------------------------------------------------------- 20.4 two collects into one store

_COLLECT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from tests.helpers_collect import TinyCNN, RandomImages
    from semlens_fast.collect import collect

    class Slow(TinyCNN):
        def forward(self, x):
            time.sleep(0.05)
            return super().forward(x)

    print("start", flush=True)
    collect(Slow(0), RandomImages(400), ["conv1"], k=3, batch_size=8, store=sys.argv[1], checkpoint_every=1,
            progress=False)
""")


def test_second_collect_into_one_store_is_refused_and_the_first_finishes(tmp_path):
    script = tmp_path / "c.py"
    script.write_text(_COLLECT.format(repo=REPO))
    p = subprocess.Popen([sys.executable, str(script), str(tmp_path / "s")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "start"
    deadline = time.time() + 120
    while not (tmp_path / "s" / "manifest.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    with pytest.raises(ConcurrentWriteError, match="top-k store"):
        collect(TinyCNN(0), RandomImages(400), ["conv1"], k=3, batch_size=8, store=tmp_path / "s", progress=False)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    st = TopKStore.load(tmp_path / "s")
    assert st.complete and st.equal(collect(TinyCNN(0), RandomImages(400), ["conv1"], k=3, batch_size=8, progress=False))


# ---------------------------------------------------------------------- 20.6 collect: bad input

@pytest.mark.parametrize("bad,what", [
    ([(torch.zeros(1, 8, 8), 0)] * 4, "3 channels"),                     # wrong channel count
    ([(torch.zeros(3, 8, 8, dtype=torch.uint8), 0)] * 4, "uint8"),       # wrong dtype
    (["a text"] * 4, "str"),                                              # wrong type
])
def test_collect_on_data_the_model_cannot_take_names_the_module_and_shapes(bad, what, tmp_path):
    with pytest.raises(ModelInputError, match=r"module 'conv1'") as ei:
        collect(TinyCNN(0), bad, ["conv1", "head"], k=2, progress=False, store=tmp_path / "s")
    assert what in str(ei.value) and "data set yields" in str(ei.value)
    assert isinstance(ei.value, ArgumentError)
    assert not (tmp_path / "s" / "topk-00000001.safetensors").exists()


def test_collect_keeps_a_model_error_of_a_later_batch():
    class Fails(TinyCNN):
        def forward(self, x):
            self.calls["forward"] += 1
            if self.calls["forward"] > 1:
                raise RuntimeError("boom in batch 2")
            return super().forward(x)

    with pytest.raises(RuntimeError, match="boom in batch 2"):
        collect(Fails(0), RandomImages(20), ["head"], k=2, batch_size=8, progress=False)


@pytest.mark.parametrize("device,match", [
    ("cuda", "CUDA is not available"), ("cuda:0", "CUDA is not available"), ("gpu", "not a device"),
    ("", "not a device"), ("mps", "MPS is not available"), ("meta", "meta"), (3.5, "device string"),
])
def test_collect_device_strings(device, match):
    if str(device).startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceError, match=match):
        collect(TinyCNN(0), RandomImages(8), ["conv1"], k=2, device=device, progress=False)


def test_collect_model_on_meta_device():
    with torch.device("meta"):
        m = torch.nn.Sequential(torch.nn.Linear(3, 4))
    with pytest.raises(DeviceError, match="meta"):
        collect(m, torch.utils.data.TensorDataset(torch.randn(4, 3)), ["0"], k=2, progress=False)


def test_collect_store_path_is_a_file_or_unwritable(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    for bad in (f, f / "sub"):
        with pytest.raises(ArgumentError, match="store"):
            collect(TinyCNN(0), RandomImages(8), ["conv1"], k=2, store=bad, progress=False)
    st = collect(TinyCNN(0), RandomImages(8), ["conv1"], k=2, progress=False)
    for bad in (f, f / "sub"):
        with pytest.raises(ArgumentError, match="store"):
            st.save(bad)
    assert f.read_text() == "x"


def test_collect_huge_k_is_an_argument_error_not_an_allocation_failure():
    with pytest.warns(UserWarning, match="larger than the dataset"):
        with pytest.raises(ArgumentError, match="k=1000000000000"):
            collect(TinyCNN(0), RandomImages(8), ["conv1"], k=10**12, progress=False)


def test_collect_duplicate_ids_within_a_batch_refused():
    loader = torch.utils.data.DataLoader(RandomImages(8), batch_sampler=[[0, 1, 1], [2, 3]])
    with pytest.raises(ArgumentError, match="twice"):
        collect(TinyCNN(0), loader, ["conv1"], k=2, progress=False)


# ---------------------------------------------------------------------- 21.2 damaged ConceptDB

@pytest.fixture
def saved_db(tmp_path):
    st = two_layer_store()
    db = build_concept_db(st, TinyImageFM(), images(), path=tmp_path / "db", progress=False)
    return st, db, tmp_path / "db"


def _flip(path, offset_from_end=100, bit=0x10):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= bit
    path.write_bytes(bytes(data))


def test_db_flipped_bit_is_refused(saved_db):
    _, _, path = saved_db
    _flip(next(path.glob("concepts-*.safetensors")))
    with pytest.raises(StoreError, match="SHA-256"):
        ConceptDB.load(path)
    ConceptDB.load(path, verify=False)  # what the old code did: sizes agree


def test_db_swapped_layers_are_refused_even_with_a_fixed_up_manifest(saved_db):
    st, _, path = saved_db
    f = next(path.glob("concepts-*.safetensors"))
    from safetensors.torch import load_file, save_file

    t = load_file(str(f))
    swapped = {("b" if k.startswith("a/") else "a") + k[1:]: v for k, v in t.items()}
    save_file(swapped, str(f), metadata={"format": "semlens_fast.concept_db"})
    with pytest.raises(StoreError, match="SHA-256"):
        ConceptDB.load(path)
    # even if someone also rewrote the manifest's checksum, the DB no longer matches the store
    man = json.loads((path / "manifest.json").read_text())
    import hashlib

    man["tensors_sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
    man["tensors_bytes"] = f.stat().st_size
    (path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StoreError):
        db = ConceptDB.load(path)
        db.check_store(st)


def test_db_manifest_damage_is_a_store_error(saved_db):
    _, _, path = saved_db
    man = json.loads((path / "manifest.json").read_text())
    for broken in ({**man, "tensors": "../x.safetensors"}, {**man, "meta": "nope"}, {k: v for k, v in man.items() if k != "layers"}):
        (path / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(StoreError):
            ConceptDB.load(path)


def test_db_save_to_a_file_is_refused_before_any_work(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    fm = TinyImageFM()
    with pytest.raises(ArgumentError, match="not a folder"):
        build_concept_db(two_layer_store(), fm, images(), path=f, progress=False)
    assert fm.images_encoded == 0 and f.read_text() == "x"


# ---------------------------------------------------------------------- 20.3 damaged cache shards are recomputed

def test_corrupted_cache_shard_is_recomputed_not_served(tmp_path, caplog):
    st = two_layer_store()
    clean = build_concept_db(st, TinyImageFM(), images(), cache=tmp_path / "c", progress=False)
    shard = next((tmp_path / "c").rglob("emb-*.safetensors"))
    raw = bytearray(shard.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    a0, a1 = json.loads(raw[8:8 + n])["emb"]["data_offsets"]
    for off in range(a0 + 3, a1, 4 * 7):
        raw[8 + n + off] ^= 0x40  # exponent bits of many embedding values: a damaged shard
    shard.write_bytes(bytes(raw))
    fm = TinyImageFM()
    with caplog.at_level(logging.WARNING, logger="semlens_fast"):
        again = build_concept_db(st, fm, images(), cache=tmp_path / "c", progress=False)
    assert "damaged shard" in caplog.text
    assert fm.images_encoded == clean.meta["stats"]["unique_pairs"]  # all recomputed
    for n_ in clean.layers:
        assert torch.equal(again[n_].examples, clean[n_].examples)
        assert torch.equal(again[n_].embeddings, clean[n_].embeddings)


def test_two_cache_writers_keep_each_others_shards(tmp_path):
    a = EmbeddingCache(tmp_path, "f" * 32, 4)
    b = EmbeddingCache(tmp_path, "f" * 32, 4)  # another process's view, opened at the same time
    a.add(torch.tensor([[1, 0, 0, 2, 2]]), torch.ones(1, 4))
    b.add(torch.tensor([[2, 0, 0, 2, 2]]), torch.full((1, 4), 2.0))
    c = EmbeddingCache(tmp_path, "f" * 32, 4)
    found, emb = c.lookup(torch.tensor([[1, 0, 0, 2, 2], [2, 0, 0, 2, 2]]))
    assert found.all() and emb[0, 0] == 1 and emb[1, 0] == 2
    assert len({s["file"] for s in c._shards}) == 2
