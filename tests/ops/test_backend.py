"""Backend selection: the extension fallback, forcing, and the SIMD level switch."""
from __future__ import annotations

import warnings

import pytest
import torch

from semlens_fast.ops import TopKState, _backend, topk_update
from semlens_fast.errors import BackendUnavailableError


@pytest.fixture
def no_extension(monkeypatch):
    """Pretend semlens_fast._C failed to import."""
    monkeypatch.delenv("SEMLENS_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_ext_loaded", True)
    monkeypatch.setattr(_backend, "_ext", None)
    monkeypatch.setattr(_backend, "_ext_error", "No module named 'semlens_fast._C'")
    monkeypatch.setattr(_backend, "_warned", False)


def test_missing_extension_falls_back_with_one_warning(no_extension):
    x, ids = torch.randn(6, 5), torch.arange(6)
    with pytest.warns(RuntimeWarning, match="falling back to the slower torch reference") as rec:
        s = topk_update(TopKState.empty(5, 2), x, ids)
        topk_update(s, torch.randn(6, 5), torch.arange(6, 12))
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    top = torch.topk(x.t(), 2, dim=1)
    s1 = topk_update(TopKState.empty(5, 2), x, ids)
    assert torch.equal(s1.values, top.values) and torch.equal(s1.ids, top.indices)
    assert _backend.cpu_isa() == "none"


def test_forcing_cpu_without_extension_is_an_error(no_extension, monkeypatch):
    monkeypatch.setenv("SEMLENS_BACKEND", "cpu")
    with pytest.raises(BackendUnavailableError, match="extension semlens_fast._C is not built"):
        topk_update(TopKState.empty(2, 1), torch.zeros(1, 2), torch.arange(1))


def test_default_cpu_backend_is_the_extension(monkeypatch):
    monkeypatch.delenv("SEMLENS_BACKEND", raising=False)
    if _backend.extension() is None:
        pytest.skip("extension not built")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.choose(torch.device("cpu")) == "cpu"


def test_isa_can_be_lowered_and_restored():
    ext = _backend.extension()
    if ext is None:
        pytest.skip("extension not built")
    best = ext.best_isa()
    assert ext.set_isa("scalar") == "scalar"
    assert _backend.cpu_isa() == "scalar"
    assert ext.set_isa("avx512") == best  # clamps to what the CPU has
    with pytest.raises(ValueError, match="isa must be"):
        ext.set_isa("sse9")
    ext.set_isa(best)
    assert _backend.cpu_isa() == best


def test_forcing_triton_for_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("SEMLENS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        topk_update(TopKState.empty(2, 1), torch.zeros(1, 2), torch.arange(1))
