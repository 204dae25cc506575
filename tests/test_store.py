"""Durable TopKStore: round trip, fingerprints, overwrite, corruption, crash (SIGKILL) and resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from semlens_fast import __version__
from semlens_fast.collect import collect
from semlens_fast.errors import StoreError
from semlens_fast.store import TopKStore
from tests.helpers_collect import REPO, RandomImages, TinyCNN

LAYERS = ["conv1", "block.0", "head"]


def _run(model, ds, path, **kw):
    kw.setdefault("k", 5)
    kw.setdefault("batch_size", 16)
    return collect(model, ds, LAYERS, store=path, progress=False, **kw)


def test_roundtrip_and_manifest(tmp_path):
    model, ds = TinyCNN(0), RandomImages(100)
    st = _run(model, ds, tmp_path / "s", pool={"head": "mean"})
    assert st.complete and st.path == tmp_path / "s"
    loaded = TopKStore.load(tmp_path / "s")
    assert loaded.equal(st) and loaded.pools == st.pools
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    fp = man["meta"]["fingerprints"]
    assert fp["library_version"] == __version__ and fp["k"] == 5 and fp["layers"] == LAYERS
    assert fp["pools"] == {"conv1": "max", "block.0": "max", "head": "mean"}
    assert fp["dataset"]["length"] == 100 and len(fp["dataset"]["sample_hash"]) == 64
    assert len(fp["model"]) == 64
    assert man["meta"]["progress"] == {"batches_done": 7, "n_batches": 7, "samples_done": 100, "n_samples": 100}
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert files == sorted([".lock", "manifest.json", man["tensors"], "order.safetensors"])
    # save() elsewhere
    st.save(tmp_path / "copy")
    assert TopKStore.load(tmp_path / "copy").equal(st)


def test_complete_store_is_reused_without_forward(tmp_path):
    model, ds = TinyCNN(0), RandomImages(100)
    first = _run(model, ds, tmp_path / "s")
    model.calls["forward"] = 0
    again = _run(model, ds, tmp_path / "s")
    assert model.calls["forward"] == 0 and again.equal(first)


@pytest.mark.parametrize(
    "change",
    ["weights", "data", "k", "layers", "pool"],
)
def test_mismatched_fingerprints_refuse_then_overwrite(tmp_path, change):
    model, ds = TinyCNN(0), RandomImages(60)
    _run(model, ds, tmp_path / "s")
    kw: dict = {}
    layers = LAYERS
    if change == "weights":
        with torch.no_grad():
            model.head.bias += 1
    elif change == "data":
        ds = RandomImages(60, seed=1)
    elif change == "k":
        kw["k"] = 6
    elif change == "pool":
        kw["pool"] = "mean"
    with pytest.raises(StoreError, match="different run") as e:
        if change == "layers":
            collect(model, ds, ["conv1"], k=5, store=tmp_path / "s", progress=False)
        else:
            _run(model, ds, tmp_path / "s", **kw)
    assert "overwrite=True" in str(e.value)
    if change != "layers":
        fresh = _run(model, ds, tmp_path / "s", overwrite=True, **kw)
        assert TopKStore.load(tmp_path / "s").equal(fresh)
        assert fresh.equal(collect(model, ds, LAYERS, progress=False, batch_size=16, **{"k": 5, **kw}))


def test_library_version_mismatch_refused(tmp_path):
    model, ds = TinyCNN(0), RandomImages(30)
    _run(model, ds, tmp_path / "s")
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    man["meta"]["fingerprints"]["library_version"] = "0.0.1"
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StoreError, match="library_version"):
        _run(model, ds, tmp_path / "s")


def test_corrupted_or_truncated_files(tmp_path):
    model, ds = TinyCNN(0), RandomImages(30)
    _run(model, ds, tmp_path / "s")
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    f = tmp_path / "s" / man["tensors"]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="SHA-256|corrupted"):
        TopKStore.load(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text("{ truncated")
    with pytest.raises(StoreError, match="not valid JSON"):
        TopKStore.load(tmp_path / "s")
    with pytest.raises(StoreError, match="does not exist"):
        TopKStore.load(tmp_path / "nothing")


class Exploding(TinyCNN):
    def __init__(self, fail_at: int):
        super().__init__(0)
        self.fail_at, self.n = fail_at, 0

    def forward(self, x):
        self.n += 1
        if self.n == self.fail_at:
            # update the first layer, then fail before the others: a half-updated batch
            self.conv1(x)
            raise RuntimeError("boom")
        return super().forward(x)


def test_model_raising_mid_batch_keeps_last_checkpoint_and_resumes(tmp_path):
    ds = RandomImages(100)
    ref = collect(TinyCNN(0), ds, LAYERS, k=5, batch_size=10, progress=False)
    with pytest.raises(RuntimeError, match="boom") as e:
        _run(Exploding(fail_at=6), ds, tmp_path / "s", batch_size=10, checkpoint_every=2)
    assert any("keeps its last checkpoint" in n for n in getattr(e.value, "__notes__", []))
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert man["meta"]["complete"] is False and man["meta"]["progress"]["batches_done"] == 4
    part = TopKStore.load(tmp_path / "s")
    assert set(part["conv1"].ids[part["conv1"].ids >= 0].tolist()) <= set(range(40))
    resumed_model = TinyCNN(0)
    out = _run(resumed_model, ds, tmp_path / "s", batch_size=10)
    assert resumed_model.calls["forward"] == 6  # exactly the 6 batches not done
    assert out.equal(ref) and out.complete


_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {repo!r})
    from torch.utils.data import DataLoader
    from semlens_fast.collect import collect
    from tests.helpers_collect import TinyCNN, RandomImages

    class Slow(TinyCNN):
        def forward(self, x):
            time.sleep({sleep})
            return super().forward(x)

    model = Slow(0)
    ds = RandomImages(240)
    loader = DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(int(sys.argv[2])))
    st = collect(model, loader, ["conv1", "block.0", "head"], k=6, pool={{"head": "mean"}},
                 store=sys.argv[1], checkpoint_every=2, progress=False)
    print("FORWARDS", model.calls["forward"], flush=True)
    """
)


