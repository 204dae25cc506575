"""Fuzz (hypothesis) over the public pipeline API: collect, TopKStore, ConceptDB save/load,
EmbeddingIndex add/save/load, the run folder and the command line. Every call either returns
a correct result (checked against an independent reference or a round trip) or raises an
error from semlens_fast.errors; anything else (a raw TypeError, RuntimeError, OSError,
KeyError, an exit code 1) fails the test. The ops layer has its own fuzz test."""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st

from semlens_fast import cli
from semlens_fast.collect import collect
from semlens_fast.concepts import ConceptDB, build_concept_db
from semlens_fast.errors import SemlensError
from semlens_fast.index import EmbeddingIndex, normalise
from semlens_fast.store import TopKStore
from semlens_fast.workspace import Run
from tests.helpers_collect import RandomImages, TinyCNN, exact_topk, full_activations, pool_ref
from tests.test_concepts_shared import TinyImageFM, make_store

_SETTINGS = settings(max_examples=50, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def FUZZ(fn):  # noqa: N802 - a decorator: the settings and a fixed seed (the same examples every run)
    return seed(2021)(_SETTINGS(fn))
MODEL = TinyCNN(0)
LAYERS = ["conv1", "block.0", "head"]


def attempt(fn, *args, **kwargs):
    """(result, None) or (None, the SemlensError); any other exception propagates (a failure)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn(*args, **kwargs), None
        except SemlensError as exc:
            assert str(exc).strip(), "errors must say what is wrong"
            return None, exc


@pytest.fixture
def scratch():
    d = Path(tempfile.mkdtemp(prefix="semlens-fuzz-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _fresh(scratch: Path) -> Path:
    """A new folder per example (hypothesis reuses the function's fixture across examples)."""
    return Path(tempfile.mkdtemp(dir=scratch))


def _target(scratch: Path, kind: str) -> Path | None:
    if kind == "none":
        return None
    d = _fresh(scratch)
    f = d / "a-file"
    f.write_text("not a folder")
    return {"fresh": d / "fresh" / "store", "file": f, "under-file": f / "sub"}[kind]


# ---------------------------------------------------------------------- collect

weird = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=4), st.just(10 ** 12),
                  st.lists(st.integers(), max_size=2))


GOOD = {
    "k": st.integers(1, 25), "pool": st.sampled_from(["max", "mean", "sum", "absmax"]),
    "layers": st.one_of(st.lists(st.sampled_from(LAYERS), min_size=1, max_size=3), st.sampled_from(LAYERS)),
    "n": st.integers(1, 20), "batch_size": st.integers(1, 9), "device": st.sampled_from([None, "cpu", "cpu:0"]),
    "store": st.sampled_from(["none", "fresh"]), "checkpoint_every": st.integers(1, 3),
}
BAD = {
    "k": st.one_of(st.integers(-2, 0), weird), "pool": st.sampled_from(["min", "", "cls", -1, 3.5, None]),
    "layers": st.one_of(st.lists(st.sampled_from(LAYERS + ["nope", ""]), max_size=3), st.sampled_from(["", "x"]), weird),
    "n": st.just(0), "batch_size": st.one_of(st.integers(-1, 0), weird),
    "device": st.sampled_from(["cuda", "gpu", "", "meta", "mps", 1.5, "cpu:x"]),
    "store": st.sampled_from(["file", "under-file"]), "checkpoint_every": st.one_of(st.integers(-1, 0), weird),
}


@st.composite
def collect_args(draw):
    """Valid arguments, with at most one of them replaced by a bad value (a third of the examples are all valid)."""
    args = {key: draw(s_) for key, s_ in GOOD.items()}
    bad = draw(st.sampled_from([None] * 4 + sorted(BAD)))
    if bad is not None:
        args[bad] = draw(BAD[bad])
    return args


@FUZZ
@given(args=collect_args())
def test_fuzz_collect(scratch, args):
    _check_collect(scratch, **args)


