"""``semlens serve``: the explorer's operations and its JSON API (in-process, FastAPI's TestClient),
checked against the library they wrap; safety (paths, hosts, origins, escaping, uploads); the
read-only guarantee; and the exit codes on damaged runs. The browser test is test_serve_browser.py."""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from semlens_fast import cli  # noqa: E402
from semlens_fast._io import read_json, write_json, write_sealed_json  # noqa: E402
from semlens_fast.errors import SemlensError  # noqa: E402
from semlens_fast.serve import Explorer, Limits, build  # noqa: E402
from semlens_fast.workspace import Run  # noqa: E402
from tests.serve_helpers import copy_run, digits_run, tree_state  # noqa: E402

EVIL = '<img src=x onerror="alert(1)">'


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return digits_run(tmp_path_factory)


@pytest.fixture(scope="module")
def served(run_dir):
    """(explorer, client, state of the folder before any request) over the shared run, read-only."""
    before = tree_state(run_dir)
    ex = Explorer.open(run_dir)
    client = TestClient(build(ex, allowed_hosts=["testserver"]))
    return ex, client, before


@pytest.fixture(scope="module")
def writable(run_dir, tmp_path_factory):
    """A writable explorer over a copy of the run whose labels.json carries a label with HTML in it."""
    d = copy_run(run_dir, tmp_path_factory.mktemp("serve-rw") / "run")
    labels = read_json(d / "labels.json")
    labels["records"][0]["label"] = EVIL
    write_sealed_json(d / "labels.json", labels)
    ex = Explorer.open(d, writable=True)
    return d, ex, TestClient(build(ex, allowed_hosts=["testserver"]))


def png_of(arr: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.numpy()).save(buf, format="PNG")
    return buf.getvalue()


def stamp_png() -> bytes:
    img = torch.zeros(28, 28, dtype=torch.uint8)
    img[1:6, 1:6] = 255
    return png_of(img)


# ---------------------------------------------------------------------- the operations agree with the library


def test_text_search_equals_the_lens_and_the_cli(served, run_dir, capsys):
    ex, client, _ = served
    r = client.get("/api/v1/search", params={"q": "a white square stamp", "k": 7})
    assert r.status_code == 200, r.text
    got = r.json()["queries"][0]["results"]
    want = ex.lens.search("a white square stamp", k=7).to_records()  # the text path of the Lens, not the explorer's
    assert [(g["layer"], g["component"]) for g in got] == [(w["layer"], w["component"]) for w in want]
    assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], abs=1e-6)
    assert [g["rank"] for g in got] == list(range(7))
    labels = {(x["layer"], x["component"]): x["label"] for x in read_json(run_dir / "labels.json")["records"]}
    for g in got:
        assert g["label"] == labels[(g["layer"], g["component"])]
        assert g["url"] == f"/neuron/{g['layer']}/{g['component']}"
        lc = ex.db[g["layer"]]
        want_ids = [i for i, v in zip(lc.ids[g["component"]].tolist(), lc.valid[g["component"]].tolist()) if v][:8]
        assert [e["sample"] for e in g["examples"]] == want_ids
    # the CLI answers the same question with the same ranking
    cli_dir = run_dir.parent / "cli-copy"
    copy_run(run_dir, cli_dir)  # the CLI appends to searches.json; keep the served folder untouched
    code = cli.main(["search", "--run", str(cli_dir), "a white square stamp", "--k", "7", "--json"])
    rows = json.loads(capsys.readouterr().out)[0]["rows"]
    assert code == 0
    assert [(x["layer"], x["component"]) for x in rows] == [(g["layer"], g["component"]) for g in got]


def test_text_probes_equal_the_lens_probes(served):
    ex, _, _ = served
    for text in ["a white square stamp", "7", "a long query about stripes, dots and a square"]:
        assert torch.allclose(ex.text_probe(text), ex.lens.embed_texts([text]).float(), atol=1e-6)
    assert ex.text_probe("7") is ex.text_probe("7")  # cached


