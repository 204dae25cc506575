"""ConceptDB and the embedding cache: unique pairs only, reuse, masks, storage, errors, end to end."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from semlens_fast.concepts import (
    ConceptDB, EmbeddingCache, aggregate, build_concept_db, cache_fingerprint, mmap_safetensors,
)
from semlens_fast.errors import ArgumentError, ShapeError, StoreError
from semlens_fast.foundation import ModalityError
from tests.test_concepts_shared import (
    HELDOUT, TinyImageFM, TinyTextFM, aligned, cached_embeddings, cnn, fashion, make_store,
)


def images(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g)


def two_layer_store():
    a = make_store([[0, 1, 2], [3, 4, -1], [5, -1, -1]], layer="a")
    b = make_store([[2, 6, 7], [8, 9, 0]], layer="b")
    a.layers.update(b.layers)
    a.meta["pools"].update(b.meta["pools"])
    return a


def test_embeds_only_unique_pairs_and_masks_incomplete(tmp_path):
    fm, X = TinyImageFM(), images()
    st = two_layer_store()
    db = build_concept_db(st, fm, X, progress=False)
    # 10 distinct samples over both layers (sample 2 and 0 are shared), not the 50 of the dataset
    assert fm.images_encoded == 10 and db.meta["stats"]["embedded"] == 10
    la = db["a"]
    assert la.complete.tolist() == [True, False, False] and la.n_valid.tolist() == [3, 2, 1]
    assert db.meta["incomplete"] == {"a": 2, "b": 0}
    # empty slots are zero, never another sample's embedding
    assert (la.examples[1, 2] == 0).all() and (la.examples[2, 1:] == 0).all()
    E = fm.encode_images(X[[3, 4]])
    assert torch.allclose(la.embeddings[1], F.normalize(E.mean(0), dim=0), atol=1e-5)
    assert torch.allclose(la.embeddings.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(la.examples[0, 0].float(), fm.encode_images(X[:1])[0], atol=2e-3)  # fp16 storage


def test_component_without_examples_has_zero_embedding_and_is_not_indexed():
    fm, X = TinyImageFM(), images()
    st = make_store([[1, 2], [-1, -1]])
    db = build_concept_db(st, fm, X, progress=False)
    assert (db["l"].embeddings[1] == 0).all()
    idx = db.as_index()
    assert len(idx) == 1 and idx.lookup([0]) == [("l", 0)]


def test_activation_weighting():
    fm, X = TinyImageFM(), images()
    st = make_store([[1, 2, 3]], values=[[3.0, 1.0, -5.0]])
    db = build_concept_db(st, fm, X, weighting="activation", keep_examples=False, progress=False)
    E = fm.encode_images(X[[1, 2, 3]])
    want = F.normalize(3 * E[0] + 1 * E[1], dim=0)
    assert torch.allclose(db["l"].embeddings[0], want, atol=1e-5)
    assert db["l"].examples is None
    # all weights <= 0: falls back to the plain mean
    v = torch.zeros(1, 2)
    e = F.normalize(torch.randn(1, 2, 4), dim=-1)
    assert torch.allclose(aggregate(e, torch.ones(1, 2, dtype=torch.bool), v, "activation"), F.normalize(e.mean(1), dim=-1))


def test_cache_reuse_when_k_layers_or_mode_change(tmp_path):
    X = images()
    st = two_layer_store()
    fm = TinyImageFM()
    build_concept_db(st, fm, X, layers="a", k=2, cache=tmp_path / "c", progress=False)
    assert fm.images_encoded == 5  # ids {0,1,3,4,5}
    fm2 = TinyImageFM()  # a new process: same weights, same fingerprint, persistent cache
    db = build_concept_db(st, fm2, X, layers=["a", "b"], cache=tmp_path / "c", progress=False)
    assert fm2.images_encoded == 5  # only {2, 6, 7, 8, 9} are new
    assert db.meta["stats"] == {"unique_pairs": 10, "cached": 5, "embedded": 5, "unique_samples": 10}
    fm3 = TinyImageFM()
    db3 = build_concept_db(st, fm3, X, cache=tmp_path / "c", progress=False)
    assert fm3.images_encoded == 0
    assert torch.allclose(db3["b"].embeddings, db["b"].embeddings)
    # another foundation model never sees these entries
    fm4 = TinyImageFM(seed=3)
    build_concept_db(st, fm4, X, cache=tmp_path / "c", progress=False)
    assert fm4.images_encoded == 10
    key = cache_fingerprint(fm, st)
    c = EmbeddingCache(tmp_path / "c", key, fm.dim)
    assert len(c) == 10
    c.compact()
    assert len(EmbeddingCache(tmp_path / "c", key, fm.dim)) == 10
    with pytest.raises(ShapeError, match="dim"):
        EmbeddingCache(tmp_path / "c", key, 99)


def test_cache_is_not_shared_across_data_sets(tmp_path):
    """The same sample ids over other images must be embedded again, never served from the cache."""
    X, Y = images(seed=0), images(seed=1)
    st = make_store([[0, 1, 2]], fingerprints={"model": "m0", "dataset": {"sha256": "x"}})
    fm = TinyImageFM()
    a = build_concept_db(st, fm, X, cache=tmp_path / "c", progress=False)
    st2 = make_store([[0, 1, 2]], fingerprints={"model": "m0", "dataset": {"sha256": "y"}})
    fm2 = TinyImageFM()
    b = build_concept_db(st2, fm2, Y, cache=tmp_path / "c", progress=False)
    assert fm2.images_encoded == 3
    assert torch.allclose(b["l"].embeddings[0], F.normalize(fm.encode_images(Y[:3]).mean(0), dim=0), atol=1e-5)
    assert not torch.allclose(a["l"].embeddings, b["l"].embeddings)


def test_save_load_mmap_and_path_reuse(tmp_path):
    X, st = images(), two_layer_store()
    fm = TinyImageFM()
    db = build_concept_db(st, fm, X, path=tmp_path / "db", dtype=torch.bfloat16, progress=False)
    assert db["a"].embeddings.dtype == torch.bfloat16
    back = ConceptDB.load(tmp_path / "db")
    for n in ("a", "b"):
        for f in ("embeddings", "examples", "ids", "boxes", "values", "valid"):
            assert torch.equal(getattr(back[n], f), getattr(db[n], f)), (n, f)
    assert back.meta["foundation"]["fingerprint"] == fm.fingerprint and back.k == 3 and back.dim == 16
    # the tensors are views of a memory map (not copies)
    t, _ = mmap_safetensors(next((tmp_path / "db").glob("concepts-*.safetensors")))
    assert t["a/embeddings"].untyped_storage().nbytes() > 0
    # same request again: loaded, nothing embedded
    fm2 = TinyImageFM()
    again = build_concept_db(st, fm2, X, path=tmp_path / "db", dtype=torch.bfloat16, progress=False)
    assert fm2.images_encoded == 0 and again.path == tmp_path / "db"
    # another request in the same folder: refused unless overwrite
    with pytest.raises(StoreError, match="different ConceptDB"):
        build_concept_db(st, fm2, X, path=tmp_path / "db", k=2, progress=False)
    db2 = build_concept_db(st, fm2, X, path=tmp_path / "db", k=2, overwrite=True, progress=False)
    assert ConceptDB.load(tmp_path / "db").k == 2 and db2.k == 2
    assert len(list((tmp_path / "db").glob("concepts-*.safetensors"))) == 1


def test_load_errors(tmp_path):
    X, st = images(), two_layer_store()
    build_concept_db(st, TinyImageFM(), X, path=tmp_path / "db", progress=False)
    f = next((tmp_path / "db").glob("concepts-*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="truncated"):
        ConceptDB.load(tmp_path / "db")
    (tmp_path / "db" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError):
        ConceptDB.load(tmp_path / "db")
    with pytest.raises(StoreError, match="does not exist"):
        ConceptDB.load(tmp_path / "nothing")


def test_checks_foundation_and_store():
    X, st = images(), two_layer_store()
    fm = TinyImageFM()
    db = build_concept_db(st, fm, X, progress=False)
    db.check_foundation(fm)
    db.check_store(st)
    with pytest.raises(ShapeError, match="16-d"):
        db.check_foundation(TinyImageFM(dim=8))
    with pytest.raises(StoreError, match="not the one"):
        db.check_foundation(TinyImageFM(seed=5))
    db.check_foundation(TinyImageFM(seed=5), strict=False)
    other = make_store([[0, 1, 2], [3, 4, -1], [5, -1, 7]], layer="a")
    other.layers["b"] = st["b"]
    with pytest.raises(StoreError, match="another TopKStore"):
        db.check_store(other)
    with pytest.raises(ShapeError, match="16-d"):
        db.search(torch.randn(2, 8))


def test_search_and_text_queries():
    X = images()
    fm = TinyImageFM()
    st = make_store([[1, 2], [3, 4], [5, 6]])
    db = build_concept_db(st, fm, X, progress=False)
    res = db.search(db["l"].embeddings[2].float(), k=2)
    assert res[0][0][:2] == ("l", 2) and abs(res[0][0][2] - 1.0) < 1e-4
    with pytest.raises(ArgumentError, match="fm="):
        db.search("a cat")
    with pytest.raises(ModalityError, match="vision-only"):
        db.search("a cat", fm=fm)


def test_bad_input_writes_nothing(tmp_path):
    st = two_layer_store()
    fm = TinyImageFM()
    # missing samples: the store refers to ids the images do not have
    with pytest.raises(ArgumentError, match="only 5 samples"):
        build_concept_db(st, fm, images(5), path=tmp_path / "db", cache=tmp_path / "c", progress=False)
    assert not (tmp_path / "db" / "manifest.json").exists() and fm.images_encoded == 0
    # images of the wrong mode (4 channels)
    with pytest.raises(ShapeError, match="4 channels"):
        build_concept_db(st, fm, torch.rand(50, 4, 8, 8), path=tmp_path / "db", progress=False)
    assert not (tmp_path / "db" / "manifest.json").exists()
    # normalised model inputs instead of raw images
    with pytest.raises(ArgumentError, match="not model-normalised"):
        build_concept_db(st, fm, torch.randn(50, 3, 8, 8) * 2, path=tmp_path / "db", progress=False)
    with pytest.raises(ModalityError):
        build_concept_db(st, TinyTextFM(), images(), progress=False)
    with pytest.raises(ArgumentError, match="not in the TopKStore"):
        build_concept_db(st, fm, images(), layers="zzz", progress=False)
    with pytest.raises(ArgumentError, match="images="):
        build_concept_db(st, fm, None, progress=False)


def test_interrupted_build_keeps_finished_chunks(tmp_path):
    st = two_layer_store()

    flaky = TinyImageFM()  # same weights and fingerprint, fails after 4 images
    inner = flaky._encode_image_batch

    def failing(x):
        if flaky.images_encoded >= 4:
            raise RuntimeError("boom")
        return inner(x)

    flaky._encode_image_batch = failing

    with pytest.raises(RuntimeError, match="boom"):
        build_concept_db(st, flaky, images(), cache=tmp_path / "c", path=tmp_path / "db", chunk=2, batch_size=2, progress=False)
    assert not (tmp_path / "db" / "manifest.json").exists()
    fm = TinyImageFM()
    db = build_concept_db(st, fm, images(), cache=tmp_path / "c", path=tmp_path / "db", progress=False)
    assert db.meta["stats"]["cached"] == 4 and fm.images_encoded == 6


def test_text_windows_db():
    from tests.test_examples import WordTokenizer

    vocab = ["[PAD]", "the", "cat", "sat", "on", "a", "mat", "dog", "ran"]
    input_ids = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 7, 8, 0, 0, 0]])
    st = make_store([[0, 1], [1, -1]], positions=[[2, 1], [2, -1]])
    fm = TinyTextFM()
    db = build_concept_db(st, fm, mode="text", input_ids=input_ids, tokenizer=WordTokenizer(vocab),
                          attention_mask=input_ids != 0, radius=1, progress=False)
    assert fm.texts_encoded == 3  # "cat sat on", "the dog ran", "dog ran"
    assert db["l"].complete.tolist() == [True, False]
    want = fm.encode_texts(["dog ran"])[0]
    assert torch.allclose(db["l"].embeddings[1], want, atol=1e-5)
    with pytest.raises(ArgumentError, match="input_ids"):
        build_concept_db(st, fm, mode="text", progress=False)


# ---------------------------------------------------------------------- real models, end to end


def test_known_answer_single_class_components_land_on_their_class():
    """Components whose top-k examples all come from one class are nearest that class's caption."""
    ds, al = fashion(), aligned()
    labels = ds.labels[HELDOUT]
    k = 6
    ids = torch.stack([HELDOUT[labels == c][:k] for c in range(10)])  # component c <- k images of class c
    st = make_store(ids)
    # warm the DB's cache with the (already cached) held-out embeddings to stay fast
    cached_embeddings(al, ds.images, ids.flatten())
    from tests.helpers_collect import CACHE

    db = build_concept_db(st, al, ds, cache=f"{CACHE}/test-embeddings", progress=False)
    T = al.class_embeddings()
    nearest = (db["l"].embeddings.float() @ T.T).argmax(1)
    assert nearest.tolist() == list(range(10))
    # and text search finds them: "a photo of a trouser." -> component 1 first
    res = db.search(["a photo of a trouser.", "a photo of a bag."], k=1, fm=al)
    assert res[0][0][1] == 1 and res[1][0][1] == 8