def _check_collect(scratch, k, pool, layers, n, batch_size, device, store, checkpoint_every):
    ds = RandomImages(n, seed=n)
    path = _target(scratch, store)
    res, err = attempt(collect, MODEL, ds, layers, k, pool, batch_size=batch_size, device=device, store=path,
                       checkpoint_every=checkpoint_every, progress=False)
    if path is not None and store == "file":
        assert path.read_text() == "not a folder"  # never clobbered
    event("collected" if err is None else f"refused: {type(err).__name__}")
    if err is not None:
        return
    names = [layers] if isinstance(layers, str) else list(layers)
    ids = torch.arange(n)
    for name in dict.fromkeys(names):
        got = res[name]
        if name == "head":
            a = full_activations(MODEL, ds.x, name, batch_size)
            pooled = a.abs() if pool == "absmax" else a
        else:
            pooled, _ = pool_ref(full_activations(MODEL, ds.x, name, batch_size), pool)
        v, i, _ = exact_topk(pooled, ids, k)
        assert torch.equal(got.ids, i)
        if pool in ("max", "absmax") or name == "head":
            assert torch.equal(got.values, v)
        else:  # mean/sum: float32 rounding of the sums may differ in the last ulp, the order may not
            assert torch.allclose(got.values, v, rtol=1e-5, atol=1e-6, equal_nan=True)
    if path is not None:
        back = TopKStore.load(path)
        assert back.equal(res) and back.complete


# ---------------------------------------------------------------------- TopKStore save / load and damage

@FUZZ
@given(target=st.sampled_from(["fresh", "file", "under-file"]), damage=st.sampled_from(
    ["none", "manifest-junk", "manifest-key", "tensor-flip", "tensor-truncate", "tensor-missing", "fifo"]),
    seed=st.integers(0, 3))