def test_post_search_text_layers_and_per_layer(served):
    ex, client, _ = served
    r = client.post("/api/v1/search", json={"text": "a white square stamp", "k": 3, "layers": ["conv2"],
                                            "per_layer": True, "examples": 0})
    assert r.status_code == 200, r.text
    res = r.json()["queries"][0]["results"]
    assert len(res) == 3 and {x["layer"] for x in res} == {"conv2"} and "examples" not in res[0]
    # comma-separated layers in the query string
    r = client.get("/api/v1/search", params={"q": "stamp", "k": 4, "layers": "conv1,conv3", "per_layer": "true"})
    res = r.json()["queries"][0]["results"]
    assert [x["layer"] for x in res] == ["conv1"] * 4 + ["conv3"] * 4


def unique_components(ex, layer: str) -> list[int]:
    """Components whose embedding no other component of the run shares (duplicates tie at cosine 1)."""
    red = ex.lens.redundancy(layer).per_component
    return [c for c in range(ex.db[layer].channels) if float(red[c]) < 0.9999]


def test_embedding_search_finds_the_component_itself(served):
    ex, client, _ = served
    c3, c1 = unique_components(ex, "conv3")[0], unique_components(ex, "conv1")[0]
    e = ex.db["conv3"].embeddings[c3].float()
    r = client.post("/api/v1/search", json={"embedding": e.tolist(), "k": 2})
    assert r.status_code == 200, r.text
    top = r.json()["queries"][0]["results"][0]
    assert (top["layer"], top["component"]) == ("conv3", c3) and top["score"] == pytest.approx(1.0, abs=1e-5)
    two = torch.stack([e, ex.db["conv1"].embeddings[c1].float()])
    r = client.post("/api/v1/search", json={"embedding": two.tolist(), "k": 1})
    qs = r.json()["queries"]
    assert [(q["results"][0]["layer"], q["results"][0]["component"]) for q in qs] == [("conv3", c3), ("conv1", c1)]
    assert client.post("/api/v1/search", json={"embedding": [1.0, 2.0], "k": 1}).status_code == 400
    nan = json.dumps({"embedding": [0.0] * (ex.db.dim - 1) + [float("nan")]})  # json.dumps writes NaN
    assert client.post("/api/v1/search", content=nan, headers={"content-type": "application/json"}).status_code == 400
    assert client.post("/api/v1/search", json={"text": "a", "embedding": e.tolist()}).status_code == 400
    assert client.post("/api/v1/search", json={"text": "a", "k": 0}).status_code == 400


def test_image_upload_search_equals_the_lens(served, run_dir):
    ex, client, _ = served
    data = stamp_png()
    r = client.post("/api/v1/search/image", files={"image": ("stamp.png", data, "image/png")}, data={"k": "5"})
    assert r.status_code == 200, r.text
    got = [(x["layer"], x["component"]) for x in r.json()["queries"][0]["results"]]
    want = ex.lens.search([Image.open(io.BytesIO(data)).convert("RGB")], k=5).to_records()
    assert got == [(w["layer"], w["component"]) for w in want]
    assert r.json()["queries"][0]["kind"] == "image"


def test_neuron(served, run_dir):
    ex, client, _ = served
    r = client.get("/api/v1/neurons/conv2/3", params={"nearest": 5})
    assert r.status_code == 200, r.text
    n = r.json()
    lc = ex.db["conv2"]
    assert [e["sample"] for e in n["examples"]] == [i for i, v in zip(lc.ids[3].tolist(), lc.valid[3].tolist()) if v]
    assert [e["value"] for e in n["examples"]] == pytest.approx(lc.values[3][lc.valid[3]].tolist())
    rec = next(x for x in read_json(run_dir / "labels.json")["records"] if (x["layer"], x["component"]) == ("conv2", 3))
    assert n["label"]["label"] == rec["label"] and n["label"]["margin"] == pytest.approx(rec["margin"])
    red = ex.lens.redundancy("conv2")
    assert n["scores"]["redundancy"] == pytest.approx(float(red.per_component[3]))
    assert n["scores"]["redundancy_partner"] == int(red.partner[3])
    assert n["scores"]["clarity"] == pytest.approx(float(ex.lens.clarity("conv2")[3]))
    assert 0 <= n["scores"]["polysemanticity"] <= 2
    rel = Run.open(run_dir).relevance(6)["conv2"]
    (row,) = n["relevance"]
    assert row["target"] == 6 and row["relevance"] == pytest.approx(float(rel[3]))
    assert row["rank"] == int((rel > rel[3]).sum()) + 1
    near = n["nearest"]
    assert len(near) == 5 and ("conv2", 3) not in {(x["layer"], x["component"]) for x in near}
    assert [x["score"] for x in near] == sorted((x["score"] for x in near), reverse=True)
    # the nearest component is the closest by cosine over all layers
    e = lc.embeddings[3].float()
    best = max(((n_, c) for n_ in ex.layers for c in range(ex.db[n_].channels) if (n_, c) != ("conv2", 3)),
               key=lambda nc: float(torch.nn.functional.cosine_similarity(e, ex.db[nc[0]].embeddings[nc[1]].float(), 0)))
    assert (near[0]["layer"], near[0]["component"]) == best
    assert client.get("/api/v1/neurons/conv2/32").status_code == 404
    assert client.get("/api/v1/neurons/nope/1").status_code == 404


