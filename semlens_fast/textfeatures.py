"""A real English corpus with planted, checkable structure, for known-answer tests of text concepts.

:func:`planted_corpus` takes fortunes (Debian ``fortunes``: real English prose) and inserts into a
random share of them sentences carrying one of several **features** (dates, numbers, person
names, questions, negations; questions and negations also occur naturally). Each feature has a
plain-text *description* (what a user would type into ``Lens.search``) and a *detector*: a rule on
a decoded token window (MiniLM's tokenizer lower-cases) that says whether the feature is in it.

Ground truth for a component (a neuron or an SAE latent) is then computed from text only, never
from embeddings: the share of its top-k token windows that the detector accepts
(:func:`selectivity`). A component is *selective* for a feature when that share reaches a
threshold. :func:`search_scores` measures, per feature, how many of the components that
``Lens.search(description)`` returns first are selective (precision@m), against the share of
selective components (chance), and reports the worst feature too.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

# "may" is left out: as a modal verb it is everywhere in English prose and would blur the truth
MONTHS = ("january", "february", "march", "april", "june", "july", "august", "september", "october",
          "november", "december")
NAMES = ("alice", "robert", "maria", "james", "linda", "michael", "susan", "david", "karen", "thomas", "emma",
         "george", "sophie", "peter", "laura", "daniel", "anna", "william", "julia", "henry")
_NEG = re.compile(r"\b(not|never|no|nobody|nothing|none|cannot|neither|nor)\b|n\s*'\s*t\b")
_MONTH = re.compile(r"\b(" + "|".join(MONTHS) + r")\b")
_NAME = re.compile(r"\b(" + "|".join(NAMES) + r")\b")
_DIGIT = re.compile(r"\d")


@dataclass(frozen=True)
class Feature:
    name: str
    description: str
    detect: Callable[[str], bool]


FEATURES: dict[str, Feature] = {
    "date": Feature("date", "a calendar date with a month and a year", lambda w: bool(_MONTH.search(w.lower()))),
    "number": Feature("number", "a number written in digits", lambda w: bool(_DIGIT.search(w)) and not _MONTH.search(w.lower())),
    "name": Feature("name", "a person's first name", lambda w: bool(_NAME.search(w.lower()))),
    "question": Feature("question", "a question ending with a question mark", lambda w: "?" in w),
    "negation": Feature("negation", "negation: not, never, nothing", lambda w: bool(_NEG.search(w.lower()))),
}

_TEMPLATES = {
    "date": ["It happened on {day} {month} {year}.", "The letter was dated {month} {day}, {year}.",
             "We met again in {month} {year}.", "On {month} {day}, {year} the shop closed."],
    "number": ["There were {n} of them.", "It cost {n} dollars.", "The room held {n} people.",
               "He counted {n} sheep and {m} goats."],
    "name": ["{Name} said so.", "As {Name} told {Other}, nothing lasts.", "Ask {Name} about it.",
             "{Name} and {Other} left early."],
    "question": ["Why would anyone do that?", "What is the point of it all?", "Who told you that?",
                 "Where did the time go?", "How can this be true?"],
    "negation": ["Nobody ever said it was not hard.", "I will never do that again.", "There is nothing left, not even hope.",
                 "No one can deny it, and nobody tried."],
}


def _sentence(feature: str, rng: random.Random) -> str:
    t = rng.choice(_TEMPLATES[feature])
    return t.format(day=rng.randint(1, 28), month=rng.choice(MONTHS).capitalize(), year=rng.randint(1800, 2030),
                    n=rng.randint(2, 9999), m=rng.randint(2, 999), Name=rng.choice(NAMES).capitalize(),
                    Other=rng.choice(NAMES).capitalize())


def planted_corpus(n: int, seed: int = 0, share: float = 0.5, texts: Sequence[str] | None = None,
                   max_chars: int = 160) -> tuple[list[str], list[str | None]]:
    """``n`` documents: fortunes (or ``texts``) of which a ``share`` get one planted feature sentence
    (before or after the text, at random). Returns ``(documents, planted feature or None per document)``."""
    if texts is None:
        from .data import fortunes

        texts = fortunes(max_items=n, max_chars=max_chars)
    texts = list(texts)[:n]
    rng = random.Random(seed)
    names = list(_TEMPLATES)
    docs, planted = [], []
    for t in texts:
        if rng.random() < share:
            f = rng.choice(names)
            s = _sentence(f, rng)
            docs.append(f"{s} {t}" if rng.random() < 0.5 else f"{t} {s}")
            planted.append(f)
        else:
            docs.append(t)
            planted.append(None)
    return docs, planted


def selectivity(windows: Sequence[Sequence[str]], features: Sequence[str] | None = None) -> dict[str, list[float]]:
    """Per feature, per component: the share of its windows (``windows[c]`` = its decoded top-k
    windows) that carry the feature."""
    names = list(features or FEATURES)
    out: dict[str, list[float]] = {f: [] for f in names}
    for ws in windows:
        for f in names:
            hits = [FEATURES[f].detect(w) for w in ws]
            out[f].append(sum(hits) / len(hits) if hits else 0.0)
    return out


def search_scores(lens: Any, components: Sequence[tuple[str, int]], sel: dict[str, list[float]], *,
                  threshold: float = 0.7, m: int = 10, min_selective: int = 3) -> dict[str, Any]:
    """Precision@m of ``lens.search(description)`` per feature against the text-only ground truth.

    ``components[i]`` is the ``(layer, index)`` of row ``i`` of ``sel``. Features with fewer than
    ``min_selective`` selective components are reported but not scored. Returns
    ``{"features": {f: {...}}, "worst": f, "worst_precision": p, "mean_precision": p}``.
    """
    row = {c: i for i, c in enumerate(components)}
    res: dict[str, Any] = {}
    for f, shares in sel.items():
        selective = {i for i, s in enumerate(shares) if s >= threshold}
        chance = len(selective) / max(1, len(shares))
        entry: dict[str, Any] = {"description": FEATURES[f].description, "selective": len(selective),
                                 "chance": round(chance, 4)}
        if len(selective) >= min_selective:
            hits = lens.search(FEATURES[f].description, k=m)
            top = [row[(h["layer"], h["component"])] for h in hits.to_records()]
            prec = sum(i in selective for i in top) / max(1, len(top))
            entry.update(precision=round(prec, 3), lift=round(prec / chance, 2) if chance else None,
                         mean_share_of_top=round(sum(shares[i] for i in top) / max(1, len(top)), 3))
        res[f] = entry
    scored = {f: e for f, e in res.items() if "precision" in e}
    worst = min(scored, key=lambda f: scored[f]["precision"]) if scored else None
    return {"features": res, "worst": worst,
            "worst_precision": scored[worst]["precision"] if worst else None,
            "mean_precision": round(sum(e["precision"] for e in scored.values()) / len(scored), 3) if scored else None}


def known_answer_run(n_docs: int = 400, *, neuron_layers: str | Sequence[str] = "encoder.layer.[24].intermediate",
                     sae_layer: str | None = "encoder.layer.3", sae_latents: int = 256, sae_steps: int = 1500,
                     k: int = 8, radius: int = 4, seed: int = 0, threshold: float = 0.7, m: int = 10,
                     cache_dir: str | None = None, progress: bool = False) -> dict[str, Any]:
    """The whole known-answer measurement on the real MiniLM: planted corpus -> collect (MLP neurons of
    ``neuron_layers`` and the latents of an SAE trained on ``sae_layer``) -> token windows embedded by
    MiniLM -> ``Lens.search(description)`` per feature -> precision@m against the text-only truth.
    Returns ``{"neurons": search_scores(...), "sae": ..., "config": ...}``."""
    import torch

    from .collect import collect
    from .concepts import build_concept_db
    from .examples import token_windows, window_texts
    from .foundation import SentenceTransformerText
    from .lens import Lens
    from .sae import minilm, trained_minilm_sae

    docs, _ = planted_corpus(n_docs, seed=seed)
    tok, model = minilm()
    enc = tok(docs, padding="max_length", truncation=True, max_length=64, return_tensors="pt")

    class _Docs(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(docs)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i]}

    sae = {}
    if sae_layer is not None:
        sae = {sae_layer: trained_minilm_sae(docs, layer=sae_layer, L=sae_latents, steps=sae_steps, seed=seed,
                                             cache_dir=cache_dir)}
    layers = [neuron_layers] if isinstance(neuron_layers, str) else list(neuron_layers)
    store = collect(model, _Docs(), layers, k=k, sae=sae, batch_size=64, progress=progress)
    fm = SentenceTransformerText()
    db = build_concept_db(store, fm, mode="text", input_ids=enc["input_ids"], tokenizer=tok,
                          attention_mask=enc["attention_mask"], radius=radius, progress=progress)
    out: dict[str, Any] = {"config": {"n_docs": n_docs, "neuron_layers": layers, "sae_layer": sae_layer,
                                      "sae_latents": sae_latents, "k": k, "radius": radius, "seed": seed,
                                      "threshold": threshold, "m": m}}
    groups = {"neurons": [n for n in store.keys() if n not in sae], "sae": list(sae)}
    for group, names in groups.items():
        if not names:
            continue
        comps, wins = [], []
        for n in names:
            le = token_windows(store, n, enc["attention_mask"], radius)
            for c in range(le.channels):
                keys = torch.cat([le.ids[c].unsqueeze(1), le.boxes[c]], 1)[le.valid[c]]
                comps.append((n, c))
                wins.append(window_texts(enc["input_ids"], tok, keys))
        sel = selectivity(wins)
        lens = Lens({n: db[n].embeddings for n in names}, fm)
        out[group] = search_scores(lens, comps, sel, threshold=threshold, m=m)
        out[group]["components"] = len(comps)
    return out
