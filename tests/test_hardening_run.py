"""Issues 20/21, the run folder and the command line: factories are code (trust), files stay in
the run, `demo --fresh` deletes only a run's files, a mistyped --model leaves nothing, damaged
artifacts exit 4, bad input exits 2, a second writer exits 6. Each case failed before the fix."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

from semlens_fast import cli
from semlens_fast._io import read_json, write_json, write_sealed_json, write_sealed_tensors
from semlens_fast.workspace import Run, RunMismatchError, UntrustedCodeError, remove_run

FACTORIES = textwrap.dedent("""
    import os, torch
    from semlens_fast.data import digits
    from semlens_fast.models import FashionCNN

    def _mark(name):
        d = os.environ.get("HB_MARKS")
        if d:
            open(os.path.join(d, name), "a").write("x")

    def model():
        _mark("model")
        torch.manual_seed(0)
        return FashionCNN()

    def data():
        _mark("data")
        return digits("train")

    def evil():
        _mark("evil")
        raise SystemExit("evil factory ran")
""")


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A factory module on sys.path, an empty allow-list, a marks folder for factory calls."""
    root = tmp_path_factory.mktemp("hbrun")
    (root / "hb_factories.py").write_text(FACTORIES)
    (root / "xdg").mkdir()
    (root / "marks").mkdir()
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(root))
    mp.setenv("XDG_CONFIG_HOME", str(root / "xdg"))
    mp.setenv("HB_MARKS", str(root / "marks"))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def small_run(env):
    """collect (digits, a seeded FashionCNN, k=3) + embed (MobileNetV2 at 32 px, full images)."""
    run = env / "run"
    assert cli.main(["collect", "--run", str(run), "--model", "hb_factories:model", "--data", "hb_factories:data",
                     "--layers", "conv1,conv2", "--k", "3", "--no-progress"]) == 0
    assert cli.main(["embed", "--run", str(run), "--trust", "--fm", "vision:32", "--mode", "full", "--no-progress"]) == 0
    return run


def _marks(env):
    d = env / "marks"
    out = sorted(p.name for p in d.iterdir())
    for p in d.iterdir():
        p.unlink()
    return out


