"""Bad input: unsupported ops, explicit pass-through, bad targets, tracing fallback."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from semlens_fast.errors import ArgumentError, DeviceError, ShapeError
from semlens_fast.relevance import RelevanceEngine, UnsupportedOpError, dlbacktrace, lrp_epsilon, relevance

from .helpers import seq_cnn


class CumsumNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(torch.cumsum(x, dim=1))


def test_unsupported_function_names_op_and_rule_set():
    m = CumsumNet().eval()
    x = torch.randn(2, 4)
    with pytest.raises(UnsupportedOpError, match=r"dlbacktrace.*cumsum"):
        RelevanceEngine(m, dlbacktrace())(x)
    # explicit pass-through only when asked
    r = RelevanceEngine(m, dlbacktrace().with_passthrough(torch.cumsum))(x, multiplier=1.0)
    assert r.input.shape == x.shape


def test_unsupported_module_names_module_and_rule_set():
    m = nn.Sequential(nn.Conv2d(4, 4, 1), nn.PixelShuffle(2), nn.Flatten(), nn.Linear(16, 2)).eval()
    with pytest.raises(UnsupportedOpError, match=r"'lrp_epsilon'.*PixelShuffle"):
        RelevanceEngine(m, lrp_epsilon())(torch.randn(1, 4, 2, 2))
    # pass-through on an op that changes the shape is an error, never a silent reshape
    with pytest.raises(ShapeError, match="pass-through"):
        RelevanceEngine(m, lrp_epsilon().with_passthrough(nn.PixelShuffle))(torch.randn(1, 4, 2, 2))


def test_unsupported_op_reached_only_through_the_relevance_path():
    """An op without a rule is an error only where relevance flows (here cumsum feeds a
    constant-like branch that is never multiplied into the output: no error)."""

    class SideBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            _unused = torch.cumsum(x, dim=1)
            return self.lin(x)

    m = SideBranch().eval()
    x = torch.randn(2, 4)
    r = RelevanceEngine(m, dlbacktrace())(x)
    assert r.input.shape == x.shape


def test_bad_targets_and_seeds(cnn, x_img):
    eng = RelevanceEngine(cnn)
    with pytest.raises(ArgumentError, match="target"):
        eng(x_img, target=10)
    with pytest.raises(ShapeError, match="target"):
        eng(x_img, target=[1, 2])
    with pytest.raises(ShapeError, match="seed"):
        eng(x_img, seed=torch.ones(3, 9))
    with pytest.raises(ArgumentError, match="record"):
        eng(x_img, record=["nope"])
    with pytest.raises(ArgumentError, match="model"):
        RelevanceEngine("not a model")  # type: ignore[arg-type]
    if torch.cuda.is_available():  # pragma: no cover - no GPU in CI
        with pytest.raises(DeviceError):
            eng(x_img.cuda())


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it, but the modules form a chain."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.act = nn.ReLU()
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        if x.sum() > -1e9:
            x = self.a(x)
        return self.b(self.act(x))


class UntraceableNonChain(Untraceable):
    def forward(self, x):
        if x.sum() > -1e9:
            x = self.a(x) * 2.0
        return self.b(self.act(x))


def test_hook_fallback_for_untraceable_chains():
    torch.manual_seed(0)
    m = Untraceable().eval()
    x = torch.randn(3, 5)
    lazy = RelevanceEngine(m)  # fx fails: captured at the first call, on its input
    assert lazy.traced_with == "pending"
    assert torch.allclose(lazy(x).input, RelevanceEngine(m, example=x)(x).input)
    assert lazy.traced_with in ("export", "hooks")
    eng = RelevanceEngine(m, example=x, capture="hooks")
    assert eng.traced_with == "hooks"
    with pytest.raises(ArgumentError, match="example"):
        RelevanceEngine(m, capture="hooks")
    with pytest.raises(ArgumentError, match="torch.fx cannot trace"):
        RelevanceEngine(m, capture="fx")
    ref = RelevanceEngine(nn.Sequential(m.a, m.act, m.b).eval())(x)
    res = eng(x, record=["a"])
    assert torch.allclose(res.input, ref.input) and "a" in res.layers
    bad = UntraceableNonChain().eval()
    with pytest.raises(ArgumentError, match="outside modules"):
        relevance(bad, x)


def test_output_must_be_single_tensor():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(2, 2)

        def forward(self, x):
            return self.l(x), x

    with pytest.raises(ArgumentError, match="single tensor"):
        RelevanceEngine(Two())(torch.randn(1, 2))
