"""semlens_fast.report: structure of the written folder, escaping, atomicity, validation, pca_2d."""
from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semlens_fast.errors import ArgumentError, ShapeError
from semlens_fast.report import ComponentCard, LayerSection, ReportData, SearchSection, pca_2d, write_report
from semlens_fast.report import html as report_html
from semlens_fast.report.data import fmt

EVIL = '<script>alert("x")</script>'
N_POINTS = 12


def make_data() -> ReportData:
    """A small report: 2 layers (3 + 1 cards), tensors [1,28,28], [28,28], [3,28,28], a PIL image, numpy."""
    g = torch.Generator().manual_seed(0)
    pil = Image.new("RGB", (20, 10), (200, 30, 30))
    arr = (np.random.default_rng(0).random((28, 28, 3)) * 255).astype(np.uint8)
    layer1 = LayerSection("conv1", "first conv layer", [
        ComponentCard(0, "stripes", 0.312345, 0.5, ["most relevant"],
                      [torch.rand(1, 28, 28, generator=g), torch.rand(28, 28, generator=g)], [11, 12],
                      ["T-shirt", "Trouser"], {"clarity": 0.81234, "polysemanticity": 0.1}),
        ComponentCard(5, EVIL, None, None, ["spurious", "<b>bold</b>"],
                      [torch.rand(3, 28, 28, generator=g), pil, arr], [21, 22, 23]),
        ComponentCard(7, "", None, -0.25, [], [], []),
    ])
    layer2 = LayerSection("fc", "the classifier's input", [
        ComponentCard(2, "square mark", 0.2, 1.5, ["spurious"], [torch.rand(28, 28, generator=g)], [31]),
    ])
    xy = pca_2d(torch.randn(N_POINTS, 6, generator=g))
    return ReportData(
        title=f"Report {EVIL}",
        summary=["The model uses a stamp.", "- bullet one", "- bullet & two"],
        meta={"machine": "2 cores", "run": "abc", "seconds": "1.25"},
        layers=[layer1, layer2],
        searches=[
            SearchSection("image probe: stamp", ["layer", "component", "score"],
                          [{"layer": "conv1", "component": 5, "score": 0.4567}], [torch.rand(1, 28, 28, generator=g)]),
            SearchSection('text: "a square mark"', ["layer", "component", "score"],
                          [{"layer": "fc", "component": 2, "score": None}]),
        ],
        audit_columns=["layer", "component", "label", "relevance", "flagged"],
        audit_rows=[
            {"layer": "conv1", "component": 0, "label": "stripes", "relevance": 0.5, "flagged": False},
            {"layer": "conv1", "component": 5, "label": EVIL, "relevance": 0.123456, "flagged": True},
        ],
        concept_map={"xy": xy, "labels": [f"c{i} {EVIL}" for i in range(N_POINTS)],
                     "groups": ["conv1" if i < 8 else "fc" for i in range(N_POINTS)],
                     "highlight": [i in (1, 9) for i in range(N_POINTS)]},
        notes=["CLIP does not know Fashion-MNIST well."],
    )


