"""``semlens serve`` search latency over 100,000 components, side by side with the ways around it (CPU).

    pytest benchmarks/bench_serve.py --benchmark-only -o python_files='bench_*.py' --rootdir benchmarks
    SEMLENS_BENCH_SCALE=0.1 ...   # 10,000 components

The run: a synthetic run folder with a real top-k store and a ConceptDB of 4 layers x 25,000
components (random unit embeddings, d = 384, the space of the real MiniLM text encoder it is
queried with; k = 20 examples each, sample ids of scikit-learn's digits). Every figure is one
text query answered end to end, top-10 over all components.

Text search (group ``serve: text query``), one new query text per call (the explorer caches
text probes, so a repeated text would skip the encoder):

* **ours**: an HTTP GET ``/api/v1/search`` to a running ``semlens serve`` (uvicorn in a thread
  of this process; the ConceptDB memory-mapped and the models loaded once, at start);
* the same server, the **same text again** (probe cached: the search alone);
* **load per request**: what a server that opens the run for each request pays
  (``Run.open(...).lens()``: manifest, store check, memory-mapped ConceptDB, foundation model,
  then ``Lens.search``);
* **load per request, model kept**: the same with the foundation model loaded once (only the
  run, the store check and the ConceptDB per request);
* **CLI per call**: ``python -m semlens_fast.cli search`` in a fresh process (what a script that
  shells out pays; it also appends to ``searches.json``).

Embedding search (group ``serve: embedding query``): POST of a 384-d embedding to the server vs
``Lens.search`` called in process (the floor: what HTTP and JSON add).
"""
from __future__ import annotations

import http.client
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
import torch
import torch.nn.functional as F

from conftest import scaled

N_LAYERS = 4
PER_LAYER = scaled(25_000, 500)
K = 20
D = 384
TOPK = 10
ROOT = Path(__file__).resolve().parent.parent


def make_run(path: Path, per_layer: int = PER_LAYER, seed: int = 0) -> Path:
    """A run folder with a TopKStore and a ConceptDB of ``N_LAYERS x per_layer`` components embedded
    (as far as the manifests say) by MiniLM, without training or embedding anything."""
    from semlens_fast.concepts import ConceptDB, LayerConcepts, store_fingerprint
    from semlens_fast.data import digits
    from semlens_fast.foundation import SentenceTransformerText
    from semlens_fast.ops import TopKState
    from semlens_fast.store import TopKStore
    from semlens_fast.workspace import Run, store_digest

    ds = digits("train")
    g = torch.Generator().manual_seed(seed)
    run = Run.create(path, {"kind": "factory", "target": "semlens_fast.models:FashionCNN"},
                     {"kind": "digits", "split": "train"}, list(ds.classes))
    names = [f"block{i}" for i in range(N_LAYERS)]
    states = {}
    for n in names:
        vals = torch.rand(per_layer, K, generator=g).sort(1, descending=True).values
        ids = torch.stack([torch.randperm(len(ds), generator=g)[:K] for _ in range(per_layer)])
        states[n] = TopKState(vals, ids, torch.full((per_layer, K), -1, dtype=torch.int32),
                              torch.zeros(per_layer, dtype=torch.int64))
    store = TopKStore(states, {"k": K, "pools": {n: "mean" for n in names}, "complete": True,
                               "fingerprints": {"model": "synthetic", "dataset": ds.fingerprint()}})
    store.save(run.topk_path)
    run.record("collect", layers=names, k=K, pool="mean", lists_sha256=store_digest(store))
    fm = SentenceTransformerText()
    layers = {}
    for n in names:
        emb = F.normalize(torch.randn(per_layer, D, generator=g), dim=1)
        layers[n] = LayerConcepts(emb, states[n].ids.clone(), torch.zeros(per_layer, K, 4, dtype=torch.int32),
                                  states[n].values.clone(), torch.ones(per_layer, K, dtype=torch.bool))
    meta = {"mode": "full", "k": K, "layers": names, "input_size": [28, 28], "dtype": "float32",
            "foundation": {"name": fm.name, "fingerprint": fm.fingerprint, "dim": D, "modalities": ["text"]},
            "topk_store": store_fingerprint(store, names, K)}
    ConceptDB(layers, meta).save(run.concepts_path)
    run.record("embed", fm={"kind": "minilm"}, mode="full", layers=names)
    return path


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("serve-bench") / "run")


@pytest.fixture
def conn(server):
    """A keep-alive connection to the server, one per benchmark (uvicorn closes idle ones after 5 s)."""
    c = http.client.HTTPConnection("127.0.0.1", server[1], timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="module")