def _copy(run, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


# ---------------------------------------------------------------------- 20.2 factories are code

def test_factories_named_by_a_run_need_trust(small_run, env, capsys, tmp_path):
    _marks(env)
    code, _, err = run_cli(capsys, "report", "--run", small_run, "--out", tmp_path / "rep")
    assert code == cli.EXIT_ARGS and "--trust" in err and "trusted-factories" in err
    assert _marks(env) == [] and not (tmp_path / "rep").exists()  # nothing was imported or called
    code, _, _ = run_cli(capsys, "report", "--run", small_run, "--out", tmp_path / "rep", "--trust", "--no-progress")
    assert code == 0 and (tmp_path / "rep" / "index.html").exists()
    assert _marks(env) == ["data"]  # the report needs the images, never the model
    # the user's allow-list instead of --trust
    (env / "xdg" / "semlens").mkdir(exist_ok=True)
    (env / "xdg" / "semlens" / "trusted-factories").write_text("# mine\nhb_factories:*\n")
    try:
        code, _, _ = run_cli(capsys, "report", "--run", small_run, "--out", tmp_path / "rep2", "--no-progress")
        assert code == 0
    finally:
        (env / "xdg" / "semlens" / "trusted-factories").unlink()


def test_a_foreign_factory_is_never_called_without_trust(small_run, env, capsys, tmp_path):
    other = _copy(small_run, tmp_path)
    man = read_json(other / "run.json")
    man["data"] = {"kind": "factory", "target": "hb_factories:evil"}  # e.g. os:abort in the issue
    write_json(other / "run.json", man)
    _marks(env)
    for argv in (["report"], ["describe", "--target", "0"], ["validate", "--layer", "conv1", "--keep", "x"]):
        code, _, err = run_cli(capsys, *argv, "--run", other)
        assert code in (cli.EXIT_ARGS, cli.EXIT_MISSING), err
    assert _marks(env) == []
    with pytest.raises(UntrustedCodeError):
        Run.open(other).data()


def test_factory_specs_are_checked_before_import(env):
    from semlens_fast.errors import ArgumentError
    from semlens_fast.workspace import _load_factory

    for bad in (":", "os:", ":abort", "a b:c", "../x:y", "x:y:z", "x" * 600 + ":f"):
        with pytest.raises(ArgumentError, match="package.module:function"):
            _load_factory(bad, "--model")


def _demo_run(tmp_path, weights: str):
    run = tmp_path / "demo-like"
    run.mkdir(parents=True)
    write_json(run / "run.json", {"format": "semlens_fast.run", "run_id": "a" * 32,
                                  "model": {"kind": "demo-cnn", "weights": weights},
                                  "data": {"kind": "digits", "split": "train"}, "classes": None, "stages": {}})
    return run


def _cnn_weights(path):
    from semlens_fast.models import FashionCNN

    write_sealed_tensors(path, {k: v.contiguous() for k, v in FashionCNN().state_dict().items()})


def test_weights_named_by_a_run_stay_inside_it(tmp_path):
    _cnn_weights(tmp_path / "outside.safetensors")
    _cnn_weights(tmp_path / "case0" / "outside.safetensors")  # what "../" would reach
    for i, name in enumerate(("../outside.safetensors", str(tmp_path / "outside.safetensors"))):
        with pytest.raises(RunMismatchError, match="not a file inside the run folder"):
            Run.open(_demo_run(tmp_path / f"case{i}", name)).model()
    run = _demo_run(tmp_path / "sym", "w.safetensors")
    os.symlink(tmp_path / "outside.safetensors", run / "w.safetensors")
    with pytest.raises(RunMismatchError, match="leads outside the run folder"):
        Run.open(run).model()
    run = _demo_run(tmp_path / "ok", "w.safetensors")
    _cnn_weights(run / "w.safetensors")
    assert isinstance(Run.open(run).model(), torch.nn.Module)


def test_corrupted_model_weights_are_refused(tmp_path):
    run = _demo_run(tmp_path, "w.safetensors")
    _cnn_weights(run / "w.safetensors")
    raw = bytearray((run / "w.safetensors").read_bytes())
    raw[-40] ^= 0x08
    (run / "w.safetensors").write_bytes(bytes(raw))
    with pytest.raises(RunMismatchError, match="content hash"):
        Run.open(run).model()


# ---------------------------------------------------------------------- 21.1 demo --fresh

def test_demo_fresh_refuses_a_folder_that_is_not_a_run(capsys, tmp_path):
    d = tmp_path / "thesis"
    (d / "src").mkdir(parents=True)
    (d / "src" / "main.c").write_text("int main(){}")
    (d / "thesis.tex").write_text("chapter 1")
    (d / "run.json").write_text('{"name": "my own run.json"}')
    code, _, err = run_cli(capsys, "demo", "--fresh", "--run", d, "--no-progress")
    assert code == cli.EXIT_ARGS and "not a semlens run manifest" in err
    assert (d / "thesis.tex").read_text() == "chapter 1" and (d / "src" / "main.c").exists()
    assert (d / "run.json").read_text() == '{"name": "my own run.json"}'
    # a run.json that claims to be ours but carries no valid run id is not enough either
    (d / "run.json").write_text('{"format": "semlens_fast.run"}')
    code, _, _ = run_cli(capsys, "demo", "--fresh", "--run", d, "--no-progress")
    assert code == cli.EXIT_ARGS and (d / "thesis.tex").exists()


def test_remove_run_deletes_only_what_the_run_wrote(small_run, tmp_path):
    d = _copy(small_run, tmp_path)
    (d / "notes.txt").write_text("mine")
    (d / "topk" / "my.csv").write_text("mine too")
    left = remove_run(d)
    assert sorted(left) == ["notes.txt", "topk"]
    assert sorted(p.name for p in (d / "topk").iterdir()) == ["my.csv"]
    assert not (d / "run.json").exists() and not (d / "concepts").exists() and not (d / "cache").exists()


# ---------------------------------------------------------------------- 21.5 a mistyped --model

def test_mistyped_model_leaves_nothing_behind(env, capsys, tmp_path):
    run = tmp_path / "r"
    code, _, err = run_cli(capsys, "collect", "--run", run, "--model", "hb_factories:modle", "--data",
                           "hb_factories:data", "--layers", "conv1", "--k", "2", "--no-progress")
    assert code == cli.EXIT_ARGS and "cannot be imported" in err
    assert not run.exists()
    code, _, err = run_cli(capsys, "collect", "--run", run, "--model", "hb_factories:model", "--data",
                           "hb_factories:data", "--layers", "conv1", "--k", "2", "--no-progress")
    assert code == 0, err


# ---------------------------------------------------------------------- 21.6 exit codes

def _png(w, h):
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * (w + 1))) + chunk(b"IEND", b""))