def _script(tmp_path, sleep):
    p = tmp_path / f"run_{sleep}.py"
    p.write_text(_SCRIPT.format(repo=REPO, sleep=sleep))
    return p


def test_sigkill_mid_run_then_resume_is_identical(tmp_path):
    store = tmp_path / "killed"
    script = _script(tmp_path, 0.05)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(store), "7"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline:
        try:
            done = json.loads((store / "manifest.json").read_text())["meta"]["progress"]["batches_done"]
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= 6 or proc.poll() is not None:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    man = json.loads((store / "manifest.json").read_text())
    assert man["meta"]["complete"] is False
    done = man["meta"]["progress"]["batches_done"]
    assert 6 <= done < 30
    # restart with the same arguments (the shuffle generator seed differs on purpose: the
    # recorded batch order is what makes the resumed run skip exactly the done batches)
    out = subprocess.run([sys.executable, str(_script(tmp_path, 0.0)), str(store), "99"], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert f"FORWARDS {30 - done}" in out.stdout
    # an uninterrupted run with the original seed
    ref_dir = tmp_path / "ref"
    out2 = subprocess.run([sys.executable, str(_script(tmp_path, 0.0)), str(ref_dir), "7"], env=env, capture_output=True, text=True, timeout=180)
    assert out2.returncode == 0, out2.stderr
    assert "FORWARDS 30" in out2.stdout
    resumed, ref = TopKStore.load(store), TopKStore.load(ref_dir)
    assert resumed.complete and resumed.equal(ref)
    # and both equal the in-process result (order independence of the top-k)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the subprocesses (conv results may depend on threads in the last ulp)
    try:
        inproc = collect(TinyCNN(0), RandomImages(240), ["conv1", "block.0", "head"], k=6, pool={"head": "mean"}, batch_size=8, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert inproc.equal(ref)
    # temporary files of the killed checkpoint are cleaned by the next write; the lock file stays
    leftovers = [p.name for p in store.iterdir() if p.name.startswith(".")]
    assert leftovers == [".lock"]