def server(bench_run):
    """``semlens serve`` (the real app and uvicorn) on a free port, in a thread of this process."""
    import uvicorn

    from semlens_fast.serve import Explorer, build
    from semlens_fast.serve.server import bind

    ex = Explorer.open(bench_run)
    sock = bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(build(ex), log_level="warning", access_log=False, lifespan="off"))
    t = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    while not srv.started:
        time.sleep(0.05)
    yield ex, sock.getsockname()[1]
    srv.should_exit = True
    t.join(30)
    sock.close()


_texts = (f"concept number {i}: {w}" for i, w in enumerate(itertools.cycle(
    ["striped fabric", "a dog's ear", "the letter q", "a white square stamp", "rusty metal", "blue sky"])))


def _get(conn, path: str) -> dict:
    conn.request("GET", path, headers={"host": "127.0.0.1"})
    r = conn.getresponse()
    body = r.read()
    assert r.status == 200, body[:500]
    return json.loads(body)


def _post(conn, path: str, obj: dict) -> dict:
    data = json.dumps(obj).encode()
    conn.request("POST", path, body=data, headers={"host": "127.0.0.1", "content-type": "application/json"})
    r = conn.getresponse()
    body = r.read()
    assert r.status == 200, body[:500]
    return json.loads(body)


def _info(benchmark, label: str, ours: bool = False, note: str = "") -> None:
    benchmark.group = "serve: text query"
    benchmark.extra_info.update(label=label, ours=ours, components=N_LAYERS * PER_LAYER, note=note)


def test_serve_text_query(benchmark, conn):
    _info(benchmark, "semlens serve: HTTP GET /api/v1/search (new text each call)", ours=True)
    out = benchmark.pedantic(lambda: _get(conn, "/api/v1/search?" + urlencode({"q": next(_texts), "k": TOPK, "examples": 0})),
                             rounds=30, warmup_rounds=3)
    assert len(out["queries"][0]["results"]) == TOPK
    benchmark.extra_info["server_took_ms_last"] = out["took_ms"]


def test_serve_repeated_text(benchmark, conn):
    _info(benchmark, "semlens serve: the same text again (probe cached)")
    q = "/api/v1/search?" + urlencode({"q": "a white square stamp", "k": TOPK, "examples": 0})
    _get(conn, q)
    benchmark.pedantic(lambda: _get(conn, q), rounds=30, warmup_rounds=3)


def test_load_per_request(benchmark, bench_run):
    from semlens_fast.workspace import Run

    _info(benchmark, "load per request: Run.open(...).lens() then Lens.search")

    def once():
        return Run.open(bench_run).lens().search(next(_texts), k=TOPK)

    res = benchmark.pedantic(once, rounds=5, warmup_rounds=1)
    assert len(res.to_records()) == TOPK


def test_load_per_request_model_kept(benchmark, bench_run, server):
    from semlens_fast.lens import Lens
    from semlens_fast.workspace import Run

    ex = server[0]
    _info(benchmark, "load per request, foundation model kept: Run.open, ConceptDB, Lens.search")

    def once():
        return Lens(Run.open(bench_run).concept_db(), ex.fm).search(next(_texts), k=TOPK)

    benchmark.pedantic(once, rounds=8, warmup_rounds=1)


def test_cli_per_call(benchmark, bench_run, tmp_path):
    import shutil

    run = tmp_path / "cli-run"
    shutil.copytree(bench_run, run)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    _info(benchmark, "CLI per call: python -m semlens_fast.cli search (fresh process)")

    def once():
        subprocess.run([sys.executable, "-m", "semlens_fast.cli", "search", "--run", str(run), next(_texts), "--k",
                        str(TOPK), "--json"], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    benchmark.pedantic(once, rounds=3, warmup_rounds=0)


def test_serve_embedding_query(benchmark, conn):
    benchmark.group = "serve: embedding query"
    benchmark.extra_info.update(label="semlens serve: HTTP POST /api/v1/search with a 384-d embedding", ours=True,
                                components=N_LAYERS * PER_LAYER)
    g = torch.Generator().manual_seed(1)
    embs = iter(F.normalize(torch.randn(1000, D, generator=g), dim=1).tolist())
    benchmark.pedantic(lambda: _post(conn, "/api/v1/search", {"embedding": next(embs), "k": TOPK, "examples": 0}),
                       rounds=30, warmup_rounds=3)


def test_lens_embedding_in_process(benchmark, server):
    ex = server[0]
    benchmark.group = "serve: embedding query"
    benchmark.extra_info.update(label="Lens.search in process (no HTTP, no JSON)", components=N_LAYERS * PER_LAYER)
    g = torch.Generator().manual_seed(2)
    embs = iter(F.normalize(torch.randn(1000, D, generator=g), dim=1))
    benchmark.pedantic(lambda: ex.lens.search(next(embs)[None], k=TOPK, modality="embedding"), rounds=30, warmup_rounds=3)
