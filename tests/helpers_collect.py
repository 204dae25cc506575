"""Shared helpers of the collect/store/distributed tests: tiny models, data, an exact reference."""
from __future__ import annotations

import os
import tempfile

import torch
from torch import nn
from torch.utils.data import Dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("SEMLENS_CACHE", os.path.join(tempfile.gettempdir(), "semlens_fast_cache"))


class TinyCNN(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.block = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 5)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.calls = {"head": 0, "forward": 0}

    def forward(self, x):
        self.calls["forward"] += 1
        x = self.block(self.act(self.conv1(x)))
        self.calls["head"] += 1
        return self.head(x.mean((2, 3)))


class RandomImages(Dataset):
    """Deterministic random images; ``ds[i] = (image [3, 8, 8], label)``."""

    def __init__(self, n: int, seed: int = 0, hw: int = 8):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, hw, hw, generator=g)
        self.y = torch.arange(n) % 5

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def exact_topk(pooled: torch.Tensor, ids: torch.Tensor, k: int, positions: torch.Tensor | None = None):
    """Exact fp32 top-k of ``pooled [N, C]`` in the library's order (value desc, id asc).

    NaN entries are dropped. Returns (values [C, k], ids [C, k], positions [C, k]) padded with
    -inf / -1 / -1.
    """
    N, C = pooled.shape
    if positions is None:
        positions = torch.full((N, C), -1, dtype=torch.int32)
    vals = torch.full((C, k), float("-inf"))
    out_ids = torch.full((C, k), -1, dtype=torch.int64)
    out_pos = torch.full((C, k), -1, dtype=torch.int32)
    for c in range(C):
        v = pooled[:, c].float()
        ok = ~torch.isnan(v)
        v, i, p = v[ok], ids[ok], positions[ok, c]
        o = torch.argsort(i, stable=True)
        v, i, p = v[o], i[o], p[o]
        o = torch.argsort(v, descending=True, stable=True)[:k]
        n = len(o)
        vals[c, :n], out_ids[c, :n], out_pos[c, :n] = v[o], i[o], p[o].to(torch.int32)
    return vals, out_ids, out_pos


def assert_state_equals(state, ref, check_positions=True):
    v, i, p = ref
    assert torch.equal(state.ids, i), (state.ids, i)
    assert torch.equal(state.values.view(torch.int32), v.view(torch.int32)), (state.values, v)
    if check_positions:
        assert torch.equal(state.positions, p), (state.positions, p)


def full_activations(model, x: torch.Tensor, layer: str, batch_size: int = 64) -> torch.Tensor:
    mod = dict(model.named_modules())[layer]
    outs = []
    h = mod.register_forward_hook(lambda m, i, o: outs.append(o.detach().clone()))
    try:
        with torch.inference_mode():
            for s in range(0, len(x), batch_size):
                model(x[s : s + batch_size])
    finally:
        h.remove()
    return torch.cat(outs)


def pool_ref(a: torch.Tensor, pool: str):
    """Reference pooling of ``[N, C, H, W]``: (pooled [N, C], position [N, C])."""
    f = a.flatten(2).float()
    if pool == "max":
        return f.amax(2), f.argmax(2).to(torch.int32)
    if pool == "absmax":
        return f.abs().amax(2), f.abs().argmax(2).to(torch.int32)
    s = f.double().sum(2)
    if pool == "mean":
        s = s / f.shape[2]
    return s.float() + 0.0, None
