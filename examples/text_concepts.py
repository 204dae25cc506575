"""Transformer neurons and SAE latents of the real MiniLM, labelled by text search (offline).

A real English corpus (Debian fortunes) with planted dates, numbers, names, questions and
negations; the top-8 token windows of every MLP neuron of two layers and of every latent of an
SAE trained here on layer 3 are embedded by MiniLM (a real text encoder), and ``Lens.search`` with
a plain description of each feature is scored against the truth computed from the windows' text.

    python examples/text_concepts.py [--docs 400] [--out text_concepts.json]

Prints per feature: selective components (truth), chance, precision@10, and the worst feature.
"""
from __future__ import annotations

import argparse
import json

from semlens_fast.textfeatures import known_answer_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=400)
    ap.add_argument("--latents", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    res = known_answer_run(a.docs, sae_latents=a.latents, seed=a.seed, progress=True)
    for group in ("neurons", "sae"):
        r = res.get(group)
        if not r:
            continue
        print(f"\n{group}: {r['components']} components")
        for f, e in r["features"].items():
            p = e.get("precision")
            print(f"  {f:9s} selective {e['selective']:4d}  chance {e['chance']:.4f}  "
                  + (f"precision@10 {p:.2f}  lift {e['lift']}" if p is not None else "(too few selective components)"))
        print(f"  worst: {r['worst']} ({r['worst_precision']}), mean precision {r['mean_precision']}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