def test_fuzz_store_save_load(scratch, target, damage, seed):
    st_ = collect(MODEL, RandomImages(30, seed=seed), LAYERS, 4, batch_size=8, progress=False)
    path = _target(scratch, target)
    _, err = attempt(st_.save, path)
    if err is not None:
        assert target != "fresh"
        return
    man = json.loads((path / "manifest.json").read_text())
    tfile = path / man["tensors"]
    if damage == "manifest-junk":
        (path / "manifest.json").write_bytes(bytes(range(256)))
    elif damage == "manifest-key":
        man["layers"] = ["missing-layer"] + man["layers"]
        (path / "manifest.json").write_text(json.dumps(man))
    elif damage == "tensor-flip":
        raw = bytearray(tfile.read_bytes())
        raw[len(raw) // 2 + seed] ^= 0x04
        tfile.write_bytes(bytes(raw))
    elif damage == "tensor-truncate":
        tfile.write_bytes(tfile.read_bytes()[: 100 + seed])
    elif damage == "tensor-missing":
        tfile.unlink()
    elif damage == "fifo":
        tfile.unlink()
        import os

        os.mkfifo(tfile)
    res, err = attempt(TopKStore.load, path)
    if damage == "none":
        assert err is None and res.equal(st_)
    else:
        assert err is not None


# ---------------------------------------------------------------------- ConceptDB save / load and damage

@FUZZ
@given(damage=st.sampled_from(["none", "flip", "truncate", "header", "manifest-meta", "manifest-name", "manifest-bytes",
                               "swap-layers"]), at=st.integers(0, 10_000), keep_examples=st.booleans())
def test_fuzz_concept_db_save_load(scratch, damage, at, keep_examples):
    store = make_store([[0, 1, 2], [3, 4, -1]], layer="a")
    b = make_store([[5, 6, 7], [1, 2, 3]], layer="b")
    store.layers.update(b.layers)
    store.meta["pools"].update(b.meta["pools"])
    x = torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    path = _fresh(scratch) / "db"
    db = build_concept_db(store, TinyImageFM(), x, path=path, keep_examples=keep_examples, progress=False)
    man = json.loads((path / "manifest.json").read_text())
    f = path / man["tensors"]
    raw = bytearray(f.read_bytes())
    if damage == "flip":
        raw[at % len(raw)] ^= 1 << (at % 8)
        f.write_bytes(bytes(raw))
    elif damage == "truncate":
        f.write_bytes(bytes(raw[: at % len(raw)]))
    elif damage == "header":
        i = 8 + at % 40
        raw[i] = ord("{") if raw[i] != ord("{") else ord("[")
        f.write_bytes(bytes(raw))
    elif damage == "manifest-meta":
        man["meta"]["k"] = -1 if at % 2 else "x"
        (path / "manifest.json").write_text(json.dumps(man))
    elif damage == "manifest-name":
        man["tensors"] = ["../../etc/passwd", "/dev/zero", 3, ""][at % 4]
        (path / "manifest.json").write_text(json.dumps(man))
    elif damage == "manifest-bytes":
        (path / "manifest.json").write_bytes(bytes(raw[:200]))
    elif damage == "swap-layers":
        from safetensors.torch import load_file, save_file

        t = load_file(str(f))
        save_file({("b" if k[0] == "a" else "a") + k[1:]: v for k, v in t.items()}, str(f))
    res, err = attempt(lambda: ConceptDB.load(path))
    if damage == "none":
        assert err is None
        for n in db.layers:
            assert torch.equal(res[n].embeddings, db[n].embeddings)
        res.check_store(store)
        return
    if err is None:  # a flip the checksum cannot see does not exist; anything loaded must be intact
        pytest.fail(f"damage {damage!r} at {at} was not detected")


# ---------------------------------------------------------------------- EmbeddingIndex add / save / load

IX_GOOD = {"rows": st.integers(0, 12), "dim": st.integers(1, 6), "dtype": st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
           "neurons": st.one_of(st.none(), st.lists(st.integers(0, 20), min_size=12, max_size=12)),
           "layer": st.one_of(st.none(), st.sampled_from(["l1", "l2", ""])), "target": st.just("fresh"), "nan": st.just(False)}
IX_BAD = {"dim": st.one_of(st.integers(-1, 0), weird), "dtype": st.sampled_from([torch.int64, torch.float64, None, "float32"]),
          "neurons": st.one_of(st.lists(st.integers(-3, 20), max_size=14), st.lists(st.floats(), max_size=3), st.text(max_size=2)),
          "layer": st.one_of(st.integers(), st.just(b"l1")), "target": st.sampled_from(["file", "under-file"]), "nan": st.just(True)}


@st.composite
def index_args(draw):
    args = {key: draw(s_) for key, s_ in IX_GOOD.items()}
    if args["neurons"] is not None:
        args["neurons"] = args["neurons"][: args["rows"]]
    bad = draw(st.sampled_from([None] * 3 + sorted(IX_BAD)))
    if bad is not None:
        args[bad] = draw(IX_BAD[bad])
    return args


@FUZZ
@given(args=index_args())
def test_fuzz_index(scratch, args):
    _check_index(scratch, **args)


def _check_index(scratch, rows, dim, dtype, neurons, layer, target, nan):
    ix, err = attempt(EmbeddingIndex, dim, dtype)
    if err is not None or ix.dim > 64:  # (a huge dim is a valid index; the test does not build such vectors)
        return
    x = torch.randn(rows, ix.dim, generator=torch.Generator().manual_seed(rows))
    if nan and rows:
        x[0, 0] = float("nan")
    ids, err = attempt(ix.add, x, layer=layer, neurons=neurons)
    if err is not None:
        assert len(ix) == 0  # nothing half-added
        return
    want = normalise(x, dtype)
    assert torch.equal(ix.vectors.float(), want.float())
    path = _target(scratch, target)
    _, err = attempt(ix.save, path)
    if err is not None:
        assert target != "fresh"
        return
    event("saved and loaded")
    back, err = attempt(EmbeddingIndex.load, path)
    assert err is None and torch.equal(back.vectors.float(), want.float())
    assert back.lookup(list(range(len(back)))) == ix.lookup(list(range(len(ix))))
    if rows:
        q = torch.randn(2, x.shape[1])
        assert all(torch.equal(a, b) for a, b in zip(back.search(q, 3), ix.search(q, 3)))


# ---------------------------------------------------------------------- the run folder

json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=6)),
                           lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=6), c, max_size=3)),
                           max_leaves=12)