class Page(HTMLParser):
    """Every start tag with its attributes and the id of the enclosing <section>; script bodies; text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str], str | None]] = []
        self.section: str | None = None
        self.in_script = False
        self.scripts: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag == "section":
            self.section = a.get("id")
        if tag == "script":
            self.in_script = True
            self.scripts.append("")
        self.tags.append((tag, a, self.section))

    def handle_endtag(self, tag):
        if tag == "section":
            self.section = None
        if tag == "script":
            self.in_script = False

    def handle_data(self, data):
        if self.in_script:
            self.scripts[-1] += data
        else:
            self.text.append(data)

    def find(self, tag: str, cls: str | None = None, section: str | None = None) -> list[dict[str, str]]:
        return [a for t, a, s in self.tags if t == tag and (cls is None or cls in a.get("class", "").split())
                and (section is None or s == section)]


def parse(path: Path) -> Page:
    p = Page()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    return p


def expected_size(img) -> tuple[int, int]:
    if isinstance(img, Image.Image):
        w, h = img.size
    elif isinstance(img, np.ndarray):
        h, w = img.shape[:2]
    else:
        h, w = img.shape[-2:]
    s = report_html.thumb_scale(h, w)
    return w * s, h * s


def test_structure_images_and_tables(tmp_path):
    data = make_data()
    index = write_report(tmp_path / "report", data)
    assert index == (tmp_path / "report" / "index.html").absolute()
    page = parse(index)
    html_text = index.read_text()
    assert "http://" not in html_text and "https://" not in html_text
    assert "src=\"//" not in html_text and "url(" not in html_text

    layers = page.find("section", "layer")
    assert [s["id"] for s in layers] == ["layer-0", "layer-1"]
    for li, layer in enumerate(data.layers):
        assert len(page.find("div", "card", f"layer-{li}")) == len(layer.components)
        imgs = page.find("img", "example", f"layer-{li}")
        given = [im for c in layer.components for im in c.images]
        assert len(imgs) == len(given)
        for tag, img in zip(imgs, given):
            f = index.parent / tag["src"]
            assert f.is_file() and f.resolve().parent == (index.parent / "img").resolve()
            with Image.open(f) as png:
                png.verify()
            with Image.open(f) as png:
                assert png.format == "PNG"
                assert png.size == expected_size(img)
                assert (int(tag["width"]), int(tag["height"])) == png.size
    # a 28x28 image becomes 84x84; the 20x10 PIL image 100x50
    assert expected_size(torch.zeros(28, 28)) == (84, 84)
    assert expected_size(Image.new("L", (20, 10))) == (100, 50)
    # every <img> (examples and probes) points at an existing file; nothing else is in img/
    srcs = {a["src"] for a in page.find("img")}
    assert len(srcs) == len(page.find("img")) == 6 + 1
    assert {f"img/{p.name}" for p in (index.parent / "img").iterdir()} == srcs
    assert len(page.find("img", "probe", "searches")) == 1

    # captions, badges, scores
    text = " ".join(page.text)
    for sid in (11, 12, 21, 22, 23, 31):
        assert f"id {sid}" in text
    assert "T-shirt" in text and "0.312" in text and "0.812" in text
    assert len(page.find("span", "flag-spurious")) == 2
    assert len(page.find("span", "flag-most-relevant")) == 1

    audit = page.find("table", "audit", "audit")
    assert len(audit) == 1
    rows = [a for t, a, s in page.tags if t == "tr" and s == "audit"]
    assert [r.get("class", "") for r in rows] == ["", "", "flagged"]  # header, then the two rows
    assert len(page.find("table", "search-table", "searches")) == 2

    svg = page.find("svg", "concept-map", "concept-map")
    assert len(svg) == 1
    assert len(page.find("circle", "point", "concept-map")) == N_POINTS
    assert len(page.find("circle", "highlight", "concept-map")) == 2
    assert len(page.find("title")) == 1 + N_POINTS  # the page title + one hover text per point
    assert (index.parent / report_html.MARKER).is_file()


def test_text_is_escaped(tmp_path):
    index = write_report(tmp_path / "r", make_data())
    page = parse(index)
    assert len(page.scripts) == 1  # only the page's own inline script
    assert "alert" not in page.scripts[0]
    assert not page.find("b")  # "<b>bold</b>" in a flag is text, not markup
    text = "".join(page.text)
    assert EVIL in text and "<b>bold</b>" in text and "bullet & two" in text
    raw = index.read_text()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in raw


def test_formatting():
    assert fmt(None) == "–"
    assert fmt(0.123456) == "0.123"
    assert fmt(1234.5) == "1.23e+03"
    assert fmt(np.float32(2.0)) == "2"
    assert fmt(torch.tensor(0.5)) == "0.5"
    assert fmt(7) == "7" and fmt(np.int64(7)) == "7"
    assert fmt(True) == "yes" and fmt(float("nan")) == "nan"
    assert fmt("a") == "a"


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_failure_midway_keeps_previous_report(tmp_path, monkeypatch):
    out = tmp_path / "report"
    first = make_data()
    index = write_report(out, first)
    before = index.read_bytes()
    imgs_before = _listing(out / "img")

    calls = {"n": 0}
    real = report_html._write_png

    def failing(img, path):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (simulated)")
        real(img, path)

    monkeypatch.setattr(report_html, "_write_png", failing)
    second = make_data()
    second.title = "second"
    with pytest.raises(OSError, match="simulated"):
        write_report(out, second)
    assert calls["n"] == 3
    assert index.read_bytes() == before
    assert _listing(out / "img") == imgs_before
    assert _listing(tmp_path) == ["report"]  # no temporary or set-aside folders left

    monkeypatch.setattr(report_html, "_write_png", real)
    second.layers = second.layers[1:]  # fewer images: stale files of the first report must go
    write_report(out, second)
    assert "second" in index.read_text()
    assert len(_listing(out / "img")) == 1 + 1
    assert _listing(tmp_path) == ["report"]


def test_overwrite_false_and_foreign_folders(tmp_path):
    out = tmp_path / "report"
    index = write_report(out, make_data())
    before = index.read_bytes()
    with pytest.raises(ArgumentError, match="already exists") as exc:
        write_report(out, make_data(), overwrite=False)
    assert str(out) in str(exc.value)
    assert index.read_bytes() == before

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(ArgumentError, match="not written by write_report"):
        write_report(foreign, make_data())
    assert (foreign / "thesis.tex").read_text() == "precious"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_report(empty, make_data()).is_file()
    assert _listing(tmp_path) == ["empty", "mine", "report"]


def test_parent_is_a_file(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(ArgumentError, match="not a directory") as exc:
        write_report(blocker / "sub" / "report", make_data())
    assert str(blocker) in str(exc.value)
    assert _listing(tmp_path) == ["file.txt"]


def test_nested_parent_is_created(tmp_path):
    assert write_report(tmp_path / "a" / "b" / "report", make_data()).is_file()


def test_validation_names_the_field(tmp_path):
    out = tmp_path / "r"
    bad = make_data()
    bad.layers[0].components[1].images[0] = torch.rand(1, 1, 28, 28)
    with pytest.raises(ShapeError, match=r"layers\[0\]\.components\[1\]\.images\[0\]"):
        write_report(out, bad)
    assert _listing(tmp_path) == []

    bad = make_data()
    bad.searches[0].images = [np.zeros((4, 4, 5), dtype=np.uint8)]
    with pytest.raises(ShapeError, match=r"searches\[0\]\.images\[0\]"):
        write_report(out, bad)

    bad = make_data()
    bad.layers[0].components[1].images[0] = torch.full((28, 28), float("nan"))
    with pytest.raises(ArgumentError, match="NaN"):
        write_report(out, bad)

    bad = make_data()
    bad.layers[1].components[0].image_ids = [1, 2]
    with pytest.raises(ArgumentError, match=r"layers\[1\]\.components\[0\]\.image_ids"):
        write_report(out, bad)

    bad = make_data()
    bad.concept_map["labels"] = bad.concept_map["labels"][:-1]
    with pytest.raises(ShapeError, match=r"concept_map\['labels'\]"):
        write_report(out, bad)

    bad = make_data()
    bad.concept_map["xy"] = np.zeros((N_POINTS, 3))
    with pytest.raises(ShapeError, match=r"concept_map\['xy'\].*\[12, 3\]"):
        write_report(out, bad)

    bad = make_data()
    bad.layers[0].components[0].label_score = "high"
    with pytest.raises(ArgumentError, match="label_score"):
        write_report(out, bad)
    assert _listing(tmp_path) == []


def test_optional_parts_may_be_empty(tmp_path):
    data = ReportData("t", [], {}, [LayerSection("l", "", [])], [], [], [], None)
    page = parse(write_report(tmp_path / "r", data))
    assert len(page.find("section", "layer")) == 1
    assert not page.find("svg") and not page.find("img") and not page.find("table", "audit")
    data.concept_map = {"xy": np.zeros((0, 2))}
    page = parse(write_report(tmp_path / "r", data))
    assert len(page.find("svg", "concept-map")) == 1 and not page.find("circle")
    data.concept_map = {"xy": np.zeros((3, 2))}  # all points at one place: no division by zero
    page = parse(write_report(tmp_path / "r", data))
    assert len(page.find("circle", "point")) == 3


# ---------------------------------------------------------------------------------- pca_2d

def _reference(x: np.ndarray) -> np.ndarray:
    c = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(c, full_matrices=False)
    return c @ vt[:2].T


def test_pca_matches_svd_up_to_sign():
    x = np.random.default_rng(1).normal(size=(40, 7)) * np.arange(1, 8)
    got = pca_2d(x)
    ref = _reference(x)
    assert got.dtype == np.float64 and got.shape == (40, 2)
    for k in range(2):
        s = np.sign(got[:, k] @ ref[:, k])
        np.testing.assert_allclose(got[:, k], s * ref[:, k], rtol=1e-10, atol=1e-10)
    # torch input (float32) gives the same as its float64 numpy copy
    t = torch.from_numpy(x).float()
    np.testing.assert_allclose(pca_2d(t), pca_2d(t.double().numpy()), rtol=0, atol=0)


def test_pca_sign_is_deterministic():
    x = np.random.default_rng(2).normal(size=(30, 5))
    got = pca_2d(x)
    c = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(c, full_matrices=False)
    for k in range(2):
        v = vt[k] if vt[k][np.argmax(np.abs(vt[k]))] > 0 else -vt[k]
        np.testing.assert_allclose(got[:, k], c @ v, atol=1e-10)
    # the sign depends on the loadings, not on row order or the orientation of the data
    perm = np.random.default_rng(3).permutation(30)
    np.testing.assert_allclose(pca_2d(x[perm]), got[perm], atol=1e-10)
    np.testing.assert_allclose(pca_2d(-x), -got, atol=1e-10)
    np.testing.assert_array_equal(pca_2d(x), got)


def test_pca_degenerate_inputs():
    assert pca_2d(np.ones((1, 4))).tolist() == [[0.0, 0.0]]
    assert pca_2d(np.zeros((0, 4))).shape == (0, 2)
    np.testing.assert_array_equal(pca_2d(np.full((5, 3), 7.0)), np.zeros((5, 2)))
    one_dim = pca_2d(np.arange(5.0)[:, None])
    np.testing.assert_allclose(one_dim[:, 0], [-2, -1, 0, 1, 2])
    np.testing.assert_array_equal(one_dim[:, 1], 0)
    with pytest.raises(ShapeError, match=r"\[N, d\]"):
        pca_2d(np.zeros(4))
    with pytest.raises(ArgumentError, match="NaN"):
        pca_2d(np.array([[1.0, float("nan")], [0.0, 1.0]]))


def test_data_behind_a_flagged_component(tmp_path):
    """The audit's listed samples of a flagged card are drawn cropped to their receptive-field boxes."""
    from types import SimpleNamespace

    from semlens_fast.report.from_run import _evidence

    imgs = torch.arange(3 * 28 * 28, dtype=torch.float32).reshape(3, 28, 28) / (3 * 28 * 28)
    ds = SimpleNamespace(images=imgs)
    samples = [{"id": 2, "box": [3, 4, 10, 12], "changed_by_transform": False},
               {"id": 0, "box": [0, 0, 40, 40], "changed_by_transform": True},  # a box of another input size
               {"id": 1}]                                                        # no box: not drawn
    ev = _evidence(ds, samples)
    assert [e[1] for e in ev] == [2, 0]
    # the 7x8 field in a window of 3x its size (21x24, clipped to the 28x28 image, centred on the box: rows 0-20,
    # columns 0-23), grey as RGB, with a red ring one pixel outside the box
    win = ev[0][0]
    assert win.shape == (3, 21, 24) and ev[0][2] == "carries the artifact"
    grey = imgs[2, 0:21, 0:24]
    ring = torch.zeros(21, 24, dtype=torch.bool)
    ring[2, 3:13] = ring[10, 3:13] = True
    ring[2:11, 3] = ring[2:11, 12] = True
    assert torch.equal(win[:, ~ring], grey[~ring].expand(3, -1))
    assert torch.equal(win[:, ring], torch.tensor([1.0, 0.0, 0.0])[:, None].expand(3, int(ring.sum())))
    assert torch.equal(win[:, 3:10, 4:12], grey[3:10, 4:12].expand(3, -1, -1))  # the field itself is untouched
    assert torch.equal(ev[1][0], imgs[0]) and ev[1][2] == "whole image (box does not fit); changed by the transform"
    data = make_data()
    data.layers[1].components[0].evidence = ev
    index = write_report(tmp_path / "report", data)
    page = parse(index)
    tags = page.find("img", "evidence", "layer-1")
    assert len(tags) == 2
    with Image.open(index.parent / tags[0]["src"]) as png:
        assert png.size == expected_size(win)
    assert "carries the artifact" in " ".join(page.text)