def test_bad_input_exits_2(small_run, capsys, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "garbage.png").write_bytes(os.urandom(3000))
    (tmp_path / "bomb.png").write_bytes(_png(30000, 30000))
    (tmp_path / "big.png").write_bytes(_png(9000, 9000))  # 81 Mpx: under PIL's own limit, over ours
    (tmp_path / "vocab.bin").write_bytes(bytes(range(256)) * 4)
    cases = [
        ["embed", "--run", small_run, "--fm", "vision:abc"],
        ["embed", "--run", small_run, "--fm", "vision:0"],
        ["embed", "--run", small_run, "--fm", "aligned:x"],
        ["collect", "--run", tmp_path / "m", "--model", ":", "--data", "digits", "--layers", "conv1"],
        ["collect", "--run", tmp_path / "m", "--model", "hb_factories:model", "--data", "hb_factories:data",
         "--layers", "conv1", "--k", str(10 ** 12)],
        ["collect", "--run", tmp_path / "m", "--model", "hb_factories:model", "--data", "hb_factories:data",
         "--layers", "conv1", "--k", "5000", "--no-progress"],
        *[["search", "--run", small_run, "--trust", "--image", tmp_path / f] for f in
          ("empty.png", "garbage.png", "bomb.png", "big.png")],
        ["label", "--run", small_run, "--trust", "--vocab-file", tmp_path / "vocab.bin"],
        ["search", "--run", "x" * 5000, "q"],
        ["collect", "--run", tmp_path / ("y" * 300), "--model", "hb_factories:model", "--data", "digits", "--layers", "c"],
    ]
    for argv in cases:
        try:
            code, _, err = run_cli(capsys, *argv)
        except SystemExit as e:  # argparse refuses it (exit 2)
            code, err = e.code, capsys.readouterr().err
        assert code == cli.EXIT_ARGS, (argv, err)
        assert "unexpected error" not in err
    assert not (tmp_path / "m" / "run.json").exists()


@pytest.mark.parametrize("argv", [["--samples", "-59990"], ["--samples", "0"], ["--samples", "abc"]])
def test_negative_samples_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["validate", "--layer", "conv1", "--keep", "x", *argv])
    assert e.value.code == 2


def test_damaged_artifacts_exit_4(small_run, capsys, tmp_path):
    rid = read_json(small_run / "run.json")["run_id"]

    def damaged(name, edit):
        d = _copy(small_run, tmp_path, name)
        edit(d)
        return d

    def flip(path, at=-100):
        raw = bytearray(path.read_bytes())
        raw[at] ^= 0x10
        path.write_bytes(bytes(raw))

    def other_run_json(d):
        man = read_json(d / "run.json")
        man["run_id"] = "b" * 32
        man["stages"] = {k: v for k, v in man["stages"].items() if k != "embed"}
        write_json(d / "run.json", man)

    cases = {
        "non-UTF-8 run.json": lambda d: (d / "run.json").write_bytes(b"\xff\xfe{}"),
        "run.json nesting bomb": lambda d: (d / "run.json").write_text("[" * 100000 + "]" * 100000),
        "run.json -> /dev/zero": lambda d: ((d / "run.json").unlink(), os.symlink("/dev/zero", d / "run.json")),
        "damaged run.json fields": lambda d: write_json(d / "run.json", {**read_json(d / "run.json"), "stages": []}),
        "labels.json missing keys": lambda d: write_sealed_json(d / "labels.json", {"run_id": rid, "records": [{"layer": "conv1"}]}),
        "labels.json without its hash": lambda d: write_json(d / "labels.json", {"run_id": rid, "vocabulary": [], "records": []}),
        "labels.json edited": lambda d: (
            Run.open(d).write_json("labels.json", {"run_id": rid, "vocabulary": ["a", "b"], "records": [
                {"layer": "conv1", "component": 0, "label": "a", "score": 0.5}]}),
            (d / "labels.json").write_text((d / "labels.json").read_text().replace('"a"', '"b"', 2))),
        "concepts bit flip": lambda d: flip(next((d / "concepts").glob("concepts-*.safetensors"))),
        "concepts bad header": lambda d: flip(next((d / "concepts").glob("concepts-*.safetensors")), 12),
        "topk bit flip": lambda d: flip(next((d / "topk").glob("topk-*.safetensors"))),
        "run.json of another run": other_run_json,
    }
    for name, edit in cases.items():
        d = damaged(name.replace(" ", "_").replace(">", ""), edit)
        code, _, err = run_cli(capsys, "describe", "--run", d, "--trust")
        assert code == cli.EXIT_MISMATCH, (name, err)


