"""Each rule against a direct (loop/einsum) implementation of its formula."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semlens_fast.relevance import (RelevanceEngine, dlbacktrace, dlbacktrace_contrast, lrp_epsilon, lrp_zplus,
                                    rules)
from semlens_fast.relevance.rules import ACTIVATION_RANGES

from .helpers import rel_err

torch.set_default_dtype(torch.float32)


def naive_dlb_linear(x, W, b, R, act=None, fn=None):
    """z_ij = w_ji x_i per sample; R_i = sum_j |z_ij| R_j / (m+ P_j + m- N_j + |b_j|)."""
    out = torch.zeros_like(x, dtype=torch.float64)
    x, W, b, R = x.double(), W.double(), b.double(), R.double()
    for n in range(x.shape[0]):
        for j in range(W.shape[0]):
            z = W[j] * x[n]
            P, N = z.clamp(min=0).sum(), (-z).clamp(min=0).sum()
            mp = mn = 1.0
            if act is not None:
                t = P - N + b[j]
                if act["l"] is not None and t < act["l"]:
                    mp = 0.0
                if act["u"] is not None and t > act["u"]:
                    mn = 0.0
            den = mp * P + mn * N + b[j].abs()
            if den == 0:
                continue
            out[n] += (mp * z.clamp(min=0) + mn * (-z).clamp(min=0)) * R[n, j] / den
    return out


def test_dlb_linear_formula_and_bias_share():
    torch.manual_seed(0)
    lin = nn.Linear(7, 5)
    m = nn.Sequential(lin).eval()
    x = torch.randn(4, 7)
    seed = torch.rand(4, 5)
    res = RelevanceEngine(m, dlbacktrace())(x, seed=seed)
    ref = naive_dlb_linear(x, lin.weight.detach(), lin.bias.detach(), seed)
    assert rel_err(res.input, ref) < 1e-5
    # conservation up to the bias share, which stays at the unit
    z = lin.weight.detach() * x[:, None, :]
    denom = z.abs().sum(-1) + lin.bias.detach().abs()
    bias_share = (lin.bias.detach().abs() / denom * seed).sum()
    assert torch.isclose(res.input.sum() + bias_share, seed.sum(), rtol=1e-5)
    assert bias_share > 0.01 * seed.sum()  # the check above is not vacuous


@pytest.mark.parametrize("act_mod,name", [(nn.Tanh(), "tanh"), (nn.Sigmoid(), "sigmoid")])
def test_dlb_saturation_bounded_activation(act_mod, name):
    torch.manual_seed(1)
    lin = nn.Linear(6, 8)
    with torch.no_grad():
        lin.weight.mul_(10.0)  # push many units into saturation
    m = nn.Sequential(lin, act_mod).eval()
    x = torch.randn(5, 6)
    seed = torch.rand(5, 8)
    res = RelevanceEngine(m, dlbacktrace())(x, seed=seed)
    ref = naive_dlb_linear(x, lin.weight.detach(), lin.bias.detach(), seed, ACTIVATION_RANGES[name])
    assert rel_err(res.input, ref) < 1e-5
    plain = naive_dlb_linear(x, lin.weight.detach(), lin.bias.detach(), seed)
    assert rel_err(plain, ref) > 1e-2  # saturation changed something
    off = RelevanceEngine(m, dlbacktrace(saturation=False))(x, seed=seed)
    assert rel_err(off.input, plain) < 1e-5


def test_dlb_conv_formula_against_unfold():
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    m = nn.Sequential(conv).eval()
    x = torch.randn(2, 3, 7, 7)
    y = m(x)
    seed = torch.rand_like(y)
    res = RelevanceEngine(m, dlbacktrace())(x, seed=seed)
    # direct: unfold patches, z = w * patch per output position and channel
    cols = F.unfold(x.double(), 3, padding=1, stride=2)  # [B, 27, L]
    Wf = conv.weight.detach().double().reshape(4, -1)  # [4, 27]
    z = Wf[None, :, :, None] * cols[:, None, :, :]  # [B, 4, 27, L]
    den = z.abs().sum(2) + conv.bias.detach().double().abs()[None, :, None]
    share = (z.abs() * (seed.double().reshape(2, 4, 1, -1) / den[:, :, None, :])).sum(1)  # [B, 27, L]
    ref = F.fold(share, (7, 7), 3, padding=1, stride=2)
    assert rel_err(res.input, ref) < 1e-5


def test_maxpool_winner_takes_all_ties_split():
    x = torch.tensor([[[[1.0, 3.0, 2.0, 2.0],
                        [0.0, 3.0, 2.0, 2.0],
                        [5.0, 0.0, -1.0, -2.0],
                        [0.0, 0.0, -3.0, -1.0]]]])
    m = nn.Sequential(nn.MaxPool2d(2)).eval()
    seed = torch.tensor([[[[4.0, 8.0], [2.0, 6.0]]]])
    r = RelevanceEngine(m, dlbacktrace())(x, seed=seed).input
    expect = torch.tensor([[[[0.0, 2.0, 2.0, 2.0],
                             [0.0, 2.0, 2.0, 2.0],
                             [2.0, 0.0, 3.0, 0.0],
                             [0.0, 0.0, 0.0, 3.0]]]])  # -1 ties at (2,2) and (3,3)
    assert torch.equal(r, expect)


def test_maxpool_overlapping_and_padding_conserves():
    torch.manual_seed(3)
    m = nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1)).eval()
    x = torch.randn(2, 3, 9, 9).round()  # rounding creates ties
    y = m(x)
    seed = torch.rand_like(y)
    r = RelevanceEngine(m, dlbacktrace())(x, seed=seed).input
    assert torch.isclose(r.sum(), seed.sum(), rtol=1e-5)
    # relevance only on window maxima: naive check of each window
    ref = torch.zeros_like(x)
    xp = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    for b in range(2):
        for c in range(3):
            for i in range(y.shape[2]):
                for j in range(y.shape[3]):
                    win = xp[b, c, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
                    mask = (win == win.max()).float()
                    full = torch.zeros(11, 11)
                    full[2 * i:2 * i + 3, 2 * j:2 * j + 3] = mask * seed[b, c, i, j] / mask.sum()
                    ref[b, c] += full[1:10, 1:10]
    assert rel_err(r, ref) < 1e-6


def test_avgpool_proportional_to_abs_x():
    x = torch.tensor([[[[1.0, -3.0], [0.0, 4.0]]]])
    m = nn.Sequential(nn.AvgPool2d(2)).eval()
    r = RelevanceEngine(m, dlbacktrace())(x, seed=torch.tensor([[[[16.0]]]])).input
    assert torch.allclose(r, torch.tensor([[[[2.0, 6.0], [0.0, 8.0]]]]))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.head = nn.Linear(3 * 5 * 5, 4, bias=False)

    def forward(self, x):
        h = x + torch.relu(self.conv(x))
        h = torch.cat([h, h * 0.5], dim=1)[:, :3]  # concat + slice: index maps
        return self.head(h.reshape(h.shape[0], -1))


def test_residual_add_concat_reshape_conserve():
    torch.manual_seed(4)
    m = Residual().eval()
    x = torch.randn(2, 3, 5, 5)
    res = RelevanceEngine(m, dlbacktrace())(x, multiplier=10.0, record="all")
    assert torch.isclose(res.input.sum(), torch.tensor(20.0), rtol=1e-4)
    # residual add: |a| / (|a| + |b|) split, checked at the add node
    add = res.layers["add"]
    a, b = x, torch.relu(m.conv(x))
    den = a.abs() + b.abs()
    expected_a = torch.where(den > 0, a.abs() / den * add, torch.zeros_like(add))
    conv_out = res.layers["conv"]  # relevance at conv output = relevance given to relu branch
    assert torch.allclose(conv_out, add - expected_a, atol=1e-6)


def test_add_split_modes():
    a, b = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 2.0]])
    R = torch.tensor([[8.0, 4.0]])
    ctx = rules.NodeContext("add", "call_function", operator.add, None, [a, b], a + b, lambda u, v: u + v,
                            extra={"addends": [(a, 1, 0), (b, 1, 1)]})
    ra, rb = rules.AddSplit("abs").backward(ctx, R)
    assert torch.allclose(ra, torch.tensor([[2.0, 2.0]])) and torch.allclose(rb, torch.tensor([[6.0, 2.0]]))
    ra, rb = rules.AddSplit("equal").backward(ctx, R)
    assert torch.allclose(ra, R / 2) and torch.allclose(rb, R / 2)
    ra, rb = rules.AddSplit("z", epsilon=0.0).backward(ctx, torch.tensor([[8.0, 1.0]]))
    assert torch.allclose(ra[:, 0], torch.tensor([2.0])) and torch.allclose(rb[:, 0], torch.tensor([6.0]))


class TinyAttention(nn.Module):
    """Single-head self-attention: softmax(Q K^T / sqrt(d)) V, then a linear head."""

    def __init__(self, d: int = 6, t: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.head = nn.Linear(d * t, classes, bias=False)
        self.scale = d ** -0.5

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) * self.scale, dim=-1)
        h = a @ self.v(x)
        return self.head(h.flatten(1))


def test_attention_product_rule_conserves_and_splits_half():
    torch.manual_seed(5)
    m = TinyAttention().eval()
    x = torch.randn(3, 4, 6)
    res = RelevanceEngine(m, dlbacktrace())(x, multiplier=1.0, record="all")
    assert torch.isclose(res.input.sum(), torch.tensor(3.0), rtol=1e-4)
    # at the output matmul h = A @ V, each factor receives half of the relevance
    Rh = res.layers["matmul_1"]
    Rv = res.layers["v"]
    Ra = res.layers["softmax"]
    assert torch.isclose(Rv.sum(), Rh.sum() / 2, rtol=1e-4)
    assert torch.isclose(Ra.sum(), Rh.sum() / 2, rtol=1e-4)


def test_lrp_epsilon_conserves_without_bias():
    torch.manual_seed(6)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                      nn.Linear(4 * 3 * 3, 5, bias=False)).eval()
    x = torch.randn(4, 2, 8, 8)
    r = RelevanceEngine(m, lrp_epsilon(epsilon=1e-9))(x).input
    assert torch.allclose(r.flatten(1).sum(1), torch.ones(4), rtol=1e-4)
    rz = RelevanceEngine(m, lrp_zplus())(x.abs()).input
    assert torch.allclose(rz.flatten(1).sum(1), torch.ones(4), rtol=1e-4)
    assert (rz >= 0).all()


def naive_contrast_linear(x, W, b, Rp, Rn):
    """dl-backtrace's NumPy contrast rule, unit by unit."""
    outp = torch.zeros_like(x, dtype=torch.float64)
    outn = torch.zeros_like(outp)
    for n in range(x.shape[0]):
        for j in range(W.shape[0]):
            z = (W[j] * x[n]).double()
            pi, ni = z > 0, z < 0
            P, N = z[pi].sum(), -z[ni].sum()
            wp, wn = Rp[n, j].double(), Rn[n, j].double()
            if ni.sum() == 0 and pi.sum() > 0:
                outp[n, pi] += z[pi] / P * wp
                outn[n, pi] += z[pi] / P * wn
            elif pi.sum() == 0 and ni.sum() > 0:
                outp[n, ni] += -z[ni] / N * wp
                outn[n, ni] += -z[ni] / N * wn
            else:
                t = P + b[j] - N
                if t > 0:
                    sign, pa, na = (1, wp, wn) if wp > wn else (-1, wn, wp)
                elif t < 0:
                    sign, pa, na = (1, wp, wn) if wp < wn else (-1, wn, wp)
                else:
                    continue
                if sign > 0:
                    outp[n, pi] += z[pi] / P * pa
                    outn[n, ni] += -z[ni] / N * na
                else:
                    outn[n, pi] += z[pi] / P * pa
                    outp[n, ni] += -z[ni] / N * na
    return outp, outn


