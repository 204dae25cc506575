"""SAE latents as components: an SAE trained here on MiniLM's layer-3 residuals (cached), its
latents' top-k fortunes through the fused kernel, their token windows embedded by MiniLM, searched.

    python examples/sae_latents.py [--docs 600] [--latents 512]

The SAE is written in the SAELens layout (cfg.json + sae_weights.safetensors) under
$SEMLENS_CACHE; ``SparseAutoencoder.load(folder)`` reads any such folder (e.g. a downloaded
SAELens / Gemma-Scope release converted to it).
"""
from __future__ import annotations

import argparse

import torch

from semlens_fast.collect import collect
from semlens_fast.concepts import build_concept_db
from semlens_fast.examples import token_windows, window_texts
from semlens_fast.foundation import SentenceTransformerText
from semlens_fast.lens import Lens
from semlens_fast.sae import minilm, trained_minilm_sae
from semlens_fast.textfeatures import planted_corpus


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=600)
    ap.add_argument("--latents", type=int, default=512)
    a = ap.parse_args()
    docs, _ = planted_corpus(a.docs, seed=0)
    sae = trained_minilm_sae(docs, layer="encoder.layer.3", L=a.latents, steps=2000, progress=True)
    print(sae)
    tok, model = minilm()
    enc = tok(docs, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    data = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i]} for i in range(len(docs))]
    store = collect(model, data, [], k=10, sae={"encoder.layer.3": sae}, batch_size=64)
    st = store["encoder.layer.3"]
    alive = int((st.values[:, 0] > 0).sum())
    print(f"{st.channels} latents, {alive} fire on this corpus")
    fm = SentenceTransformerText()
    db = build_concept_db(store, fm, mode="text", input_ids=enc["input_ids"], tokenizer=tok,
                          attention_mask=enc["attention_mask"], radius=4)
    lens = Lens(db, fm)
    le = token_windows(store, "encoder.layer.3", enc["attention_mask"], 4)
    for q in ("a calendar date with a month and a year", "a number written in digits", "negation: not, never, nothing"):
        print(f"\n== {q!r}")
        for hit in lens.search(q, k=3).to_records():
            c = hit["component"]
            keys = torch.cat([le.ids[c].unsqueeze(1), le.boxes[c]], 1)[le.valid[c]][:4]
            print(f"  latent {c} (score {hit['score']:.3f}, top activation {float(st.values[c, 0]):.2f}):")
            for w in window_texts(enc["input_ids"], tok, keys):
                print(f"      ... {w} ...")


if __name__ == "__main__":
    main()
