"""Lens: known answers on synthetic ConceptDBs (planted concepts, duplicated components, mixtures)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from semlens_fast.concepts import ConceptDB, LayerConcepts
from semlens_fast.errors import ArgumentError, ShapeError
from semlens_fast.foundation import FoundationModel, ModalityError
from semlens_fast.foundation.base import IMAGE, TEXT
from semlens_fast.lens import UNLABELLED, Lens

D = 24
WORDS = ["cat", "dog", "car", "tree", "water", "stripes", "watermark", "grass", "sky", "a", "photo", "of", "the"]


def word_vectors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {w: torch.randn(D, generator=g) for w in WORDS}


class BagFM(FoundationModel):
    """Text: sum of word vectors (so the null subtraction removes the template words exactly).
    Images: a [B, 1, 1, D] 'image' whose pixels are its embedding. Records every prompt."""

    modalities = frozenset({TEXT, IMAGE})
    name = "bag"
    image_size = None

    def __init__(self, modalities=None):
        super().__init__()
        self.vec = word_vectors()
        self.prompts: list[str] = []
        if modalities is not None:
            self.modalities = frozenset(modalities)

    @property
    def dim(self):
        return D

    def _encode_text_batch(self, texts):
        self.prompts += list(texts)
        out = torch.full((len(texts), D), 1e-3)
        for i, t in enumerate(texts):
            for w in t.replace(".", " ").split():
                out[i] += self.vec[w] if w in self.vec else self._unknown(w)
        return out

    @staticmethod
    def _unknown(w):  # words outside the test vocabulary (the audit's null words): a fixed random vector each
        import zlib

        return torch.randn(D, generator=torch.Generator().manual_seed(zlib.crc32(w.encode())))

    def encode_images(self, images, **kw):  # images: [B, D] tensors wrapped as 'pictures'
        self._check_modality(IMAGE)
        x = torch.as_tensor(images).float().reshape(-1, D)
        return F.normalize(x, dim=-1)


def make_db(fm, layers, k=6, seed=1, noise=0.02):
    """layers: {name: [concept word per component or None (empty) or (w1, w2) mixture]}.

    Component examples are (noisy) unit word vectors of the concept words; sample ids encode
    (layer index, component, slot)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for li, (name, spec) in enumerate(layers.items()):
        C = len(spec)
        ex = torch.zeros(C, k, D)
        valid = torch.zeros(C, k, dtype=torch.bool)
        for c, w in enumerate(spec):
            if w is None:
                continue
            ws = [w] * k if isinstance(w, str) else [w[i % 2] for i in range(k)]
            for j, ww in enumerate(ws):
                ex[c, j] = fm.vec[ww] + noise * torch.randn(D, generator=g)
            valid[c] = True
        ex = F.normalize(ex, dim=-1) * valid.unsqueeze(-1)
        emb = F.normalize((ex * valid.unsqueeze(-1)).sum(1), dim=-1)
        ids = torch.where(valid, 1000 * li + 10 * torch.arange(C)[:, None] + torch.arange(k)[None], torch.tensor(-1))
        out[name] = LayerConcepts(embeddings=emb, ids=ids, boxes=torch.zeros(C, k, 4), values=torch.ones(C, k),
                                  valid=valid, examples=ex.half())
    meta = {"foundation": fm.describe(), "k": k, "mode": "test"}
    return ConceptDB(out, meta)


@pytest.fixture(scope="module")
def fm():
    return BagFM()


@pytest.fixture(scope="module")
def db(fm):
    return make_db(fm, {
        "l1": ["cat", "dog", None, "car", ("cat", "car"), "tree"],
        "l2": ["water", "cat", "stripes", "watermark", "grass", "dog", "cat"],
    })


TEMPLATES = ["a photo of {}", "the {}"]


# ---------------------------------------------------------------------- search


