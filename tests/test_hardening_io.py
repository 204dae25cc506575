"""Issues 20/21, the I/O layer: bounded manifest reads, permissions that follow the umask,
write locks, safe_open-checked tensor files, sealed artifacts, consistent reads during writes."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from semlens_fast import _io
from semlens_fast._io import (
    check_sealed_json, locked, open_safetensors, read_bytes, read_consistent, read_json, read_sealed_tensors,
    read_tensors, write_json, write_sealed_json, write_sealed_tensors, write_tensors,
)
from semlens_fast.errors import ArgumentError, ConcurrentWriteError, StoreError


# ---------------------------------------------------------------------- 21.3 unbounded reads

def test_manifest_symlinked_to_dev_zero_is_refused_at_once(tmp_path):
    f = tmp_path / "run.json"
    os.symlink("/dev/zero", f)
    t0 = time.perf_counter()
    with pytest.raises(StoreError, match="not a regular file"):
        read_json(f)
    assert time.perf_counter() - t0 < 1.0


def test_fifo_and_folder_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(StoreError, match="not a regular file"):
        read_json(fifo)  # opening a FIFO for reading would block forever without O_NONBLOCK
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(StoreError, match="not a regular file"):
        read_json(tmp_path / "dir.json")


def test_oversized_manifest_is_refused(tmp_path, monkeypatch):
    f = tmp_path / "m.json"
    f.write_text(json.dumps({"x": "a" * 5000}))
    with pytest.raises(StoreError, match="more than the 1000 allowed"):
        read_json(f, max_bytes=1000)
    with pytest.raises(StoreError, match="more than"):
        read_bytes(f, 10)


@pytest.mark.parametrize("depth", [200_000, 100])
def test_nesting_bomb_is_a_store_error(tmp_path, depth):
    f = tmp_path / "bomb.json"
    f.write_text("[" * depth + "]" * depth)
    with pytest.raises(StoreError, match="nested"):
        read_json(f)
    ok = "[" * 10 + "]" * 10
    f.write_text(ok)
    assert read_json(f) == json.loads(ok)


def test_non_utf8_manifest_is_a_store_error(tmp_path):
    f = tmp_path / "m.json"
    f.write_bytes(b"\xff\xfe{}")
    with pytest.raises(StoreError, match="UTF-8"):
        read_json(f)


# ---------------------------------------------------------------------- 21.8 permissions

def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_artifacts_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        write_json(tmp_path / "a.json", {"a": 1})
        write_tensors(tmp_path / "t.safetensors", {"x": torch.zeros(2)})
        with locked(tmp_path / "sub"):
            pass
        from semlens_fast.index import EmbeddingIndex

        EmbeddingIndex.from_tensors(torch.randn(4, 3)).save(tmp_path / "ix")
    finally:
        os.umask(old)
    want = 0o666 & ~mask
    assert _mode(tmp_path / "a.json") == want and _mode(tmp_path / "t.safetensors") == want
    assert _mode(tmp_path / "sub" / ".lock") == want
    assert all(_mode(p) == want for p in (tmp_path / "ix").iterdir())


# ---------------------------------------------------------------------- 20.4 locks

# another process holding the lock the way locked() does (flock on <folder>/.lock + who holds it),
# without importing torch so that the test stays fast
_HOLDER = textwrap.dedent("""
    import fcntl, json, os, sys, time
    fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": "h", "command": "holder", "since": time.time()}).encode(), 0)
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
""")


def _hold(folder, seconds):
    folder.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_writer_is_refused_and_names_the_holder(tmp_path):
    p = _hold(tmp_path, 30)
    try:
        with pytest.raises(ConcurrentWriteError, match=rf"pid {p.pid}"):
            with locked(tmp_path, "the test folder"):
                pass
    finally:
        p.kill()
        p.wait()
    with locked(tmp_path):  # the kernel dropped the killed holder's lock: no stale lock
        pass


def test_lock_waits_up_to_its_timeout(tmp_path):
    p = _hold(tmp_path, 0.5)
    try:
        with locked(tmp_path, timeout=20):
            pass
    finally:
        p.kill()
        p.wait()


def test_lock_is_reentrant_within_a_process(tmp_path):
    with locked(tmp_path):
        with locked(tmp_path):
            pass
        assert os.path.realpath(tmp_path / ".lock") in _io._HELD
    assert os.path.realpath(tmp_path / ".lock") not in _io._HELD


# ---------------------------------------------------------------------- 21.2 safe_open instead of our own parser

def _raw_safetensors(header: dict, data: bytes) -> bytes:
    hb = json.dumps(header).encode()
    return len(hb).to_bytes(8, "little") + hb + data


@pytest.mark.parametrize("header", [
    {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}},                  # negative shape
    {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
     "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},                   # overlapping offsets
    {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}},                   # shape larger than its bytes
    {"a": {"dtype": "XX", "shape": [2], "data_offsets": [0, 8]}},                    # unknown dtype
    {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}},                 # past the end of the file
])
def test_malformed_headers_are_refused(tmp_path, header):
    f = tmp_path / "x.safetensors"
    f.write_bytes(_raw_safetensors(header, b"\0" * 8))
    with pytest.raises(StoreError):
        open_safetensors(f)
    with pytest.raises(StoreError):
        read_tensors(f)
    from semlens_fast.concepts import mmap_safetensors

    with pytest.raises(StoreError):
        mmap_safetensors(f)


def test_open_safetensors_is_a_zero_copy_map_and_checks_the_hash(tmp_path):
    f = tmp_path / "t.safetensors"
    x = torch.randn(1000, 64)
    sha = write_tensors(f, {"x": x})
    t, _ = open_safetensors(f, sha256=sha)
    assert torch.equal(t["x"], x)
    # copy-on-write: writing to the tensor does not touch the file
    t["x"][0, 0] = 123.0
    assert torch.equal(open_safetensors(f)[0]["x"], x)
    with open("/proc/self/maps") as fh:
        assert str(f) in fh.read()  # mapped, not read into anonymous memory
    with pytest.raises(StoreError, match="SHA-256"):
        open_safetensors(f, sha256="0" * 64)


# ---------------------------------------------------------------------- sealed artifacts

def test_sealed_json_detects_a_flipped_bit(tmp_path):
    f = tmp_path / "labels.json"
    write_sealed_json(f, {"run_id": "r", "records": [{"layer": "conv1", "score": 0.25}]})
    assert check_sealed_json(read_json(f), f) == {"run_id": "r", "records": [{"layer": "conv1", "score": 0.25}]}
    f.write_text(f.read_text().replace("0.25", "0.35"))
    with pytest.raises(StoreError, match="content hash"):
        check_sealed_json(read_json(f), f)


def test_sealed_tensors_detect_swapped_layers(tmp_path):
    f = tmp_path / "rel.safetensors"
    a, b = torch.randn(8), torch.randn(8)
    write_sealed_tensors(f, {"conv2": a, "conv3": b})
    assert torch.equal(read_sealed_tensors(f)["conv2"], a)
    from safetensors.torch import load_file, save_file

    meta = __import__("safetensors").safe_open(str(f), "pt").metadata()
    t = load_file(str(f))
    save_file({"conv2": t["conv3"], "conv3": t["conv2"]}, str(f), metadata=meta)  # same sizes, names swapped
    with pytest.raises(StoreError, match="content hash"):
        read_sealed_tensors(f)


# ---------------------------------------------------------------------- readers during a writer

def test_read_consistent_rereads_when_a_writer_replaced_the_files():
    from semlens_fast._io import MissingFileError

    state = {"manifest": 1, "calls": 0}

    def read_manifest():
        return {"seq": state["manifest"]}

    def read_files(man):
        state["calls"] += 1
        if man["seq"] == 1:
            state["manifest"] = 2  # a writer replaced the manifest and deleted seq 1's file meanwhile
            raise MissingFileError("missing tensor file seq 1")
        return "new state"

    assert read_consistent(read_manifest, read_files) == "new state" and state["calls"] == 2

    def always_missing(man):
        raise MissingFileError("missing tensor file")

    with pytest.raises(MissingFileError):  # unchanged manifest: really missing
        read_consistent(read_manifest, always_missing)


def test_store_reader_sees_old_or_new_checkpoint_never_neither(tmp_path, monkeypatch):
    """A TopKStore.load that reads the manifest just before a checkpoint replaces it (and deletes
    the tensor file it names) re-reads the new state; before the fix it raised a missing-file error."""
    from semlens_fast import store as S
    from semlens_fast.ops import TopKState

    st = S.TopKStore({"l": TopKState.empty(3, 2)}, {"k": 2})
    st.save(tmp_path / "s")
    newer = S.TopKStore({"l": TopKState.empty(4, 2)}, {"k": 2})
    real = S.read_manifest
    fired = {"n": 0}

    def racing_read_manifest(path):
        man = real(path)
        if fired["n"] == 0:
            fired["n"] = 1
            newer.save(tmp_path / "s")  # the writer's checkpoint lands between manifest and tensors
        return man

    monkeypatch.setattr(S, "read_manifest", racing_read_manifest)
    loaded = S.TopKStore.load(tmp_path / "s")
    assert loaded["l"].channels == 4


def test_ensure_dir_and_check_writable_name_the_problem(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    for fn in (_io.ensure_dir, _io.check_writable):
        with pytest.raises(ArgumentError, match="not a folder"):
            fn(f, "store")
        with pytest.raises(ArgumentError):
            fn(f / "sub", "store")
    assert f.read_text() == "x"
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ArgumentError, match="not writable"):
            _io.check_writable(ro / "x", "store")


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_stores_databases_and_the_report_follow_the_umask(tmp_path, mask):
    """21.8 beyond the single files: the top-k store, the ConceptDB and the report folder (every
    file and folder they write) get the umask's permissions, not mkstemp's 0600 / 0700."""
    from semlens_fast.concepts import build_concept_db
    from semlens_fast.report.html import write_report
    from tests.test_concepts_shared import TinyImageFM, make_store
    from tests.test_report import make_data

    old = os.umask(mask)
    try:
        store = make_store([[0, 1, 2], [3, 4, -1]], layer="a")
        store.save(tmp_path / "topk")
        x = torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        build_concept_db(store, TinyImageFM(), x, path=tmp_path / "db", progress=False)
        write_report(tmp_path / "report", make_data())
    finally:
        os.umask(old)
    files, dirs = 0o666 & ~mask, 0o777 & ~mask
    for top in ("topk", "db", "report"):
        seen = [tmp_path / top, *(tmp_path / top).rglob("*")]
        assert len(seen) > 2, top
        for p in seen:
            assert _mode(p) == (dirs if p.is_dir() else files), (p, oct(_mode(p)))
