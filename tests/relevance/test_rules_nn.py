"""Rules for ConvTranspose, attention (SDPA, einsum, softmax), norms, embeddings, gated MLPs,
rotary embeddings, recurrent layers and stochastic depth: each against a direct formula,
and conservation where the rule conserves."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semlens_fast.errors import ArgumentError
from semlens_fast.relevance import (RelevanceEngine, dlbacktrace, dlbacktrace_contrast, lrp_epsilon, lrp_zplus)

from .helpers import rel_err


def total(r: torch.Tensor) -> torch.Tensor:
    return r.reshape(r.shape[0], -1).sum(1)


def dense_dlb(f, x: torch.Tensor, R: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """DLBacktrace for any affine map y = A x + b, from its dense Jacobian A (per sample):
    R_i = sum_j |A_ji x_i| / (sum_k |A_jk x_k| + |b_j|) R_j."""
    out = []
    for n in range(x.shape[0]):
        xi = x[n:n + 1].double()
        A = torch.autograd.functional.jacobian(lambda t: f(t.float()).double(), xi).reshape(R[n].numel(), -1)
        z = (A * xi.reshape(1, -1)).abs()
        den = z.sum(1)
        if b is not None:
            den = den + b.double().abs()
        share = torch.where(den[:, None] > 0, z / den[:, None], torch.zeros_like(z))
        out.append((share * R[n].reshape(-1, 1).double()).sum(0).reshape(x.shape[1:]))
    return torch.stack(out)


# ------------------------------------------------------------------ transposed convolutions
@pytest.mark.parametrize("cls,shape,kw", [
    (nn.ConvTranspose1d, (2, 4, 5), dict(kernel_size=3, stride=2, padding=1, output_padding=1)),
    (nn.ConvTranspose2d, (2, 4, 3, 4), dict(kernel_size=3, stride=2, padding=1, groups=2, dilation=1)),
    (nn.ConvTranspose2d, (1, 2, 3, 3), dict(kernel_size=2, stride=1, dilation=2)),
    (nn.ConvTranspose3d, (1, 2, 2, 3, 2), dict(kernel_size=2, stride=2)),
])
def test_conv_transpose_dlb_equals_dense_formula(cls, shape, kw):
    torch.manual_seed(0)
    layer = cls(shape[1], 4, **kw).eval()
    x = torch.randn(*shape)
    y = layer(x)
    R = torch.rand_like(y)
    res = RelevanceEngine(nn.Sequential(layer), dlbacktrace())(x, seed=R)
    bias = layer.bias.detach().view(1, -1, *([1] * (y.dim() - 2)))
    ref = dense_dlb(lambda t: layer(t) - bias, x, R, bias[0].expand(y.shape[1:]).reshape(-1))
    assert rel_err(res.input, ref) < 1e-5


@pytest.mark.parametrize("make", [dlbacktrace, lambda: lrp_epsilon(1e-12), lrp_zplus, dlbacktrace_contrast])
def test_conv_transpose_conserves_without_bias(make):
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False), nn.ReLU(),
                      nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1, bias=False), nn.ReLU(),
                      nn.Flatten(), nn.Linear(3 * 8 * 8, 5, bias=False)).eval()
    x = torch.randn(3, 2, 8, 8).abs()
    comp = make()
    res = RelevanceEngine(m, comp)(x)
    r = res.input_positive if comp.streams == 2 else res.input
    assert torch.allclose(total(r), torch.ones(3), rtol=1e-4)


def test_functional_conv_transpose_equals_module():
    torch.manual_seed(2)
    layer = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1)

    class Fn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w, self.b = layer.weight, layer.bias

        def forward(self, x):
            return F.conv_transpose2d(x, self.w, self.b, stride=2, padding=1).flatten(1)

    x = torch.randn(2, 3, 4, 4)
    a = RelevanceEngine(Fn().eval())(x, target=3).input
    b = RelevanceEngine(nn.Sequential(layer, nn.Flatten()).eval())(x, target=3).input
    assert rel_err(a, b) < 1e-6 and b.abs().max() > 0


# ------------------------------------------------------------------ softmax and LayerNorm
def test_softmax_rules():
    torch.manual_seed(3)
    x = torch.randn(2, 5)
    x[0, 1] = float("-inf")
    m = nn.Sequential(nn.Softmax(dim=1)).eval()
    R = torch.rand(2, 5)
    assert torch.equal(RelevanceEngine(m, dlbacktrace())(x, seed=R).input, R)  # DLBacktrace: passes
    r = RelevanceEngine(m, lrp_epsilon())(x, seed=R).input
    s = torch.softmax(x, 1)
    xz = torch.where(torch.isinf(x), torch.zeros_like(x), x)
    ref = torch.stack([torch.stack([xz[b, i] * (R[b, i] - s[b, i] * R[b].sum()) for i in range(5)])
                       for b in range(2)])
    assert rel_err(r, ref) < 1e-6 and torch.isfinite(r).all()


@pytest.mark.parametrize("affine", [True, False])
def test_layernorm_lrp_equals_detached_std_gradient_and_conserves(affine):
    torch.manual_seed(4)
    ln = nn.LayerNorm(6, elementwise_affine=affine).eval()
    if affine:
        with torch.no_grad():
            ln.weight.uniform_(0.5, 2.0)
            ln.bias.zero_()
    x = torch.randn(3, 4, 6)
    R = torch.rand(3, 4, 6)
    r = RelevanceEngine(nn.Sequential(ln), lrp_epsilon(1e-12))(x, seed=R).input
    # LXT's construction: differentiate the layer with the standard deviation detached
    xx = x.clone().requires_grad_(True)
    mu = xx.mean(-1, keepdim=True)
    std = (((xx - mu) ** 2).mean(-1, keepdim=True) + ln.eps).sqrt().detach()
    y = (xx - mu) / std * (ln.weight if affine else 1)
    g, = torch.autograd.grad(y, xx, R / y.detach())
    assert rel_err(r, g * x) < 1e-4
    assert torch.allclose(total(r), total(R), rtol=1e-4)  # no bias: conserving
    assert torch.equal(RelevanceEngine(nn.Sequential(ln), dlbacktrace())(x, seed=R).input, R)


def test_groupnorm_lrp_conserves_without_bias():
    torch.manual_seed(5)
    gn = nn.GroupNorm(2, 4).eval()
    with torch.no_grad():
        gn.bias.zero_()
    x = torch.randn(2, 4, 3, 3)
    R = torch.rand_like(x)
    r = RelevanceEngine(nn.Sequential(gn), lrp_epsilon(1e-12))(x, seed=R).input
    assert torch.allclose(total(r), total(R), rtol=1e-4)


class ManualRMSNorm(nn.Module):
    """LLaMA's RMSNorm written out in ops (pow, mean, rsqrt, mul)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + 1e-6))