def test_search_text_planted(fm, db):
    lens = Lens(db, fm, templates=TEMPLATES)
    res = lens.search("cat", k=3)
    rec = res.to_records()
    assert [r["rank"] for r in rec] == [0, 1, 2]
    top = {(r["layer"], r["component"]) for r in rec}
    assert top == {("l1", 0), ("l2", 1), ("l2", 6)}
    assert all(r["text"] == "cat" for r in rec) and rec[0]["score"] > 0.9
    assert all(r["component"] != 2 or r["layer"] != "l1" for r in lens.search("tree", k=20).to_records())  # empty never
    per = lens.search(["car"], k=2, layers=["l1"], per_layer=True).to_records()
    assert [(r["layer"], r["component"]) for r in per][0] == ("l1", 3)
    assert per[1]["component"] == 4  # the cat/car mixture is the runner-up
    pd = pytest.importorskip("pandas")
    df = res.to_pandas()
    assert isinstance(df, pd.DataFrame) and list(df.columns) == ["query", "text", "layer", "component", "score", "rank"]
    assert "component" in str(res)


def test_text_probes_never_mix_queries(fm, db):
    lens = Lens(db, fm, templates=TEMPLATES)
    both = lens.embed_texts(["cat", "car", "grass"])
    for i, q in enumerate(["cat", "car", "grass"]):
        alone = lens.embed_texts(q)
        torch.testing.assert_close(both[i], alone[0])
        # plain reimplementation: mean over templates of (filled - empty), this query only
        plain = sum(fm.encode_texts(t.format(q))[0] - fm.encode_texts(t.format(""))[0] for t in TEMPLATES) / len(TEMPLATES)
        torch.testing.assert_close(both[i], plain, atol=1e-6, rtol=0)
    n = len(fm.prompts)
    lens.embed_texts(["cat", "car"])
    assert sorted(fm.prompts[n:]) == sorted(["a photo of cat", "the cat", "a photo of car", "the car", "a photo of ", "the "])
    # and the search of a batch equals searches one at a time
    batch = lens.search(["cat", "car"], k=2).to_records()
    single = lens.search("car", k=2).to_records()
    assert [(r["layer"], r["component"]) for r in batch if r["query"] == 1] == [(r["layer"], r["component"]) for r in single]


def test_semanticlens_prompt_mixing_bug_is_real(fm):
    """semanticlens 0.2.1's _embed_text_probes averages prompts of different queries."""
    sl = pytest.importorskip("semanticlens.lens")

    class Tok(list):
        def to(self, *_):
            return self

    class SLFM:
        device = "cpu"

        def tokenize(self, texts):
            return Tok(texts)

        def encode_text(self, texts):
            return fm._encode_text_batch(list(texts))

        def to(self, *_):
            return self

    queries = ["cat", "car"]
    theirs = sl._embed_text_probes(SLFM(), queries, TEMPLATES, None)
    # the right probe of "cat" with this (unnormalised) encoder is exactly vec["cat"]; theirs mixes in "car"
    assert not torch.allclose(theirs[0], fm.vec["cat"], atol=1e-2)
    torch.testing.assert_close(theirs[0], (fm.vec["cat"] + fm.vec["car"]) / 2 + (fm.vec["photo"] + fm.vec["a"] + fm.vec["of"] - fm.vec["the"]) / 2, atol=1e-4, rtol=0)


def test_search_embeddings_and_images(fm, db):
    lens = Lens(db, fm)
    q = torch.stack([fm.vec["dog"], fm.vec["stripes"]])
    rec = lens.search(q, k=1).to_records()
    assert [(r["layer"], r["component"]) for r in rec] == [("l1", 1), ("l2", 2)]
    assert rec[0]["text"] is None
    img = lens.search(fm.vec["watermark"][None], k=1, modality="image").to_records()
    assert (img[0]["layer"], img[0]["component"]) == ("l2", 3)
    assert len(lens.search(fm.vec["dog"], k=100, layers="l1").to_records()) == 5  # 6 components, one empty


# ---------------------------------------------------------------------- label


def test_label_planted_threshold_margin(fm, db):
    lens = Lens(db, fm, templates=TEMPLATES)
    vocab = ["cat", "dog", "car", "tree", "water", "stripes", "watermark", "grass"]
    lab = lens.label(vocab)
    assert lab.names("l1") == ["cat", "dog", UNLABELLED, "car", lab.names("l1")[4], "tree"]
    assert lab.names("l1")[4] in ("cat", "car")
    assert lab.names("l2") == ["water", "cat", "stripes", "watermark", "grass", "dog", "cat"]
    assert float(lab.margin["l1"][0]) > 0.5 and float(lab.margin["l1"][4]) < 0.1  # the mixture is ambiguous
    assert lab.labels_for("l1") == {0: "cat", 1: "dog", 3: "car", 4: lab.names("l1")[4], 5: "tree"}
    assert lab.counts("l2")["cat"] == 2
    hi = lens.label(vocab, threshold=0.9)
    assert hi.names("l1")[4] == UNLABELLED and hi.names("l1")[0] == "cat"
    pytest.importorskip("pandas")
    assert len(lab.to_pandas()) == 13
    # the label result plugs into validate_concepts' label resolution
    from semlens_fast.validate.concepts import resolve_labels

    assert resolve_labels(lab, "l2")[3] == ["watermark"]