def test_describe(served, run_dir):
    ex, client, _ = served
    d = client.get("/api/v1/layers/conv3", params={"target": 6, "limit": 10}).json()
    assert d["components"] == 32 and len(d["rows"]) == 10 and d["target_class"] == "6"
    assert sum(d["label_counts"].values()) == 32
    rel = Run.open(run_dir).relevance(6)["conv3"]
    top = torch.sort(rel, descending=True, stable=True).indices[:10].tolist()
    assert [r["component"] for r in d["top_relevant"]] == top
    assert d["rows"][4]["relevance"] == pytest.approx(float(rel[4]))
    page2 = client.get("/api/v1/layers/conv3", params={"offset": 30, "limit": 10}).json()
    assert [r["component"] for r in page2["rows"]] == [30, 31]
    # read-only: relevance for a class that was never computed is refused, not computed
    r = client.get("/api/v1/layers/conv3", params={"target": 3})
    assert r.status_code == 409 and "read-only" in r.json()["detail"]
    assert client.get("/api/v1/layers/conv3", params={"target": 99}).status_code == 400


def test_compare_layer_sets_equals_the_lens(served):
    ex, client, _ = served
    r = client.get("/api/v1/compare", params={"layers": "conv1", "other_layers": "conv2", "threshold": 0.9,
                                              "labels": "true", "limit": 100})
    assert r.status_code == 200, r.text
    c = r.json()
    want = ex.lens.compare(ex.lens, layers=["conv1"], other_layers=["conv2"], threshold=0.9,
                           vocabulary=read_json(ex.run.file("labels.json"))["vocabulary"])
    assert c["coverage_a"] == pytest.approx(want.coverage_a) and c["coverage_b"] == pytest.approx(want.coverage_b)
    assert c["n_a"] == 16 and c["n_b"] == 32 and len(c["a_match"]) == 16
    assert [r["score"] for r in c["a_match"]] == sorted(r["score"] for r in c["a_match"])  # least covered first
    assert c["concepts"] == want.concepts
    assert client.get("/api/v1/compare", params={"layers": "conv1"}).status_code == 400
    assert client.get("/api/v1/compare", params={"other": "elsewhere"}).status_code == 404


def test_compare_with_another_run(run_dir, tmp_path):
    other = copy_run(run_dir, tmp_path / "other")
    ex = Explorer.open(run_dir, compare_with=[other])
    c = ex.compare(other="other", layers=["conv3"], other_layers=["conv3"], threshold=0.99)
    assert c["coverage_a"] == pytest.approx(1.0) and c["coverage_b"] == pytest.approx(1.0)  # a copy covers itself
    assert all(r["score"] == pytest.approx(1.0, abs=1e-5) and r["match_component"] == r["component"] for r in c["a_match"])


