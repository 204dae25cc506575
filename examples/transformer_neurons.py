"""MLP neurons of a real transformer (MiniLM, all 6 MLP layers at once) on real English, offline.

    python examples/transformer_neurons.py [--docs 600] [--query "a calendar date"]

1. collect the top-10 fortunes of all 9,216 MLP neurons (``encoder.layer.*.intermediate``, max over
   real tokens; the positions are the peak tokens);
2. embed the token window around each neuron's peak with MiniLM (a real text encoder);
3. search the neurons by a plain text description and show their windows.
"""
from __future__ import annotations

import argparse

from semlens_fast.collect import collect
from semlens_fast.concepts import build_concept_db
from semlens_fast.data import fortunes
from semlens_fast.examples import token_windows, window_texts
from semlens_fast.foundation import SentenceTransformerText
from semlens_fast.lens import Lens
from semlens_fast.sae import minilm
from semlens_fast.textfeatures import planted_corpus


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=600)
    ap.add_argument("--query", action="append", default=None)
    a = ap.parse_args()
    queries = a.query or ["a calendar date with a month and a year", "negation: not, never, nothing", "money and prices"]
    docs, _ = planted_corpus(a.docs, seed=0, texts=fortunes(max_items=a.docs, max_chars=160))
    tok, model = minilm()
    enc = tok(docs, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    data = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i]} for i in range(len(docs))]
    store = collect(model, data, "encoder.layer.*.intermediate", k=10, batch_size=64)
    print(store)
    fm = SentenceTransformerText()
    db = build_concept_db(store, fm, mode="text", input_ids=enc["input_ids"], tokenizer=tok,
                          attention_mask=enc["attention_mask"], radius=4)
    lens = Lens(db, fm)
    for q in queries:
        print(f"\n== {q!r}")
        for hit in lens.search(q, k=3).to_records():
            le = token_windows(store, hit["layer"], enc["attention_mask"], 4)
            c = hit["component"]
            keys = __import__("torch").cat([le.ids[c].unsqueeze(1), le.boxes[c]], 1)[le.valid[c]][:4]
            print(f"  {hit['layer']} neuron {c} (score {hit['score']:.3f}):")
            for w in window_texts(enc["input_ids"], tok, keys):
                print(f"      ... {w} ...")


if __name__ == "__main__":
    main()