def test_label_equals_brute_force_argmax():
    g = torch.Generator().manual_seed(3)
    E = F.normalize(torch.randn(300, D, generator=g), dim=-1)
    P = torch.randn(40, D, generator=g)
    lens = Lens({"x": E}, None)
    lab = lens.label({f"w{i}": P[i] for i in range(40)})
    sims = F.normalize(E, dim=-1) @ F.normalize(P, dim=-1).T
    top = sims.topk(2, dim=1)
    assert torch.equal(lab.best["x"], top.indices[:, 0])
    torch.testing.assert_close(lab.score["x"], top.values[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(lab.margin["x"], top.values[:, 0] - top.values[:, 1], atol=1e-5, rtol=0)
    single = lens.label({"only": P[0]})
    assert torch.isnan(single.margin["x"]).all()


# ---------------------------------------------------------------------- compare


def test_compare_duplicate_and_disjoint(fm, db):
    lens = Lens(db, fm, templates=TEMPLATES)
    same = lens.compare(db, threshold=0.99)
    assert same.coverage_a == 1.0 and same.coverage_b == 1.0
    assert all(r["match_layer"] is not None for r in same.a_match)
    other = make_db(fm, {"m": ["cat", "grass", "sky", "sky"]}, seed=9)
    res = lens.compare(Lens(other, fm), layers="l2", threshold=0.9,
                       vocabulary=["cat", "dog", "water", "stripes", "watermark", "grass", "sky"])
    amatch = {r["component"]: (r["match_component"], r["score"]) for r in res.a_match}
    assert amatch[1][0] == 0 and amatch[1][1] > 0.99  # cat -> cat
    assert amatch[0][1] < 0.9  # water has no counterpart
    assert res.coverage_a == pytest.approx(3 / 7)  # cat, grass, cat of l2 are in B
    assert res.coverage_b == pytest.approx(2 / 4)  # sky, sky are not in l2
    table = {r["label"]: r for r in res.concepts}
    assert table["cat"]["status"] == "shared" and table["cat"]["n_a"] == 2
    assert table["sky"]["status"] == "only B" and table["sky"]["n_b"] == 2
    assert table["water"]["status"] == "only A"
    assert "coverage" in str(res)
    # two layers of the same model
    two = lens.compare(lens, layers="l1", other_layers="l2", threshold=0.95)
    assert two.coverage_a == pytest.approx(2 / 5)  # cat, dog are in l2; car, the mixture, tree are not
    # brute force best matches
    A = db["l1"].embeddings[[0, 1, 3, 4, 5]]
    B = db["l2"].embeddings
    bf = (A @ B.T).max(1)
    torch.testing.assert_close(torch.tensor([r["score"] for r in two.a_match]), bf.values, atol=1e-5, rtol=0)
    assert [r["match_component"] for r in two.a_match] == bf.indices.tolist()


# ---------------------------------------------------------------------- audit


def test_audit_flags_spurious_and_relevance_share(fm, db):
    lens = Lens(db, fm, templates=TEMPLATES)
    rel = torch.tensor([1.0, 0.5, 3.0, 2.0, 0.5, 1.0, -4.0])  # watermark carries 2 of 8 positive
    rep = lens.audit(valid=["cat", "dog", "grass"], spurious=["watermark", "water"], layers="l2", relevance=rel)
    flagged = {r["component"] for r in rep.flagged}
    assert flagged == {0, 3}  # water, watermark: calibrated against 100 unrelated words each
    assert {r["component"] for r in rep.ranked[:2]} == {0, 3}
    assert rep.probe_kinds == {k: "text" for k in ("watermark", "water", "cat", "dog", "grass")}
    assert rep.relevance_share["spurious"] == pytest.approx((1.0 + 2.0) / 8.0)
    assert rep.relevance_share["valid"] == pytest.approx(5.0 / 8.0)
    wm = next(r for r in rep.flagged if r["component"] == 3)
    assert wm["spurious_concept"] == "watermark" and wm["top_samples"] == [1030, 1031, 1032, 1033, 1034, 1035]
    assert wm["rather_than_valid"] and wm["z"] > wm["valid_z"]
    cat = next(r for r in rep.components if r["component"] == 1)
    assert cat["valid_concept"] == "cat" and not cat["flagged"]
    assert all(r["q_value"] <= 0.1 for r in rep.flagged)
    s = str(rep)
    assert "watermark" in s and "flagged" in s
    pytest.importorskip("pandas")
    assert len(rep.to_pandas()) == 7 and len(rep.flagged_pandas()) == 2
    # threshold (on the score) and [n_classes, C] relevance with target
    rep2 = lens.audit(["cat"], ["watermark"], relevance={"l2": torch.stack([rel, -rel])}, target=0, layers=["l2"],
                      threshold=0.5)
    assert {r["component"] for r in rep2.flagged} <= {0, 3} and 3 in {r["component"] for r in rep2.flagged}
    assert all(r["score"] >= 0.5 for r in rep2.flagged)
    # without target, [n_classes, C] relevance ranks the classes by the flagged components' share
    rep3 = lens.audit(["cat"], ["watermark"], relevance={"l2": torch.stack([rel, -rel])}, layers="l2")
    assert rep3.classes and rep3.relevance_share is None


# ---------------------------------------------------------------------- describe


def test_describe(fm, db):
    lens = Lens(db, fm, templates=TEMPLATES)
    s = lens.describe("l1", vocabulary=["cat", "dog", "car", "tree"], relevance=torch.arange(6.0))
    assert s.n_components == 6 and s.n_empty == 1
    assert math.isnan(float(s.clarity[2])) and float(s.clarity[0]) > 0.95
    assert float(s.polysemanticity[4]) > float(s.polysemanticity[0]) + 0.5  # cat/car mixture
    assert s.label_counts[UNLABELLED] == 1
    assert s.top_relevant[0]["component"] == 5 and s.top_relevant[0]["label"] == "tree"
    assert "redundancy" in str(s)
    torch.testing.assert_close(lens.redundancy("l2").per_component[6], torch.tensor(lens.redundancy("l2").per_component[1].item()))


# ---------------------------------------------------------------------- bad input


def test_bad_input(fm, db):
    lens = Lens(db, fm)
    with pytest.raises(ArgumentError, match="vocabulary is empty"):
        lens.label([])
    with pytest.raises(ArgumentError, match="spurious is empty"):
        lens.audit(["cat"], [])
    with pytest.raises(ArgumentError, match="query is empty"):
        lens.search([], k=3)
    with pytest.raises(ArgumentError, match="not in the ConceptDB"):
        lens.search("cat", layers=["nope"])
    with pytest.raises(ArgumentError, match="not in the ConceptDB"):
        lens.describe("nope")
    with pytest.raises(ArgumentError, match="k must be"):
        lens.search("cat", k=0)
    with pytest.raises(ShapeError, match=r"\[Q, 24\]"):
        lens.search(torch.randn(2, 5), modality="embedding")
    vision = BagFM(modalities={IMAGE})
    vdb = make_db(vision, {"l": ["cat"]})
    with pytest.raises(ModalityError, match="vision-only.*(OpenCLIP|Aligned)"):
        Lens(vdb, vision).search("cat")
    with pytest.raises(ArgumentError, match="foundation model"):
        Lens(db, None).search("cat")
    with pytest.raises(ArgumentError, match="placeholder"):
        Lens(db, fm, templates=["no placeholder"])
    with pytest.raises(ArgumentError, match="per-example"):
        Lens({"x": torch.randn(4, D)}).clarity("x")
    with pytest.raises(ShapeError, match="different|dimension"):
        lens.compare({"x": torch.randn(3, 5)})


def test_label_uses_the_topk_kernel(monkeypatch):
    """label asks the kernel for 2 labels per component: never a components x vocabulary matrix."""
    import semlens_fast.lens as lens_mod

    calls = []
    real_topk, real_max = lens_mod.cosine_topk, lens_mod.pairwise_max

    def spy_topk(q, db, k, **kw):
        calls.append(("topk", tuple(q.shape), tuple(db.shape), k))
        return real_topk(q, db, k, **kw)

    def spy_max(a, b, **kw):
        calls.append(("max", tuple(a.shape), tuple(b.shape), 1))
        return real_max(a, b, **kw)

    monkeypatch.setattr(lens_mod, "cosine_topk", spy_topk)
    monkeypatch.setattr(lens_mod, "pairwise_max", spy_max)
    g = torch.Generator().manual_seed(8)
    lens = Lens({"x": F.normalize(torch.randn(500, D, generator=g), dim=-1)})
    lens.label({f"w{i}": torch.randn(D, generator=g) for i in range(50)})
    assert calls == [("topk", (500, D), (50, D), 2)]
    # (the calibrated audit scores every component against its probes' null banks: a components x null-probes
    # matrix per probe by design, bounded by n_null)


# ---------------------------------------------------------------------- hardening (issue 20, the Lens's share)


@pytest.mark.parametrize("q", ["", "   ", "\t\n", ["cat", " "]])
def test_empty_text_queries_are_refused(fm, db, q):
    with pytest.raises(ArgumentError, match="empty or whitespace"):
        Lens(db, fm).search(q)


def test_zero_and_nonfinite_vector_queries_are_refused(fm, db):
    lens = Lens(db, fm)
    with pytest.raises(ArgumentError, match="zero vector"):
        lens.search(torch.zeros(D))
    with pytest.raises(ArgumentError, match="not finite"):
        lens.search(torch.full((D,), float("nan")))
    with pytest.raises(ArgumentError, match="zero vector"):
        lens.label({"a": torch.zeros(D), "b": torch.ones(D)})


def test_text_probe_of_nothing_is_refused():
    class Same(BagFM):
        def _encode_text_batch(self, texts):
            return torch.ones(len(texts), D)  # every prompt embeds alike: null subtraction leaves zero

    f = Same()
    lens = Lens(make_db(f, {"l": ["cat", "dog"]}), f)
    with pytest.raises(ArgumentError, match="zero vector"):
        lens.search("cat")


@pytest.mark.parametrize("tpl", ["{}{}", "{x} {}", "{0}", "{} and {}", "{", "a } b {}"])
def test_bad_templates_are_refused(fm, db, tpl):
    with pytest.raises(ArgumentError, match="templates"):
        Lens(db, fm, templates=[tpl])
    with pytest.raises(ArgumentError, match="templates"):
        Lens(db, fm).search("cat", templates=[tpl])


def test_escaped_braces_in_templates_are_fine(fm, db):
    res = Lens(db, fm, templates=["{{a}} photo of {}"]).search("cat", k=1)
    assert len(res) == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), True, "0.2"])
