"""Offline example: stream a real image data set through a small CNN and keep, for
every channel of a conv layer, its top-k most-activating samples."""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .ops import TopKState, cpu_isa, pool_topk_update


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (1,797 real images), upsampled to 16x16."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    return x, torch.tensor(d.target)


def _train(x: torch.Tensor, y: torch.Tensor, steps: int = 200, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def topk_example(k: int = 5, show: int = 8, progress: bool = True) -> int:
    t0 = time.perf_counter()
    x, y = _digits()
    model = _train(x, y)
    acc = (model(x).argmax(1) == y).float().mean().item()
    layer = model[3]  # second conv layer, [B, 32, 8, 8]
    state = TopKState.empty(layer.out_channels, k)
    captured: dict[str, torch.Tensor] = {}
    hook = layer.register_forward_hook(lambda m, i, o: captured.__setitem__("out", o))
    with torch.inference_mode():
        for start in tqdm(range(0, len(x), 256), desc="top-k over conv2", disable=not progress):
            model(x[start : start + 256])
            ids = torch.arange(start, min(start + 256, len(x)))
            pool_topk_update(state, captured["out"], ids, "max")
    hook.remove()
    print(f"Model: small CNN trained on scikit-learn digits ({len(x)} images), train accuracy {acc:.1%}")
    print(f"Layer: conv2 ({layer.out_channels} channels), pool=max, k={k}, CPU kernels: {cpu_isa()}")
    print(f"{'channel':>7}  {'top activation':>14}  {'top samples (id:label@pos)':<60}")
    for c in range(min(show, state.channels)):
        ids = state.ids[c].tolist()
        pos = state.positions[c].tolist()
        items = " ".join(f"{i}:{int(y[i])}@{p}" for i, p in zip(ids, pos) if i >= 0)
        labels = np.bincount([int(y[i]) for i in ids if i >= 0], minlength=10)
        print(f"{c:>7}  {state.values[c, 0].item():>14.3f}  {items:<60} majority class {labels.argmax()}")
    print("Values are pre-ReLU conv outputs: a channel whose best activation is negative still gets its")
    print("top-k (slots start at -inf, not 0). Positions are flattened h*8+w of the 8x8 map.")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0