def test_contrast_rule_against_loop_and_stream_conservation():
    torch.manual_seed(7)
    lin = nn.Linear(6, 5)
    m = nn.Sequential(lin).eval()
    x = torch.randn(4, 6)
    x[0, :3] = 0  # some pure-sign units
    with torch.no_grad():
        lin.weight[0] = lin.weight[0].abs()
    y = m(x)
    Rp, Rn = torch.rand_like(y), torch.rand_like(y)
    res = RelevanceEngine(m, dlbacktrace_contrast())(x, seed=Rp, negative_seed=Rn)
    rp, rn = naive_contrast_linear(x, lin.weight.detach(), lin.bias.detach(), Rp, Rn)
    assert rel_err(res.input_positive, rp) < 1e-5
    assert rel_err(res.input_negative, rn) < 1e-5
    assert torch.isclose(res.input_positive.sum() + res.input_negative.sum(), Rp.sum() + Rn.sum(), rtol=1e-5)
    assert torch.allclose(res.input, res.input_positive - res.input_negative)


class Functional(nn.Module):
    """Functional ops: F.relu, F.max_pool2d, split + getitem, cat, mean, torch.flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(4, 4, 1, bias=False)
        self.lin = nn.Linear(8, 5, bias=False)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.c(x)), 2)
        a, b = torch.split(h, 4, dim=1)
        h = torch.cat([self.c2(a), b], 1).mean((2, 3))
        return self.lin(torch.flatten(h, 1))


@pytest.mark.parametrize("make", [dlbacktrace, lambda: lrp_epsilon(1e-9), dlbacktrace_contrast])
def test_functional_graph_conserves(make):
    torch.manual_seed(8)
    m = Functional().eval()
    x = torch.randn(2, 3, 8, 8)
    comp = make()
    res = RelevanceEngine(m, comp)(x, record=["split", "c2"])
    if comp.streams == 2:
        assert torch.allclose(res.input_positive.flatten(1).sum(1), torch.ones(2), rtol=1e-4)
        neg_seed = torch.softmax(m(x), 1) * (1 - torch.eye(5)[m(x).argmax(1)])
        assert torch.allclose(res.input_negative.flatten(1).sum(1), neg_seed.sum(1), rtol=1e-4)
    else:
        assert torch.allclose(res.input.flatten(1).sum(1), torch.ones(2), rtol=1e-4)
    assert isinstance(res.layers["split"], tuple) and len(res.layers["split"]) == 2


@pytest.mark.parametrize("make", [dlbacktrace, lrp_zplus])
def test_conv_variants_conserve(make):
    """padding='same', Conv1d with stride and dilation, MaxPool1d."""
    torch.manual_seed(9)
    m2 = nn.Sequential(nn.Conv2d(2, 3, 3, padding="same", bias=False), nn.ReLU(), nn.Flatten(),
                       nn.Linear(3 * 5 * 5, 4, bias=False)).eval()
    m1 = nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, dilation=2, bias=False), nn.ReLU(), nn.MaxPool1d(2),
                       nn.Flatten(), nn.Linear(3, 4, bias=False)).eval()
    for m, x in ((m2, torch.randn(2, 2, 5, 5)), (m1, torch.randn(2, 2, 9))):
        r = RelevanceEngine(m, make())(x).input
        assert r.shape == x.shape
        assert torch.allclose(r.flatten(1).sum(1), torch.ones(2), rtol=1e-4)


class TopGather(nn.Module):
    """Integer index tensors computed from the input (argsort) carry no relevance; gather is an index map."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6, bias=False)
        self.head = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        h = torch.relu(self.lin(x))
        idx = torch.argsort(h, dim=1, descending=True)[:, :3]
        return self.head(torch.gather(h, 1, idx))