@FUZZ
@given(base=st.dictionaries(st.sampled_from(["format", "run_id", "model", "data", "classes", "stages"]), json_values, max_size=6),
       ours=st.booleans(), raw=st.one_of(st.none(), st.binary(max_size=64)))
def test_fuzz_run_manifest(scratch, base, ours, raw):
    d = _fresh(scratch) / "run"
    d.mkdir()
    if ours:
        base = {"format": "semlens_fast.run", "run_id": "a" * 32, "model": {"kind": "demo-cnn", "weights": "w"},
                "data": {"kind": "digits"}, "stages": {}, **base}
    (d / "run.json").write_bytes(raw if raw is not None else json.dumps(base).encode())
    run, err = attempt(Run.open, d)
    if err is not None:
        return
    for fn in (run.store, run.concept_db, lambda: run.relevance(0), run.model, lambda: run.read_json("labels.json")):
        attempt(fn)  # each either works or says what is wrong


# ---------------------------------------------------------------------- the command line

VALUES = st.sampled_from(["", "0", "-1", "-59990", "10", str(10 ** 12), "nan", "inf", "abc", ":", "x:y", "vision:abc",
                          "vision:0", "openclip", "a,b,,c", "\x00", "é", "../..", "/dev/zero", "x" * 300])
COMMANDS = {
    "collect": ["--model", "--data", "--layers", "--k", "--pool", "--batch-size", "--checkpoint-every"],
    "embed": ["--fm", "--mode", "--layers", "--dtype"],
    "search": ["--image", "--k", "--layers"],
    "label": ["--vocab", "--vocab-file", "--threshold", "--layers"],
    "describe": ["--layer", "--target"],
    "compare": ["--other", "--layers", "--other-layers", "--threshold"],
    "validate": ["--layer", "--keep", "--samples", "--confidence"],
    "report": ["--out"],
}


@FUZZ
@given(cmd=st.sampled_from(sorted(COMMANDS)), opts=st.lists(st.tuples(st.integers(0, 6), VALUES), max_size=4),
       positional=st.lists(VALUES, max_size=2), run_kind=st.sampled_from(["missing", "dev-zero", "junk", "file", "long"]))
def test_fuzz_cli_arguments(scratch, capsys, cmd, opts, positional, run_kind):
    run = {"missing": scratch / "nothing", "dev-zero": scratch / "z", "junk": scratch / "j", "file": scratch / "f",
           "long": scratch / ("r" * 5000)}[run_kind]
    if run_kind == "dev-zero":
        run.mkdir(exist_ok=True)
        if not (run / "run.json").is_symlink():
            (run / "run.json").symlink_to("/dev/zero")
    elif run_kind == "junk":
        run.mkdir(exist_ok=True)
        (run / "run.json").write_bytes(b"\xff[" * 50)
    elif run_kind == "file":
        run.write_text("x")
    names = COMMANDS[cmd]
    argv = [cmd, "--run", str(run), "--no-progress"]
    for i, v in opts:
        argv += [names[i % len(names)], v]
    if cmd == "search":
        argv += positional
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse: bad option syntax
        code = exc.code
    err = capsys.readouterr().err
    assert code in (cli.EXIT_ARGS, cli.EXIT_MISSING, cli.EXIT_MISMATCH, cli.EXIT_BUSY), (argv, code, err)
    assert "Traceback" not in err and "unexpected error" not in err
    if run_kind == "file":
        assert run.read_text() == "x"
    assert math.isfinite(code)
