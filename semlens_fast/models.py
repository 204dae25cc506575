"""Small real models for tests, benchmarks and the demo.

* :class:`FashionCNN`: a 3-conv CNN for 28x28 grayscale images (Fashion-MNIST), conv
  layers ``conv1``/``conv2``/``conv3`` (pre-ReLU outputs ``[B, 16|32|32, H, W]``), head
  ``fc``.
* :class:`BatchNormCNN`: the same with BatchNorm after each conv (layers ``bn1``/``bn2``/``bn3``:
  normalised pre-ReLU maps); :class:`SmallResNet`: a stem and three residual blocks (layers
  ``stem.act``, ``block1.act``, ``block2.act``, ``block3.act``: block outputs). Used by the
  planted-artifact benchmark (:mod:`semlens_fast.planted`).
* :func:`trained_fashion_cnn`: trains it for a few hundred steps (about 10-30 s on two
  CPU cores) and caches the weights (safetensors) under ``cache_dir`` (default
  ``$SEMLENS_CACHE`` or ``~/.cache/semlens_fast``), keyed by the data source, steps and
  seed, so later calls load it in milliseconds.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from ._io import read_tensors, write_tensors
from .errors import ArgumentError

log = logging.getLogger("semlens_fast")


class FashionCNN(nn.Module):
    """conv1(1->c1) relu pool2 | conv2(c1->c2) relu pool2 | conv3(c2->c3) relu | avgpool | fc(c3->10)."""

    def __init__(self, channels: tuple[int, int, int] = (16, 32, 32), num_classes: int = 10):
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.conv3(x))
        return self.fc(torch.flatten(self.gap(x), 1))

    conv_layers = ("conv1", "conv2", "conv3")
    audit_layers = conv_layers


class BatchNormCNN(nn.Module):
    """conv-bn-relu-pool x2, conv-bn-relu, avgpool, fc; ``audit_layers`` are the BatchNorm outputs."""

    def __init__(self, channels: tuple[int, int, int] = (16, 32, 32), num_classes: int = 10):
        super().__init__()
        c1, c2, c3 = channels
        self.conv1, self.bn1, self.relu1, self.pool1 = nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2)
        self.conv2, self.bn2, self.relu2, self.pool2 = nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2)
        self.conv3, self.bn3, self.relu3 = nn.Conv2d(c2, c3, 3, padding=1), nn.BatchNorm2d(c3), nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.gap(x), 1))

    audit_layers = ("bn1", "bn2", "bn3")


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.act(y + self.short(x))


class SmallResNet(nn.Module):
    """stem (conv-bn-relu, 16) | block1 (16) | block2 (32, stride 2) | block3 (32, stride 2) | avgpool | fc."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential()
        self.stem.add_module("conv", nn.Conv2d(1, 16, 3, padding=1, bias=False))
        self.stem.add_module("bn", nn.BatchNorm2d(16))
        self.stem.add_module("act", nn.ReLU())
        self.block1, self.block2, self.block3 = _Block(16, 16, 1), _Block(16, 32, 2), _Block(32, 32, 2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(torch.flatten(self.gap(x), 1))

    audit_layers = ("stem.act", "block1.act", "block2.act", "block3.act")


def default_cache_dir() -> Path:
    return Path(os.environ.get("SEMLENS_CACHE", Path.home() / ".cache" / "semlens_fast"))


def trained_fashion_cnn(
    steps: int = 300,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    dataset=None,
    batch_size: int = 64,
    lr: float = 2e-3,
) -> FashionCNN:
    """A :class:`FashionCNN` trained for ``steps`` Adam steps on Fashion-MNIST (or the digits
    fallback), cached under ``cache_dir``. Deterministic for a given seed on one machine.
    Returns the model in eval mode on the CPU; ``model.accuracy`` holds the held-out accuracy
    measured after training (or loaded with the weights).
    """
    from .data import fashion_mnist

    if not isinstance(steps, int) or steps < 0:
        raise ArgumentError(f"steps must be an int >= 0, got {steps!r}")
    train = dataset if dataset is not None else fashion_mnist("train")
    source = getattr(train, "source", "custom")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    fpath = cache / f"fashion_cnn-{source}-n{len(train)}-s{steps}-seed{seed}.safetensors"
    model = FashionCNN()
    if fpath.exists():
        try:
            sd = read_tensors(fpath)
            acc = float(sd.pop("__accuracy__").item()) if "__accuracy__" in sd else float("nan")
            model.load_state_dict(sd)
            model.accuracy = acc  # type: ignore[attr-defined]
            return model.eval()
        except Exception as exc:  # corrupted cache: retrain
            log.warning("retraining FashionCNN: cached weights %s unreadable (%s)", fpath, exc)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = FashionCNN()
    x_all, y_all = train.tensors()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x_all), (batch_size,), generator=g)
        loss = nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    try:
        test = fashion_mnist("test") if dataset is None else dataset
        xt, yt = test.tensors()
        xt, yt = xt[:2000], yt[:2000]
        with torch.inference_mode():
            acc = float((model(xt).argmax(1) == yt).float().mean())
    except Exception:  # pragma: no cover
        acc = float("nan")
    model.accuracy = acc  # type: ignore[attr-defined]
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd["__accuracy__"] = torch.tensor([acc], dtype=torch.float32)
    write_tensors(fpath, sd)
    return model