def test_thresholds_and_margins_are_checked(fm, db, bad):
    lens = Lens(db, fm, templates=TEMPLATES)
    with pytest.raises(ArgumentError, match="threshold"):
        lens.label(["cat", "dog"], threshold=bad)
    with pytest.raises(ArgumentError, match="threshold"):
        lens.compare(lens, threshold=bad)
    with pytest.raises(ArgumentError, match="threshold"):
        lens.audit(["cat"], ["watermark"], layers="l2", threshold=bad)
    with pytest.raises(ArgumentError, match="margin"):
        lens.audit(["cat"], ["watermark"], layers="l2", margin=bad)


def test_targets_and_top_are_checked(fm, db):
    lens = Lens(db, fm, templates=TEMPLATES)
    rel = {"l2": torch.ones(3, 7)}
    for t in (99, 3, -1, True):
        with pytest.raises(ArgumentError, match="target"):
            lens.audit(["cat"], ["watermark"], layers="l2", relevance=rel, target=t)
        with pytest.raises(ArgumentError, match="target"):
            lens.describe("l2", relevance=rel, target=t)
    for top in (-1, 0, True):
        with pytest.raises(ArgumentError, match="top"):
            lens.audit(["cat"], ["watermark"], layers="l2", top=top)
        with pytest.raises(ArgumentError, match="top"):
            lens.describe("l2", relevance=torch.ones(7), top=top)


def test_nan_relevance_in_describe_is_left_out(fm, db):
    r = torch.arange(7.0)
    r[6] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        s = Lens(db, fm).describe("l2", relevance=r)
    assert [row["component"] for row in s.top_relevant[:2]] == [5, 4]
    assert math.isnan(s.top_relevant[-1]["relevance"])