def test_integer_indices_from_the_input_and_gather():
    torch.manual_seed(11)
    m = TopGather().eval()
    x = torch.randn(3, 4)
    res = RelevanceEngine(m, dlbacktrace())(x, record=["lin"])
    assert torch.allclose(res.input.sum(1), torch.ones(3), rtol=1e-5)
    # only the three gathered units receive relevance
    assert ((res.layers["lin"] != 0).sum(1) <= 3).all()


class FunctionalAffine(nn.Module):
    """F.conv2d / F.linear with the model's own parameters (constant weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.ref = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(3 * 4 * 4, 5))
        self.w1, self.b1 = self.ref[0].weight, self.ref[0].bias
        self.w2, self.b2 = self.ref[3].weight, self.ref[3].bias

    def forward(self, x):
        h = F.relu(F.conv2d(x, self.w1, self.b1, stride=2, padding=1))
        return F.linear(h.flatten(1), self.w2, self.b2)


@pytest.mark.parametrize("make", [dlbacktrace, lrp_zplus])
def test_functional_affine_equals_module_version(make):
    torch.manual_seed(12)
    m = FunctionalAffine().eval()
    x = torch.randn(2, 2, 8, 8)
    a = RelevanceEngine(m, make())(x).input
    b = RelevanceEngine(m.ref, make())(x).input
    assert rel_err(a, b) < 1e-6 and b.abs().max() > 0


def test_fast_block_max_pool_forward_matches_torch_with_nan_and_ties():
    from semlens_fast.relevance.rules import max_pool2d_blocks

    torch.manual_seed(13)
    x = torch.randn(2, 3, 7, 9).round()
    x[0, 0, 0, 0] = float("nan")
    x[1, 2, 3, 3] = float("-inf")
    for k in ((2, 2), (3, 3), (2, 3)):
        ref = F.max_pool2d(x, k)
        got = max_pool2d_blocks(x, k)
        assert got.shape == ref.shape
        assert torch.equal(torch.isnan(got), torch.isnan(ref))
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(ref))
    # an engine using it gives the model's own outputs
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                      nn.Linear(4 * 3 * 4, 5)).eval()
    xi = torch.randn(2, 3, 7, 9)
    assert torch.allclose(RelevanceEngine(m, lrp_zplus())(xi).output, m(xi))
    # LRP keeps max-pool's one-winner gradient on ties (zennit's behaviour)
    pool = nn.Sequential(nn.MaxPool2d(2)).eval()
    xt = torch.ones(1, 1, 2, 2)
    r = RelevanceEngine(pool, lrp_epsilon())(xt, seed=torch.ones(1, 1, 1, 1)).input
    assert (r != 0).sum() == 1 and torch.isclose(r.sum(), torch.tensor(1.0))


def test_maxpool_rule_fast_path_equals_unfold_and_fold():
    """Non-overlapping windows go through ops.maxpool_relevance; the same split computed with
    unfold / fold (the rule's general path) gives the same, remainder row and column included."""
    torch.manual_seed(5)
    x = torch.randn(2, 3, 9, 11).round()  # ties; 9 x 11 leaves a remainder row and column
    m = nn.Sequential(nn.MaxPool2d(2)).eval()
    seed = torch.rand_like(m(x))
    r = RelevanceEngine(m, dlbacktrace())(x, seed=seed).input
    cols = F.unfold(x[..., :8, :10], 2, stride=2).reshape(2, 3, 4, -1)
    eq = (cols == F.max_pool2d(x, 2).reshape(2, 3, 1, -1)).float()
    share = (eq * (seed.reshape(2, 3, 1, -1) / eq.sum(2, keepdim=True).clamp(min=1))).reshape(2, 12, -1)
    want = F.pad(F.fold(share, (8, 10), 2, stride=2), (0, 1, 0, 1))
    assert torch.equal(r, want)


@pytest.mark.parametrize("kw", [dict(padding=1), dict(stride=2), dict(padding=2, dilation=2), dict(bias=False)])
@pytest.mark.parametrize("preset", [dlbacktrace, lrp_epsilon])
def test_thin_conv_path_equals_the_conv_kernels(kw, preset, monkeypatch):
    """A 1-channel input layer (9 taps) runs its rule products as unfold + matmul and fold; the
    same rule through the convolution kernels (THIN_CONV_TAPS = 0) agrees to rounding."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 6, 3, **kw), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.ReLU(), nn.Flatten(),
                      nn.LazyLinear(3)).double().eval()
    x = torch.randn(3, 1, 13, 12, dtype=torch.float64)
    m(x)
    assert rules._thin_conv(m[0], x) and not rules._thin_conv(m[2], m[1](m[0](x)))
    thin = RelevanceEngine(m, preset())(x).input
    monkeypatch.setattr(rules, "THIN_CONV_TAPS", 0)
    plain = RelevanceEngine(m, preset())(x).input
    assert thin.shape == x.shape and rel_err(thin, plain) < 1e-12
