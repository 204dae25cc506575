"""Property tests: conservation on random bias-free models, batch independence."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from semlens_fast.relevance import RelevanceEngine, dlbacktrace, lrp_epsilon

from .helpers import rel_err


def _model(seed: int, width: int, pool: str) -> nn.Sequential:
    torch.manual_seed(seed)
    p = nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)
    return nn.Sequential(nn.Conv2d(2, width, 3, padding=1, bias=False), nn.ReLU(), p,
                         nn.Conv2d(width, width, 3, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(width * 2 * 2, 4, bias=False)).eval()


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), width=st.integers(1, 5), pool=st.sampled_from(["max", "avg"]),
       batch=st.integers(1, 3))
def test_bias_free_models_conserve_every_layer(seed, width, pool, batch):
    m = _model(seed, width, pool)
    x = torch.randn(batch, 2, 8, 8, generator=torch.Generator().manual_seed(seed))
    res = RelevanceEngine(m, dlbacktrace())(x, record="all", multiplier=3.0)
    for name, r in res.layers.items():
        tot = r.flatten(1).sum(1)
        # a layer whose units all have zero input passes nothing: then the total is 0
        assert torch.all(torch.isclose(tot, torch.full_like(tot, 3.0), rtol=1e-4) | (tot.abs() < 1e-6)), name
    lrp = RelevanceEngine(m, lrp_epsilon(epsilon=1e-12))(x).input
    assert torch.all(torch.isclose(lrp.flatten(1).sum(1), torch.ones(batch), rtol=1e-3) |
                     (lrp.flatten(1).abs().sum(1) < 1e-6))


def test_batch_independence():
    m = _model(1, 4, "max")
    x = torch.randn(5, 2, 8, 8)
    eng = RelevanceEngine(m)
    full = eng(x, target=2).input
    one = torch.cat([eng(x[i:i + 1], target=2).input for i in range(5)])
    assert rel_err(full, one) < 1e-6