def test_end_to_end_fashion_cnn_activation_crops(tmp_path):
    from semlens_fast.collect import collect

    ds, model, al = fashion().subset(400), cnn(), aligned()
    st = collect(model, ds, ["conv2", "conv3"], k=5, pool="max", progress=False)
    al.vision.reset_counters()
    db = build_concept_db(st, al, ds, mode="activation", model=model, data=ds, cache=tmp_path / "c",
                          path=tmp_path / "db", progress=False)
    n_ids = int(torch.unique(torch.cat([st[n].ids.flatten() for n in ("conv2", "conv3")])).numel())
    # an Aligned DB embeds with (and caches) its vision model: a vision DB of the same crops embeds nothing new
    assert al.vision.images_encoded == db.meta["stats"]["embedded"] <= db.meta["stats"]["unique_pairs"]
    vdb = build_concept_db(st, al.vision, ds, mode="activation", model=model, data=ds, cache=tmp_path / "c",
                           progress=False)
    assert vdb.meta["stats"]["embedded"] == 0 and al.vision.images_encoded == db.meta["stats"]["embedded"]
    ex_v = vdb["conv3"].examples.float()[vdb["conv3"].valid]
    torch.testing.assert_close(db["conv3"].examples.float()[db["conv3"].valid], al.from_base(ex_v), atol=2e-3, rtol=0)
    # ... and the mapped embeddings are what Aligned gives for the crop itself
    from semlens_fast.examples import crop

    b = db["conv3"].boxes[0, 0].tolist()
    direct = al.encode_images([crop(ds.images[int(db["conv3"].ids[0, 0])].unsqueeze(0), b, (28, 28))])[0]
    torch.testing.assert_close(db["conv3"].examples[0, 0].float(), direct, atol=2e-3, rtol=0)
    assert db.meta["stats"]["unique_samples"] == n_ids < len(ds)
    assert db["conv3"].embeddings.shape == (32, 384) and db["conv3"].examples.shape == (32, 5, 384)
    assert db.meta["topk_store"]["model"] == st.fingerprints["model"]
    with pytest.raises(StoreError, match="another model"):
        other = type(model)()
        build_concept_db(st, al, ds, mode="activation", model=other, data=ds, progress=False)
    # components whose 5 examples all share one class lie nearer that class's caption than the average class
    T = al.class_embeddings()
    for n in ("conv2", "conv3"):
        lab = ds.labels[db[n].ids]
        pure = (lab == lab[:, :1]).all(1)
        if pure.any():
            sims = db[n].embeddings[pure].float() @ T.T
            own = sims.gather(1, lab[pure, :1]).squeeze(1)
            assert (own > sims.mean(1)).float().mean() >= 0.7
    # search in the DB with a text query and through the EmbeddingIndex
    res = db.search("a photo of a sandal.", k=3, fm=al)
    assert len(res[0]) == 3 and all(r[0] in ("conv2", "conv3") for r in res[0])
    loaded = ConceptDB.load(tmp_path / "db")
    loaded.check_foundation(al)
    assert json.loads(json.dumps(loaded.meta))["mode"] == "activation"


def test_cache_duplicate_keys_and_compaction(tmp_path):
    c = EmbeddingCache(tmp_path, "f" * 64, 4)
    k1 = torch.tensor([[1, 0, 0, 0, 0], [2, 0, 0, 0, 0]])
    c.add(k1, torch.eye(4)[:2])
    c.add(k1[:1], torch.eye(4)[3:4])  # the same key again: the latest wins
    found, e = c.lookup(torch.tensor([[1, 0, 0, 0, 0], [2, 0, 0, 0, 0], [3, 0, 0, 0, 0]]))
    assert found.tolist() == [True, True, False] and e[0].tolist() == [0, 0, 0, 1]
    c.compact()
    c2 = EmbeddingCache(tmp_path, "f" * 64, 4)
    assert len(c2) == 2 and c2.lookup(k1)[1].tolist() == [[0, 0, 0, 1], [0, 1, 0, 0]]
    assert len(list(c2.path.glob("emb-*.safetensors"))) == 1
    with pytest.raises(StoreError, match="not an embedding cache"):
        import shutil

        other = tmp_path / f"image-{'e' * 32}"
        shutil.copytree(c2.path, other)
        EmbeddingCache(tmp_path, "e" * 64, 4)
