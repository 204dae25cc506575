"""A Triton kernel that cannot compile or launch on the user's GPU never crashes the run:
the op falls back to the torch reference on the same device, with one warning naming
the kernel and the error; library errors still propagate."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

from triton.runtime.errors import OutOfResources, PTXASError  # noqa: E402

import semlens_fast.ops as ops  # noqa: E402
from semlens_fast.errors import ArgumentError  # noqa: E402
from semlens_fast.ops import TopKState, reference  # noqa: E402
from semlens_fast.ops.triton import _launch  # noqa: E402
from semlens_fast.ops.triton import similarity as tsim  # noqa: E402
from semlens_fast.ops.triton import topk as ttopk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class _Broken:
    """Stands in for a JIT kernel whose compilation (or launch) raises ``error``."""

    def __init__(self, error):
        self.error, self.calls = error, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls += 1
            raise self.error
        return launch


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("SEMLENS_BACKEND", "triton")
    monkeypatch.delenv("SEMLENS_TRITON_STRICT", raising=False)
    _launch.reset()
    yield
    _launch.reset()


def _runtime_warnings(rec):
    return [w for w in rec if issubclass(w.category, RuntimeWarning) and "Triton kernel" in str(w.message)]


@pytest.mark.parametrize("error", [PTXASError("ptxas fatal: unsupported gpu architecture 'sm_70'"),
                                   OutOfResources(232448, 101376, "shared memory")])
def test_topk_falls_back_with_one_warning(triton_backend, monkeypatch, error):
    broken = _Broken(error)
    monkeypatch.setattr(ttopk, "_stream_kernel", broken)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(5, 4, 2, 2, generator=g).to(DEVICE) for _ in range(2)]  # NCHW
    got, want = TopKState.empty(4, 3, DEVICE), TopKState.empty(4, 3, DEVICE)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for j, x in enumerate(xs):
            ids = torch.arange(5, device=DEVICE) + 5 * j
            ops.pool_topk_update(got, x, ids, "max")
            reference.pool_topk_update(want, x.flatten(2), ids, "max", True)
    warned = _runtime_warnings(rec)
    assert len(warned) == 1
    msg = str(warned[0].message)
    assert "topk._stream_kernel" in msg and type(error).__name__ in msg and str(error).split(",")[0] in msg
    assert "torch reference" in msg
    assert got.equal(want) and got.device == want.device
    assert broken.calls == 1  # the failed configuration is not retried
    assert ("topk._stream_kernel", ("stream", False, False, False)) in _launch.failures()


def test_merge_falls_back(triton_backend, monkeypatch):
    monkeypatch.setattr(ttopk, "_merge_kernel", _Broken(RuntimeError("CUDA error: no kernel image is available")))
    a, b = TopKState.empty(3, 2, DEVICE), TopKState.empty(3, 2, DEVICE)
    reference.pool_topk_update(a, torch.randn(4, 3, 1, device=DEVICE), torch.arange(4, device=DEVICE), "max", False)
    reference.pool_topk_update(b, torch.randn(4, 3, 1, device=DEVICE), torch.arange(4, 8, device=DEVICE), "max", False)
    with pytest.warns(RuntimeWarning, match=r"topk\._merge_kernel .*no kernel image"):
        got = ops.merge_topk(a, b)
    want = a.clone()
    reference.merge_topk(want, b)
    assert got.equal(want)


def test_similarity_falls_back(triton_backend, monkeypatch):
    monkeypatch.setattr(tsim, "_candidates_kernel", _Broken(PTXASError("ptxas fatal: Ptx assembly aborted")))
    g = torch.Generator().manual_seed(1)
    q, db = torch.randn(3, 8, generator=g).to(DEVICE), torch.randn(30, 8, generator=g).to(DEVICE)
    with pytest.warns(RuntimeWarning, match=r"similarity\._candidates_kernel .*PTXASError") as rec:
        s, i = ops.cosine_topk(q, db, 4)
        s2, i2 = ops.cosine_topk(q, db, 4)
    assert len(_runtime_warnings(rec)) == 1
    rs, ri = reference.similarity.cosine_topk(q, db, 4, None)
    assert torch.equal(s, rs) and torch.equal(i, ri) and torch.equal(s2, rs) and torch.equal(i2, ri)


def test_library_errors_are_not_swallowed(triton_backend):
    x = torch.randn(6, 4, device=DEVICE)
    x[2] = float("inf")
    with pytest.raises(ArgumentError, match=r"\[2\]"):
        ops.cosine_topk(torch.randn(1, 4, device=DEVICE), x, 2)
    state = TopKState.empty(4, 2, DEVICE)
    with pytest.raises(ArgumentError, match="sample_ids must be >= 0"):
        ops.topk_update(state, torch.randn(2, 4, device=DEVICE), torch.tensor([1, -1], device=DEVICE))
    assert state.equal(TopKState.empty(4, 2, DEVICE)) and not _launch.failures()


def test_strict_mode_raises(monkeypatch):
    monkeypatch.setenv("SEMLENS_BACKEND", "triton")
    monkeypatch.setenv("SEMLENS_TRITON_STRICT", "1")
    monkeypatch.setattr(ttopk, "_merge_kernel", _Broken(RuntimeError("boom")))
    a = TopKState.empty(2, 1, DEVICE)
    with pytest.raises(RuntimeError, match="boom"):
        ops.merge_topk(a, a.clone())
