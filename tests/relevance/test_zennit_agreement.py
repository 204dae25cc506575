"""Our LRP rules against zennit's on the same model, rules and canonizer."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from semlens_fast.relevance import RelevanceEngine, epsilon_plus_flat, lrp_alpha_beta, lrp_epsilon, lrp_zplus

from .helpers import rel_err

zennit = pytest.importorskip("zennit", reason="zennit is not installed")
from zennit.attribution import Gradient  # noqa: E402
from zennit.canonizers import SequentialMergeBatchNorm  # noqa: E402
from zennit.composites import EpsilonPlusFlat, LayerMapComposite  # noqa: E402
from zennit.rules import AlphaBeta, Epsilon, Norm, Pass, ZPlus  # noqa: E402
from zennit.types import Activation, AvgPool, Convolution  # noqa: E402


def bn_cnn() -> nn.Sequential:
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(8, 16, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                      nn.Linear(16 * 2 * 2, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    bn = m[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
    return m


def _zennit(model, x, composite):
    with Gradient(model=model, composite=composite) as attributor:
        _, rel = attributor(x, torch.eye(10)[model(x).argmax(1)])
    return rel


def _layer_map(rule_conv, rule_lin):
    return LayerMapComposite([(Activation, Pass()), (AvgPool, Norm()), (Convolution, rule_conv),
                              (nn.Linear, rule_lin)], canonizers=[SequentialMergeBatchNorm()])


CASES = {
    "epsilon": (lambda: lrp_epsilon(), lambda: _layer_map(Epsilon(), Epsilon())),
    "zplus": (lambda: lrp_zplus(), lambda: _layer_map(ZPlus(), ZPlus())),
    "alpha2beta1": (lambda: lrp_alpha_beta(2.0, 1.0), lambda: _layer_map(AlphaBeta(2.0, 1.0), AlphaBeta(2.0, 1.0))),
    "epsilon_plus_flat": (lambda: epsilon_plus_flat(),
                          lambda: EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lrp_matches_zennit(case):
    ours_c, theirs_c = CASES[case]
    m = bn_cnn()
    torch.manual_seed(0)
    x = torch.randn(4, 1, 14, 14)
    ours = RelevanceEngine(m, ours_c())(x).input
    theirs = _zennit(m, x, theirs_c())
    assert rel_err(ours, theirs) < 1e-4
    assert theirs.abs().max() > 0


def test_batchnorm_folding_matters_and_model_is_untouched():
    m = bn_cnn()
    w0 = m[0].weight.detach().clone()
    x = torch.randn(2, 1, 14, 14)
    folded = RelevanceEngine(m, lrp_zplus())(x).input
    unfolded = RelevanceEngine(m, lrp_zplus(canonize_batchnorm=False))(x).input
    # z+ on the folded conv differs from z+ on the conv then epsilon on the BN
    # (for LRP-epsilon both are the same, the epsilon rule commutes with folding)
    assert rel_err(unfolded, folded) > 1e-3
    eps_f = RelevanceEngine(m, lrp_epsilon())(x).input
    eps_u = RelevanceEngine(m, lrp_epsilon(canonize_batchnorm=False))(x).input
    assert rel_err(eps_u, eps_f) < 1e-4
    assert torch.equal(m[0].weight, w0) and isinstance(m[1], nn.BatchNorm2d)
    # the engine refreshes its folded copy when the model changes
    eng = RelevanceEngine(m, lrp_epsilon())
    r1 = eng(x).input
    with torch.no_grad():
        m[1].running_var.mul_(4.0)
    r2 = eng(x).input
    assert rel_err(r1, r2) > 1e-3
    assert rel_err(r2, RelevanceEngine(m, lrp_epsilon())(x).input) < 1e-6
