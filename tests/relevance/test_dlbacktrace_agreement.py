"""Agreement with the ``dl-backtrace`` package (0.1.24), run in a subprocess.

* :func:`~semlens_fast.relevance.dlbacktrace_compat` reproduces its CPU engine: every
  layer's map agrees within 1e-4 (relative to the map's largest value) on a Sequential CNN
  and an MLP.
* Where our default mode differs, the difference is a defect of dl-backtrace 0.1.24,
  shown here: (1) it has no pooling rule — relevance is ``np.repeat``-ed back, so max
  pooling gives relevance to inputs that are not the window maximum; (2) for a pooling
  output that does not divide the input (5 -> 2) it ``np.tile``-s, so relevance lands on
  input positions the pooling never read; (3) its linear kernel counts an empty positive
  or negative stream as 1, so a bias-free layer loses relevance (no conservation, and the
  result depends on the scale of the input).

Skipped, with the reason, only where dl-backtrace cannot be imported.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from semlens_fast.relevance import RelevanceEngine, dlbacktrace, dlbacktrace_compat
from semlens_fast.relevance._dlb_runner import DLBacktraceUnavailable, run_dlbacktrace_many

from .helpers import mlp, rel_err, seq_cnn

pytestmark = pytest.mark.skipif(importlib.util.find_spec("dl_backtrace") is None,
                                reason="dl-backtrace is not installed (pip install --no-deps dl-backtrace==0.1.24)")

# fx node names of dl-backtrace's graph for the models below, in Sequential order
CNN_NODES = ["conv2d", "relu", "max_pool2d", "conv2d_1", "relu_1", "avg_pool2d", "view", "linear"]
MLP_NODES = ["linear", "relu", "linear_1", "relu_1", "linear_2"]


def _models():
    torch.manual_seed(10)
    x_cnn = torch.randn(3, 1, 14, 14)
    x_mlp = torch.randn(4, 12)
    # positive weights and inputs: every unit has N = 0 (exposes the zero-fill defect)
    pos = nn.Sequential(nn.Linear(6, 3, bias=False)).eval()
    with torch.no_grad():
        pos[0].weight.copy_(torch.rand(3, 6) * 0.1)
    x_pos = torch.rand(2, 6)
    return {"cnn": (seq_cnn(), x_cnn), "mlp": (mlp(), x_mlp), "pos": (pos, x_pos)}


@pytest.fixture(scope="module")
def dlb_results():
    models = _models()
    try:
        out = run_dlbacktrace_many([{"model": m, "x": x} for m, x in models.values()])
    except DLBacktraceUnavailable as e:
        pytest.skip(f"dl-backtrace cannot be imported here: {e}")
    return {k: (models[k][0], models[k][1], o["relevance"]) for k, o in zip(models, out)}


def _ours_by_node(model, x, composite, nodes):
    """Relevance at the input of each dl-backtrace node = at the output of the previous layer."""
    res = RelevanceEngine(model, composite)(x, None, multiplier=100.0, record="all")
    maps = {nodes[0]: res.input}
    for i, n in enumerate(nodes[1:]):
        maps[n] = res.layers[str(i)]
    return maps, res


@pytest.mark.parametrize("name,nodes", [("cnn", CNN_NODES), ("mlp", MLP_NODES)])
def test_compat_every_layer_within_1e4(dlb_results, name, nodes):
    model, x, theirs = dlb_results[name]
    ours, res = _ours_by_node(model, x, dlbacktrace_compat(), nodes)
    assert np.allclose(theirs["output"], 100.0 * torch.eye(res.output.shape[1])[res.output.argmax(1)].numpy())
    for n in nodes:
        assert theirs[n].shape == tuple(ours[n].shape), n
        err = rel_err(ours[n], torch.from_numpy(theirs[n]))
        assert err < 1e-4, f"layer {n}: relative error {err:.2e}"


def test_default_mode_equals_dlb_on_layers_its_defects_do_not_touch(dlb_results):
    """The MLP's last layer: units with mixed-sign contributions, no pooling; the formula
    |z| / (P + N + |b|) is the same in both."""
    model, x, theirs = dlb_results["mlp"]
    ours, _ = _ours_by_node(model, x, dlbacktrace(), MLP_NODES)
    assert rel_err(ours["linear_2"], torch.from_numpy(theirs["linear_2"])) < 1e-4
    assert rel_err(ours["relu_1"], torch.from_numpy(theirs["relu_1"])) < 1e-4


def test_defect_maxpool_relevance_on_non_maxima(dlb_results):
    model, x, theirs = dlb_results["cnn"]
    a = model[1](model[0](x))  # input of the max pool
    win_max = nn.functional.max_pool2d(a, 2)
    is_max = (a == nn.functional.interpolate(win_max, scale_factor=2, mode="nearest"))
    theirs_in = torch.from_numpy(theirs["max_pool2d"])
    leaked = theirs_in[~is_max].abs().sum() / theirs_in.abs().sum()
    assert leaked > 0.3, "dl-backtrace gives most relevance to non-maximal inputs of a max pool"
    ours, _ = _ours_by_node(model, x, dlbacktrace(), CNN_NODES)
    assert ours["max_pool2d"][~is_max].abs().max() == 0  # winner takes all


def test_defect_avgpool_tiles_onto_unread_positions(dlb_results):
    model, x, theirs = dlb_results["cnn"]
    # AvgPool2d(2) on 5x5 reads rows/cols 0..3 only; row 4 and column 4 are never read
    theirs_in = torch.from_numpy(theirs["avg_pool2d"])
    unread = theirs_in[..., 4, :].abs().sum() + theirs_in[..., :, 4].abs().sum()
    assert unread > 0.05 * theirs_in.abs().sum()
    ours, _ = _ours_by_node(model, x, dlbacktrace(), CNN_NODES)
    assert ours["avg_pool2d"][..., 4, :].abs().max() == 0 and ours["avg_pool2d"][..., :, 4].abs().max() == 0


def test_defect_linear_zero_fill_breaks_conservation(dlb_results):
    model, x, theirs = dlb_results["pos"]
    out_total = theirs["output"].sum()
    lost = 1 - theirs["input"].sum() / out_total
    # P/(P + 1): with small contributions most relevance vanishes in a bias-free layer
    z = (model[0].weight[None] * x[:, None]).sum(-1)  # P per unit (all contributions > 0)
    t = model(x).argmax(1)
    P = z[torch.arange(x.shape[0]), t]
    expected_kept = (P / (P + 1)).mean().item()
    assert abs(theirs["input"].sum() / out_total - expected_kept) < 1e-4
    assert lost > 0.1
    ours = RelevanceEngine(model, dlbacktrace())(x, None, multiplier=100.0).input
    assert abs(ours.sum().item() - out_total) < 1e-3  # conserved


def test_compat_refuses_products_it_does_not_reproduce():
    """dl-backtrace 0.1.24 gives all of ``a @ b`` to ``a`` through its shape aligner; the compat
    preset says so instead of returning something that differs (no dl-backtrace needed)."""
    from semlens_fast.relevance import UnsupportedOpError

    class AB(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return (self.a(x) @ self.b(x).transpose(1, 2)).flatten(1)

    x = torch.randn(2, 3, 4)
    with pytest.raises(UnsupportedOpError, match="first operand"):
        RelevanceEngine(AB().eval(), dlbacktrace_compat())(x)
    assert RelevanceEngine(AB().eval(), dlbacktrace())(x).input.shape == x.shape