def test_audit_equals_the_lens(served):
    ex, client, _ = served
    body = {"valid": ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"], "spurious": ["white square stamp"],
            "target": 6, "margin": 0.05}
    r = client.post("/api/v1/audit", json=body)
    assert r.status_code == 200, r.text
    a = r.json()
    rel = Run.open(ex.run.path).relevance(6)
    want = ex.lens.audit(body["valid"], body["spurious"], relevance=rel, target=6, margin=0.05, top=8)
    assert [(f["layer"], f["component"]) for f in a["flagged"]] == [(f["layer"], f["component"]) for f in want.flagged]
    assert a["summary"]["n_flagged"] == len(want.flagged) and a["summary"]["n_components"] == 80
    # the calibrated audit of a text probe through Aligned (fitted without the stamp) may flag nothing: the
    # whole ranked list must still be the Lens's
    assert [r["rank"] for r in a["rows"]] == [r["rank"] for r in want.components]
    assert a["summary"]["relevance_share"]["spurious"] == pytest.approx(want.relevance_share["spurious"])
    assert all(f["top_samples"] == w["top_samples"] for f, w in zip(a["flagged"], want.flagged))
    assert "saved" not in a["summary"]


def test_audit_with_class_image_probes(served):
    ex, client, _ = served
    r = client.post("/api/v1/audit", json={"valid": ["class:1", "class:2"], "spurious": ["class:6"]})
    assert r.status_code == 200, r.text
    assert r.json()["summary"]["valid"] == ["class:1", "class:2"]
    mixed = client.post("/api/v1/audit", json={"valid": ["class:1"], "spurious": ["white square stamp"]})
    assert mixed.status_code == 400 and "modality gap" in mixed.json()["detail"]
    assert client.post("/api/v1/audit", json={"valid": ["class:nope"], "spurious": ["class:6"]}).status_code == 400
    assert client.post("/api/v1/audit", json={"valid": [], "spurious": ["x"]}).status_code == 400
    r = client.post("/api/v1/audit", json={"valid": ["a"], "spurious": ["b"], "save": True})
    assert r.status_code == 409 and "read-only" in r.json()["detail"]


def test_last_audit_and_map(served, run_dir):
    ex, client, _ = served
    a = client.get("/api/v1/audit").json()
    stored = read_json(run_dir / "audit.json")
    assert a["summary"]["source"] == "demo" and len(a["flagged"]) == len(stored["flagged"])
    m = client.get("/api/v1/map").json()
    assert m["n_components"] == 80 and m["n_shown"] == 80
    assert sum(p["flagged"] for p in m["points"]) == len(stored["flagged"])
    assert all(math.isfinite(p["x"]) and math.isfinite(p["y"]) for p in m["points"])
    few = client.get("/api/v1/map", params={"max_points": 10}).json()
    assert 10 <= few["n_shown"] <= 10 + len(stored["flagged"])
    assert {(p["layer"], p["component"]) for p in few["points"] if p["flagged"]} == \
        {(f["layer"], f["component"]) for f in stored["flagged"]}