@pytest.mark.parametrize("make", [dlbacktrace, lrp_epsilon])
def test_rmsnorm_identity_rule_module_and_written_out(make):
    torch.manual_seed(6)
    x = torch.randn(2, 3, 5)
    R = torch.rand(2, 3, 5)
    for m in (nn.RMSNorm(5), ManualRMSNorm(5)):
        r = RelevanceEngine(nn.Sequential(m).eval(), make())(x, seed=R).input
        assert rel_err(r, R) < 1e-6


# ------------------------------------------------------------------ attention
class ExplicitAttention(nn.Module):
    """softmax(q k^T * scale + mask) v with matmuls (or einsum)."""

    def __init__(self, einsum: bool = False, causal: bool = False) -> None:
        super().__init__()
        self.einsum, self.causal = einsum, causal

    def forward(self, q, k, v):
        scale = q.shape[-1] ** -0.5
        if self.einsum:
            s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
        else:
            s = q @ k.transpose(-2, -1) * scale
        if self.causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        a = torch.softmax(s, -1)
        return torch.einsum("bhqk,bhkd->bhqd", a, v) if self.einsum else a @ v


class Attn(nn.Module):
    """Projections, an attention core, a head; bias-free so that DLBacktrace conserves."""

    def __init__(self, core: str, d: int = 8, heads: int = 2, kv_heads: int = 2, t: int = 5, causal=False) -> None:
        super().__init__()
        self.h, self.kvh, self.dh = heads, kv_heads, d // heads
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, self.kvh * self.dh, bias=False)
        self.v = nn.Linear(d, self.kvh * self.dh, bias=False)
        self.head = nn.Linear(d * t, 3, bias=False)
        self.core, self.causal = core, causal
        self.explicit = ExplicitAttention(core == "einsum", causal)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.h, self.dh).transpose(1, 2)
        k = self.k(x).view(B, T, self.kvh, self.dh).transpose(1, 2)
        v = self.v(x).view(B, T, self.kvh, self.dh).transpose(1, 2)
        if self.core == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=self.kvh != self.h)
        else:
            if self.kvh != self.h:
                k = k.repeat_interleave(self.h // self.kvh, 1)
                v = v.repeat_interleave(self.h // self.kvh, 1)
            o = self.explicit(q, k, v)
        return self.head(o.transpose(1, 2).reshape(B, -1))


@pytest.mark.parametrize("make", [dlbacktrace, lambda: lrp_epsilon(1e-9)])
@pytest.mark.parametrize("kv_heads,causal", [(2, False), (1, True)])
def test_sdpa_rule_equals_the_explicit_attention(make, kv_heads, causal):
    torch.manual_seed(7)
    sd = Attn("sdpa", kv_heads=kv_heads, causal=causal).eval()
    ex = Attn("matmul", kv_heads=kv_heads, causal=causal).eval()
    es = Attn("einsum", kv_heads=kv_heads, causal=causal).eval()
    ex.load_state_dict(sd.state_dict())
    es.load_state_dict(sd.state_dict())
    x = torch.randn(2, 5, 8)
    a = RelevanceEngine(sd, make())(x).input
    b = RelevanceEngine(ex, make())(x).input
    c = RelevanceEngine(es, make())(x).input
    assert rel_err(a, b) < 1e-4 and rel_err(c, b) < 1e-4 and b.abs().max() > 0
    if make is dlbacktrace:  # products and softmax pass-through conserve; no biases
        assert torch.allclose(total(a), torch.ones(2), rtol=1e-4)


def test_sdpa_boolean_and_float_masks():
    torch.manual_seed(8)
    q, k, v = (torch.randn(1, 2, 4, 3) for _ in range(3))
    keep = torch.tensor([True, True, False, True])

    class M(nn.Module):
        def __init__(self, mask):
            super().__init__()
            self.register_buffer("mask", mask)

        def forward(self, qkv):
            q, k, v = qkv.unbind(0)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)

    qkv = torch.stack([q, k, v])
    R = torch.rand(1, 2, 4, 3)
    rb = RelevanceEngine(M(keep.expand(4, 4)).eval())(qkv, seed=R).input
    fmask = torch.where(keep, 0.0, float("-inf")).expand(4, 4)
    rf = RelevanceEngine(M(fmask).eval())(qkv, seed=R).input
    assert rel_err(rf, rb) < 1e-5
    assert rb[1, :, :, 2].abs().max() == 0 and rb[2, :, :, 2].abs().max() == 0  # masked key: nothing
    assert torch.isclose(rb.sum(), R.sum(), rtol=1e-4)


def test_multihead_attention_module_via_export():
    torch.manual_seed(9)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.MultiheadAttention(8, 2, batch_first=True, bias=False)
            self.fc = nn.Linear(8, 3, bias=False)

        def forward(self, x):
            return self.fc(self.a(x, x, x, need_weights=False)[0].sum(1))

    m = M().eval()
    x = torch.randn(2, 4, 8)
    eng = RelevanceEngine(m, dlbacktrace())
    res = eng(x, record=["a"])
    assert eng.traced_with == "export"
    assert torch.allclose(total(res.input), torch.ones(2), rtol=1e-4)
    assert torch.allclose(total(res.layers["a"]), torch.ones(2), rtol=1e-4)  # module paths are layer names


# ------------------------------------------------------------------ embeddings, gated MLP, rotary
class TokenModel(nn.Module):
    """Embedding, rotary position embedding on a query-like branch, gated SiLU MLP, mean pool."""

    def __init__(self, vocab: int = 20, d: int = 8, t: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.gate = nn.Linear(d, 16, bias=False)
        self.up = nn.Linear(d, 16, bias=False)
        self.down = nn.Linear(16, d, bias=False)
        self.head = nn.Linear(d, 4, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        ang = torch.arange(t).float()[:, None] * inv[None]
        self.register_buffer("cos", torch.cat([ang.cos(), ang.cos()], -1))
        self.register_buffer("sin", torch.cat([ang.sin(), ang.sin()], -1))

    @staticmethod
    def rotate_half(x):
        a, b = x.chunk(2, -1)
        return torch.cat([-b, a], -1)

    def forward(self, ids):
        h = self.emb(ids)
        h = h * self.cos + self.rotate_half(h) * self.sin
        h = self.down(F.silu(self.gate(h)) * self.up(h))
        return self.head(h.mean(1))


@pytest.mark.parametrize("make", [dlbacktrace, lambda: lrp_epsilon(1e-12), dlbacktrace_contrast])
def test_token_ids_rotary_gated_mlp_conserve(make):
    torch.manual_seed(10)
    m = TokenModel().eval()
    ids = torch.randint(0, 20, (3, 6))
    comp = make()
    eng = RelevanceEngine(m, comp)
    res = eng(ids, record=["emb"])
    r = res.input_positive if comp.streams == 2 else res.input
    assert r.shape == ids.shape and r.is_floating_point()
    if comp.name == "dlbacktrace":
        assert torch.allclose(total(r), torch.ones(3), rtol=1e-4)
        # each token's relevance is its embedding vector's relevance, summed
        assert torch.allclose(res.layers["emb"].sum(-1), r, atol=1e-6)
    assert torch.isfinite(r).all()


def test_gated_mlp_product_splits_half():
    torch.manual_seed(11)
    m = TokenModel().eval()
    ids = torch.randint(0, 20, (2, 6))
    res = RelevanceEngine(m, dlbacktrace())(ids, record=["mul_2", "gate", "up", "down"])
    assert torch.allclose(total(res.layers["gate"]), total(res.layers["down"]) / 2, rtol=1e-4)
    assert torch.allclose(total(res.layers["up"]), total(res.layers["down"]) / 2, rtol=1e-4)


# ------------------------------------------------------------------ recurrent layers
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("make", [dlbacktrace, lambda: lrp_epsilon(1e-12)])
@pytest.mark.parametrize("layers,bidir,batch_first", [(1, False, True), (2, True, False)])
def test_recurrent_conserves_without_bias(cls, make, layers, bidir, batch_first):
    torch.manual_seed(12)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = cls(4, 5, num_layers=layers, bidirectional=bidir, batch_first=batch_first, bias=False)
            self.fc = nn.Linear(5 * (2 if bidir else 1), 3, bias=False)

        def forward(self, x):
            out = self.rnn(x)[0]
            return self.fc(out[:, -1] if batch_first else out[-1])

    m = M().eval()
    x = torch.randn(2, 6, 4) if batch_first else torch.randn(6, 2, 4)
    res = RelevanceEngine(m, make())(x, target=1)
    r = res.input if batch_first else res.input.transpose(0, 1)
    assert res.input.shape == x.shape
    assert torch.allclose(total(r), torch.ones(2), rtol=1e-3)


def test_lstm_single_step_equals_the_cell_formula():
    """T = 1, zero state: c = i g, h = o tanh(c): all relevance of h goes to g's affine map."""
    torch.manual_seed(13)
    lstm = nn.LSTM(4, 3, batch_first=True).eval()
    x = torch.randn(2, 1, 4)
    R = torch.rand(2, 1, 3)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = lstm

        def forward(self, x):
            return self.lstm(x)[0]

    r = RelevanceEngine(M().eval(), dlbacktrace())(x, seed=R).input
    W = lstm.weight_ih_l0[6:9].detach()
    b = (lstm.bias_ih_l0[6:9] + lstm.bias_hh_l0[6:9]).detach()
    z = (W[None] * x[:, 0, None, :]).abs()
    ref = (z / (z.sum(-1, keepdim=True) + b.abs()[:, None]) * R[:, 0, :, None]).sum(1)
    assert rel_err(r[:, 0], ref) < 1e-5


def test_recurrent_initial_state_gets_relevance():
    torch.manual_seed(14)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(3, 4, batch_first=True, bias=False)
            self.h0 = nn.Linear(3, 4, bias=False)

        def forward(self, x):
            h0 = self.h0(x[:, 0]).unsqueeze(0)
            return self.rnn(x, h0)[1][0]

    x = torch.randn(2, 5, 3)
    res = RelevanceEngine(M().eval(), dlbacktrace())(x, seed=torch.ones(2, 4))
    assert torch.allclose(total(res.input), torch.full((2,), 4.0), rtol=1e-4)


# ------------------------------------------------------------------ stochastic depth / dropout
def test_stochastic_depth_identity_in_eval_error_in_training():
    from torchvision.ops import StochasticDepth

    torch.manual_seed(15)
    m = nn.Sequential(nn.Linear(4, 4), StochasticDepth(0.5, "row"), nn.Dropout(0.3), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    ref = RelevanceEngine(nn.Sequential(m[0], m[3]).eval())(x).input
    assert torch.allclose(RelevanceEngine(m.eval())(x).input, ref)
    m.train()
    with pytest.raises(ArgumentError, match="eval"):
        RelevanceEngine(m)(x)


# ------------------------------------------------------------------ task modes
def test_task_modes_regression_segmentation_generation():
    torch.manual_seed(16)
    box = nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Linear(8, 4, bias=False)).eval()
    x = torch.randn(3, 6)
    y = box(x)
    r = RelevanceEngine(box)(x, target=[0, 2], task="regression").input
    assert torch.allclose(total(r), y[:, [0, 2]].sum(1), rtol=1e-4, atol=1e-6)  # decomposes the predicted values
    seg = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=False)).eval()
    xi = torch.randn(2, 1, 5, 5)
    p = torch.softmax(seg(xi), 1)
    rs = RelevanceEngine(seg)(xi, target=1, task="segmentation", threshold=0.6).input
    assert torch.allclose(total(rs), (p[:, 1] > 0.6).flatten(1).sum(1).float(), rtol=1e-4)
    with pytest.raises(ArgumentError, match="target"):
        RelevanceEngine(seg)(xi, task="segmentation")
    with pytest.raises(ArgumentError, match="task"):
        RelevanceEngine(seg)(xi, task="nope")