def test_label_needs_a_text_model_and_labels_of_another_run_exit_4(small_run, capsys, tmp_path):
    d = _copy(small_run, tmp_path)
    write_sealed_json(d / "labels.json", {"run_id": "c" * 32, "vocabulary": ["a"], "records": []})
    code, _, err = run_cli(capsys, "validate", "--run", d, "--layer", "conv1", "--keep", "a", "--trust")
    assert code == cli.EXIT_MISMATCH and "another run" in err


# ---------------------------------------------------------------------- 20.4 a second writer exits 6

_HOLD = textwrap.dedent("""
    import fcntl, json, os, sys, time
    fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": "h", "command": "semlens collect", "since": 0}).encode(), 0)
    print("held", flush=True)
    time.sleep(60)
""")


def test_second_writer_of_a_run_exits_6_and_readers_still_work(small_run, capsys, tmp_path):
    d = _copy(small_run, tmp_path)
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(d)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        before = (d / "run.json").read_bytes()
        for argv in (["collect", "--model", "hb_factories:model", "--data", "hb_factories:data", "--layers", "conv1",
                      "--k", "3"], ["search", "q"], ["report"], ["embed", "--fm", "vision:32"]):
            code, _, err = run_cli(capsys, *argv, "--run", d, "--trust", "--no-progress")
            assert code == cli.EXIT_BUSY and "being written by another process" in err and str(p.pid) in err, (argv, err)
        assert (d / "run.json").read_bytes() == before
        code, _, err = run_cli(capsys, "describe", "--run", d, "--trust")  # read-only: fine meanwhile
        assert code == 0, err
    finally:
        p.kill()
        p.wait()
    code, _, err = run_cli(capsys, "report", "--run", d, "--trust", "--no-progress")
    assert code == 0, err


def test_record_keeps_stages_written_by_another_process(small_run, tmp_path):
    d = _copy(small_run, tmp_path)
    a, b = Run.open(d), Run.open(d)  # two commands that opened the run at the same time
    a.record("label", vocabulary=["x"])
    b.record("audit", flagged=0)
    man = read_json(d / "run.json")
    assert "label" in man["stages"] and "audit" in man["stages"] and "embed" in man["stages"]


def test_serve_passes_trust_to_the_runs(small_run, env, monkeypatch):
    """`semlens serve --trust` lets the explorer call the run's data factory; without it (and no
    allow-list) opening the run is refused before any factory is imported."""
    pytest.importorskip("fastapi")
    from semlens_fast.serve import server
    from semlens_fast.serve.explorer import Explorer

    _marks(env)
    with pytest.raises(UntrustedCodeError):
        Explorer.open(small_run)
    assert _marks(env) == []
    ex = Explorer.open(small_run, trust=True, compare_with=[small_run])
    assert ex.sample_png(0)[:8] == b"\x89PNG\r\n\x1a\n" and _marks(env) == ["data"]
    seen = {}
    monkeypatch.setattr(server, "serve", lambda run, **kw: seen.update(kw) or 0)
    assert cli.main(["serve", "--run", str(small_run), "--trust"]) == 0 and seen["trust"] is True
    assert cli.main(["serve", "--run", str(small_run)]) == 0 and seen["trust"] is False