def test_images(served):
    ex, client, _ = served
    r = client.get("/img/samples/5.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.size == (84, 84)  # 28 px upscaled x3
        ref = Image.fromarray(ex.data.images[5].numpy()).resize((84, 84), Image.NEAREST)
        assert im.convert("L").tobytes() == ref.tobytes()
    lc = ex.db["conv1"]
    y0, x0, y1, x1 = lc.boxes[2, 0].tolist()
    r = client.get("/img/crops/conv1/2/0.png")
    assert r.status_code == 200
    with Image.open(io.BytesIO(r.content)) as im:
        side = max(y1 - y0, x1 - x0) if (y0, x0, y1, x1) != (0, 0, 0, 0) else 28
        assert im.size[0] % side == 0 and im.size[0] >= 84
    assert client.get(f"/img/samples/{ex.n_samples}.png").status_code == 404
    assert client.get("/img/samples/-1.png").status_code in (404, 422)
    assert client.get("/img/crops/conv1/2/20.png").status_code == 404


def test_openapi_schema_lists_the_api(served):
    ex, client, _ = served
    spec = client.get("/api/openapi.json").json()
    for p in ("/api/v1/run", "/api/v1/search", "/api/v1/search/image", "/api/v1/neurons/{layer}/{component}",
              "/api/v1/layers/{layer}", "/api/v1/compare", "/api/v1/audit", "/api/v1/map", "/img/samples/{sample}.png"):
        assert p in spec["paths"], p
    assert "/search" not in spec["paths"]  # pages are not part of the API
    assert {"SearchRequest", "AuditRequest"} <= set(spec["components"]["schemas"])


def test_pages_render(served):
    ex, client, _ = served
    for url, needle in [("/", "Layers"), ("/search?q=stamp&k=3", "neuron-link"), ("/neuron/conv1/0", "Nearest components"),
                        ("/describe?layer=conv2&target=6", "Most relevant for 6"), ("/compare?layers=conv1&other_layers=conv3",
                                                                                     "Coverage"),
                        ("/audit", "Last stored audit"), ("/audit?valid=0,1&spurious=white+square+stamp", "Flagged components"),
                        ("/map", "concept-map"), ("/report/", "semlens report")]:
        r = client.get(url)
        assert r.status_code == 200, (url, r.text[:500])
        assert needle in r.text, url
    r = client.post("/search", files={"image": ("s.png", stamp_png(), "image/png")}, data={"k": "4"})
    assert r.status_code == 200 and r.text.count('class="card result"') == 4
    r = client.post("/audit", data={"valid": "0\n1", "spurious": "white square stamp", "target": "6"})
    assert r.status_code == 200 and "Flagged components" in r.text
    r = client.get("/neuron/conv1/99")
    assert r.status_code == 404 and "components 0..15" in r.text
    r = client.get("/neuron/conv1/abc")
    assert r.status_code == 422 and "<h1>422</h1>" in r.text
    r = client.get("/api/v1/neurons/conv1/abc")
    assert r.status_code == 422 and r.json()["error"] == "RequestValidationError"


# ---------------------------------------------------------------------- safety


def test_no_path_outside_the_report_folder(served, run_dir):
    ex, client, _ = served
    secret = (run_dir / "run.json").read_text()
    link = run_dir / "report" / "escape.json"
    os.symlink(run_dir / "run.json", link)
    try:
        for path in ["/report/../run.json", "/report/%2e%2e/run.json", "/report/..%2frun.json", "/report/%2e%2e%2frun.json",
                     "/report//etc/passwd", "/report/%2fetc%2fpasswd", "/report/escape.json", "/report/img/../../run.json",
                     "/static/../run.json", "/static/%2e%2e/app.py", "/run.json", "/img/../run.json"]:
            r = client.get(path)
            assert r.status_code in (400, 404), (path, r.status_code)
            assert secret not in r.text and "root:" not in r.text, path
    finally:
        link.unlink()
    assert client.get("/report/index.html").status_code == 200
    assert client.get("/report/img").status_code == 404  # a folder is not a file


def test_hosts_origins_and_headers(served):
    ex, client, _ = served
    r = client.get("/api/v1/run", headers={"host": "attacker.example"})
    assert r.status_code == 400  # DNS rebinding: only the allowed Host names
    r = client.post("/api/v1/audit", json={"valid": ["a"], "spurious": ["b"]}, headers={"origin": "http://attacker.example"})
    assert r.status_code == 403
    r = client.post("/api/v1/audit", json={"valid": ["a"], "spurious": ["b"]}, headers={"origin": "http://testserver"})
    assert r.status_code == 200
    r = client.get("/")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
    assert "<script" not in r.text  # no script at all in the pages
    rep = client.get("/report/index.html").headers["content-security-policy"]  # the static report's own inline code
    assert "script-src 'unsafe-inline'" in rep and "connect-src 'none'" in rep and "form-action 'none'" in rep


def test_queries_and_labels_are_escaped(served, writable):
    ex, client, _ = served
    r = client.get("/search", params={"q": EVIL + "</title><script>alert(2)</script>", "k": 2})
    assert r.status_code == 200
    assert "<script>alert(2)" not in r.text and EVIL not in r.text and "&lt;img src=x" in r.text
    r = client.get("/audit", params={"valid": EVIL, "spurious": "<b>x</b>"})
    assert r.status_code == 200 and EVIL not in r.text and "<b>x</b>" not in r.text
    # a label with HTML in labels.json is shown as text, on every page that shows labels
    _d, wex, wclient = writable
    for url in ["/neuron/conv1/0", "/describe?layer=conv1", "/map", "/search?q=stamp&k=80"]:
        t = wclient.get(url).text
        assert EVIL not in t and "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in t, url
    assert wclient.get("/api/v1/neurons/conv1/0").json()["label"]["label"] == EVIL  # JSON keeps the data as is


def test_upload_limits(run_dir, served):
    ex, client, _ = served
    small = Explorer(ex.run, limits=Limits(max_upload_bytes=20_000, max_upload_pixels=100 * 100))
    c = TestClient(build(small, allowed_hosts=["testserver"]))

    def post(data: bytes, name="x.png") -> int:
        return c.post("/api/v1/search/image", files={"image": (name, data, "image/png")}).status_code

    assert post(stamp_png()) == 200
    big = png_of(torch.randint(0, 256, (150, 150), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    assert 20_000 < len(big) < 20_000 + 64 * 1024 and post(big) == 413  # too many bytes (past the body limit's allowance)
    wide = torch.zeros(1, 101 * 100, dtype=torch.uint8)
    assert len(png_of(wide)) < 20_000 and post(png_of(wide)) == 413  # few bytes, too many pixels
    noise = torch.randint(0, 256, (500, 500), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert post(png_of(noise)) == 413  # bytes over the limit: refused by the body limit
    r = c.post("/api/v1/search/image", content=b"x" * 200_000, headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    ok = stamp_png()
    assert post(ok[: len(ok) // 2]) == 400  # truncated
    assert post(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "x.eps") == 400  # not an accepted format
    assert post(b"") == 400
    assert post(b"hello, not an image") == 400


def test_read_only_server_writes_nothing(served, run_dir):
    ex, client, before = served
    for url in ["/", "/search?q=stamp", "/neuron/conv2/1", "/describe?layer=conv1&target=6", "/audit?valid=0&spurious=1",
                "/map", "/api/v1/audit", "/img/samples/3.png", "/report/"]:
        assert client.get(url).status_code == 200, url
    client.post("/api/v1/audit", json={"valid": ["0"], "spurious": ["1"], "target": 6})
    client.post("/api/v1/search/image", files={"image": ("s.png", stamp_png(), "image/png")})
    assert client.get("/api/v1/layers/conv1", params={"target": 2}).status_code == 409
    assert tree_state(run_dir) == before


def test_writable_server_saves_audits_and_computes_relevance(writable):
    d, ex, client = writable
    r = client.post("/api/v1/audit", json={"valid": ["0", "1", "2"], "spurious": ["white square stamp"], "save": True})
    assert r.status_code == 200, r.text
    stored = read_json(d / "audit.json")
    assert stored["source"] == "semlens serve" and stored["run_id"] == Run.open(d).id
    assert len(stored["flagged"]) == r.json()["summary"]["n_flagged"]
    assert client.get("/api/v1/audit").json()["summary"]["source"] == "semlens serve"
    assert not (d / "relevance" / "class3.safetensors").exists()
    r = client.get("/api/v1/layers/conv2", params={"target": 3, "limit": 1})
    assert r.status_code == 200, r.text
    assert (d / "relevance" / "class3.safetensors").exists() and 3 in ex.relevance_targets()
    assert r.json()["top_relevant"][0]["relevance"] == pytest.approx(float(Run.open(d).relevance(3)["conv2"].max()))


# ---------------------------------------------------------------------- refusing damaged runs (exit codes)


def serve_code(capsys, *argv) -> tuple[int, str]:
    code = cli.main(["serve", "--port", "0", *map(str, argv)])
    return code, capsys.readouterr().err


def test_refuses_damaged_runs_with_the_cli_exit_codes(run_dir, tmp_path, capsys):
    code, err = serve_code(capsys, "--run", tmp_path / "nothing")
    assert code == 3 and "no run" in err
    bad = copy_run(run_dir, tmp_path / "bad-manifest")
    (bad / "run.json").write_text("{ truncated")
    assert serve_code(capsys, "--run", bad)[0] == 4
    other = copy_run(run_dir, tmp_path / "other-labels")
    lab = read_json(other / "labels.json")
    lab["run_id"] = "0" * 32
    write_sealed_json(other / "labels.json", lab)
    code, err = serve_code(capsys, "--run", other)
    assert code == 4 and "labels.json belongs to another run" in err
    db = copy_run(run_dir, tmp_path / "other-store")
    man = read_json(db / "run.json")
    man["stages"]["collect"]["lists_sha256"] = "f" * 64  # the store was replaced since collect recorded it
    write_json(db / "run.json", man)
    code, err = serve_code(capsys, "--run", db)
    assert code == 4 and "replaced" in err
    trunc = copy_run(run_dir, tmp_path / "truncated-db")
    f = next((trunc / "concepts").glob("concepts-*.safetensors"))
    f.write_bytes(f.read_bytes()[:100])
    assert serve_code(capsys, "--run", trunc)[0] == 4
    no_db = copy_run(run_dir, tmp_path / "no-embed")
    man = read_json(no_db / "run.json")
    del man["stages"]["embed"]
    write_json(no_db / "run.json", man)
    code, err = serve_code(capsys, "--run", no_db)  # concepts/ there, but no record of it: replaced
    assert code == 4 and "semlens embed" in err
    shutil.rmtree(no_db / "concepts")  # the stage never ran
    code, err = serve_code(capsys, "--run", no_db)
    assert code == 3 and "semlens embed" in err


def test_port_in_use_is_a_clear_error(run_dir, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        code = cli.main(["serve", "--run", str(run_dir), "--port", str(port)])
    assert code == 2 and "cannot listen" in capsys.readouterr().err


def test_serve_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--writable" in out and "--port" in out and "127.0.0.1" in out


def test_compare_with_another_run_over_http_and_its_page(run_dir, tmp_path):
    """--compare-with: the other run is compared through the JSON API and the Compare page (a copy
    covers itself); a run embedded by another foundation model is refused before serving."""
    other = copy_run(run_dir, tmp_path / "other")
    ex = Explorer.open(run_dir, compare_with=[other])
    client = TestClient(build(ex, allowed_hosts=["testserver"]))
    r = client.get("/api/v1/compare", params={"other": "other", "layers": "conv3", "other_layers": "conv3",
                                              "threshold": 0.99})
    assert r.status_code == 200, r.text
    c = r.json()
    assert c["coverage_a"] == pytest.approx(1.0) and c["coverage_b"] == pytest.approx(1.0)
    assert all(m["match_component"] == m["component"] for m in c["a_match"])
    page = client.get("/compare", params={"other": "other", "layers": "conv3", "other_layers": "conv3"})
    assert page.status_code == 200 and "other" in page.text
    assert client.get("/api/v1/compare", params={"other": "nope"}).status_code in (400, 404, 422)
    foreign = copy_run(run_dir, tmp_path / "foreign")
    man = read_json(foreign / "concepts" / "manifest.json")
    man["meta"]["foundation"]["fingerprint"] = "0" * 64
    write_json(foreign / "concepts" / "manifest.json", man)
    with pytest.raises(SemlensError, match="one embedding space"):
        Explorer.open(run_dir, compare_with=[foreign])


def test_a_non_loopback_host_warns_and_accepts_any_host_header(run_dir, monkeypatch, caplog):
    """--host 0.0.0.0: a warning that the API is reachable without authentication, and the
    host-header check opened (loopback keeps it closed); checked without binding the port."""
    from semlens_fast.serve import app as app_module
    from semlens_fast.serve import server

    seen = {}
    real_bind = server.bind

    class Stop(Exception):
        pass

    def fake_bind(host, port):  # a loopback socket instead: nothing is exposed by the test
        seen["bind"] = host
        return real_bind("127.0.0.1", 0)

    def fake_build(ex, allowed_hosts):
        seen["hosts"] = allowed_hosts
        raise Stop

    monkeypatch.setattr(server, "bind", fake_bind)
    monkeypatch.setattr(app_module, "build", fake_build)
    for host, hosts, warned in (("0.0.0.0", ["*"], True), ("127.0.0.1", None, False)):
        caplog.clear()
        with caplog.at_level("WARNING"), pytest.raises(Stop):
            server.serve(run_dir, host=host, port=0)
        assert seen["bind"] == host and ("no authentication" in caplog.text) == warned
        assert (seen["hosts"] == hosts) if hosts else ("*" not in seen["hosts"])
    assert server.is_loopback("127.0.0.1") and server.is_loopback("::1") and not server.is_loopback("0.0.0.0")
